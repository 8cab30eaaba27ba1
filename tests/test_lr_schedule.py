"""The lr schedule of SAE training (sae_platform.lr_schedule): warm-up, linear decay to zero over the
run, the same lr after a kill and resume, and the sweep that compares settings with sparsify."""

import json
import math
import sys
from pathlib import Path

import pytest

from sae_platform.catalog import checkpoint_name
from sae_platform.errors import PlatformError
from sae_platform.lr_schedule import lr_factor
from sae_platform.trainer import identity, train_sae
from tests.test_trainer import DECAYING, SETTINGS, make_shuffled

REPO = Path(__file__).resolve().parents[1]


def test_the_factor_warms_up_then_stays_or_decays_linearly_to_zero_after_the_last_step():
    assert [lr_factor("constant", s, 6) for s in range(6)] == [1.0] * 6
    assert [lr_factor("linear_decay", s, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert [lr_factor("linear_decay", s, 6, warmup_steps=2) for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert [lr_factor("constant", s, 4, warmup_steps=4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor("linear_decay", 0, 1) == 1.0  # a one-step run still takes its step


@pytest.mark.parametrize(("schedule", "step", "says"), [("cosine", 0, "unknown lr schedule 'cosine'"),
                                                         ("constant", 6, "step 6 is outside the run's 6 steps"),
                                                         ("linear_decay", -1, "outside")])
def test_an_unknown_schedule_or_a_step_outside_the_run_is_refused(schedule, step, says):
    with pytest.raises(PlatformError, match=says):
        lr_factor(schedule, step, 6)


def test_a_decaying_run_steps_at_the_scheduled_lr_and_ends_at_its_last_steps_lr(store):
    make_shuffled(store)
    train_sae(store, "main", "decayed", DECAYING, log=lambda m: None)
    path = store.resolve(checkpoint_name("decayed"))
    groups = json.loads(store.fs.cat_file(f"{path}/optimizer.json"))["param_groups"]
    last = DECAYING.learning_rate * lr_factor("linear_decay", 29, 30, warmup_steps=4)
    assert [g["lr"] for g in groups] == pytest.approx([last]) and last < DECAYING.learning_rate / 20


def test_checkpoints_of_constant_lr_runs_stay_finished_and_another_schedule_trains_afresh(store):
    """The schedule settings at their constant-lr values are left out of a checkpoint's identity, so a
    checkpoint stored before they existed still counts as trained with them; a decaying run is another SAE."""
    assert not {"lr_schedule", "lr_warmup_tokens"} & set(identity(SETTINGS))
    assert identity(DECAYING)["lr_schedule"] == "linear_decay" and identity(DECAYING)["lr_warmup_tokens"] == 1024
    make_shuffled(store)
    train_sae(store, "main", "run", SETTINGS, log=lambda m: None)
    logs = []
    train_sae(store, "main", "run", SETTINGS, log=logs.append)
    assert "already trained" in logs[0]
    retrained = train_sae(store, "main", "run", DECAYING, log=logs.append)
    assert retrained["resumed_from_step"] == 0
    assert store.pointer(checkpoint_name("run"))["settings"] == identity(DECAYING)


def test_a_grown_store_resumes_a_decayed_run_with_its_decay_replanned_over_the_longer_run(store):
    make_shuffled(store)
    train_sae(store, "main", "run", DECAYING, log=lambda m: None)
    make_shuffled(store, n_partitions=1, first=3)  # 1,500 new rows: 5 more steps of 256
    logs = []
    resumed = train_sae(store, "main", "run", DECAYING, log=logs.append)
    assert resumed["resumed_from_step"] == 30 and resumed["steps"] == 35, logs
    assert any(f"x {lr_factor('linear_decay', 30, 35, 4):.3g} (linear_decay re-planned over the longer run) to "
               "step 35" in m for m in logs), logs


def test_the_sweep_trains_each_setting_then_the_best_and_the_baseline_longer(store, monkeypatch, capsys, tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import lr_sweep

    make_shuffled(store)
    monkeypatch.setenv("SAE_PLATFORM_ROOT", store.root_url)
    out = tmp_path / "sweep.jsonl"
    assert lr_sweep.main(["--budgets", "2048", "--runs", "1e-3:constant", "4e-3:linear_decay:1024", "--then", "4096",
                          "--best", "1", "--no-peer", "--n-latents", "64", "--k", "4", "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(line["tokens_trained"], line["lr_schedule"]) for line in lines][:2] == [(2048, "constant"),
                                                                                      (2048, "linear_decay")]
    best = min(lines[:2], key=lambda line: line["heldout_fvu"])  # then the best and the baseline (the first run)
    longer = [(line["tokens_trained"], line["lr"]) for line in lines[2:]]
    assert longer == [(4096, best["lr"])] + ([(4096, 1e-3)] if best["lr"] != 1e-3 else []), lines
    assert all(math.isfinite(line["heldout_fvu"]) and line["side"] == "ours" for line in lines)
    with pytest.raises(SystemExit):
        lr_sweep.main(["--runs", "1e-3:cosine", "--no-peer"])
    assert "--runs '1e-3:cosine'" in capsys.readouterr().err
