// Label-smoothed cross-entropy on CUDA: the kernels behind ls_cross_entropy_kernels.cuh.
//
// Both passes are memory-bound, so each reads every logit once (the backward also writes each
// gradient once) with 16-byte loads where the row allows, and keeps one online-softmax state per
// thread, which works for any number of classes without shared-memory limits. Rows are mapped to
// threads in one of four ways, chosen from the row length only:
//   * short rows (up to 32 vectors):     4 lanes per row, 32 rows per 128-thread block;
//   * medium rows (up to 512 vectors):   a warp per row, 4 rows per block;
//   * long rows:                         a 256-thread block per row;
//   * inner > 1 ((N, C, d...) inputs):   32 rows (consecutive inner positions, so loads coalesce) x
//                                        8 class slices per 256-thread block.
// Options cost no pass of their own: softcap is applied to every logit as it is read (nothing capped is
// stored), the upstream gradient of the lse folds into the per-row coefficient of p_j, and the forward
// saves the per-row target mass of probability targets so that the backward reads the targets once.
// Determinism: which thread reads which class, the order in which threads' partial results are
// merged (fixed butterfly and fixed shared-memory order), and the per-block partials of mean/sum
// (reduced by one block in a fixed order) depend only on the problem's shape and the row's alignment,
// never on timing: no atomics anywhere.

#include "cuda/ls_cross_entropy_kernels.cuh"
#include "cuda/ls_launch.cuh"

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kernels/ls_row_math.h"

// The C library's assertion handler, which CUDA also provides in device code. Called directly (as
// PyTorch's CUDA_KERNEL_ASSERT does) so that the target check stays on in NDEBUG builds.
extern "C" __host__ __device__ void __assert_fail(const char* assertion, const char* file, unsigned int line,
                                                  const char* function) noexcept;

namespace labelsmooth {
namespace cuda {
namespace {

constexpr int kVectorBytes = 16;
constexpr int kWarp = 32;
// Independent 16-byte loads in flight per thread: more in the forward, which only reads; the
// backward also holds the outputs.
constexpr int kForwardUnroll = 4;
constexpr int kBackwardUnroll = 2;
constexpr int kStridedChunk = 4;  // consecutive classes per thread and step when inner > 1

constexpr int kGroupBlockThreads = 128;
constexpr int kShortRowLanes = 4;
constexpr int64_t kShortRowMaxVectors = 32;
constexpr int64_t kWarpRowMaxVectors = 512;
constexpr int kRowBlockThreads = 256;
constexpr int kTileRows = 32;
constexpr int kTileSlices = 8;
constexpr int kReduceThreads = 512;
constexpr int64_t kTargetRowsPerBlock = int64_t(kReduceThreads) * 8;
// Row kernels declare how many blocks must fit on an SM, which caps their registers: 64 per thread
// (half occupancy, plenty of loads in flight for a memory-bound kernel) with fp32 accumulation, 128
// with fp64, whose exp/log need more and which ptxas's default heuristic would otherwise spill.
template <int kThreads, typename acc_t>
constexpr int kMinBlocks = 65536 / (kThreads * (sizeof(acc_t) == 8 ? 128 : 64));
// A grid-stride cap that does not depend on the device keeps the partial sums (and so the bits of
// mean/sum) the same on every GPU, and bounds the scratch of the final reduction. Overridable at
// compile time only so that tests can run the grid-stride loops on small problems.
#ifndef LS_MAX_GRID_BLOCKS
#define LS_MAX_GRID_BLOCKS 8192
#endif
constexpr int64_t kMaxGridBlocks = LS_MAX_GRID_BLOCKS;

// Scratch layouts (elements). Forward: weight total, the row kernel's per-block loss sums, then
// check_targets_kernel's per-chunk denominator sums. Class-index backward: weight total, the mean's
// denominator, then the per-chunk denominator sums.
constexpr int64_t kWeightTotalSlot = 0;
constexpr int64_t kForwardLossPartialsOffset = 1;
constexpr int64_t kDenominatorSlot = 1;
constexpr int64_t kBackwardDenominatorPartialsOffset = 2;

template <typename T>
constexpr int kVectorElems = kVectorBytes / int(sizeof(T));

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

enum class RowMapping { kShortRows, kWarpRows, kBlockRows, kInnerTiles };

struct LaunchPlan {
  RowMapping mapping;
  int64_t blocks;
};

LaunchPlan plan_launch(const Problem& p, size_t element_size) {
  if (p.inner > 1) {
    const int64_t tiles = p.outer * ceil_div(p.inner, kTileRows);
    return {RowMapping::kInnerTiles, tiles < kMaxGridBlocks ? tiles : kMaxGridBlocks};
  }
  const int64_t vectors = ceil_div(p.classes * int64_t(element_size), kVectorBytes);
  RowMapping mapping = RowMapping::kBlockRows;
  int64_t rows_per_block = 1;
  if (vectors <= kShortRowMaxVectors) {
    mapping = RowMapping::kShortRows;
    rows_per_block = kGroupBlockThreads / kShortRowLanes;
  } else if (vectors <= kWarpRowMaxVectors) {
    mapping = RowMapping::kWarpRows;
    rows_per_block = kGroupBlockThreads / kWarp;
  }
  const int64_t blocks = ceil_div(p.outer, rows_per_block);
  return {mapping, blocks < kMaxGridBlocks ? blocks : kMaxGridBlocks};
}

// ---------------------------------------------------------------------------------------------
// Element conversion and arithmetic helpers.

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T, typename acc_t>
__device__ __forceinline__ T from_acc(acc_t x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    return static_cast<T>(x);
  }
}

// exp of arguments <= 0 (logit minus a running max or the lse): the approximate hardware exp2 is
// within a few ulp there, and terms far below the max, where its relative error grows, add nothing.
__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }

// max that returns NaN when either side is NaN, so a NaN logit makes the lse NaN (as PyTorch's).
__device__ __forceinline__ float max_propagating_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return (a != a || b != b) ? a + b : fmaxf(a, b);
#endif
}
__device__ __forceinline__ double max_propagating_nan(double a, double b) {
  return (a != a || b != b) ? a + b : fmax(a, b);
}

// Logit soft-capping (ls_row_math.h): z' = cap * tanh(z / cap), with the accurate tanh (the approximate
// tanh.approx.f32 is off by up to 2^-11 relative, far beyond fp32 accumulation). cap == 0 leaves z as it is.
__device__ __forceinline__ float softcapped(float z, float cap) { return cap * tanhf(z / cap); }
__device__ __forceinline__ double softcapped(double z, double cap) { return cap * tanh(z / cap); }

// The logits of a chunk as the loss reads them.
template <typename acc_t, int N>
__device__ __forceinline__ void read_logits(acc_t (&out)[N], const acc_t (&z)[N], acc_t cap) {
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = cap > acc_t(0) ? softcapped(z[j], cap) : z[j];
}

// dL/dz from dL/dz' and the capped logit z' (chain rule through the tanh).
template <typename acc_t>
__device__ __forceinline__ acc_t through_softcap(acc_t grad, acc_t capped, acc_t cap) {
  return cap > acc_t(0) ? grad * softcap_derivative(capped, cap) : grad;
}

// Folds a chunk of logits into a running softmax state with one rescale per chunk.
template <typename acc_t, int N>
__device__ __forceinline__ void softmax_accumulate(SoftmaxState<acc_t>& s, const acc_t (&z)[N]) {
  acc_t chunk_max = z[0];
#pragma unroll
  for (int j = 1; j < N; ++j) chunk_max = max_propagating_nan(chunk_max, z[j]);
  const acc_t m = max_propagating_nan(s.max, chunk_max);
  // While everything seen is -inf, every term is exp(-inf - 0) = 0 instead of exp(-inf + inf) = NaN.
  const acc_t ref = (m == acc_t(-INFINITY)) ? acc_t(0) : m;
  acc_t sum = s.sum * fast_exp(s.max - ref);
#pragma unroll
  for (int j = 0; j < N; ++j) sum += fast_exp(z[j] - ref);
  s.max = m;
  s.sum = sum;
}

// Partial results of one row over the classes one thread (or a group of threads) has seen: the softmax
// state, mass = sum_c a_c and dot = sum_c a_c (z_c - pivot) for per-class coefficients a_c the op defines,
// and the target's logit (0 where the part does not hold the target class). The pivot is the part's
// first logit (0 if not finite; see row_pivot): taking it from a logit the part reads anyway keeps every
// logit read exactly once, where a row-wide pivot would have every thread read z[0] again.
template <typename acc_t>
struct RowStats {
  SoftmaxState<acc_t> softmax;
  acc_t mass;
  acc_t dot;
  acc_t pivot;
  acc_t target_logit;
};

template <typename acc_t>
__device__ __forceinline__ RowStats<acc_t> empty_stats() {
  return RowStats<acc_t>{SoftmaxState<acc_t>{acc_t(-INFINITY), acc_t(0)}, acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
}

// Called by a visit() before it folds chunk z into s: the part's first chunk sets its pivot. (A part
// whose logits so far are all -inf has no finite sum to keep, so taking a new pivot loses nothing.)
template <typename acc_t, int N>
__device__ __forceinline__ void set_pivot_if_first(RowStats<acc_t>& s, const acc_t (&z)[N]) {
  if (s.softmax.max == acc_t(-INFINITY)) s.pivot = row_pivot(z[0]);
}

// Merges two parts of a row, re-expressing both dots relative to the first non-empty part's pivot.
// Not symmetric: the pivot comes from `a`, and nvcc's default FMA contraction turns sums of products
// (here and in softmax_state_merge) into an FMA that rounds one product but not the other, so
// combine(a, b) and combine(b, a) may differ in the last bits. The lanes of a butterfly therefore end
// with equal values in possibly different bits; only one lane's result per row is used, and which
// lane merges what in which order depends only on the shape, so that result is deterministic.
template <typename acc_t>
__device__ __forceinline__ RowStats<acc_t> combine(const RowStats<acc_t>& a, const RowStats<acc_t>& b) {
  const acc_t pivot = a.softmax.max == acc_t(-INFINITY) ? b.pivot : a.pivot;
  const acc_t dot = (a.dot + a.mass * (a.pivot - pivot)) + (b.dot + b.mass * (b.pivot - pivot));
  return RowStats<acc_t>{softmax_state_merge(a.softmax, b.softmax), a.mass + b.mass, dot, pivot,
                         a.target_logit + b.target_logit};
}
__device__ __forceinline__ float combine(float a, float b) { return a + b; }
__device__ __forceinline__ double combine(double a, double b) { return a + b; }

template <typename acc_t>
__device__ __forceinline__ RowStats<acc_t> shuffle_xor(const RowStats<acc_t>& s, int offset) {
  RowStats<acc_t> r;
  r.softmax.max = __shfl_xor_sync(0xffffffffu, s.softmax.max, offset);
  r.softmax.sum = __shfl_xor_sync(0xffffffffu, s.softmax.sum, offset);
  r.mass = __shfl_xor_sync(0xffffffffu, s.mass, offset);
  r.dot = __shfl_xor_sync(0xffffffffu, s.dot, offset);
  r.pivot = __shfl_xor_sync(0xffffffffu, s.pivot, offset);
  r.target_logit = __shfl_xor_sync(0xffffffffu, s.target_logit, offset);
  return r;
}
__device__ __forceinline__ float shuffle_xor(float v, int offset) { return __shfl_xor_sync(0xffffffffu, v, offset); }
__device__ __forceinline__ double shuffle_xor(double v, int offset) {
  return __shfl_xor_sync(0xffffffffu, v, offset);
}

// Butterfly over aligned groups of kWidth lanes; every lane of the warp must call it.
template <int kWidth, typename V>
__device__ __forceinline__ V group_reduce(V v) {
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2) v = combine(v, shuffle_xor(v, offset));
  return v;
}

// Sum over a block of kThreads threads (a multiple of 32), in a fixed order; the result is valid in
// thread 0. `scratch` holds kThreads / 32 values; the function ends with the block synchronized.
template <int kThreads, typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* scratch) {
  constexpr int kWarps = kThreads / kWarp;
  v = group_reduce<kWarp>(v);
  if (threadIdx.x % kWarp == 0) scratch[threadIdx.x / kWarp] = v;
  __syncthreads();
  acc_t total = acc_t(0);
  if (threadIdx.x == 0) {
    for (int w = 0; w < kWarps; ++w) total += scratch[w];
  }
  __syncthreads();
  return total;
}

// Whether a row with this class index is read. Out-of-range targets are reported by
// check_targets_kernel, which runs first; here they only must not lead to an out-of-bounds read.
__device__ __forceinline__ bool is_read_target(int64_t target, int64_t classes, int64_t ignore_index) {
  return target != ignore_index && target >= 0 && target < classes;
}

template <typename acc_t>
__device__ __forceinline__ acc_t upstream_gradient(int64_t reduction, const acc_t* grad_loss, int64_t row,
                                                   acc_t denominator) {
  if (reduction == kReductionNone) return grad_loss[row];
  if (reduction == kReductionMean) return grad_loss[0] / denominator;
  return grad_loss[0];
}

// ---------------------------------------------------------------------------------------------
// Row traversals. Each calls visit(values[N], first_class[, out[N]]) on chunks of consecutive classes.

// A contiguous row seen by `lane` of kWidth threads: a scalar head up to the first 16-byte boundary,
// 16-byte vectors, then a scalar tail. Which thread sees which class depends only on the row's length
// and alignment.
template <int kWidth, typename T, typename Visit>
__device__ __forceinline__ void for_each_chunk(const T* z, int64_t classes, int lane, Visit&& visit) {
  using acc_t = acc_type<T>;
  constexpr int kVec = kVectorElems<T>;
  const int64_t misalign = int64_t(reinterpret_cast<uintptr_t>(z) % kVectorBytes) / int64_t(sizeof(T));
  const int64_t to_boundary = misalign == 0 ? 0 : kVec - misalign;
  const int64_t head = to_boundary < classes ? to_boundary : classes;
#pragma unroll 1
  for (int64_t c = lane; c < head; c += kWidth) {
    const acc_t x[1] = {to_acc(z[c])};
    visit(x, c);
  }
  const int64_t vectors = (classes - head) / kVec;
  const uint4* body = reinterpret_cast<const uint4*>(z + head);
  for (int64_t v0 = lane; v0 < vectors; v0 += int64_t(kWidth) * kForwardUnroll) {
    uint4 raw[kForwardUnroll];
#pragma unroll
    for (int u = 0; u < kForwardUnroll; ++u) {
      const int64_t v = v0 + int64_t(u) * kWidth;
      if (v < vectors) raw[u] = __ldg(body + v);
    }
#pragma unroll
    for (int u = 0; u < kForwardUnroll; ++u) {
      const int64_t v = v0 + int64_t(u) * kWidth;
      if (v < vectors) {
        const T* elems = reinterpret_cast<const T*>(&raw[u]);
        acc_t x[kVec];
#pragma unroll
        for (int j = 0; j < kVec; ++j) x[j] = to_acc(elems[j]);
        visit(x, head + v * kVec);
      }
    }
  }
#pragma unroll 1
  for (int64_t c = head + vectors * kVec + lane; c < classes; c += kWidth) {
    const acc_t x[1] = {to_acc(z[c])};
    visit(x, c);
  }
}

// The same with an output row written in the same pass. Vectorized where the input and the output
// share their alignment within 16 bytes, scalar otherwise. With read == false the logits are not
// touched and visit() sees zeros (ignored rows).
template <int kWidth, typename T, typename Visit>
__device__ __forceinline__ void for_each_chunk_with_output(const T* z, T* out, int64_t classes, int lane, bool read,
                                                           Visit&& visit) {
  using acc_t = acc_type<T>;
  constexpr int kVec = kVectorElems<T>;
  const uintptr_t z_addr = reinterpret_cast<uintptr_t>(z);
  const uintptr_t out_addr = reinterpret_cast<uintptr_t>(out);
  int64_t head = classes;
  if (z_addr % kVectorBytes == out_addr % kVectorBytes) {
    const int64_t misalign = int64_t(out_addr % kVectorBytes) / int64_t(sizeof(T));
    const int64_t to_boundary = misalign == 0 ? 0 : kVec - misalign;
    head = to_boundary < classes ? to_boundary : classes;
  }
#pragma unroll 1
  for (int64_t c = lane; c < head; c += kWidth) {
    const acc_t x[1] = {read ? to_acc(z[c]) : acc_t(0)};
    T y[1];
    visit(x, c, y);
    out[c] = y[0];
  }
  const int64_t vectors = (classes - head) / kVec;
  const uint4* body_in = reinterpret_cast<const uint4*>(z + head);
  uint4* body_out = reinterpret_cast<uint4*>(out + head);
  for (int64_t v0 = lane; v0 < vectors; v0 += int64_t(kWidth) * kBackwardUnroll) {
    uint4 raw[kBackwardUnroll];
#pragma unroll
    for (int u = 0; u < kBackwardUnroll; ++u) {
      const int64_t v = v0 + int64_t(u) * kWidth;
      raw[u] = make_uint4(0u, 0u, 0u, 0u);
      if (read && v < vectors) raw[u] = __ldg(body_in + v);
    }
#pragma unroll
    for (int u = 0; u < kBackwardUnroll; ++u) {
      const int64_t v = v0 + int64_t(u) * kWidth;
      if (v < vectors) {
        const T* elems = reinterpret_cast<const T*>(&raw[u]);
        acc_t x[kVec];
#pragma unroll
        for (int j = 0; j < kVec; ++j) x[j] = to_acc(elems[j]);
        uint4 packed;
        T* y = reinterpret_cast<T*>(&packed);
        visit(x, head + v * kVec, *reinterpret_cast<T(*)[kVec]>(y));
        body_out[v] = packed;
      }
    }
  }
#pragma unroll 1
  for (int64_t c = head + vectors * kVec + lane; c < classes; c += kWidth) {
    const acc_t x[1] = {read ? to_acc(z[c]) : acc_t(0)};
    T y[1];
    visit(x, c, y);
    out[c] = y[0];
  }
}

// A row of an (N, C, d...) input seen by class slice `slice` of kTileSlices: its classes are `stride`
// apart, so each thread gathers kStridedChunk consecutive classes per chunk while the 32 threads of a warp
// (consecutive inner positions) read consecutive addresses.
template <typename T, typename Visit>
__device__ __forceinline__ void for_each_chunk_strided(const T* z, int64_t stride, int64_t classes, int slice,
                                                       Visit&& visit) {
  using acc_t = acc_type<T>;
  const int64_t chunks = classes / kStridedChunk;
  for (int64_t k = slice; k < chunks; k += kTileSlices) {
    const int64_t c0 = k * kStridedChunk;
    acc_t x[kStridedChunk];
#pragma unroll
    for (int u = 0; u < kStridedChunk; ++u) x[u] = to_acc(__ldg(z + (c0 + u) * stride));
    visit(x, c0);
  }
#pragma unroll 1
  for (int64_t c = chunks * kStridedChunk + slice; c < classes; c += kTileSlices) {
    const acc_t x[1] = {to_acc(__ldg(z + c * stride))};
    visit(x, c);
  }
}

template <typename T, typename Visit>
__device__ __forceinline__ void for_each_chunk_strided_with_output(const T* z, T* out, int64_t stride,
                                                                   int64_t classes, int slice, bool read,
                                                                   Visit&& visit) {
  using acc_t = acc_type<T>;
  const int64_t chunks = classes / kStridedChunk;
  for (int64_t k = slice; k < chunks; k += kTileSlices) {
    const int64_t c0 = k * kStridedChunk;
    acc_t x[kStridedChunk];
#pragma unroll
    for (int u = 0; u < kStridedChunk; ++u) x[u] = read ? to_acc(__ldg(z + (c0 + u) * stride)) : acc_t(0);
    T y[kStridedChunk];
    visit(x, c0, y);
#pragma unroll
    for (int u = 0; u < kStridedChunk; ++u) out[(c0 + u) * stride] = y[u];
  }
#pragma unroll 1
  for (int64_t c = chunks * kStridedChunk + slice; c < classes; c += kTileSlices) {
    const acc_t x[1] = {read ? to_acc(__ldg(z + c * stride)) : acc_t(0)};
    T y[1];
    visit(x, c, y);
    out[c * stride] = y[0];
  }
}

// ---------------------------------------------------------------------------------------------
// The four ops. A forward op turns a row into RowStats (load_row, visit) and then into its loss
// (finish, which also writes lse and the 'none' loss, and returns the loss); a backward op writes the row's gradient
// (load_row, grad). visit() and grad() get the logits as stored and read them through the softcap.

template <typename T>
struct ForwardClassIndex {
  using acc_t = acc_type<T>;
  const T* logits;
  const int64_t* target;
  const acc_t* weight;
  const acc_t* weight_total;
  acc_t* lse;
  acc_t* row_loss;  // null unless reduction is none
  int64_t classes, inner, outer_stride, ignore_index;
  acc_t eps, softcap;

  struct Row {
    const T* z;
    int64_t target;
    bool read;
  };

  __device__ Row load_row(int64_t r, int64_t o, int64_t i) const {
    Row row;
    row.z = logits + o * outer_stride + i;
    row.target = target[r];
    row.read = is_read_target(row.target, classes, ignore_index);
    return row;
  }

  // a_c = w_c; only the smoothing term needs dot, so without smoothing the weights are not read.
  template <int N>
  __device__ __forceinline__ void visit(RowStats<acc_t>& s, const Row& row, const acc_t (&logits)[N], int64_t c) const {
    acc_t z[N];
    read_logits(z, logits, softcap);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (c + j == row.target) s.target_logit = z[j];
    }
    if (eps > acc_t(0)) {
      set_pivot_if_first(s, z);
      if (weight != nullptr) {
#pragma unroll
        for (int j = 0; j < N; ++j) {
          const acc_t w = __ldg(weight + c + j);
          s.mass += w;
          s.dot += w * (z[j] - s.pivot);
        }
      } else {
#pragma unroll
        for (int j = 0; j < N; ++j) s.dot += z[j] - s.pivot;
        s.mass += acc_t(N);
      }
    }
    softmax_accumulate(s.softmax, z);
  }

  __device__ acc_t finish(const Row& row, int64_t r, const RowStats<acc_t>& s) const {
    acc_t loss = acc_t(0);
    acc_t row_lse = acc_t(0);
    if (row.read) {
      row_lse = softmax_state_lse(s.softmax);
      const acc_t w_target = weight != nullptr ? weight[row.target] : acc_t(1);
      const acc_t total = weight != nullptr ? *weight_total : acc_t(classes);
      loss = class_index_row_loss(row_lse, s.target_logit, w_target, total, s.dot, s.pivot, eps, classes);
    }
    lse[r] = row_lse;
    if (row_loss != nullptr) row_loss[r] = loss;
    return loss;
  }
};

template <typename T, typename TT>
struct ForwardProbability {
  using acc_t = acc_type<T>;
  const T* logits;
  const TT* target;
  const acc_t* weight;
  acc_t* lse;
  acc_t* row_loss;
  acc_t* target_mass;
  int64_t classes, inner, outer_stride;
  acc_t eps, softcap;

  struct Row {
    const T* z;
    const TT* t;
    bool read;
  };

  __device__ Row load_row(int64_t, int64_t o, int64_t i) const {
    Row row;
    row.z = logits + o * outer_stride + i;
    row.t = target + o * classes * inner + i;
    row.read = true;
    return row;
  }

  // a_c = w_c t'_c
  template <int N>
  __device__ __forceinline__ void visit(RowStats<acc_t>& s, const Row& row, const acc_t (&logits)[N], int64_t c) const {
    acc_t z[N];
    read_logits(z, logits, softcap);
    set_pivot_if_first(s, z);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const acc_t w = weight != nullptr ? __ldg(weight + c + j) : acc_t(1);
      const acc_t wt = w * smoothed_probability(to_acc(row.t[(c + j) * inner]), eps, classes);
      s.mass += wt;
      s.dot += wt * (z[j] - s.pivot);
    }
    softmax_accumulate(s.softmax, z);
  }

  __device__ acc_t finish(const Row&, int64_t r, const RowStats<acc_t>& s) const {
    const acc_t row_lse = softmax_state_lse(s.softmax);
    const acc_t loss = probability_row_loss(row_lse, s.mass, s.dot, s.pivot);
    lse[r] = row_lse;
    target_mass[r] = s.mass;
    if (row_loss != nullptr) row_loss[r] = loss;
    return loss;
  }
};

template <typename T>
struct BackwardClassIndex {
  using acc_t = acc_type<T>;
  const acc_t* grad_loss;
  const acc_t* grad_lse;  // null: none
  const T* logits;
  const int64_t* target;
  const acc_t* weight;
  const acc_t* weight_total;
  const acc_t* denominator;  // mean only
  const acc_t* lse;
  T* grad_input;
  int64_t classes, inner, outer_stride, ignore_index, reduction;
  acc_t eps, softcap;

  struct Row {
    const T* z;
    T* out;
    int64_t target;
    bool read;
    acc_t lse;
    ClassIndexGradCoefs<acc_t> coefs;
  };

  __device__ Row load_row(int64_t r, int64_t o, int64_t i) const {
    Row row;
    row.z = logits + o * outer_stride + i;
    row.out = grad_input + o * classes * inner + i;
    row.target = target[r];
    row.read = is_read_target(row.target, classes, ignore_index);
    row.lse = acc_t(0);
    row.coefs = ClassIndexGradCoefs<acc_t>{acc_t(0), acc_t(0), acc_t(0)};
    if (row.read) {
      const acc_t g = upstream_gradient(reduction, grad_loss, r, reduction == kReductionMean ? *denominator : acc_t(1));
      const acc_t w_target = weight != nullptr ? weight[row.target] : acc_t(1);
      const acc_t total = weight != nullptr ? *weight_total : acc_t(classes);
      const acc_t g_lse = grad_lse != nullptr ? grad_lse[r] : acc_t(0);
      row.coefs = class_index_grad_coefs(g, g_lse, w_target, total, eps, classes);
      row.lse = lse[r];
    }
    return row;
  }

  template <int N>
  __device__ __forceinline__ void grad(const Row& row, const acc_t (&logits)[N], int64_t c, T (&out)[N]) const {
    if (!row.read) {
#pragma unroll
      for (int j = 0; j < N; ++j) out[j] = from_acc<T>(acc_t(0));
      return;
    }
    acc_t z[N];
    read_logits(z, logits, softcap);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      // w_j only scales the smoothing term: without smoothing the weights are not read per element.
      const acc_t w = weight != nullptr && eps > acc_t(0) ? __ldg(weight + c + j) : acc_t(1);
      const acc_t g = class_index_grad(row.coefs, fast_exp(z[j] - row.lse), w, c + j == row.target);
      out[j] = from_acc<T>(through_softcap(g, z[j], softcap));
    }
  }
};

template <typename T, typename TT>
struct BackwardProbability {
  using acc_t = acc_type<T>;
  const acc_t* grad_loss;
  const acc_t* grad_lse;  // null: none
  const T* logits;
  const TT* target;
  const acc_t* weight;
  const acc_t* lse;
  const acc_t* target_mass;
  T* grad_input;
  int64_t classes, inner, outer_stride, reduction;
  acc_t eps, softcap;
  acc_t rows;

  struct Row {
    const T* z;
    T* out;
    const TT* t;
    bool read;
    acc_t lse;
    acc_t g;
    acc_t g_lse;
    acc_t mass;
  };

  __device__ Row load_row(int64_t r, int64_t o, int64_t i) const {
    Row row;
    row.z = logits + o * outer_stride + i;
    row.out = grad_input + o * classes * inner + i;
    row.t = target + o * classes * inner + i;
    row.read = true;
    row.lse = lse[r];
    row.g = upstream_gradient(reduction, grad_loss, r, rows);
    row.g_lse = grad_lse != nullptr ? grad_lse[r] : acc_t(0);
    row.mass = target_mass[r];
    return row;
  }

  __device__ __forceinline__ acc_t weighted_target(const Row& row, int64_t c) const {
    const acc_t w = weight != nullptr ? __ldg(weight + c) : acc_t(1);
    return w * smoothed_probability(to_acc(row.t[c * inner]), eps, classes);
  }

  template <int N>
  __device__ __forceinline__ void grad(const Row& row, const acc_t (&logits)[N], int64_t c, T (&out)[N]) const {
    acc_t z[N];
    read_logits(z, logits, softcap);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const acc_t p = fast_exp(z[j] - row.lse);
      const acc_t g = probability_grad(row.g, row.g_lse, row.mass, p, weighted_target(row, c + j));
      out[j] = from_acc<T>(through_softcap(g, z[j], softcap));
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Forward kernels, one per row mapping. loss_partials (null for reduction none): the sum of the
// block's row losses, one per block.

template <typename Op, int kWidth>
__global__ void __launch_bounds__(kGroupBlockThreads, (kMinBlocks<kGroupBlockThreads, typename Op::acc_t>))
    forward_grouped_rows_kernel(const Op op, int64_t rows, typename Op::acc_t* loss_partials) {
  using acc_t = typename Op::acc_t;
  constexpr int kGroups = kGroupBlockThreads / kWidth;
  __shared__ acc_t group_loss[kGroups];
  const int group = threadIdx.x / kWidth;
  const int lane = threadIdx.x % kWidth;
  acc_t loss_sum = acc_t(0);
#pragma unroll 1
  for (int64_t first = int64_t(blockIdx.x) * kGroups; first < rows; first += int64_t(gridDim.x) * kGroups) {
    const int64_t r = first + group;
    RowStats<acc_t> stats = empty_stats<acc_t>();
    typename Op::Row row{};
    if (r < rows) {
      row = op.load_row(r, r, 0);
      if (row.read) {
        for_each_chunk<kWidth>(row.z, op.classes, lane,
                               [&](const auto& z, int64_t c) { op.visit(stats, row, z, c); });
      }
    }
    stats = group_reduce<kWidth>(stats);
    if (r < rows && lane == 0) loss_sum += op.finish(row, r, stats);
  }
  if (loss_partials == nullptr) return;
  if (lane == 0) group_loss[group] = loss_sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t loss = acc_t(0);
    for (int g = 0; g < kGroups; ++g) loss += group_loss[g];
    loss_partials[blockIdx.x] = loss;
  }
}

template <typename Op>
__global__ void __launch_bounds__(kRowBlockThreads, (kMinBlocks<kRowBlockThreads, typename Op::acc_t>))
    forward_block_rows_kernel(const Op op, int64_t rows, typename Op::acc_t* loss_partials) {
  using acc_t = typename Op::acc_t;
  constexpr int kWarps = kRowBlockThreads / kWarp;
  __shared__ RowStats<acc_t> warp_stats[kWarps];
  acc_t loss_sum = acc_t(0);
#pragma unroll 1
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const typename Op::Row row = op.load_row(r, r, 0);
    RowStats<acc_t> stats = empty_stats<acc_t>();
    if (row.read) {
      for_each_chunk<kRowBlockThreads>(row.z, op.classes, threadIdx.x,
                                       [&](const auto& z, int64_t c) { op.visit(stats, row, z, c); });
    }
    stats = group_reduce<kWarp>(stats);
    if (threadIdx.x % kWarp == 0) warp_stats[threadIdx.x / kWarp] = stats;
    __syncthreads();
    if (threadIdx.x == 0) {
      RowStats<acc_t> merged = warp_stats[0];
      for (int w = 1; w < kWarps; ++w) merged = combine(merged, warp_stats[w]);
      loss_sum += op.finish(row, r, merged);
    }
    __syncthreads();
  }
  if (loss_partials != nullptr && threadIdx.x == 0) loss_partials[blockIdx.x] = loss_sum;
}

template <typename Op>
__global__ void __launch_bounds__(kTileRows* kTileSlices, (kMinBlocks<kTileRows * kTileSlices, typename Op::acc_t>))
    forward_inner_tiles_kernel(const Op op, int64_t outer, int64_t inner, typename Op::acc_t* loss_partials) {
  using acc_t = typename Op::acc_t;
  __shared__ RowStats<acc_t> slice_stats[kTileSlices][kTileRows];
  const int tx = threadIdx.x;
  const int slice = threadIdx.y;
  const int64_t tiles_per_outer = (inner + kTileRows - 1) / kTileRows;
  const int64_t tiles = outer * tiles_per_outer;
  acc_t loss_sum = acc_t(0);
#pragma unroll 1
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t o = tile / tiles_per_outer;
    const int64_t i = (tile % tiles_per_outer) * kTileRows + tx;
    const int64_t r = o * inner + i;
    RowStats<acc_t> stats = empty_stats<acc_t>();
    typename Op::Row row{};
    if (i < inner) {
      row = op.load_row(r, o, i);
      if (row.read) {
        for_each_chunk_strided(row.z, inner, op.classes, slice,
                               [&](const auto& z, int64_t c) { op.visit(stats, row, z, c); });
      }
    }
    slice_stats[slice][tx] = stats;
    __syncthreads();
    if (slice == 0 && i < inner) {
      RowStats<acc_t> merged = slice_stats[0][tx];
      for (int s = 1; s < kTileSlices; ++s) merged = combine(merged, slice_stats[s][tx]);
      loss_sum += op.finish(row, r, merged);
    }
    __syncthreads();
  }
  if (loss_partials == nullptr || slice != 0) return;
  loss_sum = group_reduce<kWarp>(loss_sum);
  if (tx == 0) loss_partials[blockIdx.x] = loss_sum;
}

// ---------------------------------------------------------------------------------------------
// Backward kernels, one per row mapping.

template <typename Op, int kWidth>
__global__ void __launch_bounds__(kGroupBlockThreads, (kMinBlocks<kGroupBlockThreads, typename Op::acc_t>)) backward_grouped_rows_kernel(const Op op, int64_t rows) {
  constexpr int kGroups = kGroupBlockThreads / kWidth;
  const int group = threadIdx.x / kWidth;
  const int lane = threadIdx.x % kWidth;
#pragma unroll 1
  for (int64_t first = int64_t(blockIdx.x) * kGroups; first < rows; first += int64_t(gridDim.x) * kGroups) {
    const int64_t r = first + group;
    if (r < rows) {
      const typename Op::Row row = op.load_row(r, r, 0);
      for_each_chunk_with_output<kWidth>(row.z, row.out, op.classes, lane, row.read,
                                         [&](const auto& z, int64_t c, auto& out) { op.grad(row, z, c, out); });
    }
  }
}

template <typename Op>
__global__ void __launch_bounds__(kRowBlockThreads, (kMinBlocks<kRowBlockThreads, typename Op::acc_t>)) backward_block_rows_kernel(const Op op, int64_t rows) {
#pragma unroll 1
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const typename Op::Row row = op.load_row(r, r, 0);
    for_each_chunk_with_output<kRowBlockThreads>(
        row.z, row.out, op.classes, threadIdx.x, row.read,
        [&](const auto& z, int64_t c, auto& out) { op.grad(row, z, c, out); });
  }
}

template <typename Op>
__global__ void __launch_bounds__(kTileRows* kTileSlices, (kMinBlocks<kTileRows * kTileSlices, typename Op::acc_t>))
    backward_inner_tiles_kernel(const Op op, int64_t outer, int64_t inner) {
  const int tx = threadIdx.x;
  const int slice = threadIdx.y;
  const int64_t tiles_per_outer = (inner + kTileRows - 1) / kTileRows;
  const int64_t tiles = outer * tiles_per_outer;
#pragma unroll 1
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t o = tile / tiles_per_outer;
    const int64_t i = (tile % tiles_per_outer) * kTileRows + tx;
    if (i < inner) {
      const typename Op::Row row = op.load_row(o * inner + i, o, i);
      for_each_chunk_strided_with_output(row.z, row.out, inner, op.classes, slice, row.read,
                                         [&](const auto& z, int64_t c, auto& out) { op.grad(row, z, c, out); });
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Small reductions: all single-block or fixed-chunk, so their order never changes.

template <typename acc_t>
__global__ void __launch_bounds__(kReduceThreads) sum_kernel(const acc_t* values, int64_t count, acc_t* out) {
  __shared__ acc_t warp_sums[kReduceThreads / kWarp];
  acc_t partial = acc_t(0);
  for (int64_t k = threadIdx.x; k < count; k += kReduceThreads) partial += values[k];
  const acc_t total = block_sum<kReduceThreads>(partial, warp_sums);
  if (threadIdx.x == 0) *out = total;
}

// sum: the sum of the loss partials. mean: that divided by the sum of the denominator partials, or
// by `rows` where there are none (probability targets). All rows ignored: 0 / 0 = NaN, as PyTorch.
template <typename acc_t>
__global__ void __launch_bounds__(kReduceThreads)
    finalize_loss_kernel(const acc_t* loss_partials, int64_t loss_count, const acc_t* denominator_partials,
                         int64_t denominator_count, acc_t rows, int64_t reduction, acc_t* loss) {
  __shared__ acc_t warp_sums[kReduceThreads / kWarp];
  acc_t loss_partial = acc_t(0);
  for (int64_t k = threadIdx.x; k < loss_count; k += kReduceThreads) loss_partial += loss_partials[k];
  const acc_t total = block_sum<kReduceThreads>(loss_partial, warp_sums);
  acc_t denominator = rows;
  if (denominator_partials != nullptr) {
    acc_t denominator_partial = acc_t(0);
    for (int64_t k = threadIdx.x; k < denominator_count; k += kReduceThreads) {
      denominator_partial += denominator_partials[k];
    }
    denominator = block_sum<kReduceThreads>(denominator_partial, warp_sums);
  }
  if (threadIdx.x == 0) *loss = reduction == kReductionMean ? total / denominator : total;
}

// Stops the kernel with a device-side assertion on a class index outside [0, classes) that is not
// ignore_index, as PyTorch's nll_loss does (no host synchronization), and, when partials is not null,
// sums w[y] (1 without weights) over the valid rows of each fixed chunk of rows: the mean's
// denominator, computed the same way in the forward and the backward. The row kernels make no
// calls, so the assertion's call lives here, away from their registers.
template <typename acc_t>
__global__ void __launch_bounds__(kReduceThreads)
    check_targets_kernel(const int64_t* target, const acc_t* weight, int64_t rows, int64_t classes,
                         int64_t ignore_index, acc_t* partials) {
  __shared__ acc_t warp_sums[kReduceThreads / kWarp];
  const int64_t begin = int64_t(blockIdx.x) * kTargetRowsPerBlock;
  const int64_t end = begin + kTargetRowsPerBlock < rows ? begin + kTargetRowsPerBlock : rows;
  acc_t partial = acc_t(0);
#pragma unroll 1
  for (int64_t r = begin + threadIdx.x; r < end; r += kReduceThreads) {
    const int64_t y = target[r];
    if (y == ignore_index) continue;
    if (y < 0 || y >= classes) {
      // A GPU stops here; should the assert ever return (it does in the emulated test suite), the row
      // is skipped rather than weight[y] read out of bounds.
      __assert_fail("target is a class index in [0, classes) or ignore_index", __FILE__, __LINE__, __func__);
      continue;
    }
    partial += weight != nullptr ? weight[y] : acc_t(1);
  }
  if (partials == nullptr) return;
  const acc_t total = block_sum<kReduceThreads>(partial, warp_sums);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

// ---------------------------------------------------------------------------------------------
// Launch helpers.

template <typename Op>
cudaError_t launch_forward_rows(const Op& op, const Problem& p, const LaunchPlan& plan,
                                typename Op::acc_t* loss_partials, cudaStream_t stream) {
  if (plan.blocks == 0) return cudaSuccess;
  const int64_t rows = p.outer * p.inner;
  const dim3 blocks(static_cast<unsigned>(plan.blocks));
  switch (plan.mapping) {
    case RowMapping::kShortRows:
      return launch_kernel<forward_grouped_rows_kernel<Op, kShortRowLanes>>(blocks, kGroupBlockThreads, stream, op,
                                                                            rows, loss_partials);
    case RowMapping::kWarpRows:
      return launch_kernel<forward_grouped_rows_kernel<Op, kWarp>>(blocks, kGroupBlockThreads, stream, op, rows,
                                                                   loss_partials);
    case RowMapping::kBlockRows:
      return launch_kernel<forward_block_rows_kernel<Op>>(blocks, kRowBlockThreads, stream, op, rows, loss_partials);
    case RowMapping::kInnerTiles:
      return launch_kernel<forward_inner_tiles_kernel<Op>>(blocks, dim3(kTileRows, kTileSlices), stream, op, p.outer,
                                                           p.inner, loss_partials);
  }
  return cudaErrorInvalidValue;
}

template <typename Op>
cudaError_t launch_backward_rows(const Op& op, const Problem& p, size_t element_size, cudaStream_t stream) {
  const LaunchPlan plan = plan_launch(p, element_size);
  if (plan.blocks == 0) return cudaSuccess;
  const int64_t rows = p.outer * p.inner;
  const dim3 blocks(static_cast<unsigned>(plan.blocks));
  switch (plan.mapping) {
    case RowMapping::kShortRows:
      return launch_kernel<backward_grouped_rows_kernel<Op, kShortRowLanes>>(blocks, kGroupBlockThreads, stream, op,
                                                                             rows);
    case RowMapping::kWarpRows:
      return launch_kernel<backward_grouped_rows_kernel<Op, kWarp>>(blocks, kGroupBlockThreads, stream, op, rows);
    case RowMapping::kBlockRows:
      return launch_kernel<backward_block_rows_kernel<Op>>(blocks, kRowBlockThreads, stream, op, rows);
    case RowMapping::kInnerTiles:
      return launch_kernel<backward_inner_tiles_kernel<Op>>(blocks, dim3(kTileRows, kTileSlices), stream, op,
                                                            p.outer, p.inner);
  }
  return cudaErrorInvalidValue;
}

int64_t target_chunks(const Problem& p) { return ceil_div(p.outer * p.inner, kTargetRowsPerBlock); }

// Checks the class indices and, when partials is not null, writes the per-chunk denominator sums.
template <typename acc_t>
cudaError_t launch_check_targets(const Problem& p, const int64_t* target, const acc_t* weight, acc_t* partials,
                                 cudaStream_t stream) {
  const int64_t chunks = target_chunks(p);
  if (chunks == 0) return cudaSuccess;
  return launch_kernel<check_targets_kernel<acc_t>>(dim3(static_cast<unsigned>(chunks)), kReduceThreads, stream,
                                                    target, weight, p.outer * p.inner, p.classes, p.ignore_index,
                                                    partials);
}

template <typename acc_t>
cudaError_t launch_weight_total(const acc_t* weight, int64_t classes, acc_t* scratch, cudaStream_t stream) {
  if (weight == nullptr) return cudaSuccess;
  return launch_kernel<sum_kernel<acc_t>>(1, kReduceThreads, stream, weight, classes, scratch + kWeightTotalSlot);
}

// Runs the forward op over all rows, then (mean/sum) reduces the partials into *loss; the class-index
// denominator partials (null for probability targets) are already in scratch.
template <typename Op>
cudaError_t launch_forward(const Op& op, const Problem& p, size_t element_size, typename Op::acc_t* loss,
                           typename Op::acc_t* scratch, bool class_index, cudaStream_t stream) {
  using acc_t = typename Op::acc_t;
  const LaunchPlan plan = plan_launch(p, element_size);
  const bool reduce = p.reduction != kReductionNone;
  acc_t* loss_partials = reduce ? scratch + kForwardLossPartialsOffset : nullptr;
  cudaError_t status = launch_forward_rows(op, p, plan, loss_partials, stream);
  if (status != cudaSuccess || !reduce) return status;
  const acc_t* denominator_partials = class_index ? loss_partials + plan.blocks : nullptr;
  return launch_kernel<finalize_loss_kernel<acc_t>>(1, kReduceThreads, stream, loss_partials, plan.blocks,
                                                    denominator_partials, target_chunks(p),
                                                    static_cast<acc_t>(p.outer * p.inner), p.reduction, loss);
}

}  // namespace

int64_t forward_scratch_elements(const Problem& problem, size_t logits_element_size) {
  return kForwardLossPartialsOffset + plan_launch(problem, logits_element_size).blocks + target_chunks(problem);
}

int64_t backward_class_index_scratch_elements(const Problem& problem) {
  return kBackwardDenominatorPartialsOffset + target_chunks(problem);
}

template <typename scalar_t>
cudaError_t launch_forward_class_index(const Problem& p, const scalar_t* logits, const int64_t* target,
                                       const acc_type<scalar_t>* weight, acc_type<scalar_t>* loss,
                                       acc_type<scalar_t>* lse, acc_type<scalar_t>* scratch, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const int64_t loss_partials = plan_launch(p, sizeof(scalar_t)).blocks;
  acc_t* denominator_partials =
      p.reduction == kReductionMean ? scratch + kForwardLossPartialsOffset + loss_partials : nullptr;
  cudaError_t status = launch_check_targets(p, target, weight, denominator_partials, stream);
  if (status == cudaSuccess) status = launch_weight_total(weight, p.classes, scratch, stream);
  if (status != cudaSuccess) return status;
  const ForwardClassIndex<scalar_t> op{logits,
                                       target,
                                       weight,
                                       scratch + kWeightTotalSlot,
                                       lse,
                                       p.reduction == kReductionNone ? loss : nullptr,
                                       p.classes,
                                       p.inner,
                                       p.outer_stride,
                                       p.ignore_index,
                                       static_cast<acc_t>(p.eps),
                                       static_cast<acc_t>(p.softcap)};
  return launch_forward(op, p, sizeof(scalar_t), loss, scratch, p.reduction == kReductionMean, stream);
}

template <typename scalar_t, typename target_t>
cudaError_t launch_forward_probability(const Problem& p, const scalar_t* logits, const target_t* target,
                                       const acc_type<scalar_t>* weight, acc_type<scalar_t>* loss,
                                       acc_type<scalar_t>* lse, acc_type<scalar_t>* target_mass,
                                       acc_type<scalar_t>* scratch, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const ForwardProbability<scalar_t, target_t> op{logits,
                                                  target,
                                                  weight,
                                                  lse,
                                                  p.reduction == kReductionNone ? loss : nullptr,
                                                  target_mass,
                                                  p.classes,
                                                  p.inner,
                                                  p.outer_stride,
                                                  static_cast<acc_t>(p.eps),
                                                  static_cast<acc_t>(p.softcap)};
  return launch_forward(op, p, sizeof(scalar_t), loss, scratch, false, stream);
}

template <typename scalar_t>
cudaError_t launch_backward_class_index(const Problem& p, const acc_type<scalar_t>* grad_loss,
                                        const acc_type<scalar_t>* grad_lse, const scalar_t* logits,
                                        const int64_t* target, const acc_type<scalar_t>* weight,
                                        const acc_type<scalar_t>* lse, scalar_t* grad_input,
                                        acc_type<scalar_t>* scratch, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const bool mean = p.reduction == kReductionMean;
  acc_t* denominator_partials = mean ? scratch + kBackwardDenominatorPartialsOffset : nullptr;
  cudaError_t status = launch_check_targets(p, target, weight, denominator_partials, stream);
  if (status == cudaSuccess) status = launch_weight_total(weight, p.classes, scratch, stream);
  if (status != cudaSuccess) return status;
  if (mean) {
    status = launch_kernel<sum_kernel<acc_t>>(1, kReduceThreads, stream, denominator_partials, target_chunks(p),
                                              scratch + kDenominatorSlot);
    if (status != cudaSuccess) return status;
  }
  const BackwardClassIndex<scalar_t> op{grad_loss,
                                        grad_lse,
                                        logits,
                                        target,
                                        weight,
                                        scratch + kWeightTotalSlot,
                                        scratch + kDenominatorSlot,
                                        lse,
                                        grad_input,
                                        p.classes,
                                        p.inner,
                                        p.outer_stride,
                                        p.ignore_index,
                                        p.reduction,
                                        static_cast<acc_t>(p.eps),
                                        static_cast<acc_t>(p.softcap)};
  return launch_backward_rows(op, p, sizeof(scalar_t), stream);
}

template <typename scalar_t, typename target_t>
cudaError_t launch_backward_probability(const Problem& p, const acc_type<scalar_t>* grad_loss,
                                        const acc_type<scalar_t>* grad_lse, const scalar_t* logits,
                                        const target_t* target, const acc_type<scalar_t>* weight,
                                        const acc_type<scalar_t>* lse, const acc_type<scalar_t>* target_mass,
                                        scalar_t* grad_input, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const BackwardProbability<scalar_t, target_t> op{grad_loss,
                                                   grad_lse,
                                                   logits,
                                                   target,
                                                   weight,
                                                   lse,
                                                   target_mass,
                                                   grad_input,
                                                   p.classes,
                                                   p.inner,
                                                   p.outer_stride,
                                                   p.reduction,
                                                   static_cast<acc_t>(p.eps),
                                                   static_cast<acc_t>(p.softcap),
                                                   static_cast<acc_t>(p.outer * p.inner)};
  return launch_backward_rows(op, p, sizeof(scalar_t), stream);
}

#define LS_INSTANTIATE_CLASS_INDEX(T)                                                                          \
  template cudaError_t launch_forward_class_index<T>(const Problem&, const T*, const int64_t*,                 \
                                                     const acc_type<T>*, acc_type<T>*, acc_type<T>*,           \
                                                     acc_type<T>*, cudaStream_t);                              \
  template cudaError_t launch_backward_class_index<T>(const Problem&, const acc_type<T>*, const acc_type<T>*, \
                                                      const T*, const int64_t*, const acc_type<T>*,            \
                                                      const acc_type<T>*, T*, acc_type<T>*, cudaStream_t);

#define LS_INSTANTIATE_PROBABILITY(T, TT)                                                                     \
  template cudaError_t launch_forward_probability<T, TT>(const Problem&, const T*, const TT*,                 \
                                                         const acc_type<T>*, acc_type<T>*, acc_type<T>*,      \
                                                         acc_type<T>*, acc_type<T>*, cudaStream_t);           \
  template cudaError_t launch_backward_probability<T, TT>(const Problem&, const acc_type<T>*,                 \
                                                          const acc_type<T>*, const T*, const TT*,            \
                                                          const acc_type<T>*, const acc_type<T>*,             \
                                                          const acc_type<T>*, T*, cudaStream_t);

LS_INSTANTIATE_CLASS_INDEX(float)
LS_INSTANTIATE_CLASS_INDEX(double)
LS_INSTANTIATE_CLASS_INDEX(__half)
LS_INSTANTIATE_CLASS_INDEX(__nv_bfloat16)
LS_INSTANTIATE_PROBABILITY(float, float)
LS_INSTANTIATE_PROBABILITY(double, double)
LS_INSTANTIATE_PROBABILITY(__half, __half)
LS_INSTANTIATE_PROBABILITY(__half, float)
LS_INSTANTIATE_PROBABILITY(__nv_bfloat16, __nv_bfloat16)
LS_INSTANTIATE_PROBABILITY(__nv_bfloat16, float)

#undef LS_INSTANTIATE_CLASS_INDEX
#undef LS_INSTANTIATE_PROBABILITY

}  // namespace cuda
}  // namespace labelsmooth
