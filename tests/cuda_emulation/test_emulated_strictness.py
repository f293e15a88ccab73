"""The emulator itself: violations of the CUDA execution model stop the program with the kernel's name
(never a hang), correct uses pass, the device-side assert fails the launch, and the fp16/bf16
conversions round to nearest even exactly as torch does."""

from __future__ import annotations

import re
import subprocess

import pytest
import torch

import emulation

pytestmark = pytest.mark.skipif(emulation.GXX is None, reason="g++ not found: the emulated CUDA suite needs it")

# What the emulator says (which thread notices first depends on the interleaving, hence the alternatives).
VIOLATIONS = {
    "lanes_skip_a_shuffle": "(full-mask shuffle at line .* while lane .* is exited|exits while lane .* of its warp "
                            "waits at a full-mask shuffle)",
    "barrier_inside_a_shuffle_branch": "(reaches __syncthreads while lane|full-mask shuffle at line .* while lane 0 "
                                       "is waiting at __syncthreads)",
    "two_different_barriers": "reaches __syncthreads at line .* while thread .* waits at the one at line",
    "barrier_while_a_thread_spins": "timed out after 2s waiting at __syncthreads",
}


@pytest.fixture(scope="module")
def program():
    return emulation.build_program(emulation.HERE / "strictness_kernels.cu")


def run(program, *args, seed=1):
    env = {"LS_EMULATION_SEED": str(seed), "LS_EMULATION_TIMEOUT": "2"}
    return subprocess.run([str(program), *args], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("scenario", tuple(VIOLATIONS))
def test_violation_stops_with_the_kernel_name(scenario, program, gen):
    result = run(program, scenario, seed=int(torch.randint(0, 2**31, (), generator=gen)))
    assert result.returncode == emulation.EMULATION_FAILURE, f"exit {result.returncode}: {result.stderr}"
    assert f"emulated CUDA error in kernel {{anonymous}}::{scenario}" in result.stderr, result.stderr
    assert re.search(VIOLATIONS[scenario], result.stderr), result.stderr


def test_correct_barriers_and_shuffles_pass(program, gen):
    for _ in range(3):
        result = run(program, "butterfly_and_barriers", seed=int(torch.randint(0, 2**31, (), generator=gen)))
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "no error"


def test_device_assert_fails_the_launch(program):
    result = run(program, "failing_assert")
    assert result.returncode == 3, result.stderr
    assert result.stdout.strip() == "device-side assert triggered"
    assert "device-side assert in kernel {anonymous}::failing_assert, block (0, 0, 0), thread 5" in result.stderr


def test_half_and_bfloat16_conversions_round_to_nearest_even(program, tmp_path, gen):
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 65504.0, 65519.99, 65520.0, 1e-8, 2.0**-24,
                            2.0**-25, 3 * 2.0**-26, 2.0**-14, 2.0**-14 - 2.0**-25, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11,
                            1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 3.4e38, 1e-40], dtype=torch.float32)
    # Every bf16 and fp16 value, the midpoints between neighbours (ties), and random floats of all scales.
    every_half = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    every_bf16 = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    ties = torch.cat([(every_half[:-1] + every_half[1:]) / 2,
                      (every_bf16[:-1].double() + every_bf16[1:].double()).div(2).float()])
    scales = torch.exp2(torch.randint(-140, 128, (20000,), generator=gen).double())
    random = (torch.randn(20000, generator=gen, dtype=torch.float64) * scales).float()
    values = torch.cat([special, every_half, every_bf16, ties, random])
    values = values[~torch.isnan(values)]
    (tmp_path / "in.bin").write_bytes(values.numpy().tobytes())
    result = run(program, "convert", str(tmp_path / "in.bin"), str(tmp_path / "out.bin"))
    assert result.returncode == 0, result.stderr
    out = torch.frombuffer(bytearray((tmp_path / "out.bin").read_bytes()), dtype=torch.uint8).view(-1, 12)
    half_bits = out[:, 0:2].contiguous().view(torch.int16).view(-1)
    bf16_bits = out[:, 2:4].contiguous().view(torch.int16).view(-1)
    back = out[:, 4:12].contiguous().view(torch.float32)
    expected_half = values.to(torch.float16)
    expected_bf16 = values.to(torch.bfloat16)
    assert torch.equal(half_bits, expected_half.view(torch.int16)), "fp16 rounding differs from torch"
    assert torch.equal(bf16_bits, expected_bf16.view(torch.int16)), "bf16 rounding differs from torch"
    assert torch.equal(back[:, 0], expected_half.float()) and torch.equal(back[:, 1], expected_bf16.float())
