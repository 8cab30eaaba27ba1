"""Every numeric setting is validated where it is declared (sae_platform's settings dataclasses),
before anything is read or written, with an error naming the setting, its value and the range."""

import math

import pytest

from sae_platform.activations import CacheSettings
from sae_platform.evaluate import EvalSettings
from sae_platform.features import FeatureSettings
from sae_platform.settings import SettingsError, default_of, doc
from sae_platform.shuffle import ShuffleSettings
from sae_platform.trainer import TrainSettings

BAD = [
    (TrainSettings, "token_budget", 0, "an integer >= 1"), (TrainSettings, "token_budget", -5, "an integer >= 1"),
    (TrainSettings, "batch_size", 0, "an integer >= 1"), (TrainSettings, "batch_size", -256, "an integer >= 1"),
    (TrainSettings, "holdout_rows", -1, "an integer >= 0"), (TrainSettings, "lr", 1e39, "a finite number > 0"),
    (TrainSettings, "lr", math.nan, "a finite number > 0"), (TrainSettings, "lr", 0.0, "a finite number > 0"),
    (TrainSettings, "checkpoint_every_tokens", 0, "an integer >= 1"), (TrainSettings, "k", 0, "an integer >= 1"),
    (TrainSettings, "variant", "gated", "one of topk, batchtopk, matryoshka_batchtopk, switch, jumprelu, relu"),
    (EvalSettings, "ce_contexts", -1, "an integer >= 0"), (EvalSettings, "max_dead_fraction", 1.5, "<= 1"),
    (EvalSettings, "max_fvu", math.inf, "a finite number >= 0"),
    (EvalSettings, "metric_contexts", -1, "an integer >= 0"), (EvalSettings, "ablation_tokens", -2, "an integer >= 0"),
    (FeatureSettings, "top_k", 0, "an integer >= 1"), (FeatureSettings, "before", -1, "an integer >= 0"),
    (ShuffleSettings, "n_buckets", 1, "an integer >= 2"), (ShuffleSettings, "seed", -1, "an integer >= 0"),
    (ShuffleSettings, "memory_budget_bytes", 1000, "an integer >= 65,536"),
    (CacheSettings, "max_contexts", 0, "an integer >= 1"), (CacheSettings, "sink_norm_factor", math.nan, ">= 0"),
]
SECTIONS = {TrainSettings: "training", EvalSettings: "evaluation", FeatureSettings: "features",
            ShuffleSettings: "shuffle", CacheSettings: "caching"}


@pytest.mark.parametrize("settings_class, name, value, rule", BAD)
def test_a_bad_value_is_refused_naming_the_setting_and_its_range(settings_class, name, value, rule):
    with pytest.raises(SettingsError) as raised:
        settings_class(**{name: value})
    message = str(raised.value)
    assert f"resources.{SECTIONS[settings_class]}.config.{name} = {value!r}" in message
    assert rule in message and "How to fix" in message


def test_a_budget_below_one_batch_is_refused():
    with pytest.raises(SettingsError, match="token_budget = 100 is less than one batch"):
        TrainSettings(token_budget=100, batch_size=256)


def test_shuffle_name_must_be_a_path_segment():
    with pytest.raises(Exception, match="name"):
        ShuffleSettings(name="../x")


@pytest.mark.parametrize("settings_class", list(SECTIONS))
def test_defaults_are_valid_and_every_field_is_documented(settings_class):
    settings_class()
    for name in settings_class.__dataclass_fields__:
        assert doc(settings_class, name), name
        default_of(settings_class, name)


# -- environment values, configuration files, names and encodings at load ------------------------

@pytest.mark.parametrize("raw, problem", [("0", "is too small"), ("-1", "is too small"), ("abc", "is not an integer"),
                                          ("2.5", "is not an integer"), ("1e9", "is not an integer"),
                                          ("100000", "is too large")])
def test_a_bad_environment_value_is_refused_naming_the_variable_value_and_range(raw, problem, monkeypatch):
    from sae_platform.settings import env_value

    monkeypatch.setenv("SAE_PLATFORM_FILES_PER_RUN", raw)
    with pytest.raises(SettingsError) as raised:
        env_value("SAE_PLATFORM_FILES_PER_RUN", 25, int, ge=1, le=10_000)
    rule = "it must be an integer >= 1 and <= 10,000"
    assert f"SAE_PLATFORM_FILES_PER_RUN={raw!r} {problem}: {rule}" in str(raised.value)
    assert "unset it for the default (25)" in raised.value.fix
    monkeypatch.setenv("SAE_PLATFORM_FILES_PER_RUN", " 7 ")
    assert env_value("SAE_PLATFORM_FILES_PER_RUN", 25, int, ge=1, le=10_000) == 7
    monkeypatch.setenv("SAE_PLATFORM_CREATE_BUCKET", "maybe")
    with pytest.raises(SettingsError, match="SAE_PLATFORM_CREATE_BUCKET='maybe' is not true or false"):
        env_value("SAE_PLATFORM_CREATE_BUCKET", False, bool)


def test_the_sensors_refuse_files_per_run_0_when_the_code_loads():
    """FILES_PER_RUN=0 used to cache nothing without a word (range(0, n, 0) raised deep in a tick)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "SAE_PLATFORM_FILES_PER_RUN": "0", "PYTHONPATH": str(repo)}
    done = subprocess.run([sys.executable, "-c", "import assets.sensors"], env=env, cwd=repo, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0
    assert "SAE_PLATFORM_FILES_PER_RUN='0' is too small: it must be an integer >= 1" in done.stderr


@pytest.mark.parametrize(("text", "says"), [
    (b"x: " + b"[" * 100_000 + b"]" * 100_000 + b"\n", "nests lists or mappings too deeply"),
    (b"x: " + b"9" * 5000 + b"\n", "holds a value that cannot be read"),
    (b"x: caf\xe9\n", "is not valid YAML"),
    (b"resources:\n  a: 1\n  a: 2\n", "line 3 sets 'a' again \\(first set on line 2\\)"),
])
def test_a_hostile_or_ambiguous_yaml_is_a_settings_error_naming_the_file(tmp_path, text, says):
    from sae_platform.settings import load_yaml

    path = tmp_path / "run.yaml"
    path.write_bytes(text)
    with pytest.raises(SettingsError, match=says) as raised:
        load_yaml(path, "run config")
    assert str(path) in str(raised.value)


def test_a_yaml_alias_bomb_is_refused_fast_and_small(tmp_path):
    """Nine levels of nine aliases: 9**9 = 387M strings once expanded (3.1 GB when Dagster copied
    the run config). Refused at the first alias, in milliseconds, without building it."""
    import resource
    import time

    from resources import read_run_config
    from sae_platform.settings import load_yaml

    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    bomb = tmp_path / "run.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    with pytest.raises(SettingsError) as raised:
        read_run_config(str(bomb))
    assert time.perf_counter() - start < 1
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # kB
    assert f"{bomb}: line 2 uses the YAML alias *a0" in str(raised.value) and "write the value out" in raised.value.fix
    big = tmp_path / "big.yaml"
    big.write_text("x: " + "y" * (2 << 20) + "\n")
    with pytest.raises(SettingsError, match="more than the 1,048,576 a configuration file may have"):
        load_yaml(big, "sweep file")
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1, 2\n")
    with pytest.raises(SettingsError, match=r"sweep file .*broken.yaml is not valid YAML"):
        load_yaml(broken, "sweep file")


@pytest.mark.parametrize("settings_class, field", [(FeatureSettings, "sae_name"), (ShuffleSettings, "name")])
def test_a_name_setting_that_would_leave_its_folder_is_refused_at_load(settings_class, field):
    section = {FeatureSettings: "features", ShuffleSettings: "shuffle"}[settings_class]
    for bad in ("../../escaped-sae", "/abs", "a/b", "nul\0", ""):
        with pytest.raises(SettingsError, match=rf"resources\.{section}\.config\.{field} = .* is not a safe name"):
            settings_class(**{field: bad})


@pytest.mark.parametrize("encoding", ["utf-9", "zlib", "base64", "", "no such codec"])
def test_an_unknown_text_encoding_is_refused_when_the_text_source_is_configured(encoding):
    from resources import TextSourceResource
    from sae_platform.errors import SourceError

    with pytest.raises(SourceError, match=rf"encoding = {encoding!r} is not a text encoding Python knows"):
        TextSourceResource(pattern="data/inbox/*", encoding=encoding)
    assert TextSourceResource(pattern="data/inbox/*", encoding="latin-1").encoding == "latin-1"
