"""Shared helpers of the CPU test suite: per-test random data, the float64 PyTorch reference, and
tolerances derived from the dtypes (never tuned until green).

Randomness: every run draws a run seed (printed in the pytest header; set LABELSMOOTH_TEST_SEED to
replay a run), and each test seeds its own generator from the run seed and its node id, so tests get
fresh data on every run but do not depend on the order in which they run.
"""

from __future__ import annotations

import math
import os
import random
import zlib

import pytest
import torch
import torch.nn.functional as F

RUN_SEED = int(os.environ.get("LABELSMOOTH_TEST_SEED", random.SystemRandom().randrange(2**31)))

REDUCTIONS = ("none", "mean", "sum")
REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}  # the op's int argument (at::Reduction numbering)
LOW_PRECISION = (torch.float16, torch.bfloat16)


def pytest_report_header(config):
    return f"labelsmooth_ext: LABELSMOOTH_TEST_SEED={RUN_SEED} (export it to replay this run's data)"


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU generator seeded from the run seed and the test's node id."""
    node_hash = zlib.crc32(request.node.nodeid.encode())
    return torch.Generator().manual_seed((RUN_SEED << 32) ^ node_hash)


@pytest.fixture
def restore_num_threads():
    saved = torch.get_num_threads()
    yield saved
    torch.set_num_threads(saved)


# ----------------------------------------------------------------------------------------------------
# Backends


def backend_info() -> dict:
    import labelsmooth_ext

    return labelsmooth_ext.backend_info()


def compiled_available() -> bool:
    return backend_info()["backend"] == "compiled"


def skip_unless_compiled():
    if not compiled_available():
        pytest.skip(f"compiled backend not active: {backend_info().get('reason')}")


def op_forward():
    import labelsmooth_ext  # noqa: F401  (registers the ops)

    return torch.ops.labelsmooth.ls_cross_entropy_forward


def op_backward():
    import labelsmooth_ext  # noqa: F401

    return torch.ops.labelsmooth.ls_cross_entropy_backward


# ----------------------------------------------------------------------------------------------------
# Dtypes


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = 2^-p for a p-bit significand: the largest relative error of one rounding to nearest."""
    return torch.finfo(dtype).eps / 2


def class_dim_of(input: torch.Tensor) -> int:
    return 0 if input.dim() == 1 else 1


def is_probability_target(input: torch.Tensor, target: torch.Tensor) -> bool:
    return target.shape == input.shape and target.is_floating_point()


# ----------------------------------------------------------------------------------------------------
# Random data


def randn(shape, gen, dtype=torch.float32, scale=1.0) -> torch.Tensor:
    """Normal values rounded once to `dtype` (the float64 reference later sees exactly these)."""
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def class_weight(num_classes, gen, dtype) -> torch.Tensor:
    """Class weights in [0.25, 2): far from uniform, never zero (zero weights are their own case)."""
    return (0.25 + 1.75 * torch.rand(num_classes, generator=gen, dtype=torch.float64)).to(dtype)


def probability_target(shape, class_dim, gen, dtype, normalized) -> torch.Tensor:
    """Soft targets; PyTorch accepts rows that do not sum to one, and so must we."""
    raw = torch.rand(shape, generator=gen, dtype=torch.float64)
    if normalized:
        raw = raw / raw.sum(dim=class_dim, keepdim=True)
    return raw.to(dtype)


def with_layout(values: torch.Tensor, class_dim: int, layout: str, gen) -> torch.Tensor:
    """The same values behind different strides. 'sliced': rows of a wider tensor (x[:, :K]);
    'permuted': storage in reversed dim order, then permuted back (a transposed matrix for 2-D);
    'class_last': the class dim innermost in memory (channels-last for 4-D);
    'broadcast': a stride-0 dim (rows repeated) -- the values are replaced by a broadcast of the first
    slice along dim 0, so callers must read the returned tensor, not `values`."""
    shape = values.shape
    if layout == "contiguous":
        return values.contiguous()
    if layout == "sliced":
        if values.dim() == 1:
            wide = torch.empty(2 * shape[0], dtype=values.dtype)
            wide.normal_(generator=gen)
            wide[::2] = values
            return wide[::2]
        wide_shape = list(shape)
        wide_shape[class_dim] += 5
        wide = torch.randn(wide_shape, generator=gen, dtype=torch.float64).to(values.dtype)
        view = wide.narrow(class_dim, 0, shape[class_dim])
        view.copy_(values)
        return view
    if layout == "permuted":
        order = list(reversed(range(values.dim())))
        return values.permute(order).contiguous().permute(order)
    if layout == "class_last":
        if values.dim() == 4:
            return values.contiguous(memory_format=torch.channels_last)
        order = [d for d in range(values.dim()) if d != class_dim] + [class_dim]
        inverse = [order.index(d) for d in range(values.dim())]
        return values.permute(order).contiguous().permute(inverse)
    if layout == "broadcast":
        return values[:1].expand(shape)
    raise ValueError(layout)


# ----------------------------------------------------------------------------------------------------
# The float64 PyTorch reference


def _float64_target(target: torch.Tensor) -> torch.Tensor:
    return target.to(torch.float64) if target.is_floating_point() else target.to(torch.int64)


def reference_loss(input, target, weight=None, ignore_index=-100, reduction="mean", eps=0.0):
    """F.cross_entropy on float64 copies of the very same (already rounded) inputs."""
    return F.cross_entropy(
        input.detach().to(torch.float64),
        _float64_target(target.detach()),
        None if weight is None else weight.detach().to(torch.float64),
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=eps,
    )


def reference_loss_and_grads(input, target, weight, ignore_index, reduction, eps, grad_output,
                             target_grad=False):
    """(loss, d loss/d input, d loss/d target or None) by float64 autograd of F.cross_entropy, with
    `grad_output` as the upstream gradient."""
    x = input.detach().to(torch.float64).requires_grad_()
    t = _float64_target(target.detach())
    if target_grad:
        t.requires_grad_()
    w = None if weight is None else weight.detach().to(torch.float64)
    loss = F.cross_entropy(x, t, w, ignore_index=ignore_index, reduction=reduction, label_smoothing=eps)
    wrt = (x, t) if target_grad else (x,)
    grads = torch.autograd.grad(loss, wrt, grad_output.to(torch.float64))
    return loss.detach(), grads[0], (grads[1] if target_grad else None)


# ----------------------------------------------------------------------------------------------------
# Tolerances
#
# Notation: u = unit roundoff of the accumulation dtype (2^-24 for fp16/bf16/fp32 logits, 2^-53 for
# fp64), u_in = that of the input dtype (2^-8 bf16, 2^-11 fp16). fp16/bf16 values are exactly
# representable in fp32 and fp64, so the reference sees exactly the values the kernel sees and the
# only differences come from the kernel's arithmetic and from rounding its outputs.
#
# * A sum of n terms in floating point has a rounding error that behaves like a random walk:
#   about u * sqrt(n/3) * sum|terms| for left-to-right summation, less for pairwise or SIMD-lane
#   summation. 4*sqrt(n) is more than 6 standard deviations of that. On top come a fixed number of
#   roundings per element: exp (a vectorized exp may be off by up to 20 ulp, ATen's exp_u20), log,
#   the subtraction of the max, a few products; 32 more ulps covers them.
#       gamma(n) = u * (4 * sqrt(n) + 32)
# * lse = log sum exp z: an absolute error of gamma(K) times its magnitude; subtracting the row max
#   (or a pivot) first rounds each z by u * |z|:   d_lse = gamma(K) * (1 + |lse| + max_c |z_c|).
# * Every loss in this project is a row sum  loss = sum_c a_c (lse - z_c)  with nonnegative
#   coefficients a_c = w_c * q_c (q the smoothed target, zero for ignored rows). With A = sum_c a_c:
#       |loss error| <= 2 * A * d_lse + gamma(K) * sum_c a_c |z_c|.
# * 'sum' adds gamma(N) * sum_i |loss_i| to the rows' errors; 'mean' also divides by a denominator
#   summed with relative error gamma(N).
# * Gradient: dL/dz_j = g * (A * p_j - a_j), p_j = exp(z_j - lse). p_j inherits the lse error plus
#   the rounding of z_j - lse (u * |z_j - lse|) and of exp; the products and the subtraction add a
#   few u of both terms. It is then rounded once to the input dtype: u_in of its magnitude, or half
#   the smallest subnormal. An fp32 exp that underflows (or is flushed) loses at most fp32's tiny.
# Loss of low-precision inputs is therefore ~1e-6..1e-5 relative for K up to 1e6; gradients are
# ~u_in relative to each element (not just relative to the largest one).


def _gamma(n: int, acc_dtype: torch.dtype) -> float:
    return unit_roundoff(acc_dtype) * (4.0 * math.sqrt(max(n, 1)) + 32.0)


def smoothed_coefficients(input, target, weight, ignore_index, eps) -> torch.Tensor:
    """a_c = w_c * q_c in float64, input-shaped (class dim at 0 for 1-D input, else 1); ignored rows
    are zero. q is PyTorch's smoothed target: (1 - eps) [c = y] + eps / K, or (1 - eps) t_c + eps / K."""
    class_dim = class_dim_of(input)
    num_classes = input.shape[class_dim]
    w_shape = [1] * input.dim()
    w_shape[class_dim] = num_classes
    w = torch.ones(w_shape, dtype=torch.float64) if weight is None else weight.to(torch.float64).view(w_shape)
    if is_probability_target(input, target):
        return w * ((1.0 - eps) * target.to(torch.float64) + eps / num_classes)
    t = target.to(torch.int64)
    valid = t != ignore_index
    safe = torch.where(valid, t, torch.zeros_like(t)).unsqueeze(class_dim)
    one_hot = torch.zeros(input.shape, dtype=torch.float64).scatter_(class_dim, safe, 1.0)
    q = (1.0 - eps) * one_hot + eps / num_classes
    return w * q * valid.unsqueeze(class_dim).to(torch.float64)


def _row_terms(input, target, weight, ignore_index, eps):
    class_dim = class_dim_of(input)
    z = input.detach().to(torch.float64)
    a = smoothed_coefficients(input, target, weight, ignore_index, eps)
    lse = torch.logsumexp(z, dim=class_dim, keepdim=True)
    num_classes = input.shape[class_dim]
    gamma_k = _gamma(num_classes, accumulation_dtype(input.dtype))
    finite_abs = torch.where(torch.isfinite(z), z.abs(), torch.zeros_like(z))
    max_abs = finite_abs.amax(dim=class_dim, keepdim=True) if z.numel() else finite_abs.sum(class_dim, keepdim=True)
    d_lse = gamma_k * (1.0 + lse.abs() + max_abs)
    return class_dim, z, a, lse, d_lse, gamma_k


def lse_tolerance(input) -> torch.Tensor:
    """Bound on |lse - logsumexp(z)|, row-shaped. Infinite logits do not count in the largest |z| (a -inf one
    leaves the lse finite and must not make the bound infinite)."""
    class_dim = class_dim_of(input)
    z = input.detach().to(torch.float64)
    gamma_k = _gamma(input.shape[class_dim], accumulation_dtype(input.dtype))
    finite_abs = torch.where(torch.isfinite(z), z.abs(), torch.zeros_like(z))
    return gamma_k * (1.0 + torch.logsumexp(z, dim=class_dim).abs() + finite_abs.amax(dim=class_dim))


def loss_tolerance(input, target, weight, ignore_index, reduction, eps) -> torch.Tensor:
    """Bound on |loss - float64 reference| (row-shaped for 'none', 0-dim otherwise)."""
    class_dim, z, a, lse, d_lse, gamma_k = _row_terms(input, target, weight, ignore_index, eps)
    mass = a.sum(dim=class_dim)
    weighted_abs = torch.where(a > 0, a * z.abs(), torch.zeros_like(a))  # 0 * inf is no error term
    row_tol = 2.0 * mass * d_lse.squeeze(class_dim) + gamma_k * weighted_abs.sum(dim=class_dim)
    if reduction == "none":
        return row_tol
    row_loss = reference_loss(input, target, weight, ignore_index, "none", eps)
    rows = row_loss.numel()
    gamma_n = _gamma(rows, accumulation_dtype(input.dtype))
    total_tol = row_tol.sum() + gamma_n * row_loss.abs().sum()
    if reduction == "sum":
        return total_tol
    denominator = _mean_denominator(input, target, weight, ignore_index)
    mean = row_loss.sum() / denominator
    return total_tol / denominator + gamma_n * mean.abs()


def _mean_denominator(input, target, weight, ignore_index) -> torch.Tensor:
    if is_probability_target(input, target):
        return torch.tensor(float(target.numel() // max(input.shape[class_dim_of(input)], 1)), dtype=torch.float64)
    t = target.to(torch.int64)
    valid = t != ignore_index
    safe = torch.where(valid, t, torch.zeros_like(t))
    w = torch.ones(max(input.shape[class_dim_of(input)], 1), dtype=torch.float64) if weight is None \
        else weight.to(torch.float64)
    return torch.where(valid, w[safe], torch.zeros_like(safe, dtype=torch.float64)).sum()


def upstream_per_row(input, target, weight, ignore_index, reduction, grad_output) -> torch.Tensor:
    """The gradient each row's loss receives: grad_output itself for 'none', g for 'sum', g / denom
    for 'mean' (float64, row-shaped)."""
    row_shape = list(input.shape)
    del row_shape[class_dim_of(input)]
    g = grad_output.to(torch.float64)
    if reduction == "mean":
        g = g / _mean_denominator(input, target, weight, ignore_index)
    return g.expand(row_shape)


def grad_tolerance(input, target, weight, ignore_index, reduction, eps, grad_output, ref_grad) -> torch.Tensor:
    """Elementwise bound on |grad_input - float64 reference gradient| (see the derivation above)."""
    class_dim, z, a, lse, d_lse, gamma_k = _row_terms(input, target, weight, ignore_index, eps)
    u = unit_roundoff(accumulation_dtype(input.dtype))
    u_in = unit_roundoff(input.dtype)
    mass = a.sum(dim=class_dim, keepdim=True)
    p = torch.exp(z - lse)
    g = upstream_per_row(input, target, weight, ignore_index, reduction, grad_output).abs().unsqueeze(class_dim)
    # Ignored rows get no gradient at all; their upstream may be inf (a mean over zero rows).
    g = torch.where(mass > 0, g, torch.zeros_like(g))
    # p == 0 (a -inf logit) contributes nothing, whatever |z - lse| is.
    p_error = torch.where(p > 0, p * (d_lse + u * (32.0 + (z - lse).abs())), torch.zeros_like(p))
    compute = g * (mass * p_error + 8.0 * u * (mass * p + a))
    compute = compute + g * mass * 4.0 * torch.finfo(accumulation_dtype(input.dtype)).tiny
    if reduction == "mean":
        rows = max(ref_grad.numel() // max(input.shape[class_dim], 1), 1)
        compute = compute + _gamma(rows, accumulation_dtype(input.dtype)) * ref_grad.abs()
    rounding = u_in * (ref_grad.abs() + compute) + torch.finfo(input.dtype).smallest_normal * u_in * 2.0
    return compute + rounding


def grad_output_like(loss_shape, gen) -> torch.Tensor:
    """A random, non-uniform upstream gradient (never all ones: that would hide per-row mistakes)."""
    return (0.5 + torch.rand(loss_shape, generator=gen, dtype=torch.float64)).to(torch.float32) * \
        torch.where(torch.rand(loss_shape, generator=gen) < 0.2, -1.0, 1.0)


# ----------------------------------------------------------------------------------------------------
# Comparison


def assert_within(actual: torch.Tensor, expected: torch.Tensor, tol: torch.Tensor, what: str) -> None:
    """|actual - expected| <= tol elementwise, with NaN exactly where the reference has NaN and
    infinities of the same sign; reports the worst element relative to its tolerance."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    tol = torch.as_tensor(tol, dtype=torch.float64).expand(e.shape)
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), f"{what}: NaN at {nan_a.nonzero().tolist()[:8]}, reference NaN at " \
        f"{nan_e.nonzero().tolist()[:8]}"
    inf_e = torch.isinf(e)
    assert torch.equal(torch.isinf(a), inf_e) and torch.equal(a[inf_e], e[inf_e]), \
        f"{what}: infinities differ: {a[inf_e | torch.isinf(a)].tolist()[:8]} vs {e[inf_e | torch.isinf(a)].tolist()[:8]}"
    finite = torch.isfinite(e)
    err = (a - e).abs()[finite]
    bound = tol[finite]
    if err.numel() == 0:
        return
    ratio = err / bound.clamp_min(torch.finfo(torch.float64).tiny)
    worst = int(ratio.argmax())
    assert bool((err <= bound).all()), (
        f"{what}: {int((err > bound).sum())} of {err.numel()} elements out of tolerance; worst: "
        f"actual {a[finite][worst].item()!r} vs reference {e[finite][worst].item()!r}, "
        f"error {err[worst].item():.3e} > bound {bound[worst].item():.3e} ({ratio[worst].item():.1f}x)"
    )
