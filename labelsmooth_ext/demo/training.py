"""Trains the demo's MLP on the digits with labelsmooth_ext.cross_entropy, keeps the epoch with the
lowest validation NLL, and measures its test accuracy and calibration, before and after
temperature scaling."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import labelsmooth_ext
from labelsmooth_ext.calibration import expected_calibration_error, fit_temperature
from labelsmooth_ext.demo.data import N_CLASSES, DigitsSplits
from labelsmooth_ext.demo.early_stopping import EarlyStopping


@dataclass(frozen=True)
class TrainingConfig:
    max_epochs: int
    patience: int  # epochs without a lower validation NLL before training stops
    hidden: int
    batch_size: int
    learning_rate: float
    n_bins: int
    seed: int


@dataclass(frozen=True)
class RunResult:
    seed: int
    label_smoothing: float
    best_epoch: int  # the epoch whose weights are evaluated: lowest validation NLL
    epochs_trained: int
    val_nll_history: tuple[float, ...]  # validation NLL after each epoch trained
    val_nll: float  # of the evaluated (restored) model
    accuracy: float
    mean_confidence: float
    nll: float
    ece: float
    temperature: float  # fitted on the clean validation split
    nll_scaled: float
    ece_scaled: float
    train_seconds: float
    test_logits: torch.Tensor


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    # The batches are tiny, so one thread is faster than several; it also fixes the reduction
    # order, so a seed gives the same metrics on any core count.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _make_mlp(n_features: int, hidden: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(n_features, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, N_CLASSES),
    )


def train_and_evaluate(
    splits: DigitsSplits,
    label_smoothing: float,
    config: TrainingConfig,
    log: Callable[[str], None],
) -> RunResult:
    """Both runs of a comparison get the same seed, hence the same initial weights and batch
    order: the label smoothing is the only difference between them. Each trains until its
    validation NLL has not improved for ``config.patience`` epochs (or ``config.max_epochs``), then
    goes back to the weights of its best epoch."""
    with _single_thread():
        torch.manual_seed(config.seed)
        model = _make_mlp(splits.train_x.shape[1], config.hidden)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
        batch_order = torch.Generator().manual_seed(config.seed)
        stopping = EarlyStopping(config.patience)
        val_nll_history = []
        n_train = len(splits.train_y)
        start = time.perf_counter()
        for epoch in range(1, config.max_epochs + 1):
            model.train()
            for batch in torch.randperm(n_train, generator=batch_order).split(config.batch_size):
                loss = labelsmooth_ext.cross_entropy(
                    model(splits.train_x[batch]), splits.train_y[batch], label_smoothing=label_smoothing
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            val_nll_history.append(_validation_nll(model, splits))
            stopping.update(epoch, val_nll_history[-1], model)
            if stopping.should_stop:
                break
        train_seconds = time.perf_counter() - start
        stopping.restore(model)
        model.eval()
        with torch.no_grad():
            val_logits = model(splits.val_x).double()
            test_logits = model(splits.test_x).double()
    val_nll = _nll(val_logits, splits.val_y)

    log(
        f"  seed {config.seed}, eps={label_smoothing:g}: best validation NLL {val_nll:.4f} at epoch "
        f"{stopping.best_epoch} of {len(val_nll_history)} trained, {train_seconds:.1f} s"
    )
    temperature = fit_temperature(val_logits, splits.val_y)
    scaled_logits = test_logits / temperature
    return RunResult(
        seed=config.seed,
        label_smoothing=label_smoothing,
        best_epoch=stopping.best_epoch,
        epochs_trained=len(val_nll_history),
        val_nll_history=tuple(val_nll_history),
        val_nll=val_nll,
        accuracy=_accuracy(test_logits, splits.test_y),
        mean_confidence=float(test_logits.softmax(dim=1).amax(dim=1).mean()),
        nll=_nll(test_logits, splits.test_y),
        ece=expected_calibration_error(test_logits, splits.test_y, config.n_bins, from_logits=True),
        temperature=temperature,
        nll_scaled=_nll(scaled_logits, splits.test_y),
        ece_scaled=expected_calibration_error(scaled_logits, splits.test_y, config.n_bins, from_logits=True),
        train_seconds=train_seconds,
        test_logits=test_logits,
    )


def _validation_nll(model: torch.nn.Module, splits: DigitsSplits) -> float:
    model.eval()
    with torch.no_grad():
        return _nll(model(splits.val_x).double(), splits.val_y)


def _nll(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Mean negative log-likelihood of the true class: cross-entropy without smoothing."""
    return float(F.cross_entropy(logits, target, label_smoothing=0.0))


def _accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == target).double().mean())
