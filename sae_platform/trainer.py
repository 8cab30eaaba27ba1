"""Training an SAE on the shuffled store: short, plain, everything visible (after nanoGPT).

The loop streams the shuffled store sequentially with a prefetch thread (reading overlaps
compute), and every ``checkpoint_every_tokens`` commits a checkpoint through the storage
protocol: weights (safetensors), config (JSON), optimizer state and trainer state (step, dead-
latent counters, metrics history, RNG). A killed run resumes from the last checkpoint and, because
batch b of epoch e is always rows [b·B, (b+1)·B) of the store and nothing else is random, reaches
bitwise the same weights on CPU as an uninterrupted run.

Rows [n_rows − holdout_rows, n_rows) of the store are never trained on: evaluation uses them.
A token budget larger than the training rows loops over epochs in the same (already random)
order; the log says how many.

Checkpoint layout (``sae/<run>/<version>/``)::

    sae_weights.safetensors   the SAE's state_dict (input scale and b_pre included)
    cfg.json                  SAE config + training settings + data fingerprint
    optimizer.pt              Adam state
    trainer_state.pt          step, tokens, tokens-since-fired, history, torch RNG state
"""

import io
import json
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from sae_platform.errors import PlatformError, StorageError
from sae_platform.sae import ADAM_EPS, VARIANTS, build_sae, lr_for, normalized_mse
from sae_platform.settings import SettingsError, setting, validate
from sae_platform.shuffle import Shuffled, open_shuffled
from sae_platform.storage import ArtifactStore

PREFIX = "sae"
CALIBRATION_ROWS = 16_384


class TrainingError(PlatformError):
    """Training cannot go on (bad data, diverged); the last good checkpoint is left as it was."""


@dataclass(frozen=True)
class TrainSettings:
    """Settings of one SAE's training. The sweep entry (config/sweep.yaml) gives the SAE's shape
    (``variant``, ``n_latents``, ``k``, ``hparams``) and may override any other field for that SAE;
    the rest are shared by the sweep (``resources.training.config``)."""

    variant: str = setting("topk", "SAE variant", choices=VARIANTS)
    n_latents: int = setting(16_384, "dictionary size (latents)", ge=1)
    k: int = setting(32, "active latents per token (TopK family only)", ge=1)
    lr: float | None = setting(None, "Adam learning rate; null: Gao et al.'s 2e-4 * sqrt(16384 / n_latents)",
                               gt=0, le=1.0)
    batch_size: int = setting(4096, "rows (tokens) per step", ge=1)
    token_budget: int = setting(1_000_000, "training tokens (loops over epochs if larger than the data); "
                                           "at least one batch", ge=1)
    seed: int = setting(0, "init seed; same seed + same data = same weights", ge=0)
    checkpoint_every_tokens: int = setting(250_000, "commit a resumable checkpoint this often", ge=1)
    dead_after_tokens: int = setting(10_000_000, "a latent silent this long is dead (AuxK); Gao et al. use "
                                                 "10M; lower it for budgets far below that", ge=1)
    holdout_rows: int = setting(8192, "last rows of the shuffled store, never trained on, kept for evaluation",
                                ge=0)
    log_every_steps: int = setting(10, "a metrics row every this many steps", ge=1)
    hparams: dict = setting(None, "further variant settings (k_aux, n_experts, l1_coeff, …)",
                            default_factory=dict)

    def __post_init__(self):
        validate(self, "resources.training.config")
        if self.token_budget < self.batch_size:
            raise SettingsError(f"resources.training.config.token_budget = {self.token_budget} is less than one "
                                f"batch (batch_size = {self.batch_size})",
                                "set token_budget to at least batch_size tokens")

    def sae_kwargs(self) -> dict:
        top_k = self.variant in ("topk", "batchtopk", "switch")
        return {**({"k": self.k} if top_k else {}), **self.hparams}

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else lr_for(self.n_latents)


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    history: list = field(default_factory=list)
    tokens_since_fired: torch.Tensor | None = None


def checkpoint_name(run: str) -> str:
    return f"{PREFIX}/{run}"


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


def prefetch(shuffled: Shuffled, schedule: Iterator[tuple[int, int]], device: torch.device,
             depth: int = 3) -> Iterator[tuple[torch.Tensor, np.ndarray, int]]:
    """Read and convert the next batches on a thread while the current one trains."""
    batches: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def read():
        try:
            for start, end in schedule:
                ids, acts = zip(*shuffled.blocks(start, end))
                x = torch.from_numpy(np.concatenate(acts)).float()
                if device.type == "cuda":
                    x = x.pin_memory()
                while not stop.is_set():
                    try:
                        batches.put((x, np.concatenate(ids), start), timeout=0.5)
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


def _check_finite(x: torch.Tensor, ids: np.ndarray, start: int, step: int) -> None:
    bad = ~torch.isfinite(x).all(dim=1)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise TrainingError(
            f"NaN/inf in the activations (step {step}): shuffled row {start + first} (global row id "
            f"{int(ids[first])}), {int(bad.sum())} bad row(s) in this batch",
            "re-cache the activation partition holding that row (global row ids run over partitions in "
            "key order), then re-run the shuffle; the last good checkpoint is untouched")


def _new_sae(settings: TrainSettings, d_model: int, device: torch.device, shuffled: Shuffled):
    torch.manual_seed(settings.seed)
    sae = build_sae(settings.variant, d_model, settings.n_latents, device=device, **settings.sae_kwargs())
    rows = min(CALIBRATION_ROWS, shuffled.n_rows - settings.holdout_rows)
    ids, acts = zip(*shuffled.blocks(0, rows))
    sample = torch.from_numpy(np.concatenate(acts)).float().to(device)
    _check_finite(sample, np.concatenate(ids), start=0, step=0)
    sae.calibrate_(sample)
    return sae


def _optimizer(sae, settings: TrainSettings, device: torch.device) -> torch.optim.Optimizer:
    # fused Adam: ~25x faster than the default foreach path on CPU for 16k x 576 matrices
    try:
        return torch.optim.Adam(sae.parameters(), lr=settings.learning_rate, eps=ADAM_EPS, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(sae.parameters(), lr=settings.learning_rate, eps=ADAM_EPS)


def save_checkpoint(store: ArtifactStore, run: str, sae, optimizer, state: TrainState, settings: TrainSettings,
                    fingerprint: dict, final: bool) -> str:
    cfg = {"sae": sae.config, "training": asdict(settings), "data": fingerprint, "step": state.step,
           "tokens": state.tokens, "final": final}
    trainer_state = {"step": state.step, "tokens": state.tokens, "history": state.history,
                     "tokens_since_fired": state.tokens_since_fired.cpu(), "rng": torch.get_rng_state()}
    with store.writing(checkpoint_name(run), step=state.step, tokens=state.tokens, final=final,
                       settings=asdict(settings), data=fingerprint) as version:
        store.fs.pipe_file(f"{version}/sae_weights.safetensors",
                           save_safetensors({k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}))
        store.fs.pipe_file(f"{version}/cfg.json", json.dumps(cfg, indent=2, default=str).encode())
        store.fs.pipe_file(f"{version}/optimizer.pt", _torch_bytes(optimizer.state_dict()))
        store.fs.pipe_file(f"{version}/trainer_state.pt", _torch_bytes(trainer_state))
    return store.resolve(checkpoint_name(run))


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def finished_checkpoint(store: ArtifactStore, shuffle_name: str, run: str, settings: TrainSettings) -> dict | None:
    """The pointer of ``run``'s checkpoint when it is a finished training with these settings on the
    current shuffled store (then training again would only find it); None otherwise."""
    pointer = store.pointer(checkpoint_name(run))
    if pointer is None or not pointer.get("final"):
        return None
    if pointer.get("settings") != json.loads(json.dumps(asdict(settings))):
        return None
    if store.resolve(f"shuffled/{shuffle_name}") is None:
        return None
    return pointer if pointer.get("data") == data_fingerprint(open_shuffled(store, shuffle_name)) else None


def load_sae(store: ArtifactStore, run: str, device: str | torch.device = "cpu"):
    """The SAE of the last committed checkpoint of ``run``, and its cfg.json."""
    path = store.require(checkpoint_name(run), f"SAE checkpoint {run!r}", "materialize sae_checkpoint first")
    cfg = json.loads(store.fs.cat_file(f"{path}/cfg.json"))
    sae_cfg = dict(cfg["sae"])
    sae = build_sae(sae_cfg.pop("variant"), sae_cfg.pop("d_model"), sae_cfg.pop("n_latents"), device=device,
                    **sae_cfg)
    sae.load_state_dict(load_safetensors(store.fs.cat_file(f"{path}/sae_weights.safetensors")))
    return sae, cfg


def _resume(store, run, settings, fingerprint, sae, optimizer, device) -> TrainState | None:
    pointer = store.pointer(checkpoint_name(run))
    if pointer is None or pointer.get("settings") != json.loads(json.dumps(asdict(settings))) \
            or pointer.get("data") != fingerprint:
        return None
    path = store.resolve(checkpoint_name(run))
    sae.load_state_dict(load_safetensors(store.fs.cat_file(f"{path}/sae_weights.safetensors")))
    optimizer.load_state_dict(torch.load(io.BytesIO(store.fs.cat_file(f"{path}/optimizer.pt")),
                                         map_location=device, weights_only=False))
    saved = torch.load(io.BytesIO(store.fs.cat_file(f"{path}/trainer_state.pt")), weights_only=False)
    torch.set_rng_state(saved["rng"])
    return TrainState(saved["step"], saved["tokens"], saved["history"], saved["tokens_since_fired"].to(device))


def train_sae(store: ArtifactStore, shuffle_name: str, run: str, settings: TrainSettings,
              device: torch.device | str = "cpu", log: Callable[[str], None] = print,
              on_metrics: Callable[[dict], None] | None = None) -> dict:
    """Train (or resume, or find finished) the SAE ``run`` on shuffled store ``shuffle_name``."""
    device = torch.device(device)
    shuffled = open_shuffled(store, shuffle_name)
    n_train = _train_rows(shuffled, settings)
    fingerprint = data_fingerprint(shuffled)
    n_steps = max(1, settings.token_budget // settings.batch_size)
    epochs = n_steps * settings.batch_size / (n_train // settings.batch_size * settings.batch_size)
    sae = _new_sae(settings, shuffled.d_model, device, shuffled)
    optimizer = _optimizer(sae, settings, device)
    state = _resume(store, run, settings, fingerprint, sae, optimizer, device)
    if state is None:
        state = TrainState(tokens_since_fired=torch.zeros(settings.n_latents, dtype=torch.long, device=device))
        log(f"training {run}: {settings.variant}, {settings.n_latents} latents, {n_steps} steps of "
            f"{settings.batch_size} on {n_train:,} rows ({epochs:.2f} epochs) on {device}")
    elif state.step >= n_steps:
        log(f"{run} is already trained for this config and data (step {state.step}); nothing to do")
        return _summary(store, run, state, settings, sae, started=time.perf_counter(), resumed_from=state.step)
    else:
        log(f"resuming {run} from step {state.step} ({state.tokens:,} tokens)")
    resumed_from, started = state.step, time.perf_counter()
    every = max(1, settings.checkpoint_every_tokens // settings.batch_size)
    schedule = batch_schedule(n_train, settings.batch_size, state.step, n_steps)
    for x, ids, start in prefetch(shuffled, schedule, device):
        _check_finite(x, ids, start, state.step)
        dead = state.tokens_since_fired >= settings.dead_after_tokens
        out = sae(x, dead_mask=dead)
        loss, terms = sae.loss(x, out)
        if not torch.isfinite(loss):
            raise TrainingError(f"the loss became {loss.item()} at step {state.step} ({state.tokens:,} tokens)",
                                "lower lr; the last good checkpoint is untouched and resuming starts from it")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_grad_()
        optimizer.step()
        with torch.no_grad():
            sae.normalize_decoder_()
        state.step += 1
        state.tokens += len(x)
        state.tokens_since_fired += len(x)
        state.tokens_since_fired[out.fired] = 0
        if state.step % settings.log_every_steps == 0 or state.step == n_steps:
            row = _metrics_row(state, loss, terms, out, x, dead, started, resumed_from, settings)
            state.history.append(row)
            if on_metrics:
                on_metrics(row)
        if state.step % every == 0 and state.step < n_steps:
            save_checkpoint(store, run, sae, optimizer, state, settings, fingerprint, final=False)
            log(f"checkpoint at step {state.step} ({state.tokens:,} tokens)")
    save_checkpoint(store, run, sae, optimizer, state, settings, fingerprint, final=True)
    return _summary(store, run, state, settings, sae, started, resumed_from)


def _metrics_row(state, loss, terms, out, x, dead, started, resumed_from, settings) -> dict:
    with torch.no_grad():
        nmse = float(normalized_mse(out.recon, x))
    elapsed = time.perf_counter() - started
    return {"step": state.step, "tokens": state.tokens, "loss": float(loss.detach()), "nmse": nmse, "l0": float(out.l0),
            "dead_fraction": float(dead.float().mean()),
            "tokens_per_second": (state.step - resumed_from) * settings.batch_size / max(elapsed, 1e-9),
            **{f"loss_{k}": float(v.detach()) for k, v in terms.items()}}


def _summary(store, run, state: TrainState, settings, sae, started, resumed_from) -> dict:
    last = state.history[-1] if state.history else {}
    elapsed = time.perf_counter() - started
    return {"run": run, "path": store.url(store.resolve(checkpoint_name(run))), "steps": state.step,
            "tokens": state.tokens, "resumed_from_step": resumed_from, "seconds": elapsed,
            "tokens_per_second": (state.step - resumed_from) * settings.batch_size / max(elapsed, 1e-9)
            if state.step > resumed_from else math.nan,
            "final_nmse": last.get("nmse"), "final_l0": last.get("l0"), "dead_fraction": last.get("dead_fraction"),
            "history": state.history, "variant": settings.variant, "n_latents": settings.n_latents}
