"""The Switch SAE (Mudide et al. 2024): a router sends each row to one of n_experts TopK SAEs
and only that expert's encoder rows are multiplied, cutting the encoder matmul by n_experts.
Built on ``TopKSAE`` (``topk.py``) and the sparse kernels (``kernels.py``).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_platform.errors import PlatformError
from sae_platform.sae.base import Codes, SAEOutput, _sparse_stats
from sae_platform.sae.kernels import Pattern, _SelectedPre, topk_rows
from sae_platform.sae.topk import TopKSAE, _dead_or_none


class SwitchSAE(TopKSAE):
    """Switch SAE (Mudide et al. 2024, "Efficient Dictionary Learning with Switch Sparse
    Autoencoders", arXiv:2410.08201): a softmax router sends each row to one of n_experts TopK
    SAEs over n_latents / n_experts latents each.

    Only the chosen expert's encoder rows are multiplied (rows grouped by expert, one matmul per
    expert), so encoder FLOPs fall by n_experts; the public implementation computes the dense
    encoder and masks it, which never realises that saving. Expert e's latent j is global latent
    e * (n_latents / n_experts) + j, and the code values include the router probability
    (x_hat = p * W_dec^T z + b_pre, which is how the router gets a gradient), so downstream code
    sees one flat dictionary obeying the same decode rule as every other variant.
    Load balancing: balance_coeff * E * sum_e f_e P_e (Fedus et al. 2022, "Switch Transformers",
    §2.2). Not available as a transcoder.

    An expert shard (expert parallelism, ``sae_platform.expert_parallel``): built with
    ``first_latent`` and ``whole_n_latents`` (the whole dictionary's n_latents), the model holds
    only latents [first_latent, first_latent + n_latents), a block of whole experts
    (``experts_held``, global expert ids), and the whole router over all n_experts; it draws the
    same rows and router one process would at the same seed. Its ``encode`` codes the rows routed
    to its experts and gives the others padding (value 0), with latent ids local to the shard.
    PlatformError when the block does not consist of whole experts."""

    variant = "switch"
    DEFAULTS = {"n_experts": 8, "k": 32, "k_aux": None, "aux_coeff": 1 / 32, "balance_coeff": 0.01}
    COEFFS = {"auxk": "aux_coeff", "balance": "balance_coeff"}

    def __init__(self, d_model, n_latents, device=None, dtype=torch.float32, whole_n_latents: int | None = None,
                 **hparams):
        first_latent = hparams.get("first_latent", 0)
        super().__init__(d_model, n_latents, device, dtype, **hparams)
        n_experts = self.hparams["n_experts"]
        self.expert_size = (whole_n_latents or n_latents) // n_experts
        if first_latent % self.expert_size or n_latents % self.expert_size:
            raise PlatformError(f"latents [{first_latent}, {first_latent + n_latents}) are not whole experts of "
                                f"{self.expert_size} latents", "give an expert shard a block of whole experts "
                                "(n_experts divisible by the number of shards)")
        self.experts_held = range(first_latent // self.expert_size, (first_latent + n_latents) // self.expert_size)
        self.hparams["k_aux"] = min(self.hparams["k_aux"], self.expert_size)
        # the whole router, drawn after the dictionary's seed as in one process (an expert shard's too)
        router = torch.randn(n_experts, d_model, device=device, dtype=dtype) / math.sqrt(d_model)
        self.W_router = nn.Parameter(router)
        self.b_router = nn.Parameter(torch.zeros(n_experts, device=device, dtype=dtype))

    def route(self, xc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Route centred normalised rows ``xc`` = x * input_scale - b_pre [batch, d_model]:
        (probs [batch, n_experts], chosen expert [batch] int64, its probability [batch])."""
        probs = F.linear(xc, self.W_router, self.b_router).softmax(-1)
        p, expert = probs.max(-1)
        return probs, expert, p

    def expert_pre(self, e: int, xc_rows: Tensor) -> Tensor:
        """Pre-activations of expert e (numbered from this model's first expert), [rows,
        expert_size], for the centred normalised rows routed to it, ``xc_rows`` [rows, d_model]:
        the only encoder matmul."""
        lo, hi = e * self.expert_size, (e + 1) * self.expert_size
        return F.linear(xc_rows, self.W_enc[lo:hi], self.b_enc[lo:hi])

    def held_rows(self, expert: Tensor) -> tuple[Tensor, Tensor]:
        """The rows routed to the experts this model holds (all of them, unless it is an expert
        shard), from ``expert`` [batch] (global expert ids): (row ids [m] ascending, int64; their
        experts, numbered from this model's first expert [m])."""
        mine = (expert >= self.experts_held.start) & (expert < self.experts_held.stop)
        rows = mine.nonzero().squeeze(1)
        return rows, expert[rows] - self.experts_held.start

    @torch.no_grad()
    def _select(self, xc: Tensor, expert: Tensor, dead_mask: Tensor | None, with_aux: bool):
        """Per-expert TopK (and AuxK among that expert's dead latents), returned in input row
        order with this model's latent ids (global ids unless it is an expert shard): (vals, idx,
        aux or None, rows per expert). ``expert`` [rows]: numbered from this model's first expert;
        ``dead_mask``: this model's [n_latents]. No rows: empty [0, k] picks."""
        k, k_aux, m = self.hparams["k"], self.hparams["k_aux"], self.expert_size
        if not xc.shape[0]:  # an expert shard none of the batch was routed to
            empty = xc.new_empty(0, k), torch.empty(0, k, dtype=torch.long, device=xc.device)
            none = xc.new_empty(0, k_aux), torch.empty(0, k_aux, dtype=torch.long, device=xc.device)
            return *empty, (none if with_aux else None), xc.new_zeros(self.hparams["n_experts"])
        order = expert.argsort(stable=True)
        counts = torch.bincount(expert, minlength=self.hparams["n_experts"])
        x_sorted = xc.detach()[order]
        picks, aux_picks, start = [], [], 0
        for e, count in enumerate(counts.tolist()):
            if count == 0:
                continue
            pre = self.expert_pre(e, x_sorted[start:start + count])
            picks.append(topk_rows(pre, k))
            if with_aux:  # pre is spent: mask it in place rather than copy it
                pre.masked_fill_(~dead_mask[e * m:(e + 1) * m].to(pre.device), float("-inf"))
                aux_picks.append(topk_rows(pre, k_aux))
            start += count
        offset = expert[order][:, None] * m  # expert-local -> global latent ids

        def unsort(pairs):  # back to input row order, global ids
            vals, idx = torch.cat([v for v, _ in pairs]), torch.cat([i for _, i in pairs]) + offset
            return (torch.empty_like(vals).index_copy_(0, order, vals),
                    torch.empty_like(idx).index_copy_(0, order, idx))

        aux = unsort(aux_picks) if with_aux else None
        return *unsort(picks), aux, counts.to(xc.dtype)

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, target: Tensor | None = None) -> SAEOutput:
        """x [batch, d_model] raw -> SAEOutput, recon [batch, d_model] raw; codes: k entries per
        row, p * ReLU(TopK_k(expert pre-activations)), global latent ids. Parts: "balance" always,
        "auxk" given dead_mask [n_latents] (among the chosen expert's dead latents). ``target`` is
        ignored (an SAE's target is x). Raises PlatformError on a wrong width, or for an expert
        shard (it trains through ``sae_platform.expert_parallel``, which sums every shard's part)."""
        if len(self.experts_held) != self.hparams["n_experts"]:
            held = self.experts_held
            raise PlatformError(f"this switch SAE holds experts {held.start}..{held.stop - 1} of "
                                f"{self.hparams['n_experts']} only: its forward alone is not the SAE's",
                                "train the shards together (latent_parallel > 1: sae_platform.expert_parallel), or "
                                "load the whole SAE (load_sae)")
        xs = self._normalize(x)
        xc = xs - self.b_pre
        probs, expert, p = self.route(xc)
        with_aux = self._with_auxk(_dead_or_none(dead_mask))  # none dead: the term is 0, its picks skipped
        sel_vals, sel_idx, aux, counts = self._select(xc, expert, dead_mask, with_aux)
        pattern = Pattern.regular(sel_idx, self.n_latents)
        z = _SelectedPre.apply(xs, self.b_pre, self.W_enc, self.b_enc, sel_vals, pattern).relu() * p[:, None]
        recon_n = self._sparse_decode(pattern, z) + self.b_pre
        n_experts = self.hparams["n_experts"]
        parts = {"balance": n_experts * (counts / x.shape[0] * probs.mean(0)).sum()}
        if self._with_auxk(dead_mask):
            parts["auxk"] = self._aux_part(xs, xs, recon_n, aux, dead_mask, scale=p.detach()[:, None])
        active, fired = _sparse_stats(pattern, z)
        return SAEOutput.counted(self._to_raw(recon_n), active, fired, parts, sparse=(pattern, z.reshape(-1)))

    @torch.no_grad()
    def encode(self, x: Tensor) -> Codes:
        """x [batch, d_model] raw -> Codes [batch, k], values including the router probability.
        An expert shard codes only the rows routed to its experts (this model's latent ids); the
        other rows get k padding entries (value 0)."""
        xc = self._centered(x)
        _, expert, p = self.route(xc)
        if len(self.experts_held) == self.hparams["n_experts"]:
            vals, idx, _, _ = self._select(xc, expert, None, False)
            return Codes(vals.relu() * p[:, None], idx)
        rows, local = self.held_rows(expert)
        vals, idx, _, _ = self._select(xc[rows], local, None, False)
        values = xc.new_zeros(xc.shape[0], self.hparams["k"]).index_copy_(0, rows, vals.relu() * p[rows, None])
        indices = idx.new_zeros(xc.shape[0], self.hparams["k"]).index_copy_(0, rows, idx)
        return Codes(values, indices)
