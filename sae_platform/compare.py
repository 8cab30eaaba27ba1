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

COLUMNS = (
    ("fvu", "FVU", True), ("l0", "L0", None), ("dead_fraction", "dead", True),
    ("loss_recovered", "loss recovered", False), ("n2g_precision", "N2G precision", False),
    ("n2g_recall", "N2G recall", False), ("ablation_sparsity", "ablation sparsity", True),
    ("probe_loss", "probe loss", True), ("probe_loss_neurons", "probe loss (neurons)", True),
    ("checkpoint_step", "steps", None), ("training_tokens", "tokens", None),
)  # (report key, heading, lower is better: True / False / None = no direction)


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


def comparison_html(rows: list[dict], title: str = "SAE sweep comparison") -> str:
    """A self-contained HTML page: one row per SAE, the best value of each column in bold."""
    def cell(v):
        if v is None:
            return "–"
        return f"{v:,}" if isinstance(v, int) else f"{v:.4g}"
    head = "<th>hook point</th>" + "".join(f"<th>{html.escape(h)}{' ↓' if lo else ' ↑' if lo is False else ''}</th>"
                   for _, h, lo in COLUMNS)
    body = []
    for r in rows:
        tds = []
        for key, _, lower in COLUMNS:
            best = _best(rows, key, lower, r.get("hook_point"))
            text = html.escape(cell(r[key]))
            tds.append(f"<td class=num>{'<b>' + text + '</b>' if best is not None and r[key] == best else text}</td>")
        hook = html.escape(r.get("hook_point") or "–")
        body.append(f"<tr><th scope=row>{html.escape(r['sae'])}</th><td>{hook}</td>{''.join(tds)}</tr>")
    generated = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>{html.escape(title)}</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{padding:.3em .7em;border-bottom:1px solid #ddd;text-align:left}}td.num{{text-align:right}}</style>
</head><body><h1>{html.escape(title)}</h1>
<p>Every trained SAE of the sweep on its held-out evaluation (sae_eval). ↓ lower is better, ↑ higher is better;
the best of each column among the SAEs of the same hook point in bold (other hook points read other activations).
Every metric is measured at the SAE's own hook point. N2G: explanations built on half the held-out contexts, scored
on the other half (Gao et al. 2024, 4.4); ablation sparsity: (L1/L2)² of the logit change when a latent is removed
from the reconstruction spliced in at the hook point / (vocab × positions), smaller = sparser (4.5); probe loss:
best single-latent logistic probe, mean over token properties (4.2), beside the same probes on the neurons the SAE
reads (the channels of its input hook point).</p>
<table><thead><tr><th>SAE</th>{head}</tr></thead><tbody>
{chr(10).join(body) if body else '<tr><td colspan=99>No SAE has been evaluated yet.</td></tr>'}
</tbody></table><p><small>generated {generated}</small></p></body></html>
"""
