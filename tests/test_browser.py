"""The feature browser: site generation (plain Python) and the page itself in headless Chromium.

The browser tests drive Debian's Chromium (/usr/bin/chromium) with Playwright's Python package; no
Playwright-downloaded browser is used. Without Chromium they fail and say to run
``.ci/install-browser``; set SAE_PLATFORM_SKIP_BROWSER=1 to skip them instead.
"""

import json
import os
import re
import urllib.request
from pathlib import Path

import fsspec
import polars as pl
import pytest

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:     # the chromium fixture says what to install
    expect = sync_playwright = None

from sae_platform.browser import generate, publish
from sae_platform.browser.server import serve_in_thread
from sae_platform.browser.synthetic import synthetic_shards
from sae_platform.errors import PlatformError

CHROMIUM = os.environ.get("SAE_PLATFORM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = Path(os.environ.get("SAE_PLATFORM_SCREENSHOTS", "/tmp"))
APP_JS = Path(__file__).resolve().parents[1] / "sae_platform" / "browser_static" / "app.js"
PAGE = int(re.search(r"const PAGE = (\d+);", APP_JS.read_text()).group(1))   # the list's rows per page

MALICIOUS = ['<script>window.__xss=1</script>', '<img src=x onerror="window.__xss=2">',
             '"><svg onload=window.__xss=3>', 'javascript:alert(1)', '&lt;b&gt;']
MARKED = (42, 201)          # features whose top example carries the malicious strings and " zebra"
N_FEATURES, SHARD = 300, 150
N_LOGITS = 10


def _mark(shards):
    """Put the malicious strings (active) and a unique token into the top example of MARKED."""
    for s in shards:
        hit = pl.col(generate.FEATURE).is_in(list(MARKED))
        top0 = hit & (pl.col(generate.KIND) == "top") & (pl.col(generate.RANK) == 0)
        ctx = s[generate.CONTEXTS_FRAME]
        width = ctx[generate.TOKEN_STRS].list.len().max()
        toks = (MALICIOUS + [" zebra"] + [" plain"] * width)[:width]
        # the strongest tokens of the feature: " zebra" (the example token) at 100, the others 50..90
        acts = [50.0 + 10 * i for i in range(len(MALICIOUS) + 1)] + [0.0] * (width - len(MALICIOUS) - 1)
        s[generate.STATS_FRAME] = s[generate.STATS_FRAME].with_columns(
            pl.when(hit).then(100.0).otherwise(pl.col(generate.MAX)).alias(generate.MAX))
        s[generate.CONTEXTS_FRAME] = ctx.with_columns(
            pl.when(top0).then(pl.lit(len(MALICIOUS), pl.Int32)).otherwise(pl.col(generate.CENTER))
            .alias(generate.CENTER),
            pl.when(top0).then(pl.lit(100.0, pl.Float32)).otherwise(pl.col(generate.ACTIVATION))
            .alias(generate.ACTIVATION),
            pl.when(top0).then(pl.lit(toks, pl.List(pl.String))).otherwise(pl.col(generate.TOKEN_STRS))
            .alias(generate.TOKEN_STRS),
            pl.when(top0).then(pl.lit(acts, pl.List(pl.Float32))).otherwise(pl.col(generate.ACTS))
            .alias(generate.ACTS),
            pl.when(top0).then(pl.lit([True] * width, pl.List(pl.Boolean))).otherwise(pl.col(generate.HAS_ACT))
            .alias(generate.HAS_ACT))
        lg = s[generate.LOGITS_FRAME]
        s[generate.LOGITS_FRAME] = lg.with_columns(
            pl.when(hit).then(pl.lit((MALICIOUS * 2)[:N_LOGITS], pl.List(pl.String)))
            .otherwise(pl.col(generate.TOP_TOKEN_STRS)).alias(generate.TOP_TOKEN_STRS))
    return shards


def _tables():
    shards, edges = synthetic_shards(N_FEATURES, SHARD, n_top=6, n_intervals=3, per_interval=2, n_random=3,
                                     before=10, after=5, n_bins=24, n_logits=N_LOGITS, seed=1)
    return _mark(shards), edges


LINEAGE = {"sae": "test-sae", "checkpoint": "checkpoints/test-sae/v3/sae.safetensors", "run_id": "run-7f3a9c",
           "shuffle": "shuffle-abc/plan-1", "activation_partitions": [{"key": "p000", "version": "v-0", "n_rows": 100},
                                                                  {"key": "p001", "version": "v-1", "n_rows": 100}],
           "model": "tiny",
           "hook_name": "blocks.2.hook_resid_post"}


HOOK_POINT = "blocks.2.ln2.hook_normalized -> blocks.2.hook_mlp_out"


def _index(site):
    """index.json of a built site, with ``columns``: every shard's list rows gathered (what the
    page shows and sorts, fetched a chunk at a time in the browser)."""
    out = site[0]
    index = json.loads((out / json.loads((out / "site.json").read_text())["data"] / "index.json").read_text())
    columns: dict[str, list] = {}
    for shard in index["shards"]:
        n_chunks = -(-(shard["stop"] - shard["start"]) // index["row_chunk"])
        for k in range(n_chunks):
            for key, values in json.loads((out / shard["path"] / f"rows/{k}.json").read_text()).items():
                columns.setdefault(key, []).extend(values)
    return {**index, "columns": columns}


def _chunk_feature(out, feature):
    index = _index((out,))
    shard = next(s for s in index["shards"] if s["start"] <= feature < s["stop"])
    rows = json.loads((out / shard["path"] / f"features/{feature // generate.CHUNK_FEATURES}.json").read_text())
    return next(r for r in rows if r["feature"] == feature)


@pytest.fixture(scope="module")
def tables():
    return _tables()


@pytest.fixture(scope="module")
def site(tmp_path_factory, tables):
    shards, edges = tables
    out = tmp_path_factory.mktemp("browser") / "site"
    summary = publish.build_site(out, sae_name="test-sae", shards=shards, hist_bin_edges=edges, lineage=LINEAGE,
                                 n_intervals=3, hook_point=HOOK_POINT)
    return out, summary


# ---------------------------------------------------------------------------------------------
# Generation (no browser)
# ---------------------------------------------------------------------------------------------

def test_site_layout_and_index(site, tables):
    out, summary = site
    assert summary["n_features"] == N_FEATURES and summary["files"] > 5 and summary["bytes"] > 0
    assert (out / "index.html").is_file() and (out / "static/app.js").is_file() and (out / "static/app.css").is_file()
    html = (out / "index.html").read_text()
    assert "Content-Security-Policy" in html and "script-src 'self'" in html
    assert "<script>" not in html.replace('<script src="static/app.js', "")   # no inline script
    index = _index(site)
    assert index["columns"]["feature"] == list(range(N_FEATURES))
    assert index["lineage"]["run_id"] == "run-7f3a9c" and index["n_intervals"] == 3
    assert index["hook_point"] == HOOK_POINT
    # 24 bins between the 25 edges, plus underflow (from 0) and overflow (unbounded): 26 counts
    assert len(index["hist_bin_edges"]) == 27 and index["hist_bin_edges"][0] == 0
    assert index["hist_bin_edges"][-1] is None and index["hist_bin_edges"][1:-1] == pytest.approx(tables[1])
    stats = pl.concat([s[generate.STATS_FRAME] for s in tables[0]]).sort(generate.FEATURE)
    assert index["columns"]["max"][5] == pytest.approx(stats[generate.MAX][5], rel=1e-3)
    for f in MARKED:
        names = index["columns"]["tokens"][f]
        assert " zebra" in names and MALICIOUS[0] in names
        assert index["token_table"].index(" zebra") >= 0                       # searchable
    chunks = sorted(int(p.stem) for s in index["shards"] for p in (out / s["path"] / "features").glob("*.json"))
    # 64-feature chunks by id; the shard boundary at 150 splits chunk 2 in two files
    assert chunks == sorted([0, 1, 2, 2, 3, 4])
    f42 = _chunk_feature(out, 42)
    ex = f42["examples"]
    assert ex["kind"][0] == "top" and ex["tokens"][0][:len(MALICIOUS)] == MALICIOUS
    assert set(ex["kind"]) == {"top", "interval", "random"} and len(ex["acts"][0]) == len(ex["tokens"][0])
    assert f42["top_token_strs"][:len(MALICIOUS)] == MALICIOUS and len(f42["histogram"]) == 26


def test_rebuild_replaces_atomically_and_fs_target(tmp_path, tables):
    shards, edges = tables
    out = tmp_path / "site"
    first = publish.build_site(out, sae_name="r", shards=shards[:1], hist_bin_edges=edges, lineage={})
    second = publish.build_site(out, sae_name="r", shards=shards, hist_bin_edges=edges, lineage={})
    assert first["n_features"] == SHARD and second["n_features"] == N_FEATURES
    assert [p.name for p in (out / "data").iterdir()] == [second["version"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".site.versions", "site"]     # no temp dirs left
    assert out.is_symlink() and sorted(p.name for p in (tmp_path / ".site.versions").iterdir()) == sorted(
        [first["version"], second["version"]])                 # the current build and the one before
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious/notes.txt").write_text("keep me")
    with pytest.raises(PlatformError, match="not a feature-browser site"):
        publish.build_site(tmp_path / "precious", sae_name="r", shards=shards, hist_bin_edges=edges, lineage={})
    assert (tmp_path / "precious/notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".site.versions", "precious", "site"]
    fs = fsspec.filesystem("memory")
    built = [publish.build_site("/sites/x", sae_name="r", shards=shards, hist_bin_edges=edges, lineage={}, fs=fs)
             for _ in range(3)]
    summary = built[-1]
    assert json.loads(fs.cat_file("/sites/x/site.json"))["version"] == summary["version"]
    # the data version before stays for pages opened before the switch; older ones go
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("/sites/x/data", detail=False)) == sorted(
        [built[1]["version"], built[2]["version"]])
    assert fs.exists(f"/sites/x/data/{summary['version']}/index.json")


def test_bad_inputs_are_explained(tables):
    shards, edges = tables
    with pytest.raises(PlatformError, match="bins"):
        generate.site_files(sae_name="r", shards=shards, hist_bin_edges=edges[:-3], lineage={})
    with pytest.raises(PlatformError, match="overlap"):
        generate.site_files(sae_name="r", shards=[shards[0], shards[0]], hist_bin_edges=edges, lineage={})
    bad = dict(shards[0], **{generate.STATS_FRAME: shards[0][generate.STATS_FRAME].drop(generate.DENSITY)})
    with pytest.raises(PlatformError, match="density"):
        generate.site_files(sae_name="r", shards=[bad], hist_bin_edges=edges, lineage={})


def test_features_without_tables_still_listed(tmp_path):
    _, edges = synthetic_shards(4, 4)
    publish.build_site(tmp_path / "s", sae_name="empty", shards=[{"start": 0, "stop": 10}], hist_bin_edges=edges,
                       lineage={})
    index = _index((tmp_path / "s",))
    assert index["columns"]["feature"] == list(range(10)) and index["columns"]["density"] == [None] * 10


def test_server_sends_security_headers(site):
    server, url = serve_in_thread(site[0])
    try:
        with urllib.request.urlopen(url) as res:
            assert "script-src 'self'" in res.headers["Content-Security-Policy"]
            assert res.headers["X-Content-Type-Options"] == "nosniff"
            assert b"static/app.js" in res.read()
    finally:
        server.shutdown()
        server.server_close()


def _get_with_host(url: str, host: str | None, path: str = "/") -> tuple[int, bytes]:
    """GET ``path`` from the server at ``url`` with the ``Host`` header forged to ``host``."""
    import http.client
    import urllib.parse

    where = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=10)
    try:
        connection.putrequest("GET", path, skip_host=True)
        if host is not None:
            connection.putheader("Host", host)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_server_refuses_a_host_header_naming_another_server(site, monkeypatch):
    """DNS rebinding: a page on attacker.example whose name resolves to 127.0.0.1 reaches the socket,
    but its requests say Host: attacker.example; they get 403 with the fix, the real names 200."""
    from sae_platform.browser.server import ALLOWED_HOSTS_ENV, make_server

    monkeypatch.setenv(ALLOWED_HOSTS_ENV, "sae.internal.example, proxy.example")
    server, url = serve_in_thread(site[0])
    port = server.server_address[1]
    try:
        for forged in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.attacker.example", "localhost.",
                       "[::2]"):
            status, body = _get_with_host(url, forged)
            assert status == 403, forged
            assert b"Host not allowed" in body and ALLOWED_HOSTS_ENV.encode() in body
        for allowed in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}",
                        "sae.internal.example", f"proxy.example:{port}", None):
            status, body = _get_with_host(url, allowed)
            assert status == 200 and b"static/app.js" in body, allowed
    finally:
        server.shutdown()
        server.server_close()
    wildcard = make_server(site[0], "0.0.0.0", 0, quiet=True, extra_hosts=[])
    server, _ = serve_in_thread(site[0], server=wildcard)   # bound to every address: IP literals reach it too
    try:
        local = f"http://127.0.0.1:{wildcard.server_address[1]}/"
        assert _get_with_host(local, "10.1.2.3")[0] == 200
        assert _get_with_host(local, "sae.internal.example")[0] == 403, "extra_hosts=[] overrides the environment"
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------------------------
# In Chromium
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chromium():
    if os.environ.get("SAE_PLATFORM_SKIP_BROWSER") == "1":
        pytest.skip("SAE_PLATFORM_SKIP_BROWSER=1: browser tests skipped")
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"{CHROMIUM} is missing: the browser tests need Debian's Chromium. Run .ci/install-browser "
                    "(as root), or set SAE_PLATFORM_SKIP_BROWSER=1 to skip them.", pytrace=False)
    if sync_playwright is None:
        pytest.fail("the Python package 'playwright' is missing: install the dev extra (pip install -e '.[dev]'), "
                    "or set SAE_PLATFORM_SKIP_BROWSER=1 to skip the browser tests.", pytrace=False)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def _served_page(chromium, site_dir, server=None):
    """A page on the site served from ``site_dir`` (by ``server``, default a plain one); console
    errors, page errors and dialogs are collected in ``pg.problems``."""
    server, url = serve_in_thread(site_dir, server=server)
    ctx = chromium.new_context(viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    pg.problems = []
    pg.on("console", lambda m: pg.problems.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    pg.on("pageerror", lambda e: pg.problems.append(f"pageerror: {e}"))
    pg.on("dialog", lambda d: (pg.problems.append(f"dialog: {d.message}"), d.dismiss()))
    pg.base_url = url
    pg.set_default_timeout(5000)
    yield pg
    ctx.close()
    server.shutdown()
    server.server_close()


@pytest.fixture
def page(chromium, site):
    yield from _served_page(chromium, site[0])


def _ids(pg):
    """The features listed, once the list has settled (sorting and paging may fetch files first)."""
    pg.wait_for_selector("#list:not([data-busy])")
    return [int(x) for x in pg.locator("table.features tbody tr").evaluate_all(
        "rows => rows.map(r => r.dataset.feature)")]


def test_index_lists_sorts_and_searches(page, site):
    pg = page
    pg.goto(pg.base_url)
    pg.wait_for_selector("table.features tbody tr")
    assert _ids(pg) == list(range(PAGE))                     # first page, by id
    assert pg.locator("#count").inner_text() == "300 features"
    assert pg.locator("#run").inner_text() == f"test-sae · {HOOK_POINT} · 300 features"   # where the SAE reads
    pg.click("#next-page")
    assert _ids(pg) == list(range(PAGE, 2 * PAGE))
    cols = _index(site)["columns"]                           # the values the page sorts (rounded)
    maxes = dict(zip(cols["feature"], cols["max"]))
    dens = dict(zip(cols["feature"], cols["density"]))
    pg.click("button[data-sort=max]")
    got = _ids(pg)
    assert got[:20] == sorted(maxes, key=lambda f: (-maxes[f], f))[:20]
    pg.click("button[data-sort=max]")                        # again: ascending
    got = _ids(pg)
    assert len(got) == PAGE and all(maxes[a] <= maxes[b] for a, b in zip(got, got[1:]))
    pg.click("button[data-sort=density]")
    got = _ids(pg)
    assert all(dens[a] >= dens[b] for a, b in zip(got, got[1:]))
    pg.screenshot(path=str(SCREENSHOTS / "sae_browser_index.png"))
    # search by id
    pg.fill("#search", "123")
    expect(pg.locator("#count")).to_contain_text("matching")
    assert _ids(pg)[0] == 123
    # search by token: only the marked features have " zebra"
    pg.fill("#search", "zebra")
    expect(pg.locator(".chip.hit").first).to_contain_text("zebra")     # rendered the new search
    expect(pg.locator("table.features tbody tr")).to_have_count(2)
    assert sorted(_ids(pg)) == list(MARKED)
    pg.fill("#search", "<script>")
    expect(pg.locator(".chip.hit").first).to_have_text(MALICIOUS[0])   # literal text, as a token chip
    expect(pg.locator("table.features tbody tr")).to_have_count(2)
    pg.fill("#search", "no-such-token-anywhere")
    pg.wait_for_selector("text=No feature matches this search.")
    pg.fill("#search", "42")
    expect(pg.locator("table.features tbody tr").first).to_have_attribute("data-feature", "42")
    pg.press("#search", "Enter")
    pg.wait_for_selector("h1:has-text('Feature 42')")
    assert pg.evaluate("window.__xss") is None and not pg.problems, pg.problems


def test_feature_page(page, tables):
    pg = page
    pg.goto(pg.base_url + "#/feature/42")
    pg.wait_for_selector(".ex .tok.active")
    assert pg.locator("h1").inner_text().startswith("Feature 42")
    # highlighted tokens: non-transparent background, exact value in the title
    active = pg.locator(".ex .tok.active").evaluate_all(
        "ts => ts.map(t => [getComputedStyle(t).backgroundColor, t.title])")
    assert len(active) > 10
    assert all(bg not in ("rgba(0, 0, 0, 0)", "transparent") for bg, _ in active)
    assert all(re.fullmatch(r"act -?[0-9.e+-]+", title) for _, title in active)
    first = pg.locator("#examples-top .ex").first.locator(".tok")
    assert first.nth(len(MALICIOUS)).get_attribute("title") == "act 100"         # " zebra"
    inactive = pg.locator(".ex .tok:not(.active):not(.noact)").first
    assert inactive.evaluate("t => getComputedStyle(t).backgroundColor") == "rgba(0, 0, 0, 0)"
    # sections
    assert pg.locator("#examples-interval .interval").count() == 3
    assert pg.locator("#examples-interval .interval h3").first.inner_text().startswith("Interval 2 [66.7, 100]")
    assert pg.locator("#examples-random .ex").count() == 3 and pg.locator("#examples-top .ex").count() == 6
    assert pg.locator("#histogram rect.histbar").count() > 3
    assert pg.locator("table.logit.pos tr").count() == N_LOGITS
    assert pg.locator("table.logit.neg tr").count() == N_LOGITS
    lineage = pg.locator("#lineage").inner_text()
    assert "run-7f3a9c" in lineage and "checkpoints/test-sae/v3/sae.safetensors" in lineage
    assert "shuffle-abc/plan-1" in lineage
    # untrusted text stays text
    body = pg.locator("#app").inner_text()
    for s in MALICIOUS:
        assert s in body
    assert pg.locator("#examples-top .ex").first.locator(".tok").first.inner_text() == MALICIOUS[0]
    assert pg.evaluate("window.__xss") is None
    scripts = pg.evaluate("[...document.scripts].map(s => new URL(s.src).pathname)")
    assert scripts == ["/static/app.js", "/static/steer.js"]      # only the app's own files, no injected one
    assert pg.locator("img").count() == 0 and pg.locator("svg").count() == 1
    pg.screenshot(path=str(SCREENSHOTS / "sae_browser_feature.png"), full_page=True)
    # next feature, back to the index (state kept), unknown id
    pg.click("#next-feature")
    pg.wait_for_selector("h1:has-text('Feature 43')")
    pg.click("text=All features")
    pg.wait_for_selector("table.features tbody tr")
    pg.goto(pg.base_url + "#/feature/99999")
    pg.wait_for_selector("text=There is no feature 99999")
    assert not pg.problems, pg.problems


def test_dead_feature_page(page, tables):
    stats = pl.concat([s[generate.STATS_FRAME] for s in tables[0]])
    dead = stats.filter(pl.col(generate.COUNT) == 0)[generate.FEATURE].to_list()
    assert dead, "the synthetic tables should have a dead feature"
    pg = page
    pg.goto(pg.base_url + f"#/feature/{dead[0]}")
    pg.wait_for_selector("text=No examples")
    assert pg.locator(".badge").inner_text() == "dead"
    assert pg.locator("text=No activations recorded.").count() == 1
    assert not pg.problems, pg.problems


# ---------------------------------------------------------------------------------------------
# The local site is switched in one atomic step; leftovers are swept (issue 13.2)
# ---------------------------------------------------------------------------------------------

KILL_SCRIPT = r"""
import sys, time
from pathlib import Path
from sae_platform.browser import publish
from sae_platform.browser.synthetic import synthetic_shards
out, step = sys.argv[1], sys.argv[2]
def hook(name):
    if name == step:
        print("at", name, flush=True)
        time.sleep(60)
publish._STEP_HOOK = hook
shards, edges = synthetic_shards(300, 150, n_top=6, n_intervals=3, per_interval=2, n_random=3, before=10,
                                 after=5, n_bins=24, seed=2)
publish.build_site(out, sae_name="killed", shards=shards, hist_bin_edges=edges, lineage={})
print("done", flush=True)
"""


def _served_site(out: Path) -> dict:
    """What a reader gets: site.json, then every file it names; all must be there."""
    server, url = serve_in_thread(out)
    try:
        with urllib.request.urlopen(url + "site.json") as res:
            pointer = json.loads(res.read())
        with urllib.request.urlopen(url + pointer["data"] + "/index.json") as res:
            index = json.loads(res.read())
        with urllib.request.urlopen(url + index["shards"][0]["path"] + "/features/0.json") as res:
            assert json.loads(res.read())
        for static in ("index.html", "static/app.js", "static/app.css"):
            with urllib.request.urlopen(url + static) as res:
                assert res.status == 200
    finally:
        server.shutdown()
        server.server_close()
    return {"version": pointer["version"], "run": index["run"]}


@pytest.mark.parametrize("step", ["writing", "written", "switched"])
def test_a_build_killed_at_any_step_leaves_a_whole_site_and_a_next_build_sweeps(tmp_path, tables, step):
    import signal
    import subprocess
    import sys

    shards, edges = tables
    out = tmp_path / "site"
    old = publish.build_site(out, sae_name="old", shards=shards, hist_bin_edges=edges, lineage={})
    (tmp_path / ".site.tmp-deadbeef").mkdir()            # what a killed build of the earlier layout left
    (tmp_path / ".site.tmp-deadbeef" / "junk.json").write_text("{}")
    child = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(out), step], stdout=subprocess.PIPE,
                             text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert child.stdout.readline().strip() == f"at {step}"
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    served = _served_site(out)
    assert served["run"] == ("killed" if step == "switched" else "old")   # one or the other, whole
    if step != "switched":
        assert served["version"] == old["version"]
    versions = tmp_path / ".site.versions"
    left = {p.name for p in versions.iterdir()}
    assert len(left) == 2, left                         # the old site and the killed build's folder
    new = publish.build_site(out, sae_name="new", shards=shards, hist_bin_edges=edges, lineage={})
    assert _served_site(out) == {"version": new["version"], "run": "new"}
    previous = served["version"]
    assert {p.name for p in versions.iterdir()} == {new["version"], previous}   # debris swept
    assert sorted(p.name for p in tmp_path.iterdir()) == [".site.versions", "site"]


def test_a_site_of_the_earlier_layout_is_replaced_atomically(tmp_path, tables):
    shards, edges = tables
    out = tmp_path / "site"
    files = generate.site_files(sae_name="legacy", shards=shards[:1], hist_bin_edges=edges, lineage={})
    for rel, body in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(body)
    assert _served_site(out)["run"] == "legacy"
    server, url = serve_in_thread(out)           # a server started before the switch ...
    try:
        new = publish.build_site(out, sae_name="new", shards=shards, hist_bin_edges=edges, lineage={})
        assert out.is_symlink()
        with urllib.request.urlopen(url + "site.json") as res:          # ... serves the new site after it
            assert json.loads(res.read())["version"] == new["version"]
    finally:
        server.shutdown()
        server.server_close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".site.versions", "site"]


# ---------------------------------------------------------------------------------------------
# Twins, byte-level tokens, per-shard lineage (issue 13.6-8)
# ---------------------------------------------------------------------------------------------

TWIN, BYTES, EMOJI = 7, 10, 11                # live features in shard 0 (features [0, 150); seed 3)
OTHER_SHARD_FEATURE = 200                     # in shard 1
DAGSTER_UI = "http://127.0.0.1:3999"


def _byte_window():
    """A window as sae_platform.contexts stores it for byte-level BPE (sae_platform.tokens): a token
    that is only part of a character is "" and the token completing it carries the character."""
    from sae_platform.tokens import _utf8_strings

    pieces = [b"He", b" said", b" \xe6", b"\x97\xa5", b"\xe6\x9c", b"\xac", b" \xf0\x9f", b"\x99", b"\x82", b"!"]
    return _utf8_strings(pieces)


def _shard_lineage(index: int, start: int, stop: int) -> dict:
    return {"feature_table": {"sae": "test-sae", "shard": index, "version": f"v-table-{index}",
                              "features": [start, stop], "dagster_run_id": f"run-of-shard-{index}-0123456789"},
            "sae_checkpoint": {"name": "test-sae", "version": "v-ckpt", "step": 600, "tokens": 614400,
                               "variant": "topk"},
            "shuffle": {"name": "main", "plan_id": "plan-1", "current_plan_id": "plan-1", "n_rows": 122000},
            "activation_partitions": [{"key": "hamlet", "version": "v-h", "n_rows": 60000},
                                      {"key": "lear", "version": "v-l", "n_rows": 62000}],
            "base_model": {"model": "SmolLM2-135M", "hook_name": "blocks.15.hook_resid_post", "d_model": 576}}


def _special_tables():
    shards, edges = synthetic_shards(N_FEATURES, SHARD, n_top=6, n_intervals=3, per_interval=2, n_random=3,
                                     before=10, after=5, n_bins=24, n_logits=N_LOGITS, seed=3)
    window = _byte_window()                   # ['He', ' said', ' ', '日', '', '本', ' ', '', '🙂', '!']
    assert window[3:6] == ["日", "", "本"] and window[7:9] == ["", "🙂"]
    s = shards[0]
    ctx = s[generate.CONTEXTS_FRAME]
    top = pl.col(generate.KIND) == "top"
    twin = (pl.col(generate.FEATURE) == TWIN) & top & pl.col(generate.RANK).is_in([0, 1])
    first = ctx.filter((pl.col(generate.FEATURE) == TWIN) & top & (pl.col(generate.RANK) == 0)).row(0, named=True)
    n = len(window)
    acts_bytes = [0.0, 0.0, 0.0, 1.0, 100.0, 3.0, 0.0, 0.0, 0.0, 0.0]   # the activating token: "" (bytes of 本)
    acts_emoji = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 90.0, 2.0, 0.0]    # the activating token: "" (bytes of 🙂)

    def put(frame, cond, center, tokens, acts):
        return frame.with_columns(
            pl.when(cond).then(pl.lit(center, pl.Int32)).otherwise(pl.col(generate.CENTER)).alias(generate.CENTER),
            pl.when(cond).then(pl.lit(tokens, pl.List(pl.String))).otherwise(pl.col(generate.TOKEN_STRS))
            .alias(generate.TOKEN_STRS),
            pl.when(cond).then(pl.lit(acts, pl.List(pl.Float32))).otherwise(pl.col(generate.ACTS)).alias(generate.ACTS),
            pl.when(cond).then(pl.lit([True] * len(tokens), pl.List(pl.Boolean))).otherwise(pl.col(generate.HAS_ACT))
            .alias(generate.HAS_ACT))

    ctx = put(ctx, twin, first[generate.CENTER], first[generate.TOKEN_STRS], first[generate.ACTS])
    ctx = put(ctx, (pl.col(generate.FEATURE) == BYTES) & top & (pl.col(generate.RANK) == 0), 4, window, acts_bytes)
    ctx = put(ctx, (pl.col(generate.FEATURE) == EMOJI) & top & (pl.col(generate.RANK) == 0), 7, window, acts_emoji)
    s[generate.CONTEXTS_FRAME] = ctx
    assert n == 10
    for i, shard in enumerate(shards):
        shard["lineage"] = _shard_lineage(i, shard["start"], shard["stop"])
    return shards, edges


@pytest.fixture(scope="module")
def special_site(tmp_path_factory):
    shards, edges = _special_tables()
    stored = [s[generate.CONTEXTS_FRAME].clone() for s in shards]
    out = tmp_path_factory.mktemp("special") / "site"
    summary = publish.build_site(out, sae_name="test-sae", shards=shards, hist_bin_edges=edges,
                                 lineage={"sae_checkpoint": {"version": "v-ckpt"}, "browser_dagster_run_id": "run-br"},
                                 n_intervals=3, dagster_url=DAGSTER_UI)
    for before, s in zip(stored, shards):        # the consumer changes nothing of what is stored
        assert before.equals(s[generate.CONTEXTS_FRAME])
    return out, summary


def test_identical_windows_are_folded_with_a_count(special_site):
    f = _chunk_feature(special_site[0], TWIN)["examples"]
    tops = [i for i, k in enumerate(f["kind"]) if k == "top"]
    assert len(tops) == 5 and f["twins"][tops[0]] == 2 and all(f["twins"][i] == 1 for i in tops[1:])
    assert len({tuple(f["tokens"][i]) for i in tops}) == 5


def test_byte_tokens_become_one_span_per_character(special_site):
    f = _chunk_feature(special_site[0], BYTES)["examples"]
    i = f["rank"].index(0)
    assert f["tokens"][i] == ["He", " said", " ", "日", "本", " ", "🙂", "!"]
    assert f["ntok"][i] == [1, 1, 1, 1, 2, 1, 2, 1]
    assert f["center"][i] == 4 and f["acts"][i][4] == 100       # the max of the character's byte tokens
    g = _chunk_feature(special_site[0], EMOJI)["examples"]
    j = g["rank"].index(0)
    assert g["center"][j] == 6 and g["tokens"][j][6] == "🙂" and g["acts"][j][6] == 90
    index = _index(special_site)
    assert "本" in index["columns"]["tokens"][BYTES] and "本" in index["token_table"]      # searchable
    assert index["dagster_url"] == DAGSTER_UI and len(index["shard_lineage"]) == 2


@pytest.fixture
def special_page(chromium, special_site):
    yield from _served_page(chromium, special_site[0])


def test_activating_byte_token_is_visible_and_marked_in_chromium(special_page):
    pg = special_page
    for feature, char, act in ((BYTES, "本", "100"), (EMOJI, "🙂", "90")):
        pg.goto(pg.base_url + f"#/feature/{feature}")
        pg.wait_for_selector("#examples-top .ex")
        center = pg.locator("#examples-top .ex").first.locator(".tok.center")
        assert center.count() == 1 and center.inner_text() == char
        title = center.get_attribute("title")
        assert title.startswith(f"act {act}") and "2 byte tokens" in title
        box = center.bounding_box()
        assert box["width"] > 4 and box["height"] > 4                 # really on screen, not an empty span
        assert "active" in center.get_attribute("class")
        assert pg.locator("#examples-top .ex").first.locator(".ctx").inner_text().replace("\u21b5", "") == \
            "He said 日本 🙂!"
    pg.screenshot(path=str(SCREENSHOTS / "sae_browser_bytes.png"), full_page=True)
    assert not pg.problems, pg.problems


def test_twins_shown_once_with_a_count_in_chromium(special_page):
    pg = special_page
    pg.goto(pg.base_url + f"#/feature/{TWIN}")
    pg.wait_for_selector("#examples-top .ex")
    assert pg.locator("#examples-top .ex").count() == 5
    badge = pg.locator("#examples-top .ex").first.locator(".twins")
    assert badge.inner_text() == "\u00d72"
    assert "1 identical window shown once" in pg.locator("#examples-top h2").inner_text()
    assert not pg.problems, pg.problems


def test_each_feature_shows_its_own_shards_lineage_in_chromium(special_page):
    pg = special_page
    for feature, shard in ((13, 0), (OTHER_SHARD_FEATURE, 1)):
        pg.goto(pg.base_url + f"#/feature/{feature}")
        pg.wait_for_selector("#lineage")
        text = pg.locator("#lineage").inner_text()
        start, stop = (0, 150) if shard == 0 else (150, 300)
        assert f"f{shard}" in text and f"features [{start}, {stop})" in text and f"v-table-{shard}" in text
        other = 1 - shard
        assert f"v-table-{other}" not in text and f"run-of-shard-{other}" not in text
        hrefs = pg.locator("#lineage a").evaluate_all("as => as.map(a => a.getAttribute('href'))")
        assert f"{DAGSTER_UI}/runs/run-of-shard-{shard}-0123456789" in hrefs
        assert f"{DAGSTER_UI}/assets/feature_topk?view=partitions&partition=f{shard}" in hrefs
        assert f"{DAGSTER_UI}/assets/sae_checkpoint?view=partitions&partition=test-sae" in hrefs
        assert f"{DAGSTER_UI}/runs/run-br" in hrefs and all(h.startswith(DAGSTER_UI + "/") for h in hrefs)
        for label in ("Feature table", "SAE checkpoint", "Shuffled activations", "Activation partitions",
                      "Base model", "Browser"):
            assert label in text
    pg.screenshot(path=str(SCREENSHOTS / "sae_browser_lineage.png"), full_page=True)
    assert not pg.problems, pg.problems


def test_search_typed_just_before_opening_a_feature_throws_nothing(special_page):
    pg = special_page
    pg.goto(pg.base_url)
    pg.wait_for_selector("table.features tbody tr")
    for _ in range(3):
        pg.locator("#search").press_sequentially("ze", delay=10)     # the debounced render is pending ...
        pg.evaluate("location.hash = '#/feature/42'")                 # ... when a feature opens
        pg.wait_for_selector("h1:has-text('Feature 42')")
        pg.wait_for_timeout(300)                                      # past the debounce
        pg.go_back()
        pg.wait_for_selector("#search")
    assert not pg.problems, pg.problems


def test_examples_without_a_window_are_never_folded():
    frame = pl.DataFrame({generate.FEATURE: [1, 1, 1], generate.KIND: ["top"] * 3, generate.INTERVAL: [None] * 3,
                          generate.TOKEN_STRS: [None, None, ["a", "b"]], generate.CENTER: [None, None, 1],
                          generate.PARTITION: ["p", "p", "p"], generate.ROW: [1, 2, 3]},
                         schema_overrides={generate.INTERVAL: pl.Int64, generate.TOKEN_STRS: pl.List(pl.String),
                                           generate.CENTER: pl.Int32})
    folded = generate._fold_twins(frame)
    assert folded[generate.ROW].to_list() == [1, 2, 3] and folded["twins"].to_list() == [1, 1, 1]
    twice = generate._fold_twins(pl.concat([frame, frame.tail(1)]))
    assert twice[generate.ROW].to_list() == [1, 2, 3] and twice["twins"].to_list() == [1, 1, 2]


# ---------------------------------------------------------------------------------------------
# For research: explanations, similar and co-occurring features, overview, live text
# ---------------------------------------------------------------------------------------------

EVALUATION = {"fvu": 0.1612345, "l0": 32.0, "loss_recovered": 0.995, "n2g_precision": 0.61, "n2g_recall": 0.42,
              "ablation_sparsity": 0.0123, "probe_loss": 0.08, "dead_fraction": float("nan"), "run": "test-sae"}


def _explained(tables):
    """The synthetic tables plus an explanations frame: feature f is explained by "tok<f>", its
    neighbours are f+1..f+10 (wrapping), it co-occurs with f+1 at share 0.5; feature 42's text is
    "winter <b>" (markup stays text). F1 grows with f; features 42 and 299 were measured on 5
    firings only (too little evidence to rank by), the others on 50; feature 7 was never measured."""
    shards, edges = tables
    out = []
    for s in shards:
        rows = []
        for f in range(s[generate.SHARD_START], s[generate.SHARD_STOP]):
            rows.append({"feature": f, "explanation": "['winter <b>']" if f == 42 else f"['tok{f}']",
                         "precision": None if f == 7 else 0.75, "recall": f / N_FEATURES, "n_matches": 8,
                         "n_firings": 5 if f in (42, 299) else 50,
                         "neighbors": [(f + i) % N_FEATURES for i in range(1, 11)],
                         "neighbor_cosines": [0.9 - 0.05 * i for i in range(10)],
                         "cooccurring": [(f + 1) % N_FEATURES], "cooccurring_shares": [0.5]})
        from sae_platform.explain import explanations_frame
        out.append({**s, generate.EXPLANATIONS_FRAME: explanations_frame(rows)})
    return out, edges


@pytest.fixture(scope="module")
def research_site(tmp_path_factory, tables):
    shards, edges = _explained(tables)
    out = tmp_path_factory.mktemp("research") / "site"
    publish.build_site(out, sae_name="test-sae", shards=shards, hist_bin_edges=edges, lineage=LINEAGE, n_intervals=3,
                       evaluation=EVALUATION)
    return out


def test_explanations_in_the_site_data(research_site):
    index = _index((research_site,))
    cols = index["columns"]
    assert cols["explanation"][42] == "['winter <b>']" and cols["explanation"][7] == "['tok7']"
    assert cols["n2g_f1"][150] == pytest.approx(2 * 0.75 * 0.5 / 1.25, rel=1e-3)
    assert cols["n2g_support"][150] == 50 and cols["n2g_support"][299] == 5 and cols["n2g_f1"][7] is None
    assert index["n2g_min_support"] == generate.N2G_MIN_SUPPORT
    assert index["evaluation"]["fvu"] == 0.1612 and "dead_fraction" not in index["evaluation"]   # NaN dropped
    rows = _chunk_feature(research_site, 42)
    assert rows["neighbors"] == list(range(43, 53)) and rows["n2g_precision"] == 0.75
    assert rows["cooccurring"] == [43] and rows["n2g_firings"] == 5


@pytest.fixture
def research_page(chromium, research_site):
    yield from _served_page(chromium, research_site)


def test_explanation_similar_and_cooccurring_features_in_chromium(research_page):
    pg = research_page
    pg.goto(pg.base_url + "#/feature/42")
    pg.wait_for_selector("#explanation")
    assert pg.locator("#explanation .expltext").inner_text() == "['winter <b>']"      # text, not markup
    assert pg.locator("#stat-precision dd").inner_text().startswith("0.75")
    hrefs = [a.get_attribute("href") for a in pg.locator("#similar a").all()]
    assert hrefs == [f"#/feature/{i}" for i in range(43, 53)]
    assert "cos 0.9" in pg.locator("#similar li").first.inner_text()
    assert "['tok43']" in pg.locator("#similar li").first.inner_text()   # a neighbour's explanation
    assert pg.locator("#cooccurring a").get_attribute("href") == "#/feature/43"
    pg.click("#similar a >> nth=2")
    pg.wait_for_selector("h1:has-text('Feature 45')")
    assert not pg.problems, pg.problems


def test_search_by_explanation_filters_and_sort_by_score_in_chromium(research_page):
    pg = research_page
    pg.goto(pg.base_url)
    pg.wait_for_selector("table.features tbody tr")
    pg.fill("#search", "winter")
    expect(pg.locator("table.features tbody tr")).to_have_count(1)
    assert _ids(pg) == [42] and pg.locator("td.expl").first.inner_text() == "['winter <b>']"
    pg.fill("#search", "")
    pg.click("button[data-sort=n2g_f1]")
    # the best F1 with evidence first: 299's higher F1 rests on 5 firings, so it ranks after every
    # feature measured on 50; the unmeasured feature 7 ("–") comes last
    expect(pg.locator("table.features tbody tr").first).to_have_attribute("data-feature", "298")
    assert "n=50" in pg.locator("table.features tbody tr td.f1").first.inner_text()
    assert "fewer than 20 firings" in pg.locator("#n2g-legend").inner_text()
    assert "not measured" in pg.locator("#n2g-legend").inner_text()
    expect(pg.locator("table.features tbody tr").nth(1)).to_have_attribute("data-feature", "297")
    pg.select_option("#filter", "dead")
    expect(pg.locator("#count")).to_contain_text("matching")
    assert all(pg.locator("table.features tbody tr").evaluate_all("rs => rs.map(r => r.classList.contains('dead'))"))
    assert not pg.problems, pg.problems


def test_overview_page_in_chromium(research_page, research_site):
    index = _index((research_site,))
    dens = index["columns"]["density"]
    dead = sum(1 for d in dens if not d)
    dense = sum(1 for d in dens if d and d > 0.1)
    pg = research_page
    pg.goto(pg.base_url + "#/overview")
    pg.wait_for_selector("#density-histogram")
    assert pg.locator("#ov-features dd").inner_text().startswith("300")
    assert pg.locator("#ov-dead dd").inner_text().startswith(str(dead))
    assert pg.locator("#ov-dense dd").inner_text().startswith(str(dense))
    bars = pg.locator("#density-histogram rect").evaluate_all("rs => rs.map(r => r.textContent)")
    assert sum(int(re.search(r": ([\d,]+) features", b).group(1).replace(",", "")) for b in bars) == 300 - dead
    evaluation = pg.locator("#evaluation").inner_text()
    assert "FVU" in evaluation and "0.161" in evaluation and "N2G precision" in evaluation   # labels: metric_info
    pg.screenshot(path=str(SCREENSHOTS / "sae_browser_overview.png"), full_page=True)
    pg.click("a.filterlink[data-filter=dead]")
    pg.wait_for_selector("table.features tbody tr")
    assert pg.locator("#filter").input_value() == "dead"
    assert len(_ids(pg)) == min(dead, PAGE)
    assert not pg.problems, pg.problems
