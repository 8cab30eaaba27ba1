"""The sweep comparison: one row per evaluated SAE from its report, the best value per column in bold,
every value escaped, non-finite figures shown as missing."""

import html
import re

from sae_platform.catalog import eval_name
from sae_platform.compare import comparison_html, comparison_rows


def _report(store, name, **figures):
    with store.writing(eval_name(name)) as version:
        store.write_json(f"{version}/report.json", {"run": name, **figures})


def test_rows_and_page(store):
    _report(store, "a", fvu=0.2, l0=32.0, n2g_precision=0.5, probe_loss=0.1, loss_recovered=float("nan"))
    _report(store, "b", fvu=0.1, l0=64.0, n2g_precision=0.7, probe_loss=0.2, loss_recovered=0.99)
    rows = comparison_rows(store, ["a", "b", "never-evaluated"])
    assert [r["sae"] for r in rows] == ["a", "b"]
    rows[1]["sae"] = "b<script>"         # SAE names are checked safe; the page escapes whatever it shows
    assert rows[0]["loss_recovered"] is None and rows[1]["n2g_precision"] == 0.7
    assert rows[0]["ablation_sparsity"] is None
    page = comparison_html(rows)
    assert "<script>" not in page and "b&lt;script&gt;" in page
    assert "<b>0.1</b>" in page          # lowest FVU (b) and lowest probe loss (a) in bold
    assert "<b>0.7</b>" in page and "<b>0.5</b>" not in page and "<b>0.2</b>" not in page
    assert "<b>32</b>" not in page       # L0 has no direction
    assert "No SAE has been evaluated" in comparison_html([])


def test_best_is_marked_per_hook_point(store):
    """SAEs of different hook points read different activations: each hook point has its own best."""
    _report(store, "resid", hook_name="blocks.1.hook_resid_post", fvu=0.1)
    _report(store, "mlp-a", hook_name="blocks.1.hook_mlp_out", fvu=0.3)
    _report(store, "mlp-b", hook_name="blocks.1.hook_mlp_out", fvu=0.4)
    _report(store, "tc", hook_name="blocks.1.hook_mlp_out", hook_name_in="blocks.1.ln2.hook_normalized", fvu=0.5)
    rows = comparison_rows(store, ["resid", "mlp-a", "mlp-b", "tc"])
    assert [r["hook_point"] for r in rows] == ["blocks.1.hook_resid_post", "blocks.1.hook_mlp_out",
                                               "blocks.1.hook_mlp_out",
                                               "blocks.1.ln2.hook_normalized -> blocks.1.hook_mlp_out"]
    page = comparison_html(rows)
    assert "<b>0.3</b>" in page and "<b>0.4</b>" not in page   # best among the two mlp_out SAEs
    assert "<b>0.1</b>" not in page and "<b>0.5</b>" not in page  # alone at its hook point: nothing to beat
    assert "blocks.1.ln2.hook_normalized -&gt; blocks.1.hook_mlp_out" in page


def test_page_groups_the_figures_with_units_directions_and_definitions(store):
    """The page reads like a report: columns under their group, each heading with its direction,
    and a legend giving every column's unit, direction, one-line definition and source, all from
    the one table of metric definitions (sae_platform.metric_info)."""
    from sae_platform.compare import COLUMNS
    from sae_platform.metric_info import GROUPS, metric_info

    _report(store, "a", fvu=0.2, l0=32.0)
    page = comparison_html(comparison_rows(store, ["a"]))
    groups = re.findall(r"<th colspan=\d+ scope=colgroup>([^<]+)</th>", page)
    assert groups == [g for g in GROUPS if any(metric_info(k).group == g for k, _, _ in COLUMNS)]
    assert {"reconstruction", "sparsity", "downstream", "feature quality"} <= set(groups)
    assert ">FVU ↓</th>" in page and ">loss recovered ↑</th>" in page and ">L0</th>" in page
    legend = page.split("What the figures mean", 1)[1]
    for key, heading, _ in COLUMNS:
        info = metric_info(key)
        assert f"<th scope=row>{heading}</th>" in legend and html.escape(info.definition) in legend
    assert "Gao §4.4" in legend and "nats (binary CE)" in legend


def test_sparse_probing_top_1_accuracies_are_columns_once_probed(store):
    from sae_platform.catalog import SPARSE_PROBING_RESULT, sparse_probing_name

    _report(store, "a", fvu=0.2)
    _report(store, "b", fvu=0.1)
    with store.writing(sparse_probing_name("a")) as version:
        store.write_json(f"{version}/{SPARSE_PROBING_RESULT}", {"averages": {"all": {
            "sae_top_1_test_accuracy": 0.83, "llm_top_1_test_accuracy": 0.71}}})
    rows = comparison_rows(store, ["a", "b"])
    assert (rows[0]["sparse_probing_sae_top_1"], rows[0]["sparse_probing_llm_top_1"]) == (0.83, 0.71)
    assert rows[1]["sparse_probing_sae_top_1"] is None  # not probed yet: shown as missing
    page = comparison_html(rows)
    assert "sparse probing top-1 ↑" in page and "0.83" in page and "SAEBench sparse probing" in page


def test_sparse_probing_shows_every_k_and_all_latents_beside_the_residual_probe(store):
    from sae_platform.catalog import SPARSE_PROBING_RESULT, sparse_probing_name

    _report(store, "a", fvu=0.2)
    accuracies = {"sae_top_1_test_accuracy": 0.61, "sae_top_2_test_accuracy": 0.62, "sae_top_5_test_accuracy": 0.65,
                  "sae_test_accuracy": 0.97, "llm_top_1_test_accuracy": 0.51, "llm_top_2_test_accuracy": 0.52,
                  "llm_top_5_test_accuracy": 0.55, "llm_test_accuracy": 0.99}
    with store.writing(sparse_probing_name("a")) as version:
        store.write_json(f"{version}/{SPARSE_PROBING_RESULT}", {"averages": {"all": accuracies}})
    (row,) = comparison_rows(store, ["a"])
    assert [row[f"sparse_probing_sae_{k}"] for k in ("top_1", "top_2", "top_5", "all")] == [0.61, 0.62, 0.65, 0.97]
    assert [row[f"sparse_probing_llm_{k}"] for k in ("top_1", "top_2", "top_5", "all")] == [0.51, 0.52, 0.55, 0.99]
    page = comparison_html([row])
    for heading in ("sparse probing top-5 ↑", "sparse probing all ↑", "sparse probing top-2 (residual) ↑",
                    "sparse probing all (residual) ↑"):
        assert heading in page


def test_absorption_figures_join_their_sae_row_and_a_refusal_shows_none(store):
    from sae_platform.catalog import ABSORPTION_REPORT, absorption_name

    _report(store, "scored", fvu=0.2)
    _report(store, "refused", fvu=0.3)
    with store.writing(absorption_name("scored")) as version:
        store.write_json(f"{version}/{ABSORPTION_REPORT}", {"scored": True, "metrics": {
            "mean_absorption_fraction_score": 0.12, "mean_full_absorption_score": 0.05,
            "mean_num_split_features": 1.5}})
    with store.writing(absorption_name("refused")) as version:
        store.write_json(f"{version}/{ABSORPTION_REPORT}", {"scored": False, "metrics": None,
                                                            "refusal": "only 3 of 26 letters ..."})
    scored, refused = comparison_rows(store, ["scored", "refused"])
    assert (scored["mean_absorption_fraction_score"], scored["mean_num_split_features"]) == (0.12, 1.5)
    assert refused["mean_absorption_fraction_score"] is None and refused["mean_full_absorption_score"] is None
    assert "absorption fraction" in comparison_html([scored, refused])


def test_a_refused_absorption_reads_refused_with_its_reason_not_a_blank(store):
    from sae_platform.catalog import ABSORPTION_REPORT, absorption_name

    _report(store, "refused", fvu=0.3)
    _report(store, "unmeasured", fvu=0.4)
    reason = "only 12 of 26 letters have a ground-truth probe with test F1 > 0.6 (min_feats_for_eval = 20): no score"
    with store.writing(absorption_name("refused")) as version:
        store.write_json(f"{version}/{ABSORPTION_REPORT}", {"scored": False, "metrics": None, "refusal": reason})
    refused, unmeasured = comparison_rows(store, ["refused", "unmeasured"])
    assert refused["absorption_refusal"] == reason and unmeasured["absorption_refusal"] is None
    page = comparison_html([refused, unmeasured])
    row = page.split("<th scope=row>refused</th>", 1)[1].split("</tr>", 1)[0]
    assert row.count(">refused</td>") == 3 and html.escape(reason, quote=True) in row  # three absorption columns
    assert ">refused</td>" not in page.split("<th scope=row>unmeasured</th>", 1)[1].split("</tr>", 1)[0]
    assert html.escape(reason) in page.split("id=absorption-refusals", 1)[1]


def test_ground_truth_figures_get_their_own_panel_only_when_measured(store):
    """SAEs of synthetic activations carry figures against the known features (sae_eval's gt_*):
    the page shows them in a panel of their own, best per figure in bold (absorption: lowest), and
    a sweep without them shows no panel."""
    _report(store, "syn-topk", fvu=0.1, gt_mcc=0.91, gt_uniqueness=0.8, gt_f1=0.7, gt_absorption=0.05,
            gt_shrinkage=0.97, gt_mcc_chance=0.2875)
    _report(store, "syn-relu", fvu=0.2, gt_mcc=0.62, gt_uniqueness=0.6, gt_f1=0.3, gt_absorption=0.25,
            gt_shrinkage=0.71, gt_mcc_chance=0.2875)
    rows = comparison_rows(store, ["syn-topk", "syn-relu"])
    assert rows[0]["gt_mcc"] == 0.91 and rows[1]["gt_precision"] is None
    page = comparison_html(rows)
    panel = page[page.index("id=ground-truth"):page.index("What the figures mean")]
    assert "<b>0.91</b>" in panel and "<b>0.05</b>" in panel and "<b>0.25</b>" not in panel
    assert "Hungarian" in panel  # each figure's definition beside it
    assert "chance MCC" in panel and "<td class=num>0.2875</td>" in panel  # the level MCC is read against
    _report(store, "text-sae", fvu=0.3)
    assert "ground-truth" not in comparison_html(comparison_rows(store, ["text-sae"]))
