"""Pure-PyTorch implementation of the ``labelsmooth`` ops.

It runs the public API when the compiled extension cannot be loaded, and serves as a second opinion in
tests. The row formulas mirror csrc/kernels/ls_row_math.h term by term, so that every backend computes
the same thing; see that header for the derivations.

Rows are processed in chunks of at most ``CHUNK_LOGITS`` logits (at least one row), with the class dim
moved last only inside the chunk, so the N x K temporaries never exceed one chunk whatever the batch
size, and large inputs are never copied whole. Only tensor ops are used, so this also traces under
torch.compile and runs on any device.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _validation

__all__ = ["CHUNK_LOGITS", "ls_cross_entropy_forward", "ls_cross_entropy_backward"]

# 2^22 fp32 logits are 16 MiB per temporary: big enough to amortise the Python loop, small enough
# that a 256k-vocabulary batch does not need several full fp32 copies of the logits.
CHUNK_LOGITS = 1 << 22

# ATen sums a single long reduction (one output, over 32768 elements) in per-thread pieces grouped by
# the thread count, but several outputs each serially. Such sums are therefore taken over blocks of
# this many elements first, so results have the same bits for any torch.get_num_threads().
_SUM_BLOCK = 4096

_REDUCTION_NONE = 0
_REDUCTION_MEAN = 1


def _accumulation_dtype(input: Tensor) -> torch.dtype:
    return torch.float64 if input.dtype == torch.float64 else torch.float32


def _class_dim(input: Tensor) -> int:
    return 0 if input.dim() == 1 else 1


def _is_probability_target(input: Tensor, target: Tensor) -> bool:
    return target.shape == input.shape and target.is_floating_point()


def _row_chunks(row_shape: tuple[int, ...], num_classes: int) -> list[tuple]:
    """Index tuples into a (*row_shape, ...) tensor, each selecting consecutive rows (in row order)
    that hold at most CHUNK_LOGITS logits, or a single row when one row is larger than that.

    Indexing the original dims (instead of flattening the rows) keeps every chunk a view of the
    input, whatever its strides."""
    chunks: list[tuple] = []
    if num_classes == 0:  # no logits to read (all rows are ignored; the caller checked the targets)
        return chunks

    def split(prefix: tuple, dims: tuple[int, ...]) -> None:
        if not dims or math.prod(dims) * num_classes <= CHUNK_LOGITS:
            chunks.append(prefix)
            return
        slice_logits = math.prod(dims[1:]) * num_classes
        if slice_logits <= CHUNK_LOGITS:
            step = CHUNK_LOGITS // slice_logits
            for start in range(0, dims[0], step):
                chunks.append(prefix + (slice(start, min(start + step, dims[0])),))
        else:
            for index in range(dims[0]):
                split(prefix + (index,), dims[1:])

    split((), tuple(row_shape))
    return chunks


def _rows_of(block: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """A (rows, classes) matrix of a class-last chunk; converting into contiguous memory first means
    a chunk is copied at most once (by the conversion or by the reshape, never both)."""
    return block.to(dtype, memory_format=torch.contiguous_format).reshape(-1, num_classes)


def _sum_rows(values: Tensor) -> Tensor:
    """Sums of a (rows, length) matrix along its rows, with bits independent of the thread count."""
    rows, length = values.shape
    if rows > 1 or length <= _SUM_BLOCK:
        return values.sum(dim=1)
    whole = length - length % _SUM_BLOCK
    partial = values[0, :whole].reshape(-1, _SUM_BLOCK).sum(dim=1)
    if whole < length:
        partial = torch.cat([partial, values[0, whole:].sum().unsqueeze(0)])
    return _sum_rows(partial.unsqueeze(0))


def _sum_all(values: Tensor) -> Tensor:
    return _sum_rows(values.reshape(1, -1)).squeeze(0)


def _row_lse(logits: Tensor) -> Tensor:
    """max + log sum exp(z - max), as the kernels compute it: an all -inf row gives -inf, and a +inf
    logit gives NaN (exp(inf - inf)), which is what PyTorch's log_softmax gives there too (unlike
    torch.logsumexp, which says +inf)."""
    row_max = logits.amax(dim=1)
    shift = torch.where(row_max == -math.inf, torch.zeros_like(row_max), row_max)
    return shift + torch.log(_sum_rows(torch.exp(logits - shift.unsqueeze(1))))


def _row_pivot(logits: Tensor) -> Tensor:
    """The row's first logit when finite, else 0: sums taken relative to it keep a large common offset
    from cancelling catastrophically in fp32."""
    first = logits[:, 0]
    return torch.where(torch.isfinite(first), first, torch.zeros_like(first))


def _valid_and_safe_targets(target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Rows to use, and targets in which ignored rows point at class 0 so that gathering logits or
    weights never uses the ignore value as an index."""
    valid = target != ignore_index
    return valid, torch.where(valid, target, torch.zeros_like(target))


def _target_weights(safe_target: Tensor, weight: Tensor | None, dtype: torch.dtype) -> Tensor:
    if weight is None:
        return torch.ones(safe_target.shape, dtype=dtype, device=safe_target.device)
    return weight[safe_target]


def _mean_denominator(probability: bool, target: Tensor, weight: Tensor | None, ignore_index: int,
                      dtype: torch.dtype) -> Tensor | int:
    """What 'mean' divides by: the number of rows for probability targets; otherwise the sum of w[y]
    over valid rows (their count without weights), which is 0 when all rows are ignored and makes
    the mean NaN as in PyTorch."""
    if probability:
        return target.numel() // target.shape[-1]
    valid, safe_target = _valid_and_safe_targets(target, ignore_index)
    w_target = _target_weights(safe_target, weight, dtype)
    return _sum_all(torch.where(valid, w_target, torch.zeros_like(w_target)))


def _class_index_chunk_forward(logits: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int,
                               eps: float) -> tuple[Tensor, Tensor]:
    num_classes = logits.shape[1]
    valid, safe_target = _valid_and_safe_targets(target, ignore_index)
    lse = _row_lse(logits)
    z_target = logits.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    w_target = _target_weights(safe_target, weight, logits.dtype)
    loss = (1.0 - eps) * w_target * (lse - z_target)
    # eps == 0 skips the smoothing term, as PyTorch does: it would turn a -inf logit into NaN.
    if eps > 0:
        pivot = _row_pivot(logits)
        shifted = logits - pivot.unsqueeze(1)
        if weight is None:
            weight_total = float(num_classes)
        else:
            weight_total = _sum_all(weight)
            shifted.mul_(weight)
        loss = loss + (eps / num_classes) * (weight_total * (lse - pivot) - _sum_rows(shifted))
    zero = torch.zeros_like(lse)
    return torch.where(valid, loss, zero), torch.where(valid, lse, zero)


def _smoothed_weighted_target(target: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """w_c * t'_c with t' = (1 - eps) t + eps / K, in fresh memory (the target chunk may be the caller's)."""
    smoothed = (target * (1.0 - eps)).add_(eps / target.shape[1])
    return smoothed if weight is None else smoothed.mul_(weight)


def _probability_chunk_forward(logits: Tensor, target: Tensor, weight: Tensor | None,
                               eps: float) -> tuple[Tensor, Tensor]:
    lse = _row_lse(logits)
    pivot = _row_pivot(logits)
    weighted_target = _smoothed_weighted_target(target, weight, eps)
    mass = _sum_rows(weighted_target)
    # Relative to the pivot, so that a -inf logit with zero target mass gives NaN exactly where
    # PyTorch's -(log_softmax * t') does.
    shifted_dot = _sum_rows((logits - pivot.unsqueeze(1)).mul_(weighted_target))
    return mass * (lse - pivot) - shifted_dot, lse


def _problem(input: Tensor, target: Tensor, weight: Tensor | None):
    """What both ops need to know about their arguments: the accumulation dtype, the class dim and
    count, the logits with the class dim last (a view), the row shape, the weights in the accumulation
    dtype, and whether the targets are probabilities."""
    acc = _accumulation_dtype(input)
    class_dim = _class_dim(input)
    class_last = input.movedim(class_dim, -1)
    acc_weight = None if weight is None else weight.to(acc)
    return (acc, class_dim, input.shape[class_dim], class_last, class_last.shape[:-1], acc_weight,
            _is_probability_target(input, target))


def ls_cross_entropy_forward(input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int,
                             label_smoothing: float, reduction: int) -> tuple[Tensor, Tensor]:
    """Label-smoothed cross-entropy: (loss, lse), both in the accumulation dtype."""
    _validation.check_op_arguments(input, target, weight, ignore_index, label_smoothing, reduction)
    acc, class_dim, num_classes, class_last, row_shape, acc_weight, probability = _problem(input, target, weight)
    if probability:
        target_source = target.movedim(class_dim, -1)
    else:
        target_source = target.to(torch.int64)
        _validation.check_target_values(target_source, num_classes, ignore_index)

    loss_rows = torch.zeros(row_shape, dtype=acc, device=input.device)
    lse_rows = torch.zeros(row_shape, dtype=acc, device=input.device)
    for index in _row_chunks(row_shape, num_classes):
        logits = _rows_of(class_last[index], num_classes, acc)
        if probability:
            chunk_target = _rows_of(target_source[index], num_classes, acc)
            loss, lse = _probability_chunk_forward(logits, chunk_target, acc_weight, label_smoothing)
        else:
            chunk_target = target_source[index].reshape(-1)
            loss, lse = _class_index_chunk_forward(logits, chunk_target, acc_weight, ignore_index,
                                                   label_smoothing)
        chunk_row_shape = loss_rows[index].shape
        loss_rows[index].copy_(loss.view(chunk_row_shape))
        lse_rows[index].copy_(lse.view(chunk_row_shape))

    if reduction == _REDUCTION_NONE:
        return loss_rows, lse_rows
    total = _sum_all(loss_rows)
    if reduction == _REDUCTION_MEAN:
        total = total / _mean_denominator(probability, target_source, acc_weight, ignore_index, acc)
    return total, lse_rows


def _class_index_chunk_backward(logits: Tensor, lse: Tensor, target: Tensor, upstream: Tensor,
                                weight: Tensor | None, ignore_index: int, eps: float) -> Tensor:
    num_classes = logits.shape[1]
    valid, safe_target = _valid_and_safe_targets(target, ignore_index)
    w_target = _target_weights(safe_target, weight, logits.dtype)
    weight_total = float(num_classes) if weight is None else _sum_all(weight)
    smooth = eps / num_classes
    # dL/dz_j = prob_scale * p_j - smooth_scale * w_j - [j = y] * target_scale
    prob_scale = upstream * ((1.0 - eps) * w_target + smooth * weight_total)
    smooth_scale = upstream * smooth
    target_scale = upstream * (1.0 - eps) * w_target
    grad = (logits - lse.unsqueeze(1)).exp_().mul_(prob_scale.unsqueeze(1))
    if eps > 0:
        if weight is None:
            grad.sub_(smooth_scale.unsqueeze(1))
        else:
            grad.addcmul_(smooth_scale.unsqueeze(1), weight, value=-1.0)
    grad.scatter_add_(1, safe_target.unsqueeze(1), -target_scale.unsqueeze(1))
    # Ignored rows carry lse = 0 and a meaningless upstream gradient (inf for an all-ignored mean).
    return grad.masked_fill_(~valid.unsqueeze(1), 0.0)


def _probability_chunk_backward(logits: Tensor, lse: Tensor, target: Tensor, upstream: Tensor,
                                weight: Tensor | None, eps: float) -> Tensor:
    # dL/dz_j = g * (mass * p_j - w_j t'_j)
    weighted_target = _smoothed_weighted_target(target, weight, eps)
    mass = _sum_rows(weighted_target)
    grad = (logits - lse.unsqueeze(1)).exp_().mul_(mass.unsqueeze(1)).sub_(weighted_target)
    return grad.mul_(upstream.unsqueeze(1))


def ls_cross_entropy_backward(grad_loss: Tensor, input: Tensor, target: Tensor, weight: Tensor | None,
                              lse: Tensor, ignore_index: int, label_smoothing: float,
                              reduction: int) -> Tensor:
    """Gradient of ls_cross_entropy_forward's loss with respect to input: input's shape and dtype,
    contiguous. Trusts the target values (the forward checked them)."""
    _validation.check_op_arguments(input, target, weight, ignore_index, label_smoothing, reduction)
    acc, class_dim, num_classes, class_last, row_shape, acc_weight, probability = _problem(input, target, weight)
    target_source = target.movedim(class_dim, -1) if probability else target.to(torch.int64)
    # The upstream gradient of every row: grad_loss itself for 'none', one value for 'sum' and 'mean'.
    upstream_rows = grad_loss.to(acc)
    if reduction == _REDUCTION_MEAN:
        denominator = _mean_denominator(probability, target_source, acc_weight, ignore_index, acc)
        upstream_rows = upstream_rows / denominator
    upstream_rows = upstream_rows.expand(row_shape)
    acc_lse = lse.to(acc)

    grad_input = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    grad_class_last = grad_input.movedim(class_dim, -1)
    for index in _row_chunks(row_shape, num_classes):
        logits = _rows_of(class_last[index], num_classes, acc)
        chunk_lse = acc_lse[index].reshape(-1)
        upstream = upstream_rows[index].reshape(-1)
        if probability:
            chunk_target = _rows_of(target_source[index], num_classes, acc)
            grad = _probability_chunk_backward(logits, chunk_lse, chunk_target, upstream, acc_weight,
                                               label_smoothing)
        else:
            chunk_target = target_source[index].reshape(-1)
            grad = _class_index_chunk_backward(logits, chunk_lse, chunk_target, upstream, acc_weight,
                                               ignore_index, label_smoothing)
        chunk_out = grad_class_last[index]
        chunk_out.copy_(grad.view(chunk_out.shape))
    return grad_input
