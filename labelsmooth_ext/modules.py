"""labelsmooth_ext.CrossEntropyLoss: the nn.Module form of labelsmooth_ext.cross_entropy."""

import torch

from . import _validation
from .functional import cross_entropy


class CrossEntropyLoss(torch.nn.Module):
    """Drop-in for ``torch.nn.CrossEntropyLoss`` (default ``label_smoothing=0.1``).

    ``weight`` is kept as a buffer, so it follows ``.to(device)`` and is saved in the state dict,
    as in PyTorch. Arguments are checked here, at construction, not at the first batch.
    """

    def __init__(self, weight=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.1):
        super().__init__()
        if weight is not None and not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a tensor or None, got {type(weight).__name__}")
        self.register_buffer("weight", weight)
        self.ignore_index = _validation.check_ignore_index(ignore_index)
        _validation.reduction_code(reduction)
        self.reduction = reduction
        self.label_smoothing = _validation.check_label_smoothing(label_smoothing)

    def forward(self, input, target):
        return cross_entropy(
            input,
            target,
            self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )

    def extra_repr(self):
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, label_smoothing={self.label_smoothing}"
