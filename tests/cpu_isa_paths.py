"""The instruction-set copies of the compiled CPU kernels: which ones this machine can run, and a context
manager that runs a block of code on one of them (tests only; users set LABELSMOOTH_CPU_ISA)."""

from __future__ import annotations

import contextlib

import pytest

ALL_ISAS = ("avx512", "avx2", "baseline")
# The copies with fused multiply-adds: they fuse the same operations, so they give the same bits as each other.
FMA_ISAS = ("avx512", "avx2")


def compiled_module():
    import labelsmooth_ext

    if labelsmooth_ext.backend_info()["backend"] != "compiled":
        return None
    from labelsmooth_ext import _C

    return _C


def supported_isas() -> list[str]:
    module = compiled_module()
    return [] if module is None else list(module.build_info()["cpu_isas"])


def supported_fma_isas() -> list[str]:
    return [isa for isa in supported_isas() if isa in FMA_ISAS]


@contextlib.contextmanager
def running_on(isa: str):
    """Runs the block on the kernels of `isa`; skips the test where this machine cannot run them."""
    module = compiled_module()
    if module is None:
        pytest.skip("compiled backend not active")
    if isa not in supported_isas():
        pytest.skip(f"this CPU cannot run the {isa} kernels (supported: {supported_isas()})")
    previous = module.cpu_isa()
    module.set_cpu_isa(isa)
    try:
        yield
    finally:
        module.set_cpu_isa(previous)
