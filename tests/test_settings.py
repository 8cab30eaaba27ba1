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
