// The vectorized inner loops of the CPU kernels, each over one contiguous chunk of a row. Part of the
// per-instruction-set kernels (ls_isa_kernels.h): inlined into the drivers, compiled once per instruction set.
//
// A chunk is small enough to stay in the L1/L2 cache, so the forward makes two passes over it (max and
// sums, then sum of exp) while reading it from memory once. The drivers cut every row into the same fixed
// chunks whatever the thread count and merge the per-chunk results in chunk order, which is what makes
// the results bit-identical for any number of threads. The loops run on fixed-width lanes (ls_lanes.h),
// so they are bit-identical across the instruction sets with FMA as well.
#pragma once

#include "cpu/ls_lanes.h"

namespace labelsmooth::cpu::LS_CPU_ISA {

// Logits per chunk: 32 KiB of fp32, so the second pass of the forward reads from L1/L2.
constexpr int64_t kChunkElements = 8192;

// What the forward learns from one chunk of a row; partials merge in chunk order.
template <typename acc_t>
struct ChunkPartial {
  SoftmaxState<acc_t> softmax;
  acc_t shifted_sum;  // class index: sum_c w_c (z_c - pivot); probabilities: sum_c w_c t'_c (z_c - pivot)
  acc_t mass;         // probabilities: sum_c w_c t'_c (unused for class indices)
};

// Logit soft-capping: the loss reads every logit z as z' = cap * tanh(z / cap) (kSoftcap), else as z.
// z * inverse_cap instead of z / cap: a multiplication is cheaper than a division, for one more rounding
// (half an ulp of the argument of tanh).
template <bool kSoftcap, typename V, typename acc_t>
LS_INLINE V read_logit(V z, acc_t cap, acc_t inverse_cap) {
  if constexpr (kSoftcap) {
    return cap * tanh_vectorizable(z * inverse_cap);
  } else {
    return z;
  }
}

// The same, and dz'/dz in *derivative (kSoftcap only). softcap_derivative of ls_row_math.h, 1 - (z' / cap)^2,
// taken from t = tanh(z / cap) itself: z' / cap is t before the multiplication by cap rounded it.
template <bool kSoftcap, typename V, typename acc_t>
LS_INLINE V read_logit(V z, acc_t cap, acc_t inverse_cap, V* derivative) {
  if constexpr (kSoftcap) {
    const V t = tanh_vectorizable(z * inverse_cap);
    *derivative = acc_t(1) - t * t;
    return cap * t;
  } else {
    return z;
  }
}

template <typename acc_t>
LS_INLINE ChunkPartial<acc_t> merge_chunk_partials(const ChunkPartial<acc_t>& a, const ChunkPartial<acc_t>& b) {
  return ChunkPartial<acc_t>{softmax_state_merge(a.softmax, b.softmax), a.shifted_sum + b.shifted_sum,
                             a.mass + b.mass};
}

// The loop bodies passed to for_lane_blocks must be inlined too (GCC may otherwise call them per block).
#define LS_LAMBDA_INLINE __attribute__((always_inline))

// Calls body(j, full, count) for the lane blocks of [begin, end): count = kLaneCount elements from j
// (full is std::true_type), then at most one partial block of count < kLaneCount (std::false_type).
template <typename acc_t, typename Body>
LS_INLINE void for_lane_blocks(int64_t begin, int64_t end, Body&& body) {
  constexpr int64_t kLanes = kLaneCount<acc_t>;
  int64_t j = begin;
  for (; j + kLanes <= end; j += kLanes) body(j, std::true_type{}, kLanes);
  if (j < end) body(j, std::false_type{}, end - j);
}

// The block at p: full, or its first count elements (zeros in the other lanes).
template <typename Full, typename scalar_t>
LS_INLINE auto load_block(const scalar_t* p, int64_t count) {
  if constexpr (Full::value) {
    return load_lanes(p);
  } else {
    return load_first_lanes(p, count);
  }
}

template <typename Full, typename scalar_t, typename V>
LS_INLINE void store_block(scalar_t* p, V v, int64_t count) {
  if constexpr (Full::value) {
    store_lanes(p, v);
  } else {
    store_first_lanes(p, v, count);
  }
}

// v where the block has data, else fill (a partial block's padding must not count).
template <typename Full, typename acc_t>
LS_INLINE Lanes<acc_t> in_block_or(Lanes<acc_t> v, acc_t fill, int64_t count) {
  if constexpr (Full::value) {
    return v;
  } else {
    return select(first_lanes<acc_t>(count), v, broadcast(fill));
  }
}

// w_j times v (w == nullptr: all weights 1).
template <typename Full, typename acc_t>
LS_INLINE Lanes<acc_t> weighted(const acc_t* w, int64_t j, int64_t count, Lanes<acc_t> v) {
  return w == nullptr ? v : load_block<Full>(w + j, count) * v;
}

// Logits per prefetch step of chunk_sum_exp: 1 KiB of fp32, 16 cache lines.
constexpr int64_t kPrefetchBlock = 256;

// sum_c exp(z_c - max). This second pass reads the chunk from cache and is compute-bound, so it also
// asks for the memory of the following chunk (prefetch_next, usually z + n: the rest of the row or
// the next row), which keeps the memory bus busy while the exps are computed. A prefetch never
// faults, so asking past the end of the tensor is harmless.
template <typename scalar_t, typename acc_t, typename next_t>
LS_INLINE acc_t chunk_sum_exp(const scalar_t* z, int64_t n, acc_t max, const next_t* prefetch_next) {
  // A chunk of only -inf logits contributes nothing (exp(-inf - -inf) would be NaN).
  if (max == -INFINITY) return acc_t(0);
  Lanes<acc_t> sum{};
  for (int64_t block = 0; block < n; block += kPrefetchBlock) {
    const int64_t block_end = std::min(n, block + kPrefetchBlock);
    const char* next = reinterpret_cast<const char*>(prefetch_next + block);
    for (int64_t byte = 0; byte < (block_end - block) * int64_t(sizeof(next_t)); byte += 64) {
      __builtin_prefetch(next + byte, 0, 1);
    }
    for_lane_blocks<acc_t>(block, block_end, [&](int64_t j, auto full, int64_t count) LS_LAMBDA_INLINE {
      using Full = decltype(full);
      sum += in_block_or<Full>(exp_vectorizable(load_block<Full>(z + j, count) - max), acc_t(0), count);
    });
  }
  return sum_lanes<acc_t>(sum);
}

// The chunk's max, and sum_c w_c (z_c - pivot) (w == nullptr: all weights 1), in one pass.
template <typename scalar_t, typename acc_t>
LS_INLINE void chunk_max_and_shifted_sum(const scalar_t* z, const acc_t* w, int64_t n, acc_t pivot, acc_t* max_out,
                                         acc_t* sum_out) {
  Lanes<acc_t> m = broadcast<acc_t>(-INFINITY), s{};
  for_lane_blocks<acc_t>(0, n, [&](int64_t j, auto full, int64_t count) LS_LAMBDA_INLINE {
    using Full = decltype(full);
    const Lanes<acc_t> x = in_block_or<Full>(load_block<Full>(z + j, count), acc_t(-INFINITY), count);
    m = select(x > m, x, m);
    s += in_block_or<Full>(weighted<Full>(w, j, count, x - pivot), acc_t(0), count);
  });
  *max_out = max_lanes<acc_t>(m);
  *sum_out = sum_lanes<acc_t>(s);
}

// The chunk's max, sum_c w_c t'_c and sum_c w_c t'_c (z_c - pivot) for probability targets t
// (t' = (1-eps) t + eps/K), in one pass.
template <typename scalar_t, typename target_t, typename acc_t>
LS_INLINE void chunk_target_sums(const scalar_t* z, const target_t* t, const acc_t* w, int64_t n, acc_t pivot,
                                 acc_t eps, int64_t classes, acc_t* max_out, acc_t* mass_out, acc_t* dot_out) {
  Lanes<acc_t> m = broadcast<acc_t>(-INFINITY), mass{}, dot{};
  for_lane_blocks<acc_t>(0, n, [&](int64_t j, auto full, int64_t count) LS_LAMBDA_INLINE {
    using Full = decltype(full);
    const Lanes<acc_t> x = in_block_or<Full>(load_block<Full>(z + j, count), acc_t(-INFINITY), count);
    const Lanes<acc_t> tw = in_block_or<Full>(
        weighted<Full>(w, j, count, smoothed_probability_lanes<acc_t>(load_block<Full>(t + j, count), eps, classes)),
        acc_t(0), count);
    m = select(x > m, x, m);
    mass += tw;
    dot += in_block_or<Full>(tw * (x - pivot), acc_t(0), count);
  });
  *max_out = max_lanes<acc_t>(m);
  *mass_out = sum_lanes<acc_t>(mass);
  *dot_out = sum_lanes<acc_t>(dot);
}

// The capped logits of a chunk, in the accumulation type (soft-capping's forward computes each tanh once,
// into a buffer that its two passes then read from cache).
template <typename scalar_t, typename acc_t>
LS_INLINE void chunk_capped_logits(const scalar_t* z, int64_t n, acc_t cap, acc_t inverse_cap, acc_t* out) {
  for_lane_blocks<acc_t>(0, n, [&](int64_t j, auto full, int64_t count) LS_LAMBDA_INLINE {
    using Full = decltype(full);
    store_block<Full>(out + j, read_logit<true>(load_block<Full>(z + j, count), cap, inverse_cap), count);
  });
}

// Class-index gradient of a chunk, without the target's own term (the driver patches that one element):
//   out_j = (prob_scale * exp(z'_j - lse) - smooth_scale * w_j) * dz'_j/dz_j   (z' = z without soft-capping)
template <bool kSoftcap, typename scalar_t, typename acc_t>
LS_INLINE void chunk_class_index_grad(const scalar_t* z, const acc_t* w, scalar_t* out, int64_t n, acc_t lse,
                                      ClassIndexGradCoefs<acc_t> coefs, acc_t cap, acc_t inverse_cap) {
  for_lane_blocks<acc_t>(0, n, [&](int64_t j, auto full, int64_t count) LS_LAMBDA_INLINE {
    using Full = decltype(full);
    Lanes<acc_t> derivative;
    const Lanes<acc_t> x = read_logit<kSoftcap>(load_block<Full>(z + j, count), cap, inverse_cap, &derivative);
    const Lanes<acc_t> p = exp_vectorizable(x - lse);
    const Lanes<acc_t> w_j = w == nullptr ? broadcast(acc_t(1)) : load_block<Full>(w + j, count);
    Lanes<acc_t> grad = class_index_grad_fused(coefs, p, w_j);
    if constexpr (kSoftcap) grad = grad * derivative;
    store_block<Full>(out + j, grad, count);
  });
}

// Probability-target gradient of a chunk: out_j = (prob_scale * exp(z'_j - lse) - g * w_j t'_j) * dz'_j/dz_j,
// prob_scale = g * mass + grad_lse.
template <bool kSoftcap, typename scalar_t, typename target_t, typename acc_t>
LS_INLINE void chunk_probability_grad(const scalar_t* z, const target_t* t, const acc_t* w, scalar_t* out, int64_t n,
                                      acc_t lse, acc_t prob_scale, acc_t g, acc_t eps, int64_t classes, acc_t cap,
                                      acc_t inverse_cap) {
  for_lane_blocks<acc_t>(0, n, [&](int64_t j, auto full, int64_t count) LS_LAMBDA_INLINE {
    using Full = decltype(full);
    Lanes<acc_t> derivative;
    const Lanes<acc_t> x = read_logit<kSoftcap>(load_block<Full>(z + j, count), cap, inverse_cap, &derivative);
    const Lanes<acc_t> p = exp_vectorizable(x - lse);
    const Lanes<acc_t> target_mass =
        weighted<Full>(w, j, count, smoothed_probability_lanes<acc_t>(load_block<Full>(t + j, count), eps, classes));
    Lanes<acc_t> grad = probability_grad_lanes(prob_scale, g, p, target_mass);
    if constexpr (kSoftcap) grad = grad * derivative;
    store_block<Full>(out + j, grad, count);
  });
}

}  // namespace labelsmooth::cpu::LS_CPU_ISA
