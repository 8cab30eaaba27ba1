"""The refresh policy: when new batches are worth a new SAE.

A finished checkpoint records the batches it was trained on (``trained_batches``: key, version and
rows of each input of its shuffled store). When the shuffled store is rebuilt and the only change
is *added* batches holding fewer tokens than ``retrain_above_fraction`` of the tokens the SAE was
trained on, the SAE is kept: training skips it, and the feature tables are brought up to date
incrementally (pass 1 for the new batches only, pass 2 merging every batch's partials, pass 3
computing only the windows of newly shown examples: ``contexts.build_partition_windows``). The
checkpoint is then *stale*, and says so (:meth:`Unseen.describe`). At or above the fraction the SAE
is retrained by resuming its finished checkpoint for the new tokens (:func:`continuation`) while its
settings are unchanged. A batch removed or re-cached, another hook point's store or another d_model
always trains from scratch: the SAE's data changed, not only grew. A kept or resumed SAE keeps the
held-out rows it recorded when it first trained (``sae_platform.heldout``): it is evaluated on them,
never on the rebuilt store's last rows (which hold rows it trained on), and a resumed one skips them.

Pure: reads only the pointer and the shuffled store's index handed to it.
"""

from dataclasses import dataclass

RETRAIN_ABOVE_FRACTION = 0.1  # the default of TrainSettings.retrain_above_fraction
TRAINED_BATCHES = "trained_batches"  # the checkpoint pointer's field: [{key, version, n_rows}, ...]
# the checkpoint pointer's field: how many held-out rows it records by name (sae_platform.heldout)
HELDOUT_RECORDED = "heldout_rows"


@dataclass(frozen=True)
class Unseen:
    """What a checkpoint was not trained on, of the current shuffled store: the new ``batches``
    (keys) and their ``tokens`` (rows), beside the ``trained_tokens`` of its training."""

    trained_tokens: int
    batches: tuple[str, ...] = ()
    tokens: int = 0

    @property
    def fraction(self) -> float:
        """New tokens per trained token (0 when there are none; inf for an SAE trained on none)."""
        if not self.tokens:
            return 0.0
        return self.tokens / self.trained_tokens if self.trained_tokens else float("inf")

    def within(self, retrain_above_fraction: float) -> bool:
        """Whether the SAE is kept: nothing new, or less than ``retrain_above_fraction`` of its tokens."""
        return not self.tokens or self.fraction < retrain_above_fraction

    def describe(self) -> str:
        """The staleness line for logs and metadata ('' when nothing is unseen)."""
        if not self.tokens:
            return ""
        shown = ", ".join(self.batches[:5]) + (" …" if len(self.batches) > 5 else "")
        return (f"stale: trained on {self.trained_tokens:,} tokens, {self.tokens:,} new tokens not seen "
                f"({self.fraction:.1%}, batches {shown})")


def batches_record(index: dict) -> list[dict]:
    """What a checkpoint records of the shuffled store it was trained on (``index``: the store's
    index.json): each input's key, version and rows."""
    return [{"key": i["key"], "version": i["version"], "n_rows": int(i["n_rows"])} for i in index["inputs"]]


def unseen_since(pointer: dict, index: dict) -> Unseen | None:
    """The batches of the shuffled store (``index``) that checkpoint ``pointer`` was not trained on.

    None when the store's data is not the checkpoint's plus new batches: another store or d_model,
    a trained batch removed or re-cached, or a checkpoint that recorded no batches or no held-out
    rows (written before they were recorded: on the rebuilt store, which rows it never trained on
    is unknown, so it could be neither evaluated nor resumed without training on them). An empty
    ``Unseen`` when it is the same plan."""
    data = pointer.get("data") or {}
    if data.get("shuffle") != index.get("name") or data.get("d_model") != index.get("d_model"):
        return None
    trained_tokens = int(pointer.get("tokens") or 0)
    if data.get("plan_id") == index.get("plan_id"):
        return Unseen(trained_tokens)
    recorded = pointer.get(TRAINED_BATCHES)
    if not recorded or pointer.get(HELDOUT_RECORDED) is None:
        return None
    trained = {b["key"]: b["version"] for b in recorded}
    current = {i["key"]: i for i in index["inputs"]}
    if any(current.get(key, {}).get("version") != version for key, version in trained.items()):
        return None
    new = sorted(set(current) - set(trained))
    return Unseen(trained_tokens, tuple(new), sum(int(current[k]["n_rows"]) for k in new))


def kept_unseen(pointer: dict | None, index: dict, retrain_above_fraction: float) -> Unseen | None:
    """The ``Unseen`` of a *finished* checkpoint the policy keeps on the shuffled store ``index``;
    None when it must be (re)trained."""
    if pointer is None or not pointer.get("final"):
        return None
    unseen = unseen_since(pointer, index)
    return unseen if unseen is not None and unseen.within(retrain_above_fraction) else None


# -- above the threshold: go on training the finished checkpoint, where its settings allow ---------

@dataclass(frozen=True)
class Continuation:
    """How a finished checkpoint goes on training on its grown shuffled store: from ``from_step``,
    ``added_steps`` more steps (the budget raised by the new tokens: ``unseen.tokens // batch_size``,
    at least one); the Adam moments and the dead-latent counters go on from the checkpoint. The lr
    goes on constant, or a decaying schedule (``TrainSettings.lr_schedule``) is re-planned over the
    longer run: the trainer sets each step's lr from its step and the run's new last step."""

    from_step: int
    added_steps: int
    unseen: Unseen

    def describe(self) -> str:
        """The log and plan line's words for it."""
        return (f"resume from step {self.from_step:,} for {self.added_steps:,} more step(s), the budget raised by "
                f"{self.unseen.tokens:,} new tokens (batches {', '.join(self.unseen.batches[:5])}"
                f"{' …' if len(self.unseen.batches) > 5 else ''})")


def continuation(pointer: dict | None, index: dict, settings: dict | None, batch_size: int) -> Continuation | str:
    """The ``Continuation`` of checkpoint ``pointer`` on the shuffled store ``index``, or why it
    must train from scratch (a string for the log): no finished checkpoint; ``settings`` (the
    current settings' ``trainer.identity``, None when unknown: taken as unchanged) differ from the
    ones it was trained with (another n_latents, variant, k, lr, batch_size, seed, token_budget,
    dead_after_tokens, holdout_rows, hparams …: the changed ones are named); the store's data is
    not its data plus new batches (``unseen_since``); or nothing new (then it is current)."""
    if pointer is None or not pointer.get("final"):
        return "no finished checkpoint to resume from"
    trained_with = pointer.get("settings") or {}
    if settings is not None and trained_with != settings:
        changed = sorted(k for k in set(trained_with) | set(settings) if trained_with.get(k) != settings.get(k))
        return ("the settings changed since the checkpoint was trained ("
                + ", ".join(f"{k} {trained_with.get(k)!r} → {settings.get(k)!r}" for k in changed[:6])
                + (" …" if len(changed) > 6 else "") + "): a resumed SAE would not be the one these settings train")
    unseen = unseen_since(pointer, index)
    if unseen is None:
        return ("the shuffled store's data is not the checkpoint's plus new batches (a batch re-cached or removed, "
                "another store or d_model, or a checkpoint that recorded no batches or held-out rows)")
    if not unseen.tokens:
        return "the checkpoint is current on this shuffled store"
    return Continuation(int(pointer.get("step") or 0), max(1, unseen.tokens // batch_size), unseen)
