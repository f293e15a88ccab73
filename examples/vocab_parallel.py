"""Vocabulary-parallel label-smoothed cross-entropy on CPU ranks, with torchrun:

    torchrun --nproc-per-node 2 examples/vocab_parallel.py

Each rank holds a slice of an output layer's classes (uneven here: the vocabulary does not divide evenly) and
computes the loss of the whole vocabulary with labelsmooth_ext.distributed.vocab_parallel_cross_entropy, and
checks it, and the gradient, against labelsmooth_ext.cross_entropy on the whole vocabulary's logits. A second part
does the same through a DTensor sharded over the classes and the ordinary cross_entropy call.
"""

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import labelsmooth_ext
from labelsmooth_ext.distributed import vocab_parallel_cross_entropy

ROWS, HIDDEN, VOCAB = 64, 32, 1003
EPS = 0.1


def main():
    dist.init_process_group("gloo")
    rank, ranks = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same full problem on every rank; each keeps its slice
    hidden = torch.randn(ROWS, HIDDEN)
    full_weight = torch.randn(VOCAB, HIDDEN) / HIDDEN**0.5
    target = torch.randint(0, VOCAB, (ROWS,))
    target[::10] = -100  # padding

    # Rank r owns classes [start, start + size): the first VOCAB % ranks ranks hold one class more.
    sizes = [VOCAB // ranks + (r < VOCAB % ranks) for r in range(ranks)]
    start = sum(sizes[:rank])
    local_weight = full_weight[start:start + sizes[rank]].clone().requires_grad_()
    local_logits = hidden @ local_weight.T  # (ROWS, sizes[rank]): this rank's part of the output layer

    loss = vocab_parallel_cross_entropy(local_logits, target, label_smoothing=EPS)
    loss.backward()

    # Check: the single-process loss on the whole vocabulary, and this rank's slice of its gradient.
    check_weight = full_weight.clone().requires_grad_()
    expected = labelsmooth_ext.cross_entropy(hidden @ check_weight.T, target, label_smoothing=EPS)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(local_weight.grad, check_weight.grad[start:start + sizes[rank]])
    grad_error = (local_weight.grad - check_weight.grad[start:start + sizes[rank]]).abs().max()
    losses = [torch.zeros(()) for _ in range(ranks)]
    dist.all_gather(losses, loss.detach())
    if rank == 0:
        same = all(torch.equal(value, losses[0]) for value in losses)
        print(f"{ranks} ranks, shards {sizes}: loss {loss.item():.6f} (single process: {expected.item():.6f}), "
              f"same bits on every rank: {same}")
    print(f"rank {rank}: classes [{start}, {start + sizes[rank]}), max |weight gradient error| {grad_error:.2e}")

    # The same loss through DTensor: logits sharded over the classes (Shard(1)), the usual cross_entropy call.
    mesh = init_device_mesh("cpu", (ranks,))
    sharded = distribute_tensor(hidden @ full_weight.T, mesh, [Shard(1)])
    dtensor_loss = labelsmooth_ext.cross_entropy(sharded, target, label_smoothing=EPS)
    torch.testing.assert_close(dtensor_loss.full_tensor(), expected.detach())
    if rank == 0:
        print(f"DTensor: loss {dtensor_loss.full_tensor().item():.6f}, placements {dtensor_loss.placements}")
    # Every rank past its last collective before any tears the group down: a rank that destroys it while the
    # other still has gloo work in flight can abort that process at exit.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Every check has passed and the group is destroyed. gloo's threads, torn down at interpreter exit, can still
    # abort a process under load ("terminate called without an active exception", SIGABRT), which says nothing
    # about the results, so the process leaves without that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
