"""The fallback's path for class-index rows of few classes: a chunk processed class-major.

With K classes per row and K small (10 for CIFAR, 21 for VOC segmentation), every reduction along a row
is a loop of K elements that no SIMD unit fills, and those loops are most of what the row-major path
costs there. reference.py hands such a chunk over as a (K, rows) matrix instead, and every pass then runs
across rows, vectorized: the sums are reductions over dim 0, the rest elementwise ops that broadcast one value
per row. Both directions fuse the transposition into their first elementwise op (reading the chunk into the
call's buffer), and the backward also into its last (writing the gradient), except where the logits need
converting or capping first: they are then copied transposed into the buffer.

At K classes a chunk holds K times fewer rows than logits, so the per-row work is a large share of the
total: the forward writes each row's parts straight into the call's per-row tensors, the backward gets its
per-row scales computed once per call, and each pass here is one op.

The exponentials go through _reference_exp2.py, and the forward shifts each row by its target logit, as the
row-major forward does (_reference_exp2.target_pivot_parts).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _reference_exp2 as _exp2


def forward_parts(logits: Tensor, out: Tensor, safe_target: Tensor, weight: Tensor | None,
                  weight_total: Tensor | float, weighted: Tensor | None, parts) -> None:
    """Writes each row's lse, -log p_y and, where parts.smoothing is given, sum_c w_c (-log p_c) into
    `parts` (the chunk's flat views of the call's per-row results), through _reference_exp2.target_pivot_parts,
    from the chunk's logits as a (K, *rows) tensor of any strides (the class-last chunk with its class dim moved
    first: its first pass then transposes it on the way), or as the (K, rows) matrix `out` itself. `out`, a
    buffer's (K, rows) matrix, is overwritten; `weighted`, one of its shape, is needed only with weights and
    smoothing."""
    # z_y of each row: a gather along dim 0 takes half the time of forming flat offsets and a take (the
    # offsets' arange and int64 add over the rows cost more than the take itself).
    row_shape = (1, *logits.shape[1:])
    target_logit = torch.gather(logits, 0, safe_target.view(row_shape), out=parts.lse.view(row_shape))
    offset = torch.mul(target_logit, -_exp2.LOG2E, out=parts.target_nll.view(row_shape))  # free until the sums
    exponent = _exp2.exponents(logits, offset, out.view(logits.shape))
    _exp2.target_pivot_parts(exponent.view(out.shape), target_logit, None if weight is None else weight.unsqueeze(1),
                             weight_total, lambda values, sums: torch.sum(values, 0, out=sums), weighted, parts)


def scaled_probabilities(block: Tensor, logits: Tensor | None, prob_exponent: Tensor, negative: Tensor | None,
                         out: Tensor) -> Tensor:
    """prob_scale p = prob_scale exp(z - lse) of a chunk as a (K, rows) matrix in `out` (which may be
    `logits`), from the per-row exponents and signs of _reference_exp2: from `logits`, the chunk already in
    class-major form (capped), or else read straight from the class-last `block` (of out's dtype)."""
    source = block.movedim(-1, 0) if logits is None else logits.view(-1, *block.shape[:-1])
    rows = block.shape[:-1]
    return _exp2.scaled_probabilities(source, prob_exponent.view(rows), None if negative is None else
                                      negative.view(rows), out.view(source.shape)).view(out.shape)


def write_gradient(probs: Tensor, smooth_scale: Tensor | None, target_shift: Tensor, safe_target: Tensor,
                   weight: Tensor | None, derivative: Tensor | None, out: Tensor) -> None:
    """Writes prob_scale p_c - smooth_scale w_c + [c = y] target_shift (one scale per row; smooth_scale None
    when eps = 0), times `derivative` (softcap's chain rule) when given, into `out`, the chunk's class-last
    slice of the gradient. `probs` ((K, rows), prob_scale p) is overwritten; the last op writes into `out`
    directly when it has probs' dtype (transposing on the way), else one copy converts."""
    rows = out.shape[:-1]
    grad = probs.scatter_add_(0, safe_target.unsqueeze(0), target_shift.unsqueeze(0))
    grad = grad.view(-1, *rows)
    destination = out.movedim(-1, 0)
    direct = destination if out.dtype == probs.dtype else None
    if smooth_scale is not None:
        last = None if derivative is not None else direct
        if weight is None:
            grad = torch.sub(grad, smooth_scale.view(rows), out=grad if last is None else last)
        else:
            grad = torch.addcmul(grad, weight.view(-1, *(1,) * len(rows)), smooth_scale.view(rows), value=-1.0,
                                 out=grad if last is None else last)
    if derivative is not None:
        grad = torch.mul(grad, derivative.view(grad.shape), out=grad if direct is None else direct)
    if grad is not direct:
        destination.copy_(grad)
