"""Pass 3: context windows around feature examples, regrouping by feature shard, logit effects."""

import json

import numpy as np
import polars as pl
import pytest
import torch

from sae_platform import catalog, contexts, logits
from sae_platform.activations import CacheSettings, cache_text_file, open_partition
from sae_platform.contexts import (
    build_partition_windows,
    context_windows,
    read_feature_contexts,
    regroup_by_feature,
    requests_for_partition,
    write_feature_contexts,
    write_partition_windows,
)
from sae_platform.corpus import list_source
from sae_platform.errors import ModelError, PlatformError, StorageError
from sae_platform.logits import logit_effects, unembedding_matrix
from sae_platform.sae import build_sae
from sae_platform.tables import (
    ACTIVATION,
    ACTS,
    CENTER,
    EXAMPLE_COLUMNS,
    EXAMPLE_SCHEMA,
    FEATURE,
    HAS_ACT,
    INTERVAL,
    KIND,
    PARTITION,
    RANK,
    ROW,
    TOKEN_IDS,
    TOKEN_STRS,
    WINDOW_SCHEMA,
)
from sae_platform.tokens import token_display_strings

CTX_LEN, BEFORE, AFTER = 32, 16, 8
WINDOW = {"before": BEFORE, "after": AFTER}
SINK_POS = 5  # the wrapper below makes this position an attention sink: no stored row
MARKUP = "<script>alert(1)</script>"
DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    MARKUP,
    "Markup stays text: <b>bold</b> &amp; co.",
    "All the world's a stage,\n\tand all the men and women merely players.",
    "café ’ 🙂 naïve — it is a truth.",
    "To be, or not to be, that is the question.",
    "a single man in possession of a good fortune",
] * 3


class Sinky:
    """The tiny model, with position SINK_POS blown up ~1000x like a real attention sink."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def residual(self, ids):
        out = self.inner.residual(ids).clone()
        out[:, SINK_POS] *= 1000.0
        return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_model_dir):
    """Four real partitions, cached once per module: the conftest inbox (3 .txt files) plus a
    .jsonl of short documents, so document boundaries fall inside contexts."""
    from conftest import TRAINING_TEXT

    from sae_platform.model import load_hooked_model
    from sae_platform.storage import ArtifactStore

    root = tmp_path_factory.mktemp("contexts")
    inbox = root / "inbox"
    inbox.mkdir()
    for i, name in enumerate(["alpha", "beta", "gamma"]):  # as the text_dir fixture
        (inbox / f"{name}.txt").write_text(TRAINING_TEXT * (3 + i), encoding="utf-8")
    (inbox / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in DOCS), encoding="utf-8")
    store = ArtifactStore(str(root / "artifacts"))
    model = load_hooked_model(str(tiny_model_dir), layer=1, device="cpu", autocast="none")
    keys = []
    for text_file in list_source(str(inbox / "*")):
        cache_text_file(store, text_file, Sinky(model), "tiny", CacheSettings(ctx_len=CTX_LEN, batch_size=4))
        keys.append(text_file.key)
    assert keys == ["alpha", "beta", "docs", "gamma"]
    return store, keys


@pytest.fixture
def store(corpus):
    return corpus[0]


@pytest.fixture
def cached(corpus):
    return corpus[1]


def _sae(variant, cached_store, keys, **hp):
    torch.manual_seed(1)
    sae = build_sae(variant, 32, 64, **hp).eval()
    sample = torch.cat([torch.from_numpy(open_partition(cached_store, k).acts[:]).float() for k in keys])
    sae.calibrate_(sample)
    with torch.no_grad():
        sae.b_enc.uniform_(-0.3, 0.3)
    return sae


def _dense(store, sae, key):
    return sae.encode_dense(torch.from_numpy(open_partition(store, key).acts[:]).float()).numpy()


def _all_rows_examples(store, sae, keys, features=(3, 17, 40)):
    """Every row of every partition as an example of each feature (activation by brute force)."""
    frames = []
    for key in keys:
        dense = _dense(store, sae, key)
        for f in features:
            n = len(dense)
            frames.append(pl.DataFrame({
                FEATURE: [f] * n, KIND: ["random"] * n, RANK: list(range(n)), INTERVAL: [None] * n,
                ACTIVATION: dense[:, f], PARTITION: [key] * n, ROW: list(range(n)),
            }, schema=EXAMPLE_SCHEMA))
    return pl.concat(frames)


def _top_examples(store, sae, keys, per_feature=3):
    """A pass-2-like table: top rows per feature over all partitions, plus interval picks."""
    records = []
    dense = {k: _dense(store, sae, k) for k in keys}
    for f in range(sae.n_latents):
        cands = sorted(((float(d[r, f]), k, r) for k, d in dense.items() for r in range(len(d))), reverse=True)
        for rank, (act, key, row) in enumerate(cands[:per_feature]):
            records.append((f, "top", rank, None, act, key, row))
        active = [c for c in cands if c[0] > 0]
        for interval, (act, key, row) in enumerate(active[len(active) // 2::max(1, len(active) // 4)][:2]):
            records.append((f, "interval", 0, interval, act, key, row))
    return pl.DataFrame(records, schema=EXAMPLE_SCHEMA, orient="row")


def _windows(store, sae, keys, examples, tokenizer, **kw):
    kw = {**WINDOW, **kw}
    return {k: context_windows(store, sae, k, requests_for_partition(examples, k), tokenizer, **kw) for k in keys}


def _ref_bounds(tokens, cdoc, start_id, c, p, before, after):
    lo = hi = p
    while lo - 1 >= max(1, p - before) and cdoc[c, lo - 1] == cdoc[c, p] and tokens[c, lo - 1] != start_id:
        lo -= 1
    while hi + 1 <= min(tokens.shape[1] - 1, p + after) and cdoc[c, hi + 1] == cdoc[c, p] \
            and tokens[c, hi + 1] != start_id:
        hi += 1
    return lo, hi


def test_windows_stay_inside_context_and_document(store, cached, tiny_hooked):
    sae = _sae("relu", store, cached)
    examples = _all_rows_examples(store, sae, cached, features=(3,))
    start_id = tiny_hooked.start_token_id
    seen = {"doc_cut": 0, "separator_cut": 0, "ctx_start": 0, "ctx_end": 0, "full": 0}
    for key, frame in _windows(store, sae, cached, examples, tiny_hooked.tokenizer, before=BEFORE, after=AFTER).items():
        g = open_partition(store, key).group
        tokens, cdoc = g["tokens"][:], g["context_doc_id"][:]
        ctx, pos, token_id = g["context_id"][:], g["position"][:], g["token_id"][:]
        assert frame.schema == pl.Schema(WINDOW_SCHEMA)
        assert frame[ROW].to_list() == sorted(frame[ROW].to_list()) and len(frame) == len(ctx)
        for rec in frame.iter_rows(named=True):
            c, p = int(ctx[rec[ROW]]), int(pos[rec[ROW]])
            lo, hi = _ref_bounds(tokens, cdoc, start_id, c, p, BEFORE, AFTER)
            ids = rec[TOKEN_IDS]
            assert ids == tokens[c, lo:hi + 1].tolist()
            assert rec[CENTER] == p - lo and ids[rec[CENTER]] == token_id[rec[ROW]]
            assert len(ids) <= BEFORE + AFTER + 1 and start_id not in ids
            assert set(cdoc[c, lo:hi + 1].tolist()) == {rec["doc_id"]} == {int(cdoc[c, p])}
            seen["ctx_start"] += lo == 1 and p - BEFORE < 1
            seen["ctx_end"] += hi == CTX_LEN - 1 and p + AFTER > CTX_LEN - 1
            seen["full"] += hi - lo == BEFORE + AFTER
            for q in (lo - 1, hi + 1):
                if 0 < q < CTX_LEN and abs(q - p) <= max(BEFORE, AFTER):
                    seen["doc_cut"] += cdoc[c, q] != cdoc[c, p]
                    seen["separator_cut"] += tokens[c, q] == start_id
    assert all(v > 0 for v in seen.values()), seen  # every kind of boundary was exercised


@pytest.mark.parametrize("variant,hp", [("relu", {}), ("topk", {"k": 4})])
def test_window_activations_equal_brute_force(store, cached, tiny_hooked, variant, hp):
    sae = _sae(variant, store, cached, **hp)
    examples = _all_rows_examples(store, sae, cached, features=(3, 40))
    no_row = 0
    for key, frame in _windows(store, sae, cached, examples, tiny_hooked.tokenizer).items():
        g = open_partition(store, key).group
        dense = _dense(store, sae, key)
        row_of = np.full(g["tokens"].shape, -1)
        row_of[g["context_id"][:], g["position"][:]] = np.arange(len(dense))
        for rec in frame.iter_rows(named=True):
            c, lo = rec["context_id"], rec["position"] - rec[CENTER]
            rows = row_of[c, lo:lo + len(rec[TOKEN_IDS])]
            acts, has = np.array(rec[ACTS], np.float32), np.array(rec[HAS_ACT])
            np.testing.assert_array_equal(has, rows >= 0)
            np.testing.assert_allclose(acts[has], dense[rows[has], rec[FEATURE]], rtol=1e-5, atol=1e-6)
            assert (acts[~has] == 0).all()
            no_row += int((~has).sum())
            assert acts[rec[CENTER]] == pytest.approx(rec[ACTIVATION], rel=1e-5, abs=1e-6)
        if variant == "topk":
            assert (frame[ACTIVATION] == 0).any() and (frame[ACTIVATION] > 0).any()
    assert no_row > 0, "the sink position must show up in some window, without a row"


@pytest.mark.parametrize("variant,hp", [("relu", {}), ("topk", {"k": 4})])
def test_small_blocks_and_slices_give_the_same_windows(store, cached, tiny_hooked, monkeypatch, variant, hp):
    sae = _sae(variant, store, cached, **hp)
    keys = ["alpha", "docs"]
    examples = _top_examples(store, sae, keys)
    big = _windows(store, sae, keys, examples, tiny_hooked.tokenizer)
    monkeypatch.setattr(contexts, "ENCODE_ELEMENTS", 7 * 5)  # slices of at most 35 (row x latent) elements
    monkeypatch.setattr(contexts, "SLICE_CALL_ELEMENTS", 1)
    monkeypatch.setattr(contexts, "RESIDENT_BYTES", 11 * 32 * 4)  # 11 resident rows
    monkeypatch.setattr(contexts, "READ_ROWS", 3)
    small = _windows(store, sae, keys, examples, tiny_hooked.tokenizer, batch_rows=5)
    for key in keys:
        assert small[key].drop(ACTS).equals(big[key].drop(ACTS))
        np.testing.assert_allclose(small[key][ACTS].explode().to_numpy(), big[key][ACTS].explode().to_numpy(),
                                   rtol=1e-5, atol=1e-6)  # other batch shapes: other BLAS rounding


def test_windows_from_pass_1_codes_equal_windows_from_a_new_encode(store, cached, tiny_hooked, monkeypatch):
    from sae_platform import feature_codes as fc
    from sae_platform import features as ft

    sae = _sae("topk", store, cached, k=4)
    keys = ["alpha", "docs"]
    examples = _top_examples(store, sae, keys)
    encoded = _windows(store, sae, keys, examples, tiny_hooked.tokenizer)
    for key in keys:
        fc.compute_and_write_partials(store, sae, "codes-run", key, [(0, 64)],
                                      ft.FeatureSettings(top_k=3, reservoir_factor=2))
        codes = fc.read_codes(store, "codes-run", key, sae)
        assert codes is not None and codes[0].shape == (open_partition(store, key).n_rows, 4)
        monkeypatch.setattr(contexts, "_pair_activations", None)  # no encode at all
        got = context_windows(store, sae, key, requests_for_partition(examples, key), tiny_hooked.tokenizer,
                              codes=codes, **WINDOW)
        monkeypatch.undo()
        assert got.drop(ACTS).equals(encoded[key].drop(ACTS))
        np.testing.assert_allclose(got[ACTS].explode().to_numpy(), encoded[key][ACTS].explode().to_numpy(),
                                   rtol=1e-5, atol=1e-6)
    # codes of other weights are not used
    other = _sae("topk", store, cached, k=4)
    with torch.no_grad():
        other.b_enc.add_(0.01)
    assert fc.read_codes(store, "codes-run", "alpha", other) is None


def test_token_strings_are_the_exact_text(store, cached, tiny_hooked):
    tok = tiny_hooked.tokenizer
    sae = _sae("relu", store, cached)
    examples = _all_rows_examples(store, sae, ["docs"], features=(3,))
    frame = _windows(store, sae, ["docs"], examples, tok, before=CTX_LEN, after=CTX_LEN)["docs"]
    texts, partial = [], 0
    for ids, strs in zip(frame[TOKEN_IDS].to_list(), frame[TOKEN_STRS].to_list(), strict=True):
        assert len(strs) == len(ids)
        text = "".join(strs)
        assert text == tok.decode(ids, clean_up_tokenization_spaces=False)
        partial += strs.count("")
        texts.append(text)
    assert partial > 0, "byte tokens of multi-byte characters must have been exercised"
    assert any("🙂" in t for t in texts) and any("café" in t for t in texts)
    assert any(MARKUP in t for t in texts) and any("<b>bold</b> &amp;" in t for t in texts)
    assert any("\n\t" in t for t in texts)


def test_regroup_keeps_exactly_the_shard_features_sorted(store, cached, tiny_hooked, monkeypatch):
    monkeypatch.setattr(contexts, "ROW_GROUP_ROWS", 5)  # many row groups: exercises the pruned reads
    sae = _sae("relu", store, cached)
    examples = _top_examples(store, sae, cached)
    for key in cached:
        info = build_partition_windows(store, "run1", sae, key, examples, tiny_hooked.tokenizer, **WINDOW)
        assert info["n_windows"] == len(examples.filter(pl.col(PARTITION) == key))
    for start, stop in [(0, 5), (13, 27), (33, 64), (16, 40)]:
        shard = regroup_by_feature(store, "run1", cached, start, stop)
        want = examples.filter(pl.col(FEATURE).is_between(start, stop - 1))
        assert len(shard) == len(want) and set(shard[FEATURE]) == set(range(start, stop))
    keys = [(r[FEATURE], {"top": 0, "interval": 1}[r[KIND]], r[INTERVAL] or -1, r[RANK])
            for r in shard.iter_rows(named=True)]
    assert keys == sorted(keys)
    assert sorted(shard.select(FEATURE, KIND, RANK, PARTITION, ROW).rows()) == \
        sorted(want.select(FEATURE, KIND, RANK, PARTITION, ROW).rows())
    write_feature_contexts(store, "run1", 1, shard)
    back = read_feature_contexts(store, "run1", 1)
    assert back.equals(shard)
    page = read_feature_contexts(store, "run1", 1, feature=20)
    assert set(page[FEATURE]) == {20} and page.equals(shard.filter(pl.col(FEATURE) == 20))
    with pytest.raises(StorageError, match="context windows of partition 'nope'"):
        regroup_by_feature(store, "run1", [*cached, "nope"], 0, 8)
    with pytest.raises(StorageError, match="feature shard 2"):
        read_feature_contexts(store, "run1", 2)


def test_partition_without_examples_writes_an_empty_partial(store, cached, tiny_hooked):
    sae = _sae("relu", store, cached)
    examples = _top_examples(store, sae, ["alpha"])
    info = build_partition_windows(store, "empty", sae, "beta", examples, tiny_hooked.tokenizer, **WINDOW)
    assert info["n_windows"] == 0
    assert regroup_by_feature(store, "empty", ["beta"], 0, 64).schema == pl.Schema(WINDOW_SCHEMA)


def test_written_windows_have_the_schema_tables_declares(store, cached, tiny_hooked):
    """windows.parquet (per partition) and contexts.parquet (per feature shard) as written: the
    columns, order and dtypes of ``tables.WINDOW_SCHEMA``."""
    sae = _sae("relu", store, cached)
    key = cached[0]
    build_partition_windows(store, "files", sae, key, _top_examples(store, sae, [key]), tiny_hooked.tokenizer,
                            **WINDOW)
    write_feature_contexts(store, "files", 0, regroup_by_feature(store, "files", [key], 0, 64))
    for path in (f"{store.resolve(catalog.contexts_partial_name('files', key))}/{contexts.PARTIAL_FILE}",
                 f"{store.resolve(catalog.contexts_name('files', 0))}/{contexts.SHARD_FILE}"):
        assert list(pl.read_parquet_schema(path).items()) == list(WINDOW_SCHEMA.items()), path


def test_failed_write_leaves_nothing(store, cached, tiny_hooked, monkeypatch):
    sae = _sae("relu", store, cached)
    examples = _top_examples(store, sae, cached)
    frame = context_windows(store, sae, "docs", requests_for_partition(examples, "docs"), tiny_hooked.tokenizer,
                            **WINDOW)

    def boom(path, data):
        raise OSError("disk full")

    monkeypatch.setattr(store, "write_bytes_atomic", boom)
    with pytest.raises(OSError):
        write_partition_windows(store, "failing", "docs", frame)
    assert store.resolve(catalog.contexts_partial_name("failing", "docs")) is None
    folder = store.path(catalog.contexts_partial_name("failing", "docs"))
    assert not store.fs.exists(folder) or not store.fs.ls(folder)  # the version directory was removed


def test_stale_tables_and_mismatches_are_refused(store, cached, tiny_hooked):
    tok = tiny_hooked.tokenizer
    sae = _sae("relu", store, cached)
    requests = requests_for_partition(_top_examples(store, sae, cached), "docs")
    n_rows = open_partition(store, "docs").n_rows
    many = requests_for_partition(_all_rows_examples(store, sae, ["docs"]), "docs")
    assert len(many) >= 100
    nudged = many.with_columns(pl.when(pl.int_range(pl.len()) == 7).then(pl.col(ACTIVATION) + 1.0)
                               .otherwise(pl.col(ACTIVATION)).alias(ACTIVATION))
    context_windows(store, sae, "docs", nudged, tok, **WINDOW)  # one near-tie flip in >= 100 examples: tolerated
    with pytest.raises(StorageError, match="1 of .* no longer reproduce"):
        context_windows(store, sae, "docs", nudged, tok, max_mismatch_fraction=0.0, **WINDOW)
    with pytest.raises(StorageError, match="past the end .* stale"):
        context_windows(store, sae, "docs", requests.with_columns(pl.lit(n_rows, pl.Int64).alias(ROW)), tok, **WINDOW)
    with torch.no_grad():
        sae.W_enc.mul_(1.5)  # the checkpoint changed after the tables were built
    with pytest.raises(StorageError, match="no longer reproduce"):
        context_windows(store, sae, "docs", requests, tok, **WINDOW)
    with pytest.raises(ModelError, match="d_model 32 but the SAE expects 48"):
        context_windows(store, build_sae("relu", 48, 64), "docs", requests, tok, **WINDOW)
    with pytest.raises(PlatformError, match="SAE has 8 latents"):
        context_windows(store, build_sae("relu", 32, 8), "docs", requests, tok, **WINDOW)
    with pytest.raises(StorageError, match="activation partition 'gone' is missing"):
        context_windows(store, sae, "gone", requests.with_columns(pl.lit("gone").alias(PARTITION)), tok, **WINDOW)
    with pytest.raises(PlatformError, match="no column"):
        requests_for_partition(requests.drop(ROW), "docs")


def test_logit_effects_equal_brute_force(tiny_hooked, monkeypatch):
    tok, model = tiny_hooked.tokenizer, tiny_hooked.model
    torch.manual_seed(2)
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 2.0)
    w_u = unembedding_matrix(tiny_hooked, fold_norm=False)
    assert torch.equal(w_u, model.lm_head.weight)
    folded = unembedding_matrix(model)
    torch.testing.assert_close(folded, model.lm_head.weight * model.model.norm.weight)
    sae = build_sae("topk", 32, 64, k=4)
    monkeypatch.setattr(logits, "LOGIT_ELEMENTS", 3 * w_u.shape[0])  # chunks of 3 features
    table = logit_effects(sae, folded, tok, 5, 20, top=7)
    assert table[FEATURE].to_list() == list(range(5, 20))
    scores = (sae.W_dec.detach() @ folded.T)[5:20]
    for i, rec in enumerate(table.iter_rows(named=True)):
        order = torch.argsort(scores[i], descending=True)
        assert rec["top_token_ids"] == order[:7].tolist()
        assert rec["bottom_token_ids"] == order.flip(0)[:7].tolist()
        np.testing.assert_allclose(rec["top_scores"], scores[i][order[:7]].numpy(), rtol=1e-5)
        np.testing.assert_allclose(rec["bottom_scores"], scores[i][order.flip(0)[:7]].numpy(), rtol=1e-5)
        assert rec["top_token_strs"] == token_display_strings(tok, rec["top_token_ids"])
    with pytest.raises(ModelError, match="unembedding has shape"):
        logit_effects(sae, folded[:, :16], tok, 0, 4)


def test_display_strings_of_byte_tokens(tiny_hooked):
    tok = tiny_hooked.tokenizer
    ids = tok("é🙂 a\n", add_special_tokens=False)["input_ids"]
    assert token_display_strings(tok, ids) == ["\\xc3", "\\xa9", "\\xf0", "\\x9f", "\\x99", "\\x82", " a", "\n"]


def test_example_columns_match_the_feature_tables():
    assert EXAMPLE_COLUMNS == ("feature", "kind", "rank", "interval", "activation", "partition", "row")


def test_a_document_change_cuts_the_window_even_without_a_separator(tmp_path, tiny_hooked):
    from sae_platform.activations import cache_partition
    from sae_platform.corpus import Contexts, Document
    from sae_platform.storage import ArtifactStore

    store = ArtifactStore(str(tmp_path / "artifacts"))
    tokens = np.random.default_rng(0).integers(1, 250, size=(4, 16)).astype(np.int32)
    tokens[:, 0] = tiny_hooked.start_token_id
    docs = np.zeros_like(tokens)
    docs[:, 9:] = 1  # doc 1 starts at position 9 with no separator token
    cache_partition(store, "crafted", tiny_hooked, "tiny", [Document(0, "a", "x"), Document(1, "b", "y")],
                    Contexts(tokens, docs, 0), CacheSettings(ctx_len=16, batch_size=4, sink_norm_factor=0))
    sae = _sae("relu", store, ["crafted"])
    frame = _windows(store, sae, ["crafted"], _all_rows_examples(store, sae, ["crafted"], features=(0,)),
                     tiny_hooked.tokenizer)["crafted"]
    assert len(frame) == 4 * 15
    for rec in frame.iter_rows(named=True):
        c, p = rec["context_id"], rec["position"]
        lo, hi = (1, 8) if p < 9 else (9, 15)
        assert rec[TOKEN_IDS] == tokens[c, lo:hi + 1].tolist() and rec[CENTER] == p - lo
        assert rec["doc_id"] == (0 if p < 9 else 1)


def test_pass_3_reuses_the_windows_still_selected_and_equals_a_build_from_scratch(store, cached, tiny_hooked,
                                                                                   monkeypatch):
    """Issue 30.3: a batch's windows built before for the same checkpoint and batch version are
    reused for the (feature, row) pairs still selected; only the new pairs are computed, and the
    committed windows equal a from-scratch pass 3. Another checkpoint rebuilds everything."""
    import time

    from sae_platform import feature_codes as fc
    from sae_platform import features as ft

    tok, key = tiny_hooked.tokenizer, "alpha"
    sae = _sae("topk", store, cached, k=4)
    fc.compute_and_write_partials(store, sae, "reuse", key, [(0, 64)], ft.FeatureSettings(top_k=3, reservoir_factor=2))
    codes = fc.read_codes(store, "reuse", key, sae)
    before = _top_examples(store, sae, ["alpha", "beta", "gamma"])
    after = _top_examples(store, sae, ["alpha", "beta", "gamma", "docs"])  # a batch added: some examples move
    build = {"codes": codes, **WINDOW}
    first = build_partition_windows(store, "reuse", sae, key, before, tok, checkpoint="ckpt-1", **build)
    assert first["n_reused"] == 0 and first["rebuilt_because"] == "no windows stored"
    pointer = store.pointer(catalog.contexts_partial_name("reuse", key))
    assert pointer[contexts.BUILT_FROM] == {
        "checkpoint": "ckpt-1", "partition_version": store.pointer(catalog.partition_name(key))["version"],
        "group": catalog.FIRST_STORE, "before": BEFORE, "after": AFTER, "activations": "pass 1 codes"}
    assert pointer[contexts.SELECTION]["n_pairs"] == len(requests_for_partition(before, key).unique([FEATURE, ROW]))

    old_pairs = set(requests_for_partition(before, key).select(FEATURE, ROW).rows())
    wanted = requests_for_partition(after, key)
    new_requests = sum(pair not in old_pairs for pair in wanted.select(FEATURE, ROW).rows())
    computed = []
    real_windows = contexts._windows
    monkeypatch.setattr(contexts, "_windows", lambda *a, **kw: computed.append(len(a[3])) or real_windows(*a, **kw))
    started = time.perf_counter()
    second = build_partition_windows(store, "reuse", sae, key, after, tok, checkpoint="ckpt-1", **build)
    reuse_s = time.perf_counter() - started
    assert second["rebuilt_because"] is None
    assert second["n_computed"] == new_requests == sum(computed) and 0 < new_requests
    assert second["n_reused"] == len(wanted) - new_requests > 0  # every pair still selected is reused
    stored = regroup_by_feature(store, "reuse", [key], 0, sae.n_latents)
    started = time.perf_counter()
    scratch = context_windows(store, sae, key, wanted, tok, **build)
    scratch_s = time.perf_counter() - started
    assert stored.equals(scratch)  # same rows, same order, same values: the pass 3 a full rebuild runs

    computed.clear()
    started = time.perf_counter()
    other = build_partition_windows(store, "reuse", sae, key, after, tok, checkpoint="ckpt-2", **build)
    rebuild_s = time.perf_counter() - started
    assert other["n_reused"] == 0 and other["n_computed"] == len(wanted) == sum(computed)
    assert other["rebuilt_because"] == "built from another checkpoint"
    assert regroup_by_feature(store, "reuse", [key], 0, sae.n_latents).equals(scratch)
    wider = build_partition_windows(store, "reuse", sae, key, after, tok, checkpoint="ckpt-2", codes=codes,
                                    before=BEFORE + 1, after=AFTER)
    assert wider["n_reused"] == 0 and wider["rebuilt_because"] == "built from another before"
    unpinned = build_partition_windows(store, "reuse", sae, key, after, tok, **build)
    assert unpinned["n_reused"] == 0 and contexts.BUILT_FROM not in store.pointer(
        catalog.contexts_partial_name("reuse", key))
    print(f"\npass 3 of {key}, build and commit: {len(wanted)} windows, {second['n_reused']} reused and "
          f"{new_requests} computed in {reuse_s * 1e3:.0f} ms; all computed {rebuild_s * 1e3:.0f} ms "
          f"(windows alone, no commit: {scratch_s * 1e3:.0f} ms)")
