"""The files of an unsharded SAE checkpoint read back (``trainer``'s layout: ``sae_weights.safetensors``,
``optimizer.safetensors`` / ``optimizer.json``, ``trainer_state.safetensors`` / ``trainer_state.json``),
safely: what a resume, the "already finished" check and ``load_sae`` read.

Nothing read back can run code: weights and states are safetensors (a header plus raw tensor bytes)
and JSON; no pickle is ever loaded. Checkpoints of earlier versions hold ``optimizer.pt`` /
``trainer_state.pt``: those are read with ``torch.load(weights_only=True)`` (torch's restricted
unpickler: tensors and plain containers only) and a file holding anything else is refused with a
:class:`StorageError` naming it. Every weight and Adam moment read is checked finite: a checkpoint
holding NaN/inf is refused naming the file, never resumed from, evaluated or kept as finished. A tensor
file read whole (``load_sae``, a resume) is hashed in the pass that reads it and refused naming it when
its bytes differ from what its writer recorded (``sharded_checkpoint.as_recorded``: the rule a sharded
checkpoint's reader and ``latent_slice.stored_sae`` keep too); the "already finished" check reads the
weights block by block for NaN/inf only (``check_kept``: the store's cheap presence check, no hash).
"""

import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sae_platform.catalog import checkpoint_name
from sae_platform.errors import StorageError
from sae_platform.sharded_checkpoint import (
    SAE,
    UNSHARDED_WEIGHTS,
    Copier,
    ShardedCheckpoint,
    as_recorded,
    is_finite,
    is_sharded,
    non_finite,
    open_sharded,
)
from sae_platform.storage import ArtifactStore
from sae_platform.tensor_rows import HEADER_ERRORS, dtype_of, parse_header, read_into

_DAMAGED_FIX = ("the checkpoint is damaged or was tampered with: delete it (the whole sae/<sae_name> folder) and train "
                "again")


def refuse_non_finite(store: ArtifactStore, path: str, file: str, bad: list[str], step) -> None:
    """Raise StorageError naming ``file`` of the checkpoint at ``path`` when ``bad`` (the names of
    its tensors holding NaN/inf) is not empty: such a checkpoint is never used."""
    if bad:
        raise StorageError(
            f"the committed checkpoint {store.url(path)} (step {step}) holds NaN/inf in {', '.join(bad[:4])}"
            f"{' …' if len(bad) > 4 else ''} ({file}): it is refused, not resumed from, evaluated, exported or kept as "
            "finished", f"delete that checkpoint (the folder {store.url(path.rsplit('/', 1)[0])}) and train again; "
            "if the run diverged, with a lower lr")


def finite_weights(checkpoint: ShardedCheckpoint, step) -> dict[str, torch.Tensor]:
    """The SAE weights of the unsharded checkpoint ``checkpoint`` (``sae_weights.safetensors``:
    ``read_tensors``), refused with a StorageError naming the file when its bytes differ from what its
    writer recorded or a tensor holds NaN/inf."""
    weights = read_tensors(checkpoint, UNSHARDED_WEIGHTS)
    refuse_non_finite(checkpoint.store, checkpoint.path, UNSHARDED_WEIGHTS, non_finite(weights), step)
    return weights


def read_tensors(checkpoint: ShardedCheckpoint, file: str) -> dict[str, torch.Tensor]:
    """A safetensors file of an unsharded checkpoint (``sharded_checkpoint.unsharded_checkpoint``), each
    tensor read once from the file into memory of its own from torch's allocator (writable: a resume
    trains them in place; 64-byte aligned, as an uninterrupted run's, so nothing is copied again:
    ``trainer._owned``), in the pass that hashes the file as its writer recorded
    (``sharded_checkpoint.as_recorded``, the rule every checkpoint reader keeps; a version committed
    before checksums: read straight into them). Why not safetensors' ``load(bytes)``: the whole file as
    bytes, then every tensor copied out of it (3 GiB held and ~11 s for the 1.8 GB of a 2^17-latent
    checkpoint). StorageError naming the file when its bytes differ from the record or it is not a whole
    safetensors file (e.g. a pickle: refused, never unpickled)."""
    store, path = checkpoint.store, checkpoint.path
    with store.fs.open(f"{path}/{file}", "rb") as handle:
        stored = _stored_tensors(store, path, file, handle)
        tensors = {name: torch.empty(where.shape, dtype=where.dtype) for name, where in stored.items()}
        ranges = sorted(((where.begin, tensors[name].reshape(-1).view(torch.uint8)) for name, where in stored.items()),
                        key=lambda item: item[0])
        if not as_recorded(checkpoint, file, store.fs, f"{path}/{file}", consume=Copier(ranges)):
            for begin, target in ranges:  # one forward pass
                _read_into(store, path, file, handle, begin, target)
    return tensors


KEPT_BLOCK_BYTES = 64 << 20  # what ``check_kept`` holds of a weight at a time


@dataclass(frozen=True)
class _Stored:
    """Where one tensor of a safetensors file lies: its dtype and shape, bytes [begin, end) of the file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _stored_tensors(store: ArtifactStore, path: str, file: str, handle) -> dict[str, _Stored]:
    """The tensors the open safetensors ``file`` holds, by its header (``parse_header``), checked:
    known dtypes, each tensor's bytes its shape's, the file exactly as long as the header says (a
    writer stopped mid-file is refused). Reads the header only. StorageError naming the file."""
    try:
        size = store.fs.size(f"{path}/{file}")
        header, start = parse_header(handle, size)
        stored = {}
        for name, meta in header.items():
            dtype, shape = dtype_of(name, meta), tuple(int(n) for n in meta["shape"])
            begin, end = (int(offset) for offset in meta["data_offsets"])
            if min(shape, default=0) < 0 or begin < 0 or end - begin != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"{name} is {meta['dtype']} {list(shape)} in bytes [{begin}, {end})")
            stored[name] = _Stored(dtype, shape, start + begin, start + end)
        described = max((where.end for where in stored.values()), default=start)
        if described != size:
            raise ValueError(f"its header describes {described:,} bytes, the file holds {size:,}")
    except HEADER_ERRORS as error:
        raise _not_safetensors(store, path, file, error) from error
    return stored


def _read_into(store: ArtifactStore, path: str, file: str, handle, offset: int, target: torch.Tensor) -> None:
    """Bytes [offset, offset + len(target)) of the open ``file`` into ``target`` (a uint8 view)."""
    try:
        read_into(handle, offset, target)
    except EOFError as error:
        raise _not_safetensors(store, path, file, error) from error


def _not_safetensors(store: ArtifactStore, path: str, file: str, error: Exception) -> StorageError:
    return StorageError(f"{store.url(path)}/{file} is not a valid safetensors file ({type(error).__name__}: "
                        f"{error}); it was refused, nothing in it was run", _DAMAGED_FIX)


def non_finite_in_file(store: ArtifactStore, path: str, file: str, keep: Callable[[str], bool] = lambda name: True,
                       block_bytes: int = 64 << 20) -> list[str]:
    """Names of the tensors of safetensors ``file`` that ``keep`` holding NaN/inf, read block by block
    into one buffer of ``block_bytes``: the memory of one block whatever the tensors' size, and no
    byte of a tensor ``keep`` leaves out read. StorageError naming the file when it is not a whole
    safetensors file."""
    bad = []
    with store.fs.open(f"{path}/{file}", "rb") as handle:
        stored = _stored_tensors(store, path, file, handle)
        wanted = sorted(((n, w) for n, w in stored.items() if keep(n) and w.dtype.is_floating_point),
                        key=lambda item: item[1].begin)
        buffer = torch.empty(min(block_bytes, max((w.end - w.begin for _, w in wanted), default=0)),
                             dtype=torch.uint8)
        for name, where in wanted:
            step = max(1, len(buffer) // where.dtype.itemsize) * where.dtype.itemsize
            for begin in range(where.begin, where.end, step):
                block = buffer[:min(step, where.end - begin)]
                _read_into(store, path, file, handle, begin, block)
                if not is_finite(block.view(where.dtype)):
                    bad.append(name)
                    break
    return bad


def check_kept(store: ArtifactStore, sae_name: str, version: str, step) -> None:
    """What keeping checkpoint ``version`` of ``sae_name`` as finished reads (the "already finished"
    check: ``trainer.finished_checkpoint`` and ``train_sae``'s exit), sharded or not: the store's cheap
    presence check, every tensor file's header (one that is not a whole safetensors file, e.g. a
    pickle, is refused naming it, nothing in it run) and the SAE's weights, block by block
    (``non_finite_in_file``), checked finite. Never Adam's state nor a whole tensor: a finished SAE
    does not need its training state, and at 2^20 latents x 576 it is 2 x 7.26 GB of shards.
    StorageError naming the file: a weight holding NaN/inf (``refuse_non_finite``), a damaged file."""
    path = store.path(checkpoint_name(sae_name), version)
    if is_sharded(store, path):  # after the presence check, its index names the files (a missing one refused)
        index = open_sharded(store, sae_name, version).index
        files = [index["replicated"], *(shard["file"] for shard in index["shards"])]
    else:
        store.check_intact(checkpoint_name(sae_name), version, what=f"SAE checkpoint {sae_name!r}")
        files = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(path, detail=False)
                       if p.endswith(".safetensors"))
    for file in files:
        weights = file == UNSHARDED_WEIGHTS  # the whole file; a shard's weights are its ``sae.*`` tensors
        bad = non_finite_in_file(store, path, file, lambda n: weights or n.startswith(SAE), KEPT_BLOCK_BYTES)
        refuse_non_finite(store, path, file, bad, step)


def trainer_metadata(store: ArtifactStore, path: str) -> dict:
    """step, tokens, history and target_steps of the checkpoint version at ``path``, sharded or not:
    its trainer_state.json, or an earlier version's trainer_state.pt (torch's restricted unpickler);
    no other file read."""
    if store.fs.exists(f"{path}/trainer_state.json"):
        return read_json(store, path, "trainer_state.json")
    return legacy_torch_file(store, path, "trainer_state.pt")


def read_json(store: ArtifactStore, path: str, file: str) -> dict:
    try:
        return json.loads(store.fs.cat_file(f"{path}/{file}"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StorageError(f"{store.url(path)}/{file} is not valid JSON ({error}); it was refused",
                           _DAMAGED_FIX) from error


def legacy_torch_file(store: ArtifactStore, path: str, file: str, device=None):
    """``optimizer.pt`` / ``trainer_state.pt`` of a checkpoint of an earlier version: torch's
    restricted unpickler (tensors and plain containers only), never the full one."""
    try:
        return torch.load(io.BytesIO(store.fs.cat_file(f"{path}/{file}")), map_location=device, weights_only=True)
    except Exception as error:  # pickle.UnpicklingError for anything but tensors and plain data
        raise StorageError(
            f"{store.url(path)}/{file} holds more than tensors and plain data (a pickle that could run code): it "
            f"was refused, nothing in it was run ({type(error).__name__}: {str(error).splitlines()[0][:200]})",
            _DAMAGED_FIX) from error


def unsharded_files(checkpoint: ShardedCheckpoint, step, device) -> tuple[dict, tuple[dict, dict], dict]:
    """An unsharded checkpoint's (weights, (Adam tensors, optimizer.json) as stored, trainer state: step,
    tokens, history, tokens_since_fired, rng), of this version's files (``read_tensors``) or an earlier
    version's ``optimizer.pt`` / ``trainer_state.pt`` (torch's restricted unpickler); refused (StorageError
    naming the file) when its bytes differ from what its writer recorded or a weight or Adam moment is NaN/inf."""
    store, path = checkpoint.store, checkpoint.path
    files = {p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(path, detail=False)}
    weights = finite_weights(checkpoint, step)
    if "trainer_state.json" in files:
        optimizer_file = "optimizer.safetensors"
        adam = read_tensors(checkpoint, optimizer_file), read_json(store, path, "optimizer.json")
        saved = {**read_json(store, path, "trainer_state.json"),
                 **read_tensors(checkpoint, "trainer_state.safetensors")}
    else:  # a checkpoint of an earlier version: torch's optimizer state_dict, as indexed files (below)
        optimizer_file = "optimizer.pt"
        legacy = legacy_torch_file(store, path, optimizer_file, device)
        state = legacy["state"]
        adam = ({f"state.{i}.{k}": v for i, entries in state.items() for k, v in entries.items() if torch.is_tensor(v)},
                {"param_groups": legacy["param_groups"],
                 "state": {i: {k: v for k, v in e.items() if not torch.is_tensor(v)} for i, e in state.items()}})
        saved = legacy_torch_file(store, path, "trainer_state.pt")
    refuse_non_finite(store, path, optimizer_file, non_finite(adam[0]), step)
    return weights, adam, saved
