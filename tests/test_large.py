"""Large class counts: K = 1,000,003 (not a multiple of any SIMD width) over a few rows, and one huge
row alone (fewer rows than threads: the row itself must be split), checked in loss, lse and gradient
against float64 PyTorch with the derived tolerances."""

from __future__ import annotations

import pytest
import torch

import labelsmooth_ext
from labelsmooth_ext import reference

from conftest import (
    REDUCTION_CODES,
    assert_within,
    class_weight,
    compiled_available,
    grad_output_like,
    grad_tolerance,
    loss_tolerance,
    lse_tolerance,
    op_backward,
    op_forward,
    randn,
    reference_loss_and_grads,
)

HUGE_K = 1_000_003


def _check(impl, x, target, weight, ignore_index, reduction, eps, gen):
    row_shape = x.shape[:1] + x.shape[2:]
    grad_output = grad_output_like(row_shape if reduction == "none" else (), gen)
    if impl == "api":
        xg = x.detach().requires_grad_()
        loss = labelsmooth_ext.cross_entropy(xg, target, weight, ignore_index=ignore_index, reduction=reduction,
                                             label_smoothing=eps)
        (grad,) = torch.autograd.grad(loss, xg, grad_output.to(loss.dtype))
        lse = None
    else:
        if impl == "compiled_op" and not compiled_available():
            pytest.skip("compiled backend not active")
        forward, backward = ((op_forward(), op_backward()) if impl == "compiled_op"
                             else (reference.ls_cross_entropy_forward, reference.ls_cross_entropy_backward))
        code = REDUCTION_CODES[reduction]
        loss, lse, mass = forward(x, target, weight, ignore_index, eps, 0, None, code)
        grad = backward(grad_output.to(loss.dtype), None, x, target, weight, lse, mass, ignore_index, eps, 0, None, code)
    ref_loss, ref_grad, _ = reference_loss_and_grads(x, target, weight, ignore_index, reduction, eps, grad_output)
    assert_within(loss, ref_loss, loss_tolerance(x, target, weight, ignore_index, reduction, eps), "loss")
    assert_within(grad, ref_grad, grad_tolerance(x, target, weight, ignore_index, reduction, eps, grad_output, ref_grad),
                  "grad_input")
    if lse is not None:
        ref_lse = torch.logsumexp(x.double(), dim=1)
        if not target.is_floating_point():
            ref_lse[target == ignore_index] = 0.0
        assert_within(lse, ref_lse, lse_tolerance(x), "lse")


IMPLS = ("compiled_op", "reference", "api")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_huge_vocabulary_few_rows(impl, dtype, gen):
    x = randn((3, HUGE_K), gen, dtype, 3.0)
    target = torch.randint(0, HUGE_K, (3,), generator=gen)
    target[1] = -100
    target[2] = HUGE_K - 1  # the very last logit, in the scalar tail of any vector loop
    weight = class_weight(HUGE_K, gen, dtype)
    _check(impl, x, target, weight, -100, "none", 0.1, gen)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_one_huge_row(impl, reduction, gen):
    """N = 1 < threads: the row is split across threads and merged (online max + sum-exp)."""
    x = randn((1, HUGE_K), gen, torch.float32, 3.0)
    x[0, HUGE_K // 2 + 17] = 25.0  # the max far from the start of the row: merging must rescale
    target = torch.tensor([HUGE_K // 3])
    _check(impl, x, target, None, -100, reduction, 0.05, gen)


@pytest.mark.parametrize("impl", IMPLS)
def test_huge_row_with_inner_dim(impl, gen):
    """(N, C, d): class stride 2, a large K with the class dim not innermost."""
    x = randn((1, 300_007, 2), gen, torch.float32, 2.0)
    target = torch.tensor([[5, 300_006]])
    _check(impl, x, target, None, -100, "none", 0.2, gen)


@pytest.mark.parametrize("impl", IMPLS)
def test_huge_row_probability_target(impl, gen):
    x = randn((2, HUGE_K), gen, torch.float32, 2.0)
    target = torch.rand((2, HUGE_K), generator=gen)
    target = target / target.sum(dim=1, keepdim=True)
    _check(impl, x, target, class_weight(HUGE_K, gen, torch.float32), -100, "mean", 0.1, gen)


@pytest.mark.parametrize("eps", [0.1, 1.0])
def test_large_common_offset_does_not_cancel(eps, gen):
    """Logits around 1e4 (fp32 ulp 1e-3) with K = 200,003: computing sum_c z_c directly loses ~0.1 of
    the loss to cancellation; the loss is shift-invariant, so a correct kernel is as accurate as on
    the shifted logits, plus the one unavoidable rounding of an lse of magnitude 1e4."""
    num_classes = 200_003
    x = (randn((2, num_classes), gen, torch.float64, 2.0) + 1e4).to(torch.float32)
    target = torch.randint(0, num_classes, (2,), generator=gen)
    shifted = (x.double() - x.double()[:, :1]).float()  # exact: Sterbenz, every value within 2x of x[:, 0]
    grad_output = grad_output_like((2,), gen)
    xg = x.detach().requires_grad_()
    loss = labelsmooth_ext.cross_entropy(xg, target, reduction="none", label_smoothing=eps)
    (grad,) = torch.autograd.grad(loss, xg, grad_output)
    ref_loss, ref_grad, _ = reference_loss_and_grads(x, target, None, -100, "none", eps, grad_output)
    lse_rounding = 2 * 2.0**-24 * torch.logsumexp(x.double(), dim=1).abs()
    loss_tol = loss_tolerance(shifted, target, None, -100, "none", eps) + lse_rounding
    assert_within(loss, ref_loss, loss_tol, "loss")
    p = torch.softmax(x.double(), dim=1)
    grad_tol = grad_tolerance(shifted, target, None, -100, "none", eps, grad_output, ref_grad) + \
        grad_output.double().abs().unsqueeze(1) * p * lse_rounding.unsqueeze(1) * 1.01
    assert_within(grad, ref_grad, grad_tol, "grad_input")
