"""PNG figures for training and evaluation (returned as bytes, for Dagster metadata and the browser).

Figures are drawn with matplotlib's object API on an Agg canvas: no pyplot, no global backend
switch, no display needed, and safe to call from worker threads.
"""

import io
import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# (history key, panel title, y scale)
CURVE_PANELS = (
    ("loss", "training loss", "log"),
    ("nmse", "normalized MSE", "log"),
    ("l0", "L0 (active latents per token)", "log"),
    ("dead_fraction", "dead fraction", "linear"),
)


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _finite(value) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def training_curves_png(history: list[dict]) -> bytes:
    """2x2 panels (loss, normalized MSE, L0, dead fraction) against tokens seen.

    Rows may lack any key, or hold None/NaN: those points are skipped, and a panel with no
    points says so. Without a ``tokens`` key the row number is the x axis. Loss, NMSE and L0 are
    on log scales (they fall over orders of magnitude); the dead fraction is linear in [0, 1]."""
    fig = Figure(figsize=(10, 7), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    has_tokens = any(_finite(row.get("tokens")) for row in history)
    for ax, (key, title, scale) in zip(axes, CURVE_PANELS):
        points = [(float(row["tokens"]) if has_tokens else float(i), float(row[key]))
                  for i, row in enumerate(history)
                  if _finite(row.get(key)) and (not has_tokens or _finite(row.get("tokens")))]
        ax.set_title(title)
        if scale == "log":
            points = [(x, y) for x, y in points if y > 0]
        if not points:
            ax.text(0.5, 0.5, f"no {key} recorded", ha="center", va="center", transform=ax.transAxes,
                    color="gray")
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None, linewidth=1.2)
        ax.set_yscale(scale)
        if key == "dead_fraction":
            ax.set_ylim(0, max(0.05, min(1.0, max(ys) * 1.1)))
        ax.set_xlabel("tokens" if has_tokens else "log row")
        ax.grid(True, which="major", alpha=0.3)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4), useMathText=True)
    last = history[-1] if history else {}
    summary = ", ".join(f"{k} {last[k]:.4g}" for k, _, _ in CURVE_PANELS if _finite(last.get(k)))
    fig.suptitle("SAE training" + (f" (last: {summary})" if summary else ""))
    return _png(fig)


def density_histogram_png(density: np.ndarray, n_tokens: int | None = None) -> bytes:
    """Histogram of log10 firing frequency over latents. Dead latents (density 0) have no log
    and are counted in the title instead. ``n_tokens`` (optional) adds the resolution floor
    log10(1 / n_tokens) as a dashed line."""
    density = np.asarray(density, dtype=np.float64).ravel()
    alive = density[density > 0]
    n, n_dead = density.size, int((density <= 0).sum())
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    dead_pct = 100.0 * n_dead / n if n else 0.0
    ax.set_title(f"latent firing frequency: {n} latents, {n_dead} dead ({dead_pct:.1f}%, never fired)")
    if alive.size:
        logs = np.log10(alive)
        lo, hi = float(logs.min()), float(logs.max())
        bins = np.linspace(lo - 0.05, hi + 0.05, 51) if hi - lo > 1e-9 else 10
        ax.hist(logs, bins=bins, color="tab:blue", alpha=0.85)
        ax.axvline(float(np.median(logs)), color="tab:orange", linestyle="-", linewidth=1,
                   label=f"median {np.median(alive):.2e}")
        if n_tokens:
            ax.axvline(-math.log10(n_tokens), color="gray", linestyle="--", linewidth=1,
                       label=f"1 / {n_tokens} tokens")
        ax.legend(loc="upper left", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no latent fired", ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xlabel("log10(fraction of tokens the latent fires on)")
    ax.set_ylabel("latents")
    ax.grid(True, alpha=0.3)
    return _png(fig)


def scaling_laws_png(points, fit: dict) -> bytes:
    """The log-log plot of ``scaling.fit_scaling_laws``: normalized MSE against n_latents, one
    colour per k, the SAEs as points, the joint fit solid and each fixed-k fit dashed."""
    from sae_platform.scaling import fixed_k_curve, joint_curve

    fig = Figure(figsize=(7, 4.8), layout="constrained")
    ax = fig.add_subplot()
    ks = sorted({p.k for p in points})
    colours = {k: f"C{i % 10}" for i, k in enumerate(ks)}
    grid = np.geomspace(min(p.n_latents for p in points), max(p.n_latents for p in points), 100)
    for k in ks:
        mine = [p for p in points if p.k == k]
        ax.scatter([p.n_latents for p in mine], [p.loss for p in mine], color=colours[k], label=f"k = {k}", zorder=3)
        if fit.get("joint"):
            ax.plot(grid, joint_curve(fit["joint"], grid, k), color=colours[k])
    for one in fit["fixed_k"]:
        ax.plot(grid, fixed_k_curve(one, grid), color=colours[one["k"]], linestyle="--")
    ax.set(xscale="log", yscale="log", xlabel="n_latents (N)", ylabel="normalized MSE (FVU, held-out rows)",
           title="Scaling laws (Gao et al. 2024): joint fit solid, fixed k dashed")
    ax.legend()
    return _png(fig)


def stage_scaling_png(by_tokens: dict, by_latents: dict, *, loaded: bool = False) -> bytes:
    """The platform's cost against the work (``benchmarks/scaling.py``, not the loss scaling law):
    2 x 2 log-log panels, time per token (top) and peak RSS per job (bottom) against the tokens
    (left) and the SAE's latents (right), one line per stage. ``by_tokens`` / ``by_latents``: stage ->
    (sizes, seconds per token, peak RSS bytes), lists of one length; ``loaded`` marks the title."""
    fig = Figure(figsize=(10, 7), layout="constrained")
    axes = fig.subplots(2, 2)
    stages = list(dict.fromkeys([*by_tokens, *by_latents]))
    colours = {name: f"C{i % 10}" for i, name in enumerate(stages)}
    for column, (curves, xlabel) in enumerate(((by_tokens, "tokens"), (by_latents, "latents (SAE width)"))):
        for name, (sizes, per_token, peak) in curves.items():
            axes[0, column].plot(sizes, [t * 1e6 for t in per_token], marker="o", color=colours[name], label=name)
            axes[1, column].plot(sizes, [b / 2**20 for b in peak], marker="o", color=colours[name], label=name)
        axes[0, column].set(xscale="log", yscale="log", ylabel="time per token (us)", title=f"against {xlabel}")
        axes[1, column].set(xscale="log", yscale="log", xlabel=xlabel, ylabel="peak RSS of the job (MiB)")
    axes[0, 0].legend(fontsize="small")
    fig.suptitle("Cost of each stage as the work grows" + (" (loaded machine)" if loaded else ""))
    return _png(fig)


def absorption_by_letter_png(letters: list[dict]) -> bytes:
    """Bar chart of the mean absorption fraction and full-absorption rate per first letter
    (``letters``: the ``letters`` of an absorption result; each in [0, 1])."""
    fig = Figure(figsize=(9, 4), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(letters))
    ax.bar(x - 0.2, [r["mean_absorption_fraction"] for r in letters], 0.4, label="mean absorption fraction",
           color="tab:blue")
    ax.bar(x + 0.2, [r["full_absorption_rate"] for r in letters], 0.4, label="full absorption rate",
           color="tab:orange")
    ax.set_xticks(x, [r["first_letter"] for r in letters])
    ax.set_ylim(0, 1)
    ax.set_xlabel("first letter (letters whose ground-truth probe has test F1 > the bar)")
    ax.set_title("feature absorption per letter (SAEBench, Chanin et al. 2024)")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return _png(fig)


def absorption_probe_f1_png(probe_f1: dict[str, float], threshold: float, needed: int) -> bytes:
    """Bar chart of the ground-truth probe's test F1 per first letter (``probe_f1``: letter -> F1 in
    [0, 1]), the ``threshold`` a letter must exceed to count as a dashed line: what an absorption
    refusal (fewer than ``needed`` letters counted) rests on."""
    letters = sorted(probe_f1)
    counted = [probe_f1[letter] > threshold for letter in letters]
    fig = Figure(figsize=(9, 4), layout="constrained")
    ax = fig.subplots()
    ax.bar(np.arange(len(letters)), [probe_f1[letter] for letter in letters],
           color=["tab:blue" if c else "tab:gray" for c in counted])
    ax.axhline(threshold, color="tab:orange", linestyle="--", linewidth=1, label=f"F1 > {threshold:g} counts")
    ax.set_xticks(np.arange(len(letters)), letters)
    ax.set_ylim(0, 1)
    ax.set_xlabel("first letter")
    ax.set_ylabel("ground-truth probe test F1")
    ax.set_title(f"absorption: {sum(counted)} of {len(letters)} letters readable by the probe "
                 f"({needed} needed for a score)")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return _png(fig)


def absorption_png(result: dict) -> bytes | None:
    """The per-letter chart of an absorption result (``absorption.absorb_checkpoint``): the absorption
    fraction and full-absorption rate per counted letter when scored; the probe's F1 per letter
    against its threshold when refused for too few letters; None when there is neither (a refusal
    before any probe, e.g. a transcoder)."""
    if result.get("scored") and result.get("letters"):
        return absorption_by_letter_png(result["letters"])
    if result.get("probe_f1"):
        settings = result["settings"]  # the AbsorptionSettings it was measured with
        return absorption_probe_f1_png(result["probe_f1"], settings["min_GT_probe_f1"], settings["min_feats_for_eval"])
    return None
