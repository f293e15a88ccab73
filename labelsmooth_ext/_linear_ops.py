"""The custom ops of the fused linear head + label-smoothed cross-entropy, with their fakes and autograd.

Every op walks the rows in chunks: per chunk one GEMM into a chunk buffer (ATen's BLAS on CPU, cuBLAS on
CUDA), then the ``labelsmooth`` cross-entropy ops over the chunk's logits (whichever backend defined them:
compiled CPU, CUDA, or the Python fallback), then, for gradients, two more GEMMs that turn the chunk's
logit gradient into its share of ``grad_input`` and ``grad_linear_weight``. At most one chunk of logits
and one of their gradient exist at a time. Chunk bounds come from shapes only: no host sync.

* ``linear_cross_entropy_with_grads``: the sum of the row losses (z-loss included), optionally divided by
  a denominator, *and* the gradients of that sum, computed in the same pass over the chunks. Its autograd
  formula only scales them by the upstream gradient. Used when the upstream gradient is one scalar
  (reduction 'mean' or 'sum') and something needs a gradient.
* ``linear_cross_entropy_rows``: per-row loss and lse (saved); its backward,
  ``linear_cross_entropy_rows_backward``, recomputes each chunk's logits (one more GEMM) because the
  per-row upstream gradients are only known then (reduction 'none', a returned lse or z-loss part).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _linear_validation, _registration, reference

_CE = torch.ops.labelsmooth
_NO_TARGET_MASS = (0,)  # the cross-entropy ops' target_mass for class-index targets: an empty tensor

# Automatic chunking: a chunk of logits holds 1 / LOGITS_FRACTION of the full logits (so the chunk of logits
# and the chunk of their gradient together hold 1/8 of them), at most CHUNK_BYTES, but at least MIN_CHUNK_ROWS
# rows: below that the GEMMs get too thin to run near the machine's peak (on a 2-core AVX2 CPU, a GEMM of
# 128 x 1024 x 32000 ran at about 3/4 of the speed of one of 256 rows, 64 rows at about 60%).
CHUNK_BYTES = 128 << 20
LOGITS_FRACTION = 16
MIN_CHUNK_ROWS = 128


def chunk_rows(rows: int, classes: int, dtype: torch.dtype, chunk_size: int) -> int:
    """Rows per chunk: chunk_size when > 0, else the automatic choice (see CHUNK_BYTES)."""
    if chunk_size > 0:
        return chunk_size
    by_fraction = -(-rows // LOGITS_FRACTION)
    by_budget = CHUNK_BYTES // (max(classes, 1) * dtype.itemsize)
    return max(min(by_fraction, by_budget), MIN_CHUNK_ROWS)


def _check_op_arguments(input, linear_weight, linear_bias, target, weight, chunk_size):
    """The public API's checks, for direct calls of the ops (which take rows already flattened to (N, H))."""
    _linear_validation.check_linear_arguments(input, linear_weight, linear_bias, target, weight)
    if input.dim() != 2:
        raise RuntimeError(f"labelsmooth linear ops: input must have shape (N, H), got {list(input.shape)}")
    if chunk_size < 0:
        raise ValueError(f"labelsmooth linear ops: chunk_size must be >= 0 (0 = automatic), got {chunk_size}")


def _chunks(rows: int, classes: int, dtype: torch.dtype, chunk_size: int):
    step = chunk_rows(rows, classes, dtype, chunk_size)
    return step, [(start, min(start + step, rows)) for start in range(0, rows, step)]


def _logits_into(buffer: Tensor, x: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor]) -> Tensor:
    """x @ linear_weight^T (+ bias) written into the first rows of the chunk buffer."""
    out = buffer[: x.shape[0]]
    if linear_bias is None:
        return torch.mm(x, linear_weight.t(), out=out)
    return torch.addmm(linear_bias, x, linear_weight.t(), out=out)


class _Gradients:
    """grad_input, grad_linear_weight and grad_linear_bias, filled chunk by chunk from the logits' gradient.

    The weight and bias gradients sum over every chunk, so they accumulate in the accumulation dtype (fp32 for
    bf16/fp16; each chunk's GEMM itself accumulates in fp32 and rounds its product once). The first chunk writes
    them rather than adding to zeros (a pass over a weight-sized tensor less). grad_input gets each row once,
    written by its GEMM straight into place."""

    def __init__(self, input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor]):
        acc = _registration.accumulation_dtype(input.dtype)
        self.input = torch.empty_like(input, memory_format=torch.contiguous_format)
        self.weight = torch.empty(linear_weight.shape, dtype=acc, device=input.device)
        self.bias = torch.empty(linear_weight.shape[0] if linear_bias is not None else 0, dtype=acc,
                                device=input.device)
        self._linear_weight = linear_weight
        self._has_bias = linear_bias is not None
        self._same_dtype = acc == input.dtype
        self._empty = True

    def add_chunk(self, start: int, grad_logits: Tensor, x: Tensor) -> None:
        torch.mm(grad_logits, self._linear_weight, out=self.input[start : start + x.shape[0]])
        if self._same_dtype and self._empty:
            torch.mm(grad_logits.t(), x, out=self.weight)
        elif self._same_dtype:
            self.weight.addmm_(grad_logits.t(), x)
        else:
            # ATen's CPU GEMM has no fp32 output for bf16/fp16 operands (mm's out_dtype is CUDA only).
            self._accumulate(self.weight, torch.mm(grad_logits.t(), x))
        if self._has_bias:
            self._accumulate(self.bias, grad_logits.sum(dim=0, dtype=self.bias.dtype))
        self._empty = False

    def _accumulate(self, total: Tensor, chunk: Tensor) -> None:
        if self._empty:
            total.copy_(chunk)
        else:
            total.add_(chunk)

    def finish(self) -> "_Gradients":
        """No rows: zero gradients."""
        if self._empty:
            self.weight.zero_()
            self.bias.zero_()
        return self


def row_weights(target: Tensor, weight: Optional[Tensor], ignore_index: int, acc: torch.dtype) -> Tensor:
    """w[y] per row (1 without class weights), 0 for ignored rows. row_weights reads its first argument only to
    tell probability targets (of the logits' shape) apart; class-index targets are never that."""
    return reference.row_weights(target, target, weight, ignore_index, acc)


# ----------------------------------------------------------------------------------------------------
# Scalar upstream gradient: loss and gradients in one pass


@torch.library.custom_op("labelsmooth::linear_cross_entropy_with_grads", mutates_args=())
def linear_cross_entropy_with_grads(
    input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor, weight: Optional[Tensor],
    denominator: Optional[Tensor], ignore_index: int, label_smoothing: float, smoothing: int,
    softcap: Optional[float], z_loss: float, chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, grad_input, grad_linear_weight, grad_linear_bias) for (N, H) input and (N) class-index targets.

    loss = sum over rows of (row loss + z_loss * w[y] * lse^2), divided by `denominator` when given (the
    mean's); the gradients are those of the undivided sum (the autograd formula divides). grad_input has the
    input's dtype, the other two the accumulation dtype; grad_linear_bias is empty without a bias."""
    _check_op_arguments(input, linear_weight, linear_bias, target, weight, chunk_size)
    acc = _registration.accumulation_dtype(input.dtype)
    classes = linear_weight.shape[0]
    step, bounds = _chunks(input.shape[0], classes, input.dtype, chunk_size)
    grads = _Gradients(input, linear_weight, linear_bias)
    buffer = input.new_empty((min(step, input.shape[0]), classes))
    unit = torch.ones((), dtype=acc, device=input.device)
    z_weights = row_weights(target, weight, ignore_index, acc).mul_(z_loss) if z_loss > 0 else None
    total = torch.zeros((), dtype=acc, device=input.device)
    for start, end in bounds:
        x, t = input[start:end], target[start:end]
        logits = _logits_into(buffer, x, linear_weight, linear_bias)
        rows, lse, mass = _CE.ls_cross_entropy_forward(logits, t, weight, ignore_index, label_smoothing, smoothing,
                                                       softcap, _registration.REDUCTION_NONE)
        total += rows.sum()
        grad_lse = None
        if z_weights is not None:
            # z_loss * w[y] * lse^2 per row; its gradient reaches the logits through lse: 2 z_loss w[y] lse p_j.
            chunk_z = z_weights[start:end]
            total += (chunk_z * lse.square()).sum()
            grad_lse = 2.0 * chunk_z * lse
        grad_logits = _CE.ls_cross_entropy_backward(unit, grad_lse, logits, t, weight, lse, mass, ignore_index,
                                                    label_smoothing, smoothing, softcap, _registration.REDUCTION_SUM)
        grads.add_chunk(start, grad_logits, x)
        del grad_logits  # else it lives on while the next chunk's is computed: three chunks at once, not two
    if denominator is not None:
        total = total / denominator
    grads.finish()
    return total, grads.input, grads.weight, grads.bias


@linear_cross_entropy_with_grads.register_fake
def _with_grads_fake(input, linear_weight, linear_bias, target, weight, denominator, ignore_index, label_smoothing,
                     smoothing, softcap, z_loss, chunk_size):
    _check_op_arguments(input, linear_weight, linear_bias, target, weight, chunk_size)
    acc = _registration.accumulation_dtype(input.dtype)
    bias_size = linear_weight.shape[0] if linear_bias is not None else 0
    return (input.new_empty((), dtype=acc), torch.empty_like(input, memory_format=torch.contiguous_format),
            linear_weight.new_empty(linear_weight.shape, dtype=acc), input.new_empty((bias_size,), dtype=acc))


def _with_grads_setup_context(ctx, inputs, output):
    input, linear_weight, linear_bias, *_ = inputs
    denominator = inputs[5]
    _, grad_input, grad_weight, grad_bias = output
    ctx.mark_non_differentiable(grad_input, grad_weight, grad_bias)
    # The gradient outputs are never used downstream: no zero-filled gradients for them.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad_input, grad_weight, grad_bias, denominator)
    ctx.dtypes = (linear_weight.dtype, None if linear_bias is None else linear_bias.dtype)


def _with_grads_backward(ctx, grad_loss, *_):
    if torch.is_grad_enabled():
        # The saved gradients would act as constants: a second derivative through them would be wrong.
        _registration.no_double_backward(ctx, grad_loss)
    grad_input, grad_weight, grad_bias, denominator = ctx.saved_tensors
    if grad_loss is None:  # only the gradient outputs were differentiated (gradcheck does): nothing flows back
        return (None,) * 12
    scale = grad_loss
    if denominator is not None:
        # All rows ignored: the mean is 0 / 0 and its gradient zero (as PyTorch's), not 0 * inf.
        scale = torch.where(denominator != 0, grad_loss / denominator, torch.zeros_like(grad_loss))
    weight_dtype, bias_dtype = ctx.dtypes
    grads = [None] * 12
    # Out of place: the saved gradients stay as they are, so a second backward (retain_graph=True) is right too.
    if ctx.needs_input_grad[0]:
        grads[0] = grad_input * scale.to(grad_input.dtype)
    if ctx.needs_input_grad[1]:
        grads[1] = (grad_weight * scale).to(weight_dtype)
    if ctx.needs_input_grad[2]:
        grads[2] = (grad_bias * scale).to(bias_dtype)
    return tuple(grads)


linear_cross_entropy_with_grads.register_autograd(_with_grads_backward, setup_context=_with_grads_setup_context)


# ----------------------------------------------------------------------------------------------------
# Per-row upstream gradient: loss and lse rows, recomputed in the backward


@torch.library.custom_op("labelsmooth::linear_cross_entropy_rows", mutates_args=())
def linear_cross_entropy_rows(
    input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor, weight: Optional[Tensor],
    ignore_index: int, label_smoothing: float, smoothing: int, softcap: Optional[float], chunk_size: int,
) -> tuple[Tensor, Tensor]:
    """(loss, lse) per row, in the accumulation dtype, for (N, H) input and (N) class-index targets."""
    _check_op_arguments(input, linear_weight, linear_bias, target, weight, chunk_size)
    acc = _registration.accumulation_dtype(input.dtype)
    classes = linear_weight.shape[0]
    step, bounds = _chunks(input.shape[0], classes, input.dtype, chunk_size)
    buffer = input.new_empty((min(step, input.shape[0]), classes))
    loss = input.new_empty(input.shape[:1], dtype=acc)
    lse = input.new_empty(input.shape[:1], dtype=acc)
    for start, end in bounds:
        logits = _logits_into(buffer, input[start:end], linear_weight, linear_bias)
        rows, chunk_lse, _ = _CE.ls_cross_entropy_forward(logits, target[start:end], weight, ignore_index,
                                                          label_smoothing, smoothing, softcap,
                                                          _registration.REDUCTION_NONE)
        loss[start:end] = rows
        lse[start:end] = chunk_lse
    return loss, lse


@linear_cross_entropy_rows.register_fake
def _rows_fake(input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing, smoothing, softcap,
               chunk_size):
    _check_op_arguments(input, linear_weight, linear_bias, target, weight, chunk_size)
    acc = _registration.accumulation_dtype(input.dtype)
    return input.new_empty(input.shape[:1], dtype=acc), input.new_empty(input.shape[:1], dtype=acc)


@torch.library.custom_op("labelsmooth::linear_cross_entropy_rows_backward", mutates_args=())
def linear_cross_entropy_rows_backward(
    grad_loss: Tensor, grad_lse: Optional[Tensor], input: Tensor, linear_weight: Tensor,
    linear_bias: Optional[Tensor], target: Tensor, weight: Optional[Tensor], lse: Tensor, ignore_index: int,
    label_smoothing: float, smoothing: int, softcap: Optional[float], chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_input, grad_linear_weight, grad_linear_bias) from per-row gradients of the loss and of lse, in the
    dtypes of input, linear_weight and linear_bias (empty without a bias)."""
    classes = linear_weight.shape[0]
    step, bounds = _chunks(input.shape[0], classes, input.dtype, chunk_size)
    grads = _Gradients(input, linear_weight, linear_bias)
    buffer = input.new_empty((min(step, input.shape[0]), classes))
    mass = lse.new_empty(_NO_TARGET_MASS)
    for start, end in bounds:
        x = input[start:end]
        logits = _logits_into(buffer, x, linear_weight, linear_bias)
        chunk_grad_lse = None if grad_lse is None else grad_lse[start:end]
        grad_logits = _CE.ls_cross_entropy_backward(grad_loss[start:end], chunk_grad_lse, logits, target[start:end],
                                                    weight, lse[start:end], mass, ignore_index, label_smoothing,
                                                    smoothing, softcap, _registration.REDUCTION_NONE)
        grads.add_chunk(start, grad_logits, x)
        del grad_logits  # as above: two chunks at a time
    grads.finish()
    grad_bias = grads.bias if linear_bias is None else grads.bias.to(linear_bias.dtype)
    return grads.input, grads.weight.to(linear_weight.dtype), grad_bias


@linear_cross_entropy_rows_backward.register_fake
def _rows_backward_fake(grad_loss, grad_lse, input, linear_weight, linear_bias, target, weight, lse, ignore_index,
                        label_smoothing, smoothing, softcap, chunk_size):
    bias = input.new_empty((0,), dtype=_registration.accumulation_dtype(input.dtype)) if linear_bias is None \
        else torch.empty_like(linear_bias)
    return (torch.empty_like(input, memory_format=torch.contiguous_format), torch.empty_like(linear_weight), bias)


def _rows_setup_context(ctx, inputs, output):
    input, linear_weight, linear_bias, target, weight, *options = inputs
    _, lse = output
    ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, lse)
    ctx.options = tuple(options)  # ignore_index, label_smoothing, smoothing, softcap, chunk_size


def _rows_backward(ctx, grad_loss, grad_lse):
    input, linear_weight, linear_bias, target, weight, lse = ctx.saved_tensors
    grad_lse = None if grad_lse is None else grad_lse.to(lse.dtype)
    grad_input, grad_weight, grad_bias = linear_cross_entropy_rows_backward(
        grad_loss.to(lse.dtype), grad_lse, input, linear_weight, linear_bias, target, weight, lse,
        *ctx.options)
    needs = ctx.needs_input_grad
    return (grad_input if needs[0] else None, grad_weight if needs[1] else None,
            grad_bias if needs[2] else None) + (None,) * 7


linear_cross_entropy_rows.register_autograd(_rows_backward, setup_context=_rows_setup_context)


def _no_double_backward(ctx, *grads):
    _registration.no_double_backward(ctx, grads[0])


# Without this rule autograd would silently treat the backward op as constant (a wrong second derivative).
linear_cross_entropy_rows_backward.register_autograd(_no_double_backward,
                                                     setup_context=lambda ctx, inputs, output: None)
