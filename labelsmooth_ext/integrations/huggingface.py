"""Hugging Face transformers: the causal-LM loss and the Trainer's label smoother on our op.

    from labelsmooth_ext.integrations import huggingface
    huggingface.install(model)      # model(..., labels=...) computes its loss with labelsmooth_ext
    huggingface.install(trainer)    # and Trainer(args=TrainingArguments(label_smoothing_factor=0.1)) too

Both keep transformers' semantics (tested against transformers' own ForCausalLMLoss and LabelSmoother):
labels are shifted by one position, ``ignore_index`` tokens are left out, and a given
``num_items_in_batch`` (gradient accumulation) makes the loss a sum divided by it. What changes is the
cost: the logits are neither copied (transformers' LabelSmoother slices and copies them for the shift,
its ForCausalLMLoss makes a float32 copy of bf16/fp16 logits) nor turned into a log-softmax; the labels
are shifted instead, by padding them on the right with ``ignore_index``.
"""

import dataclasses
import functools

import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

from .. import _validation
from ..functional import cross_entropy

__all__ = ["LabelSmoother", "causal_lm_loss", "install"]


def _token_loss(logits, targets, num_items_in_batch, ignore_index, label_smoothing):
    """Cross-entropy of logits (..., V) against targets (...): the mean over non-ignored tokens, or, when
    num_items_in_batch is given, their sum divided by it (the count over the whole accumulated batch)."""
    if logits.dim() < 2:
        raise ValueError(
            f"labelsmooth_ext: logits must have shape (..., vocab_size) with at least one token dim, got "
            f"{list(logits.shape)}"
        )
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"labelsmooth_ext: labels of shape {list(targets.shape)} do not match logits of shape "
            f"{list(logits.shape)} (expected labels of shape {list(logits.shape[:-1])})"
        )
    # A view of the logits as (tokens, V): no copy for the contiguous output of an lm_head, nor for the
    # rows of a wider (padded-vocabulary) buffer, which the op reads in place.
    flat_logits = logits.flatten(0, -2)
    flat_targets = targets.reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        return cross_entropy(flat_logits, flat_targets, ignore_index=ignore_index, reduction="mean",
                             label_smoothing=label_smoothing)
    loss = cross_entropy(flat_logits, flat_targets, ignore_index=ignore_index, reduction="sum",
                         label_smoothing=label_smoothing)
    if torch.is_tensor(num_items_in_batch):
        # A device move, never a read on the host: the count may live on the GPU.
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def _shifted_labels(labels, ignore_index):
    """labels[..., 1:] padded on the right with ignore_index: position t is scored against token t + 1,
    and the last position, which has no next token, against nothing."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def causal_lm_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None, *,
                   label_smoothing=0.0, **kwargs):
    """transformers' ``ForCausalLMLoss`` on labelsmooth_ext, with label smoothing.

    ``logits`` (batch, seq, vocab_size) predict the next token: position t is scored against
    ``labels[:, t + 1]``, or against ``shift_labels[:, t]`` when those are given (already shifted, as
    padding-free collators provide them). Tokens equal to ``ignore_index`` are left out. The loss is
    the mean over the remaining tokens or, when ``num_items_in_batch`` (an int or a tensor: it is not
    read on the host) is given, their sum divided by it. Other keyword arguments, which transformers'
    models pass along, are ignored, as transformers' own loss ignores them.
    """
    del kwargs  # the model forwards its own keyword arguments (attention options, ...); none affect the loss
    if logits.shape[-1] != vocab_size:
        raise ValueError(
            f"labelsmooth_ext: logits of shape {list(logits.shape)} do not end in vocab_size={vocab_size}"
        )
    if shift_labels is None:
        if labels is None:
            raise ValueError("labelsmooth_ext: causal_lm_loss needs labels or shift_labels, got neither")
        shift_labels = _shifted_labels(labels, ignore_index)
    return _token_loss(logits, shift_labels, num_items_in_batch, ignore_index, label_smoothing)


@dataclasses.dataclass
class LabelSmoother:
    """Drop-in for ``transformers.trainer_pt_utils.LabelSmoother``, the Trainer's loss when
    ``TrainingArguments(label_smoothing_factor=epsilon)`` is set: the same loss (PyTorch's smoothing
    convention, which transformers' LabelSmoother also follows), on our op.
    """

    epsilon: float = 0.1
    ignore_index: int = -100

    def __call__(self, model_output, labels, shift_labels=False, num_items_in_batch=None):
        logits = model_output["logits"] if isinstance(model_output, dict) else model_output[0]
        if labels.dim() == logits.dim():  # labels with a trailing size-1 dim, which transformers also accepts
            labels = labels.squeeze(-1)
        if shift_labels:
            labels = _shifted_labels(labels, self.ignore_index)
        return _token_loss(logits, labels, num_items_in_batch, self.ignore_index, self.epsilon)


def _is_trainer(obj):
    # Imported here: transformers.Trainer needs accelerate, which a model-only user may not have.
    from transformers import Trainer

    return isinstance(obj, Trainer)


def _install_on_model(model, label_smoothing):
    config = getattr(model, "config", None)
    loss_type = getattr(model, "loss_type", None)
    if getattr(config, "is_encoder_decoder", False) or LOSS_MAPPING.get(loss_type) is not ForCausalLMLoss:
        raise TypeError(
            f"labelsmooth_ext: install() takes a causal language model (a transformers model whose loss is "
            f"ForCausalLMLoss, loss_type 'ForCausalLM' or 'ForConditionalGeneration', decoder-only) or a Trainer; "
            f"got {type(model).__name__} with loss_type={loss_type!r}"
            + (" (an encoder-decoder model)" if getattr(config, "is_encoder_decoder", False) else "")
        )
    # The public setter, not a new LOSS_MAPPING entry: model.loss_type stays 'ForCausalLM', which is how
    # the Trainer knows to count num_items_in_batch over the shifted labels.
    model.loss_function = functools.partial(causal_lm_loss, label_smoothing=label_smoothing)


def install(model_or_trainer, *, label_smoothing=None):
    """Makes a transformers causal LM, or a Trainer, compute its loss with labelsmooth_ext.

    * A model (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ...): ``model(input_ids, labels=labels)``
      then returns ``causal_lm_loss`` with ``label_smoothing`` (default 0.0: transformers' models do not
      smooth). Returns the model.
    * A ``Trainer``: installs the loss on ``trainer.model`` (unsmoothed, as transformers' model loss)
      and, when ``TrainingArguments(label_smoothing_factor=eps)`` is set, replaces the Trainer's label
      smoother by ours with the same ``eps``: that is the loss the Trainer then trains on. The
      smoothing comes from ``label_smoothing_factor``; passing ``label_smoothing`` here is an error.
      Returns the Trainer.

    Raises TypeError for a model whose loss is not transformers' causal-LM loss (its contract differs).
    """
    if _is_trainer(model_or_trainer):
        trainer = model_or_trainer
        if label_smoothing is not None:
            raise TypeError(
                "labelsmooth_ext: install(trainer) takes its label smoothing from "
                f"TrainingArguments(label_smoothing_factor=...) (now {trainer.args.label_smoothing_factor}); "
                f"got label_smoothing={label_smoothing!r} as well"
            )
        _install_on_model(trainer.model, 0.0)
        if trainer.label_smoother is not None:
            trainer.label_smoother = LabelSmoother(epsilon=trainer.label_smoother.epsilon,
                                                   ignore_index=trainer.label_smoother.ignore_index)
        return trainer
    _install_on_model(model_or_trainer,
                      0.0 if label_smoothing is None else _validation.check_label_smoothing(label_smoothing))
    return model_or_trainer
