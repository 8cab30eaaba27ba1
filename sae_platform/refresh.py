"""The refresh policy: when new batches are worth a new SAE.

A finished checkpoint records the batches it was trained on (``trained_batches``: key, version and
rows of each input of its shuffled store). When the shuffled store is rebuilt and the only change
is *added* batches holding fewer tokens than ``retrain_above_fraction`` of the tokens the SAE was
trained on, the SAE is kept: training skips it, and the feature tables are brought up to date
incrementally (pass 1 for the new batches only, pass 2 merging every batch's partials, pass 3
computing only the windows of newly shown examples: ``contexts.build_partition_windows``). The
checkpoint is then *stale*, and says so (:meth:`Unseen.describe`). A batch removed or re-cached,
another hook point's store or another d_model always retrains: the SAE's data changed, not only grew.

Pure: reads only the pointer and the shuffled store's index handed to it.
"""

from dataclasses import dataclass

RETRAIN_ABOVE_FRACTION = 0.1  # the default of TrainSettings.retrain_above_fraction
TRAINED_BATCHES = "trained_batches"  # the checkpoint pointer's field: [{key, version, n_rows}, ...]


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
    a trained batch removed or re-cached, or a checkpoint that recorded no batches (written before
    they were recorded, or trained on another plan). An empty ``Unseen`` when it is the same plan."""
    data = pointer.get("data") or {}
    if data.get("shuffle") != index.get("name") or data.get("d_model") != index.get("d_model"):
        return None
    trained_tokens = int(pointer.get("tokens") or 0)
    if data.get("plan_id") == index.get("plan_id"):
        return Unseen(trained_tokens)
    recorded = pointer.get(TRAINED_BATCHES)
    if not recorded:
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
