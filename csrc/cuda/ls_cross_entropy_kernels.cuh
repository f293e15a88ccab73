// CUDA kernels of label-smoothed cross-entropy, callable from any host code.
//
// Plain CUDA: raw pointers, sizes and a stream, no torch headers, so that the kernels compile with a
// bare nvcc (CI has no CUDA-enabled torch) and stay usable outside PyTorch. The torch binding
// (ls_cross_entropy_cuda.cpp) checks arguments, allocates the outputs and the scratch, and calls these.
//
// Layout: the logits are [outer, classes, inner]; row r = o * inner + i holds the classes logits at
// o * outer_stride + c * inner + i. Per-row outputs (lse, loss 'none', class-index targets) and the
// gradient are contiguous with that row numbering; probability targets are contiguous with the
// logits' shape (element (o, c, i) at (o * classes + c) * inner + i). Class weights are contiguous,
// in the accumulation type.
//
// Every launch function only enqueues work on `stream` (no allocation, no synchronization, so CUDA
// graphs can capture it) and returns cudaGetLastError() of its launches.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace labelsmooth {
namespace cuda {

// fp32 accumulation for fp16/bf16/fp32 logits, fp64 for fp64 logits.
template <typename scalar_t>
struct AccumulateType {
  using type = float;
};
template <>
struct AccumulateType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_type = typename AccumulateType<scalar_t>::type;

struct Problem {
  int64_t outer = 1;
  int64_t classes = 1;
  int64_t inner = 1;
  int64_t outer_stride = 1;  // elements between consecutive outer indices of the logits
  int64_t ignore_index = -100;
  double eps = 0.0;      // label smoothing in PyTorch's convention (hosts convert 'others': uniform_smoothing)
  double softcap = 0.0;  // 0: the logits as they are; c > 0: every logit z is read as c * tanh(z / c)
  int64_t reduction = 0;  // labelsmooth::Reduction (0 none, 1 mean, 2 sum)
};

// Elements (of the accumulation type) of device scratch the launches below need; the caller allocates
// at least that many on the logits' device and passes them as `scratch`. The forward needs it for the
// weight total and the per-block partial sums of mean/sum; the class-index backward for the weight
// total and the mean's denominator (the probability backward needs none).
int64_t forward_scratch_elements(const Problem& problem, size_t logits_element_size);
int64_t backward_class_index_scratch_elements(const Problem& problem);

// loss: rows values for reduction none, else one value. lse: rows values (0 for ignored rows).
template <typename scalar_t>
cudaError_t launch_forward_class_index(const Problem& problem, const scalar_t* logits, const int64_t* target,
                                       const acc_type<scalar_t>* weight, acc_type<scalar_t>* loss,
                                       acc_type<scalar_t>* lse, acc_type<scalar_t>* scratch, cudaStream_t stream);

// target_t is the logits' type or the accumulation type. target_mass: rows values, each row's
// sum_c w_c t'_c, which the backward reads instead of summing the targets again.
template <typename scalar_t, typename target_t>
cudaError_t launch_forward_probability(const Problem& problem, const scalar_t* logits, const target_t* target,
                                       const acc_type<scalar_t>* weight, acc_type<scalar_t>* loss,
                                       acc_type<scalar_t>* lse, acc_type<scalar_t>* target_mass,
                                       acc_type<scalar_t>* scratch, cudaStream_t stream);

// grad_loss: rows values for reduction none, else one value. grad_lse: the upstream gradient of each
// row's lse (rows values), or null for none. grad_input: contiguous, logits' shape.
template <typename scalar_t>
cudaError_t launch_backward_class_index(const Problem& problem, const acc_type<scalar_t>* grad_loss,
                                        const acc_type<scalar_t>* grad_lse, const scalar_t* logits,
                                        const int64_t* target, const acc_type<scalar_t>* weight,
                                        const acc_type<scalar_t>* lse, scalar_t* grad_input,
                                        acc_type<scalar_t>* scratch, cudaStream_t stream);

// target_mass: the forward's.
template <typename scalar_t, typename target_t>
cudaError_t launch_backward_probability(const Problem& problem, const acc_type<scalar_t>* grad_loss,
                                        const acc_type<scalar_t>* grad_lse, const scalar_t* logits,
                                        const target_t* target, const acc_type<scalar_t>* weight,
                                        const acc_type<scalar_t>* lse, const acc_type<scalar_t>* target_mass,
                                        scalar_t* grad_input, cudaStream_t stream);

}  // namespace cuda
}  // namespace labelsmooth
