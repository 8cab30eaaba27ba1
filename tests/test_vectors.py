"""A user-supplied direction as a one-latent dictionary: `sae-platform vector add` validates and commits it,
the feature stages (real Dagster runs) describe it like any latent, and its browser page shows its top and
interval examples and histogram; bad files are refused with messages naming the file and the fix."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from conftest import cache_and_shuffle, tiny_definitions
from dagster import DagsterInstance
from safetensors.numpy import save_file

from assets.partitions import ACTIVATION_BATCHES, N_FEATURE_SHARDS
from jobs.cli import build_features
from sae_platform import catalog
from sae_platform import shuffle as sh
from sae_platform.activations import open_partition
from sae_platform.corpus import list_source
from sae_platform.feature_merge import read_tables
from sae_platform.sae import VectorDictionary, build_sae
from sae_platform.shuffled import open_shuffled
from sae_platform.trainer import load_sae
from sae_platform.vectors import VectorError, add_vector, read_direction
from tests.test_browser import CHROMIUM, _chunk_feature, _index, _served_page

NAME = "probe-a"
TOP_K = 5
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def chromium():
    """Debian's Chromium when it is installed (its page check is skipped otherwise: the page's data is
    checked either way; tests/test_browser.py is where a missing Chromium fails)."""
    if os.environ.get("SAE_PLATFORM_SKIP_BROWSER") == "1" or not os.access(CHROMIUM, os.X_OK):
        yield None
        return
    from playwright.sync_api import sync_playwright

    from tests.test_browser import CHROMIUM_ARGS

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def _check_page_in_chromium(chromium, site: Path, top_k: int) -> None:
    pages = _served_page(chromium, site)
    pg = next(pages)
    try:
        pg.goto(pg.base_url + "#/feature/0")
        pg.wait_for_selector(".ex .tok.active")
        assert pg.locator("h1").inner_text().startswith("Feature 0")
        assert pg.locator("#examples-top .ex").count() == top_k
        assert pg.locator("#examples-interval .interval").count() >= 1
        assert pg.locator("#histogram rect.histbar").count() >= 1
        assert not pg.problems, pg.problems
    finally:
        next(pages, None)


@pytest.fixture
def cached(store, tiny_model_dir, tiny_hooked, text_dir):
    """Two cached batches of the tiny model (beta, gamma: the features build runs 6 Dagster runs a batch),
    shuffled into ``main`` (no SAE trained)."""
    (text_dir / "alpha.txt").unlink()
    cache_and_shuffle(store, tiny_model_dir, tiny_hooked, text_dir)
    return open_shuffled(store, "main").d_model


def test_a_vector_gets_feature_tables_and_a_browser_page(cached, store, tiny_model_dir, text_dir, tmp_path,
                                                         chromium):
    d_model = cached
    direction = np.random.default_rng(0).standard_normal(d_model).astype(np.float32) * 3
    path = tmp_path / "probe.npy"
    np.save(path, direction)
    added = add_vector(store, NAME, path, "main")
    assert added["committed"] and added["d_model"] == d_model
    assert not add_vector(store, NAME, path, "main")["committed"]  # the same vector again: nothing new
    sae, cfg = load_sae(store, NAME)
    assert cfg["sae"]["variant"] == "vector" and sae.n_latents == 1

    defs = tiny_definitions(store, tiny_model_dir, text_dir, tmp_path,
                            features={"sae_name": NAME, "top_k": TOP_K, "reservoir_factor": 4, "device": "cpu"})
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(ACTIVATION_BATCHES.name, [f.key for f in list_source(str(text_dir / "*"))])
    assert build_features(instance, defs, NAME)

    # the top examples: a brute-force ranking of ReLU(x . d/|d|) over every cached row
    unit = torch.from_numpy(direction).double() / float(np.linalg.norm(direction.astype(np.float64)))
    brute = []
    for key in sh.pinned_keys(store, "main"):
        acts = torch.from_numpy(np.asarray(open_partition(store, key).group["acts"][:])).double()
        brute += [(float(a), key, row) for row, a in enumerate((acts @ unit).tolist()) if a > 0]
    brute.sort(key=lambda t: (-t[0], t[1], t[2]))
    tables = [read_tables(store, NAME, i) for i in range(N_FEATURE_SHARDS)]
    examples = pl.concat([t.examples for t in tables])
    top = examples.filter(pl.col("kind") == "top").sort("rank")
    assert [(p, r) for p, r in zip(top["partition"], top["row"], strict=True)] == [(k, r) for _, k, r in
                                                                                     brute[:TOP_K]]
    assert np.allclose(top["activation"].to_numpy(), [a for a, _, _ in brute[:TOP_K]], rtol=1e-4)
    stats = pl.concat([t.stats for t in tables])
    assert stats.height == 1 and stats["count"][0] == len(brute)
    assert examples.filter(pl.col("kind") == "interval").height > 0

    # its browser page: the one feature, with top and interval examples and the histogram
    site = Path(store.path("browser", NAME))
    index = _index((site,))
    assert index["n_features"] == 1 and index["columns"]["feature"] == [0]
    page = _chunk_feature(site, 0)
    # (identical windows are shown once: the repeated demo text makes twins among the top examples)
    assert 1 <= page["examples"]["kind"].count("top") <= TOP_K and "interval" in page["examples"]["kind"]
    assert sum(page["histogram"]) == len(brute)
    assert page["top_token_strs"]  # logit effects of the unit direction (W_dec . W_U)
    if chromium is not None:
        _check_page_in_chromium(chromium, site, page["examples"]["kind"].count("top"))


def test_the_vector_dictionary_is_the_rectified_projection_on_the_unit_direction():
    """a = ReLU(x . d/|d| + b) in raw units; W_dec the unit direction; rebuilt by build_sae as load_sae does."""
    direction = torch.tensor([3.0, 0.0, -4.0, 0.0])
    model = VectorDictionary.from_direction(direction, bias=-0.5)
    x = torch.tensor([[1.0, 2.0, -1.0, 7.0], [0.0, 0.0, 1.0, 0.0], [0.5, 0.0, 0.0, 0.0]])
    expected = (x @ (direction / 5) - 0.5).relu()[:, None]  # [1.4 - 0.5, 0 (projection -0.8), 0 (0.3 - 0.5)]
    assert torch.allclose(model.encode_dense(x), expected)
    assert torch.allclose(model.encode_slice(x, 0, 1), expected) and model.encode_slice(x, 1, 1).shape == (3, 0)
    assert torch.allclose(model.W_dec, direction / 5) and model.n_latents == 1
    rebuilt = build_sae(**{**model.config})
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt.encode_dense(x), model.encode_dense(x))


D = 8


@pytest.mark.parametrize("name, write, problem, fix", [
    ("pickled.npy", lambda p: np.save(p, np.array([{"w": 1}], dtype=object), allow_pickle=True),
     "holds a pickled object array: it was refused unread", "numpy.save"),
    ("row.npy", lambda p: np.save(p, np.ones((2, D), np.float32)), f"has shape [2, {D}], but the activations it "
     f"reads are {D} wide", f"shape [{D}] or [1, {D}]"),
    ("short.npy", lambda p: np.save(p, np.ones(D - 1, np.float32)), f"has shape [{D - 1}]", "--hook-point"),
    ("nan.npy", lambda p: np.save(p, np.r_[np.ones(3), np.nan, np.ones(D - 4)]), "1 NaN/inf value(s), the first at "
     "index 3", "recompute the direction"),
    ("zero.npy", lambda p: np.save(p, np.zeros(D, np.float32)), "is all zeros", "the direction itself"),
    ("ints.npy", lambda p: np.save(p, np.arange(D)), "has dtype int64, not a floating-point type", "float32"),
    ("two.safetensors", lambda p: save_file({"a": np.ones(D, np.float32), "b": np.ones(D, np.float32)}, str(p)),
     "holds 2 tensors (a, b), not one", "--key"),
    ("broken.safetensors", lambda p: p.write_bytes(b"not a safetensors file"), "is not a valid safetensors file",
     "safetensors' save_file"),
    ("probe.pt", lambda p: p.write_bytes(b"x"), "is neither .npy nor .safetensors", "numpy.save"),
])
def test_bad_direction_files_are_refused_naming_the_file_and_the_fix(tmp_path, name, write, problem, fix):
    path = tmp_path / name
    write(path)
    with pytest.raises(VectorError) as error:
        read_direction(path, D)
    assert str(path) in error.value.problem and problem in error.value.problem, error.value.problem
    assert fix in error.value.fix, error.value.fix


def test_good_direction_files_are_read(tmp_path):
    vector = np.linspace(-1, 1, D)
    np.save(tmp_path / "row.npy", vector[None].astype(np.float16))
    save_file({"probe": vector.astype(np.float32), "bias": np.zeros(1, np.float32)}, str(tmp_path / "p.safetensors"))
    assert np.allclose(read_direction(tmp_path / "row.npy", D), vector, atol=1e-3)
    assert np.allclose(read_direction(tmp_path / "p.safetensors", D, key="probe"), vector, atol=1e-6)
    with pytest.raises(VectorError, match="has no tensor 'w'"):
        read_direction(tmp_path / "p.safetensors", D, key="w")


def test_the_cli_adds_a_vector_and_refuses_a_bad_one_writing_nothing(cached, store, tmp_path, tiny_model_dir):
    """`sae-platform vector add` end to end: one good file committed, a NaN one refused with the fix; a trained
    SAE's name is never overwritten."""
    d_model = cached
    np.save(tmp_path / "good.npy", np.ones(d_model, np.float32))
    np.save(tmp_path / "bad.npy", np.full(d_model, np.nan, np.float32))
    env = {**os.environ, "SAE_PLATFORM_ROOT": store.root_url, "DAGSTER_HOME": str(tmp_path)}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "jobs.cli", "vector", "add", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)

    good = cli("mean-diff", str(tmp_path / "good.npy"), "--bias", "0.25")
    assert good.returncode == 0, good.stderr
    assert "vector mean-diff: committed" in good.stdout and "sae-platform features --sae mean-diff" in good.stdout
    bad = cli("nan-vec", str(tmp_path / "bad.npy"))
    assert bad.returncode == 2 and f"{tmp_path / 'bad.npy'} holds {d_model} NaN/inf value(s)" in bad.stderr
    assert "How to fix: recompute the direction" in bad.stderr
    assert catalog.trained_saes(store) == ["mean-diff"]
    sae, _ = load_sae(store, "mean-diff")
    assert float(sae.b_enc) == 0.25
    with pytest.raises(VectorError, match="there is a trained SAE named 'topk'"):
        store.fs.makedirs(store.path(catalog.checkpoint_name("topk")), exist_ok=True)
        with store.writing(catalog.checkpoint_name("topk"), settings={"variant": "topk"}) as version:
            store.fs.pipe_file(f"{version}/cfg.json", b"{}")
        add_vector(store, "topk", tmp_path / "good.npy", "main")
