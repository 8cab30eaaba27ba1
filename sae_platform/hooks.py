"""Hook points by their TransformerLens / SAELens names, read and spliced with forward hooks on the
Hugging Face modules (no TransformerLens conversion).

Names (``L`` a 0-based block index)::

    blocks.L.hook_resid_pre        residual stream entering block L (input of the block)
    blocks.L.hook_attn_out         what the attention sub-block adds to the residual stream
    blocks.L.hook_resid_mid        resid_pre + attn_out: the residual stream entering the MLP
    blocks.L.ln2.hook_normalized   the pre-MLP norm's input, normalized but not yet multiplied by the
                                   norm's gain (nor shifted by its bias): x / rms(x) (RMSNorm) or
                                   (x - mean) / std (LayerNorm); a transcoder's input
    blocks.L.hook_mlp_out          what the MLP sub-block adds to the residual stream
    blocks.L.hook_resid_post       residual stream leaving block L (output of the block)

Where each is read, per family (``FAMILIES``; the module names are the Hugging Face ones)::

    family                 blocks                attn_out                   ln2 (pre-MLP norm)       mlp_out
    Llama/Mistral/Qwen2/   model.layers          self_attn[0]               post_attention_layernorm mlp
      Gemma (1)/SmolLM2
    Gemma2/Gemma3          model.layers          post_attention_layernorm   pre_feedforward_layernorm
                                                                                                    post_feedforward_layernorm
    GPT-2                  transformer.h         attn[0] (Conv1D c_proj)    ln_2                    mlp
    GPT-NeoX/Pythia        gpt_neox.layers       attention[0]               post_attention_layernorm mlp
    OPT (pre-LN)           model.decoder.layers  self_attn[0]               final_layer_norm        fc2

Gemma2's attn_out and mlp_out are the outputs of its extra post-norms, because those are what is
added to the residual stream. ``ln2.hook_normalized`` is TransformerLens's: ``hook_normalized`` in
``transformer_lens/components/rms_norm.py`` and ``layer_norm.py`` wraps ``x / scale`` and the gain
``* self.w`` (``+ self.b``) comes after it. It is computed here from the norm module's input with
the module's own epsilon; a splice there is multiplied by the gain (plus the bias) on its way into
the MLP, as the norm would. Stores cached before version 2 of these definitions
(``HOOK_DEFINITIONS``) hold the value after the gain under the same name: ``check_definitions``
refuses them.

Families are picked by ``config.model_type`` from an explicit list; any other type is refused by
name, never guessed from module names: OLMo2/OLMo3 have Llama's module names but normalise the
sub-block *outputs* (``post_attention_layernorm``, ``post_feedforward_layernorm``) and have no
pre-MLP norm, and Granite multiplies what each sub-block adds by ``residual_multiplier``
(TransformerLens issue #1648). A config of any type with ``residual_multiplier`` other than 1 is
refused too. ``resid_mid`` is the input of the pre-MLP norm. Models with
*parallel* attention and MLP (GPT-NeoX/Pythia with ``use_parallel_residual``, the default) compute
``x + attn(ln1(x)) + mlp(ln2(x))``: no residual stream exists between attention and MLP, so
``hook_resid_mid`` is refused there (as TransformerLens has no resid_mid for such models); the
MLP's input ``ln2.hook_normalized`` is ln2(resid_pre). Dropout modules are identities in eval mode.

A read registers one hook per hook point, and a last hook on the deepest point (in execution
order) raises out of the model: blocks after it and the vocabulary head never run.
"""

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from sae_platform.errors import ModelError

# Sites in execution order inside one block.
SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_post")
_SITE_NAMES = {"resid_pre": "hook_resid_pre", "attn_out": "hook_attn_out", "resid_mid": "hook_resid_mid",
               "mlp_in": "ln2.hook_normalized", "mlp_out": "hook_mlp_out", "resid_post": "hook_resid_post"}
_NAME_SITES = {v: k for k, v in _SITE_NAMES.items()}
_PATTERN = re.compile(r"^blocks\.(\d+)\.(.+)$")


HOOK_DEFINITIONS = 2
"""The version of these hook-point definitions, recorded as ``hook_definitions`` in every activation
store's fingerprint and attributes (absent: 1). Version 2 stores ``ln2.hook_normalized`` before the
norm's gain, as TransformerLens defines it; version 1 stored it after the gain."""
# Per older version: the hook-point names whose values changed since, and what they held then.
_REDEFINED = {1: ("hook_normalized", "the norm's output, after its gain (and bias)")}


def check_definitions(names: Iterable[str], version: int | None, what: str) -> None:
    """ModelError when ``what`` (activations cached with hook definitions ``version``; None means 1)
    holds a hook point in ``names`` whose value has a different meaning now (``HOOK_DEFINITIONS``):
    rows of two meanings under one name would be mixed, or an SAE trained on one spliced at the other."""
    version = 1 if version is None else int(version)
    for old in range(version, HOOK_DEFINITIONS):
        suffix, meaning = _REDEFINED[old]
        changed = [n for n in names if n.endswith(suffix)]
        if changed:
            raise ModelError(f"{what} holds {', '.join(changed)} cached with hook definitions version {version}, "
                             f"where it was {meaning}; version {HOOK_DEFINITIONS} stores TransformerLens's value "
                             "(normalized, before the gain)",
                             "delete those activation partitions (and the shuffled stores and SAEs built on them) "
                             "and cache them again, or cache into a different artifact root (storage.root_url)")


@dataclass(frozen=True, order=True)
class HookPoint:
    """One hook point: a block index and a site (``SITES``)."""

    layer: int
    site: str

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.{_SITE_NAMES[self.site]}"

    @property
    def order(self) -> tuple[int, int]:
        return self.layer, SITES.index(self.site)


def valid_names(n_layers: int | None = None) -> str:
    layers = "L" if n_layers is None else f"L (0..{n_layers - 1})"
    return ", ".join(f"blocks.{layers}.{_SITE_NAMES[s]}" for s in SITES)


def hook_name(layer: int, site: str = "resid_post") -> str:
    return HookPoint(layer, site).name


def parse_hook_point(name: str, n_layers: int | None = None) -> HookPoint:
    """``blocks.L.<site>`` -> HookPoint; ModelError listing the valid names when it is not one."""
    match = _PATTERN.match(name.strip()) if isinstance(name, str) else None
    if match is None or match.group(2) not in _NAME_SITES:
        raise ModelError(f"unknown hook point {name!r}", f"use one of: {valid_names(n_layers)}")
    layer = int(match.group(1))
    if n_layers is not None and not 0 <= layer < n_layers:
        raise ModelError(f"hook point {name!r} names block {layer}, but the model has {n_layers} blocks "
                         f"(0..{n_layers - 1})", f"use one of: {valid_names(n_layers)}")
    return HookPoint(layer, _NAME_SITES[match.group(2)])


# ---------------------------------------------------------------------------------------------
# Families
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
    """Where a model family keeps its blocks and sub-blocks (module paths, relative to a block)."""

    name: str
    blocks: str
    attn: str          # module whose output (first element if a tuple) is added to the residual stream
    ln2: str           # the pre-MLP norm: input = resid_mid (sequential), output = the MLP's input
    mlp: str           # module whose output is added to the residual stream
    final_norm: str
    norm: str          # "rms" (x / rms * w), "rms_plus_one" (Gemma: x / rms * (1 + w)), "layer" (LayerNorm)


FAMILIES = {
    "llama": Family("Llama/Mistral/Qwen2", "model.layers", "self_attn", "post_attention_layernorm", "mlp",
                    "model.norm", "rms"),
    "gemma": Family("Gemma", "model.layers", "self_attn", "post_attention_layernorm", "mlp", "model.norm",
                    "rms_plus_one"),
    "gemma2": Family("Gemma2/Gemma3", "model.layers", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "model.norm", "rms_plus_one"),
    "gpt2": Family("GPT-2", "transformer.h", "attn", "ln_2", "mlp", "transformer.ln_f", "layer"),
    "gpt_neox": Family("GPT-NeoX/Pythia", "gpt_neox.layers", "attention", "post_attention_layernorm", "mlp",
                       "gpt_neox.final_layer_norm", "layer"),
    "opt": Family("OPT", "model.decoder.layers", "self_attn", "final_layer_norm", "fc2",
                  "model.decoder.final_layer_norm", "layer"),
}
_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "phi3": "llama",
                "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma2", "gemma3": "gemma2",
                "gpt2": "gpt2", "gpt_neox": "gpt_neox", "opt": "opt"}
_POST_NORM_BLOCKS = ("normalises each sub-block's output (post_attention_layernorm, post_feedforward_layernorm) "
                     "before adding it and has no pre-MLP norm")
_SCALED_RESIDUAL = "multiplies what each sub-block adds to the residual stream by residual_multiplier"
# Types whose blocks look like a supported family's but compute something else (TransformerLens #1648)
_REFUSED_TYPES = {"olmo2": ("OLMo2", _POST_NORM_BLOCKS), "olmo3": ("OLMo3", _POST_NORM_BLOCKS),
                  "granite": ("Granite", _SCALED_RESIDUAL), "granitemoe": ("GraniteMoE", _SCALED_RESIDUAL),
                  "granitemoeshared": ("GraniteMoEShared", _SCALED_RESIDUAL),
                  "granitemoehybrid": ("GraniteMoEHybrid", _SCALED_RESIDUAL)}


def _get(module, path: str):
    for attr in path.split("."):
        module = getattr(module, attr, None)
        if module is None:
            return None
    return module


def _lm(model) -> torch.nn.Module:
    return getattr(model, "model", model) if not isinstance(model, torch.nn.Module) else model


def _supported_types() -> str:
    return ", ".join(f"{t} ({FAMILIES[k].name})" for t, k in _MODEL_TYPES.items())


def family_of(model) -> Family:
    """The family table entry of a Hugging Face causal LM, by ``config.model_type``. ModelError
    naming the model type and the supported ones for any other type (a block that merely has
    Llama's module names may add its sub-blocks differently: OLMo2, Granite), and for a config
    whose ``residual_multiplier`` is not 1."""
    model = _lm(model)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in _REFUSED_TYPES:
        family, why = _REFUSED_TYPES[model_type]
        raise ModelError(f"{family} models (model_type {model_type!r}, {type(model).__name__}) are not supported: "
                         f"{family} {why}, so hook_attn_out / hook_mlp_out / ln2.hook_normalized would not mean "
                         "what TransformerLens means", f"use a model of a supported type: {_supported_types()}")
    key = _MODEL_TYPES.get(model_type)
    if key is None:
        raise ModelError(f"no hook-point layout for {type(model).__name__} (model_type {model_type!r})",
                         f"use a model of a supported type: {_supported_types()}")
    multiplier = getattr(config, "residual_multiplier", 1.0)
    if multiplier != 1:
        raise ModelError(f"this {model_type} model's config has residual_multiplier {multiplier}: each sub-block's "
                         "output is scaled before it is added, so hook_attn_out / hook_mlp_out would not be what "
                         "the residual stream receives", "use a model without residual_multiplier (or with 1.0)")
    family = FAMILIES[key]
    if key == "opt" and not getattr(model.config, "do_layer_norm_before", True):
        raise ModelError("this OPT model normalises after each sub-block (do_layer_norm_before: false, e.g. "
                         "opt-350m): its residual stream is not the sum of the sub-block outputs",
                         "use a pre-LN OPT model (every size but 350m) or another family")
    if key == "opt" and _get(model, "model.decoder.project_out") is not None:
        raise ModelError("this OPT model projects the residual stream before the head (project_out)",
                         "use an OPT model whose word_embed_proj_dim equals hidden_size")
    return family


def is_parallel(model) -> bool:
    """Attention and MLP read the same residual stream (GPT-NeoX's use_parallel_residual)."""
    model = _lm(model)
    config = model.config
    return getattr(config, "model_type", None) == "gpt_neox" and bool(getattr(config, "use_parallel_residual", True))


def decoder_blocks(model) -> torch.nn.ModuleList:
    family = family_of(model)
    blocks = _get(_lm(model), family.blocks)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise ModelError(f"cannot find the blocks ({family.blocks}) of {type(_lm(model)).__name__}",
                         "use an unmodified Hugging Face causal LM of a supported family")
    return blocks


def check_hook_point(model, name: str) -> HookPoint:
    """Parse ``name`` and check the model has it; ModelError naming the valid names otherwise."""
    n_layers = len(decoder_blocks(model))
    point = parse_hook_point(name, n_layers)
    if point.site == "resid_mid" and is_parallel(model):
        raise ModelError(f"{name} does not exist in {family_of(model).name} with parallel attention and MLP "
                         "(use_parallel_residual): both read resid_pre and add to resid_post, so there is no "
                         "residual stream between them",
                         f"use blocks.{point.layer}.hook_resid_pre (what both sub-blocks read), "
                         f"blocks.{point.layer}.ln2.hook_normalized (the MLP's input) or "
                         f"blocks.{point.layer}.hook_attn_out / hook_mlp_out")
    return point


def sae_hook_points(model, hook_point: str, input_hook_point: str | None,
                    transcoder: bool) -> tuple[HookPoint, HookPoint]:
    """(where an SAE's reconstruction goes, what it encodes), both checked against ``model``. An SAE
    reads and writes ``hook_point``; a transcoder reads ``input_hook_point`` (computed before
    ``hook_point``) and writes ``hook_point``. ModelError when the pairing is wrong: encoding a
    transcoder from its output, or an SAE from another hook point, would give codes of the wrong
    activations with the same width."""
    point = check_hook_point(model, hook_point)
    if transcoder != (input_hook_point is not None):
        raise ModelError(f"a transcoder needs its input hook point besides {hook_point}" if transcoder else
                         f"an SAE reads and writes {hook_point}; input_hook_point {input_hook_point} is only for "
                         "transcoders",
                         "pass the hook point(s) the SAE was trained at (activations.sae_hook_entry: hook_name "
                         "and, for a transcoder, hook_name_in)")
    if input_hook_point is None:
        return point, point
    source = check_hook_point(model, input_hook_point)
    if source.order >= point.order:
        raise ModelError(f"{input_hook_point} is computed after {hook_point}", "read a source that comes first")
    return point, source


@dataclass(frozen=True)
class _Normalized:
    """Where a value is the norm module's input normalized without its gain (``hook_normalized``):
    ``kind`` is ``Family.norm``. Read from the module's input; a replacement goes on as the
    module's output, multiplied by the gain and shifted by the bias as the module would."""

    kind: str

    @staticmethod
    def _eps(module) -> float:
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if eps is None:
            raise ModelError(f"the norm module {type(module).__name__} has no eps / variance_epsilon",
                             "use an unmodified Hugging Face model of a supported family")
        return float(eps)

    def normalize(self, module, x: torch.Tensor) -> torch.Tensor:
        """x / sqrt(mean(x²) + eps) (RMSNorm) or (x - mean) / sqrt(var + eps) (LayerNorm), in float32
        over the last dimension; shape as ``x``."""
        x = x.float()
        if self.kind == "layer":
            x = x - x.mean(-1, keepdim=True)
        return x / (x.pow(2).mean(-1, keepdim=True) + self._eps(module)).sqrt()

    def apply_gain(self, module, normalized: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """What the norm module outputs for ``normalized``: times w (Gemma: 1 + w), plus the bias."""
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        out = normalized.float()
        if weight is not None:
            out = out * ((1.0 + weight.float()) if self.kind == "rms_plus_one" else weight.float())
        if bias is not None:
            out = out + bias.float()
        return out.to(dtype)


def _site_module(model, point: HookPoint) -> tuple[torch.nn.Module, "str | _Normalized"]:
    """(module, "in" | "out" | _Normalized): the value is that module's input (hidden states), its
    output, or its input normalized without the gain (``_Normalized``)."""
    family = family_of(model)
    block = decoder_blocks(model)[point.layer]
    path, where = {"resid_pre": ("", "in"), "resid_post": ("", "out"), "attn_out": (family.attn, "out"),
                   "mlp_out": (family.mlp, "out"), "mlp_in": (family.ln2, _Normalized(family.norm)),
                   "resid_mid": (family.ln2, "in")}[point.site]
    module = _get(block, path) if path else block
    if module is None:
        raise ModelError(f"block {point.layer} of {type(_lm(model)).__name__} has no {path} module for "
                         f"{point.name}", "use an unmodified Hugging Face model of a supported family")
    return module, where


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def _input_of(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


class _StopForward(Exception):
    pass


def _register(module, where: "str | _Normalized", fn: Callable, prepend: bool = False):
    """fn(value) -> replacement or None, on a module's input ("in"), output ("out") or normalized
    input (``_Normalized``: the replacement becomes the output after the gain)."""
    if isinstance(where, _Normalized):
        def normalized_hook(_m, args, kwargs, output):
            new = fn(where.normalize(module, _input_of(args, kwargs)))
            return None if new is None else where.apply_gain(module, new, _first(output).dtype)
        return module.register_forward_hook(normalized_hook, with_kwargs=True, prepend=prepend)
    if where == "out":
        def out_hook(_m, _args, output):
            new = fn(_first(output))
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return module.register_forward_hook(out_hook, prepend=prepend)

    def in_hook(_m, args, kwargs):
        new = fn(_input_of(args, kwargs))
        if new is None:
            return None
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}
    return module.register_forward_pre_hook(in_hook, with_kwargs=True, prepend=prepend)


@torch.inference_mode()
def read_hook_points(model, input_ids: torch.Tensor, names: Iterable[str], autocast: torch.dtype | None = None,
                     device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Every hook point in ``names`` from one forward pass of ``input_ids`` [batch, seq], as float32
    [batch, seq, d] tensors keyed by name. The pass stops after the deepest of them."""
    model = _lm(model)
    points = {name: check_hook_point(model, name) for name in dict.fromkeys(names)}
    if not points:
        raise ModelError("no hook point to read", f"name at least one of: {valid_names()}")
    device = device or next(model.parameters()).device
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def grabber(name):
        def grab(value):
            out = value.detach().float()
            # OPT's MLP runs on [batch * seq, d]: every value comes back as [batch, seq, d]
            captured[name] = (out.clone() if out is value else out).reshape(*input_ids.shape, -1)
        return grab

    deepest = max(points.values(), key=lambda p: p.order)
    try:
        for name, point in points.items():
            handles.append(_register(*_site_module(model, point), grabber(name)))

        def stop(_value):
            raise _StopForward
        handles.append(_register(*_site_module(model, deepest), stop))
        with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            model(input_ids=input_ids.to(device), use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured


def splice_hooks(model, point: HookPoint, replace: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor | None],
                 source: HookPoint | None = None) -> list:
    """Hooks that let ``replace(value, source_value)`` change the value at ``point`` in every later
    forward pass (None leaves it unchanged); the caller removes the returned handles.

    ``source``: another hook point read earlier in the same pass whose value is passed along (a
    transcoder reads ln2.hook_normalized and replaces hook_mlp_out). ``resid_mid`` is changed
    through attn_out (resid_mid = resid_pre + attn_out in every sequential family), so the new
    value really flows on in the residual stream, not only into the MLP."""
    model = _lm(model)
    check_hook_point(model, point.name)
    state: dict = {}

    def keep_shape(value):  # [batch, seq]: OPT's MLP sees [batch * seq, d], replace() always [batch, seq, d]
        state["shape"] = value.shape[:-1]
    handles = [_register(decoder_blocks(model)[0], "in", keep_shape)]

    def as_3d(value):
        return value.reshape(*state["shape"], value.shape[-1])

    def replace_3d(value, source):
        new = replace(as_3d(value), None if source is None else as_3d(source))
        return None if new is None else new.reshape(value.shape)

    if source is not None:
        check_hook_point(model, source.name)
        if source.order >= point.order:
            raise ModelError(f"{source.name} is computed after {point.name}", "read a source that comes first")

        def keep_source(value):
            state["source"] = value
        handles.append(_register(*_site_module(model, source), keep_source))
    if point.site == "resid_mid":
        pre = HookPoint(point.layer, "resid_pre")

        def keep_pre(value):
            state["resid_pre"] = value
        handles.append(_register(*_site_module(model, pre), keep_pre))

        def via_attn(attn_out):
            resid_pre = state.pop("resid_pre")
            new_mid = replace_3d(resid_pre + attn_out, state.get("source"))
            return None if new_mid is None else new_mid - resid_pre
        handles.append(_register(*_site_module(model, HookPoint(point.layer, "attn_out")), via_attn))
    else:
        handles.append(_register(*_site_module(model, point), lambda value: replace_3d(value, state.get("source"))))
    return handles


# ---------------------------------------------------------------------------------------------
# Final norm folded into the unembedding
# ---------------------------------------------------------------------------------------------

def final_norm_fold(model) -> tuple[torch.Tensor | None, bool]:
    """(per-channel gain of the final norm or None, whether the norm centres its input).

    RMSNorm: gain w (Gemma: 1 + w, its weights are stored zero-centred). LayerNorm: gain w and
    centring; its bias and the 1/rms (1/std) factor are the same for every token and are left out."""
    model = _lm(model)
    try:
        family = family_of(model)
    except ModelError:
        return None, False
    norm = _get(model, family.final_norm)
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None, family.norm == "layer"
    gain = weight.detach().float()
    if family.norm == "rms_plus_one":
        gain = 1.0 + gain
    return gain, family.norm == "layer"


def start_token_id(model, tokenizer) -> int:
    """The token that starts every context: the platform's choice stored in the model config
    (``sae_platform_start_token``), else the tokenizer's BOS, else the config's ``bos_token_id``,
    else EOS (GPT-2 and Pythia use <|endoftext|> for both). ModelError when the model has none."""
    config = _lm(model).config
    start = getattr(config, "sae_platform_start_token", None) or getattr(tokenizer, "bos_token", None)
    # Membership in the vocabulary, not "id != unk": SmolLM2's <|endoftext|> is both its unk token
    # and the platform's start token.
    if start is not None and start in tokenizer.get_vocab():
        return int(tokenizer.convert_tokens_to_ids(start))
    for candidate in (getattr(config, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None),
                      getattr(config, "eos_token_id", None)):
        if isinstance(candidate, list):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    raise ModelError(f"{type(_lm(model)).__name__} has no start (BOS) or end-of-text token",
                     "use a tokenizer with a bos_token or eos_token")
