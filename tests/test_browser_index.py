"""The browser's chunked index: a list of many features loads, pages, sorts and searches without
fetching every feature's row, and a rebuild rewrites only the shards whose files changed.

Sort orders and postings are checked against the rule the page used to apply in memory; the page
itself in Chromium (its network requests counted) on a 4,096-feature site of 4 shards.
"""

import gc
import json
import re
import weakref
from functools import partial

import fsspec
import numpy as np
import polars as pl
import pytest

try:
    from playwright.sync_api import expect
except ImportError:     # the chromium fixture says what to install
    expect = None

from sae_platform.browser import generate, index_files, publish
from sae_platform.browser.synthetic import synthetic_explanations, synthetic_lineage, synthetic_shards
from sae_platform.errors import PlatformError
from tests.test_browser import PAGE, _ids, _index, _served_page, chromium  # noqa: F401  (fixture)

N, SHARD = 4096, 1024
LIGHT = dict(n_top=2, n_intervals=1, per_interval=1, n_random=1, before=3, after=2, n_bins=8, n_logits=3)


def _light_tables(seed=0):
    shards, edges = synthetic_shards(N, SHARD, seed=seed, **LIGHT)
    shards = synthetic_explanations(shards, seed=seed)
    for s in shards:  # one explanation in 500 names a rare word
        e = s[generate.EXPLANATIONS_FRAME]
        s[generate.EXPLANATIONS_FRAME] = e.with_columns(
            e["explanation"].zip_with(e["feature"] % 500 != 3, e["explanation"] + " Winterreise"))
    return shards, edges


@pytest.fixture(scope="module")
def big_site(tmp_path_factory):
    shards, edges = _light_tables()
    out = tmp_path_factory.mktemp("big") / "site"
    publish.build_site(out, sae_name="big", shards=shards, hist_bin_edges=edges, lineage=synthetic_lineage())
    return out


def _data(out):
    return out / json.loads((out / "site.json").read_text())["data"]


def _order_rule(values, desc, tier=None):
    """The page's former in-memory sort: missing last, ties by id (rows are in id order), in tiers."""
    tier = tier if tier is not None else [0] * len(values)
    present = [r for r in range(len(values)) if values[r] is not None]
    missing = [r for r in range(len(values)) if values[r] is None]
    key = (lambda r: (tier[r], -values[r], r)) if desc else (lambda r: (tier[r], values[r], r))
    return sorted(present, key=key) + missing


def test_sort_orders_are_the_pages_former_in_memory_sort(big_site):
    cols = _index((big_site,))["columns"]
    for key in ("density", "max"):
        for direction in ("asc", "desc"):
            got = np.frombuffer((_data(big_site) / f"order/{key}.{direction}.i32").read_bytes(), "<i4").tolist()
            assert got == _order_rule(cols[key], direction == "desc"), (key, direction)
    f1, support = cols["n2g_f1"], cols["n2g_support"]
    tier = [2 if f1[r] is None else 1 if (support[r] or 0) < generate.N2G_MIN_SUPPORT else 0 for r in range(N)]
    got = np.frombuffer((_data(big_site) / "order/n2g_f1.desc.i32").read_bytes(), "<i4").tolist()
    assert got == _order_rule(f1, True, tier)
    density = np.frombuffer((_data(big_site) / index_files.DENSITY_FILE).read_bytes(), "<f8")
    assert [None if np.isnan(d) else d for d in density.tolist()] == cols["density"]


def _postings(out, folder, firsts, code):
    """The Int32 entries of ``code`` in the postings files below ``folder`` (index_files.postings_files)."""
    n = max(i for i, first in enumerate(firsts) if first <= code)
    body = np.frombuffer((_data(out) / f"{folder}/{n}.i32").read_bytes(), "<i4")
    i = code - firsts[n]
    return body[2 + body[0] + body[1 + i]: 2 + body[0] + body[2 + i]].tolist()


def _word_postings(out, word):
    """``word``'s (row, at) pairs, read as the page does: its prefix's word list, then one file."""
    listing = json.loads((_data(out) / index_files.word_file(word[:index_files.WORD_PREFIX])).read_text())
    folder = index_files.word_file(word[:index_files.WORD_PREFIX]).removesuffix(".json")
    flat = _postings(out, folder, listing["files"], listing["words"].index(word))
    return list(zip(flat[0::2], flat[1::2]))


def test_token_and_explanation_postings_find_exactly_the_listed_features(big_site):
    index = _index((big_site,))
    cols = index["columns"]
    for token in (" Paris", ",", "("):
        want = sorted((r, (toks or []).index(token)) for r, toks in enumerate(cols["tokens"]) if token in (toks or []))
        got = _postings(big_site, "search/tokens", index["token_files"], index["token_table"].index(token))
        assert want and sorted((e >> 3, e & 7) for e in got) == want
    pairs = _word_postings(big_site, "winterreise")
    want = [r for r, text in enumerate(cols["explanation"]) if "winterreise" in text.lower()]
    assert [r for r, _ in pairs] == want and len(want) == N // 500 + 1
    assert all(cols["explanation"][r][at:].lower().startswith("winterreise") for r, at in pairs)
    for word in ("with", "which", "the"):                 # common words, each as the index holds it
        want = [r for r, text in enumerate(cols["explanation"]) if word in re.findall(r"\w+", text.lower())]
        assert [r for r, _ in _word_postings(big_site, word)] == want


def test_a_rare_words_postings_file_holds_no_common_words_entries(monkeypatch):
    """A file of postings stays within POSTINGS_PER_FILE unless one word alone holds more: a query
    for a rare word beside a common one (``winter`` before ``with``) fetches a small file."""
    monkeypatch.setattr(index_files, "POSTINGS_PER_FILE", 100)
    explanations = ["with winter" if r % 50 == 0 else "with" for r in range(200)] + ["wide"] * 60
    files = index_files.word_postings(explanations)
    listing = json.loads(files[index_files.word_file("wi")])
    assert listing == {"words": ["wide", "winter", "with"], "files": [0, 1, 2]}   # 120, 8 and 400 entries
    winter = np.frombuffer(files["search/words/7769/1.i32"], "<i4").tolist()
    assert winter == [1, 0, 8] + [x for r in range(0, 200, 50) for x in (r, 5)]   # n_codes, offsets, (row, at)s


def _shard_files(out):
    """Per shard folder: {file: (bytes, mtime_ns, inode)} of the site ``out`` shows now."""
    return {folder.name: {str(f.relative_to(folder)): (f.read_bytes(), f.stat().st_mtime_ns, f.stat().st_ino)
                          for f in folder.rglob("*") if f.is_file()}
            for folder in (out.resolve() / "shards").iterdir()}


def _rewrite_shard(shards, index):
    """The tables with shard ``index``'s maxima changed (as a refresh of that shard would)."""
    changed = [dict(s) for s in shards]
    stats = changed[index][generate.STATS_FRAME]
    changed[index][generate.STATS_FRAME] = stats.with_columns(pl.col(generate.MAX) * 2)
    return changed


def test_a_rebuild_rewrites_only_the_shard_that_changed(tmp_path):
    shards, edges = _light_tables()
    out = tmp_path / "site"
    first = publish.build_site(out, sae_name="big", shards=shards, hist_bin_edges=edges, lineage={})
    assert first["shards_written"] == 4 and first["shards_kept"] == 0
    before, first_maxima = _shard_files(out), _index((out,))["columns"]["max"]
    second = publish.build_site(out, sae_name="big", shards=_rewrite_shard(shards, 2), hist_bin_edges=edges,
                                lineage={})
    assert second["shards_written"] == 1 and second["shards_kept"] == 3
    after = _shard_files(out)
    kept = set(before) & set(after)
    assert len(kept) == 3 and all(f"f{2 * SHARD}-" not in name for name in kept)
    for name in kept:                     # the same bytes, modification times and inodes: not rewritten
        assert after[name] == before[name]
    new = set(after) - set(before)
    assert len(new) == 1 and next(iter(new)).startswith(f"f{2 * SHARD}-{3 * SHARD}-")
    # the list shows the new maxima of that shard, the same of the others
    maxima = _index((out,))["columns"]["max"]
    assert maxima[2 * SHARD:3 * SHARD] != first_maxima[2 * SHARD:3 * SHARD]
    assert maxima[:2 * SHARD] + maxima[3 * SHARD:] == first_maxima[:2 * SHARD] + first_maxima[3 * SHARD:]


def _site_contents(out):
    """Every file of the site ``out`` shows, by path, the build's version and time left out: what two
    builds of the same tables must agree on byte for byte."""
    root = out.resolve()
    data = json.loads((root / "site.json").read_text())["data"]
    files = {str(f.relative_to(root)).replace(data, "data/V"): f.read_bytes()
             for f in root.rglob("*") if f.is_file() and f.name != "site.json"}
    index = json.loads(files.pop("data/V/index.json"))
    del index["version"], index["generated"]
    return files, index


def test_a_rebuild_after_one_shard_changed_equals_a_build_from_scratch(tmp_path):
    """The site a rebuild leaves (3 shard folders kept, 1 written, the index made anew) is the site
    a build from scratch of the same tables writes, file for file."""
    shards, edges = _light_tables()
    publish.build_site(tmp_path / "site", sae_name="big", shards=shards, hist_bin_edges=edges, lineage={})
    changed = _rewrite_shard(shards, 2)
    rebuilt = publish.build_site(tmp_path / "site", sae_name="big", shards=changed, hist_bin_edges=edges, lineage={})
    assert (rebuilt["shards_written"], rebuilt["shards_kept"]) == (1, 3)
    publish.build_site(tmp_path / "scratch", sae_name="big", shards=changed, hist_bin_edges=edges, lineage={})
    assert _site_contents(tmp_path / "site") == _site_contents(tmp_path / "scratch")


TABLE_FRAMES = (generate.STATS_FRAME, generate.EXAMPLES_FRAME, generate.CONTEXTS_FRAME, generate.LOGITS_FRAME,
                generate.EXPLANATIONS_FRAME)


class _StoredShards:
    """Feature shards whose tables live in parquet files (``folder/f<i>/<table>.parquet``), given to
    the writer lazily (``shards``: start, stop and ``load``), counting at each load how many frames
    of the loads before it are still alive (``alive_at_load``)."""

    def __init__(self, shards: list[dict], folder):
        self.alive_at_load, self._loaded = [], []
        self.folders = [folder / f"f{i}" for i in range(len(shards))]
        for shard, where in zip(shards, self.folders, strict=True):
            where.mkdir(parents=True)
            for name in TABLE_FRAMES:
                shard[name].write_parquet(where / f"{name}.parquet")
        self.shards = [{"start": s["start"], "stop": s["stop"], "load": partial(self._load, where)}
                       for s, where in zip(shards, self.folders, strict=True)]

    def tables(self, where) -> dict:
        return {name: pl.read_parquet(where / f"{name}.parquet") for name in TABLE_FRAMES}

    def _load(self, where) -> dict:
        gc.collect()  # what is still referenced, not what the collector has yet to reach
        self.alive_at_load.append(sum(ref() is not None for ref in self._loaded))
        tables = self.tables(where)
        self._loaded += [weakref.ref(frame) for frame in tables.values()]
        return tables


SUMMARY_BYTES_PER_FEATURE = 400   # the list rows the index is built from (~320 B with explanations)


def test_a_lazy_build_holds_one_shards_tables_at_a_time(tmp_path):
    """Shards given lazily (``load``) are read when the writer reaches them and dropped before the
    next is read: a build holds one shard's tables, not every shard's, plus the list rows of the
    features before (``summary_bytes``: at most SUMMARY_BYTES_PER_FEATURE a feature, so ~0.4 GiB at
    2^20 features). The site is byte for byte the one the same tables given at once make."""
    shards, edges = synthetic_shards(N, N // 32, seed=1, **LIGHT)   # 32 shards of 128 features
    stored = _StoredShards(synthetic_explanations(shards, seed=1), tmp_path / "tables")
    lazy = publish.build_site(tmp_path / "lazy", sae_name="big", shards=stored.shards, hist_bin_edges=edges,
                              lineage={})
    assert stored.alive_at_load == [0] * 32, stored.alive_at_load
    assert (lazy["n_features"], lazy["shards_written"]) == (N, 32)
    per_feature = lazy["summary_bytes"] / N
    print(f"\nsummaries held for the index: {per_feature:.0f} B a feature ({lazy['summary_bytes'] / 1e6:.2f} MB "
          f"for {N:,} features)")
    assert 0 < per_feature <= SUMMARY_BYTES_PER_FEATURE, per_feature
    at_once = [{"start": s["start"], "stop": s["stop"], **stored.tables(where)}
               for s, where in zip(stored.shards, stored.folders, strict=True)]
    publish.build_site(tmp_path / "eager", sae_name="big", shards=at_once, hist_bin_edges=edges, lineage={})
    assert _site_contents(tmp_path / "lazy") == _site_contents(tmp_path / "eager")


def test_a_lazy_shards_bad_load_is_named(tmp_path):
    _, edges = synthetic_shards(4, 4)
    with pytest.raises(PlatformError, match=r"load of feature shard \[0, 4\) returned list"):
        generate.site_files(sae_name="r", shards=[{"start": 0, "stop": 4, "load": lambda: []}],
                            hist_bin_edges=edges, lineage={})


def test_a_rebuild_on_a_filesystem_writes_only_the_changed_shard_and_sweeps_old_ones(tmp_path):
    shards, edges = _light_tables()
    fs = fsspec.filesystem("memory")
    written = []
    pipe = fs.pipe_file
    fs.pipe_file = lambda path, value, **kw: (written.append(path), pipe(path, value, **kw))[1]
    try:
        publish.build_site("/bigsite", fs=fs, sae_name="big", shards=shards, hist_bin_edges=edges, lineage={})
        written.clear()
        summary = publish.build_site("/bigsite", fs=fs, sae_name="big", shards=_rewrite_shard(shards, 1),
                                     hist_bin_edges=edges, lineage={})
        shard_writes = {p.split("/shards/")[1].split("/")[0] for p in written if "/shards/" in p}
        assert summary["shards_kept"] == 3 and len(shard_writes) == 1
        assert next(iter(shard_writes)).startswith(f"f{SHARD}-{2 * SHARD}-")
        changed_1 = next(iter(shard_writes))
        # two builds later (shard 2 changed, then shard 3), the folders neither the current nor the
        # previous site shows are gone: shard 1's changed one; kept: both versions of shards 2 and 3
        for i in (2, 3):
            publish.build_site("/bigsite", fs=fs, sae_name="big", shards=_rewrite_shard(shards, i),
                               hist_bin_edges=edges, lineage={})
        folders = {p.rstrip("/").split("/")[-1] for p in fs.ls("/bigsite/shards", detail=False)}
        shown = json.loads(fs.cat_file(f"/bigsite/{json.loads(fs.cat_file('/bigsite/site.json'))['data']}/index.json"))
        assert {s["path"].split("/")[1] for s in shown["shards"]} <= folders
        assert changed_1 not in folders and len(folders) == 4 + 2
    finally:
        fs.rm("/bigsite", recursive=True)


# ---------------------------------------------------------------------------------------------
# In Chromium: what the list fetches
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def big_page(chromium, big_site):  # noqa: F811  (the fixture imported above)
    for pg in _served_page(chromium, big_site):
        pg.fetched = []
        pg.on("request", lambda r: pg.fetched.append(r.url[len(pg.base_url):]))
        yield pg


def _rows_fetched(pg):
    return [u for u in pg.fetched if "/rows/" in u]


def test_the_list_pages_sorts_and_searches_fetching_only_what_it_shows(big_page, big_site):
    pg = big_page
    index = _index((big_site,))
    cols = index["columns"]
    pg.goto(pg.base_url)
    assert _ids(pg) == list(range(PAGE))
    # loading: the index and the rows of the first page (chunks of 64), no order, column or postings
    assert len(_rows_fetched(pg)) == -(-PAGE // 64) and not [u for u in pg.fetched if "/order/" in u or "/search/" in u]
    pg.click("#next-page")                                # only the chunks of the rows shown
    assert _ids(pg) == list(range(PAGE, 2 * PAGE))
    assert len(_rows_fetched(pg)) == len({r // 64 for r in range(2 * PAGE)})
    pg.fetched.clear()
    pg.click("button[data-sort=density]")                 # descending, missing last, ties by id
    pg.wait_for_selector("button.sort.active[data-sort=density]")
    assert _ids(pg) == [cols["feature"][r] for r in _order_rule(cols["density"], True)][:PAGE]
    assert [u for u in pg.fetched if "/order/" in u] and all(u.endswith("density.desc.i32")
                                                             for u in pg.fetched if "/order/" in u)
    assert len(_rows_fetched(pg)) <= PAGE and not [u for u in pg.fetched if "/search/" in u]
    pg.fetched.clear()
    pg.fill("#search", " Paris")                          # by token: the features whose strongest tokens hold it
    expect(pg.locator("#count")).to_contain_text("matching")
    holders = {r for r, toks in enumerate(cols["tokens"]) if any("paris" in t.strip().lower() for t in toks or [])}
    explained = {r for r, text in enumerate(cols["explanation"])        # and whose explanation has a word "paris…"
                 if any(w.startswith("paris") for w in re.findall(r"\w+", text.lower()))}
    assert pg.locator("#count").inner_text().startswith(f"{len(holders | explained):,} matching")
    got = _ids(pg)                                        # still sorted by density
    assert set(got) <= holders | explained and got == sorted(got, key=lambda f: (-(cols["density"][f] or -1), f))
    postings = {u.split("/search/")[1].split("/")[0] for u in pg.fetched if "/search/" in u}
    assert postings == {"tokens", "words"}
    pg.fill("#search", "winterreise")                     # by explanation: one postings file of words
    expect(pg.locator("#count")).to_contain_text(f"{N // 500 + 1} matching")
    assert sorted(_ids(pg)) == [f for f in range(N) if f % 500 == 3]
    words = f"data/{_data(big_site).name}/search/words/7769"   # its word list, then one postings file
    assert [u for u in pg.fetched if u.startswith(words)] == [f"{words}.json", f"{words}/0.i32"]
    pg.fill("#search", "3000")                            # by id, then open it: one feature chunk
    expect(pg.locator("table.features tbody tr").first).to_have_attribute("data-feature", "3000")
    pg.fetched.clear()
    pg.press("#search", "Enter")
    pg.wait_for_selector("h1:has-text('Feature 3000')")
    pg.wait_for_selector("#lineage")
    assert [u for u in pg.fetched if "/features/" in u] == [f"{index['shards'][2]['path']}/features/46.json"]
    assert not pg.problems, pg.problems


def _search_rule(cols, query):
    """The features a search lists, best first, by brute force over every row (the page's rule,
    app.js: an id first, then token matches by the rank of the first matching strongest token, +0.5
    when the token only contains the query, then explanations holding a word that begins with each
    query word, by where the first such word stands; ties by id)."""
    q = query.strip()
    ql, rank = q.lower(), {}
    idq = q.removeprefix("#")
    if idq.isdigit() and int(idq) in cols["feature"]:
        rank[cols["feature"].index(int(idq))] = -1
    for r, toks in enumerate(cols["tokens"]):
        lowered = [t.strip().lower() for t in toks or []]
        scores = [j + (0 if t == ql else 0.5) for j, t in enumerate(lowered) if ql in t]
        if scores and r not in rank:
            rank[r] = min(scores)
    words = [w for w in re.findall(r"\w+", ql) if len(w) >= index_files.WORD_PREFIX]
    for r, text in enumerate(cols["explanation"]):
        spans = list(re.finditer(r"\w+", (text or "").lower()))
        found = [[m.start() for m in spans if m.group().startswith(w)] for w in words]
        if words and len(ql) >= 2 and all(found) and r not in rank:
            rank[r] = 100 + found[0][0] / 1000
    return [cols["feature"][r] for r in sorted(rank, key=lambda r: (rank[r], r))]


def test_search_lists_what_a_brute_force_filter_over_the_index_finds(big_page, big_site):
    """Token, partial-token, explanation-prefix, several-word and id searches in Chromium list the
    same features in the same order as :func:`_search_rule` over every row (count, first two pages)."""
    pg = big_page
    cols = _index((big_site,))["columns"]
    pg.goto(pg.base_url)
    _ids(pg)
    for query in (" Paris", "par", "winterreise", "Winter rIV", "wi", "#3000", "zzzz"):
        want = _search_rule(cols, query)
        pg.fill("#search", query)
        expect(pg.locator("#count")).to_contain_text(f"{len(want):,} matching")
        got = _ids(pg)
        if len(want) > PAGE:
            pg.click("#next-page")
            expect(pg.locator("table.features tbody tr").first).to_have_attribute("data-feature", str(want[PAGE]))
            got += _ids(pg)
        assert got == want[:2 * PAGE], query
        pg.fill("#search", "")
        expect(pg.locator("#count")).not_to_contain_text("matching")
    assert not pg.problems, pg.problems
