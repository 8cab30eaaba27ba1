"""Error bars for SAE metrics: spread over reseeds, bootstrap intervals, and which differences are real.

A sweep entry with ``seeds: S`` trains S SAEs that differ only in their init seed
(``catalog.ReseedGroup``). Here their metrics become mean ± sd; the pooled reseed noise of each
metric gives its *minimum reliable difference* (``min_reliable_difference``), below which two SAEs
are "not distinguishable" on that metric; a single-seed SAE gets a bootstrap interval over its
held-out units instead (``bootstrap_ratio_interval``, computed at evaluation: ``evaluate``);
and ``decoder_consistency`` says how many latents of one seed another seed also learned.

The rule, stated once: two SAEs A and B (n_A, n_B seeds) differ reliably on a metric when
``|mean_A - mean_B| >= t_{0.975, df} * s_p * sqrt(1/n_A + 1/n_B)``: the two-sample Student t-test
at 5% (two-sided) with the metric's reseed sd ``s_p`` pooled over every reseed group of the sweep
(``df = sum(n_g - 1)``), since reseed noise is a property of the metric and the training recipe,
better measured from all groups than from two.
"""

from dataclasses import dataclass

import numpy as np

from sae_platform.errors import PlatformError

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_LEVEL = 0.95
SIGNIFICANCE = 0.05  # two-sided level of the "differ reliably" t-test
CONSISTENT_COSINE = 0.9  # a latent is "found again" by another seed when their decoder rows are this close
HUNGARIAN_MAX_LATENTS = 4096  # above it, the exact matching's n x n cost matrix (and O(n^3) time) is too much
GREEDY_BLOCK_ROWS = 1024  # rows of the cosine matrix held at once by the blockwise greedy matching


@dataclass(frozen=True)
class SeedSpread:
    """One metric over the reseeds of one SAE: ``mean``, sample ``sd`` (ddof 1; None for one seed), ``n`` seeds."""

    mean: float
    sd: float | None
    n: int

    def text(self) -> str:
        """``mean ± sd (n seeds)``, or the mean alone for one seed."""
        return f"{self.mean:.4g}" if self.sd is None else f"{self.mean:.4g} ± {self.sd:.2g} (n={self.n})"


def seed_spread(values: list[float]) -> SeedSpread:
    """Mean and sample sd of one metric over seeds (``values``: one finite float per seed).
    PlatformError when ``values`` is empty."""
    if not values:
        raise PlatformError("no seed has a value for this metric", "evaluate at least one reseed (sae_eval)")
    array = np.asarray(values, dtype=np.float64)
    return SeedSpread(float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else None, len(array))


@dataclass(frozen=True)
class PooledNoise:
    """The reseed noise of one metric, pooled over groups: ``sd`` (s_p) and its degrees of freedom ``df``."""

    sd: float
    df: int


def pooled_noise(spreads: list[SeedSpread]) -> PooledNoise | None:
    """s_p**2 = sum((n_g - 1) * sd_g**2) / sum(n_g - 1) over the groups with >= 2 seeds; None when
    no group has two seeds (then there is no measured reseed noise)."""
    multi = [s for s in spreads if s.n > 1 and s.sd is not None]
    df = sum(s.n - 1 for s in multi)
    if df == 0:
        return None
    return PooledNoise(float(np.sqrt(sum((s.n - 1) * s.sd ** 2 for s in multi) / df)), df)


def min_reliable_difference(noise: PooledNoise, n_a: int, n_b: int) -> float:
    """The smallest difference of means (the metric's unit) the t-test at 5% calls real between an
    SAE of ``n_a`` seeds and one of ``n_b``: t_{0.975, df} * s_p * sqrt(1/n_a + 1/n_b) (module docstring)."""
    from scipy.stats import t as student_t

    return float(student_t.ppf(1 - SIGNIFICANCE / 2, noise.df) * noise.sd * np.sqrt(1 / n_a + 1 / n_b))


def distinguishable(a: SeedSpread, b: SeedSpread, noise: PooledNoise | None) -> bool | None:
    """Whether ``a`` and ``b`` differ by at least the metric's minimum reliable difference; None
    when the metric has no measured reseed noise (no group of >= 2 seeds), so nothing can be said."""
    if noise is None:
        return None
    return abs(a.mean - b.mean) >= min_reliable_difference(noise, a.n, b.n)


@dataclass(frozen=True)
class SweepUnit:
    """One SAE of the comparison as error bars see it: a reseed group (``catalog.ReseedGroup``, its
    evaluated members) or a lone SAE; per metric its ``spreads`` over seeds and, from a lone
    seed's evaluation, its bootstrap ``intervals`` (the report's ``<metric>_interval``)."""

    sae: str
    hook_point: str | None
    members: tuple[str, ...]
    spreads: dict[str, SeedSpread]
    intervals: dict[str, tuple[float, float]]


def sweep_units(rows: list[dict], groups: dict[str, list[str]], keys: tuple[str, ...]) -> list[SweepUnit]:
    """The comparison's ``rows`` (``compare.comparison_rows``; a row may carry ``intervals``) folded
    into one ``SweepUnit`` per reseed group of ``groups`` (entry name -> member SAE names) and one
    per SAE in no group, in the rows' order; a metric a member did not measure is left out of its
    spread."""
    group_of = {member: group for group, members in groups.items() for member in members}
    folded: dict[str, list[dict]] = {}
    for row in rows:
        folded.setdefault(group_of.get(row["sae"], row["sae"]), []).append(row)
    units = []
    for name, members in folded.items():
        spreads = {key: seed_spread(values) for key in keys
                   if (values := [r[key] for r in members if r.get(key) is not None])}
        intervals = {key: tuple(value) for key, value in members[0].get("intervals", {}).items()} \
            if len(members) == 1 else {}
        units.append(SweepUnit(name, members[0].get("hook_point"), tuple(r["sae"] for r in members), spreads,
                               intervals))
    return units


def not_distinguishable(units: list[SweepUnit], keys: tuple[str, ...]) -> dict[tuple[str, str], list[str]]:
    """(unit, metric) -> the other units of the same hook point it cannot be told apart from on
    that metric (``distinguishable`` is False: their difference is below the metric's minimum
    reliable difference, with the reseed noise pooled over every unit). Metrics without measured
    reseed noise are left out: nothing is marked."""
    marks: dict[tuple[str, str], list[str]] = {}
    for key in keys:
        noise = pooled_noise([u.spreads[key] for u in units if key in u.spreads])
        for a in units:
            for b in units:
                if a is b or a.hook_point != b.hook_point or key not in a.spreads or key not in b.spreads:
                    continue
                if distinguishable(a.spreads[key], b.spreads[key], noise) is False:
                    marks.setdefault((a.sae, key), []).append(b.sae)
    return marks


def bootstrap_ratio_interval(numerator: np.ndarray, denominator: np.ndarray, *, complement: bool = False,
                             resamples: int = BOOTSTRAP_RESAMPLES, level: float = BOOTSTRAP_LEVEL,
                             seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``sum(numerator) / sum(denominator)`` (``1 -`` that with
    ``complement``) over held-out units resampled with replacement: ``numerator`` and
    ``denominator`` are [n_units] per-unit sums (e.g. squared error and squared deviation of each
    held-out row for FVU; CE increase with the SAE and with zero ablation of each held-out context
    for loss recovered). ``level`` in (0, 1); seeded, so an evaluation is reproducible.
    PlatformError when the arrays differ in length or hold fewer than 2 units."""
    num, den = np.asarray(numerator, np.float64).ravel(), np.asarray(denominator, np.float64).ravel()
    if len(num) != len(den) or len(num) < 2:
        raise PlatformError(f"a bootstrap needs >= 2 paired units, got {len(num)} numerators and {len(den)} "
                            "denominators", "pass one numerator and one denominator per held-out unit")
    picks = np.random.default_rng(seed).integers(0, len(num), size=(resamples, len(num)))
    ratios = num[picks].sum(1) / np.where(den[picks].sum(1) == 0, np.nan, den[picks].sum(1))
    ratios = 1 - ratios if complement else ratios
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(ratios, [tail, 100 - tail])
    return float(low), float(high)


def _unit_rows(decoder) -> np.ndarray:
    """Rows scaled to unit norm, float32: cosines exact to ~1e-7, far below the 0.9 threshold's
    concern, and the 16k x 16k products twice as fast as in float64."""
    rows = np.asarray(decoder, dtype=np.float32)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def _hungarian_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment

    cosine = a @ b.T
    rows, cols = linear_sum_assignment(cosine, maximize=True)
    matched = np.zeros(len(a))
    matched[rows] = cosine[rows, cols]
    return matched


def _greedy_cosines(a: np.ndarray, b: np.ndarray, n_candidates: int = 8) -> np.ndarray:
    """Each latent of ``a``'s partner in ``b``, one-to-one, taking the best remaining pairs first;
    the cosine matrix is computed ``GREEDY_BLOCK_ROWS`` rows at a time, keeping each row's
    ``n_candidates`` best columns only (memory O(n * n_candidates), not O(n**2))."""
    n_candidates = min(n_candidates, len(b))
    values, index = [], []
    for start in range(0, len(a), GREEDY_BLOCK_ROWS):
        cosine = a[start:start + GREEDY_BLOCK_ROWS] @ b.T
        # a copy: the slice alone would keep the whole [block, n] partition alive (2 GiB at 16k)
        top = np.argpartition(-cosine, n_candidates - 1, axis=1)[:, :n_candidates].copy()
        values.append(np.take_along_axis(cosine, top, axis=1))
        index.append(top)
    values, index = np.concatenate(values), np.concatenate(index)
    matched, taken_a, taken_b = np.zeros(len(a)), np.zeros(len(a), bool), np.zeros(len(b), bool)
    for flat in np.argsort(-values, axis=None, kind="stable"):
        row, col = divmod(int(flat), n_candidates)
        partner = index[row, col]
        if not taken_a[row] and not taken_b[partner]:
            taken_a[row], taken_b[partner], matched[row] = True, True, values[row, col]
    return matched  # a latent whose candidates were all taken keeps 0: no partner above any threshold


def decoder_consistency(decoder_a, decoder_b, threshold: float = CONSISTENT_COSINE) -> dict:
    """How many latents two seeds share: their decoders (``[n_latents, d_model]`` arrays each, any
    float dtype; rows need not be unit norm) are matched one-to-one by cosine similarity, exactly
    (Hungarian, ``scipy.optimize.linear_sum_assignment``) up to ``HUNGARIAN_MAX_LATENTS`` latents,
    blockwise greedy above it (a 16k x 16k float64 cost matrix is 2 GiB and the exact matching
    minutes of CPU). Returns ``consistent_fraction`` (share of ``decoder_a``'s latents whose partner
    is at cosine >= ``threshold``), ``mean_cosine`` of the matched pairs, ``method``,
    ``n_latents`` and ``threshold``. PlatformError when the decoders differ in d_model."""
    shape_a, shape_b = np.shape(decoder_a), np.shape(decoder_b)
    if len(shape_a) != 2 or len(shape_b) != 2 or shape_a[1] != shape_b[1]:
        raise PlatformError(f"decoders of shapes {shape_a} and {shape_b} cannot be matched",
                            "compare reseeds of one SAE: [n_latents, d_model] decoders of the same d_model")
    a, b = _unit_rows(decoder_a), _unit_rows(decoder_b)
    exact = max(len(a), len(b)) <= HUNGARIAN_MAX_LATENTS
    matched = _hungarian_cosines(a, b) if exact else _greedy_cosines(a, b)
    return {"consistent_fraction": float((matched >= threshold).mean()), "mean_cosine": float(matched.mean()),
            "method": "hungarian" if exact else "blockwise greedy", "n_latents": len(a), "threshold": threshold}


def seed_consistency(store, members: list[str]) -> dict | None:
    """``decoder_consistency`` of the first reseed of ``members`` (SAE names) against each other one
    with a committed checkpoint, averaged over those pairs (``pairs``: how many); None with fewer
    than two checkpoints. Reads the checkpoints with ``trainer.load_sae`` (its errors)."""
    from sae_platform.catalog import checkpoint_version
    from sae_platform.trainer import load_sae  # torch: imported here, so the page's readers stay torch-free

    trained = [name for name in members if checkpoint_version(store, name) is not None]
    if len(trained) < 2:
        return None
    first = load_sae(store, trained[0])[0].W_dec.detach().numpy()
    pairs = [decoder_consistency(first, load_sae(store, other)[0].W_dec.detach().numpy()) for other in trained[1:]]
    return {**pairs[0], "pairs": len(pairs),
            **{key: float(np.mean([p[key] for p in pairs])) for key in ("consistent_fraction", "mean_cosine")}}
