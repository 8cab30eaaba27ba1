"""The first-letter data and probes of the feature-absorption evaluation (``sae_platform.absorption``):
SAEBench 0.6.0's ``sae_bench/evals/absorption/`` (vocab.py, prompting.py, probing.py,
k_sparse_probing.py), re-implemented on our hooked model and SAEs, step for step.

* Vocabulary (vocab.py ``get_alpha_tokens``): every token whose text is ASCII letters, with one
  optional leading space.
* Prompts (prompting.py ``create_icl_prompt``): ``"{word} has the first letter:"`` preceded by up
  to 10 in-context examples of the same template with their answer (`` C``), separated by
  newlines, with a newline before the first; the examples never contain the word itself.
* Ground-truth probe (probing.py ``train_multi_probe``): a 26-way one-vs-rest linear probe on the
  residual at the word's position, BCE with ``pos_weight`` = negatives / positives per letter,
  Adam (weight decay 1e-4), batch 64, 50 epochs, lr 1e-2 decaying exponentially to 1e-5.
* k-sparse probes (k_sparse_probing.py ``train_k_sparse_probes``): the same multi-probe on SAE
  latents with an L1 penalty (0.01 x mean over letters of the summed |weights|, weight decay 1e-6,
  batch 4096), then for each k and letter the k latents of largest (signed) L1-probe weight and an
  L2-regularised logistic regression on them with balanced class weights (scikit-learn's
  ``LogisticRegression(max_iter=500, class_weight="balanced")``: the same convex objective,
  minimised here with L-BFGS in float64, so it has the same optimum).

Randomness is one ``random.Random(seed)`` drawn in SAEBench's order (shuffle the vocabulary, then
one example draw per prompt), and probe initialisation / batch order under ``torch`` seeded by the
same seed, so a run is reproducible. SAEBench iterates the tokenizer's vocabulary dict, whose
order is not stable across processes; we sort by token id.
"""

import random
from dataclasses import dataclass
from math import exp, log

import numpy as np
import torch
from torch import nn

LETTERS = "abcdefghijklmnopqrstuvwxyz"
ALPHA = set(LETTERS + LETTERS.upper())
MAX_ICL_EXAMPLES = 10            # SAEBench: create_dataset_probe_training / the absorption calculator
TRAIN_FRACTION = 0.8             # SAEBench: create_dataset_probe_training's train_test_fraction
EXAMPLE_SEPARATOR = "\n"
CONTAMINATION_ATTEMPTS = 1000    # SAEBench: create_icl_prompt's max_attempts
GT_PROBE = {"batch_size": 64, "num_epochs": 50, "lr": 1e-2, "end_lr": 1e-5, "weight_decay": 1e-4}
SPARSE_PROBE_L2_DECAY = 1e-6     # SAEBench: train_sparse_multi_probe's l2_decay
LOGISTIC_C = 1.0                 # scikit-learn's LogisticRegression default (SAEBench uses defaults)


@dataclass(frozen=True)
class Prompt:
    """One first-letter prompt: ``base`` ends with the word's template; ``letter`` indexes LETTERS."""

    base: str
    word: str
    letter: int


def alpha_vocabulary(tokenizer) -> list[str]:
    """The text of every vocabulary token made of ASCII letters with one optional leading space,
    in token-id order (SAEBench ``get_alpha_tokens``; a SentencePiece ``▁`` counts as a space)."""
    words = []
    for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        text = tokenizer.convert_tokens_to_string([token])
        if token.startswith("▁") and not text.startswith(" "):
            text = " " + text  # SAEBench's fix for tokenizers that drop the leading-space marker
        bare = text[1:] if text.startswith(" ") else text
        if bare and all(char in ALPHA for char in bare):
            words.append(text)
    return words


def first_letter_answer(word: str) -> str:
    """`` C`` for ``cat`` (SAEBench ``first_letter``: first letter, capitalised, after a space)."""
    return " " + [c for c in word.strip() if c.isalpha()][0].upper()


def icl_prompt(word: str, examples: list[str], template: str, rng: random.Random) -> Prompt:
    """SAEBench ``create_icl_prompt`` with ``max_icl_examples=10``, shuffled examples, the
    contamination check and a separator before the first example. A split of at most 10 other words
    uses all of them (SAEBench's draw of 10 would never succeed there: only a small subsample has one)."""
    count = min(MAX_ICL_EXAMPLES, len(examples) - (word in examples))
    for _ in range(CONTAMINATION_ATTEMPTS):
        chosen = rng.sample(examples, count)
        if word not in chosen:
            break
    else:
        raise ValueError(f"could not draw {count} in-context examples without {word!r} in "
                         f"{CONTAMINATION_ATTEMPTS} attempts: the vocabulary is too small")
    lines = [template.format(word=ex) + first_letter_answer(ex) for ex in chosen]
    base = EXAMPLE_SEPARATOR + EXAMPLE_SEPARATOR.join([*lines, template.format(word=word)])
    return Prompt(base, word, LETTERS.index(first_letter_answer(word).strip().lower()))


def split_prompts(vocab: list[str], template: str, rng: random.Random,
                  max_words: int = 0) -> tuple[list[Prompt], list[Prompt]]:
    """(train, test) prompts, one per word (SAEBench ``create_dataset_probe_training``): the
    vocabulary shuffled, cut to its first ``max_words`` (0: all; our seeded subsample), split 80/20;
    each split's prompts draw their examples from that split's own words."""
    shuffled = rng.sample(vocab, len(vocab))
    if max_words:
        shuffled = shuffled[:max_words]
    cut = int(len(shuffled) * TRAIN_FRACTION)
    train, test = shuffled[:cut], shuffled[cut:]
    return ([icl_prompt(w, train, template, rng) for w in train],
            [icl_prompt(w, test, template, rng) for w in test])


# -- probes ---------------------------------------------------------------------------------------

class LinearProbe(nn.Module):
    """[n, d] -> [n, n_probes] logits (SAEBench ``LinearProbe``)."""

    def __init__(self, dim: int, n_probes: int):
        super().__init__()
        self.fc = nn.Linear(dim, n_probes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)

    @property
    def weights(self) -> torch.Tensor:
        """[n_probes, dim]."""
        return self.fc.weight


def pos_weights(y: torch.Tensor) -> torch.Tensor:
    """Negatives / positives per probe (SAEBench ``_calc_pos_weights``). A letter with no positive
    example gets 1 instead of SAEBench's inf, which would turn the whole loss into NaN (only a small
    word subsample can lack a letter)."""
    positives = y.sum(dim=0)
    return torch.where(positives > 0, (len(y) - positives) / positives.clamp_min(1), torch.ones_like(positives))


def train_multi_probe(x: torch.Tensor, y: torch.Tensor, *, batch_size: int, num_epochs: int, lr: float,
                      end_lr: float, weight_decay: float, seed: int, l1_decay: float = 0.0,
                      encode=None, dim: int | None = None) -> LinearProbe:
    """SAEBench ``train_multi_probe``: one-vs-rest logistic probes on ``x`` [n, d_in] for the
    multi-hot ``y`` [n, n_probes]; BCE with ``pos_weights``, Adam, lr decayed exponentially from
    ``lr`` to ``end_lr`` over the epochs; plus ``l1_decay`` x mean over probes of sum |w| (the
    k-sparse L1 probe). ``encode`` maps each batch first (SAE latents), then ``dim`` is its width."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = LinearProbe(dim or x.shape[1], y.shape[1]).to(x.device)
        optimizer = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=exp(log(end_lr / lr) / num_epochs))
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weights(y.float()).to(x.device))
        y = y.float()
        for _ in range(num_epochs):
            for index in torch.randperm(len(x)).split(batch_size):
                batch = x[index] if encode is None else encode(x[index])
                optimizer.zero_grad()
                loss = loss_fn(probe(batch), y[index])
                if l1_decay:
                    loss = loss + l1_decay * probe.weights.abs().sum(dim=-1).mean()
                loss.backward()
                optimizer.step()
            scheduler.step()
    return probe.eval()


def train_ground_truth_probe(x: torch.Tensor, letters: torch.Tensor, seed: int) -> LinearProbe:
    """The 26-way first-letter probe on residuals ``x`` [n, d_model] (SAEBench
    ``train_linear_probe_for_task`` with ``train_and_save_probes``' batch 64, 50 epochs, lr 1e-2)."""
    y = torch.nn.functional.one_hot(letters, num_classes=len(LETTERS))
    return train_multi_probe(x, y, seed=seed, **GT_PROBE)


def logistic_regression(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(weight [k], bias) minimising scikit-learn's balanced, L2-regularised logistic loss:
    C * sum_i w_i log(1 + exp(-s_i (x_i.w + b))) + ||w||^2 / 2, w_i = n / (2 n_class(i)) (C = 1).
    Convex: L-BFGS in float64 reaches the optimum scikit-learn's lbfgs does."""
    x, target = x.double(), y.double()
    counts = torch.stack([(target == 0).sum(), (target == 1).sum()]).double()
    sample_w = (len(target) / (2 * counts.clamp_min(1)))[target.long()]
    signs = 2 * target - 1
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], lr=1, max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-14,
                                  line_search_fn="strong_wolfe")

    def objective():
        optimizer.zero_grad()
        loss = LOGISTIC_C * (sample_w * nn.functional.softplus(-signs * (x @ w + b))).sum() + 0.5 * w.pow(2).sum()
        loss.backward()
        return loss

    if counts.min() > 0:  # one class only: scikit-learn refuses; the zero probe predicts nothing
        optimizer.step(objective)
    return w.detach().float(), float(b.detach())


@dataclass(frozen=True)
class KSparseProbe:
    """A probe reading only ``feature_ids`` [k] of the latents (SAEBench ``KSparseProbe``)."""

    weight: torch.Tensor
    bias: float
    feature_ids: torch.Tensor

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """Logits [n] for latents [n, n_latents]."""
        return latents[:, self.feature_ids] @ self.weight + self.bias


def train_k_sparse_probes(latents_of, x: torch.Tensor, letters: torch.Tensor, n_latents: int, ks: list[int], *,
                          l1_decay: float, batch_size: int, num_epochs: int, seed: int,
                          precalc: bool) -> dict[int, dict[int, KSparseProbe]]:
    """{k: {letter: probe}} (SAEBench ``train_k_sparse_probes``): an L1 multi-probe on the latents
    of ``x`` [n, d_model] (``latents_of``: residuals -> [n, n_latents]), then per k and letter the k
    latents of largest L1-probe weight (signed: latents that predict the letter, not against it)
    and a balanced logistic regression on them. Letters without a training word get no probe."""
    y = torch.nn.functional.one_hot(letters, num_classes=len(LETTERS))
    inputs = latents_of(x) if precalc else x
    l1 = train_multi_probe(inputs, y, batch_size=batch_size, num_epochs=num_epochs, lr=1e-2, end_lr=1e-5,
                           weight_decay=SPARSE_PROBE_L2_DECAY, seed=seed, l1_decay=l1_decay,
                           encode=None if precalc else latents_of, dim=n_latents)
    weights = l1.weights.detach().float().cpu()
    dense = inputs if precalc else latents_of(x)
    probes: dict[int, dict[int, KSparseProbe]] = {k: {} for k in ks}
    for label in sorted(set(letters.tolist())):
        target = (letters == label).long()
        for k in ks:
            ids = weights[label].topk(k).indices
            w, b = logistic_regression(dense[:, ids].float().cpu(), target.cpu())
            probes[k][label] = KSparseProbe(w, b, ids)
    return probes


def f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Binary F1 (scikit-learn's ``f1_score``, 0 where precision and recall are both undefined)."""
    tp = int((truth & predicted).sum())
    denominator = int(truth.sum()) + int(predicted.sum())
    return 2 * tp / denominator if denominator else 0.0


def split_features(f1_by_k: dict[int, float], feats_by_k: dict[int, list[int]], jump: float) -> list[int]:
    """The latents a letter is split over (SAEBench ``add_feature_splits_to_metrics_df``): walk
    k = 1, 2, ... while the k-sparse F1 rises by more than ``jump`` over the best so far; the
    features of the last k that did."""
    best, chosen = -100.0, []
    for k in sorted(f1_by_k):
        if f1_by_k[k] > best + jump:
            best, chosen = f1_by_k[k], feats_by_k[k]
        else:
            break
    return chosen
