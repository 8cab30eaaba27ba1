"""Feature absorption on the first-letter task, exactly as SAEBench 0.6.0 defines it
(``sae_bench/evals/absorption/``; Karvonen et al. 2025, "SAEBench"), the metric of Chanin et al.
2024, "A is for Absorption: Studying Feature Splitting and Absorption in Sparse Autoencoders"
(arXiv 2409.14507), with the absorption fraction by Till.

The steps (data and probes: ``sae_platform.absorption_probes``):

1. every alphabetic vocabulary token, shuffled (seeded), optionally cut to ``max_words`` (our
   setting, to keep it to minutes on a CPU), split 80/20 into train and test words;
2. one in-context prompt per word, ``"\\n{ex} has the first letter: E\\n...{word} has the first
   letter:"`` with 10 examples; the activation at the SAE's own hook point at the word
   (``prompt_token_pos`` = -6 from the end);
3. a 26-way ground-truth probe on the train words; its test F1 per letter (logit > 0). A letter
   counts when F1 > ``min_GT_probe_f1``; with fewer than ``min_feats_for_eval`` such letters the
   result says so and holds **no score** (SAEBench stops there too);
4. k-sparse probes on the SAE latents (k = 1..``max_k_value``); a letter's *split features* are
   those of the largest k reached while the test F1 rises by more than ``f1_jump_threshold``;
5. per letter, each test word the ground-truth probe gets right is prompted again (fresh examples
   from the whole vocabulary) and scored (:func:`absorption_of_word`):

   - absorption fraction: with p the activation's projection on the unit probe direction, m the
     summed probe projections (activation x cosine to the probe) of the split features, and A the
     summed projections of the top 3 other latents with cosine >= 0.1 and a positive projection:
     0 when m >= p or A / p < 0.4; 1 when m <= 0; else min(A, p - m) / (min(A, p - m) + m);
   - full absorption: every split feature's activation < 1e-8, the top-projecting latent's cosine
     >= 0.025, p >= 0, and that latent's projection >= 0.4 p;

6. per letter: mean absorption fraction and full-absorption rate over those words, and the number
   of split features; the means and sample standard deviations over the counted letters.

Where this differs from running SAEBench, and why:

* "activation" is a latent's contribution to the reconstruction in raw units along its decoder
  direction, ``z_i * ||W_dec_i|| / input_scale``. SAEBench multiplies ``sae.encode`` output by the
  cosine, which is that quantity for the unit-norm-decoder SAEs it targets; ours fold an input
  scale into the codes, so the literal product would compare normalised codes with a raw-unit
  probe projection.
* prompts are tokenized one by one and read at the position counted from each prompt's own end
  (SAEBench batches right-padded prompts, so a shorter prompt in a batch would be read in its
  padding); the start token is the platform's (SAEBench lets TransformerLens prepend BOS).
* the vocabulary is in token-id order and randomness is seeded (:mod:`absorption_probes`).

Hook points: SAEBench reads ``blocks.L.hook_resid_post``. Here the SAE's own hook point
(``activations.activation_hook_entry``, as ``evaluate`` finds it) is read, which is meaningful for
every single-vector hook point (residual stream, attn/mlp out, the normalized MLP input): the
probe, the encoder input and the decoder directions are then one space. Refused, with the reason:
transcoders (they read one activation and write another, so a probe on what they read cannot be
compared with their decoder directions) and per-head attention hooks (patterns, scores, q/k/v/z:
not one d_model vector at the word's position).
"""

import json
import random
import statistics
import time
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from sae_platform import absorption_probes as ap
from sae_platform.activations import activation_attrs, sae_hook_entry
from sae_platform.catalog import (
    ABSORPTION_REPORT,
    SAEBENCH_ABSORPTION,
    absorption_name,
    checkpoint_pin,
    checkpoint_version,
    export_name,
    trained_on,
)
from sae_platform.errors import PlatformError
from sae_platform.export import CFG_FILENAME
from sae_platform.settings import setting, validate
from sae_platform.synthetic import synthetic_provenance

EPS = 1e-8                                       # SAEBench feature_absorption_calculator.EPS
FULL_ABSORPTION_PROBE_COS_THRESHOLD = 0.025      # SAEBench feature_absorption.py constants
ABSORPTION_FRACTION_PROBE_COS_THRESHOLD = 0.1
ABSORPTION_PROBE_PROJECTION_PROPORTION_THRESHOLD = 0.4
ABSORPTION_FRACTION_MAX_ABSORBING_LATENTS = 3
TOP_PROJECTION_FEATURES = 10                     # FeatureAbsorptionCalculator.topk_feats
PER_HEAD_HOOKS = ("hook_pattern", "hook_attn_scores", "hook_q", "hook_k", "hook_v", "hook_z", "hook_result")


class AbsorptionRefused(PlatformError):
    """Absorption cannot be measured for this SAE or tokenizer (a refused hook point, or a prompt
    position that misses the word): committed as a refusal by :func:`absorb_checkpoint`, so a
    sweep with a transcoder still runs the rest of the pipeline."""


@dataclass(frozen=True)
class AbsorptionSettings:
    """SAEBench's ``AbsorptionEvalConfig`` (same names, same defaults; ``model_name`` is the base
    model's and ``llm_dtype`` the model's autocast, both filled in at run time), plus
    ``max_words``: a seeded subsample of the vocabulary (0 = every alphabetic token, SAEBench's)."""

    random_seed: int = setting(42, "seed of the word shuffle, the in-context examples and the probes")
    f1_jump_threshold: float = setting(0.03, "a letter splits over k+1 latents when the k-sparse F1 rises "
                                             "by more than this", ge=0)
    max_k_value: int = setting(10, "largest k of the k-sparse probes", ge=1)
    prompt_template: str = setting("{word} has the first letter:", "the first-letter prompt")
    prompt_token_pos: int = setting(-6, "position of the word in the prompt, from its end", le=-1)
    llm_batch_size: int = setting(10, "prompts per forward pass", ge=1)
    k_sparse_probe_l1_decay: float = setting(0.01, "L1 penalty of the probe that picks the k latents", ge=0)
    k_sparse_probe_batch_size: int = setting(4096, "batch size of that probe", ge=1)
    k_sparse_probe_num_epochs: int = setting(50, "epochs of that probe", ge=1)
    min_GT_probe_f1: float = setting(0.6, "a letter counts when the ground-truth probe's test F1 exceeds this",
                                     ge=0, le=1)
    min_feats_for_eval: int = setting(20, "fewer counted letters than this: no score", ge=1, le=26)
    eval_k_sparse_probe_batch_size: int = setting(24, "test words per batch when scoring the probes", ge=1)
    precalc_k_sparse_probe_sae_acts: bool = setting(False, "encode every training word once (memory: "
                                                           "words x latents floats) instead of per batch")
    max_words: int = setting(0, "seeded subsample of the alphabetic vocabulary before the 80/20 split "
                                "(0: all of it, as SAEBench)", ge=0)

    def __post_init__(self):
        validate(self, "resources.absorption.config")
        if "{word}" not in self.prompt_template:
            raise PlatformError(f"prompt_template {self.prompt_template!r} has no {{word}} placeholder",
                                "write e.g. \"{word} has the first letter:\"")


def check_absorption_hook(hook_name: str, hook_name_in: str | None, sae) -> None:
    """Refuse the SAEs for which absorption has no meaning (see the module docstring); PlatformError
    naming the hook point and why."""
    if hook_name_in or getattr(sae, "is_transcoder", False):
        raise AbsorptionRefused(
            f"feature absorption has no meaning for a transcoder ({hook_name_in} -> {hook_name}): it compares a "
            "probe trained on the activation the SAE reads with the SAE's decoder directions, and a transcoder's "
            "decoder writes into another space than it reads",
            "run the absorption evaluation on SAEs that reconstruct the activation they read (e.g. "
            "blocks.L.hook_resid_post)")
    if hook_name.rsplit(".", 1)[-1] in PER_HEAD_HOOKS:
        raise AbsorptionRefused(f"feature absorption has no meaning at {hook_name}: it is per attention head (over "
                            "positions), not one d_model vector at the word's position",
                            "run it on a residual-stream, attn_out or mlp_out SAE")


@torch.no_grad()
def raw_latents(sae, x: torch.Tensor) -> torch.Tensor:
    """[n, n_latents]: each latent's contribution along its unit decoder direction in raw units
    (``z_i * ||W_dec_i|| / input_scale``), for raw activations ``x`` [n, d_model]."""
    codes = sae.encode(x.to(sae.W_dec.device, sae.W_dec.dtype))
    scale = sae.W_dec.norm(dim=1) / sae.input_scale
    return (codes.to_dense(sae.n_latents) * scale).float()


def decoder_probe_cosines(sae, direction: torch.Tensor) -> torch.Tensor:
    """[n_latents] cosine of each decoder row with ``direction`` [d_model]."""
    return torch.nn.functional.cosine_similarity(direction.to(sae.W_dec).unsqueeze(0), sae.W_dec, dim=-1).float()


# -- the absorption formula (SAEBench FeatureAbsorptionCalculator.calculate_absorption) -------------

def absorption_of_word(activation: torch.Tensor, latents: torch.Tensor, probe_direction: torch.Tensor,
                       cosines: torch.Tensor, main_ids: list[int]) -> tuple[float, bool]:
    """(absorption fraction in [0, 1], full absorption) of one word: ``activation`` [d_model] at the
    word, its ``latents`` [n_latents] (:func:`raw_latents`), the unit probe direction [d_model],
    ``cosines`` [n_latents] of decoder rows with it and the letter's split features ``main_ids``."""
    probe_projection = float(activation.float() @ probe_direction.float())
    projections = latents * cosines
    main = float(projections[main_ids].sum())
    others = torch.ones_like(projections, dtype=torch.bool)
    others[main_ids] = False
    others &= (cosines >= ABSORPTION_FRACTION_PROBE_COS_THRESHOLD) & (projections > 0)
    candidates = projections[others]
    absorbing = float(candidates.topk(min(ABSORPTION_FRACTION_MAX_ABSORBING_LATENTS, candidates.numel())).values.sum())
    proportion = absorbing / probe_projection if probe_projection else float("inf") * np.sign(absorbing)
    if main >= probe_projection or proportion < ABSORPTION_PROBE_PROJECTION_PROPORTION_THRESHOLD:
        fraction = 0.0
    elif main <= 0.0:
        fraction = 1.0
    else:
        absorbed = min(absorbing, probe_projection - main)
        fraction = float(np.clip(absorbed / (absorbed + main), 0.0, 1.0))
    return fraction, _is_full_absorption(probe_projection, latents, cosines, projections, main_ids)


def _is_full_absorption(probe_projection: float, latents, cosines, projections, main_ids: list[int]) -> bool:
    """SAEBench ``_is_full_absorption``: no split feature fires, and the top-projecting latent is
    aligned with the probe (cos >= 0.025) and carries >= 0.4 of a non-negative probe projection."""
    if not all(float(latents[i]) < EPS for i in main_ids):
        return False
    top = int(projections.topk(min(TOP_PROJECTION_FEATURES, projections.numel())).indices[0])
    if float(cosines[top]) < FULL_ABSORPTION_PROBE_COS_THRESHOLD or probe_projection < 0:
        return False
    return float(projections[top]) / probe_projection >= ABSORPTION_PROBE_PROJECTION_PROPORTION_THRESHOLD


# -- reading the model -----------------------------------------------------------------------------

@dataclass
class WordActivations:
    """Activations [n, d_model] at each prompt's word, and how many prompts did not have the word's
    last token at ``prompt_token_pos`` (read there anyway, as SAEBench does)."""

    values: torch.Tensor
    word_elsewhere: int


def word_activations(hooked, prompts: list[ap.Prompt], settings: AbsorptionSettings,
                     hook_name: str, log=None) -> WordActivations:
    """Read ``hook_name`` at ``prompt_token_pos`` of every prompt, prompts of one token length
    batched together (``llm_batch_size``). PlatformError when the position misses the word in most
    prompts: the template tokenizes differently for this tokenizer, and the error names the value
    that would point at the word. ``log`` gets a line at each quarter of the prompts read."""
    tokenizer, pos = hooked.tokenizer, settings.prompt_token_pos
    tail = settings.prompt_template.split("{word}", 1)[1]
    ids, offsets = [], []
    for prompt in prompts:
        tokens = [hooked.start_token_id, *tokenizer(prompt.base, add_special_tokens=False)["input_ids"]]
        head = 1 + len(tokenizer(prompt.base[:len(prompt.base) - len(tail)], add_special_tokens=False)["input_ids"])
        ids.append(tokens)
        offsets.append(head - 1 - len(tokens))  # the word's last token, counted from the end
    misses = sum(offset != pos for offset in offsets)
    if prompts and misses * 2 > len(prompts):
        usual = max(set(offsets), key=offsets.count)
        raise AbsorptionRefused(f"prompt_token_pos = {pos} does not point at the word in {misses} of {len(prompts)} "
                            f"prompts of {settings.prompt_template!r} with this tokenizer (the word is at {usual})",
                            f"set resources.absorption.config.prompt_token_pos to {usual}")
    by_length = defaultdict(list)
    for index, tokens in enumerate(ids):
        by_length[len(tokens)].append(index)
    out = torch.empty(len(prompts), hooked.d_model)
    done, quarter = 0, 1
    with torch.inference_mode():
        for indices in by_length.values():
            for start in range(0, len(indices), settings.llm_batch_size):
                batch = indices[start:start + settings.llm_batch_size]
                tensor = torch.tensor([ids[i] for i in batch], device=hooked.device)
                out[batch] = hooked.read(tensor, (hook_name,))[hook_name][:, pos].float().cpu()
                done += len(batch)
                if log and done * 4 >= quarter * len(prompts):
                    log(f"absorption: read {done:,} of {len(prompts):,} prompts at {hook_name}")
                    quarter = 1 + done * 4 // len(prompts)
    return WordActivations(out, misses)


# -- the evaluation --------------------------------------------------------------------------------

@dataclass
class LetterResult:
    """One counted letter (SAEBench ``AbsorptionResultDetail`` plus the probe F1 and the features)."""

    first_letter: str
    mean_absorption_fraction: float
    full_absorption_rate: float
    num_full_absorption: int
    num_probe_true_positives: int
    num_split_features: int
    probe_f1: float
    split_features: list[int]


def evaluate_absorption(hooked, sae, hook_name: str, settings: AbsorptionSettings, *, hook_name_in=None,
                        log=print) -> dict:
    """The absorption result of ``sae`` read at ``hook_name`` of ``hooked`` (module docstring).

    Returns a JSON-able dict: ``scored`` (bool), ``refusal`` (why there is no score, else None),
    ``metrics`` (SAEBench's six mean/std figures, None when refused), ``letters`` (LetterResult per
    counted letter), ``probe_f1`` (test F1 of the ground-truth probe per letter), word counts,
    ``word_elsewhere`` and ``seconds``. PlatformError for a refused hook point (``check_absorption_hook``)."""
    check_absorption_hook(hook_name, hook_name_in, sae)
    started, rng = time.perf_counter(), random.Random(settings.random_seed)
    vocab = ap.alpha_vocabulary(hooked.tokenizer)
    train, test = ap.split_prompts(vocab, settings.prompt_template, rng, settings.max_words)
    log(f"absorption: {len(vocab):,} alphabetic tokens; {len(train):,} train / {len(test):,} test words")
    x_train = word_activations(hooked, train, settings, hook_name, log)
    x_test = word_activations(hooked, test, settings, hook_name, log)
    y_train = torch.tensor([p.letter for p in train])
    y_test = np.array([p.letter for p in test])
    probe = ap.train_ground_truth_probe(x_train.values, y_train, settings.random_seed)
    with torch.no_grad():
        probe_scores = probe(x_test.values).numpy()
    probe_f1 = {letter: ap.f1(y_test == i, probe_scores[:, i] > 0) for i, letter in enumerate(ap.LETTERS)}
    counted = [letter for letter, value in probe_f1.items() if value > settings.min_GT_probe_f1]
    result = {"hook_name": hook_name, "n_vocabulary": len(vocab), "n_train_words": len(train),
              "n_test_words": len(test), "probe_f1": probe_f1, "letters_counted": counted,
              "word_elsewhere": x_train.word_elsewhere + x_test.word_elsewhere,
              "settings": asdict(settings), "scored": False, "refusal": None, "metrics": None, "letters": []}
    if len(counted) < settings.min_feats_for_eval:
        result["refusal"] = (f"only {len(counted)} of 26 letters have a ground-truth probe with test F1 > "
                             f"{settings.min_GT_probe_f1} (min_feats_for_eval = {settings.min_feats_for_eval}): "
                             "the model does not represent first letters linearly enough at this hook point for "
                             "absorption to be measured; no score is recorded")
        log(f"absorption: {result['refusal']}")
        return {**result, "seconds": time.perf_counter() - started}
    letters = _score_letters(hooked, sae, hook_name, settings, vocab, rng, probe, x_train, y_train, test, x_test,
                             probe_scores, counted, probe_f1, log)
    result.update(scored=True, letters=[asdict(r) for r in letters], metrics=_summary(letters))
    return {**result, "seconds": time.perf_counter() - started}


def _score_letters(hooked, sae, hook_name, settings, vocab, rng, probe, x_train, y_train, test, x_test,
                   probe_scores, counted, probe_f1, log) -> list[LetterResult]:
    """k-sparse probes, split features and the absorption of each counted letter's true positives."""
    ks = list(range(1, settings.max_k_value + 1))
    def latents_of(x):
        return raw_latents(sae, x).cpu()

    log(f"absorption: k-sparse probes (k = 1..{settings.max_k_value}) on {sae.n_latents:,} latents")
    sparse = ap.train_k_sparse_probes(latents_of, x_train.values, y_train, sae.n_latents, ks,
                                      l1_decay=settings.k_sparse_probe_l1_decay,
                                      batch_size=settings.k_sparse_probe_batch_size,
                                      num_epochs=settings.k_sparse_probe_num_epochs, seed=settings.random_seed,
                                      precalc=settings.precalc_k_sparse_probe_sae_acts)
    y_test = np.array([p.letter for p in test])
    batches = x_test.values.split(settings.eval_k_sparse_probe_batch_size)
    test_latents = torch.cat([latents_of(batch) for batch in batches])
    results = []
    for letter in ap.LETTERS:  # SAEBench scores every letter, then keeps the counted ones
        i = ap.LETTERS.index(letter)
        if letter not in counted or i not in sparse[1]:
            continue
        truth = y_test == i
        f1_by_k = {k: ap.f1(truth, (sparse[k][i](test_latents) > 0).numpy()) for k in ks}
        feats = {k: sparse[k][i].feature_ids.tolist() for k in ks}
        main_ids = ap.split_features(f1_by_k, feats, settings.f1_jump_threshold)
        words = [p.word for p, hit in zip(test, truth & (probe_scores[:, i] > 0), strict=True) if hit]
        if not words:  # SAEBench's table has no row for a letter without true positives
            continue
        prompts = [ap.icl_prompt(w, vocab, settings.prompt_template, rng) for w in words]
        acts = word_activations(hooked, prompts, settings, hook_name).values
        direction = probe.weights[i].detach() / probe.weights[i].detach().norm()
        cosines = decoder_probe_cosines(sae, direction).cpu()
        word_latents = latents_of(acts)
        scored = [absorption_of_word(acts[j], word_latents[j], direction, cosines, main_ids) for j in range(len(words))]
        full = sum(is_full for _, is_full in scored)
        results.append(LetterResult(letter, sum(f for f, _ in scored) / len(words), full / len(words), full,
                                    len(words), len(main_ids), probe_f1[letter], main_ids))
    return results


def _summary(letters: list[LetterResult]) -> dict:
    """SAEBench's ``AbsorptionMeanMetrics``: means and sample standard deviations over letters."""
    columns = {"absorption_fraction_score": [r.mean_absorption_fraction for r in letters],
               "full_absorption_score": [r.full_absorption_rate for r in letters],
               "num_split_features": [float(r.num_split_features) for r in letters]}
    out = {}
    for name, values in columns.items():
        out[f"mean_{name}"] = statistics.mean(values)
        out[f"std_dev_{name}"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


# -- SAEBench's result file ------------------------------------------------------------------------

SAEBENCH_EVAL_TYPE = "absorption_first_letter"   # SAEBench eval_output.EVAL_TYPE_ID_ABSORPTION
SAEBENCH_CONFIG_FIELDS = ("random_seed", "f1_jump_threshold", "max_k_value", "prompt_template", "prompt_token_pos",
                          "llm_batch_size", "k_sparse_probe_l1_decay", "k_sparse_probe_batch_size",
                          "k_sparse_probe_num_epochs", "min_GT_probe_f1", "min_feats_for_eval",
                          "eval_k_sparse_probe_batch_size", "precalc_k_sparse_probe_sae_acts")


def saebench_absorption_json(result: dict, *, eval_id: str, model_name: str, llm_dtype: str, sae_name: str,
                             sae_cfg: dict, release: str, created_ms: int) -> dict:
    """``result`` (a scored :func:`evaluate_absorption`) in SAEBench's ``AbsorptionEvalOutput``
    schema: what Neuronpedia ingests and saebench.xyz compares. PlatformError for a refused result
    (SAEBench writes no file then either)."""
    if not result["scored"]:
        raise PlatformError(f"no SAEBench absorption file for {sae_name}: {result['refusal']}",
                            "nothing to fix in the file; the refusal is the result")
    names = {f.name for f in fields(AbsorptionSettings)}
    config = {key: result["settings"][key] for key in SAEBENCH_CONFIG_FIELDS if key in names}
    keys = ("first_letter", "mean_absorption_fraction", "full_absorption_rate", "num_full_absorption",
            "num_probe_true_positives", "num_split_features")
    return {
        "eval_type_id": SAEBENCH_EVAL_TYPE,
        "eval_config": {"model_name": model_name, "llm_dtype": llm_dtype, **config},
        "eval_id": eval_id,
        "datetime_epoch_millis": created_ms,
        "eval_result_metrics": {"mean": result["metrics"]},
        "eval_result_details": [{k: letter[k] for k in keys} for letter in result["letters"]],
        "sae_bench_commit_hash": "sae_platform (re-implementation of sae-bench 0.6.0)",
        "sae_lens_id": sae_name,
        "sae_lens_release_id": release,
        "sae_lens_version": None,
        "sae_cfg_dict": sae_cfg,
        # what SAEBench's file has no field for: the word subsample, the hook point, the word counts
        "eval_result_unstructured": {key: result[key] for key in (
            "hook_name", "n_vocabulary", "n_train_words", "n_test_words", "word_elsewhere", "probe_f1")}
        | {"max_words": result["settings"]["max_words"]},
    }


# -- one checkpoint, committed ---------------------------------------------------------------------

def absorption_inputs(store, sae_name: str, settings: AbsorptionSettings, base_model: dict | None) -> dict:
    """What the absorption of ``sae_name`` is computed from, as JSON: the checkpoint version, the
    stored base model (``{"version", "autocast"}``) and every setting. Recorded in the commit's
    pointer, so an unchanged result is recognised without recomputing it."""
    return {"checkpoint": checkpoint_version(store, sae_name), "base_model": base_model, "settings": asdict(settings)}


def absorption_current(store, sae_name: str, inputs: dict) -> bool:
    """Whether the committed absorption of ``sae_name`` was computed from exactly ``inputs``."""
    pointer = store.pointer(absorption_name(sae_name))
    return pointer is not None and pointer.get("inputs") == json.loads(json.dumps(inputs))


def _saelens_cfg(store, sae_name: str) -> dict | None:
    """The SAELens cfg.json of the checkpoint's export (SAEBench's ``sae_cfg_dict``), None if none."""
    if store.pointer(export_name(sae_name)) is None:
        return None
    return store.read_json(f"{store.resolve(export_name(sae_name))}/{CFG_FILENAME}")


SYNTHETIC_REFUSAL = ("the SAE was trained on synthetic activations (resources.synthetic): no language model reads "
                     "them, so there is no first-letter task to ask it; its figures against the known features are "
                     "sae_eval's gt_* (gt_absorption: absorption of child features by their parent's latent)")


def reads_a_language_model(store, sae_name: str) -> bool:
    """Whether SAE ``sae_name``'s activations came from a language model: False for synthetic
    partitions (``synthetic.synthetic_provenance``), which absorption refuses without loading one."""
    return synthetic_provenance(activation_attrs(store, trained_on(store, sae_name))) is None


def absorb_checkpoint(store, sae_name: str, hooked, settings: AbsorptionSettings, device, *, model_name: str,
                      inputs: dict | None = None, log=print) -> dict:
    """Measure checkpoint ``sae_name`` at its own hook point (``activations.sae_hook_entry``) and
    commit ``absorption/<sae_name>``: ``absorption.json`` (the result, or the refusal: too few
    letters, with the per-letter probe F1, or an ``AbsorptionRefused`` hook point or prompt
    position, or ``SYNTHETIC_REFUSAL`` when ``hooked`` is None for an SAE of synthetic activations)
    and, when scored, SAEBench's result file. Returns the result. StorageError for a missing
    checkpoint."""
    from sae_platform.trainer import load_sae  # the trainer imports the SAE stack: only when measuring

    checkpoint = checkpoint_version(store, sae_name)  # read first: a later commit then mismatches
    sae, cfg = load_sae(store, sae_name, device)
    entry = sae_hook_entry(store, sae_name, cfg)
    try:
        if hooked is None:
            raise AbsorptionRefused(SYNTHETIC_REFUSAL, "nothing to fix: train on a model's activations to measure it")
        result = evaluate_absorption(hooked, sae, entry.hook_name, settings, hook_name_in=entry.hook_name_in,
                                     log=log)
    except AbsorptionRefused as refused:
        result = {"hook_name": entry.spec, "scored": False, "refusal": str(refused), "metrics": None, "letters": [],
                  "letters_counted": [], "probe_f1": {}, "settings": asdict(settings), "n_vocabulary": None,
                  "n_train_words": None, "n_test_words": None, "word_elsewhere": None, "seconds": 0.0}
    pins = {"inputs": inputs} if inputs is not None else {}
    with store.writing(absorption_name(sae_name), checkpoint_step=cfg["step"], **checkpoint_pin(checkpoint),
                       **pins) as version:
        store.write_json(f"{version}/{ABSORPTION_REPORT}", result)
        if result["scored"]:
            document = saebench_absorption_json(
                result, eval_id=str(uuid.uuid4()), model_name=model_name,
                llm_dtype=str(hooked.autocast or torch.float32).removeprefix("torch."), sae_name=sae_name,
                sae_cfg=_saelens_cfg(store, sae_name), release="sae_platform", created_ms=int(time.time() * 1000))
            store.write_json(f"{version}/{SAEBENCH_ABSORPTION}", document)
    return result
