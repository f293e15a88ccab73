"""Vocabulary-parallel (tensor-parallel) label-smoothed cross-entropy over torch.distributed.

Each rank of a process group holds the logits of a contiguous slice of the classes; the loss is that of the
gathered logits, identical to the last bit on every rank, and each rank gets its slice of the gradient. One
all-gather of a few numbers per row does it (see _distributed_local.py for the math); the backward needs no
collective. Works on any backend that implements all_gather_single (NCCL, gloo).

    from labelsmooth_ext.distributed import vocab_parallel_cross_entropy
    loss = vocab_parallel_cross_entropy(local_logits, target, label_smoothing=0.1)
"""

import torch
import torch.distributed as dist

from . import _distributed_local as local
from . import _validation, reference

__all__ = ["vocab_parallel_cross_entropy"]

# What every rank announces before the loss: its rows, its classes, its vocab_start (-1: not given), whether it
# has class weights and its logits' dtype. Checked alike on every rank, so a bad call raises everywhere
# instead of hanging or mixing mismatched tensors in the all-gather.
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# torch 2.13 renamed all_gather_into_tensor (which now warns) to all_gather_single.
# (Both are missing where torch is built without distributed support: the loss then says so when called.)
_all_gather_single = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)


def all_gather(tensor, group):
    """(ranks, *tensor.shape): every rank's tensor, in rank order."""
    ranks = dist.get_world_size(group)
    out = tensor.new_empty((ranks * tensor.shape[0], *tensor.shape[1:]))
    _all_gather_single(out, tensor.contiguous(), group=group)
    return out.view(ranks, *tensor.shape)


def shard_layout(local_logits, vocab_start, weighted, group):
    """(starts, sizes) of every rank's classes, in rank order, after checking that the shards tile
    [0, K) and that every rank passes the same number of rows, dtype and weight/no weight."""
    rows, classes = local_logits.shape
    given = -1 if vocab_start is None else vocab_start
    mine = torch.tensor([rows, classes, given, int(weighted), _DTYPES.index(local_logits.dtype)],
                        dtype=torch.int64, device=local_logits.device)
    announced = all_gather(mine.unsqueeze(0), group).squeeze(1).tolist()
    all_rows, sizes, starts, weights, dtypes = (list(column) for column in zip(*announced))
    _check_same_everywhere("rows (local_logits.shape[0])", all_rows)
    _check_same_everywhere("logits dtype", [str(_DTYPES[d]) for d in dtypes])
    _check_same_everywhere("weight given (True) or None (False)", [bool(w) for w in weights])
    for rank, size in enumerate(sizes):
        if size == 0:
            raise ValueError(f"vocab_parallel_cross_entropy: rank {rank} holds no classes (local_logits of shape "
                             f"[{rows}, 0]); every rank must hold at least one class")
    if all(start == -1 for start in starts):
        starts = [sum(sizes[:rank]) for rank in range(len(sizes))]
    elif any(start == -1 for start in starts):
        missing = [rank for rank, start in enumerate(starts) if start == -1]
        raise ValueError(f"vocab_parallel_cross_entropy: vocab_start must be given on every rank or on none; ranks "
                         f"{missing} passed None")
    _check_tiling(starts, sizes)
    return starts, sizes


def _check_same_everywhere(what, values):
    if any(value != values[0] for value in values):
        raise ValueError(f"vocab_parallel_cross_entropy: every rank must pass the same {what}; got {values} by rank")


def _check_tiling(starts, sizes):
    """The shards must cover [0, K) without gap or overlap (in any rank order)."""
    expected = 0
    for rank in sorted(range(len(starts)), key=lambda r: starts[r]):
        if starts[rank] != expected:
            raise ValueError(
                f"vocab_parallel_cross_entropy: rank {rank} has vocab_start={starts[rank]} but the shards before it "
                f"end at class {expected}: the shards (vocab_start, size) by rank {list(zip(starts, sizes))} must "
                f"cover the classes [0, {sum(sizes)}) without gap or overlap"
            )
        expected += sizes[rank]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local_logits, target, weight, layout, options):
        ignore_index, eps, num_classes, z_loss, softcap, reduction, normalizer, group = options
        starts, sizes = layout
        rank = dist.get_rank(group)
        packed, saved_forward = local.local_partials(local_logits, target, weight, ignore_index, starts[rank],
                                                     softcap)
        gathered = all_gather(packed, group)
        loss, saved_merge = local.merge(gathered, target, ignore_index, starts, sizes, weight is not None, eps,
                                        z_loss, reduction, normalizer)
        ctx.save_for_backward(local_logits, weight, *saved_forward, *saved_merge)
        ctx.options = options
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        local_logits, weight, *saved = ctx.saved_tensors
        ignore_index, eps, num_classes, z_loss, softcap, reduction, normalizer, group = ctx.options
        grad = local.local_gradient(grad_loss, local_logits, weight, saved[:4], saved[4:], eps, num_classes, z_loss,
                                    softcap, reduction, normalizer)
        return grad, None, None, None, None


def vocab_parallel_cross_entropy(local_logits, target, *, group=None, vocab_start=None, weight=None,
                                 ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None,
                                 smoothing="uniform", normalizer=None):
    """Cross-entropy of logits split over the classes across the ranks of ``group`` (default: the world).

    * ``local_logits``: (N, V_r), this rank's classes ``[vocab_start, vocab_start + V_r)``; shards may differ in
      size (each at least one class) and must together cover ``[0, K)``.
    * ``target``: (N) global class indices (int64, int32 or uint8), the same on every rank.
    * ``vocab_start``: this rank's first class; when None on every rank, the shards are taken in rank order
      (rank 0 holds classes ``[0, V_0)``, rank 1 the next ``V_1``, ...).
    * ``weight``: this rank's slice of the class weights (V_r entries), or None on every rank. Not
      differentiable here.
    * ``ignore_index``, ``reduction``, ``label_smoothing``, ``z_loss``, ``softcap``, ``smoothing``,
      ``normalizer``: as in ``labelsmooth_ext.cross_entropy``, with the global class count K (``smoothing=
      "others"`` spreads eps over the K - 1 other classes of the whole vocabulary).

    Returns the loss of ``cross_entropy`` on the gathered (N, K) logits, with the same bits on every rank; its
    gradient reaches ``local_logits`` as this rank's slice of the full gradient, with no collective in the
    backward. Every rank must call it (it runs two all-gathers: the shard layout, then a few numbers per row).
    """
    ignore_index, eps, code, z_loss, softcap, smoothing_code, normalizer = _validation.check_loss_options(
        ignore_index, label_smoothing, reduction, z_loss, softcap, smoothing, normalizer)
    _check_shapes(local_logits, target, weight, vocab_start)
    _validation.check_tensors(local_logits, target, weight, ignore_index)
    if weight is not None and weight.requires_grad:
        raise NotImplementedError("vocab_parallel_cross_entropy: the class weights are not differentiable here; "
                                  "pass weight.detach()")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab_parallel_cross_entropy needs an initialized process group: call "
                           "torch.distributed.init_process_group first (torchrun sets up its environment)"
                           + ("" if dist.is_available() else "; this torch is built without torch.distributed"))
    if group is None:
        group = dist.group.WORLD
    starts, sizes = shard_layout(local_logits, vocab_start, weight is not None, group)
    num_classes = sum(sizes)
    if smoothing_code == _validation.SMOOTHING_CONVENTIONS["others"] and eps > 0 and num_classes < 2:
        raise ValueError(f"smoothing='others' spreads label_smoothing={eps} over the other classes, but there are "
                         f"{num_classes} class(es)")
    _validation.check_target_values(target, num_classes, ignore_index)
    eps = reference.uniform_smoothing(eps, smoothing_code, num_classes)
    options = (ignore_index, eps, num_classes, z_loss, softcap, code, normalizer, group)
    return _VocabParallelCrossEntropy.apply(local_logits, target, weight, (starts, sizes), options)


def _check_shapes(local_logits, target, weight, vocab_start):
    if not isinstance(local_logits, torch.Tensor) or local_logits.dim() != 2:
        shape = list(local_logits.shape) if isinstance(local_logits, torch.Tensor) else type(local_logits).__name__
        raise ValueError(f"vocab_parallel_cross_entropy: local_logits must be (N, V_local), got {shape}")
    if not isinstance(target, torch.Tensor) or target.dim() != 1 or target.is_floating_point():
        what = f"{target.dtype} of shape {list(target.shape)}" if isinstance(target, torch.Tensor) else target
        raise ValueError(f"vocab_parallel_cross_entropy: target must hold N global class indices, shape (N), got "
                         f"{what}")
    if weight is not None and isinstance(weight, torch.Tensor) and list(weight.shape) != [local_logits.shape[1]]:
        raise ValueError(f"vocab_parallel_cross_entropy: weight must be this rank's slice of the class weights, "
                         f"shape [{local_logits.shape[1]}] (local_logits.shape[1]), got {list(weight.shape)}")
    if vocab_start is not None and (isinstance(vocab_start, bool) or not isinstance(vocab_start, int)
                                    or vocab_start < 0):
        raise ValueError(f"vocab_parallel_cross_entropy: vocab_start must be None or an int >= 0, got {vocab_start!r}")
