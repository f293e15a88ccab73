"""The loss options (z-loss, softcap, lse output, the 'others' smoothing convention, an external normaliser, the
class-weight gradient) on every backend, against float64 compositions of plain PyTorch ops:

* z-loss: F.cross_entropy + z_loss * logsumexp^2 (weighted like the row);
* softcap: softcap * tanh(z / softcap), then F.cross_entropy;
* 'others': the target with 1 - eps on the true class and eps / (K - 1) elsewhere, built explicitly;
* normaliser: the sum divided by it;
* weight gradient: autograd through sum_c w_c q_c (lse - z_c), the loss formula (PyTorch's
  cross_entropy is not differentiable in `weight`).

Every case of the core matrix's covering design runs with each option alone and with a few combinations.
Tolerances: those of conftest.py for cross-entropy, computed on the capped logits when softcap is on (the
kernels' tanh adds a few ulp per logit, inside the derivation's per-element slack), plus the z-loss term's own
bound (below).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import labelsmooth_ext
from labelsmooth_ext import reference

from conftest import (
    REDUCTION_CODES,
    accumulation_dtype,
    assert_within,
    class_dim_of,
    class_weight,
    compiled_available,
    _gamma,
    grad_tolerance,
    loss_tolerance,
    unit_roundoff,
)
from test_matrix import CASES, build_case

# Each option alone, then combinations: (name, options).
OPTION_SETS = [
    ("z_loss", {"z_loss": 1e-3}),
    ("softcap", {"softcap": 2.5}),
    ("others", {"smoothing": "others"}),
    ("normalizer", {"normalizer": 7.5}),
    ("normalizer_tensor", {"normalizer": "tensor"}),
    ("lse", {"return_lse": True}),
    ("z_loss_return", {"z_loss": 3e-3, "return_z_loss": True}),
    ("z_loss+softcap+others", {"z_loss": 1e-3, "softcap": 4.0, "smoothing": "others"}),
    ("softcap+lse+normalizer", {"softcap": 3.0, "return_lse": True, "normalizer": 11.0}),
]

# Every third case of the covering design keeps every dtype, shape, layout, K and target kind.
OPTION_CASES = CASES[::3]


def _usable(case, options):
    """Options that the case can take: 'others' needs class indices (and two classes when eps > 0), a normaliser
    needs reduction 'mean'."""
    if options.get("smoothing") == "others" and (case["target"] == "prob" or (case["K"] < 2 and case["eps"] > 0)):
        return False
    if "normalizer" in options and case["reduction"] != "mean":
        return False
    return True


def composed_loss(x, target, weight, ignore_index, reduction, eps, z_loss=0.0, softcap=None, smoothing="uniform",
                  normalizer=None):
    """(loss, per-row lse) in float64 from plain ops; differentiable in x, weight and probability targets."""
    class_dim = class_dim_of(x)
    num_classes = x.shape[class_dim]
    z = x if softcap is None else softcap * torch.tanh(x / softcap)
    lse = torch.logsumexp(z, dim=class_dim, keepdim=True)
    ell = lse - z
    w_shape = [1] * x.dim()
    w_shape[class_dim] = num_classes
    w = torch.ones(w_shape, dtype=x.dtype) if weight is None else weight.view(w_shape)
    if target.shape == x.shape and target.is_floating_point():
        q = (1.0 - eps) * target + eps / num_classes
        row_weight = torch.ones(lse.squeeze(class_dim).shape, dtype=x.dtype)
    else:
        t = target.to(torch.int64)
        valid = t != ignore_index
        safe = torch.where(valid, t, torch.zeros_like(t))
        onehot = torch.zeros(x.shape, dtype=x.dtype).scatter_(class_dim, safe.unsqueeze(class_dim), 1.0)
        if smoothing == "others":
            q = (1.0 - eps) * onehot + (eps / max(num_classes - 1, 1)) * (1.0 - onehot)
        else:
            q = (1.0 - eps) * onehot + eps / num_classes
        q = q * valid.unsqueeze(class_dim)
        w_rows = torch.ones(t.shape, dtype=x.dtype) if weight is None else weight[safe]
        row_weight = torch.where(valid, w_rows, torch.zeros_like(w_rows))
    rows = (w * q * ell).sum(dim=class_dim) + z_loss * row_weight * lse.squeeze(class_dim) ** 2
    if reduction == "none":
        loss = rows
    elif reduction == "sum" or normalizer is not None:
        loss = rows.sum() / (1.0 if normalizer is None else normalizer)
    else:
        loss = rows.sum() / row_weight.sum()
    return loss, lse.squeeze(class_dim)


def _z_loss_tolerance(x, target, weight, ignore_index, reduction, z_loss, lse, denominator):
    """|error| of the z-loss term: z w (lse^2) with lse off by d_lse (conftest's bound) and a few roundings."""
    if z_loss == 0:
        return 0.0
    u = unit_roundoff(accumulation_dtype(x.dtype))
    class_dim = class_dim_of(x)
    d_lse = u * (4.0 * math.sqrt(x.shape[class_dim]) + 32.0) * (1.0 + lse.abs() + x.double().abs().amax(class_dim))
    largest_weight = 1.0 if weight is None else float(weight.double().max())
    per_row = z_loss * largest_weight * (2.0 * lse.abs() * d_lse + d_lse**2 + 8.0 * u * lse**2)
    if reduction == "none":
        return per_row
    return per_row.sum() / denominator


def composed_row_weights(target, weight, ignore_index, row_shape):
    """Each row's weight in 'mean': w[y] (1 without weights), 0 for ignored rows; 1 for probability targets."""
    if target.is_floating_point():
        return torch.ones(row_shape, dtype=torch.float64)
    t = target.to(torch.int64)
    valid = t != ignore_index
    safe = torch.where(valid, t, torch.zeros_like(t))
    w = torch.ones(t.shape, dtype=torch.float64) if weight is None else weight.double()[safe]
    return torch.where(valid, w, torch.zeros_like(w))


def _aggregate(row_tol, row_losses, reduction, denominator, acc):
    """conftest.loss_tolerance's reduction step, from per-row bounds and the float64 row losses (also where
    eps in PyTorch's convention exceeds 1, which F.cross_entropy refuses: 'others' with eps near 1)."""
    if reduction == "none":
        return row_tol
    gamma_n = _gamma(row_losses.numel(), acc)
    total = row_tol.sum() + gamma_n * row_losses.abs().sum()
    if reduction == "sum":
        return total
    return total / denominator + gamma_n * (row_losses.sum() / denominator).abs()


def _normalizer_value(options, dtype):
    value = options.get("normalizer")
    if value == "tensor":
        return torch.tensor(13.25, dtype=dtype)
    return value


def _run_public(inputs, options):
    logits, target, weight, ignore_index, reduction, eps, grad_output = inputs
    x = logits.detach().requires_grad_()
    kwargs = {k: v for k, v in options.items() if k != "normalizer"}
    normalizer = _normalizer_value(options, accumulation_dtype(logits.dtype))
    out = labelsmooth_ext.cross_entropy(x, target, weight, ignore_index=ignore_index, reduction=reduction,
                                        label_smoothing=eps, normalizer=normalizer, **kwargs)
    return x, out, normalizer


def _unpack(out, options):
    if not (options.get("return_lse") or options.get("return_z_loss")):
        return out, None, None
    out = list(out)
    loss = out.pop(0)
    z_part = out.pop(0) if options.get("return_z_loss") else None
    lse = out.pop(0) if options.get("return_lse") else None
    return loss, z_part, lse


@pytest.mark.parametrize("option_name,options", OPTION_SETS, ids=[n for n, _ in OPTION_SETS])
@pytest.mark.parametrize("case", OPTION_CASES, ids=[f"case{i}" for i in range(len(OPTION_CASES))])
def test_option_against_float64_composition(case, option_name, options, gen):
    if not _usable(case, options):
        pytest.skip("option does not apply to this case")
    inputs = build_case(case, gen)
    logits, target, weight, ignore_index, reduction, eps, grad_output = inputs
    x, out, normalizer = _run_public(inputs, options)
    loss, z_part, lse = _unpack(out, options)

    x64 = logits.detach().double().requires_grad_()
    target64 = target.double() if target.is_floating_point() else target
    weight64 = None if weight is None else weight.double()
    norm64 = None if normalizer is None else float(normalizer)
    ref_loss, ref_lse = composed_loss(x64, target64, weight64, ignore_index, reduction, eps,
                                      z_loss=options.get("z_loss", 0.0), softcap=options.get("softcap"),
                                      smoothing=options.get("smoothing", "uniform"), normalizer=norm64)
    # The cross-entropy part's bound, on the logits the loss reads (capped where asked).
    capped = logits if options.get("softcap") is None else (
        options["softcap"] * torch.tanh(logits.double() / options["softcap"])).to(logits.dtype)
    eps_uniform = reference.uniform_smoothing(eps, 1 if options.get("smoothing") == "others" else 0,
                                              logits.shape[class_dim_of(logits)])
    red_for_tol = "sum" if norm64 is not None else reduction
    row_losses, _ = composed_loss(x64.detach(), target64, weight64, ignore_index, "none", eps,
                                  z_loss=options.get("z_loss", 0.0), softcap=options.get("softcap"),
                                  smoothing=options.get("smoothing", "uniform"))
    row_weights = composed_row_weights(target, weight, ignore_index, row_losses.shape)
    denominator = norm64 if norm64 is not None else float(row_weights.sum())
    row_tol = loss_tolerance(capped, target, weight, ignore_index, "none", eps_uniform) + _z_loss_tolerance(
        logits, target, weight, ignore_index, "none", options.get("z_loss", 0.0), ref_lse.detach(), 1.0)
    tol = _aggregate(row_tol, row_losses, reduction, denominator, accumulation_dtype(logits.dtype))
    assert_within(loss, ref_loss, tol, f"loss with {option_name}")

    if lse is not None:
        class_index = not target.is_floating_point()
        ref = torch.where(target.to(torch.int64) == ignore_index, torch.zeros_like(ref_lse), ref_lse) \
            if class_index else ref_lse
        assert lse.dtype == accumulation_dtype(logits.dtype) and lse.shape == ref.shape
        u = unit_roundoff(accumulation_dtype(logits.dtype))
        lse_tol = u * (4.0 * math.sqrt(logits.shape[class_dim_of(logits)]) + 32.0) * (
            1.0 + ref.abs() + capped.double().abs().amax(class_dim_of(logits)))
        assert_within(lse, ref.detach(), lse_tol, "returned lse")
    if z_part is not None:
        ref_z, _ = composed_loss(x64.detach(), target64, weight64, ignore_index, reduction, 0.0,
                                 z_loss=options["z_loss"], softcap=options.get("softcap"), normalizer=norm64)
        ref_ce, _ = composed_loss(x64.detach(), target64, weight64, ignore_index, reduction, 0.0,
                                  softcap=options.get("softcap"), normalizer=norm64)
        assert_within(z_part, ref_z - ref_ce, tol, "returned z-loss part")

    # Gradient: through the loss (and the returned lse, with an upstream of its own, when asked).
    upstream = grad_output.to(loss.dtype)
    outputs, grads = [loss], [upstream]
    ref_outputs, ref_grads = [ref_loss], [grad_output.double()]
    if lse is not None:
        lse_upstream = torch.rand(lse.shape, generator=gen, dtype=torch.float64) - 0.5
        outputs.append(lse)
        grads.append(lse_upstream.to(lse.dtype))
        masked_ref = ref_lse if target.is_floating_point() else torch.where(
            target.to(torch.int64) == ignore_index, torch.zeros_like(ref_lse), ref_lse)
        ref_outputs.append(masked_ref)
        ref_grads.append(lse_upstream)
    (grad,) = torch.autograd.grad(outputs, x, grads)
    (ref_grad,) = torch.autograd.grad(ref_outputs, x64, ref_grads)
    if reduction == "mean" and norm64 is None and float(row_weights.sum()) == 0:
        ref_grad = torch.zeros_like(ref_grad)  # all rows ignored: NaN mean, zero gradient (as PyTorch)
    grad_tol = grad_tolerance(capped, target, weight, ignore_index, red_for_tol, eps_uniform,
                              grad_output / (1.0 if norm64 is None else norm64), ref_grad)
    # z-loss and the lse upstream add (2 z w lse g + g_lse) p_j: their own rounding, a few ulp of it.
    extra = torch.zeros_like(ref_grad)
    if options.get("z_loss") or lse is not None:
        extra = 64.0 * unit_roundoff(accumulation_dtype(logits.dtype)) * ref_grad.abs().amax() + \
            unit_roundoff(logits.dtype) * ref_grad.abs()
    if options.get("softcap") is not None:
        # the chain rule's factor 1 - tanh^2 is computed from the rounded capped logit: a few ulp more
        extra = extra + 8.0 * unit_roundoff(accumulation_dtype(logits.dtype)) * ref_grad.abs() + \
            unit_roundoff(logits.dtype) * ref_grad.abs()
    assert_within(grad, ref_grad, grad_tol + extra, f"gradient with {option_name}")


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("probability", [False, True])
@pytest.mark.parametrize("options", [{}, {"softcap": 3.0}, {"smoothing": "others"}, {"z_loss": 1e-2}],
                         ids=["plain", "softcap", "others", "z_loss"])
def test_weight_gradient_against_the_formula(reduction, probability, options, gen):
    if probability and options.get("smoothing") == "others":
        pytest.skip("'others' is for class indices")
    x = (torch.randn(9, 6, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    if probability:
        target = torch.rand(9, 6, generator=gen, dtype=torch.float64).softmax(dim=1)
    else:
        target = torch.randint(0, 6, (9,), generator=gen)
        target[2] = -100
    weight = class_weight(6, gen, torch.float64).requires_grad_()
    loss = labelsmooth_ext.cross_entropy(x, target, weight, reduction=reduction, label_smoothing=0.2, **options)
    ref, _ = composed_loss(x, target, weight, -100, reduction, 0.2, **options)
    upstream = torch.rand(ref.shape, generator=gen, dtype=torch.float64) + 0.5
    grads = torch.autograd.grad(loss, (x, weight), upstream)
    ref_grads = torch.autograd.grad(ref, (x, weight), upstream)
    for got, want, name in zip(grads, ref_grads, ("input", "weight")):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), f"{name}: {got} vs {want}"


def test_defaults_keep_pytorch_semantics(gen):
    x = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 8, (5,), generator=gen)
    plain = labelsmooth_ext.cross_entropy(x, target, label_smoothing=0.1)
    explicit = labelsmooth_ext.cross_entropy(x, target, label_smoothing=0.1, z_loss=0.0, softcap=None,
                                             smoothing="uniform", normalizer=None)
    assert torch.equal(plain, explicit)
    assert torch.allclose(plain, F.cross_entropy(x, target, label_smoothing=0.1), rtol=1e-12)


def test_others_convention_conversion(gen):
    """eps_uniform = eps_others * K / (K - 1) gives the same loss."""
    x = torch.randn(6, 9, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 9, (6,), generator=gen)
    others = labelsmooth_ext.cross_entropy(x, target, label_smoothing=0.08, smoothing="others")
    uniform = labelsmooth_ext.cross_entropy(x, target, label_smoothing=0.08 * 9 / 8)
    assert torch.allclose(others, uniform, rtol=1e-12)


def test_normalizer_tensor_needs_no_host_sync(gen):
    """A tensor normaliser is used on the device: under torch.compile(fullgraph=True) it stays in the graph."""
    x = torch.randn(6, 5, generator=gen)
    target = torch.randint(0, 5, (6,), generator=gen)
    count = torch.tensor(40.0)
    fn = torch.compile(lambda a, t, n: labelsmooth_ext.cross_entropy(a, t, label_smoothing=0.1, normalizer=n),
                       fullgraph=True)
    assert torch.allclose(fn(x, target, count), F.cross_entropy(x.double(), target, label_smoothing=0.1,
                                                                reduction="sum").float() / 40.0, rtol=1e-5)


@pytest.mark.parametrize("dynamic", [False, True])
def test_options_compile_fullgraph(dynamic, gen):
    x = torch.randn(7, 11, generator=gen).requires_grad_()
    target = torch.randint(0, 11, (7,), generator=gen)

    def fn(a):
        loss, z_part, lse = labelsmooth_ext.cross_entropy(a, target, label_smoothing=0.1, z_loss=1e-3, softcap=5.0,
                                                          smoothing="others", return_z_loss=True, return_lse=True)
        return loss + lse.sum() * 1e-3, z_part

    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic)
    out_c, z_c = compiled(x)
    out_e, z_e = fn(x)
    assert torch.allclose(out_c, out_e, rtol=1e-6) and torch.allclose(z_c, z_e, rtol=1e-6)
    (g_c,) = torch.autograd.grad(out_c, x)
    (g_e,) = torch.autograd.grad(out_e, x)
    assert torch.allclose(g_c, g_e, rtol=1e-5, atol=1e-7)


def test_opcheck_with_options(gen):
    x = torch.randn(5, 9, generator=gen, requires_grad=True)
    target = torch.randint(0, 9, (5,), generator=gen)
    weight = torch.rand(9, generator=gen) + 0.5
    probs = torch.rand(5, 9, generator=gen).softmax(dim=1)
    forward = torch.ops.labelsmooth.ls_cross_entropy_forward.default
    for args in ((x, target, weight, -100, 0.1, 1, 3.0, 1), (x, target, None, -100, 0.2, 0, None, 0),
                 (x, probs, weight, -100, 0.1, 0, 2.0, 2)):
        torch.library.opcheck(forward, args)
    loss, lse, mass = forward(x.detach(), probs, weight, -100, 0.1, 0, 2.0, 0)
    backward = torch.ops.labelsmooth.ls_cross_entropy_backward.default
    torch.library.opcheck(backward, (torch.rand(5), torch.rand(5), x.detach(), probs, weight, lse, mass, -100, 0.1, 0,
                                     2.0, 0))


@pytest.mark.parametrize("kwargs,error,pattern", [
    ({"z_loss": -1.0}, ValueError, "z_loss"),
    ({"z_loss": float("nan")}, ValueError, "z_loss"),
    ({"softcap": 0.0}, ValueError, "softcap"),
    ({"softcap": -2.0}, ValueError, "softcap"),
    ({"smoothing": "fairseq"}, ValueError, "smoothing"),
    ({"normalizer": 0.0}, ValueError, "normalizer"),
    ({"normalizer": -3.0}, ValueError, "normalizer"),
    ({"normalizer": 4.0, "reduction": "sum"}, ValueError, "normalizer"),
    ({"normalizer": torch.tensor([4.0])}, TypeError, "normalizer"),
])
def test_bad_option_values_are_clear_errors(kwargs, error, pattern, gen):
    x = torch.randn(4, 5, generator=gen)
    target = torch.randint(0, 5, (4,), generator=gen)
    with pytest.raises(error, match=pattern):
        labelsmooth_ext.cross_entropy(x, target, label_smoothing=0.1, **kwargs)


def test_others_with_probability_targets_is_a_clear_error(gen):
    x = torch.randn(4, 5, generator=gen)
    with pytest.raises(ValueError, match="class-index"):
        labelsmooth_ext.cross_entropy(x, torch.rand(4, 5, generator=gen), label_smoothing=0.1, smoothing="others")


def test_compiled_op_rejects_bad_option_codes(gen):
    if not compiled_available():
        pytest.skip("compiled backend not active")
    x = torch.randn(4, 5, generator=gen)
    target = torch.randint(0, 5, (4,), generator=gen)
    forward = torch.ops.labelsmooth.ls_cross_entropy_forward.default
    with pytest.raises(ValueError, match="smoothing code"):
        forward(x, target, None, -100, 0.1, 7, None, REDUCTION_CODES["mean"])
    with pytest.raises(ValueError, match="softcap"):
        forward(x, target, None, -100, 0.1, 0, -1.0, REDUCTION_CODES["mean"])
