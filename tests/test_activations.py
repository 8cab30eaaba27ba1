"""Caching a batch: the stored rows are exactly the model's residuals, minus the attention sinks."""

import numpy as np
import pytest
import torch

from sae_platform.activations import (
    CacheSettings,
    cache_partition,
    cache_text_file,
    open_partition,
)
from sae_platform.catalog import list_partitions
from sae_platform.corpus import Contexts, list_source
from sae_platform.errors import ModelError
from sae_platform.model import load_hooked_model
from sae_platform.settings import SettingsError

SETTINGS = CacheSettings(ctx_len=16, batch_size=4, dtype="float32")


def _cache(store, model, text_dir, key="alpha", settings=SETTINGS, source="tiny"):
    text_file = next(f for f in list_source(str(text_dir / "*")) if f.key == key)
    return cache_text_file(store, text_file, model, source, settings)


def test_rows_are_the_residuals_of_non_start_tokens(store, tiny_hooked, text_dir):
    summary = _cache(store, tiny_hooked, text_dir)
    part = open_partition(store, "alpha")
    g = part.group
    tokens, ctx, pos = g["tokens"][:], g["context_id"][:], g["position"][:]
    assert part.n_rows == summary["n_rows"] > 0
    assert (pos > 0).all(), "position 0 (attention sink) must never be a training row"
    assert (g["token_id"][:] != tiny_hooked.start_token_id).all()
    np.testing.assert_array_equal(tokens[ctx, pos], g["token_id"][:])
    np.testing.assert_array_equal(g["context_doc_id"][:][ctx, pos], g["doc_id"][:])
    expected = tiny_hooked.residual(torch.from_numpy(tokens).long()).numpy()[ctx, pos]
    np.testing.assert_allclose(part.acts[:], expected, rtol=1e-5, atol=1e-5)
    assert summary["n_rows"] + summary["excluded_start_tokens"] + summary["excluded_sink_rows"] == tokens.size
    assert part.attrs["hook_name"] == "blocks.1.hook_resid_post" and part.attrs["d_model"] == 32


def test_float16_default_and_chunked_layout(store, tiny_hooked, text_dir):
    _cache(store, tiny_hooked, text_dir, settings=CacheSettings(ctx_len=16, batch_size=3))
    acts = open_partition(store, "alpha").acts
    assert acts.dtype == np.float16 and acts.chunks[1] == 32


def test_sink_rows_are_dropped_and_index_stays_aligned(store, tiny_hooked):
    """A row with 100x the median norm (as SmolLM2 shows after a leading newline) is not stored."""
    tokens = np.array([[0, 5, 6, 7, 8, 9, 10, 11]] * 4, dtype=np.int32)
    contexts = Contexts(tokens, np.zeros_like(tokens), dropped_tokens=0)

    class Sinky:
        def __getattr__(self, name):
            return getattr(tiny_hooked, name)

        def residual(self, ids):
            out = tiny_hooked.residual(ids).clone()
            out[:, 1] *= 1000.0  # position 1 becomes a sink
            return out

    summary = cache_partition(store, "sinky", Sinky(), "tiny", [], contexts, SETTINGS)
    g = open_partition(store, "sinky").group
    assert summary["excluded_sink_rows"] == 4 and (g["position"][:] > 1).all()
    assert g["acts"].shape == (4 * 6, 32) and summary["norm_max"] < 1000


def test_rematerializing_replaces_the_partition(store, tiny_hooked, text_dir):
    _cache(store, tiny_hooked, text_dir)
    first = store.resolve("activations/alpha")
    _cache(store, tiny_hooked, text_dir, settings=CacheSettings(ctx_len=8, batch_size=4, dtype="float32"))
    assert store.resolve("activations/alpha") != first
    assert store.fs.exists(f"{first}/.superseded.json"), "the old version is kept for the grace period, marked"
    assert open_partition(store, "alpha").group["tokens"].shape[1] == 8
    assert list_partitions(store) == ["alpha"]


def test_mismatched_d_model_is_refused_and_nothing_is_damaged(store, tiny_hooked, tiny_model_dir_wide, text_dir):
    _cache(store, tiny_hooked, text_dir)
    before = open_partition(store, "alpha").acts[:]
    wide = load_hooked_model(str(tiny_model_dir_wide), layer=1, device="cpu")
    with pytest.raises(ModelError) as error:
        _cache(store, wide, text_dir, key="beta", source="tiny")
    assert "d_model=32" in str(error.value) and "d_model=48" in str(error.value)
    assert "different artifact root" in str(error.value)
    assert list_partitions(store) == ["alpha"]
    assert not store.fs.exists(store.path("activations/beta")) or store.resolve("activations/beta") is None
    np.testing.assert_array_equal(open_partition(store, "alpha").acts[:], before)


def test_other_layer_of_the_same_model_is_refused(store, tiny_model_dir, tiny_hooked, text_dir):
    _cache(store, tiny_hooked, text_dir)
    other = load_hooked_model(str(tiny_model_dir), layer=3, device="cpu")
    with pytest.raises(ModelError, match="layer=1.*layer=3"):
        _cache(store, other, text_dir, key="beta")


def test_float16_overflow_is_refused(store, tiny_hooked, text_dir):
    class Huge:
        def __getattr__(self, name):
            return getattr(tiny_hooked, name)

        def residual(self, ids):
            return tiny_hooked.residual(ids) * 1e6

    text_file = list_source(str(text_dir / "*"))[0]
    with pytest.raises(ModelError, match="beyond float16's range"):
        cache_text_file(store, text_file, Huge(), "tiny", CacheSettings(ctx_len=16, batch_size=4,
                                                                           sink_norm_factor=0))
    assert list_partitions(store) == []


def test_unknown_dtype():
    with pytest.raises(SettingsError, match="resources.caching.config.dtype = 'int8' is not allowed: it must be one "
                                            "of float16, float32"):
        CacheSettings(dtype="int8")


@pytest.mark.parametrize("field, value, rule", [
    ("batch_size", 0, "an integer >= 1"), ("batch_size", -4, "an integer >= 1"), ("ctx_len", 1, "an integer >= 2"),
    ("max_contexts", -1, "an integer >= 1"), ("max_contexts", 0, "an integer >= 1"),
    ("sink_norm_factor", float("nan"), "a finite number >= 0"), ("sink_norm_factor", -1.0, "a finite number >= 0"),
])
def test_caching_settings_are_validated_where_declared(field, value, rule):
    with pytest.raises(SettingsError, match=f"resources.caching.config.{field} = .* it must be {rule}"):
        CacheSettings(**{field: value})


# --- several hook points from one forward pass ----------------------------------------------------

MULTI = ["blocks.1.hook_mlp_out", "blocks.0.hook_attn_out", "blocks.1.ln2.hook_normalized -> blocks.1.hook_mlp_out"]


def test_several_hook_points_are_cached_from_one_forward_pass(store, tiny_hooked, text_dir):
    """One store per entry; every store holds exactly the value at its hook point for its rows;
    the model runs once per batch and stops after block 1; a transcoder pair stays paired."""
    from sae_platform.hooks import read_hook_points
    from sae_platform.model import find_decoder_layers

    layers = find_decoder_layers(tiny_hooked.model)
    calls = {"block0": 0, "block2": 0}
    handles = [layers[0].register_forward_pre_hook(lambda *a: calls.__setitem__("block0", calls["block0"] + 1)),
               layers[2].register_forward_pre_hook(lambda *a: calls.__setitem__("block2", calls["block2"] + 1))]
    settings = CacheSettings(ctx_len=16, batch_size=4, dtype="float32", hook_points=MULTI)
    try:
        summary = _cache(store, tiny_hooked, text_dir, settings=settings)
    finally:
        for h in handles:
            h.remove()
    n_batches = -(-summary["n_contexts"] // 4)
    assert calls == {"block0": n_batches, "block2": 0}
    assert [s["hook_name"] for s in summary["stores"]] == ["blocks.1.hook_mlp_out", "blocks.0.hook_attn_out",
                                                           "blocks.1.hook_mlp_out"]
    path = open_partition(store, "alpha").path
    tokens = open_partition(store, "alpha").group["tokens"][:]
    ref = read_hook_points(tiny_hooked.model, torch.from_numpy(tokens).long(),
                           ["blocks.1.hook_mlp_out", "blocks.0.hook_attn_out", "blocks.1.ln2.hook_normalized"])
    for i, store_info in enumerate(summary["stores"]):
        g = store.open_group(f"{path}/{store_info['store']}", mode="r")
        ctx, pos = g["context_id"][:], g["position"][:]
        assert g["acts"].shape[0] == store_info["n_rows"] == len(ctx) > 0
        if i < 2:
            assert dict(g.attrs)["hook_name"] == MULTI[i] and g["acts"].shape[1] == 32
            np.testing.assert_allclose(g["acts"][:], ref[MULTI[i]].numpy()[ctx, pos], rtol=1e-5, atol=1e-5)
        else:  # [input | output] of the same token on one row
            attrs = dict(g.attrs)
            assert attrs["hook_name_in"] == "blocks.1.ln2.hook_normalized" and attrs["d_in"] == attrs["d_out"] == 32
            acts = g["acts"][:]
            np.testing.assert_allclose(acts[:, :32], ref["blocks.1.ln2.hook_normalized"].numpy()[ctx, pos],
                                       rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(acts[:, 32:], ref["blocks.1.hook_mlp_out"].numpy()[ctx, pos], rtol=1e-5,
                                       atol=1e-5)
    assert open_partition(store, "alpha").attrs["hook_points"] == MULTI


def test_hook_point_entries_are_checked(store, tiny_hooked, text_dir):
    for bad, words in ((["blocks.1.hook_mlp"], "unknown hook point"),
                       (["blocks.1.hook_mlp_out -> blocks.1.ln2.hook_normalized"], "input is computed after"),
                       (["a -> b -> c"], "neither a hook point"),
                       (["blocks.1.hook_mlp_out", "blocks.1.hook_mlp_out"], "twice")):
        with pytest.raises(ModelError, match=words):
            _cache(store, tiny_hooked, text_dir, settings=CacheSettings(ctx_len=16, hook_points=bad))
    with pytest.raises(SettingsError, match="hook_points must be a list"):
        CacheSettings(hook_points="blocks.1.hook_mlp_out")
    _cache(store, tiny_hooked, text_dir, settings=SETTINGS)
    with pytest.raises(ModelError, match="hook_name="):  # no mixing hook points under one root
        _cache(store, tiny_hooked, text_dir, key="beta",
               settings=CacheSettings(ctx_len=16, batch_size=4, dtype="float32", hook_points=["blocks.1.hook_mlp_out"]))


def test_a_cached_partition_with_a_deleted_chunk_or_an_edited_shape_is_refused(store, tiny_hooked, text_dir):
    """Nothing missing is read as zeros: the reader compares the store with what the writer recorded."""
    import json
    from pathlib import Path

    from sae_platform.errors import StorageError

    _cache(store, tiny_hooked, text_dir)
    part = open_partition(store, "alpha")
    folder = Path(part.path) / "data.zarr"
    assert part.acts[:].all(axis=1).any()

    chunk = folder / "acts" / "c" / "0" / "0"
    saved = chunk.read_bytes()
    chunk.unlink()                                                  # used to read back as zeros
    with pytest.raises(StorageError) as error:
        open_partition(store, "alpha")
    message = str(error.value)
    assert "activation partition 'alpha'" in message and "data.zarr/acts/c/0/0 is missing" in message
    assert "sae-platform backfill alpha" in message and "sae-platform verify activations/alpha" in message
    chunk.write_bytes(saved)
    np.testing.assert_array_equal(open_partition(store, "alpha").acts[:], part.acts[:])  # restored: read again

    meta = folder / "acts" / "zarr.json"
    body = json.loads(meta.read_text())
    body["shape"][0] += 7
    meta.write_text(json.dumps(body, indent=2))
    with pytest.raises(StorageError, match=r"data.zarr/acts/zarr.json (has changed|is \d+ bytes)"):
        open_partition(store, "alpha")
