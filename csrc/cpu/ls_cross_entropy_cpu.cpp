// TORCH_LIBRARY_IMPL(labelsmooth, CPU): argument checks, then the OpenMP/SIMD kernels of the
// instruction set that ls_cpu_isa.h chooses.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>

#include "cpu/ls_cpu_kernels.h"
#include "ls_op_common.h"

namespace labelsmooth::cpu {
namespace {

const IsaKernels& active_kernels() {
  switch (active_isa()) {
#if LS_CPU_X86_VARIANTS
    case Isa::kAvx512: return avx512::kernels;
    case Isa::kAvx2: return avx2::kernels;
#endif
    default: return baseline::kernels;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ls_cross_entropy_forward_cpu(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t ignore_index,
    double label_smoothing, int64_t smoothing, std::optional<double> softcap, int64_t reduction) {
  LossOptions options;
  const PreparedInputs prepared = prepare_forward_inputs(input, target, weight, ignore_index, label_smoothing,
                                                         smoothing, softcap, reduction, &options);
  return active_kernels().forward(prepared, options);
}

at::Tensor ls_cross_entropy_backward_cpu(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
                                         const at::Tensor& input, const at::Tensor& target,
                                         const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                                         const at::Tensor& target_mass, int64_t ignore_index, double label_smoothing,
                                         int64_t smoothing, std::optional<double> softcap, int64_t reduction) {
  LossOptions options;
  const PreparedInputs prepared = prepare_forward_inputs(input, target, weight, ignore_index, label_smoothing,
                                                         smoothing, softcap, reduction, &options);
  const BackwardInputs grads = prepare_backward_inputs(grad_loss, grad_lse, lse, target_mass, prepared, reduction);
  return active_kernels().backward(grads, prepared, options);
}

}  // namespace

void check_class_indices(const int64_t* target, int64_t rows, int64_t classes, int64_t ignore_index) {
  const auto out_of_bounds = [&](int64_t y) {
    return y != ignore_index && static_cast<uint64_t>(y) >= static_cast<uint64_t>(classes);  // y < 0 wraps
  };
  // First whether any target is bad, branch-free and spread over the threads (one pass over every row, which
  // at 10 classes took as long as a twentieth of the kernels); then, only if one is, which comes first.
  std::atomic<bool> any_bad{false};
  at::parallel_for(0, rows, 32768, [&](int64_t begin, int64_t end) {
    bool bad = false;
    for (int64_t r = begin; r < end; ++r) bad |= out_of_bounds(target[r]);
    if (bad) any_bad = true;
  });
  if (!any_bad) return;
  for (int64_t r = 0; r < rows; ++r) {
    if (out_of_bounds(target[r])) throw_target_out_of_bounds(target[r], classes, ignore_index);
  }
}

TORCH_LIBRARY_IMPL(labelsmooth, CPU, m) {
  m.impl("ls_cross_entropy_forward", &ls_cross_entropy_forward_cpu);
  m.impl("ls_cross_entropy_backward", &ls_cross_entropy_backward_cpu);
}

}  // namespace labelsmooth::cpu
