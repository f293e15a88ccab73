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
                 label_smoothing=0.0, *, z_loss=0.0, softcap=None, smoothing="uniform", return_lse=False,
                 return_z_loss=False):
        if weight is not None and not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a tensor or None, got {type(weight).__name__}")
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        # PyTorch's attributes stay as given (its own module keeps them so); ours are stored checked.
        _, _, _, self.z_loss, self.softcap, _, _ = _validation.check_loss_options(
            self.ignore_index, self.label_smoothing, self.reduction, z_loss, softcap, smoothing, None)
        self.smoothing = smoothing
        self.return_lse = bool(return_lse)
        self.return_z_loss = bool(return_z_loss)

    def forward(self, input, target, *, normalizer=None):
        """The loss of labelsmooth_ext.cross_entropy with this module's options; `normalizer` (per call, e.g.
        the global token count of a gradient-accumulation step) replaces the mean's denominator."""
        return cross_entropy(input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
                             label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
                             smoothing=self.smoothing, normalizer=normalizer, return_lse=self.return_lse,
                             return_z_loss=self.return_z_loss)

    def extra_repr(self):
        # PyTorch's module shows nothing; ours names only the options that differ from their defaults.
        options = {"z_loss": (self.z_loss, 0.0), "softcap": (self.softcap, None), "smoothing": (self.smoothing,
                   "uniform"), "return_lse": (self.return_lse, False), "return_z_loss": (self.return_z_loss, False)}
        return ", ".join(f"{name}={value!r}" for name, (value, default) in options.items() if value != default)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this before compiling; fail here, with a way forward, rather than deep
        # inside the TorchScript compiler.
        raise RuntimeError(
            "labelsmooth_ext.CrossEntropyLoss cannot be compiled by TorchScript (torch.jit.script): its loss is a "
            "torch custom op whose argument checks and autograd are registered in Python. Use torch.compile(model) "
            "or torch.export.export(model, ...) instead, or torch.jit.trace, which records the op as it runs."
        )
