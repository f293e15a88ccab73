"""The fallback's exponentials, through ATen's exp2.

exp(x) = 2^(x log2(e)). On CPU, ATen's exp2 takes about 60% of the time of its exp (both vectorized and
within an ulp), and the multiplication by log2(e) needs no pass of its own: it fuses with the shift of the
logits by one value per row (the target logit, or lse minus the log of the gradient's scale), which the fallback
makes anyway, into one multiply-add, z log2(e) + offset. The exponent is formed from z rather than from a
difference, so it carries a rounding error of about u |z| (u: the accumulation dtype's unit roundoff):
the lse's error bound counts u max|z| already (tests/conftest.py), as subtracting a pivot rounds that much.

The same bits for any thread count: ATen's CPU exp2 (unlike its exp) computes each thread's range of elements
two vectors at a time and the rest of the range with the C library's exp2, whose last bit can differ from the
vector one's, so which elements take the scalar path would depend on where the threads' ranges split. Each
thread gets ceil(n / threads) elements (of a contiguous tensor, once it holds more than ATen's grain of 32768),
so exp2_ runs over padded_length(n) >= n elements, a length that splits into whole blocks of two of the
widest vectors: no element takes the scalar path. The padding lies in the spare room of the call's buffers,
and of the gradient, which are allocated with it (reference._ChunkBuffers).

The same helpers serve both directions of the row-major path (reference.py), whose per-row values broadcast as
(rows, 1), and of the class-major path (_reference_class_major.py), as (rows,) over a (K, rows) chunk.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOG2E = 1.4426950408889634

# Elements per vector block: two AVX-512 vectors of fp32 are 32, so 64 covers every x86 and Arm vector width.
_VECTOR_BLOCK = 64
# ATen's grain for elementwise ops (at::internal::GRAIN_SIZE): below it one thread runs the whole range.
_ATEN_GRAIN = 32768


def padded_length(n: int) -> int:
    """The length >= n, a multiple of _VECTOR_BLOCK, whose every thread's range is too, with the threads that
    ATen uses for it now (at most torch.get_num_threads(), one per grain)."""
    length = -(-n // _VECTOR_BLOCK) * _VECTOR_BLOCK
    while True:
        threads = min(torch.get_num_threads(), max(1, -(-length // _ATEN_GRAIN)))
        if length % (threads * _VECTOR_BLOCK) == 0:
            return length
        length = -(-length // (threads * _VECTOR_BLOCK)) * (threads * _VECTOR_BLOCK)


def exp2_(values: Tensor) -> Tensor:
    """2^values in place, for a contiguous matrix followed in its storage by at least padded_length(numel) - numel
    elements that may be overwritten: a buffer's spare room, or the next chunk of a tensor whose chunks take exp2_
    in order (reference._ChunkBuffers.spare_room)."""
    length = padded_length(values.numel()) if values.device.type == "cpu" else values.numel()
    torch.as_strided(values, (length,), (1,)).exp2_()
    return values


def exponents(logits: Tensor, offset: Tensor, out: Tensor) -> Tensor:
    """z log2(e) + offset (one value per row, broadcasting over the logits) into `out`, in one pass."""
    return torch.add(offset, logits, alpha=LOG2E, out=out)


def scale_exponents(prob_scale: Tensor, lse: Tensor) -> Tensor:
    """For per-row scales s of p_j = exp(z_j - lse): the offsets log2|s| - lse log2(e), with which
    2^(z_j log2(e) + offset) = |s| p_j. A zero scale gives 2^-inf = 0: an ignored row (lse = inf) gets a zero
    gradient without a pass of its own. One scale (0-d) serves every row alike."""
    return torch.sub(torch.log2(prob_scale.abs()), lse, alpha=LOG2E)


def scaled_probabilities(logits: Tensor, offsets: Tensor, negative: Tensor | None, out: Tensor) -> Tensor:
    """s p_j = s exp(z_j - lse) into `out` (a buffer's matrix, see exp2_; it may be `logits`), from
    scale_exponents' per-row `offsets` and the rows whose s < 0 (`negative`, None where no row's is), both
    shaped to broadcast over the logits: one multiply-add pass and an exp2, and a sign pass only where some
    scale is negative."""
    scaled = exp2_(exponents(logits, offsets, out))
    return scaled if negative is None else scaled.mul_(torch.where(negative, -1.0, 1.0))


def target_pivot_parts(exponent: Tensor, target_logit: Tensor, weight: Tensor | None,
                       weight_total: Tensor | float, sum_over_classes, weighted: Tensor | None, parts) -> None:
    """The forward's per-row parts of class-index rows, from `exponent` = (z - z_y) log2(e): the logits shifted by
    each row's target logit z_y (`target_logit`, per row; it may be parts.lse itself), through exponents() into a
    buffer's matrix (see exp2_), which is overwritten.

    With L = log sum_c exp(z_c - z_y): -log p_y = L, lse = z_y + L and sum_c w_c (-log p_c) = W L - sum_c w_c
    (z_c - z_y). Writes L into parts.target_nll, z_y + L into parts.lse and, where parts.smoothing is given, the
    last into it (W: weight_total), through an exp2 and the sums over classes (sum_over_classes(values, out): over
    exponent's class dim, into out). `weighted`, a matrix of exponent's shape, is needed only with class weights
    (`weight`, shaped to broadcast) and smoothing.

    The target term is 2^0 = 1, so the sum never underflows, and no max pass is needed. It overflows only where
    some z_c - z_y > 88 (p_y < e^-88), and is not finite with a +inf or NaN logit or z_y = -inf: the caller
    recomputes rows whose lse is not finite. W L - sum_c w_c (z_c - z_y) can cancel only as far as z_y lies below
    the other logits, to an error of about u max|z| per class, which the loss's error bound counts already."""
    # Every per-row result goes straight into parts (at 10 classes, a fresh per-row tensor weighs as much as a tenth
    # of the logits).
    if parts.smoothing is not None:
        shifted = exponent if weight is None else torch.mul(exponent, weight, out=weighted)
        sum_over_classes(shifted, parts.smoothing)  # sum_c w_c (z_c - z_y) log2(e)
    log_sum = sum_over_classes(exp2_(exponent), parts.target_nll).log_()
    torch.add(target_logit.view(log_sum.shape), log_sum, out=parts.lse)
    if parts.smoothing is not None:
        parts.smoothing.mul_(-1.0 / LOG2E).addcmul_(log_sum, torch.as_tensor(weight_total, dtype=log_sum.dtype))
