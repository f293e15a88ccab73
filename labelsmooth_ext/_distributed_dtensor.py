"""labelsmooth_ext.cross_entropy on DTensor logits sharded over the classes: the vocabulary-parallel loss.

Logits (N, C) with placement Shard(1) (or Shard(-1)) on a one-dimensional DeviceMesh go to
vocab_parallel_cross_entropy over the mesh's process group. The result is what torch's loss_parallel returns
on such a mesh: a DTensor replicated on every rank; the logits' gradient is sharded like the logits.
"""

import sys

import torch


def is_dtensor(value):
    """Whether value is a DTensor, without importing torch.distributed.tensor (a second's work): nothing can be a
    DTensor before that module is imported."""
    if type(value) is torch.Tensor:
        return False
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(value, module.DTensor)


def _replicated_local(value, what):
    """A plain tensor as it is; a DTensor replicated on the mesh as its local tensor."""
    if value is None or not is_dtensor(value):
        return value
    from torch.distributed.tensor import Replicate

    if any(p != Replicate() for p in value.placements):
        raise ValueError(f"labelsmooth cross_entropy: with class-sharded DTensor logits, {what} must be a plain "
                         f"tensor or a replicated DTensor, got placements {value.placements}")
    return value.to_local()


def cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, *, z_loss, softcap,
                  smoothing, normalizer, return_lse, return_z_loss):
    from torch.distributed.tensor import DTensor, Replicate, Shard

    from .distributed import vocab_parallel_cross_entropy

    mesh = input.device_mesh
    if input.dim() != 2 or mesh.ndim != 1 or input.placements[0] not in (Shard(1), Shard(-1)):
        raise NotImplementedError(
            "labelsmooth cross_entropy on a DTensor takes (N, C) logits sharded over the classes (Shard(1)) on a "
            f"one-dimensional DeviceMesh; got shape {list(input.shape)}, placements {input.placements} on a "
            f"{mesh.ndim}-D mesh"
        )
    if return_lse or return_z_loss:
        raise NotImplementedError("labelsmooth cross_entropy: return_lse and return_z_loss are not supported with "
                                  "DTensor logits")
    local_logits = input.to_local()
    classes = input.shape[1]
    # Shard(1) splits like torch.chunk: ceil(C / ranks) classes per rank, the last ones fewer (or none).
    chunk = -(-classes // mesh.size())
    vocab_start = min(mesh.get_local_rank() * chunk, classes)
    weight = _replicated_local(weight, "weight")
    if weight is not None:
        if weight.dim() != 1 or weight.shape[0] != classes:
            raise RuntimeError(f"labelsmooth cross_entropy: weight must be a 1-D tensor with one entry per class "
                               f"({classes} classes), got shape {list(weight.shape)}")
        weight = weight[vocab_start:vocab_start + local_logits.shape[1]]
    loss = vocab_parallel_cross_entropy(
        local_logits, _replicated_local(target, "target"), group=mesh.get_group(), vocab_start=vocab_start,
        weight=weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
        z_loss=z_loss, softcap=softcap, smoothing=smoothing, normalizer=normalizer)
    return DTensor.from_local(loss, mesh, [Replicate()], run_check=False)
