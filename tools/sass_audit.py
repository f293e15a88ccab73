"""SASS audit of the CUDA kernels in a built labelsmooth_ext._C: for every kernel instantiation and GPU
arch, the registers, shared and local memory, whether its loops move global memory 128 bits at a time
(`LDG.E.128`, `STG.E.128`), whether it touches local memory (`LDL`/`STL`), and its theoretical occupancy.
Prints the Markdown table of bench/README.md's "GPU readiness report" (--readme rewrites that section).

    python tools/sass_audit.py labelsmooth_ext/_C*.so [--output FILE] [--readme bench/README.md]

Needs cuobjdump and nvdisasm: on PATH, or from NVIDIA's nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm
wheels (a compiler-only CUDA toolkit has neither).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

# Per-SM limits for the occupancy: CUDA C++ Programming Guide, "Compute Capabilities" (technical
# specifications), and the allocation granularities of the CUDA occupancy calculator (cuda_occupancy.h).
# Shared memory is the largest carveout; 1 KiB of it is reserved per block on these archs.
ARCH_LIMITS = {
    "sm_80": dict(threads=2048, warps=64, blocks=32, registers=65536, register_unit=256,
                  shared=164 * 1024, shared_unit=128, shared_reserved=1024),
    "sm_90": dict(threads=2048, warps=64, blocks=32, registers=65536, register_unit=256,
                  shared=228 * 1024, shared_unit=128, shared_reserved=1024),
}
REGISTER_SUBPARTITIONS = 4  # registers are allocated per quarter of the SM (one warp scheduler each)
WARP = 32
README_HEADING = "## GPU readiness report"

_ARCH_LINE = re.compile(r"^\s*arch = (sm_\d+)\s*$")
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


@dataclass
class Kernel:
    arch: str
    mangled: str
    name: str = ""  # demangled
    registers: int = 0
    shared: int = 0  # static shared memory, bytes
    local: int = 0  # local memory per thread, bytes
    stack: int = 0  # stack frame per thread, bytes (it lives in local memory too)
    threads: int = 0  # block size, from __launch_bounds__ (EIATTR_MAX_THREADS)
    local_instructions: list[str] = field(default_factory=list)
    loop_loads_128: int = 0
    loop_stores_128: int = 0
    loop_loads_narrow: int = 0  # LDG in loops narrower than 128 bits
    loop_stores_narrow: int = 0


def find_tool(name: str) -> str:
    """cuobjdump/nvdisasm: on PATH, else in the bin/ of an installed nvidia-cuda-* wheel."""
    on_path = shutil.which(name)
    if on_path:
        return on_path
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations if spec else []):
        found = sorted(glob.glob(os.path.join(root, "*", "bin", name)))
        if found:
            return found[-1]
    raise FileNotFoundError(
        f"{name} not found on PATH nor in an installed nvidia-cuda-{name} wheel: "
        f"pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm"
    )


def cuobjdump(library: str, *options: str) -> str:
    tool = find_tool("cuobjdump")
    env = dict(os.environ)  # cuobjdump -sass runs nvdisasm, which may live in another wheel's bin/
    env["PATH"] = os.pathsep.join([os.path.dirname(find_tool("nvdisasm")), env.get("PATH", "")])
    result = subprocess.run([tool, *options, library], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{tool} {' '.join(options)} {library} failed:\n{result.stderr}")
    return result.stdout


def sections(text: str, start: re.Pattern):
    """Yields (arch, function, lines) for each section that `start` opens (group 1: the function)."""
    arch, function, lines = None, None, []
    for line in text.splitlines():
        arch_match = _ARCH_LINE.match(line)
        opened = start.match(line)
        if arch_match or opened:
            if function is not None:
                yield arch, function, lines
            function, lines = (opened.group(1), []) if opened else (None, [])
            arch = arch_match.group(1) if arch_match else arch
            continue
        if function is not None:
            lines.append(line)
    if function is not None:
        yield arch, function, lines


def loop_ranges(instructions: list[tuple[int, str, str]]) -> list[tuple[int, int]]:
    """[start, end] address ranges of loops: every branch to an address at or before itself closes one."""
    loops = []
    for address, opcode, operands in instructions:
        if opcode.split(".")[0] in ("BRA", "JMP"):
            target = re.search(r"0x([0-9a-f]+)", operands)
            if target and int(target.group(1), 16) <= address:
                loops.append((int(target.group(1), 16), address))
    return loops


def audit_sass(kernel: Kernel, lines: list[str]) -> None:
    instructions = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in map(_INSTRUCTION.search, lines) if m]
    loops = loop_ranges(instructions)
    for address, opcode, operands in instructions:
        base, *modifiers = opcode.split(".")
        if base in ("LDL", "STL"):
            kernel.local_instructions.append(f"{address:#06x} {opcode} {operands.strip()}")
        if base not in ("LDG", "STG") or not any(start <= address <= end for start, end in loops):
            continue
        wide = "128" in modifiers
        if base == "LDG":
            kernel.loop_loads_128 += wide
            kernel.loop_loads_narrow += not wide
        else:
            kernel.loop_stores_128 += wide
            kernel.loop_stores_narrow += not wide


def demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if tool is None:
        return names
    result = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    demangled = result.stdout.splitlines()
    return demangled if result.returncode == 0 and len(demangled) == len(names) else names


def short_name(demangled: str) -> str:
    """'void labelsmooth::cuda::(anonymous namespace)::k<Op<float> >(...)' -> 'k<Op<float>>'."""
    name = demangled.removeprefix("void ").replace("labelsmooth::cuda::", "").replace("(anonymous namespace)::", "")
    depth = 0
    for i, char in enumerate(name):  # cut the parameter list: the first '(' outside template brackets
        depth += {"<": 1, ">": -1}.get(char, 0)
        if char == "(" and depth == 0:
            name = name[:i]
            break
    return name.replace(" >", ">").replace("__nv_bfloat16", "bf16").replace("__half", "fp16").replace(
        "double", "fp64").replace("float", "fp32")


def audit(library: str) -> list[Kernel]:
    kernels: dict[tuple[str, str], Kernel] = {}

    def kernel(arch, mangled):
        return kernels.setdefault((arch, mangled), Kernel(arch, mangled))

    for arch, function, lines in sections(cuobjdump(library, "-res-usage"), re.compile(r"^\s*Function (\S+):\s*$")):
        usage = dict(re.findall(r"(\w+):(\d+)", " ".join(lines)))
        k = kernel(arch, function)
        k.registers, k.shared = int(usage.get("REG", 0)), int(usage.get("SHARED", 0))
        k.local, k.stack = int(usage.get("LOCAL", 0)), int(usage.get("STACK", 0))
    for arch, function, lines in sections(cuobjdump(library, "-elf"), re.compile(r"^\.nv\.info\.(\S+)\s*$")):
        for i, line in enumerate(lines):
            if "EIATTR_MAX_THREADS" in line:
                values = re.findall(r"0x([0-9a-f]+)", " ".join(lines[i + 1:i + 3]))
                kernel(arch, function).threads = int(values[0], 16) * int(values[1], 16) * int(values[2], 16)
    for arch, function, lines in sections(cuobjdump(library, "-sass"), re.compile(r"^\s*Function : (\S+)\s*$")):
        audit_sass(kernel(arch, function), lines)
    result = sorted(kernels.values(), key=lambda k: (k.mangled, k.arch))
    for k, name in zip(result, demangle([k.mangled for k in result])):
        k.name = short_name(name)
    return sorted(result, key=lambda k: (k.name, k.arch))


def occupancy(arch: str, threads: int, registers: int, shared: int) -> tuple[float, str]:
    """Theoretical occupancy (active warps / maximum warps per SM) and what limits it."""
    limits = ARCH_LIMITS[arch]
    warps_per_block = -(-threads // WARP)
    register_unit = limits["register_unit"]
    registers_per_warp = -(-registers * WARP // register_unit) * register_unit
    warps_by_registers = (limits["registers"] // REGISTER_SUBPARTITIONS // registers_per_warp) * REGISTER_SUBPARTITIONS
    shared_per_block = -(-(shared + limits["shared_reserved"]) // limits["shared_unit"]) * limits["shared_unit"]
    blocks = {
        "warps": limits["warps"] // warps_per_block,
        "blocks": limits["blocks"],
        "registers": warps_by_registers // warps_per_block,
        "shared memory": limits["shared"] // shared_per_block,
    }
    limiter = min(blocks, key=blocks.get)
    return blocks[limiter] * warps_per_block / limits["warps"], limiter


def table(kernels: list[Kernel]) -> str:
    """One row per kernel instantiation; per-arch figures as 'sm_80 / sm_90'."""
    by_name: dict[str, dict[str, Kernel]] = {}
    for k in kernels:
        by_name.setdefault(k.name, {})[k.arch] = k
    archs = sorted({k.arch for k in kernels})

    def per_arch(per, value):
        return " / ".join(str(value(per[arch])) if arch in per else "-" for arch in archs)

    def occupancy_cell(k):
        fraction, limiter = occupancy(k.arch, k.threads, k.registers, k.shared)
        return f"{fraction:.0%} ({limiter})"

    header = ["kernel", "block", "registers", "occupancy", "shared B", "local B",
              "LDG.E.128 in loops", "STG.E.128 in loops", "narrower LDG / STG in loops"]
    rows = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, per in by_name.items():
        cells = [
            f"`{name}`",
            per_arch(per, lambda k: k.threads),
            per_arch(per, lambda k: k.registers),
            per_arch(per, occupancy_cell),
            per_arch(per, lambda k: k.shared),
            per_arch(per, lambda k: k.local + k.stack + len(k.local_instructions)),
            per_arch(per, lambda k: k.loop_loads_128),
            per_arch(per, lambda k: k.loop_stores_128),
            per_arch(per, lambda k: f"{k.loop_loads_narrow}, {k.loop_stores_narrow}"),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def readme_section(kernels: list[Kernel]) -> str:
    archs = " / ".join(sorted({k.arch for k in kernels}))
    return f"""{README_HEADING}

What the compiled GPU code of the CUDA build looks like, from its cubins (no GPU involved: no GPU
timing has been measured). CI's CUDA build job (`.ci/cuda_build_job.sh`) builds the extension against
torch 2.13.0+cu130 with `TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX"` and regenerates this section with
`python tools/sass_audit.py labelsmooth_ext/_C*.so --readme bench/README.md` (cuobjdump and nvdisasm
from NVIDIA's `nvidia-cuda-cuobjdump` / `nvidia-cuda-nvdisasm` wheels). `tests/test_sass_audit.py` asserts
that no kernel touches local memory and that the row kernels' loops use 128-bit loads (and stores, in
the backward).

Every cell with two figures reads {archs}. *block*: threads per block, from `__launch_bounds__`.
*registers*, *shared B* (static shared memory as `cuobjdump -res-usage` reports it; the sm_90 figure
includes the 1 KiB reserved per block, the sm_80 one does not), *local B* (local memory and stack
bytes plus `LDL`/`STL` instructions: 0 means no spills and no stack arrays). *occupancy*: the
theoretical occupancy (resident warps / 64) from registers, shared memory and block size with the
documented per-SM limits (64K registers allocated per warp in units of 256, 32 blocks, 64 warps, 164 KiB
(sm_80) or 228 KiB (sm_90) of shared memory, 1 KiB more per block added to the figure above), and
what limits it.
*LDG.E.128 / STG.E.128 in loops*: 128-bit global loads and stores inside a loop of the SASS (a range
closed by a backward branch); *narrower*: the other global loads and stores in loops (row tails,
misaligned heads, targets, weights, reductions).

{table(kernels)}
"""


def write_readme_section(readme: str, section: str) -> None:
    """Replaces the section from its heading to the end of the file (it is the file's last section)."""
    with open(readme) as f:
        text = f.read()
    head = text.split(README_HEADING, 1)[0].rstrip("\n")
    with open(readme, "w") as f:
        f.write(head + "\n\n" + section)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("library")
    parser.add_argument("--output", help="also write the section to this file")
    parser.add_argument("--readme", help="rewrite this file's GPU readiness report section with the table")
    args = parser.parse_args(argv)
    section = readme_section(audit(args.library))
    print(section)
    if args.output:
        with open(args.output, "w") as f:
            f.write(section)
    if args.readme:
        write_readme_section(args.readme, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
