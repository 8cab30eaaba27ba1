"""Feature metrics of one SAE beyond reconstruction (Gao et al. 2024, section 4), on held-out text:

- N2G explanations (``sae_platform.explain``): built on the first half of the held-out contexts,
  scored by precision and recall on the second half; mean over the features that fire there;
- ablation sparsity (``sae_platform.ablation``);
- probe loss on hypothesized token properties (``sae_platform.probes``), for the SAE's latents
  and, as a baseline, for the neurons the SAE reads (the channels of its input hook point).

``heldout_codes`` encodes held-out contexts once: the value at the SAE's own hook point
(``hook_point``; a transcoder's input ``input_hook_point``, e.g. ``blocks.L.ln2.hook_normalized``),
then the SAE's sparse codes, on every position that would have been a training row (by the rule
caching recorded, ``training_rows``). Every function here takes the hook point(s) and that rule
explicitly: where an SAE reads and which tokens it saw are facts of its training data
(``activations.sae_hook_entry``, ``activations.activation_row_rule``), not of the model. ``feature_metrics``
returns flat numbers for ``sae_eval``'s report plus a per-property table.
"""

import io
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from sae_platform import explain as n2g
from sae_platform.ablation import ablation_sparsities
from sae_platform.activations import activation_row_rule, sae_hook_entry
from sae_platform.catalog import (
    checkpoint_pin,
    checkpoint_version,
    contexts_name,
    eval_name,
    explanations_name,
    is_current,
    trained_on,
)
from sae_platform.errors import PlatformError
from sae_platform.hooks import sae_hook_points
from sae_platform.model import HookedModel
from sae_platform.probes import (
    PROPERTIES,
    base_rate_entropy,
    best_probe_losses,
    best_probe_losses_dense,
    token_properties,
)
from sae_platform.similarity import cooccurring, nearest_by_decoder
from sae_platform.tokens import token_display_strings
from sae_platform.training_rows import RowRule, training_rows

MASKED = -2  # token id of positions without codes in an N2G stream: no pattern matches or crosses them


@dataclass
class HeldoutCodes:
    """Sparse SAE codes of held-out contexts [n_contexts, ctx_len] (flat position = c * ctx_len + p)."""

    tokens: np.ndarray     # [n_contexts, ctx_len] int
    mask: np.ndarray       # [n_contexts, ctx_len] bool: a training-row position (has codes)
    positions: np.ndarray  # [nnz] flat positions of the non-zero codes
    features: np.ndarray   # [nnz] latent ids
    values: np.ndarray     # [nnz] activations (> 0)
    neurons: np.ndarray | None = None  # [n_masked_rows, d_model] float32: what the SAE reads (rows where mask)


@torch.inference_mode()
def heldout_codes(hooked: HookedModel, sae, tokens: np.ndarray, *, hook_point: str,
                  input_hook_point: str | None = None, rule: RowRule, batch_size: int = 8,
                  keep_neurons: bool = False) -> HeldoutCodes:
    """The SAE's codes of held-out ``tokens`` [n_contexts, ctx_len]: the value at ``hook_point``
    (a transcoder: at ``input_hook_point``, its input) from forward passes that stop there, encoded
    by ``sae.encode`` on the tokens that would have been training rows (``training_rows`` under
    ``rule``; read a median group of ``rule.sink_median_contexts`` contexts at a time, in forward
    batches of at most ``batch_size``). ``keep_neurons`` also keeps those values (the probe
    baseline's neurons).
    ModelError naming the valid hook points when the model lacks one or the pairing is wrong
    (``hooks.sae_hook_points``); PlatformError when the SAE's width differs from the value's."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise PlatformError(f"held-out tokens must be integer [n_contexts, ctx_len], got {tokens.dtype} "
                            f"{tokens.shape}", "pass packed held-out contexts")
    reads = sae_hook_points(hooked.model, hook_point, input_hook_point, sae.is_transcoder)[1].name
    mask = np.zeros(tokens.shape, dtype=bool)
    sae_device = sae.W_dec.device
    pos, feat, val, neurons = [], [], [], []
    ctx_len = tokens.shape[1]
    group = rule.contexts_at_once(batch_size)
    for start in range(0, len(tokens), group):  # one median group of the sink rule at a time
        stop = min(start + group, len(tokens))
        read = {first: hooked.read(torch.from_numpy(tokens[first:min(first + batch_size, stop)].astype(np.int64)),
                                   (reads,))[reads] for first in range(start, stop, batch_size)}
        norms = np.concatenate([x.float().norm(dim=-1).cpu().numpy() for x in read.values()])
        mask[start:stop] = training_rows(tokens[start:stop], rule, norms)
        for first, x in read.items():
            m = torch.from_numpy(mask[first:first + len(x)]).to(x.device)
            rows = x[m].to(sae_device)
            flat = (torch.nonzero(m.cpu()) * torch.tensor([ctx_len, 1])).sum(1) + first * ctx_len
            if keep_neurons:
                neurons.append(rows.cpu().numpy())
            with torch.autocast(sae_device.type, enabled=False):
                codes = sae.encode(rows)
            on = (codes.values > 0).cpu()
            r = torch.arange(len(rows))[:, None].expand_as(on)[on]
            pos.append(flat[r].numpy())
            feat.append(codes.indices.cpu()[on].numpy())
            val.append(codes.values.cpu()[on].float().numpy())
    def cat(parts, dt):
        return np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt)

    return HeldoutCodes(tokens, mask, cat(pos, np.int64), cat(feat, np.int64), cat(val, np.float32),
                        np.concatenate(neurons) if keep_neurons and neurons else None)


HELDOUT_CODES_FILE = "heldout_codes.npz"  # beside sae_eval's report: the codes its metrics were measured on
_CODE_ARRAYS = ("tokens", "mask", "positions", "features", "values")


def heldout_codes_bytes(codes: HeldoutCodes) -> bytes:
    """``codes`` (without the neurons) as an .npz of plain arrays: sae_eval stores them beside its
    report (whose commit pins the checkpoint they were encoded with: ``catalog.checkpoint_pin``) so
    that every feature shard's explanations score on the same codes without loading the base model."""
    buffer = io.BytesIO()
    np.savez(buffer, **{k: getattr(codes, k) for k in _CODE_ARRAYS})
    return buffer.getvalue()


def read_heldout_codes(store, sae_name: str) -> HeldoutCodes | None:
    """The held-out codes ``sae_name``'s committed evaluation stored, when that evaluation pins the
    current checkpoint (``catalog.is_current``); None when there is none, it has no feature metrics,
    or it describes another checkpoint: the caller then encodes the held-out text itself."""
    pointer = store.pointer(eval_name(sae_name))
    if not is_current(store, sae_name, pointer):
        return None
    try:
        raw = store.fs.cat_file(store.path(eval_name(sae_name), pointer["version"], HELDOUT_CODES_FILE))
    except FileNotFoundError:
        return None
    with np.load(io.BytesIO(raw), allow_pickle=False) as arrays:  # plain arrays only: never unpickles
        return HeldoutCodes(**{k: arrays[k] for k in _CODE_ARRAYS})


def n2g_stream(codes: HeldoutCodes, contexts: slice = slice(None)) -> n2g.TokenStream:
    """The N2G token stream of some held-out contexts (positions without codes are ``MASKED``)."""
    t = np.where(codes.mask[contexts], codes.tokens[contexts], MASKED)
    return n2g.TokenStream.from_contexts(t)


def _examples(ptr, pos, vals, n_top: int = 12, n_spread: int = 12):
    """Example positions per feature: the top activations, then positions spread over the rest
    (the interval examples of the feature tables, in miniature)."""
    def examples_for(f):
        p, v = pos[ptr[f]:ptr[f + 1]], vals[ptr[f]:ptr[f + 1]]
        if not len(p):
            return p
        order = np.argsort(-v, kind="stable")
        top, rest = order[:n_top], order[n_top:]
        if len(rest) > n_spread:
            rest = rest[np.linspace(0, len(rest) - 1, n_spread).astype(int)]
        return p[np.concatenate([top, rest])]
    return examples_for


def n2g_heldout(codes: HeldoutCodes, n_latents: int) -> tuple[dict, list[dict]]:
    """N2G explanations from the first half of the held-out contexts, scored on the second half."""
    n_ctx, ctx_len = codes.tokens.shape
    if n_ctx < 2:
        raise PlatformError(f"N2G needs at least 2 held-out contexts (one to explain on, one to score on), got "
                            f"{n_ctx}", "raise metric_contexts or add held-out text")
    half = n_ctx // 2
    cut = half * ctx_len
    first = codes.positions < cut
    e_stream, s_stream = n2g_stream(codes, slice(0, half)), n2g_stream(codes, slice(half, n_ctx))
    e = n2g.firing_by_feature(codes.positions[first], codes.features[first], n_latents, codes.values[first])
    s = n2g.firing_by_feature(codes.positions[~first] - cut, codes.features[~first], n_latents)
    features = np.flatnonzero(np.diff(e[0]) > 0)
    rows = n2g.explain_and_score(e_stream, e, _examples(*e), s_stream, s, features)
    return n2g.summarize(rows), rows


def probe_metrics(codes: HeldoutCodes, tokenizer, n_latents: int) -> tuple[dict, list[dict]]:
    """Best 1-D probe loss per property for the SAE's latents and for the neurons it reads (the
    channels of its input hook point, ``codes.neurons``)."""
    labels = {k: [] for k in PROPERTIES}
    for row in codes.tokens:
        props = token_properties(token_display_strings(tokenizer, row))
        for k in PROPERTIES:
            labels[k].append(props[k])
    flat_mask = codes.mask.reshape(-1)
    y = np.stack([np.concatenate(labels[k])[flat_mask] for k in PROPERTIES])  # [P, n_rows]
    n_rows = int(flat_mask.sum())
    row_of = np.full(flat_mask.shape, -1, dtype=np.int64)
    row_of[flat_mask] = np.arange(n_rows)
    sae_loss, sae_best = best_probe_losses(row_of[codes.positions], codes.features, codes.values, n_rows, n_latents, y)
    neuron_loss, neuron_best = best_probe_losses_dense(codes.neurons, y)
    entropy = base_rate_entropy(y)
    table = [{"property": k, "positives": int(y[i].sum()), "tokens": n_rows, "entropy": float(entropy[i]),
              "sae_loss": float(sae_loss[i]), "sae_best_latent": int(sae_best[i]),
              "neuron_loss": float(neuron_loss[i]), "best_neuron": int(neuron_best[i])}
             for i, k in enumerate(PROPERTIES)]
    usable = [t for t in table if t["positives"] >= 5]
    summary = {"probe_loss": float(np.mean([t["sae_loss"] for t in usable])) if usable else None,
               "probe_loss_neurons": float(np.mean([t["neuron_loss"] for t in usable])) if usable else None,
               "probe_loss_base_rate": float(np.mean([t["entropy"] for t in usable])) if usable else None,
               "probe_properties": len(usable)}
    return summary, table


def feature_metrics(hooked: HookedModel, sae, tokens: np.ndarray, *, hook_point: str,
                    input_hook_point: str | None = None, rule: RowRule, ablation_tokens: int,
                    log=None) -> tuple[dict, dict]:
    """N2G precision/recall, ablation sparsity and probe loss of ``sae`` on held-out ``tokens``
    [n_contexts, ctx_len], read (and, for the ablations, spliced) at the SAE's own ``hook_point``
    (a transcoder reads ``input_hook_point`` and replaces ``hook_point``), all on the tokens that
    would have been training rows under ``rule`` (the held-out codes' mask). Returns (flat numbers
    for the report, details: per-property probe table, per-feature N2G rows and the held-out codes)."""
    points = {"hook_point": hook_point, "input_hook_point": input_hook_point}
    codes = heldout_codes(hooked, sae, tokens, **points, rule=rule, keep_neurons=True)
    n2g_summary, n2g_rows = n2g_heldout(codes, sae.n_latents)
    if log:
        log(f"N2G: precision {n2g_summary['n2g_precision']}, recall {n2g_summary['n2g_recall']} over "
            f"{n2g_summary['n2g_features_scored']} features")
    probe_summary, probe_table = probe_metrics(codes, hooked.tokenizer, sae.n_latents)
    ablation = (ablation_sparsities(hooked, sae, tokens, **points, row_mask=codes.mask, n_tokens=ablation_tokens)
                if ablation_tokens else {})
    return {**n2g_summary, **ablation, **probe_summary}, {"probes": probe_table, "n2g": n2g_rows, "codes": codes}


# -- per feature shard: explanations from the feature tables, related features -------------------

EXPLANATIONS_FILE = "explanations.parquet"


def sae_heldout_codes(hooked: HookedModel, sae, store, sae_name: str, tokens: np.ndarray) -> HeldoutCodes:
    """:func:`heldout_codes` of SAE ``sae_name`` on ``tokens``, read at its own hook point
    (``activations.sae_hook_entry``), on the tokens that would have been its training rows
    (``activations.activation_row_rule`` of the store it was trained on)."""
    entry = sae_hook_entry(store, sae_name)
    rule = activation_row_rule(store, trained_on(store, sae_name), hooked.start_token_id)
    return heldout_codes(hooked, sae, tokens, hook_point=entry.hook_name, input_hook_point=entry.hook_name_in,
                         rule=rule)


def explain_shard(store, sae_name: str, sae, tokenizer, codes: HeldoutCodes, shard_index: int,
                  start: int, stop: int, windows, neighbors: int = 10, cooccurring_k: int = 5) -> tuple[dict, object]:
    """N2G explanations of latents ``start..stop`` from their context windows (``windows``, the
    shard's ``feature_contexts``), scored on the held-out ``codes`` (:func:`sae_heldout_codes`, or
    the ones sae_eval stored: :func:`read_heldout_codes`); plus per latent the ``neighbors`` nearest
    latents by decoder cosine and the ``cooccurring_k`` latents firing with it most often on the
    held-out text. Commits ``explanations_name(run, shard_index)`` (pinned to the checkpoint
    version) and returns (summary: n2g_* figures of ``explain.summarize``, the frame)."""
    stream = n2g_stream(codes)
    firing = n2g.firing_by_feature(codes.positions, codes.features, sae.n_latents)

    @cache
    def token_str(t: int) -> str:
        return token_display_strings(tokenizer, [t])[0]

    rows = n2g.explain_windows(windows, stream, firing, range(start, stop), token_str)
    idx, cos = nearest_by_decoder(sae.W_dec.detach(), start, stop, k=neighbors)
    co = cooccurring(codes.positions, codes.features, range(start, stop), k=cooccurring_k)
    for i, row in enumerate(rows):
        keep = idx[i] >= 0
        row.update(neighbors=idx[i][keep].tolist(), neighbor_cosines=cos[i][keep].tolist(),
                   cooccurring=[f for f, _ in co[row["feature"]]],
                   cooccurring_shares=[share for _, share in co[row["feature"]]])
    frame = n2g.explanations_frame(rows)
    pin = {**checkpoint_pin(checkpoint_version(store, sae_name)), "contexts": _contexts_version(store, sae_name,
                                                                                                 shard_index)}
    with store.writing(explanations_name(sae_name, shard_index), **pin) as version:
        store.write_parquet(f"{version}/{EXPLANATIONS_FILE}", frame)
    return n2g.summarize(rows), frame


def read_explanations(store, sae_name: str, shard_index: int):
    """The committed explanations of one feature shard, or None when they were never built."""
    path = store.resolve(explanations_name(sae_name, shard_index))
    return None if path is None else store.read_parquet(f"{path}/{EXPLANATIONS_FILE}")


def explanations_current(store, sae_name: str, shard_index: int) -> bool:
    """Whether shard ``shard_index``'s explanations describe SAE ``sae_name``'s current checkpoint and
    the shard's current context windows (which a kept SAE's refresh rebuilds with new batches)."""
    pointer = store.pointer(explanations_name(sae_name, shard_index))
    return is_current(store, sae_name, pointer) and pointer.get("contexts") == _contexts_version(store, sae_name,
                                                                                                 shard_index)


def _contexts_version(store, sae_name: str, shard_index: int) -> str | None:
    """The committed version of the shard's context windows the explanations are written from."""
    return (store.pointer(contexts_name(sae_name, shard_index)) or {}).get("version")
