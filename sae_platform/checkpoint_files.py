"""The files of an unsharded SAE checkpoint read back (``trainer``'s layout: ``sae_weights.safetensors``,
``optimizer.safetensors`` / ``optimizer.json``, ``trainer_state.safetensors`` / ``trainer_state.json``),
safely: what a resume, the "already finished" check and ``load_sae`` read.

Nothing read back can run code: weights and states are safetensors (a header plus raw tensor bytes)
and JSON; no pickle is ever loaded. Checkpoints of earlier versions hold ``optimizer.pt`` /
``trainer_state.pt``: those are read with ``torch.load(weights_only=True)`` (torch's restricted
unpickler: tensors and plain containers only) and a file holding anything else is refused with a
:class:`StorageError` naming it. Every weight and Adam moment read is checked finite: a checkpoint
holding NaN/inf is refused naming the file, never resumed from, evaluated or kept as finished.
"""

import io
import json

import torch
from safetensors.torch import load as load_safetensors

from sae_platform.errors import StorageError
from sae_platform.sharded_checkpoint import UNSHARDED_WEIGHTS, non_finite
from sae_platform.storage import ArtifactStore

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


def finite_weights(store: ArtifactStore, path: str, step) -> dict[str, torch.Tensor]:
    """The SAE weights of the checkpoint at ``path`` (``sae_weights.safetensors``), refused with a
    StorageError naming the file when a tensor holds NaN/inf."""
    weights = read_tensors(store, path, UNSHARDED_WEIGHTS)
    refuse_non_finite(store, path, UNSHARDED_WEIGHTS, non_finite(weights), step)
    return weights


def read_tensors(store: ArtifactStore, path: str, file: str) -> dict[str, torch.Tensor]:
    """A safetensors file of a checkpoint, each tensor in memory of its own (writable: a resume
    trains them in place); anything else is refused (never unpickled)."""
    data = store.fs.cat_file(f"{path}/{file}")
    try:
        return load_safetensors(data)
    except Exception as error:  # safetensors raises its own SafetensorError / ValueError kinds
        raise StorageError(
            f"{store.url(path)}/{file} is not a valid safetensors file ({type(error).__name__}: {error}); it was "
            "refused, nothing in it was run", _DAMAGED_FIX) from error


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


def unsharded_files(store: ArtifactStore, path: str, step, device) -> tuple[dict, tuple[dict, dict], dict]:
    """An unsharded checkpoint's (weights, (Adam tensors, optimizer.json) as stored, trainer state: step,
    tokens, history, tokens_since_fired, rng), of this version's files or an earlier version's
    ``optimizer.pt`` / ``trainer_state.pt`` (torch's restricted unpickler); refused (StorageError naming
    the file) when a weight or Adam moment is NaN/inf."""
    files = {p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(path, detail=False)}
    weights = finite_weights(store, path, step)
    if "trainer_state.json" in files:
        optimizer_file = "optimizer.safetensors"
        adam = read_tensors(store, path, optimizer_file), read_json(store, path, "optimizer.json")
        saved = {**read_json(store, path, "trainer_state.json"),
                 **read_tensors(store, path, "trainer_state.safetensors")}
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
