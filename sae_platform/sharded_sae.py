"""A latent-sharded checkpoint evaluated shard by shard: codes and reconstructions without the
whole dictionary in one process's memory.

Rows are taken ``rows_per_pass`` at a time; for each such chunk the shards are loaded one after
the other (``sharded_checkpoint.ShardedCheckpoint.read`` in the layout they were written in), so
at most one shard's weights are held at once:

- encode: each shard model (its rows of W_enc, b_enc, W_dec, JumpReLU's θ, with the replicated
  b_pre, input scale and BatchTopK's threshold) encodes the chunk with the variant's own
  ``encode``. Where a latent's activation is its own (ReLU, JumpReLU, BatchTopK and Matryoshka by
  their learned threshold) the shards' codes are the SAE's codes. For TopK each shard gives its
  local top-k per row, candidates that hold every global winner, and the global top-k of the
  candidates is the SAE's top-k (Gao et al. 2024, section A.6, shard the same way);
- decode: a second pass over the shards sums each shard's part of the reconstruction,
  ``decode(codes of its latents, offset=False)``, and the bias (and a skip transcoder's skip) is
  added once.

The figures equal those of the same SAE loaded whole, to float summation order
(``tests/test_sharded_checkpoint.py``). A Switch SAE's shards hold whole experts (as its
expert-parallel training writes them, ``sae_platform.expert_parallel``) beside the whole router:
each shard codes the rows routed to its experts and pads the others, so a row's codes come from one
shard. One whose shards would split an expert (n_experts not divisible by the shards: never
written by training) is refused with a PlatformError, and ``evaluate._evaluated`` gathers it.
"""

from collections.abc import Iterable, Iterator

import torch

from sae_platform.errors import PlatformError
from sae_platform.sae import BatchTopKSAE, Codes, JumpReLUSAE, ReLUSAE, SwitchSAE, TopKSAE, with_weights
from sae_platform.sharded_checkpoint import SAE, LatentLayout, open_sharded, sae_state

ROWS_PER_PASS = 65_536  # rows encoded per pass over the shards: each pass reads every shard twice
# The class whose inference rule a shard of each variant runs (Matryoshka's nested prefixes only
# shape training: it encodes as BatchTopK).
SHARD_CLASSES = {"topk": TopKSAE, "batchtopk": BatchTopKSAE, "matryoshka_batchtopk": BatchTopKSAE,
                 "jumprelu": JumpReLUSAE, "relu": ReLUSAE, "switch": SwitchSAE}


class ShardedSAE:
    """The SAE of ``sae_name``'s sharded checkpoint (committed, or ``version``), read shard by
    shard on ``device``. Has the shape attributes evaluation reads (``n_latents``, ``d_model``,
    ``d_out``, ``variant``, ``device``); :meth:`reconstructions` and :meth:`codes` replace the
    whole model's ``encode`` / ``decode`` over a stream of batches. PlatformError for a variant
    without a shard-wise rule or a Switch SAE whose shards split an expert; StorageError (naming
    the file) for a missing, changed or non-finite shard."""

    def __init__(self, store, sae_name: str, cfg: dict, *, version: str | None = None, device="cpu",
                 rows_per_pass: int = ROWS_PER_PASS):
        config = dict(cfg["sae"])
        self.variant = config.pop("variant")
        if self.variant not in SHARD_CLASSES:
            raise PlatformError(f"a {self.variant} SAE is not evaluated shard by shard",
                                "it is evaluated gathered, where it fits the process")
        self.checkpoint = open_sharded(store, sae_name, version)
        self.d_model, self.n_latents = config.pop("d_model"), config.pop("n_latents")
        self.d_out = config.get("d_out")
        self.config = config
        self.device = torch.device(device)
        self.rows_per_pass = rows_per_pass
        self.layout: LatentLayout = self.checkpoint.layout
        if self.variant == "switch" and config["n_experts"] % self.layout.n_shards:
            raise PlatformError(f"the switch SAE's {config['n_experts']} experts do not split into its "
                                f"{self.layout.n_shards} latent shards: a shard would hold part of an expert",
                                "it is evaluated gathered, where it fits the process")
        self._per_row_k = self._top_k_rule()

    @property
    def width(self) -> int:
        """Columns of the rows evaluation reads: d_model, or a transcoder's input + target."""
        return self.d_model + (self.d_out or 0)

    def _top_k_rule(self) -> int | None:
        """k when codes are each row's top k over all latents (TopK; Switch: the top k in the
        row's expert, on one shard, the other shards' padding 0), None when each latent's
        activation is its own (BatchTopK's learned threshold: a checkpoint without one, NaN, is
        refused as non-finite when read)."""
        return self.config["k"] if self.variant in ("topk", "switch") else None

    def shard_model(self, shard: int):
        """The model of shard ``shard``'s latents (its rows, the replicated tensors), on ``device``, in eval
        mode: built without an init (``slice_model``), holding the tensors read from the shard."""
        model = slice_model(self.variant, self.config, self.d_model, self.n_latents, *self.layout.shard_range(shard))
        state = self.checkpoint.read(self.layout, shard, SAE, self.device)
        return with_weights(model, sae_state(state), self.device).eval()

    @torch.no_grad()
    def codes(self, batches: Iterable[torch.Tensor]) -> Iterator[Codes]:
        """Codes [rows, K] (global latent ids, normalised units) of each batch [rows, width] raw,
        as the whole SAE's ``encode`` gives them (up to the order and padding of the entries)."""
        for chunk in _chunks(batches, self.rows_per_pass):
            yield from self._encode(chunk)

    @torch.no_grad()
    def reconstructions(self, batches: Iterable[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor, Codes]]:
        """(x, reconstruction [rows, d_out or d_model] raw, codes) of each batch [rows, width]
        raw, as the whole SAE's ``encode`` then ``decode``."""
        for chunk in _chunks(batches, self.rows_per_pass):
            codes = self._encode(chunk)
            yield from zip(chunk, self._decode(chunk, codes), codes, strict=True)

    def _encode(self, chunk: list[torch.Tensor]) -> list[Codes]:
        parts: list[list[Codes]] = [[] for _ in chunk]
        for shard in range(self.layout.n_shards):
            model, start = self.shard_model(shard), self.layout.shard_range(shard)[0]
            for found, x in zip(parts, chunk, strict=True):
                local = model.encode(x)
                found.append(Codes(local.values, local.indices + start))
            del model  # one shard at a time
        return [self._merged(found) for found in parts]

    def _merged(self, found: list[Codes]) -> Codes:
        values = torch.cat([c.values for c in found], 1)
        indices = torch.cat([c.indices for c in found], 1)
        if self._per_row_k is None:
            return Codes(values, indices)
        # ReLU after the top k: a candidate's value is its pre-activation or 0, so the top k of
        # the values holds every positive winner; zeros are inactive wherever they point
        values, pick = values.topk(min(self._per_row_k, values.shape[1]), dim=1)
        return Codes(values, indices.gather(1, pick))

    def _decode(self, chunk: list[torch.Tensor], codes: list[Codes]) -> list[torch.Tensor]:
        recons: list[torch.Tensor | None] = [None] * len(chunk)
        for shard in range(self.layout.n_shards):
            model = self.shard_model(shard)
            start, stop = self.layout.shard_range(shard)
            for b, (x, c) in enumerate(zip(chunk, codes, strict=True)):
                inside = (c.indices >= start) & (c.indices < stop)
                mine = Codes(c.values * inside, torch.where(inside, c.indices - start, 0))
                if recons[b] is None:  # the bias (and a skip transcoder's skip) once, from any shard
                    empty = Codes(c.values.new_zeros(len(x), 1), c.indices.new_zeros(len(x), 1))
                    recons[b] = model.decode(empty, x)
                recons[b] = recons[b] + model.decode(mine, x, offset=False)
            del model
        return recons


def slice_model(variant: str, config: dict, d_model: int, n_latents: int, start: int, stop: int):
    """A model of latents [start, stop) of an SAE of ``variant`` (``config``: cfg.json's ``"sae"``
    less variant, d_model and n_latents) running the variant's inference rule on them alone
    (``SHARD_CLASSES``), on the meta device: shapes only, no init drawn (``sae.with_weights`` gives it
    its tensors). Its ``k`` is at most its width and it has no ``target_l0`` (a training target,
    bounded by the whole dictionary); a switch slice holds whole experts and the whole router."""
    cls, width = SHARD_CLASSES[variant], stop - start
    hparams = {key: value for key, value in config.items()
               if key in cls.DEFAULTS or key in ("d_out", "skip_connection")}
    if "k" in hparams:
        hparams["k"] = min(hparams["k"], width)
    if "target_l0" in hparams:
        hparams["target_l0"] = None
    if variant == "switch":  # an expert shard: its experts' latents, the whole router
        hparams.update(first_latent=start, whole_n_latents=n_latents)
    return cls(d_model, width, device="meta", **hparams)


def _chunks(batches: Iterable[torch.Tensor], rows: int) -> Iterator[list[torch.Tensor]]:
    """Consecutive batches grouped until a group holds at least ``rows`` rows."""
    chunk, held = [], 0
    for x in batches:
        chunk.append(x)
        held += len(x)
        if held >= rows:
            yield chunk
            chunk, held = [], 0
    if chunk:
        yield chunk
