"""Which tokens are training rows: one rule (``training_rows.training_rows``), recorded by caching in
every hook-point store and read back by every metric of ``sae_eval``.

The end-to-end test caches crafted contexts with ``sink_norm_factor`` 0 and 5 (tokens whose residual
norm is ~7x and ~40x the median, placed on purpose), trains an SAE, evaluates it *on the cached
contexts themselves*, and checks that the CE splice, the held-out codes behind N2G and the probes,
and the ablation tokens are exactly (the ablation: only) the rows the partition stored. Before the
rule was shared, evaluation spliced with a factor of 10 whatever caching used and the feature
metrics scored sink rows training never saw: both cases fail there."""

import numpy as np
import pytest
import torch

from sae_platform import shuffle

SINKISH, SINK = 7, 11  # token ids whose embedding is scaled: ~7x and ~40x the median norm at layer 1
N_CONTEXTS, CTX_LEN, CACHE_BATCH = 32, 24, 4


# -- the rule itself (numpy only) ------------------------------------------------------------------

def test_start_tokens_and_position_zero_are_never_rows():
    from sae_platform.training_rows import RowRule, training_rows

    tokens = np.array([[0, 5, 6, 0, 7], [9, 5, 0, 6, 7]])
    want = np.array([[0, 1, 1, 0, 1], [0, 1, 0, 1, 1]], dtype=bool)
    for factor in (0.0, 5.0, 10.0):  # without norms only the start-token part applies
        assert (training_rows(tokens, RowRule(0, factor, 2)) == want).all()
    norms = np.ones(tokens.shape, np.float32)
    norms[:, 0] = norms[0, 3] = 1e6  # a start token's norm plays no part
    assert (training_rows(tokens, RowRule(0, 5.0, 2), norms) == want).all()


def test_sinks_are_judged_against_the_lower_median_of_their_group():
    from sae_platform.training_rows import RowRule, training_rows

    tokens = np.ones((4, 5), dtype=np.int64)
    tokens[:, 0] = 0
    norms = np.array([[0, 1, 2, 3, 4], [0, 5, 6, 8.5, 100], [0, 1, 1, 1, 1], [0, 1, 1, 1, 2.5]], np.float32)
    # groups of 2 contexts: medians 4 (the lower middle of 1..6, 8.5, 100; not 4.5) and 1
    got = training_rows(tokens, RowRule(0, 2.0, 2), norms)
    assert (got[:, 1:] == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]]).all()
    # one group of all 4 contexts: the median is 1, so only norms <= 2 stay
    assert (training_rows(tokens, RowRule(0, 2.0, 4), norms) == (tokens != 0) & (norms <= 2)).all()
    assert (training_rows(tokens, RowRule(0, 0.0, 2), norms) == (tokens != 0)).all()  # factor 0: no sinks


def test_the_rule_agrees_with_torch_median_in_float32():
    """What caching applied before (norms <= factor x torch.median of the batch), bit for bit."""
    from sae_platform.training_rows import RowRule, training_rows

    rng = np.random.default_rng(0)
    for trial in range(20):
        tokens = rng.integers(1, 50, size=(6, 9))
        tokens[:, 0] = 0
        norms = rng.lognormal(0, 1.5, size=tokens.shape).astype(np.float32)
        factor = float(rng.choice([1.5, 2.0, 3.7]))
        cand = torch.from_numpy(tokens != 0)
        cand[:, 0] = False
        rows = torch.from_numpy(norms)[cand]
        old = cand.clone()
        old[cand] = rows <= factor * rows.median()
        assert (training_rows(tokens, RowRule(0, factor, 6), norms) == old.numpy()).all(), trial


def test_recorded_rule_and_fallback_for_older_activations():
    from sae_platform.training_rows import LEGACY_SINK_NORM_FACTOR, RowRule

    rule = RowRule(3, 5.0, 4)
    assert RowRule.from_attrs({**rule.attrs(), "d_model": 32}) == rule
    assert RowRule.from_attrs({"sink_norm_factor": 0, "start_token_id": 3, "sink_median_contexts": 4},
                              start_token_id=9).sink_norm_factor == 0.0
    old = RowRule.from_attrs({"start_token_id": 3}, start_token_id=9)  # cached before the rule was recorded
    assert old == RowRule(3, LEGACY_SINK_NORM_FACTOR, 16) and LEGACY_SINK_NORM_FACTOR == 10.0
    assert RowRule.from_attrs({}, start_token_id=9).start_token_id == 9
    with pytest.raises(ValueError, match="start_token_id"):
        RowRule.from_attrs({})


# -- every metric sees exactly the rows training saw -----------------------------------------------

def _sinky(hooked):
    """Scale two token embeddings so that, at blocks.1.hook_resid_post, SINKISH sits at ~7x and SINK
    at ~40x the median norm: sinks at factor 5, SINKISH no sink at factor 10, none at factor 0."""
    with torch.no_grad():
        emb = hooked.model.get_input_embeddings().weight
        emb[SINKISH] *= 10.0
        emb[SINK] *= 40.0
    return hooked


def _contexts(start):
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 250, size=(N_CONTEXTS, CTX_LEN))
    tokens[np.isin(tokens, (start, SINKISH, SINK))] = 12
    tokens[:, 0] = start
    for c in range(N_CONTEXTS):
        tokens[c, 2 + c % 6] = SINKISH
        tokens[c, 9 + c % 7] = SINK
    tokens[5, 17] = start  # a packed-document separator
    return tokens.astype(np.int32)


def _stored_rows(store):
    """[n_contexts, ctx_len] bool: the tokens the cached partition holds rows for (training saw them)."""
    from sae_platform.activations import open_partition

    group = open_partition(store, "crafted").group
    rows = np.zeros(group["tokens"].shape, dtype=bool)
    rows[group["context_id"][:], group["position"][:]] = True
    return rows


@pytest.mark.parametrize("factor", [0.0, 5.0])
def test_every_metric_sees_exactly_the_rows_training_saw(store, tiny_hooked, monkeypatch, factor):
    from sae_platform.activations import CacheSettings, activation_attrs, cache_partition
    from sae_platform.catalog import eval_name
    from sae_platform.corpus import Contexts, Document
    from sae_platform.evaluate import evaluate_sae
    from sae_platform.metrics import read_heldout_codes, sae_heldout_codes
    from sae_platform.model import find_decoder_layers
    from sae_platform.trainer import TrainSettings, train_sae

    hooked = _sinky(tiny_hooked)
    start = hooked.start_token_id
    tokens = _contexts(start)
    doc_ids = np.zeros_like(tokens)
    settings = CacheSettings(ctx_len=CTX_LEN, batch_size=CACHE_BATCH, dtype="float32", sink_norm_factor=factor)
    summary = cache_partition(store, "crafted", hooked, "tiny", [Document(0, "crafted", "x")],
                              Contexts(tokens, doc_ids, 0), settings)
    rows = _stored_rows(store)
    candidates = (tokens != start) & (np.arange(CTX_LEN) > 0)
    if factor:  # the crafted sinks are sinks, and nothing else is
        assert (rows == candidates & ~np.isin(tokens, (SINKISH, SINK))).all()
    else:
        assert (rows == candidates).all() and summary["excluded_sink_rows"] == 0

    shuffle.run_shuffle(store, "main", n_buckets=2, memory_budget_bytes=1 << 20, n_jobs=1, seed=0)
    attrs = activation_attrs(store, "main")  # the rule, recorded where the SAE's rows were read
    assert (attrs["start_token_id"], attrs["sink_norm_factor"], attrs["sink_median_contexts"]) == (start, factor,
                                                                                                  CACHE_BATCH)
    train = TrainSettings(variant="topk", n_latents=64, k=4, batch_size=128, token_budget=128 * 4,
                          checkpoint_every_tokens=128 * 4, holdout_rows=128, dead_after_tokens=128 * 4)
    train_sae(store, "main", "sae", train, log=lambda m: None)

    # The CE splice: the zero pass zeroes exactly the spliced positions; the next block sees them.
    zero_rows = []

    def grab(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        zeroed = (hidden == 0).all(-1)
        if hidden.shape[1] == CTX_LEN and bool(zeroed.any()):
            zero_rows.append(zeroed.numpy().copy())

    # The ablation: every token it ablates is read alone (a prefix ending at it) at the hook point.
    ablated, read = [], hooked.read

    def spy(ids, names=None):
        if ids.shape[1] < CTX_LEN:
            c = int(np.flatnonzero((tokens[:, :ids.shape[1]] == ids.numpy()).all(1))[0])
            ablated.append((c, ids.shape[1] - 1))
        return read(ids, names)

    monkeypatch.setattr(hooked, "read", spy)
    handle = find_decoder_layers(hooked.model)[hooked.layer + 1].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        report, _ = evaluate_sae(store, "main", "sae", hooked, tokens, torch.device("cpu"),
                                 metric_tokens=tokens, ablation_tokens=40)
    finally:
        handle.remove()

    assert report["dead_window_tokens"] == summary["n_rows"] == int(rows.sum())  # FVU & density: stored rows
    spliced = np.concatenate(zero_rows)
    assert spliced.shape == tokens.shape and (spliced == rows).all(), "the CE splice replaced other tokens"
    assert report["ce_n_spliced"] == int(rows.sum())

    eval_path = store.resolve(eval_name("sae"))
    codes = read_heldout_codes(store, "sae")
    assert (codes.mask == rows).all(), "the held-out codes (N2G, probes) cover other tokens"
    assert rows.reshape(-1)[codes.positions].all()
    probes = store.read_json(f"{eval_path}/probes.json")
    assert probes and all(p["tokens"] == int(rows.sum()) for p in probes)
    assert (sae_heldout_codes(hooked, _load(store), store, "sae", tokens).mask == rows).all()

    assert ablated and report["ablation_pairs"] > 0
    assert all(rows[c, p] for c, p in ablated), "an ablated token was never a training row"


def _load(store):
    from sae_platform.trainer import load_sae

    return load_sae(store, "sae")[0]
