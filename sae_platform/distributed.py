"""The collectives of data-parallel SAE training (torch.distributed); ``sae_platform.launch`` starts the ranks.

With ``world_size`` W > 1 (``resources.training.config.world_size``) each of the W ranks runs
:func:`sae_platform.trainer.train_sae` with the same settings:

* batch b of the global schedule is rows [b·B, (b+1)·B) of the shuffled store, as in one process;
  rank r reads only its own disjoint slice [b·B + r·B/W, b·B + (r+1)·B/W) (B must divide by W; a
  resumed checkpoint whose held-out rows lie in the store reads the whole refilled batch and keeps
  its slice of it: ``heldout.batch_rows``);
* every rank starts from the same weights (same seed, same calibration rows, or the same
  checkpoint); after the backward pass the gradients are averaged over ranks (one all-reduce of
  all of them), so every rank takes the same Adam step and renormalises the same decoder rows;
* the dead-latent counters advance by the global batch and a latent counts as fired when it fired
  on any rank (an all-reduce MAX of the fired masks), so they are identical on every rank;
* only rank 0 writes checkpoints (atomically, through the same storage protocol) and the summary;
* the logged L0 and dead fraction are integer counts summed over the ranks and divided once
  (``trainer._counted_figures``), so they equal one process's exactly.

The MSE term is a mean over rows, so the average of the ranks' gradients is the gradient of the
global batch, and the result equals one process's at the same global batch up to float summation
order (tests/test_distributed.py). Three terms normalise by a statistic of the batch and use each
rank's slice instead, as sparsify and other data-parallel SAE trainers do: AuxK divides by the
variance of the residual, BatchTopK selects its top B·k activations per slice, and the Switch SAE's
load balance multiplies the slice's expert fractions by its mean router probabilities.

With ``latent_parallel`` R > 1 (``sae_platform.latent_parallel``) the world is a mesh of W / R
data-parallel replicas x R latent shards: the collectives above run over a rank's *data* group (the
replicas of its shard: slices, gradient average, fired masks of its latents), the latent group sums
reconstructions, and every latent rank of replica 0 writes its shard of the checkpoint.

Backend: NCCL when the rank's device is CUDA (one GPU per rank: ``cuda:<LOCAL_RANK>``), gloo on
CPU (``sae_platform.launch.run_rank`` joins the group).
"""

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def average_gradients(parameters, group=None) -> None:
    """Replace every gradient by its mean over the ranks of ``group`` (default: all; a latent-sharded
    run passes its data-parallel group, the replicas of its shard): one all-reduce of them all, flattened."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def fired_on_any_rank(fired: torch.Tensor, group=None) -> torch.Tensor:
    """bool [latents held]: fired on at least one rank of ``group`` (default: all) in this step."""
    counts = fired.to(torch.int32)
    dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=group)
    return counts.bool()


def summed_over_ranks(counts: torch.Tensor, group=None) -> torch.Tensor:
    """``counts`` (integers) summed over the ranks of ``group`` (default: all), a new tensor: what a
    statistic of the global batch is divided from, once (``sae.base.mean_active``)."""
    counts = counts.detach().clone()
    dist.all_reduce(counts, group=group)
    return counts


def mean_over_ranks(row: dict, same_everywhere: tuple[str, ...] = ()) -> dict:
    """A metrics row with every float averaged over the ranks (ints, e.g. step and tokens, are global),
    but the floats named in ``same_everywhere``: already the global figure on every rank (averaging
    equal floats can round them)."""
    keys = [k for k, v in row.items() if isinstance(v, float) and k not in same_everywhere]
    values = torch.tensor([row[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    return {**row, **{k: float(v) / dist.get_world_size() for k, v in zip(keys, values, strict=True)}}


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
