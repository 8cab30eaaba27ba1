"""Synthetic feature tables with the pipeline's schemas, for the browser's demo, its tests and its
size and speed figures (the real tables come from the feature pipeline: ``sae_platform.features``,
``sae_platform.feature_merge``, ``sae_platform.contexts`` and ``sae_platform.logits``).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from sae_platform.browser.generate import (
    CONTEXTS_FRAME,
    COUNT,
    DENSITY,
    EXAMPLES_FRAME,
    EXPLANATIONS_FRAME,
    HISTOGRAM,
    LOGITS_FRAME,
    MAX,
    MEAN,
    N_TOKENS_TOTAL,
    SHARD_START,
    SHARD_STOP,
    STATS_FRAME,
)
from sae_platform.tables import (
    ACTIVATION,
    ACTS,
    BOTTOM_SCORES,
    BOTTOM_TOKEN_IDS,
    BOTTOM_TOKEN_STRS,
    CENTER,
    COOCCURRING,
    COOCCURRING_SHARES,
    DOC_ID,
    EXPLANATION,
    EXPLANATION_SCHEMA,
    FEATURE,
    HAS_ACT,
    INTERVAL,
    KIND,
    N_FIRINGS,
    N_MATCHES,
    NEIGHBOR_COSINES,
    NEIGHBORS,
    PARTITION,
    PATTERNS,
    PRECISION,
    RANK,
    RECALL,
    ROW,
    TOKEN_IDS,
    TOKEN_STRS,
    TOP_SCORES,
    TOP_TOKEN_IDS,
    TOP_TOKEN_STRS,
)

WORDS = ("the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on",
         "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "had", "they",
         "you", "were", "their", "one", "all", "we", "can", "her", "has", "there", "been", "if", "more",
         "when", "will", "would", "who", "so", "no", "data", "model", "token", "layer", "feature", "Paris",
         "river", "music", "code", "def", "return", "{", "}", "(", ")", ".", ",", ";", ":", "\n", "\n\n", "'s")


def _lists(name: str, values: np.ndarray, dtype=None) -> pl.Series:
    """A 2-D array as a list column (built in Arrow, not from Python lists: 2^20 features in seconds)."""
    flat = pl.Series(name, np.ascontiguousarray(values).reshape(-1), dtype=dtype)
    return flat.reshape(values.shape).arr.to_list()


def _token_lists(name: str, codes: np.ndarray, words: list[str]) -> pl.Series:
    """Token strings of a 2-D array of codes into ``words``, as a list column."""
    flat = pl.Series(name, codes.reshape(-1)).replace_strict(list(range(len(words))), words, return_dtype=pl.String)
    return flat.reshape(codes.shape).arr.to_list()


def synthetic_shards(n_features: int = 16384, shard_size: int = 4096, *, n_top: int = 10, n_intervals: int = 5,
                     per_interval: int = 3, n_random: int = 5, before: int = 16, after: int = 8, n_bins: int = 64,
                     n_logits: int = 10, vocab: list[str] | None = None,
                     seed: int = 0) -> tuple[list[dict], list[float]]:
    """Random feature tables with the pipeline's schemas: (shards, hist_bin_edges)."""
    rng = np.random.default_rng(seed)
    words = list(vocab) if vocab is not None else [w if w.startswith(("\n", "'")) or not w[0].isalnum() else " " + w
                                                   for w in WORDS]
    vocab_size = len(words)
    width = before + after + 1
    edges_np = np.logspace(-4, 4, n_bins + 1)
    edges = edges_np.tolist()
    shards = []
    for start in range(0, n_features, shard_size):
        stop = min(start + shard_size, n_features)
        feats = np.arange(start, stop)
        nf = feats.size
        fmax = rng.gamma(2.0, 2.0, nf).astype(np.float32) + 0.1
        # libm's pow per value, not numpy's: numpy's AVX-512 power rounds some values 1 ulp apart from
        # its other paths, and the same seed must give the same tables on every CPU (pinned in tests)
        density = np.array([10.0 ** float(u) for u in rng.uniform(-6, -1, nf)])
        n_tok = 10_000_000
        count = (density * n_tok).astype(np.int64)
        dead = rng.random(nf) < 0.02
        count[dead], fmax[dead], density[dead] = 0, 0, 0
        # as sae_platform.features: log-spaced edges, underflow and overflow bins (len(edges) + 1)
        log_mid = np.log10(np.sqrt(edges_np[:-1] * edges_np[1:]))
        log_max = np.log10(np.maximum(fmax, 1e-6))[:, None]
        mu = log_max - rng.uniform(0.3, 1.2, (nf, 1))
        weight = np.exp(-0.5 * ((log_mid[None, :] - mu) / 0.35) ** 2) * (log_mid[None, :] <= log_max)
        weight /= np.maximum(weight.sum(1, keepdims=True), 1e-12)
        hist = np.zeros((nf, n_bins + 2), np.int64)
        hist[:, 1:-1] = np.round(weight * count[:, None])
        hist[dead] = 0
        stats = pl.DataFrame({
            FEATURE: feats, N_TOKENS_TOTAL: np.full(nf, n_tok), COUNT: count, DENSITY: density,
            MAX: fmax, MEAN: np.where(dead, np.nan, fmax / 3), HISTOGRAM: _lists(HISTOGRAM, hist),
        }).with_columns(pl.col(MEAN).fill_nan(None))
        # examples: top, interval, random per live feature
        kinds, ranks, intervals = [], [], []
        for kind, n, ivals in (("top", n_top, [None]), ("interval", per_interval, list(range(n_intervals))),
                               ("random", n_random, [None])):
            for iv in ivals:
                kinds += [kind] * n
                ranks += list(range(n))
                intervals += [iv] * n
        per = len(kinds)
        live = feats[~dead]
        n_ex = live.size * per
        ex_feat = np.repeat(live, per)
        lmax = np.repeat(fmax[~dead], per)
        top = np.array([k == "top" for k in kinds] * live.size)
        ivl = np.array([-1 if iv is None else iv for iv in intervals] * live.size)
        frac = rng.uniform(0.02, 1.0, n_ex)                                              # random
        frac = np.where(ivl >= 0, (np.maximum(ivl, 0) + rng.uniform(0, 1, n_ex)) / n_intervals, frac)
        frac = np.where(top, np.tile([1.0 - 0.04 * r for r in ranks], live.size), frac)
        act = (lmax * np.clip(frac, 0.02, 1.0)).astype(np.float32)
        toks = rng.integers(0, vocab_size, (n_ex, width))
        acts = np.where(rng.random((n_ex, width)) < 0.15, rng.random((n_ex, width)) * act[:, None], 0.0)
        acts[:, before] = act
        has = rng.random((n_ex, width)) > 0.01
        has[:, before] = True
        acts = np.where(has, acts, 0.0).astype(np.float32)
        examples = pl.DataFrame({
            FEATURE: ex_feat, KIND: np.tile(kinds, live.size), RANK: np.tile(ranks, live.size),
            INTERVAL: pl.Series(intervals * live.size, dtype=pl.Int64), ACTIVATION: act,
            PARTITION: np.char.add("p00", (np.arange(n_ex) % 8).astype(str)),
            ROW: rng.integers(0, 1 << 30, n_ex)})
        tok_strs = _token_lists(TOKEN_STRS, toks, words)
        contexts = examples.with_columns(
            pl.lit(before, pl.Int32).alias(CENTER),
            pl.Series(TOKEN_IDS, toks.astype(np.int32)),
            tok_strs,
            pl.Series(ACTS, acts),
            pl.Series(HAS_ACT, has),
            pl.Series(DOC_ID, rng.integers(0, 100_000, n_ex)),
        ).with_columns(pl.col(TOKEN_IDS).arr.to_list(), pl.col(ACTS).arr.to_list(), pl.col(HAS_ACT).arr.to_list())
        lt = rng.integers(0, vocab_size, (nf, 2 * n_logits))
        scores = np.sort(rng.normal(0, 1, (nf, 2 * n_logits)), axis=1)[:, ::-1]
        logits = pl.DataFrame({
            FEATURE: feats,
            TOP_TOKEN_IDS: _lists(TOP_TOKEN_IDS, lt[:, :n_logits]),
            TOP_TOKEN_STRS: _token_lists(TOP_TOKEN_STRS, lt[:, :n_logits], words),
            TOP_SCORES: _lists(TOP_SCORES, scores[:, :n_logits].astype(np.float32).astype(np.float64)),
            BOTTOM_TOKEN_IDS: _lists(BOTTOM_TOKEN_IDS, lt[:, n_logits:]),
            BOTTOM_TOKEN_STRS: _token_lists(BOTTOM_TOKEN_STRS, lt[:, n_logits:], words),
            BOTTOM_SCORES: _lists(BOTTOM_SCORES, scores[:, ::-1][:, :n_logits].astype(np.float32).astype(np.float64))})
        shards.append({SHARD_START: start, SHARD_STOP: stop, STATS_FRAME: stats, EXAMPLES_FRAME: examples,
                       CONTEXTS_FRAME: contexts, LOGITS_FRAME: logits})
    return shards, edges


def synthetic_explanations(shards: list[dict], seed: int = 0, n_neighbors: int = 5) -> list[dict]:
    """The shards with an N2G-like explanations table (``tables.EXPLANATION_SCHEMA``): per feature a
    pattern of two of WORDS' words (``"['<w1> [<w2>]']"``), scores and related features drawn at random."""
    rng = np.random.default_rng(seed)
    plain = [w for w in WORDS if w.isalpha()]
    out = []
    for shard in shards:
        feats = np.arange(int(shard[SHARD_START]), int(shard[SHARD_STOP]))
        n = feats.size
        w1 = pl.Series(rng.integers(0, len(plain), n)).replace_strict(list(range(len(plain))), plain,
                                                                      return_dtype=pl.String)
        w2 = pl.Series(rng.integers(0, len(plain), n)).replace_strict(list(range(len(plain))), plain,
                                                                      return_dtype=pl.String)
        related = (feats[:, None] + rng.integers(1, 1000, (n, n_neighbors))) % max(int(shard[SHARD_STOP]), 1)
        frame = pl.DataFrame({FEATURE: feats}).with_columns(
            pl.format("['{} [{}]']", w1, w2).alias(EXPLANATION),
            pl.lit(None, pl.List(pl.List(pl.Int64))).alias(PATTERNS),
            pl.Series(PRECISION, rng.uniform(0, 1, n).round(3)), pl.Series(RECALL, rng.uniform(0, 1, n).round(3)),
            pl.Series(N_MATCHES, rng.integers(0, 200, n)), pl.Series(N_FIRINGS, rng.integers(0, 200, n)),
            _lists(NEIGHBORS, related), _lists(NEIGHBOR_COSINES, rng.uniform(0, 1, related.shape).astype(np.float32)),
            _lists(COOCCURRING, related[:, :2]),
            _lists(COOCCURRING_SHARES, rng.uniform(0, 1, (n, 2)).astype(np.float32)))
        out.append({**shard, EXPLANATIONS_FRAME: frame.select(list(EXPLANATION_SCHEMA))})
    return out


def synthetic_lineage(sae_name: str = "demo") -> dict:
    return {"sae": sae_name, "checkpoint": f"checkpoints/{sae_name}/v1/sae.safetensors", "run_id": "00000000-demo",
            "shuffle": "shuffle-demo",
            "activation_partitions": [{"key": f"p{i:03d}", "version": "v-0", "n_rows": 0} for i in range(8)],
            "model": "synthetic", "hook_name": "blocks.6.hook_resid_post"}
