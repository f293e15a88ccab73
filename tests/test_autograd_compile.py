"""Autograd, opcheck, torch.compile and autocast of the labelsmooth ops and the public API."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import labelsmooth_ext

from conftest import (
    REDUCTION_CODES,
    assert_within,
    class_weight,
    grad_output_like,
    grad_tolerance,
    loss_tolerance,
    lse_tolerance,
    op_backward,
    op_forward,
    probability_target,
    randn,
    reference_loss_and_grads,
)

FORWARD_NAME = "labelsmooth.ls_cross_entropy_forward"
BACKWARD_NAME = "labelsmooth.ls_cross_entropy_backward"


def _class_case(gen, shape=(5, 7), dtype=torch.float64, ignore=True):
    x = randn(shape, gen, dtype, 2.0)
    target = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=gen)
    if ignore:
        target.view(-1)[0] = -100
    return x, target


# ----------------------------------------------------------------------------------------------------
# gradcheck in float64


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("shape", [(6,), (5, 7), (3, 4, 5)], ids=str)
def test_gradcheck_class_targets(shape, weighted, reduction, gen):
    num_classes = shape[0] if len(shape) == 1 else shape[1]
    x = randn(shape, gen, torch.float64, 2.0).requires_grad_()
    target = torch.randint(0, num_classes, shape[1:] if len(shape) == 1 else shape[:1] + shape[2:], generator=gen)
    if target.dim():
        target.view(-1)[0] = 1  # the ignored class
        target.view(-1)[-1] = 2  # and a used row
    else:
        target.fill_(2)
    weight = class_weight(num_classes, gen, torch.float64) if weighted else None

    def loss(x):
        return labelsmooth_ext.cross_entropy(x, target, weight, ignore_index=1, reduction=reduction,
                                             label_smoothing=0.15)

    assert torch.autograd.gradcheck(loss, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_gradcheck_probability_targets_input_and_target(weighted, reduction, gen):
    x = randn((4, 6, 2), gen, torch.float64, 2.0).requires_grad_()
    target = probability_target((4, 6, 2), 1, gen, torch.float64, normalized=False).requires_grad_()
    weight = class_weight(6, gen, torch.float64) if weighted else None

    def loss(x, t):
        return labelsmooth_ext.cross_entropy(x, t, weight, reduction=reduction, label_smoothing=0.2)

    assert torch.autograd.gradcheck(loss, (x, target), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_probability_target_gradient_matches_pytorch(dtype, reduction, gen):
    """d loss / d target = g * (1 - eps) * w_c * (lse - z_c), compared with float64 PyTorch."""
    x = randn((5, 9), gen, dtype, 2.0).requires_grad_()
    target = probability_target((5, 9), 1, gen, dtype, normalized=True).requires_grad_()
    weight = class_weight(9, gen, dtype)
    grad_output = grad_output_like((5,) if reduction == "none" else (), gen)
    loss = labelsmooth_ext.cross_entropy(x, target, weight, reduction=reduction, label_smoothing=0.3)
    grad_x, grad_t = torch.autograd.grad(loss, (x, target), grad_output.to(loss.dtype))
    _, ref_x, ref_t = reference_loss_and_grads(x, target, weight, -100, reduction, 0.3, grad_output, target_grad=True)
    assert grad_t.dtype == target.dtype and grad_t.shape == target.shape
    assert_within(grad_x, ref_x, grad_tolerance(x, target, weight, -100, reduction, 0.3, grad_output, ref_x), "grad x")
    # Each element is g * (1-eps) * w_c * (lse - z_c): the lse error plus a few fp32 roundings of the
    # difference and the products, then one rounding to the target's dtype.
    z = x.detach().double()
    lse = torch.logsumexp(z, dim=1, keepdim=True)
    g = grad_output.double().expand(5).unsqueeze(1) / (5 if reduction == "mean" else 1)
    scale = g.abs() * 0.7 * weight.double()
    compute = scale * (lse_tolerance(x).unsqueeze(1) + 8 * 2.0**-24 * (lse.abs() + z.abs()))
    tol = compute + torch.finfo(dtype).eps / 2 * (ref_t.abs() + compute)
    assert_within(grad_t, ref_t, tol, "grad target")


def test_double_backward_is_an_error_or_correct(gen):
    """Double backward (e.g. a gradient penalty) is not part of the design: it must fail loudly, not
    drop the Hessian term. The penalty includes a term in x alone, so a graph that silently skips the
    loss's second derivative still runs -- and gives a wrong number."""
    x, target = _class_case(gen)
    x.requires_grad_()
    v = torch.randn(x.shape, generator=gen, dtype=torch.float64)

    def penalty_grad(loss_fn, x):
        loss = loss_fn(x, target, reduction="sum", label_smoothing=0.1)
        (grad,) = torch.autograd.grad(loss, x, create_graph=True)
        return torch.autograd.grad((grad * v).sum() + (x * x).sum(), x)[0]

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PyTorch's own "may be silently incorrect" warning
            ours = penalty_grad(labelsmooth_ext.cross_entropy, x)
    except RuntimeError as error:
        message = str(error)
        clear = ("ls_cross_entropy", "labelsmooth", "double backward")
        assert any(word in message for word in clear), f"unclear error for double backward: {message}"
        return
    expected = penalty_grad(F.cross_entropy, x.detach().clone().requires_grad_())
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------------
# opcheck


def _opcheck_samples(gen):
    """Forward arguments for opcheck: every dtype, shape, target kind, reduction and weight choice
    appears (a Latin-square walk over them, since each opcheck call traces the op several times),
    plus strided logits."""
    dtypes = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    shapes = ((7,), (4, 9), (2, 5, 3), (2, 6, 2, 3))
    target_kinds = ("int64", "int32", "uint8", "prob")
    samples = []
    for i in range(16):
        dtype, shape = dtypes[i % 4], shapes[(i + i // 4) % 4]
        kind, reduction = target_kinds[(i + 2 * (i // 4)) % 4], i % 3
        class_dim = 0 if len(shape) == 1 else 1
        num_classes = shape[class_dim]
        x = randn(shape, gen, dtype, 2.0)
        weight = class_weight(num_classes, gen, dtype) if i % 2 else None
        eps = (0.0, 0.1, 1.0)[i % 3 - 1]
        if kind == "prob":
            samples.append((x, probability_target(shape, class_dim, gen, dtype, normalized=bool(i % 2)), weight,
                            -100, eps, 0, (None, 3.0)[i % 2], reduction))
            continue
        rows = shape[:class_dim] + shape[class_dim + 1:]
        target = torch.randint(0, num_classes, rows, generator=gen)
        ignore_index = 255 if kind == "uint8" else -100
        if target.dim():
            target.view(-1)[0] = ignore_index
        target = target.to({"int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8}[kind])
        smoothing = 1 if num_classes > 1 and i % 4 == 1 else 0
        samples.append((x, target, weight, ignore_index, eps, smoothing, (None, 2.0)[i % 3 == 2], reduction))
    wide = randn((5, 12), gen, torch.float32)
    samples.append((wide[:, :7], torch.randint(0, 7, (5,), generator=gen), None, -100, 0.1, 0, None, 0))
    samples.append((randn((9, 4), gen).t(), torch.randint(0, 9, (4,), generator=gen).to(torch.uint8), None, 255, 0.1,
                    1, 2.5, 1))
    return samples


def test_opcheck_forward(gen):
    for args in _opcheck_samples(gen):
        x = args[0].detach().clone().requires_grad_() if args[0].is_contiguous() else args[0]
        torch.library.opcheck(op_forward(), (x,) + args[1:])


def test_opcheck_backward(gen):
    for args in _opcheck_samples(gen):
        x, target, weight, ignore_index, eps, smoothing, softcap, reduction = args
        loss, lse, mass = op_forward()(*args)
        grad_loss = grad_output_like(loss.shape, gen).to(loss.dtype)
        grad_lse = grad_output_like(lse.shape, gen).to(lse.dtype)
        for upstream_lse in (None, grad_lse):
            torch.library.opcheck(op_backward(), (grad_loss, upstream_lse, x, target, weight, lse, mass, ignore_index,
                                                  eps, smoothing, softcap, reduction))


# ----------------------------------------------------------------------------------------------------
# torch.compile


class GraphRecorder:
    """An aot_autograd backend that keeps the forward and backward graphs it is given."""

    def __init__(self):
        self.graphs = []

    def compiler(self, gm, example_inputs):
        from functorch.compile import make_boxed_func

        self.graphs.append(str(gm.graph))
        return make_boxed_func(gm.forward)

    def backend(self):
        from torch._dynamo.backends.common import aot_autograd

        return aot_autograd(fw_compiler=self.compiler, bw_compiler=self.compiler)


def _loss_fn(x, target, weight):
    return labelsmooth_ext.cross_entropy(x, target, weight, ignore_index=-100, reduction="mean", label_smoothing=0.1)


def _eager_and_compiled(compiled, x, target, weight):
    xe = x.detach().clone().requires_grad_()
    xc = x.detach().clone().requires_grad_()
    eager = _loss_fn(xe, target, weight)
    out = compiled(xc, target, weight)
    (ge,) = torch.autograd.grad(eager, xe)
    (gc,) = torch.autograd.grad(out, xc)
    return eager, out, ge, gc


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_fullgraph_calls_the_ops(dynamic, gen):
    torch._dynamo.reset()
    recorder = GraphRecorder()
    compiled = torch.compile(_loss_fn, backend=recorder.backend(), fullgraph=True, dynamic=dynamic)
    shapes = [(6, 11), (9, 11), (4, 13)] if dynamic else [(6, 11)]
    for shape in shapes:
        x, target = _class_case(gen, shape, torch.float32)
        weight = class_weight(shape[1], gen, torch.float32)
        eager, out, ge, gc = _eager_and_compiled(compiled, x, target, weight)
        # The same kernels run in both, on the same inputs: the same bits.
        assert torch.equal(eager, out), (eager, out)
        assert torch.equal(ge, gc)
    joined = "\n".join(recorder.graphs)
    assert FORWARD_NAME in joined and BACKWARD_NAME in joined, joined
    if dynamic:
        # one graph pair serves every shape (no recompilation per shape)
        assert len(recorder.graphs) == 2, f"{len(recorder.graphs)} graphs for {len(shapes)} shapes"


def test_compile_inductor_matches_eager(gen):
    torch._dynamo.reset()
    compiled = torch.compile(_loss_fn, fullgraph=True)
    x, target = _class_case(gen, (8, 37, 3), torch.bfloat16)
    weight = class_weight(37, gen, torch.bfloat16)
    eager, out, ge, gc = _eager_and_compiled(compiled, x, target, weight)
    assert out.dtype == torch.float32 and gc.dtype == torch.bfloat16
    assert torch.equal(eager, out) and torch.equal(ge, gc)


def test_compile_probability_targets_and_none_reduction(gen):
    torch._dynamo.reset()
    recorder = GraphRecorder()

    def fn(x, t):
        return labelsmooth_ext.cross_entropy(x, t, reduction="none", label_smoothing=0.25)

    compiled = torch.compile(fn, backend=recorder.backend(), fullgraph=True)
    x = randn((6, 10), gen, torch.float32).requires_grad_()
    t = probability_target((6, 10), 1, gen, torch.float32, normalized=True)
    g = grad_output_like((6,), gen)
    out = compiled(x, t)
    (gc,) = torch.autograd.grad(out, x, g)
    xe = x.detach().clone().requires_grad_()
    eager = fn(xe, t)
    (ge,) = torch.autograd.grad(eager, xe, g)
    assert torch.equal(out, eager) and torch.equal(gc, ge)
    assert FORWARD_NAME in "\n".join(recorder.graphs)


# ----------------------------------------------------------------------------------------------------
# autocast: low-precision logits are not upcast, fp32 logits are not downcast


class DtypeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "labelsmooth" in str(func):
            self.seen.append((str(func), args[0].dtype if func.__name__.startswith("ls_cross_entropy_forward")
                              else args[2].dtype))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("logits_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_autocast_keeps_the_logits_dtype(logits_dtype, gen):
    x = randn((6, 17), gen, logits_dtype).requires_grad_()
    target = torch.randint(0, 17, (6,), generator=gen)
    recorder = DtypeRecorder()
    with torch.autocast("cpu", dtype=torch.bfloat16), recorder:
        loss = labelsmooth_ext.cross_entropy(x, target, label_smoothing=0.1)
    with recorder:
        loss.backward()
    forward_dtypes = [d for name, d in recorder.seen if "forward" in name]
    backward_dtypes = [d for name, d in recorder.seen if "backward" in name]
    assert forward_dtypes == [logits_dtype] and backward_dtypes == [logits_dtype], recorder.seen
    assert loss.dtype == torch.float32 and x.grad.dtype == logits_dtype
    ref = F.cross_entropy(x.detach().double(), target, label_smoothing=0.1)
    assert_within(loss, ref, loss_tolerance(x, target, None, -100, "mean", 0.1), "loss")


def test_autocast_matmul_logits_reach_the_op_as_bf16(gen):
    """The usual LLM head: bf16 logits from an autocast matmul go straight to the kernel."""
    hidden = randn((8, 16), gen)
    head = randn((16, 40), gen).requires_grad_()
    target = torch.randint(0, 40, (8,), generator=gen)
    recorder = DtypeRecorder()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = hidden @ head
        with recorder:
            loss = labelsmooth_ext.cross_entropy(logits, target, reduction="sum", label_smoothing=0.1)
    assert logits.dtype == torch.bfloat16
    assert [d for _, d in recorder.seen] == [torch.bfloat16]
    ref = F.cross_entropy(logits.detach().double(), target, reduction="sum", label_smoothing=0.1)
    assert_within(loss, ref, loss_tolerance(logits, target, None, -100, "sum", 0.1), "loss")
    loss.backward()
    assert head.grad is not None and torch.isfinite(head.grad).all()


# ----------------------------------------------------------------------------------------------------
# The module


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_module_equals_functional(reduction, gen):
    x, target = _class_case(gen, (7, 12, 2), torch.float32)
    weight = class_weight(12, gen, torch.float32)
    module = labelsmooth_ext.CrossEntropyLoss(weight, ignore_index=-100, reduction=reduction, label_smoothing=0.2)
    xm, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_m = module(xm, target)
    out_f = labelsmooth_ext.cross_entropy(xf, target, weight, reduction=reduction, label_smoothing=0.2)
    assert torch.equal(out_m, out_f)
    g = grad_output_like(out_m.shape, gen)
    out_m.backward(g)
    out_f.backward(g)
    assert torch.equal(xm.grad, xf.grad)
    assert torch.equal(module.state_dict()["weight"], weight)


def test_op_outputs_are_fresh_and_inputs_untouched(gen):
    """Functional ops: nothing is written into the logits, target or weight."""
    x, target = _class_case(gen, (6, 9), torch.float32)
    weight = class_weight(9, gen, torch.float32)
    copies = [x.clone(), target.clone(), weight.clone()]
    loss, lse, mass = op_forward()(x, target, weight, -100, 0.1, 0, None, REDUCTION_CODES["none"])
    grad = op_backward()(torch.ones_like(loss), None, x, target, weight, lse, mass, -100, 0.1, 0, None,
                         REDUCTION_CODES["none"])
    for before, after in zip(copies, (x, target, weight)):
        assert torch.equal(before, after)
    assert grad.data_ptr() != x.data_ptr()
