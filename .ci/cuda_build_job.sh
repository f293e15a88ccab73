#!/usr/bin/env bash
# CI job: the CUDA extension built, linked and loaded against torch 2.13.0+cu130, on a machine without
# a GPU (the wheel installs and imports without one). In a virtual environment of its own, so the main
# test environment keeps its CPU build:
#   1. the environment: torch from the regular package index (local pip configuration is ignored, it
#      prefers a +cpu wheel), checked to be the CUDA build;
#   2. a copy of the sources, so the in-place CUDA build does not replace the CPU one in this tree;
#   3. the CUDAExtension through setup.py (TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX"), every warning shown;
#   4. the same library through CMakeLists.txt, loaded, its CUDA kernels registered;
#   5. the SASS audit of the cubins (tools/sass_audit.py), the table printed;
#   6. the CPU test suite against the setup.py build (tests/test_cuda_build.py checks the CUDA kernels
#      are registered and backend_info() reports the archs; tests/test_sass_audit.py checks the SASS).
# Everything between runs is cached under $LABELSMOOTH_CI_CACHE (default ~/.cache/labelsmooth_ext-ci),
# keyed by the requirements, so a changed requirement gives a fresh environment and build.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ARCHS="8.0;9.0+PTX"
CACHE=${LABELSMOOTH_CI_CACHE:-$HOME/.cache/labelsmooth_ext-ci}
JOBS=${MAX_JOBS:-$(nproc)}

CURRENT_STEP=""
FAILED_COMMAND=""
# Steps run plainly under set -e (testing a function's status would turn errexit off inside it); on the
# first failure these traps name the step and the command that failed.
set -o errtrace
trap 'FAILED_COMMAND=${FAILED_COMMAND:-$BASH_COMMAND}' ERR
trap 'status=$?; if [ "$status" -ne 0 ]; then
  echo "=== CUDA build job FAILED in step \"$CURRENT_STEP\" (exit $status), command: $FAILED_COMMAND" >&2; fi' EXIT

step() {  # step NAME COMMAND...: runs it and prints its time
  local start=$SECONDS
  CURRENT_STEP=$1
  shift
  echo "=== CUDA build job: $CURRENT_STEP"
  "$@"
  echo "=== CUDA build job: $CURRENT_STEP: $((SECONDS - start)) s"
}

requirements() {  # the job's requirement lines: its own file, then pyproject.toml's test extras
  grep -v '^\s*#' .ci/cuda-build-requirements.txt | sed 's/\s*#.*//' | grep -v '^\s*$'
  python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["test"]))'
}

KEY=$( (requirements; python3 --version) | sha256sum | cut -c1-16)
VENV=$CACHE/venv-$KEY
WORK=$CACHE/build-$KEY
PY=$VENV/bin/python

make_venv() {
  if [ -f "$VENV/.complete" ]; then
    echo "cached: $VENV"
    return
  fi
  # Only the current key's environment and build are kept: each environment is several GB.
  rm -rf "$CACHE"/venv-* "$CACHE"/build-*
  python3 -m venv "$VENV"
  requirements > "$VENV/requirements.txt"
  # --isolated: ignore this machine's pip configuration and PIP_* variables (they point pip at a local
  # +cpu wheel). The certificate store is passed on explicitly for machines whose TLS needs it. The
  # wheels are kept in a wheel house rather than pip's HTTP cache, which a package mirror's response
  # headers can disable; pip download fetches only the wheels it does not hold yet.
  local pip=("$PY" -m pip --isolated --disable-pip-version-check)
  "${pip[@]}" download --progress-bar off ${PIP_CERT:+--cert "$PIP_CERT"} -d "$CACHE/wheels" \
    -r "$VENV/requirements.txt"
  "${pip[@]}" install --no-index --find-links "$CACHE/wheels" -r "$VENV/requirements.txt"
  touch "$VENV/.complete"
}

check_torch_is_cuda_build() {
  "$PY" - <<'EOF'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU available: {torch.cuda.is_available()}")
assert torch.__version__ == "2.13.0+cu130" and torch.version.cuda == "13.0", (
    f"expected torch 2.13.0+cu130, got {torch.__version__} (CUDA {torch.version.cuda})")
EOF
}

build_with_setup_py() {
  (cd "$WORK/src" && TORCH_CUDA_ARCH_LIST="$ARCHS" LABELSMOOTH_FORCE_CUDA=1 MAX_JOBS=$JOBS \
    "$PY" setup.py build_ext --inplace)
}

build_with_cmake() {
  local prefix
  prefix=$("$PY" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
  TORCH_CUDA_ARCH_LIST="$ARCHS" "$VENV/bin/cmake" -S "$WORK/src" -B "$WORK/cmake" -DCMAKE_PREFIX_PATH="$prefix" \
    -DPython3_EXECUTABLE="$PY" -DLABELSMOOTH_FORCE_CUDA=ON -Wdev
  "$VENV/bin/cmake" --build "$WORK/cmake" -j "$JOBS"
  "$PY" .ci/check_cuda_library.py "$WORK"/cmake/_C*.so
}

audit_sass() {  # prints the report, and says when the one in bench/README.md differs from it
  (cd "$WORK/src" && "$PY" tools/sass_audit.py labelsmooth_ext/_C*.so --readme bench/README.md)
  if ! cmp -s "$WORK/src/bench/README.md" bench/README.md; then
    echo "NOTE: bench/README.md's GPU readiness report differs from this build's; to update it, copy" \
      "$WORK/src/bench/README.md or run the command the report names in this environment"
  fi
}

run_cpu_suite() {
  # Left out: the tests that build copies of their own (the CMake CPU build, the bare-nvcc compile of the
  # kernel files, the emulated CUDA suite's g++ builds); they do not depend on torch's build, ran in the main
  # job, and would double its time.
  (cd "$WORK/src" && LABELSMOOTH_BACKEND=compiled LABELSMOOTH_EXPECT_CUDA_BUILD=1 PYTHONPATH="$WORK/src" \
    "$PY" -m pytest -q tests --deselect tests/test_build.py::test_cmake_builds_the_same_library \
    --ignore tests/test_cuda_kernels_compile.py --ignore tests/cuda_emulation)
}

total_start=$SECONDS
echo "CUDA build job: cache $CACHE, key $KEY, $JOBS compile jobs"
step "virtual environment with torch 2.13.0+cu130" make_venv
step "torch is the CUDA build" check_torch_is_cuda_build
step "copy of the sources" "$PY" .ci/sync_sources.py "$ROOT" "$WORK/src"
step "setup.py build of the CUDAExtension" build_with_setup_py
step "CMake build with CUDA" build_with_cmake
step "SASS audit" audit_sass
step "CPU test suite against the CUDA build" run_cpu_suite
echo "=== CUDA build job passed in $((SECONDS - total_start)) s"
