"""A drop-in for PyTorch's cross-entropy: the same signature and defaults, the same module class hierarchy and
state, the argument forms PyTorch accepts, torch.func transforms (grad, vmap with a real batching rule,
jacrev, per-sample gradients), TorchScript (trace works, script fails clearly), and clear messages when
the compiled extension is missing, stale, or has no CUDA kernels."""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jacrev, vmap
from torch.utils._python_dispatch import TorchDispatchMode

import labelsmooth_ext

from conftest import (
    assert_within,
    class_weight,
    grad_output_like,
    grad_tolerance,
    loss_tolerance,
    randn,
    reference_loss_and_grads,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
FORWARD_OP = torch.ops.labelsmooth.ls_cross_entropy_forward.default


def _case(gen, shape=(7, 6), dtype=torch.float64, ignore=True):
    x = randn(shape, gen, dtype, scale=2.0)
    classes = shape[0] if len(shape) == 1 else shape[1]
    row_shape = shape[1:] if len(shape) == 1 else (shape[0], *shape[2:])
    target = torch.randint(0, classes, row_shape, generator=gen)
    if ignore and target.dim() > 0:
        target.view(-1)[0] = -100
    return x, target


# ----------------------------------------------------------------------------------------------------
# Signature, defaults, module


def _parameters(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_functional_signature_and_defaults_are_pytorchs():
    """PyTorch's parameters first, in order, with PyTorch's defaults; our options after them, keyword-only."""
    ours, theirs = _parameters(labelsmooth_ext.cross_entropy), _parameters(F.cross_entropy)
    assert ours[: len(theirs)] == theirs
    assert all(kind == inspect.Parameter.KEYWORD_ONLY for _, kind, _ in ours[len(theirs):])


def test_module_signature_and_defaults_are_pytorchs():
    ours = _parameters(labelsmooth_ext.CrossEntropyLoss.__init__)
    theirs = _parameters(torch.nn.CrossEntropyLoss.__init__)
    assert ours[: len(theirs)] == theirs
    assert all(kind == inspect.Parameter.KEYWORD_ONLY for _, kind, _ in ours[len(theirs):])


@pytest.mark.parametrize("weighted", [False, True])
def test_defaults_do_not_smooth(weighted, gen):
    """Swapping nn.CrossEntropyLoss() for ours must not change the loss: the default is no smoothing."""
    x, target = _case(gen, dtype=torch.float32)
    weight = class_weight(6, gen, torch.float32) if weighted else None
    ref = F.cross_entropy(x.double(), target, None if weight is None else weight.double())
    tol = loss_tolerance(x, target, weight, -100, "mean", 0.0)
    assert_within(labelsmooth_ext.cross_entropy(x, target, weight), ref, tol, "functional default")
    assert_within(labelsmooth_ext.CrossEntropyLoss(weight)(x, target), ref, tol, "module default")
    # Soft targets that are already smoothed are not smoothed again.
    soft = torch.rand(x.shape, generator=gen).softmax(dim=1)
    assert_within(labelsmooth_ext.cross_entropy(x, soft), F.cross_entropy(x.double(), soft.double()),
                  loss_tolerance(x, soft, None, -100, "mean", 0.0), "soft targets, default")


def test_positional_arguments_in_pytorchs_order(gen):
    x, target = _case(gen)
    weight = class_weight(6, gen, torch.float64)
    ours = labelsmooth_ext.cross_entropy(x, target, weight, None, -100, None, "sum", 0.1)
    ref = F.cross_entropy(x, target, weight, None, -100, None, "sum", 0.1)
    assert_within(ours, ref, loss_tolerance(x, target, weight, -100, "sum", 0.1), "positional")
    module = labelsmooth_ext.CrossEntropyLoss(weight, None, -100, None, "none", 0.1)
    assert module.reduction == "none" and module.label_smoothing == 0.1


@pytest.mark.parametrize("size_average,reduce", [(False, None), (True, None), (None, False), (True, True)])
def test_legacy_size_average_and_reduce_like_pytorch(size_average, reduce, gen):
    x, target = _case(gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ref = F.cross_entropy(x, target, size_average=size_average, reduce=reduce, label_smoothing=0.1)
        ours = labelsmooth_ext.cross_entropy(x, target, size_average=size_average, reduce=reduce, label_smoothing=0.1)
        module = labelsmooth_ext.CrossEntropyLoss(size_average=size_average, reduce=reduce, label_smoothing=0.1)
        torch_module = torch.nn.CrossEntropyLoss(size_average=size_average, reduce=reduce, label_smoothing=0.1)
    assert module.reduction == torch_module.reduction
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-12)


def test_module_is_a_torch_cross_entropy_loss_with_its_state(gen):
    weight = class_weight(6, gen, torch.float32)
    ours = labelsmooth_ext.CrossEntropyLoss(weight, ignore_index=3, reduction="sum", label_smoothing=0.1)
    theirs = torch.nn.CrossEntropyLoss(weight, ignore_index=3, reduction="sum", label_smoothing=0.1)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert repr(ours) == repr(theirs) and ours.extra_repr() == theirs.extra_repr()
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight"]
    assert torch.equal(ours.state_dict()["weight"], theirs.state_dict()["weight"])
    # Checkpoints move both ways.
    fresh = labelsmooth_ext.CrossEntropyLoss(torch.ones(6), ignore_index=3, reduction="sum", label_smoothing=0.1)
    fresh.load_state_dict(theirs.state_dict())
    assert torch.equal(fresh.weight, weight)
    theirs.load_state_dict(ours.state_dict())
    x, target = _case(gen, dtype=torch.float32, ignore=False)
    assert_within(ours(x, target), theirs.double()(x.double(), target),
                  loss_tolerance(x, target, weight, 3, "sum", 0.1), "module with weight and ignore_index")


def test_module_rejects_bad_arguments_at_construction():
    with pytest.raises(RuntimeError, match="label_smoothing"):
        labelsmooth_ext.CrossEntropyLoss(label_smoothing=1.5)
    with pytest.raises(ValueError, match="reduction"):
        labelsmooth_ext.CrossEntropyLoss(reduction="average")
    with pytest.raises(TypeError, match="weight"):
        labelsmooth_ext.CrossEntropyLoss(weight=[1.0, 2.0])


@pytest.mark.parametrize("value", [torch.tensor(0.1), torch.tensor(0.1, dtype=torch.float64), torch.tensor(1),
                                   torch.tensor(True)])
def test_zero_dim_tensor_label_smoothing_like_pytorch(value, gen):
    x, target = _case(gen)
    ref = F.cross_entropy(x, target, label_smoothing=value)
    eps = float(value)
    assert_within(labelsmooth_ext.cross_entropy(x, target, label_smoothing=value), ref,
                  loss_tolerance(x, target, None, -100, "mean", eps), "0-dim tensor label_smoothing")
    assert_within(labelsmooth_ext.CrossEntropyLoss(label_smoothing=value)(x, target), ref,
                  loss_tolerance(x, target, None, -100, "mean", eps), "module, 0-dim tensor label_smoothing")


@pytest.mark.parametrize("value", [torch.tensor([0.1]), torch.tensor(0.1, requires_grad=True)])
def test_label_smoothing_tensors_pytorch_rejects_are_rejected(value, gen):
    x, target = _case(gen)
    with pytest.raises(TypeError):
        F.cross_entropy(x, target, label_smoothing=value)
    with pytest.raises(TypeError, match="label_smoothing"):
        labelsmooth_ext.cross_entropy(x, target, label_smoothing=value)


@pytest.mark.parametrize("logits_dtype,weight_dtype", [(torch.float32, torch.float64), (torch.bfloat16, torch.float32),
                                                       (torch.float32, torch.bfloat16)])
def test_weight_of_another_dtype_is_used_in_the_accumulation_dtype(logits_dtype, weight_dtype, gen):
    """PyTorch requires weight in the logits' dtype; we accept any floating dtype (documented), so fp32 weights
    with bf16 logits work without an upcast of the logits. The value is that of the weight as given."""
    x, target = _case(gen, dtype=logits_dtype)
    weight = class_weight(6, gen, weight_dtype)
    with pytest.raises(RuntimeError, match="expected scalar type"):
        F.cross_entropy(x, target, weight)
    ours = labelsmooth_ext.cross_entropy(x, target, weight, label_smoothing=0.1)
    ref = F.cross_entropy(x.double(), target, weight.double(), label_smoothing=0.1)
    assert_within(ours, ref, loss_tolerance(x, target, weight, -100, "mean", 0.1), "mixed-dtype weight")


def test_class_last_logits_get_a_hint(gen):
    logits = randn((2, 3, 11), gen)
    labels = torch.randint(0, 11, (2, 3), generator=gen)
    with pytest.raises(RuntimeError, match=r"flatten\(0, -2\)"):
        labelsmooth_ext.cross_entropy(logits, labels)
    with pytest.raises(RuntimeError, match=r"flatten\(0, -2\)"):
        FORWARD_OP(logits, labels, None, -100, 0.0, 0, None, 1)
    ours = labelsmooth_ext.cross_entropy(logits.flatten(0, -2), labels.flatten(), label_smoothing=0.1)
    ref = F.cross_entropy(logits.double().transpose(1, 2), labels, label_smoothing=0.1)
    assert_within(ours, ref, loss_tolerance(logits.flatten(0, -2), labels.flatten(), None, -100, "mean", 0.1),
                  "the recipe of the hint")


# ----------------------------------------------------------------------------------------------------
# torch.func


class _OpCalls(TorchDispatchMode):
    """Records the labelsmooth ops that reach the dispatcher below functorch, with their input shapes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "labelsmooth":
            self.calls.append((func.__name__, tuple(args[1 if "backward" in func.__name__ else 0].shape)))
        return func(*args, **(kwargs or {}))


def _per_sample(fn, *args):
    return torch.stack([fn(*[a[i] for a in args]) for i in range(args[0].shape[0])])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_torch_func_grad_and_jacrev(reduction, weighted, gen):
    x, target = _case(gen, (6, 5, 2))
    weight = class_weight(5, gen, torch.float64) if weighted else None
    ours = grad(lambda z: labelsmooth_ext.cross_entropy(z, target, weight, reduction=reduction,
                                                         label_smoothing=0.1))(x)
    ones = torch.ones((), dtype=torch.float64)
    _, ref, _ = reference_loss_and_grads(x, target, weight, -100, reduction, 0.1, ones)
    assert_within(ours, ref, grad_tolerance(x, target, weight, -100, reduction, 0.1, ones, ref), "grad")
    jac = jacrev(lambda z: labelsmooth_ext.cross_entropy(z, target, weight, reduction="none",
                                                          label_smoothing=0.1))(x)
    ref_jac = jacrev(lambda z: F.cross_entropy(z, target, weight, reduction="none", label_smoothing=0.1))(x)
    assert jac.shape == ref_jac.shape
    assert torch.allclose(jac, ref_jac, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("sample_shape", [(5,), (4, 5), (4, 5, 3)], ids=["C", "NC", "NCd"])
@pytest.mark.parametrize("weighted", [False, True])
def test_vmap_uses_one_batched_call(reduction, sample_shape, weighted, gen):
    batch = 3
    x = randn((batch, *sample_shape), gen, torch.float64, scale=2.0)
    target_shape = (batch,) if len(sample_shape) == 1 else (batch, sample_shape[0], *sample_shape[2:])
    target = torch.randint(0, 5, target_shape, generator=gen)
    target.view(-1)[1] = -100
    weight = class_weight(5, gen, torch.float64) if weighted else None

    def ours(z, t):
        return labelsmooth_ext.cross_entropy(z, t, weight, reduction=reduction, label_smoothing=0.1)

    def theirs(z, t):
        return F.cross_entropy(z, t, weight, reduction=reduction, label_smoothing=0.1)

    with _OpCalls() as recorded:
        batched = vmap(ours)(x, target)
    rows = batch * (sample_shape[0] if len(sample_shape) > 1 else 1)
    assert [name for name, _ in recorded.calls] == ["ls_cross_entropy_forward.default"], recorded.calls
    assert recorded.calls[0][1][0] == rows, "the vmapped dim must be folded into the rows of one call"
    expected = _per_sample(theirs, x, target)
    assert batched.shape == expected.shape
    assert torch.allclose(batched, expected, rtol=1e-12, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_per_sample_gradients_vmap_of_grad(reduction, weighted, gen):
    """What Opacus-style training does: one gradient per sample, each against float64 PyTorch."""
    x = randn((4, 3, 7), gen, torch.float64, scale=2.0)
    target = torch.randint(0, 7, (4, 3), generator=gen)
    target[1, 2] = -100
    weight = class_weight(7, gen, torch.float64) if weighted else None

    def ours(z, t):
        return labelsmooth_ext.cross_entropy(z, t, weight, reduction=reduction, label_smoothing=0.1)

    def theirs(z, t):
        return F.cross_entropy(z, t, weight, reduction=reduction, label_smoothing=0.1)

    per_sample = vmap(grad(ours))(x, target)
    expected = _per_sample(grad(theirs), x, target)
    assert torch.allclose(per_sample, expected, rtol=1e-10, atol=1e-12)


def test_per_sample_gradients_probability_targets(gen):
    x = randn((5, 6), gen, torch.float64)
    soft = torch.rand((5, 6), generator=gen, dtype=torch.float64).softmax(dim=1)

    def ours(z, t):
        return labelsmooth_ext.cross_entropy(z, t, label_smoothing=0.1)

    def theirs(z, t):
        return F.cross_entropy(z, t, label_smoothing=0.1)

    assert torch.allclose(vmap(grad(ours))(x, soft), _per_sample(grad(theirs), x, soft), rtol=1e-10, atol=1e-12)
    assert torch.allclose(grad(ours, argnums=1)(x[0], soft[0]), grad(theirs, argnums=1)(x[0], soft[0]),
                          rtol=1e-10, atol=1e-12)


def test_vmap_over_weights_is_a_clear_error(gen):
    x, target = _case(gen, (3, 4))
    weights = torch.rand(3, 4, generator=gen, dtype=torch.float64) + 0.5
    with pytest.raises(NotImplementedError, match="weights"):
        vmap(lambda w: labelsmooth_ext.cross_entropy(x, target, w))(weights)


def test_double_backward_under_torch_func_is_a_clear_error(gen):
    x, target = _case(gen, (3, 4))
    with pytest.raises(NotImplementedError, match="double backward"):
        grad(lambda z: grad(lambda y: labelsmooth_ext.cross_entropy(y, target, label_smoothing=0.1))(z).sum())(x)


# ----------------------------------------------------------------------------------------------------
# TorchScript


def test_jit_script_of_the_module_says_what_to_use_instead():
    with pytest.raises(RuntimeError, match="torch.compile"):
        torch.jit.script(labelsmooth_ext.CrossEntropyLoss(label_smoothing=0.1))


def test_jit_trace_records_the_op_without_tracer_warnings(gen):
    class ModelWithLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(5, 6)
            self.criterion = labelsmooth_ext.CrossEntropyLoss(label_smoothing=0.1)

        def forward(self, a, t):
            return self.criterion(self.linear(a), t)

    model = ModelWithLoss()
    x, target = randn((8, 5), gen), torch.randint(0, 6, (8,), generator=gen)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(model, (x, target))
    package_dir = os.path.dirname(os.path.abspath(labelsmooth_ext.__file__))
    ours = [w for w in caught
            if os.path.abspath(w.filename).startswith(package_dir) or issubclass(w.category, torch.jit.TracerWarning)]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]
    # The trace generalizes: new data and another batch size give our loss, not a baked-in constant.
    x2, target2 = randn((3, 5), gen), torch.randint(0, 6, (3,), generator=gen)
    assert torch.equal(traced(x2, target2), model(x2, target2))


# ----------------------------------------------------------------------------------------------------
# Loading the extension


def _import_in_subprocess(prelude: str, package_parent: Path) -> subprocess.CompletedProcess:
    code = prelude + (
        "\nimport warnings\nwarnings.simplefilter('always')\nimport labelsmooth_ext\n"
        "print(labelsmooth_ext.backend_info()['backend'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LABELSMOOTH_BACKEND"}
    env["PYTHONPATH"] = str(package_parent)
    return subprocess.run([sys.executable, "-c", code], cwd=package_parent, env=env, capture_output=True, text=True,
                          timeout=300)


def test_missing_extension_warning_names_the_cause_and_the_install_command(tmp_path):
    shutil.copytree(REPO_ROOT / "labelsmooth_ext", tmp_path / "labelsmooth_ext",
                    ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    result = _import_in_subprocess("", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "python"
    assert "is not built" in result.stderr and "pip install --no-build-isolation -e ." in result.stderr, result.stderr
    assert "circular import" not in result.stderr


def test_build_for_another_torch_warns_with_both_versions():
    result = _import_in_subprocess("import torch\nbuilt = torch.__version__\ntorch.__version__ = '9.9.9'\n",
                                   REPO_ROOT)
    if "is not built" in result.stderr:
        pytest.skip("compiled extension not built")
    assert result.returncode == 0, result.stderr[-3000:]
    warning_lines = [line for line in result.stderr.splitlines() if "built against torch" in line]
    assert len(warning_lines) == 1, result.stderr
    assert "9.9.9" in warning_lines[0] and torch.__version__ in warning_lines[0]
    assert "pip install --no-build-isolation -e ." in warning_lines[0]


def test_build_without_cuda_kernels_runs_the_reference_on_cuda_tensors(gen):
    """The CUDA dispatch key gets the reference implementation (reached here by redispatching CPU tensors to
    it, since the machine may have no GPU), with one warning that says how to build the kernels."""
    info = labelsmooth_ext.backend_info()
    if info["backend"] != "compiled" or info["cuda_compiled"]:
        pytest.skip("only a compiled build without CUDA kernels registers the reference for CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("labelsmooth::ls_cross_entropy_forward", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("labelsmooth::ls_cross_entropy_backward", "CUDA")
    x, target = _case(gen, dtype=torch.float32)
    cuda_keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    with warnings.catch_warnings(record=True):  # the once-per-process warning may have been given already
        warnings.simplefilter("always")
        loss, lse, mass = FORWARD_OP.redispatch(cuda_keys, x, target, None, -100, 0.1, 0, None, 0)
        upstream = grad_output_like(loss.shape, gen)
        grad_input = torch.ops.labelsmooth.ls_cross_entropy_backward.default.redispatch(
            cuda_keys, upstream, None, x, target, None, lse, mass, -100, 0.1, 0, None, 0)
    ref_loss, ref_grad, _ = reference_loss_and_grads(x, target, None, -100, "none", 0.1, upstream)
    assert_within(loss, ref_loss, loss_tolerance(x, target, None, -100, "none", 0.1), "loss")
    assert_within(grad_input, ref_grad, grad_tolerance(x, target, None, -100, "none", 0.1, upstream, ref_grad), "grad")
    message = subprocess.run(
        [sys.executable, "-c", (
            "import warnings, torch, labelsmooth_ext\nwarnings.simplefilter('always')\n"
            "x = torch.randn(3, 4); t = torch.tensor([0, 1, 2])\n"
            "ks = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)\n"
            "op = torch.ops.labelsmooth.ls_cross_entropy_forward.default\n"
            "op.redispatch(ks, x, t, None, -100, 0.1, 0, None, 1); op.redispatch(ks, x, t, None, -100, 0.1, 0, None, 1)\n")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert message.returncode == 0, message.stderr[-3000:]
    lines = [line for line in message.stderr.splitlines() if "no CUDA kernels" in line]
    assert len(lines) == 1 and "pip install --no-build-isolation -e ." in lines[0], message.stderr


def test_check_command_prints_and_takes_its_seed(capsys):
    from labelsmooth_ext.__main__ import main

    assert main(["check", "--seed", "1234"]) == 0
    out = capsys.readouterr().out
    assert "--seed 1234" in out and "0 failed" in out
    assert main(["check"]) == 0
    drawn = [line for line in capsys.readouterr().out.splitlines() if "replay with --seed" in line]
    assert len(drawn) == 1, "without --seed the check must print the seed it drew"
