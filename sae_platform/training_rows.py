"""Which tokens are training rows: the one rule caching applies and every consumer of an SAE repeats.

A token of packed contexts ``tokens`` [n_contexts, ctx_len] is a training row unless

* it is at position 0 or is the start token (the attention sink at position 0, and the separator
  between packed documents, ``corpus.pack_contexts``: any occurrence of the start-token id), or
* its norm at the hook point (a transcoder pair: its input's) exceeds ``sink_norm_factor`` x the
  median norm of the remaining tokens of its *median group*: ``sink_median_contexts`` consecutive
  contexts, counted from the first context given (caching's forward batch, ``CacheSettings.batch_size``;
  the median of an even count is the lower middle value, as ``torch.median``). A factor of 0
  keeps every non-start token.

Caching (``activations.cache_partition``) applies it per hook-point store and records it in
each store's attributes (``RowRule.attrs``); every consumer reads it back from the activations
the SAE was trained on (``RowRule.from_attrs`` of ``activations.activation_attrs``): the
downstream-CE splice (``evaluate.downstream_ce``), the held-out codes that N2G and the probes
score (``metrics.heldout_codes``), the tokens ablated for the ablation sparsity
(``ablation.ablation_sparsities``), and, for the start-token part, where a context window stops
(``contexts``). :func:`training_rows` is the one function that decides.

numpy only: callers measure the norms (in float32, with torch, as caching does) and pass them,
so the rule needs no torch and readers that only cut windows stay light.
"""

from dataclasses import dataclass

import numpy as np

# What caching used before the rule was recorded in a store's attributes (its defaults then).
LEGACY_SINK_NORM_FACTOR = 10.0
LEGACY_SINK_MEDIAN_CONTEXTS = 16


@dataclass(frozen=True)
class RowRule:
    """The settings that define training rows (recorded by caching, read back by every consumer)."""

    start_token_id: int
    sink_norm_factor: float     # 0: no sink rule (every non-start token is a row)
    sink_median_contexts: int   # contexts per median group (caching's forward batch)

    def attrs(self) -> dict:
        """What caching records in a hook-point store's attributes."""
        return {"start_token_id": int(self.start_token_id), "sink_norm_factor": float(self.sink_norm_factor),
                "sink_median_contexts": int(self.sink_median_contexts)}

    def contexts_at_once(self, batch_size: int) -> int:
        """How many contexts a consumer decides together (a median group of the sink rule; without
        one, any number: ``batch_size``)."""
        return max(int(self.sink_median_contexts if self.sink_norm_factor > 0 else batch_size), 1)

    @classmethod
    def from_attrs(cls, attrs: dict, start_token_id: int | None = None) -> "RowRule":
        """The rule of a hook-point store from its attributes (``activations.activation_attrs``).

        Stores cached before the rule was recorded lack some keys: their sink rule is the one
        caching applied then, ``sink_norm_factor`` 10.0 (``LEGACY_SINK_NORM_FACTOR``) over
        forward batches of 16 contexts (``LEGACY_SINK_MEDIAN_CONTEXTS``, the default batch size),
        and the start token, when not recorded either, is ``start_token_id`` (the model's)."""
        start = attrs.get("start_token_id", start_token_id)
        if start is None:
            raise ValueError("the activations record no start_token_id and none was given")
        factor = attrs.get("sink_norm_factor")
        contexts = attrs.get("sink_median_contexts")
        return cls(int(start), LEGACY_SINK_NORM_FACTOR if factor is None else float(factor),
                   LEGACY_SINK_MEDIAN_CONTEXTS if contexts is None else int(contexts))


def training_rows(tokens: np.ndarray, rule: RowRule, norms: np.ndarray | None = None) -> np.ndarray:
    """bool [n_contexts, ctx_len]: which tokens of ``tokens`` are training rows under ``rule``.

    ``norms`` [n_contexts, ctx_len]: each token's norm at the hook point (values at start
    tokens are ignored); the median groups are ``rule.sink_median_contexts`` contexts from
    ``tokens[0]`` on, so pass whole groups (caching passes one forward batch at a time).
    Without ``norms`` only the start-token part applies: every token that can be a row, a
    superset of the rows when the sink rule is on (what a context window may show)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [n_contexts, ctx_len], got shape {tokens.shape}")
    mask = tokens != rule.start_token_id
    mask[:, 0] = False
    if norms is None or rule.sink_norm_factor <= 0:
        return mask
    norms = np.asarray(norms)
    if norms.shape != tokens.shape:
        raise ValueError(f"norms have shape {norms.shape}, tokens {tokens.shape}")
    group = max(int(rule.sink_median_contexts), 1)
    for first in range(0, len(tokens), group):
        m = mask[first:first + group]
        n = norms[first:first + group][m]
        if not len(n):
            continue
        k = (len(n) - 1) // 2  # the lower median, as torch.median (NaN when any norm is NaN, as torch)
        median = np.nan if np.isnan(n).any() else np.partition(n, k)[k]
        m[m] = n <= n.dtype.type(rule.sink_norm_factor) * median
    return mask
