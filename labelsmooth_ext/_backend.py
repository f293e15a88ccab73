"""Chooses the implementation behind the ``labelsmooth`` ops: the compiled extension or reference.py.

LABELSMOOTH_BACKEND selects it: unset (or "auto") uses the compiled kernels when they load and falls back
to pure PyTorch with one warning otherwise; "compiled" makes a missing extension an error; "python"
uses the fallback without trying the extension. Either way the same ops exist, so everything above
this module (autograd, fakes, torch.compile, the public API) has a single path.
"""

import os
import warnings

import torch

from . import _schemas, reference
from ._version import __version__

BACKEND_ENV = "LABELSMOOTH_BACKEND"
_BUILD_HINT = (
    "build it with `pip install --no-build-isolation .` in the source tree (needs a C++17 compiler and "
    "the torch version it runs with)"
)

# Kept alive for the life of the process: dropping a Library object unregisters its ops.
_python_library = None


def _requested_mode():
    mode = os.environ.get(BACKEND_ENV, "").strip().lower() or "auto"
    if mode not in ("auto", "compiled", "python"):
        raise ValueError(
            f"{BACKEND_ENV}={os.environ[BACKEND_ENV]!r} is not valid: expected 'compiled', 'python' or 'auto' "
            "(or leave it unset)"
        )
    return mode


def _define_python_ops():
    global _python_library
    _python_library = torch.library.Library(_schemas.NAMESPACE, "DEF")
    for schema in _schemas.SCHEMAS:
        _python_library.define(schema)
    # CompositeExplicitAutograd: one implementation for every device, below the autograd formula
    # that _registration.py attaches.
    _python_library.impl("ls_cross_entropy_forward", reference.ls_cross_entropy_forward, "CompositeExplicitAutograd")
    _python_library.impl(
        "ls_cross_entropy_backward", reference.ls_cross_entropy_backward, "CompositeExplicitAutograd"
    )


def _load():
    """Returns (backend, reason, build_info) after making sure the ops are defined."""
    mode = _requested_mode()
    if mode == "python":
        _define_python_ops()
        return "python", f"selected by {BACKEND_ENV}=python", {}
    try:
        from . import _C
    except (ImportError, OSError) as error:
        if mode == "compiled":
            raise ImportError(
                f"{BACKEND_ENV}=compiled, but the compiled extension labelsmooth_ext._C cannot be loaded "
                f"({error}); {_BUILD_HINT}"
            ) from error
        warnings.warn(
            f"labelsmooth_ext: the compiled kernels cannot be loaded ({error}); using the pure-PyTorch "
            f"fallback, which is correct but slower. To get the kernels, {_BUILD_HINT}. "
            f"Set {BACKEND_ENV}=python to choose the fallback without this warning.",
            RuntimeWarning,
            stacklevel=3,
        )
        _define_python_ops()
        return "python", f"compiled extension not loadable: {error}", {}
    info = dict(_C.build_info())
    reason = "compiled extension labelsmooth_ext._C loaded"
    if info["torch_version"] != torch.__version__:
        reason += f" (built against torch {info['torch_version']}, running {torch.__version__}: rebuild if it misbehaves)"
    return "compiled", reason, info


BACKEND, REASON, _BUILD_INFO = _load()


def backend_info():
    """What runs the loss here: backend, why, versions, CUDA kernels and archs, OpenMP threads, CPU ISA."""
    archs = _BUILD_INFO.get("cuda_archs", "")
    return {
        "backend": BACKEND,
        "reason": REASON,
        "version": __version__,
        "torch_version": _BUILD_INFO.get("torch_version"),
        "torch_runtime_version": torch.__version__,
        "cuda_compiled": bool(_BUILD_INFO.get("cuda_compiled", False)),
        "cuda_archs": [a for a in archs.replace(",", ";").split(";") if a],
        "cuda_available": torch.cuda.is_available(),
        "openmp": bool(_BUILD_INFO.get("openmp", False)),
        "num_threads": torch.get_num_threads(),
        # CPU kernels' instruction set in use (LABELSMOOTH_CPU_ISA forces one), and those this CPU can run.
        "cpu_isa": _cpu_isa(),
        "cpu_isas": list(_BUILD_INFO.get("cpu_isas", [])),
    }


def _cpu_isa():
    if BACKEND != "compiled":
        return None
    from . import _C

    return _C.cpu_isa()
