"""Evaluation: streaming reconstruction metrics against brute-force numpy, the FVU anchors
(perfect reconstruction 0, predicting the mean 1), the downstream-CE splice (identity splice
leaves CE unchanged, zero ablation changes it, only training-row positions are touched, the
hook is removed, autocast does not leak into the SAE), and the PNG figures."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from sae_platform.errors import PlatformError
from sae_platform.evaluate import _replacer, downstream_ce, reconstruction_metrics
from sae_platform.model import find_decoder_layers
from sae_platform.plots import density_histogram_png, training_curves_png
from sae_platform.sae import build_sae
from sae_platform.training_rows import RowRule

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def identity_sae(d: int):
    """A real ReLU SAE that reconstructs exactly: latents +e_i and -e_i, so
    relu(x) - relu(-x) = x with only exact float operations (products by 0/1, sums with 0)."""
    sae = build_sae("relu", d, 2 * d)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_enc.zero_()
        sae.b_pre.zero_()
        sae.input_scale.fill_(1.0)
    return sae


def heldout(seed=0, d=16, sizes=(50, 1, 33, 64)):
    rng = np.random.default_rng(seed)
    offset = rng.normal(size=d) * 3  # a mean far from 0: FVU must use the dataset mean
    return [(rng.normal(size=(n, d)) * 2 + offset).astype(np.float16) for n in sizes]


# --- reconstruction metrics ------------------------------------------------------------------

def test_reconstruction_metrics_match_bruteforce():
    torch.manual_seed(0)
    batches = heldout()
    sae = build_sae("topk", 16, 64, k=4)
    sae.calibrate_(torch.from_numpy(np.concatenate(batches).astype(np.float32)))
    with torch.no_grad():
        sae.b_enc[:10] = -1e4  # ten latents that can never win a TopK slot
    inputs = [batches[0], torch.from_numpy(batches[1]), torch.from_numpy(batches[2]).float(), batches[3]]
    got = reconstruction_metrics(sae, inputs)

    x = np.concatenate(batches).astype(np.float64)
    with torch.no_grad():
        z = sae.encode_dense(torch.from_numpy(x).float()).double().numpy()
    s = float(sae.input_scale)
    recon = (z @ sae.W_dec.detach().double().numpy() + sae.b_pre.detach().double().numpy()) / s
    err = ((recon - x) ** 2).sum(1)
    bounds = np.cumsum([0, *(len(b) for b in batches)])
    nmse = [err[a:b].sum() / ((x[a:b] - x[a:b].mean(0)) ** 2).sum()
            for a, b in zip(bounds[:-1], bounds[1:]) if b - a > 1]
    density = (z > 0).mean(0)
    assert got["n_tokens"] == len(x) == 148
    assert got["fvu"] == pytest.approx(err.sum() / ((x - x.mean(0)) ** 2).sum(), rel=1e-5)
    assert got["nmse"] == pytest.approx(np.mean(nmse), rel=1e-5)
    assert got["n_batches_nmse"] == 3  # the one-row batch has no spread
    assert got["mse"] == pytest.approx(err.sum() / x.size, rel=1e-5)
    assert got["l0"] == pytest.approx((z > 0).sum(1).mean()) and got["l0"] <= 4
    np.testing.assert_allclose(got["density"], density)
    assert got["dead_fraction"] == pytest.approx((density == 0).mean()) and got["dead_fraction"] >= 10 / 64
    assert got["n_dead"] == int((density == 0).sum())
    for key in ("fvu", "nmse", "mse", "l0", "dead_fraction"):
        assert type(got[key]) is float


def test_fvu_anchors_perfect_reconstruction_and_mean_prediction():
    batches = heldout(seed=1)
    perfect = reconstruction_metrics(identity_sae(16), batches)
    assert perfect["fvu"] == 0.0 and perfect["nmse"] == 0.0 and perfect["mse"] == 0.0

    x = np.concatenate(batches).astype(np.float64)
    mean_only = build_sae("relu", 16, 8)
    with torch.no_grad():
        mean_only.b_enc.fill_(-1e6)  # nothing ever fires: the reconstruction is b_pre / s
        mean_only.input_scale.fill_(0.5)
        mean_only.b_pre.copy_(torch.from_numpy(x.mean(0) * 0.5).float())
    got = reconstruction_metrics(mean_only, batches)
    assert got["fvu"] == pytest.approx(1.0, abs=1e-5)
    assert got["nmse"] > 1.0  # each batch's own mean beats the dataset mean
    assert got["l0"] == 0.0 and got["dead_fraction"] == 1.0 and not got["density"].any()


def test_reconstruction_metrics_errors():
    sae = build_sae("topk", 16, 64, k=4)
    with pytest.raises(PlatformError, match="no held-out activations"):
        reconstruction_metrics(sae, [np.zeros((0, 16), np.float32)])
    with pytest.raises(PlatformError, match="width 8"):
        reconstruction_metrics(sae, [np.zeros((4, 8), np.float32)])


# --- downstream CE -----------------------------------------------------------------------------

def contexts(hooked, n_ctx=6, ctx_len=12, seed=0):
    rng = np.random.default_rng(seed)
    vocab = hooked.model.config.vocab_size
    start = hooked.start_token_id
    tokens = rng.integers(0, vocab, size=(n_ctx, ctx_len))
    tokens[tokens == start] = (start + 1) % vocab
    tokens[:, 0] = start
    tokens[1, 5] = start  # a packed-document separator mid-context
    tokens[2, 0] = (start + 2) % vocab  # a context that starts mid-document: position 0 is still excluded
    return tokens.astype(np.int32)


def rule(hooked, factor=10.0):
    """The sink rule as caching applies it, with median groups of 3 contexts (these tests' batches)."""
    return RowRule(hooked.start_token_id, factor, 3)


class Capture:
    """The residual stream as the next layer sees it, i.e. after any splice."""

    def __init__(self, hooked):
        self.seen = []
        self.handle = find_decoder_layers(hooked.model)[hooked.layer + 1].register_forward_pre_hook(
            self._grab, with_kwargs=True)

    def _grab(self, _module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.seen.append(hidden.detach().clone())

    def close(self):
        self.handle.remove()


def expected_mask(hidden, tokens, start, factor):
    mask = tokens != start
    mask[:, 0] = False
    norms = hidden[mask].norm(dim=-1)
    keep = norms <= factor * norms.median()
    out = mask.clone()
    out[mask] = keep
    return out


def test_identity_splice_keeps_ce_and_zero_ablation_changes_it(tiny_hooked):
    tokens = contexts(tiny_hooked)
    layer = find_decoder_layers(tiny_hooked.model)[tiny_hooked.layer]
    hooks_before = len(layer._forward_hooks)
    got = downstream_ce(tiny_hooked, identity_sae(tiny_hooked.d_model), tokens, batch_size=3, rule=rule(tiny_hooked))
    assert len(layer._forward_hooks) == hooks_before  # the splice hook is gone
    assert got["ce_sae"] == got["ce_clean"]  # bit-identical: the splice itself changes nothing
    assert got["ce_zero"] != got["ce_clean"]
    assert got["loss_recovered"] == 1.0
    assert got["n_tokens"] == 6 * 11 and got["n_contexts"] == 6
    assert got["n_spliced"] == 6 * 11 - 1  # all but position 0 and the mid-context start token
    with torch.no_grad():  # CE is the model's own causal-LM loss (equal-sized batches: mean of means)
        losses = [tiny_hooked.model(input_ids=ids, labels=ids).loss
                  for ids in torch.from_numpy(tokens).long().split(3)]
    assert got["ce_clean"] == pytest.approx(float(sum(losses)) / len(losses), rel=1e-5)


def test_kl_score_identity_splice_is_zero_kl_and_batching_does_not_change_it(tiny_hooked):
    """SAEBench's KL figures: an exact splice has KL 0 and score 1; zero ablation has KL > 0; a median
    group run in several forward batches (its clean pass recomputed per batch) gives the same KL as one."""
    tokens = contexts(tiny_hooked)
    exact = downstream_ce(tiny_hooked, identity_sae(tiny_hooked.d_model), tokens, batch_size=3, rule=rule(tiny_hooked))
    assert exact["kl_div_with_sae"] == 0.0 and exact["kl_div_score"] == 1.0
    assert exact["kl_div_with_ablation"] > 0
    torch.manual_seed(0)
    sae = build_sae("topk", tiny_hooked.d_model, 64, k=4)
    one = downstream_ce(tiny_hooked, sae, tokens, batch_size=3, rule=rule(tiny_hooked))
    split = downstream_ce(tiny_hooked, sae, tokens, batch_size=2, rule=rule(tiny_hooked))
    assert 0 < one["kl_div_with_sae"] and one["kl_div_score"] < 1
    for key in ("kl_div_with_sae", "kl_div_with_ablation", "kl_div_score", "ce_sae"):
        assert split[key] == pytest.approx(one[key], rel=1e-5), key
    assert one["kl_div_score"] == pytest.approx(
        (one["kl_div_with_ablation"] - one["kl_div_with_sae"]) / one["kl_div_with_ablation"])


def test_splice_touches_only_training_rows(tiny_hooked):
    tokens = contexts(tiny_hooked, seed=1)
    torch.manual_seed(0)
    sae = build_sae("topk", tiny_hooked.d_model, 64, k=4)
    sae.calibrate_(tiny_hooked.residual(torch.from_numpy(tokens[:3]).long())[:, 1:].reshape(-1, tiny_hooked.d_model))
    factor, start = 1.2, tiny_hooked.start_token_id  # a low factor so that some rows count as sinks
    capture = Capture(tiny_hooked)
    try:
        got = downstream_ce(tiny_hooked, sae, tokens, batch_size=3, rule=rule(tiny_hooked, factor))
    finally:
        capture.close()
    assert len(capture.seen) == 2 * 3  # two batches x (clean, sae, zero)
    n_spliced = 0
    for b, first in enumerate(range(0, len(tokens), 3)):
        clean, spliced, zeroed = capture.seen[3 * b:3 * b + 3]
        ids = torch.from_numpy(tokens[first:first + 3]).long()
        mask = expected_mask(clean, ids, start, factor)
        candidates = (ids != start).sum() - (ids[:, 0] != start).sum()
        assert 0 < int(mask.sum()) < int(candidates)  # some rows excluded as sinks
        assert not mask[:, 0].any() and not mask[ids == start].any()
        untouched = ~mask
        assert torch.equal(spliced[untouched], clean[untouched])
        assert torch.equal(zeroed[untouched], clean[untouched])
        assert bool((zeroed[mask] == 0).all())
        with torch.no_grad():
            recon = sae.decode(sae.encode(clean[mask]))
        torch.testing.assert_close(spliced[mask], recon)
        assert not torch.allclose(spliced[mask], clean[mask])
        n_spliced += int(mask.sum())
    assert got["n_spliced"] == n_spliced
    assert got["ce_sae"] != got["ce_clean"] and got["loss_recovered"] is not None


def test_sae_runs_outside_the_models_autocast(tiny_hooked):
    """Under bf16 autocast the identity SAE must still reconstruct exactly (it would not if its
    matmuls ran in bf16)."""
    hooked = dataclasses.replace(tiny_hooked, autocast=torch.bfloat16)
    got = downstream_ce(hooked, identity_sae(hooked.d_model), contexts(hooked), batch_size=3, rule=rule(hooked))
    assert got["ce_sae"] == got["ce_clean"] and got["ce_zero"] != got["ce_clean"]


def test_replacer_zeroes_or_reconstructs_only_masked_rows(tiny_hooked):
    hidden = torch.randn(2, 5, tiny_hooked.d_model)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 2] = mask[1, 4] = True
    state = {"mode": "zero", "mask": mask}
    replace = _replacer(state, identity_sae(tiny_hooked.d_model))
    out = replace(hidden, None)
    assert bool((out[mask] == 0).all()) and torch.equal(out[~mask], hidden[~mask])
    state["mode"] = "sae"
    assert torch.equal(replace(hidden, None), hidden)  # identity SAE
    source = torch.randn(2, 5, tiny_hooked.d_model)  # a transcoder reconstructs from its input
    out = replace(hidden, source)
    assert torch.equal(out[mask], source[mask]) and torch.equal(out[~mask], hidden[~mask])


@pytest.mark.parametrize("site", ["hook_resid_pre", "hook_attn_out", "hook_resid_mid", "ln2.hook_normalized",
                                  "hook_mlp_out", "hook_resid_post"])
def test_perfect_reconstruction_recovers_all_the_loss_at_every_hook_point(tiny_hooked, site):
    """The splice lands at the SAE's own hook point: an exact reconstruction there recovers loss 1,
    and zero-ablating that point (not the block output) is what the 0 of the scale means."""
    tokens = contexts(tiny_hooked)
    name = f"blocks.{tiny_hooked.layer}.{site}"
    got = downstream_ce(tiny_hooked, identity_sae(tiny_hooked.d_model), tokens, batch_size=3, rule=rule(tiny_hooked),
                        hook_point=name)
    assert got["ce_zero"] != pytest.approx(got["ce_clean"], abs=1e-5)  # the random MLP adds little
    assert got["loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    other = downstream_ce(tiny_hooked, identity_sae(tiny_hooked.d_model), tokens, batch_size=3, rule=rule(tiny_hooked),
                          hook_point=f"blocks.{tiny_hooked.layer}.hook_resid_post")
    # a different place: zeroing it costs a different amount (zeroing resid_mid zeroes resid_post in
    # Llama: the MLP of 0 is 0 without biases)
    if site not in ("hook_resid_post", "hook_resid_mid"):
        assert got["ce_zero"] != pytest.approx(other["ce_zero"], rel=1e-4)


def test_a_perfect_transcoder_in_place_of_the_mlp_recovers_all_the_loss(tiny_hooked):
    """A transcoder reads ln2.hook_normalized and replaces hook_mlp_out; one that reproduces the
    MLP exactly (here: the MLP itself) gives loss recovered 1."""
    layer = tiny_hooked.layer
    block = find_decoder_layers(tiny_hooked.model)[layer]
    mlp = copy.deepcopy(block.mlp)  # a copy: the hook is on the original
    gain = block.post_attention_layernorm.weight.detach()  # ln2.hook_normalized is before the gain

    class MLPAsTranscoder:
        d_model = tiny_hooked.d_model
        W_dec = torch.zeros(1)

        def encode(self, x):
            return x

        def decode(self, codes, x=None):  # the codes are the input itself
            return mlp(codes * gain)

    got = downstream_ce(tiny_hooked, MLPAsTranscoder(), contexts(tiny_hooked), batch_size=3, rule=rule(tiny_hooked),
                        hook_point=f"blocks.{layer}.hook_mlp_out",
                        input_hook_point=f"blocks.{layer}.ln2.hook_normalized")
    assert got["loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert got["ce_zero"] != pytest.approx(got["ce_clean"], abs=1e-5)


def test_downstream_ce_errors(tiny_hooked):
    sae = identity_sae(tiny_hooked.d_model)
    with pytest.raises(PlatformError, match="n_contexts, ctx_len"):
        downstream_ce(tiny_hooked, sae, np.arange(10), rule=rule(tiny_hooked))
    with pytest.raises(PlatformError, match="d_model 4"):
        downstream_ce(tiny_hooked, identity_sae(4), contexts(tiny_hooked), rule=rule(tiny_hooked))


# --- figures -------------------------------------------------------------------------------------

def test_training_curves_png():
    history = [{"tokens": 4096 * i, "loss": 1.0 / i, "nmse": 0.9 / i ** 0.5, "l0": 32.0,
                "dead_fraction": max(0.0, 0.5 - 0.05 * i)} for i in range(1, 20)]
    png = training_curves_png(history)
    assert png.startswith(PNG_MAGIC) and len(png) > 20_000
    partial = training_curves_png([{"tokens": 1, "loss": 2.0}, {"tokens": 2, "loss": float("nan")}, {}])
    assert partial.startswith(PNG_MAGIC)
    assert training_curves_png([]).startswith(PNG_MAGIC)


def test_density_histogram_png():
    rng = np.random.default_rng(0)
    density = 10 ** rng.uniform(-5, -1, size=500)
    density[:37] = 0
    png = density_histogram_png(density, n_tokens=100_000)
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    assert density_histogram_png(np.zeros(10)).startswith(PNG_MAGIC)
