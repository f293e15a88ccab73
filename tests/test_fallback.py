"""The pure-PyTorch fallback: it equals the compiled kernels, and backend selection works in a fresh
process (forced with LABELSMOOTH_BACKEND=python, after a failed load of the extension, and with a
bad value of the variable)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from labelsmooth_ext import _schemas, reference

from conftest import (
    REDUCTION_CODES,
    RUN_SEED,
    assert_within,
    grad_output_like,
    grad_tolerance,
    loss_tolerance,
    lse_tolerance,
    op_backward,
    op_forward,
    randn,
    reference_loss_and_grads,
    skip_unless_compiled,
)
from test_errors import _poisoned_logits
from test_matrix import CASES, build_case

REPO_ROOT = Path(__file__).resolve().parents[1]

# Every third case of the matrix design: every dtype, target kind, shape and layout still appears.
PARITY_CASES = CASES[::3]


@pytest.mark.parametrize("case", PARITY_CASES, ids=[f"case{i}" for i in range(len(PARITY_CASES))])
def test_reference_equals_compiled(case, gen):
    """Both are within the derived tolerance of float64, so they are within twice it of each other;
    compared directly, so that a shared mistake in the float64 comparison cannot hide a difference."""
    skip_unless_compiled()
    logits, target, weight, ignore_index, reduction, eps, grad_output = build_case(case, gen)
    code = REDUCTION_CODES[reduction]
    outputs = []
    for forward, backward in ((op_forward(), op_backward()),
                              (reference.ls_cross_entropy_forward, reference.ls_cross_entropy_backward)):
        loss, lse, mass = forward(logits, target, weight, ignore_index, eps, 0, None, code)
        grad = backward(grad_output.to(loss.dtype), None, logits, target, weight, lse, mass, ignore_index, eps, 0, None,
                        code)
        outputs.append((loss, lse, grad))
    (loss_c, lse_c, grad_c), (loss_r, lse_r, grad_r) = outputs
    assert loss_c.dtype == loss_r.dtype and lse_c.dtype == lse_r.dtype and grad_c.dtype == grad_r.dtype
    assert loss_c.shape == loss_r.shape and lse_c.shape == lse_r.shape and grad_c.shape == grad_r.shape
    _, ref_grad, _ = reference_loss_and_grads(logits, target, weight, ignore_index, reduction, eps, grad_output)
    assert_within(loss_c, loss_r, 2 * loss_tolerance(logits, target, weight, ignore_index, reduction, eps), "loss")
    assert_within(lse_c, lse_r, 2 * lse_tolerance(logits), "lse")
    grad_tol = grad_tolerance(logits, target, weight, ignore_index, reduction, eps, grad_output, ref_grad)
    assert_within(grad_c, grad_r, 2 * grad_tol, "grad_input")


def _expected_lse(capped: torch.Tensor) -> torch.Tensor:
    """What every backend gives as each row's lse: log sum exp in float64, which is -inf for a row of only -inf
    logits (as torch.logsumexp), and NaN for a row with a +inf or NaN logit (as PyTorch's log_softmax)."""
    poisoned = (torch.isnan(capped) | (capped == math.inf)).any(dim=1)
    return torch.where(poisoned, math.nan, torch.logsumexp(capped, dim=1))


@pytest.mark.parametrize("num_classes", [6, 12, 40, 20000],
                         ids=["few_classes", "class_major_forward", "row_major", "long_rows"])
@pytest.mark.parametrize("target_kind", ["index", "probability"])
@pytest.mark.parametrize("softcap", [None, 4.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reference_nonfinite_logits(dtype, softcap, target_kind, num_classes, gen):
    """NaN and infinite logits through the fallback on each of its paths (with class-index targets, class-major
    for few classes in both directions, and for a few more in the forward only), against float64 PyTorch: loss and
    gradient as in test_errors, and the lse of every row, finite or not."""
    x, target = _poisoned_logits(gen, dtype, num_classes)
    if target_kind == "probability":
        target = torch.rand(x.shape, generator=gen).to(dtype)
    grad_output = grad_output_like((7,), gen)
    loss, lse, mass = reference.ls_cross_entropy_forward(x, target, None, -100, 0.1, 0, softcap, 0)
    grad = reference.ls_cross_entropy_backward(grad_output, None, x, target, None, lse, mass, -100, 0.1, 0, softcap, 0)
    capped = x.double() if softcap is None else softcap * torch.tanh(x.double() / softcap)
    lse_tol = lse_tolerance(capped.to(dtype)).nan_to_num(nan=0.0)
    assert_within(lse, _expected_lse(capped), lse_tol, "lse")
    if softcap is not None:
        return  # the loss and gradient through the cap are test_options' subject; the lse above is this test's
    ref_loss, ref_grad, _ = reference_loss_and_grads(x, target, None, -100, "none", 0.1, grad_output)
    loss_tol = loss_tolerance(x, target, None, -100, "none", 0.1)
    grad_tol = grad_tolerance(x, target, None, -100, "none", 0.1, grad_output, ref_grad)
    assert_within(loss, ref_loss, loss_tol.nan_to_num(nan=0.0, posinf=0.0), "loss")
    assert_within(grad, ref_grad, grad_tol.nan_to_num(nan=0.0, posinf=0.0), "grad_input")


@pytest.mark.parametrize("num_classes", [6, 12, 40, 20000],
                         ids=["few_classes", "class_major_forward", "row_major", "long_rows"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reference_target_logit_far_below_the_others(dtype, weighted, num_classes, gen):
    """Rows whose target logit lies 100 to 300 below others (p_y < e^-88, a loss above 88): the forward sums
    exp(z_c - z_y), which overflows there, so these rows are recomputed from the row max, on each path of the
    fallback. Every row, these and ordinary ones, is within the tolerance of float64 PyTorch."""
    rows = 9
    x = randn((rows, num_classes), gen, torch.float64, scale=2.0)
    target = torch.randint(0, num_classes, (rows,), generator=gen)
    target[4] = -100
    far_rows = torch.tensor([0, 2, 5, 7])
    x[far_rows, target[far_rows]] = -torch.tensor([100.0, 150.0, 300.0, 120.0], dtype=torch.float64)
    x = x.to(dtype)
    assert bool(((x.double().amax(dim=1) - x.double()[torch.arange(rows), target.clamp(min=0)])[far_rows] > 88.8).all())
    weight = torch.rand(num_classes, generator=gen, dtype=torch.float64).add_(0.5).to(dtype) if weighted else None
    grad_output = grad_output_like((rows,), gen)
    loss, lse, mass = reference.ls_cross_entropy_forward(x, target, weight, -100, 0.1, 0, None, 0)
    grad = reference.ls_cross_entropy_backward(grad_output, None, x, target, weight, lse, mass, -100, 0.1, 0, None, 0)
    ref_loss, ref_grad, _ = reference_loss_and_grads(x, target, weight, -100, "none", 0.1, grad_output)
    assert_within(loss, ref_loss, loss_tolerance(x, target, weight, -100, "none", 0.1), "loss")
    valid = target != -100
    assert_within(lse[valid], torch.logsumexp(x.double(), dim=1)[valid], lse_tolerance(x)[valid], "lse")
    grad_tol = grad_tolerance(x, target, weight, -100, "none", 0.1, grad_output, ref_grad)
    assert_within(grad, ref_grad, grad_tol, "grad_input")


def test_reference_functions_compile_with_dynamic_shapes(gen):
    """torch.compile of the fallback's functions themselves, where no value of the data can steer them (no row is
    redone, no class-major path, no per-row shortcut): at 10 and then 1000 classes, the second call recompiling with
    symbolic shapes, loss, lse and gradient are within the tolerance of float64 PyTorch."""
    torch._dynamo.reset()
    forward = torch.compile(reference.ls_cross_entropy_forward)
    backward = torch.compile(reference.ls_cross_entropy_backward)
    for num_classes in (10, 1000):
        x = randn((64, num_classes), gen, torch.float32, scale=2.0)
        target = torch.randint(0, num_classes, (64,), generator=gen)
        target[::5] = -100
        grad_output = torch.tensor(-0.7)
        loss, lse, mass = forward(x, target, None, -100, 0.1, 0, None, REDUCTION_CODES["mean"])
        grad = backward(grad_output, None, x, target, None, lse, mass, -100, 0.1, 0, None, REDUCTION_CODES["mean"])
        ref_loss, ref_grad, _ = reference_loss_and_grads(x, target, None, -100, "mean", 0.1, grad_output)
        assert_within(loss, ref_loss, loss_tolerance(x, target, None, -100, "mean", 0.1), "loss")
        valid = target != -100
        assert_within(lse[valid], torch.logsumexp(x.double(), dim=1)[valid], lse_tolerance(x)[valid], "lse")
        assert bool((lse[~valid] == 0).all())
        grad_tol = grad_tolerance(x, target, None, -100, "mean", 0.1, grad_output, ref_grad)
        assert_within(grad, ref_grad, grad_tol, "grad_input")


@pytest.mark.parametrize("num_classes", [6, 40], ids=["few_classes", "row_major"])
def test_nonfinite_lse_same_on_compiled_kernels(num_classes, gen):
    """The compiled kernels give the non-finite rows the same lse as the fallback (_expected_lse)."""
    skip_unless_compiled()
    x, target = _poisoned_logits(gen, torch.float32, num_classes)
    _, lse, _ = op_forward()(x, target, None, -100, 0.1, 0, None, 0)
    assert_within(lse, _expected_lse(x.double()), lse_tolerance(x).nan_to_num(nan=0.0), "lse")


def test_python_schemas_equal_the_compiled_ones():
    skip_unless_compiled()
    for schema in _schemas.SCHEMAS:
        name = schema.split("(", 1)[0]
        compiled = str(getattr(torch.ops.labelsmooth, name).default._schema)
        assert compiled == f"{_schemas.NAMESPACE}::{schema}"


# ----------------------------------------------------------------------------------------------------
# Fresh processes

_BLOCK_COMPILED = """
import importlib.abc, sys
class _NoCompiledExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "labelsmooth_ext._C":
            raise ImportError("simulated: the compiled extension is missing")
sys.meta_path.insert(0, _NoCompiledExtension())
"""

_RUN_LOSS = """
import json, sys, warnings
import torch, torch.nn.functional as F
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import labelsmooth_ext
ours = [str(w.message) for w in caught if "labelsmooth" in str(w.message) or "labelsmooth" in w.filename]
info = labelsmooth_ext.backend_info()

gen = torch.Generator().manual_seed(int(sys.argv[1]))
x = torch.randn(6, 11, 3, generator=gen)
target = torch.randint(0, 11, (6, 3), generator=gen)
target[0, 0] = -100
weight = torch.rand(11, generator=gen) + 0.5
upstream = torch.rand(6, 3, generator=gen) + 0.5

def fn(x):
    return labelsmooth_ext.cross_entropy(x, target, weight, reduction="none", label_smoothing=0.15)

xe = x.clone().requires_grad_()
loss = fn(xe)
loss.backward(upstream)
xc = x.clone().requires_grad_()
compiled = torch.compile(fn, fullgraph=True)
loss_c = compiled(xc)
loss_c.backward(upstream)
torch.save({"x": x, "target": target, "weight": weight, "upstream": upstream, "loss": loss.detach(),
            "grad": xe.grad, "loss_compiled": loss_c.detach(), "grad_compiled": xc.grad}, sys.argv[2])
print(json.dumps({"info": info, "warnings": ours, "c_loaded": "labelsmooth_ext._C" in sys.modules}))
"""


def _run_python(code: str, env_value: str | None, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("LABELSMOOTH_BACKEND", None)
    if env_value is not None:
        env["LABELSMOOTH_BACKEND"] = env_value
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def _check_saved_run(path: Path):
    saved = torch.load(path)
    x, target, weight, upstream = saved["x"], saved["target"], saved["weight"], saved["upstream"]
    ref_loss, ref_grad, _ = reference_loss_and_grads(x, target, weight, -100, "none", 0.15, upstream)
    loss_tol = loss_tolerance(x, target, weight, -100, "none", 0.15)
    grad_tol = grad_tolerance(x, target, weight, -100, "none", 0.15, upstream, ref_grad)
    assert_within(saved["loss"], ref_loss, loss_tol, "eager loss")
    assert_within(saved["grad"], ref_grad, grad_tol, "eager grad")
    assert_within(saved["loss_compiled"], ref_loss, loss_tol, "compiled loss")
    assert_within(saved["grad_compiled"], ref_grad, grad_tol, "compiled grad")


def test_forced_python_backend(tmp_path):
    result = _run_python(_RUN_LOSS, "python", str(RUN_SEED), str(tmp_path / "run.pt"))
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["info"]["backend"] == "python"
    assert "LABELSMOOTH_BACKEND" in report["info"]["reason"], report["info"]["reason"]
    assert report["warnings"] == [], "choosing the fallback on purpose must not warn"
    assert not report["c_loaded"], "LABELSMOOTH_BACKEND=python must not load the compiled extension"
    _check_saved_run(tmp_path / "run.pt")


def test_failed_load_falls_back_with_one_warning(tmp_path):
    result = _run_python(_BLOCK_COMPILED + _RUN_LOSS, None, str(RUN_SEED), str(tmp_path / "run.pt"))
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["info"]["backend"] == "python"
    assert "simulated" in report["info"]["reason"], report["info"]["reason"]
    assert len(report["warnings"]) == 1, report["warnings"]
    message = report["warnings"][0]
    assert "simulated" in message and "pip install" in message, "the warning must say why and how to build"
    _check_saved_run(tmp_path / "run.pt")


def test_forced_compiled_backend_without_extension_is_an_error():
    result = _run_python(_BLOCK_COMPILED + "import labelsmooth_ext", "compiled")
    assert result.returncode != 0
    assert "ImportError" in result.stderr and "LABELSMOOTH_BACKEND" in result.stderr, result.stderr[-2000:]
    assert "simulated" in result.stderr


@pytest.mark.parametrize("value", ["bogus", "cuda"])
def test_unknown_backend_value_is_a_clear_error(value):
    result = _run_python("import labelsmooth_ext", value)
    assert result.returncode != 0, "an unknown LABELSMOOTH_BACKEND must not be ignored"
    last_line = result.stderr.strip().splitlines()[-1]
    assert "LABELSMOOTH_BACKEND" in last_line and value in last_line and "python" in last_line, last_line
