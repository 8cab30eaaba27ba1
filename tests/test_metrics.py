"""Feature metrics read the SAE's own hook point: the codes ``heldout_codes`` gives equal the SAE's
encode of the hook point's value computed independently (a hook of the test's own on the
sub-block), for an SAE of hook_mlp_out and for a transcoder (which encodes the MLP's input), not
the residual stream after the model's default layer; the probe baseline's neurons are that value."""

import functools

import numpy as np
import pytest
import torch

from sae_platform import catalog, metrics
from sae_platform.errors import ModelError
from sae_platform.metrics import HELDOUT_CODES_FILE, heldout_codes, heldout_codes_bytes, read_heldout_codes
from sae_platform.sae import build_sae
from sae_platform.training_rows import RowRule

LAYER = 2  # not tiny_hooked's default layer (1): nothing may fall back to it


def _rule(hooked):
    """Every non-start token is a row (sink_norm_factor 0): what these tests' masks expect."""
    return RowRule(hooked.start_token_id, 0.0, 1)


def _own_value(hooked, ids, module):
    """The output of ``module`` in a full forward pass of ``ids``, by the test's own hook."""
    seen = {}
    handle = module.register_forward_hook(lambda m, i, o: seen.__setitem__("v", o.detach().clone()))
    try:
        with torch.no_grad():
            hooked.model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return seen["v"].reshape(*ids.shape, -1)


def _contexts(hooked, n=5, ctx_len=12):
    tokens = np.random.default_rng(0).integers(1, 250, size=(n, ctx_len))
    tokens[:, 0] = hooked.start_token_id
    tokens[2, 6] = hooked.start_token_id  # a start token inside a context: no codes there
    return tokens


def _dense(codes, n_rows, n_latents, mask):
    row_of = np.full(mask.size, -1)
    row_of[mask.reshape(-1)] = np.arange(n_rows)
    out = np.zeros((n_rows, n_latents), dtype=np.float32)
    assert (row_of[codes.positions] >= 0).all()  # codes only on training-row positions
    out[row_of[codes.positions], codes.features] = codes.values
    return out


@pytest.mark.parametrize("transcoder", [False, True], ids=["mlp_out", "transcoder"])
def test_codes_are_the_encode_of_the_saes_own_hook_point(tiny_hooked, transcoder):
    block = tiny_hooked.model.model.layers[LAYER]
    tokens = _contexts(tiny_hooked)
    ids = torch.from_numpy(tokens).long()
    d = tiny_hooked.d_model
    mlp_in = _own_value(tiny_hooked, ids, block.post_attention_layernorm)
    mlp_out = _own_value(tiny_hooked, ids, block.mlp)
    torch.manual_seed(0)
    at = {"hook_point": f"blocks.{LAYER}.hook_mlp_out"}
    if transcoder:
        at["input_hook_point"] = f"blocks.{LAYER}.ln2.hook_normalized"
        sae = build_sae("topk", d, 64, k=4, d_out=d)
        sae.calibrate_(mlp_in.reshape(-1, d), mlp_out.reshape(-1, d))
        reads = mlp_in
    else:
        sae = build_sae("topk", d, 64, k=4)
        sae.calibrate_(mlp_out.reshape(-1, d))
        reads = mlp_out
    got = heldout_codes(tiny_hooked, sae, tokens, **at, rule=_rule(tiny_hooked), batch_size=2, keep_neurons=True)
    mask = (tokens != tiny_hooked.start_token_id)
    mask[:, 0] = False
    assert (got.mask == mask).all()
    rows = reads[torch.from_numpy(mask)]
    want = sae.encode(rows).to_dense(64).detach().numpy()
    np.testing.assert_allclose(_dense(got, len(rows), 64, mask), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.neurons, rows.numpy(), rtol=1e-5, atol=1e-6)  # the probe baseline's neurons
    # the residual stream (after the block; a transcoder: entering the MLP, before its norm) has the
    # same width, and other codes: it was not read
    other = ({"hook_point": f"blocks.{LAYER}.hook_resid_post"} if not transcoder else
             {"hook_point": at["hook_point"], "input_hook_point": f"blocks.{LAYER}.hook_resid_mid"})
    resid = heldout_codes(tiny_hooked, sae, tokens, **other, rule=_rule(tiny_hooked))
    assert not np.allclose(_dense(resid, len(rows), 64, mask), want, atol=1e-3)


def test_a_wrong_hook_point_is_named(tiny_hooked):
    sae = build_sae("topk", tiny_hooked.d_model, 64, k=4)
    heldout_codes = functools.partial(metrics.heldout_codes, rule=_rule(tiny_hooked))
    with pytest.raises(ModelError, match="blocks.L"):
        heldout_codes(tiny_hooked, sae, _contexts(tiny_hooked), hook_point="blocks.2.hook_mlp")
    with pytest.raises(ModelError, match="0..3"):
        heldout_codes(tiny_hooked, sae, _contexts(tiny_hooked), hook_point="blocks.9.hook_mlp_out")
    # a transcoder encoded from its output, or an SAE from another hook point: refused, not silently wrong
    with pytest.raises(ModelError, match="only for transcoders"):
        heldout_codes(tiny_hooked, sae, _contexts(tiny_hooked), hook_point="blocks.2.hook_mlp_out",
                      input_hook_point="blocks.2.ln2.hook_normalized")
    transcoder = build_sae("topk", tiny_hooked.d_model, 64, k=4, d_out=tiny_hooked.d_model)
    with pytest.raises(ModelError, match="transcoder needs its input"):
        heldout_codes(tiny_hooked, transcoder, _contexts(tiny_hooked), hook_point="blocks.2.hook_mlp_out")


def test_stored_heldout_codes_are_reused_only_for_the_checkpoint_they_were_encoded_with(tiny_hooked, store):
    """sae_eval stores its held-out codes; the explanation steps read them back exactly, and only
    for the same checkpoint version (another checkpoint, or no file, means: encode again)."""
    torch.manual_seed(0)
    sae = build_sae("topk", tiny_hooked.d_model, 64, k=4)
    codes = heldout_codes(tiny_hooked, sae, _contexts(tiny_hooked), hook_point="blocks.1.hook_resid_post",
                          rule=_rule(tiny_hooked))
    assert read_heldout_codes(store, "s") is None  # no checkpoint, no evaluation
    with store.writing(catalog.checkpoint_name("s")) as version:
        store.write_json(f"{version}/cfg.json", {})
    assert read_heldout_codes(store, "s") is None  # no evaluation committed
    pin = catalog.checkpoint_pin(catalog.checkpoint_version(store, "s"))
    with store.writing(catalog.eval_name("s"), **pin) as version:
        store.fs.pipe_file(f"{version}/{HELDOUT_CODES_FILE}", heldout_codes_bytes(codes))
    back = read_heldout_codes(store, "s")
    for name in ("tokens", "mask", "positions", "features", "values"):
        np.testing.assert_array_equal(getattr(back, name), getattr(codes, name))
        assert getattr(back, name).dtype == getattr(codes, name).dtype
    with store.writing(catalog.checkpoint_name("s")) as version:  # a newer checkpoint: the codes are stale
        store.write_json(f"{version}/cfg.json", {})
    assert read_heldout_codes(store, "s") is None


def test_the_probe_table_has_the_schema_tables_declares(tiny_hooked):
    """probes.json beside sae_eval's report (``probe_metrics``' table): one row per property, with
    the columns (in order) and value types of ``tables.PROBE_SCHEMA``."""
    import polars as pl

    from sae_platform.metrics import probe_metrics
    from sae_platform.probes import PROPERTIES
    from sae_platform.tables import PROBE_SCHEMA

    torch.manual_seed(0)
    sae = build_sae("topk", tiny_hooked.d_model, 64, k=4)
    codes = heldout_codes(tiny_hooked, sae, _contexts(tiny_hooked), hook_point="blocks.1.hook_resid_post",
                          rule=_rule(tiny_hooked), keep_neurons=True)
    _, table = probe_metrics(codes, tiny_hooked.tokenizer, sae.n_latents)
    assert len(table) == len(PROPERTIES)
    python_type = {pl.String: str, pl.Int64: int, pl.Float64: float}
    for row in table:
        assert list(row) == list(PROBE_SCHEMA)
        assert all(type(row[k]) is python_type[dtype] for k, dtype in PROBE_SCHEMA.items()), row
