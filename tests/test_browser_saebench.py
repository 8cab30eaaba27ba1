"""The browser's overview shows SAEBench's figures where users look: the core ones (both
explained-variance conventions side by side, KL / CE-loss scores, meta-SAE FVE), sparse probing's
accuracy per k against the residual probe, and absorption: its means, or the refusal's text, with
the per-letter bar chart as a file of the build."""

import json

import pytest

from sae_platform.browser import publish
from sae_platform.catalog import ABSORPTION_CHART
from tests.test_browser import LINEAGE, _served_page, _tables, chromium  # noqa: F401  (fixture)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVALUATION = {"fvu": 0.14, "explained_variance": 0.8601, "explained_variance_about_zero": 0.9352,
              "kl_div_score": 0.974, "loss_recovered": 0.998, "meta_sae_fve": 0.341,
              **{f"sparse_probing_{side}_{k}": value for side, base in (("sae", 0.6), ("llm", 0.7))
                 for k, value in zip(("top_1", "top_2", "top_5", "all"), (base, base + 0.01, base + 0.02, 0.99))}}
SETTINGS = {"min_GT_probe_f1": 0.6, "min_feats_for_eval": 20}
PROBE_F1 = {letter: (0.9 if i < 12 else 0.3) for i, letter in enumerate("abcdefghijklmnopqrstuvwxyz")}
REFUSED = {"scored": False, "metrics": None, "letters": [], "letters_counted": list("abcdefghijkl"),
           "probe_f1": PROBE_F1, "settings": SETTINGS,
           "refusal": "only 12 of 26 letters have a ground-truth probe with test F1 > 0.6 (min_feats_for_eval = 20)"}
SCORED = {"scored": True, "refusal": None, "letters_counted": ["a", "b"], "probe_f1": PROBE_F1, "settings": SETTINGS,
          "metrics": {"mean_absorption_fraction_score": 0.123, "std_dev_absorption_fraction_score": 0.05,
                      "mean_full_absorption_score": 0.045, "std_dev_full_absorption_score": 0.01,
                      "mean_num_split_features": 1.5, "std_dev_num_split_features": 0.5},
          "letters": [{"first_letter": "a", "mean_absorption_fraction": 0.1, "full_absorption_rate": 0.05},
                      {"first_letter": "b", "mean_absorption_fraction": 0.146, "full_absorption_rate": 0.04}]}


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    shards, edges = _tables()
    root = tmp_path_factory.mktemp("sites")
    for name, absorption in (("refused", REFUSED), ("scored", SCORED)):
        publish.build_site(root / name, sae_name=name, shards=shards, hist_bin_edges=edges, lineage=LINEAGE,
                           evaluation=EVALUATION, absorption=absorption, figures_version="0123456789abcdef")
    return root


def _index(site):
    pointer = json.loads((site / "site.json").read_text())
    return pointer, json.loads((site / pointer["data"] / "index.json").read_text())


def test_the_index_carries_absorption_or_its_refusal_and_the_chart_is_a_file_of_the_build(sites):
    pointer, index = _index(sites / "refused")
    assert pointer["figures_version"] == "0123456789abcdef"  # what the overview's figures were read from
    shown = index["absorption"]
    assert shown["scored"] is False and shown["refusal"] == REFUSED["refusal"] and shown["letters_counted"] == 12
    assert (sites / "refused" / pointer["data"] / shown["chart"]).read_bytes().startswith(PNG_MAGIC)
    assert index["evaluation"]["sparse_probing_llm_top_5"] == 0.72
    pointer, index = _index(sites / "scored")
    assert index["absorption"]["metrics"]["mean_absorption_fraction_score"] == 0.123
    assert (sites / "scored" / pointer["data"] / ABSORPTION_CHART).read_bytes().startswith(PNG_MAGIC)


def _overview(chromium, site):  # noqa: F811
    pages = _served_page(chromium, site)
    pg = next(pages)
    pg.goto(pg.base_url + "#/overview")
    pg.wait_for_selector("#saebench")
    return pg, pages


def test_overview_shows_the_refusal_sparse_probing_per_k_and_both_explained_variances_in_chromium(chromium, sites):  # noqa: F811
    pg, pages = _overview(chromium, sites / "refused")
    core = pg.locator("#saebench-core").inner_text().lower()  # the labels are upper-cased by the style
    assert "about the mean" in core and "0.86" in core and "about zero" in core and "0.935" in core
    assert "meta-sae" in core and "0.341" in core and "kl score" in core
    rows = pg.locator("#saebench-sparse-probing tbody tr").all_inner_texts()
    assert [r.split("\t") for r in rows] == [["top 1", "0.6", "0.7"], ["top 2", "0.61", "0.71"],
                                            ["top 5", "0.62", "0.72"], ["all", "0.99", "0.99"]]
    assert REFUSED["refusal"] in pg.locator("#saebench-absorption").inner_text()
    chart = pg.locator("#saebench-absorption img")
    pg.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=chart.element_handle())
    assert not pg.problems, pg.problems
    next(pages, None)


def test_overview_shows_the_absorption_figures_when_scored_in_chromium(chromium, sites):  # noqa: F811
    pg, pages = _overview(chromium, sites / "scored")
    text = pg.locator("#saebench-absorption").inner_text().lower()
    assert "0.123" in text and "over 2 letters" in text and "0.045" in text and "1.5" in text
    assert "not scored" not in text
    assert not pg.problems, pg.problems
    next(pages, None)
