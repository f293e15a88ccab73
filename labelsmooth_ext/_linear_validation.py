"""Argument checks of the fused linear + cross-entropy: shapes, dtypes and devices of the input, the linear
layer and the targets, and the chunk size. The loss options are checked by _validation.py, as for
cross_entropy; target values by the cross-entropy ops on each chunk."""

import numbers

import torch

_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CLASS_INDEX_DTYPES = (torch.int64, torch.int32, torch.uint8)


def _shape(t):
    return list(t.shape)


def check_chunk_size(chunk_size):
    """None (automatic) or a positive number of rows; returns the op's int (0 = automatic)."""
    if chunk_size is None:
        return 0
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be None (automatic) or a positive number of rows, got {chunk_size!r}")
    return int(chunk_size)


def _check_same(name, tensor, input):
    if tensor.device != input.device:
        raise RuntimeError(f"linear_cross_entropy: {name} is on {tensor.device} but input is on {input.device}")
    if tensor.dtype != input.dtype:
        raise RuntimeError(f"linear_cross_entropy: {name} has dtype {tensor.dtype} but input has {input.dtype} "
                           "(the linear layer runs in the input's dtype, as F.linear requires)")


def check_linear_arguments(input, linear_weight, linear_bias, target, weight):
    """input (..., H), linear_weight (V, H), linear_bias (V) or None, target (...) of class indices, weight (V) or
    None; raises naming the bad value and what was expected."""
    for name, value in (("input", input), ("linear_weight", linear_weight), ("target", target)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"linear_cross_entropy: {name} must be a tensor, got {type(value).__name__}")
    if input.dtype not in _INPUT_DTYPES:
        raise NotImplementedError(f"linear_cross_entropy: input must be float16, bfloat16, float32 or float64, got "
                                  f"{input.dtype}")
    if input.dim() == 0:
        raise RuntimeError("linear_cross_entropy: input must have a feature dimension: shape (H), (N, H) or "
                           "(B, T, H), got a 0-dim tensor")
    if linear_weight.dim() != 2:
        raise RuntimeError(f"linear_cross_entropy: linear_weight must have shape (V, H) (classes, features), got "
                           f"{_shape(linear_weight)}")
    features = input.shape[-1]
    if linear_weight.shape[1] != features:
        raise RuntimeError(f"linear_cross_entropy: input has {features} features (its last dim, shape "
                           f"{_shape(input)}) but linear_weight {_shape(linear_weight)} expects "
                           f"{linear_weight.shape[1]} (its dim 1)")
    _check_same("linear_weight", linear_weight, input)
    classes = linear_weight.shape[0]
    if linear_bias is not None:
        if not isinstance(linear_bias, torch.Tensor):
            raise TypeError(f"linear_cross_entropy: linear_bias must be a tensor or None, got "
                            f"{type(linear_bias).__name__}")
        if _shape(linear_bias) != [classes]:
            raise RuntimeError(f"linear_cross_entropy: linear_bias must have shape [{classes}] (one entry per row "
                               f"of linear_weight), got {_shape(linear_bias)}")
        _check_same("linear_bias", linear_bias, input)
    if target.device != input.device:
        raise RuntimeError(f"linear_cross_entropy: target is on {target.device} but input is on {input.device}")
    if target.is_floating_point():
        raise NotImplementedError(
            "linear_cross_entropy: class-probability targets are not supported by the fused path (got a "
            f"{target.dtype} target); compute cross_entropy(F.linear(input, linear_weight, linear_bias), target)")
    if target.dtype not in _CLASS_INDEX_DTYPES:
        raise RuntimeError(f"linear_cross_entropy: target must hold class indices (int64, int32 or uint8), got "
                           f"{target.dtype}")
    rows = _shape(input)[:-1]
    if _shape(target) != rows:
        raise RuntimeError(f"linear_cross_entropy: expected target of shape {rows} (the input's shape "
                           f"{_shape(input)} without its feature dim), got {_shape(target)}")
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise TypeError(f"linear_cross_entropy: weight must be a floating point tensor or None, got "
                            f"{getattr(weight, 'dtype', type(weight).__name__)}")
        if _shape(weight) != [classes]:
            raise RuntimeError(f"linear_cross_entropy: weight must be a 1-D tensor with one entry per class "
                               f"({classes} classes, the rows of linear_weight), got shape {_shape(weight)}")
        if weight.device != input.device:
            raise RuntimeError(f"linear_cross_entropy: weight is on {weight.device} but input is on {input.device}")
