"""A set of per-layer transcoders in circuit-tracer's layout (its "PLT" transcoder set).

circuit-tracer (Hanna, Piotrowski et al., github.com/safety-research/circuit-tracer, 0.5.0) builds
attribution graphs from a transcoder on every MLP layer. Its loader
(``circuit_tracer/utils/hf_utils.py: load_transcoders`` and
``transcoder/single_layer_transcoder.py: load_relu_transcoder``) reads a folder holding

    config.yaml            model_kind: transcoder_set, feature_input_hook, feature_output_hook
                           (TransformerLens names inside a block: hook_resid_mid or
                           ln2.hook_normalized -> hook_mlp_out), scan (the set's name)
    layer_<i>.safetensors  one per layer i = 0..n_layers-1, float32:
                             W_enc [d_tc, d_model]   b_enc [d_tc]
                             W_dec [d_tc, d_model]   b_dec [d_model]
                             activation_function.threshold [d_tc]   (JumpReLU only)
                             W_skip [d_model, d_model]              (skip transcoders only)

and computes z = act(x @ W_enc.T + b_enc), out = z @ W_dec + b_dec (+ x @ W_skip.T), act = ReLU, or JumpReLU
z * (z > threshold) when the threshold is present. Our transcoders' scales and b_pre are folded
in exactly as for SAELens (``export.folded_weights``), so circuit-tracer's codes and outputs are
ours. Activations per variant: relu -> ReLU; jumprelu -> JumpReLU with our theta; batchtopk and
matryoshka_batchtopk -> JumpReLU with the learned global threshold (their inference rule); topk ->
ReLU weights plus ``activation: topk`` and ``k`` in config.yaml. circuit-tracer 0.5.0's loader
does not read those two keys (it has a TopK module but never builds one from a config), so it
would run a TopK set as ReLU: ``CIRCUIT_TRACER_TOPK_NOTE`` says so in the export's result.
Transcoders trained with ``hparams: {skip_connection: true}`` (skip transcoders, Paulo et al.
2025) also write ``W_skip``, folded like the rest; circuit-tracer adds x @ W_skip.T to the output.

config.yaml lists no ``transcoders`` paths: uploaded as a Hugging Face repo, circuit-tracer finds
``layer_*.safetensors`` itself; to load a local copy, give it ``local_config(folder)``.
tests/snapshots/circuit_tracer_layout.json describes the keys and shapes, from the files above.
"""

import glob
import os

import torch
import yaml
from safetensors.torch import save as safetensors_bytes

from sae_platform.activations import activation_attrs, activation_hook_entry
from sae_platform.catalog import checkpoint_version, circuit_tracer_name, trained_on
from sae_platform.errors import PlatformError, StorageError
from sae_platform.export import folded_weights
from sae_platform.storage import write_local_atomic
from sae_platform.trainer import load_sae

CONFIG_FILENAME = "config.yaml"
MODEL_KIND = "transcoder_set"
THRESHOLD_KEY = "activation_function.threshold"
CIRCUIT_TRACER_TOPK_NOTE = ("circuit-tracer 0.5.0 ignores 'activation: topk' and 'k' in config.yaml and runs the set "
                            "as ReLU; train batchtopk transcoders (exported as JumpReLU) for it")


def layer_filename(layer: int) -> str:
    """``layer_<i>.safetensors``: the file circuit-tracer's loader looks for for layer ``layer``."""
    return f"layer_{int(layer)}.safetensors"


def layer_tensors(sae) -> tuple[str, dict[str, torch.Tensor]]:
    """(activation: ``relu``, ``jumprelu`` or ``topk``; float32 CPU tensors of one
    ``layer_<i>.safetensors``, shapes in the module docstring). PlatformError when ``sae`` is not a
    transcoder (circuit-tracer replaces MLPs: it needs input -> output maps) or cannot be folded
    (a switch SAE, an uncalibrated one)."""
    if not sae.is_transcoder:
        raise PlatformError(f"a {sae.variant} SAE is not a transcoder: circuit-tracer replaces each MLP with a "
                            "transcoder (its input -> its output)",
                            "train the set's entries with hook_point 'blocks.L.<input> -> blocks.L.hook_mlp_out'")
    rule, _, weights = folded_weights(sae)
    tensors = {"W_enc": weights["W_enc"].t().contiguous(), "W_dec": weights["W_dec"].contiguous(),
               "b_enc": weights["b_enc"], "b_dec": weights["b_dec"]}
    if "threshold" in weights:
        tensors[THRESHOLD_KEY] = weights["threshold"]
    if "W_skip" in weights:
        tensors["W_skip"] = weights["W_skip"].contiguous()
    return {"standard": "relu"}.get(rule, rule), tensors


def set_config(name: str, feature_input_hook: str, activation: str, k: int | None, model_name: str,
               n_layers: int) -> dict:
    """config.yaml's content: what circuit-tracer's ``load_transcoders`` reads, plus the TopK keys
    and a few of ours for people (``model_name``, ``n_layers``, ``exported_by``; ignored by it)."""
    config = {"model_kind": MODEL_KIND, "scan": name, "feature_input_hook": feature_input_hook,
              "feature_output_hook": "hook_mlp_out", "model_name": model_name, "n_layers": n_layers,
              "exported_by": "sae_platform"}
    if activation == "topk":
        config.update(activation="topk", k=int(k))
    return config


def write_transcoder_set(saes: list, dest: str, *, name: str, feature_input_hook: str, model_name: str,
                         write=None) -> dict:
    """Write ``saes`` (layer i's transcoder at position i) into folder ``dest`` in circuit-tracer's
    layout. ``write(path, data: bytes)`` stores one file (default: a local file written by
    temporary name and renamed); the layer files go first and config.yaml last, so a folder with a
    config.yaml is complete. PlatformError when the layers disagree on width or activation rule
    (circuit-tracer holds one per set), or one is not a foldable transcoder (``layer_tensors``).
    Returns the config written, the activation and, for a TopK set, ``CIRCUIT_TRACER_TOPK_NOTE``."""
    if not saes:
        raise PlatformError(f"transcoder set {name!r} has no layers", "train one transcoder per MLP layer")
    write = write or write_local_atomic
    rules = set()
    for layer, sae in enumerate(saes):
        if (sae.d_model, sae.d_out) != (saes[0].d_model, saes[0].d_out):
            raise PlatformError(f"transcoder set {name!r}: layer {layer} maps {sae.d_model} -> {sae.d_out} wide "
                                f"activations, layer 0 {saes[0].d_model} -> {saes[0].d_out}",
                                "train every layer's transcoder on the same model")
        rule, tensors = layer_tensors(sae)
        rules.add((rule, sae.hparams.get("k") if rule == "topk" else None))
        write(f"{dest.rstrip('/')}/{layer_filename(layer)}", safetensors_bytes(tensors))
    if len(rules) > 1:
        raise PlatformError(f"transcoder set {name!r} mixes activation rules {sorted(map(str, rules))}: "
                            "circuit-tracer holds one per set", "train every layer with the same variant and k")
    (activation, k), = rules
    config = set_config(name, feature_input_hook, activation, k, model_name, len(saes))
    write(f"{dest.rstrip('/')}/{CONFIG_FILENAME}", yaml.safe_dump(config, sort_keys=False).encode())
    return {"config": config, "activation": activation, "n_layers": len(saes),
            **({"note": CIRCUIT_TRACER_TOPK_NOTE} if activation == "topk" else {})}


def local_config(folder: str) -> dict:
    """config.yaml of a local copy of an exported set, with ``transcoders`` set to its layer files
    in layer order: what ``circuit_tracer.utils.hf_utils.load_transcoders`` takes to load it
    without the Hugging Face Hub. PlatformError when a layer file is missing."""
    with open(os.path.join(folder, CONFIG_FILENAME)) as handle:
        config = yaml.safe_load(handle)
    n_layers = len(glob.glob(os.path.join(folder, "layer_*.safetensors")))
    paths = [os.path.join(folder, layer_filename(i)) for i in range(n_layers)]
    missing = [p for p in paths if not os.path.exists(p)] or ([] if n_layers == config.get("n_layers", n_layers)
                                                              else [f"{n_layers} of {config['n_layers']} layer files"])
    if missing:
        raise PlatformError(f"transcoder set {folder} is incomplete: {', '.join(missing)}",
                            "export it again (materialize circuit_tracer_export)")
    return {**config, "transcoders": paths}


def set_checkpoints(store, tset) -> dict[str, str | None]:
    """Each member of transcoder set ``tset`` (``catalog.TranscoderSet``) -> its committed
    checkpoint version (None: not trained yet): what an export pins, and what says it is current."""
    return {member: checkpoint_version(store, member) for member in tset.members}


def export_is_current(store, tset) -> bool:
    """Whether ``circuit_tracer/<set>`` was written from every member's current checkpoint."""
    pointer = store.pointer(circuit_tracer_name(tset.name))
    return pointer is not None and pointer.get("checkpoints") == set_checkpoints(store, tset)


def export_transcoder_set(store, tset) -> dict:
    """Write transcoder set ``tset`` from its members' committed checkpoints to
    ``circuit_tracer/<set>`` (committed atomically, pinning every member's checkpoint version).
    Each member must have been trained on the store of its own pair (``tset.hook_point(i)``).
    StorageError naming the members not trained yet; PlatformError naming a member trained on
    another hook point, or the layers' disagreements (``write_transcoder_set``)."""
    pins = set_checkpoints(store, tset)
    waiting = [member for member, version in pins.items() if version is None]
    if waiting:
        raise StorageError(f"transcoder set {tset.name!r} is incomplete: {len(waiting)} of {tset.n_layers} layers "
                           f"have no checkpoint ({', '.join(waiting)})", "materialize sae_checkpoint for them first")
    saes, model = [], None
    for layer, member in enumerate(tset.members):
        shuffle_name = trained_on(store, member)
        entry = activation_hook_entry(store, shuffle_name)
        if entry.spec != tset.hook_point(layer):
            raise PlatformError(f"transcoder set {tset.name!r}: {member} was trained on {entry.spec}, not on "
                                f"{tset.hook_point(layer)}", f"train {member} again with that hook_point")
        model = model or activation_attrs(store, shuffle_name).get("model", "")
        saes.append(load_sae(store, member)[0])
    with store.writing(circuit_tracer_name(tset.name), checkpoints=pins) as version:
        result = write_transcoder_set(saes, version, name=tset.name, feature_input_hook=tset.input,
                                      model_name=model, write=store.write_bytes_atomic)
    return {**result, "path": store.url(store.resolve(circuit_tracer_name(tset.name)))}
