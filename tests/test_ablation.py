"""Ablation sparsity: a single-direction logit change gives the minimum 1/(V·T), a uniform change
over every logit is no change at all, the maximum is 1; the model path runs and stays in range."""

import math

import numpy as np
import pytest
import torch

from sae_platform.ablation import ablation_sparsities, ablation_sparsity
from sae_platform.errors import PlatformError
from sae_platform.sae import build_sae
from sae_platform.training_rows import RowRule, training_rows


def _rows(hooked, tokens):
    """Every non-start token (sink_norm_factor 0): the training rows of these tests' tokens."""
    return training_rows(np.asarray(tokens), RowRule(hooked.start_token_id, 0.0, 1))


def test_single_logit_change_is_the_minimum():
    delta = torch.zeros(4, 100)
    delta[2, 17] = -3.0
    assert ablation_sparsity(delta) == pytest.approx(1 / 400)
    assert ablation_sparsity(np.eye(1, 50)[0] * 5) == pytest.approx(1 / 50)


def test_constant_shift_is_no_change_and_spread_change_is_dense():
    assert math.isnan(ablation_sparsity(torch.full((2, 10), 3.0)))
    alternating = torch.tensor([[1.0, -1.0] * 50])  # median 0 after subtraction: all |1| -> (L1/L2)^2 = n
    assert ablation_sparsity(alternating) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    dense = ablation_sparsity(rng.normal(size=(3, 1000)))
    assert 0.5 < dense < 1.0  # Gaussian: (E|x|)^2 / E[x^2] = 2/pi
    assert dense == pytest.approx(2 / math.pi, abs=0.05)
    with pytest.raises(PlatformError, match="vocab"):
        ablation_sparsity(torch.zeros(2, 1))


def test_ablation_on_a_model(tiny_hooked):
    torch.manual_seed(0)
    sae = build_sae("topk", tiny_hooked.d_model, 64, k=4)
    tokens = np.random.default_rng(0).integers(1, 200, size=(3, 16))
    at = {"hook_point": tiny_hooked.hook_name}
    out = ablation_sparsities(tiny_hooked, sae, tokens, **at, row_mask=_rows(tiny_hooked, tokens), n_tokens=4,
                              horizon=3)
    assert out["ablation_pairs"] > 0
    assert out["ablation_sparsity_min_possible"] <= out["ablation_sparsity"] <= 1.0
    full = ablation_sparsities(tiny_hooked, sae, tokens, **at, row_mask=_rows(tiny_hooked, tokens), n_tokens=4,
                               horizon=3, use_cache=False)
    assert full["ablation_pairs"] == out["ablation_pairs"]   # the prefix's cache: the same logits
    assert full["ablation_sparsity"] == pytest.approx(out["ablation_sparsity"], rel=1e-4)
    with pytest.raises(PlatformError, match="horizon"):
        ablation_sparsities(tiny_hooked, sae, tokens[:, :3], **at, row_mask=_rows(tiny_hooked, tokens[:, :3]),
                            n_tokens=4, horizon=3)


# -- at the SAE's own hook point (not the residual stream after the model's default layer) --------

def _opt_hooked():
    """A tiny random OPT (its MLP runs on [batch * seq, d]): no tokenizer is needed for ablations."""
    from transformers import OPTConfig, OPTForCausalLM

    from sae_platform.model import HookedModel

    torch.manual_seed(1)
    config = OPTConfig(vocab_size=97, hidden_size=32, ffn_dim=64, num_hidden_layers=3, num_attention_heads=4,
                       word_embed_proj_dim=32, bos_token_id=2, eos_token_id=2, pad_token_id=1)
    return HookedModel(OPTForCausalLM(config).eval(), None, 0, torch.device("cpu"), None, 2)


def _block_modules(hooked, layer):
    """The test's own idea of (the MLP's input norm, the MLP) of a block, written out here."""
    if hooked.model.config.model_type == "opt":
        block = hooked.model.model.decoder.layers[layer]
        return block.final_layer_norm, block.fc2
    block = hooked.model.model.layers[layer]
    return block.post_attention_layernorm, block.mlp


def _one_position_tokens(start: int, q: int, ctx_len: int, horizon: int, vocab: int) -> np.ndarray:
    """Contexts whose only non-start token among the positions the ablation may draw (1..ctx_len-horizon)
    is q: every counted draw is position q, whatever the random choice."""
    rng = np.random.default_rng(3)
    tokens = rng.integers(3, vocab, size=(2, ctx_len))
    tokens[:, :ctx_len - horizon + 1] = start
    tokens[:, q] = rng.integers(3, vocab, size=2)
    return tokens


def _independent_sparsities(hooked, sae, ids, q, horizon, layer, transcoder):
    """Own hooks on the MLP: read the SAE's input at q, replace the MLP's output at q by the
    reconstruction and by the reconstruction less a_f · W_dec[f] / scale, full forward passes."""
    from sae_platform.ablation import ablation_sparsity

    norm, mlp = _block_modules(hooked, layer)
    seen = {}
    grab = (norm if transcoder else mlp).register_forward_hook(
        lambda m, i, o: seen.__setitem__("x", o.detach().clone()))
    with torch.no_grad():
        hooked.model(input_ids=ids, use_cache=False)
    grab.remove()
    x = seen["x"].reshape(*ids.shape, -1)[0, q][None]
    codes = sae.encode(x)
    on = codes.values[0] > 0
    latents, acts = codes.indices[0][on], codes.values[0][on]
    scale = sae.output_scale if transcoder else sae.input_scale
    recon = sae.decode(codes)[0]
    rows = torch.cat([recon[None], recon[None] - acts[:, None] * sae.W_dec[latents] / scale])

    def splice(_m, _i, out):
        out = out.reshape(len(rows), ids.shape[1], -1).clone()
        out[:, q] = rows
        return out.reshape(-1, out.shape[-1]) if hooked.model.config.model_type == "opt" else out
    handle = mlp.register_forward_hook(splice)
    with torch.no_grad():
        logits = hooked.model(input_ids=ids.expand(len(rows), -1), use_cache=False).logits[:, q:q + horizon].double()
    handle.remove()
    return [ablation_sparsity(logits[i] - logits[0]) for i in range(1, len(rows))]


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("transcoder", [False, True], ids=["mlp_out", "transcoder"])
def test_ablation_is_spliced_at_the_saes_own_hook_point(tiny_hooked, family, transcoder):
    hooked = tiny_hooked if family == "llama" else _opt_hooked()
    layer, q, horizon = 1, 5, 3
    vocab = hooked.model.config.vocab_size
    tokens = _one_position_tokens(hooked.start_token_id, q, 10, horizon, vocab)
    torch.manual_seed(0)
    d = hooked.d_model
    sae = build_sae("topk", d, 64, k=4, **({"d_out": d} if transcoder else {}))
    at = {"hook_point": f"blocks.{layer}.hook_mlp_out"}
    if transcoder:
        at["input_hook_point"] = f"blocks.{layer}.ln2.hook_normalized"
        ids = torch.from_numpy(tokens).long()
        sample = hooked.read(ids, (at["input_hook_point"], at["hook_point"]))
        sae.calibrate_(sample[at["input_hook_point"]].reshape(-1, d), sample[at["hook_point"]].reshape(-1, d))
    want = _independent_sparsities(hooked, sae, torch.from_numpy(tokens[:1]).long(), q, horizon, layer, transcoder)
    want = [w for w in want if not math.isnan(w)]
    assert want and len(set(np.round(want, 9))) > 1  # distinct values: a wrong splice could not match them all
    for use_cache in (True, False):
        got = ablation_sparsities(hooked, sae, tokens[:1], **at, row_mask=_rows(hooked, tokens[:1]), n_tokens=20,
                                  horizon=horizon, use_cache=use_cache)
        assert got["ablation_pairs"] % len(want) == 0 and got["ablation_pairs"] > 0
        assert got["ablation_sparsity"] == pytest.approx(float(np.mean(want)), rel=1e-4)
        assert got["ablation_sparsity_median"] == pytest.approx(float(np.median(want)), rel=1e-4)
    # the residual stream at the same block is another place, with other numbers
    other = ablation_sparsities(hooked, build_sae("topk", d, 64, k=4), tokens[:1],
                                hook_point=f"blocks.{layer}.hook_resid_post", row_mask=_rows(hooked, tokens[:1]),
                                n_tokens=20, horizon=horizon)
    assert other["ablation_sparsity"] != pytest.approx(float(np.mean(want)), rel=1e-3)


def test_a_single_logit_change_at_mlp_out_is_the_minimum(tiny_hooked):
    """Gao et al.'s constructed case at a non-residual hook point: with a head that reads one logit
    only, ablating a latent at the last block's hook_mlp_out moves exactly one logit of one token
    (1/(V·T)); at an earlier block's hook_mlp_out the change reaches the later tokens too."""
    hooked = tiny_hooked
    with torch.no_grad():
        head = hooked.model.lm_head.weight
        keep = head[7].clone()
        head.zero_()
        head[7] = keep
    torch.manual_seed(0)
    sae = build_sae("topk", hooked.d_model, 64, k=4)
    tokens = np.random.default_rng(0).integers(1, 200, size=(3, 16))
    last = hooked.n_layers - 1
    assert last != hooked.layer  # not the model's default hook point
    got = ablation_sparsities(hooked, sae, tokens, hook_point=f"blocks.{last}.hook_mlp_out",
                              row_mask=_rows(hooked, tokens), n_tokens=6, horizon=3)
    assert got["ablation_pairs"] > 0
    # float32 noise of ~1e-7 on the later tokens' logit is all that separates it from the minimum
    assert got["ablation_sparsity"] == pytest.approx(got["ablation_sparsity_min_possible"], rel=1e-3)
    assert got["ablation_sparsity_median"] == pytest.approx(got["ablation_sparsity_min_possible"], rel=1e-3)
    earlier = ablation_sparsities(hooked, sae, tokens, hook_point=f"blocks.{last - 2}.hook_mlp_out",
                                  row_mask=_rows(hooked, tokens), n_tokens=6, horizon=3)
    # reaching later tokens: well above the minimum (1.4x-2x by the random SAE's draw), far beyond the noise
    assert earlier["ablation_sparsity"] > 1.2 * earlier["ablation_sparsity_min_possible"]


def test_ablation_names_a_missing_hook_point(tiny_hooked):
    from sae_platform.errors import ModelError

    sae = build_sae("topk", tiny_hooked.d_model, 64, k=4)
    with pytest.raises(ModelError, match="hook_mlp_out"):
        ablation_sparsities(tiny_hooked, sae, np.ones((1, 8), dtype=np.int64), hook_point="blocks.1.mlp_out",
                            row_mask=np.ones((1, 8), dtype=bool), n_tokens=4)
