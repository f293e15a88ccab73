"""Proof that the emulated suite can fail: known defects, each applied to a temporary copy of the kernel
source, must each make a small targeted subset of the emulated cases fail (wrong numbers, an
out-of-bounds access, a strict barrier/shuffle error or a data race). The same cases pass on the
unmodified source (the "none" entry), so the failures come from the defects.
"""

from __future__ import annotations

import pytest
import torch

import emulation
from emulation import Case

pytestmark = pytest.mark.skipif(emulation.GXX is None, reason="g++ not found: the emulated CUDA suite needs it")

# name: ([(text in ls_cross_entropy_kernels.cu, its defective replacement), ...], build flavour, cases)
DEFECTS = {
    "none": ([], "counted", [Case(outer=37, classes=13, reduction="mean")]),
    # The block's warps publish their partial row stats; thread 0 merges them without waiting.
    "removed_syncthreads": ([(
        "    if (threadIdx.x % kWarp == 0) warp_stats[threadIdx.x / kWarp] = stats;\n    __syncthreads();\n",
        "    if (threadIdx.x % kWarp == 0) warp_stats[threadIdx.x / kWarp] = stats;\n")],
        "tsan", [Case(outer=3, classes=3000, reduction="none", backward=False)]),
    # The scalar tail of a row reads one element past its end.
    "tail_bound_off_by_one": ([(
        "  for (int64_t c = head + vectors * kVec + lane; c < classes; c += kWidth) {\n"
        "    const acc_t x[1] = {to_acc(z[c])};",
        "  for (int64_t c = head + vectors * kVec + lane; c <= classes; c += kWidth) {\n"
        "    const acc_t x[1] = {to_acc(z[c])};")],
        "counted", [Case(outer=37, classes=13, reduction="mean")]),
    # Lanes of rows past the end skip the butterfly that the other lanes of their warp are in.
    "shuffle_skipped_by_some_lanes": ([(
        "    stats = group_reduce<kWidth>(stats);\n",
        "    if (r < rows) stats = group_reduce<kWidth>(stats);\n")],
        "counted", [Case(outer=37, classes=13, reduction="mean")]),
    # The denominator masks ignored rows by a multiply instead of skipping them, so it looks up
    # w[ignore_index] (ignore_index is -100 here).
    "target_read_before_ignore_check": ([
        ("    const int64_t y = target[r];\n    if (y == ignore_index) continue;\n",
         "    const int64_t y = target[r];\n"
         "    partial += (y == ignore_index ? acc_t(0) : acc_t(1)) * (weight != nullptr ? weight[y] : acc_t(1));\n"
         "    if (y == ignore_index) continue;\n"),
        ("    partial += weight != nullptr ? weight[y] : acc_t(1);\n", "")],
        "counted", [Case(outer=20, classes=9, weight=True, ignore="some", reduction="mean")]),
    # The chain rule through the softcap's tanh left out of the backward.
    "softcap_derivative_dropped": ([(
        "  return cap > acc_t(0) ? grad * softcap_derivative(capped, cap) : grad;",
        "  return grad;")],
        "counted", [Case(outer=37, classes=13, softcap=2.5, reduction="mean")]),
    # The upstream gradient of the lse ignored by the probability-target backward.
    "grad_lse_dropped": ([(
        "    row.g_lse = grad_lse != nullptr ? grad_lse[r] : acc_t(0);",
        "    row.g_lse = acc_t(0);")],
        "counted", [Case(outer=9, classes=300, target="probability", grad_lse=True, reduction="sum")]),
    # The forward saves a wrong target mass (that of unweighted, normalized targets), which the backward trusts.
    "target_mass_not_saved": ([("    target_mass[r] = s.mass;", "    target_mass[r] = acc_t(1);")],
                              "counted", [Case(outer=9, classes=40, target="probability", weight=True,
                                               reduction="none")]),
    # bf16 outputs rounded toward zero instead of to nearest even.
    "bf16_store_truncates": ([("    return __float2bfloat16_rn(x);", "    return __float2bfloat16_rz(x);")],
                             "counted", [Case(dtype=torch.bfloat16, outer=7, classes=1500, eps=0.1, reduction="sum")]),
}


@pytest.mark.parametrize("defect", tuple(DEFECTS))
def test_defect_is_caught(defect, tmp_path, gen):
    replacements, flavour, cases = DEFECTS[defect]
    source = emulation.KERNEL_SOURCE.read_text()
    for original, replacement in replacements:
        assert source.count(original) == 1, f"the defect '{defect}' no longer applies to the kernel source"
        source = source.replace(original, replacement)
    patched = tmp_path / emulation.KERNEL_SOURCE.name
    patched.write_text(source)
    driver = emulation.build_driver(flavour, kernel_source=patched)
    failures = []
    for case in cases:
        try:
            emulation.run_and_check(driver, case, gen, seed=int(torch.randint(0, 2**31, (), generator=gen)))
        except AssertionError as failure:
            failures.append(f"{case.id()}: {str(failure)[:600]}")
    if defect == "none":
        assert not failures, failures
    else:
        assert failures, f"the emulated suite did not catch the defect '{defect}'"
        print(f"{defect} caught:", *failures, sep="\n  ")
