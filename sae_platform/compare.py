"""Every trained SAE of the sweep side by side on every evaluation figure: a table and one HTML page.

Rows come from each SAE's committed evaluation report (``eval/<name>/report.json``, written by
``evaluate.evaluate_sae``): reconstruction (FVU, L0, dead fraction), downstream loss recovered and
the feature metrics of Gao et al. 2024 (N2G precision/recall, ablation sparsity, probe loss and its
neuron baseline). SAEs of different hook points (``hook_point``: the report's ``hook_name``, a
transcoder's ``hook_name_in -> hook_name``) read different activations, so a column's best value is
marked among the SAEs of the same hook point only. The page is static HTML with every value escaped
(``html.escape``), no script.
"""

import html
import math
import time

from sae_platform.catalog import EVAL_REPORT, HookEntry, eval_name
from sae_platform.metric_info import GROUPS, HIGHER, LOWER, metric_info

COLUMN_KEYS = ("fvu", "explained_variance", "explained_variance_about_zero", "l0", "dead_fraction", "loss_recovered",
               "kl_div_score", "n2g_precision", "n2g_recall", "ablation_sparsity", "probe_loss", "probe_loss_neurons",
               "average_max_decoder_cosine", "meta_sae_fve", "checkpoint_step", "training_tokens")
COLUMNS = tuple((key, metric_info(key).label, {LOWER: True, HIGHER: False}.get(metric_info(key).better))
                for key in COLUMN_KEYS)  # (report key, heading, lower is better: True / False / None = no direction)
PAGE_CSP = "default-src 'none'; style-src 'unsafe-inline'"  # static HTML: no script, inline style only


def comparison_rows(store, names: list[str]) -> list[dict]:
    """One row per SAE of ``names`` that has an evaluation report: name, hook point (None in
    reports from before hook points were named) and every figure of ``COLUMNS`` (None when not
    measured)."""
    rows = []
    for name in names:
        path = store.resolve(eval_name(name))
        if path is None:
            continue
        report = store.read_json(f"{path}/{EVAL_REPORT}")
        row = {"sae": name, "hook_point": HookEntry.spec_of(report)}
        for key, _, _ in COLUMNS:
            value = report.get(key)
            row[key] = value if isinstance(value, int | float) and not isinstance(value, bool) and \
                math.isfinite(value) else None
        rows.append(row)
    return rows


def _best(rows: list[dict], key: str, lower: bool | None, hook_point: str | None = None):
    """The best value of column ``key`` among the rows of ``hook_point``."""
    values = [r[key] for r in rows if r[key] is not None and r.get("hook_point") == hook_point]
    if lower is None or len(values) < 2:
        return None
    return min(values) if lower else max(values)


def _grouped_columns() -> list[tuple[str, list[tuple[str, str, bool | None]]]]:
    """``COLUMNS`` by metric group (``metric_info.GROUPS`` order): [(group, columns)]."""
    return [(g, cols) for g in GROUPS if (cols := [c for c in COLUMNS if metric_info(c[0]).group == g])]


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


def comparison_html(rows: list[dict], title: str = "SAE sweep comparison") -> str:
    """A self-contained HTML page: one row per SAE, the columns grouped (reconstruction, sparsity,
    downstream, feature quality, training) with their direction, the best value of each column in
    bold, and the definition of every column (``sae_platform.metric_info``) below the table."""
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
th[scope=colgroup]{{text-align:center;border-bottom:2px solid #888}}table.defs td{{vertical-align:top}}</style>
</head><body><h1>{html.escape(title)}</h1>
<p>Every trained SAE of the sweep on its held-out evaluation (sae_eval), each metric measured at the SAE's own hook
point. ↓ lower is better, ↑ higher is better; the best of each column among the SAEs of the same hook point in bold
(other hook points read other activations).</p>
<table><thead><tr><th rowspan=2>SAE</th><th rowspan=2>hook point</th>{groups}</tr><tr>{head}</tr></thead><tbody>
{chr(10).join(body) if body else '<tr><td colspan=99>No SAE has been evaluated yet.</td></tr>'}
</tbody></table>
{_definitions_html()}
<p><small>generated {generated}</small></p></body></html>
"""
