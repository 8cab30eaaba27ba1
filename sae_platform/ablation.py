"""Sparsity of downstream effects: how many logits a latent moves when it is ablated.

Gao et al. 2024 ("Scaling and evaluating sparse autoencoders", section 4.5): at a token, ablate
one active latent from the SAE's reconstruction and compare the logits before and after, at that
token and the ``T - 1`` tokens after it. At each affected token subtract the median logit change
(a constant shift changes no probability), concatenate the ``T`` vectors of ``V`` changes and
measure (L1/L2)², the "effective number" of logits affected, divided by ``V·T``: a fraction in
[1/(V·T), 1], smaller = sparser effects. One logit moving alone gives the minimum 1/(V·T).

Here the base is the model with the value at the SAE's own hook point (``hook_point``, any of
``sae_platform.hooks``' names) at the chosen token replaced by the SAE reconstruction (other
positions clean), spliced with ``hooks.splice_hooks``; a transcoder encodes its input hook point
(``input_hook_point``) and its reconstruction replaces ``hook_point`` (the MLP's output). The
ablated run replaces it with the reconstruction decoded without the latent (``a_f · W_dec[f]``
less, in the raw units of what the SAE writes). Every ablation of one token runs in one forward
batch (row 0: the base, row i: latent i ablated), cut at position ``p + T``. Runs on the model's
and SAE's devices.
"""

import math

import numpy as np
import torch

from sae_platform.errors import PlatformError
from sae_platform.hooks import sae_hook_points, splice_hooks
from sae_platform.model import HookedModel
from sae_platform.sae import Codes


def ablation_sparsity(delta: torch.Tensor | np.ndarray) -> float:
    """(L1/L2)² / (V·T) of a logit-change block ``delta`` [T, V] (or [V]), after subtracting each
    token's median change. NaN when nothing changes (every token's change is constant)."""
    d = torch.as_tensor(delta, dtype=torch.float64)
    if d.ndim == 1:
        d = d[None]
    if d.ndim != 2 or d.shape[1] < 2:
        raise PlatformError(f"a logit change is [T, vocab] with vocab >= 2, got shape {tuple(d.shape)}",
                            "pass the logit differences of the affected tokens")
    d = d - d.quantile(0.5, dim=1, keepdim=True)  # the midpoint median, for even V too
    l2 = float(d.norm())
    if l2 == 0:
        return float("nan")
    l1 = float(d.abs().sum())
    return (l1 / l2) ** 2 / d.numel()


@torch.inference_mode()
def ablation_sparsities(hooked: HookedModel, sae, tokens: np.ndarray, *, hook_point: str,
                        input_hook_point: str | None = None, row_mask: np.ndarray, n_tokens: int, horizon: int = 4,
                        max_latents: int = 32, seed: int = 0, use_cache: bool = True) -> dict:
    """Ablation sparsity of the active latents at ``n_tokens`` random held-out tokens.

    ``tokens``: [n_contexts, ctx_len] held-out contexts; ``row_mask``: bool, same shape, the tokens
    that would have been training rows (``training_rows.training_rows``, e.g. the
    ``metrics.HeldoutCodes.mask`` of ``tokens``). A draw picks a position uniformly among
    1..ctx_len-horizon of a random context and is skipped unless it is a training row; up to ``max_latents``
    of its active latents are ablated one by one, at ``hook_point`` (a transcoder: encoded from
    ``input_hook_point``). With ``use_cache`` the prefix before the token runs once, unspliced,
    and only the ``horizon`` affected positions run per ablation (on copies of its key/value
    cache): the same logits as full forwards (``use_cache=False``), ~p/T times cheaper, since a
    splice at position p changes nothing before it. Returns mean and median over the (token,
    latent) pairs, the pair count, and the minimum possible value 1/(V·T). ModelError naming the
    valid hook points when the model lacks one or the pairing is wrong (``hooks.sae_hook_points``)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < horizon + 1:
        raise PlatformError(f"ablation needs contexts [n, ctx_len > horizon={horizon}], got {tokens.shape}",
                            "pass longer held-out contexts or a shorter horizon")
    row_mask = np.asarray(row_mask, dtype=bool)
    if row_mask.shape != tokens.shape:
        raise PlatformError(f"the training-row mask has shape {row_mask.shape}, the tokens {tokens.shape}",
                            "pass training_rows.training_rows of these tokens (e.g. HeldoutCodes.mask)")
    point, source = sae_hook_points(hooked.model, hook_point, input_hook_point, sae.is_transcoder)
    reads = source.name
    rng = np.random.default_rng(seed)
    sae_device = sae.W_dec.device
    values: list[float] = []
    vocab = None
    state: dict = {"rows": None}

    def replace(value, _source):  # the spliced token's value -> state["rows"] (one per batch row)
        if state["rows"] is None:
            return None
        new = value.clone()
        new[:, state["index"]] = state["rows"].to(device=new.device, dtype=new.dtype)
        return new

    handles = splice_hooks(hooked.model, point, replace)
    enabled = hooked.autocast is not None
    try:
        for _ in range(n_tokens):
            c = int(rng.integers(len(tokens)))
            p = int(rng.integers(1, tokens.shape[1] - horizon + 1))
            if not row_mask[c, p]:  # the SAE never saw it (a start token or an attention sink)
                continue
            ids = torch.from_numpy(tokens[c:c + 1, :p + horizon].astype(np.int64)).to(hooked.device)
            state["rows"] = None
            x = hooked.read(ids[:, :p + 1], (reads,))[reads][0, p].to(sae_device)[None]
            with torch.autocast(sae_device.type, enabled=False):
                codes = sae.encode(x)
                on = torch.nonzero(codes.values[0] > 0)[:max_latents, 0]  # slots of the active latents
                if not len(on):
                    continue
                m = len(on)
                ablated = codes.values.expand(m + 1, -1).clone()  # row 0: every latent; row i: latent i off
                ablated[torch.arange(1, m + 1, device=on.device), on] = 0
                state["rows"] = sae.decode(Codes(ablated, codes.indices.expand(m + 1, -1)), x.expand(m + 1, -1))
            rows = m + 1
            with torch.autocast(hooked.device.type, dtype=hooked.autocast or torch.bfloat16, enabled=enabled):
                if use_cache:  # the prefix before p once (unspliced), then p..p+T per row on a copy of its cache
                    saved, state["rows"] = state["rows"], None
                    cache = hooked.model(input_ids=ids[:, :p], use_cache=True).past_key_values
                    cache.batch_repeat_interleave(rows)
                    state.update(rows=saved, index=0)
                    logits = hooked.model(input_ids=ids[:, p:].expand(rows, -1), past_key_values=cache,
                                          use_cache=True).logits
                else:
                    state["index"] = p
                    logits = hooked.model(input_ids=ids.expand(rows, -1), use_cache=False).logits[:, p:]
            state["rows"] = None
            logits = logits[:, :horizon].double()  # [1 + m, T, V]
            vocab = logits.shape[-1]
            for i in range(m):
                s = ablation_sparsity(logits[i + 1] - logits[0])
                if not math.isnan(s):
                    values.append(s)
    finally:
        for handle in handles:
            handle.remove()
    arr = np.array(values, dtype=float)
    return {"ablation_sparsity": float(arr.mean()) if len(arr) else None,
            "ablation_sparsity_median": float(np.median(arr)) if len(arr) else None,
            "ablation_pairs": len(arr),
            "ablation_sparsity_min_possible": 1.0 / (vocab * horizon) if vocab else None}
