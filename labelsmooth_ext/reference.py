"""Pure-PyTorch implementation of the ``labelsmooth`` ops.

It runs the public API when the compiled extension cannot be loaded, and serves as a second opinion in
tests. The row formulas mirror csrc/kernels/ls_row_math.h term by term, so that every backend computes
the same thing; see that header for the derivations.

Rows are processed in chunks of at most ``CHUNK_LOGITS`` logits (at least one row), with the class dim moved last
only inside the chunk, so the N x K temporaries never exceed one chunk whatever the batch size, and large inputs are
never copied whole. Each chunk goes through a few passes of vectorized ATen ops (the exponentials through exp2, the
forward's shifted by each row's target logit: _reference_exp2.py) over buffers that are
allocated once per call and stay in the last-level cache, which keeps it about as fast as eager ``F.cross_entropy``
or faster (see the README) while holding far less memory. Per-row work runs once per call, on tensors of all the
rows, not once per chunk. Rows of few classes (CIFAR's 10 in the forward, up to 8 in the backward) go class-major
instead (_reference_class_major.py): there every pass is vectorized across rows rather than along rows too short to
vectorize. Only tensor ops are used, so this also traces under torch.compile and runs on any device.
"""

from __future__ import annotations

import math
from typing import Iterable, NamedTuple

import torch
from torch import Tensor

from . import _reference_class_major as _class_major
from . import _reference_exp2 as _exp2
from . import _validation

__all__ = ["CHUNK_LOGITS", "ls_cross_entropy_forward", "ls_cross_entropy_backward"]

# 2^20 fp32 logits are 4 MiB per buffer: big enough that the per-op overhead (and, with several threads, the
# cost of every parallel region) is amortised, small enough that the few passes over a chunk run from the
# last-level cache, and that the one or two buffers of a call stay below the N x K temporaries of eager
# cross_entropy.
CHUNK_LOGITS = 1 << 20

# ...and each buffer at most half the bytes of the call's logits, down to this floor: the buffers of a small
# call then stay below eager's N x K temporaries too (a quarter of the logits in fp32 buffers for bf16 input,
# half for fp32), while the chunks stay large enough, and few enough, to amortise the per-op cost.
_MIN_CHUNK_LOGITS = 1 << 16

# Rows of at most this many classes take the class-major forward (see the module docstring): below it, the
# row-major forward's two sums along rows too short to vectorize cost more than transposing the chunk. Both
# forwards alternated on 655360 logits (fp32 and bf16, caches warm and flushed), the class-major one took
# 0.86-1.01x the time of the row-major one at 10 to 14 classes, and 1.07-1.68x at 16 to 32.
CLASS_MAJOR_FORWARD_MAX_CLASSES = 15
# ...and of at most this many the class-major backward. The row-major backward sums nothing along the rows (its
# per-row values broadcast over them), so it is the faster one from fewer classes on: alike, it took 0.86-0.96x
# the time of the class-major one at 10 classes and 0.50-0.76x at 21 and 32, against 0.94-1.07x at 8 and
# 1.02-1.22x at 5 and 6.
CLASS_MAJOR_BACKWARD_MAX_CLASSES = 8

# ATen sums a single long reduction (one output, over 32768 elements) in per-thread pieces grouped by
# the thread count, but several outputs each serially. Such sums are therefore taken over blocks of
# this many elements first, so results have the same bits for any torch.get_num_threads().
_SUM_BLOCK = 4096

_REDUCTION_NONE = 0
_REDUCTION_MEAN = 1
_SMOOTHING_OTHERS = 1


def _accumulation_dtype(input: Tensor) -> torch.dtype:
    return torch.float64 if input.dtype == torch.float64 else torch.float32


def _class_dim(input: Tensor) -> int:
    return 0 if input.dim() == 1 else 1


def _is_probability_target(input: Tensor, target: Tensor) -> bool:
    return target.shape == input.shape and target.is_floating_point()


def _chunk_limit(total_logits: int, input_dtype: torch.dtype, buffer_dtype: torch.dtype) -> int:
    """Most logits in a chunk of a call with this many logits of input_dtype, buffered in buffer_dtype: as many
    bytes as the input where the buffer has the input's dtype, half as many where it is wider (bf16 and fp16
    inputs, whose per-row fp32 results also weigh more against them), so that the peak memory stays below
    eager's; at most CHUNK_LOGITS. A small call thus runs as one chunk where it can: at 65536 x 10 fp32, one
    chunk instead of two took 15% off each op (every op then has twice the work for its fixed cost)."""
    share = 1 if input_dtype.itemsize >= buffer_dtype.itemsize else 2
    input_share = -(-total_logits * input_dtype.itemsize // (share * buffer_dtype.itemsize))
    return min(CHUNK_LOGITS, max(_MIN_CHUNK_LOGITS, input_share))


def _row_chunks(row_shape: tuple[int, ...], num_classes: int, input_dtype: torch.dtype,
                buffer_dtype: torch.dtype) -> list[tuple]:
    """Index tuples into a (*row_shape, ...) tensor, each selecting consecutive rows (in row order)
    that hold at most _chunk_limit logits, or a single row when one row is larger than that.

    Indexing the original dims (instead of flattening the rows) keeps every chunk a view of the
    input, whatever its strides."""
    chunks: list[tuple] = []
    if num_classes == 0:  # no logits to read (all rows are ignored; the caller checked the targets)
        return chunks
    limit = _chunk_limit(math.prod(row_shape) * num_classes, input_dtype, buffer_dtype)

    def split(prefix: tuple, dims: tuple[int, ...]) -> None:
        if not dims or math.prod(dims) * num_classes <= limit:
            chunks.append(prefix)
            return
        slice_logits = math.prod(dims[1:]) * num_classes
        if slice_logits <= limit:
            step = limit // slice_logits
            for start in range(0, dims[0], step):
                chunks.append(prefix + (slice(start, min(start + step, dims[0])),))
        else:
            for index in range(dims[0]):
                split(prefix + (index,), dims[1:])

    split((), tuple(row_shape))
    return chunks


class _ChunkBuffers:
    """Scratch of one op call: named (rows, classes) matrices in the accumulation dtype, each backed by one
    allocation of the largest chunk's size (with the spare room of _reference_exp2.exp2_), so chunks reuse the
    same (cached) memory instead of faulting in fresh pages every time."""

    def __init__(self, chunk_sizes: Iterable[int], dtype: torch.dtype, device: torch.device):
        padded = [(size, _exp2.padded_length(size)) for size in chunk_sizes]
        self._size = max((length for _, length in padded), default=0)
        # The most that exp2_ writes past a chunk's end: what a tensor whose consecutive chunks take exp2_ in
        # place, in order, needs beyond its end (each chunk's excess lands in the next one, not yet written).
        self.spare_room = max((length - size for size, length in padded), default=0)
        self.dtype, self._device = dtype, device
        self._storage: dict[str, Tensor] = {}

    def matrix(self, name: str, rows: int, num_classes: int) -> Tensor:
        if name not in self._storage:
            self._storage[name] = torch.empty(self._size, dtype=self.dtype, device=self._device)
        return self._storage[name][: rows * num_classes].view(rows, num_classes)

    def rows_of(self, block: Tensor, num_classes: int) -> tuple[Tensor, bool]:
        """(matrix, owned): a class-last chunk of the logits as a (rows, classes) matrix in the accumulation
        dtype -- the chunk itself where it already is one, else a copy in this call's buffer, which is then
        `owned`: later passes may overwrite it (ops mixing dtypes would allocate a converted copy each time)."""
        if block.dtype == self.dtype and block.is_contiguous():
            return block.reshape(-1, num_classes), False
        rows = block.numel() // num_classes if num_classes else 0
        matrix = self.matrix("logits", rows, num_classes)
        matrix.view(block.shape).copy_(block)
        return matrix, True

    def scratch_for(self, logits: Tensor, owned: bool) -> Tensor:
        """Where a pass that replaces the logits writes: over them when they are this call's own copy."""
        return logits if owned else self.matrix("scratch", *logits.shape)


def _call_buffers(chunks: list[tuple], row_shape: tuple[int, ...], num_classes: int, dtype: torch.dtype,
                  device: torch.device) -> _ChunkBuffers:
    """The buffers of a call that processes `chunks` (from _row_chunks)."""
    return _ChunkBuffers((_chunk_logits(index, row_shape, num_classes) for index in chunks), dtype, device)


def _chunk_logits(index: tuple, row_shape: tuple[int, ...], num_classes: int) -> int:
    """Logits in the chunk that `index` (ints and slices over the leading row dims) selects."""
    rows = 1
    for dim, selector in enumerate(index):
        if isinstance(selector, slice):
            rows *= len(range(*selector.indices(row_shape[dim])))
    return rows * math.prod(row_shape[len(index):]) * num_classes


def _sum_rows(values: Tensor, out: Tensor | None = None) -> Tensor:
    """Sums of a (rows, length) matrix along its rows (into `out` where given), with bits independent of the
    thread count."""
    rows, length = values.shape
    if rows > 1 or length <= _SUM_BLOCK:
        return values.sum(dim=1) if out is None else torch.sum(values, dim=1, out=out)
    whole = length - length % _SUM_BLOCK
    partial = values[0, :whole].reshape(-1, _SUM_BLOCK).sum(dim=1)
    if whole < length:
        partial = torch.cat([partial, values[0, whole:].sum().unsqueeze(0)])
    return _sum_rows(partial.unsqueeze(0), out)


def _sum_all(values: Tensor) -> Tensor:
    return _sum_rows(values.reshape(1, -1)).squeeze(0)


def _log_softmax_and_lse(logits: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
    """log_softmax of a (rows, K) chunk into `out`, which may be the chunk itself (PyTorch's fused kernel:
    (z - max) - log sum exp(z - max)), and each row's lse = max + log sum exp(z - max): the largest
    log-probability, the one of the row's maximum, is exactly -log sum exp(z - max). A +inf or NaN logit gives
    NaN log-probabilities and lse, as in PyTorch; so does a row of only -inf logits, whose lse is -inf (as
    torch.logsumexp and the kernels give)."""
    row_max = logits.amax(dim=1)
    log_probs = torch.ops.aten._log_softmax.out(logits, 1, False, out=out)
    return log_probs, torch.where(row_max == -math.inf, row_max, row_max - log_probs.amax(dim=1))


def uniform_smoothing(label_smoothing: float, smoothing: int, num_classes: int) -> float:
    """The eps of PyTorch's convention that gives the same smoothed target: 'others' (1 - eps on the true
    class, eps / (K - 1) on each other one) is 'uniform' with eps * K / (K - 1). Mirrors the C++ version in
    csrc/kernels/ls_row_math.h."""
    if smoothing == _SMOOTHING_OTHERS and num_classes > 1:
        return label_smoothing * num_classes / (num_classes - 1)
    return label_smoothing


def _softcapped(logits: Tensor, softcap: float, out: Tensor) -> Tensor:
    """softcap * tanh(z / softcap) into `out`, which may be `logits` itself."""
    return torch.div(logits, softcap, out=out).tanh_().mul_(softcap)


def _weighted_row_sums(values: Tensor, weight: Tensor | None) -> Tensor:
    """sum_c w_c v_c per row, multiplying `values` in place (the caller is done with them)."""
    return _sum_rows(values if weight is None else values.mul_(weight))


def _valid_and_safe_targets(target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Rows to use, and targets in which ignored rows point at class 0 so that gathering logits or
    weights never uses the ignore value as an index."""
    valid = target != ignore_index
    return valid, torch.where(valid, target, 0)


def _cannot_inspect_data() -> bool:
    """Whether a value of the data cannot steer the computation (a torch.compile or jit trace records no
    host-side branch on it)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _checked_class_targets(target: Tensor, num_classes: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """_valid_and_safe_targets of all rows, once every target is known to be a class index or ignore_index.
    The safe targets' range settles that in one pass; only when it fails does the full check run, which
    raises naming the bad value (and which is also what a compiled graph or a trace records)."""
    valid, safe_target = _valid_and_safe_targets(target, ignore_index)
    if _cannot_inspect_data() or safe_target.numel() == 0:
        _validation.check_target_values(target, num_classes, ignore_index)
    else:
        low, high = torch.aminmax(safe_target)
        if bool((low < 0) | (high >= num_classes)):
            _validation.check_target_values(target, num_classes, ignore_index)
    return valid, safe_target


def _take_targets(matrix: Tensor, safe_target: Tensor, out: Tensor) -> Tensor:
    """Each row's entry at its target, of a (rows, K) matrix, into `out` (flat, one per row): a gather along dim 1,
    which takes half the time of forming flat offsets and a take at 10 classes, and 0.55-0.75x at 1000."""
    index = safe_target.unsqueeze(1)
    if _cannot_inspect_data():  # gather's out= variant fails to trace with symbolic (dynamic) shapes
        return out.copy_(torch.gather(matrix, 1, index).squeeze(1))
    return torch.gather(matrix, 1, index, out=out.unsqueeze(1)).squeeze(1)


def _target_weights(safe_target: Tensor, weight: Tensor | None, dtype: torch.dtype) -> Tensor:
    if weight is None:
        return torch.ones(safe_target.shape, dtype=dtype, device=safe_target.device)
    return weight[safe_target]


def row_weights(input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int,
                dtype: torch.dtype) -> Tensor:
    """Each row's weight in the mean (row-shaped): w[y] (1 without weights) for class indices, 0 for ignored
    rows; 1 for probability targets."""
    if _is_probability_target(input, target):
        return torch.ones_like(target.select(_class_dim(input), 0), dtype=dtype)
    valid, safe_target = _valid_and_safe_targets(target.to(torch.int64), ignore_index)
    w = _target_weights(safe_target, None if weight is None else weight.to(dtype), dtype)
    return torch.where(valid, w, torch.zeros_like(w))


def _mean_denominator(probability: bool, target: Tensor, classes: tuple[Tensor, Tensor] | None,
                      weight: Tensor | None, dtype: torch.dtype) -> Tensor | int:
    """What 'mean' divides by: the number of rows for probability targets; otherwise the sum of w[y]
    over valid rows (their count without weights; `classes` is (valid, safe_target)), which is 0 when all
    rows are ignored and makes the mean NaN as in PyTorch."""
    if probability:
        return target.numel() // target.shape[-1]
    valid, safe_target = classes
    if weight is None:  # counted exactly, without converting the N flags first (as valid.sum() would)
        return torch.count_nonzero(valid).to(dtype)
    return _sum_all(torch.where(valid, weight[safe_target], 0.0))


def _target_weights_or_none(safe_target: Tensor, weight: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """w[y] per row, or None without class weights (all 1: no per-row op needed)."""
    return None if weight is None else _target_weights(safe_target, weight, dtype)


class _ClassIndexRows(NamedTuple):
    """What the forward's chunks compute for each row of class-index targets, in per-call tensors of the row
    shape: lse, -log p_y and, only when eps > 0, sum_c w_c (-log p_c). The loss is then formed from them in
    one pass over all rows: per-row ops cost as much per call as per chunk, so they are not repeated."""
    lse: Tensor
    target_nll: Tensor
    smoothing: Tensor | None

    def of_chunk(self, index: tuple) -> "_ClassIndexRows":
        """The rows that `index` selects, as flat views (a chunk's rows are consecutive) to write into."""
        return _ClassIndexRows(*(None if rows is None else rows[index].view(-1) for rows in self))


def _class_index_loss(valid: Tensor, w_target: Tensor | None, parts: _ClassIndexRows, eps: float,
                      num_classes: int) -> tuple[Tensor, Tensor]:
    """(loss, lse) of all rows, 0 for ignored ones, from their `parts`.

    loss = (1-eps) w_y (lse - z_y) + (eps/K) sum_c w_c (lse - z_c), with lse - z_c = -log p_c: summed as such
    it has no cancellation (unlike S - K lse) and no underflow (it is not log(softmax))."""
    loss = parts.target_nll.mul_(1.0 - eps)  # in place: the parts are this call's own
    if w_target is not None:
        loss = loss.mul_(w_target)
    # eps == 0 skips the smoothing term, as PyTorch does: it would turn a -inf logit into NaN.
    if parts.smoothing is not None:
        loss = loss.add_(parts.smoothing, alpha=eps / num_classes)
    zero = loss.new_zeros(())
    return torch.where(valid, loss, zero, out=loss), torch.where(valid, parts.lse, zero, out=parts.lse)


def _class_index_chunk_forward(logits: Tensor, safe_target: Tensor, weight: Tensor | None,
                               weight_total: Tensor | float, scratch: Tensor, buffers: _ChunkBuffers,
                               parts: _ClassIndexRows) -> None:
    """Writes the chunk's `parts` from its logits as a (rows, K) matrix, shifted by each row's target logit
    (_reference_exp2.target_pivot_parts): one multiply-add pass, an exp2 and the sums, where PyTorch's fused
    log_softmax would also take a max pass and write the log-probabilities (its exp is no faster than exp2). Rows
    whose lse comes out non-finite are recomputed after the chunks (_redo_nonfinite_rows); where the data cannot
    be looked at (a trace or a compile of this function), none can be, and _log_softmax_rows computes every row."""
    if _cannot_inspect_data():
        _log_softmax_rows(logits, safe_target, weight, scratch, parts)
        return
    target_logit = _take_targets(logits, safe_target, parts.lse)
    offset = torch.mul(target_logit, -_exp2.LOG2E, out=parts.target_nll)  # free until the sums fill it
    exponent = _exp2.exponents(logits, offset.unsqueeze(1), scratch)
    _exp2.target_pivot_parts(exponent, target_logit, weight, weight_total, _sum_rows,
                             _weighted_scratch(weight, parts, buffers, exponent.shape), parts)


def _log_softmax_rows(logits: Tensor, safe_target: Tensor, weight: Tensor | None, scratch: Tensor,
                      parts: _ClassIndexRows) -> None:
    """The chunk's `parts` through PyTorch's fused log_softmax, shifted by the row max: finite wherever the
    row's logits are (and NaN or -inf where PyTorch's are), whatever the target logit."""
    log_probs, lse = _log_softmax_and_lse(logits, scratch)
    parts.lse.copy_(lse)
    _take_targets(log_probs, safe_target, parts.target_nll).neg_()
    if parts.smoothing is not None:
        parts.smoothing.copy_(_weighted_row_sums(log_probs, weight)).neg_()


def _redo_nonfinite_rows(parts: _ClassIndexRows, valid: Tensor, safe_target: Tensor, class_last: Tensor,
                         weight: Tensor | None, softcap: float | None, dtype: torch.dtype) -> None:
    """Recomputes, through _log_softmax_rows, the parts of the valid rows whose lse from the target pivot is not
    finite: their values are then PyTorch's (finite where only z_y = -inf or p_y < e^-88; NaN with a +inf or NaN
    logit; an lse of -inf for a row of only -inf logits, as torch.logsumexp and the kernels give). Such rows are
    rare (a masked target, or a loss above 88), so one sum over all rows' lse (finite unless one is not) tells
    whether to look for them, and they are taken out of the logits by index."""
    if _cannot_inspect_data() or math.isfinite(float(parts.lse.sum())):
        return
    redo = valid & ~torch.isfinite(parts.lse)
    if not bool(redo.any()):
        return
    logits = class_last[redo].to(dtype)
    if softcap is not None:
        logits = _softcapped(logits, softcap, logits)
    redone = _ClassIndexRows(*(None if rows is None else torch.empty_like(rows[redo]) for rows in parts))
    _log_softmax_rows(logits, safe_target[redo], weight, torch.empty_like(logits), redone)
    for rows, values in zip(parts, redone):
        if rows is not None:
            rows[redo] = values


def _weighted_scratch(weight: Tensor | None, parts: _ClassIndexRows, buffers: _ChunkBuffers,
                      shape: torch.Size) -> Tensor | None:
    """The buffer matrix that _reference_exp2.target_pivot_parts weights the exponents in: only with class
    weights and smoothing."""
    return None if weight is None or parts.smoothing is None else buffers.matrix("weighted", *shape)


def _weight_total(weight: Tensor | None, num_classes: int) -> Tensor | float:
    return float(num_classes) if weight is None else _sum_all(weight)


def _class_index_chunk_forward_class_major(block: Tensor, safe_target: Tensor, weight: Tensor | None,
                                           weight_total: Tensor | float, softcap: float | None,
                                           buffers: _ChunkBuffers, parts: _ClassIndexRows) -> None:
    """Writes the chunk's `parts` from its class-last logits, processed class-major (_reference_class_major.py):
    read straight from the block, transposing, where it needs neither converting nor capping first."""
    num_classes, rows = block.shape[-1], block.numel() // block.shape[-1]
    if softcap is None and block.dtype == buffers.dtype:
        logits, out = block.movedim(-1, 0), buffers.matrix("logits", num_classes, rows)
    else:
        logits = out = _class_major_rows(block, softcap, buffers)
    _class_major.forward_parts(logits, out, safe_target, weight, weight_total,
                               _weighted_scratch(weight, parts, buffers, out.shape), parts)


def _smoothed_weighted_target(target: Tensor, weight: Tensor | None, eps: float, out: Tensor) -> Tensor:
    """w_c t'_c with t' = (1 - eps) t + eps / K, computed in `out` ((rows, K), accumulation dtype) from a
    class-last chunk of the targets in any dtype and layout (converted first, never rounded in it)."""
    out.view(target.shape).copy_(target)
    out.mul_(1.0 - eps).add_(eps / out.shape[1])
    return out if weight is None else out.mul_(weight)


def _probability_chunk_forward(logits: Tensor, target: Tensor, weight: Tensor | None, eps: float,
                               scratch: Tensor, buffers: _ChunkBuffers) -> tuple[Tensor, Tensor, Tensor]:
    # loss = -sum_c w_c t'_c log_softmax(z)_c: PyTorch's own expression, so a -inf logit with zero target
    # mass gives NaN exactly where PyTorch's does. The mass sum_c w_c t'_c is saved for the backward.
    log_probs, lse = _log_softmax_and_lse(logits, scratch)
    weighted_target = _smoothed_weighted_target(target, weight, eps, buffers.matrix("target", *logits.shape))
    mass = _sum_rows(weighted_target)
    return -_sum_rows(weighted_target.mul_(log_probs)), lse, mass


def _capped_rows(block: Tensor, num_classes: int, softcap: float | None,
                 buffers: _ChunkBuffers) -> tuple[Tensor, bool]:
    """(matrix, owned) of a chunk as the loss reads it: the logits, or softcap * tanh(z / softcap) in a buffer."""
    logits, owned = buffers.rows_of(block, num_classes)
    if softcap is None:
        return logits, owned
    return _softcapped(logits, softcap, buffers.scratch_for(logits, owned)), True


def _class_major_rows(block: Tensor, softcap: float | None, buffers: _ChunkBuffers) -> Tensor:
    """A class-last chunk as the loss reads it, transposed into a (K, rows) matrix of the call's buffer
    (_reference_class_major.py)."""
    num_classes = block.shape[-1]
    matrix = buffers.matrix("logits", num_classes, block.numel() // num_classes)
    # A trailing unit dim: copy_ from an exact 2-D transpose of its own dtype takes ATen's blocked transpose,
    # which runs on one thread (three times slower here than the parallel elementwise copy).
    matrix.view(num_classes, *block.shape[:-1], 1).copy_(block.movedim(-1, 0).unsqueeze(-1))
    return matrix if softcap is None else _softcapped(matrix, softcap, matrix)


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
                             label_smoothing: float, smoothing: int, softcap: float | None,
                             reduction: int) -> tuple[Tensor, Tensor, Tensor]:
    """Label-smoothed cross-entropy: (loss, lse, target_mass), all in the accumulation dtype."""
    _validation.check_op_arguments(input, target, weight, ignore_index, label_smoothing, smoothing, softcap,
                                   reduction)
    acc, class_dim, num_classes, class_last, row_shape, acc_weight, probability = _problem(input, target, weight)
    eps = uniform_smoothing(label_smoothing, smoothing, num_classes)
    if probability:
        target_source, classes = target.movedim(class_dim, -1), None
    else:
        target_source = target.to(torch.int64)
        classes = _checked_class_targets(target_source, num_classes, ignore_index)

    def rows_of_zeros(shape=row_shape) -> Tensor:
        return torch.zeros(shape, dtype=acc, device=input.device)

    def rows_to_fill() -> Tensor:
        return torch.empty(row_shape, dtype=acc, device=input.device)

    chunks = _row_chunks(row_shape, num_classes, input.dtype, acc)
    buffers = _call_buffers(chunks, row_shape, num_classes, acc, input.device)
    if probability:
        loss_rows, lse_rows, mass_rows = rows_of_zeros(), rows_of_zeros(), rows_of_zeros()
        for index in chunks:
            logits, owned = _capped_rows(class_last[index], num_classes, softcap, buffers)
            loss, lse, mass = _probability_chunk_forward(logits, target_source[index], acc_weight, eps,
                                                         buffers.scratch_for(logits, owned), buffers)
            for rows, values in ((loss_rows, loss), (lse_rows, lse), (mass_rows, mass)):
                rows[index].view(-1).copy_(values)
    else:
        valid, safe_target = classes
        # Every row's parts are written by its chunk, or masked as ignored (no chunks: K = 0, every row ignored).
        parts = _ClassIndexRows(rows_to_fill(), rows_to_fill(), rows_to_fill() if eps > 0 else None)
        weight_total = _weight_total(acc_weight, num_classes)
        for index in chunks:
            chunk_target = safe_target[index].reshape(-1)
            if num_classes <= CLASS_MAJOR_FORWARD_MAX_CLASSES and not _cannot_inspect_data():
                _class_index_chunk_forward_class_major(class_last[index], chunk_target, acc_weight, weight_total,
                                                       softcap, buffers, parts.of_chunk(index))
            else:
                logits, owned = _capped_rows(class_last[index], num_classes, softcap, buffers)
                _class_index_chunk_forward(logits, chunk_target, acc_weight, weight_total,
                                           buffers.scratch_for(logits, owned), buffers, parts.of_chunk(index))
        _redo_nonfinite_rows(parts, valid, safe_target, class_last, acc_weight, softcap, acc)
        loss_rows, lse_rows = _class_index_loss(valid, _target_weights_or_none(safe_target, acc_weight, acc), parts,
                                                eps, num_classes)
        mass_rows = rows_of_zeros((0,))

    if reduction == _REDUCTION_NONE:
        return loss_rows, lse_rows, mass_rows
    total = _sum_all(loss_rows)
    if reduction == _REDUCTION_MEAN:
        total = total / _mean_denominator(probability, target_source, classes, acc_weight, acc)
    return total, lse_rows, mass_rows


class _GradScales(NamedTuple):
    """Per-row constants of the class-index gradient: dL/dz_j = prob_scale * p_j - smooth_scale * w_j
    + [j = y] * target_shift (smooth_scale None when eps = 0), with p_j = exp(z_j - lse), and prob_scale * p_j
    taken as _reference_exp2.scaled_probabilities from prob_exponent and negative (_prob_exponents). Computed
    once per call for all rows (in the row shape); each chunk takes its rows with of_chunk."""
    prob_exponent: Tensor
    negative: Tensor | None
    smooth_scale: Tensor | None
    target_shift: Tensor
    safe_target: Tensor

    def of_chunk(self, index: tuple) -> "_GradScales":
        """The scales of the rows that `index` selects, flat."""
        return _GradScales(*(_chunk_rows(rows, index) for rows in self))


def _chunk_rows(rows: Tensor | None, index: tuple) -> Tensor | None:
    """The values of the rows that `index` selects from per-row values (in the row shape), flat."""
    return None if rows is None else rows[index].reshape(-1)


def _class_index_grad_scales(lse: Tensor, grad_lse: Tensor | None, valid: Tensor, safe_target: Tensor,
                             upstream: Tensor, weight: Tensor | None, eps: float, num_classes: int) -> _GradScales:
    """The _GradScales of all rows, from the upstream gradient of each row (in the row shape), or one for all rows
    (0-d: 'sum' and 'mean')."""
    w_target = _target_weights_or_none(safe_target, weight, upstream.dtype)
    target_factor, smooth = 1.0 - eps, eps / num_classes
    smooth_mass = smooth * _weight_total(weight, num_classes)
    # Ignored rows get all-zero scales (their upstream may be inf: a mean over zero rows) and p = exp(z - inf)
    # = 0, so their gradient is zero without a pass of its own.
    lse = torch.where(valid, lse, math.inf)
    # The usual case, one finite upstream value and neither class weights nor an lse gradient, gives every valid
    # row the same scale of p: its exponent offsets take one pass over the rows instead of a log2 and a sign check
    # (at 10 classes, those cost as much as a pass over the logits).
    upstream_value = _one_finite_value(upstream) if w_target is None and grad_lse is None else None
    uniform = upstream_value is not None
    upstream_rows = valid.to(upstream.dtype).mul_(upstream) if uniform else torch.where(valid, upstream, 0.0)
    prob_factor = target_factor + smooth_mass  # of the upstream gradient, without class weights
    if w_target is None:
        target_shift = upstream_rows * -target_factor
        prob_scale = (upstream if uniform else upstream_rows) * prob_factor
    else:
        target_weight = target_factor * w_target
        target_shift = (upstream_rows * target_weight).neg_()
        prob_scale = upstream_rows * (target_weight + smooth_mass)
    # A gradient reaching lse (z-loss, a returned lse) adds grad_lse * p_j, since d lse / d z_j = p_j.
    if grad_lse is not None:
        prob_scale = prob_scale + torch.where(valid, grad_lse, 0.0)
    if uniform:  # the sign is the host value's: no second read of the data
        prob_exponent = _exp2.scale_exponents(prob_scale, lse)
        negative = valid if upstream_value * prob_factor < 0 else None
    else:
        prob_exponent, negative = _prob_exponents(prob_scale, lse)
    return _GradScales(prob_exponent, negative, None if eps == 0 else upstream_rows * smooth, target_shift,
                       safe_target)


def _one_finite_value(upstream: Tensor) -> float | None:
    """`upstream`'s value where it is one value (0-d), finite, and the data can be looked at; else None."""
    if upstream.dim() != 0 or _cannot_inspect_data():
        return None
    value = float(upstream)
    return value if math.isfinite(value) else None


def _prob_exponents(prob_scale: Tensor, lse: Tensor) -> tuple[Tensor, Tensor | None]:
    """For per-row scales of p: the exponent offsets of _reference_exp2.scale_exponents, and the rows whose scale
    is negative (an upstream gradient < 0), or None where none is: the sign then costs no pass. Where the data
    cannot be looked at, the mask is always kept."""
    negative = prob_scale < 0
    if not _cannot_inspect_data() and not bool(negative.any()):
        negative = None
    return _exp2.scale_exponents(prob_scale, lse), negative


def _row_scaled_probabilities(logits: Tensor, prob_exponent: Tensor, negative: Tensor | None,
                              out: Tensor) -> Tensor:
    """prob_scale * p of a (rows, K) chunk into `out`, from the chunk's per-row results of _prob_exponents."""
    return _exp2.scaled_probabilities(logits, prob_exponent.unsqueeze(1),
                                      None if negative is None else negative.unsqueeze(1), out)


def _class_index_chunk_backward(logits: Tensor, scales: _GradScales, weight: Tensor | None, out: Tensor) -> Tensor:
    """The gradient of a (rows, K) chunk, computed in place in `out` (a matrix with exp2_'s spare room after it,
    which `logits` may be)."""
    grad = _row_scaled_probabilities(logits, scales.prob_exponent, scales.negative, out)
    if scales.smooth_scale is not None and weight is None:
        grad.sub_(scales.smooth_scale.unsqueeze(1))
    elif scales.smooth_scale is not None:
        grad.addcmul_(scales.smooth_scale.unsqueeze(1), weight, value=-1.0)
    return grad.scatter_add_(1, scales.safe_target.unsqueeze(1), scales.target_shift.unsqueeze(1))


def _class_index_chunk_backward_class_major(block: Tensor, scales: _GradScales, weight: Tensor | None,
                                            softcap: float | None, buffers: _ChunkBuffers, out: Tensor) -> None:
    """The gradient of a chunk of few classes (_reference_class_major.py) into `out`, its class-last slice."""
    num_classes, rows = block.shape[-1], block.numel() // block.shape[-1]
    if softcap is None and block.dtype == buffers.dtype:  # read straight from the block, transposing
        probs = _class_major.scaled_probabilities(block, None, scales.prob_exponent, scales.negative,
                                                  buffers.matrix("logits", num_classes, rows))
        derivative = None
    elif softcap is None:  # converted into the buffer first, then overwritten by p
        logits = _class_major_rows(block, None, buffers)
        probs = _class_major.scaled_probabilities(block, logits, scales.prob_exponent, scales.negative, logits)
        derivative = None
    else:  # the capped logits live on for the chain rule through the tanh
        logits = _class_major_rows(block, softcap, buffers)
        probs = _class_major.scaled_probabilities(block, logits, scales.prob_exponent, scales.negative,
                                                  buffers.matrix("probs", num_classes, rows))
        derivative = _softcap_derivative(logits, softcap)
    _class_major.write_gradient(probs, scales.smooth_scale, scales.target_shift,
                                scales.safe_target, weight, derivative, out)


def _softcap_derivative(capped: Tensor, softcap: float) -> Tensor:
    """d(c tanh(z / c)) / dz = 1 - tanh^2(z / c) = (1 - t)(1 + t) with t = z' / c, from the capped logits z'
    (overwritten; no cancellation where the tanh saturates)."""
    t = capped.div_(softcap)
    return torch.rsub(t, 1.0).mul_(t.add_(1.0))


def _probability_chunk_backward(logits: Tensor, prob_exponent: Tensor, negative: Tensor | None, target: Tensor,
                                upstream: Tensor, weight: Tensor | None, eps: float, out: Tensor,
                                buffers: _ChunkBuffers) -> Tensor:
    """dL/dz_j = (g * mass + grad_lse) * p_j - g * w_j t'_j, computed in place in `out` (a matrix with exp2_'s
    spare room after it, which `logits` may be), the first term from its per-row exponents
    (_reference_exp2.scale_exponents)."""
    weighted_target = _smoothed_weighted_target(target, weight, eps, buffers.matrix("target", *logits.shape))
    probs = _row_scaled_probabilities(logits, prob_exponent, negative, out)
    return probs.addcmul_(weighted_target, upstream.unsqueeze(1), value=-1.0)


def ls_cross_entropy_backward(grad_loss: Tensor, grad_lse: Tensor | None, input: Tensor, target: Tensor,
                              weight: Tensor | None, lse: Tensor, target_mass: Tensor, ignore_index: int,
                              label_smoothing: float, smoothing: int, softcap: float | None,
                              reduction: int) -> Tensor:
    """Gradient of ls_cross_entropy_forward's loss (and of its lse, by grad_lse) with respect to input: input's
    shape and dtype, contiguous. Trusts the target values (the forward checked them)."""
    _validation.check_op_arguments(input, target, weight, ignore_index, label_smoothing, smoothing, softcap,
                                   reduction)
    acc, class_dim, num_classes, class_last, row_shape, acc_weight, probability = _problem(input, target, weight)
    eps = uniform_smoothing(label_smoothing, smoothing, num_classes)
    target_source = target.movedim(class_dim, -1) if probability else target.to(torch.int64)
    classes = None if probability else _valid_and_safe_targets(target_source, ignore_index)
    # The upstream gradient of every row: grad_loss itself for 'none', one value for 'sum' and 'mean'.
    upstream = grad_loss.to(acc)
    if reduction == _REDUCTION_MEAN:
        upstream = upstream / _mean_denominator(probability, target_source, classes, acc_weight, acc)
    upstream_rows = upstream.expand(row_shape)
    acc_lse = lse.to(acc)
    acc_grad_lse = None if grad_lse is None else grad_lse.to(acc).expand(row_shape)

    chunks = _row_chunks(row_shape, num_classes, input.dtype, acc)
    buffers = _call_buffers(chunks, row_shape, num_classes, acc, input.device)
    # With exp2_'s spare room, the chunks of the gradient take the exponentials in place where they are plain
    # matrices of the accumulation dtype: no scratch buffer, whose fresh pages cost more than the pass at 10 classes.
    grad_input = torch.empty(input.numel() + buffers.spare_room, dtype=input.dtype,
                             device=input.device)[: input.numel()].view(input.shape)
    grad_class_last = grad_input.movedim(class_dim, -1)
    class_major = not probability and num_classes <= CLASS_MAJOR_BACKWARD_MAX_CLASSES
    if probability:  # dL/dz_j = (g * mass + grad_lse) * p_j - g * w_j t'_j
        prob_scale = upstream_rows * target_mass
        prob_scale = prob_scale if acc_grad_lse is None else prob_scale + acc_grad_lse
        prob_exponent, negative = _prob_exponents(prob_scale, acc_lse)
    else:
        all_scales = _class_index_grad_scales(acc_lse, acc_grad_lse, *classes, upstream, acc_weight, eps,
                                              num_classes)
    for index in chunks:
        chunk_out = grad_class_last[index]
        scales = None if probability else all_scales.of_chunk(index)
        if class_major:
            _class_index_chunk_backward_class_major(class_last[index], scales, acc_weight, softcap, buffers, chunk_out)
            continue
        logits, owned = _capped_rows(class_last[index], num_classes, softcap, buffers)
        # The passes run in the gradient itself where the chunk of it is a plain matrix of the accumulation dtype;
        # otherwise in a buffer, and one copy converts (an op writing into another dtype would allocate a temporary
        # of its own). With softcap the capped logits must survive until the chain rule through the tanh, so the
        # probabilities get a buffer of their own.
        direct = chunk_out.is_contiguous() and chunk_out.dtype == acc
        if softcap is not None:
            out = buffers.matrix("probs", *logits.shape)
        else:
            out = chunk_out.view(logits.shape) if direct else buffers.scratch_for(logits, owned)
        if probability:
            grad = _probability_chunk_backward(logits, _chunk_rows(prob_exponent, index), _chunk_rows(negative, index),
                                               target_source[index], _chunk_rows(upstream_rows, index), acc_weight,
                                               eps, out, buffers)
        else:
            grad = _class_index_chunk_backward(logits, scales, acc_weight, out)
        if softcap is not None:
            grad = torch.mul(grad, _softcap_derivative(logits, softcap),
                             out=chunk_out.view(logits.shape) if direct else grad)
        if not direct:
            chunk_out.copy_(grad.view(chunk_out.shape))
    return grad_input
