"""Shared fixtures: a tiny random Llama (milliseconds per forward) and throwaway artifact roots."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import servers
import torch

REPO = Path(__file__).resolve().parents[1]
TRAINING_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. To be, or not to be, that is the question. All the world's a stage, "
    "and all the men and women merely players. The quick brown fox jumps over the lazy dog. "
)


def build_tiny_model(dest: Path, hidden: int = 32, layers: int = 4) -> Path:
    """A random LlamaForCausalLM with a real (tiny) byte-level BPE tokenizer, saved as an HF dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([TRAINING_TEXT] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=0, eos_token_id=0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def stop_process_group(process: subprocess.Popen, timeout: float = 30) -> None:
    """Stop a server started with ``start_new_session=True`` (dagster dev, the daemon) and everything
    it spawned: SIGTERM to the group, SIGKILL if it has not ended within ``timeout`` seconds."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(autouse=True)
def _no_deployment_settings(monkeypatch):
    """`make test` exports the demo's SAE_PLATFORM_RUN_CONFIG (the Makefile sets it for `make ui`);
    it configures every code location that loads, so a test that spawns Dagster with os.environ
    would silently run the demo's settings. Tests that want a run config file set it themselves."""
    monkeypatch.delenv("SAE_PLATFORM_RUN_CONFIG", raising=False)


TINY_SAE = "topk-4k-k32"


# -- real servers on 127.0.0.1 (tests/servers.py), one per test module ------------------------------

@pytest.fixture(scope="module")
def pg_server():
    with servers.postgres_server() as server:
        yield server


@pytest.fixture(scope="module")
def s3_endpoint():
    with servers.s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    """(boto3 client, a new bucket) on the module's S3 server."""
    return servers.new_bucket(s3_endpoint, monkeypatch)


@pytest.fixture(scope="module")
def redis_url():
    with servers.redis_server() as url:
        yield url


def tiny_run_config(model_dir: Path, executor: str = "in_process: {}") -> str:
    """full_pipeline on the tiny model: a few seconds per stage."""
    return f"""
execution: {{config: {{{executor}}}}}
loggers: {{console: {{config: {{log_level: INFO}}}}}}
resources:
  language_model: {{config: {{source: {model_dir}, layer: 1, device: cpu}}}}
  caching: {{config: {{ctx_len: 32, batch_size: 4}}}}
  shuffle: {{config: {{n_buckets: 4, memory_budget_bytes: 1048576}}}}
  training:
    config: {{token_budget: 1536, batch_size: 256, checkpoint_every_tokens: 512, holdout_rows: 256,
              dead_after_tokens: 768, device: cpu}}
  evaluation: {{config: {{ce_contexts: 2, ctx_len: 32, device: cpu}}}}
  features: {{config: {{sae_name: {TINY_SAE}, top_k: 5, reservoir_factor: 2, random_examples: 4, device: cpu}}}}
"""


def deployment(tmp_path: Path, tiny_model_dir: Path, text_dir: Path, executor: str = "in_process: {}") -> dict:
    """A fresh DAGSTER_HOME, artifact root, empty inbox and holdout, and the env that points at them."""
    home, inbox, holdout = tmp_path / "dagster_home", tmp_path / "inbox_live", tmp_path / "holdout"
    for folder in (home, inbox, holdout):
        folder.mkdir()
    shutil.copy(REPO / "config" / "dagster.yaml", home / "dagster.yaml")
    shutil.copy(text_dir / "beta.txt", holdout / "held.txt")
    run_config = tmp_path / "run_config.yaml"
    run_config.write_text(tiny_run_config(tiny_model_dir, executor))
    return {**os.environ, "DAGSTER_HOME": str(home), "SAE_PLATFORM_ROOT": str(tmp_path / "artifacts"),
            "SAE_PLATFORM_INBOX": str(inbox / "*"), "SAE_PLATFORM_DATA": str(tmp_path),
            "SAE_PLATFORM_HOLDOUT": str(holdout / "*"), "SAE_PLATFORM_RUN_CONFIG": str(run_config),
            "SAE_PLATFORM_SENSOR_INTERVAL_S": "2"}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_model_dir_wide(tmp_path_factory) -> Path:
    """Same family, different d_model: for the 'mismatched model' errors."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama_wide"), hidden=48)


@pytest.fixture
def store(tmp_path):
    from sae_platform.storage import ArtifactStore

    return ArtifactStore(str(tmp_path / "artifacts"))


def load_tiny_hooked(model_dir: Path):
    """The tiny model hooked at layer 1 on the CPU (``tiny_hooked``; also for module-scoped fixtures)."""
    from sae_platform.model import load_hooked_model

    return load_hooked_model(str(model_dir), layer=1, device="cpu", autocast="none")


@pytest.fixture
def tiny_hooked(tiny_model_dir):
    return load_tiny_hooked(tiny_model_dir)


def write_text_inbox(inbox: Path) -> Path:
    """``inbox`` (created) with three small UTF-8 text files: alpha, beta and gamma, 3, 4 and 5 copies of
    TRAINING_TEXT (``text_dir``; also for module-scoped fixtures)."""
    inbox.mkdir(parents=True)
    for i, name in enumerate(["alpha", "beta", "gamma"]):
        (inbox / f"{name}.txt").write_text(TRAINING_TEXT * (3 + i), encoding="utf-8")
    return inbox


@pytest.fixture
def text_dir(tmp_path) -> Path:
    """An inbox with three small UTF-8 text files."""
    return write_text_inbox(tmp_path / "inbox")


def cache_and_shuffle(store, model_dir: Path, hooked, text_dir: Path) -> None:
    """Every text file of ``text_dir`` cached by the tiny model (contexts of 32 tokens, forward
    batches of 4) and shuffled into ``main``: the cached root the Dagster pipeline tests start from."""
    from sae_platform import shuffle
    from sae_platform.activations import CacheSettings, cache_text_file
    from sae_platform.corpus import list_source

    for text_file in list_source(str(text_dir / "*")):
        cache_text_file(store, text_file, hooked, str(model_dir), CacheSettings(ctx_len=32, batch_size=4))
    shuffle.run_shuffle(store, "main", n_buckets=4, memory_budget_bytes=1 << 20, n_jobs=2, seed=0)


def tiny_definitions(store, model_dir: Path, text_dir: Path, tmp_path: Path, features: dict | None = None):
    """The deployment's Dagster Definitions on ``store``: the tiny model as base model (layer 1, CPU),
    ``text_dir`` as the inbox, a copy of its beta.txt as the held-out text; ``features``: the features
    resource's config (its ``sae_name`` …), else the default one."""
    from dagster import Definitions

    from assets import ASSETS
    from jobs.definitions import ASSET_JOBS, build_resources
    from jobs.settings import Settings
    from resources import BaseModelResource, stage_resource

    holdout = tmp_path / "holdout"
    holdout.mkdir()
    (holdout / "held.txt").write_text((text_dir / "beta.txt").read_text())
    resources = build_resources(Settings(root_url=store.root_url, data_dir=str(tmp_path), inbox=str(text_dir / "*"),
                                         s3_endpoint_url=None, holdout=str(holdout / "*")))
    resources["language_model"] = BaseModelResource(source=str(model_dir), layer=1, device="cpu")
    if features is not None:
        resources["features"] = stage_resource("features", features)
    return Definitions(assets=ASSETS, jobs=ASSET_JOBS, resources=resources)


@pytest.fixture
def python_exe() -> str:
    return sys.executable


@pytest.fixture
def dagster_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / "config" / "dagster.yaml").read_text())
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
