"""Trains the demo's MLP on the digits with labelsmooth_ext.cross_entropy and measures its test
accuracy and calibration, before and after temperature scaling."""

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


@dataclass(frozen=True)
class TrainingConfig:
    epochs: int
    hidden: int
    batch_size: int
    learning_rate: float
    n_bins: int
    seed: int


@dataclass(frozen=True)
class RunResult:
    label_smoothing: float
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
    order: the label smoothing is the only difference between them."""
    name = f"eps={label_smoothing:g}"
    with _single_thread():
        torch.manual_seed(config.seed)
        model = _make_mlp(splits.train_x.shape[1], config.hidden)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
        batch_order = torch.Generator().manual_seed(config.seed)
        n_train = len(splits.train_y)
        start = time.perf_counter()
        for epoch in range(1, config.epochs + 1):
            model.train()
            loss_sum = 0.0
            for batch in torch.randperm(n_train, generator=batch_order).split(config.batch_size):
                loss = labelsmooth_ext.cross_entropy(
                    model(splits.train_x[batch]), splits.train_y[batch], label_smoothing=label_smoothing
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += float(loss.detach()) * len(batch)
            model.eval()
            with torch.no_grad():
                train_accuracy = _accuracy(model(splits.train_x), splits.train_y)
                val_accuracy = _accuracy(model(splits.val_x), splits.val_y)
            log(
                f"  [{name}] epoch {epoch:3d}/{config.epochs}  loss {loss_sum / n_train:.4f}  "
                f"train acc (noisy labels) {train_accuracy:.3f}  val acc {val_accuracy:.3f}  "
                f"{time.perf_counter() - start:6.1f}s"
            )
        train_seconds = time.perf_counter() - start
        with torch.no_grad():
            val_logits = model(splits.val_x).double()
            test_logits = model(splits.test_x).double()

    temperature = fit_temperature(val_logits, splits.val_y)
    scaled_logits = test_logits / temperature
    return RunResult(
        label_smoothing=label_smoothing,
        accuracy=_accuracy(test_logits, splits.test_y),
        mean_confidence=float(test_logits.softmax(dim=1).amax(dim=1).mean()),
        nll=float(F.cross_entropy(test_logits, splits.test_y)),
        ece=expected_calibration_error(test_logits, splits.test_y, config.n_bins, from_logits=True),
        temperature=temperature,
        nll_scaled=float(F.cross_entropy(scaled_logits, splits.test_y)),
        ece_scaled=expected_calibration_error(scaled_logits, splits.test_y, config.n_bins, from_logits=True),
        train_seconds=train_seconds,
        test_logits=test_logits,
    )


def _accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == target).double().mean())
