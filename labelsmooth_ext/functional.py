"""labelsmooth_ext.cross_entropy: the signature and semantics of torch.nn.functional.cross_entropy, on our kernels."""

from torch.nn import _reduction as _legacy_reduction

from . import _functorch, _validation


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
                  label_smoothing=0.0):
    """Cross-entropy between logits and targets, with optional label smoothing.

    A drop-in for ``torch.nn.functional.cross_entropy``: the same arguments, in the same order, with the
    same defaults (``label_smoothing=0.0``: pass ``label_smoothing=0.1``, the usual value, to smooth).

    * ``input``: logits of shape (C), (N, C) or (N, C, d1, ..., dk), float16/bfloat16/float32/float64.
      The class dim is 1 (0 for 1-D input). LLM logits of shape (B, T, V) have their classes last: pass
      ``input.flatten(0, 1)`` with ``target.flatten()`` (views, no copy).
    * ``target``: class indices (int64, int32 or uint8) of shape (), (N) or (N, d1, ..., dk), or class
      probabilities (floating point) of the input's shape.
    * ``weight``: optional 1-D tensor of C class weights, of any floating dtype (PyTorch requires the
      logits' dtype; here it is used in the accumulation dtype, so fp32 weights with bf16 logits work).
    * ``size_average``, ``reduce``: deprecated, as in PyTorch (they override ``reduction`` with a warning).
    * ``ignore_index``: class-index targets equal to it contribute neither loss nor gradient and are left
      out of the mean (not allowed, as in PyTorch, to be >= 0 with probability targets).
    * ``reduction``: "mean" (over non-ignored rows, weighted by ``weight[target]``), "sum" or "none".
    * ``label_smoothing``: eps in [0, 1] (a float, or a 0-d tensor as PyTorch accepts); the target
      becomes (1 - eps) * onehot + eps / C.

    The loss is float32 for float16/bfloat16 logits (accumulated in float32, no upcast copy of the
    logits) and the logits' dtype otherwise; the gradient has the logits' dtype. Only a float32
    log-sum-exp per row is kept for the backward.
    """
    if size_average is not None or reduce is not None:
        reduction = _legacy_reduction.legacy_get_string(size_average, reduce)
    ignore_index = _validation.check_ignore_index(ignore_index)
    label_smoothing = _validation.check_label_smoothing(label_smoothing)
    code = _validation.reduction_code(reduction)
    _validation.check_op_arguments(input, target, weight, ignore_index, label_smoothing, code)
    loss, _ = _functorch.forward(input, target, weight, ignore_index, label_smoothing, code)
    return loss
