"""labelsmooth_ext.cross_entropy: the signature and semantics of torch.nn.functional.cross_entropy, on our kernels,
plus the loss options LLM and vision recipes use (z-loss, logit soft-capping, lse output, smoothing conventions,
an external normaliser)."""

import torch
from torch.nn import _reduction as _legacy_reduction

from . import _distributed_dtensor, _eager_autograd, _validation, reference


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
                  label_smoothing=0.0, *, z_loss=0.0, softcap=None, smoothing="uniform", normalizer=None,
                  return_lse=False, return_z_loss=False):
    """Cross-entropy between logits and targets, with optional label smoothing.

    A drop-in for ``torch.nn.functional.cross_entropy``: the same arguments, in the same order, with the
    same defaults (``label_smoothing=0.0``: pass ``label_smoothing=0.1``, the usual value, to smooth).

    * ``input``: logits of shape (C), (N, C) or (N, C, d1, ..., dk), float16/bfloat16/float32/float64.
      The class dim is 1 (0 for 1-D input). LLM logits of shape (B, T, V) have their classes last: pass
      ``input.flatten(0, 1)`` with ``target.flatten()`` (views, no copy).
    * ``target``: class indices (int64, int32 or uint8) of shape (), (N) or (N, d1, ..., dk), or class
      probabilities (floating point) of the input's shape.
    * ``weight``: optional 1-D tensor of C class weights, of any floating dtype (PyTorch requires the
      logits' dtype; here it is used in the accumulation dtype, so fp32 weights with bf16 logits work).
      Differentiable (PyTorch's is not).
    * ``size_average``, ``reduce``: deprecated, as in PyTorch (they override ``reduction`` with a warning).
    * ``ignore_index``: class-index targets equal to it contribute neither loss nor gradient and are left
      out of the mean (not allowed, as in PyTorch, to be >= 0 with probability targets).
    * ``reduction``: "mean" (over non-ignored rows, weighted by ``weight[target]``), "sum" or "none".
    * ``label_smoothing``: eps in [0, 1] (a float, or a 0-d tensor as PyTorch accepts).

    Options (keyword-only; the defaults leave PyTorch's semantics unchanged):

    * ``z_loss``: weight of PaLM's auxiliary loss ``z_loss * lse**2``, added to every non-ignored row's loss
      (times ``weight[target]`` for class indices, like the row) and reduced with it.
    * ``softcap``: None, or c > 0: every logit z is read as ``c * tanh(z / c)`` (Gemma 2), inside the kernels,
      with the gradient through the tanh; the capped logits are never materialised.
    * ``smoothing``: "uniform" (PyTorch's convention: the target becomes ``(1 - eps) * onehot + eps / C``, the
      true class gets eps / C too) or "others" (fairseq's and Megatron's: ``1 - eps`` on the true class and
      ``eps / (C - 1)`` on every other one; class indices only). They agree when
      ``eps_uniform = eps_others * C / (C - 1)``.
    * ``normalizer``: with reduction="mean" only, divide the sum by this (a float, or a 0-d tensor, read on the
      device without a host sync) instead of the number (or weight) of non-ignored rows: the global token
      count across micro-batches and ranks in gradient accumulation.
    * ``return_lse``: also return the float32 (float64 for float64 logits) log-sum-exp of every row's
      (capped) logits, row-shaped, 0 for ignored rows; it is differentiable (its gradient is the softmax).
    * ``return_z_loss``: also return the z-loss part of the loss alone (reduced like the loss), for logging.

    Returns the loss; with ``return_z_loss`` and/or ``return_lse``, a tuple ``(loss, z_loss, lse)`` of the
    requested ones in that order. The loss is float32 for float16/bfloat16 logits (accumulated in float32,
    no upcast copy of the logits) and the logits' dtype otherwise; the gradient has the logits' dtype.
    """
    if size_average is not None or reduce is not None:
        reduction = _legacy_reduction.legacy_get_string(size_average, reduce)
    if _distributed_dtensor.is_dtensor(input):  # logits sharded over the classes: the vocabulary-parallel loss
        return _distributed_dtensor.cross_entropy(
            input, target, weight, ignore_index, reduction, label_smoothing, z_loss=z_loss, softcap=softcap,
            smoothing=smoothing, normalizer=normalizer, return_lse=return_lse, return_z_loss=return_z_loss)
    ignore_index, label_smoothing, code, z_loss, softcap, smoothing_code, normalizer = _validation.check_loss_options(
        ignore_index, label_smoothing, reduction, z_loss, softcap, smoothing, normalizer)
    op_code = _validation.REDUCTIONS["sum"] if normalizer is not None else code
    _validation.check_op_arguments(input, target, weight, ignore_index, label_smoothing, smoothing_code, softcap,
                                   op_code)
    loss, lse, _ = _eager_autograd.forward(input, target, weight, ignore_index, label_smoothing, smoothing_code,
                                           softcap, op_code)
    return with_loss_options(loss, lse, input, target, weight, ignore_index, z_loss, op_code, normalizer,
                             return_z_loss, return_lse)


def with_loss_options(loss, lse, input, target, weight, ignore_index, z_loss, reduction, normalizer, return_z_loss,
                      return_lse):
    """What the options add after the kernels: the z-loss (from the rows' lse), the normaliser (the kernels
    reduced with 'sum' then) and the requested extra outputs; the return value of cross_entropy. `input` only
    tells probability targets apart (see reference.row_weights)."""
    z_part = None
    if z_loss > 0 or return_z_loss:
        z_part = _z_loss_part(input, target, weight, ignore_index, lse, z_loss, reduction)
        loss = loss + z_part
    if normalizer is not None:
        loss = loss / normalizer
        z_part = None if z_part is None else z_part / normalizer
    extras = ((z_part,) if return_z_loss else ()) + ((lse,) if return_lse else ())
    return (loss, *extras) if extras else loss


def _z_loss_part(input, target, weight, ignore_index, lse, z_loss, reduction):
    """z_loss * lse^2 per non-ignored row, weighted like the row (w[y] for class indices), reduced like the
    loss. Computed from the rows' lse, which the kernels return anyway: no pass over the logits; its gradient
    reaches them through lse (2 z lse p_j per row)."""
    row_weight = reference.row_weights(input, target, weight, ignore_index, lse.dtype)
    rows = z_loss * row_weight * lse.square()
    if reduction == _validation.REDUCTIONS["none"]:
        return rows
    total = rows.sum()
    if reduction == _validation.REDUCTIONS["mean"]:
        total = total / row_weight.sum()
    return total
