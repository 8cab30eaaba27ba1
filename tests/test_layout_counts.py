"""Every public layout and plan function refuses a count that is not a positive integer, naming the
setting, instead of dividing by zero (``check_layout(..., latent_parallel=0)`` raised ZeroDivisionError)."""

import pytest

from sae_platform.errors import PlatformError
from sae_platform.feature_plan import plan_feature_shards
from sae_platform.features import feature_shards
from sae_platform.latent_parallel import Layout, check_layout, current_layout
from sae_platform.launch import launch_command
from sae_platform.shuffle_plan import plan_shuffle

FEATURE_PLAN = {"top_k": 8, "reservoir_size": 8, "n_hist_bins": 16, "batch_tokens": 1000, "k": 4,
                "memory_budget_bytes": 1 << 30, "n_groups": 1}
CALLS = [  # (the setting named, the call given the bad value)
    ("latent_parallel", lambda n: check_layout("topk", 64, 4, n, 256)),
    ("world_size", lambda n: check_layout("topk", 64, n, 1, 256)),
    ("n_latents", lambda n: check_layout("topk", n, 2, 2, 256)),
    ("batch_size", lambda n: check_layout("topk", 64, 2, 2, n)),
    ("latent_parallel", lambda n: current_layout(n)),
    ("data_parallel", lambda n: Layout(data_parallel=n)),
    ("row_bytes", lambda n: plan_shuffle(1000, n, 4, 1 << 20, 1)),
    ("input_chunk_rows", lambda n: plan_shuffle(1000, 64, 4, 1 << 20, 1, input_chunk_rows=n)),
    ("n_groups", lambda n: plan_feature_shards(64, **{**FEATURE_PLAN, "n_groups": n})),
    ("n_shards", lambda n: feature_shards(64, n)),
    ("nproc_per_node", lambda n: launch_command("spec.json", 4, n, "sae")),
]


@pytest.mark.parametrize("value", [0, -2, 1.5, True])
@pytest.mark.parametrize(("setting", "call"), CALLS, ids=[f"{i}-{name}" for i, (name, _) in enumerate(CALLS)])
def test_a_non_positive_count_is_refused_naming_the_setting(setting, call, value):
    with pytest.raises(PlatformError) as error:
        call(value)
    message = str(error.value)
    assert f"{setting} must be a positive integer, got {value!r}" in message, message
    assert f"{setting} to an integer >= 1" in message.split("How to fix:")[1], message


def test_the_training_settings_section_is_named_where_the_count_is_a_setting():
    with pytest.raises(PlatformError, match=r"resources\.training\.config\.latent_parallel must be a positive integer"):
        check_layout("topk", 64, 4, 0, 256)
