"""labelsmooth_ext.linear_cross_entropy: a linear head followed by label-smoothed cross-entropy, computed chunk by
chunk so that the (tokens x vocabulary) logits never exist whole; and LinearCrossEntropyLoss, its nn.Module."""

import torch

from . import _linear_ops, _linear_validation, _registration, _validation
from .functional import with_loss_options


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None, reduction="mean",
                         ignore_index=-100, label_smoothing=0.0, chunk_size=None, z_loss=0.0, softcap=None,
                         smoothing="uniform", normalizer=None, return_lse=False, return_z_loss=False):
    """``cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)`` without the full logits.

    The signature of ``torch.nn.functional.linear_cross_entropy`` (torch 2.13) with the loss options of
    ``labelsmooth_ext.cross_entropy``; the chunking is chosen by ``chunk_size`` instead of torch's ``options``.

    * ``input``: features (H), (N, H) or (B, T, H); float16, bfloat16, float32 or float64.
    * ``linear_weight``: (V, H), ``linear_bias``: (V) or None, both in the input's dtype.
    * ``target``: class indices (int64, int32 or uint8) of the input's shape without H: (), (N) or (B, T).
      Class-probability targets are not supported here (an error says so).
    * ``weight``, ``reduction``, ``ignore_index`` (None means -100, as in torch's), ``label_smoothing``,
      ``z_loss``, ``softcap``, ``smoothing``, ``normalizer``, ``return_lse``, ``return_z_loss``: as in
      ``labelsmooth_ext.cross_entropy``. Class weights cannot require grad here (an error says so).
    * ``chunk_size``: rows per chunk, or None for automatic: 1/16 of the rows (the chunk of logits and the chunk
      of their gradient then hold 1/8 of the full logits), at most 128 MiB of logits, but at least 128 rows. At
      most one chunk of logits and one of their gradient exist at a time, so smaller chunks hold less memory;
      larger chunks make the GEMMs wider (faster, up to the machine's peak) and pay the per-chunk overhead less
      often. The result does not depend on it beyond rounding.

    Gradients reach ``input``, ``linear_weight`` and ``linear_bias``. With reduction "mean" or "sum" (and neither
    ``return_lse`` nor ``return_z_loss``), and when any of them requires grad, the gradients are computed in the
    forward pass, chunk by chunk (three GEMMs per chunk in all, as many as the unfused head), and held until the
    backward, which only scales them: the forward then holds gradient-sized tensors, the price of never
    recomputing the logits. Otherwise the forward saves one fp32 lse per row and the backward recomputes each
    chunk's logits (one GEMM more). The weight and bias gradients accumulate over the chunks in float32 for
    bfloat16/float16 inputs. The loss is float32 for float16/bfloat16 inputs, as in ``cross_entropy``.

    Returns the loss, shaped like ``target`` for reduction "none"; with ``return_z_loss`` and/or ``return_lse``, a
    tuple ``(loss, z_loss, lse)`` of the requested ones in that order.
    """
    ignore_index, label_smoothing, code, z_loss, softcap, smoothing_code, normalizer = _validation.check_loss_options(
        -100 if ignore_index is None else ignore_index, label_smoothing, reduction, z_loss, softcap, smoothing,
        normalizer)
    op_chunk_size = _linear_validation.check_chunk_size(chunk_size)
    _linear_validation.check_linear_arguments(input, linear_weight, linear_bias, target, weight)
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(
            "linear_cross_entropy: the gradient with respect to the class weights is not computed by the fused path; "
            "pass weight.detach(), or use cross_entropy(F.linear(input, linear_weight, linear_bias), target, weight)")

    acc = _registration.accumulation_dtype(input.dtype)
    rows = input.reshape(-1, input.shape[-1])
    row_target = target.reshape(-1)
    options = (ignore_index, label_smoothing, smoothing_code, softcap)
    differentiable = (input, linear_weight) + (() if linear_bias is None else (linear_bias,))
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in differentiable)
    if needs_grad and code != _validation.REDUCTIONS["none"] and not (return_lse or return_z_loss):
        denominator = None
        if code == _validation.REDUCTIONS["mean"] and normalizer is None:
            denominator = _linear_ops.row_weights(row_target, weight, ignore_index, acc).sum()
        loss = _linear_ops.linear_cross_entropy_with_grads(rows, linear_weight, linear_bias, row_target, weight,
                                                           denominator, *options, z_loss, op_chunk_size)[0]
        return loss if normalizer is None else loss / normalizer

    row_loss, lse = _linear_ops.linear_cross_entropy_rows(rows, linear_weight, linear_bias, row_target, weight,
                                                          *options, op_chunk_size)
    row_loss, lse = row_loss.view(target.shape), lse.view(target.shape)
    op_code = _validation.REDUCTIONS["sum"] if normalizer is not None else code
    loss = _reduce(row_loss, target, weight, ignore_index, acc, op_code)
    # with_loss_options reads its `input` only to tell probability targets apart (never these): target serves.
    return with_loss_options(loss, lse, target, target, weight, ignore_index, z_loss, op_code, normalizer,
                             return_z_loss, return_lse)


def _reduce(row_loss, target, weight, ignore_index, acc, reduction):
    if reduction == _validation.REDUCTIONS["none"]:
        return row_loss
    total = row_loss.sum()
    if reduction == _validation.REDUCTIONS["mean"]:
        total = total / _linear_ops.row_weights(target, weight, ignore_index, acc).sum()
    return total


class LinearCrossEntropyLoss(torch.nn.Module):
    """The nn.Module form of ``linear_cross_entropy``: it holds the loss options (and the class weights, as a
    buffer), not the linear layer, whose weight and bias are passed to ``forward`` (a model's own head or tied
    embedding)."""

    def __init__(self, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, *, chunk_size=None,
                 z_loss=0.0, softcap=None, smoothing="uniform", return_lse=False, return_z_loss=False):
        super().__init__()
        if weight is not None and not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a tensor or None, got {type(weight).__name__}")
        self.register_buffer("weight", weight)
        self.ignore_index, self.label_smoothing, _, self.z_loss, self.softcap, _, _ = _validation.check_loss_options(
            ignore_index, label_smoothing, reduction, z_loss, softcap, smoothing, None)
        self.reduction, self.smoothing = reduction, smoothing
        _linear_validation.check_chunk_size(chunk_size)
        self.chunk_size = chunk_size
        self.return_lse = bool(return_lse)
        self.return_z_loss = bool(return_z_loss)

    def forward(self, input, linear_weight, target, linear_bias=None, *, normalizer=None):
        return linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
                                    reduction=self.reduction, ignore_index=self.ignore_index,
                                    label_smoothing=self.label_smoothing, chunk_size=self.chunk_size,
                                    z_loss=self.z_loss, softcap=self.softcap, smoothing=self.smoothing,
                                    normalizer=normalizer, return_lse=self.return_lse,
                                    return_z_loss=self.return_z_loss)

    def extra_repr(self):
        options = {"reduction": (self.reduction, "mean"), "ignore_index": (self.ignore_index, -100),
                   "label_smoothing": (self.label_smoothing, 0.0), "chunk_size": (self.chunk_size, None),
                   "z_loss": (self.z_loss, 0.0), "softcap": (self.softcap, None),
                   "smoothing": (self.smoothing, "uniform"), "return_lse": (self.return_lse, False),
                   "return_z_loss": (self.return_z_loss, False)}
        return ", ".join(f"{name}={value!r}" for name, (value, default) in options.items() if value != default)
