// The vectorized inner loops of the CPU kernels, each over one contiguous chunk of a row. They are
// inlined into the drivers' LS_CPU_TARGET_CLONES functions, so they are compiled once per instruction set.
//
// A chunk is small enough to stay in the L1/L2 cache, so the forward makes two passes over it (max and
// sums, then sum of exp) while reading it from memory once. The drivers cut every row into the same fixed
// chunks whatever the thread count and merge the per-chunk results in chunk order, which is what makes
// the results bit-identical for any number of threads.
#pragma once

#include <algorithm>
#include <cstdint>

#include "kernels/ls_row_math.h"
#include "cpu/ls_simd.h"

namespace labelsmooth::cpu {

// Logits per chunk: 32 KiB of fp32, so the second pass of the forward reads from L1/L2.
constexpr int64_t kChunkElements = 8192;

// What the forward learns from one chunk of a row; partials merge in chunk order.
template <typename acc_t>
struct ChunkPartial {
  SoftmaxState<acc_t> softmax;
  acc_t shifted_sum;  // class index: sum_c w_c (z_c - pivot); probabilities: sum_c w_c t'_c (z_c - pivot)
  acc_t mass;         // probabilities: sum_c w_c t'_c (unused for class indices)
};

template <typename acc_t>
LS_INLINE ChunkPartial<acc_t> merge_chunk_partials(const ChunkPartial<acc_t>& a, const ChunkPartial<acc_t>& b) {
  return ChunkPartial<acc_t>{softmax_state_merge(a.softmax, b.softmax), a.shifted_sum + b.shifted_sum,
                             a.mass + b.mass};
}

// Logits per prefetch step of chunk_sum_exp: 1 KiB of fp32, 16 cache lines.
constexpr int64_t kPrefetchBlock = 256;

// sum_c exp(z_c - max). This second pass reads the chunk from cache and is compute-bound, so it also
// asks for the memory of the following chunk (prefetch_next, usually z + n: the rest of the row or
// the next row), which keeps the memory bus busy while the exps are computed. A prefetch never
// faults, so asking past the end of the tensor is harmless.
template <typename scalar_t, typename acc_t>
LS_INLINE acc_t chunk_sum_exp(const scalar_t* z, int64_t n, acc_t max, const scalar_t* prefetch_next) {
  // A chunk of only -inf logits contributes nothing (exp(-inf - -inf) would be NaN).
  if (max == -INFINITY) return acc_t(0);
  acc_t s = 0;
  for (int64_t block = 0; block < n; block += kPrefetchBlock) {
    const int64_t block_end = std::min(n, block + kPrefetchBlock);
    const char* next = reinterpret_cast<const char*>(prefetch_next + block);
    for (int64_t byte = 0; byte < (block_end - block) * int64_t(sizeof(scalar_t)); byte += 64) {
      __builtin_prefetch(next + byte, 0, 1);
    }
    acc_t block_sum = 0;
#pragma omp simd reduction(+ : block_sum)
    for (int64_t j = block; j < block_end; ++j) block_sum += exp_vectorizable(load_as_acc(z[j]) - max);
    s += block_sum;
  }
  return s;
}

// The chunk's max, and sum_c w_c (z_c - pivot) (w == nullptr: all weights 1), in one pass.
template <typename scalar_t, typename acc_t>
LS_INLINE void chunk_max_and_shifted_sum(const scalar_t* z, const acc_t* w, int64_t n, acc_t pivot, acc_t* max_out,
                                         acc_t* sum_out) {
  acc_t m = -INFINITY, s = 0;
  if (w == nullptr) {
#pragma omp simd reduction(max : m) reduction(+ : s)
    for (int64_t j = 0; j < n; ++j) {
      const acc_t x = load_as_acc(z[j]);
      m = x > m ? x : m;
      s += x - pivot;
    }
  } else {
#pragma omp simd reduction(max : m) reduction(+ : s)
    for (int64_t j = 0; j < n; ++j) {
      const acc_t x = load_as_acc(z[j]);
      m = x > m ? x : m;
      s += w[j] * (x - pivot);
    }
  }
  *max_out = m;
  *sum_out = s;
}

// The chunk's max, sum_c w_c t'_c and sum_c w_c t'_c (z_c - pivot) for probability targets t
// (t' = (1-eps) t + eps/K), in one pass.
template <typename scalar_t, typename target_t, typename acc_t>
LS_INLINE void chunk_target_sums(const scalar_t* z, const target_t* t, const acc_t* w, int64_t n,
                                            acc_t pivot, acc_t eps, int64_t classes, acc_t* max_out,
                                            acc_t* mass_out, acc_t* dot_out) {
  acc_t m = -INFINITY, mass = 0, dot = 0;
  if (w == nullptr) {
#pragma omp simd reduction(max : m) reduction(+ : mass, dot)
    for (int64_t j = 0; j < n; ++j) {
      const acc_t x = load_as_acc(z[j]);
      const acc_t tw = smoothed_probability(load_as_acc(t[j]), eps, classes);
      m = x > m ? x : m;
      mass += tw;
      dot += tw * (x - pivot);
    }
  } else {
#pragma omp simd reduction(max : m) reduction(+ : mass, dot)
    for (int64_t j = 0; j < n; ++j) {
      const acc_t x = load_as_acc(z[j]);
      const acc_t tw = w[j] * smoothed_probability(load_as_acc(t[j]), eps, classes);
      m = x > m ? x : m;
      mass += tw;
      dot += tw * (x - pivot);
    }
  }
  *max_out = m;
  *mass_out = mass;
  *dot_out = dot;
}

// sum_c w_c t'_c alone (the backward needs it before writing any gradient of the row).
template <typename target_t, typename acc_t>
LS_INLINE acc_t chunk_target_mass(const target_t* t, const acc_t* w, int64_t n, acc_t eps,
                                             int64_t classes) {
  acc_t mass = 0;
  if (w == nullptr) {
#pragma omp simd reduction(+ : mass)
    for (int64_t j = 0; j < n; ++j) mass += smoothed_probability(load_as_acc(t[j]), eps, classes);
  } else {
#pragma omp simd reduction(+ : mass)
    for (int64_t j = 0; j < n; ++j) mass += w[j] * smoothed_probability(load_as_acc(t[j]), eps, classes);
  }
  return mass;
}

// Class-index gradient of a chunk, without the target's own term (the driver patches that one element):
//   out_j = prob_scale * exp(z_j - lse) - smooth_scale * w_j
template <typename scalar_t, typename acc_t>
LS_INLINE void chunk_class_index_grad(const scalar_t* z, const acc_t* w, scalar_t* out, int64_t n,
                                                 acc_t lse, ClassIndexGradCoefs<acc_t> coefs) {
  if (w == nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const acc_t p = exp_vectorizable(load_as_acc(z[j]) - lse);
      out[j] = store_from_acc<scalar_t, acc_t>(class_index_grad(coefs, p, acc_t(1), false));
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const acc_t p = exp_vectorizable(load_as_acc(z[j]) - lse);
      out[j] = store_from_acc<scalar_t, acc_t>(class_index_grad(coefs, p, w[j], false));
    }
  }
}

// Probability-target gradient of a chunk: out_j = g * (mass * exp(z_j - lse) - w_j t'_j)
template <typename scalar_t, typename target_t, typename acc_t>
LS_INLINE void chunk_probability_grad(const scalar_t* z, const target_t* t, const acc_t* w,
                                                 scalar_t* out, int64_t n, acc_t lse, acc_t g, acc_t mass,
                                                 acc_t eps, int64_t classes) {
  if (w == nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const acc_t p = exp_vectorizable(load_as_acc(z[j]) - lse);
      const acc_t target_mass = smoothed_probability(load_as_acc(t[j]), eps, classes);
      out[j] = store_from_acc<scalar_t, acc_t>(probability_grad(g, mass, p, target_mass));
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const acc_t p = exp_vectorizable(load_as_acc(z[j]) - lse);
      const acc_t target_mass = w[j] * smoothed_probability(load_as_acc(t[j]), eps, classes);
      out[j] = store_from_acc<scalar_t, acc_t>(probability_grad(g, mass, p, target_mass));
    }
  }
}

}  // namespace labelsmooth::cpu
