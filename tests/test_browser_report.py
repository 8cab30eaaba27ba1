"""The feature browser as a report: evaluation figures grouped with units, directions and
definitions; the sweep comparison page served beside the site and linked from the overview;
charts with axis ticks and a caption on logit effects; the list's state in the URL; text files
served gzip-compressed."""

import gzip
import json
import re
import urllib.request

import pytest

try:
    from playwright.sync_api import expect
except ImportError:     # the chromium fixture says what to install
    expect = None

from sae_platform.browser import publish
from sae_platform.browser.server import make_server, serve_in_thread
from sae_platform.catalog import SWEEP_COMPARISON, reports_url_path
from sae_platform.compare import comparison_html
from sae_platform.metric_info import GROUPS, METRIC_INFO
from tests.test_browser import LINEAGE, _ids, _served_page, _tables, chromium  # noqa: F401  (fixture)

EVALUATION = {"fvu": 0.1612, "nmse": 0.17, "l0": 32.0, "dead_fraction": 0.06, "loss_recovered": 0.91,
              "ce_clean": 3.2, "n2g_precision": 0.55, "probe_loss": 0.12, "heldout_tokens": 4096,
              "ablation_pairs": 40}    # the last: a figure with no definition


@pytest.fixture(scope="module")
def report_site(tmp_path_factory):
    """A built site and, beside it, a reports/ folder holding the sweep comparison page."""
    shards, edges = _tables()
    root = tmp_path_factory.mktemp("root")
    publish.build_site(root / "browser" / "test-sae", sae_name="test-sae", shards=shards, hist_bin_edges=edges,
                       lineage=LINEAGE, n_intervals=3, evaluation=EVALUATION,
                       hook_point="blocks.2.hook_resid_post")
    (root / "reports").mkdir()
    (root / "reports" / SWEEP_COMPARISON).write_text(comparison_html([]))
    return root / "browser" / "test-sae", root / "reports"


@pytest.fixture
def report_page(chromium, report_site):  # noqa: F811
    site, reports = report_site
    yield from _served_page(chromium, site, make_server(site, port=0, quiet=True, reports_dir=reports))


def _served(report_site):
    site, reports = report_site
    return serve_in_thread(site, server=make_server(site, port=0, quiet=True, reports_dir=reports))


def _get(url: str, **headers):
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers)) as res:
        return res.status, dict(res.headers), res.read()


def test_text_files_are_served_gzip_compressed_when_the_client_accepts_it(report_site):
    server, url = _served(report_site)
    try:
        pointer = json.loads(_get(url + "site.json")[2])
        index = f"{url}{pointer['data']}/index.json"
        _, plain_headers, plain = _get(index)
        assert "Content-Encoding" not in plain_headers                        # no Accept-Encoding: as stored
        _, headers, body = _get(index, **{"Accept-Encoding": "gzip, deflate"})
        assert headers["Content-Encoding"] == "gzip" and headers["Vary"] == "Accept-Encoding"
        assert int(headers["Content-Length"]) == len(body) < len(plain) / 2
        assert gzip.decompress(body) == plain
        assert "script-src 'self'" in headers["Content-Security-Policy"]     # the same security headers
        _, js_headers, js = _get(url + "static/app.js", **{"Accept-Encoding": "gzip"})
        assert js_headers["Content-Encoding"] == "gzip" and b"use strict" in gzip.decompress(js)
        _, refused, _ = _get(index, **{"Accept-Encoding": "gzip;q=0, identity"})
        assert "Content-Encoding" not in refused
    finally:
        server.shutdown()
        server.server_close()


def test_the_comparison_page_is_served_beside_the_site_with_its_own_policy(report_site):
    server, url = _served(report_site)
    try:
        status, headers, body = _get(url + reports_url_path())
        assert status == 200 and b"SAE sweep comparison" in body
        assert headers["Content-Security-Policy"].startswith("default-src 'none'; style-src 'unsafe-inline'")
        with pytest.raises(urllib.error.HTTPError) as missing:
            _get(url + "reports/../../etc/passwd")
        assert missing.value.code == 404
    finally:
        server.shutdown()
        server.server_close()


def test_overview_groups_the_figures_and_links_the_comparison_in_chromium(report_page):
    pg = report_page
    pg.goto(pg.base_url + "#/overview")
    pg.wait_for_selector("#evaluation table.evaltable")
    groups = pg.locator("#evaluation table.evaltable[data-group]").evaluate_all("ts => ts.map(t => t.dataset.group)")
    assert groups == [g for g in GROUPS if any(m.group == g and k in EVALUATION for k, m in METRIC_INFO.items())]
    fvu = pg.locator("#evaluation tr[data-key=fvu]").inner_text()
    info = METRIC_INFO["fvu"]
    assert info.label in fvu and "0.161" in fvu and info.unit in fvu and "↓" in fvu and info.definition in fvu
    assert "↑" in pg.locator("#evaluation tr[data-key=loss_recovered]").inner_text()
    assert "ablation_pairs" in pg.locator("#evaluation-other").text_content()   # undefined figures still shown
    pg.click("#comparison-link")
    pg.wait_for_selector("h1:has-text('SAE sweep comparison')")
    assert pg.url.endswith(reports_url_path())
    assert not pg.problems, pg.problems


def test_charts_have_axis_ticks_and_logit_effects_a_caption_in_chromium(report_page):
    pg = report_page
    pg.goto(pg.base_url + "#/feature/42")
    pg.wait_for_selector("#histogram")
    yticks = pg.locator("#histogram text.ytick").all_text_contents()
    assert len(yticks) == 3 and yticks[0] == "0" and all(re.fullmatch(r"[\d,]+", t) for t in yticks)
    assert len(pg.locator("#histogram text.xtick").all()) == 3
    caption = pg.locator("#logit-caption").inner_text()
    assert "W_dec" in caption and "blocks.2.hook_resid_post" in caption and "per unit of activation" in caption
    pg.goto(pg.base_url + "#/overview")
    pg.wait_for_selector("#density-histogram")
    assert len(pg.locator("#density-histogram text.ytick").all()) == 3
    assert pg.locator("#density-histogram text.xtick").all_text_contents() == [str(x) for x in range(-7, 1)]
    assert not pg.problems, pg.problems


def test_search_sort_filter_and_page_live_in_the_url_in_chromium(report_page):
    pg = report_page
    pg.goto(pg.base_url)
    pg.wait_for_selector("table.features tbody tr")
    pg.click("button[data-sort=max]")
    pg.click("#next-page")
    first = _ids(pg)
    assert re.search(r"#/\?sort=max&desc=1&page=2$", pg.url)
    pg.reload()                                                     # restored on load
    expect(pg.locator("table.features tbody tr").first).to_have_attribute("data-feature", str(first[0]))
    assert _ids(pg) == first and "active" in pg.locator("button[data-sort=max]").get_attribute("class")
    pg.fill("#search", "zebra")
    expect(pg.locator("table.features tbody tr")).to_have_count(2)
    assert pg.url.endswith("#/?q=zebra&sort=max&desc=1")            # a new search starts on page 1
    pg.click("table.features tbody tr a >> nth=0")
    pg.wait_for_selector("h1:has-text('Feature')")
    pg.go_back()                                                    # Back: the same list
    expect(pg.locator("table.features tbody tr")).to_have_count(2)
    assert pg.locator("#search").input_value() == "zebra"
    pg.goto(pg.base_url + "#/?q=zebra&filter=dead")                 # a shared link
    expect(pg.locator("#count")).to_contain_text("0 matching")
    assert pg.locator("#filter").input_value() == "dead" and pg.locator("#search").input_value() == "zebra"
    assert not pg.problems, pg.problems
