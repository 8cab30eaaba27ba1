"""SAELens export: the exported weights, applied with SAELens's own formulas, reproduce our codes
and reconstructions for every exportable variant (the input scale folded in); cfg.json fields;
the BatchTopK mappings; switch refused; writing through an fsspec filesystem."""

import json
import math

import fsspec
import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file

from sae_platform.errors import PlatformError
from sae_platform.export import export_saelens
from sae_platform.sae import build_sae

D, N, K = 16, 48, 5
HOOK = {"hook_name": "blocks.1.hook_resid_post", "model_name": "tiny-llama"}


def raw_data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    # far from unit scale and centred away from 0, so a missing or misplaced fold shows
    return torch.randn(n, D, generator=g) * 40 + torch.randn(D, generator=g) * 25


def trained_like(variant, **kw):
    """An SAE with generic weights: W_enc != W_dec^T, nonzero biases, a calibrated input scale."""
    torch.manual_seed(1)
    sae = build_sae(variant, D, N, **kw)
    sae.calibrate_(raw_data(seed=5))
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        sae.b_enc.copy_(0.2 * torch.randn(N))
        sae.b_pre.add_(0.1 * torch.randn(D))
        if variant == "jumprelu":
            sae.threshold.copy_(torch.empty(N).uniform_(math.log(0.05), math.log(0.8)).exp())
        if variant == "batchtopk":
            sae.threshold.fill_(0.35)
    assert abs(float(sae.input_scale) - 1) > 0.5
    return sae


def saelens_forward(cfg: dict, w: dict, x: torch.Tensor):
    """SAELens inference (apply_b_dec_to_input, normalize_activations none), written out."""
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    arch = cfg["architecture"]
    if arch == "standard":
        z = pre.relu()
    elif arch == "jumprelu":
        z = pre.relu() * (pre > w["threshold"])
    elif arch == "topk":
        top = pre.topk(cfg["activation_fn_kwargs"]["k"], dim=-1)
        z = torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
    else:
        raise AssertionError(arch)
    return z, z @ w["W_dec"] + w["b_dec"]


CASES = [("topk", {"k": K}, "topk"), ("relu", {}, "standard"), ("jumprelu", {}, "jumprelu"),
         ("batchtopk", {"k": K}, "jumprelu")]


@pytest.mark.parametrize("variant,hparams,architecture", CASES)
def test_exported_weights_reproduce_our_codes_and_reconstruction(tmp_path, variant, hparams, architecture):
    sae = trained_like(variant, **hparams)
    info = export_saelens(sae, str(tmp_path / "out"), **HOOK, context_size=128)
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    w = load_file(str(tmp_path / "out" / "sae_weights.safetensors"))
    assert info["architecture"] == cfg["architecture"] == architecture
    assert w["W_enc"].shape == (D, N) and w["W_dec"].shape == (N, D)
    assert w["b_enc"].shape == (N,) and w["b_dec"].shape == (D,)
    assert all(t.dtype == torch.float32 for t in w.values())
    assert ("threshold" in w) == (architecture == "jumprelu")

    x = raw_data(seed=2)
    z_lens, recon_lens = saelens_forward(cfg, w, x)
    with torch.no_grad():
        z_ours = sae.encode_dense(x)
        recon_ours = sae.decode(sae.encode(x))
    assert torch.equal(z_lens > 0, z_ours > 0)  # the same latents fire
    active = int((z_ours > 0).sum())
    positive_pre = int(((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"] > 0).sum())
    assert 0 < active < z_ours.numel()
    if architecture != "standard":  # the threshold / TopK really cuts: ReLU alone would differ
        assert active < positive_pre
    torch.testing.assert_close(z_lens, z_ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(recon_lens, recon_ours, rtol=1e-5, atol=1e-4)


def test_cfg_fields(tmp_path):
    sae = trained_like("topk", k=K)
    info = export_saelens(sae, str(tmp_path / "sae"), **HOOK, context_size=64)
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg == info["cfg"]
    assert cfg["d_in"] == D and cfg["d_sae"] == N
    assert cfg["activation_fn_str"] == "topk" and cfg["activation_fn_kwargs"] == {"k": K} and cfg["k"] == K
    expected = {"dtype": "float32", "device": "cpu", "model_name": "tiny-llama",
                "hook_name": "blocks.1.hook_resid_post", "hook_layer": 1, "hook_head_index": None,
                "context_size": 64, "prepend_bos": True, "dataset_path": "", "normalize_activations": "none",
                "apply_b_dec_to_input": True, "finetuning_scaling_factor": False, "sae_lens_training_version": None}
    assert {k: cfg[k] for k in expected} == expected
    meta = cfg["metadata"]
    assert meta["sae_platform_config"] == sae.config
    assert meta["input_scale"] == pytest.approx(float(sae.input_scale))
    assert "sae_lens_version" not in meta  # must not claim SAELens >= 6 layout
    assert info["weights_path"].endswith("sae_weights.safetensors") and info["cfg_path"].endswith("cfg.json")
    assert set(info["mapping"]) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    assert not [p for p in (tmp_path / "sae").iterdir() if ".tmp-" in p.name]  # no temp files left


def test_batchtopk_threshold_and_untrained_fallback(tmp_path):
    sae = trained_like("batchtopk", k=K)
    export_saelens(sae, str(tmp_path / "a"), **HOOK)
    w = load_file(str(tmp_path / "a" / "sae_weights.safetensors"))
    torch.testing.assert_close(w["threshold"], torch.full((N,), 0.35))
    with torch.no_grad():
        sae.threshold.fill_(float("nan"))  # never trained: our encode uses per-row TopK
    info = export_saelens(sae, str(tmp_path / "b"), **HOOK)
    assert info["architecture"] == "topk" and info["cfg"]["activation_fn_kwargs"] == {"k": K}
    cfg = json.loads((tmp_path / "b" / "cfg.json").read_text())
    w = load_file(str(tmp_path / "b" / "sae_weights.safetensors"))
    x = raw_data(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(saelens_forward(cfg, w, x)[0], sae.encode_dense(x), rtol=1e-5, atol=1e-5)


def test_switch_is_refused(tmp_path):
    sae = build_sae("switch", D, N, k=K, n_experts=4)
    with pytest.raises(PlatformError, match="switch SAE cannot be exported") as err:
        export_saelens(sae, str(tmp_path / "sw"), **HOOK)
    assert "How to fix" in str(err.value)
    assert not (tmp_path / "sw").exists()


def test_export_through_fsspec(tmp_path):
    sae = trained_like("jumprelu")
    fs = fsspec.filesystem("memory")
    info = export_saelens(sae, "/exports/jumprelu", **HOOK, fs=fs)
    local = export_saelens(sae, str(tmp_path / "local"), **HOOK)
    remote_w = load_safetensors(fs.cat_file(info["weights_path"]))
    local_w = load_file(local["weights_path"])
    assert set(remote_w) == set(local_w) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
    for name in local_w:
        assert torch.equal(remote_w[name], local_w[name])
    assert json.loads(fs.cat_file(info["cfg_path"])) == local["cfg"]
    torch.testing.assert_close(remote_w["threshold"], sae.threshold.detach())
    np.testing.assert_allclose(remote_w["W_enc"].numpy(), (sae.W_enc.detach() * sae.input_scale).T.numpy(),
                               rtol=1e-6)


# --- round trip through SAELens's own loader -----------------------------------------------------

def _trained_transcoder(variant, **kw):
    torch.manual_seed(3)
    sae = build_sae(variant, D, N, d_out=D + 3, **kw)
    x = raw_data(seed=7) / 8
    y = torch.cat([raw_data(seed=8), raw_data(seed=9)[:, :3]], 1) / 40 - 1  # another scale and mean
    sae.calibrate_(x, y)
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        sae.b_enc.copy_(0.2 * torch.randn(N))
        sae.b_pre.add_(0.1 * torch.randn(D))
        sae.b_dec.add_(0.1 * torch.randn(D + 3))
        if variant == "jumprelu":
            sae.threshold.copy_(torch.empty(N).uniform_(math.log(0.05), math.log(0.8)).exp())
        if variant in ("batchtopk", "matryoshka_batchtopk"):
            sae.threshold.fill_(0.35)
        if sae.skip_connection:  # trained skips are not zero: a wrong fold of the scales must show
            sae.W_skip.copy_(0.2 * torch.randn_like(sae.W_skip))
    assert abs(float(sae.output_scale) - 1) > 0.3 and abs(float(sae.output_scale) - float(sae.input_scale)) > 0.1
    return sae


def _roundtrip_sae(kind, variant, hparams):
    if kind == "sae":
        sae = trained_like(variant, **hparams)
        with torch.no_grad():  # the round trip runs on rows of realistic size (|x| ~ 10, not ~300)
            sae.input_scale.mul_(8)
        if variant == "matryoshka_batchtopk":
            sae.threshold.fill_(0.35)
        return sae
    return _trained_transcoder(variant, **hparams)


ROUND_TRIP = [("sae", "topk", {"k": K}, "topk"), ("sae", "relu", {}, "standard"), ("sae", "jumprelu", {}, "jumprelu"),
              ("sae", "batchtopk", {"k": K}, "jumprelu"),
              ("sae", "matryoshka_batchtopk", {"k": K, "matryoshka_widths": [8, 24]}, "jumprelu"),
              ("transcoder", "relu", {}, "transcoder"), ("transcoder", "jumprelu", {}, "jumprelu_transcoder"),
              ("transcoder", "batchtopk", {"k": K}, "jumprelu_transcoder"),
              ("transcoder", "matryoshka_batchtopk", {"k": K}, "jumprelu_transcoder"),
              ("transcoder", "relu", {"skip_connection": True}, "skip_transcoder"),
              ("transcoder", "batchtopk", {"k": K, "skip_connection": True}, "jumprelu_skip_transcoder")]


@pytest.mark.parametrize("kind,variant,hparams,architecture", ROUND_TRIP)
def test_saelens_loads_every_export_and_encodes_and_decodes_like_us(tmp_path, kind, variant, hparams, architecture):
    """SAE.load_from_disk (SAELens's own loader) on our export; encode and decode agree with ours
    on the same rows to 1e-4 in fp32, and cfg.json names the hook point(s)."""
    sae_lens = pytest.importorskip("sae_lens")
    sae = _roundtrip_sae(kind, variant, hparams)
    hook = {**HOOK, "hook_name": "blocks.1.ln2.hook_normalized"} if kind == "transcoder" else HOOK
    out_hook = "blocks.1.hook_mlp_out" if kind == "transcoder" else None
    export_saelens(sae, str(tmp_path / "out"), **hook, context_size=128, hook_name_out=out_hook)
    lens = sae_lens.SAE.load_from_disk(str(tmp_path / "out"), device="cpu")
    assert lens.cfg.architecture() == architecture
    assert lens.cfg.metadata.hook_name == hook["hook_name"]
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert cfg["hook_name"] == hook["hook_name"] and cfg.get("hook_name_out") == out_hook
    if kind == "transcoder":
        assert lens.cfg.d_out == D + 3 and lens.cfg.metadata.hook_name_out == out_hook

    x = raw_data(seed=11) / 8  # fp32: 1e-4 is a few ulps of the reconstruction at this size
    with torch.no_grad():
        z_lens = lens.encode(x)
        z_ours = sae.encode_dense(x)
        # A skip transcoder's output also reads x: SAELens adds it in forward, not in decode.
        recon_lens = lens(x) if hparams.get("skip_connection") else lens.decode(z_lens)
        recon_ours = sae.decode(sae.encode(x), x)
    assert 0 < int((z_ours > 0).sum()) < z_ours.numel()
    assert torch.equal(z_lens > 0, z_ours > 0)
    assert float((z_lens - z_ours).abs().max()) <= 1e-4
    assert float((recon_lens - recon_ours).abs().max()) <= 1e-4, float((recon_lens - recon_ours).abs().max())


def test_a_topk_transcoder_is_refused_as_saelens_has_none(tmp_path):
    sae = _trained_transcoder("topk", k=K)
    with pytest.raises(PlatformError, match="no topk transcoder"):
        export_saelens(sae, str(tmp_path / "out"), **HOOK, hook_name_out="blocks.1.hook_mlp_out")
    assert not (tmp_path / "out").exists()


def test_a_cross_block_transcoder_names_each_hook_points_own_layer(tmp_path):
    """hook_layer comes from hook_name and hook_layer_out from hook_name_out (SAELens PR #624): a
    transcoder from blocks.0.hook_resid_pre to blocks.2.hook_mlp_out is 0 -> 2, not 0 -> 0."""
    sae_lens = pytest.importorskip("sae_lens")
    sae = _trained_transcoder("jumprelu")
    export_saelens(sae, str(tmp_path / "out"), hook_name="blocks.0.hook_resid_pre", model_name="tiny-llama",
                   hook_name_out="blocks.2.hook_mlp_out")
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert (cfg["hook_name"], cfg["hook_layer"]) == ("blocks.0.hook_resid_pre", 0)
    assert (cfg["hook_name_out"], cfg["hook_layer_out"]) == ("blocks.2.hook_mlp_out", 2)
    lens = sae_lens.SAE.load_from_disk(str(tmp_path / "out"), device="cpu")
    assert lens.cfg.metadata.hook_name_out == "blocks.2.hook_mlp_out"


def _fvu(target: torch.Tensor, recon: torch.Tensor) -> float:
    """Fraction of variance unexplained over rows [n, d]: sum |y - y'|² / sum |y - mean(y)|²."""
    return float((target - recon).pow(2).sum() / (target - target.mean(0)).pow(2).sum())


def test_an_exported_transcoder_fed_transformer_lens_values_keeps_its_fvu(store, tiny_hooked, text_dir, tmp_path):
    """A transcoder trained here on blocks.1.ln2.hook_normalized -> blocks.1.hook_mlp_out, exported,
    loaded by SAELens and fed TransformerLens's run_with_cache values of those names (same weights,
    same tokens) reconstructs TransformerLens's hook_mlp_out with the FVU it has on our own reads.
    The norms get random gains: with unit gains "before" and "after the gain" would be equal."""
    sae_lens = pytest.importorskip("sae_lens")
    from sae_platform import shuffle
    from sae_platform.activations import CacheSettings, cache_text_file
    from sae_platform.corpus import list_source
    from sae_platform.export import export_run
    from sae_platform.trainer import TrainSettings, load_sae, train_sae
    from tests.tl_reference import transformer_lens_model

    model = tiny_hooked.model
    torch.manual_seed(4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(torch.empty_like(param).uniform_(0.2, 3.0))
    reads, writes = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
    settings = CacheSettings(ctx_len=16, batch_size=8, dtype="float32", hook_points=[f"{reads} -> {writes}"])
    for text_file in list_source(str(text_dir / "*")):
        cache_text_file(store, text_file, tiny_hooked, "tiny", settings)
    shuffle.run_shuffle(store, "main", n_buckets=2, memory_budget_bytes=1 << 20, n_jobs=1, seed=0)
    train = TrainSettings(variant="batchtopk", n_latents=64, k=8, batch_size=128, token_budget=128 * 40, lr=3e-3,
                          checkpoint_every_tokens=128 * 40, holdout_rows=128, dead_after_tokens=128 * 10)
    train_sae(store, "main", "tc", train, log=lambda m: None)
    exported = export_run(store, "tc")
    lens = sae_lens.SAE.load_from_disk(exported["path"], device="cpu")

    text = tiny_hooked.tokenizer((text_dir / "gamma.txt").read_text(encoding="utf-8"))["input_ids"]
    ids = torch.tensor(text[:4 * 15]).reshape(4, 15)
    ids = torch.cat([torch.full((4, 1), tiny_hooked.start_token_id), ids], 1)  # contexts as cached
    ours = tiny_hooked.read(ids, [reads, writes])
    with torch.no_grad():
        _, cache = transformer_lens_model(model, tmp_path / "tl").run_with_cache(ids)
        sae = load_sae(store, "tc")[0]
        rows = (slice(None), slice(1, None))  # the start token is never a training row
        fvu_ours = _fvu(ours[writes][rows].flatten(0, 1), sae.decode(sae.encode(ours[reads][rows].flatten(0, 1))))
        x_tl, y_tl = cache[reads][rows].flatten(0, 1), cache[writes][rows].flatten(0, 1)
        fvu_tl = _fvu(y_tl, lens.decode(lens.encode(x_tl)))
    print(f"FVU ours {fvu_ours:.6f} TransformerLens {fvu_tl:.6f}")
    assert fvu_ours < 0.9, fvu_ours
    assert fvu_tl == pytest.approx(fvu_ours, rel=1e-3, abs=1e-4), (fvu_tl, fvu_ours)
