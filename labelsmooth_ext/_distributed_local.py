"""The rank-local parts of the vocabulary-parallel loss: no collective here, so all of it compiles.

Rank r holds the logits of classes [start_r, start_r + V_r). Per row it computes, with the existing ops,

    lse_r   log-sum-exp of its (capped) logits
    D_r     sum_c w_c (lse_r - z_c) over its classes (>= 0, no cancellation)
    a_r     w_y (lse_r - z_y) if it owns the target y, else 0
    b_r     w_y if it owns the target, else 0 (sent only with class weights: without them every rank knows it)

and one all-gather hands every rank all of them. With lse = logsumexp_r lse_r (the global one),

    sum_c w_c (lse - z_c) = sum_r [ W_r (lse - lse_r) + D_r ]          (W_r = sum of rank r's weights)
    w_y (lse - z_y)       = sum_r [ b_r (lse - lse_r) + a_r ]          (one nonzero term: the owner's)

which are the two terms of the row loss (DESIGN.md section 2). Every rank merges the same gathered numbers in
rank order, so every rank gets the same bits.

D_r is the forward op's row loss with label_smoothing = 1 (then it is D_r / V_r, the target term vanishes),
called with a target of local class 0 on valid rows and the op's own ignore index on ignored ones, so that no
user ignore_index can collide with a local class.
"""

import torch

from . import reference
from ._registration import REDUCTION_MEAN, REDUCTION_NONE

_OPS = torch.ops.labelsmooth
# The ops' ignore index for the local calls: valid rows point at local class 0, ignored rows at this.
_LOCAL_IGNORE = -1
_UNIFORM = 0


def local_targets(target, ignore_index, vocab_start, local_classes):
    """valid (row not ignored), owned (valid and its target is one of this rank's classes), the target's local
    index where owned (0 elsewhere: safe to gather), and the ops' target (0 on valid rows, -1 on ignored)."""
    target = target.to(torch.int64)
    valid = target != ignore_index
    local = target - vocab_start
    owned = valid & (local >= 0) & (local < local_classes)
    safe_local = torch.where(owned, local, torch.zeros_like(local))
    op_target = torch.where(valid, torch.zeros_like(target), torch.full_like(target, _LOCAL_IGNORE))
    return valid, owned, safe_local, op_target


def capped(values, softcap):
    return values if softcap is None else softcap * torch.tanh(values / softcap)


def local_partials(local_logits, target, weight, ignore_index, vocab_start, softcap):
    """The rows this rank sends, packed (rows, 3) or, with class weights, (rows + 1, 4) (columns lse_r, D_r, a_r,
    b_r; the extra last row holds W_r), in the accumulation dtype; plus what the backward needs: the capped
    target logit, owned, the target's local index and the ops' target."""
    local_classes = local_logits.shape[1]
    valid, owned, safe_local, op_target = local_targets(target, ignore_index, vocab_start, local_classes)
    spread, lse_r, _ = _OPS.ls_cross_entropy_forward(local_logits, op_target, weight, _LOCAL_IGNORE, 1.0, _UNIFORM,
                                                     softcap, REDUCTION_NONE)
    acc = lse_r.dtype
    divergence = spread * local_classes
    z_target = capped(local_logits.gather(1, safe_local.unsqueeze(1)).squeeze(1).to(acc), softcap)
    w_target = reference.row_weights(local_logits, safe_local, weight, _LOCAL_IGNORE, acc)
    zero = torch.zeros_like(lse_r)
    owned_weight = torch.where(owned, w_target, zero)
    target_term = torch.where(owned, owned_weight * (lse_r - z_target), zero)
    if weight is None:
        packed = torch.stack((lse_r, divergence, target_term), dim=1)
    else:
        rows = torch.stack((lse_r, divergence, target_term, owned_weight), dim=1)
        header = torch.cat((weight.to(acc).sum().reshape(1), zero.new_zeros(3))).unsqueeze(0)
        packed = torch.cat((rows, header))
    return packed, (z_target, owned, safe_local, op_target)


def owners(target, ignore_index, shard_starts, shard_sizes):
    """(ranks, rows) bool: rank r owns row i's target (no rank owns an ignored row)."""
    target = target.to(torch.int64).unsqueeze(0)
    starts = torch.tensor(shard_starts, device=target.device).unsqueeze(1)
    sizes = torch.tensor(shard_sizes, device=target.device).unsqueeze(1)
    return (target != ignore_index) & (target >= starts) & (target < starts + sizes)


def merge(gathered, target, ignore_index, shard_starts, shard_sizes, weighted, eps, z_loss, reduction,
          normalizer):
    """The loss from every rank's packed partials, gathered (ranks, packed rows, columns), summed in rank order.
    eps is PyTorch's (uniform) smoothing; the global class count is sum(shard_sizes). Returns the loss and what
    the backward needs: the global lse, w_y (0 on ignored rows) and W."""
    rows = target.shape[0]
    num_ranks = gathered.shape[0]
    lse_r = gathered[:, :rows, 0]
    if weighted:
        owned_weight = gathered[:, :rows, 3]
        weight_totals = gathered[:, rows, 0]
    else:
        owned_weight = owners(target, ignore_index, shard_starts, shard_sizes).to(lse_r.dtype)
        weight_totals = torch.tensor(shard_sizes, dtype=lse_r.dtype, device=lse_r.device)
    row_max = lse_r.amax(dim=0)
    exp_sum = torch.zeros_like(row_max)
    for r in range(num_ranks):
        exp_sum = exp_sum + torch.exp(lse_r[r] - row_max)
    lse = row_max + torch.log(exp_sum)
    target_term = torch.zeros_like(lse)
    spread_term = torch.zeros_like(lse)
    w_target = torch.zeros_like(lse)
    weight_total = torch.zeros_like(weight_totals[0])
    for r in range(num_ranks):
        gap = lse - lse_r[r]
        target_term = target_term + (owned_weight[r] * gap + gathered[r, :rows, 2])
        spread_term = spread_term + (weight_totals[r] * gap + gathered[r, :rows, 1])
        w_target = w_target + owned_weight[r]
        weight_total = weight_total + weight_totals[r]
    row_loss = (1.0 - eps) * target_term
    if eps > 0:  # as PyTorch: eps = 0 has no smoothing term (which a -inf logit would turn into NaN)
        row_loss = row_loss + (eps / sum(shard_sizes)) * spread_term
    if z_loss > 0:
        row_loss = row_loss + z_loss * w_target * lse.square()
    valid = target != ignore_index
    row_loss = torch.where(valid, row_loss, torch.zeros_like(row_loss))
    saved = (lse, w_target, weight_total)
    if reduction == REDUCTION_NONE:
        return row_loss, saved
    loss = row_loss.sum()
    if reduction == REDUCTION_MEAN:
        loss = loss / (w_target.sum() if normalizer is None else normalizer)
    return loss, saved


def row_gradients(grad_loss, rows, w_target, reduction, normalizer):
    """Each row's upstream gradient g (rows,) from the loss's gradient."""
    if reduction == REDUCTION_NONE:
        return grad_loss
    g = grad_loss.expand(rows)
    if reduction == REDUCTION_MEAN:
        g = g / (w_target.sum() if normalizer is None else normalizer)
    return g


def local_gradient(grad_loss, local_logits, weight, saved_forward, saved_merge, eps, num_classes, z_loss,
                   softcap, reduction, normalizer):
    """This rank's slice of the gradient, no collective:
        g [(1 - eps) w_y (p_j - [j = y]) + (eps/K)(W p_j - w_j)] + grad_lse p_j,   p_j = exp(z_j - lse)
    through the backward op with label_smoothing 1 on the local classes (it computes
    prob_scale p_j - smooth_scale w_j with prob_scale = g' W_r / V_r + grad_lse', smooth_scale = g' / V_r): with
    g' = g eps V_r / K and grad_lse' = g ((1 - eps) w_y + eps (W - W_r) / K) + grad_lse that is every term but the
    target's -g (1 - eps) w_y, subtracted afterwards on the rank that owns y (times the softcap's derivative). That
    one element per row is thus rounded to the logits' dtype twice (the op's value, then the corrected one)."""
    z_target, owned, safe_local, op_target = saved_forward
    lse, w_target, weight_total = saved_merge
    local_classes = local_logits.shape[1]
    g = row_gradients(grad_loss, lse.shape[0], w_target, reduction, normalizer)
    local_total = float(local_classes) if weight is None else weight.to(lse.dtype).sum()
    grad_lse = g * ((1.0 - eps) * w_target + (eps / num_classes) * (weight_total - local_total))
    if z_loss > 0:
        grad_lse = grad_lse + 2.0 * z_loss * w_target * lse * g
    grad = _OPS.ls_cross_entropy_backward(g * (eps * local_classes / num_classes), grad_lse, local_logits,
                                          op_target, weight, lse, lse.new_empty((0,)), _LOCAL_IGNORE, 1.0, _UNIFORM,
                                          softcap, REDUCTION_NONE)
    target_scale = g * (1.0 - eps) * w_target
    if softcap is not None:
        target_scale = target_scale * (1.0 - z_target / softcap) * (1.0 + z_target / softcap)
    row_index = torch.arange(lse.shape[0], device=grad.device)
    at_target = grad[row_index, safe_local].to(lse.dtype)
    corrected = torch.where(owned, at_target - target_scale, at_target)
    return grad.index_put_((row_index, safe_local), corrected.to(grad.dtype))  # the op's fresh output
