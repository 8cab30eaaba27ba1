"""Sparsity of downstream effects: how many logits a latent moves when it is ablated.

Gao et al. 2024 ("Scaling and evaluating sparse autoencoders", section 4.5): at a token, ablate
one active latent from the SAE's reconstruction and compare the logits before and after, at that
token and the ``T - 1`` tokens after it. At each affected token subtract the median logit change
(a constant shift changes no probability), concatenate the ``T`` vectors of ``V`` changes and
measure (L1/L2)², the "effective number" of logits affected, divided by ``V·T``: a fraction in
[1/(V·T), 1], smaller = sparser effects. One logit moving alone gives the minimum 1/(V·T).

Here the base is the model with the hook layer's output at the chosen token replaced by the SAE
reconstruction (other positions clean); the ablated run subtracts ``a_f · W_dec[f] / input_scale``
from that reconstruction (the latent's contribution in raw residual units). Every ablation of one
token runs in one forward batch (row 0: the base, row i: latent i ablated), cut at position
``p + T``. Runs on the model's and SAE's devices.
"""

import math

import numpy as np
import torch

from sae_platform.errors import PlatformError
from sae_platform.model import HookedModel, find_decoder_layers


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
def ablation_sparsities(hooked: HookedModel, sae, tokens: np.ndarray, n_tokens: int = 8, horizon: int = 4,
                        max_latents: int = 32, seed: int = 0, use_cache: bool = True) -> dict:
    """Ablation sparsity of the active latents at ``n_tokens`` random held-out tokens.

    ``tokens``: [n_contexts, ctx_len] held-out contexts. A token is drawn uniformly among
    positions 1..ctx_len-horizon of a random context (not a start token); up to ``max_latents``
    of its active latents are ablated one by one. With ``use_cache`` the prefix before the token
    runs once and only the ``horizon`` affected positions run per ablation (on copies of its
    key/value cache): the same logits as full forwards (``use_cache=False``), ~p/T times cheaper.
    Returns mean and median over the (token, latent) pairs, the pair count, and the minimum
    possible value 1/(V·T)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < horizon + 1:
        raise PlatformError(f"ablation needs contexts [n, ctx_len > horizon={horizon}], got {tokens.shape}",
                            "pass longer held-out contexts or a shorter horizon")
    rng = np.random.default_rng(seed)
    layer = find_decoder_layers(hooked.model)[hooked.layer]
    sae_device = sae.W_dec.device
    values: list[float] = []
    vocab = None
    state: dict = {}

    def hook(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        new = hidden.clone()
        new[:, state["index"]] = state["rows"].to(device=new.device, dtype=new.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    enabled = hooked.autocast is not None
    for _ in range(n_tokens):
        c = int(rng.integers(len(tokens)))
        p = int(rng.integers(1, tokens.shape[1] - horizon + 1))
        if int(tokens[c, p]) == hooked.start_token_id:
            continue
        ids = torch.from_numpy(tokens[c:c + 1, :p + horizon].astype(np.int64)).to(hooked.device)
        x = hooked.residual(ids)[0, p].to(sae_device)[None]
        with torch.autocast(sae_device.type, enabled=False):
            codes = sae.encode(x)
            recon = sae.decode(codes)[0]
        on = codes.values[0] > 0
        latents, acts = codes.indices[0][on][:max_latents], codes.values[0][on][:max_latents]
        if not len(latents):
            continue
        contrib = acts[:, None] * sae.W_dec[latents] / sae.input_scale  # [m, d_model], raw units
        state["rows"] = torch.cat([recon[None], recon[None] - contrib])  # [1 + m, d_model]
        rows = len(latents) + 1
        with torch.autocast(hooked.device.type, dtype=hooked.autocast or torch.bfloat16, enabled=enabled):
            if use_cache:  # the prefix before p once, then p..p+T for every row on a copy of its cache
                cache = hooked.model(input_ids=ids[:, :p], use_cache=True).past_key_values
                cache.batch_repeat_interleave(rows)
                state["index"] = 0
                handle = layer.register_forward_hook(hook)
                try:
                    logits = hooked.model(input_ids=ids[:, p:].expand(rows, -1), past_key_values=cache,
                                          use_cache=True).logits
                finally:
                    handle.remove()
            else:
                state["index"] = p
                handle = layer.register_forward_hook(hook)
                try:
                    logits = hooked.model(input_ids=ids.expand(rows, -1), use_cache=False).logits[:, p:]
                finally:
                    handle.remove()
        logits = logits[:, :horizon].double()  # [1 + m, T, V]
        vocab = logits.shape[-1]
        for i in range(len(latents)):
            s = ablation_sparsity(logits[i + 1] - logits[0])
            if not math.isnan(s):
                values.append(s)
    arr = np.array(values, dtype=float)
    return {"ablation_sparsity": float(arr.mean()) if len(arr) else None,
            "ablation_sparsity_median": float(np.median(arr)) if len(arr) else None,
            "ablation_pairs": len(arr),
            "ablation_sparsity_min_possible": 1.0 / (vocab * horizon) if vocab else None}
