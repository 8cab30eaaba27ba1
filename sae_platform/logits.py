"""Logit effects of SAE features: the unembedding matrix with the final norm folded in, each
feature's top and bottom tokens by ``W_dec[f] @ W_U^T``, and what that score means at the SAE's
hook point. Written per feature shard by pass 2 (the ``feature_topk`` asset).

``logit_effects``: ``W_dec[f] @ W_U^T``, the direct effect of the feature's decoder direction on
the logits, skipping the layers above (as in Anthropic's browser, SAEDashboard and Neuronpedia).
The SAE works on inputs multiplied by the scalar ``input_scale``, so in raw residual units the
feature writes ``a * W_dec[f] / input_scale``: that divides all scores of a feature by the same
positive constant and changes no ranking, so scores are reported per unit of the unit-norm
decoder direction. ``unembedding_matrix`` folds the final norm's gain into ``W_U`` by default
(TransformerLens' ``fold_ln``): the norm's 1/rms is a positive scalar common to all tokens, its
per-channel gain is not.

What the score means depends on the SAE's hook point (``logit_effect_meaning``); it is the
standard direct-logit view wherever the decoder writes into the residual stream's basis:

* ``hook_resid_pre`` / ``hook_resid_mid`` / ``hook_resid_post``: the decoder direction *is* a
  residual-stream direction; the score is its direct path to the logits, bypassing every layer
  after the hook point (their attention and MLPs may change it).
* ``hook_attn_out`` / ``hook_mlp_out``: the block adds this output to the residual stream
  unchanged, so the direction is again a residual direction: the score is the direct effect of
  what the attention (MLP) writes, bypassing the later layers.
* a transcoder (``ln2.hook_normalized -> hook_mlp_out``): it decodes into the MLP's output, so
  the same holds for its decoder (``W_dec`` [n_latents, d_out]); its encoder reads the MLP's
  normalized input and plays no part in the score.
* ``ln2.hook_normalized`` as an SAE's own hook point: the normalized MLP input is not in the
  residual stream's basis (divided by the rms, not yet multiplied by the norm's gain); the score
  is computed the same way but is only a rough guide.
"""

import numpy as np
import polars as pl
import torch

from sae_platform.errors import ModelError, PlatformError
from sae_platform.hooks import final_norm_fold
from sae_platform.model import HookedModel
from sae_platform.sae import SparseAutoencoder
from sae_platform.tables import (
    BOTTOM_SCORES,
    BOTTOM_TOKEN_IDS,
    BOTTOM_TOKEN_STRS,
    FEATURE,
    LOGIT_SCHEMA,
    TOP_SCORES,
    TOP_TOKEN_IDS,
    TOP_TOKEN_STRS,
)
from sae_platform.tokens import token_display_strings

LOGIT_ELEMENTS = 1 << 24  # elements of one [features, vocab] score block


def logit_effect_meaning(hook_name: str | None, hook_name_in: str | None = None) -> str:
    """One line on what ``W_dec @ W_U^T`` means for an SAE at ``hook_name`` (a transcoder: also
    ``hook_name_in``), as the module docstring explains."""
    name = hook_name or ""
    if hook_name_in:
        return (f"direct effect on the logits of what the transcoder writes into {name} (added to the residual "
                "stream), bypassing the later layers")
    if name.endswith(("hook_attn_out", "hook_mlp_out")):
        return (f"direct effect on the logits of what {name} adds to the residual stream, bypassing the later "
                "layers")
    if "hook_resid_" in name:
        return f"direct path to the logits of the residual-stream direction at {name}, bypassing the later layers"
    return (f"{name or 'this hook point'} is not a residual-stream basis: W_dec . W_U is only a rough guide "
            "there")


def unembedding_matrix(model, fold_norm: bool = True) -> torch.Tensor:
    """W_U as [vocab, d_model] (a detached tensor) for a Hugging Face causal LM or a HookedModel.

    Tied embeddings: ``get_output_embeddings()`` already returns the shared matrix; a model
    without an output head but with ``tie_word_embeddings`` uses the input embeddings.
    ``fold_norm`` multiplies in the final norm's per-channel gain (Llama RMSNorm weight, Gemma's
    1 + weight, LayerNorm weight) and, for LayerNorm, its centring (each row of W_U minus its
    mean, so d @ W_U^T sees d - mean(d)); the norm's bias and 1/rms do not depend on the token
    and are left out (``sae_platform.hooks.final_norm_fold``)."""
    lm = model.model if isinstance(model, HookedModel) else model
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is None and getattr(getattr(lm, "config", None), "tie_word_embeddings", False):
        weight = lm.get_input_embeddings().weight
    if weight is None:
        raise ModelError(f"cannot find the unembedding matrix of {type(lm).__name__}",
                         "use a causal LM with an output embedding (lm_head) or tied embeddings")
    weight = weight.detach()
    if fold_norm:
        gain, centres = final_norm_fold(lm)
        if gain is not None and gain.shape == weight.shape[1:]:
            weight = weight * gain.to(weight.dtype)[None, :]
        if centres:  # LayerNorm subtracts the mean of its input: d -> d - mean(d), folded into W_U
            weight = weight - weight.mean(1, keepdim=True)
    return weight


def logit_effects(sae: SparseAutoencoder, unembedding: torch.Tensor, tokenizer, start: int, stop: int,
                  top: int = 10) -> pl.DataFrame:
    """Per feature in [start, stop) of ``sae``: :func:`decoder_logit_effects` of its decoder rows
    ``W_dec[start:stop]``. PlatformError for a range outside [0, n_latents)."""
    if not 0 <= start <= stop <= sae.n_latents:
        raise PlatformError(f"feature range [{start}, {stop}) is outside [0, {sae.n_latents})",
                            "pass 0 <= start <= stop <= n_latents")
    return decoder_logit_effects(sae.W_dec[start:stop], unembedding, tokenizer, start, top)


@torch.no_grad()
def decoder_logit_effects(rows: torch.Tensor, unembedding: torch.Tensor, tokenizer, start: int,
                          top: int = 10) -> pl.DataFrame:
    """Per feature ``start + i`` of the decoder rows ``rows`` ([n_features, d_model], e.g.
    ``sharded_checkpoint.decoder_rows`` of one feature shard: the SAE itself is not needed): the
    ``top`` tokens with the largest and the smallest ``rows[i] @ W_U^T`` (schema
    ``LOGIT_SCHEMA``; top descending, bottom ascending).

    Scores are computed in feature chunks of at most LOGIT_ELEMENTS / vocab rows on the rows'
    device and in their dtype. Rows of W_U past the tokenizer's vocabulary (padding) are left out.
    What the scores mean at each hook point: the module docstring (``logit_effect_meaning``). No
    rows (a feature shard with no latent, ``features.feature_shards``) give an empty frame.
    ModelError when W_U's width is not the rows' d_model; PlatformError for top < 1."""
    width = int(rows.shape[1])  # d_model; a transcoder writes d_out
    if unembedding.ndim != 2 or unembedding.shape[1] != width:
        raise ModelError(f"the unembedding has shape {tuple(unembedding.shape)} but the SAE writes d_model "
                         f"{width}", "pass W_U [vocab, d_model] of the model the SAE was trained on")
    if top < 1:
        raise PlatformError(f"top must be >= 1, got {top}", "ask for e.g. top=10 tokens")
    vocab = min(int(unembedding.shape[0]), len(tokenizer))
    w_u = unembedding[:vocab].to(device=rows.device, dtype=rows.dtype)
    top = min(top, vocab)
    n = int(rows.shape[0])
    if n == 0:
        return pl.DataFrame(schema=LOGIT_SCHEMA)
    chunk = max(1, LOGIT_ELEMENTS // vocab)
    parts = {k: [] for k in ("tv", "ti", "bv", "bi")}
    for s in range(0, n, chunk):
        scores = rows[s:min(s + chunk, n)] @ w_u.T
        tv, ti = scores.topk(top, dim=1)
        bv, bi = scores.topk(top, dim=1, largest=False)
        for k, t in zip(("tv", "ti", "bv", "bi"), (tv, ti, bv, bi), strict=True):
            parts[k].append(t.cpu())
    tv, ti, bv, bi = (torch.cat(parts[k]).numpy() for k in ("tv", "ti", "bv", "bi"))
    uniq, inv = np.unique(np.concatenate([ti.ravel(), bi.ravel()]), return_inverse=True)
    names = np.array(token_display_strings(tokenizer, uniq), dtype=object)[inv]
    top_names, bottom_names = names[: ti.size].reshape(ti.shape), names[ti.size:].reshape(bi.shape)
    return pl.DataFrame({
        FEATURE: np.arange(start, start + n, dtype=np.int64),
        TOP_TOKEN_IDS: ti.astype(np.int64).tolist(), TOP_TOKEN_STRS: top_names.tolist(),
        TOP_SCORES: tv.astype(np.float32).tolist(),
        BOTTOM_TOKEN_IDS: bi.astype(np.int64).tolist(), BOTTOM_TOKEN_STRS: bottom_names.tolist(),
        BOTTOM_SCORES: bv.astype(np.float32).tolist(),
    }).cast(LOGIT_SCHEMA)
