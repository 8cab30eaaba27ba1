"""Explanations without an LLM: Neuron-to-Graph-style token patterns, scored on held-out text.

Gao et al. 2024 ("Scaling and evaluating sparse autoencoders", section 4.4) judge how explainable
a latent's activations are with N2G (Foote et al. 2023): an explanation is a small set of token
patterns, each the activating token plus the minimal preceding context that predicts the
activation, with wildcards; it is scored by precision and recall of "the pattern matches" against
"the latent fires" on text it was not built from. This module is that, without the model in the
loop (N2G prunes context by re-running the model; here the minimal context is the shortest
pattern whose precision on the explanation text reaches ``min_precision``):

- A **pattern** is a tuple of token ids ending at the activating token, read left to right, with
  ``WILDCARD`` (-1) for "any token": ``(t,)``, ``(a, t)``, ``(a, *, t)``, ``(b, a, t)``.
- ``TokenStream``: token ids cut into segments (contexts or windows; a pattern never crosses a
  segment boundary) with an inverted index (token id -> sorted positions), so matching a pattern
  costs the occurrences of its last token, not a pass over the text.
- ``explain``: for each example position (top and interval examples first), the candidates
  ending there (the token alone, with 1..``max_context`` tokens before it, with wildcards); among
  those whose precision on the explanation stream reaches ``min_precision``, the one explaining
  most firings (ties: the shortest), else the most precise if it beats the feature's base rate.
  The explanation is the ``max_patterns`` patterns chosen for most examples.
- ``score``: precision = firings among matches / matches; recall = matches among firings /
  firings, on a held-out stream. A latent "fires" where its activation is > 0.

Shapes: streams are 1-D int arrays of token ids; firing positions are sorted int64 arrays of
positions into the same stream. All numpy, no torch: it runs where the browser is built.
"""

from collections import Counter
from dataclasses import dataclass

import numpy as np

from sae_platform.errors import PlatformError

WILDCARD = -1
MAX_PATTERNS = 5
MIN_PRECISION = 0.5
MAX_EXAMPLES = 24  # example positions per feature a pattern is built from


class TokenStream:
    """Token ids [n] cut into segments; ``starts`` [n_segments] are the first position of each.

    ``offset[i]``: how many tokens of its own segment precede position i (a pattern of length L
    can end at i only if offset[i] >= L - 1)."""

    def __init__(self, tokens: np.ndarray, starts: np.ndarray | None = None):
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise PlatformError(f"a token stream is a 1-D array of integer token ids, got {tokens.dtype} "
                                f"{tokens.shape}", "flatten the contexts first (tokens.reshape(-1))")
        self.tokens = tokens.astype(np.int64)
        n = len(self.tokens)
        starts = np.zeros(1, dtype=np.int64) if starts is None else np.asarray(starts, dtype=np.int64)
        is_start = np.zeros(n, dtype=bool)
        is_start[starts[(starts >= 0) & (starts < n)]] = True
        if n:
            is_start[0] = True
        first = np.maximum.accumulate(np.where(is_start, np.arange(n), 0)) if n else np.zeros(0, dtype=np.int64)
        self.offset = np.arange(n) - first
        order = np.argsort(self.tokens, kind="stable")
        self._sorted_ids = self.tokens[order]
        self._positions = order

    @classmethod
    def from_contexts(cls, tokens: np.ndarray) -> "TokenStream":
        """A stream of contexts [n_contexts, ctx_len], one segment each."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 2:
            raise PlatformError(f"contexts must be [n_contexts, ctx_len], got shape {tokens.shape}",
                                "pass the packed held-out contexts")
        return cls(tokens.reshape(-1), np.arange(tokens.shape[0]) * tokens.shape[1])

    def __len__(self) -> int:
        return len(self.tokens)

    def occurrences(self, token: int) -> np.ndarray:
        lo, hi = np.searchsorted(self._sorted_ids, [token, token + 1])
        return self._positions[lo:hi]  # sorted: argsort is stable

    def matches(self, pattern: tuple) -> np.ndarray:
        """Sorted positions where ``pattern`` ends (its last token is at the position)."""
        if not pattern or pattern[-1] == WILDCARD:
            raise PlatformError(f"a pattern must end in a concrete token, got {pattern}",
                                "build patterns with candidates()")
        pos = self.occurrences(int(pattern[-1]))
        need = len(pattern) - 1
        if need:
            pos = pos[self.offset[pos] >= need]
            for back, token in enumerate(reversed(pattern[:-1]), start=1):
                if token != WILDCARD and len(pos):
                    pos = pos[self.tokens[pos - back] == token]
        return pos


def candidates(stream: TokenStream, position: int, max_context: int = 2) -> list[tuple]:
    """Patterns ending at ``position``, shortest first: the token alone, then with 1..max_context
    tokens before it (and, from 2 on, the same with the nearer tokens as wildcards)."""
    t = stream.tokens
    out = [(int(t[position]),)]
    available = min(int(stream.offset[position]), max_context)
    for length in range(1, available + 1):
        before = tuple(int(x) for x in t[position - length:position])
        if length >= 2:
            out.append((before[0], *([WILDCARD] * (length - 1)), int(t[position])))
        out.append((*before, int(t[position])))
    return out


def _precision(stream: TokenStream, pattern: tuple, firing: np.ndarray) -> tuple[float, int]:
    """(precision, matches) of ``pattern`` against the bool firing mask."""
    pos = stream.matches(pattern)
    if not len(pos):
        return 0.0, 0
    return float(firing[pos].sum()) / len(pos), len(pos)


def explain(stream: TokenStream, firing_positions: np.ndarray, examples: np.ndarray, *,
            max_context: int = 2, min_precision: float = MIN_PRECISION,
            max_patterns: int = MAX_PATTERNS, _buffer: np.ndarray | None = None) -> list[tuple]:
    """The N2G-style explanation of one feature: up to ``max_patterns`` patterns.

    ``firing_positions``: positions of ``stream`` where the feature fires; ``examples``: the
    positions to build patterns from (best first, e.g. top then interval examples), each one a
    firing position. Returns [] when there is nothing to explain (no example)."""
    examples = np.asarray(examples, dtype=np.int64)[:MAX_EXAMPLES]
    if not len(examples):
        return []
    firing = np.zeros(len(stream), dtype=bool) if _buffer is None else _buffer
    firing_positions = np.asarray(firing_positions, dtype=np.int64)
    firing[firing_positions] = True
    try:
        base_rate = len(firing_positions) / max(len(stream), 1)
        chosen: Counter = Counter()
        seen: dict[tuple, tuple[float, int]] = {}
        for position in examples:
            scored = []
            for pattern in candidates(stream, int(position), max_context):
                if pattern not in seen:
                    seen[pattern] = _precision(stream, pattern, firing)
                scored.append((pattern, *seen[pattern]))
            good = [c for c in scored if c[1] >= min_precision]
            if good:  # the most firings explained; among equals the shortest context
                best = max(good, key=lambda c: (c[1] * c[2], -len(c[0])))[0]
            else:
                best, p, _ = max(scored, key=lambda c: (c[1], c[1] * c[2]))
                best = best if p > base_rate else None
            if best is not None:
                chosen[best] += 1
        return [pattern for pattern, _ in chosen.most_common(max_patterns)]
    finally:
        firing[firing_positions] = False


def match_any(stream: TokenStream, patterns: list[tuple]) -> np.ndarray:
    """Sorted unique positions where any of ``patterns`` matches."""
    if not patterns:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.concatenate([stream.matches(p) for p in patterns]))


@dataclass(frozen=True)
class Score:
    precision: float | None  # None: the explanation never matches the held-out text
    recall: float | None     # None: the feature never fires on the held-out text
    n_matches: int
    n_firings: int

    @property
    def f1(self) -> float | None:
        if self.precision is None or self.recall is None or self.precision + self.recall == 0:
            return None if self.precision is None or self.recall is None else 0.0
        return 2 * self.precision * self.recall / (self.precision + self.recall)


def score(stream: TokenStream, patterns: list[tuple], firing_positions: np.ndarray) -> Score:
    """Precision and recall of "a pattern matches" against "the feature fires" on ``stream``."""
    matched = match_any(stream, patterns)
    firing_positions = np.unique(np.asarray(firing_positions, dtype=np.int64))
    hits = len(np.intersect1d(matched, firing_positions, assume_unique=True))
    return Score(precision=hits / len(matched) if len(matched) else None,
                 recall=hits / len(firing_positions) if len(firing_positions) else None,
                 n_matches=len(matched), n_firings=len(firing_positions))


def describe(patterns: list[tuple], token_str) -> str:
    """Human-readable explanation: patterns joined by " | ", tokens quoted with repr, ``*`` for a
    wildcard, the activating token in brackets. ``token_str``: token id -> its text."""
    def one(pattern):
        words = ["*" if t == WILDCARD else repr(token_str(int(t))) for t in pattern]
        words[-1] = f"[{words[-1]}]"
        return " ".join(words)
    return " | ".join(one(p) for p in patterns)


def firing_by_feature(positions: np.ndarray, features: np.ndarray, n_features: int,
                      values: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """CSR of sparse firings: (indptr [n_features + 1], positions sorted per feature, values).
    Feature f fires at ``positions[indptr[f]:indptr[f + 1]]``."""
    positions, features = np.asarray(positions, dtype=np.int64), np.asarray(features, dtype=np.int64)
    order = np.lexsort((positions, features))
    indptr = np.zeros(n_features + 1, dtype=np.int64)
    np.cumsum(np.bincount(features, minlength=n_features)[:n_features], out=indptr[1:])
    return indptr, positions[order], None if values is None else np.asarray(values)[order]


def explain_and_score(explain_stream: TokenStream, explain_firing: tuple, examples_for, score_stream: TokenStream,
                      score_firing: tuple, features, *, max_context: int = 2,
                      min_precision: float = MIN_PRECISION) -> list[dict]:
    """Explain each feature of ``features`` on one stream and score it on another.

    ``explain_firing`` / ``score_firing``: CSR from ``firing_by_feature`` over the two streams;
    ``examples_for(f)``: the example positions (in ``explain_stream``) to build feature f's
    patterns from. Returns one dict per feature: feature, patterns, precision, recall,
    n_matches, n_firings (held-out)."""
    buffer = np.zeros(len(explain_stream), dtype=bool)
    e_ptr, e_pos = explain_firing[0], explain_firing[1]
    s_ptr, s_pos = score_firing[0], score_firing[1]
    rows = []
    for f in features:
        f = int(f)
        fire = e_pos[e_ptr[f]:e_ptr[f + 1]]
        patterns = explain(explain_stream, fire, examples_for(f), max_context=max_context,
                           min_precision=min_precision, _buffer=buffer)
        s = score(score_stream, patterns, s_pos[s_ptr[f]:s_ptr[f + 1]])
        rows.append({"feature": f, "patterns": patterns, "precision": s.precision, "recall": s.recall,
                     "n_matches": s.n_matches, "n_firings": s.n_firings})
    return rows


def summarize(rows: list[dict], min_firings: int = 1) -> dict:
    """Per SAE: mean and median precision and recall over the features that fire at least
    ``min_firings`` times on the held-out text and have an explanation (precision over those
    whose explanation matches at least once)."""
    scored = [r for r in rows if r["patterns"] and r["n_firings"] >= min_firings]
    prec = np.array([r["precision"] for r in scored if r["precision"] is not None], dtype=float)
    rec = np.array([r["recall"] for r in scored], dtype=float)
    f1 = [Score(r["precision"], r["recall"], 0, 0).f1 for r in scored]
    f1 = np.array([x if x is not None else 0.0 for x in f1], dtype=float)

    def stat(a, how):
        return float(how(a)) if len(a) else None
    return {"n2g_precision": stat(prec, np.mean), "n2g_recall": stat(rec, np.mean),
            "n2g_f1": stat(f1, np.mean), "n2g_precision_median": stat(prec, np.median),
            "n2g_recall_median": stat(rec, np.median), "n2g_features_scored": len(scored)}


# -- one feature shard, from its context windows ------------------------------------------------

def explanations_frame(rows: list[dict]):
    """The per-feature table of ``explain_windows`` rows, with related features added by the caller
    (schema ``tables.EXPLANATION_SCHEMA``; a column a row lacks is null)."""
    import polars as pl

    from sae_platform.tables import EXPLANATION_SCHEMA

    return pl.DataFrame([{k: r.get(k) for k in EXPLANATION_SCHEMA} for r in rows], schema=EXPLANATION_SCHEMA)


def explain_windows(windows, score_stream: TokenStream, score_firing: tuple, features, token_str,
                    kinds: tuple[str, ...] = ("top", "interval"), max_context: int = 2,
                    min_precision: float = MIN_PRECISION) -> list[dict]:
    """N2G explanations of ``features`` from their context windows (``tables.WINDOW_SCHEMA``: the
    feature's activation on every window token), scored on a held-out stream.

    Each feature's explanation stream is its own windows (one segment each; a token without a
    stored row counts as not firing); its examples are the window centers of ``kinds``, top
    examples by rank first. ``score_firing``: CSR (``firing_by_feature``) over ``score_stream``;
    ``token_str``: token id -> text for the readable ``explanation``."""
    import polars as pl

    from sae_platform.tables import (
        ACTS,
        CENTER,
        FEATURE,
        HAS_ACT,
        KIND,
        RANK,
        TOKEN_IDS,
    )

    order = {k: i for i, k in enumerate(kinds)}
    # stable: interval examples of equal rank keep the windows' interval order, so a feature's
    # explanation depends on its own windows only, not on which others share the frame (a shard)
    frame = (windows.filter(pl.col(KIND).is_in(list(kinds)))
             .with_columns(pl.col(KIND).replace_strict(order, return_dtype=pl.Int32).alias("_kind"))
             .sort([FEATURE, "_kind", RANK], maintain_order=True))
    lengths = frame[TOKEN_IDS].list.len().to_numpy().astype(np.int64)
    flat_tokens = frame[TOKEN_IDS].explode().to_numpy().astype(np.int64) if frame.height else np.zeros(0, np.int64)
    flat_fire = ((frame[ACTS].explode().to_numpy() > 0) & frame[HAS_ACT].explode().to_numpy()) if frame.height \
        else np.zeros(0, bool)
    window_start = np.concatenate([[0], np.cumsum(lengths)])
    centers = window_start[:-1] + frame[CENTER].to_numpy().astype(np.int64)
    feats = frame[FEATURE].to_numpy()
    s_ptr, s_pos = score_firing[0], score_firing[1]
    rows = []
    for f in features:
        f = int(f)
        lo, hi = np.searchsorted(feats, [f, f + 1])
        patterns: list[tuple] = []
        if hi > lo:
            a, b = window_start[lo], window_start[hi]
            stream = TokenStream(flat_tokens[a:b], window_start[lo:hi] - a)
            fire = np.flatnonzero(flat_fire[a:b])
            patterns = explain(stream, fire, centers[lo:hi] - a, max_context=max_context,
                               min_precision=min_precision)
        held = s_pos[s_ptr[f]:s_ptr[f + 1]] if f + 1 < len(s_ptr) else np.zeros(0, np.int64)
        s = score(score_stream, patterns, held)
        rows.append({"feature": f, "explanation": describe(patterns, token_str),
                     "patterns": [list(p) for p in patterns], "precision": s.precision, "recall": s.recall,
                     "n_matches": s.n_matches, "n_firings": s.n_firings})
    return rows
