"""Latent-sharded SAE checkpoints: one safetensors file per shard of the latent axis plus an index.

A dictionary too wide for one device is trained with its latents split over R ranks (each holds
rows [start, stop) of W_enc, b_enc, W_dec, JumpReLU's threshold and their Adam moments; the
rest is replicated). Its checkpoint is written the same way, each rank writing only what it
holds, so no process ever gathers the whole SAE to save it. A checkpoint version of such a run
(``sae/<sae_name>/<version>/``, committed through ``storage.ArtifactStore.writing`` like any
other) holds::

    shard-00000-of-00002.safetensors   the shard's rows of every per-latent tensor (SHARDED_AXES)
    shard-00001-of-00002.safetensors
    replicated.safetensors             every other tensor (b_pre, input_scale, Adam's step, the RNG)
    index.json                         the layout, every tensor's whole shape, dtype and latent axis,
                                       the shard files; written last, by the committing rank
    cfg.json, optimizer.json, trainer_state.json   as in an unsharded checkpoint (trainer.py)

Tensors are named by what they are, never by an optimizer index, so a checkpoint reads back under
any layout: ``sae.<state_dict key>`` (the SAE's weights), ``adam.<parameter name>.<state key>``
(Adam's exp_avg / exp_avg_sq follow their parameter's latent axis; ``step`` is replicated) and
``trainer.<name>`` (the dead-latent counters ``tokens_since_fired`` per latent, the ``rng``).

Reading under another layout (:func:`read_shard`): the target shard's rows [start, stop) are
assembled from only the source shards that overlap them, each read with safetensors'
``get_slice`` (a local store maps the file and reads just those rows), so 2 shards resume as 1,
1 as 4, 4 as 2, and the optimizer state follows the weights. :func:`decoder_rows` reads one range of
decoder rows of a checkpoint of either kind (an unsharded one's ``sae_weights.safetensors`` by the
same ``get_slice``), without building the SAE: what pass 2 of a feature shard needs.

Nothing half-written is read: the index is written after every shard file is down and checked
(names, dtypes, rows), and the pointer switches after the index; a version missing a shard or
its index, or whose shard differs from the bytes recorded at commit (the store's
``CHECKSUMS.json``: sha256 of every file, so this module records no second checksum) is refused
with a StorageError naming the file. No file is a pickle: safetensors (a JSON header plus raw
tensor bytes) and JSON only.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors import safe_open
from safetensors.torch import save_file

from sae_platform import checksums
from sae_platform.catalog import checkpoint_name, rebuild_fix
from sae_platform.errors import PlatformError, StorageError
from sae_platform.settings import env_value
from sae_platform.storage import ArtifactStore
from sae_platform.tensor_rows import DTYPES, HEADER_ERRORS, RowFile, parse_header

FORMAT = 1
INDEX = "index.json"
REPLICATED = "replicated.safetensors"
SAE, ADAM, TRAINER = "sae.", "adam.", "trainer."
# The per-latent tensors and the axis that runs over latents: every other tensor is replicated.
# Rows-as-latents (sae/base.py) puts the latent axis first everywhere.
SHARDED_AXES: dict[str, int] = {"sae.W_enc": 0, "sae.b_enc": 0, "sae.W_dec": 0, "trainer.tokens_since_fired": 0}
# Per variant, as the same name means different things (BatchTopK's threshold is one scalar).
VARIANT_SHARDED_AXES: dict[str, dict[str, int]] = {"jumprelu": {"sae.threshold": 0}}
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")  # shaped like their parameter; Adam's ``step`` is a scalar
GATHER_LIMIT_ENV = "SAE_PLATFORM_GATHER_LIMIT_BYTES"


def shard_file(shard: int, n_shards: int) -> str:
    """The file name of shard ``shard`` of ``n_shards`` in a checkpoint version folder."""
    return f"shard-{shard:05d}-of-{n_shards:05d}.safetensors"


@dataclass(frozen=True)
class LatentLayout:
    """``n_latents`` latents in ``n_shards`` contiguous blocks: shard i holds latents
    [i·n // R, (i+1)·n // R) (equal blocks when R divides n). Raises PlatformError unless
    1 <= n_shards <= n_latents."""

    n_latents: int
    n_shards: int

    def __post_init__(self):
        if not (isinstance(self.n_shards, int) and isinstance(self.n_latents, int)
                and 1 <= self.n_shards <= self.n_latents):
            raise PlatformError(f"a latent layout of {self.n_latents!r} latents in {self.n_shards!r} shards is not "
                                "possible", "use 1 <= latent shards <= n_latents")

    def shard_range(self, shard: int) -> tuple[int, int]:
        """(start, stop): the latents shard ``shard`` holds. PlatformError for a shard outside the layout."""
        if not 0 <= shard < self.n_shards:
            raise PlatformError(f"shard {shard} is outside the layout's {self.n_shards} shards",
                                f"pass 0 <= shard < {self.n_shards}")
        return shard * self.n_latents // self.n_shards, (shard + 1) * self.n_latents // self.n_shards

    def width(self, shard: int) -> int:
        start, stop = self.shard_range(shard)
        return stop - start

    def overlaps(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """(shard, lo, hi) for every shard holding latents of [start, stop): its latents [lo, hi)
        are the overlap, global ids."""
        found = []
        for shard in range(self.n_shards):
            lo, hi = self.shard_range(shard)
            lo, hi = max(lo, start), min(hi, stop)
            if lo < hi:
                found.append((shard, lo, hi))
        return found

    def as_dict(self) -> dict:
        return {"n_latents": self.n_latents, "n_shards": self.n_shards}


def latent_axis(variant: str, name: str) -> int | None:
    """The latent axis of tensor ``name`` of a ``variant`` SAE's checkpoint, None when it is
    replicated. ``adam.<param>.exp_avg`` / ``exp_avg_sq`` follow ``sae.<param>``."""
    if name.startswith(ADAM):
        param, _, key = name[len(ADAM):].rpartition(".")
        return latent_axis(variant, SAE + param) if key in ADAM_MOMENTS else None
    return {**SHARDED_AXES, **VARIANT_SHARDED_AXES.get(variant, {})}.get(name)


def shard_slice(tensors: dict[str, torch.Tensor], variant: str, layout: LatentLayout,
                shard: int) -> dict[str, torch.Tensor]:
    """The rows of shard ``shard`` of every per-latent tensor of a whole-SAE ``tensors`` (views),
    and every replicated tensor unchanged: what one rank of ``layout`` holds."""
    start, stop = layout.shard_range(shard)
    out = {}
    for name, tensor in tensors.items():
        axis = latent_axis(variant, name)
        out[name] = tensor if axis is None else tensor.narrow(axis, start, stop - start)
    return out


# -- name-keyed training state -------------------------------------------------------------------

def parameter_names(sae, groups: list[dict]) -> list[str]:
    """The SAE parameter name of each optimizer index (the order of ``optimizer.state_dict()``) of an
    optimizer of the parameter groups ``groups`` (its ``param_groups``, or the ``sae.param_groups(lr)``
    it is made of: a resume reads Adam's state before its optimizer exists)."""
    by_id = {id(p): name for name, p in sae.named_parameters()}
    return [by_id[id(p)] for group in groups for p in group["params"]]


def adam_tensors(sae, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Adam's state keyed by parameter name: (``{"adam.<param>.<key>": tensor}`` on the CPU,
    JSON-able rest: ``param_groups`` and any non-tensor state). Layout-independent: the names are
    the same whatever rows a rank holds. What every checkpoint stores of Adam, sharded or not
    (``optimizer.safetensors`` / a shard's ``adam.*`` and ``optimizer.json``)."""
    tensors, meta = _named_adam_state(optimizer.state_dict(), parameter_names(sae, optimizer.param_groups))
    return {name: value.detach().cpu().contiguous() for name, value in tensors.items()}, meta


def _named_adam_state(state_dict: dict, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer ``state_dict`` (its ``state`` keyed by parameter index, int or str) named by
    parameter, ``names[index]``: (tensors ``adam.<param>.<key>``, {param_groups, state_by_name})."""
    tensors, plain = {}, {}
    for index, entries in state_dict["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{ADAM}{names[int(index)]}.{key}"] = value
            else:
                plain.setdefault(names[int(index)], {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "state_by_name": plain}


def stored_adam_state(tensors: dict[str, torch.Tensor], meta: dict,
                      names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """The Adam state of an unsharded checkpoint's ``optimizer.safetensors`` (``tensors``) and
    ``optimizer.json`` (``meta``) as :func:`adam_tensors` names it, whatever version wrote them:
    files written before Adam's state was named (tensors ``state.<param index>.<key>``, ``meta["state"]``
    by index: one process's checkpoints until then) are renamed by ``names``, the parameter name of
    each index (:func:`parameter_names` of the optimizer they are loaded into, whose groups hold as many
    parameters as ``meta["param_groups"]``: the caller checks). The migration: an old checkpoint
    still resumes, under any layout."""
    if "state_by_name" in meta:
        return tensors, meta
    state: dict = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for index, entries in meta.get("state", {}).items():
        state.setdefault(int(index), {}).update(entries)
    return _named_adam_state({"state": state, "param_groups": meta["param_groups"]}, names)


def adam_state_dict(sae, optimizer, tensors: dict[str, torch.Tensor], meta: dict, device=None) -> dict:
    """The inverse of :func:`adam_tensors` for this ``sae`` and ``optimizer``: a state_dict for
    ``optimizer.load_state_dict`` (``tensors`` may hold other names; they are ignored)."""
    index = {name: i for i, name in enumerate(parameter_names(sae, optimizer.param_groups))}
    state: dict = {}
    for name, value in tensors.items():
        if not name.startswith(ADAM):
            continue
        param, _, key = name[len(ADAM):].rpartition(".")
        state.setdefault(index[param], {})[key] = value if key == "step" else value.to(device)
    for param, entries in meta.get("state_by_name", {}).items():
        state.setdefault(index[param], {}).update(entries)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def training_tensors(sae, optimizer, tokens_since_fired: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict]:
    """What a rank checkpoints of its training, named as in the module docstring: (tensors: the
    SAE's ``sae.*`` weights, Adam's ``adam.*`` state, ``trainer.tokens_since_fired`` [its
    latents] and ``trainer.rng``, all on the CPU; ``optimizer.json``'s content). A latent rank passes
    its shard-local SAE and optimizer: the names are the same under every layout."""
    adam, meta = adam_tensors(sae, optimizer)
    tensors = {**{SAE + k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}, **adam,
               f"{TRAINER}tokens_since_fired": tokens_since_fired.detach().cpu().contiguous(),
               f"{TRAINER}rng": torch.get_rng_state()}
    return tensors, meta


def sae_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The SAE's state_dict in ``tensors`` (names as in the module docstring): the ``sae.*`` ones, unprefixed."""
    return {name[len(SAE):]: tensor for name, tensor in tensors.items() if name.startswith(SAE)}


def restore_training(sae, optimizer, tensors: dict[str, torch.Tensor], optimizer_meta: dict,
                     device=None) -> torch.Tensor:
    """Load the training state of :func:`training_tensors`' ``tensors`` (e.g. a :func:`read_shard`
    of this rank's shard): Adam's into ``optimizer`` (made over ``sae``, which already holds the
    weights, :func:`sae_state` of them: built on the meta device and given them by
    ``sae.with_weights``, so no second copy of the weights is made) and the torch RNG; returns
    ``tokens_since_fired`` on ``device``."""
    optimizer.load_state_dict(adam_state_dict(sae, optimizer, tensors, optimizer_meta, device))
    torch.set_rng_state(tensors[f"{TRAINER}rng"])
    return tensors[f"{TRAINER}tokens_since_fired"].to(device)


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN/inf."""
    return [name for name, t in tensors.items() if not is_finite(t)]


def is_finite(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds no NaN/inf (any tensor not floating point: True). By its minimum and
    maximum, which NaN propagates to and ±inf is one of: one pass with nothing allocated, ~20x faster
    on the CPU than ``torch.isfinite(t).all()`` (a bool tensor the size of ``t``, then a second pass)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


# -- writing -------------------------------------------------------------------------------------

def write_shard(store: ArtifactStore, version_path: str, variant: str, layout: LatentLayout, shard: int,
                tensors: dict[str, torch.Tensor]) -> str:
    """Write this rank's shard file into the version folder ``version_path`` (from
    :func:`sharded_commit`): the per-latent tensors of ``tensors`` (names as in the module
    docstring), each holding exactly the shard's rows; replicated names are skipped (the
    committing rank writes them: :func:`write_replicated`). Returns the file name. PlatformError
    naming the tensor when its latent axis does not have the shard's width."""
    width, kept = layout.width(shard), {}
    for name, tensor in tensors.items():
        axis = latent_axis(variant, name)
        if axis is None:
            continue
        if tensor.shape[axis] != width:
            raise PlatformError(f"{name} has {tensor.shape[axis]} latents on axis {axis}, but shard {shard} of "
                                f"{layout.n_shards} holds {width} ({layout.n_latents} latents in all)",
                                "pass each rank's own rows (shard_slice of the whole tensors)")
        kept[name] = tensor.detach().cpu().contiguous()
    file = shard_file(shard, layout.n_shards)
    _write_safetensors(store, f"{version_path}/{file}", kept)
    return file


def write_replicated(store: ArtifactStore, version_path: str, variant: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write the replicated tensors of ``tensors`` (per-latent names are skipped) into
    ``version_path``: done once, by the committing rank."""
    kept = {name: t.detach().cpu().contiguous() for name, t in tensors.items() if latent_axis(variant, name) is None}
    _write_safetensors(store, f"{version_path}/{REPLICATED}", kept)


def _write_safetensors(store: ArtifactStore, path: str, tensors: dict[str, torch.Tensor]) -> None:
    """``tensors`` as the safetensors file ``path`` (in an uncommitted version folder), streamed
    from the tensors to the file: a shard of a wide SAE is gigabytes, so never copied whole into
    a bytes object first (a remote store gets a local temporary file, then one upload)."""
    if store.is_local:
        save_file(tensors, path)
        return
    with tempfile.TemporaryDirectory(prefix="sae-shard-") as folder:
        local = os.path.join(folder, path.rsplit("/", 1)[-1])
        save_file(tensors, local)
        store.fs.put_file(local, path)


def _header(store: ArtifactStore, path: str) -> dict:
    """The JSON header of the safetensors file ``path`` (``parse_header``).
    StorageError naming the file when it is not whole (a writer killed mid-file: a header that
    does not parse, or fewer bytes than the header's tensors end at)."""
    try:
        size = store.fs.size(path)
        with store.fs.open(path, "rb") as f:
            header, start = parse_header(f, size)
        end = start + max((meta["data_offsets"][1] for meta in header.values()), default=0)
    except HEADER_ERRORS as error:
        raise StorageError(f"{store.url(path)} is not a whole safetensors file ({type(error).__name__}: {error}): "
                           "its writer stopped mid-file; nothing is committed",
                           "write the checkpoint again (every latent rank writes its shard)") from error
    if size != end:
        raise StorageError(f"{store.url(path)} holds {size:,} bytes, its header describes {end:,}: its writer stopped "
                           "mid-file; nothing is committed",
                           "write the checkpoint again (every latent rank writes its shard)")
    return header


def write_index(store: ArtifactStore, version_path: str, variant: str, layout: LatentLayout) -> dict:
    """Check every shard file of ``layout`` is in ``version_path`` with the same tensors, dtypes
    and its own rows, then write ``index.json`` (returned). Called by the committing rank after
    every rank wrote its shard; StorageError naming the file otherwise (nothing is committed)."""
    tensors: dict[str, dict] = {}
    for name, meta in _header(store, f"{version_path}/{REPLICATED}").items():
        tensors[name] = {"dtype": meta["dtype"], "shape": meta["shape"], "axis": None}
    shard_names = None
    for shard in range(layout.n_shards):
        file = shard_file(shard, layout.n_shards)
        if not store.fs.exists(f"{version_path}/{file}"):
            raise StorageError(f"{store.url(version_path)}/{file} was not written: shard {shard} of "
                               f"{layout.n_shards} is missing, so this checkpoint is not committed",
                               "every latent rank must write its shard (write_shard) before the commit")
        header = _header(store, f"{version_path}/{file}")
        if shard_names is None:
            shard_names = sorted(header)
        if sorted(header) != shard_names:
            raise StorageError(f"{store.url(version_path)}/{file} holds {sorted(header)}, shard 0 {shard_names}",
                               "every latent rank must write the same tensors")
        for name, meta in header.items():
            axis = latent_axis(variant, name)
            shape = list(meta["shape"])
            if shape[axis] != layout.width(shard):
                raise StorageError(f"{store.url(version_path)}/{file}: {name} has {shape[axis]} rows, shard {shard} "
                                   f"holds {layout.width(shard)}", "write each rank's own rows")
            shape[axis] = layout.n_latents
            first = tensors.setdefault(name, {"dtype": meta["dtype"], "shape": shape, "axis": axis})
            if first["dtype"] != meta["dtype"] or first["shape"] != shape:
                raise StorageError(f"{store.url(version_path)}/{file}: {name} is {meta['dtype']} {meta['shape']}, "
                                   f"unlike shard 0's", "every latent rank must write the same tensors")
    index = {"format": FORMAT, "variant": variant, "layout": layout.as_dict(), "replicated": REPLICATED,
             "shards": [{"file": shard_file(i, layout.n_shards), "start": layout.shard_range(i)[0],
                         "stop": layout.shard_range(i)[1]} for i in range(layout.n_shards)],
             "tensors": tensors}
    store.write_json(f"{version_path}/{INDEX}", index)
    return index


@contextlib.contextmanager
def sharded_commit(store: ArtifactStore, name: str, variant: str, layout: LatentLayout, *, root: bool = True,
                   share: Callable[[str | None], str] | None = None, wait: Callable[[], None] | None = None,
                   **pointer_info) -> Iterator[str]:
    """Every latent rank enters this block; it yields the version folder to write into. The root
    (the committing rank) opens the version (``ArtifactStore.writing`` of artifact ``name``, its
    pointer recording ``pointer_info`` and ``sharded``: the layout) and ``share`` gives its path to
    the others (a broadcast from the root: it gets the root's path on the root, None elsewhere,
    and returns the root's path; single process: not needed). In the block each rank calls
    :func:`write_shard`; the root also :func:`write_replicated` and the JSON files. On leaving,
    ``wait()`` (a barrier over the latent ranks) lets every shard land, then the root writes the
    index (:func:`write_index`) and commits.

    A rank whose block raises still reaches ``wait()`` before its error propagates, so no rank is
    left waiting at the barrier: a shard that was not written, or not whole, makes the root's
    index check fail (StorageError naming the file) and nothing is committed; an error in the
    root's block commits nothing either (the other ranks return; the root's error is the run's)."""
    wait = wait or (lambda: None)
    if not root:
        if share is None:
            raise PlatformError("a non-committing rank needs share (the root's broadcast of the version path)",
                                "pass share=, e.g. a torch.distributed.broadcast_object_list from the root")
        try:
            yield share(None)
        finally:
            wait()
        return
    with store.writing(name, sharded=layout.as_dict(), **pointer_info) as version:
        if share is not None:
            share(version)
        try:
            yield version
        finally:
            wait()
        write_index(store, version, variant, layout)


def save_sharded(store: ArtifactStore, name: str, variant: str, layout: LatentLayout,
                 tensors: dict[str, torch.Tensor], json_files: dict[str, dict] | None = None,
                 **pointer_info) -> str:
    """Commit the whole-SAE ``tensors`` (names as in the module docstring) as a checkpoint of
    ``name`` split into ``layout``'s shards, from one process (tests, conversions), with the JSON
    files ``json_files`` ({file name: content}). Returns the committed version folder.

    What ``load_sae`` then needs, and nothing here checks: ``name`` is the checkpoint's artifact
    name (``catalog.checkpoint_name(sae_name)``, i.e. ``sae/<sae_name>``, not the bare SAE name);
    tensor names carry their prefix (``sae.W_enc``, ``adam.W_enc.exp_avg``, ``trainer.…``: a plain
    ``state_dict`` must be renamed); ``json_files`` holds ``cfg.json`` (the SAE's config, whose
    ``variant`` must be ``variant``), as ``trainer.save_checkpoint`` writes it."""
    with sharded_commit(store, name, variant, layout, **pointer_info) as version:
        for shard in range(layout.n_shards):
            write_shard(store, version, variant, layout, shard, shard_slice(tensors, variant, layout, shard))
        write_replicated(store, version, variant, tensors)
        for file, content in (json_files or {}).items():
            store.fs.pipe_file(f"{version}/{file}", json.dumps(content, indent=2, default=str).encode())
    return store.resolve(name)


# -- reading -------------------------------------------------------------------------------------

def is_sharded(store: ArtifactStore, path: str) -> bool:
    """Whether the checkpoint version at ``path`` is written in shards (an index, or shard files
    without one: then reading it raises, naming the missing index)."""
    files = [p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(path, detail=False)]
    return INDEX in files or any(f.startswith("shard-") and f.endswith(".safetensors") for f in files)


@dataclass(frozen=True)
class ShardedCheckpoint:
    """A committed sharded checkpoint version, checked and ready to read: its ``path``, the
    ``index`` (index.json), the ``layout`` it was written in and the sha256 its writer recorded
    of each file (``recorded``; None for a version without checksums)."""

    store: ArtifactStore
    name: str
    path: str
    index: dict
    recorded: dict | None
    verified: set = field(default_factory=set, compare=False)  # files hashed as recorded by this reader

    @property
    def layout(self) -> LatentLayout:
        return LatentLayout(**self.index["layout"])

    @property
    def variant(self) -> str:
        return self.index["variant"]

    def whole_bytes(self, prefix: str = "") -> int:
        """Bytes of every tensor whose name starts with ``prefix``, whole (gathered)."""
        return sum(_nbytes(meta) for name, meta in self.index["tensors"].items() if name.startswith(prefix))

    def read(self, layout: LatentLayout, shard: int, prefix: str = "", device=None) -> dict[str, torch.Tensor]:
        """Shard ``shard`` of ``layout`` of this checkpoint (:func:`read_shard`); each file is hashed
        against its record once per ShardedCheckpoint."""
        return _read(self, layout, shard, prefix, device)

    def refuse(self, file: str, problem: str) -> StorageError:
        return StorageError(f"{self.store.url(self.path)}/{file} {problem}; the checkpoint was refused",
                            rebuild_fix(self.store, self.name))


def _nbytes(meta: dict) -> int:
    return math.prod(meta["shape"]) * DTYPES[meta["dtype"]].itemsize


def open_sharded(store: ArtifactStore, sae_name: str, version: str | None = None) -> ShardedCheckpoint:
    """The committed (or ``version``'s) sharded checkpoint of ``sae_name``, after the store's
    presence check (every recorded file there with its size, index.json as recorded). StorageError
    naming the file when the index is missing or unreadable, or names a shard that is not there."""
    name = checkpoint_name(sae_name)
    what = f"SAE checkpoint {sae_name!r}"
    if version is None:
        version = store.version_of(store.require(name, what, "materialize sae_checkpoint first"))
    else:
        store.check_version(name, version, what)
    path = store.path(name, version)
    store.check_intact(name, version, what=what)
    checkpoint = ShardedCheckpoint(store, name, path, {}, store.recorded_files(name, version, what))
    if not store.fs.exists(f"{path}/{INDEX}"):
        raise checkpoint.refuse(INDEX, "is missing: its shards were never indexed (a writer that died before "
                                       "the commit, or a deleted file)")
    try:
        index = json.loads(store.fs.cat_file(f"{path}/{INDEX}"))
        LatentLayout(**index["layout"])
        files = [index["replicated"], *(s["file"] for s in index["shards"])]
    except (ValueError, KeyError, TypeError, PlatformError) as error:
        raise checkpoint.refuse(INDEX, f"is not a valid index ({type(error).__name__}: {error})") from error
    for file in files:
        if not store.fs.exists(f"{path}/{file}"):
            raise checkpoint.refuse(file, "is missing (named by index.json)")
    return ShardedCheckpoint(store, name, path, index, checkpoint.recorded)


@contextlib.contextmanager
def _opened(checkpoint: ShardedCheckpoint, file: str, consume: Callable[[int, bytes], None] | None = None,
            plain: bool = False) -> Iterator:
    """safe_open of one file of ``checkpoint`` after its bytes hash as its writer recorded (a
    changed file is refused naming it; ``consume(offset, block)`` is given each block as it is hashed,
    when it is: ``Copier``); a remote store's file is copied to a temporary file first. ``plain``:
    a ``tensor_rows.RowFile`` instead (plain reads, nothing mapped: a reader of every block)."""
    store, remote = checkpoint.store, f"{checkpoint.path}/{file}"
    with contextlib.ExitStack() as stack:
        if store.is_local:
            local = remote
        else:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="sae-shard-"))
            local = os.path.join(folder, file)
            store.fs.get_file(remote, local)
        as_recorded(checkpoint, file, LocalFileSystem(), local, consume)
        try:
            handle = RowFile(stack.enter_context(open(local, "rb")), os.path.getsize(local)) if plain \
                else stack.enter_context(safe_open(local, framework="pt"))
        except Exception as error:  # safetensors' own error kinds
            raise checkpoint.refuse(file, f"is not a valid safetensors file ({type(error).__name__}: {error})") \
                from error
        yield handle


def as_recorded(checkpoint: ShardedCheckpoint, file: str, fs, path: str,
                consume: Callable[[int, bytes], None] | None = None) -> bool:
    """The rule every reader of a checkpoint's tensor file keeps, sharded or not (``_opened``; an unsharded
    one's whole files: ``checkpoint_files.read_tensors``): its bytes (``path`` on ``fs``) hash as its writer
    recorded (the store's CHECKSUMS.json; ``check_intact`` compares sizes only, and an edit in place keeps
    the size), checked once per reader (``checkpoint.verified``), each block given to ``consume(offset,
    block)`` as it is hashed (``Copier``: one pass, not two). StorageError naming the file and the fix when
    they differ. Whether it was hashed now: False when hashed before or unrecorded (the caller reads it)."""
    expected = (checkpoint.recorded or {}).get(file, {}).get(checksums.HASH)
    if expected is None or file in checkpoint.verified:
        return False
    if checksums.digest_file(fs, path, consume=consume) != expected:
        raise checkpoint.refuse(file, "differs from the bytes recorded at its commit (sha256 mismatch)")
    checkpoint.verified.add(file)
    return True


def read_shard(store: ArtifactStore, sae_name: str, layout: LatentLayout, shard: int, *,
               version: str | None = None, prefix: str = "", device=None) -> dict[str, torch.Tensor]:
    """Shard ``shard`` of ``layout`` of ``sae_name``'s committed (or ``version``'s) sharded
    checkpoint, whatever layout it was written in: each per-latent tensor's rows
    ``layout.shard_range(shard)``, assembled from only the source shards overlapping them, and
    every replicated tensor; only names starting with ``prefix`` (``"sae."``: the weights).
    StorageError naming the file for a missing index or shard, a shard whose bytes changed since
    the commit, a tensor holding NaN/inf, or a layout of another number of latents."""
    return open_sharded(store, sae_name, version).read(layout, shard, prefix, device)


def _read(checkpoint: ShardedCheckpoint, layout: LatentLayout, shard: int, prefix: str, device) -> dict:
    """``ShardedCheckpoint.read``."""
    if layout.n_latents != checkpoint.layout.n_latents:
        raise checkpoint.refuse(INDEX, f"describes {checkpoint.layout.n_latents} latents, not the {layout.n_latents} "
                                       "asked for")
    return _read_rows(checkpoint, *layout.shard_range(shard), prefix, device)


def _read_rows(checkpoint: ShardedCheckpoint, start: int, stop: int, prefix: str, device,
               keep: Callable[[str], bool] = lambda name: True) -> dict:
    """Rows [start, stop) of every per-latent tensor of ``checkpoint`` named ``prefix…`` that ``keep``
    (from the source shards overlapping them only) and every such replicated tensor."""
    wanted = {n: m for n, m in checkpoint.index["tensors"].items() if n.startswith(prefix) and keep(n)}
    out: dict[str, torch.Tensor] = {}
    for name, meta in wanted.items():
        if meta["axis"] is not None:
            shape = list(meta["shape"])
            shape[meta["axis"]] = stop - start
            out[name] = torch.empty(shape, dtype=DTYPES[meta["dtype"]], device=device)
    with _opened(checkpoint, checkpoint.index["replicated"]) as f:
        replicated = {name: f.get_tensor(name).to(device) for name, m in wanted.items() if m["axis"] is None}
    _check_finite(checkpoint, checkpoint.index["replicated"], replicated)
    out.update(replicated)
    source = checkpoint.layout
    for j, lo, hi in source.overlaps(start, stop):
        file = checkpoint.index["shards"][j]["file"]
        base = source.shard_range(j)[0]
        piece = {}
        for name, meta in wanted.items():
            if meta["axis"] not in (None, 0):
                raise checkpoint.refuse(INDEX, f"gives {name} latent axis {meta['axis']}; only axis 0 is read")
            if meta["axis"] == 0:
                piece[name] = out[name][lo - start:hi - start]
        copier = Copier.of(checkpoint, file, {name: (lo - base, hi - base, t) for name, t in piece.items()})
        with _opened(checkpoint, file, consume=copier) as f:
            if not (copier and copier.fed):  # not hashed now (before, by this reader, or not recorded): by slice
                for name, target in piece.items():
                    target.copy_(f.get_slice(name)[lo - base:hi - base])
        _check_finite(checkpoint, file, piece)
    return out


@dataclass
class Copier:
    """Byte ranges of a file copied into their tensors as the file is hashed (``as_recorded``'s consume):
    one pass over a shard's bytes where hashing then slicing made two (a 2^20-latent resume's 7.26 GB
    shard read twice). ``ranges``: (first byte, tensor's bytes: a uint8 view), in the file's order."""

    ranges: list[tuple[int, torch.Tensor]]
    fed: int = 0  # bytes consumed so far

    @classmethod
    def of(cls, checkpoint: ShardedCheckpoint, file: str, rows: dict[str, tuple[int, int, torch.Tensor]]):
        """The copier of rows [a, b) of each tensor of ``file`` into its CPU tensor (``rows``: name ->
        (a, b, target)), when ``_opened`` will hash the file now; else None (then it is read by slice)."""
        expected = (checkpoint.recorded or {}).get(file, {}).get(checksums.HASH)
        if expected is None or file in checkpoint.verified or any(t.device.type != "cpu" for *_, t in rows.values()):
            return None
        path = f"{checkpoint.path}/{file}"
        header = _header(checkpoint.store, path)
        data = checkpoint.store.fs.size(path) - max((m["data_offsets"][1] for m in header.values()), default=0)
        ranges = []
        for name, (a, b, target) in rows.items():
            begin, end = header[name]["data_offsets"]
            row_bytes = (end - begin) // max(1, header[name]["shape"][0])
            ranges.append((data + begin + a * row_bytes, target.reshape(-1).view(torch.uint8)))
        return cls(sorted(ranges, key=lambda r: r[0]))

    def __call__(self, offset: int, block: bytes) -> None:
        view, end = memoryview(block), offset + len(block)
        for first, target in self.ranges:
            lo, hi = max(first, offset), min(first + target.numel(), end)
            if lo < hi:
                memoryview(target.numpy())[lo - first:hi - first] = view[lo - offset:hi - offset]
        self.fed = end


def _check_finite(checkpoint: ShardedCheckpoint, file: str, tensors: dict[str, torch.Tensor]) -> None:
    bad = non_finite(tensors)
    if bad:
        raise checkpoint.refuse(file, f"holds NaN/inf in {', '.join(bad[:4])}{' …' if len(bad) > 4 else ''}")


def gather_limit_bytes() -> int:
    """The most bytes one process may gather from shards: ``$SAE_PLATFORM_GATHER_LIMIT_BYTES``, or
    half the memory available now (``MemAvailable`` of /proc/meminfo; the reader holds the tensors
    plus one source slice at a time)."""
    set_limit = env_value(GATHER_LIMIT_ENV, None, int, ge=0)
    if set_limit is not None:
        return set_limit
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return kib * 1024 // 2
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") // 2


def gathered_state(store: ArtifactStore, sae_name: str, *, version: str | None = None, prefix: str = "",
                   limit_bytes: int | None = None, purpose: str = "gather it", device=None) -> dict[str, torch.Tensor]:
    """Every tensor (names starting with ``prefix``) of ``sae_name``'s sharded checkpoint, whole, in
    this process: :func:`read_shard` of a one-shard layout. Refuses first, with a StorageError naming
    the size and the limit, when they would take more than ``limit_bytes`` (default
    :func:`gather_limit_bytes`); ``purpose`` says what the gathering was for."""
    checkpoint = open_sharded(store, sae_name, version)
    check_gather(checkpoint, prefix, limit_bytes, purpose)
    return checkpoint.read(LatentLayout(checkpoint.layout.n_latents, 1), 0, prefix, device)


def check_gather(checkpoint: ShardedCheckpoint, prefix: str = "", limit_bytes: int | None = None,
                 purpose: str = "gather it") -> None:
    """StorageError when the tensors of ``checkpoint`` starting with ``prefix`` take more than
    ``limit_bytes`` (default :func:`gather_limit_bytes`) whole."""
    limit = gather_limit_bytes() if limit_bytes is None else limit_bytes
    size = checkpoint.whole_bytes(prefix)
    if size > limit:
        raise StorageError(
            f"SAE checkpoint {checkpoint.store.url(checkpoint.path)} is sharded over {checkpoint.layout.n_shards} "
            f"latent shards and would take {size:,} bytes ({size / 2**30:.2f} GiB) whole in one process, more than "
            f"the {limit:,} bytes ({limit / 2**30:.2f} GiB) allowed, so this process cannot {purpose}",
            f"run it where more memory is free, or raise {GATHER_LIMIT_ENV} (bytes; default: half the available "
            "memory) if the memory is there")


def require_gatherable(store: ArtifactStore, sae_name: str, purpose: str, *, version: str | None = None,
                       limit_bytes: int | None = None) -> None:
    """Nothing for an unsharded checkpoint of ``sae_name``; for a sharded one, :func:`check_gather`
    of its SAE weights (``sae.*``): a StorageError naming the size and the limit, before anything
    is read, when this process cannot hold the whole SAE to ``purpose``."""
    name = checkpoint_name(sae_name)
    path = store.require(name, f"SAE checkpoint {sae_name!r}", "materialize sae_checkpoint first") \
        if version is None else store.path(name, version)
    if is_sharded(store, path):
        check_gather(open_sharded(store, sae_name, store.version_of(path)), SAE, limit_bytes, purpose)


# -- one range of decoder rows, either kind of checkpoint ----------------------------------------

UNSHARDED_WEIGHTS = "sae_weights.safetensors"  # an unsharded checkpoint's weights (trainer.py's layout)


def _checkpoint_version(store: ArtifactStore, sae_name: str, version: str | None) -> tuple[str, str]:
    """(version, its folder) of ``sae_name``'s committed checkpoint or of ``version`` (still stored)."""
    name, what = checkpoint_name(sae_name), f"SAE checkpoint {sae_name!r}"
    if version is None:
        version = store.version_of(store.require(name, what, "materialize sae_checkpoint first"))
    else:
        store.check_version(name, version, what)
    return version, store.path(name, version)


def checkpoint_config(store: ArtifactStore, sae_name: str, version: str | None = None) -> dict:
    """cfg.json of ``sae_name``'s committed (or ``version``'s) checkpoint, sharded or not, after the
    store's presence check (cfg.json hashes as recorded): its ``"sae"`` is the SAE's config
    (variant, d_model, n_latents …), read without any tensor. StorageError naming the file when it
    is missing or damaged."""
    version, path = _checkpoint_version(store, sae_name, version)
    name, what = checkpoint_name(sae_name), f"SAE checkpoint {sae_name!r}"
    store.check_intact(name, version, what=what)
    with store.damaged(f"{path}/cfg.json", f"cfg.json of {what}", rebuild_fix(store, name)):
        cfg = json.loads(store.fs.cat_file(f"{path}/cfg.json"))
        int(cfg["sae"]["n_latents"]), str(cfg["sae"]["variant"])  # a KeyError here: cfg.json is damaged
    return cfg


def decoder_rows(store: ArtifactStore, sae_name: str, start: int, stop: int, *, version: str | None = None,
                 device=None) -> torch.Tensor:
    """``W_dec[start:stop]`` ([stop - start, d_out], in the checkpoint's dtype, on ``device``) of
    ``sae_name``'s committed (or ``version``'s) checkpoint, sharded or not: :func:`latent_rows` of
    W_dec alone. Why: pass 2 of one feature shard needs only its latents' decoder directions (the
    logit effects), a 1/n_shards part of a wide SAE's weights. Raises as :func:`latent_rows`."""
    return latent_rows(store, sae_name, start, stop, version=version, keep=lambda name: name == "W_dec",
                       device=device)["W_dec"]


def latent_rows(store: ArtifactStore, sae_name: str, start: int, stop: int, *, version: str | None = None,
                keep: Callable[[str], bool] = lambda name: True, device=None) -> dict[str, torch.Tensor]:
    """The SAE weights (state_dict names) that ``keep`` of ``sae_name``'s committed (or ``version``'s)
    checkpoint, sharded or not, as latents [start, stop) need them: rows [start, stop) of each per-latent
    tensor (W_enc, b_enc, W_dec, JumpReLU's threshold: ``latent_axis``), every other tensor whole, in
    the checkpoint's dtypes on ``device``, without building the SAE or reading any other tensor:
    safetensors' ``get_slice`` reads just those rows (a sharded checkpoint: from the shards overlapping
    them). StorageError naming the file for a missing checkpoint, a file whose bytes changed since the
    commit, or NaN/inf in what was read; PlatformError for a range outside [0, n_latents)."""
    version, path = _checkpoint_version(store, sae_name, version)
    config = checkpoint_config(store, sae_name, version)["sae"]
    n_latents = int(config["n_latents"])
    if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= n_latents):
        raise PlatformError(f"latents [{start!r}, {stop!r}) are outside SAE checkpoint {sae_name!r}'s "
                            f"[0, {n_latents})",
                            "pass 0 <= start <= stop <= n_latents (features.feature_shard gives valid ranges)")
    if is_sharded(store, path):
        checkpoint = open_sharded(store, sae_name, version)
        return sae_state(_read_rows(checkpoint, start, stop, SAE, device, keep=lambda name: keep(name[len(SAE):])))
    checkpoint = unsharded_checkpoint(store, sae_name, version)
    with _opened(checkpoint, UNSHARDED_WEIGHTS) as f:
        rows = {name: (f.get_tensor(name) if latent_axis(config["variant"], SAE + name) is None
                       else f.get_slice(name)[start:stop]).to(device) for name in f.keys() if keep(name)}
    _check_finite(checkpoint, UNSHARDED_WEIGHTS, rows)
    return rows


def unsharded_checkpoint(store: ArtifactStore, sae_name: str, version: str) -> ShardedCheckpoint:
    """Version ``version`` of ``sae_name``'s unsharded checkpoint as a reader of its files: each hashed as
    its writer recorded (:func:`as_recorded`) when it is read. StorageError when the record was changed."""
    name = checkpoint_name(sae_name)
    return ShardedCheckpoint(store, name, store.path(name, version), {},
                             store.recorded_files(name, version, f"SAE checkpoint {sae_name!r}"))


def weight_blocks(store: ArtifactStore, sae_name: str, *, version: str | None = None,
                  block_elements: int = 1 << 24) -> Iterator[tuple[str, torch.Tensor]]:
    """Every SAE weight of ``sae_name``'s committed (or ``version``'s) checkpoint, sharded or not, in
    state_dict name order, as (name, block) for consecutive blocks of its rows of at most
    ``block_elements`` elements (at least one per tensor: an empty tensor is its own block), read by
    slice: what ``features.fingerprint_of`` digests, so the whole SAE's fingerprint is taken holding one
    block (64 MiB) at a time, never the SAE (read with plain reads: ``tensor_rows``, not mapped). StorageError
    naming the file for a file whose bytes changed since the commit, or NaN/inf in a block (the whole SAE is
    checked, as ``load_sae`` checks it)."""
    version, path = _checkpoint_version(store, sae_name, version)
    if is_sharded(store, path):
        checkpoint = open_sharded(store, sae_name, version)
        tensors = sorted((n, m) for n, m in checkpoint.index["tensors"].items() if n.startswith(SAE))
        sources = {n: [checkpoint.index["replicated"]] if m["axis"] is None
                   else [s["file"] for s in checkpoint.index["shards"]] for n, m in tensors}
    else:
        checkpoint = unsharded_checkpoint(store, sae_name, version)
        with _opened(checkpoint, UNSHARDED_WEIGHTS, plain=True) as f:
            tensors = sorted((SAE + n, None) for n in f.keys())
        sources = {n: [UNSHARDED_WEIGHTS] for n, _ in tensors}
    with contextlib.ExitStack() as stack:
        opened: dict = {}  # each file opened (and hashed) once
        for name, _ in tensors:
            for file in sources[name]:
                if file not in opened:
                    opened[file] = stack.enter_context(_opened(checkpoint, file, plain=True))
                stored = name if checkpoint.index else name[len(SAE):]  # a shard's names carry the prefix
                yield from _blocks(checkpoint, file, opened[file], stored, name[len(SAE):], block_elements)


def _blocks(checkpoint: ShardedCheckpoint, file: str, handle: RowFile, stored: str, name: str,
            block_elements: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(``name``, block) of consecutive rows of tensor ``stored`` of the opened ``file``, each checked finite."""
    def read(*rows) -> torch.Tensor:
        try:
            return handle.read(stored, *rows)
        except (ValueError, EOFError) as error:  # hashed as written, so written so: refused, naming it
            raise checkpoint.refuse(file, f"is not a valid safetensors file ({type(error).__name__}: {error})") \
                from error

    shape = handle.shape(stored)
    if not shape or not shape[0]:  # a scalar or an empty tensor: one block
        blocks: Iterator[torch.Tensor] = iter([read()])
    else:
        rows = max(1, block_elements // max(1, math.prod(shape[1:])))
        blocks = (read(lo, min(lo + rows, shape[0])) for lo in range(0, shape[0], rows))
    for block in blocks:
        _check_finite(checkpoint, file, {name: block})
        yield name, block
