"""Training an SAE on the shuffled store: short, plain, everything visible (after nanoGPT).

The loop streams the shuffled store sequentially with a prefetch thread (reading overlaps
compute), and every ``checkpoint_every_tokens`` commits a checkpoint through the storage
protocol: weights (safetensors), config (JSON), optimizer state and trainer state (step, dead-
latent counters, metrics history, RNG). A killed run resumes from the last checkpoint and, because
batch b of epoch e is always rows [b·B, (b+1)·B) of the store and nothing else is random, reaches
bitwise the same weights on CPU as an uninterrupted run.

The last ``holdout_rows`` rows of the store a training starts on are never trained on, and every
checkpoint records which rows they are (``sae_platform.heldout``): evaluation uses them, and a
checkpoint resumed on a rebuilt store (new batches) leaves them out of every batch it trains on,
refilling the batch from the rows after it (``heldout.batch_rows``: every batch keeps batch_size rows, and
stays a function of its step, so such a resume is deterministic too).
A token budget larger than the training rows loops over epochs in the same (already random)
order; the log says how many.

Checkpoint layout (``sae/<sae_name>/<version>/``)::

    sae_weights.safetensors   the SAE's state_dict (input scale and b_pre included)
    cfg.json                  SAE config + training settings + data fingerprint
    optimizer.safetensors     Adam state: the tensors, named by parameter (``adam.<param>.<key>``) ...
    optimizer.json            ... and everything else (param_groups, non-tensor state by parameter)
    trainer_state.safetensors tokens-since-fired, torch RNG state
    trainer_state.json        step, tokens, metrics history

Adam's state is named as in a sharded checkpoint (``sharded_checkpoint.adam_tensors``, the one rule);
a checkpoint written before (tensors ``state.<param index>.<key>``) is renamed when read
(``sharded_checkpoint.stored_adam_state``), so it still resumes.

A latent-sharded checkpoint (``sharded_checkpoint``: one safetensors file per latent shard,
``replicated.safetensors`` and ``index.json`` in place of the three tensor files) is read the same
way: ``load_sae`` gathers it where it fits the process, a resume in one process gathers it from any
layout.

A finished training found again (a re-run, every refresh that re-materializes it) reads what its
summary needs, the checkpoint's JSON (step, tokens, history), and what keeping it needs
(``checkpoint_files.check_kept``: every tensor file's header, the weights checked finite one 64 MiB
block at a time), never Adam's state nor a whole tensor: at 2^20 latents those were 2 x 7.26 GB of
shards read to return a few numbers.

A resume builds its SAE (a latent rank: its shard) on the meta device and takes the checkpoint's
tensors as its parameters (``sae.with_weights``, as ``load_sae`` does): it never draws an init nor
calibrates, which only a fresh SAE needs (at 2^20 latents x 576: seconds of RNG and a second
multi-GB copy per rank). Its optimizer is made over those tensors, then Adam's state, the
dead-latent counters and the RNG are loaded (``_Resume``).

Nothing read back from a checkpoint can run code (``checkpoint_files``: safetensors and JSON; an
earlier version's ``optimizer.pt`` / ``trainer_state.pt`` through torch's restricted unpickler).

Every tensor of a checkpoint (weights, Adam moments) is checked finite before the commit: a
diverged run raises :class:`TrainingError` and the committed checkpoint stays the last good one.
Every read checks again (a checkpoint written before that check, or damaged since): a resume, the
"already finished" skip and ``load_sae`` (evaluation, export, feature tables, the live browser)
refuse a checkpoint holding NaN/inf with a :class:`StorageError` naming the file, so it is never
evaluated to NaN metrics nor kept as finished by a re-run that exits 0.
"""

import json
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Literal, get_args

import numpy as np
import torch
from safetensors.torch import save as save_safetensors

from sae_platform.activations import activation_attrs
from sae_platform.catalog import HELDOUT_ROWS_FILE, checkpoint_name, rebuild_fix, shuffled_name
from sae_platform.checkpoint_files import check_kept, finite_weights, read_json, trainer_metadata, unsharded_files
from sae_platform.devices import auto_dtype
from sae_platform.distributed import (
    average_gradients,
    barrier,
    fired_on_any_rank,
    mean_over_ranks,
    rank_and_world,
    summed_over_ranks,
)
from sae_platform.errors import PlatformError, StorageError
from sae_platform.glibc_malloc import freed_blocks_reused
from sae_platform.heldout import HeldoutRows, batch_rows, tail, training_heldout
from sae_platform.latent_parallel import (
    LatentShardedSAE,
    Layout,
    agreed_non_finite,
    check_layout,
    commit_shards,
    current_layout,
)
from sae_platform.lr_schedule import LR_SCHEDULES, LrSchedule, base_lrs, continued_lr, lr_factor, set_lr
from sae_platform.refresh import (
    HELDOUT_RECORDED,
    RETRAIN_ABOVE_FRACTION,
    TRAINED_BATCHES,
    Continuation,
    Unseen,
    batches_record,
    continuation,
    kept_unseen,
)
from sae_platform.sae import ADAM_EPS, VARIANTS, Variant, build_sae, lr_for, mean_active, normalized_mse, with_weights
from sae_platform.settings import SettingsError, setting, validate
from sae_platform.sharded_checkpoint import (
    SAE,
    TRAINER,
    UNSHARDED_WEIGHTS,
    LatentLayout,
    adam_tensors,
    gathered_state,
    is_sharded,
    non_finite,
    parameter_names,
    read_shard,
    restore_training,
    sae_state,
    shard_slice,
    stored_adam_state,
    training_tensors,
    unsharded_checkpoint,
)
from sae_platform.shuffled import Shuffled, open_shuffled
from sae_platform.storage import ArtifactStore
from sae_platform.training_progress import peak_memory_per_rank

SelectionPrecision = Literal["auto", "float32", "bfloat16"]
SELECTION_PRECISIONS: tuple[SelectionPrecision, ...] = get_args(SelectionPrecision)
CALIBRATION_ROWS = 16_384


class TrainingError(PlatformError):
    """Training cannot go on (bad data, diverged); nothing of the failed run is committed."""


def _committed_note(store: ArtifactStore | None, sae_name: str | None) -> str:
    """What is true of the committed checkpoint of ``sae_name`` after a failure (said in errors)."""
    pointer = store.pointer(checkpoint_name(sae_name)) if store is not None and sae_name else None
    if pointer is None:
        return f"no checkpoint of {sae_name!r} was committed, so nothing is stored for it" if sae_name else \
            "nothing was committed by this run; a checkpoint committed before is left as it was"
    return (f"the committed checkpoint of {sae_name!r} (step {pointer.get('step')}, version {pointer['version']}) is "
            "left as it was: a re-run with the same settings resumes from it, one with changed settings (e.g. "
            "a lower lr) starts afresh and replaces it when it commits")


@dataclass(frozen=True)
class TrainSettings:
    """Settings of one SAE's training. The sweep entry (config/sweep.yaml) gives the SAE's shape
    (``variant``, ``n_latents``, ``k``, ``hparams``) and may override any other field for that SAE;
    the rest are shared by the sweep (``resources.training.config``)."""

    variant: Variant = setting("topk", "SAE variant", choices=VARIANTS)
    n_latents: int = setting(16_384, "dictionary size (latents)", ge=1)
    k: int = setting(32, "active latents per token (TopK family only)", ge=1)
    lr: float | None = setting(None, "Adam learning rate; null: Gao et al.'s 2e-4 * sqrt(16384 / n_latents)",
                               gt=0, le=1.0)
    lr_schedule: LrSchedule = setting("constant", "the lr over the run (sae_platform.lr_schedule): constant, or "
                                      "linear_decay to 0 at the run's last step", choices=LR_SCHEDULES)
    lr_warmup_tokens: int = setting(0, "the lr ramps up linearly over this many first tokens of the run", ge=0)
    batch_size: int = setting(4096, "rows (tokens) per step", ge=1)
    token_budget: int = setting(1_000_000, "training tokens (loops over epochs if larger than the data); "
                                           "at least one batch", ge=1)
    seed: int = setting(0, "init seed; same seed + same data = same weights", ge=0)
    checkpoint_every_tokens: int = setting(250_000, "commit a resumable checkpoint this often", ge=1)
    dead_after_tokens: int = setting(10_000_000, "a latent silent this long is dead (AuxK); Gao et al. use "
                                                 "10M; lower it for budgets far below that", ge=1)
    holdout_rows: int = setting(8192, "last rows of the shuffled store a training starts on, never trained on, "
                                      "kept for evaluation (recorded by name: they stay held out when the store "
                                      "is rebuilt)", ge=0)
    log_every_steps: int = setting(10, "a metrics row every this many steps", ge=1)
    world_size: int = setting(1, "ranks in all, data_parallel x latent_parallel (torch.distributed; "
                                 "docs/scale.md): each data-parallel replica reads its own slice of every batch; "
                                 "batch_size must divide by world_size / latent_parallel", ge=1)
    nproc_per_node: int | None = setting(None, "ranks per machine (one GPU each); null: world_size (one machine)",
                                         ge=1)
    latent_parallel: int = setting(1, "latent-parallel degree: each of this many ranks holds n_latents / "
                                      "latent_parallel of the latents (their rows of W_enc, b_enc, W_dec and Adam "
                                      "state), so world_size ranks form world_size / latent_parallel data-parallel "
                                      "replicas of one sharded SAE (sae_platform.latent_parallel; docs/scale.md). "
                                      "world_size and n_latents must divide by it, and a switch SAE's n_experts (each "
                                      "rank holds whole experts: sae_platform.expert_parallel)", ge=1)
    hparams: dict = setting(None, "further variant settings (k_aux, n_experts, l1_coeff, l0_coeff, target_l0, …; "
                                  "each SAE variant's class docstring lists its own; a transcoder also takes "
                                  "skip_connection: true, a learned W_skip)",
                            default_factory=dict)
    retrain_above_fraction: float = setting(
        RETRAIN_ABOVE_FRACTION, "the refresh policy (sae_platform.refresh): when the shuffled store only gains "
        "batches holding fewer tokens than this fraction of the tokens the finished SAE was trained on, the SAE is "
        "kept (marked stale, with the reason) and the feature tables are updated incrementally; at or above it, "
        "the SAE is retrained: resumed from its checkpoint for the new tokens' steps while its settings are "
        "unchanged (refresh.continuation), else from scratch. 0: never kept", ge=0.0, le=1.0)
    hook_point: str | None = setting(None, "the cached hook point (an entry of resources.caching.config.hook_points, "
                                           "e.g. blocks.4.hook_mlp_out) this SAE trains on; null: the first")
    selection_precision: SelectionPrecision = setting(
        "auto", "precision in which a TopK-family training step computes the dense [batch, n_latents] "
                "pre-activations it picks latents from: auto (bfloat16 where the device multiplies bf16 natively, "
                "devices.native_bf16; else float32), float32, bfloat16. The picked pre-activations are recomputed "
                "in float32, so loss and gradients stay exact for the picked latents; only near-ties at the k-th "
                "place can resolve differently. 3.8x faster matmul on the CI's CPUs", choices=SELECTION_PRECISIONS)

    def __post_init__(self):
        validate(self, "resources.training.config")
        if self.token_budget < self.batch_size:
            raise SettingsError(f"resources.training.config.token_budget = {self.token_budget} is less than one "
                                f"batch (batch_size = {self.batch_size})",
                                "set token_budget to at least batch_size tokens")
        check_layout(self.variant, self.n_latents, self.world_size, self.latent_parallel, self.batch_size,
                     self.hparams)
        nproc = self.nproc_per_node or self.world_size
        if self.batch_size % self.data_parallel:
            raise SettingsError(f"resources.training.config: batch_size {self.batch_size} does not split evenly over "
                                f"{self.data_parallel} data-parallel replicas", "make batch_size a multiple of "
                                "world_size / latent_parallel")
        if self.world_size % nproc:
            raise SettingsError(f"resources.training.config: world_size {self.world_size} ranks do not fill machines "
                                f"of nproc_per_node {nproc} ranks", "make world_size a multiple of nproc_per_node")

    @property
    def data_parallel(self) -> int:
        """The data-parallel replicas: world_size / latent_parallel (each reads its slice of every batch)."""
        return self.world_size // self.latent_parallel

    def sae_kwargs(self) -> dict:
        top_k = self.variant in ("topk", "batchtopk", "matryoshka_batchtopk", "switch")
        return {**({"k": self.k} if top_k else {}), **self.hparams}

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else lr_for(self.n_latents)

    def lr_factor(self, step: int, n_steps: int) -> float:
        """What ``lr_schedule`` scales the lr of 0-based step ``step`` of a run of ``n_steps`` steps by."""
        return lr_factor(self.lr_schedule, step, n_steps, self.lr_warmup_tokens // self.batch_size)


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    history: list = field(default_factory=list)
    tokens_since_fired: torch.Tensor | None = None
    # the step training ends at, when not the settings' (token_budget // batch_size): a finished
    # checkpoint resumed on its grown store (refresh.Continuation) trains on past it
    target_steps: int | None = None
    heldout: HeldoutRows | None = None  # the rows never trained on (None: the store's last holdout_rows)


# Where the ranks run and how precisely they pick latents, not what is trained: a checkpoint resumes
# and stays finished whatever they are.
PLACEMENT = ("world_size", "nproc_per_node", "latent_parallel", "selection_precision")
POLICY = ("retrain_above_fraction",)  # when to retrain, not what a checkpoint is
# Settings added after checkpoints were stored, at the value that trains as those did: left out of
# identity() there, so those checkpoints still count as finished.
ADDED_SINCE = {"hook_point": None, "lr_schedule": "constant", "lr_warmup_tokens": 0}


def selection_dtype(precision: SelectionPrecision, device: torch.device | str) -> torch.dtype | None:
    """The dtype of TrainSettings.selection_precision on ``device`` (None: the parameters' own)."""
    if precision == "auto":
        return auto_dtype(device)
    return {"float32": None, "bfloat16": torch.bfloat16}[precision]


def identity(settings: TrainSettings) -> dict:
    """The settings that define a checkpoint, as stored with it and compared to decide "already
    trained": all but PLACEMENT and POLICY, and each of ADDED_SINCE only when not at its old behaviour,
    so checkpoints from before it existed still count as finished."""
    record = {k: v for k, v in asdict(settings).items() if k not in PLACEMENT + POLICY
              and not (k in ADDED_SINCE and v == ADDED_SINCE[k])}
    return json.loads(json.dumps(record))


def data_fingerprint(shuffled: Shuffled) -> dict:
    return {"shuffle": shuffled.name, "plan_id": shuffled.index["plan_id"], "n_rows": shuffled.n_rows,
            "d_model": shuffled.d_model}


def _train_rows(shuffled: Shuffled, settings: TrainSettings) -> int:
    rows = shuffled.n_rows - settings.holdout_rows
    if rows < settings.batch_size:
        raise StorageError(
            f"the shuffled store has {shuffled.n_rows} rows; after holding out {settings.holdout_rows} for "
            f"evaluation, fewer than one batch of {settings.batch_size} remain",
            "cache more activations, or lower batch_size / holdout_rows")
    return rows


def batch_schedule(n_train_rows: int, batch_size: int, first_step: int, n_steps: int) -> Iterator[tuple[int, int]]:
    """(start, stop) rows of each step: epoch after epoch over the same order, whole batches only."""
    per_epoch = n_train_rows // batch_size
    for step in range(first_step, n_steps):
        start = (step % per_epoch) * batch_size
        yield start, start + batch_size


def prefetch(shuffled: Shuffled, schedule: Iterator[tuple[int, int]], device: torch.device, depth: int = 3,
             exclude: np.ndarray | None = None, wrap: int | None = None,
             part: tuple[int, int] = (0, 1)) -> Iterator[tuple[torch.Tensor, np.ndarray, int]]:
    """Read and convert the next batches on a thread while the current one trains: for each batch
    (start, stop) of ``schedule``, ``batch_rows`` of it (part ``part`` of a data-parallel replica,
    leaving out and refilling the global row ids in ``exclude``); yields (x, ids, its first row)."""
    batches: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def read():
        try:
            for start, end in schedule:
                ids, acts = batch_rows(shuffled, start, end, exclude, wrap, part)
                x = torch.from_numpy(acts).float()
                if device.type == "cuda":
                    x = x.pin_memory()
                first = start + part[0] * ((end - start) // part[1])
                while not stop.is_set():
                    try:
                        batches.put((x, ids, first), timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as error:  # surfaced in the training thread
            batches.put(error)
            return
        batches.put(None)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    try:
        while (item := batches.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            x, ids, start = item
            yield x.to(device, non_blocking=True), ids, start
    finally:
        stop.set()
        thread.join(timeout=5)


def _check_finite(x: torch.Tensor, ids: np.ndarray, start: int, step: int | None, store=None, sae_name=None,
                  what: str = "") -> None:
    """Raise naming the first row of ``x`` holding NaN/inf (``start``: its shuffled row)."""
    bad = ~torch.isfinite(x).all(dim=1)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        when = f" (step {step})" if step is not None else ""
        raise TrainingError(
            f"NaN/inf in the {what or 'activations'}{when}: shuffled row {start + first} (global row id "
            f"{int(ids[first])}), {int(bad.sum())} bad row(s) in this batch",
            "re-cache the activation partition holding that row (global row ids run over partitions in "
            f"key order), then re-run the shuffle; {_committed_note(store, sae_name)}")


def _built_sae(settings: TrainSettings, width: int, device: torch.device | str, d_in: int | None = None,
               layout: Layout = Layout()):
    """The SAE these settings train on rows ``width`` wide (with ``d_in``, a transcoder's [input (d_in) |
    target] pairs), or with a latent-parallel ``layout`` this rank's shard of it, on ``device``: at its
    init (drawn from the global RNG), or shapes only on the meta device (a resume's: nothing drawn)."""
    extra = {} if d_in is None else {"d_out": width - d_in}
    if layout.latent_parallel > 1:
        return LatentShardedSAE(settings.variant, d_in or width, settings.n_latents, layout, device=device,
                                **extra, **settings.sae_kwargs())
    return build_sae(settings.variant, d_in or width, settings.n_latents, device=device, **extra,
                     **settings.sae_kwargs())


def _new_sae(settings: TrainSettings, d_model: int, device: torch.device, shuffled: Shuffled,
             d_in: int | None = None, layout: Layout = Layout()):
    """A fresh SAE (``_built_sae`` at ``settings.seed``: a latent shard draws the rows one process
    would), calibrated on the first rows of ``shuffled``."""
    torch.manual_seed(settings.seed)
    sae = _built_sae(settings, d_model, device, d_in, layout)
    rows = min(CALIBRATION_ROWS, shuffled.n_rows - settings.holdout_rows)
    ids, acts = zip(*shuffled.blocks(0, rows))
    sample = torch.from_numpy(np.concatenate(acts)).float().to(device)
    _check_finite(sample, np.concatenate(ids), start=0, step=0, what="activations sampled for calibration")
    sae.calibrate_(*((sample,) if d_in is None else (sample[:, :d_in], sample[:, d_in:])))
    return sae


def _optimizer(sae, settings: TrainSettings, device: torch.device) -> torch.optim.Optimizer:
    # fused Adam: ~25x faster than the default foreach path on CPU for 16k x 576 matrices
    try:
        return torch.optim.Adam(sae.param_groups(settings.learning_rate), lr=settings.learning_rate, eps=ADAM_EPS,
                                fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(sae.param_groups(settings.learning_rate), lr=settings.learning_rate, eps=ADAM_EPS)


def save_checkpoint(store: ArtifactStore, sae_name: str, sae, optimizer, state: TrainState, settings: TrainSettings,
                    shuffled: Shuffled, final: bool) -> str:
    """Commit a checkpoint of training on ``shuffled``; its pointer records the data fingerprint and
    the batches trained on (``refresh.TRAINED_BATCHES``: what the refresh policy compares new data
    to). Refuses (TrainingError, nothing written) when a weight or Adam moment is NaN/inf, so the
    committed checkpoint is always the last good one."""
    if isinstance(sae, LatentShardedSAE):
        return _save_shards(store, sae_name, sae, optimizer, state, settings, shuffled, final)
    weights = {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    adam, optimizer_meta = adam_tensors(sae, optimizer)  # named by parameter, as a sharded checkpoint's
    bad = non_finite(weights) + [f"optimizer {k}" for k in non_finite(adam)]
    if bad:
        raise _diverged(store, sae_name, state, settings, bad)
    trainer_tensors = {"tokens_since_fired": state.tokens_since_fired.detach().cpu().contiguous(),
                       "rng": torch.get_rng_state()}
    json_files, pointer_info = _checkpoint_records(sae, state, settings, shuffled, final)
    with store.writing(checkpoint_name(sae_name), **pointer_info) as version:
        store.fs.pipe_file(f"{version}/{UNSHARDED_WEIGHTS}", save_safetensors(weights))
        store.fs.pipe_file(f"{version}/optimizer.safetensors", save_safetensors(adam))
        store.fs.pipe_file(f"{version}/optimizer.json", json.dumps(optimizer_meta).encode())
        store.fs.pipe_file(f"{version}/trainer_state.safetensors", save_safetensors(trainer_tensors))
        for file, content in json_files.items():  # cfg.json, trainer_state.json, the held-out rows
            store.fs.pipe_file(f"{version}/{file}", content)
    return store.resolve(checkpoint_name(sae_name))


def _save_shards(store, sae_name, sae: LatentShardedSAE, optimizer, state, settings, shuffled, final) -> str:
    """save_checkpoint of a latent-sharded run (a collective: every rank calls it): each latent rank
    writes its shard (sae_platform.sharded_checkpoint), rank 0 commits; refused on every rank alike
    when any rank's weights or Adam moments hold NaN/inf."""
    tensors, optimizer_meta = training_tensors(sae.local, optimizer, state.tokens_since_fired)
    bad = agreed_non_finite(non_finite(tensors))
    if bad:
        raise _diverged(store, sae_name, state, settings, bad)
    json_files, pointer_info = _checkpoint_records(sae, state, settings, shuffled, final)
    commit_shards(store, checkpoint_name(sae_name), sae, tensors,
                  {**json_files, "optimizer.json": json.dumps(optimizer_meta).encode()}, **pointer_info)
    return store.resolve(checkpoint_name(sae_name))


def _checkpoint_records(sae, state: TrainState, settings: TrainSettings, shuffled: Shuffled,
                        final: bool) -> tuple[dict[str, bytes], dict]:
    """({cfg.json, trainer_state.json, the held-out rows: their bytes}, the pointer's record) of a checkpoint."""
    fingerprint = data_fingerprint(shuffled)
    heldout = state.heldout or tail(shuffled, settings.holdout_rows)
    cfg = {"sae": sae.config, "training": identity(settings), "data": fingerprint, "step": state.step,
           "tokens": state.tokens, "final": final}
    trainer_meta = {"step": state.step, "tokens": state.tokens, "history": state.history,
                    "target_steps": state.target_steps}
    pointer_info = {"step": state.step, "tokens": state.tokens, "final": final, "target_steps": state.target_steps,
                    "settings": identity(settings), "data": fingerprint,
                    TRAINED_BATCHES: batches_record(shuffled.index), HELDOUT_RECORDED: len(heldout)}
    return ({"cfg.json": json.dumps(cfg, indent=2, default=str).encode(),
             "trainer_state.json": json.dumps(trainer_meta).encode(), HELDOUT_ROWS_FILE: heldout.record()},
            pointer_info)


def _diverged(store, sae_name, state: TrainState, settings: TrainSettings, bad: list[str]) -> TrainingError:
    return TrainingError(
        f"training {sae_name!r} diverged: after step {state.step} ({state.tokens:,} tokens) {', '.join(bad[:4])}"
        f"{' …' if len(bad) > 4 else ''} hold NaN/inf (lr {settings.learning_rate:g}); this state was not "
        f"committed", f"lower lr; {_committed_note(store, sae_name)}")


def finished_checkpoint(store: ArtifactStore, shuffle_name: str, sae_name: str,
                        settings: TrainSettings) -> tuple[dict, Unseen] | None:
    """(pointer, what it has not seen) of ``sae_name``'s checkpoint when it is a finished training with
    these settings that the refresh policy keeps on the current shuffled store (the same plan, or only
    batches added holding less than ``settings.retrain_above_fraction`` of its training tokens: then
    training again would only find it, or is not worth it); None otherwise. What it reads of the
    checkpoint is ``check_kept``'s (its JSON, every tensor file's header, the weights block by block),
    which raises StorageError naming the file when a weight holds NaN/inf or a file is damaged (never
    skipped as finished)."""
    pointer = store.pointer(checkpoint_name(sae_name))
    if pointer is None or not pointer.get("final"):
        return None
    if pointer.get("settings") != identity(settings):
        return None
    if store.resolve(shuffled_name(shuffle_name)) is None:
        return None
    unseen = kept_unseen(pointer, open_shuffled(store, shuffle_name).index, settings.retrain_above_fraction)
    if unseen is None:
        return None
    check_kept(store, sae_name, pointer["version"], pointer.get("step"))
    return pointer, unseen


def load_sae(store: ArtifactStore, sae_name: str, device: str | torch.device = "cpu", version: str | None = None):
    """The SAE of the last committed checkpoint of ``sae_name`` (``version``: that checkpoint
    version, committed or superseded and still stored), and its cfg.json. Raises StorageError
    when there is none, or naming the file and the fix when a file differs from what its writer
    recorded (its size or JSON: ``check_intact``; the weights' bytes, hashed as they are read:
    ``sharded_checkpoint.as_recorded``, as ``latent_slice.stored_sae`` checks them), its weights hold
    NaN/inf, cfg.json lacks a field or the weights do not have the shapes it describes; when ``version``
    is no longer stored, the one ``ArtifactStore.check_version`` raises."""
    path = store.require(checkpoint_name(sae_name), f"SAE checkpoint {sae_name!r}", "materialize sae_checkpoint first")
    if version is not None:
        store.check_version(checkpoint_name(sae_name), version, f"SAE checkpoint {sae_name!r}")
        path = store.path(checkpoint_name(sae_name), version)
    store.check_intact(checkpoint_name(sae_name), store.version_of(path), what=f"SAE checkpoint {sae_name!r}")
    fix = rebuild_fix(store, checkpoint_name(sae_name))
    cfg = read_json(store, path, "cfg.json")
    weights = _sae_weights(store, sae_name, path, cfg.get("step"))
    with store.damaged(f"{path}/cfg.json", f"cfg.json of SAE checkpoint {sae_name!r}", fix):
        sae_cfg = dict(cfg["sae"])
        sae = build_sae(sae_cfg.pop("variant"), sae_cfg.pop("d_model"), sae_cfg.pop("n_latents"), device="meta",
                        **sae_cfg)  # shapes only: no init drawn, the checkpoint's weights come next
    with store.damaged(f"{path}/{UNSHARDED_WEIGHTS}", f"weights (not those cfg.json describes) of SAE checkpoint "
                                                          f"{sae_name!r}", fix):
        with_weights(sae, weights, device)
    return sae, cfg


def _sae_weights(store: ArtifactStore, sae_name: str, path: str, step) -> dict[str, torch.Tensor]:
    """The SAE weights (state_dict) of the checkpoint version at ``path``: ``finite_weights`` (hashed as
    recorded as it is read), or a sharded checkpoint's shards gathered (``sharded_checkpoint.gathered_state``:
    each shard hashed too; refused, naming the size and the limit, when the whole SAE would not fit this
    process)."""
    if not is_sharded(store, path):
        return finite_weights(unsharded_checkpoint(store, sae_name, store.version_of(path)), step)
    return sae_state(gathered_state(store, sae_name, version=store.version_of(path), prefix=SAE,
                                    purpose=f"load SAE {sae_name!r} whole"))


@dataclass
class _Resume:
    """A checkpoint this rank goes on from: ``sae`` built on the meta device holding the checkpoint's
    weights (this rank's rows) as its parameters, no init drawn, nothing calibrated; ``state`` its step,
    tokens and history; ``tensors`` the rest of this rank's rows (Adam's state, dead-latent counters, the
    RNG: ``sharded_checkpoint`` names), loaded by :meth:`restore` once the optimizer exists."""

    sae: object
    state: TrainState
    tensors: dict[str, torch.Tensor]
    optimizer_meta: dict

    def restore(self, optimizer: torch.optim.Optimizer, device) -> TrainState:
        """Load Adam's state into ``optimizer`` (made over ``sae``'s parameters), the counters and the RNG."""
        module = self.sae.local if isinstance(self.sae, LatentShardedSAE) else self.sae
        self.state.tokens_since_fired = restore_training(module, optimizer, self.tensors, self.optimizer_meta, device)
        self.tensors = {}
        return self.state


def _same_run(pointer: dict | None, settings: TrainSettings, shuffled: Shuffled) -> bool:
    """Whether the checkpoint ``pointer`` is of a training with these settings on this very shuffled store."""
    return pointer is not None and pointer.get("settings") == identity(settings) \
        and pointer.get("data") == data_fingerprint(shuffled)


def _finished(store, sae_name, settings, shuffled, n_steps: int) -> TrainState | None:
    """The state (step, tokens, history) of a finished training of these settings on this very shuffled
    store, at the step it trains to (``n_steps``, or the target a continuation recorded); None otherwise.
    Read from the checkpoint's JSON, then ``check_kept`` (weights checked finite block by block, every
    tensor file's header): never its tensors whole nor Adam's state, which only going on needs (the
    2^20-latent run's: 2 x 7.26 GB of shards). StorageError as ``check_kept`` raises."""
    pointer = store.pointer(checkpoint_name(sae_name))
    if not _same_run(pointer, settings, shuffled):
        return None
    saved = trainer_metadata(store, store.path(checkpoint_name(sae_name), pointer["version"]))
    if saved["step"] < (saved.get("target_steps") or n_steps):
        return None
    check_kept(store, sae_name, pointer["version"], pointer.get("step"))
    return TrainState(saved["step"], saved["tokens"], saved["history"], target_steps=saved.get("target_steps"))


def _resume(store, sae_name, settings, shuffled, d_in, layout, device, log) -> _Resume | None:
    """An interrupted training of these settings on this very shuffled store; None when there is none."""
    pointer = store.pointer(checkpoint_name(sae_name))
    if not _same_run(pointer, settings, shuffled):
        return None
    return _load_state(store, sae_name, pointer, settings, shuffled.d_model, d_in, layout, device, log)


def _resume_grown(store, sae_name, settings, shuffled, d_in, layout, device, log) -> _Resume | None:
    """A *finished* checkpoint of these settings whose shuffled store only gained batches since
    (``refresh.continuation``), set to train the added steps; None, with the reason logged when there
    was a checkpoint, when training must start from scratch."""
    pointer = store.pointer(checkpoint_name(sae_name))
    if pointer is None:
        return None
    plan = continuation(pointer, shuffled.index, identity(settings), settings.batch_size)
    if not isinstance(plan, Continuation):
        log(f"training {sae_name} from scratch, not resuming its checkpoint (step {pointer.get('step')}, version "
            f"{pointer['version']}): {plan}")
        return None
    resume = _load_state(store, sae_name, pointer, settings, shuffled.d_model, d_in, layout, device, log)
    if resume is None:
        return None
    state = resume.state
    state.target_steps = state.step + plan.added_steps
    lr = continued_lr(settings.lr_schedule, settings.learning_rate, settings.lr_factor(state.step, state.target_steps))
    log(f"{sae_name}: {plan.describe()}: its checkpoint's weights, Adam state and dead-latent counters go on at "
        f"{lr} to step {state.target_steps} ({plan.unseen.describe()})")
    return resume


def _load_state(store, sae_name, pointer, settings, width, d_in, layout, device, log) -> _Resume | None:
    """Checkpoint ``pointer`` read for this rank: its rows of the weights, Adam state and dead-latent
    counters under the run's ``layout``, whatever layout or version wrote them (a sharded checkpoint:
    only the shards overlapping those rows, ``sharded_checkpoint.read_shard``, so 2 shards resume as 1,
    1 as 4; an unsharded one: read whole and sliced, each slice copied out so the whole is freed), the
    weights assigned to an SAE built on the meta device (``_built_sae``). None when its optimizer
    layout is an earlier version's (logged: training starts afresh)."""
    path = store.resolve(checkpoint_name(sae_name))
    store.check_intact(checkpoint_name(sae_name), pointer["version"], what=f"SAE checkpoint {sae_name!r}")
    sae = _built_sae(settings, width, "meta", d_in, layout)  # shapes only: the checkpoint's tensors come next
    module = sae.local if isinstance(sae, LatentShardedSAE) else sae
    sharded = is_sharded(store, path)
    if sharded:
        saved, optimizer_meta = read_json(store, path, "trainer_state.json"), read_json(store, path, "optimizer.json")
    else:
        weights, (optimizer_tensors, optimizer_meta), saved = unsharded_files(
            unsharded_checkpoint(store, sae_name, pointer["version"]), pointer.get("step"), device)
    groups = module.param_groups(settings.learning_rate)  # the optimizer's groups (``_optimizer``)
    stored = [len(g["params"]) for g in optimizer_meta["param_groups"]]
    if stored != [len(g["params"]) for g in groups]:  # e.g. JumpReLU before θ had its own group
        log(f"the checkpoint of {sae_name} (step {pointer.get('step')}) has the optimizer layout of an earlier version "
            f"(parameters per group {stored}, now {[len(g['params']) for g in groups]}): training starts afresh and "
            "replaces it")
        return None
    shards = LatentLayout(settings.n_latents, layout.latent_parallel)
    if sharded:
        tensors = read_shard(store, sae_name, shards, layout.latent_rank, version=pointer["version"], device=device)
    else:
        adam, optimizer_meta = stored_adam_state(optimizer_tensors, optimizer_meta, parameter_names(module, groups))
        whole = {**{SAE + k: v for k, v in weights.items()}, **adam,
                 **{f"{TRAINER}{k}": saved.pop(k) for k in ("tokens_since_fired", "rng")}}
        del weights, optimizer_tensors, adam  # ``whole`` alone holds them: each is freed once its rows are copied
        tensors = shard_slice(whole, settings.variant, shards, layout.latent_rank)
        del whole
        tensors = _owned(tensors, device)
    with_weights(module, sae_state(tensors), device)
    return _Resume(sae, TrainState(saved["step"], saved["tokens"], saved["history"],
                                   target_steps=saved.get("target_steps")), tensors, optimizer_meta)


def _owned(tensors: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """``tensors``, each in memory of its own, one at a time (each original dropped as its copy is made):
    a view of a larger tensor (a latent shard's rows of a whole one) is copied, so the whole is freed;
    training on the CPU (``device``), so is one not at the 64-byte alignment of torch's allocator, which
    an uninterrupted run's tensors have (safetensors' buffers have their own; BLAS kernels may round
    differently on another alignment). Their device is left as it is (``restore_training`` moves them)."""
    owned, align = {}, torch.device(device).type == "cpu"
    for name in list(tensors):
        tensor = tensors.pop(name)
        copy = tensor.untyped_storage().nbytes() > tensor.nbytes or (align and tensor.data_ptr() % 64)
        owned[name] = tensor.clone() if copy else tensor
    return owned


def train_sae(store: ArtifactStore, shuffle_name: str, sae_name: str, settings: TrainSettings,
              device: torch.device | str = "cpu", log: Callable[[str], None] = print,
              on_metrics: Callable[[dict], None] | None = None) -> dict:
    """Train (or resume, or find finished) the SAE ``sae_name`` on shuffled store ``shuffle_name``.

    Inside a torch.distributed process group (sae_platform.distributed) this process is one rank of
    a data-parallel training: it reads its slice of each batch, gradients and fired latents are
    reduced over the ranks, and only rank 0 logs and commits checkpoints. With
    ``settings.latent_parallel`` R > 1 it is one latent shard of one data-parallel replica
    (sae_platform.latent_parallel): it holds and trains n_latents / R latents, their dead counters,
    and writes its shard of every checkpoint (every rank must call this; rank 0 commits)."""
    device = torch.device(device)
    rank, world = rank_and_world()
    layout = current_layout(settings.latent_parallel, device)
    shuffled = open_shuffled(store, shuffle_name)
    n_train = _train_rows(shuffled, settings)
    n_steps = max(1, settings.token_budget // settings.batch_size)
    epochs = n_steps * settings.batch_size / (n_train // settings.batch_size * settings.batch_size)
    d_in = activation_attrs(store, shuffle_name).get("d_in")  # paired rows: a transcoder
    finished = _finished(store, sae_name, settings, shuffled, n_steps)
    if finished is not None:
        log(f"{sae_name} is already trained for this config and data (step {finished.step}); nothing to do")
        return _summary(store, sae_name, finished, settings, started=time.perf_counter(),
                        resumed_from=finished.step, device=device)
    shuffled.check_pieces()  # a damaged piece fails here, before the first step
    resume = _resume(store, sae_name, settings, shuffled, d_in, layout, device, log) \
        or _resume_grown(store, sae_name, settings, shuffled, d_in, layout, device, log)
    sae = resume.sae if resume else _new_sae(settings, shuffled.d_model, device, shuffled, d_in, layout)
    sae.selection_dtype = selection_dtype(settings.selection_precision, device)
    optimizer = _optimizer(sae, settings, device)
    initial_lrs = base_lrs(optimizer)  # before a resume loads the last step's scheduled lrs
    state = resume.restore(optimizer, device) if resume else None
    resumed = state is not None
    if state is not None and state.target_steps:
        n_steps = state.target_steps
    if state is None:
        held = len(layout.shard(settings.n_latents))  # the dead counters of this rank's latents
        state = TrainState(tokens_since_fired=torch.zeros(held, dtype=torch.long, device=device))
        picks = f", picking latents in {str(sae.selection_dtype).removeprefix('torch.')}" if sae.selection_dtype else ""
        sharded = f", {layout.data_parallel} x {layout.latent_parallel} latent shards of {held}" \
            if layout.latent_parallel > 1 else ""
        log(f"training {sae_name}: {settings.variant}, {settings.n_latents} latents, {n_steps} steps of "
            f"{settings.batch_size} on {n_train:,} rows ({epochs:.2f} epochs) on {device}{picks}{sharded}")
    else:
        log(f"resuming {sae_name} from step {state.step} ({state.tokens:,} tokens)")
    state.heldout, exclude = training_heldout(store, sae_name, shuffled, settings.holdout_rows, resumed)
    resumed_from, started = state.step, time.perf_counter()
    warned = False
    every = max(1, settings.checkpoint_every_tokens // settings.batch_size)
    schedule = batch_schedule(n_train, settings.batch_size, state.step, n_steps)
    replica = (layout.data_rank, layout.data_parallel)  # this replica's part of each batch (its latent ranks' too)
    batches = prefetch(shuffled, schedule, device, exclude=exclude, wrap=n_train, part=replica)
    with freed_blocks_reused():  # each step's gradients are faulted in afresh otherwise (glibc_malloc)
        for x, ids, start in batches:
            _check_finite(x, ids, start, state.step, store, sae_name)
            dead = state.tokens_since_fired >= settings.dead_after_tokens
            target = x if d_in is None else x[:, d_in:]
            out = sae(x, dead_mask=dead, target=None if d_in is None else target)
            loss, terms = sae.loss(target, out)
            if not torch.isfinite(loss):
                raise TrainingError(f"the loss became {loss.item()} at step {state.step} ({state.tokens:,} tokens)",
                                    f"lower lr; {_committed_note(store, sae_name)}")
            loss.backward()
            if layout.data_parallel > 1:
                average_gradients(sae.parameters(), layout.data_group)
            sae.remove_parallel_grad_()
            set_lr(optimizer, initial_lrs, settings.lr_factor(state.step, n_steps))
            optimizer.step()
            # freed now, not before the next backward: the forward pass and a checkpoint's write never hold
            # the gradients (a 2^20-latent shard's are 2.25 GiB; docs/results.md, the 2^20 run)
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                sae.normalize_decoder_()
            state.step += 1
            state.tokens += settings.batch_size
            state.tokens_since_fired += settings.batch_size
            fired = fired_on_any_rank(out.fired, layout.data_group) if layout.data_parallel > 1 else out.fired
            state.tokens_since_fired[fired] = 0
            if state.step % settings.log_every_steps == 0 or state.step == n_steps:
                row = _metrics_row(state, loss, terms, out, target, _counted_figures(sae, out, dead, layout), started,
                                   resumed_from, settings)
                if world > 1:
                    row = mean_over_ranks(row, same_everywhere=("l0", "dead_fraction"))
                state.history.append(row)
                if on_metrics:  # with the run's own step count: a resumed continuation goes past settings'
                    on_metrics({**row, "n_steps": n_steps})
                if rank == 0 and not warned and (warning := sae.training_warning(row["l0"])):
                    log(f"warning: {warning}")
                    warned = True  # once per run: the log stays readable
            if state.step % every == 0 and state.step < n_steps and (rank == 0 or layout.latent_parallel > 1):
                save_checkpoint(store, sae_name, sae, optimizer, state, settings, shuffled, final=False)
                log(f"checkpoint at step {state.step} ({state.tokens:,} tokens)")
    if rank == 0 or layout.latent_parallel > 1:  # a sharded checkpoint: every rank takes part
        save_checkpoint(store, sae_name, sae, optimizer, state, settings, shuffled, final=True)
    barrier()
    return _summary(store, sae_name, state, settings, started, resumed_from, device)


def _counted_figures(sae, out, dead: torch.Tensor, layout: Layout) -> tuple[float, float]:
    """(L0 of the whole batch, fraction of all latents dead): integer counts summed over the data
    replicas (active pairs, rows) and the latent ranks (dead latents; active pairs are summed over them
    in the forward), then divided once, so both equal one process's exactly. A collective."""
    counts = torch.stack([out.active, out.active.new_tensor(out.recon.shape[0])])
    if layout.data_parallel > 1:
        counts = summed_over_ranks(counts, layout.data_group)
    dead_count = sae.dead_count(dead) if layout.latent_parallel > 1 else int(dead.sum())
    return float(mean_active(counts[0], int(counts[1]), out.l0.dtype)), dead_count / sae.config["n_latents"]


def _metrics_row(state, loss, terms, out, x, counted: tuple[float, float], started, resumed_from, settings) -> dict:
    with torch.no_grad():
        nmse = float(normalized_mse(out.recon, x))
    elapsed = time.perf_counter() - started
    return {"step": state.step, "tokens": state.tokens, "loss": float(loss.detach()), "nmse": nmse, "l0": counted[0],
            "dead_fraction": counted[1],
            "tokens_per_second": (state.step - resumed_from) * settings.batch_size / max(elapsed, 1e-9),
            **{f"loss_{k}": float(v.detach()) for k, v in terms.items()}}


def _summary(store, sae_name, state: TrainState, settings, started, resumed_from, device) -> dict:
    last = state.history[-1] if state.history else {}
    elapsed = time.perf_counter() - started
    return {"run": sae_name, "path": store.url(store.resolve(checkpoint_name(sae_name))), "steps": state.step,
            "tokens": state.tokens, "resumed_from_step": resumed_from, "seconds": elapsed,
            "tokens_per_second": (state.step - resumed_from) * settings.batch_size / max(elapsed, 1e-9)
            if state.step > resumed_from else math.nan,
            "final_nmse": last.get("nmse"), "final_l0": last.get("l0"), "dead_fraction": last.get("dead_fraction"),
            "history": state.history, "variant": settings.variant, "n_latents": settings.n_latents,
            "peak_memory_bytes_per_rank": peak_memory_per_rank(device)}
