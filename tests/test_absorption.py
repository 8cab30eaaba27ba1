"""Feature absorption (SAEBench 0.6.0's algorithm): the data, the probes, the formula on hand-built
tensors whose answer is known, the refusals, and SAEBench's own schema for the result file."""

import json
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_platform import absorption_probes as ap
from sae_platform.absorption import (
    AbsorptionSettings,
    absorption_of_word,
    check_absorption_hook,
    evaluate_absorption,
    saebench_absorption_json,
    word_activations,
)
from sae_platform.errors import PlatformError
from sae_platform.sae import build_sae

SAEBENCH_PYTHON = Path("/work/venvs/sae-bench/bin/python")
needs_saebench = pytest.mark.skipif(not SAEBENCH_PYTHON.exists(),
                                    reason="sae-bench 0.6.0 is not installed in /work/venvs/sae-bench (its own "
                                           "venv: python -m venv /work/venvs/sae-bench && "
                                           "/work/venvs/sae-bench/bin/pip install sae-bench==0.6.0)")
FAST = {"k_sparse_probe_num_epochs": 5}


def tiny_position(hooked) -> int:
    """Where the word sits in the tiny tokenizer's prompts (its BPE splits the template finely)."""
    with pytest.raises(PlatformError) as caught:
        word_activations(hooked, [ap.icl_prompt("cat", ["dog", "bird"], "{word} has the first letter:",
                                                random.Random(0))], AbsorptionSettings(prompt_token_pos=-1),
                         hooked.hook_name)
    return int(str(caught.value).split("set resources.absorption.config.prompt_token_pos to ")[1].split()[0])


# -- data ------------------------------------------------------------------------------------------

def test_vocabulary_is_letters_with_one_optional_leading_space(tiny_hooked):
    words = ap.alpha_vocabulary(tiny_hooked.tokenizer)
    assert words
    for word in words:
        bare = word[1:] if word.startswith(" ") else word
        assert bare and bare.isascii() and bare.isalpha(), word


def test_prompts_follow_saebench_template_and_split():
    vocab = [f"{c}{c}x" for c in ap.LETTERS] + [f" {c}y" for c in ap.LETTERS]
    train, test = ap.split_prompts(vocab, "{word} has the first letter:", random.Random(1))
    assert (len(train), len(test)) == (41, 11)  # int(52 * 0.8)
    assert not {p.word for p in train} & {p.word for p in test}
    prompt = train[0]
    lines = prompt.base.split("\n")
    assert lines[0] == "" and len(lines) == 12  # separator first, 10 examples, the word
    assert lines[-1] == f"{prompt.word} has the first letter:"
    train_words = {p.word for p in train}
    for line in lines[1:-1]:
        example, answer = line.split(" has the first letter:")
        assert example in train_words and example != prompt.word
        assert answer == " " + example.strip()[0].upper()
    assert prompt.letter == ap.LETTERS.index(prompt.word.strip()[0].lower())


def test_word_subsample_is_seeded():
    vocab = [f"w{i}" for i in range(200)]
    first = ap.split_prompts(vocab, "{word}:", random.Random(3), max_words=50)
    again = ap.split_prompts(vocab, "{word}:", random.Random(3), max_words=50)
    other = ap.split_prompts(vocab, "{word}:", random.Random(4), max_words=50)
    assert (len(first[0]), len(first[1])) == (40, 10)
    assert first == again and first != other


# -- probes ----------------------------------------------------------------------------------------

def planted_letters(n_per_letter=30, d=40, noise=0.05, seed=0):
    """Activations where letter i is direction i (plus noise): any linear probe should separate them."""
    gen = torch.Generator().manual_seed(seed)
    letters = torch.arange(26).repeat_interleave(n_per_letter)
    x = torch.nn.functional.one_hot(letters, d).float() * 3 + noise * torch.randn(len(letters), d, generator=gen)
    return x, letters


def test_ground_truth_probe_separates_planted_letters():
    x, letters = planted_letters()
    probe = ap.train_ground_truth_probe(x, letters, seed=0)
    scores = probe(x).detach().numpy()
    truth = letters.numpy()
    assert all(ap.f1(truth == i, scores[:, i] > 0) == 1.0 for i in range(26))


def test_pos_weight_of_a_missing_letter_is_finite():
    y = torch.nn.functional.one_hot(torch.tensor([0, 0, 1]), num_classes=3).float()
    assert torch.equal(ap.pos_weights(y), torch.tensor([0.5, 2.0, 1.0]))


def test_k_sparse_probe_picks_the_planted_latent():
    x, letters = planted_letters(d=64)
    probes = ap.train_k_sparse_probes(lambda rows: rows, x, letters, 64, [1, 2], l1_decay=0.01, batch_size=64,
                                      num_epochs=50, seed=0, precalc=True)
    assert [probes[1][i].feature_ids.tolist() for i in range(26)] == [[i] for i in range(26)]
    assert probes[2][5].feature_ids[0] == 5


@needs_saebench
def test_logistic_regression_reaches_scikit_learns_optimum(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(80, 3, generator=gen)
    y = ((x[:, 0] + 0.5 * torch.randn(80, generator=gen)) > 0.8).long()  # unbalanced classes
    weight, bias = ap.logistic_regression(x, y)
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "y.npy", y.numpy())
    script = ("import numpy as np, json; from sklearn.linear_model import LogisticRegression as L; "
              f"m = L(max_iter=500, class_weight='balanced').fit(np.load('{tmp_path}/x.npy'), "
              f"np.load('{tmp_path}/y.npy')); "
              "print(json.dumps([m.coef_[0].tolist(), float(m.intercept_[0])]))")
    coef, intercept = json.loads(subprocess.run([str(SAEBENCH_PYTHON), "-c", script], check=True,
                                                capture_output=True, text=True).stdout)
    assert weight.tolist() == pytest.approx(coef, abs=1e-3) and bias == pytest.approx(intercept, abs=1e-3)


def test_split_features_follow_the_f1_jump_rule():
    feats = {k: list(range(k)) for k in range(1, 5)}
    assert ap.split_features({1: 0.5, 2: 0.54, 3: 0.56, 4: 0.9}, feats, 0.03) == [0, 1]  # stops at the first small rise
    assert ap.split_features({1: 0.9, 2: 0.91, 3: 0.95, 4: 0.99}, feats, 0.03) == [0]


# -- the absorption formula on hand-built tensors --------------------------------------------------

def planted(main_act: float, absorber_act: float, absorber_cos: float = 0.8):
    """d_model 4, the probe along e0; latent 0 the letter's main latent (decoder e0), latent 1 a
    token latent whose decoder has ``absorber_cos`` with the probe, latent 2 unrelated (e3)."""
    direction = torch.tensor([1.0, 0, 0, 0])
    decoder = torch.tensor([[1.0, 0, 0, 0], [absorber_cos, (1 - absorber_cos ** 2) ** 0.5, 0, 0], [0, 0, 0, 1.0]])
    latents = torch.tensor([main_act, absorber_act, 1.0])
    activation = latents @ decoder
    cosines = decoder @ direction
    return activation, latents, direction, cosines


def test_planted_absorber_is_full_absorption():
    fraction, full = absorption_of_word(*planted(main_act=0.0, absorber_act=2.0), main_ids=[0])
    assert (fraction, full) == (1.0, True)


def test_main_latent_firing_is_no_absorption():
    fraction, full = absorption_of_word(*planted(main_act=2.0, absorber_act=0.0), main_ids=[0])
    assert (fraction, full) == (0.0, False)


def test_partial_absorption_fraction():
    # p = 1 + 0.8 * 1.25 = 2, m = 1, A = 1: min(A, p - m) / (min(A, p - m) + m) = 0.5; the main latent fires
    fraction, full = absorption_of_word(*planted(main_act=1.0, absorber_act=1.25), main_ids=[0])
    assert fraction == pytest.approx(0.5) and not full


def test_weakly_aligned_absorber_counts_for_full_absorption_only():
    # cos 0.05: below the fraction's 0.1 but above full absorption's 0.025; it carries all of p
    fraction, full = absorption_of_word(*planted(main_act=0.0, absorber_act=20.0, absorber_cos=0.05), main_ids=[0])
    assert (fraction, full) == (0.0, True)


def test_small_absorber_share_is_not_absorption():
    # the absorber carries 0.3 of p (< 0.4): neither metric counts it
    activation, latents, direction, cosines = planted(main_act=0.0, absorber_act=0.375)
    activation = activation + torch.tensor([0.7, 0, 0, 0])  # probe projection from no latent
    fraction, full = absorption_of_word(activation, latents, direction, cosines, main_ids=[0])
    assert (fraction, full) == (0.0, False)


# -- refusals --------------------------------------------------------------------------------------

def test_transcoder_and_per_head_hooks_are_refused():
    sae = build_sae("topk", 8, 16, k=2)
    with pytest.raises(PlatformError, match="transcoder"):
        check_absorption_hook("blocks.1.hook_mlp_out", "blocks.1.ln2.hook_normalized", sae)
    with pytest.raises(PlatformError, match="per attention head"):
        check_absorption_hook("blocks.1.attn.hook_pattern", None, sae)
    check_absorption_hook("blocks.1.hook_mlp_out", None, sae)  # a plain SAE at any single-vector point is fine


def test_wrong_word_position_names_the_right_one(tiny_hooked):
    with pytest.raises(PlatformError, match=r"prompt_token_pos = -6 does not point at the word (.|\n)* set "
                                            r"resources.absorption.config.prompt_token_pos to -\d+"):
        evaluate_absorption(tiny_hooked, build_sae("topk", tiny_hooked.d_model, 64, k=4), tiny_hooked.hook_name,
                            AbsorptionSettings(**FAST))


@pytest.fixture(scope="module")
def tiny_results(tiny_model_dir):
    """The tiny random model: under SAEBench's bar (refused), and with the bar lowered (scored)."""
    from sae_platform.model import load_hooked_model

    hooked = load_hooked_model(str(tiny_model_dir), layer=1, device="cpu", autocast="none")
    torch.manual_seed(0)
    sae = build_sae("topk", hooked.d_model, 64, k=4)
    pos = tiny_position(hooked)
    refused = evaluate_absorption(hooked, sae, hooked.hook_name, AbsorptionSettings(prompt_token_pos=pos, **FAST),
                                  log=lambda _: None)
    scored = evaluate_absorption(hooked, sae, hooked.hook_name,
                                 AbsorptionSettings(prompt_token_pos=pos, min_GT_probe_f1=0.0, min_feats_for_eval=1,
                                                    **FAST), log=lambda _: None)
    return refused, scored


def test_fewer_than_20_letters_is_a_plain_refusal_with_no_score(tiny_results):
    refused, _ = tiny_results
    assert refused["scored"] is False and refused["metrics"] is None and refused["letters"] == []
    assert len(refused["letters_counted"]) < 20
    assert f"only {len(refused['letters_counted'])} of 26 letters" in refused["refusal"]
    assert "no score" in refused["refusal"]
    with pytest.raises(PlatformError, match="no SAEBench absorption file"):
        saebench_absorption_json(refused, eval_id="x", model_name="tiny", llm_dtype="float32", sae_name="s",
                                 sae_cfg={}, release="r", created_ms=0)


def test_scored_result_holds_saebench_figures(tiny_results):
    _, scored = tiny_results
    assert scored["scored"] and scored["refusal"] is None and scored["letters"]
    for letter in scored["letters"]:
        assert 0 <= letter["mean_absorption_fraction"] <= 1 and 0 <= letter["full_absorption_rate"] <= 1
        assert letter["num_split_features"] == len(letter["split_features"]) >= 1
        assert letter["num_full_absorption"] <= letter["num_probe_true_positives"]
    means = [letter["mean_absorption_fraction"] for letter in scored["letters"]]
    assert scored["metrics"]["mean_absorption_fraction_score"] == pytest.approx(float(np.mean(means)))


@needs_saebench
def test_result_file_validates_against_saebench_schema(tiny_results, tmp_path):
    _, scored = tiny_results
    document = saebench_absorption_json(scored, eval_id="0f0e", model_name="tiny-llama", llm_dtype="float32",
                                        sae_name="topk-64", sae_cfg={"d_in": 32, "d_sae": 64}, release="sae_platform",
                                        created_ms=1_700_000_000_000)
    path = tmp_path / "absorption.json"
    path.write_text(json.dumps(document))
    script = ("import json, sys; from pydantic import TypeAdapter; "
              "from sae_bench.evals.absorption.eval_output import AbsorptionEvalOutput as O; "
              f"o = TypeAdapter(O).validate_python(json.load(open('{path}'))); "
              "print(json.dumps([o.eval_result_metrics.mean.mean_absorption_fraction_score, "
              "len(o.eval_result_details), o.eval_config.max_k_value]))")
    run = subprocess.run([str(SAEBENCH_PYTHON), "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    mean, n_letters, max_k = json.loads(run.stdout.strip().splitlines()[-1])
    assert mean == pytest.approx(scored["metrics"]["mean_absorption_fraction_score"])
    assert n_letters == len(scored["letters"]) and max_k == 10
