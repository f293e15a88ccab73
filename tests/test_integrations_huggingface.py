"""labelsmooth_ext.integrations.huggingface against transformers' own causal-LM loss and LabelSmoother, on
a tiny Llama built from a config in code (no downloads): the loss function alone, the model's forward,
and a short Trainer run with gradient accumulation.

transformers computes its causal-LM loss in float32 (ForCausalLMLoss upcasts, or downcasts, the logits
with .float()), so with a float32 model ours and transformers' are two float32 computations of the same
float64 value and may differ by the sum of their bounds; with a float64 model, where transformers' own
path cannot follow, ours is compared with the float64 reference itself.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification  # noqa: E402
from transformers.loss.loss_utils import ForCausalLMLoss  # noqa: E402
from transformers.trainer_pt_utils import LabelSmoother as TransformersLabelSmoother  # noqa: E402

from labelsmooth_ext.integrations import huggingface  # noqa: E402

from conftest import (  # noqa: E402
    _gamma,
    accumulation_dtype,
    assert_within,
    grad_tolerance,
    loss_tolerance,
    randn,
    reference_loss_and_grads,
    unit_roundoff,
)

IGNORE = -100
VOCAB = 40
LEARNING_RATE = 0.5  # of the Trainer run: plain SGD at a constant rate, no clipping


def _tiny_llama(gen, dtype=torch.float32, **overrides):
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=False, **overrides)
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(2**31, (), generator=gen)))
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def _batch(gen, batch=3, length=9):
    """Token ids and labels with ignored positions, one sequence entirely ignored."""
    input_ids = torch.randint(0, VOCAB, (batch, length), generator=gen)
    labels = input_ids.clone()
    labels[torch.rand(labels.shape, generator=gen) < 0.25] = IGNORE
    labels[-1] = IGNORE
    return input_ids, labels


def _shifted(labels):
    return torch.cat([labels[..., 1:], torch.full_like(labels[..., :1], IGNORE)], dim=-1)


def _num_items(kind, shifted_labels):
    """num_items_in_batch as the Trainer gives it (a tensor count of the accumulated batch, here the
    batch plus as many tokens again from other micro-batches), as an int, or absent."""
    count = int((shifted_labels != IGNORE).sum()) * 2
    return {"absent": None, "int": count, "tensor": torch.tensor(count)}[kind]


def _bounds(logits, shifted_labels, eps, num_items):
    """(float64 reference loss, reference logits gradient, loss bound, gradient bound) of the causal-LM
    loss of `logits` (any float dtype) against the float64 reference (conftest's derivation)."""
    flat = logits.detach().flatten(0, -2)
    targets = shifted_labels.reshape(-1)
    u = unit_roundoff(accumulation_dtype(logits.dtype))
    if num_items is None:
        upstream = torch.ones((), dtype=torch.float64)
        loss, grad, _ = reference_loss_and_grads(flat, targets, None, IGNORE, "mean", eps, upstream)
        loss_tol = loss_tolerance(flat, targets, None, IGNORE, "mean", eps)
        grad_tol = grad_tolerance(flat, targets, None, IGNORE, "mean", eps, upstream, grad)
    else:
        count = float(num_items)
        upstream = torch.tensor(1.0 / count, dtype=torch.float64)
        total, grad, _ = reference_loss_and_grads(flat, targets, None, IGNORE, "sum", eps, upstream)
        loss = total / count
        # The division by the count rounds once more, and so does its reciprocal in the backward.
        loss_tol = loss_tolerance(flat, targets, None, IGNORE, "sum", eps) / count + 2 * u * loss.abs()
        grad_tol = grad_tolerance(flat, targets, None, IGNORE, "sum", eps, upstream, grad) + 2 * u * grad.abs()
    return loss, grad.view(logits.shape), loss_tol, grad_tol.view(logits.shape)


def _head_weight_bound(hidden, grad_a, grad_b, logits_grad_bound, dtype):
    """Bound on |dW_a - dW_b| for the lm_head weight gradients dW = sum_t g_t h_t^T of two logits
    gradients g_a, g_b with |g_a - g_b| <= logits_grad_bound, each product rounded in `dtype`."""
    h = hidden.detach().flatten(0, -2).to(torch.float64).abs()
    tokens = h.shape[0]
    flat = lambda g: g.detach().flatten(0, -2).to(torch.float64).abs()  # noqa: E731
    return flat(logits_grad_bound).T @ h + _gamma(tokens, accumulation_dtype(dtype)) * \
        (flat(grad_a).T @ h + flat(grad_b).T @ h)


def _forward_backward(model, loss_of):
    """(outputs, loss) = loss_of(model), then the backward of the loss; returns the loss, the logits, their
    gradient, the lm_head's input and the lm_head weight's gradient."""
    hidden = []
    handle = model.lm_head.register_forward_pre_hook(lambda module, args: hidden.append(args[0].detach()))
    model.zero_grad(set_to_none=True)
    try:
        out, loss = loss_of(model)
    finally:
        handle.remove()
    out.logits.retain_grad()
    loss.backward()
    return loss.detach(), out.logits.detach(), out.logits.grad, hidden[0], model.lm_head.weight.grad.clone()


def _model_loss(input_ids, labels, **kwargs):
    """The model's own loss: model(input_ids, labels=labels, ...).loss."""
    def loss_of(model):
        out = model(input_ids=input_ids, labels=labels, **kwargs)
        return out, out.loss
    return loss_of


# ----------------------------------------------------------------------------------------------------
# The loss function on its own


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("num_items_kind", ["absent", "int", "tensor"])
@pytest.mark.parametrize("given_shift_labels", [False, True], ids=["labels", "shift_labels"])
def test_causal_lm_loss_matches_reference(gen, dtype, num_items_kind, given_shift_labels):
    input_ids, labels = _batch(gen)
    shifted = _shifted(labels)
    num_items = _num_items(num_items_kind, shifted)
    for eps in (0.0, 0.1):
        logits = randn(tuple(labels.shape) + (VOCAB,), gen, dtype, scale=3.0).requires_grad_()
        if given_shift_labels:
            loss = huggingface.causal_lm_loss(logits, None, VOCAB, num_items, shift_labels=shifted,
                                              label_smoothing=eps)
        else:
            loss = huggingface.causal_lm_loss(logits, labels, VOCAB, num_items, label_smoothing=eps)
        (grad,) = torch.autograd.grad(loss, logits)
        ref_loss, ref_grad, loss_tol, grad_tol = _bounds(logits, shifted, eps, num_items)
        assert_within(loss, ref_loss, loss_tol, f"loss, eps {eps}")
        assert grad.dtype == dtype
        assert_within(grad, ref_grad, grad_tol, f"logits gradient, eps {eps}")
        if eps == 0.0 and dtype == torch.float32:
            # transformers' own function on the same logits: float32 as well.
            theirs = ForCausalLMLoss(logits.detach(), labels, VOCAB, num_items,
                                     shift_labels=shifted if given_shift_labels else None)
            assert_within(loss, theirs, 2 * loss_tol, "loss vs transformers' ForCausalLMLoss")


@pytest.mark.parametrize("num_items_kind", ["absent", "tensor"])
@pytest.mark.parametrize("shift_labels", [True, False], ids=["causal", "unshifted"])
def test_label_smoother_matches_transformers(gen, num_items_kind, shift_labels):
    _, labels = _batch(gen)
    scored = _shifted(labels) if shift_labels else labels
    num_items = _num_items(num_items_kind, scored)
    eps = 0.1 + 0.2 * float(torch.rand((), generator=gen))
    logits = randn(tuple(labels.shape) + (VOCAB,), gen, torch.float32, scale=3.0).requires_grad_()
    ours = huggingface.LabelSmoother(epsilon=eps)({"logits": logits}, labels, shift_labels=shift_labels,
                                                  num_items_in_batch=num_items)
    (grad,) = torch.autograd.grad(ours, logits)
    z = logits.detach().requires_grad_()
    theirs = TransformersLabelSmoother(epsilon=eps)({"logits": z}, labels, shift_labels=shift_labels,
                                                    num_items_in_batch=num_items)
    (their_grad,) = torch.autograd.grad(theirs, z)
    _, _, loss_tol, grad_tol = _bounds(logits, scored, eps, num_items)
    assert_within(ours, theirs, 2 * loss_tol, "loss vs transformers' LabelSmoother")
    # transformers slices the logits for the shift, so its gradient has no entry for the last position:
    # that position's gradient is ours and is zero.
    if shift_labels:
        assert torch.equal(grad[:, -1], torch.zeros_like(grad[:, -1]))
    assert_within(grad, their_grad, 2 * grad_tol, "logits gradient vs transformers' LabelSmoother")


class _LargeAllocations(TorchDispatchMode):
    """Records every op that returns a new tensor (not a view of an input) of at least `numel` elements."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.seen = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for result in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(result, torch.Tensor) and result.numel() >= self.numel and \
                    result.untyped_storage().data_ptr() not in inputs:
                self.seen.append(str(func))
        return out


@pytest.mark.parametrize("layout", ["contiguous", "padded_vocab"])
def test_forward_makes_no_copy_of_the_logits(gen, layout):
    _, labels = _batch(gen)
    width = VOCAB + (8 if layout == "padded_vocab" else 0)
    logits = randn(tuple(labels.shape) + (width,), gen, torch.float32)[..., :VOCAB].requires_grad_()
    with _LargeAllocations(logits.numel()) as ours:
        huggingface.causal_lm_loss(logits, labels, VOCAB, torch.tensor(7), label_smoothing=0.1)
    assert ours.seen == [], f"copies of the logits: {ours.seen}"
    with _LargeAllocations(logits.numel()) as smoother:
        huggingface.LabelSmoother(epsilon=0.1)({"logits": logits}, labels, shift_labels=True)
    assert smoother.seen == [], f"copies of the logits: {smoother.seen}"
    # The recorder does see a copy where there is one: transformers' LabelSmoother slices and copies.
    with _LargeAllocations(labels.numel() // labels.shape[0] * VOCAB) as theirs:
        TransformersLabelSmoother(epsilon=0.1)({"logits": logits}, labels, shift_labels=True)
    assert theirs.seen, "the recorder saw no allocation in transformers' LabelSmoother"


# ----------------------------------------------------------------------------------------------------
# The model


@pytest.mark.parametrize("num_items_kind", ["absent", "int", "tensor"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_model_float32_matches_transformers(gen, num_items_kind, eps):
    """model(input_ids, labels=...) with our loss installed against transformers' path on the same model:
    its ForCausalLMLoss (eps 0) or the Trainer's LabelSmoother (eps > 0). Same loss, same logits gradient,
    same lm_head weight gradient, within the bounds of two float32 computations."""
    model = _tiny_llama(gen)
    input_ids, labels = _batch(gen)
    shifted = _shifted(labels)
    num_items = _num_items(num_items_kind, shifted)
    kwargs = {} if num_items is None else {"num_items_in_batch": num_items}
    if eps == 0.0:
        theirs = _forward_backward(model, _model_loss(input_ids, labels, **kwargs))
    else:
        def smoothed_loss_of(model):  # what the Trainer does with label_smoothing_factor set
            out = model(input_ids=input_ids)
            smoother = TransformersLabelSmoother(epsilon=eps)
            return out, smoother(out, labels, shift_labels=True, num_items_in_batch=num_items)
        theirs = _forward_backward(model, smoothed_loss_of)
    assert huggingface.install(model, label_smoothing=eps) is model
    loss, logits, logits_grad, hidden, head_grad = _forward_backward(model, _model_loss(input_ids, labels, **kwargs))
    their_loss, their_logits, their_logits_grad, _, their_head_grad = theirs
    assert torch.equal(logits, their_logits)  # the same forward, so the losses see the same logits
    _, _, loss_tol, grad_tol = _bounds(logits, shifted, eps, num_items)
    assert_within(loss, their_loss, 2 * loss_tol, "loss")
    assert_within(logits_grad, their_logits_grad, 2 * grad_tol, "logits gradient")
    bound = _head_weight_bound(hidden, logits_grad, their_logits_grad, 2 * grad_tol, torch.float32)
    assert_within(head_grad, their_head_grad, bound, "lm_head weight gradient")


@pytest.mark.parametrize("num_items_kind", ["absent", "tensor"])
def test_model_float64_matches_float64_reference(gen, num_items_kind):
    """transformers' own loss runs in float32 even for a float64 model; ours stays in float64."""
    model = _tiny_llama(gen, torch.float64)
    input_ids, labels = _batch(gen)
    shifted = _shifted(labels)
    num_items = _num_items(num_items_kind, shifted)
    kwargs = {} if num_items is None else {"num_items_in_batch": num_items}
    huggingface.install(model, label_smoothing=0.1)
    loss, logits, logits_grad, hidden, head_grad = _forward_backward(model, _model_loss(input_ids, labels, **kwargs))
    assert loss.dtype == torch.float64
    ref_loss, ref_grad, loss_tol, grad_tol = _bounds(logits, shifted, 0.1, num_items)
    assert_within(loss, ref_loss, loss_tol, "loss")
    assert_within(logits_grad, ref_grad, grad_tol, "logits gradient")
    ref_head_grad = ref_grad.flatten(0, -2).T @ hidden.flatten(0, -2)
    bound = _head_weight_bound(hidden, logits_grad, ref_grad, grad_tol, torch.float64)
    assert_within(head_grad, ref_head_grad, bound, "lm_head weight gradient")


# ----------------------------------------------------------------------------------------------------
# A Trainer run


class _Recorder:
    """Wraps a loss callable and records, per call, its logits and labels, the gradient of the logits,
    the count it was given and the loss."""

    def __init__(self, loss_fn, inputs_of):
        self.loss_fn, self.inputs_of, self.calls = loss_fn, inputs_of, []

    def __call__(self, *args, **kwargs):
        logits, labels = self.inputs_of(args, kwargs)
        call = {"logits": logits.detach(), "labels": labels, "num_items": kwargs.get("num_items_in_batch")}
        logits.register_hook(lambda grad: call.__setitem__("grad", grad))
        call["loss"] = self.loss_fn(*args, **kwargs)
        self.calls.append(call)
        return call["loss"]


def _train_once(gen_seed, dataset, eps, ours, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _tiny_llama(torch.Generator().manual_seed(gen_seed))
    head_before = model.lm_head.weight.detach().clone()
    hidden = []
    model.lm_head.register_forward_pre_hook(lambda module, args: hidden.append(args[0].detach()))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, max_steps=1, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=LEARNING_RATE, lr_scheduler_type="constant",
                             max_grad_norm=0.0, label_smoothing_factor=eps, seed=gen_seed,
                             dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      optimizers=(torch.optim.SGD(model.parameters(), lr=LEARNING_RATE), None))
    if ours:
        assert huggingface.install(trainer) is trainer
        assert isinstance(trainer.label_smoother, huggingface.LabelSmoother) == (eps != 0)
        assert model.loss_function.func is huggingface.causal_lm_loss
    if eps != 0:
        # The Trainer calls label_smoother(outputs, labels, shift_labels=True, num_items_in_batch=...).
        trainer.label_smoother = _Recorder(trainer.label_smoother, lambda a, kw: (a[0]["logits"], a[1]))
        recorder = trainer.label_smoother
    else:
        # The model calls loss_function(logits=..., labels=..., vocab_size=..., num_items_in_batch=..., ...).
        model.loss_function = _Recorder(model.loss_function, lambda a, kw: (kw["logits"], kw["labels"]))
        recorder = model.loss_function
    trainer.train()
    return recorder.calls, hidden, head_before, model.lm_head.weight.detach().clone()


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_trainer_run_matches_transformers(gen, eps, tmp_path):
    """One SGD step over two accumulated micro-batches (num_items_in_batch counts the shifted labels of
    both), with transformers' loss and with ours installed: the same micro-batch losses, logits gradients
    and updated lm_head weights."""
    seed = int(torch.randint(2**31, (), generator=gen))
    input_ids, labels = _batch(gen, batch=4, length=8)
    dataset = [{"input_ids": i, "labels": l} for i, l in zip(input_ids, labels)]
    theirs = _train_once(seed, dataset, eps, False, tmp_path / "theirs")
    ours = _train_once(seed, dataset, eps, True, tmp_path / "ours")
    (their_calls, _, head_before, their_head), (calls, hidden, _, head) = theirs, ours
    assert len(calls) == len(their_calls) == 2, "one loss call per micro-batch"
    head_bound = torch.zeros_like(head, dtype=torch.float64)
    for step, (call, their_call, h) in enumerate(zip(calls, their_calls, hidden)):
        assert torch.equal(call["logits"], their_call["logits"]), f"micro-batch {step}: different inputs"
        num_items = call["num_items"]
        assert num_items is not None and int(num_items) == int(their_call["num_items"])
        assert torch.equal(call["labels"], their_call["labels"])
        _, _, loss_tol, grad_tol = _bounds(call["logits"], _shifted(call["labels"]), eps, num_items)
        assert_within(call["loss"], their_call["loss"], 2 * loss_tol, f"micro-batch {step} loss")
        assert_within(call["grad"], their_call["grad"], 2 * grad_tol, f"micro-batch {step} logits gradient")
        head_bound += _head_weight_bound(h, call["grad"], their_call["grad"], 2 * grad_tol, torch.float32)
    assert not torch.equal(head, head_before), "the step did not change the weights"
    # W - lr * dW, rounded in float32 (both the product and the difference).
    u = unit_roundoff(torch.float32)
    update = (head_before.to(torch.float64) - head.to(torch.float64)).abs()
    bound = LEARNING_RATE * head_bound + 2 * u * (head_before.to(torch.float64).abs() + 2 * update)
    assert_within(head, their_head, bound, "lm_head weight after the step")


# ----------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input(gen):
    logits = randn((2, 5, VOCAB), gen)
    labels = torch.randint(0, VOCAB, (2, 5), generator=gen)
    with pytest.raises(ValueError, match=rf"logits of shape \[2, 5, {VOCAB}\] do not end in vocab_size=32"):
        huggingface.causal_lm_loss(logits, labels, 32)
    with pytest.raises(ValueError, match=r"labels of shape \[2, 4\] do not match logits of shape \[2, 5, 40\] "
                                         r"\(expected labels of shape \[2, 5\]\)"):
        huggingface.causal_lm_loss(logits, labels[:, :4], VOCAB)
    with pytest.raises(ValueError, match="needs labels or shift_labels, got neither"):
        huggingface.causal_lm_loss(logits, None, VOCAB)
    with pytest.raises(RuntimeError, match=r"label_smoothing must be between 0.0 and 1.0. Got: 1.5"):
        huggingface.causal_lm_loss(logits, labels, VOCAB, label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"logits must have shape \(..., vocab_size\) with at least one token"):
        huggingface.LabelSmoother()({"logits": logits[0, 0]}, labels[0, 0])


def test_install_rejects_what_it_cannot_serve(gen, tmp_path):
    with pytest.raises(TypeError, match=r"got LlamaForSequenceClassification with loss_type="
                                        r"'ForSequenceClassification'"):
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2, num_labels=3)
        huggingface.install(LlamaForSequenceClassification(config))
    with pytest.raises(TypeError, match=r"got Linear with loss_type=None"):
        huggingface.install(torch.nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match=r"label_smoothing must be between 0.0 and 1.0. Got: -0.1"):
        huggingface.install(_tiny_llama(gen), label_smoothing=-0.1)

    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", label_smoothing_factor=0.1)
    trainer = Trainer(model=_tiny_llama(gen), args=args)
    with pytest.raises(TypeError, match=r"TrainingArguments\(label_smoothing_factor=...\) \(now 0.1\); got "
                                        r"label_smoothing=0.2 as well"):
        huggingface.install(trainer, label_smoothing=0.2)
    assert math.isclose(huggingface.install(trainer).label_smoother.epsilon, 0.1)
