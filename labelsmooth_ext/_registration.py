"""Fake (meta) implementations, the autograd formula and the autocast rule of the labelsmooth ops.

Registered once, for whichever backend _backend.py defined the ops with.
"""

import torch

from . import _validation, _weight_gradient

_FORWARD = "labelsmooth::ls_cross_entropy_forward"
_BACKWARD = "labelsmooth::ls_cross_entropy_backward"
REDUCTION_NONE, REDUCTION_MEAN, REDUCTION_SUM = 0, 1, 2


def accumulation_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_shape(input):
    """The input's shape without the class dim (dim 0 of a 1-D input, else dim 1)."""
    class_dim = 0 if input.dim() == 1 else 1
    return input.shape[:class_dim] + input.shape[class_dim + 1 :]


# The fakes check the arguments too: they also serve as the Meta kernel, which the dispatcher picks
# for a call in which any tensor is on the meta device.
@torch.library.register_fake(_FORWARD)
def _forward_fake(input, target, weight, ignore_index, label_smoothing, smoothing, softcap, reduction):
    probability = _validation.check_op_arguments(input, target, weight, ignore_index, label_smoothing, smoothing,
                                                 softcap, reduction)
    acc = accumulation_dtype(input.dtype)
    rows = row_shape(input)
    loss = input.new_empty(rows if reduction == REDUCTION_NONE else (), dtype=acc)
    return loss, input.new_empty(rows, dtype=acc), input.new_empty(rows if probability else (0,), dtype=acc)


@torch.library.register_fake(_BACKWARD)
def _backward_fake(grad_loss, grad_lse, input, target, weight, lse, target_mass, ignore_index, label_smoothing,
                   smoothing, softcap, reduction):
    _validation.check_op_arguments(input, target, weight, ignore_index, label_smoothing, smoothing, softcap,
                                   reduction)
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def setup_context(ctx, inputs, output):
    input, target, weight, *options = inputs
    _, lse, target_mass = output
    ctx.save_for_backward(input, target, weight, lse, target_mass)
    ctx.options = tuple(options)  # ignore_index, label_smoothing, smoothing, softcap, reduction
    # target_mass is saved for the backward, not a result to differentiate; lse is differentiable (z-loss,
    # a returned lse), its gradient is the softmax.
    ctx.mark_non_differentiable(target_mass)


def backward(ctx, grad_loss, grad_lse, grad_target_mass,
             backward_op=torch.ops.labelsmooth.ls_cross_entropy_backward):
    """The forward op's autograd formula; backward_op is the backward op, or a wrapper of it that
    torch.func transforms accept (_functorch.py)."""
    input, target, weight, lse, target_mass = ctx.saved_tensors
    ignore_index, label_smoothing, smoothing, softcap, reduction = ctx.options
    grad_input = grad_target = grad_weight = None
    if ctx.needs_input_grad[0]:
        grad_input = backward_op(grad_loss, grad_lse, input, target, weight, lse, target_mass, *ctx.options)
    if ctx.needs_input_grad[1]:
        grad_target = _weight_gradient.probability_target_gradient(
            grad_loss, input, weight, lse, label_smoothing, softcap, reduction).to(target.dtype)
    if ctx.needs_input_grad[2]:
        grad_weight = _weight_gradient.class_weight_gradient(grad_loss, input, target, weight, lse, *ctx.options)
    return grad_input, grad_target, grad_weight, None, None, None, None, None


torch.library.register_autograd(_FORWARD, backward, setup_context=setup_context)


def no_double_backward(ctx, grad_grad_input):
    raise NotImplementedError(
        "labelsmooth_ext: double backward (a gradient of the gradient, create_graph=True) is not supported"
    )


# Without this rule autograd would silently treat the backward op as constant (a wrong second derivative).
torch.library.register_autograd(_BACKWARD, no_double_backward, setup_context=lambda ctx, inputs, output: None)

# Autocast: no rule is registered on purpose. Ops without an autocast kernel fall through the autocast
# dispatch keys, so bf16/fp16 logits reach the kernels as they are (they accumulate in fp32 themselves)
# and fp32 logits are not cast down. PyTorch's own cross_entropy instead upcasts low-precision logits,
# a full fp32 copy of the largest tensor in an LLM step.
