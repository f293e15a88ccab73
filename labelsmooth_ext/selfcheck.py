"""`python -m labelsmooth_ext check`: compares the loss and gradient with PyTorch on random inputs.

Prints the backend in use and a pass/fail table; exits non-zero if any case fails. The reference is
torch.nn.functional.cross_entropy computed in float64 on the same (rounded) inputs.
"""

import time

import torch
import torch.nn.functional as F

from ._backend import backend_info
from .functional import cross_entropy

# (description, logits shape, dtype, options)
CASES = [
    ("fp32 (N, C)", (256, 1000), torch.float32, {}),
    ("bf16 (N, C), large vocabulary", (8, 128256), torch.bfloat16, {}),
    ("fp16 (N, C), class weights", (128, 100), torch.float16, {"weight": True}),
    ("fp32 (N, C, H, W), reduction='sum'", (4, 10, 16, 16), torch.float32, {"reduction": "sum"}),
    ("fp64 (C) single sample", (37,), torch.float64, {}),
    ("fp32 ignore_index + reduction='none'", (512, 32), torch.float32, {"ignore": True, "reduction": "none"}),
    ("fp32 probability targets", (64, 50), torch.float32, {"probabilities": True}),
    ("fp32 no smoothing (eps = 0)", (64, 500), torch.float32, {"label_smoothing": 0.0}),
]

# Relative error allowed, from the precision of the gradient's dtype (the loss is always fp32/fp64):
# a few units in the last place of the rounded gradient.
GRAD_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
LOSS_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}


def _make_inputs(shape, dtype, options, generator):
    logits = (torch.randn(shape, generator=generator, dtype=torch.float64) * 3).to(dtype)
    classes = shape[0] if len(shape) == 1 else shape[1]
    if options.get("probabilities"):
        target = torch.rand(shape, generator=generator, dtype=torch.float64).softmax(dim=0 if len(shape) == 1 else 1)
    else:
        row_shape = shape[:0] if len(shape) == 1 else shape[:1] + shape[2:]
        target = torch.randint(0, classes, row_shape, generator=generator)
        if options.get("ignore"):
            target[torch.rand(row_shape, generator=generator) < 0.3] = -100
    weight = None
    if options.get("weight"):
        weight = (torch.rand(classes, generator=generator, dtype=torch.float64) + 0.5).to(dtype).double()
    return logits, target, weight


def _relative_error(ours, reference):
    scale = reference.abs().max().clamp_min(1e-30)
    return ((ours.double() - reference).abs().max() / scale).item()


def run_case(shape, dtype, options, generator):
    logits, target, weight = _make_inputs(shape, dtype, options, generator)
    reduction = options.get("reduction", "mean")
    eps = options.get("label_smoothing", 0.1)
    ours_in = logits.clone().requires_grad_()
    ref_in = logits.double().requires_grad_()
    if options.get("probabilities"):
        target = target.to(dtype).double()  # both sides see the same rounded probabilities
    ours = cross_entropy(ours_in, target.to(dtype) if options.get("probabilities") else target,
                         None if weight is None else weight.to(dtype), reduction=reduction, label_smoothing=eps)
    ref = F.cross_entropy(ref_in, target, weight, reduction=reduction, label_smoothing=eps)
    upstream = torch.rand(ref.shape, generator=generator, dtype=torch.float64) + 0.5
    (ours_grad,) = torch.autograd.grad(ours, ours_in, upstream.to(ours.dtype))
    (ref_grad,) = torch.autograd.grad(ref, ref_in, upstream)
    loss_error = _relative_error(ours, ref)
    grad_error = _relative_error(ours_grad, ref_grad)
    passed = loss_error <= LOSS_TOLERANCE[dtype] and grad_error <= GRAD_TOLERANCE[dtype]
    return loss_error, grad_error, passed


def main(seed=None):
    info = backend_info()
    print("labelsmooth_ext self-check against torch.nn.functional.cross_entropy (float64 reference)")
    for key, value in info.items():
        print(f"  {key:22s} {value}")
    if seed is None:
        seed = int(time.time())
    print(f"  {'seed':22s} {seed} (replay with --seed {seed})")
    generator = torch.Generator().manual_seed(seed)
    print(f"\n  {'case':40s} {'loss rel err':>12s} {'grad rel err':>12s}  result")
    failures = 0
    for name, shape, dtype, options in CASES:
        loss_error, grad_error, passed = run_case(shape, dtype, options, generator)
        failures += not passed
        print(f"  {name:40s} {loss_error:12.2e} {grad_error:12.2e}  {'PASS' if passed else 'FAIL'}")
    print(f"\n{len(CASES) - failures} passed, {failures} failed")
    return 1 if failures else 0
