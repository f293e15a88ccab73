"""labelsmooth_ext.cross_entropy: the semantics of torch.nn.functional.cross_entropy, on our kernels."""

import torch

from . import _validation


def cross_entropy(input, target, weight=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.1):
    """Label-smoothed cross-entropy between logits and targets.

    Same meaning as ``torch.nn.functional.cross_entropy(input, target, weight, ignore_index=...,
    reduction=..., label_smoothing=...)`` (note the default ``label_smoothing=0.1``):

    * ``input``: logits of shape (C), (N, C) or (N, C, d1, ..., dk), float16/bfloat16/float32/float64.
    * ``target``: class indices (int64, int32 or uint8) of shape (), (N) or (N, d1, ..., dk), or class
      probabilities (floating point) of the input's shape.
    * ``weight``: optional 1-D tensor of C class weights.
    * ``ignore_index``: class-index targets equal to it contribute neither loss nor gradient (not
      allowed, as in PyTorch, to be >= 0 with probability targets).
    * ``reduction``: "mean" (over non-ignored rows, weighted by ``weight[target]``), "sum" or "none".
    * ``label_smoothing``: eps in [0, 1]; the target becomes (1 - eps) * onehot + eps / C.

    The loss is float32 for float16/bfloat16 logits (accumulated in float32) and the logits' dtype
    otherwise; the gradient has the logits' dtype. Only a float32 log-sum-exp per row is kept for the
    backward, never a copy of the logits.
    """
    ignore_index = _validation.check_ignore_index(ignore_index)
    label_smoothing = _validation.check_label_smoothing(label_smoothing)
    code = _validation.reduction_code(reduction)
    _validation.check_op_arguments(input, target, weight, ignore_index, label_smoothing, code)
    loss, _ = torch.ops.labelsmooth.ls_cross_entropy_forward(input, target, weight, ignore_index, label_smoothing, code)
    return loss
