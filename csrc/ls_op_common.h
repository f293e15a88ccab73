// Host-side work shared by every backend of the labelsmooth ops: argument checks with clear messages,
// and the description of the input as a [outer, classes, inner] problem that kernels consume.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace labelsmooth {

// The logits viewed as [outer, classes, inner]: row r = (o, i) holds classes logits at
// o * outer_stride + c * class_stride + i (class_stride = inner, so inner == 1 is the usual (N, C) case).
struct ProblemLayout {
  int64_t outer = 1;
  int64_t classes = 1;
  int64_t inner = 1;
  int64_t outer_stride = 0;  // elements between consecutive o; >= classes * inner (sliced rows keep their stride)
  bool probability_target = false;
  std::vector<int64_t> row_shape;  // input shape without the class dim: the shape of lse and of loss 'none'

  int64_t rows() const { return outer * inner; }
};

// Tensors in the form the kernels read: logits with element stride 1 along the last dim (inner == 1) or
// fully contiguous; class-index targets as contiguous int64; probability targets contiguous, in the
// logits' dtype or in the accumulation dtype; weight contiguous in the accumulation dtype (or undefined).
struct PreparedInputs {
  at::Tensor input;
  at::Tensor target;
  at::Tensor weight;
  ProblemLayout layout;
};

// float32 for fp16/bf16/fp32 logits, float64 for fp64 logits.
at::ScalarType accumulation_dtype(at::ScalarType input_dtype);

// The loss options of the op, checked: eps is already in the uniform convention (uniform_smoothing), and
// softcap is 0 when the logits are not capped.
struct LossOptions {
  double eps = 0.0;
  double softcap = 0.0;
  int64_t ignore_index = -100;
  int64_t reduction = 1;
};

// Checks every argument of ls_cross_entropy_forward (dtypes, shapes, devices, label_smoothing range,
// smoothing convention, softcap, reduction code) and raises a c10::Error naming the bad value and what was
// expected. Target values are checked by the kernels (they need the data).
PreparedInputs prepare_forward_inputs(const at::Tensor& input, const at::Tensor& target,
                                      const std::optional<at::Tensor>& weight, int64_t ignore_index,
                                      double label_smoothing, int64_t smoothing, std::optional<double> softcap,
                                      int64_t reduction, LossOptions* options);

// What the backward reads besides the forward's inputs, checked and in the form the kernels take
// (accumulation dtype, contiguous): grad_loss, grad_lse (undefined when absent), lse and target_mass.
struct BackwardInputs {
  at::Tensor grad_loss;
  at::Tensor grad_lse;
  at::Tensor lse;
  at::Tensor target_mass;
};

BackwardInputs prepare_backward_inputs(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
                                       const at::Tensor& lse, const at::Tensor& target_mass,
                                       const PreparedInputs& prepared, int64_t reduction);

// The message for a class index outside [0, classes) that is not ignore_index (IndexError).
[[noreturn]] void throw_target_out_of_bounds(int64_t target, int64_t classes, int64_t ignore_index);

}  // namespace labelsmooth
