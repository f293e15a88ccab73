"""The public API's eager route (labelsmooth_ext/_eager_autograd.py) against the dispatcher's route: the same
kernels and the same autograd formula, so the same bits; and every other context still reaching the
registered ops."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as forward_ad

import labelsmooth_ext
from labelsmooth_ext import _eager_autograd

from conftest import class_weight, grad_output_like, probability_target, randn
from test_autograd_compile import BACKWARD_NAME, FORWARD_NAME, DtypeRecorder


def _backward_node_names(output):
    """Names of every autograd node that `output` depends on."""
    names, pending, seen = set(), [output.grad_fn], set()
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        pending.extend(next_node for next_node, _ in node.next_functions)
    return names


def _case(gen, dtype, target_kind, weighted, reduction, options):
    shape = (6, 9, 2) if target_kind == "index" else (7, 11)
    x = randn(shape, gen, dtype, 2.0).requires_grad_()
    if target_kind == "index":
        target = torch.randint(0, shape[1], (shape[0], shape[2]), generator=gen)
        target[0, 0] = -100
    else:
        target = probability_target(shape, 1, gen, dtype, normalized=True).requires_grad_()
    weight = class_weight(shape[1], gen, torch.float32).requires_grad_() if weighted else None
    kwargs = dict(reduction=reduction, label_smoothing=0.1, **options)
    return x, target, weight, kwargs


def _loss_and_grads(x, target, weight, kwargs, gen_seed):
    """The loss (and lse) of the public call, and the gradients of every input that requires grad under a
    random upstream gradient drawn from gen_seed (the same for both routes)."""
    x, target = x.detach().clone().requires_grad_(), target.detach().clone().requires_grad_(target.requires_grad)
    weight = None if weight is None else weight.detach().clone().requires_grad_()
    outputs = labelsmooth_ext.cross_entropy(x, target, weight, **kwargs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    gen = torch.Generator().manual_seed(gen_seed)
    total = sum((out.double() * grad_output_like(out.shape, gen).double()).sum() for out in outputs)
    inputs = [t for t in (x, target, weight) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(total, inputs)
    return outputs, grads, set().union(*(_backward_node_names(out) for out in outputs))


@pytest.mark.parametrize("options", [{}, {"z_loss": 1e-3, "return_lse": True}, {"softcap": 3.0},
                                     {"normalizer": 5.0}], ids=["plain", "z_loss_lse", "softcap", "normalizer"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("target_kind", ["index", "probability"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_eager_route_gives_the_dispatchers_bits(dtype, target_kind, weighted, reduction, options, gen, monkeypatch):
    if "normalizer" in options and reduction != "mean":
        pytest.skip("normalizer replaces the mean's denominator only")
    x, target, weight, kwargs = _case(gen, dtype, target_kind, weighted, reduction, options)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    eager_outputs, eager_grads, eager_nodes = _loss_and_grads(x, target, weight, kwargs, seed)
    monkeypatch.setattr(_eager_autograd, "_is_plain_eager", lambda tensors: False)
    op_outputs, op_grads, op_nodes = _loss_and_grads(x, target, weight, kwargs, seed)
    # Each route really ran: its own autograd node, not the other's.
    assert "_EagerForwardBackward" in eager_nodes and not any("GeneratedBackward" in n for n in eager_nodes)
    assert "_EagerForwardBackward" not in op_nodes and any("GeneratedBackward" in n for n in op_nodes)
    assert len(eager_grads) == len(op_grads) == 1 + (target_kind == "probability") + weighted
    for ours, theirs in zip(eager_outputs + eager_grads, op_outputs + op_grads):
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs), (ours, theirs)


def test_parameters_take_the_eager_route(gen, monkeypatch):
    """Learned class weights (and logits) are nn.Parameters: plain tensors to the dispatcher, so the eager route
    serves them, with the dispatcher route's bits."""
    x, target, weight, kwargs = _case(gen, torch.float32, "index", True, "mean", {})
    logits, class_weight_param = torch.nn.Parameter(x.detach().clone()), torch.nn.Parameter(weight.detach().clone())
    results = []
    for route in ("eager", "dispatcher"):
        if route == "dispatcher":
            monkeypatch.setattr(_eager_autograd, "_is_plain_eager", lambda tensors: False)
        loss = labelsmooth_ext.cross_entropy(logits, target, class_weight_param, **kwargs)
        nodes = _backward_node_names(loss)
        assert ("_EagerForwardBackward" in nodes) == (route == "eager"), nodes
        results.append((loss, *torch.autograd.grad(loss, (logits, class_weight_param))))
    for ours, theirs in zip(*results):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_eager_route_without_autograd(context, gen):
    x, target, weight, kwargs = _case(gen, torch.float32, "index", True, "mean", {"return_lse": True})
    expected = labelsmooth_ext.cross_entropy(x, target, weight, **kwargs)
    guard = torch.no_grad() if context == "no_grad" else torch.inference_mode()
    with guard:
        loss, lse = labelsmooth_ext.cross_entropy(x.detach().clone(), target, weight.detach(), **kwargs)
    assert loss.grad_fn is None and lse.grad_fn is None
    assert torch.equal(loss, expected[0]) and torch.equal(lse, expected[1])


def test_dispatch_modes_still_see_the_ops(gen):
    """Profilers, FLOP counters and tracers work by dispatch modes: with one active the call must reach the
    registered ops (forward and backward), not run below them."""
    x, target, weight, kwargs = _case(gen, torch.float32, "index", False, "mean", {})
    recorder = DtypeRecorder()
    with recorder:
        labelsmooth_ext.cross_entropy(x, target, weight, **kwargs).backward()
    names = [name for name, _ in recorder.seen]
    assert any(FORWARD_NAME in n for n in names) and any(BACKWARD_NAME in n for n in names), names


@pytest.mark.parametrize("requires_grad", [False, True], ids=["plain_dual", "dual_requiring_grad"])
def test_forward_mode_ad_is_a_clear_error(requires_grad, gen):
    """The loss has no jvp rule: a dual input must raise, never give a loss without its tangent."""
    x, target, weight, kwargs = _case(gen, torch.float32, "index", False, "mean", {})
    with forward_ad.dual_level():
        primal = x.detach().clone().requires_grad_(requires_grad)
        dual = forward_ad.make_dual(primal, torch.randn(x.shape, generator=gen))
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            labelsmooth_ext.cross_entropy(dual, target, weight, **kwargs)
    # Outside a dual level the same call works.
    assert torch.isfinite(labelsmooth_ext.cross_entropy(x, target, weight, **kwargs))
