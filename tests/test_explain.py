"""N2G-style explanations: a feature that fires exactly on one token is explained by that token
with precision and recall 1; context patterns and wildcards; segments are never crossed; scores."""

import numpy as np
import pytest

from sae_platform.errors import PlatformError
from sae_platform.explain import (
    WILDCARD,
    Score,
    TokenStream,
    describe,
    explain,
    explain_and_score,
    explain_windows,
    firing_by_feature,
    score,
    summarize,
)


def random_stream(seed, n=2000, vocab=50):
    return np.random.default_rng(seed).integers(0, vocab, size=n)


def test_feature_firing_on_exactly_one_token_has_precision_and_recall_one():
    train, held = random_stream(0), random_stream(1)
    fire_train, fire_held = np.flatnonzero(train == 7), np.flatnonzero(held == 7)
    stream = TokenStream(train)
    patterns = explain(stream, fire_train, fire_train[:10])
    assert patterns == [(7,)]
    s = score(TokenStream(held), patterns, fire_held)
    assert (s.precision, s.recall) == (1.0, 1.0)
    assert s.n_matches == s.n_firings == len(fire_held) > 0


def test_context_pattern_is_found_when_the_token_alone_is_not_enough():
    # the feature fires on 7 only right after 3: the token alone has low precision
    train, held = random_stream(2), random_stream(3)

    def fires(t):
        return np.flatnonzero((t == 7) & (np.roll(t, 1) == 3) & (np.arange(len(t)) > 0))
    patterns = explain(TokenStream(train), fires(train), fires(train))
    assert patterns == [(3, 7)]
    s = score(TokenStream(held), patterns, fires(held))
    assert (s.precision, s.recall) == (1.0, 1.0)


def test_wildcard_pattern():
    # fires on 7 two tokens after 3, whatever is between
    train = random_stream(4, n=6000, vocab=10)
    fire = np.flatnonzero((train == 7) & (np.roll(train, 2) == 3) & (np.arange(len(train)) > 1))
    patterns = explain(TokenStream(train), fire, fire)
    assert (3, WILDCARD, 7) in patterns
    assert score(TokenStream(train), [(3, WILDCARD, 7)], fire).precision == 1.0


def test_patterns_never_cross_segments():
    tokens = np.array([3, 7, 3, 7, 1, 3, 7])
    stream = TokenStream(tokens, starts=np.array([0, 4]))
    assert list(stream.matches((3, 7))) == [1, 3, 6]
    stream = TokenStream(np.array([3, 7, 3, 7]), starts=np.array([0, 1, 3]))  # 7 at 1 and 3 start segments
    assert list(stream.matches((3, 7))) == []
    assert list(TokenStream.from_contexts(np.array([[1, 3], [7, 2]])).matches((3, 7))) == []


def test_scores_of_imperfect_and_empty_explanations():
    stream = TokenStream(np.array([1, 2, 1, 2, 1]))
    s = score(stream, [(1,)], np.array([0, 3]))
    assert s.precision == pytest.approx(1 / 3) and s.recall == pytest.approx(1 / 2)
    assert s.f1 == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    none = score(stream, [(9,)], np.array([0]))
    assert none.precision is None and none.recall == 0.0
    assert score(stream, [(1,)], np.array([], dtype=np.int64)).recall is None
    assert explain(stream, np.array([0]), np.array([], dtype=np.int64)) == []
    with pytest.raises(PlatformError, match="concrete token"):
        stream.matches((1, WILDCARD))
    with pytest.raises(PlatformError, match="1-D array"):
        TokenStream(np.zeros((2, 2), dtype=int))


def test_explain_and_score_many_features_and_summary():
    train, held = random_stream(5, 5000), random_stream(6, 5000)
    # feature f fires on token f (f < 10); feature 10 fires on a random 5% (unexplainable)
    rng = np.random.default_rng(0)

    def codes(t):
        pos = [np.flatnonzero(t == f) for f in range(10)] + [np.flatnonzero(rng.random(len(t)) < 0.05)]
        feats = [np.full(len(p), f) for f, p in enumerate(pos)]
        return np.concatenate(pos), np.concatenate(feats)
    e = firing_by_feature(*codes(train), 12)
    s = firing_by_feature(*codes(held), 12)
    rows = explain_and_score(TokenStream(train), e, lambda f: e[1][e[0][f]:e[0][f + 1]][:20],
                             TokenStream(held), s, range(12))
    assert all(r["precision"] == r["recall"] == 1.0 for r in rows[:10])
    assert rows[10]["precision"] < 0.5  # random firing: no pattern predicts it
    assert rows[11]["patterns"] == [] and rows[11]["n_firings"] == 0
    summary = summarize(rows)
    assert summary["n2g_features_scored"] == 11
    assert 0.9 < summary["n2g_recall"] <= 1.0 and summary["n2g_precision_median"] == 1.0
    assert describe([(3, WILDCARD, 7)], lambda t: f"t{t}") == "'t3' * ['t7']"
    assert Score(None, 1.0, 0, 1).f1 is None


def test_explain_windows_from_the_feature_tables():
    import polars as pl

    from sae_platform.tables import WINDOW_SCHEMA

    rng = np.random.default_rng(7)
    rows = []
    for feature, token in ((4, 7), (5, 9)):  # feature 4 fires on token 7, feature 5 on token 9
        for kind, n in (("top", 5), ("interval", 5), ("random", 3)):
            for rank in range(n):
                ids = rng.integers(0, 30, size=12)
                ids[6] = token
                acts = np.where(ids == token, 1.0 + rank, 0.0)
                rows.append({"feature": feature, "kind": kind, "rank": rank, "interval": 0, "activation": 1.0,
                             "partition": "p", "row": 0, "context_id": 0, "position": 6, "doc_id": 0, "center": 6,
                             "token_ids": ids.tolist(), "token_strs": [str(t) for t in ids],
                             "acts": acts.tolist(), "has_act": [True] * 12})
    windows = pl.DataFrame(rows, schema=WINDOW_SCHEMA)
    held = rng.integers(0, 30, size=3000)
    held_pos = np.concatenate([np.flatnonzero(held == 7), np.flatnonzero(held == 9)])
    held_feat = np.concatenate([np.full((held == 7).sum(), 4), np.full((held == 9).sum(), 5)])
    firing = firing_by_feature(held_pos, held_feat, 8)
    out = explain_windows(windows, TokenStream(held), firing, [4, 5, 6], lambda t: f"<{t}>")
    assert [r["patterns"] for r in out] == [[[7]], [[9]], []]
    assert out[0]["explanation"] == "['<7>']"
    assert [(o["precision"], o["recall"]) for o in out[:2]] == [(1.0, 1.0), (1.0, 1.0)]
    assert out[2]["precision"] is None and out[2]["recall"] is None
