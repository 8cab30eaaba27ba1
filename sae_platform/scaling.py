"""Gao et al.'s scaling laws fitted to the user's own sweep ("Scaling and evaluating sparse autoencoders", 2024, §3.1).

The figure is the normalized MSE of each TopK SAE on its held-out rows (the evaluation report's
``fvu``: MSE over the MSE of predicting the mean activation, Gao's "normalized MSE"), against its
number of latents N and its k. Two forms, both fitted in log space (a power law's residuals are
relative), with ``scipy.optimize.curve_fit``:

* at fixed k (§3.1.2, training to convergence): ``L(N) = c * N**a + e``, ``e >= 0`` the irreducible loss; one fit per k
  that has at least ``MIN_WIDTHS`` widths (3 parameters, so at least one residual degree of freedom);
* jointly (§3.1.2, the same SAEs over k): ``L(N, k) = exp(alpha + beta_k log k + beta_N log N + gamma log k log N)
  + exp(zeta + eta log k)``: the first term vanishes as N grows, the second is the irreducible
  loss at that k; needs at least ``MIN_KS`` values of k and ``MIN_WIDTHS`` widths (6 parameters).

Each parameter gets a 95% interval from the fit's covariance (Student t with the residual
degrees of freedom); each point its residual. A sweep too small for either fit is refused
(``ScalingRefused``) with what it has and what it needs.
"""

import html
import math
from dataclasses import dataclass

import numpy as np

from sae_platform.errors import PlatformError

SCALING_VARIANT = "topk"  # the laws are Gao's for TopK SAEs: other variants' points are not fitted
MIN_WIDTHS = 4  # distinct n_latents at one k: 3 parameters of L(N) + 1 degree of freedom
MIN_KS = 3  # distinct k for the joint form (its k-terms need a curve, not a line)
LEVEL = 0.95
JOINT_PARAMETERS = ("alpha", "beta_k", "beta_N", "gamma", "zeta", "eta")
FIXED_K_PARAMETERS = ("log_c", "a", "e")


class ScalingRefused(PlatformError):
    """The sweep has too few widths / values of k for a scaling-law fit."""


@dataclass(frozen=True)
class ScalingPoint:
    """One evaluated SAE: its name, number of latents ``n_latents``, ``k`` and normalized MSE ``loss``."""

    sae: str
    n_latents: int
    k: int
    loss: float


def _fixed_k_log(log_n, log_c, a, e):
    return np.log(np.exp(log_c + a * log_n) + e)


def _joint_log(nk, alpha, beta_k, beta_n, gamma, zeta, eta):
    log_n, log_k = nk
    return np.log(np.exp(alpha + beta_k * log_k + beta_n * log_n + gamma * log_k * log_n)
                  + np.exp(zeta + eta * log_k))


def _intervals(names, values, covariance, dof: int) -> dict:
    from scipy.stats import t as student_t

    half = student_t.ppf(1 - (1 - LEVEL) / 2, dof) * np.sqrt(np.clip(np.diag(covariance), 0, None))
    return {name: {"value": float(v), "low": float(v - h), "high": float(v + h)}
            for name, v, h in zip(names, values, half, strict=True)}


def _residuals(points: list[ScalingPoint], fitted: np.ndarray) -> list[dict]:
    return [{"sae": p.sae, "n_latents": p.n_latents, "k": p.k, "loss": p.loss, "fitted": float(f),
             "log_residual": float(math.log(p.loss) - math.log(f))} for p, f in zip(points, fitted, strict=True)]


def fit_fixed_k(points: list[ScalingPoint]) -> dict:
    """``L(N) = c * N**a + e`` over ``points`` of one k (>= ``MIN_WIDTHS`` distinct widths):
    ``parameters`` (log_c, a = the exponent, e = the irreducible loss) each with its value and 95%
    interval, ``residuals`` per point (log observed - log fitted) and ``rms_log_residual``.
    ScalingRefused with too few widths."""
    from scipy.optimize import curve_fit

    widths = sorted({p.n_latents for p in points})
    if len(widths) < MIN_WIDTHS:
        raise ScalingRefused(f"k = {points[0].k}: {len(widths)} width(s) ({', '.join(map(str, widths))}); L(N) = "
                             f"c N^a + e needs >= {MIN_WIDTHS}", f"add TopK entries at k = {points[0].k} with "
                             f"{MIN_WIDTHS - len(widths)} more n_latents to the sweep (config/sweep-scaling.yaml)")
    log_n = np.log([p.n_latents for p in points])
    log_l = np.log([p.loss for p in points])
    floor = min(p.loss for p in points)
    p0 = (float(log_l.max() + 0.3 * log_n.min()), -0.3, 0.5 * floor)
    values, covariance = curve_fit(_fixed_k_log, log_n, log_l, p0=p0, maxfev=20_000,
                                   bounds=([-np.inf, -5.0, 0.0], [np.inf, 0.0, floor]))
    fitted = np.exp(_fixed_k_log(log_n, *values))
    residuals = _residuals(points, fitted)
    return {"k": points[0].k, "parameters": _intervals(FIXED_K_PARAMETERS, values, covariance,
                                                       len(points) - len(values)),
            "residuals": residuals, "rms_log_residual": _rms(residuals)}


def fit_joint(points: list[ScalingPoint]) -> dict:
    """Gao's joint ``L(N, k)`` (module docstring) over ``points``: ``parameters`` (alpha, beta_k,
    beta_N, gamma, zeta, eta) with 95% intervals, ``n_exponent_at_k`` (the exponent of the
    reducible term in N at each k: beta_N + gamma log k), residuals and their rms. ScalingRefused
    with fewer than ``MIN_KS`` values of k or ``MIN_WIDTHS`` widths."""
    from scipy.optimize import curve_fit

    ks, widths = sorted({p.k for p in points}), sorted({p.n_latents for p in points})
    if len(ks) < MIN_KS or len(widths) < MIN_WIDTHS or len(points) <= len(JOINT_PARAMETERS) + 1:
        raise ScalingRefused(f"{len(ks)} value(s) of k and {len(widths)} width(s) ({len(points)} SAEs); the joint "
                             f"L(N, k) needs >= {MIN_KS} k x {MIN_WIDTHS} widths",
                             "train a grid of TopK SAEs, e.g. config/sweep-scaling.yaml")
    nk = np.log([[p.n_latents for p in points], [p.k for p in points]])
    log_l = np.log([p.loss for p in points])
    floor = float(np.log(0.5 * min(p.loss for p in points)))
    p0 = (float(log_l.max()), 0.0, -0.2, 0.0, floor, 0.0)
    values, covariance = curve_fit(_joint_log, nk, log_l, p0=p0, maxfev=50_000)
    fitted = np.exp(_joint_log(nk, *values))
    residuals = _residuals(points, fitted)
    params = dict(zip(JOINT_PARAMETERS, values, strict=True))
    return {"parameters": _intervals(JOINT_PARAMETERS, values, covariance, len(points) - len(values)),
            "n_exponent_at_k": {k: float(params["beta_N"] + params["gamma"] * math.log(k)) for k in ks},
            "residuals": residuals, "rms_log_residual": _rms(residuals)}


def _rms(residuals: list[dict]) -> float:
    return float(np.sqrt(np.mean([r["log_residual"] ** 2 for r in residuals])))


def fit_scaling_laws(points: list[ScalingPoint]) -> dict:
    """Both forms over ``points`` (TopK SAEs; non-finite or non-positive losses are left out):
    ``fixed_k`` (one ``fit_fixed_k`` per k with enough widths), ``joint`` (``fit_joint``, or None),
    ``not_fitted`` (why each skipped fit was skipped) and ``n_points``. ScalingRefused when no
    k has ``MIN_WIDTHS`` widths, naming the widths per k the sweep has."""
    usable = [p for p in points if math.isfinite(p.loss) and p.loss > 0]
    by_k: dict[int, list[ScalingPoint]] = {}
    for p in usable:
        by_k.setdefault(p.k, []).append(p)
    fixed, skipped = [], []
    for k in sorted(by_k):
        try:
            fixed.append(fit_fixed_k(by_k[k]))
        except ScalingRefused as refused:
            skipped.append(str(refused))
    if not fixed:
        have = "; ".join(f"k = {k}: widths {sorted({p.n_latents for p in ps})}" for k, ps in sorted(by_k.items()))
        have = have or "no TopK SAE evaluated"
        raise ScalingRefused(f"no k has {MIN_WIDTHS} evaluated TopK widths for a scaling-law fit ({have})",
                             f"train a grid of TopK SAEs: >= {MIN_WIDTHS} widths x {MIN_KS} values of k, e.g. "
                             "SAE_PLATFORM_SWEEP=config/sweep-scaling.yaml")
    try:
        joint = fit_joint(usable)
    except ScalingRefused as refused:
        joint, skipped = None, [*skipped, f"joint L(N, k): {refused}"]
    return {"fixed_k": fixed, "joint": joint, "not_fitted": skipped, "n_points": len(usable)}


def fixed_k_curve(fit_at_k: dict, n_latents: np.ndarray) -> np.ndarray:
    """A ``fit_fixed_k`` result's L at ``n_latents``."""
    values = [fit_at_k["parameters"][name]["value"] for name in FIXED_K_PARAMETERS]
    return np.exp(_fixed_k_log(np.log(n_latents), *values))


def joint_curve(joint: dict, n_latents: np.ndarray, k: int) -> np.ndarray:
    """A ``fit_joint`` result's L at ``n_latents`` and ``k``."""
    values = [joint["parameters"][name]["value"] for name in JOINT_PARAMETERS]
    return np.exp(_joint_log(np.log([n_latents, np.full_like(n_latents, k, dtype=np.float64)]), *values))


def _interval_text(p: dict) -> str:
    return f"{p['value']:.3g} [{p['low']:.3g}, {p['high']:.3g}]"


def scaling_summary(fit: dict) -> list[dict]:
    """One row per fitted exponent or irreducible term (form, k, parameter, value, 95% interval),
    for a metadata table and the page."""
    rows = [{"form": "L(N) = c N^a + e", "k": one["k"], "parameter": name, **one["parameters"][name],
             "rms_log_residual": one["rms_log_residual"]} for one in fit["fixed_k"] for name in ("a", "e")]
    if fit.get("joint"):
        rows += [{"form": "joint L(N, k)", "k": None, "parameter": name, **fit["joint"]["parameters"][name],
                  "rms_log_residual": fit["joint"]["rms_log_residual"]} for name in JOINT_PARAMETERS]
    return rows


SUMMARY_COLUMNS = {"form": "string", "k": "int", "parameter": "string", "value": "float", "low": "float",
                   "high": "float", "rms_log_residual": "float"}


def scaling_html(fit: dict | None, png_data_url: str | None, refusal: str | None = None) -> str:
    """The comparison page's scaling section: the plot (a data URL), the exponents with their 95%
    intervals, and what was not fitted; or the refusal."""
    if fit is None:
        return f"<h2>Scaling laws</h2><p>Not fitted: {html.escape(refusal or 'no evaluated TopK SAE')}</p>"
    rows = "".join(f"<tr><td>{html.escape(r['form'])}</td><td class=num>{'' if r['k'] is None else r['k']}</td>"
                   f"<td>{html.escape(r['parameter'])}</td><td class=num>{html.escape(_interval_text(r))}</td>"
                   f"<td class=num>{r['rms_log_residual']:.3g}</td></tr>" for r in scaling_summary(fit))
    skipped = "".join(f"<li>{html.escape(s)}</li>" for s in fit["not_fitted"])
    image = f"<p><img alt=\"scaling-law fit\" src=\"{html.escape(png_data_url, quote=True)}\"></p>" \
        if png_data_url else ""
    return (f"<h2>Scaling laws</h2><p>Normalized MSE (FVU on held-out rows) of the TopK SAEs against n_latents and "
            f"k, fitted with the forms of Gao et al. 2024 §3.1 ({fit['n_points']} SAEs); value [95% interval].</p>"
            f"{image}<table><thead><tr><th>form</th><th>k</th><th>parameter</th><th>value [95%]</th>"
            f"<th>rms log residual</th></tr></thead><tbody>{rows}</tbody></table>"
            + (f"<p>Not fitted:</p><ul>{skipped}</ul>" if skipped else ""))
