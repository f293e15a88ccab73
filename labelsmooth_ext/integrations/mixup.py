"""Mixup / CutMix cross-entropy from the two class-index targets, without the N x C soft-target tensor.

timm's ``Mixup`` (and most mixup code) turns class indices into soft targets,

    q = lam * s(a) + (1 - lam) * s(b),    s(y) = (1 - eps) * onehot(y) + eps / C,

and trains on ``SoftTargetCrossEntropy(logits, q)``, which writes q, a log-softmax and their product,
each N x C. Cross-entropy is linear in its target, ``CE(z, q) = sum_c q_c (lse - z_c)``, so per row

    CE(z, q) = lam * CE_eps(z, a) + (1 - lam) * CE_eps(z, b),

a mix of two label-smoothed class-index losses, which is what ``mixup_cross_entropy`` computes. The
same holds with class weights (``sum_c w_c q_c (lse - z_c)`` is linear in q too), for every reduction,
with one care: the mean of a soft-target loss divides by the number of rows, not by the summed class
weights of the targets as the class-index mean does, so the mean here is ``(lam * sum_a + (1 - lam)
* sum_b) / N``, not the mix of two class-index means.
"""

import numbers

import torch

from .. import _validation
from ..functional import cross_entropy

__all__ = ["mixup_cross_entropy"]


def _check_targets(target_a, target_b):
    for name, target in (("target_a", target_a), ("target_b", target_b)):
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"labelsmooth_ext: {name} must be a tensor of class indices, got {type(target).__name__}")
        if target.is_floating_point():
            raise TypeError(
                f"labelsmooth_ext: mixup_cross_entropy takes class indices as {name}, got a {target.dtype} tensor "
                "(for probability targets, call labelsmooth_ext.cross_entropy with them)"
            )
    if target_a.shape != target_b.shape:
        raise ValueError(
            f"labelsmooth_ext: target_a and target_b must have the same shape, got {list(target_a.shape)} and "
            f"{list(target_b.shape)}"
        )


def _mix_weight(lam, input, row_shape):
    """lam as a number in [0, 1], or as a tensor broadcast over the rows: 0-dim, or one value per sample
    (shape (N,), or (N, 1) as timm's per-sample modes give it, for input (N, C, d1, ...))."""
    if isinstance(lam, torch.Tensor):
        if not lam.is_floating_point():
            raise TypeError(f"labelsmooth_ext: lam must be a float or a floating-point tensor, got {lam.dtype}")
        if lam.device != input.device:
            raise RuntimeError(f"labelsmooth_ext: lam is on {lam.device} but input is on {input.device}")
        if lam.dim() == 0:
            return lam
        if len(row_shape) == 0 or list(lam.shape) not in ([row_shape[0]], [row_shape[0], 1]):
            per_sample = f", ({row_shape[0]},) or ({row_shape[0]}, 1), one per sample" if row_shape else ""
            raise ValueError(
                f"labelsmooth_ext: lam must have shape (){per_sample}, got {list(lam.shape)}"
            )
        return lam.reshape([row_shape[0]] + [1] * (len(row_shape) - 1))
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real):
        raise TypeError(f"labelsmooth_ext: lam must be a float in [0, 1] or a tensor, got {type(lam).__name__}")
    if not 0.0 <= float(lam) <= 1.0:  # also rejects NaN
        raise ValueError(f"labelsmooth_ext: lam must be in [0, 1], got {lam}")
    return float(lam)


def mixup_cross_entropy(input, target_a, target_b, lam, weight=None, *, ignore_index=-100, reduction="mean",
                        label_smoothing=0.0):
    """Cross-entropy against the mixup soft target ``lam * s(target_a) + (1 - lam) * s(target_b)``, where
    ``s(y) = (1 - label_smoothing) * onehot(y) + label_smoothing / C``, computed from the class indices
    (the soft target is never built).

    * ``input``: logits (C), (N, C) or (N, C, d1, ...), as ``labelsmooth_ext.cross_entropy``.
    * ``target_a``, ``target_b``: class indices of the same shape (for timm's ``Mixup``: the batch's
      targets and the same flipped, ``target.flip(0)``).
    * ``lam``: the weight of ``target_a``; a number in [0, 1], a 0-dim tensor or one value per sample
      (shape (N,) or (N, 1)). The values of a tensor are not checked (that would need a host read).
    * ``weight``: optional class weights: each row's loss is ``sum_c weight[c] q_c (lse - z_c)``.
    * ``ignore_index``: a component whose class is ``ignore_index`` adds nothing to its row (the row is
      scored against the other component's part of q alone).
    * ``reduction``: "none" (per row), "sum", or "mean": the sum divided by the mixing weight of the
      components not ignored, ``sum_i lam [a_i valid] + (1 - lam) [b_i valid]``; that is N, the
      soft-target mean (timm's ``SoftTargetCrossEntropy``, PyTorch's probability targets), when nothing
      is ignored, also with class weights. NaN if everything is ignored, as PyTorch's mean.

    Equals ``SoftTargetCrossEntropy()(input, mixup_target(target_a, C, lam, label_smoothing))`` of timm
    for ``target_b = target_a.flip(0)`` (timm has no weights and no ignore_index). Costs two reads of
    the logits in the forward and two gradient writes plus their sum in the backward, against timm's
    four N x C tensors.
    """
    _validation.reduction_code(reduction)
    _check_targets(target_a, target_b)
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"labelsmooth_ext: input must be a tensor of logits, got {type(input).__name__}")
    mix = _mix_weight(lam, input, list(target_a.shape))  # the targets' shape is the rows' (checked below)
    row_loss_a = cross_entropy(input, target_a, weight, ignore_index=ignore_index, reduction="none",
                               label_smoothing=label_smoothing)
    row_loss_b = cross_entropy(input, target_b, weight, ignore_index=ignore_index, reduction="none",
                               label_smoothing=label_smoothing)
    if isinstance(mix, torch.Tensor):
        mix = mix.to(row_loss_a.dtype)
    rows = mix * row_loss_a + (1 - mix) * row_loss_b
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    valid_a = (target_a != ignore_index).to(rows.dtype)
    valid_b = (target_b != ignore_index).to(rows.dtype)
    return total / (mix * valid_a + (1 - mix) * valid_b).sum()
