"""Every trained SAE of the sweep side by side on every evaluation figure: a table and one HTML page.

Rows come from each SAE's committed evaluation report (``eval/<name>/report.json``, written by
``evaluate.evaluate_sae``): reconstruction (FVU, L0, dead fraction), downstream loss recovered and
the feature metrics of Gao et al. 2024 (N2G precision/recall, ablation sparsity, probe loss and its
neuron baseline), SAEBench's core figures in the report, the accuracies of k-sparse probing at each
k and with every latent (SAE and residual, from ``sparse_probing/<name>/result.json`` when
``sae_sparse_probing`` has run), and SAEBench's feature absorption when ``sae_absorption`` scored it
(``absorption/<name>/absorption.json``; a refusal reads "refused", its reason listed under the table). SAEs of
different hook points (``hook_point``: the report's ``hook_name``, a transcoder's
``hook_name_in -> hook_name``) read different activations, so a column's best value is marked
among the SAEs of the same hook point only. The page is static HTML with every value escaped
(``html.escape``), no script.
"""

import hashlib
import html
import json
import math
import time

from sae_platform.catalog import (
    ABSORPTION_REPORT,
    EVAL_REPORT,
    SPARSE_PROBING_RESULT,
    HookEntry,
    absorption_name,
    eval_name,
    sparse_probing_name,
)
from sae_platform.metric_info import (
    GROUPS,
    HIGHER,
    LOWER,
    SPARSE_PROBING_K_VALUES,
    SPARSE_PROBING_METRICS,
    metric_info,
    sparse_probing_key,
)
from sae_platform.reseeds import SweepUnit

COLUMN_KEYS = ("fvu", "explained_variance", "explained_variance_about_zero", "l0", "dead_fraction", "loss_recovered",
               "kl_div_score", "n2g_precision", "n2g_recall", "ablation_sparsity", "probe_loss", "probe_loss_neurons",
               *(m.key for m in SPARSE_PROBING_METRICS),
               "mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features",
               "average_max_decoder_cosine", "meta_sae_fve", "checkpoint_step", "training_tokens")
# comparison column → the key of sparse probing's averages over all tasks (sparse_probing/<sae>/result.json)
SPARSE_PROBING_COLUMNS = {sparse_probing_key(side, k): f"{side}_{'' if k is None else f'top_{k}_'}test_accuracy"
                          for side in ("sae", "llm") for k in (*SPARSE_PROBING_K_VALUES, None)}
ABSORPTION_KEYS = ("mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features")
COLUMNS = tuple((key, metric_info(key).label, {LOWER: True, HIGHER: False}.get(metric_info(key).better))
                for key in COLUMN_KEYS)  # (report key, heading, lower is better: True / False / None = no direction)
PAGE_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"  # no script; inline style, data: images
# Figures against the known features, measured only on synthetic activations (sae_platform/ground_truth.py):
# a panel of their own, shown when any SAE has them.
GROUND_TRUTH_KEYS = ("gt_mcc", "gt_mcc_chance", "gt_uniqueness", "gt_f1", "gt_precision", "gt_recall", "gt_shrinkage",
                     "gt_absorption")
# The figures that get error bars over reseeds: every measured one but the training counters and
# the chance MCC (a property of the truth and the width, the same for every seed).
SPREAD_KEYS = tuple(k for k in (*COLUMN_KEYS, *GROUND_TRUTH_KEYS)
                    if metric_info(k).group != "training" and k != "gt_mcc_chance")


def comparison_rows(store, names: list[str]) -> list[dict]:
    """One row per SAE of ``names`` that has an evaluation report: name, hook point (None in
    reports from before hook points were named), every figure of ``COLUMNS`` and of
    ``GROUND_TRUTH_KEYS`` (None when not measured) and ``intervals``: metric -> the report's 95%
    bootstrap interval ``[low, high]`` where the evaluation measured one (``evaluate``: FVU, L0,
    loss recovered)."""
    rows = []
    for name in names:
        path = store.resolve(eval_name(name))
        if path is None:
            continue
        report = {**store.read_json(f"{path}/{EVAL_REPORT}"), **saebench_figures(store, name)}
        row = {"sae": name, "hook_point": HookEntry.spec_of(report),
               "absorption_refusal": (absorption_result(store, name) or {}).get("refusal")}
        for key in (*COLUMN_KEYS, *GROUND_TRUTH_KEYS):
            value = report.get(key)
            row[key] = value if isinstance(value, int | float) and not isinstance(value, bool) and \
                math.isfinite(value) else None
        row["intervals"] = {key: report[f"{key}_interval"] for key in SPREAD_KEYS
                            if isinstance(report.get(f"{key}_interval"), list)}
        rows.append(row)
    return rows


def sparse_probing_figures(store, name: str) -> dict:
    """The comparison's sparse-probing columns of SAE ``name`` (``SPARSE_PROBING_COLUMNS``), from
    its committed ``sae_sparse_probing`` result; {} before one (or when it has no score)."""
    path = store.resolve(sparse_probing_name(name))
    if path is None:
        return {}
    averages = store.read_json(f"{path}/{SPARSE_PROBING_RESULT}").get("averages", {}).get("all", {})
    return {column: averages.get(key) for column, key in SPARSE_PROBING_COLUMNS.items()}


def absorption_result(store, name: str) -> dict | None:
    """The committed absorption result of ``name`` (``sae_absorption``'s ``absorption.json``: ``scored``,
    ``refusal``, ``metrics``, ``letters``, ``probe_f1`` …); None when not measured."""
    path = store.resolve(absorption_name(name))
    return store.read_json(f"{path}/{ABSORPTION_REPORT}") if path else None


def saebench_figures(store, name: str) -> dict:
    """The SAEBench figures of SAE ``name`` measured outside ``sae_eval``: sparse probing's mean
    accuracies per k (``SPARSE_PROBING_COLUMNS``) and absorption's means and standard deviations
    over letters; a figure not measured (or refused) is absent."""
    return {**sparse_probing_figures(store, name), **((absorption_result(store, name) or {}).get("metrics") or {})}


FIGURE_ARTIFACTS = (eval_name, sparse_probing_name, absorption_name)  # where an SAE's figures are committed


def figures_version(store, names: list[str], artifacts=FIGURE_ARTIFACTS) -> str:
    """One hash of the committed versions of ``artifacts`` (default: evaluation, sparse probing,
    absorption) of every SAE of ``names``: what a page showing their figures was built from, so it
    can tell when a figure it shows was measured again (16 hex digits; a missing artifact counts
    as None)."""
    versions = [(store.pointer(artifact(name)) or {}).get("version") for name in names for artifact in artifacts]
    return hashlib.sha256(json.dumps(versions).encode()).hexdigest()[:16]


def _best(rows: list[dict], key: str, lower: bool | None, hook_point: str | None = None):
    """The best value of column ``key`` among the rows of ``hook_point``."""
    values = [r[key] for r in rows if r[key] is not None and r.get("hook_point") == hook_point]
    if lower is None or len(values) < 2:
        return None
    return min(values) if lower else max(values)


def _grouped_columns() -> list[tuple[str, list[tuple[str, str, bool | None]]]]:
    """``COLUMNS`` by metric group (``metric_info.GROUPS`` order): [(group, columns)]."""
    return [(g, cols) for g in GROUPS if (cols := [c for c in COLUMNS if metric_info(c[0]).group == g])]


def ground_truth_rows(rows: list[dict]) -> list[dict]:
    """The rows of SAEs scored against known features: sae, hook point and ``GROUND_TRUTH_KEYS``."""
    return [{k: r[k] for k in ("sae", "hook_point", *GROUND_TRUTH_KEYS)} for r in rows if r["gt_mcc"] is not None]


def _ground_truth_html(rows: list[dict], cell) -> str:
    """The ground-truth panel: one row per SAE trained on synthetic activations, each figure's
    best in bold, with the definitions; "" when no SAE has ground-truth figures."""
    scored = ground_truth_rows(rows)
    if not scored:
        return ""
    directions = {key: {LOWER: True, HIGHER: False}.get(metric_info(key).better) for key in GROUND_TRUTH_KEYS}
    head = "".join(f"<th>{html.escape(metric_info(k).label)} {metric_info(k).arrow}</th>" for k in GROUND_TRUTH_KEYS)
    body = []
    for r in scored:
        tds = []
        for key in GROUND_TRUTH_KEYS:
            best = _best(scored, key, directions[key], r.get("hook_point"))
            text = html.escape(cell(r[key]))
            tds.append(f"<td class=num>{'<b>' + text + '</b>' if best is not None and r[key] == best else text}</td>")
        body.append(f"<tr><th scope=row>{html.escape(r['sae'])}</th>{''.join(tds)}</tr>")
    legend = "".join(f"<li><b>{html.escape(metric_info(k).label)}</b>: {html.escape(metric_info(k).definition)}"
                     f"{' (' + html.escape(metric_info(k).source) + ')' if metric_info(k).source else ''}</li>"
                     for k in GROUND_TRUTH_KEYS)
    return ("<h2 id=ground-truth>Against the known features (synthetic activations)</h2>"
            "<p>These SAEs were trained on synthetic activations whose true feature directions and firings are "
            "known (sae_platform/synthetic.py); each figure is measured on fresh rows of the same generator.</p>"
            f"<table class=gt><thead><tr><th>SAE</th>{head}</tr></thead><tbody>\n" + "\n".join(body)
            + f"</tbody></table><ul>{legend}</ul>")


def _refusals_html(rows: list[dict]) -> str:
    """Why an SAE has no absorption score (``sae_absorption``'s refusal), one line per SAE; "" when none."""
    refused = [f"<li><b>{html.escape(r['sae'])}</b>: {html.escape(r['absorption_refusal'])}</li>"
               for r in rows if r.get("absorption_refusal")]
    return (f"<p id=absorption-refusals>Feature absorption not scored (a refusal, not a failure):</p><ul>"
            f"{''.join(refused)}</ul>" if refused else "")


def _definitions_html() -> str:
    """The legend: one row per column, from ``metric_info`` (group, unit, direction, definition, source)."""
    rows = []
    for group, cols in _grouped_columns():
        for key, heading, _ in cols:
            m = metric_info(key)
            rows.append(f"<tr><th scope=row>{html.escape(heading)}</th><td>{html.escape(group)}</td>"
                        f"<td>{html.escape(m.unit)}</td><td>{m.arrow} {html.escape(m.better or '')}</td>"
                        f"<td>{html.escape(m.definition)}</td><td>{html.escape(m.source)}</td></tr>")
    return ("<h2>What the figures mean</h2><table class=defs><thead><tr><th>figure</th><th>group</th><th>unit</th>"
            "<th>better</th><th>definition</th><th>source</th></tr></thead><tbody>\n" + "\n".join(rows)
            + "</tbody></table>")


def comparison_html(rows: list[dict], title: str = "SAE sweep comparison", sections: tuple[str, ...] = ()) -> str:
    """A self-contained HTML page: one row per SAE, the columns grouped (reconstruction, sparsity,
    downstream, feature quality, training) with their direction, the best value of each column in
    bold, then ``sections`` (HTML built here, e.g. ``reseeds_html``, ``scaling.scaling_html``),
    and the definition of every column (``sae_platform.metric_info``) below."""
    def cell(v):
        if v is None:
            return "–"
        return f"{v:,}" if isinstance(v, int) else f"{v:.4g}"
    grouped = _grouped_columns()
    ordered = [c for _, cols in grouped for c in cols]
    groups = "".join(f"<th colspan={len(cols)} scope=colgroup>{html.escape(g)}</th>" for g, cols in grouped)
    head = "".join(f"<th title=\"{html.escape(metric_info(key).unit, quote=True)}\">{html.escape(h)}"
                   f"{' ' + metric_info(key).arrow if metric_info(key).arrow else ''}</th>" for key, h, _ in ordered)
    body = []
    for r in rows:
        tds = []
        for key, _, lower in ordered:
            if key in ABSORPTION_KEYS and r.get("absorption_refusal"):
                reason = html.escape(r["absorption_refusal"], quote=True)
                tds.append(f"<td class=refused title=\"{reason}\">refused</td>")
                continue
            best = _best(rows, key, lower, r.get("hook_point"))
            text = html.escape(cell(r[key]))
            tds.append(f"<td class=num>{'<b>' + text + '</b>' if best is not None and r[key] == best else text}</td>")
        hook = html.escape(r.get("hook_point") or "–")
        body.append(f"<tr><th scope=row>{html.escape(r['sae'])}</th><td>{hook}</td>{''.join(tds)}</tr>")
    generated = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{PAGE_CSP}">
<title>{html.escape(title)}</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{padding:.3em .7em;border-bottom:1px solid #ddd;text-align:left}}td.num{{text-align:right}}
th[scope=colgroup]{{text-align:center;border-bottom:2px solid #888}}table.defs td{{vertical-align:top}}
.tie{{color:#a50}}td.refused{{color:#a50;text-align:right}}</style>
</head><body><h1>{html.escape(title)}</h1>
<p>Every trained SAE of the sweep on its held-out evaluation (sae_eval), each metric measured at the SAE's own hook
point. ↓ lower is better, ↑ higher is better; the best of each column among the SAEs of the same hook point in bold
(other hook points read other activations).</p>
<table><thead><tr><th rowspan=2>SAE</th><th rowspan=2>hook point</th>{groups}</tr><tr>{head}</tr></thead><tbody>
{chr(10).join(body) if body else '<tr><td colspan=99>No SAE has been evaluated yet.</td></tr>'}
</tbody></table>
{_refusals_html(rows)}
{_ground_truth_html(rows, cell)}
{chr(10).join(sections)}
{_definitions_html()}
<p><small>generated {generated}</small></p></body></html>
"""


# -- error bars: reseeds and bootstrap intervals (sae_platform.reseeds) ---------------------------

def _spread_cell(unit: SweepUnit, key: str, marks: dict) -> str:
    spread, interval = unit.spreads.get(key), unit.intervals.get(key)
    if spread is None:
        return "<td class=num>–</td>"
    text = html.escape(spread.text())
    if spread.n == 1 and interval is not None:
        text += f"<br><small>95% CI [{interval[0]:.4g}, {interval[1]:.4g}]</small>"
    tied = marks.get((unit.sae, key))
    if tied:
        text += f"<br><small class=tie>≈ {html.escape(', '.join(tied))}</small>"
    return f"<td class=num>{text}</td>"


def reseeds_html(units: list[SweepUnit], marks: dict, consistency: dict[str, dict]) -> str:
    """The error-bar section of the comparison page: per SAE (a reseed group or a lone SAE) each
    figure as mean ± sd over its seeds (a lone seed: its value and 95% bootstrap interval), with
    "≈ X" where it is not distinguishable from X (``reseeds.not_distinguishable``), and the
    cross-seed decoder consistency of each group (``consistency``: group -> ``decoder_consistency``).
    Only the figures some SAE measured get a column (the ground-truth ones only on synthetic data)."""
    keys = [key for key in SPREAD_KEYS if any(key in u.spreads for u in units)]
    head = "".join(f"<th>{html.escape(metric_info(key).label)} {metric_info(key).arrow}</th>" for key in keys)
    body = "\n".join(f"<tr><th scope=row>{html.escape(u.sae)}</th><td class=num>{len(u.members)}</td>"
                     + "".join(_spread_cell(u, key, marks) for key in keys) + "</tr>" for u in units)
    agree = "".join(f"<li>{html.escape(group)}: {c['consistent_fraction']:.1%} of latents have a partner at cosine "
                    f"≥ {c['threshold']:g} in another seed (mean matched cosine {c['mean_cosine']:.3f}, "
                    f"{html.escape(c['method'])} matching, {c['n_latents']:,} latents)</li>"
                    for group, c in consistency.items())
    return (f"<h2>Error bars</h2><p>Each figure as mean ± sd over the SAE's reseeds (n = seeds); a single seed shows "
            f"its 95% bootstrap interval over held-out rows (FVU, L0) or held-out contexts (loss recovered). "
            f"<span class=tie>≈ X</span>: not distinguishable from X on that figure — their difference is below "
            f"the figure's minimum reliable difference (two-sample t-test at 5%, reseed sd pooled over every "
            f"reseeded SAE of the sweep; no mark without reseeds).</p>"
            f"<table><thead><tr><th>SAE</th><th>seeds</th>{head}</tr></thead><tbody>\n{body}</tbody></table>"
            + (f"<h3>Cross-seed feature consistency</h3><ul>{agree}</ul>" if agree else ""))


def reseeds_table(units: list[SweepUnit], marks: dict) -> list[dict]:
    """The same as ``reseeds_html``, one row per (SAE, figure), for the Dagster metadata table."""
    return [{"sae": u.sae, "figure": key, "seeds": s.n, "mean": s.mean, "sd": s.sd,
             "ci_low": u.intervals[key][0] if s.n == 1 and key in u.intervals else None,
             "ci_high": u.intervals[key][1] if s.n == 1 and key in u.intervals else None,
             "not_distinguishable_from": ", ".join(marks.get((u.sae, key), []))}
            for u in units for key, s in u.spreads.items()]


RESEEDS_TABLE_COLUMNS = {"sae": "string", "figure": "string", "seeds": "int", "mean": "float", "sd": "float",
                         "ci_low": "float", "ci_high": "float", "not_distinguishable_from": "string"}
