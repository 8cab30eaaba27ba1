"""SAE evaluation: reconstruction metrics on held-out activations, and downstream loss when the
reconstruction is spliced back into the model.

Definitions (docs/design.md, "Training SAEs"; Gao et al. 2024):

- ``nmse``: per batch, MSE / MSE of predicting that batch's mean (``sae.normalized_mse``), then
  the unweighted mean over batches. Depends a little on the batch size; kept because it is what
  the trainer logs, so training curves and evaluation agree.
- ``fvu``: fraction of variance unexplained over the whole held-out set: total squared error /
  total squared deviation from the *dataset* mean. The mean and the deviations are accumulated
  streaming (Chan et al.'s pairwise merge of per-batch means and sums of squares, in float64),
  so the result equals the one-shot computation without holding the data.
- ``l0``: mean number of active latents per token.
- ``density``: per latent, the fraction of held-out tokens it fires on; ``dead_fraction``: the
  share of latents that never fire on the held-out set.
- ``loss_recovered`` = 1 - (CE_sae - CE_clean) / (CE_zero - CE_clean): 1 means splicing the
  reconstruction costs nothing, 0 means it is as bad as zeroing the layer output.

Codes come from ``sae.encode`` and reconstructions from ``sae.decode``: the inference path of
every variant (BatchTopK's global threshold, not its batch-dependent training rule), whatever
mode the module is in. Everything runs on the SAE's / model's device.
"""

import contextlib
import io
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sae_platform.activations import activation_attrs, activation_hook_entry, activation_row_rule
from sae_platform.catalog import (
    EVAL_PROBES,
    EVAL_REPORT,
    checkpoint_name,
    checkpoint_pin,
    checkpoint_version,
    eval_name,
    shuffled_name,
)
from sae_platform.core_metrics import (
    ShapeSums,
    consistent_activation,
    frequency_figures,
    geometry_figures,
    latent_geometry,
    meta_sae_decoder_fve,
)
from sae_platform.corpus import pack_contexts
from sae_platform.errors import PlatformError, SourceError, StorageError
from sae_platform.export import folded_weights, run_saelens_cfg
from sae_platform.ground_truth import score_sae
from sae_platform.heldout import HeldoutRows, checkpoint_heldout, heldout_blocks
from sae_platform.hooks import check_hook_point, splice_hooks
from sae_platform.metrics import HELDOUT_CODES_FILE, feature_metrics, heldout_codes_bytes
from sae_platform.model import HookedModel
from sae_platform.reseeds import bootstrap_ratio_interval
from sae_platform.sae import Codes
from sae_platform.saebench_results import core_eval_result, write_saebench_result
from sae_platform.settings import setting, validate
from sae_platform.sharded_checkpoint import (
    GATHER_LIMIT_ENV,
    SAE,
    gather_limit_bytes,
    is_sharded,
    open_sharded,
    require_gatherable,
)
from sae_platform.sharded_sae import ShardedSAE
from sae_platform.shuffled import iter_shuffled, open_shuffled
from sae_platform.synthetic import heldout_draws, read_truth, synthetic_provenance
from sae_platform.trainer import load_sae
from sae_platform.training_rows import RowRule, training_rows


@dataclass(frozen=True)
class EvalSettings:
    """Settings of the evaluation stage (``resources.evaluation.config``), including the thresholds
    of ``sae_eval``'s asset checks: a demo-scale sanity bar (the demo SAE has FVU 0.16, 6% dead,
    loss recovered 0.995), not a research target."""

    ce_contexts: int = setting(32, "held-out contexts for the downstream CE (0 skips it)", ge=0)
    ctx_len: int = setting(128, "tokens per held-out context", ge=2)
    max_fvu: float = setting(0.3, "check fvu_below: FVU on held-out rows must not exceed this", ge=0)
    max_dead_fraction: float = setting(0.25, "check dead_fraction_below: share of latents that never fire on "
                                             "any cached token must not exceed this", ge=0, le=1)
    min_loss_recovered: float = setting(0.9, "check loss_recovered_above: downstream loss recovered must "
                                             "reach this (skipped when ce_contexts is 0)", le=1)
    metric_contexts: int = setting(64, "held-out contexts (of ctx_len tokens) for the feature metrics: N2G "
                                       "explanations, probe loss, ablation sparsity (0 skips them)", ge=0)
    ablation_tokens: int = setting(8, "held-out tokens at which every active latent is ablated for the "
                                      "ablation sparsity (0 skips it)", ge=0)
    sparse_probing_seed: int = setting(42, "sae_sparse_probing: seed of each task's balanced sample and train/test "
                                           "split (SAEBench's default random_seed)")
    sparse_probing_min_contexts: int = setting(20, "sae_sparse_probing: contexts each class of a task needs, else "
                                                   "the task is skipped with its counts", ge=2)
    sparse_probing_max_contexts: int = setting(5000, "sae_sparse_probing: contexts per class at most (SAEBench's "
                                                     "4,000 train + 1,000 test)", ge=2)
    max_cosine_latents: int = setting(16384, "latents whose largest cosine to every other latent (SAEBench's "
                                             "max encoder/decoder cosine) is measured: all of them up to this many, "
                                             "else a seeded sample of this many (the cost is this x n_latents; "
                                             "0 skips the figures)", ge=0)
    meta_sae_steps: int = setting(300, "Adam steps of the meta-SAE decoder check (a BatchTopK SAE of 0.25x the "
                                       "latents, k 4, on the decoder rows; 0 skips it)", ge=0)

    def __post_init__(self):
        validate(self, "resources.evaluation.config")


# The settings that change what the report holds; the thresholds only change the checks' verdicts.
REPORT_SETTINGS = ("ce_contexts", "ctx_len", "metric_contexts", "ablation_tokens", "meta_sae_steps",
                   "max_cosine_latents")
# The settings that change what sae_sparse_probing computes.
SPARSE_PROBING_SETTINGS = ("sparse_probing_seed", "sparse_probing_min_contexts", "sparse_probing_max_contexts")


def evaluation_inputs(store, sae_name: str, shuffle_name: str, settings: EvalSettings, *,
                      holdout_stamps: dict[str, str], base_model: dict | None) -> dict:
    """Everything an evaluation of ``sae_name`` is computed from, as JSON: the checkpoint version,
    the shuffled store's version (density and dead latents are counted over all of it), the
    held-out text (file key -> size and modification stamp, ``corpus.source_stamp``), the stored
    base model (its version and autocast mode, which change the downstream CE) and the settings of
    ``REPORT_SETTINGS``. Recorded in the evaluation's
    pointer, so an unchanged evaluation is recognised without recomputing it."""
    shuffled = store.pointer(shuffled_name(shuffle_name)) or {}
    return {"checkpoint": checkpoint_version(store, sae_name), "shuffled": shuffled.get("version"),
            "holdout": dict(sorted(holdout_stamps.items())), "base_model": base_model,
            "settings": {key: getattr(settings, key) for key in REPORT_SETTINGS}}


def evaluation_current(store, sae_name: str, inputs: dict) -> bool:
    """Whether the committed evaluation of ``sae_name`` was computed from exactly ``inputs``
    (an evaluation committed before inputs were recorded never is)."""
    pointer = store.pointer(eval_name(sae_name))
    return pointer is not None and pointer.get("inputs") == json.loads(json.dumps(inputs))


def _sae_device(sae) -> torch.device:
    return sae.device if isinstance(sae, ShardedSAE) else sae.W_dec.device


def _reconstruct(sae, rows: torch.Tensor) -> tuple[torch.Tensor, Codes]:
    """(reconstruction in raw units, codes) by the inference path of a whole SAE."""
    codes = sae.encode(rows)
    return sae.decode(codes, rows), codes


def _reconstructions(sae, rows: Iterable[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor, Codes]]:
    """(rows, reconstruction in raw units, codes) of each batch by the inference path; a
    ShardedSAE's shard by shard."""
    if isinstance(sae, ShardedSAE):
        yield from sae.reconstructions(rows)
        return
    for x in rows:
        yield x, *_reconstruct(sae, x)


def _encoded(sae, rows: Iterable[torch.Tensor]) -> Iterator[Codes]:
    """Codes of each batch by the inference path; a ShardedSAE's shard by shard."""
    return sae.codes(rows) if isinstance(sae, ShardedSAE) else (sae.encode(x) for x in rows)


@torch.no_grad()
def reconstruction_metrics(sae, batches: Iterable[torch.Tensor | np.ndarray], device=None) -> dict:
    """Streaming reconstruction and sparsity metrics over held-out activation batches.

    ``batches``: arrays/tensors [rows, d_model] (or [..., d_model]) in raw units, any float dtype.
    ``sae``: a model, or a ``sharded_sae.ShardedSAE`` (evaluated shard by shard, never whole).
    ``device``: where to compute; defaults to the SAE's device (the SAE must live there).
    Returns python floats/ints plus ``density``, a float64 numpy array [n_latents]; the figures
    of SAEBench's core eval (explained variance about the mean and about zero, cosine, L2 norms
    and ratio, relative reconstruction bias, L1) are ``core_metrics.ShapeSums``'; and
    ``per_row``: float64 arrays [n_rows] of each row's squared error, squared deviation from its
    batch's mean and active latents, the units ``reconstruction_intervals`` resamples.
    """
    sae_device = _sae_device(sae)
    if device is not None and torch.empty(0, device=device).device != sae_device:
        raise PlatformError(f"the SAE is on {sae_device} but evaluation was asked to run on {device}",
                            f"move the SAE first (sae.to('{device}')), or leave device unset")
    n_latents = sae.n_latents
    # A transcoder's rows are [input | target] pairs: it is scored on the target (d_out wide).
    d_in, d_out = sae.d_model, getattr(sae, "d_out", None)
    width, d_model = (d_in, d_in) if d_out is None else (d_in + d_out, d_out)
    # Running sums stay on the device (float64): one host sync at the end, not per batch.
    zero = lambda: torch.zeros((), dtype=torch.float64, device=sae_device)  # noqa: E731
    counts = torch.zeros(n_latents, dtype=torch.long, device=sae_device)
    mean = torch.zeros(d_model, dtype=torch.float64, device=sae_device)
    m2, sse, active, nmse_sum = zero(), zero(), zero(), zero()
    shape = ShapeSums(sae_device)
    n = nmse_batches = 0
    per_row: dict[str, list[torch.Tensor]] = {"sq_error": [], "sq_deviation": [], "active": []}
    for x, recon, codes in _reconstructions(sae, _checked_rows(batches, width, d_in, d_out, sae_device)):
        b = x.shape[0]
        xd = (x if d_out is None else x[:, d_in:]).double()
        err_rows = (recon.double() - xd).pow(2).sum(1)
        err = err_rows.sum()
        sse += err
        shape.add(xd, recon.double(), codes.values)
        on = codes.values > 0
        active += on.sum()
        counts += torch.bincount(codes.indices[on], minlength=n_latents)
        mean_b = xd.mean(0)
        deviation_rows = (xd - mean_b).pow(2).sum(1)
        m2_b = deviation_rows.sum()
        for key, rows in (("sq_error", err_rows), ("sq_deviation", deviation_rows), ("active", on.sum(1))):
            per_row[key].append(rows.double())
        if b > 1:  # a single row has no spread to normalise by
            nmse_sum += err / m2_b.clamp_min(1e-300)
            nmse_batches += 1
        # Chan et al.: merge (n, mean, M2) with the batch's (b, mean_b, M2_b)
        delta = mean_b - mean
        total = n + b
        m2 += m2_b + delta.pow(2).sum() * (n * b / total)
        mean += delta * (b / total)
        n = total
    if n == 0:
        raise PlatformError("no held-out activations to evaluate on (every batch was empty)",
                            "pass at least one non-empty batch of activations, e.g. a held-out partition")
    counts_np = counts.cpu().numpy()
    density = counts_np / n
    n_dead = int((counts_np == 0).sum())
    sse, m2 = float(sse), float(m2)
    fvu = sse / max(m2, 1e-300)
    return {
        "nmse": float(nmse_sum) / nmse_batches if nmse_batches else float("nan"),
        "fvu": fvu,
        **shape.figures(n, sse, fvu),
        "mse": sse / (n * d_model),
        "l0": float(active) / n,
        "dead_fraction": n_dead / n_latents,
        "n_dead": n_dead,
        "n_tokens": n,
        "n_latents": n_latents,
        "n_batches_nmse": nmse_batches,
        "density": density,
        "per_row": {key: torch.cat(rows).cpu().numpy() for key, rows in per_row.items()},
    }


def _checked_rows(batches, width: int, d_in: int, d_out: int | None, device) -> Iterator[torch.Tensor]:
    """Each non-empty batch as float32 [rows, width] on ``device``; PlatformError for a wrong width
    or a row holding NaN/inf (naming it), before any metric is computed from it."""
    seen = 0
    for batch in batches:
        x = torch.as_tensor(batch).to(device)
        if x.shape[-1] != width:
            raise PlatformError(f"activation batch has width {x.shape[-1]} but the SAE expects d_model {width}"
                                + ("" if d_out is None else f" (paired rows: input {d_in} + target {d_out})"),
                                "evaluate on activations of the layer and model this SAE was trained on")
        x = x.reshape(-1, width).float()
        if x.shape[0] == 0:
            continue
        bad = ~torch.isfinite(x).all(dim=1)
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            raise PlatformError(f"NaN/inf in the evaluation activations: row {seen + first} of the rows evaluated "
                                f"({int(bad.sum())} bad row(s) in its batch); no metric was computed",
                                "evaluate on finite activations: re-cache the partition the row came from")
        seen += x.shape[0]
        yield x


def reconstruction_intervals(per_row: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """Bootstrap intervals (``reseeds.bootstrap_ratio_interval``, 95%) of FVU and L0 over the
    held-out rows (``reconstruction_metrics``' ``per_row``): the error bars of a single seed. The
    rows are tokens drawn by the shuffle from every context, so they are resampled one by one; the
    FVU's denominator takes each row's deviation from its batch mean (4,096 rows), not the global
    one: the difference is below 1/4096 of it. Empty when there are fewer than 2 rows."""
    if len(per_row["sq_error"]) < 2:
        return {}
    ones = np.ones_like(per_row["active"])
    return {"fvu_interval": list(bootstrap_ratio_interval(per_row["sq_error"], per_row["sq_deviation"])),
            "l0_interval": list(bootstrap_ratio_interval(per_row["active"], ones))}


@torch.no_grad()
def firing_counts(sae, batches: Iterable[torch.Tensor | np.ndarray]) -> tuple[np.ndarray, int]:
    """How many tokens each latent fires on (int64 [n_latents]) over ``batches`` [rows, d_model], and
    the number of tokens: the density and dead-latent window of every cached token, not a sample."""
    device = _sae_device(sae)
    counts = torch.zeros(sae.n_latents, dtype=torch.long, device=device)
    width = sae.d_model + (getattr(sae, "d_out", None) or 0)
    rows = [0]

    def counted(batches):
        for batch in batches:
            x = torch.as_tensor(batch).to(device).reshape(-1, width).float()
            rows[0] += x.shape[0]
            yield x

    for codes in _encoded(sae, counted(batches)):
        on = codes.values > 0
        counts += torch.bincount(codes.indices[on], minlength=sae.n_latents)
    return counts.cpu().numpy(), rows[0]


def _replacer(state: dict, sae) -> Callable:
    """replace(value, source) for ``hooks.splice_hooks`` at the SAE's hook point. state["mode"]:
    "clean" (record state["norms"], [batch, seq] float32 norms of what the SAE reads: the value
    itself, or a transcoder's input; change nothing), "sae" (the positions of state["mask"] ->
    the SAE's reconstruction of them; a transcoder's of its input ``source``) or "zero" (-> 0)."""
    sae_device = _sae_device(sae)

    def replace(value: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor | None:
        read = value if source is None else source
        mode = state["mode"]
        if mode == "clean":
            state["norms"] = read.float().norm(dim=-1).cpu().numpy()
            return None
        mask = state["mask"].to(value.device)
        new = value.clone()
        if mode == "zero":
            new[mask] = 0
        elif bool(mask.any()):
            rows = read[mask].to(sae_device, torch.float32)
            # The SAE runs in its own precision, never under the model's autocast.
            with torch.autocast(sae_device.type, enabled=False):
                recon, _ = _reconstruct(sae, rows)
            new[mask] = recon.to(device=new.device, dtype=new.dtype)
        return new

    return replace


def _kl_sum(clean_logp: torch.Tensor, logits: torch.Tensor, rows: int = 1) -> float:
    """Summed KL(clean || spliced) over every position of [batch, seq, vocab]: SAEBench's
    per-token KL of the next-token distributions, float32, ``rows`` contexts at a time (one
    [rows, seq, vocab] temporary, not a second batch-sized one)."""
    total = 0.0
    for start in range(0, logits.shape[0], rows):
        p_logp = clean_logp[start:start + rows]
        q_logp = logits[start:start + rows].float().log_softmax(-1)
        total += float((p_logp.exp() * (p_logp - q_logp)).sum())
    return total


def _ce_sums(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of each context [batch] (float64 on the CPU): targets
    ids[:, 1:] predicted from logits[:, :-1]."""
    pred = logits[:, :-1].float()
    per_token = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return per_token.reshape(ids.shape[0], -1).sum(1).double().cpu()


CE_BATCH_SIZE = 8  # contexts per forward pass of the downstream CE (SAEBench's batch_size_prompts)


@torch.inference_mode()
def downstream_ce(hooked: HookedModel, sae, tokens: np.ndarray, batch_size: int = CE_BATCH_SIZE, *, rule: RowRule,
                  hook_point: str | None = None, input_hook_point: str | None = None) -> dict:
    """Next-token cross-entropy of the full model on ``tokens`` [n_ctx, ctx_len], three ways:
    clean, with the value at the SAE's hook point (``hook_point``, default ``hooked.hook_name``;
    any of ``sae_platform.hooks``' names) replaced by the SAE reconstruction, and with it replaced
    by zeros (zero ablation). A transcoder reads ``input_hook_point`` (e.g.
    ``blocks.L.ln2.hook_normalized``) and replaces ``hook_point`` (``blocks.L.hook_mlp_out``):
    it stands in for the MLP, and zero ablation removes the MLP's output.

    Only positions that would have been training rows are replaced (``training_rows.training_rows``
    under ``rule``, the one caching recorded: ``activations.activation_row_rule``; the sink
    median is taken per group of ``rule.sink_median_contexts`` contexts, each run in forward
    batches of at most ``batch_size``): the SAE never saw the others, and zeroing the sink would
    measure the sink, not the SAE. Every pass replaces the same positions.

    CE is the standard causal-LM loss: the mean over every target position >= 1 (start-token
    targets included, i.e. predicting a document boundary counts), in float32.
    Returns ce_clean, ce_sae, ce_zero, loss_recovered (None when CE_zero == CE_clean; SAEBench's
    CE-loss score), n_tokens (CE targets), n_spliced (replaced positions), n_contexts, and
    ``loss_recovered_interval``: its 95% bootstrap interval over the contexts
    (``reseeds.bootstrap_ratio_interval``; None when loss_recovered is, or for one context); and
    SAEBench's KL figures: kl_div_with_sae / kl_div_with_ablation, the mean over every position
    (all n_contexts * ctx_len) of KL(clean next-token distribution || spliced one), in nats, and
    kl_div_score = (KL_zero - KL_sae) / KL_zero (None when KL_zero is 0).
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 2 or tokens.shape[0] == 0:
        raise PlatformError(f"tokens must be a non-empty [n_contexts, ctx_len >= 2] array, got shape {tokens.shape}",
                            "pass the `tokens` array of an activation partition, or pack contexts first")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise PlatformError(f"tokens must be integer token ids, got dtype {tokens.dtype}",
                            "pass token ids (e.g. the partition's int32 `tokens` array)")
    if sae.d_model != hooked.d_model:
        raise PlatformError(f"the SAE has d_model {sae.d_model} but the model's residual stream has {hooked.d_model}",
                            "evaluate the SAE with the model (and layer) its activations came from")
    if batch_size < 1:
        raise PlatformError(f"batch_size must be >= 1, got {batch_size}", "use e.g. 8")
    point = check_hook_point(hooked.model, hook_point or hooked.hook_name)
    source = check_hook_point(hooked.model, input_hook_point) if input_hook_point else None
    state: dict = {"mode": "clean"}
    handles = splice_hooks(hooked.model, point, _replacer(state, sae), source)
    sums: dict[str, list[torch.Tensor]] = {"clean": [], "sae": [], "zero": []}  # per context
    kl_sums = {"sae": 0.0, "zero": 0.0}
    n_tokens = n_spliced = n_positions = 0
    enabled = hooked.autocast is not None

    def run_pass(mode: str, ids: torch.Tensor, count: bool = True) -> torch.Tensor:
        state["mode"] = mode
        with torch.autocast(hooked.device.type, dtype=hooked.autocast or torch.bfloat16, enabled=enabled):
            logits = hooked.model(input_ids=ids, use_cache=False).logits
        if count:
            sums[mode].append(_ce_sums(logits, ids))
        return logits

    group = rule.contexts_at_once(batch_size)
    try:
        for start in range(0, len(tokens), group):  # one median group of the sink rule at a time
            group_tokens = tokens[start:start + group]
            batches = [torch.from_numpy(group_tokens[first:first + batch_size].astype(np.int64)).to(hooked.device)
                       for first in range(0, len(group_tokens), batch_size)]
            norms, clean = [], None
            for ids in batches:  # clean first: it records the norms that decide the rows
                clean = run_pass("clean", ids)
                norms.append(state["norms"])
            mask = torch.from_numpy(training_rows(group_tokens, rule, np.concatenate(norms)))
            if len(batches) > 1:  # the last batch's logits are not the ones needed next
                clean = None
            for ids, batch_mask in zip(batches, mask.split(batch_size), strict=True):
                # One batch's clean log-probs at a time: a group of several batches runs its clean
                # pass again rather than hold every batch's [batch, seq, vocab] logits.
                clean_logp = (clean if clean is not None else run_pass("clean", ids, count=False)).float() \
                    .log_softmax(-1)
                clean = None
                state["mask"] = batch_mask.to(hooked.device)
                for mode in ("sae", "zero"):
                    kl_sums[mode] += _kl_sum(clean_logp, run_pass(mode, ids))
                del clean_logp
                n_positions += ids.numel()
                n_tokens += ids.shape[0] * (ids.shape[1] - 1)
                n_spliced += int(batch_mask.sum())
    finally:
        for handle in handles:
            handle.remove()
    per_context = {mode: torch.cat(parts).numpy() for mode, parts in sums.items()}
    ce = {mode: float(values.sum()) / n_tokens for mode, values in per_context.items()}
    denom = ce["zero"] - ce["clean"]
    bootstrap = abs(denom) >= 1e-12 and len(tokens) > 1
    kl = {mode: total / n_positions for mode, total in kl_sums.items()}
    return {
        "ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero": ce["zero"],
        "ce_delta": ce["sae"] - ce["clean"],
        "loss_recovered": None if abs(denom) < 1e-12 else 1.0 - (ce["sae"] - ce["clean"]) / denom,
        "kl_div_with_sae": kl["sae"], "kl_div_with_ablation": kl["zero"],
        "kl_div_score": None if kl["zero"] < 1e-12 else (kl["zero"] - kl["sae"]) / kl["zero"],
        "n_tokens": n_tokens, "n_spliced": n_spliced, "n_contexts": int(len(tokens)),
        "loss_recovered_interval": list(bootstrap_ratio_interval(
            per_context["sae"] - per_context["clean"], per_context["zero"] - per_context["clean"],
            complement=True)) if bootstrap else None,
    }


def heldout_activation_batches(store, shuffle_name: str, heldout: HeldoutRows,
                               batch_rows: int = 4096) -> Iterable[np.ndarray]:
    """acts [b, d_model] of the ``heldout`` rows (a checkpoint's: ``heldout.checkpoint_heldout``, which
    stay its held-out rows when ``shuffle_name`` is rebuilt with new batches), in their order, checked
    finite as the trainer checks its batches (an error names the activation batch and row)."""
    shuffled = open_shuffled(store, shuffle_name)

    def checked():
        for first, acts in heldout_blocks(store, shuffled, heldout, batch_rows):
            bad = ~np.isfinite(acts).all(axis=1)
            if bad.any():
                row = heldout.describe(first + int(np.flatnonzero(bad)[0]))
                raise StorageError(
                    f"NaN/inf in the held-out activations of shuffled/{shuffle_name}: {row}, {int(bad.sum())} bad "
                    "row(s) in this batch; no metric was computed",
                    "re-cache that activation batch, then re-run the shuffle, training and evaluation")
            yield acts

    return checked()


def heldout_ce_tokens(sources: list[tuple[str, list[list[int]]]], ctx_len: int, n_contexts: int,
                      start_token_id: int, log: logging.Logger | None = None,
                      setting_name: str = "ce_contexts", what: str = "the downstream CE") -> np.ndarray:
    """Token contexts [n, ctx_len] for the downstream CE from the held-out text, packed like the
    training data. ``sources``: (file, token lists of its documents) per held-out file.

    No context at all is an error naming the files and ``ce_contexts: 0``; fewer contexts than
    ``n_contexts`` is a warning on ``log`` (the CE is then measured on fewer tokens).
    ``setting_name``: the evaluation setting that asked for ``n_contexts`` and ``what`` they are for,
    named in both."""
    token_lists = [t for _, lists in sources for t in lists]
    names = ", ".join(name for name, _ in sources) or "(no file)"
    n_tokens = sum(len(t) for t in token_lists)
    try:
        n = 0 if ctx_len < 2 else None
        contexts = pack_contexts(token_lists, list(range(len(token_lists))), ctx_len, start_token_id,
                                 max_contexts=n_contexts)
        n = int(contexts.tokens.shape[0])
    except SourceError:
        if n is not None:  # ctx_len itself is wrong: pack_contexts' own message says so
            raise
        n = 0
    if n == 0:
        raise SourceError(
            f"the held-out text ({names}) has {n_tokens:,} tokens, too few for one context of {ctx_len} tokens: "
            f"{what} cannot be measured ({setting_name} asks for {n_contexts})",
            f"add held-out text (at least {n_contexts * ctx_len:,} tokens for {n_contexts} contexts) to the holdout "
            f"folder, lower ctx_len, or set {setting_name}: 0 in the evaluation config to skip {what}")
    if n < n_contexts:
        (log or logging.getLogger(__name__)).warning(
            f"the held-out text ({names}) fills only {n} of the {n_contexts} contexts of {ctx_len} tokens that "
            f"{setting_name} asks for: {what} is measured on {n} contexts; add held-out text for all "
            f"{n_contexts}")
    return contexts.tokens


def evaluate_sae(store, shuffle_name: str, sae_name: str, hooked: HookedModel | None, heldout_tokens: np.ndarray | None,
                 device: torch.device, density_over_all_rows: bool = True, metric_tokens: np.ndarray | None = None,
                 *, ablation_tokens: int, meta_sae_steps: int = 0, max_cosine_latents: int | None = None,
                 inputs: dict | None = None,
                 log: Callable[[str], None] | None = None) -> tuple[dict, np.ndarray]:
    """Every figure of the evaluation for checkpoint ``sae_name``; commits ``eval/<sae_name>`` (report + density).

    Reconstruction (nmse, fvu, l0) is measured on the checkpoint's held-out rows (the ones it
    recorded: ``heldout.checkpoint_heldout``; never the last rows of a store rebuilt since, which
    hold rows it trained on; raises StorageError when they cannot be read); the latent density and
    ``dead_fraction`` on every row of the shuffled store (``dead_window_tokens`` of them; the
    held-out-only figure is ``heldout_dead_fraction``), since a latent that fires once in 120k
    tokens is rare, not dead, and 8,192 tokens cannot tell the two apart.

    With ``metric_tokens`` (held-out contexts [n, ctx_len]) the report also holds the feature
    metrics of ``sae_platform.metrics`` (N2G precision/recall, ablation sparsity, probe loss of the
    latents and of the neurons); the per-property probe table is ``probes.json`` beside it, and the
    held-out codes they were measured on ``heldout_codes.npz`` (the feature explanations reuse
    them). The downstream CE and the feature metrics read and splice at the SAE's own hook point
    (``activations.activation_hook_entry`` of its shuffled store), on the tokens that would have
    been its training rows by the rule caching recorded there (``activations.activation_row_rule``;
    ``training_rows.RowRule.from_attrs`` names the fallback for activations cached before it was).

    On synthetic activations (``synthetic.write_partition``) the report also holds the figures
    against the known features (``ground_truth``: ``gt_mcc``, ``gt_f1``, ``gt_absorption``, …),
    measured on fresh rows drawn from the committed truth.
    The report also holds SAEBench's core figures (``core_metrics``: explained variance about the
    mean and about zero, cosine, shrinkage, L1, frequencies, the KL score, the per-latent weight
    figures' means, of every latent or of a seeded ``max_cosine_latents`` of them, None: every one;
    the consistent-activation heuristic) and, with ``meta_sae_steps`` > 0, the
    meta-SAE decoder check (``core_metrics.meta_sae_decoder_fve``); the same figures, per latent
    where SAEBench has them, are ``saebench_core.json`` beside it (``saebench_results``).

    ``inputs`` (:func:`evaluation_inputs`) is recorded in the commit's pointer; ``log`` gets one
    line as each metric starts and ends, with its seconds."""
    checkpoint = checkpoint_version(store, sae_name)  # read before loading: a later commit then mismatches
    timed = _timer(log or logging.getLogger(__name__).info, sae_name)
    view, sae, cfg, whole = _evaluated(store, sae_name, checkpoint, device, timed)
    if cfg["data"]["shuffle"] != shuffle_name:
        raise PlatformError(f"SAE {sae_name!r} was trained on shuffled store {cfg['data']['shuffle']!r}, not "
                            f"{shuffle_name!r}", "evaluate against the store it was trained on")
    if hooked is not None and hooked.d_model != view.d_model:
        raise PlatformError(f"the base model's d_model {hooked.d_model} differs from SAE {sae_name!r}'s "
                            f"{view.d_model}", "configure the base model the activations were cached from")
    with timed(f"reconstruction (nmse, fvu, L0) on {cfg['training']['holdout_rows']:,} held-out rows"):
        heldout = checkpoint_heldout(store, sae_name, checkpoint, cfg, open_shuffled(store, shuffle_name))
        metrics = reconstruction_metrics(view, heldout_activation_batches(store, shuffle_name, heldout), device)
    heldout_density = metrics.pop("density")
    metrics.update(reconstruction_intervals(metrics.pop("per_row")))
    report = {"run": sae_name, "checkpoint_step": cfg["step"], "training_tokens": cfg["tokens"], **metrics,
              "heldout_dead_fraction": metrics["dead_fraction"], "heldout_tokens": metrics["n_tokens"], **whole}
    if density_over_all_rows:  # dead = never fired on any cached token: the window is the whole store
        with timed("latent density over every cached row"):
            counts, n_all = firing_counts(view, (acts for _, acts in iter_shuffled(store, shuffle_name, 4096)))
        density = counts / max(n_all, 1)
        report.update({"dead_fraction": float((counts == 0).mean()), "n_dead": int((counts == 0).sum()),
                       "dead_window_tokens": n_all})
    else:
        density = heldout_density
        report["dead_window_tokens"] = metrics["n_tokens"]
    provenance = synthetic_provenance(activation_attrs(store, shuffle_name))
    if provenance is not None and sae is not None:  # synthetic rows: the true features are known
        truth = read_truth(store, provenance["truth_id"])
        with timed(f"ground truth (MCC, firing F1, shrinkage, absorption) on {truth.settings.heldout_rows:,} "
                   "fresh synthetic rows"):
            report.update(score_sae(sae, truth, heldout_draws(truth)))
    points = {}
    if hooked is not None:  # read and splice where the SAE's rows were read, on the tokens that were rows
        entry = activation_hook_entry(store, shuffle_name)
        rule = activation_row_rule(store, shuffle_name, hooked.start_token_id)
        report["hook_name"] = entry.hook_name
        if entry.hook_name_in:
            report["hook_name_in"] = entry.hook_name_in
        points = {"hook_point": entry.hook_name, "input_hook_point": entry.hook_name_in}
    if hooked is not None and heldout_tokens is not None and sae is not None:
        with timed(f"downstream CE on {len(heldout_tokens)} held-out contexts"):
            ce = downstream_ce(hooked, sae, heldout_tokens, rule=rule, **points)
        report.update({k if k.startswith(("ce_", "loss_recovered", "kl_")) else f"ce_{k}": v for k, v in ce.items()})
    details = None
    if hooked is not None and metric_tokens is not None and sae is not None:
        with timed(f"N2G, probe loss and ablation sparsity on {len(metric_tokens)} held-out contexts"):
            figures, details = feature_metrics(hooked, sae, metric_tokens, ablation_tokens=ablation_tokens,
                                               rule=rule, **points)
        report.update(figures)
    sampled = "" if sae is None or max_cosine_latents is None or sae.n_latents <= max_cosine_latents else \
        f" of a seeded {max_cosine_latents:,} of the {sae.n_latents:,} latents"
    with timed(f"SAEBench's per-latent figures (max cosine to the other latents{sampled}, in blocks)"):
        latents = _latent_figures(sae, density, details, max_cosine_latents)
    report.update({**frequency_figures(density), **geometry_figures(latents)})
    cah = latents.get("consistent_activation_heuristic")
    if cah is not None and np.isfinite(cah).any():
        report["consistent_activation_heuristic"] = float(np.nanmean(cah))
    # a one-latent dictionary (a steering vector) has no structure
    if meta_sae_steps and sae is not None and sae.n_latents > 1:
        with timed(f"meta-SAE on the decoder rows ({meta_sae_steps} steps)"):
            report.update(meta_sae_decoder_fve(sae.W_dec, steps=meta_sae_steps))
    ctx_len = next((t.shape[1] for t in (heldout_tokens, metric_tokens) if t is not None), None)
    saebench_core = core_eval_result(
        report, latents, sae_name=sae_name, sae_cfg=run_saelens_cfg(store, sae_name, sae) if sae is not None else None,
        model_name=str(activation_attrs(store, shuffle_name).get("model", "")), ctx_len=int(ctx_len or 0),
        batch_size=CE_BATCH_SIZE, llm_dtype=str(hooked.autocast or torch.float32).removeprefix("torch.")
        if hooked is not None else "float32")
    pins = {"inputs": inputs} if inputs is not None else {}
    with store.writing(eval_name(sae_name), checkpoint_step=cfg["step"], **checkpoint_pin(checkpoint),
                       **pins) as version:
        store.write_json(f"{version}/{EVAL_REPORT}", report)
        write_saebench_result(store, version, saebench_core)
        if details is not None:
            store.write_json(f"{version}/{EVAL_PROBES}", details["probes"])
            store.fs.pipe_file(f"{version}/{HELDOUT_CODES_FILE}", heldout_codes_bytes(details["codes"]))
        buffer = io.BytesIO()
        np.save(buffer, density)
        store.fs.pipe_file(f"{version}/density.npy", buffer.getvalue())
    return report, density


def _evaluated(store, sae_name: str, version: str | None, device, timed) -> tuple:
    """(what the reconstruction and density figures run on, the whole SAE or None, cfg.json, what
    the report says of sharding) for checkpoint ``version`` of ``sae_name``.

    An unsharded checkpoint: its SAE (``load_sae``) for everything. A latent-sharded one: a
    ``sharded_sae.ShardedSAE`` (shard by shard, never the whole dictionary in memory) for the
    reconstruction and density; the figures that need every latent of a row or of the dictionary
    at once (downstream CE and feature metrics splice the SAE into the model, the weight geometry,
    the meta-SAE, ground truth) from the gathered SAE where it fits this process
    (``sharded_checkpoint.gather_limit_bytes``), else left out of the report, which says so
    (``whole_sae_figures``). A Switch SAE whose shards split an expert (``ShardedSAE`` refuses it) is
    evaluated gathered, or refused naming size and limit."""
    path = store.path(checkpoint_name(sae_name), version) if version is not None else None
    if path is None or not is_sharded(store, path):
        sae, cfg = load_sae(store, sae_name, device, version)
        return sae, sae, cfg, {}
    cfg = store.read_json(f"{path}/cfg.json")
    try:
        view = ShardedSAE(store, sae_name, cfg, version=version, device=device)
    except PlatformError:  # a Switch SAE whose shards split an expert: only whole
        require_gatherable(store, sae_name, f"evaluate its {cfg['sae']['variant']} SAE (evaluated whole)",
                           version=version)
        view = None
    checkpoint = view.checkpoint if view is not None else open_sharded(store, sae_name, version)
    size, limit = checkpoint.whole_bytes(SAE), gather_limit_bytes()
    said = {"latent_shards": checkpoint.layout.n_shards}
    if size <= limit:
        with timed(f"gathering its {checkpoint.layout.n_shards} latent shards ({size:,} bytes) for the figures that "
                   "need the whole SAE"):
            sae, cfg = load_sae(store, sae_name, device, version)
        return view or sae, sae, cfg, {**said, "whole_sae_figures": "gathered"}
    return view, None, cfg, {**said, "whole_sae_figures": (
        f"left out: the whole SAE takes {size:,} bytes, more than the {limit:,} this process may gather "
        f"({GATHER_LIMIT_ENV}); reconstruction, L0 and density were measured shard by shard")}


def _latent_figures(sae, density: np.ndarray, details: dict | None,
                    max_cosine_latents: int | None = None) -> dict[str, np.ndarray]:
    """Per latent [n_latents]: ``density``, the weight figures of ``core_metrics.latent_geometry``,
    the encoder's norm and bias as SAELens holds them (``export.folded_weights``; not for a switch
    SAE) and, given the feature metrics' held-out codes, the consistent-activation heuristic.
    Without the whole SAE (``sae`` None: a sharded one too wide to gather), the density alone."""
    if sae is None:
        return {"density": np.asarray(density, np.float64)}
    latents = {"density": np.asarray(density, np.float64), **latent_geometry(sae, max_latents=max_cosine_latents)}
    try:
        _, _, folded = folded_weights(sae)
        latents.update(encoder_norm=folded["W_enc"].norm(dim=0).numpy(), encoder_bias=folded["b_enc"].numpy())
    except PlatformError:
        pass
    if details is not None:
        codes = details["codes"]
        latents["consistent_activation_heuristic"] = consistent_activation(
            codes.positions // codes.tokens.shape[1], codes.features, sae.n_latents)
    return latents


def _timer(log: Callable[[str], None], sae_name: str):
    """A context manager factory: ``with timed("what"):`` logs the start and the seconds it took."""
    @contextlib.contextmanager
    def timed(what: str):
        log(f"{sae_name}: {what} ...")
        started = time.perf_counter()
        yield
        log(f"{sae_name}: {what}: {time.perf_counter() - started:.1f} s")

    return timed
