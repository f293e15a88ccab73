"""Chooses the implementation behind the ``labelsmooth`` ops: the compiled extension or reference.py.

LABELSMOOTH_BACKEND selects it: unset (or "auto") uses the compiled kernels when they load and falls back
to pure PyTorch with one warning otherwise; "compiled" makes a missing extension an error; "python"
uses the fallback without trying the extension. Either way the same ops exist, so everything above
this module (autograd, fakes, torch.compile, the public API) has a single path.
"""

import importlib
import importlib.machinery
import os
import warnings

import torch

from . import _schemas, reference
from ._version import __version__

BACKEND_ENV = "LABELSMOOTH_BACKEND"
# The README's install command; a build is tied to the torch it was compiled against.
_BUILD_COMMAND = "pip install --no-build-isolation -e ."
_BUILD_HINT = (
    f"build it with `{_BUILD_COMMAND}` in the source tree (needs a C++17 compiler and the torch version it runs with)"
)

# Kept alive for the life of the process: dropping a Library object unregisters its ops.
_python_library = None
_cuda_fallback_library = None


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


def _import_compiled():
    """Imports labelsmooth_ext._C; ImportError says what is wrong in words a user can act on (a plain
    `from . import _C` reports a missing file as a "partially initialized module ... circular import")."""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    if not any(os.path.exists(os.path.join(package_dir, "_C" + suffix)) for suffix in suffixes):
        raise ImportError(f"labelsmooth_ext._C is not built: there is no compiled extension (_C*.so) in {package_dir}")
    try:
        return importlib.import_module(f"{__package__}._C")
    except ImportError as error:
        # An undefined symbol is what a torch upgraded or downgraded under the build looks like.
        raise ImportError(
            f"labelsmooth_ext._C exists but does not load ({error}); the usual cause is a build made against "
            f"another torch than the one installed now ({torch.__version__})"
        ) from error


def _warn_if_built_for_another_torch(built_against):
    if built_against == torch.__version__:
        return
    warnings.warn(
        f"labelsmooth_ext: the compiled extension was built against torch {built_against} but torch "
        f"{torch.__version__} is running; it may misbehave or crash. Rebuild it with `{_BUILD_COMMAND}` in the source "
        "tree.",
        RuntimeWarning,
        stacklevel=4,
    )


def _register_reference_for_cuda():
    """A build without CUDA kernels (torch with CUDA but no nvcc at install time, or LABELSMOOTH_FORCE_CPU=1)
    still takes CUDA tensors: the reference implementation runs there, with one warning at the first call."""
    global _cuda_fallback_library
    _cuda_fallback_library = torch.library.Library(_schemas.NAMESPACE, "IMPL")
    warned = []

    def on_cuda(implementation):
        def kernel(*args):
            if not warned:
                warned.append(True)
                warnings.warn(
                    "labelsmooth_ext: this build has no CUDA kernels (it was compiled without nvcc, or with "
                    "LABELSMOOTH_FORCE_CPU=1), so CUDA tensors run on the pure-PyTorch implementation, which is "
                    f"correct but slower. To get the kernels, rebuild with `{_BUILD_COMMAND}` on a machine with the "
                    "CUDA toolkit (nvcc) matching torch's CUDA version.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return implementation(*args)

        return kernel

    _cuda_fallback_library.impl("ls_cross_entropy_forward", on_cuda(reference.ls_cross_entropy_forward), "CUDA")
    _cuda_fallback_library.impl("ls_cross_entropy_backward", on_cuda(reference.ls_cross_entropy_backward), "CUDA")


def _load():
    """Returns (backend, reason, build_info) after making sure the ops are defined."""
    mode = _requested_mode()
    if mode == "python":
        _define_python_ops()
        return "python", f"selected by {BACKEND_ENV}=python", {}
    try:
        compiled = _import_compiled()
    except (ImportError, OSError) as error:
        if mode == "compiled":
            raise ImportError(
                f"{BACKEND_ENV}=compiled, but the compiled extension cannot be loaded: {error}. {_BUILD_HINT}"
            ) from error
        warnings.warn(
            f"labelsmooth_ext: the compiled kernels cannot be loaded: {error}. Using the pure-PyTorch "
            f"fallback, which is correct but slower. To get the kernels, {_BUILD_HINT}. "
            f"Set {BACKEND_ENV}=python to choose the fallback without this warning.",
            RuntimeWarning,
            stacklevel=3,
        )
        _define_python_ops()
        return "python", f"compiled extension not loadable: {error}", {}
    info = dict(compiled.build_info())
    _warn_if_built_for_another_torch(info["torch_version"])
    reason = "compiled extension labelsmooth_ext._C loaded"
    if info["torch_version"] != torch.__version__:
        reason += f" (built against torch {info['torch_version']}, running {torch.__version__}: rebuild it)"
    if not info["cuda_compiled"]:
        _register_reference_for_cuda()
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
