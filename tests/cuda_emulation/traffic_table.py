"""Prints the global bytes the CUDA kernels move per row mapping, against the floor, as counted by the
emulator (the numbers test_emulated_traffic.py asserts). Run from the repository root:

    python tests/cuda_emulation/traffic_table.py
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import torch  # noqa: E402

import emulation  # noqa: E402
import test_emulated_traffic as traffic  # noqa: E402


def main() -> None:
    driver = emulation.build_driver("counted")
    gen = torch.Generator().manual_seed(0)
    print("| mapping | targets | rows x K (bf16) | forward logits read / floor | backward logits read / floor "
          "| gradient written / floor | weights read fwd / bwd | targets read fwd / bwd |")
    print("|---|---|---|---|---|---|---|---|")
    for mapping in traffic.THREADS_PER_ROW:
        variants = [(name, dict(target="index", **kw)) for name, kw in traffic.INDEX_VARIANTS.items()]
        variants += [(f"probability, weights, {name}", dict(target="probability", weight=True, eps=0.1,
                                                             reduction="sum", **kw))
                     for name, kw in traffic.PROBABILITY_VARIANTS.items()]
        for name, kwargs in variants:
            case = traffic.mapping_case(mapping, **kwargs)
            f, launches = traffic.run_counted(driver, case, gen, mapping)
            fwd, _ = traffic.split_traffic(launches, "forward")
            bwd, _ = traffic.split_traffic(launches, "backward")
            floor = f["valid"] * f["K"] * f["elem"]
            grad_floor = f["rows"] * f["K"] * f["elem"]
            print(f"| {mapping} | {name} | {f['rows']} x {f['K']} | {traffic.read(fwd, 'logits')} / {floor} "
                  f"| {traffic.read(bwd, 'logits')} / {floor} | {traffic.written(bwd, 'grad')} / {grad_floor} "
                  f"| {traffic.read(fwd, 'weight')} / {traffic.read(bwd, 'weight')} "
                  f"| {traffic.read(fwd, 'target')} / {traffic.read(bwd, 'target')} |")


if __name__ == "__main__":
    main()
