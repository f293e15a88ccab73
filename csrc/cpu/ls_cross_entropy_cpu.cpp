// TORCH_LIBRARY_IMPL(labelsmooth, CPU): argument checks, then the OpenMP/SIMD kernels.
#include <torch/library.h>

#include "cpu/ls_cpu_kernels.h"
#include "ls_op_common.h"

namespace labelsmooth::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> ls_cross_entropy_forward_cpu(const at::Tensor& input, const at::Tensor& target,
                                                                const std::optional<at::Tensor>& weight,
                                                                int64_t ignore_index, double label_smoothing,
                                                                int64_t reduction) {
  const PreparedInputs prepared =
      prepare_forward_inputs(input, target, weight, ignore_index, label_smoothing, reduction);
  return forward_cpu(prepared, label_smoothing, ignore_index, reduction);
}

at::Tensor ls_cross_entropy_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& input,
                                         const at::Tensor& target, const std::optional<at::Tensor>& weight,
                                         const at::Tensor& lse, int64_t ignore_index, double label_smoothing,
                                         int64_t reduction) {
  const PreparedInputs prepared =
      prepare_forward_inputs(input, target, weight, ignore_index, label_smoothing, reduction);
  const at::Tensor grad = prepare_backward_grad(grad_loss, lse, prepared, reduction);
  return backward_cpu(grad, prepared, lse, label_smoothing, ignore_index, reduction);
}

}  // namespace

TORCH_LIBRARY_IMPL(labelsmooth, CPU, m) {
  m.impl("ls_cross_entropy_forward", &ls_cross_entropy_forward_cpu);
  m.impl("ls_cross_entropy_backward", &ls_cross_entropy_backward_cpu);
}

}  // namespace labelsmooth::cpu
