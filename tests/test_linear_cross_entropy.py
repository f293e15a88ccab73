"""labelsmooth_ext.linear_cross_entropy against F.cross_entropy(F.linear(x, W, b), t, ...) in float64.

The matrix covers every reduction, class weights, ignore_index (none, some, all rows, ignored rows spanning whole
chunks, an ignore_index that is a real class), eps in {0, 0.1, 1}, (N, H), (B, T, H) and (H) input, V not a
multiple of the chunk, one row, bias or not, fp32, bf16 and fp64, both code paths (gradients computed in the
forward for 'mean'/'sum', recomputed in the backward for 'none' and under return_lse), several chunk sizes.

Reference and tolerances (derived, see below): the float64 reference on the very same rounded inputs.
Reference: F.cross_entropy(F.linear(x, W, b), t, ...) in float64 on the very same (already rounded) inputs,
differentiated by autograd with respect to x, W, b and the logits.

Tolerances, on top of conftest.py's for cross-entropy (u_in: unit roundoff of the input dtype, u: of the
accumulation dtype, gamma(n) = u (4 sqrt(n) + 32) as in conftest.py):

* Logits: each chunk's GEMM accumulates H products in the accumulation dtype and rounds once to the input
  dtype: |dz_rc| <= delta_rc = u_in |z_rc| + gamma(H) M_rc, with M = |x| |W|^T + |b|.
* Loss of a row: conftest's bound for cross-entropy of the rounded logits, plus the first-order effect of dz:
  d loss_r = sum_c (A_r p_rc - a_rc) dz_rc, at most 2 A_r max_c delta_rc (A_r = sum_c a_rc, the row's mass).
* Gradient of the logits G = g_r (A_r p - a): conftest's bound (kernel arithmetic, rounding to the input
  dtype), plus the effect of dz on p: |dp_c| <= 2 p_c max delta, so |g_r| A_r p_rc 2 max_c delta_rc.
* grad_input = G W (a GEMM over V, rounded to the input dtype, then scaled by the upstream gradient rounded
  to the input dtype, and rounded again): T_G |W| + (gamma(V) + 3 u_in) |G| |W|. grad_linear_weight = G^T x
  summed over the rows, per chunk rounded to the input dtype for bf16/fp16, accumulated in fp32, scaled and
  rounded once more:
  T_G^T |x| + (gamma(N) + 3 u_in) |G|^T |x|. grad_linear_bias likewise with x = 1.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import labelsmooth_ext
from labelsmooth_ext import _linear_ops

from conftest import (
    RUN_SEED,
    _gamma,
    accumulation_dtype,
    assert_within,
    class_weight,
    grad_output_like,
    grad_tolerance,
    loss_tolerance,
    randn,
    smoothed_coefficients,
    unit_roundoff,
    upstream_per_row,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def reference(x, W, b, t, weight, ignore_index, reduction, eps, upstream):
    """(loss, grad_x, grad_W, grad_b or None, logits, grad_logits) in float64; x of shape (N, H), t of (N)."""
    leaves = [v.detach().to(torch.float64).requires_grad_() for v in (x, W) + ((b,) if b is not None else ())]
    z = F.linear(leaves[0], leaves[1], leaves[2] if b is not None else None)
    loss = F.cross_entropy(z, t.to(torch.int64), None if weight is None else weight.to(torch.float64),
                           ignore_index=ignore_index, reduction=reduction, label_smoothing=eps)
    grads = torch.autograd.grad(loss, leaves + [z], upstream.to(torch.float64))
    grad_b = grads[2] if b is not None else None
    return loss.detach(), grads[0], grads[1], grad_b, z.detach(), grads[-1]


def tolerances(x, W, b, t, weight, ignore_index, reduction, eps, upstream, ref):
    """(loss, grad_x, grad_W, grad_b) bounds, for x (N, H), t (N); see the module docstring."""
    loss_ref, _, _, _, z, grad_z = ref
    dtype = x.dtype
    acc = accumulation_dtype(dtype)
    u_in = unit_roundoff(dtype)
    rows, features = x.shape
    classes = W.shape[0]
    x_abs, w_abs = x.detach().to(torch.float64).abs(), W.detach().to(torch.float64).abs()
    magnitude = x_abs @ w_abs.T + (0.0 if b is None else b.detach().to(torch.float64).abs())
    delta = u_in * z.abs() + _gamma(features, acc) * magnitude
    delta_max = delta.amax(dim=1, keepdim=True) if classes else delta.sum(dim=1, keepdim=True)
    z_seen = z.to(dtype)
    a = smoothed_coefficients(z_seen, t, weight, ignore_index, eps)
    mass = a.sum(dim=1, keepdim=True)

    row_tol = loss_tolerance(z_seen, t, weight, ignore_index, "none", eps) + 2.0 * (mass * delta_max).squeeze(1)
    if reduction == "none":
        loss_tol = row_tol
    else:
        row_loss = F.cross_entropy(z, t.to(torch.int64), None if weight is None else weight.to(torch.float64),
                                   ignore_index=ignore_index, reduction="none", label_smoothing=eps)
        loss_tol = row_tol.sum() + _gamma(rows, acc) * row_loss.abs().sum()
        if reduction == "mean":
            valid = t != ignore_index
            w = torch.ones(classes, dtype=torch.float64) if weight is None else weight.to(torch.float64)
            denominator = torch.where(valid, w[torch.where(valid, t, 0).to(torch.int64)], 0.0).sum()
            loss_tol = loss_tol / denominator + _gamma(rows, acc) * loss_ref.abs()

    g = upstream_per_row(z_seen, t, weight, ignore_index, reduction, upstream).abs().unsqueeze(1)
    g = torch.where(mass > 0, g, torch.zeros_like(g))
    p = torch.softmax(z, dim=1)
    grad_z_tol = grad_tolerance(z_seen, t, weight, ignore_index, reduction, eps, upstream, grad_z) \
        + g * mass * p * 2.0 * delta_max
    grad_abs = grad_z.abs()
    grad_x_tol = grad_z_tol @ w_abs + (_gamma(classes, acc) + 3 * u_in) * (grad_abs @ w_abs)
    grad_w_tol = grad_z_tol.T @ x_abs + (_gamma(rows, acc) + 3 * u_in) * (grad_abs.T @ x_abs)
    grad_b_tol = grad_z_tol.sum(dim=0) + (_gamma(rows, acc) + 3 * u_in) * grad_abs.sum(dim=0)
    return loss_tol, grad_x_tol, grad_w_tol, grad_b_tol


# ----------------------------------------------------------------------------------------------------
# Cases


def make_case(gen, row_shape, features, classes, dtype, *, bias=True, weighted=False, ignore="some",
              ignore_index=-100, chunk=None):
    """(x, W, b, t, weight, ignore_index). ignore: 'none', 'some' (about a third of the rows), 'all', 'chunks'
    (the rows of the first two chunks and of the last one: whole chunks without a valid row), 'class' (the
    ignore_index is class 1, a real class that some rows have)."""
    x = randn(tuple(row_shape) + (features,), gen, dtype, 1.0)
    W = randn((classes, features), gen, dtype, 2.0 / features ** 0.5)
    b = randn((classes,), gen, dtype, 0.5) if bias else None
    t = torch.randint(0, classes, tuple(row_shape), generator=gen)
    flat = t.view(-1)
    if ignore == "some":
        flat[torch.rand(flat.shape, generator=gen) < 0.35] = ignore_index
    elif ignore == "all":
        flat.fill_(ignore_index)
    elif ignore == "chunks":
        flat[: 2 * chunk] = ignore_index
        flat[-chunk:] = ignore_index
    elif ignore == "class":
        ignore_index = 1
    weight = class_weight(classes, gen, torch.float32) if weighted else None
    return x, W, b, t, weight, ignore_index


def check_against_reference(x, W, b, t, weight, ignore_index, reduction, eps, gen, chunk_size=None, **options):
    """Loss and the three gradients of linear_cross_entropy, within the derived tolerances of the reference."""
    leaves = [v.clone().requires_grad_() for v in (x, W) + ((b,) if b is not None else ())]
    bias = leaves[2] if b is not None else None
    out = labelsmooth_ext.linear_cross_entropy(leaves[0], leaves[1], t, linear_bias=bias, weight=weight,
                                               reduction=reduction, ignore_index=ignore_index, label_smoothing=eps,
                                               chunk_size=chunk_size, **options)
    loss = out[0] if isinstance(out, tuple) else out
    assert loss.dtype == accumulation_dtype(x.dtype)
    assert loss.shape == (t.shape if reduction == "none" else ())
    upstream = grad_output_like(loss.shape, gen)
    grads = torch.autograd.grad(loss, leaves, upstream.to(loss.dtype))
    for leaf, grad in zip(leaves, grads):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape

    rows_x, rows_t = x.reshape(-1, x.shape[-1]), t.reshape(-1)
    rows_up = upstream.reshape(-1) if reduction == "none" else upstream
    ref = reference(rows_x, W, b, rows_t, weight, ignore_index, reduction, eps, rows_up)
    loss_tol, x_tol, w_tol, b_tol = tolerances(rows_x, W, b, rows_t, weight, ignore_index, reduction, eps, rows_up,
                                               ref)
    assert_within(loss.reshape(-1) if reduction == "none" else loss, ref[0], loss_tol, "loss")
    assert_within(grads[0].reshape(rows_x.shape), ref[1], x_tol, "grad_input")
    assert_within(grads[1], ref[2], w_tol, "grad_linear_weight")
    if b is not None:
        assert_within(grads[2], ref[3], b_tol, "grad_linear_bias")
    return loss, grads


# (dtype, row_shape, H, V, bias, weighted, ignore, eps, reduction, chunk_size): a covering walk, so that every
# value of every axis appears with several of the others.
MATRIX = [
    (torch.float32, (37,), 16, 53, True, False, "some", 0.1, "mean", 8),
    (torch.float32, (37,), 16, 53, True, False, "some", 0.1, "sum", None),
    (torch.float32, (37,), 16, 53, True, False, "some", 0.1, "none", 5),
    (torch.float32, (4, 9), 24, 101, False, True, "some", 0.0, "mean", 7),
    (torch.float32, (4, 9), 24, 101, True, True, "class", 1.0, "sum", 36),
    (torch.float32, (4, 9), 24, 101, False, True, "none", 0.1, "none", None),
    (torch.float32, (1,), 8, 300, True, False, "none", 0.1, "mean", None),
    (torch.float32, (), 8, 300, True, True, "none", 0.1, "sum", 1),
    (torch.float32, (), 8, 300, False, False, "none", 1.0, "none", 3),
    (torch.float32, (40,), 12, 33, True, True, "chunks", 0.1, "mean", 6),
    (torch.float32, (40,), 12, 33, False, False, "chunks", 0.0, "none", 6),
    (torch.float32, (40,), 12, 33, True, False, "all", 0.1, "mean", 9),
    (torch.float32, (40,), 12, 33, True, True, "all", 0.1, "sum", 9),
    (torch.float32, (40,), 12, 33, True, False, "all", 1.0, "none", None),
    (torch.bfloat16, (2, 21), 32, 97, True, False, "some", 0.1, "mean", 10),
    (torch.bfloat16, (2, 21), 32, 97, False, True, "some", 1.0, "none", None),
    (torch.bfloat16, (2, 21), 32, 97, True, True, "class", 0.0, "sum", 4),
    (torch.bfloat16, (1,), 16, 64, True, False, "none", 0.1, "sum", None),
    (torch.float16, (19,), 16, 45, True, True, "some", 0.1, "mean", 4),
    (torch.float64, (3, 5), 6, 11, True, True, "some", 0.1, "mean", 2),
    (torch.float64, (3, 5), 6, 11, False, False, "chunks", 1.0, "none", 2),
]


@pytest.mark.parametrize("case", MATRIX, ids=[f"case{i}" for i in range(len(MATRIX))])
def test_matches_float64_reference(case, gen):
    dtype, row_shape, features, classes, bias, weighted, ignore, eps, reduction, chunk = case
    x, W, b, t, weight, ignore_index = make_case(gen, row_shape, features, classes, dtype, bias=bias,
                                                 weighted=weighted, ignore=ignore, chunk=chunk or 1)
    check_against_reference(x, W, b, t, weight, ignore_index, reduction, eps, gen, chunk_size=chunk)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_recompute_path_matches_reference(reduction, gen):
    """return_lse sends 'mean' and 'sum' through the path that recomputes the logits in the backward."""
    x, W, b, t, weight, ignore_index = make_case(gen, (29,), 16, 41, torch.float32, weighted=True)
    check_against_reference(x, W, b, t, weight, ignore_index, reduction, 0.1, gen, chunk_size=6, return_lse=True)


def test_all_rows_ignored(gen):
    """'mean' over no rows is NaN with a zero gradient (as PyTorch); 'sum' is 0 with a zero gradient."""
    x, W, b, t, _, ignore_index = make_case(gen, (12,), 8, 19, torch.float32, ignore="all")
    for reduction, expected in (("mean", float("nan")), ("sum", 0.0)):
        leaves = [v.clone().requires_grad_() for v in (x, W, b)]
        loss = labelsmooth_ext.linear_cross_entropy(leaves[0], leaves[1], t, linear_bias=leaves[2],
                                                    reduction=reduction, label_smoothing=0.1, chunk_size=5)
        assert torch.equal(loss, torch.tensor(expected)) or (loss.isnan() and expected != expected), loss
        loss.backward()
        for leaf in leaves:
            assert torch.equal(leaf.grad, torch.zeros_like(leaf)), f"{reduction}: nonzero gradient with no valid row"


# ----------------------------------------------------------------------------------------------------
# Chunking


def test_chunk_rows_automatic():
    """1/LOGITS_FRACTION of the logits per chunk, at most CHUNK_BYTES, at least MIN_CHUNK_ROWS rows."""
    f32 = torch.float32
    assert _linear_ops.chunk_rows(4096, 32000, f32, 0) == 4096 // _linear_ops.LOGITS_FRACTION
    assert _linear_ops.chunk_rows(1 << 20, 128256, f32, 0) == _linear_ops.CHUNK_BYTES // (128256 * 4)
    assert _linear_ops.chunk_rows(1 << 20, 128256, torch.bfloat16, 0) == _linear_ops.CHUNK_BYTES // (128256 * 2)
    assert _linear_ops.chunk_rows(100, 32000, f32, 0) == _linear_ops.MIN_CHUNK_ROWS
    assert _linear_ops.chunk_rows(100, 32000, f32, 7) == 7


def test_chunk_size_does_not_change_the_result(gen):
    """Several chunk sizes (1 row, V not a multiple of anything, all rows in one chunk, automatic): each within the
    derived tolerance of the reference, so any two within the sum of theirs; compared directly too (loss and
    gradients for a unit upstream gradient)."""
    x, W, b, t, weight, ignore_index = make_case(gen, (3, 23), 16, 67, torch.float32, weighted=True)
    chunks = (1, 7, 69, None)
    for chunk in chunks:
        check_against_reference(x, W, b, t, weight, ignore_index, "mean", 0.1, gen, chunk_size=chunk)
    results = []
    for chunk in chunks:
        leaves = [v.clone().requires_grad_() for v in (x, W, b)]
        loss = labelsmooth_ext.linear_cross_entropy(leaves[0], leaves[1], t, linear_bias=leaves[2], weight=weight,
                                                    ignore_index=ignore_index, label_smoothing=0.1, chunk_size=chunk)
        results.append((loss.detach(),) + torch.autograd.grad(loss, leaves))
    rows_x, rows_t = x.reshape(-1, 16), t.reshape(-1)
    unit = torch.ones((), dtype=torch.float64)
    ref = reference(rows_x, W, b, rows_t, weight, ignore_index, "mean", 0.1, unit)
    loss_tol, x_tol, w_tol, b_tol = tolerances(rows_x, W, b, rows_t, weight, ignore_index, "mean", 0.1, unit, ref)
    names = ("loss", "grad_input", "grad_linear_weight", "grad_linear_bias")
    for chunk, result in zip(chunks[1:], results[1:]):
        for name, value, first, tol in zip(names, result, results[0], (loss_tol, x_tol.reshape(x.shape), w_tol,
                                                                       b_tol)):
            assert_within(value, first, 2 * tol, f"{name}, chunk_size={chunk} vs 1")


# ----------------------------------------------------------------------------------------------------
# Options, against our unfused path (linear, then labelsmooth_ext.cross_entropy, itself tested in test_options.py)


OPTIONS = [
    {"z_loss": 1e-2},
    {"softcap": 2.5},
    {"smoothing": "others"},
    {"normalizer": 13.0},
    {"normalizer": "tensor"},
    {"return_lse": True},
    {"z_loss": 3e-3, "return_z_loss": True},
    {"z_loss": 1e-3, "softcap": 4.0, "smoothing": "others", "return_lse": True},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "+".join(o))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_options_match_unfused(options, reduction, gen):
    """In float64 both paths agree to a few ulp: the only differences are the GEMMs' blocking (gamma(H) of the
    logits' magnitude, differentiated through the loss) and the order of the sums."""
    if "normalizer" in options and reduction != "mean":
        pytest.skip("a normaliser replaces the mean's denominator")
    options = dict(options)
    if options.get("normalizer") == "tensor":
        options["normalizer"] = torch.tensor(9.5, dtype=torch.float64)
    x, W, b, t, weight, ignore_index = make_case(gen, (3, 11), 10, 29, torch.float64, weighted=True)
    outputs = []
    for fused in (True, False):
        leaves = [v.clone().requires_grad_() for v in (x, W, b)]
        kwargs = dict(weight=weight, reduction=reduction, ignore_index=ignore_index, label_smoothing=0.1, **options)
        if fused:
            out = labelsmooth_ext.linear_cross_entropy(leaves[0], leaves[1], t, linear_bias=leaves[2], chunk_size=4,
                                                       **kwargs)
        else:
            logits = F.linear(leaves[0], leaves[1], leaves[2])
            out = labelsmooth_ext.cross_entropy(logits.flatten(0, 1), t.flatten(), **kwargs)
            if isinstance(out, tuple):
                out = tuple(o.view(t.shape) if o.dim() else o for o in out)
            elif out.dim():
                out = out.view(t.shape)
        out = out if isinstance(out, tuple) else (out,)
        # every output gets its own random upstream gradient, so a returned lse or z-loss part is differentiated too
        upstreams = [grad_output_like(o.shape, torch.Generator().manual_seed(RUN_SEED + i)).to(o.dtype)
                     for i, o in enumerate(out)]
        grads = torch.autograd.grad(out, leaves, upstreams)
        outputs.append((out, grads))
    (fused_out, fused_grads), (plain_out, plain_grads) = outputs
    assert len(fused_out) == len(plain_out)
    # Every output is a chain of sums over at most N * V * H products of O(1) terms (the inputs are O(1), the
    # softmax at most 1): each path's error is below gamma(N V H) times the largest magnitude, + 1 for the
    # O(1) terms that cancel.
    bound = 2 * _gamma(t.numel() * W.shape[0] * W.shape[1], torch.float64)
    for a, e in zip(fused_out + fused_grads, plain_out + plain_grads):
        assert a.shape == e.shape and a.dtype == e.dtype
        assert_within(a, e, bound * (1 + e.abs().amax()), "fused vs unfused")


def test_inference_and_module_match_training_path(gen):
    """Without grad (the row path, no gradient work) and through LinearCrossEntropyLoss: the same loss (each within
    the derived tolerance of the reference, so within twice it of each other)."""
    x, W, b, t, weight, ignore_index = make_case(gen, (2, 17), 12, 31, torch.float32, weighted=True)
    options = dict(weight=weight, ignore_index=ignore_index, label_smoothing=0.1, chunk_size=5)
    trained = labelsmooth_ext.linear_cross_entropy(x, W.requires_grad_(), t, linear_bias=b, **options)
    with torch.no_grad():
        inferred = labelsmooth_ext.linear_cross_entropy(x, W, t, linear_bias=b, **options)
    module = labelsmooth_ext.LinearCrossEntropyLoss(weight, ignore_index=ignore_index, label_smoothing=0.1,
                                                    chunk_size=5)
    assert "label_smoothing=0.1" in repr(module) and "chunk_size=5" in repr(module)
    from_module = module(x, W, t, b)
    tol = loss_tolerance(F.linear(x, W, b).flatten(0, 1).detach(), t.flatten(), weight, ignore_index, "mean", 0.1)
    assert_within(inferred, trained.detach(), 2 * tol, "no_grad")
    assert torch.equal(from_module.detach(), trained.detach())


# ----------------------------------------------------------------------------------------------------
# Autograd, opcheck, compile, export


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("options", [{}, {"z_loss": 0.05, "softcap": 2.0}, {"return_lse": True}],
                         ids=["plain", "z_loss+softcap", "lse"])
def test_gradcheck(reduction, options, gen):
    x, W, b, t, weight, ignore_index = make_case(gen, (7,), 4, 9, torch.float64, weighted=True)
    t[0] = ignore_index

    def loss(x, W, b):
        out = labelsmooth_ext.linear_cross_entropy(x, W, t, linear_bias=b, weight=weight, reduction=reduction,
                                                   label_smoothing=0.2, chunk_size=3, **options)
        return out

    assert torch.autograd.gradcheck(loss, [v.requires_grad_() for v in (x, W, b)])


def test_double_backward_is_refused(gen):
    """Never a silently wrong second derivative: the row path refuses it when it is taken, the path that computed
    the gradients in the forward (they would act as constants) as soon as create_graph=True asks for a graph."""
    x, W, b, t, _, _ = make_case(gen, (6,), 4, 7, torch.float64)
    x_ = x.clone().requires_grad_()
    loss = labelsmooth_ext.linear_cross_entropy(x_, W, t, linear_bias=b, reduction="none").sum()
    (grad,) = torch.autograd.grad(loss, x_, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(grad.sum(), x_)
    loss = labelsmooth_ext.linear_cross_entropy(x_, W, t, linear_bias=b, reduction="mean")
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(loss, x_, create_graph=True)


def _op_samples(gen):
    x, W, b, t, weight, ignore_index = make_case(gen, (9,), 5, 11, torch.float32, weighted=True)
    return x, W, b, t, weight, ignore_index


def test_opcheck(gen):
    x, W, b, t, weight, ignore_index = _op_samples(gen)
    x.requires_grad_()
    W.requires_grad_()
    ops = torch.ops.labelsmooth
    for bias in (b.requires_grad_(), None):
        denominator = torch.tensor(4.0)
        torch.library.opcheck(ops.linear_cross_entropy_with_grads,
                              (x, W, bias, t, weight, denominator, ignore_index, 0.1, 0, None, 1e-3, 4))
        torch.library.opcheck(ops.linear_cross_entropy_rows, (x, W, bias, t, weight, ignore_index, 0.1, 1, 3.0, 0))
        loss, lse = ops.linear_cross_entropy_rows(x, W, bias, t, weight, ignore_index, 0.1, 1, 3.0, 0)
        grad_loss = torch.rand(loss.shape, generator=gen)
        torch.library.opcheck(ops.linear_cross_entropy_rows_backward,
                              (grad_loss, lse.detach() * 0.1, x.detach(), W.detach(), None if bias is None else
                               bias.detach(), t, weight, lse.detach(), ignore_index, 0.1, 1, 3.0, 2))


@pytest.mark.parametrize("reduction, dynamic", [("mean", False), ("none", False), ("mean", True)])
def test_compile_fullgraph(reduction, dynamic, gen):
    x, W, b, t, weight, ignore_index = make_case(gen, (3, 8), 8, 21, torch.float32, weighted=True)

    def step(x, W, b):
        loss = labelsmooth_ext.linear_cross_entropy(x, W, t, linear_bias=b, weight=weight, reduction=reduction,
                                                    ignore_index=ignore_index, label_smoothing=0.1, z_loss=1e-3,
                                                    chunk_size=5)
        return loss.sum()

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, dynamic=dynamic)):
        leaves = [v.clone().requires_grad_() for v in (x, W, b)]
        loss = fn(*leaves)
        results.append((loss.detach(),) + torch.autograd.grad(loss, leaves))
    # The compiled graph runs the same fused op, but the reductions around it (the mean's denominator, the z-loss
    # terms) may be summed in another order: each result is within the derived tolerance of the reference.
    rows_x, rows_t = x.reshape(-1, 8), t.reshape(-1)
    upstream = torch.ones(t.shape if reduction == "none" else ()).reshape(-1 if reduction == "none" else ())
    ref = reference(rows_x, W, b, rows_t, weight, ignore_index, reduction, 0.1, upstream)
    tols = tolerances(rows_x, W, b, rows_t, weight, ignore_index, reduction, 0.1, upstream, ref)
    loss_tol = tols[0].sum() + 1e-3 * ref[4].logsumexp(dim=1).square().sum() * _gamma(t.numel(), torch.float32) * 4
    for eager, compiled, tol in zip(*results, (loss_tol, tols[1].reshape(x.shape), tols[2], tols[3])):
        assert_within(compiled, eager, 2 * tol, "compiled vs eager")


def test_export(gen):
    x, W, b, t, weight, ignore_index = make_case(gen, (2, 6), 8, 13, torch.float32)

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 13)
            self.loss = labelsmooth_ext.LinearCrossEntropyLoss(label_smoothing=0.1, chunk_size=4)

        def forward(self, x, t):
            return self.loss(x, self.proj.weight, t, self.proj.bias)

    model = Head()
    exported = torch.export.export(model, (x, t))
    assert "linear_cross_entropy" in str(exported.graph)
    assert torch.equal(exported.module()(x, t), model(x, t))


# ----------------------------------------------------------------------------------------------------
# Errors


def _valid_args(gen):
    x, W, b, t, _, _ = make_case(gen, (2, 5), 6, 9, torch.float32)
    return x, W, b, t


@pytest.mark.parametrize("change, error, pattern", [
    (lambda x, W, b, t: (x[..., :5], W, b, t), RuntimeError, r"input has 5 features .* expects 6"),
    (lambda x, W, b, t: (x, W.unsqueeze(1), b, t), RuntimeError, r"linear_weight must have shape \(V, H\)"),
    (lambda x, W, b, t: (x, W, b[:8], t), RuntimeError, r"linear_bias must have shape \[9\].*got \[8\]"),
    (lambda x, W, b, t: (x, W.double(), b, t), RuntimeError, r"linear_weight has dtype torch.float64 but input has "
                                                             r"torch.float32"),
    (lambda x, W, b, t: (x, W, b.half(), t), RuntimeError, r"linear_bias has dtype torch.float16"),
    (lambda x, W, b, t: (x, W, b, t[:, :4]), RuntimeError, r"expected target of shape \[2, 5\].*got \[2, 4\]"),
    (lambda x, W, b, t: (x, W, b, t.float()), NotImplementedError, r"class-probability targets"),
    (lambda x, W, b, t: (x.int(), W, b, t), NotImplementedError, r"input must be float16, bfloat16, float32 or "
                                                                 r"float64, got torch.int32"),
], ids=["features", "weight_dim", "bias_length", "weight_dtype", "bias_dtype", "target_shape", "probabilities",
        "input_dtype"])
def test_bad_shapes_and_dtypes(change, error, pattern, gen):
    x, W, b, t = change(*_valid_args(gen))
    with pytest.raises(error, match=pattern):
        labelsmooth_ext.linear_cross_entropy(x, W, t, linear_bias=b)


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, True, "8"])
def test_bad_chunk_size(chunk_size, gen):
    x, W, b, t = _valid_args(gen)
    with pytest.raises(ValueError, match=rf"chunk_size must be None \(automatic\) or a positive number of rows, got "
                                         rf"{chunk_size!r}"):
        labelsmooth_ext.linear_cross_entropy(x, W, t, chunk_size=chunk_size)


def test_bad_target_value_and_options(gen):
    x, W, b, t = _valid_args(gen)
    t[1, 2] = 9
    with pytest.raises(IndexError, match=r"\b9\b"):
        labelsmooth_ext.linear_cross_entropy(x, W, t, chunk_size=3)
    t[1, 2] = 0
    with pytest.raises(NotImplementedError, match="class weights"):
        labelsmooth_ext.linear_cross_entropy(x, W, t, weight=torch.ones(9, requires_grad=True))
    with pytest.raises(RuntimeError, match=r"weight must be a 1-D tensor with one entry per class \(9 classes"):
        labelsmooth_ext.linear_cross_entropy(x, W, t, weight=torch.ones(8))
    with pytest.raises(ValueError, match="reduction"):
        labelsmooth_ext.linear_cross_entropy(x, W, t, reduction="avg")
    with pytest.raises(ValueError, match="normalizer"):
        labelsmooth_ext.linear_cross_entropy(x, W, t, reduction="sum", normalizer=3.0)


# ----------------------------------------------------------------------------------------------------
# The Python fallback runs the same fused ops on the reference kernels


_FALLBACK_RUN = r"""
import sys, torch, labelsmooth_ext
assert labelsmooth_ext.backend_info()["backend"] == "python"
case = torch.load(sys.argv[1])
out = {}
for reduction in ("mean", "none"):
    leaves = [case[k].clone().requires_grad_() for k in ("x", "W", "b")]
    loss = labelsmooth_ext.linear_cross_entropy(leaves[0], leaves[1], case["t"], linear_bias=leaves[2],
                                                weight=case["weight"], reduction=reduction, label_smoothing=0.1,
                                                chunk_size=4)
    grads = torch.autograd.grad(loss, leaves, case["upstream_" + reduction])
    out[reduction] = (loss.detach(),) + grads
torch.save(out, sys.argv[2])
"""


def test_python_fallback_gives_the_same(gen, tmp_path):
    """Each backend within the derived tolerance of the reference, so within twice it of each other."""
    x, W, b, t, weight, ignore_index = make_case(gen, (3, 7), 8, 23, torch.float32, weighted=True)
    upstreams = {"mean": torch.tensor(1.3), "none": grad_output_like(t.shape, gen)}
    torch.save({"x": x, "W": W, "b": b, "t": t, "weight": weight, "upstream_mean": upstreams["mean"],
                "upstream_none": upstreams["none"]}, tmp_path / "case.pt")
    env = dict(os.environ, LABELSMOOTH_BACKEND="python")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    result = subprocess.run([sys.executable, "-c", _FALLBACK_RUN, str(tmp_path / "case.pt"), str(tmp_path / "out.pt")],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    fallback = torch.load(tmp_path / "out.pt")
    for reduction in ("mean", "none"):
        leaves = [v.clone().requires_grad_() for v in (x, W, b)]
        loss = labelsmooth_ext.linear_cross_entropy(leaves[0], leaves[1], t, linear_bias=leaves[2], weight=weight,
                                                    reduction=reduction, label_smoothing=0.1, chunk_size=4)
        here = (loss.detach(),) + torch.autograd.grad(loss, leaves, upstreams[reduction])
        rows_up = upstreams[reduction].reshape(-1) if reduction == "none" else upstreams[reduction]
        rows_x, rows_t = x.reshape(-1, 8), t.reshape(-1)
        ref = reference(rows_x, W, b, rows_t, weight, ignore_index, reduction, 0.1, rows_up)
        tols = tolerances(rows_x, W, b, rows_t, weight, ignore_index, reduction, 0.1, rows_up, ref)
        shapes = (here[0].shape, x.shape, W.shape, b.shape)
        for name, ours, theirs, tol, shape in zip(("loss", "grad_input", "grad_linear_weight", "grad_linear_bias"),
                                                  here, fallback[reduction], tols, shapes):
            assert_within(ours, theirs, 2 * tol.reshape(shape), f"{reduction} {name}: compiled vs fallback")
