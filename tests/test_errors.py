"""Bad inputs raise PyTorch's exception type with a message naming the bad value -- through the public
API and through the ops called directly -- and edge inputs (empty batches, NaN/inf logits) give what
float64 PyTorch gives, never a crash or a silent wrong number."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

import labelsmooth_ext
from labelsmooth_ext import reference

from conftest import (
    REDUCTION_CODES,
    assert_within,
    class_weight,
    grad_output_like,
    grad_tolerance,
    loss_tolerance,
    op_backward,
    op_forward,
    randn,
    reference_loss_and_grads,
)


def _logits(gen, shape=(4, 5), dtype=torch.float32):
    return randn(shape, gen, dtype)


def _targets(values):
    return torch.tensor(values, dtype=torch.int64)


# Each case: (id, builder(gen) -> (input, target, weight, kwargs), exception type, regex the message
# must contain). Exception types are PyTorch's where PyTorch raises; `pytorch_agrees` marks the cases
# where F.cross_entropy raises the same type for the same arguments (checked too, so that a change of
# PyTorch's behaviour is noticed rather than silently diverged from).
BAD_INPUTS = [
    ("target_above_range", lambda g: (_logits(g), _targets([0, 1, 7, 2]), None, {}), IndexError, r"\b7\b", True),
    ("target_negative", lambda g: (_logits(g), _targets([0, -3, 1, 2]), None, {}), IndexError, r"-3\b", True),
    ("target_equal_to_num_classes", lambda g: (_logits(g, (2, 5, 3)), torch.tensor([[0, 1, 2], [3, 4, 5]]), None, {}),
     IndexError, r"\b5\b", True),
    ("target_uint8_out_of_range", lambda g: (_logits(g), torch.tensor([0, 1, 200, 2], dtype=torch.uint8), None, {}),
     IndexError, r"\b200\b", True),
    ("target_int32_out_of_range", lambda g: (_logits(g), torch.tensor([0, 9, 1, 2], dtype=torch.int32), None, {}),
     IndexError, r"\b9\b", False),
    ("default_ignore_value_when_ignore_index_differs",
     lambda g: (_logits(g), _targets([0, -100, 1, 2]), None, {"ignore_index": 3}), IndexError, r"-100", True),
    ("target_float_of_row_shape", lambda g: (_logits(g), torch.rand(4, generator=g), None, {}),
     RuntimeError, r"(?i)float", True),
    ("target_bool", lambda g: (_logits(g), torch.zeros(4, dtype=torch.bool), None, {}), RuntimeError, r"(?i)bool", True),
    ("target_int16", lambda g: (_logits(g), torch.zeros(4, dtype=torch.int16), None, {}),
     RuntimeError, r"(?i)int16|short", True),
    ("batch_size_mismatch", lambda g: (_logits(g), _targets([0, 1, 2]), None, {}), ValueError, r"\b4\b.*\b3\b", True),
    ("spatial_target_shape_mismatch", lambda g: (_logits(g, (2, 5, 3)), torch.zeros(2, 4, dtype=torch.int64), None, {}),
     RuntimeError, r"\[2, 4\]", True),
    ("target_2d_for_2d_input", lambda g: (_logits(g), torch.zeros(4, 2, dtype=torch.int64), None, {}),
     RuntimeError, r"\[4, 2\]", True),
    ("integer_target_of_input_shape", lambda g: (_logits(g), torch.zeros(4, 5, dtype=torch.int64), None, {}),
     RuntimeError, r"(?i)int64|long", True),
    ("probability_target_wrong_shape", lambda g: (_logits(g, (2, 5, 3)), torch.rand(2, 5, 4, generator=g), None, {}),
     RuntimeError, r"\[2, 5, 4\]", True),
    ("weight_wrong_length", lambda g: (_logits(g), _targets([0, 1, 3, 2]), torch.rand(4, generator=g) + 0.5, {}),
     RuntimeError, r"\[4\]", True),
    ("weight_2d", lambda g: (_logits(g), _targets([0, 1, 3, 2]), torch.rand(1, 5, generator=g) + 0.5, {}),
     RuntimeError, r"\[1, 5\]", True),
    ("weight_0d", lambda g: (_logits(g), _targets([0, 1, 3, 2]), torch.tensor(1.5), {}), RuntimeError, r"\[\]", True),
    ("weight_integer", lambda g: (_logits(g), _targets([0, 1, 3, 2]), torch.arange(1, 6), {}),
     RuntimeError, r"(?i)int64|long", True),
    ("weight_other_device", lambda g: (_logits(g), _targets([0, 1, 3, 2]), torch.ones(5, device="meta"), {}),
     RuntimeError, r"meta", True),
    ("label_smoothing_negative", lambda g: (_logits(g), _targets([0, 1, 3, 2]), None, {"label_smoothing": -0.25}),
     RuntimeError, r"-0\.25", False),
    ("label_smoothing_above_one", lambda g: (_logits(g), _targets([0, 1, 3, 2]), None, {"label_smoothing": 1.25}),
     RuntimeError, r"1\.25", True),
    ("label_smoothing_nan", lambda g: (_logits(g), _targets([0, 1, 3, 2]), None, {"label_smoothing": float("nan")}),
     RuntimeError, r"(?i)nan", False),
    ("probability_target_with_ignore_index", lambda g: (_logits(g), torch.rand(4, 5, generator=g), None, {"ignore_index": 3}),
     RuntimeError, r"ignore_index.*\b3\b|\b3\b.*ignore_index", True),
    ("probability_target_with_ignore_index_zero",
     lambda g: (_logits(g), torch.rand(4, 5, generator=g), None, {"ignore_index": 0}), RuntimeError, r"ignore_index", True),
    ("zero_dim_input", lambda g: (torch.tensor(1.5), torch.tensor(0), None, {}), RuntimeError, r"(?i)0-d|0d|dim|shape", True),
    ("no_classes", lambda g: (torch.empty(3, 0), _targets([0, 0, 0]), None, {}), IndexError, r"\b0\b", True),
]

UNKNOWN_REDUCTION = ("avg", "elementwise_mean", "Mean", "")
INTEGER_LOGIT_DTYPES = (torch.int64, torch.int32, torch.bool)


def _pytorch_exception(input, target, weight, kwargs):
    kwargs = dict(kwargs)
    kwargs.setdefault("label_smoothing", 0.1)
    try:
        F.cross_entropy(input, target, weight, **kwargs)
    except Exception as error:  # noqa: BLE001 -- we want to know what PyTorch raises, whatever it is
        return type(error)
    return None


def _call_api(input, target, weight, kwargs):
    return labelsmooth_ext.cross_entropy(input, target, weight, **kwargs)


def _call_forward_op(input, target, weight, kwargs):
    return op_forward()(input, target, weight, kwargs.get("ignore_index", -100), kwargs.get("label_smoothing", 0.1),
                        0, None, REDUCTION_CODES[kwargs.get("reduction", "mean")])


def _call_reference_op(input, target, weight, kwargs):
    """The fallback's forward, which checks the targets its own way (a range check first)."""
    return reference.ls_cross_entropy_forward(input, target, weight, kwargs.get("ignore_index", -100),
                                              kwargs.get("label_smoothing", 0.1), 0, None,
                                              REDUCTION_CODES[kwargs.get("reduction", "mean")])


def _call_module(input, target, weight, kwargs):
    return labelsmooth_ext.CrossEntropyLoss(weight, **kwargs)(input, target)


CALLERS = {"api": _call_api, "forward_op": _call_forward_op, "reference_op": _call_reference_op,
           "module": _call_module}


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises(case, caller, gen):
    _, build, expected, pattern, pytorch_agrees = case
    input, target, weight, kwargs = build(gen)
    if pytorch_agrees:
        assert _pytorch_exception(input, target, weight, kwargs) is expected, "PyTorch's behaviour changed"
    with pytest.raises(Exception) as info:
        CALLERS[caller](input, target, weight, kwargs)
    # Exactly the type (a bare RuntimeError where PyTorch raises ValueError breaks `except ValueError`).
    assert info.type is expected, f"raised {info.type.__name__}: {info.value}"
    assert re.search(pattern, str(info.value)), f"message does not name the bad value ({pattern}): {info.value}"


@pytest.mark.parametrize("caller", ["api", "module"])
@pytest.mark.parametrize("reduction", UNKNOWN_REDUCTION)
def test_unknown_reduction_is_value_error(reduction, caller, gen):
    input, target = _logits(gen), _targets([0, 1, 3, 2])
    with pytest.raises(ValueError) as info:
        CALLERS[caller](input, target, None, {"reduction": reduction})
    assert info.type is ValueError and reduction in str(info.value), str(info.value)


@pytest.mark.parametrize("code", [3, -1, 100])
def test_unknown_reduction_code_of_the_op(code, gen):
    input, target = _logits(gen), _targets([0, 1, 3, 2])
    with pytest.raises((ValueError, RuntimeError), match=rf"{code}\b"):
        op_forward()(input, target, None, -100, 0.1, 0, None, code)


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("dtype", INTEGER_LOGIT_DTYPES, ids=str)
def test_integer_logits_raise_like_pytorch(dtype, caller, gen):
    input = torch.randint(-3, 4, (4, 5), generator=gen).to(dtype)
    target = _targets([0, 1, 3, 2])
    expected = _pytorch_exception(input, target, None, {})
    assert expected is not None
    with pytest.raises(Exception) as info:
        CALLERS[caller](input, target, None, {})
    assert info.type is expected, f"raised {info.type.__name__}: {info.value}"
    name = {torch.int64: r"int64|long", torch.int32: r"int32|\bint\b", torch.bool: r"bool"}[dtype]
    assert re.search("(?i)" + name, str(info.value)), str(info.value)


def test_target_out_of_range_leaves_no_partial_result(gen):
    """A bad target in the last row must be found before anything is returned or accumulated."""
    input = _logits(gen, (64, 7))
    target = torch.randint(0, 7, (64,), generator=gen)
    target[-1] = 7
    for reduction in ("none", "mean", "sum"):
        with pytest.raises(IndexError, match=r"\b7\b"):
            labelsmooth_ext.cross_entropy(input, target, reduction=reduction)


# ----------------------------------------------------------------------------------------------------
# The backward op's own arguments


def _forward_for_backward(gen, reduction):
    input = _logits(gen, (6, 5))
    target = torch.randint(0, 5, (6,), generator=gen)
    loss, lse, _ = op_forward()(input, target, None, -100, 0.1, 0, None, REDUCTION_CODES[reduction])
    return input, target, loss, lse


def test_backward_op_rejects_grad_of_wrong_shape(gen):
    input, target, loss, lse = _forward_for_backward(gen, "none")
    with pytest.raises((RuntimeError, ValueError), match=r"\[5\]|\b5\b"):
        op_backward()(torch.rand(5, generator=gen), None, input, target, None, lse, lse[:0], -100, 0.1, 0, None, 0)


def test_backward_op_rejects_lse_of_wrong_shape(gen):
    input, target, loss, lse = _forward_for_backward(gen, "sum")
    with pytest.raises((RuntimeError, ValueError), match=r"\[3\]|\b3\b"):
        op_backward()(torch.rand((), generator=gen), None, input, target, None, lse[:3], lse[:0], -100, 0.1, 0, None, 2)


# ----------------------------------------------------------------------------------------------------
# Empty batches behave like PyTorch: mean NaN, sum 0, none empty; gradient of the right (empty) shape.

EMPTY_CASES = {
    "no_rows": ((0, 5), (0,)),
    "no_spatial": ((2, 5, 0), (2, 0)),
    "no_rows_spatial": ((0, 5, 3), (0, 3)),
}


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("probability", [False, True], ids=["class", "prob"])
@pytest.mark.parametrize("shapes", EMPTY_CASES.values(), ids=list(EMPTY_CASES))
def test_empty_batch_like_pytorch(shapes, probability, reduction, gen):
    input_shape, target_shape = shapes
    x = randn(input_shape, gen).requires_grad_()
    target = torch.rand(input_shape, generator=gen) if probability else torch.zeros(target_shape, dtype=torch.int64)
    weight = class_weight(5, gen, torch.float32)
    loss = labelsmooth_ext.cross_entropy(x, target, weight, reduction=reduction, label_smoothing=0.2)
    expected = F.cross_entropy(x.detach().double(), target.double() if probability else target, weight.double(),
                               reduction=reduction, label_smoothing=0.2)
    assert loss.shape == expected.shape and loss.dtype == torch.float32
    assert torch.equal(torch.isnan(loss), torch.isnan(expected)), (loss, expected)
    assert torch.equal(loss.nan_to_num(), expected.float().nan_to_num())
    (grad,) = torch.autograd.grad(loss, x, torch.ones_like(loss))
    assert grad.shape == x.shape and grad.dtype == x.dtype


# ----------------------------------------------------------------------------------------------------
# NaN and infinite logits: NaN exactly where float64 PyTorch has NaN, infinities of the same sign.


def _poisoned_logits(gen, dtype, num_classes=6):
    """One row per kind of bad value; the targets avoid or hit the bad class as named."""
    x = randn((7, num_classes), gen, torch.float64, 2.0)
    target = torch.randint(0, num_classes, (7,), generator=gen)
    target[:6] = torch.tensor([0, 0, 0, 1, 1, 0])
    x[0, 1] = float("inf")     # +inf elsewhere than the target
    x[1, 1] = float("-inf")    # -inf elsewhere than the target
    x[2, 1] = float("nan")     # NaN elsewhere than the target
    x[3, 1] = float("-inf")    # -inf at the target
    x[4, 1] = float("inf")     # +inf at the target
    x[5, :] = float("-inf")    # a whole row of -inf
    return x.to(dtype), target  # row 6 is finite: it must stay finite and correct


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_nonfinite_logits_propagate_like_pytorch(dtype, eps, weighted, reduction, gen):
    x, target = _poisoned_logits(gen, dtype)
    weight = class_weight(6, gen, dtype) if weighted else None
    grad_output = grad_output_like((7,) if reduction == "none" else (), gen)
    xg = x.detach().requires_grad_()
    loss = labelsmooth_ext.cross_entropy(xg, target, weight, reduction=reduction, label_smoothing=eps)
    (grad,) = torch.autograd.grad(loss, xg, grad_output.to(loss.dtype))
    ref_loss, ref_grad, _ = reference_loss_and_grads(x, target, weight, -100, reduction, eps, grad_output)
    with torch.no_grad():
        loss_tol = loss_tolerance(x, target, weight, -100, reduction, eps)
        grad_tol = grad_tolerance(x, target, weight, -100, reduction, eps, grad_output, ref_grad)
    assert_within(loss, ref_loss, loss_tol.nan_to_num(nan=0.0, posinf=0.0), "loss")
    assert_within(grad, ref_grad, grad_tol.nan_to_num(nan=0.0, posinf=0.0), "grad_input")


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_nonfinite_logits_probability_target(eps, gen):
    x, _ = _poisoned_logits(gen, torch.float32)
    target = torch.rand(x.shape, generator=gen)
    target[1, 1] = 0.0  # zero target mass on a -inf logit: 0 * inf, NaN in PyTorch too
    loss = labelsmooth_ext.cross_entropy(x, target, reduction="none", label_smoothing=eps)
    ref = F.cross_entropy(x.double(), target.double(), reduction="none", label_smoothing=eps)
    tol = loss_tolerance(x, target, None, -100, "none", eps).nan_to_num(nan=0.0, posinf=0.0)
    assert_within(loss, ref, tol, "loss")
