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

// Checks every argument of ls_cross_entropy_forward (dtypes, shapes, devices, label_smoothing range,
// reduction code) and raises a c10::Error naming the bad value and what was expected. Target values
// are checked by the kernels (they need the data).
PreparedInputs prepare_forward_inputs(const at::Tensor& input, const at::Tensor& target,
                                      const std::optional<at::Tensor>& weight, int64_t ignore_index,
                                      double label_smoothing, int64_t reduction);

// The same checks for the backward, plus grad_loss and lse shapes; returns grad_loss in the
// accumulation dtype, contiguous.
at::Tensor prepare_backward_grad(const at::Tensor& grad_loss, const at::Tensor& lse, const PreparedInputs& prepared,
                                 int64_t reduction);

// The message for a class index outside [0, classes) that is not ignore_index (IndexError).
[[noreturn]] void throw_target_out_of_bounds(int64_t target, int64_t classes, int64_t ignore_index);

}  // namespace labelsmooth
