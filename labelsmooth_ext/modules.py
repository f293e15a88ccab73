"""labelsmooth_ext.CrossEntropyLoss: the nn.Module form of labelsmooth_ext.cross_entropy."""

import torch

from . import _validation
from .functional import cross_entropy


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """Drop-in for ``torch.nn.CrossEntropyLoss``, computed by labelsmooth_ext's kernels.

    A subclass of ``torch.nn.CrossEntropyLoss`` with the same constructor and defaults
    (``label_smoothing=0.0``; pass ``label_smoothing=0.1`` to smooth), the same attributes, ``repr`` and
    ``state_dict`` (``weight`` is a buffer that follows ``.to(device)``), so checkpoints and
    ``isinstance`` checks carry over. Arguments are checked at construction rather than at the first
    batch. TorchScript cannot compile it: use ``torch.compile`` or ``torch.export``.
    """

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
                 label_smoothing=0.0):
        if weight is not None and not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a tensor or None, got {type(weight).__name__}")
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        _validation.check_ignore_index(self.ignore_index)
        _validation.reduction_code(self.reduction)
        _validation.check_label_smoothing(self.label_smoothing)

    def forward(self, input, target):
        return cross_entropy(input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
                             label_smoothing=self.label_smoothing)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this before compiling; fail here, with a way forward, rather than deep
        # inside the TorchScript compiler.
        raise RuntimeError(
            "labelsmooth_ext.CrossEntropyLoss cannot be compiled by TorchScript (torch.jit.script): its loss is a "
            "torch custom op whose argument checks and autograd are registered in Python. Use torch.compile(model) "
            "or torch.export.export(model, ...) instead, or torch.jit.trace, which records the op as it runs."
        )
