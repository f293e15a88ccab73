#include "ls_op_common.h"

#include "kernels/ls_row_math.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <sstream>

namespace labelsmooth {
namespace {

bool is_class_index_dtype(at::ScalarType t) {
  return t == at::kLong || t == at::kInt || t == at::kByte;
}

std::string shape_string(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << sizes;
  return out.str();
}

void check_input(const at::Tensor& input) {
  TORCH_CHECK_NOT_IMPLEMENTED(at::isFloatingType(input.scalar_type()) && input.scalar_type() != at::kFloat8_e4m3fn &&
                                  input.scalar_type() != at::kFloat8_e5m2,
                              "labelsmooth cross_entropy: input (logits) must be float16, bfloat16, float32 or "
                              "float64, got ",
                              input.scalar_type());
  TORCH_CHECK(input.dim() >= 1,
              "labelsmooth cross_entropy: input must have a class dimension: shape (C), (N, C) or (N, C, d1, ...), "
              "got a 0-dim tensor");
}

// How to call with logits whose classes are the last dim (an LLM's (B, T, V)); the Python checks say the same.
std::string class_last_hint(const at::Tensor& input, const at::Tensor& target) {
  if (input.dim() < 3 || target.sizes() != input.sizes().slice(0, input.dim() - 1)) return "";
  return ". The class dimension is dim 1, as in torch.nn.functional.cross_entropy; if the classes are the last dim "
         "(LLM logits of shape (B, T, V)), pass input.flatten(0, -2) and target.flatten() (views of contiguous "
         "logits: no copy)";
}

void check_class_index_target(const at::Tensor& input, const at::Tensor& target, at::IntArrayRef row_shape) {
  TORCH_CHECK(is_class_index_dtype(target.scalar_type()),
              "labelsmooth cross_entropy: expected target to hold class indices (int64, int32 or uint8) of shape ",
              shape_string(row_shape), ", or class probabilities (floating point) of the input's shape ",
              shape_string(input.sizes()), "; got ", target.scalar_type(), " of shape ", shape_string(target.sizes()));
  if (input.dim() == 2 && target.dim() == 1) {
    TORCH_CHECK_VALUE(target.size(0) == input.size(0), "Expected input batch_size (", input.size(0),
                      ") to match target batch_size (", target.size(0), ").");
  }
  TORCH_CHECK(target.sizes() == row_shape, "labelsmooth cross_entropy: expected target of shape ",
              shape_string(row_shape), " (the input's shape ", shape_string(input.sizes()),
              " without the class dimension), got ", shape_string(target.sizes()), class_last_hint(input, target));
}

void check_probability_target(const at::Tensor& target, int64_t ignore_index) {
  TORCH_CHECK(at::isFloatingType(target.scalar_type()),
              "Expected floating point type for target with class probabilities, got ", target.scalar_type());
  TORCH_CHECK(ignore_index < 0, "ignore_index is not supported for floating point target (got ignore_index=",
              ignore_index, "; class probabilities have no ignored rows)");
}

void check_weight(const at::Tensor& input, const at::Tensor& weight, int64_t classes) {
  TORCH_CHECK(weight.dim() == 1 && weight.numel() == classes,
              "labelsmooth cross_entropy: weight must be a 1-D tensor with one entry per class (", classes,
              " classes), got shape ", shape_string(weight.sizes()));
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()),
              "labelsmooth cross_entropy: weight must be floating point, got ", weight.scalar_type());
  TORCH_CHECK(weight.device() == input.device(), "labelsmooth cross_entropy: weight is on ", weight.device(),
              " but input is on ", input.device());
}

}  // namespace

at::ScalarType accumulation_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void throw_target_out_of_bounds(int64_t target, int64_t classes, int64_t ignore_index) {
  TORCH_CHECK_INDEX(false, "Target ", target, " is out of bounds (expected a class index in [0, ", classes,
                    ") or ignore_index=", ignore_index, ").");
  __builtin_unreachable();
}

PreparedInputs prepare_forward_inputs(const at::Tensor& input, const at::Tensor& target,
                                      const std::optional<at::Tensor>& weight, int64_t ignore_index,
                                      double label_smoothing, int64_t smoothing, std::optional<double> softcap,
                                      int64_t reduction, LossOptions* options) {
  check_input(input);
  TORCH_CHECK(target.device() == input.device(), "labelsmooth cross_entropy: target is on ", target.device(),
              " but input is on ", input.device());
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0,
              "label_smoothing must be between 0.0 and 1.0. Got: ", label_smoothing);
  TORCH_CHECK_VALUE(reduction >= 0 && reduction <= 2, "labelsmooth cross_entropy: reduction code ", reduction,
                    " is not valid (expected 0 = none, 1 = mean, 2 = sum)");
  TORCH_CHECK_VALUE(smoothing == kSmoothingUniform || smoothing == kSmoothingOthers,
                    "labelsmooth cross_entropy: smoothing code ", smoothing,
                    " is not valid (expected 0 = uniform, 1 = others)");
  TORCH_CHECK_VALUE(!softcap.has_value() || (*softcap > 0.0 && std::isfinite(*softcap)),
                    "softcap must be None or a finite float > 0 (logits become softcap * tanh(z / softcap)), got ",
                    softcap.value_or(0.0));

  const int64_t class_dim = input.dim() == 1 ? 0 : 1;
  PreparedInputs prepared;
  ProblemLayout& layout = prepared.layout;
  layout.classes = input.size(class_dim);
  layout.row_shape = input.sizes().vec();
  layout.row_shape.erase(layout.row_shape.begin() + class_dim);
  if (target.sizes() == input.sizes()) {
    // PyTorch reads a target of the input's shape as probabilities; say so when its dtype does not fit.
    check_probability_target(target, ignore_index);
    layout.probability_target = true;
  } else {
    check_class_index_target(input, target, layout.row_shape);
  }
  if (weight.has_value() && weight->defined()) check_weight(input, *weight, layout.classes);

  layout.outer = input.dim() == 1 ? 1 : input.size(0);
  layout.inner = 1;
  for (int64_t d = 2; d < input.dim(); ++d) layout.inner *= input.size(d);
  // With no classes, class indices can only be ignore_index (the kernels' target check raises
  // IndexError otherwise, as PyTorch does); probabilities over no classes mean nothing.
  TORCH_CHECK(layout.classes > 0 || layout.rows() == 0 || !layout.probability_target,
              "labelsmooth cross_entropy: input has no classes (size 0 at dim ", class_dim, ") but ", layout.rows(),
              " rows of class probabilities");

  // (N, C) logits sliced from a wider buffer (a padded vocabulary, say) are read in place: only the
  // element stride must be 1. Everything else is made contiguous.
  const bool strided_rows = input.dim() == 2 && input.stride(1) == 1 && input.stride(0) >= layout.classes &&
                            !layout.probability_target;
  prepared.input = strided_rows ? input : input.contiguous();
  layout.outer_stride = strided_rows ? input.stride(0) : layout.classes * layout.inner;

  const at::ScalarType acc = accumulation_dtype(input.scalar_type());
  if (layout.probability_target) {
    const at::ScalarType target_dtype = target.scalar_type() == input.scalar_type() ? target.scalar_type() : acc;
    prepared.target = target.to(target_dtype).contiguous();
  } else {
    prepared.target = target.to(at::kLong).contiguous();
  }
  if (weight.has_value() && weight->defined()) prepared.weight = weight->to(acc).contiguous();
  if (smoothing == kSmoothingOthers) {
    TORCH_CHECK_VALUE(!layout.probability_target,
                      "smoothing='others' is defined for class-index targets only; with class probabilities use "
                      "smoothing='uniform'");
    TORCH_CHECK_VALUE(label_smoothing == 0.0 || layout.classes >= 2, "smoothing='others' spreads label_smoothing=",
                      label_smoothing, " over the other classes, but the input has ", layout.classes, " class(es)");
  }
  options->eps = uniform_smoothing(label_smoothing, smoothing, layout.classes);
  options->softcap = softcap.value_or(0.0);
  options->ignore_index = ignore_index;
  options->reduction = reduction;
  return prepared;
}

BackwardInputs prepare_backward_inputs(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
                                       const at::Tensor& lse, const at::Tensor& target_mass,
                                       const PreparedInputs& prepared, int64_t reduction) {
  const ProblemLayout& layout = prepared.layout;
  const at::ScalarType acc = accumulation_dtype(prepared.input.scalar_type());
  const at::IntArrayRef rows(layout.row_shape);
  TORCH_CHECK(grad_loss.device() == prepared.input.device() && lse.device() == prepared.input.device() &&
                  target_mass.device() == prepared.input.device(),
              "labelsmooth cross_entropy backward: grad_loss, lse and target_mass must be on the input's device ",
              prepared.input.device(), ", got ", grad_loss.device(), ", ", lse.device(), " and ", target_mass.device());
  TORCH_CHECK(lse.sizes() == rows, "labelsmooth cross_entropy backward: expected lse of shape ",
              shape_string(rows), ", got ", shape_string(lse.sizes()));
  TORCH_CHECK(lse.scalar_type() == acc, "labelsmooth cross_entropy backward: expected lse of dtype ", acc, ", got ",
              lse.scalar_type());
  if (layout.probability_target) {
    TORCH_CHECK(target_mass.sizes() == rows && target_mass.scalar_type() == acc,
                "labelsmooth cross_entropy backward: expected the forward's target_mass, of shape ",
                shape_string(rows), " and dtype ", acc, ", got ", shape_string(target_mass.sizes()), " and ",
                target_mass.scalar_type());
  }
  if (reduction == kReductionNone) {
    TORCH_CHECK(grad_loss.sizes() == rows,
                "labelsmooth cross_entropy backward: with reduction='none' expected grad_loss of shape ",
                shape_string(rows), ", got ", shape_string(grad_loss.sizes()));
  } else {
    TORCH_CHECK(grad_loss.numel() == 1, "labelsmooth cross_entropy backward: expected a single-element grad_loss, "
                "got shape ", shape_string(grad_loss.sizes()));
  }
  TORCH_CHECK(at::isFloatingType(grad_loss.scalar_type()),
              "labelsmooth cross_entropy backward: grad_loss must be floating point, got ", grad_loss.scalar_type());
  BackwardInputs inputs;
  inputs.grad_loss = grad_loss.to(acc).contiguous();
  if (grad_lse.has_value() && grad_lse->defined()) {
    TORCH_CHECK(grad_lse->sizes() == rows && at::isFloatingType(grad_lse->scalar_type()) &&
                    grad_lse->device() == prepared.input.device(),
                "labelsmooth cross_entropy backward: expected grad_lse of shape ", shape_string(rows),
                " (floating point, on the input's device), got ", shape_string(grad_lse->sizes()), " ",
                grad_lse->scalar_type(), " on ", grad_lse->device());
    inputs.grad_lse = grad_lse->to(acc).contiguous();
  }
  inputs.lse = lse.contiguous();
  if (layout.probability_target) inputs.target_mass = target_mass.contiguous();
  return inputs;
}

}  // namespace labelsmooth
