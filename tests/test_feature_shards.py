"""Feature tables sharded over data AND features (sae_platform/feature_codes.py, feature_plan.py):
a batch encoded once, its codes committed split by feature shard, pass 1 of each (batch, shard)
reading only its own codes, gives today's tables bit for bit (same top-K, random sample, interval
examples, stats and windows); the planner sizes the shards from a memory budget per job."""

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import save as save_safetensors

from assets import features as features_assets
from sae_platform import catalog, partial_store, trainer
from sae_platform import feature_codes as fc
from sae_platform import features as F
from sae_platform import sharded_checkpoint as sc
from sae_platform.errors import PlatformError, StorageError
from sae_platform.feature_check import brute_force_check
from sae_platform.feature_layout import plan_layout
from sae_platform.feature_merge import build_feature_tables, merge_shard_tables, merge_stored_shard, write_tables
from sae_platform.feature_plan import FeaturePlanError, plan_feature_shards
from sae_platform.logits import decoder_logit_effects, logit_effects
from sae_platform.sae import SparseAutoencoder, build_sae
from sae_platform.settings import SettingsError
from sae_platform.storage import ArtifactStore
from sae_platform.synthetic import SyntheticTokenizer
from tests.test_features import N_LATENTS, all_tables, make_dataset, make_sae

SETTINGS = F.FeatureSettings(top_k=5, reservoir_factor=3, random_examples=4, check_features=4)
KEYS = ["p0", "p1", "p2"]
N_SHARDS, N_GROUPS = 8, 2


def _todays_tables(root: ArtifactStore, sae) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Today's single-group layout: one pass-1 call over every latent, one shard, no stored codes."""
    build_feature_tables(root, sae, "old", SETTINGS, n_feature_shards=1, batch_rows=128)
    return all_tables(root, "old", 1)


def _sharded_tables(root: ArtifactStore, sae) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The new layout: per batch one encode, then pass 1 per (batch, shard group), one shard at a
    time from its own codes; pass 2 per shard."""
    shards = F.feature_shards(N_LATENTS, N_SHARDS)
    for key in KEYS:
        for group in range(N_GROUPS):
            fc.compute_and_write_partials(root, sae, "new", key, shards, SETTINGS,
                                          shard_indices=list(range(group, N_SHARDS, N_GROUPS)), batch_rows=128)
    for index in range(N_SHARDS):
        write_tables(root, "new", index, merge_shard_tables(root, sae, "new", index, KEYS, SETTINGS))
    return all_tables(root, "new", N_SHARDS)


@pytest.mark.parametrize("variant", ["topk", "relu"])
def test_sharded_pass_1_gives_todays_tables_bit_for_bit(store, variant):
    # a dense variant multiplies each shard's slice of W_enc, whose rounding may depend on the slice's
    # shape (as today's 4 shards already do): dyadic weights and rows make every activation exact
    exact = variant == "relu"
    make_dataset(store, [400, 250, 330], exact=exact)
    sae = make_sae(variant, exact=exact)
    old_stats, old_examples = _todays_tables(store, sae)
    new_stats, new_examples = _sharded_tables(store, sae)
    assert new_stats.equals(old_stats)  # count, density, max, mean, sum, histogram: every bit
    assert new_examples.equals(old_examples)  # top-K, random sample and interval examples, same ranks
    assert set(new_examples["kind"]) == {"top", "random", "interval"}
    for index, (start, stop) in enumerate(F.feature_shards(N_LATENTS, N_SHARDS)):
        check = brute_force_check(store, sae, "new", index, start, stop)
        assert check["ok"], check["mismatches"][:3]
    if variant == "topk":  # pass 3's lookups in the shard-split codes equal those in today's whole-batch codes
        for key in KEYS:
            kept: dict = {}

            def keep(offset, values, indices, n_rows, kept=kept):
                for name, array, dtype in (("v", values.float(), np.float32), ("i", indices, np.int32)):
                    kept.setdefault(name, np.zeros((n_rows, values.shape[1]), dtype))[offset:offset + len(array)] = \
                        array.numpy()

            F.compute_partials(store, sae, key, [(0, N_LATENTS)], SETTINGS, batch_rows=128, on_codes=keep)
            stored = fc.read_codes(store, "new", key, sae)
            assert stored[0].shape == kept["v"].shape
            assert np.array_equal(_dense(*stored), _dense(kept["v"], kept["i"]))  # every (row, latent): every window


def _dense(values: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """[n_rows, N_LATENTS] activations from sparse codes: what pass 3's window lookups read."""
    dense = np.zeros((len(values), N_LATENTS), np.float32)
    np.add.at(dense, (np.repeat(np.arange(len(values)), values.shape[1]), indices.ravel()), values.ravel())
    return dense


def test_a_shards_pass_1_reads_only_its_own_codes_and_no_weights(store, monkeypatch):
    make_dataset(store, [300])
    sae = make_sae("topk")
    shards = F.feature_shards(N_LATENTS, 4)
    fc.encode_codes(store, sae, "run", "p0", shards, batch_rows=64)
    path, meta = fc.codes_meta(store, "run", "p0", F.sae_fingerprint(sae))
    read = []
    original = store.fs.cat_file
    monkeypatch.setattr(store.fs, "cat_file", lambda p, *a, **k: read.append(str(p)) or original(p, *a, **k))
    partial = fc.shard_partial(store, "run", "p0", 2, meta, path, SETTINGS)  # no SAE argument at all
    assert [p.rsplit("/", 1)[-1] for p in read] == ["f2.npz"]
    assert (partial.start, partial.stop) == shards[2] and partial.n_tokens == 300
    rows, latents, values = fc.read_range_codes(store, "run", "p0", sae, *shards[2])
    assert int(partial.count.sum()) == len(values) and (values > 0).all() and (np.diff(rows) >= 0).all()
    assert latents.max() < shards[2][1] - shards[2][0]
    # codes of another layout, of other weights or of an older partition version are not used
    assert fc.read_range_codes(store, "run", "p0", sae, 0, 32) is None
    other = make_sae("topk", seed=1)
    assert fc.codes_meta(store, "run", "p0", F.sae_fingerprint(other)) is None
    with pytest.raises(F.FeatureError, match="not shard 4"):
        fc.shard_partial(store, "run", "p0", 4, meta, path, SETTINGS)
    with pytest.raises(F.FeatureError, match="no codes to share"):
        fc.encode_codes(store, make_sae("relu"), "run", "p0", shards)


def test_a_shard_groups_pass_1_finds_the_codes_by_their_checkpoint_and_reads_only_its_shards(store, monkeypatch):
    """Pass 1 of one (batch, shard group) as the pipeline runs it, without the SAE: the encode pins
    the checkpoint it encoded with, ``pinned_codes`` finds the codes by it (never those of another
    checkpoint, layout or hook-point store), and ``partials_from_codes`` reads only the group's
    shards' files, committing each shard's partial (pinned) equal to that shard's own pass 1."""
    make_dataset(store, [300])
    sae = make_sae("topk")
    shards = F.feature_shards(N_LATENTS, 8)
    fc.encode_codes(store, sae, "run", "p0", shards, batch_rows=64, checkpoint="v-1")
    assert fc.pinned_codes(store, "run", "p0", shards, checkpoint="v-2") is None  # another checkpoint's
    assert fc.pinned_codes(store, "run", "p0", F.feature_shards(N_LATENTS, 4), checkpoint="v-1") is None
    assert fc.pinned_codes(store, "run", "p0", shards, checkpoint="v-1", group=catalog.store_group(1)) is None
    assert fc.pinned_codes(store, "run", "p1", shards, checkpoint="v-1") is None  # never encoded
    codes = fc.pinned_codes(store, "run", "p0", shards, checkpoint="v-1")
    read = []
    original = store.fs.cat_file
    monkeypatch.setattr(store.fs, "cat_file", lambda p, *a, **k: read.append(str(p)) or original(p, *a, **k))
    committed = list(fc.partials_from_codes(store, "run", "p0", codes, [1, 5], SETTINGS, checkpoint="v-1"))
    assert [p.rsplit("/", 1)[-1] for p in read if p.endswith(".npz")] == ["f1.npz", "f5.npz"]
    assert [c["shard_index"] for c in committed] == [1, 5]
    assert [store.pointer(catalog.partial_name("run", "p0", i)) is not None for i in range(8)] == \
        [i in (1, 5) for i in range(8)]
    for index in (1, 5):
        assert catalog.pinned_checkpoint(store.pointer(catalog.partial_name("run", "p0", index))) == "v-1"
        stored = partial_store.read_partial(store, "run", "p0", index)
        (alone,) = F.compute_partials(store, sae, "p0", [shards[index]], SETTINGS, batch_rows=64)
        for name in ("top_act", "top_row", "res_key", "res_row", "res_act", "count", "sum", "max", "hist"):
            assert np.array_equal(getattr(stored, name), getattr(alone, name)), (index, name)


def test_the_shard_layout_change_re_encodes_instead_of_mixing_layouts(store):
    make_dataset(store, [200])
    sae = make_sae("topk")
    fc.compute_and_write_partials(store, sae, "run", "p0", F.feature_shards(N_LATENTS, 4), SETTINGS)
    fc.compute_and_write_partials(store, sae, "run", "p0", F.feature_shards(N_LATENTS, 2), SETTINGS)
    _, meta = fc.codes_meta(store, "run", "p0", F.sae_fingerprint(sae))
    assert meta["shards"] == [[0, 32], [32, 64]]


# -- the planner ----------------------------------------------------------------------------------

GiB = 1 << 30
DEFAULTS = {"top_k": 20, "reservoir_size": 200, "n_hist_bins": F.N_HIST_BINS, "k": 32}


def test_the_planner_keeps_todays_layout_for_small_saes_and_fits_the_budget_for_wide_ones():
    small = plan_feature_shards(16_384, batch_tokens=100_000, memory_budget_bytes=2 * GiB, n_groups=4, **DEFAULTS)
    assert small.n_shards == 4 and small.shards_per_group == 1  # one shard per group: shard i = group i
    wide = plan_feature_shards(1 << 20, batch_tokens=1_000_000, memory_budget_bytes=2 * GiB, n_groups=4, **DEFAULTS)
    assert wide.n_shards % 4 == 0 and wide.job_bytes <= 2 * GiB
    fewer = plan_feature_shards(1 << 20, batch_tokens=1_000_000, memory_budget_bytes=2 * GiB, n_groups=4,
                                **{**DEFAULTS, "reservoir_size": 80})
    assert fewer.n_shards < wide.n_shards  # a smaller reservoir needs fewer shards
    one_less = plan_feature_shards(1 << 20, batch_tokens=1_000_000, memory_budget_bytes=2 * GiB, n_groups=1,
                                   **DEFAULTS)
    assert one_less.n_shards <= wide.n_shards and wide.n_shards - one_less.n_shards < 4
    # the fewest: one group fewer shards would not fit
    smaller = type(wide)(**{**wide.__dict__, "n_shards": wide.n_shards - 4})
    assert smaller.job_bytes > 2 * GiB
    # memory per job falls with the shard count, not with n_latents
    assert plan_feature_shards(1 << 24, batch_tokens=10**7, memory_budget_bytes=2 * GiB, n_groups=4,
                               **DEFAULTS).job_bytes <= 2 * GiB
    # weights every job loads whole shrink the room; read shard by shard they cost per latent
    whole = plan_feature_shards(1 << 20, batch_tokens=0, memory_budget_bytes=2 * GiB, n_groups=4, sae_bytes=GiB,
                                **DEFAULTS)
    assert whole.n_shards > wide.n_shards and whole.job_bytes <= 2 * GiB
    with pytest.raises(FeaturePlanError, match="shard by shard"):
        plan_feature_shards(1 << 20, batch_tokens=0, memory_budget_bytes=2 * GiB, n_groups=4, sae_bytes=2 * GiB,
                            **DEFAULTS)


def test_the_default_budget_keeps_the_demo_at_four_shards_and_cuts_a_million_latents_into_sixteen():
    """resources.features.config.memory_budget_bytes (2 GiB) sizes the layout every feature stage
    follows: the demo's 16,384-latent TopK SAE (d_model 576, k 32, 160 x 128-token batches) keeps one
    shard per group, 2^20 latents at d_model 64 get 16 shards of 65,536, four per group."""
    demo = plan_layout({"variant": "topk", "n_latents": 16_384, "d_model": 576, "k": 32}, F.FeatureSettings(),
                       batch_tokens=160 * 128)
    assert (demo.n_shards, demo.shards_per_group, demo.group_shards(2)) == (4, 1, [2])
    wide = plan_layout({"variant": "topk", "n_latents": 1 << 20, "d_model": 64, "k": 32}, F.FeatureSettings(),
                       batch_tokens=160 * 128)
    assert (wide.n_shards, wide.latents_per_shard, wide.group_shards(1)) == (16, 65_536, [1, 5, 9, 13])
    assert wide.job_bytes <= F.FeatureSettings().memory_budget_bytes
    with pytest.raises(SettingsError, match="resources.features.config.memory_budget_bytes"):
        F.FeatureSettings(memory_budget_bytes=100 << 20)  # below the 400 MiB a job holds before any shard


@pytest.mark.parametrize("n_latents", [1 << 20, 1 << 24])
def test_a_dense_saes_shard_jobs_count_their_shards_weights_not_the_whole_sae(n_latents):
    """A dense SAE's pass 1 and pass 2 read only their shard's encoder and decoder rows
    (latent_slice), so the plan counts those per latent: 2^20 ReLU latents at d_model 576 (4.5 GiB
    of weights, more than the 2 GiB budget) and 2^24 plan within the default budget; before, the
    whole SAE in every job made the planner refuse both."""
    settings = F.FeatureSettings()
    config = {"variant": "relu", "n_latents": n_latents, "d_model": 576}
    dense, topk = (plan_layout({**config, **extra}, settings, batch_tokens=160 * 128)
                   for extra in ({}, {"variant": "topk", "k": 32}))
    assert dense.job_bytes <= settings.memory_budget_bytes and dense.n_shards % 4 == 0
    assert dense.bytes_per_latent - topk.bytes_per_latent == (576 + 2) * 4  # its encoder rows, b_enc, threshold
    assert n_latents * (2 * 576 + 1) * 4 > settings.memory_budget_bytes  # the whole SAE would not fit


def test_the_planner_names_a_budget_too_small_for_one_latent():
    with pytest.raises(FeaturePlanError, match="memory_budget_bytes"):
        plan_feature_shards(1024, batch_tokens=0, memory_budget_bytes=100 << 20, n_groups=4, **DEFAULTS)
    with pytest.raises(FeaturePlanError, match="n_groups"):
        plan_feature_shards(1024, batch_tokens=0, memory_budget_bytes=GiB, n_groups=0, **DEFAULTS)


def test_damaged_shard_codes_are_refused_naming_the_file(store):
    make_dataset(store, [100])
    sae = make_sae("topk")
    fc.encode_codes(store, sae, "run", "p0", F.feature_shards(N_LATENTS, 2))
    path, meta = fc.codes_meta(store, "run", "p0", F.sae_fingerprint(sae))
    store.fs.pipe_file(f"{path}/f1.npz", b"not an npz")
    assert fc.shard_partial(store, "run", "p0", 0, meta, path, SETTINGS).n_tokens == 100  # the good shard still runs
    with pytest.raises(StorageError, match="f1.npz"):
        fc.shard_partial(store, "run", "p0", 1, meta, path, SETTINGS)


def _commit_checkpoint(store: ArtifactStore, name: str, sae, n_latent_shards: int) -> str:
    """``sae`` committed as ``name``'s checkpoint the way training writes it: one safetensors file
    (``n_latent_shards`` 0), or latent-sharded (``sharded_checkpoint``); returns its version."""
    cfg = {"sae": sae.config}
    weights = {k: v.detach().contiguous() for k, v in sae.state_dict().items()}
    if n_latent_shards:
        sc.save_sharded(store, catalog.checkpoint_name(name), sae.config["variant"],
                        sc.LatentLayout(sae.n_latents, n_latent_shards), {sc.SAE + k: v for k, v in weights.items()},
                        json_files={"cfg.json": cfg})
    else:
        with store.writing(catalog.checkpoint_name(name)) as version:
            store.fs.pipe_file(f"{version}/{sc.UNSHARDED_WEIGHTS}", save_safetensors(weights))
            store.fs.pipe_file(f"{version}/cfg.json", json.dumps(cfg).encode())
    return catalog.checkpoint_version(store, name)


@pytest.mark.parametrize("n_latent_shards", [0, 3])  # 3 latent shards straddle the 8 feature shards
def test_pass_2_reads_its_codes_and_decoder_rows_never_the_whole_sae(store, monkeypatch, n_latent_shards):
    make_dataset(store, [400, 250, 330])
    sae = make_sae("topk")
    checkpoint = _commit_checkpoint(store, "run", sae, n_latent_shards)
    shards = F.feature_shards(N_LATENTS, N_SHARDS)
    for key in KEYS:
        fc.compute_and_write_partials(store, sae, "run", key, shards, SETTINGS, checkpoint=checkpoint, batch_rows=128)
    tokenizer = SyntheticTokenizer(40)
    unembedding = torch.randn(len(tokenizer) + 3, sae.d_model)  # rows past the vocabulary: padding
    expected = [(merge_shard_tables(store, sae, "run", i, KEYS, SETTINGS),
                 logit_effects(sae, unembedding, tokenizer, start, stop)) for i, (start, stop) in enumerate(shards)]

    other = make_sae("topk", seed=1)

    def no_whole_sae(*args, **kwargs):
        raise AssertionError("pass 2 built an SAE")

    monkeypatch.setattr(SparseAutoencoder, "__init__", no_whole_sae)  # nothing builds any SAE from here on
    monkeypatch.setattr(trainer, "load_sae", no_whole_sae)
    monkeypatch.setattr(features_assets, "load_sae", no_whole_sae)
    for i, (start, stop) in enumerate(shards):
        tables = merge_stored_shard(store, "run", i, KEYS, SETTINGS, "cpu", checkpoint)
        assert tables.stats.equals(expected[i][0].stats)
        assert tables.examples.equals(expected[i][0].examples)  # top-K, random and interval examples
        assert tables.meta == expected[i][0].meta
        rows = sc.decoder_rows(store, "run", start, stop, version=checkpoint)
        assert torch.equal(rows, sae.W_dec.detach()[start:stop])
        assert decoder_logit_effects(rows, unembedding, tokenizer, start).equals(expected[i][1])
    assert set(expected[0][0].examples["kind"]) == {"top", "random", "interval"}
    with pytest.raises(PlatformError, match=r"outside SAE checkpoint 'run'"):
        sc.decoder_rows(store, "run", 0, N_LATENTS + 1)
    # partials of another checkpoint never meet this checkpoint's decoder rows
    with pytest.raises(F.FeatureError, match="not computed with checkpoint other"):
        merge_stored_shard(store, "run", 0, KEYS, SETTINGS, "cpu", "other")
    # a partition whose codes are now another SAE's names itself: no weights to encode it again with
    fc.encode_codes(store, other, "run", "p1", shards, batch_rows=128)
    with pytest.raises(F.FeatureError, match="partition 'p1' has no stored sparse codes"):
        merge_stored_shard(store, "run", 0, KEYS, SETTINGS, "cpu", checkpoint)


def test_decoder_rows_come_by_slice_from_either_kind_of_checkpoint_on_s3_and_a_changed_file_is_refused(
        s3, s3_endpoint):
    _, bucket = s3
    store = ArtifactStore(f"s3://{bucket}/root", {"endpoint_url": s3_endpoint})
    sae = make_sae("topk")
    for name, n_latent_shards in (("flat", 0), ("wide", 3)):
        _commit_checkpoint(store, name, sae, n_latent_shards)
        assert torch.equal(sc.decoder_rows(store, name, 5, 40), sae.W_dec.detach()[5:40])
        assert sc.decoder_rows(store, name, 7, 7).shape == (0, sae.d_model)
    weights = f"{store.resolve(catalog.checkpoint_name('flat'))}/{sc.UNSHARDED_WEIGHTS}"
    data = bytearray(store.fs.cat_file(weights))
    data[-4:] = b"\x00\x00\xc0\x7f"  # the file's last float is now NaN: same size, other bytes
    store.fs.pipe_file(weights, bytes(data))
    with pytest.raises(StorageError, match=r"sae_weights\.safetensors differs from the bytes recorded"):
        sc.decoder_rows(store, "flat", 0, 4)


@pytest.mark.parametrize("variant,n_latent_shards", [("relu", 0), ("jumprelu", 3), ("batchtopk", 0)])
def test_a_dense_saes_pass_1_loads_only_its_shards_encoder_rows_and_commits_todays_partials(
        store, monkeypatch, variant, n_latent_shards):
    """A dense SAE stores no codes: its pass-1 job (one batch, one shard group) loads, shard after shard,
    only that shard's rows of W_enc and b_enc (JumpReLU's thresholds too) and the replicated b_pre and
    scales, by slice from the checkpoint, plain or latent-sharded (3 latent shards straddle the 8 feature
    shards), never W_dec nor the whole SAE; the partials it commits are those of the whole SAE, bit for
    bit, its fingerprint included."""
    from sae_platform import latent_slice

    make_dataset(store, [400, 250])
    sae = make_sae(variant)
    if variant == "batchtopk":
        sae.threshold.fill_(0.4)  # as training leaves it (a checkpoint without one is refused as non-finite)
    checkpoint = _commit_checkpoint(store, "run", sae, n_latent_shards)
    shards = F.feature_shards(N_LATENTS, N_SHARDS)
    expected = {(key, i): F.compute_partials(store, sae, key, [shards[i]], SETTINGS, batch_rows=128)[0]
                for key in KEYS[:2] for i in range(N_SHARDS)}
    loaded, load = [], latent_slice.load_latent_slice

    def recording(*args, **kwargs):
        sliced = load(*args, **kwargs)
        loaded.append({name: tuple(t.shape) for name, t in sliced.model.state_dict().items() if not t.is_meta})
        return sliced

    def no_whole_sae(*args, **kwargs):
        raise AssertionError("pass 1 loaded the whole SAE")

    monkeypatch.setattr(latent_slice, "load_latent_slice", recording)
    monkeypatch.setattr(latent_slice, "load_sae", no_whole_sae)
    for key in KEYS[:2]:
        for group in range(N_GROUPS):
            indices = list(range(group, N_SHARDS, N_GROUPS))
            done = latent_slice.sliced_partials(store, "run", key, shards, SETTINGS, indices, checkpoint=checkpoint,
                                                batch_rows=128)
            assert [d["shard_index"] for d in done] == indices
    order = [index for _ in KEYS[:2] for group in range(N_GROUPS) for index in range(group, N_SHARDS, N_GROUPS)]
    per_latent = {"W_enc": (sae.d_model,), "b_enc": ()} | ({"threshold": ()} if variant == "jumprelu" else {})
    for shapes, index in zip(loaded, order, strict=True):
        width = shards[index][1] - shards[index][0]
        assert "W_dec" not in shapes and shapes["b_pre"] == (sae.d_model,)
        assert {name: shapes[name] for name in per_latent} == {n: (width, *rest) for n, rest in per_latent.items()}
    for (key, index), want in expected.items():
        got = partial_store.read_partial(store, "run", key, index)
        assert got.meta() == want.meta(), (key, index)  # the whole SAE's config and fingerprint, n_entries, sums
        for name in F.Partial.ARRAYS + F.Partial.WITNESS:
            assert np.array_equal(getattr(got, name), getattr(want, name)), (key, index, name)
        assert catalog.pinned_checkpoint(store.pointer(catalog.partial_name("run", key, index))) == checkpoint


def test_the_whole_saes_fingerprint_is_taken_block_by_block_from_either_kind_of_checkpoint(store):
    """What a dense SAE's pass 1 records without holding the SAE: ``sae_fingerprint`` of the whole SAE,
    from blocks of at most 40 elements read by slice (W_enc: 2 rows of 16 at a time), of a plain
    checkpoint and of one in 3 latent shards."""
    sae = make_sae("jumprelu")
    for name, n_latent_shards in (("flat", 0), ("wide", 3)):
        _commit_checkpoint(store, name, sae, n_latent_shards)
        blocks = list(sc.weight_blocks(store, name, block_elements=40))
        assert max(block.numel() for _, block in blocks) <= 40 and len(blocks) > len(sae.state_dict())
        assert F.fingerprint_of(sae.config, blocks) == F.sae_fingerprint(sae), name


def _resident_bytes() -> int:
    """This process's resident set now (VmRSS: anonymous and file-backed pages, mapped files included)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's resident set")
@pytest.mark.parametrize("n_latent_shards", [0, 3])
def test_the_whole_saes_fingerprint_holds_one_block_not_the_checkpoint(store, n_latent_shards):
    """``weight_blocks`` reads a block's bytes and no more: walking a 32 MiB checkpoint in 256 KiB blocks
    never adds more than a few blocks to the resident set. Before, safetensors' mapped file kept every
    page read resident until the last block: the whole checkpoint (the exactness check of a 2^20-latent
    SAE would have held its 4.5 GiB, as the check that loaded it did)."""
    torch.manual_seed(0)
    sae = build_sae("relu", 256, 16384)  # W_enc and W_dec: 32 MiB
    _commit_checkpoint(store, "big", sae, n_latent_shards)
    baseline, grown, n_bytes = _resident_bytes(), 0, 0
    for _, block in sc.weight_blocks(store, "big", block_elements=1 << 16):
        n_bytes += block.numel() * block.element_size()
        grown = max(grown, _resident_bytes() - baseline)
        del block
    assert n_bytes >= 32 << 20 and grown < 8 << 20, f"{grown / 2**20:.1f} MiB resident while reading"


def test_a_dense_checkpoint_of_an_earlier_version_is_loaded_whole_and_a_sparse_one_never_by_slice(store):
    """JumpReLU checkpoints once stored log θ: its slice would not be this version's tensors, so pass 1
    loads that checkpoint whole, as before, and commits the whole SAE's partials. A TopK latent's
    activation depends on every latent: its slice is refused, naming the stored codes."""
    from sae_platform import latent_slice

    make_dataset(store, [120])
    sae = make_sae("jumprelu")
    weights = {k: v.detach().contiguous() for k, v in sae.state_dict().items()}
    weights["log_threshold"] = weights.pop("threshold").log()
    with store.writing(catalog.checkpoint_name("old")) as version:
        store.fs.pipe_file(f"{version}/{sc.UNSHARDED_WEIGHTS}", save_safetensors(weights))
        store.fs.pipe_file(f"{version}/cfg.json", json.dumps({"sae": sae.config}).encode())
    checkpoint = catalog.checkpoint_version(store, "old")
    assert latent_slice.load_latent_slice(store, "old", 8, 16, version=checkpoint) is None
    shards = F.feature_shards(N_LATENTS, N_SHARDS)
    latent_slice.sliced_partials(store, "old", "p0", shards, SETTINGS, [1], checkpoint=checkpoint, batch_rows=128)
    whole, _ = trainer.load_sae(store, "old")
    assert partial_store.read_partial(store, "old", "p0", 1).meta() == \
        F.compute_partials(store, whole, "p0", [shards[1]], SETTINGS, batch_rows=128)[0].meta()
    _commit_checkpoint(store, "sparse", make_sae("topk"), 0)
    with pytest.raises(F.FeatureError, match="depend on every latent") as error:
        latent_slice.load_latent_slice(store, "sparse", 0, 8)
    assert "stored codes" in error.value.fix


def test_a_dictionary_with_no_model_over_a_slice_of_its_latents_is_loaded_whole(store):
    """A steering vector's one-latent dictionary (``vector``) has no per-slice model
    (``sharded_sae.SHARD_CLASSES``): pass 1 loads it whole, as before slicing, and commits the whole
    SAE's partial (CI's test_vectors found the KeyError this guards)."""
    from sae_platform import latent_slice
    from sae_platform.sae import VectorDictionary
    from tests.test_features import D

    make_dataset(store, [120])
    vector = VectorDictionary.from_direction(torch.randn(D, generator=torch.Generator().manual_seed(0)), 0.1)
    with store.writing(catalog.checkpoint_name("vec")) as version:
        store.fs.pipe_file(f"{version}/{sc.UNSHARDED_WEIGHTS}",
                           save_safetensors({k: v.detach().contiguous() for k, v in vector.state_dict().items()}))
        store.fs.pipe_file(f"{version}/cfg.json", json.dumps({"sae": vector.config}).encode())
    checkpoint = catalog.checkpoint_version(store, "vec")
    assert latent_slice.load_latent_slice(store, "vec", 0, 1, version=checkpoint) is None
    latent_slice.sliced_partials(store, "vec", "p0", [(0, 1)], SETTINGS, [0], checkpoint=checkpoint, batch_rows=128)
    whole, _ = trainer.load_sae(store, "vec")
    expected = F.compute_partials(store, whole, "p0", [(0, 1)], SETTINGS, batch_rows=128)[0]
    stored = partial_store.read_partial(store, "vec", "p0", 0)
    assert stored.meta() == expected.meta()
    assert all(np.array_equal(getattr(stored, name), getattr(expected, name)) for name in F.Partial.ARRAYS)


@pytest.mark.parametrize("variant,n_latent_shards", [("relu", 0), ("jumprelu", 3)])
def test_a_dense_saes_pass_2_from_its_shards_encoder_rows_gives_the_whole_saes_tables(store, variant, n_latent_shards):
    """Pass 2 of a dense SAE encodes its shard's rows again for the interval examples: from the
    shard's encoder rows alone (``latent_slice.load_latent_slice``, what ``assets/features.py``'s
    ``_shard_tables`` hands it) its tables are those of the whole SAE, bit for bit; before, a
    slice was refused as an SAE "without weights" and every pass-2 job loaded the whole SAE."""
    from sae_platform import latent_slice

    make_dataset(store, [400, 250])
    sae = make_sae(variant)
    checkpoint = _commit_checkpoint(store, "run", sae, n_latent_shards)
    shards = F.feature_shards(N_LATENTS, N_SHARDS)
    for key in KEYS[:2]:
        fc.compute_and_write_partials(store, sae, "run", key, shards, SETTINGS, checkpoint=checkpoint, batch_rows=128)
    for index, (start, stop) in enumerate(shards):
        whole = merge_shard_tables(store, sae, "run", index, KEYS[:2], SETTINGS)
        sliced = latent_slice.load_latent_slice(store, "run", start, stop, version=checkpoint)
        tables = merge_shard_tables(store, sliced, "run", index, KEYS[:2], SETTINGS)
        assert tables.stats.equals(whole.stats) and tables.examples.equals(whole.examples), index
        assert tables.meta == whole.meta
    assert "interval" in set(whole.examples["kind"])


@pytest.mark.parametrize("variant,n_latent_shards", [("topk", 0), ("relu", 3)])
def test_the_witness_check_takes_the_checkpoint_without_weights_and_still_catches_a_changed_one(
        store, monkeypatch, variant, n_latent_shards):
    """The exactness check in witness mode reads the SAE's config, range and fingerprint only: given
    ``latent_slice.stored_sae`` (the committed checkpoint's fingerprint taken block by block, plain or
    latent-sharded) it loads no weights and gives the loaded SAE's verdict, shard by shard; once the
    checkpoint's weights change after the tables were built, its fingerprint is not the tables' and the
    check fails as it did with the loaded SAE. Re-encoding needs the weights: refused, naming the fix."""
    from sae_platform import latent_slice

    make_dataset(store, [400, 250, 330])
    sae = make_sae(variant)
    _commit_checkpoint(store, "run", sae, n_latent_shards)
    build_feature_tables(store, sae, "run", SETTINGS, n_feature_shards=N_SHARDS, batch_rows=128)
    shards = F.feature_shards(N_LATENTS, N_SHARDS)
    with_weights = [brute_force_check(store, sae, "run", i, *shards[i]) for i in range(N_SHARDS)]

    def no_weights(*args, **kwargs):
        raise AssertionError("the witness check read SAE weights")

    for module in (trainer, features_assets, latent_slice):
        monkeypatch.setattr(module, "load_sae", no_weights)
    monkeypatch.setattr(sc, "latent_rows", no_weights)  # nor any latent's rows by slice
    weightless = latent_slice.stored_sae(store, "run")
    assert type(weightless) is F.StoredSAE and weightless.fingerprint == F.sae_fingerprint(sae)
    assert weightless.config == sae.config
    for index, (start, stop) in enumerate(shards):
        check = brute_force_check(store, weightless, "run", index, start, stop)
        assert check["ok"] and check == with_weights[index], check["mismatches"][:3]
        assert check["features_checked"] and check["mode"] == "witness"
    with pytest.raises(F.FeatureError, match="needs its weights") as error:
        brute_force_check(store, weightless, "run", 0, *shards[0], reencode=True)
    assert "trainer.load_sae" in error.value.fix

    changed = make_sae(variant)
    with torch.no_grad():
        changed.W_dec[3, 0] += 1.0  # one weight the tables' activations do not even depend on
    _commit_checkpoint(store, "run", changed, n_latent_shards)
    now = latent_slice.stored_sae(store, "run")
    assert now.fingerprint == F.sae_fingerprint(changed) != weightless.fingerprint
    for index, (start, stop) in enumerate(shards):
        check = brute_force_check(store, now, "run", index, start, stop)
        assert not check["ok"] and {"what": "sae_fingerprint", "feature": None, "expected": now.fingerprint,
                                    "got": weightless.fingerprint} in check["mismatches"]
