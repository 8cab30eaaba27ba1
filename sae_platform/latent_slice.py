"""One feature shard's latents of a dense SAE, loaded alone from its checkpoint: what that shard's passes 1
and 2 need (docs/design.md, "Feature tables"; pass 2 encodes the shard's rows again for its interval examples).

A dense variant (ReLU, JumpReLU, BatchTopK, Matryoshka: ``features.sparse_variant`` is false) stores
no sparse codes, so pass 1 of each feature shard encodes the batch itself with ``encode_slice``, which
reads only the shard's rows of W_enc and b_enc (and JumpReLU's thresholds), b_pre and the input scale
(and BatchTopK's threshold; a transcoder's output bias and scale): never W_dec, nor another shard's
rows. :func:`load_latent_slice` reads just those (``sharded_checkpoint.latent_rows``: safetensors'
``get_slice``; a sharded checkpoint: only the shards overlapping them), so a pass-1 job holds the
weights of one shard's latents plus O(d_model), not the whole SAE (before: 4.8 GB per job at 2^20
latents x 576, read whole, and gathered from a sharded checkpoint).

The partials record the whole SAE's ``features.sae_fingerprint``, as a job holding the whole SAE
records it, taken block by block (``sharded_checkpoint.weight_blocks``: 64 MiB at a time, every block
checked finite, as ``load_sae`` checks the whole) once per job: the partials are the same, bit for
bit. A checkpoint of an earlier version whose tensors are named otherwise (JumpReLU's log θ) is loaded
whole (``load_sae``), as before.

:func:`stored_sae` is the checkpoint of any variant with no weight at all (its config and that
fingerprint): what the steps that read none take instead of the whole SAE (the exactness check in
witness mode, pass 3 from stored codes), and what :func:`load_latent_slice` builds on.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from sae_platform.catalog import FIRST_STORE
from sae_platform.errors import PlatformError
from sae_platform.feature_codes import compute_and_write_partials
from sae_platform.features import FeatureError, FeatureSettings, StoredSAE, fingerprint_of, sparse_variant
from sae_platform.sae import SparseAutoencoder, build_sae, with_weights
from sae_platform.sharded_checkpoint import checkpoint_config, latent_rows, weight_blocks
from sae_platform.sharded_sae import SHARD_CLASSES, slice_model
from sae_platform.storage import ArtifactStore
from sae_platform.trainer import load_sae

UNREAD = ("W_dec",)  # what no encode reads: a slice leaves it on the meta device


@dataclass(frozen=True, kw_only=True)
class LatentSlice(StoredSAE):
    """An SAE as pass 1 or pass 2 of its latents [start, stop) sees it: the whole SAE's ``config`` and
    ``fingerprint`` (what its partials record), and ``model``, the variant's inference rule over those
    latents alone (``sharded_sae.slice_model``) holding their encoder weights (W_dec left on the meta
    device). Accepted where pass 1 takes an SAE (``features.compute_partials``) and where pass 2 encodes
    again (``feature_merge.merge_shard_tables``) for these latents."""

    start: int
    stop: int
    model: SparseAutoencoder

    @torch.no_grad()
    def encode_slice(self, x: Tensor, start: int, stop: int) -> Tensor:
        """As ``SparseAutoencoder.encode_slice``: activations [batch, stop - start] (normalised units)
        of latents [start, stop) for ``x`` [batch, d_model] raw. PlatformError for latents outside
        this slice's [self.start, self.stop) (their weights were not loaded)."""
        if not self.start <= start <= stop <= self.stop:
            raise PlatformError(f"latents [{start}, {stop}) are not all in the slice [{self.start}, {self.stop}) "
                                "whose weights this job loaded", "load_latent_slice the latents to encode")
        return self.model.encode_slice(x, start - self.start, stop - self.start)


def stored_sae(store: ArtifactStore, sae_name: str, *, version: str | None = None, device="cpu",
               fingerprint: str | None = None) -> StoredSAE | None:
    """``sae_name``'s committed (or ``version``'s) checkpoint, any variant, sharded or not, without its
    weights: a ``features.StoredSAE`` of its config (the model's, as ``load_sae`` builds it) and the
    fingerprint of the weights stored now (``features.sae_fingerprint`` of the whole SAE, taken block by
    block: ``sharded_checkpoint.weight_blocks``, 64 MiB at a time, every block checked finite), on
    ``device``. The one way a step that needs the SAE's config, range and fingerprint but no weight gets
    it: a dense SAE's passes 1 and 2 (``load_latent_slice``), the exactness check in witness mode
    (``feature_check.brute_force_check``) and pass 3 from stored codes. Why: the whole SAE is ~4.5 GiB at
    2^20 latents x d_model 576, above a feature job's budget; this holds one block. ``fingerprint``: one a
    previous call gave (the weights are then not read again). None, meaning load it whole
    (``load_sae``), for a checkpoint of an earlier version whose tensors are named otherwise (JumpReLU's
    log θ). StorageError naming the file for a changed file or NaN/inf anywhere in the weights; as
    ``checkpoint_config`` for a missing or damaged cfg.json."""
    config = dict(checkpoint_config(store, sae_name, version)["sae"])
    whole = build_sae(config.pop("variant"), config.pop("d_model"), config.pop("n_latents"), device="meta",
                      **config)  # shapes only: load_sae's model
    if fingerprint is None:
        fingerprint = _whole_fingerprint(store, sae_name, version, whole)
        if fingerprint is None:
            return None
    return StoredSAE(whole.config, fingerprint, torch.device(device))


def load_latent_slice(store: ArtifactStore, sae_name: str, start: int, stop: int, *, version: str | None = None,
                      device="cpu", fingerprint: str | None = None) -> LatentSlice | None:
    """Latents [start, stop) of ``sae_name``'s committed (or ``version``'s) checkpoint of a dense
    variant, sharded or not, on ``device``: their rows of every per-latent tensor but W_dec and every
    other tensor (see the module docstring), and the whole SAE's config and fingerprint
    (:func:`stored_sae`; ``fingerprint``: the one a previous call gave, so a job takes it once). None,
    meaning load it whole, for a checkpoint of an earlier version whose tensors are named otherwise, or
    of a variant with no model over a slice of its latents (``sharded_sae.SHARD_CLASSES``: a steering
    ``vector``'s dictionary).
    FeatureError for a sparse variant (TopK, Switch: a latent's activation depends on every latent;
    their pass 1 reads the stored codes);
    StorageError naming the file for a changed file or NaN/inf anywhere in the weights;
    PlatformError for a range outside [0, n_latents)."""
    config = dict(checkpoint_config(store, sae_name, version)["sae"])
    variant, d_model, n_latents = config.pop("variant"), config.pop("d_model"), config.pop("n_latents")
    if sparse_variant(variant):
        raise FeatureError(f"a {variant} SAE's activations of latents [{start}, {stop}) depend on every latent: they "
                           "cannot be encoded from those latents' weights alone",
                           "run its pass 1 from the batch's stored codes (feature_codes.partials_from_codes)")
    if variant not in SHARD_CLASSES:  # no inference rule over a slice of latents (a steering vector): whole
        return None
    whole = stored_sae(store, sae_name, version=version, device=device, fingerprint=fingerprint)
    if whole is None:
        return None
    rows = latent_rows(store, sae_name, start, stop, version=version, keep=lambda name: name not in UNREAD,
                       device=device)
    model = with_weights(slice_model(variant, config, d_model, n_latents, start, stop), rows, device, UNREAD)
    return LatentSlice(whole.config, whole.fingerprint, whole.device, model.W_enc.dtype, start=start, stop=stop,
                       model=model.eval())


def _whole_fingerprint(store: ArtifactStore, sae_name: str, version: str | None, whole) -> str | None:
    """``features.sae_fingerprint`` of the checkpoint's whole SAE (``whole``: its model on the meta
    device), block by block; None when its tensors are not the ones ``whole`` holds."""
    names: list[str] = []

    def noted(blocks):
        for name, block in blocks:
            if not names or names[-1] != name:
                names.append(name)
            yield name, block

    fingerprint = fingerprint_of(whole.config, noted(weight_blocks(store, sae_name, version=version)))
    return fingerprint if names == sorted(whole.state_dict()) else None


def sliced_partials(store: ArtifactStore, sae_name: str, partition_key: str, shards: list[tuple[int, int]],
                    settings: FeatureSettings, shard_indices: list[int], *, checkpoint: str | None = None,
                    device="cpu", group: str = FIRST_STORE, batch_rows: int = 4096) -> list[dict]:
    """Pass 1 of a dense SAE's feature shards ``shard_indices`` of the layout ``shards`` (one
    (activation batch, shard group) job), one shard at a time, each encoded from its own latents'
    weights alone (:func:`load_latent_slice` of checkpoint version ``checkpoint``) and committed as
    ``feature_codes.compute_and_write_partials`` commits it (pinning ``checkpoint``). A checkpoint of an
    earlier version is loaded whole (``load_sae``). Returns per shard {shard_index, start, stop,
    n_tokens, version}."""
    summaries: list[dict] = []
    fingerprint = None
    for position, index in enumerate(shard_indices):
        sae = load_latent_slice(store, sae_name, *shards[index], version=checkpoint, device=device,
                                fingerprint=fingerprint)
        if sae is None:  # named as an earlier version named them: the whole SAE, as before
            whole, _ = load_sae(store, sae_name, device, version=checkpoint)
            return summaries + compute_and_write_partials(
                store, whole, sae_name, partition_key, shards, settings, shard_indices=shard_indices[position:],
                checkpoint=checkpoint, batch_rows=batch_rows, group=group)
        fingerprint = sae.fingerprint
        summaries += compute_and_write_partials(store, sae, sae_name, partition_key, shards, settings,
                                                shard_indices=[index], checkpoint=checkpoint, batch_rows=batch_rows,
                                                group=group)
        del sae
    return summaries
