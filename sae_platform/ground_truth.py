"""How well an SAE recovered the known features of synthetic activations (``sae_platform.synthetic``).

Figures against the truth, N true features (directions [N, d]), L latents (decoder rows [L, d]):

* ``gt_mcc``: mean correlation coefficient: the mean |cosine| of decoder rows and true directions
  over the optimal one-to-one matching of min(L, N) pairs (Hungarian,
  ``scipy.optimize.linear_sum_assignment``), as SAELens's
  ``sae_lens.synthetic.evals.mean_correlation_coefficient`` (O'Neill et al. 2025,
  arXiv 2505.20254). 1: every latent is a true direction. A random decoder of unit rows in d
  dimensions scores about the expected maximum of N |cosines| of random vectors, √(2 ln N / d)
  (0.25 for N = 4,096 in d = 256; ``tests/test_ground_truth.py`` states the bound it checks).
* ``gt_mcc_chance``: the MCC of a random decoder of the same shape (seeded Gaussian rows) against
  the same truth: the level an SAE that learnt nothing scores, so an MCC is read against it (an
  SAE whose MCC is near its chance has not left its initialisation as far as the truth can tell).
* ``gt_uniqueness``: distinct true features among the latents' best matches (argmax |cosine|),
  over L (SAELens's ``feature_uniqueness``): below 1 when latents share a feature.
* ``gt_precision`` / ``gt_recall`` / ``gt_f1``: per true feature, its matched latent (the
  Hungarian matching) as a detector of its firing on held-out synthetic rows: precision =
  P(feature fires | latent fires), recall = P(latent fires | feature fires), F1 their harmonic
  mean; means over the true features that fire on those rows (and, for precision, whose latent
  fires).
* ``gt_shrinkage``: on rows where a true feature and its matched latent both fire, the latent's
  contribution along the feature's direction (activation × cosine, in the input's units) over
  the true magnitude; mean over such co-firings. 1: no shrinkage; an L1 penalty pushes it below.
* ``gt_absorption``: hierarchy-aware absorption (Chanin et al. 2024, "A is for Absorption"): over
  the rows where a child feature fires (so its parent does too), the fraction where the child's
  matched latent is silent while the parent's matched latent fires: the parent's latent swallowed
  the child. Mean over children that fire; ``gt_absorption_children`` counts them.

Tallies stream over batches (``GroundTruthTally``), so N × rows never sits in memory at once.
"""

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from sae_platform.errors import PlatformError


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float64)
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)


def abs_cosines(decoder: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """|cosine| [L, N] of decoder rows [L, d] and true directions [N, d]. PlatformError when the
    widths differ."""
    if decoder.shape[1] != directions.shape[1]:
        raise PlatformError(f"the decoder's rows have {decoder.shape[1]} dimensions but the true directions "
                            f"{directions.shape[1]}", "score an SAE trained on these synthetic activations")
    return np.abs(unit_rows(decoder) @ unit_rows(directions).T)


@dataclass
class Matching:
    """The Hungarian matching: latent_of[f] the latent matched to true feature f (-1 when L < N
    left it unmatched); cosine[f] their |cosine| (0 when unmatched); uniqueness as defined above."""

    latent_of: np.ndarray
    cosine: np.ndarray
    mcc: float
    uniqueness: float


def match(decoder: np.ndarray, directions: np.ndarray) -> Matching:
    """Match decoder rows [L, d] to true directions [N, d] (``gt_mcc``, ``gt_uniqueness``)."""
    cos = abs_cosines(decoder, directions)
    latents, features = linear_sum_assignment(1.0 - cos)
    latent_of = np.full(directions.shape[0], -1, dtype=np.int64)
    latent_of[features] = latents
    matched = cos[latents, features]
    cosine = np.zeros(directions.shape[0])
    cosine[features] = matched
    uniqueness = len(np.unique(cos.argmax(axis=1))) / decoder.shape[0]
    return Matching(latent_of, cosine, float(matched.mean()), float(uniqueness))


@dataclass
class GroundTruthTally:
    """Running counts over batches of (latent activations, true codes) for one matching.

    ``add(latent_acts, true_codes)``: latent_acts [b, L] in the input's units (an SAE's codes
    divided by its input scale), true_codes [b, N]; ``children`` maps each parent feature to its
    children (``synthetic.Truth.children_of``)."""

    matching: Matching
    children: dict[int, np.ndarray]
    n: int = 0
    true_fires: np.ndarray = field(default=None)
    latent_fires: np.ndarray = field(default=None)
    both: np.ndarray = field(default=None)
    shrink_sum: float = 0.0
    shrink_count: int = 0
    child_rows: np.ndarray = field(default=None)
    absorbed: np.ndarray = field(default=None)

    def __post_init__(self):
        n_features = len(self.matching.latent_of)
        self.true_fires, self.latent_fires, self.both = (np.zeros(n_features, dtype=np.int64) for _ in range(3))
        self.child_rows, self.absorbed = np.zeros(n_features, dtype=np.int64), np.zeros(n_features, dtype=np.int64)

    def add(self, latent_acts: np.ndarray, true_codes: np.ndarray) -> None:
        latent_of = self.matching.latent_of
        matched = np.where(latent_of >= 0, latent_of, 0)
        acts = np.asarray(latent_acts)[:, matched] * (latent_of >= 0)  # [b, N]: each feature's latent
        truth_on, latent_on = true_codes > 0, acts > 0
        self.n += len(true_codes)
        self.true_fires += truth_on.sum(0)
        self.latent_fires += latent_on.sum(0)
        co = truth_on & latent_on
        self.both += co.sum(0)
        along = acts * self.matching.cosine  # the latent's contribution along the true direction
        ratios = along[co] / true_codes[co]
        self.shrink_sum += float(ratios.sum())
        self.shrink_count += int(co.sum())
        for parent, kids in self.children.items():
            child_on = truth_on[:, kids]
            swallowed = child_on & ~latent_on[:, kids] & latent_on[:, [parent]]
            self.child_rows[kids] += child_on.sum(0)
            self.absorbed[kids] += swallowed.sum(0)

    def figures(self) -> dict:
        """The ``gt_*`` figures of the module docstring (None where nothing fired to measure them)."""
        fired = self.true_fires > 0
        precision = np.divide(self.both, self.latent_fires, out=np.zeros(len(self.both)), where=self.latent_fires > 0)
        recall = np.divide(self.both, self.true_fires, out=np.zeros(len(self.both)), where=fired)
        f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(len(self.both)),
                       where=(precision + recall) > 0)
        with_latent = fired & (self.latent_fires > 0)
        children = self.child_rows > 0
        mean = lambda values, where: float(values[where].mean()) if where.any() else None  # noqa: E731
        return {
            "gt_mcc": self.matching.mcc, "gt_uniqueness": self.matching.uniqueness,
            "gt_precision": mean(precision, with_latent), "gt_recall": mean(recall, fired), "gt_f1": mean(f1, fired),
            "gt_shrinkage": self.shrink_sum / self.shrink_count if self.shrink_count else None,
            "gt_absorption": mean(self.absorbed / np.maximum(self.child_rows, 1), children),
            "gt_absorption_children": int(children.sum()), "gt_features_firing": int(fired.sum()),
            "gt_rows": self.n,
        }


def chance_mcc(n_latents: int, truth) -> float:
    """``gt_mcc_chance``: the MCC of a random decoder [n_latents, d] (standard Gaussian rows from
    ``synthetic.chance_stream``, so the same for every SAE of one width) against ``truth``'s
    directions [N, d]."""
    from sae_platform.synthetic import chance_stream

    random_decoder = chance_stream(truth.settings).standard_normal((n_latents, truth.directions.shape[1]))
    return match(random_decoder, truth.directions).mcc


def score_codes(decoder: np.ndarray, truth, batches) -> dict:
    """The ``gt_*`` figures of a decoder [L, d] whose activations on held-out rows are given:
    ``batches`` yields (latent_acts [b, L] in input units, true_codes [b, N]). For tests and for
    SAEs not built by ``build_sae``."""
    tally = GroundTruthTally(match(decoder, truth.directions), truth.children_of())
    for latent_acts, true_codes in batches:
        tally.add(latent_acts, true_codes)
    return {**tally.figures(), "gt_mcc_chance": chance_mcc(len(decoder), truth)}


@torch.no_grad()
def score_sae(sae, truth, draws) -> dict:
    """The ``gt_*`` figures of ``sae`` (a ``SparseAutoencoder``) on ``draws`` (``synthetic.Draw``
    batches, e.g. ``synthetic.heldout_draws(truth)``): its decoder rows against the truth, its
    codes (divided by its input scale, so in the rows' units) against the true codes."""
    if getattr(sae, "is_transcoder", False):
        raise PlatformError("a transcoder has no ground truth on synthetic activations",
                            "score an SAE (a synthetic store holds one hook point)")
    device = next(sae.parameters()).device
    decoder = sae.W_dec.detach().float().cpu().numpy()
    scale = float(sae.input_scale)

    def activations():
        for draw in draws:
            codes = sae.encode_dense(torch.from_numpy(draw.acts).to(device)).float().cpu().numpy()
            yield codes / scale, draw.codes

    return score_codes(decoder, truth, activations())


@torch.no_grad()
def synthetic_heldout_codes(sae, truth, ctx_len: int):
    """``metrics.HeldoutCodes`` of fresh synthetic contexts (``synthetic.heldout_contexts``): what
    the feature explanations score on when the SAE was trained on synthetic activations (there is
    no held-out text). Every position but the start token is a row."""
    from sae_platform.metrics import HeldoutCodes
    from sae_platform.synthetic import heldout_contexts

    tokens, rows = heldout_contexts(truth, ctx_len)
    mask = np.ones(tokens.shape, dtype=bool)
    mask[:, 0] = False
    device = next(sae.parameters()).device
    codes = sae.encode(torch.from_numpy(rows[mask]).to(device))
    on = (codes.values > 0).cpu().numpy()
    flat = np.flatnonzero(mask)
    which = np.broadcast_to(np.arange(len(flat))[:, None], on.shape)[on]
    return HeldoutCodes(tokens, mask, flat[which].astype(np.int64), codes.indices.cpu().numpy()[on].astype(np.int64),
                        codes.values.cpu().float().numpy()[on].astype(np.float32))
