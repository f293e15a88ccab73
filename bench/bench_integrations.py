"""Forward+backward cost of the recipes in README.md's "Integrations" section, in one run on this machine:
the two views of LLM logits (B, T, V), our transformers losses against transformers' own, and
mixup_cross_entropy against timm's soft-target loss. For each: the median time, that time over one copy of
the logits, and the number of new tensors of the logits' size made on the way (seen by a dispatch mode:
what an op allocates inside its kernel, such as a contiguous copy of its input, is not counted).

    python bench/bench_integrations.py [--repeats 5] [--shape 4x512x32000] [--mixup-shape 1024x1000]

Needs transformers; timm's rows are measured when timm is installed.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.trainer_pt_utils import LabelSmoother as TransformersLabelSmoother

import labelsmooth_ext
from labelsmooth_ext.integrations import huggingface, mixup_cross_entropy

IGNORE_INDEX = -100
EPS = 0.1


class _CountLargeTensors(TorchDispatchMode):
    """Counts op outputs of at least `numel` elements that are new tensors, not views of an input."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for result in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(result, torch.Tensor) and result.numel() >= self.numel and \
                    result.untyped_storage().data_ptr() not in inputs:
                self.count += 1
        return out


def _measure(loss_fn, logits, repeats, large_numel):
    """(median forward+backward ms, new tensors of at least large_numel elements in one step)."""
    times = []
    for _ in range(repeats + 1):  # the first step warms up
        logits.grad = None
        start = time.perf_counter()
        loss_fn(logits).backward()
        times.append(time.perf_counter() - start)
    with _CountLargeTensors(large_numel) as counter:
        logits.grad = None
        loss_fn(logits).backward()
    return statistics.median(times[1:]) * 1e3, counter.count


def _copy_ms(x, repeats):
    y = torch.empty_like(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        y.copy_(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def bench_llm(shape, dtype, repeats):
    batch, length, vocab = shape
    logits = torch.randn(shape, dtype=dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, length))
    labels[:, : length // 32] = IGNORE_INDEX  # a prompt that is not scored
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    cases = {
        "cross_entropy(logits.view(-1, V))": lambda z: labelsmooth_ext.cross_entropy(
            z.view(-1, vocab), shifted.reshape(-1), label_smoothing=EPS),
        "cross_entropy(logits.transpose(1, 2))": lambda z: labelsmooth_ext.cross_entropy(
            z.transpose(1, 2), shifted, label_smoothing=EPS),
        "F.cross_entropy(logits.view(-1, V))": lambda z: F.cross_entropy(
            z.view(-1, vocab), shifted.reshape(-1), label_smoothing=EPS),
        "huggingface.causal_lm_loss (eps 0)": lambda z: huggingface.causal_lm_loss(z, labels, vocab),
        "transformers ForCausalLMLoss": lambda z: ForCausalLMLoss(z, labels, vocab),
        f"huggingface.LabelSmoother({EPS})": lambda z: huggingface.LabelSmoother(EPS)(
            {"logits": z}, labels, shift_labels=True),
        f"transformers LabelSmoother({EPS})": lambda z: TransformersLabelSmoother(EPS)(
            {"logits": z}, labels, shift_labels=True),
    }
    copy = _copy_ms(logits.detach(), repeats)
    print(f"\nlogits {tuple(shape)} {dtype}: one copy {copy:.1f} ms")
    # transformers' LabelSmoother copies the logits without their last position: count tensors that size too.
    large = batch * (length - 1) * vocab
    for name, loss_fn in cases.items():
        ms, count = _measure(loss_fn, logits, repeats, large)
        print(f"  {name:42s} {ms:9.1f} ms  {ms / copy:6.1f} copies  logits-sized tensors: {count}")


def bench_mixup(shape, repeats):
    rows, classes = shape
    logits = torch.randn(shape).requires_grad_()
    target = torch.randint(0, classes, (rows,))
    lam = 0.7
    cases = {"mixup_cross_entropy": lambda z: mixup_cross_entropy(z, target, target.flip(0), lam,
                                                                  label_smoothing=EPS)}
    try:
        from timm.data.mixup import mixup_target
        from timm.loss import SoftTargetCrossEntropy
    except ImportError as error:
        print(f"(timm not measured: {error})")
    else:
        cases["timm SoftTargetCrossEntropy(mixup_target)"] = lambda z: SoftTargetCrossEntropy()(
            z, mixup_target(target, classes, lam, EPS))
    copy = _copy_ms(logits.detach(), repeats)
    print(f"\nmixup logits {tuple(shape)} float32, lam {lam}, eps {EPS}: one copy {copy:.2f} ms")
    for name, loss_fn in cases.items():
        ms, count = _measure(loss_fn, logits, repeats, logits.numel())
        print(f"  {name:42s} {ms:9.2f} ms  {ms / copy:6.1f} copies  N x C tensors: {count}")


def _shape(text):
    return tuple(int(size) for size in text.split("x"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per case (median; default 5)")
    parser.add_argument("--shape", type=_shape, default=(4, 512, 32000), help="LLM logits BxTxV")
    parser.add_argument("--mixup-shape", type=_shape, default=(1024, 1000), help="mixup logits NxC")
    args = parser.parse_args()
    info = labelsmooth_ext.backend_info()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, labelsmooth_ext backend {info['backend']}")
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        bench_llm(args.shape, dtype, args.repeats)
    bench_mixup(args.mixup_shape, args.repeats * 4)


if __name__ == "__main__":
    main()
