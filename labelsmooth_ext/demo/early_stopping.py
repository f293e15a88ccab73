"""Early stopping on the validation NLL: remembers the best epoch's weights and says when to stop."""

from __future__ import annotations

import math

import torch


class EarlyStopping:
    """Call :meth:`update` after every epoch with that epoch's validation NLL. A strictly lower NLL
    makes the epoch the new best and snapshots the model's weights; :attr:`should_stop` turns true
    after ``patience`` epochs in a row without one. :meth:`restore` loads the best epoch's weights
    back, so what is evaluated is the selected model, not the last one trained."""

    def __init__(self, patience: int) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be a positive integer, got {patience!r}")
        self.patience = patience
        self.best_epoch = 0
        self.best_val_nll = math.inf
        self.epochs_since_best = 0
        self._best_state: dict[str, torch.Tensor] | None = None

    def update(self, epoch: int, val_nll: float, model: torch.nn.Module) -> None:
        if val_nll < self.best_val_nll:
            self.best_epoch, self.best_val_nll, self.epochs_since_best = epoch, val_nll, 0
            # state_dict() holds the live parameters, which the next optimizer step changes in place:
            # the snapshot must be a copy.
            self._best_state = {name: value.detach().clone() for name, value in model.state_dict().items()}
        else:
            self.epochs_since_best += 1

    @property
    def should_stop(self) -> bool:
        return self.epochs_since_best >= self.patience

    def restore(self, model: torch.nn.Module) -> None:
        if self._best_state is None:
            # Only a NaN validation NLL from the first epoch on gets here.
            raise RuntimeError("no epoch had a finite validation NLL: nothing to restore (is the learning rate too high?)")
        model.load_state_dict(self._best_state)
