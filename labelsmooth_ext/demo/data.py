"""The demo's dataset: scikit-learn's bundled 8x8 handwritten digits (no download), split into
train / validation / test, with a fraction of the training labels flipped to model label noise."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

N_CLASSES = 10


@dataclass(frozen=True)
class DigitsSplits:
    train_x: torch.Tensor
    train_y: torch.Tensor  # noisy labels: what the model is trained on
    val_x: torch.Tensor
    val_y: torch.Tensor  # clean: used only to fit the temperature
    test_x: torch.Tensor
    test_y: torch.Tensor  # clean: every reported metric
    n_flipped: int


def load_digits_splits(noise: float, seed: int) -> DigitsSplits:
    """60/20/20 stratified split; round(noise * n_train) training labels, chosen at random, are
    replaced by a different class drawn uniformly, so exactly that fraction is wrong."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    features, labels = load_digits(return_X_y=True)
    features = features / 16.0  # pixel intensities are 0..16; unit scale suits the MLP's init
    train_x, rest_x, train_y, rest_y = train_test_split(
        features, labels, test_size=0.4, random_state=seed, stratify=labels
    )
    val_x, test_x, val_y, test_y = train_test_split(
        rest_x, rest_y, test_size=0.5, random_state=seed, stratify=rest_y
    )

    rng = np.random.default_rng(seed)
    n_flipped = int(round(noise * len(train_y)))
    flipped = rng.choice(len(train_y), size=n_flipped, replace=False)
    noisy_y = train_y.copy()
    # A shift of 1..C-1 classes never lands on the true class.
    noisy_y[flipped] = (noisy_y[flipped] + rng.integers(1, N_CLASSES, size=n_flipped)) % N_CLASSES

    def as_features(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, dtype=torch.float32)

    def as_labels(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, dtype=torch.int64)

    return DigitsSplits(
        as_features(train_x), as_labels(noisy_y),
        as_features(val_x), as_labels(val_y),
        as_features(test_x), as_labels(test_y),
        n_flipped,
    )
