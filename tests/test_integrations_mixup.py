"""mixup_cross_entropy against cross-entropy with the explicit N x C mixup soft target, in float64; its
equivalence with timm's SoftTargetCrossEntropy / LabelSmoothingCrossEntropy (when timm is installed);
bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import labelsmooth_ext
from labelsmooth_ext.integrations import mixup_cross_entropy

from conftest import (
    _gamma,
    accumulation_dtype,
    assert_within,
    class_weight,
    grad_output_like,
    grad_tolerance,
    loss_tolerance,
    randn,
    reference_loss_and_grads,
    unit_roundoff,
)

IGNORE = -100


def _targets(shape, classes, gen, ignore):
    target = torch.randint(0, classes, shape, generator=gen)
    if ignore == "some":
        target[torch.rand(shape, generator=gen) < 0.3] = IGNORE
    elif ignore == "all":
        target.fill_(IGNORE)
    return target


def _lam(kind, rows, gen):
    """(lam as passed, lam in float64 broadcast over the row shape `rows`); per-sample lam as (N,) or as
    timm's per-sample modes give it, (N, 1)."""
    value = torch.rand((), generator=gen, dtype=torch.float64)
    if kind == "float":
        return float(value), value.expand(rows)
    if kind == "tensor":
        return value.to(torch.float32), value.to(torch.float32).to(torch.float64).expand(rows)
    per_sample = torch.rand(rows[0], generator=gen, dtype=torch.float64).to(torch.float32)
    broadcast = per_sample.to(torch.float64).view([rows[0]] + [1] * (len(rows) - 1)).expand(rows)
    return (per_sample if kind == "per_sample" else per_sample.unsqueeze(1)), broadcast


def _smoothed_one_hot(target, classes, eps):
    """(1 - eps) onehot + eps / C in float64, class dim 1, zero where the target is ignored."""
    valid = target != IGNORE
    one_hot = F.one_hot(torch.where(valid, target, 0), classes).to(torch.float64).movedim(-1, 1)
    return ((1.0 - eps) * one_hot + eps / classes) * valid.unsqueeze(1)


def _soft_target_reference(x, target_a, target_b, mix, weight, eps, reduction, grad_output):
    """Loss and gradient of cross-entropy against the explicit mixup soft target, float64 autograd.
    With nothing ignored this is F.cross_entropy's own reduction over probability targets; with ignored
    components, the mean divides by their mixing weight (the documented generalisation)."""
    classes = x.shape[1]
    q = mix.unsqueeze(1) * _smoothed_one_hot(target_a, classes, eps) + \
        (1 - mix).unsqueeze(1) * _smoothed_one_hot(target_b, classes, eps)
    z = x.detach().to(torch.float64).requires_grad_()
    w = None if weight is None else weight.to(torch.float64)
    ignored = bool(((target_a == IGNORE) | (target_b == IGNORE)).any())
    if ignored and reduction == "mean":
        rows = F.cross_entropy(z, q, w, reduction="none")
        mass = (mix * (target_a != IGNORE) + (1 - mix) * (target_b != IGNORE)).sum()
        loss = rows.sum() / mass
    else:
        loss = F.cross_entropy(z, q, w, reduction=reduction)
    (grad,) = torch.autograd.grad(loss, z, grad_output.to(torch.float64))
    # The float64 reference's own rounding: one sum over the classes per row.
    lse = torch.logsumexp(z.detach(), dim=1, keepdim=True)
    ref_error = _gamma(classes, torch.float64) * (q * (lse - z.detach()).abs()).sum(dim=1)
    return loss.detach(), grad, ref_error


def _tolerances(x, target_a, target_b, mix, weight, eps, reduction, grad_output, ref_error):
    """Bounds on |ours - reference| for loss and gradient, from the bounds of the two class-index
    losses (conftest's derivation) and the few roundings of the mix: ours is
    mix * rows_a + (1 - mix) * rows_b, reduced, in the accumulation dtype u; its gradient is the sum of
    the two ops' gradients, rounded once more to the input dtype u_in."""
    u = unit_roundoff(accumulation_dtype(x.dtype))
    u_in = unit_roundoff(x.dtype)
    valid_a, valid_b = target_a != IGNORE, target_b != IGNORE
    parts = []
    for target, coefficient in ((target_a, mix), (target_b, 1 - mix)):
        rows_ref, *_ = reference_loss_and_grads(x, target, weight, IGNORE, "none", eps, torch.ones(target.shape))
        parts.append((target, coefficient, rows_ref, loss_tolerance(x, target, weight, IGNORE, "none", eps)))
    mixed = sum(c * r.abs() for _, c, r, _ in parts)
    row_tol = sum(c * t for _, c, _, t in parts) + 3 * u * mixed + ref_error
    rows_count = max(target_a.numel(), 1)
    mass = (mix * valid_a + (1 - mix) * valid_b).sum()
    if reduction == "none":
        loss_tol = row_tol
        upstream = grad_output.to(torch.float64).expand(target_a.shape)
    else:
        total = sum(c * r for _, c, r, _ in parts).sum()
        loss_tol = row_tol.sum() + _gamma(rows_count, accumulation_dtype(x.dtype)) * mixed.sum()
        upstream = grad_output.to(torch.float64).expand(target_a.shape)
        if reduction == "mean":
            loss_tol = loss_tol / mass + 2 * _gamma(rows_count, accumulation_dtype(x.dtype)) * (total / mass).abs()
            upstream = upstream / mass
    grad_tol = 0
    grad_abs = 0
    for target, coefficient, _, _ in parts:
        row_upstream = coefficient * upstream
        _, ref_grad, _ = reference_loss_and_grads(x, target, weight, IGNORE, "none", eps, row_upstream)
        # The op's upstream (coefficient * g, and g / mass for the mean) is itself rounded a few times.
        grad_tol = grad_tol + grad_tolerance(x, target, weight, IGNORE, "none", eps, row_upstream, ref_grad) + \
            (4 * u + (2 * _gamma(rows_count, accumulation_dtype(x.dtype)) if reduction == "mean" else 0)) * \
            ref_grad.abs()
        grad_abs = grad_abs + ref_grad.abs()
    grad_tol = grad_tol + u_in * grad_abs + 8 * unit_roundoff(torch.float64) * grad_abs
    return loss_tol, grad_tol


SHAPES = [(13, 7), (5, 6, 3)]
LAM_KINDS = ("float", "tensor", "per_sample", "per_sample_column")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("ignore", ["none", "some"])
def test_equals_explicit_soft_target(gen, dtype, reduction, weighted, ignore):
    cases = [(shape, eps) for shape in SHAPES for eps in (0.0, float(torch.rand((), generator=gen)) * 0.3, 1.0)]
    for case, (shape, eps) in enumerate(cases):
        lam_kind = LAM_KINDS[case % len(LAM_KINDS)]  # the kinds of lam take turns over the cases
        classes = shape[1]
        rows = [shape[0]] + list(shape[2:])
        x = randn(shape, gen, dtype, scale=3.0).requires_grad_()
        target_a = _targets(rows, classes, gen, ignore)
        target_b = target_a.flip(0)  # timm's pairing: the batch against itself reversed
        weight = class_weight(classes, gen, torch.float32) if weighted else None
        lam, mix = _lam(lam_kind, rows, gen)
        loss = mixup_cross_entropy(x, target_a, target_b, lam, weight, ignore_index=IGNORE,
                                   reduction=reduction, label_smoothing=eps)
        grad_output = grad_output_like(loss.shape, gen)
        (grad,) = torch.autograd.grad(loss, x, grad_output)
        ref_loss, ref_grad, ref_error = _soft_target_reference(x, target_a, target_b, mix, weight, eps,
                                                               reduction, grad_output)
        loss_tol, grad_tol = _tolerances(x, target_a, target_b, mix, weight, eps, reduction, grad_output,
                                         ref_error)
        what = f"shape {shape}, eps {eps}, lam {lam_kind}"
        assert_within(loss, ref_loss, loss_tol, f"loss ({what})")
        assert grad.dtype == dtype
        assert_within(grad, ref_grad, grad_tol, f"gradient ({what})")


def test_mean_is_the_soft_target_mean_with_weights(gen):
    """With class weights the mean divides by the number of rows (probability-target semantics), which
    differs from mixing the two class-index means (those divide by the summed weights of the targets)."""
    x = randn((32, 10), gen, torch.float64)
    target_a = torch.randint(0, 10, (32,), generator=gen)
    target_b = target_a.flip(0)
    weight = class_weight(10, gen, torch.float64)
    lam = 0.7
    ours = mixup_cross_entropy(x, target_a, target_b, lam, weight, label_smoothing=0.1)
    soft = lam * _smoothed_one_hot(target_a, 10, 0.1) + (1 - lam) * _smoothed_one_hot(target_b, 10, 0.1)
    expected = F.cross_entropy(x, soft, weight)
    assert_within(ours, expected, 64 * unit_roundoff(torch.float64) * expected.abs(), "weighted mean")
    mixed_means = lam * F.cross_entropy(x, target_a, weight, label_smoothing=0.1) + \
        (1 - lam) * F.cross_entropy(x, target_b, weight, label_smoothing=0.1)
    assert not torch.allclose(ours, mixed_means, rtol=1e-6, atol=0), "weights this uneven must change the mean"


def test_lam_one_and_zero_are_the_class_index_losses(gen):
    x = randn((9, 4, 2), gen, torch.float32)
    target_a = _targets([9, 2], 4, gen, "some")
    target_b = _targets([9, 2], 4, gen, "some")
    for lam, target in ((1.0, target_a), (0.0, target_b)):
        for reduction in ("none", "sum"):
            ours = mixup_cross_entropy(x, target_a, target_b, lam, reduction=reduction, label_smoothing=0.2)
            expected = labelsmooth_ext.cross_entropy(x, target, ignore_index=IGNORE, reduction=reduction,
                                                     label_smoothing=0.2)
            if reduction == "none":
                assert torch.equal(ours, expected), f"lam={lam}, {reduction}"
                continue
            # The same rows, summed in another order (the op sums in double): the sum's rounding bound.
            rows = labelsmooth_ext.cross_entropy(x, target, ignore_index=IGNORE, reduction="none", label_smoothing=0.2)
            assert_within(ours, expected, _gamma(rows.numel(), torch.float32) * rows.abs().sum(), f"lam={lam}, sum")


def test_everything_ignored_mean_is_nan_with_zero_gradient(gen):
    x = randn((6, 5), gen, torch.float32).requires_grad_()
    target = torch.full((6,), IGNORE)
    loss = mixup_cross_entropy(x, target, target.flip(0), 0.4, label_smoothing=0.1)
    assert torch.isnan(loss)
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_gradient_reaches_a_tensor_lam(gen):
    """d loss / d lam = loss_a - loss_b for 'sum' (the loss is linear in lam)."""
    x = randn((8, 6), gen, torch.float64)
    target_a = torch.randint(0, 6, (8,), generator=gen)
    target_b = torch.randint(0, 6, (8,), generator=gen)
    lam = torch.rand((), generator=gen, dtype=torch.float64).requires_grad_()
    loss = mixup_cross_entropy(x, target_a, target_b, lam, reduction="sum", label_smoothing=0.1)
    (d_lam,) = torch.autograd.grad(loss, lam)
    expected = F.cross_entropy(x, target_a, reduction="sum", label_smoothing=0.1) - \
        F.cross_entropy(x, target_b, reduction="sum", label_smoothing=0.1)
    assert_within(d_lam, expected, 64 * unit_roundoff(torch.float64) * (1 + expected.abs() * 8), "d loss / d lam")


# ----------------------------------------------------------------------------------------------------
# timm (needs torchvision, so these skip where it cannot be installed)


@pytest.fixture
def timm_float64():
    """timm, with float64 as the default dtype so that mixup_target builds its one-hot in float64."""
    pytest.importorskip("timm")
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(saved)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("lam_kind", ["float", "per_sample_column"])  # timm's batch / elem and pair modes
def test_timm_soft_target_cross_entropy_of_mixup_target(gen, timm_float64, dtype, lam_kind):
    from timm.data.mixup import mixup_target
    from timm.loss import SoftTargetCrossEntropy

    classes, eps = 11, 0.1
    x = randn((16, classes), gen, dtype, scale=3.0).requires_grad_()
    target = torch.randint(0, classes, (16,), generator=gen)
    lam, mix = _lam(lam_kind, [16], gen)
    loss = mixup_cross_entropy(x, target, target.flip(0), lam, label_smoothing=eps)
    (grad,) = torch.autograd.grad(loss, x)

    z = x.detach().to(torch.float64).requires_grad_()
    soft = mixup_target(target, classes, lam=lam if lam_kind == "float" else lam.to(torch.float64), smoothing=eps)
    timm_loss = SoftTargetCrossEntropy()(z, soft)
    (timm_grad,) = torch.autograd.grad(timm_loss, z)
    _, _, ref_error = _soft_target_reference(x, target, target.flip(0), mix, None, eps, "mean", torch.ones(()))
    loss_tol, grad_tol = _tolerances(x, target, target.flip(0), mix, None, eps, "mean", torch.ones(()), ref_error)
    assert_within(loss, timm_loss, loss_tol, "loss vs timm SoftTargetCrossEntropy(mixup_target)")
    assert_within(grad, timm_grad, grad_tol, "gradient vs timm SoftTargetCrossEntropy(mixup_target)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_timm_label_smoothing_cross_entropy(gen, timm_float64, dtype):
    from timm.loss import LabelSmoothingCrossEntropy

    eps = 0.1
    x = randn((16, 9), gen, dtype, scale=3.0).requires_grad_()
    target = torch.randint(0, 9, (16,), generator=gen)
    loss = labelsmooth_ext.cross_entropy(x, target, reduction="mean", label_smoothing=eps)
    (grad,) = torch.autograd.grad(loss, x)
    z = x.detach().to(torch.float64).requires_grad_()
    timm_loss = LabelSmoothingCrossEntropy(smoothing=eps)(z, target)
    (timm_grad,) = torch.autograd.grad(timm_loss, z)
    assert_within(loss, timm_loss, loss_tolerance(x, target, None, IGNORE, "mean", eps), "loss vs timm")
    tol = grad_tolerance(x, target, None, IGNORE, "mean", eps, torch.ones(()), timm_grad)
    assert_within(grad, timm_grad, tol, "gradient vs timm LabelSmoothingCrossEntropy")


# ----------------------------------------------------------------------------------------------------
# Bad input


def _call(gen, **overrides):
    arguments = dict(input=randn((4, 5), gen, torch.float32), target_a=torch.tensor([0, 1, 2, 3]),
                     target_b=torch.tensor([3, 2, 1, 0]), lam=0.5)
    arguments.update(overrides)
    return mixup_cross_entropy(**arguments, label_smoothing=0.1)


@pytest.mark.parametrize("overrides, error, message", [
    (dict(lam=1.5), ValueError, r"lam must be in \[0, 1\], got 1.5"),
    (dict(lam=-0.25), ValueError, r"lam must be in \[0, 1\], got -0.25"),
    (dict(lam=float("nan")), ValueError, r"lam must be in \[0, 1\], got nan"),
    (dict(lam=True), TypeError, r"lam must be a float in \[0, 1\] or a tensor, got bool"),
    (dict(lam="0.5"), TypeError, r"lam must be a float in \[0, 1\] or a tensor, got str"),
    (dict(lam=torch.tensor(1)), TypeError, r"lam must be a float or a floating-point tensor, got torch.int64"),
    (dict(lam=torch.rand(3)), ValueError, r"lam must have shape \(\), \(4,\) or \(4, 1\), one per sample, got \[3\]"),
    (dict(lam=torch.rand(1, 4)), ValueError, r"lam must have shape \(\), \(4,\) or \(4, 1\), .* got \[1, 4\]"),
    (dict(lam=torch.rand((), device="meta")), RuntimeError, r"lam is on meta but input is on cpu"),
    (dict(target_a=torch.rand(4, 5)), TypeError, r"takes class indices as target_a, got a torch.float32 tensor"),
    (dict(target_b=[3, 2, 1, 0]), TypeError, r"target_b must be a tensor of class indices, got list"),
    (dict(target_b=torch.tensor([3, 2, 1])), ValueError, r"same shape, got \[4\] and \[3\]"),
    (dict(target_a=torch.tensor([0, 1, 2, 5])), IndexError, r"Target 5 is out of bounds"),
    (dict(input=[[0.0] * 5] * 4), TypeError, r"input must be a tensor of logits, got list"),
])
def test_bad_input(gen, overrides, error, message):
    with pytest.raises(error, match=message):
        _call(gen, **overrides)


def test_bad_reduction_and_label_smoothing(gen):
    with pytest.raises(ValueError, match="'average' is not a valid value for reduction|average is not a valid"):
        _call(gen, reduction="average")
    with pytest.raises(RuntimeError, match=r"label_smoothing must be between 0.0 and 1.0. Got: 2.0"):
        mixup_cross_entropy(randn((4, 5), gen), torch.tensor([0, 1, 2, 3]), torch.tensor([3, 2, 1, 0]), 0.5,
                            label_smoothing=2.0)
