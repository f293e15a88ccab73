"""Glue for the tools users train with.

* ``labelsmooth_ext.integrations.mixup_cross_entropy``: mixup / CutMix soft targets (timm's
  ``Mixup`` + ``SoftTargetCrossEntropy``) from the two class-index targets, with no N x C soft target.
* ``labelsmooth_ext.integrations.huggingface``: transformers' causal-LM loss and the Trainer's label
  smoother on our op (imported on its own: it needs transformers).
"""

from .mixup import mixup_cross_entropy

__all__ = ["mixup_cross_entropy"]
