"""Expert parallelism for the Switch SAE (Mudide et al. 2024, "Efficient Dictionary Learning with
Switch Sparse Autoencoders"; the layout of Fedus et al. 2022, "Switch Transformers", section 2.2):
inside the latent-sharded layout of ``sae_platform.latent_parallel``, each latent rank holds whole
experts.

Why: a Switch SAE's experts are its latents in blocks (expert e holds global latents
[e * n / E, (e + 1) * n / E)), so with E divisible by the latent ranks R, latent rank r's shard
[r * n / R, (r + 1) * n / R) is exactly experts [r * E / R, (r + 1) * E / R): the same checkpoint
shards (``sharded_checkpoint``), the same 1/R of W_enc, b_enc, W_dec and their Adam state per rank,
and no top-k merge across ranks, since a row's k latents all live in its expert. The router
(W_router, b_router), b_pre and the input scale are replicated. A rank's model is a ``SwitchSAE``
expert shard (``first_latent``, ``whole_n_latents``): its rows and the whole router are the ones
one process draws at the same seed (``sae.base.unit_rows``, then the router from the global RNG).

One training step (every collective over the latent group):

* every rank routes all its rows with the replicated router: the same probabilities everywhere;
* each rank takes the rows routed to its experts and picks each one's top k in its expert
  (``SwitchSAE._select``: the very per-expert matmul one process does) and AuxK's top k_aux among
  that expert's dead latents, then decodes them; rows routed elsewhere get zeros;
* one all-reduce sums the partial reconstructions (AuxK's partial rides in it): each row's sum is
  one rank's part plus zeros, so the reconstruction is one process's bit for bit;
* one all-reduce of the integer counts [active codes, dead latents] gives the whole SAE's L0 (divided
  once: one process's exactly) and AuxK's "any latent dead" gate;
* the load-balancing loss (E * sum_e f_e P_e) is computed on every rank from the replicated
  routing and the whole batch's expert counts, so its gradient is one process's on every rank.

Gradients: the router's other path, through the probability p that scales a row's codes, exists
only on the rank holding that row's expert; p enters the codes through the shard's
``_share`` (backward: the sum over the latent group, the others adding zeros), as b_pre enters
the encoder. Every replicated tensor thus gets one process's gradient on every latent rank (to
float summation order); dead counters, fired sets and decoder renormalisation are per latent,
hence local.
"""

import torch
from torch import Tensor

from sae_platform.sae import SwitchSAE
from sae_platform.sae.base import SAEOutput, _sparse_stats
from sae_platform.sae.kernels import Pattern, _SelectedPre
from sae_platform.sae.topk import _aux_target, _auxk_loss


def switch_forward(shard, x: Tensor, dead_mask: Tensor | None) -> SAEOutput:
    """The training forward of ``shard``, a ``latent_parallel.LatentShardedSAE`` of a switch SAE
    (its ``local``: this rank's ``SwitchSAE`` expert shard). x [batch, d_model] raw, the same rows
    on every rank of the latent group; dead_mask: the shard's bool [n / R] (turns on AuxK).
    Returns SAEOutput: recon [batch, d_model] raw, l0 and the "balance" (and "auxk") parts of the
    whole SAE, the same on every rank; fired [n / R] and the sparse codes of this shard's latents.
    A collective: every rank of the latent group calls it, with the same rows."""
    local: SwitchSAE = shard.local
    xs = local._normalize(x)
    xc = xs - local.b_pre
    probs, expert, p = local.route(xc)
    rows, held = local.held_rows(expert)
    with_aux = dead_mask is not None and local.hparams["k_aux"] > 0
    vals, idx, aux, _ = local._select(xc.detach()[rows], held, dead_mask, with_aux)
    b_pre, p_shared = shard._share(local.b_pre), shard._share(p)
    pattern, z = _routed_codes(local, xs, b_pre, rows, vals, idx, p_shared[rows])
    partials = [local._sparse_decode(pattern, z)]
    if aux is not None:  # scaled by p as in one process, without a gradient to the router
        partials.append(local._sparse_decode(*_routed_codes(local, xs, b_pre, rows, *aux, p.detach()[rows])))
    total = shard._sum(torch.stack(partials))
    recon_n = total[0] + local.b_pre
    n_experts = local.hparams["n_experts"]
    counts = torch.bincount(expert, minlength=n_experts).to(xs.dtype)
    parts = {"balance": n_experts * (counts / x.shape[0] * probs.mean(0)).sum()}
    active, fired = _sparse_stats(pattern, z)
    active, dead = shard.summed_counts(active, dead_mask)
    if aux is not None:
        parts["auxk"] = _auxk_loss(total[1], _aux_target(xs, recon_n), dead > 0)
    return SAEOutput.counted(local._to_raw(recon_n), active, fired, parts, sparse=(pattern, z))


def _routed_codes(local: SwitchSAE, xs: Tensor, b_pre: Tensor, rows: Tensor, vals: Tensor, idx: Tensor,
                  scale: Tensor) -> tuple[Pattern, Tensor]:
    """The codes of rows ``rows`` [m] (ascending) at this shard's latents ``idx`` [m, w], whose
    pre-activations (picked without autograd) are ``vals`` [m, w]: made differentiable, ReLU'd
    and scaled by each row's router probability ``scale`` [m], as ``SwitchSAE.forward`` does.
    Returns (pattern over the whole batch and the shard's latents, codes [m * w])."""
    width = idx.shape[1]
    pattern = Pattern.from_rows(rows.repeat_interleave(width), idx.reshape(-1), xs.shape[0], local.n_latents)
    z = _SelectedPre.apply(xs, b_pre, local.W_enc, local.b_enc, vals.reshape(-1), pattern).relu()
    return pattern, z * scale.repeat_interleave(width)
