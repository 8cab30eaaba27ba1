"""Steering (``sae_platform.steering``): each method's math on tiny tensors, conditional masking at
the positions where the condition feature fires, and a planted feature on the tiny model whose
token the steered continuation produces more often than the baseline's."""

import pytest
import torch

from sae_platform.errors import PlatformError
from sae_platform.hooks import _register, decoder_blocks
from sae_platform.sae import build_sae
from sae_platform.steering import Condition, apply_steering, condition_mask, steer, steering_vectors

PROMPTS = ["To be, or not to be", "It is a truth", "All the world's a stage", "The quick brown", "a single man in"]


def test_additive_adds_strength_times_the_direction():
    h = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]])
    v = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
    out = apply_steering(h, v, [1.5, -2.0], "additive")
    assert torch.allclose(out, h + 1.5 * v[0] - 2.0 * v[1])


def test_orthogonal_replaces_the_projection_by_strength_times_itself():
    """Neuronpedia's ORTHOGONAL_DECOMP, (I - P) h + s P h with P = v v^T / |v|^2, written with the
    matrices as its OrthogonalProjector does."""
    torch.manual_seed(0)
    h, v, s = torch.randn(5, 6), torch.randn(6), 3.0
    P = torch.outer(v, v) / (v @ v)
    want = h @ (torch.eye(6) - P).T + s * (h @ P.T)
    out = apply_steering(h, v[None], [s], "orthogonal")
    assert torch.allclose(out, want, atol=1e-5)
    unit = v / v.norm()
    assert torch.allclose(out @ unit, s * (h @ unit), atol=1e-5)                       # the projection: s times
    rest = out - (out @ unit)[:, None] * unit                                            # the rest: kept
    assert torch.allclose(rest, h - (h @ unit)[:, None] * unit, atol=1e-5)


def test_cap_clips_the_coefficient_along_the_direction_and_leaves_the_rest():
    v = torch.tensor([0.0, 2.0, 0.0])               # coefficient c = h·v / |v|^2 = h[1] / 2
    h = torch.tensor([[1.0, 10.0, 3.0], [1.0, 2.0, 3.0], [1.0, -8.0, 3.0]])   # c = 5, 1, -4
    out = apply_steering(h, v[None], [3.0], "cap")
    assert torch.allclose(out, torch.tensor([[1.0, 6.0, 3.0], [1.0, 2.0, 3.0], [1.0, -8.0, 3.0]]))


def test_the_direction_is_in_raw_units_per_unit_of_activation(tiny_hooked):
    """The vector of a latent is what one unit of its activation adds to the SAE's reconstruction."""
    torch.manual_seed(0)
    sae = build_sae("topk", tiny_hooked.d_model, 16, k=2)
    sae.input_scale.fill_(4.0)
    from sae_platform.sae.base import Codes

    one = sae.decode(Codes(torch.tensor([[2.5]]), torch.tensor([[3]]))) - sae.decode(
        Codes(torch.tensor([[0.0]]), torch.tensor([[3]])))
    assert torch.allclose(2.5 * steering_vectors(sae, [3])[0], one[0], atol=1e-6)


def test_condition_mask_is_the_condition_features_activation_above_its_threshold():
    torch.manual_seed(0)
    sae = build_sae("relu", 4, 8)
    x = torch.randn(2, 5, 4)
    acts = sae.encode_dense(x.reshape(-1, 4))[:, 6].reshape(2, 5)
    threshold = float(acts.median())
    mask = condition_mask(sae, x, Condition(6, threshold))
    assert mask.shape == (2, 5) and torch.equal(mask, acts > threshold) and 0 < int(mask.sum()) < 10
    assert condition_mask(sae, x, None) is None


def _captured_next_block_input(hooked, layer: int):
    """(handle, list): what block ``layer + 1`` reads, i.e. blocks.{layer}.hook_resid_post after
    the splice, for every forward pass."""
    seen: list[torch.Tensor] = []
    handle = _register(decoder_blocks(hooked.model)[layer + 1], "in", lambda v: seen.append(v.detach().clone()))
    return handle, seen


def test_conditional_steering_changes_exactly_the_positions_where_the_condition_fires(tiny_hooked):
    """Additive steering at blocks.1.hook_resid_post under a condition: in the prompt's pass the
    steered row differs from the baseline row by s·v at the positions where the condition latent
    fires above the threshold (never the start token), and not at all elsewhere."""
    torch.manual_seed(0)
    sae = build_sae("topk", tiny_hooked.d_model, 32, k=8)
    ids = tiny_hooked.tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]
    clean = tiny_hooked.residual(torch.tensor([[tiny_hooked.start_token_id, *ids]]))[0]
    acts = sae.encode_dense(clean)                           # [positions, latents]
    cond = int(((acts[1:] > 0).float().mean(0) - 0.5).abs().argmin())  # fires on about half the positions
    threshold = 0.0
    fires = acts[:, cond] > threshold
    fires[0] = False                                         # the start token is never steered
    assert 0 < int(fires.sum()) < len(ids)
    handle, seen = _captured_next_block_input(tiny_hooked, 1)
    try:
        list(steer(tiny_hooked, sae, ids, [(5, 7.0)], "additive", 1, Condition(cond, threshold),
                   hook_point="blocks.1.hook_resid_post"))
    finally:
        handle.remove()
    prompt_pass = seen[0]                                    # [2, positions, d]: baseline, steered
    diff = prompt_pass[1] - prompt_pass[0]
    v = steering_vectors(sae, [5])[0]
    assert torch.allclose(diff[fires], (7.0 * v).expand(int(fires.sum()), -1), atol=1e-5)
    assert diff[~fires].abs().max() < 1e-6          # rounding of the batched rows only


@pytest.mark.parametrize("transcoder", [False, True], ids=["sae", "transcoder"])
def test_a_condition_that_never_holds_steers_nothing_and_one_that_always_holds_steers_all(tiny_hooked, transcoder):
    torch.manual_seed(0)
    d = tiny_hooked.d_model
    sae = build_sae("topk", d, 32, k=4, **({"d_out": d} if transcoder else {}))
    where = {"hook_point": "blocks.2.hook_mlp_out",
             "input_hook_point": "blocks.2.ln2.hook_normalized" if transcoder else None}
    ids = tiny_hooked.tokenizer(PROMPTS[1], add_special_tokens=False)["input_ids"]

    def run(condition):
        return list(steer(tiny_hooked, sae, ids, [(3, 40.0)], "additive", 8, condition, stop_at_eos=False, **where))

    never, always, plain = run(Condition(3, 1e9)), run(Condition(3, -1.0)), run(None)
    assert all(b == s for b, s in never)
    assert always == plain and any(b != s for b, s in plain)


@pytest.fixture
def planted(tiny_hooked):
    """An SAE at the last block's output whose latent 7 writes the unembedding direction of the
    token " x" (its last token): steering with it promotes that token."""
    torch.manual_seed(0)
    sae = build_sae("topk", tiny_hooked.d_model, 64, k=4)
    token = tiny_hooked.tokenizer(" fox", add_special_tokens=False)["input_ids"][-1]
    w_u = tiny_hooked.model.lm_head.weight.detach()[token]
    with torch.no_grad():
        sae.W_dec[7] = w_u / w_u.norm()
    return sae, token


def _counts(hooked, sae, token, features, method="additive"):
    baseline = steered = 0
    for prompt in PROMPTS:
        ids = hooked.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for b, s in steer(hooked, sae, ids, features, method, 12, hook_point="blocks.3.hook_resid_post"):
            baseline, steered = baseline + (b == token), steered + (s == token)
    return baseline, steered


def test_a_planted_feature_makes_its_token_appear_more_often(tiny_hooked, planted):
    """Measured on the tiny random Llama (seed 0), 5 prompts x 12 greedy tokens: the planted
    token appears 0 times unsteered and 60 times with additive strength 20; a projection cap at 0
    (the feature can only be removed) never makes it appear more often. Deterministic: the same
    call gives the same tokens."""
    sae, token = planted
    baseline, steered = _counts(tiny_hooked, sae, token, [(7, 20.0)])
    assert steered > baseline and steered >= 30, (baseline, steered)
    assert _counts(tiny_hooked, sae, token, [(7, 20.0)]) == (baseline, steered)
    capped_base, capped = _counts(tiny_hooked, sae, token, [(7, 0.0)], "cap")
    assert capped <= capped_base == baseline
    several = _counts(tiny_hooked, sae, token, [(7, 20.0), (3, 1.0)])   # several features at once
    assert several[1] > several[0]


def test_bad_requests_name_the_problem(tiny_hooked, planted):
    sae, _ = planted
    cases = [({"method": "multiply"}, "unknown steering method"), ({"features": [(64, 1.0)]}, "not a latent"),
             ({"features": [(1, float("nan"))]}, "finite number"), ({"features": []}, "1..8 features"),
             ({"max_new_tokens": 0}, "positive integer"), ({"condition": Condition(-1, 0.0)}, "condition feature")]
    for change, message in cases:
        kwargs = {"features": [(7, 1.0)], "method": "additive", "max_new_tokens": 4, **change}
        with pytest.raises(PlatformError, match=message):
            steer(tiny_hooked, sae, [5, 6], **kwargs)   # raised at the call, before any token
