"""A user-supplied direction (a probe, a steering vector, a difference of means) committed as an SAE
checkpoint of the one-latent ``vector`` dictionary (``sae.vector.VectorDictionary``), so the feature
stages (tables, contexts, explanations, browser) describe it like any latent:
``sae-platform vector add NAME FILE`` then ``sae-platform features --sae NAME``.

Input: a ``.npy`` file (read with ``allow_pickle=False``: nothing in it can run) or a
``.safetensors`` file holding one tensor, or several and the ``key`` naming one; a floating-point
vector of shape [d_model] or [1, d_model], d_model the width of the cached activations it reads,
finite and not zero. Anything else is refused with a ``VectorError`` naming the file and the fix,
before anything is written.

The checkpoint (``sae/<name>/<version>/``, committed through ``ArtifactStore.writing``, so it is
whole or absent) holds ``sae_weights.safetensors`` and ``cfg.json`` like a trained one, with the
shuffled store (so the hook point) it reads as its ``data``; its pointer records the direction's
sha256, bias and key as its ``settings``: adding the same vector again commits nothing, so the
feature tables built from it stay current.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from sae_platform.activations import activation_attrs
from sae_platform.catalog import check_sae_name, checkpoint_name, shuffle_for_hook_point
from sae_platform.errors import PlatformError
from sae_platform.sae import VectorDictionary
from sae_platform.shuffled import open_shuffled
from sae_platform.storage import ArtifactStore
from sae_platform.trainer import data_fingerprint

SUFFIXES = (".npy", ".safetensors")
SAVE_HINT = "save it with numpy.save(path, vector.astype(numpy.float32)) or safetensors' save_file({'vector': v}, path)"


class VectorError(PlatformError):
    """A direction file that cannot become a vector dictionary (format, dtype, shape, values)."""


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as error:  # numpy: "Object arrays cannot be loaded when allow_pickle=False"
        if "allow_pickle" in str(error):
            raise VectorError(f"{path} holds a pickled object array: it was refused unread (a pickle can run code)",
                              f"save the plain numeric vector instead: {SAVE_HINT}") from error
        raise VectorError(f"{path} is not a valid .npy file ({error})", SAVE_HINT) from error
    except (OSError, EOFError) as error:
        raise VectorError(f"{path} is not a valid .npy file ({type(error).__name__}: {error})", SAVE_HINT) from error


def _read_safetensors(path: Path, key: str | None) -> np.ndarray:
    try:
        tensors = load_safetensors(path.read_bytes())
    except (SafetensorError, ValueError) as error:
        raise VectorError(f"{path} is not a valid safetensors file ({error})", SAVE_HINT) from error
    if key is None and len(tensors) != 1:
        raise VectorError(f"{path} holds {len(tensors)} tensors ({', '.join(sorted(tensors)) or 'none'}), not one",
                          "name the one to use with --key NAME")
    name = key if key is not None else next(iter(tensors))
    if name not in tensors:
        raise VectorError(f"{path} has no tensor {name!r} (it holds: {', '.join(sorted(tensors))})",
                          "pass one of those names with --key")
    tensor = tensors[name]
    if not tensor.is_floating_point():
        raise VectorError(f"tensor {name!r} of {path} has dtype {tensor.dtype}, not a floating-point type",
                          f"store the direction as float32: {SAVE_HINT}")
    return tensor.to(torch.float64).numpy()


def read_direction(path: str | Path, d_model: int, key: str | None = None) -> np.ndarray:
    """The direction in ``path`` (.npy or .safetensors, see the module docstring) as float64
    [d_model]. Raises VectorError naming the file and the fix when it is missing, of another format,
    pickled, of a non-float dtype, of another shape, holds NaN/inf or is all zeros."""
    path = Path(path)
    if not path.is_file():
        raise VectorError(f"{path} does not exist or is not a file", "pass the path of a .npy or .safetensors file")
    if path.suffix not in SUFFIXES:
        raise VectorError(f"{path} is neither .npy nor .safetensors", SAVE_HINT)
    if path.suffix == ".npy" and key is not None:
        raise VectorError(f"--key {key!r} names a tensor, but {path} is a .npy file holding one array",
                          "leave --key out for a .npy file")
    array = _read_npy(path) if path.suffix == ".npy" else _read_safetensors(path, key)
    if array.dtype.kind != "f" and path.suffix == ".npy":
        raise VectorError(f"{path} has dtype {array.dtype}, not a floating-point type",
                          f"store the direction as float32: {SAVE_HINT}")
    if array.shape not in ((d_model,), (1, d_model)):
        raise VectorError(f"{path} has shape {list(array.shape)}, but the activations it reads are {d_model} wide",
                          f"pass one direction of shape [{d_model}] or [1, {d_model}] for this hook point (or name "
                          "the hook point it belongs to with --hook-point)")
    vector = array.astype(np.float64).reshape(d_model)
    bad = np.flatnonzero(~np.isfinite(vector))
    if bad.size:
        raise VectorError(f"{path} holds {bad.size} NaN/inf value(s), the first at index {int(bad[0])}",
                          "recompute the direction (a probe that diverged, a mean over no rows?) and save it again")
    if not np.any(vector):
        raise VectorError(f"{path} is all zeros: it has no direction", "pass the direction itself (e.g. a "
                          "probe's weight, or the difference of two class means)")
    return vector


def add_vector(store: ArtifactStore, name: str, path: str | Path, shuffle_name: str, *,
               hook_point: str | None = None, bias: float = 0.0, key: str | None = None) -> dict:
    """Commit the direction in ``path`` as checkpoint ``sae/<name>`` of a vector dictionary reading
    the shuffled store of ``hook_point`` (an entry of caching.config.hook_points; None: the first)
    built from ``shuffle_name``. ``bias``: raw activation units, added to the projection before the
    ReLU (for a probe w·x + c: bias = c / ||w||). Returns {"name", "path", "committed" (False when
    the same vector was already committed), "norm", "d_model", "shuffle"}.

    Raises VectorError (``read_direction``'s, a non-finite bias, a name held by a trained SAE, a
    transcoder store) or StorageError (no shuffled store, a hook point not cached); nothing is
    written then."""
    check_sae_name(name)
    if not np.isfinite(bias):
        raise VectorError(f"--bias {bias} is not a finite number", "pass a number, e.g. --bias 0")
    store_name = shuffle_for_hook_point(store, shuffle_name, hook_point)
    shuffled = open_shuffled(store, store_name)
    if activation_attrs(store, store_name).get("d_in") is not None:
        raise VectorError(f"hook point {hook_point!r} is a transcoder's 'IN -> OUT' pair: a vector reads one space",
                          "cache the hook point the direction belongs to on its own and name it with --hook-point")
    vector = read_direction(path, shuffled.d_model, key)
    settings = {"variant": VectorDictionary.variant, "sha256": hashlib.sha256(vector.tobytes()).hexdigest(),
                "bias": float(bias), "source": Path(path).name, **({"key": key} if key is not None else {})}
    fingerprint = data_fingerprint(shuffled)
    pointer = store.pointer(checkpoint_name(name))
    if pointer is not None and (pointer.get("settings") or {}).get("variant") != VectorDictionary.variant:
        raise VectorError(f"there is a trained SAE named {name!r}: a vector would replace its checkpoint",
                          "pick another name for the vector")
    result = {"name": name, "norm": float(np.linalg.norm(vector)), "d_model": shuffled.d_model, "shuffle": store_name}
    if pointer is not None and pointer.get("settings") == settings and pointer.get("data") == fingerprint:
        return {**result, "committed": False, "path": store.url(store.resolve(checkpoint_name(name)))}
    model = VectorDictionary.from_direction(torch.from_numpy(vector), bias)
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    cfg = {"sae": model.config, "vector": settings, "data": fingerprint, "step": 0, "tokens": 0, "final": True}
    with store.writing(checkpoint_name(name), step=0, tokens=0, final=True, settings=settings,
                       data=fingerprint) as version:
        store.fs.pipe_file(f"{version}/sae_weights.safetensors", save_safetensors(weights))
        store.fs.pipe_file(f"{version}/cfg.json", json.dumps(cfg, indent=2).encode())
    return {**result, "committed": True, "path": store.url(store.resolve(checkpoint_name(name)))}
