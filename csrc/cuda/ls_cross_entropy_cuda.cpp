// TORCH_LIBRARY_IMPL(labelsmooth, CUDA): argument checks, output and scratch allocation, and the
// launch of the CUDA kernels on the current stream (no host synchronization, so the ops can be
// captured in CUDA graphs).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

#include "cuda/ls_cross_entropy_kernels.cuh"
#include "kernels/ls_row_math.h"
#include "ls_op_common.h"

namespace labelsmooth {
namespace {

// ATen's fp16/bf16 types have the same layout as CUDA's, which the kernels take.
template <typename T>
struct AtenType {
  using type = T;
};
template <>
struct AtenType<__half> {
  using type = at::Half;
};
template <>
struct AtenType<__nv_bfloat16> {
  using type = at::BFloat16;
};

template <typename T>
const T* data_of(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr<typename AtenType<T>::type>());
}

template <typename T>
T* mutable_data_of(at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr<typename AtenType<T>::type>());
}

template <typename T>
const T* optional_data_of(const at::Tensor& t) {
  return t.defined() ? data_of<T>(t) : nullptr;
}

// Calls f with a null pointer of the CUDA element type of `dtype` (the type travels in its type).
template <typename F>
void dispatch_logits_type(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat:
      return f(static_cast<float*>(nullptr));
    case at::kDouble:
      return f(static_cast<double*>(nullptr));
    case at::kHalf:
      return f(static_cast<__half*>(nullptr));
    case at::kBFloat16:
      return f(static_cast<__nv_bfloat16*>(nullptr));
    default:
      TORCH_CHECK(false, "labelsmooth cross_entropy (CUDA): unsupported input dtype ", dtype);
  }
}

// Probability targets come in the logits' dtype or in the accumulation dtype (see PreparedInputs).
template <typename scalar_t, typename F>
void dispatch_target_type(const at::Tensor& target, F&& f) {
  if (target.scalar_type() == c10::CppTypeToScalarType<typename AtenType<scalar_t>::type>::value) {
    f(static_cast<scalar_t*>(nullptr));
  } else {
    f(static_cast<cuda::acc_type<scalar_t>*>(nullptr));
  }
}

cuda::Problem make_problem(const ProblemLayout& layout, const LossOptions& options) {
  cuda::Problem problem;
  problem.outer = layout.outer;
  problem.classes = layout.classes;
  problem.inner = layout.inner;
  problem.outer_stride = layout.outer_stride;
  problem.ignore_index = options.ignore_index;
  problem.eps = options.eps;
  problem.softcap = options.softcap;
  problem.reduction = options.reduction;
  return problem;
}

void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, "labelsmooth ", op, " (CUDA): kernel launch failed: ",
              cudaGetErrorString(status));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ls_cross_entropy_forward_cuda(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t ignore_index,
    double label_smoothing, int64_t smoothing, std::optional<double> softcap, int64_t reduction) {
  const c10::cuda::CUDAGuard device_guard(input.device());
  LossOptions options;
  const PreparedInputs prepared = prepare_forward_inputs(input, target, weight, ignore_index, label_smoothing,
                                                         smoothing, softcap, reduction, &options);
  const ProblemLayout& layout = prepared.layout;
  const at::TensorOptions acc_options = prepared.input.options().dtype(accumulation_dtype(input.scalar_type()));
  at::Tensor lse = at::empty(layout.row_shape, acc_options);
  at::Tensor loss = reduction == kReductionNone ? at::empty(layout.row_shape, acc_options) : at::empty({}, acc_options);
  at::Tensor target_mass =
      layout.probability_target ? at::empty(layout.row_shape, acc_options) : at::empty({0}, acc_options);
  const cuda::Problem problem = make_problem(layout, options);
  at::Tensor scratch =
      at::empty({cuda::forward_scratch_elements(problem, prepared.input.element_size())}, acc_options);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  dispatch_logits_type(input.scalar_type(), [&](auto* logits_tag) {
    using scalar_t = std::remove_pointer_t<decltype(logits_tag)>;
    using acc_t = cuda::acc_type<scalar_t>;
    const scalar_t* logits = data_of<scalar_t>(prepared.input);
    const acc_t* class_weight = optional_data_of<acc_t>(prepared.weight);
    if (layout.probability_target) {
      dispatch_target_type<scalar_t>(prepared.target, [&](auto* target_tag) {
        using target_t = std::remove_pointer_t<decltype(target_tag)>;
        check_launch(cuda::launch_forward_probability<scalar_t, target_t>(
                         problem, logits, data_of<target_t>(prepared.target), class_weight,
                         mutable_data_of<acc_t>(loss), mutable_data_of<acc_t>(lse),
                         mutable_data_of<acc_t>(target_mass), mutable_data_of<acc_t>(scratch), stream),
                     "ls_cross_entropy_forward");
      });
    } else {
      check_launch(cuda::launch_forward_class_index<scalar_t>(
                       problem, logits, data_of<int64_t>(prepared.target), class_weight,
                       mutable_data_of<acc_t>(loss), mutable_data_of<acc_t>(lse), mutable_data_of<acc_t>(scratch),
                       stream),
                   "ls_cross_entropy_forward");
    }
  });
  return {loss, lse, target_mass};
}

at::Tensor ls_cross_entropy_backward_cuda(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
                                          const at::Tensor& input, const at::Tensor& target,
                                          const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                                          const at::Tensor& target_mass, int64_t ignore_index, double label_smoothing,
                                          int64_t smoothing, std::optional<double> softcap, int64_t reduction) {
  const c10::cuda::CUDAGuard device_guard(input.device());
  LossOptions options;
  const PreparedInputs prepared = prepare_forward_inputs(input, target, weight, ignore_index, label_smoothing,
                                                         smoothing, softcap, reduction, &options);
  const BackwardInputs saved = prepare_backward_inputs(grad_loss, grad_lse, lse, target_mass, prepared, reduction);
  const ProblemLayout& layout = prepared.layout;
  at::Tensor grad_input = at::empty(input.sizes(), input.options());  // contiguous
  const cuda::Problem problem = make_problem(layout, options);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  dispatch_logits_type(input.scalar_type(), [&](auto* logits_tag) {
    using scalar_t = std::remove_pointer_t<decltype(logits_tag)>;
    using acc_t = cuda::acc_type<scalar_t>;
    const scalar_t* logits = data_of<scalar_t>(prepared.input);
    const acc_t* class_weight = optional_data_of<acc_t>(prepared.weight);
    const acc_t* upstream_lse = optional_data_of<acc_t>(saved.grad_lse);
    if (layout.probability_target) {
      dispatch_target_type<scalar_t>(prepared.target, [&](auto* target_tag) {
        using target_t = std::remove_pointer_t<decltype(target_tag)>;
        check_launch(cuda::launch_backward_probability<scalar_t, target_t>(
                         problem, data_of<acc_t>(saved.grad_loss), upstream_lse, logits,
                         data_of<target_t>(prepared.target), class_weight, data_of<acc_t>(saved.lse),
                         data_of<acc_t>(saved.target_mass), mutable_data_of<scalar_t>(grad_input), stream),
                     "ls_cross_entropy_backward");
      });
    } else {
      at::Tensor scratch =
          at::empty({cuda::backward_class_index_scratch_elements(problem)}, saved.grad_loss.options());
      check_launch(cuda::launch_backward_class_index<scalar_t>(
                       problem, data_of<acc_t>(saved.grad_loss), upstream_lse, logits,
                       data_of<int64_t>(prepared.target), class_weight, data_of<acc_t>(saved.lse),
                       mutable_data_of<scalar_t>(grad_input), mutable_data_of<acc_t>(scratch), stream),
                   "ls_cross_entropy_backward");
    }
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(labelsmooth, CUDA, m) {
  m.impl("ls_cross_entropy_forward", &ls_cross_entropy_forward_cuda);
  m.impl("ls_cross_entropy_backward", &ls_cross_entropy_backward_cuda);
}

}  // namespace labelsmooth
