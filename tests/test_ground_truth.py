"""The synthetic data source (sae_platform/synthetic.py) and the figures against its truth
(sae_platform/ground_truth.py), on cases whose answers are known."""

import math

import numpy as np
import pytest
import torch

from sae_platform import ground_truth, synthetic
from sae_platform.activations import CacheSettings, open_partition
from sae_platform.errors import ModelError
from sae_platform.sae import build_sae
from sae_platform.settings import SettingsError

SMALL = synthetic.SyntheticSettings(n_features=512, d_model=128, n_parents=8, children_per_parent=3, mean_l0=8,
                                    contexts_per_partition=4, n_partitions=2, heldout_rows=2048)


def _draw(settings=SMALL, rows=4096):
    truth = synthetic.make_truth(settings)
    return truth, synthetic.sample(truth, synthetic.heldout_stream(settings), rows)


def test_the_generator_fires_as_declared():
    """Marginal rates match the Zipfian probabilities, the expected L0 is mean_l0, a child fires
    only with its parent and at most one child of a parent fires, magnitudes are |N(1, σ²)|."""
    truth, draw = _draw(rows=20000)
    on = draw.codes > 0
    assert abs(on.sum(1).mean() - SMALL.mean_l0) < 0.2
    assert np.abs(on.mean(0) - truth.firing_prob).max() < 0.02
    assert np.all(np.diff(truth.firing_prob[truth.parent < 0]) <= 1e-12)  # Zipf: rank order
    for parent, kids in truth.children_of().items():
        assert not (on[:, kids].any(1) & ~on[:, parent]).any()
        assert on[:, kids].sum(1).max() <= 1
    np.testing.assert_allclose(np.abs(draw.codes[on]).mean(), 1.0 + 0.0, atol=0.1)  # E|N(1, .25)| ≈ 1.02
    np.testing.assert_allclose(draw.acts, draw.codes @ truth.directions, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(truth.directions, axis=1), 1, atol=1e-6)


def test_the_copula_correlates_features_that_share_loadings_and_keeps_their_rates():
    strong = synthetic.SyntheticSettings(**{**SMALL.__dict__, "correlation_rank": 1, "correlation_strength": 0.9})
    truth, draw = _draw(strong, rows=20000)
    on = (draw.codes > 0).astype(float)
    roots = np.flatnonzero((truth.parent < 0) & (truth.firing_prob > 0.02))[:40]
    same_sign = np.sign(truth.loadings[roots, 0])
    corr = np.corrcoef(on[:, roots].T)
    agree = corr[np.equal.outer(same_sign, same_sign) & ~np.eye(len(roots), dtype=bool)].mean()
    assert agree > 0.1  # features loading on the shared factor alike fire together
    assert np.abs(on.mean(0) - truth.firing_prob).max() < 0.02
    _, independent = _draw(synthetic.SyntheticSettings(**{**SMALL.__dict__, "correlation_rank": 0}), rows=20000)
    off = (independent.codes > 0).astype(float)[:, roots]
    assert np.abs(np.corrcoef(off.T)[~np.eye(len(roots), dtype=bool)]).mean() < 0.03


def test_the_true_dictionary_scores_one_and_its_codes_f1_one():
    truth, draw = _draw()
    figures = ground_truth.score_codes(truth.directions, truth, [(draw.codes, draw.codes)])
    assert figures["gt_mcc"] == pytest.approx(1.0)
    assert figures["gt_uniqueness"] == pytest.approx(1.0)
    assert figures["gt_f1"] == pytest.approx(1.0) and figures["gt_precision"] == pytest.approx(1.0)
    assert figures["gt_shrinkage"] == pytest.approx(1.0)
    assert figures["gt_absorption"] == 0.0 and figures["gt_absorption_children"] > 0


def test_a_random_decoder_scores_below_the_bound_of_random_cosines():
    """A random unit decoder's matched |cosines| stay below √(2 ln N / d), the expected largest
    |cosine| of one random direction against N others (0.31 for N = 512 in d = 128; measured
    ≈ 0.13); the true dictionary scores 1."""
    truth, draw = _draw()
    decoder = np.random.default_rng(1).standard_normal((SMALL.n_features, SMALL.d_model))
    figures = ground_truth.score_codes(decoder, truth, [(np.abs(draw.codes[:, ::-1]), draw.codes)])
    bound = math.sqrt(2 * math.log(SMALL.n_features) / SMALL.d_model)
    assert figures["gt_mcc"] < bound
    assert figures["gt_f1"] < 0.1


def test_every_score_carries_the_chance_mcc_of_a_random_decoder_of_its_width():
    """An MCC is only read against what a decoder that learnt nothing scores at the same width (the
    4,096-feature sweep once reported MCC 0.236 that was exactly chance): every score carries
    gt_mcc_chance, the same for every decoder of one width, below the random-cosine bound and far
    below the true dictionary's 1; a wider random decoder has more chances to match, so scores higher."""
    truth, draw = _draw()
    exact = ground_truth.score_codes(truth.directions, truth, [(draw.codes, draw.codes)])
    noise = np.random.default_rng(3).standard_normal(truth.directions.shape)
    other = ground_truth.score_codes(noise, truth, [(draw.codes, draw.codes)])
    bound = math.sqrt(2 * math.log(SMALL.n_features) / SMALL.d_model)
    assert exact["gt_mcc_chance"] == other["gt_mcc_chance"] < bound
    assert exact["gt_mcc_chance"] == pytest.approx(other["gt_mcc"], abs=0.02)  # both random decoders
    assert exact["gt_mcc"] - exact["gt_mcc_chance"] > 0.7
    wide = ground_truth.chance_mcc(4 * SMALL.n_features, truth)
    assert wide > exact["gt_mcc_chance"]


def test_planted_absorption_is_detected_and_shrinkage_measured():
    """Half of the children are swallowed by their parents' latents (the child's latent is silent
    whenever the child fires, the parent's fires): absorption ½, their recall 0; latents that
    report half the true magnitude have shrinkage ½."""
    truth, draw = _draw()
    children = truth.children_of()
    swallowed = np.concatenate([kids[: len(kids) // 2 + 1] for kids in children.values()])
    n_children = sum(len(kids) for kids in children.values())
    acts = 0.5 * draw.codes
    acts[:, swallowed] = 0.0  # the parents' latents still fire: they fire with every child
    figures = ground_truth.score_codes(truth.directions, truth, [(acts, draw.codes)])
    fired = [k for kids in children.values() for k in kids if (draw.codes[:, k] > 0).any()]
    expected = np.isin(fired, swallowed).mean()
    assert figures["gt_absorption"] == pytest.approx(expected)
    assert len(swallowed) / n_children > 0.5
    assert figures["gt_shrinkage"] == pytest.approx(0.5)


def test_an_sae_with_the_true_decoder_scores_mcc_one_through_its_own_encoder():
    truth, _ = _draw()
    sae = build_sae("topk", SMALL.d_model, SMALL.n_features, k=8)
    with torch.no_grad():
        sae.W_dec.copy_(torch.from_numpy(truth.directions))
    figures = ground_truth.score_sae(sae, truth, synthetic.heldout_draws(truth))
    assert figures["gt_mcc"] == pytest.approx(1.0, abs=1e-6)
    assert figures["gt_rows"] == SMALL.heldout_rows


def test_a_synthetic_partition_is_an_ordinary_partition_with_its_truth_committed(store):
    cache = CacheSettings(ctx_len=16, batch_size=3)
    summary = synthetic.write_partition(store, "synthetic-001", SMALL, cache)
    part = open_partition(store, "synthetic-001")
    attrs = part.attrs
    assert attrs["synthetic"] == {"truth_id": SMALL.truth_id(), "partition_index": 1}
    assert attrs["d_model"] == SMALL.d_model and attrs["hook_name"] == synthetic.HOOK_NAME
    assert part.n_rows == summary["n_rows"] == SMALL.contexts_per_partition * (cache.ctx_len - 1)
    truth = synthetic.make_truth(SMALL)
    regenerated = synthetic.sample(truth, synthetic.partition_stream(SMALL, 1),
                                   SMALL.contexts_per_partition * cache.ctx_len)
    rows = regenerated.acts.reshape(SMALL.contexts_per_partition, cache.ctx_len, -1)[:, 1:].reshape(-1, SMALL.d_model)
    np.testing.assert_allclose(part.acts[:], rows, atol=2e-3, rtol=1e-3)  # float16 storage
    read = synthetic.read_truth(store, SMALL.truth_id())
    for name in synthetic.Truth.ARRAYS:
        np.testing.assert_array_equal(getattr(read, name), getattr(truth, name))
    other = synthetic.SyntheticSettings(**{**SMALL.__dict__, "seed": 5})
    with pytest.raises(ModelError, match="synthetic:"):
        synthetic.write_partition(store, "synthetic-000", other, cache)


def test_bad_synthetic_settings_name_the_setting_and_the_fix():
    with pytest.raises(SettingsError, match="children"):
        synthetic.SyntheticSettings(n_features=10, n_parents=4, children_per_parent=4)
    with pytest.raises(SettingsError, match="mean_l0"):
        synthetic.make_truth(synthetic.SyntheticSettings(n_features=8, n_parents=0, mean_l0=9))
    with pytest.raises(SettingsError, match="synthetic partition key"):
        synthetic.partition_index("batch-7")
