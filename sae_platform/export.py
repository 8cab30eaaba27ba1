"""Export a trained SAE in SAELens's on-disk layout: ``cfg.json`` + ``sae_weights.safetensors``.

SAELens (inference) computes, with ``apply_b_dec_to_input`` true and no normalisation::

    pre = (x - b_dec) @ W_enc + b_enc        W_enc [d_in, d_sae], b_enc [d_sae]
    z   = act(pre)                            per architecture, below
    x'  = z @ W_dec + b_dec                   W_dec [d_sae, d_in], b_dec [d_in]

Our SAEs scale raw inputs by a scalar s = ``input_scale`` first:
pre = W_enc (s x - b_pre) + b_enc, x' = (W_dec^T z + b_pre) / s. The scale is folded into the
weights, so the export needs no normalisation (``normalize_activations: "none"``) and the
pre-activations, codes and reconstructions are the same numbers as ours:

    ============  ==========================  ======================================
    SAELens       from our SAE                why
    ============  ==========================  ======================================
    W_enc         s * W_enc^T                 (x - b_pre/s) s W_enc^T = (s x - b_pre) W_enc^T
    b_enc         b_enc                       pre-activations are unchanged
    W_dec         W_dec / s                   rows have norm 1/s (not unit) after folding
    b_dec         b_pre / s                   raw units
    threshold     see below                   in pre-activation units: unchanged by folding
    ============  ==========================  ======================================

Variants:

    ==========  ===================  =========================================================
    ours        SAELens              activation
    ==========  ===================  =========================================================
    topk        ``topk``             ReLU(TopK_k(pre)); activation_fn_kwargs {"k": k}
    relu        ``standard``         ReLU(pre)
    jumprelu    ``jumprelu``         ReLU(pre) * (pre > threshold); threshold = our θ
    batchtopk   ``jumprelu``         the inference rule: ReLU(pre) where pre > the learned global
                                     threshold; exported as that threshold for every latent,
                                     exactly as SAELens saves its own BatchTopK SAEs. If the SAE
                                     was never trained (threshold NaN) our encode falls back to
                                     per-row TopK, so it is exported as ``topk``.
    matryoshka  ``jumprelu``         as batchtopk: the nested prefixes only shape training
    _batchtopk
    switch      (none)               PlatformError: a router picks one expert per token and
                                     scales codes by the router probability; SAELens has no such
                                     architecture.
    ==========  ===================  =========================================================

JumpReLU's SAELens rule ReLU(pre) * (pre > theta) equals ours, ReLU(pre) * (ReLU(pre) > theta), for
every theta (where pre <= 0 both are 0); BatchTopK's pre * (pre > theta) equals it because its
threshold is positive by construction. ``cfg.json`` carries the pre-6.0
field set (which SAELens 6 still loads, converting it) plus ``metadata`` with our own config,
input scale and the mapping used; it never claims a ``sae_lens_version``.
"""

import json
import math
import os

import torch
from safetensors.torch import save as safetensors_bytes

from sae_platform.activations import activation_attrs, activation_hook_entry
from sae_platform.catalog import checkpoint_pin, checkpoint_version, export_name, trained_on
from sae_platform.errors import PlatformError
from sae_platform.hooks import parse_hook_point
from sae_platform.sharded_checkpoint import checkpoint_config, require_gatherable
from sae_platform.storage import write_local_atomic
from sae_platform.trainer import load_sae

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
ARCHITECTURES = {"topk": "topk", "relu": "standard", "jumprelu": "jumprelu", "batchtopk": "jumprelu",
                 "matryoshka_batchtopk": "jumprelu"}
TRANSCODER_ARCHITECTURES = {"standard": "transcoder", "jumprelu": "jumprelu_transcoder"}
# SAELens's skip transcoders (``SkipTranscoder``, ``JumpReLUSkipTranscoder``): W_skip [d_out, d_in].
SKIP_TRANSCODER_ARCHITECTURES = {"standard": "skip_transcoder", "jumprelu": "jumprelu_skip_transcoder"}


def saelens_state_dict(sae) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """(architecture, activation fields for cfg.json, float32 CPU tensors in SAELens layout).
    PlatformError for what SAELens cannot hold (a switch SAE, a TopK transcoder)."""
    architecture, fields, weights = folded_weights(sae)
    if sae.is_transcoder:
        if architecture not in TRANSCODER_ARCHITECTURES:
            raise PlatformError(f"a {sae.variant} transcoder cannot be exported to SAELens: it has no {architecture} "
                                "transcoder (only ReLU `transcoder` and `jumprelu_transcoder`)",
                                "train a batchtopk, matryoshka_batchtopk, jumprelu or relu transcoder to export it")
        named = SKIP_TRANSCODER_ARCHITECTURES if sae.skip_connection else TRANSCODER_ARCHITECTURES
        architecture = named[architecture]
    return architecture, fields, weights


def folded_weights(sae) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """(activation rule, its cfg.json fields, float32 CPU tensors) with the scales folded in, so
    pre = x @ W_enc + b_enc (minus b_dec first for an SAE) and out = act(pre) @ W_dec + b_dec in
    raw units. The rule is SAELens's architecture name of an SAE (``ARCHITECTURES``: ``topk``,
    ``standard``, ``jumprelu``); ``threshold`` [d_sae] is present for ``jumprelu``. Shapes: W_enc
    [d_in, d_sae], W_dec [d_sae, d_out], b_enc [d_sae], b_dec [d_out]. A transcoder's are folded
    by ``_as_transcoder`` (any rule). PlatformError for a switch SAE or an uncalibrated one."""
    variant = sae.variant
    if variant == "switch":
        raise PlatformError(
            "a switch SAE cannot be exported to SAELens: SAELens has no mixture-of-experts "
            "architecture (a router picks one expert per token and scales its codes by the router probability)",
            "export a topk, batchtopk, jumprelu or relu SAE instead, or use the platform's own checkpoint "
            "and feature browser for switch SAEs")
    if variant not in ARCHITECTURES:
        raise PlatformError(f"no SAELens mapping for SAE variant {variant!r}",
                            f"export one of {', '.join(ARCHITECTURES)}")
    with torch.no_grad():
        s = float(sae.input_scale)
        if not (math.isfinite(s) and s > 0):
            raise PlatformError(f"the SAE's input_scale is {s}, which cannot be folded into the weights",
                                "export a trained (calibrated) SAE checkpoint")

        def f64(t):
            return t.detach().to("cpu", torch.float64)

        weights = {
            "W_enc": (f64(sae.W_enc) * s).t(),
            "b_enc": f64(sae.b_enc),
            "W_dec": f64(sae.W_dec) / s,
            "b_dec": f64(sae.b_pre) / s,
        }
        architecture = ARCHITECTURES[variant]
        fields = {"activation_fn_str": "relu", "activation_fn_kwargs": {}}
        if variant == "jumprelu":
            weights["threshold"] = f64(sae.threshold)  # exactly the theta our encode uses
        elif variant in ("batchtopk", "matryoshka_batchtopk"):
            threshold = float(sae.threshold)
            if math.isnan(threshold):  # untrained: encode() uses per-row TopK
                architecture = "topk"
            else:
                weights["threshold"] = torch.full((sae.n_latents,), threshold, dtype=torch.float64)
        if architecture == "topk":
            k = int(sae.hparams["k"])
            fields = {"activation_fn_str": "topk", "activation_fn_kwargs": {"k": k}, "k": k}
    if sae.is_transcoder:
        weights = _as_transcoder(sae, weights)
    return architecture, fields, {name: t.to(torch.float32).contiguous() for name, t in weights.items()}


def _as_transcoder(sae, weights: dict) -> dict:
    """Transcoders (SAELens's ``transcoder`` / ``jumprelu_transcoder``, circuit-tracer's) compute
    z = act(x @ W_enc + b_enc), y = z @ W_dec + b_dec, with no b_dec subtracted from the input
    (it lives in the output space). So b_pre is folded into b_enc (b_enc - W_enc b_pre, in our
    normalised units) and the output scale s_out into the decoder: W_dec / s_out, b_dec / s_out.
    A skip transcoder's W_skip [d_out, d_in] reads the normalised input x * s_in and writes
    normalised output units, so raw y gains x @ (W_skip * s_in / s_out).T."""
    with torch.no_grad():
        s_out = float(sae.output_scale)
        if not (math.isfinite(s_out) and s_out > 0):
            raise PlatformError(f"the transcoder's output_scale is {s_out}, which cannot be folded into the weights",
                                "export a trained (calibrated) transcoder checkpoint")
        w_enc, b_pre = sae.W_enc.detach().to("cpu", torch.float64), sae.b_pre.detach().to("cpu", torch.float64)
        weights = {**weights,
                   "b_enc": weights["b_enc"] - w_enc @ b_pre,
                   "W_dec": sae.W_dec.detach().to("cpu", torch.float64) / s_out,
                   "b_dec": sae.b_dec.detach().to("cpu", torch.float64) / s_out}
        if sae.skip_connection:
            weights["W_skip"] = sae.W_skip.detach().to("cpu", torch.float64) * float(sae.input_scale) / s_out
    return weights


def _write(path: str, data: bytes, fs) -> None:
    if fs is None:
        write_local_atomic(path, data)
    else:
        fs.pipe_file(path, data)  # one PUT: atomic on object stores


def saelens_cfg(sae, architecture: str, fields: dict, *, hook_name: str, model_name: str,
                context_size: int | None = None, dataset_path: str = "", hook_name_out: str | None = None) -> dict:
    """SAELens's ``cfg.json`` of ``sae`` as ``export_saelens`` writes it (``architecture`` and
    ``fields`` from ``saelens_state_dict``); also the ``sae_cfg_dict`` of SAEBench result files
    (``sae_platform.saebench_results``). PlatformError for a transcoder without
    ``hook_name_out``; ModelError when a name is not a hook point."""
    if sae.is_transcoder and not hook_name_out:
        raise PlatformError("a transcoder export needs hook_name_out (where its output goes)",
                            "pass hook_name_out, e.g. blocks.L.hook_mlp_out")
    config = sae.config
    return {
        "architecture": architecture,
        "d_in": int(sae.d_model),
        "d_sae": int(sae.n_latents),
        "dtype": "float32",
        "device": "cpu",
        "model_name": model_name,
        "hook_name": hook_name,
        "hook_layer": parse_hook_point(hook_name).layer,
        "hook_head_index": None,
        **fields,
        "context_size": context_size,
        "prepend_bos": True,
        "dataset_path": dataset_path,
        "normalize_activations": "none",
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False,
        "sae_lens_training_version": None,
        **({} if not sae.is_transcoder else {
            "d_out": int(sae.d_out), "hook_name_out": hook_name_out,
            "hook_layer_out": parse_hook_point(hook_name_out).layer,
            "hook_head_index_out": None, "apply_b_dec_to_input": False}),
        "metadata": {
            "exported_by": "sae_platform",
            "sae_platform_config": config,
            "input_scale": float(sae.input_scale),
            "folded": "W_enc = input_scale * W_enc^T; W_dec = W_dec / input_scale; b_dec = b_pre / input_scale",
            "source_variant": sae.variant,
        },
    }


def export_saelens(sae, dest_dir: str, *, hook_name: str, model_name: str, fs=None,
                   context_size: int | None = None, dataset_path: str = "", hook_name_out: str | None = None) -> dict:
    """Write ``dest_dir/cfg.json`` and ``dest_dir/sae_weights.safetensors`` for SAELens.

    ``hook_name``: what the SAE reads (a transcoder's input); ``hook_name_out``: where a
    transcoder writes. ``hook_layer`` and ``hook_layer_out`` are each parsed from their own hook
    name (``hooks.parse_hook_point``): a cross-block transcoder (``blocks.0.hook_resid_pre ->
    blocks.2.hook_mlp_out``) has hook_layer 0 and hook_layer_out 2. ModelError when a name is
    not a hook point.

    ``dest_dir`` is a local directory (files written to a temporary name, fsynced and renamed)
    or, with ``fs`` an fsspec filesystem, a path on it (one ``pipe_file`` per file). The weights
    go first and cfg.json last, so a directory with a cfg.json is complete. ``context_size``:
    the context length the activations were cached with (SAELens metadata; None if unknown).
    Returns the architecture, the file paths, the field mapping and the cfg written."""
    architecture, fields, weights = saelens_state_dict(sae)
    cfg = saelens_cfg(sae, architecture, fields, hook_name=hook_name, model_name=model_name,
                      context_size=context_size, dataset_path=dataset_path, hook_name_out=hook_name_out)
    mapping = {
        "W_enc": "input_scale * W_enc.T", "b_enc": "b_enc", "W_dec": "W_dec / input_scale",
        "b_dec": "b_pre / input_scale",
    } if not sae.is_transcoder else {
        "W_enc": "input_scale * W_enc.T", "b_enc": "b_enc - W_enc @ b_pre", "W_dec": "W_dec / output_scale",
        "b_dec": "b_dec / output_scale",
    }
    if "threshold" in weights:
        mapping["threshold"] = ("threshold" if sae.variant == "jumprelu"
                                else "global inference threshold, repeated per latent")
    dest = dest_dir.rstrip("/") or "/"
    if fs is None:
        os.makedirs(dest, exist_ok=True)
        join = os.path.join
    else:
        fs.makedirs(dest, exist_ok=True)
        join = lambda a, b: f"{a.rstrip('/')}/{b}"  # noqa: E731
    weights_path, cfg_path = join(dest, WEIGHTS_FILENAME), join(dest, CFG_FILENAME)
    _write(weights_path, safetensors_bytes(weights), fs)
    _write(cfg_path, json.dumps(cfg, indent=2).encode(), fs)
    return {"architecture": architecture, "variant": sae.variant, "cfg_path": cfg_path,
            "weights_path": weights_path, "mapping": mapping, "cfg": cfg}


def export_run(store, sae_name: str) -> dict | None:
    """Export checkpoint ``sae_name`` to ``saelens/<sae_name>`` (committed atomically); None for Switch SAEs,
    known from cfg.json before any weight is read. A latent-sharded checkpoint is gathered first (SAELens
    holds one whole SAE); StorageError naming its size and the limit when it would not fit this process
    (``sharded_checkpoint.require_gatherable``)."""
    if checkpoint_config(store, sae_name)["sae"]["variant"] not in ARCHITECTURES:
        return None
    require_gatherable(store, sae_name, "export it to SAELens's layout (one whole SAE)")
    sae, cfg = load_sae(store, sae_name)
    if sae.is_transcoder:
        try:  # SAELens has no TopK transcoder (nor a BatchTopK one before its threshold is learned)
            saelens_state_dict(sae)
        except PlatformError:
            return None
    pin = checkpoint_pin(checkpoint_version(store, sae_name))
    with store.writing(export_name(sae_name), checkpoint_step=cfg["step"], **pin) as version:
        result = export_saelens(sae, version, fs=None if store.is_local else store.fs,
                                **saelens_placement(store, sae_name))
    return {**result, "path": store.url(store.resolve(export_name(sae_name)))}


def saelens_placement(store, sae_name: str) -> dict:
    """Where checkpoint ``sae_name`` reads and writes, as ``export_saelens`` / ``saelens_cfg``
    keywords (hook_name, model_name, context_size, hook_name_out), from the activations it was
    trained on."""
    shuffle_name = trained_on(store, sae_name)
    attrs, entry = activation_attrs(store, shuffle_name), activation_hook_entry(store, shuffle_name)
    return {"hook_name": entry.reads, "model_name": attrs.get("model", ""), "context_size": attrs.get("ctx_len"),
            "hook_name_out": entry.hook_name if entry.hook_name_in else None}


def run_saelens_cfg(store, sae_name: str, sae) -> dict | None:
    """SAELens's cfg.json of checkpoint ``sae_name`` (loaded as ``sae``), as its export would
    write it; None where SAELens cannot hold it (a switch SAE, a TopK transcoder) or its
    activations do not name their hook point (cached before hook points were recorded)."""
    try:
        architecture, fields, _ = saelens_state_dict(sae)
        return saelens_cfg(sae, architecture, fields, **saelens_placement(store, sae_name))
    except PlatformError:
        return None
