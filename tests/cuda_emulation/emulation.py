"""Building and running the emulated CUDA kernels (see cuda_emulation.h), and checking one case against
float64 F.cross_entropy (of the soft-capped logits when softcap is on, with the upstream gradient of the lse
through autograd of logsumexp) with the tolerances of tests/conftest.py.

The host driver (driver.cpp) is built from csrc/cuda/ls_cross_entropy_kernels.cu by g++ in three
flavours, each cached under the temp dir by a hash of its sources and flags:
  * "counted": the kernel file instrumented so that the emulator counts every global load and store
    (traffic) and stops at any byte outside the exact buffers, plus UndefinedBehaviorSanitizer;
  * "asan":    AddressSanitizer and UndefinedBehaviorSanitizer on everything;
  * "tsan":    ThreadSanitizer (races between the threads of a block, e.g. a missing __syncthreads).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

from conftest import (
    REDUCTION_CODES,
    _gamma,
    accumulation_dtype,
    assert_within,
    class_weight,
    grad_output_like,
    grad_tolerance,
    loss_tolerance,
    lse_tolerance,
    probability_target,
    randn,
    smoothed_coefficients,
    unit_roundoff,
)
from labelsmooth_ext.reference import uniform_smoothing

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
KERNEL_SOURCE = ROOT / "csrc" / "cuda" / "ls_cross_entropy_kernels.cu"
GXX = shutil.which("g++")
EMULATION_FAILURE = 86  # emulator.h: kEmulationFailure
LAUNCH_FAILED = 3  # driver.cpp: a launch returned an error (a device-side assert)
RUN_TIMEOUT_S = 300


# -O0: the kernel file's many template instances compile 2-3x faster than with -O1, and the emulated runs
# spend their time in thread switches, not in arithmetic.
_COMMON = ["-std=c++17", "-O0", "-g", "-fno-omit-frame-pointer", "-I", str(HERE / "include"), "-I", str(HERE),
           "-I", str(ROOT / "csrc")]
_UBSAN = ["-fsanitize=undefined", "-fno-sanitize-recover=all"]
FLAVOURS = {
    # (flags of the kernel file, flags of emulator.cpp and driver.cpp, link flags)
    "counted": (["-fsanitize=kernel-address", "--param", "asan-stack=0", "--param", "asan-globals=0",
                 "--param", "asan-instrumentation-with-call-threshold=0", *_UBSAN],
                ["-DLS_EMULATION_COUNT_ACCESSES", *_UBSAN], _UBSAN),
    "asan": (["-fsanitize=address", *_UBSAN], ["-fsanitize=address", *_UBSAN], ["-fsanitize=address", *_UBSAN]),
    "tsan": (["-fsanitize=thread"], ["-fsanitize=thread"], ["-fsanitize=thread"]),
}

# The grid cap of the kernels (LS_MAX_GRID_BLOCKS) small enough that small problems run the grid-stride loops.
SMALL_GRID_DEFINES = ("LS_MAX_GRID_BLOCKS=2",)
DTYPES = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16"}
SMOOTHING_CODES = {"uniform": 0, "others": 1}  # the op's int smoothing argument


def _emulation_headers() -> list[Path]:
    return sorted(HERE.glob("*.h")) + sorted(HERE.glob("include/*.h"))


def _kernel_headers() -> list[Path]:
    return sorted((ROOT / "csrc" / "cuda").glob("*.cuh")) + sorted((ROOT / "csrc" / "kernels").glob("*.h"))


def compile_cached(source: Path, flags: list[str], depends: list[Path], language: tuple[str, ...] = ()) -> Path:
    """`source` compiled with `flags` into the cache, keyed by the content of everything it reads."""
    digest = hashlib.sha256(repr((_COMMON, flags, language)).encode())
    for path in [source, *depends]:
        digest.update(path.name.encode() + path.read_bytes())
    cache = Path(tempfile.gettempdir()) / "labelsmooth_cuda_emulation"
    cache.mkdir(parents=True, exist_ok=True)
    obj = cache / f"{source.stem}-{digest.hexdigest()[:24]}.o"
    if not obj.is_file():
        partial = obj.with_suffix(f".{os.getpid()}.tmp")
        command = [GXX, *_COMMON, *flags, *language, "-c", str(source), "-o", str(partial)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"emulated CUDA build failed: {' '.join(command)}\n{result.stderr[-6000:]}")
        partial.replace(obj)  # atomic: concurrent test runs never see a half-written object
    return obj


def _link(objects: list[Path], link_flags: list[str], name: str) -> Path:
    digest = hashlib.sha256(repr((link_flags, [o.name for o in objects])).encode()).hexdigest()[:24]
    executable = objects[0].parent / f"{name}-{digest}"
    if not executable.is_file():
        partial = executable.with_suffix(f".{os.getpid()}.tmp")
        link = [GXX, *link_flags, *map(str, objects), "-pthread", "-o", str(partial)]
        result = subprocess.run(link, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"emulated CUDA link failed: {' '.join(link)}\n{result.stderr[-6000:]}")
        partial.replace(executable)
    return executable


def build_program(source: Path) -> Path:
    """A host program of CUDA source `source` (with its own main) on the emulator, without sanitizers."""
    headers = [*_emulation_headers(), *_kernel_headers()]
    jobs = [(source, [], headers, ("-x", "c++")), (HERE / "emulator.cpp", [], headers, ())]
    with ThreadPoolExecutor(max_workers=2) as pool:
        objects = list(pool.map(lambda job: compile_cached(*job), jobs))
    return _link(objects, [], source.stem)


def build_driver(flavour: str, kernel_source: Path = KERNEL_SOURCE, defines: tuple[str, ...] = ()) -> Path:
    """The driver executable for `flavour` built from `kernel_source` (a patched copy may live elsewhere:
    its includes resolve against csrc). Every object is cached by content, so a patched kernel file
    recompiles only itself."""
    kernel_flags, host_flags, link_flags = FLAVOURS[flavour]
    headers = [*_emulation_headers(), *_kernel_headers()]
    jobs = [
        (kernel_source, [*kernel_flags, *(f"-D{d}" for d in defines)], headers, ("-x", "c++")),
        (HERE / "emulator.cpp", host_flags, headers, ()),
        (HERE / "driver.cpp", host_flags, headers, ()),
    ]
    with ThreadPoolExecutor(max_workers=2) as pool:
        objects = list(pool.map(lambda job: compile_cached(*job), jobs))
    return _link(objects, link_flags, f"driver-{flavour}")


# ----------------------------------------------------------------------------------------------------
# One problem


@dataclasses.dataclass
class Case:
    """A problem as the CUDA op hands it to the kernels: logits [outer, classes, inner] with rows
    `row_pad` elements apart beyond their length (odd strides), starting `offset` elements after a
    16-byte boundary."""

    dtype: torch.dtype = torch.float32
    outer: int = 4
    classes: int = 10
    inner: int = 1
    row_pad: int = 0
    offset: int = 0
    target: str = "index"  # index | probability | probability_acc (targets in the accumulation dtype)
    weight: bool = False
    ignore: str = "none"  # none | some | all | class (ignore_index is a real class)
    eps: float = 0.1
    reduction: str = "mean"
    backward: bool = True
    smoothing: str = "uniform"  # uniform | others (class indices)
    softcap: float | None = None
    grad_lse: bool = False  # the backward also gets an upstream gradient of the lse

    def id(self) -> str:
        options = "".join([f"-{self.smoothing}" if self.smoothing != "uniform" else "",
                           f"-cap{self.softcap}" if self.softcap is not None else "",
                           "-glse" if self.grad_lse else ""])
        return (f"{DTYPES[self.dtype]}-{self.outer}x{self.classes}x{self.inner}-pad{self.row_pad}-off{self.offset}-"
                f"{self.target}-w{int(self.weight)}-ign_{self.ignore}-eps{self.eps}-{self.reduction}{options}")

    def uniform_eps(self) -> float:
        """The eps of PyTorch's convention the kernels get (the host converts 'others')."""
        return uniform_smoothing(self.eps, SMOOTHING_CODES[self.smoothing], self.classes)


@dataclasses.dataclass
class Inputs:
    logits: torch.Tensor  # (outer, classes) or (outer, classes, inner): the values the kernels see
    target: torch.Tensor
    weight: torch.Tensor | None
    ignore_index: int
    grad_output: torch.Tensor
    grad_lse: torch.Tensor | None = None


@dataclasses.dataclass
class Result:
    returncode: int
    stderr: str
    loss: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    target_mass: torch.Tensor | None = None
    grad: torch.Tensor | None = None
    traffic: list[tuple[str, dict[str, tuple[int, int]]]] = dataclasses.field(default_factory=list)


def make_inputs(case: Case, gen: torch.Generator) -> Inputs:
    shape = [case.outer, case.classes] + ([case.inner] if case.inner > 1 else [])
    scale = 1.0 + 3.0 * float(torch.rand((), generator=gen))
    logits = randn(shape, gen, case.dtype, scale)
    row_shape = [case.outer] + ([case.inner] if case.inner > 1 else [])
    ignore_index = -100
    if case.target == "index":
        target = torch.randint(0, case.classes, row_shape, generator=gen)
        flat = target.view(-1)
        if case.ignore == "some":
            mask = torch.rand(flat.shape, generator=gen) < 0.35
            mask[0], mask[-1] = True, False
            flat[mask] = ignore_index
        elif case.ignore == "all":
            flat.fill_(ignore_index)
        elif case.ignore == "class":
            ignore_index = min(1, case.classes - 1)
            flat[0] = ignore_index
            if flat.numel() > 1 and case.classes > 1:
                flat[-1] = (ignore_index + 1) % case.classes
    else:
        target_dtype = case.dtype if case.target == "probability" else accumulation_dtype(case.dtype)
        normalized = bool(torch.rand((), generator=gen) < 0.5)
        target = probability_target(shape, 1, gen, target_dtype, normalized)
    weight = class_weight(case.classes, gen, accumulation_dtype(case.dtype)) if case.weight else None
    acc = accumulation_dtype(case.dtype)
    grad_output = grad_output_like(row_shape if case.reduction == "none" else (), gen)
    grad_lse = grad_output_like(row_shape, gen).to(acc) if case.grad_lse else None
    return Inputs(logits, target, weight, ignore_index, grad_output.to(acc), grad_lse)


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def _read(path: Path, dtype: torch.dtype, shape) -> torch.Tensor:
    data = bytearray(path.read_bytes())
    return torch.frombuffer(data, dtype=dtype).reshape(shape).clone() if data else torch.empty(shape, dtype=dtype)


def _parse_traffic(text: str):
    launches = []
    for line in text.splitlines():
        if line.startswith("launch "):
            launches.append((line[len("launch "):], {}))
        elif line:
            name, read, written = line.rsplit(" ", 2)
            launches[-1][1][name] = (int(read), int(written))
    return launches


def run(driver: Path, case: Case, inputs: Inputs, seed: int = 1, env: dict | None = None) -> Result:
    """Runs the forward (and the backward) of `case` on `inputs` through the emulated kernels."""
    row_length = case.classes * case.inner
    stride = row_length + case.row_pad
    storage = torch.empty(max(case.outer - 1, 0) * stride + row_length if case.outer else 0, dtype=case.dtype)
    if case.outer:
        rows = storage.as_strided((case.outer, row_length), (stride, 1))
        storage.fill_(float("nan"))  # the padding between rows must never be read
        rows.copy_(inputs.logits.reshape(case.outer, row_length))
    acc = accumulation_dtype(case.dtype)
    with tempfile.TemporaryDirectory(prefix="ls_emulated_") as tmp:
        d = Path(tmp)
        (d / "logits.bin").write_bytes(_bytes(storage))
        (d / "target.bin").write_bytes(_bytes(inputs.target))
        if inputs.weight is not None:
            (d / "weight.bin").write_bytes(_bytes(inputs.weight.to(acc)))
        (d / "grad_loss.bin").write_bytes(_bytes(inputs.grad_output.to(acc)))
        if inputs.grad_lse is not None:
            (d / "grad_lse.bin").write_bytes(_bytes(inputs.grad_lse.to(acc)))
        args = {
            "dtype": DTYPES[case.dtype], "target": "index" if case.target == "index" else "probability",
            "target_dtype": "logits" if case.target == "probability" else "accumulation",
            "outer": case.outer, "classes": case.classes, "inner": case.inner, "outer_stride": stride,
            "offset": case.offset, "ignore_index": inputs.ignore_index, "eps": repr(case.eps),
            "smoothing": SMOOTHING_CODES[case.smoothing], "softcap": repr(case.softcap or 0.0),
            "reduction": REDUCTION_CODES[case.reduction], "weight": int(inputs.weight is not None),
            "grad_lse": int(inputs.grad_lse is not None), "backward": int(case.backward),
        }
        command = [str(driver), tmp, *(f"{k}={v}" for k, v in args.items())]
        run_env = {**os.environ, "LS_EMULATION_SEED": str(seed), **(env or {})}
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=run_env)
        except subprocess.TimeoutExpired as e:
            return Result(-1, f"driver timed out after {RUN_TIMEOUT_S}s: {e.stderr}")
        result = Result(proc.returncode, proc.stderr)
        if proc.returncode != 0:
            return result
        row_shape = [case.outer] + ([case.inner] if case.inner > 1 else [])
        result.loss = _read(d / "loss.bin", acc, row_shape if case.reduction == "none" else ())
        result.lse = _read(d / "lse.bin", acc, row_shape)
        if case.target != "index":
            result.target_mass = _read(d / "target_mass.bin", acc, row_shape)
        if case.backward:
            result.grad = _read(d / "grad.bin", case.dtype, tuple(inputs.logits.shape))
        result.traffic = _parse_traffic((d / "traffic.txt").read_text())
        return result


def softcapped(x: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return x if softcap is None else softcap * torch.tanh(x / softcap)


def lse_gradient_tolerance(capped: torch.Tensor, grad_lse: torch.Tensor, ignored: torch.Tensor) -> torch.Tensor:
    """Bound on the error that grad_lse_r * p_j adds to the gradient, by conftest's derivation: p_j carries the
    lse's error and the roundings of z_j - lse and of exp; the product and its sum with the rest a few more;
    then the rounding to the input dtype. Ignored rows get no gradient at all."""
    z = capped.to(torch.float64)
    u = unit_roundoff(accumulation_dtype(capped.dtype))
    lse = torch.logsumexp(z, dim=1, keepdim=True)
    p = torch.exp(z - lse)
    p_error = p * (lse_tolerance(capped).unsqueeze(1) + u * (40.0 + (z - lse).abs()))
    h = torch.where(ignored, torch.zeros_like(grad_lse), grad_lse).to(torch.float64).abs().unsqueeze(1)
    return h * p_error * (1.0 + unit_roundoff(capped.dtype))


def check(case: Case, inputs: Inputs, result: Result) -> None:
    """Loss, lse, target mass and gradient of `result` against float64 F.cross_entropy of the logits as the
    loss reads them (soft-capped), with the uniform-equivalent eps, within conftest's bounds."""
    assert result.returncode == 0, f"emulated kernels failed (exit {result.returncode}):\n{result.stderr[-4000:]}"
    logits, target, weight, ignore_index = inputs.logits, inputs.target, inputs.weight, inputs.ignore_index
    reduction, eps = case.reduction, case.uniform_eps()
    x = logits.to(torch.float64).requires_grad_()
    z = softcapped(x, case.softcap)
    ref_loss = F.cross_entropy(z, target.to(torch.float64) if target.is_floating_point() else target,
                               None if weight is None else weight.to(torch.float64), ignore_index=ignore_index,
                               reduction=reduction, label_smoothing=eps)
    ref_lse = torch.logsumexp(z, dim=1)
    ignored = torch.zeros(ref_lse.shape, dtype=torch.bool)
    if case.target == "index":
        ignored = target == ignore_index
        assert bool((result.lse[ignored] == 0).all()), "lse of ignored rows must be 0"
        ref_lse = torch.where(ignored, torch.zeros_like(ref_lse), ref_lse)
    # conftest's bounds on the logits the loss reads; the kernels' tanh adds a few ulp per logit, inside
    # the derivation's per-element slack.
    capped = softcapped(logits.to(torch.float64), case.softcap).to(logits.dtype)
    tol = loss_tolerance(capped, target, weight, ignore_index, reduction, eps)
    assert_within(result.loss, ref_loss.detach(), tol, "loss")
    assert_within(result.lse, ref_lse.detach(), lse_tolerance(capped), "lse")
    if case.target != "index":
        ref_mass = smoothed_coefficients(capped, target, weight, ignore_index, eps).sum(dim=1)
        mass_tol = _gamma(case.classes, accumulation_dtype(case.dtype)) * ref_mass
        assert_within(result.target_mass, ref_mass, mass_tol, "target_mass")
    if not case.backward:
        return
    outputs, upstream = [ref_loss], [inputs.grad_output.to(torch.float64)]
    if inputs.grad_lse is not None:
        outputs.append(ref_lse)
        upstream.append(inputs.grad_lse.to(torch.float64))
    (ref_grad,) = torch.autograd.grad(outputs, x, upstream)
    tol = grad_tolerance(capped, target, weight, ignore_index, reduction, eps, inputs.grad_output, ref_grad)
    if inputs.grad_lse is not None:
        tol = tol + lse_gradient_tolerance(capped, inputs.grad_lse, ignored)
    if case.softcap is not None:
        # The derivative 1 - (z'/c)^2, from z' rounded a few times, is off by at most 8 u in absolute terms,
        # which scales the gradient with respect to z' (the reference's, divided by the derivative).
        derivative = 1.0 - torch.tanh(logits.to(torch.float64) / case.softcap) ** 2
        u = unit_roundoff(accumulation_dtype(case.dtype))
        tol = tol + 8.0 * u * ref_grad.abs() / derivative.clamp_min(torch.finfo(torch.float64).tiny) * (
            1.0 + unit_roundoff(case.dtype))
    assert_within(result.grad, ref_grad, tol, "grad_input")


def run_and_check(driver: Path, case: Case, gen: torch.Generator, seed: int = 1) -> Result:
    inputs = make_inputs(case, gen)
    result = run(driver, case, inputs, seed)
    check(case, inputs, result)
    return result
