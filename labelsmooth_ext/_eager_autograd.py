"""The forward op with its autograd formula, by the cheapest route the caller's context allows.

The formula registered with torch.library (_registration.py) is the op's only one, and it is what
torch.compile, torch.export, torch.func, jit tracing and every dispatch mode see. Reaching it from eager
Python is slow, though: the dispatcher calls back into Python with its arguments boxed, fills in the
schema's defaults, and wraps the formula in an autograd.Function of the setup_context form, whose apply
binds its arguments with inspect.signature on every call. On a 2-core CPU that added 55-75 us to a forward +
backward of 64 rows of 10 classes, several times what both kernels take there.

In plain eager mode (plain tensors; no transform, dispatch or function mode, trace or compile active) the
same formula runs here instead, in an autograd.Function of the older form (the context passed to forward),
which calls both ops below the autograd key: the same kernels, the same bits, a fraction of the overhead.
"""

import torch
import torch.autograd.forward_ad as forward_ad

from . import _functorch, _registration

_OPS = torch.ops.labelsmooth

# Tensors whose calls reach the kernels unchanged: nn.Parameter (learned logits or class weights) disables
# __torch_function__, so it dispatches as a plain tensor does.
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _is_plain_eager(tensors):
    """Whether nothing but eager autograd has to see the op: anything else (a subclass such as a fake or
    functional tensor, a mode, a trace, a compile, a torch.func transform) goes through the dispatcher."""
    # is_compiling first: torch.compile traces this function, and must not reach the other checks.
    return (
        not torch.compiler.is_compiling()
        and all(tensor is None or type(tensor) in _PLAIN_TENSOR_TYPES for tensor in tensors)
        and not torch._C._are_functorch_transforms_active()
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._is_torch_function_mode_enabled()
        and not torch.jit.is_tracing()
    )


def _backward_below_autograd(*args):
    """The backward op for _EagerForward. With create_graph=True (grad mode on during the backward) it goes
    through the dispatcher, whose registered rule then refuses a double backward as the op path does."""
    if torch.is_grad_enabled():
        return _OPS.ls_cross_entropy_backward(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return _OPS.ls_cross_entropy_backward(*args)


class _EagerForward(torch.autograd.Function):
    """_registration's autograd formula around the forward op's kernel (the older Function form: a
    setup_context staticmethod would bring back the per-call signature binding)."""

    @staticmethod
    def forward(ctx, *args):
        with torch._C._AutoDispatchBelowAutograd():
            output = _OPS.ls_cross_entropy_forward(*args)
        _registration.setup_context(ctx, args, output)
        return output

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, grad_target_mass):
        return _registration.backward(ctx, grad_loss, grad_lse, grad_target_mass,
                                      backward_op=_backward_below_autograd)


def _reject_forward_mode_ad(tensors):
    """The ops have no forward-mode (jvp) rule. A dual tensor (torch.autograd.forward_ad) that does not require
    grad would reach the kernels with its tangent dropped, and the loss would come out with none: an error
    instead. (torch.func.jvp, and dual tensors that require grad, stop at the autograd.Function's missing jvp.)"""
    if forward_ad._current_level < 0:  # no dual level open: no tensor can carry a tangent
        return
    if any(tensor is not None and forward_ad.unpack_dual(tensor).tangent is not None for tensor in tensors):
        raise NotImplementedError(
            "labelsmooth_ext: forward-mode AD (dual tensors of torch.autograd.forward_ad) is not supported: the "
            "loss has no jvp rule. Use reverse mode (backward(), torch.autograd.grad, torch.func.grad or vjp)."
        )


def forward(input, target, weight, *options):
    """ls_cross_entropy_forward(input, target, weight, *options) with its autograd formula, wherever it is
    called from."""
    args = (input, target, weight, *options)
    if not _is_plain_eager((input, target, weight)):
        return _functorch.forward(*args)
    _reject_forward_mode_ad((input, target, weight))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, target, weight)):
        return _EagerForward.apply(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return _OPS.ls_cross_entropy_forward(*args)
