"""Gradients of the loss with respect to the class weights and to probability targets, for every backend.

PyTorch's own cross-entropy cannot take the weight gradient (nll_loss is not differentiable in `weight`).
Both are needed rarely, so they are computed in PyTorch from the saved lse, chunk by chunk like the
reference, instead of in the kernels.

Notation: l_rc = lse_r - z_rc (z capped by softcap where asked), q the smoothed target,
u_r the upstream gradient of row r's loss. Every row loss is sum_c w_c q_rc l_rc, so

    d sum_r u_r loss_r / d w_c = A_c = sum_r u_r q_rc l_rc                    (over valid rows)

and 'mean', L = S / D with S = sum_r loss_r = w . A (unit u) and D = sum_r w_{y_r} (class indices), adds
the denominator's part: dL/dw_c = (A_c - L * count_c) / D, count_c = number of valid rows with y_r = c.
For class indices, with eps the uniform-convention smoothing,
    A_c = (1 - eps) sum_{r: y_r = c} u_r l_{r, y_r} + (eps / K) (sum_r u_r lse_r - sum_r u_r z_rc).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference

_REDUCTION_NONE, _REDUCTION_MEAN = 0, 1


def _row_upstream(grad_loss: Tensor, row_shape, acc: torch.dtype, reduction: int) -> Tensor:
    """u_r: grad_loss for 'none', else 1 (the scalar upstream is applied at the end)."""
    if reduction == _REDUCTION_NONE:
        return grad_loss.to(acc)
    return torch.ones(row_shape, dtype=acc, device=grad_loss.device)


def _class_sums(input, target, lse, weights_of_rows, softcap, acc, probability, eps):
    """A_c (see the module comment) with u already folded into weights_of_rows, chunk by chunk."""
    class_dim = 0 if input.dim() == 1 else 1
    num_classes = input.shape[class_dim]
    class_last = input.movedim(class_dim, -1)
    row_shape = class_last.shape[:-1]
    target_last = target.movedim(class_dim, -1) if probability else target
    chunks = reference._row_chunks(row_shape, num_classes, input.dtype, acc)
    buffers = reference._call_buffers(chunks, row_shape, num_classes, acc, input.device)
    total = torch.zeros(num_classes, dtype=acc, device=input.device)
    for index in chunks:
        logits, _ = reference._capped_rows(class_last[index], num_classes, softcap, buffers)
        u = weights_of_rows[index].reshape(-1)
        chunk_lse = lse[index].reshape(-1)
        if probability:
            smoothed = reference._smoothed_weighted_target(target_last[index], None, eps,
                                                           buffers.matrix("target", *logits.shape))
            # sum_r u_r t'_rc (lse_r - z_rc)
            total += (smoothed * (chunk_lse.unsqueeze(1) - logits)).T @ u
        else:
            # the eps / K part; the (1 - eps) part is added per target below
            total += (eps / num_classes) * ((u * chunk_lse).sum() - logits.T @ u)
    return total


def class_weight_gradient(grad_loss: Tensor, input: Tensor, target: Tensor, weight: Tensor, lse: Tensor,
                          ignore_index: int, label_smoothing: float, smoothing: int, softcap: float | None,
                          reduction: int) -> Tensor:
    """d loss / d weight (weight's shape and dtype)."""
    acc = lse.dtype
    class_dim = 0 if input.dim() == 1 else 1
    num_classes = input.shape[class_dim]
    probability = target.shape == input.shape and target.is_floating_point()
    eps = reference.uniform_smoothing(label_smoothing, smoothing, num_classes)
    u = _row_upstream(grad_loss, lse.shape, acc, reduction)
    acc_weight = weight.to(acc)
    if probability:
        total = _class_sums(input, target, lse, u, softcap, acc, True, eps)
        if reduction == _REDUCTION_MEAN:
            total = total / max(lse.numel(), 1)
    else:
        rows_target = target.to(torch.int64)
        valid = rows_target != ignore_index
        safe = torch.where(valid, rows_target, torch.zeros_like(rows_target))
        u_valid = torch.where(valid, u, torch.zeros_like(u))
        total = _class_sums(input, target, lse, u_valid, softcap, acc, False, eps)
        # (1 - eps) * u_r * (lse_r - z_{r, y_r}) onto class y_r
        z_target = input.gather(class_dim, safe.unsqueeze(class_dim)).squeeze(class_dim).to(acc)
        if softcap is not None:
            z_target = torch.tanh(z_target / softcap) * softcap
        per_target = torch.where(valid, (1.0 - eps) * u_valid * (lse - z_target), torch.zeros_like(u_valid))
        safe, valid = safe.reshape(-1), valid.reshape(-1)
        total = total.index_add(0, safe, per_target.reshape(-1))
        if reduction == _REDUCTION_MEAN:
            counts = torch.zeros(num_classes, dtype=acc, device=input.device).index_add(0, safe, valid.to(acc))
            denominator = (counts * acc_weight).sum()
            mean = (acc_weight * total).sum() / denominator
            total = (total - mean * counts) / denominator
    if reduction != _REDUCTION_NONE:
        total = total * grad_loss.to(acc)
    return total.to(weight.dtype)


def probability_target_gradient(grad_loss: Tensor, input: Tensor, weight: Tensor | None, lse: Tensor,
                                label_smoothing: float, softcap: float | None, reduction: int) -> Tensor:
    """d loss / d target for class-probability targets: u_r (1 - eps) w_c (lse_r - z_rc) (input-shaped)."""
    class_dim = 0 if input.dim() == 1 else 1
    acc = lse.dtype
    if reduction == _REDUCTION_NONE:
        g = grad_loss.to(acc).unsqueeze(class_dim)
    elif reduction == _REDUCTION_MEAN:
        g = grad_loss.to(acc) / lse.numel()
    else:
        g = grad_loss.to(acc)
    logits = input.to(acc)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    grad = (lse.unsqueeze(class_dim) - logits) * (g * (1.0 - label_smoothing))
    if weight is not None:
        shape = [1] * input.dim()
        shape[class_dim] = -1
        grad = grad * weight.to(acc).view(shape)
    return grad
