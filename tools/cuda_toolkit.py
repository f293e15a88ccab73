"""Finds the CUDA toolkit to build the CUDA kernels with, for setup.py and CMakeLists.txt.

torch.utils.cpp_extension takes the parent of the directory of the first `nvcc` on PATH for the
toolkit. That is wrong when that nvcc is a symlink or a small wrapper script living outside the toolkit
(`/usr/local/bin/nvcc` that runs `exec /usr/local/cuda-13.0/bin/nvcc "$@"`): the build then fails on a
missing cuda_runtime_api.h. So the toolkit is looked for here, in this order:

1. $CUDA_HOME, then $CUDA_PATH (what the user says wins, when it is a toolkit);
2. the toolkit of the nvcc on PATH: symlinks resolved; for a wrapper, the directory nvcc itself reports
   running from (`nvcc -v --dryrun` prints it), or, if that nvcc cannot be run, the path its exec line
   names;
3. /usr/local/cuda, the conventional install location.

A candidate counts when it has include/cuda_runtime_api.h and bin/nvcc. Run as a script, this prints
the toolkit's directory (CMakeLists.txt uses that), or exits with status 1 after listing on stderr every
candidate it tried and why it was not taken.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

RUNTIME_HEADER = Path("include") / "cuda_runtime_api.h"
CONVENTIONAL_LOCATIONS = (Path("/usr/local/cuda"),)
FORCE_CUDA_ENV = "LABELSMOOTH_FORCE_CUDA"
FORCE_CPU_ENV = "LABELSMOOTH_FORCE_CPU"
# A wrapper script is a few lines; anything larger is a real binary, not worth reading as text.
_MAX_WRAPPER_BYTES = 64 * 1024
_NVCC_TIMEOUT_S = 60


@dataclass
class Search:
    """The outcome of a search: the toolkit found (or None) and every candidate looked at."""

    home: Path | None = None
    tried: list[tuple[str, str, str]] = field(default_factory=list)  # (where from, path, why not taken)

    def describe_tried(self) -> str:
        if not self.tried:
            return "  (no candidate: CUDA_HOME and CUDA_PATH unset, no nvcc on PATH, no /usr/local/cuda)"
        return "\n".join(f"  {origin}: {path}: {reason}" for origin, path, reason in self.tried)


def toolkit_problem(home: Path) -> str | None:
    """Why `home` is not a usable toolkit, or None when it is."""
    if not home.is_dir():
        return "no such directory"
    if not (home / RUNTIME_HEADER).is_file():
        return f"no {RUNTIME_HEADER} in it"
    if not (home / "bin" / "nvcc").is_file():
        return "no bin/nvcc in it"
    return None


def reported_toolkit(nvcc: Path) -> Path | None:
    """The toolkit directory nvcc reports when asked for its dry-run plan (the `TOP=` line)."""
    command = [str(nvcc), "-v", "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=_NVCC_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", result.stdout + result.stderr, re.MULTILINE)
    return Path(match.group(1).strip()).resolve() if match else None


def exec_line_toolkit(wrapper: Path) -> Path | None:
    """The toolkit of the nvcc that a wrapper script's exec line runs (`exec /x/bin/nvcc "$@"` -> /x)."""
    try:
        if wrapper.stat().st_size > _MAX_WRAPPER_BYTES:
            return None
        text = wrapper.read_text(errors="replace")
    except OSError:
        return None
    match = re.search(r"""^\s*exec\s+(?:"([^"]*/nvcc)"|'([^']*/nvcc)'|([^"'\s]*/nvcc))(\s|$)""", text, re.MULTILINE)
    if not match:
        return None
    nvcc = next(group for group in match.groups()[:3] if group)
    return Path(nvcc).resolve().parent.parent


def _nvcc_candidates(nvcc: str):
    resolved = Path(nvcc).resolve()  # follows symlinks, so a link into a toolkit gives that toolkit
    yield f"nvcc on PATH ({nvcc})", resolved.parent.parent
    reported = reported_toolkit(resolved)
    if reported is not None:
        yield f"toolkit reported by {nvcc} -v --dryrun", reported
    else:
        from_exec = exec_line_toolkit(resolved)
        if from_exec is not None:
            yield f"exec line of {resolved}", from_exec


def find_cuda_toolkit(environ=None, conventional=CONVENTIONAL_LOCATIONS) -> Search:
    environ = os.environ if environ is None else environ
    search = Search()

    def candidates():
        for variable in ("CUDA_HOME", "CUDA_PATH"):
            if environ.get(variable):
                yield f"${variable}", Path(environ[variable])
        nvcc = shutil.which("nvcc", path=environ.get("PATH", os.defpath))
        if nvcc:
            yield from _nvcc_candidates(nvcc)
        for location in conventional:
            yield "conventional location", Path(location)

    seen = set()
    for origin, path in candidates():
        if path in seen:
            continue
        seen.add(path)
        problem = toolkit_problem(path)
        if problem is None:
            search.home = path
            return search
        search.tried.append((origin, str(path), problem))
    return search


def cuda_build_toolkit(torch_cuda_version: str | None, environ=None, log=print,
                       conventional=CONVENTIONAL_LOCATIONS) -> Path | None:
    """The toolkit to build the CUDA kernels with, or None for a CPU-only build (saying why).

    Raises RuntimeError when the user asked for the CUDA kernels ($LABELSMOOTH_FORCE_CUDA=1) and they
    cannot be built.
    """
    environ = os.environ if environ is None else environ
    forced = environ.get(FORCE_CUDA_ENV, "0") == "1"
    if environ.get(FORCE_CPU_ENV, "0") == "1":
        if forced:
            raise RuntimeError(f"{FORCE_CPU_ENV}=1 and {FORCE_CUDA_ENV}=1 contradict each other: set one of them")
        return None
    if torch_cuda_version is None:
        if forced:
            raise RuntimeError(
                f"{FORCE_CUDA_ENV}=1, but the installed torch has no CUDA support: install a CUDA build of torch"
            )
        return None
    search = find_cuda_toolkit(environ, conventional)
    if search.home is not None:
        log(f"labelsmooth_ext: CUDA toolkit {search.home} (torch built with CUDA {torch_cuda_version})")
        return search.home
    message = (
        f"torch has CUDA {torch_cuda_version}, yet no usable CUDA toolkit (a directory with bin/nvcc and "
        f"{RUNTIME_HEADER}) was found. Tried:\n{search.describe_tried()}\n"
        "Set CUDA_HOME to the toolkit's directory to build the CUDA kernels."
    )
    if forced:
        raise RuntimeError(f"labelsmooth_ext: {FORCE_CUDA_ENV}=1 asks for the CUDA kernels, but {message}")
    log(f"labelsmooth_ext: {message}\nlabelsmooth_ext: building the CPU kernels only.")
    return None


def main() -> int:
    search = find_cuda_toolkit()
    if search.home is None:
        print(f"no usable CUDA toolkit found. Tried:\n{search.describe_tried()}", file=sys.stderr)
        return 1
    print(search.home)
    return 0


if __name__ == "__main__":
    sys.exit(main())
