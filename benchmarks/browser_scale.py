"""The feature browser at a million features: load, feature page, search and sort, timed in Chromium.

    python benchmarks/browser_scale.py --quick    # 2^16 features: under a minute on 2 cores
    python benchmarks/browser_scale.py            # 2^20 features (docs/results.md)

A synthetic SAE's tables (``sae_platform.browser.synthetic``: the pipeline's schemas, 16 shards of
65,536 features at 2^20, light examples per feature so that the site fits a laptop's disk, and N2G-like
explanations) are written by the real writer (``publish.build_site``), served by the bundled server
(``server.serve_in_thread``, gzip on) and opened in Debian's Chromium (Playwright, as the browser
tests), a fresh browser context (empty cache) per figure. Times are wall clock from the action to
the page's answer on screen, medians of --repeats:

- index interactive: navigation to the list, until its first page of rows is drawn and settled;
- feature page: from the list, ``#/feature/<id>`` for ids spread over every shard, until its
  examples are drawn (the feature's 64-feature chunk is fetched, nothing else);
- search by token / by explanation: typing a query into the list (its 120 ms debounce included)
  until the matching rows are drawn (the first page: app.js's PAGE rows, one row chunk per row
  when they lie apart);
- sort: a click on the density column until the list is redrawn in that order.

Each figure's line also says what the page fetched for it (``requests``, ``fetched_kB`` as sent,
gzip included; Chromium's resource timing, the last repeat): where a figure's time goes.

Baseline: the same figures for the writer and page of commit BASELINE_REF (one ``index.json``
with every feature's row, sorted and searched in memory), built from the same tables in a
subprocess running that commit's code (``git archive``). ``--no-baseline`` takes the goal as the
baseline instead. Also printed: the new site's bytes per feature (all files, and the index files
a list loads), and the build's seconds. The last lines are one JSON object per figure with
``metric``, ``value``, ``baseline``, ``ratio`` (value / baseline), ``goal`` and ``lower_is_better``.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from bench_help import HelpFormatter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sae_platform.browser import synthetic  # noqa: E402  (its file: the tables both writers get)
from sae_platform.browser.server import serve_in_thread  # noqa: E402

BASELINE_REF = "4f95a78"   # the last commit whose site is one index.json of every feature
CHROMIUM = os.environ.get("SAE_PLATFORM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
GOALS = {"index_interactive_s": 2.0, "feature_page_s": 0.5, "search_token_s": 1.0, "search_explanation_s": 1.0,
         "sort_density_s": 1.0}
TABLES = dict(n_top=2, n_intervals=1, per_interval=1, n_random=1, before=4, after=2, n_bins=16, n_logits=4)
TOKEN_QUERY, EXPLANATION_QUERY = " Paris", "winter"

BUILD = """
import importlib.util, json, sys, time
from sae_platform.browser.publish import build_site
spec = importlib.util.spec_from_file_location("synthetic_now", sys.argv[1])   # the tables of today's code
synthetic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(synthetic)
n, shard, out = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
tables = json.loads(sys.argv[5])
shards, edges = synthetic.synthetic_shards(n, shard, **tables)
shards = synthetic.synthetic_explanations(shards)
for s in shards:   # one explanation in 1,000 names "winter": a rare word to search
    e = s["explanations"]
    s["explanations"] = e.with_columns(e["explanation"].zip_with(e["feature"] % 1000 != 7,
                                                                 e["explanation"] + " winter"))
lineage = synthetic.synthetic_lineage()
t0 = time.perf_counter()
summary = build_site(out, sae_name="scale", shards=shards, hist_bin_edges=edges, lineage=lineage)
print(json.dumps({**summary, "build_s": time.perf_counter() - t0}))
"""


def build(code_root: Path, n: int, shard: int, out: Path) -> dict:
    """Build the synthetic site with the writer of ``code_root`` in a subprocess; its summary."""
    env = {**os.environ, "PYTHONPATH": str(code_root)}
    res = subprocess.run([sys.executable, "-c", BUILD, synthetic.__file__, str(n),
                          str(shard), str(out), json.dumps(TABLES)], env=env, capture_output=True, text=True,
                         cwd=code_root)   # not this checkout: `python -c` imports from its working directory
    if res.returncode:
        raise SystemExit(f"building the site with {code_root} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def baseline_tree(tmp: Path) -> Path | None:
    """BASELINE_REF's sae_platform package, unpacked into ``tmp``; None when this checkout lacks
    that commit (a shallow clone): the figures are then compared with their goals."""
    archive = tmp / "baseline.tar"
    res = subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), BASELINE_REF, "sae_platform"],
                         capture_output=True, text=True)
    if res.returncode:
        print(f"no baseline: this checkout lacks commit {BASELINE_REF} ({res.stderr.strip()[:200]}); "
              "comparing with the goals", file=sys.stderr)
        return None
    with tarfile.open(archive) as tar:
        tar.extractall(tmp / "baseline", filter="data")
    return tmp / "baseline"


def _settled(pg) -> None:
    pg.wait_for_selector("table.features tbody tr")
    pg.wait_for_function("() => !document.querySelector('#list[data-busy]')")


FETCHED_JS = """() => { const rs = performance.getEntriesByType('resource');
  return [rs.length, rs.reduce((s, r) => s + r.transferSize, 0)]; }"""


def _fetched(pg, fetched: dict, metric: str) -> None:
    """What the page fetched since the last call (requests, kB), kept in ``fetched[metric]``."""
    n, size = pg.evaluate(FETCHED_JS)
    pg.evaluate("performance.clearResourceTimings()")
    fetched[metric] = {"requests": n, "fetched_kB": round(size / 1e3, 1)}


def measure(browser, site: Path, n: int, repeats: int) -> tuple[dict[str, float], dict[str, dict]]:
    """The figures (seconds, medians) for the site in ``site`` (see the module docstring), and
    what the page fetched for each (requests, kB; the last repeat)."""
    server, url = serve_in_thread(site)
    figures: dict[str, list[float]] = {k: [] for k in GOALS}
    fetched: dict[str, dict] = {}
    try:
        for rep in range(repeats):
            ctx = browser.new_context(viewport={"width": 1280, "height": 900})
            pg = ctx.new_page()
            pg.set_default_timeout(120_000)
            t0 = time.perf_counter()
            pg.goto(url, wait_until="commit")
            _settled(pg)
            figures["index_interactive_s"].append(time.perf_counter() - t0)
            _fetched(pg, fetched, "index_interactive_s")
            for i in range(3):     # ids spread over the shards, a different chunk each time
                fid = (rep * 3 + i) * (n // (3 * repeats)) + 1 + rep
                t0 = time.perf_counter()
                pg.evaluate(f"location.hash = '#/feature/{fid}'")
                pg.wait_for_selector(f"h1:has-text('Feature {fid}')")
                pg.wait_for_selector("#lineage")
                figures["feature_page_s"].append(time.perf_counter() - t0)
                _fetched(pg, fetched, "feature_page_s")
            pg.evaluate("location.hash = '#/'")
            _settled(pg)
            for metric, query in (("search_token_s", TOKEN_QUERY), ("search_explanation_s", EXPLANATION_QUERY)):
                pg.fill("#search", "")
                pg.wait_for_function("() => !document.querySelector('#count').textContent.includes('matching')")
                _settled(pg)
                _fetched(pg, fetched, metric)
                t0 = time.perf_counter()
                pg.fill("#search", query)
                pg.wait_for_function("() => document.querySelector('#count').textContent.includes('matching')")
                _settled(pg)
                figures[metric].append(time.perf_counter() - t0)
                _fetched(pg, fetched, metric)
            pg.fill("#search", "")
            pg.wait_for_function("() => !document.querySelector('#count').textContent.includes('matching')")
            _settled(pg)
            _fetched(pg, fetched, "sort_density_s")
            t0 = time.perf_counter()
            pg.click("button[data-sort=density]")
            pg.wait_for_selector("button.sort.active[data-sort=density]")
            _settled(pg)
            figures["sort_density_s"].append(time.perf_counter() - t0)
            _fetched(pg, fetched, "sort_density_s")
            ctx.close()
    finally:
        server.shutdown()
        server.server_close()
    return {k: statistics.median(v) for k, v in figures.items()}, fetched


def site_bytes(site: Path) -> tuple[int, int]:
    """(all bytes of the site, bytes of what the list loads up front: index.json and the app)."""
    real = site.resolve()
    total = sum(p.stat().st_size for p in real.rglob("*") if p.is_file())
    data = json.loads((real / "site.json").read_text())["data"]
    upfront = sum((real / rel).stat().st_size for rel in (f"{data}/index.json", "static/app.js", "index.html"))
    return total, upfront


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2^16 features instead of 2^20")
    parser.add_argument("--features", type=int, help="features of the synthetic SAE (default 2^20; 2^16 quick)")
    parser.add_argument("--repeats", type=int, help="runs per figure (default 3; 1 quick)")
    parser.add_argument("--no-baseline", action="store_true", help="compare with the goals, not BASELINE_REF")
    parser.add_argument("--keep", help="build into this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    n = args.features or (1 << 16 if args.quick else 1 << 20)
    shard = min(65536, max(1, n // 16))
    repeats = args.repeats or (1 if args.quick else 3)
    from playwright.sync_api import sync_playwright

    tmp = Path(args.keep or tempfile.mkdtemp(prefix="browser_scale-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        built = build(ROOT, n, shard, tmp / "site")
        total, upfront = site_bytes(tmp / "site")
        print(f"new writer: {n:,} features in {built['build_s']:.1f} s, {total / n:,.0f} B/feature "
              f"({total / 1e6:,.0f} MB), loaded up front {upfront / 1e3:,.0f} kB", file=sys.stderr)
        old = None
        tree = None if args.no_baseline else baseline_tree(tmp)
        if tree is not None:
            old_built = build(tree, n, shard, tmp / "old")
            print(f"{BASELINE_REF} writer: {old_built['seconds']:.1f} s, index.json "
                  f"{old_built['index_bytes'] / 1e3:,.0f} kB", file=sys.stderr)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            new, fetched = measure(browser, tmp / "site", n, repeats)
            if tree is not None:
                old, _ = measure(browser, tmp / "old", n, repeats)
            browser.close()
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    baseline_is = f"commit {BASELINE_REF}'s writer and page at the same size" if old else "the goal"
    lines = []
    for metric, goal in GOALS.items():
        base = old[metric] if old else goal
        lines.append({"metric": f"browser_{metric}_{n}_features", "value": round(new[metric], 3),
                      "baseline": round(base, 3), "ratio": round(new[metric] / base, 3), "goal": goal,
                      "lower_is_better": True, "unit": "s", "baseline_is": baseline_is,
                      "goal_is": "value <= goal", "repeats": repeats, **fetched[metric]})
    lines.append({"metric": f"browser_bytes_per_feature_{n}_features", "value": round(total / n, 1),
                  "baseline": None, "ratio": None, "goal": None, "lower_is_better": True, "unit": "B",
                  "upfront_bytes": upfront, "build_s": round(built["build_s"], 1),
                  "note": f"light synthetic examples: {TABLES}"})
    for line in lines:
        print(json.dumps(line))


if __name__ == "__main__":
    main()
