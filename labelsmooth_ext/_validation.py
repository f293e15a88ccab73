"""Argument checks of the public API, run before any kernel (and at trace time under torch.compile).

The messages and exception types match the C++ checks in csrc/ls_op_common.cpp, which guard direct
calls of the compiled ops, and PyTorch's own where PyTorch raises. Target *values* are checked by the
ops themselves, since that needs the data.
"""

import contextlib
import math
import numbers

import torch

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
# The op's `int smoothing`: where the smoothing mass eps goes (see smoothing_code).
SMOOTHING_CONVENTIONS = {"uniform": 0, "others": 1}
_CLASS_INDEX_DTYPES = (torch.int64, torch.int32, torch.uint8)


def reduction_code(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction (expected 'none', 'mean' or 'sum')")
    return REDUCTIONS[reduction]


def check_label_smoothing(label_smoothing):
    """eps as a Python float. Like PyTorch, takes a real number or a 0-dim tensor that does not require grad
    (reading such a tensor is a host sync: pass a float in hot loops)."""
    if isinstance(label_smoothing, torch.Tensor):
        if label_smoothing.dim() != 0 or label_smoothing.requires_grad or label_smoothing.is_complex():
            raise TypeError(
                "label_smoothing must be a float in [0, 1] or a 0-dim real tensor that does not require grad, got a "
                f"tensor of shape {list(label_smoothing.shape)}"
                + (" that requires grad" if label_smoothing.requires_grad else "")
            )
        label_smoothing = label_smoothing.item()
    if not isinstance(label_smoothing, numbers.Real):
        raise TypeError(f"label_smoothing must be a float in [0, 1], got {type(label_smoothing).__name__}")
    value = float(label_smoothing)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {value}")
    return value


def smoothing_code(smoothing):
    """'uniform' (PyTorch's: q = (1 - eps) onehot + eps / K, the true class gets eps / K too) or 'others'
    (fairseq's and Megatron's: 1 - eps on the true class, eps / (K - 1) on each other class)."""
    if smoothing not in SMOOTHING_CONVENTIONS:
        raise ValueError(f"smoothing={smoothing!r} is not valid: expected 'uniform' (PyTorch's convention, eps / K on "
                         "every class) or 'others' (eps / (K - 1) on the other classes only)")
    return SMOOTHING_CONVENTIONS[smoothing]


def _real_option(name, value, expected):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")
    return float(value)


def check_z_loss(z_loss):
    value = _real_option("z_loss", z_loss, "a float >= 0")
    if not 0.0 <= value < math.inf:  # comparisons only: torch.compile may pass a symbolic float
        raise ValueError(f"z_loss must be a finite float >= 0 (the weight of z_loss * lse^2), got {value}")
    return value


def check_softcap(softcap):
    """None (no capping) or c > 0: logits are read as c * tanh(z / c)."""
    if softcap is None:
        return None
    value = _real_option("softcap", softcap, "None or a float > 0")
    if not 0.0 < value < math.inf:
        raise ValueError(f"softcap must be None or a finite float > 0 (logits become softcap * tanh(z / softcap)), "
                         f"got {value}")
    return value


def check_normalizer(normalizer, reduction):
    """None, a float > 0 or a 0-dim floating tensor (not checked for > 0: that would need its value on the
    host); only with reduction='mean', whose denominator it replaces."""
    if normalizer is None:
        return None
    if reduction != "mean":
        raise ValueError(f"normalizer replaces the denominator of reduction='mean'; it cannot be used with "
                         f"reduction={reduction!r}")
    if isinstance(normalizer, torch.Tensor):
        if normalizer.dim() != 0 or not normalizer.is_floating_point():
            raise TypeError(f"normalizer must be a float > 0 or a 0-dim floating point tensor, got a {normalizer.dtype} "
                            f"tensor of shape {list(normalizer.shape)}")
        return normalizer
    value = _real_option("normalizer", normalizer, "None, a float > 0 or a 0-dim floating point tensor")
    if not 0.0 < value < math.inf:
        raise ValueError(f"normalizer must be > 0 (the number of tokens to divide the sum by), got {value}")
    return value


def check_loss_options(ignore_index, label_smoothing, reduction, z_loss, softcap, smoothing, normalizer):
    """Every loss option of the public calls, checked in this order and converted to what the ops take:
    (ignore_index, label_smoothing, reduction code, z_loss, softcap, smoothing code, normalizer)."""
    return (check_ignore_index(ignore_index), check_label_smoothing(label_smoothing), reduction_code(reduction),
            check_z_loss(z_loss), check_softcap(softcap), smoothing_code(smoothing),
            check_normalizer(normalizer, reduction))


def check_ignore_index(ignore_index):
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    return int(ignore_index)


def _shape(t):
    return list(t.shape)


def _class_last_hint(input, target):
    """How to call with logits whose classes are the last dim, e.g. an LLM's (B, T, V)."""
    if input.dim() < 3 or list(target.shape) != _shape(input)[:-1]:
        return ""
    return (
        ". The class dimension is dim 1, as in torch.nn.functional.cross_entropy; if the classes are the last dim "
        "(LLM logits of shape (B, T, V)), pass input.flatten(0, -2) and target.flatten() (views of contiguous logits: "
        "no copy)"
    )


def check_tensors(input, target, weight, ignore_index):
    """Raises for logits, target or weight that the ops cannot take; returns True for probability targets."""
    if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(
            f"input and target must be tensors, got {type(input).__name__} and {type(target).__name__}"
        )
    if not input.dtype.is_floating_point or input.dtype.itemsize == 1:
        raise NotImplementedError(
            f"labelsmooth cross_entropy: input (logits) must be float16, bfloat16, float32 or float64, got {input.dtype}"
        )
    if input.dim() == 0:
        raise RuntimeError(
            "labelsmooth cross_entropy: input must have a class dimension: shape (C), (N, C) or (N, C, d1, ...), "
            "got a 0-dim tensor"
        )
    if target.device != input.device:
        raise RuntimeError(f"labelsmooth cross_entropy: target is on {target.device} but input is on {input.device}")
    class_dim = 0 if input.dim() == 1 else 1
    classes = input.shape[class_dim]
    rows = _shape(input)
    del rows[class_dim]
    probability = target.shape == input.shape
    if probability and classes == 0 and math.prod(rows) > 0:
        raise RuntimeError(
            f"labelsmooth cross_entropy: input has no classes (size 0 at dim {class_dim}) but {rows} rows of class "
            "probabilities"
        )
    if probability:
        if not target.dtype.is_floating_point:
            raise RuntimeError(f"Expected floating point type for target with class probabilities, got {target.dtype}")
        if ignore_index >= 0:
            raise RuntimeError(
                f"ignore_index is not supported for floating point target (got ignore_index={ignore_index}; "
                "class probabilities have no ignored rows)"
            )
    else:
        if target.dtype not in _CLASS_INDEX_DTYPES:
            raise RuntimeError(
                f"labelsmooth cross_entropy: expected target to hold class indices (int64, int32 or uint8) of shape "
                f"{rows}, or class probabilities (floating point) of the input's shape {_shape(input)}; got "
                f"{target.dtype} of shape {_shape(target)}"
            )
        if input.dim() == 2 and target.dim() == 1 and target.shape[0] != input.shape[0]:
            raise ValueError(
                f"Expected input batch_size ({input.shape[0]}) to match target batch_size ({target.shape[0]})."
            )
        if _shape(target) != rows:
            raise RuntimeError(
                f"labelsmooth cross_entropy: expected target of shape {rows} (the input's shape {_shape(input)} "
                f"without the class dimension), got {_shape(target)}" + _class_last_hint(input, target)
            )
    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a tensor or None, got {type(weight).__name__}")
        if weight.dim() != 1 or weight.shape[0] != classes:
            raise RuntimeError(
                f"labelsmooth cross_entropy: weight must be a 1-D tensor with one entry per class ({classes} classes), "
                f"got shape {_shape(weight)}"
            )
        if not weight.dtype.is_floating_point:
            raise RuntimeError(f"labelsmooth cross_entropy: weight must be floating point, got {weight.dtype}")
        if weight.device != input.device:
            raise RuntimeError(f"labelsmooth cross_entropy: weight is on {weight.device} but input is on {input.device}")
    return probability


@contextlib.contextmanager
def _outside_jit_trace():
    """Under torch.jit.trace, shapes are traced tensors and every comparison of them warns that the trace may
    not generalize. The checks only read metadata and record nothing, so they run with tracing paused."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


def check_op_arguments(input, target, weight, ignore_index, label_smoothing, smoothing, softcap, reduction):
    """All checks of an op call (smoothing and reduction as their codes); returns True for probability
    targets."""
    if torch.jit.is_tracing():
        with _outside_jit_trace():
            return check_op_arguments(input, target, weight, ignore_index, label_smoothing, smoothing, softcap,
                                      reduction)
    check_ignore_index(ignore_index)
    eps = check_label_smoothing(label_smoothing)
    check_softcap(softcap)
    if reduction not in REDUCTIONS.values():
        raise ValueError(f"labelsmooth cross_entropy: reduction code {reduction} is not valid (expected 0 = none, "
                         "1 = mean, 2 = sum)")
    if smoothing not in SMOOTHING_CONVENTIONS.values():
        raise ValueError(f"labelsmooth cross_entropy: smoothing code {smoothing} is not valid (expected 0 = uniform, "
                         "1 = others)")
    probability = check_tensors(input, target, weight, ignore_index)
    if smoothing == SMOOTHING_CONVENTIONS["others"]:
        if probability:
            raise ValueError("smoothing='others' is defined for class-index targets only; with class probabilities "
                             "use smoothing='uniform'")
        classes = input.shape[0 if input.dim() == 1 else 1]
        if eps > 0 and classes < 2:
            raise ValueError(f"smoothing='others' spreads label_smoothing={eps} over the other classes, but the input "
                             f"has {classes} class(es)")
    return probability


def check_target_values(target, classes, ignore_index):
    """IndexError for a class index neither in [0, classes) nor ignore_index (eager: names the value)."""
    bad = (target != ignore_index) & ((target < 0) | (target >= classes))
    expected = f"expected a class index in [0, {classes}) or ignore_index={ignore_index}"
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        # Raising needs the value on the host; a compiled graph must not synchronise for it, and a trace
        # must not bake this call's data into the recorded program.
        torch._assert_async(~bad.any(), f"Target is out of bounds ({expected}).")
    elif bool(bad.any()):
        raise IndexError(f"Target {int(target[bad].flatten()[0])} is out of bounds ({expected}).")
