// Pieces the CPU forward and backward share: the mapping from torch dtypes to the kernels' element
// types, the checked class-index targets, the mean's denominator and how rows are spread over threads.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu/ls_simd.h"
#include "ls_op_common.h"

namespace labelsmooth::cpu {

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Calls fn with a null pointer of the kernels' element type for the logits' dtype.
template <typename Fn>
void dispatch_logits_dtype(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(static_cast<float*>(nullptr));
    case at::kDouble: return fn(static_cast<double*>(nullptr));
    case at::kHalf: return fn(static_cast<fp16_bits*>(nullptr));
    case at::kBFloat16: return fn(static_cast<bf16_bits*>(nullptr));
    default: TORCH_CHECK(false, "labelsmooth cross_entropy: unsupported logits dtype ", dtype);
  }
}

// Probability targets come either in the logits' dtype or in the accumulation dtype (ls_op_common.cpp).
template <typename scalar_t, typename Fn>
void dispatch_target_dtype(const at::Tensor& target, at::ScalarType logits_dtype, Fn&& fn) {
  if (target.scalar_type() == logits_dtype) return fn(static_cast<scalar_t*>(nullptr));
  return fn(static_cast<acc_type<scalar_t>*>(nullptr));
}

template <typename T>
const T* data_as(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mutable_data_as(at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows per parallel task: enough logits per task that scheduling costs little.
inline int64_t row_grain(int64_t classes) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(classes, 1)); }

// A freshly allocated gradient is written page by page, and on Linux every first touch of a 4 KiB
// page is a fault that costs about as much as writing it: for 256 MiB of gradient, several times the
// kernel's own time. Asking for transparent huge pages on the buffer (what PyTorch does for its own
// allocations with THP_MEM_ALLOC_ENABLE=1) makes the faults 512 times fewer. Only a hint: where THP
// is off, or the buffer is small, nothing changes.
inline void advise_huge_pages(at::Tensor& fresh) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(1) << 21;
  const auto begin = reinterpret_cast<uintptr_t>(fresh.mutable_data_ptr());
  const uintptr_t end = begin + fresh.nbytes();
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = end & ~(kHugePage - 1);
  if (last >= first + 2 * kHugePage) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)fresh;
#endif
}

// (N, C) rows of at most this many classes are processed in tiles with the rows side by side, where
// per-row loops would be all prologue and epilogue. Measured on AVX-512 (6.5M logits, fp32): the
// forward gains up to ~40 classes; the backward, whose tile stores scatter, only up to ~12.
constexpr int64_t kShortRowClassesForward = 40;
constexpr int64_t kShortRowClassesBackward = 12;

// Rows per tile of the (N, C, d1, ...) layout: one row per lane, lanes adjacent in memory.
constexpr int64_t kTileLanes = 32;

// Runs fn(o, i0, lanes) over every tile of an [outer, classes, inner] problem, tiles spread over threads.
template <typename Fn>
void for_each_tile(int64_t outer, int64_t classes, int64_t inner, Fn fn) {
  const int64_t tiles_per_outer = ceil_div(inner, kTileLanes);
  const int64_t grain = std::max<int64_t>(1, row_grain(classes) / kTileLanes);
  at::parallel_for(0, outer * tiles_per_outer, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i0 = (task % tiles_per_outer) * kTileLanes;
      fn(task / tiles_per_outer, i0, std::min(kTileLanes, inner - i0));
    }
  });
}

// sum_{i < n} term(i) in double, in an order fixed by n alone (so the same bits for any thread count): term i
// goes to partial sum i % kInterleavedSums, and the partial sums are added in order at the end. A single
// running sum would make every add wait for the one before (a chain as long as the rows, which took as
// long as a tile forward of ten classes); the independent partial sums also vectorize.
constexpr int64_t kInterleavedSums = 8;
template <typename Term>
LS_INLINE double interleaved_sum(int64_t n, Term term) {
  double partial[kInterleavedSums] = {};
  int64_t i = 0;
  for (; i + kInterleavedSums <= n; i += kInterleavedSums) {
    for (int64_t k = 0; k < kInterleavedSums; ++k) partial[k] += term(i + k);
  }
  for (int64_t k = 0; i + k < n; ++k) partial[k] += term(i + k);
  double total = 0;
  for (int64_t k = 0; k < kInterleavedSums; ++k) total += partial[k];
  return total;
}

// Raises IndexError for the first class index that is neither in [0, classes) nor ignore_index.
// Done before any kernel runs, so a bad target never reads out of bounds.
void check_class_indices(const int64_t* target, int64_t rows, int64_t classes, int64_t ignore_index);

// The mean's denominator for class-index targets: sum of w[y] over rows whose y != ignore_index
// (their count without weights). Summed by interleaved_sum, so it is the same for any thread count.
template <typename acc_t>
acc_t class_index_mean_denominator(const int64_t* target, int64_t rows, const acc_t* weight, int64_t ignore_index) {
  return static_cast<acc_t>(interleaved_sum(rows, [&](int64_t r) {
    const bool counted = target[r] != ignore_index;
    return !counted ? 0.0 : (weight == nullptr ? 1.0 : static_cast<double>(weight[target[r]]));
  }));
}

// Sum of all weights (K without weights): the W of the row formulas.
template <typename acc_t>
acc_t weight_total(const acc_t* weight, int64_t classes) {
  if (weight == nullptr) return static_cast<acc_t>(classes);
  double total = 0;
  for (int64_t c = 0; c < classes; ++c) total += weight[c];
  return static_cast<acc_t>(total);
}

}  // namespace labelsmooth::cpu
