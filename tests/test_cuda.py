"""The CUDA kernels against float64 F.cross_entropy, against the CPU kernels, and under the ways the op
is used on GPUs: autograd, opcheck, torch.compile, CUDA graphs, side streams, > 2^31 elements. The loss
options the kernels implement (softcap, the 'others' convention, an upstream gradient of the lse, the saved
target mass) run through the op on the emulated suite's matrix, checked as it checks the emulated kernels.

Tolerances are those derived in conftest.py (loss_tolerance, grad_tolerance, lse_tolerance): the
CUDA kernels accumulate in fp32 (fp64 for fp64 logits) like the CPU kernels, and their exp is
within a few ulp plus |x| * u of exp(x) for the x <= 0 they evaluate, which the derivation's
"32 ulps + |z - lse| * u" per element covers. CUDA against CPU: each is within its bound of the
float64 reference, so they are within twice the bound of each other.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import (
    REDUCTION_CODES,
    assert_within,
    class_weight,
    grad_output_like,
    grad_tolerance,
    loss_tolerance,
    lse_tolerance,
    probability_target,
    randn,
    reference_loss_and_grads,
    unit_roundoff,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

import labelsmooth_ext  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emulation"))
import emulation  # noqa: E402
from test_emulated_matrix import MATRIX  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
REDUCTIONS = ("none", "mean", "sum")
IGNORE_MODES = ("none", "some", "all", "real_class")
EPSILONS = (0.0, 0.05, 1.0)
SHAPES = ("C", "NC", "NCdd", "sliced")


@pytest.fixture(autouse=True)
def _require_compiled_cuda_backend():
    info = labelsmooth_ext.backend_info()
    if info.get("backend") != "compiled":
        pytest.skip(f"compiled backend not active: {info.get('reason')}")


def forward_op():
    return torch.ops.labelsmooth.ls_cross_entropy_forward


def backward_op():
    return torch.ops.labelsmooth.ls_cross_entropy_backward


# ----------------------------------------------------------------------------------------------------
# Cases (built on the CPU with the test's generator, then copied to the GPU)


def make_logits(shape_kind, rows, classes, dtype, gen):
    if shape_kind == "C":
        return randn((classes,), gen, dtype, scale=2.0)
    if shape_kind == "NCdd":
        return randn((max(rows // 6, 1), classes, 2, 3), gen, dtype, scale=2.0)
    return randn((rows, classes), gen, dtype, scale=2.0)


def make_target(logits, ignore_mode, gen):
    """Class indices of the row shape and the ignore_index to use with them."""
    classes = logits.shape[0 if logits.dim() == 1 else 1]
    row_shape = logits.shape[1:] if logits.dim() == 1 else (logits.shape[0], *logits.shape[2:])
    target = torch.randint(0, classes, row_shape, generator=gen)
    ignore_index = -100
    if ignore_mode == "some":
        target[torch.rand(row_shape, generator=gen) < 0.3] = ignore_index
    elif ignore_mode == "all":
        target.fill_(ignore_index)
    elif ignore_mode == "real_class":
        ignore_index = int(torch.randint(0, classes, (), generator=gen))
    return target, ignore_index


def to_cuda(logits, shape_kind):
    """The logits on the GPU; 'sliced' reads rows of a wider buffer in place (row stride > C)."""
    if shape_kind != "sliced":
        return logits.cuda()
    wide = torch.empty(logits.shape[0], logits.shape[1] + 7, dtype=logits.dtype, device="cuda").normal_()
    wide[:, : logits.shape[1]] = logits.cuda()
    return wide[:, : logits.shape[1]]


def check_against_reference(x_cpu, target, weight, ignore_index, reduction, eps, gen, shape_kind="NC"):
    """Loss and input gradient through the public API on CUDA vs float64 F.cross_entropy; returns
    the CUDA (loss, grad) on the CPU."""
    x = to_cuda(x_cpu, shape_kind).requires_grad_()
    t = target.cuda()
    w = None if weight is None else weight.cuda()
    loss = labelsmooth_ext.cross_entropy(x, t, w, ignore_index=ignore_index, reduction=reduction,
                                         label_smoothing=eps)
    grad_out = grad_output_like(loss.shape, gen)
    (grad,) = torch.autograd.grad(loss, x, grad_out.cuda())
    loss, grad = loss.detach().cpu(), grad.cpu()
    assert grad.dtype == x_cpu.dtype and grad.shape == x_cpu.shape
    ref_loss, ref_grad, _ = reference_loss_and_grads(x_cpu, target, weight, ignore_index, reduction, eps, grad_out)
    assert_within(loss, ref_loss, loss_tolerance(x_cpu, target, weight, ignore_index, reduction, eps), "loss")
    all_ignored = not target.is_floating_point() and bool((target == ignore_index).all())
    if all_ignored:
        assert torch.count_nonzero(grad) == 0, "all rows ignored: the gradient must be zero (never NaN)"
    else:
        tol = grad_tolerance(x_cpu, target, weight, ignore_index, reduction, eps, grad_out, ref_grad)
        assert_within(grad, ref_grad, tol, "grad")
    return loss, grad


# ----------------------------------------------------------------------------------------------------
# Against float64 PyTorch


@pytest.mark.parametrize("shape_kind", SHAPES)
@pytest.mark.parametrize("eps", EPSILONS)
@pytest.mark.parametrize("ignore_mode", IGNORE_MODES)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_class_index_matrix(dtype, reduction, weighted, ignore_mode, eps, shape_kind, gen):
    for classes in (1, 10, 1000):
        x = make_logits(shape_kind, 37, classes, dtype, gen)
        target, ignore_index = make_target(x, ignore_mode, gen)
        weight = class_weight(classes, gen, torch.float32) if weighted else None
        check_against_reference(x, target, weight, ignore_index, reduction, eps, gen, shape_kind)


@pytest.mark.parametrize("classes", [32000, 128256, 1000003])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_large_vocabulary(dtype, reduction, classes, gen):
    x = randn((5, classes), gen, dtype, scale=3.0)
    target, ignore_index = make_target(x, "some", gen)
    target[0] = classes - 1  # the last class, at the far end of the row
    weight = class_weight(classes, gen, torch.float32)
    check_against_reference(x, target, weight, ignore_index, reduction, 0.05, gen)
    check_against_reference(x, target, None, ignore_index, reduction, 0.05, gen, "sliced")


@pytest.mark.parametrize("classes", [1, 10, 1000, 32000])
@pytest.mark.parametrize("shape_kind", ["NC", "NCdd"])
@pytest.mark.parametrize("eps", EPSILONS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_probability_targets(dtype, reduction, eps, shape_kind, classes, gen):
    x = make_logits(shape_kind, 12, classes, dtype, gen)
    for target_dtype in {dtype, torch.float32}:
        target = probability_target(x.shape, 1, gen, target_dtype, normalized=False)
        weight = class_weight(classes, gen, torch.float32)
        check_against_reference(x, target, weight, -100, reduction, eps, gen)
        check_against_reference(x, target, None, -100, reduction, eps, gen)


@pytest.mark.parametrize("shape_kind", ["NC", "NCdd", "sliced"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_lse_and_ignored_rows(dtype, shape_kind, gen):
    x_cpu = make_logits(shape_kind, 40, 3000, dtype, gen)
    target, ignore_index = make_target(x_cpu, "some", gen)
    x = to_cuda(x_cpu, shape_kind)
    loss, lse, _ = forward_op()(x, target.cuda(), None, ignore_index, 0.1, 0, None, REDUCTION_CODES["none"])
    assert lse.dtype == torch.float32 and loss.dtype == torch.float32
    ignored = target == ignore_index
    ref = torch.logsumexp(x_cpu.to(torch.float64), dim=1)
    assert_within(lse.cpu()[~ignored], ref[~ignored], lse_tolerance(x_cpu)[~ignored], "lse")
    assert torch.count_nonzero(lse.cpu()[ignored]) == 0 and torch.count_nonzero(loss.cpu()[ignored]) == 0


def test_nonfinite_logits_follow_pytorch(gen):
    x = randn((6, 50), gen, torch.float32)
    x[0, 3] = float("-inf")
    x[1, :] = float("-inf")
    x[2, 7] = float("nan")
    x[3, 9] = float("inf")
    target = torch.randint(0, 50, (6,), generator=gen)
    target[0] = 4
    for eps in (0.0, 0.1):
        loss, _, _ = forward_op()(x.cuda(), target.cuda(), None, -100, eps, 0, None, REDUCTION_CODES["none"])
        ref = torch.nn.functional.cross_entropy(x.double(), target, reduction="none", label_smoothing=eps)
        assert torch.equal(torch.isnan(loss.cpu()), torch.isnan(ref)), (loss, ref)
        assert torch.equal(torch.isinf(loss.cpu()), torch.isinf(ref)), (loss, ref)


@pytest.mark.parametrize("case", MATRIX, ids=emulation.Case.id)
def test_options_on_every_row_mapping(case, gen):
    """The emulated suite's cases (every row mapping x dtype x reduction, the options rotating through them)
    through the CUDA op, with the emulated suite's float64 reference and bounds."""
    inputs = emulation.make_inputs(case, gen)
    x, target = inputs.logits.cuda(), inputs.target.cuda()
    weight = None if inputs.weight is None else inputs.weight.cuda()
    options = (inputs.ignore_index, case.eps, emulation.SMOOTHING_CODES[case.smoothing], case.softcap,
               REDUCTION_CODES[case.reduction])
    loss, lse, target_mass = forward_op()(x, target, weight, *options)
    grad_lse = None if inputs.grad_lse is None else inputs.grad_lse.cuda()
    grad = backward_op()(inputs.grad_output.cuda(), grad_lse, x, target, weight, lse, target_mass, *options)
    probability = case.target != "index"
    assert target_mass.shape == (lse.shape if probability else (0,))
    result = emulation.Result(0, "", loss.cpu(), lse.cpu(), target_mass.cpu() if probability else None, grad.cpu())
    emulation.check(case, inputs, result)


# ----------------------------------------------------------------------------------------------------
# Against the CPU kernels


@pytest.mark.parametrize("shape_kind", ["C", "NC", "NCdd", "sliced"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_cuda_agrees_with_cpu(dtype, reduction, shape_kind, gen):
    eps = 0.1
    for classes in (10, 5000):
        x_cpu = make_logits(shape_kind, 30, classes, dtype, gen)
        target, ignore_index = make_target(x_cpu, "some", gen)
        weight = class_weight(classes, gen, torch.float32)
        grad_out = None
        results = {}
        for device in ("cpu", "cuda"):
            x = (x_cpu.clone() if device == "cpu" else to_cuda(x_cpu, shape_kind)).requires_grad_()
            loss = labelsmooth_ext.cross_entropy(x, target.to(device), weight.to(device), ignore_index=ignore_index,
                                                 reduction=reduction, label_smoothing=eps)
            if grad_out is None:
                grad_out = grad_output_like(loss.shape, gen)
            (grad,) = torch.autograd.grad(loss, x, grad_out.to(device))
            results[device] = (loss.detach().cpu(), grad.cpu())
        _, ref_grad, _ = reference_loss_and_grads(x_cpu, target, weight, ignore_index, reduction, eps, grad_out)
        loss_tol = loss_tolerance(x_cpu, target, weight, ignore_index, reduction, eps)
        grad_tol = grad_tolerance(x_cpu, target, weight, ignore_index, reduction, eps, grad_out, ref_grad)
        assert_within(results["cuda"][0], results["cpu"][0], 2 * loss_tol, "CUDA vs CPU loss")
        assert_within(results["cuda"][1], results["cpu"][1], 2 * grad_tol, "CUDA vs CPU grad")


# ----------------------------------------------------------------------------------------------------
# Determinism, streams, graphs, compile, opcheck


def run_ops(x, target, weight, ignore_index, eps, code, grad_loss):
    loss, lse, mass = forward_op()(x, target, weight, ignore_index, eps, 0, None, code)
    grad = backward_op()(grad_loss, None, x, target, weight, lse, mass, ignore_index, eps, 0, None, code)
    return loss, lse, grad


def ops_case(gen, rows=64, classes=50257, dtype=torch.bfloat16, code=REDUCTION_CODES["mean"]):
    x = randn((rows, classes), gen, dtype, scale=2.0).cuda()
    target, ignore_index = make_target(x.cpu(), "some", gen)
    weight = class_weight(classes, gen, torch.float32).cuda()
    grad_loss = grad_output_like((rows,) if code == REDUCTION_CODES["none"] else (), gen).cuda()
    return x, target.cuda(), weight, ignore_index, 0.1, code, grad_loss


@pytest.mark.parametrize("code", REDUCTION_CODES.values(), ids=REDUCTION_CODES.keys())
def test_deterministic_and_stream_independent(code, gen):
    args = ops_case(gen, code=code)
    first = run_ops(*args)
    again = run_ops(*args)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = run_ops(*args)
    torch.cuda.current_stream().wait_stream(side)
    for a, b, c in zip(first, again, on_side):
        assert torch.equal(a, b) and torch.equal(a, c), "results must be bitwise reproducible on any stream"


def test_side_stream_does_not_use_the_default_stream(gen):
    """Work is enqueued on the current stream: with the default stream blocked behind a long kernel,
    the side stream's results must still be right once it is synchronized."""
    args = ops_case(gen)
    expected = run_ops(*args)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(10_000_000)
        result = run_ops(*args)
        for tensor in result:
            tensor.record_stream(side)
    side.synchronize()
    for a, b in zip(expected, result):
        assert torch.equal(a, b)


@pytest.mark.parametrize("code", REDUCTION_CODES.values(), ids=REDUCTION_CODES.keys())
def test_cuda_graph_capture_and_replay(code, gen):
    x, target, weight, ignore_index, eps, code, grad_loss = ops_case(gen, rows=32, classes=32000, code=code)
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graphs requires
        run_ops(static_x, target, weight, ignore_index, eps, code, grad_loss)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run_ops(static_x, target, weight, ignore_index, eps, code, grad_loss)
    for _ in range(2):
        fresh = randn(x.shape, gen, x.dtype, scale=2.0).cuda()
        static_x.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        eager = run_ops(fresh, target, weight, ignore_index, eps, code, grad_loss)
        for a, b in zip(static_out, eager):
            assert torch.equal(a, b), "graph replay must compute what eager mode computes"


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(dynamic, gen):
    def loss_fn(x, target, weight):
        return labelsmooth_ext.cross_entropy(x, target, weight, ignore_index=-100, reduction="mean",
                                             label_smoothing=0.1)

    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=dynamic)
    for rows in (16, 24):
        x = randn((rows, 1000), gen, torch.bfloat16).cuda()
        target, _ = make_target(x.cpu(), "some", gen)
        target = target.cuda()
        weight = class_weight(1000, gen, torch.float32).cuda()
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        eager_loss, compiled_loss = loss_fn(xe, target, weight), compiled(xc, target, weight)
        (eager_grad,) = torch.autograd.grad(eager_loss, xe)
        (compiled_grad,) = torch.autograd.grad(compiled_loss, xc)
        assert torch.equal(eager_loss, compiled_loss) and torch.equal(eager_grad, compiled_grad)


def opcheck_samples(gen):
    samples = []
    for dtype in DTYPES.values():
        for code in REDUCTION_CODES.values():
            x = randn((8, 300), gen, dtype).cuda()
            target, ignore_index = make_target(x.cpu(), "some", gen)
            samples.append((x, target.cuda(), class_weight(300, gen, torch.float32).cuda(), ignore_index, 0.1, code))
        x = randn((4, 20, 3), gen, dtype).cuda()
        t = probability_target(x.shape, 1, gen, torch.float32, normalized=True).cuda()
        samples.append((x, t, None, -100, 0.2, REDUCTION_CODES["mean"]))
    return samples


@pytest.mark.parametrize("smoothing,softcap,with_grad_lse", [(0, None, False), (1, 3.0, True), (0, 2.0, True)],
                         ids=["plain", "others-softcap-grad_lse", "softcap-grad_lse"])
def test_opcheck_forward_and_backward(smoothing, softcap, with_grad_lse, gen):
    for x, target, weight, ignore_index, eps, code in opcheck_samples(gen):
        convention = smoothing if not target.is_floating_point() else 0  # 'others' is for class indices
        torch.library.opcheck(forward_op().default, (x, target, weight, ignore_index, eps, convention, softcap, code))
        loss, lse, mass = forward_op()(x, target, weight, ignore_index, eps, convention, softcap, code)
        grad_loss = grad_output_like(loss.shape, gen).cuda()
        grad_lse = grad_output_like(lse.shape, gen).cuda() if with_grad_lse else None
        torch.library.opcheck(backward_op().default, (grad_loss, grad_lse, x, target, weight, lse, mass, ignore_index,
                                                      eps, convention, softcap, code))


# ----------------------------------------------------------------------------------------------------
# Errors and sizes


def test_out_of_range_target_is_a_device_side_assert():
    """No host sync to check targets: the kernel asserts, which poisons the CUDA context, so this runs
    in a child process."""
    script = textwrap.dedent("""
        import torch, labelsmooth_ext
        x = torch.randn(4, 5, device="cuda")
        t = torch.tensor([0, 1, 7, 2], device="cuda")
        labelsmooth_ext.cross_entropy(x, t)
        torch.cuda.synchronize()
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "device-side assert" in result.stderr or "assert" in result.stderr.lower(), result.stderr[-2000:]


BIG_ROWS, BIG_CLASSES = 16384 + 3, 131072  # (2^31 + 3 * 2^17) bf16 logits: offsets beyond int32


def big_memory_available() -> bool:
    free, _ = torch.cuda.mem_get_info()
    need = 2 * BIG_ROWS * BIG_CLASSES * 2 + (1 << 30)  # logits + gradient (bf16) + slack
    return free >= need


@pytest.mark.skipif(not torch.cuda.is_available() or not big_memory_available(),
                    reason="needs ~10 GiB of free GPU memory")
def test_more_than_two_to_the_31_elements(gen):
    x = torch.empty(BIG_ROWS, BIG_CLASSES, dtype=torch.bfloat16, device="cuda").normal_()
    assert x.numel() > 2**31
    target = torch.randint(0, BIG_CLASSES, (BIG_ROWS,), device="cuda")
    target[-1] = BIG_CLASSES - 1
    x.requires_grad_()
    loss = labelsmooth_ext.cross_entropy(x, target, reduction="none", label_smoothing=0.1)
    grad_out = grad_output_like(loss.shape, gen).cuda()
    (grad,) = torch.autograd.grad(loss, x, grad_out)
    for rows in (slice(0, 2), slice(BIG_ROWS - 3, BIG_ROWS)):  # rows below and above the 2^31 offset
        x_rows, t_rows, g_rows = x.detach()[rows].cpu(), target[rows].cpu(), grad_out[rows].cpu()
        ref_loss, ref_grad, _ = reference_loss_and_grads(x_rows, t_rows, None, -100, "none", 0.1, g_rows)
        assert_within(loss.detach()[rows].cpu(), ref_loss, loss_tolerance(x_rows, t_rows, None, -100, "none", 0.1),
                      "loss")
        tol = grad_tolerance(x_rows, t_rows, None, -100, "none", 0.1, g_rows, ref_grad)
        assert_within(grad[rows].cpu(), ref_grad, tol, "grad")
    del grad
    # The mean of the same per-row losses: the two differ only by the reductions' rounding, a sum of
    # N terms and its denominator, each within gamma(N) = u * (4 sqrt(N) + 32) relative (conftest.py).
    mean = labelsmooth_ext.cross_entropy(x.detach(), target, reduction="mean", label_smoothing=0.1)
    expected = loss.detach().double().mean().cpu()
    gamma_n = unit_roundoff(torch.float32) * (4.0 * BIG_ROWS**0.5 + 32.0)
    assert_within(mean.cpu(), expected, 2.0 * gamma_n * expected.abs(), "mean over > 2^31 logits")
