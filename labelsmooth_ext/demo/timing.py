"""Forward+backward timings of labelsmooth_ext.cross_entropy against PyTorch's eager and
torch.compile'd F.cross_entropy, at the same label smoothing, on the same inputs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import labelsmooth_ext

LossFn = Callable[..., torch.Tensor]

EAGER = "F.cross_entropy"
COMPILED = "torch.compile(F.cross_entropy)"
OURS = "labelsmooth_ext"


@dataclass(frozen=True)
class Timing:
    device: str
    rows: int
    classes: int
    implementation: str
    median_ms: float | None  # None: the implementation could not run here
    note: str = ""


def default_implementations() -> dict[str, Callable[[], LossFn]]:
    """Factories, so that building one (torch.compile) happens where its failure is caught."""
    return {
        OURS: lambda: labelsmooth_ext.cross_entropy,
        EAGER: lambda: F.cross_entropy,
        COMPILED: lambda: torch.compile(F.cross_entropy),
    }


def devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def time_all(
    shapes: list[tuple[int, int]],
    repeats: int,
    label_smoothing: float,
    seed: int,
    log: Callable[[str], None],
    implementations: dict[str, Callable[[], LossFn]] | None = None,
) -> list[Timing]:
    implementations = implementations or default_implementations()
    built: dict[str, LossFn] = {}
    unavailable: dict[str, str] = {}
    for name, make in implementations.items():
        try:
            built[name] = make()
        except Exception as error:  # noqa: BLE001 - any failure to build means "not available here"
            unavailable[name] = _short(error)

    timings = []
    for device in devices():
        for rows, classes in shapes:
            log(f"  timing {rows}x{classes} on {device} ...")
            timings += _time_shape(
                device, rows, classes, list(implementations), built, dict(unavailable), repeats, label_smoothing, seed
            )
    return timings


def _time_shape(
    device: str,
    rows: int,
    classes: int,
    names: list[str],
    built: dict[str, LossFn],
    unavailable: dict[str, str],
    repeats: int,
    label_smoothing: float,
    seed: int,
) -> list[Timing]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, classes, generator=generator).to(device).requires_grad_()
    target = torch.randint(0, classes, (rows,), generator=generator).to(device)

    def step(loss_fn: LossFn) -> float:
        _synchronize(device)
        start = time.perf_counter()
        loss = loss_fn(logits, target, label_smoothing=label_smoothing)
        torch.autograd.grad(loss, logits)
        _synchronize(device)
        return time.perf_counter() - start

    runnable = {}
    for name, loss_fn in built.items():
        try:
            # Warm-up: the first calls pay for compilation, allocator growth and cold caches.
            for _ in range(2):
                step(loss_fn)
            runnable[name] = loss_fn
        except Exception as error:  # noqa: BLE001 - torch.compile fails at first call (no compiler, ...)
            unavailable[name] = _short(error)

    samples: dict[str, list[float]] = {name: [] for name in runnable}
    running = list(runnable)
    for repeat in range(repeats):
        # Rotating the order spreads drift (thermal, other processes) evenly over the implementations.
        shift = repeat % len(running) if running else 0
        for name in running[shift:] + running[:shift]:
            samples[name].append(step(runnable[name]))

    return [
        Timing(device, rows, classes, name, 1e3 * statistics.median(samples[name]))
        if name in samples
        else Timing(device, rows, classes, name, None, f"unavailable: {unavailable[name]}")
        for name in names
    ]


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _short(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    message = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return message if len(message) <= 160 else message[:157] + "..."
