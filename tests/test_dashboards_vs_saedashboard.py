"""benchmarks/dashboards_vs_saedashboard.py without sae-dashboard's venv: it says why and how to build it,
and runs nothing (the comparison itself needs the venv: `make sae-dashboard-venv`, then run the script)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "dashboards_vs_saedashboard.py"


def test_the_benchmark_skips_naming_the_make_target_when_the_peer_venv_is_absent(tmp_path):
    missing = tmp_path / "no-venv" / "bin" / "python"
    env = {**os.environ, "SAE_DASHBOARD_PYTHON": str(missing)}
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path / "out.jsonl")],
                         capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0, run.stderr
    message, line = run.stdout.strip().splitlines()
    assert "`make sae-dashboard-venv`" in message and str(missing) in message and "SAE_DASHBOARD_PYTHON" in message
    skipped = json.loads(line)
    assert skipped["peer"] == "sae-dashboard" and skipped["peer_version"] == "0.8.0"
    assert skipped["skipped"] == message
    assert not (tmp_path / "out.jsonl").exists()  # nothing measured, nothing written


def _agreement(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # as the script runs: bench_help importable
    from benchmarks.dashboards_vs_saedashboard import top_agreement, top_overlap
    return top_agreement, top_overlap


def test_a_tie_at_the_peers_20th_agrees_up_to_ties_and_a_lower_activation_does_not(monkeypatch):
    top_agreement, _ = _agreement(monkeypatch)
    ours = {3: {(0, 7), (1, 8)}, 5: {(2, 9), (2, 10)}, 6: {(4, 4)}, 7: set()}
    theirs = {3: {(0, 7), (9, 9)}, 5: {(2, 9), (9, 9)}, 6: {(9, 9)}}
    their_at_ours = {(3, 0, 7): 0.9, (3, 1, 8): 0.5,  # feature 3: its 20th is 0.5 at (9, 9) too: a tie
                     (5, 2, 9): 0.9, (5, 2, 10): 0.49999997,  # feature 5: just below its 20th: a real difference
                     (6, 4, 4): 0.0}  # feature 6: silent on its side (20th 0): zeros are not examples
    figures = top_agreement(ours, theirs, their_at_ours, {3: 0.5, 5: 0.5, 6: 0.0}, {3: {(9, 9)}, 5: {(9, 9)}})
    assert figures["n_features"] == 3  # a feature without positions of ours is not scored
    assert figures["mean"] == (0.5 + 0.5 + 0.0) / 3 and figures["min"] == 0.0 and figures["all_agree"] == 0
    assert figures["mean_up_to_ties"] == (1.0 + 0.5 + 0.0) / 3 and figures["all_agree_up_to_ties"] == 1
    assert figures["ties_at_cut"] == 1 and figures["differing"] == [5, 6]


def test_a_tie_counts_once_per_pick_of_its_at_the_cut_so_a_real_difference_stays_one(monkeypatch):
    """Its list: A above the cut, W above the cut, Z at the cut (0.5). Ours: A, and X and Y, both at its
    cut on its side, so ours lacks W, which it ranks above both: a real difference. Each of X and Y counted
    as a tie made ours agree in full; a tie swaps one of ours for one of its picks at the cut, and it has
    one (Z) that ours lacks: one of X, Y counts, the other is the difference."""
    top_agreement, _ = _agreement(monkeypatch)
    a, w, z, x, y = (0, 6), (0, 7), (0, 8), (1, 6), (1, 7)
    figures = top_agreement({1: {a, x, y}}, {1: {a, w, z}}, {(1, *a): 0.9, (1, *x): 0.5, (1, *y): 0.5}, {1: 0.5},
                            {1: {z}})
    assert figures["mean"] == 1 / 3 and figures["mean_up_to_ties"] == 2 / 3, figures
    assert figures["ties_at_cut"] == 1 and figures["differing"] == [1] and figures["all_agree_up_to_ties"] == 0
    # its pick at the cut is X, which ours holds too: nothing was swapped there, so Y is a difference
    figures = top_agreement({1: {a, x, y}}, {1: {a, w, x}}, {(1, *a): 0.9, (1, *x): 0.5, (1, *y): 0.5}, {1: 0.5},
                            {1: {x}})
    assert figures["mean_up_to_ties"] == 2 / 3 and figures["ties_at_cut"] == 0, figures


def test_identical_lists_agree_with_no_ties_counted(monkeypatch):
    top_agreement, _ = _agreement(monkeypatch)
    figures = top_agreement({1: {(0, 6), (0, 7)}}, {1: {(0, 6), (0, 7), (3, 3)}}, {(1, 0, 6): 2.0, (1, 0, 7): 1.0},
                            {1: 0.25}, {1: {(3, 3)}})
    assert figures["mean"] == figures["mean_up_to_ties"] == 1.0 and figures["ties_at_cut"] == 0
    assert figures["differing"] == []


def test_top_overlap_scores_our_positions_in_its_window_against_each_of_its_lists(monkeypatch, tmp_path):
    """The files both sides leave: our position 2 lies outside its window [6, 123) and is not scored; the
    deployed list misses our (0, 40) at a value below its cut, its picks from our rows miss it at a tie."""
    import numpy as np

    _, top_overlap = _agreement(monkeypatch)
    np.savez(tmp_path / "ours_top.npz", feature=np.array([0, 0, 0]), context=np.array([0, 0, 1]),
             position=np.array([2, 40, 50]))
    np.savez(tmp_path / "peer_top.npz", feature=np.array([0, 0]), context=np.array([1, 1]),
             position=np.array([50, 60]), eligible=np.array([6, 123]))
    np.savez(tmp_path / "peer_values.npz", own_at_ours=np.float32([0.0, 0.3, 0.9]), own_cut=np.float32([0.4]),
             same_at_ours=np.float32([0.0, 0.4, 0.9]), same_cut=np.float32([0.4]), same_feature=np.array([0, 0]),
             own_tied=np.array([[0, 1, 60]]), same_tied=np.array([[0, 1, 70]]),
             same_context=np.array([1, 1]), same_position=np.array([50, 70]))
    overlap = top_overlap(tmp_path)
    assert overlap["positions_compared"] == [6, 123] and overlap["positions_per_feature"] == 2.0
    deployed, same = overlap["deployed"], overlap["same_rows"]
    assert deployed["mean"] == deployed["mean_up_to_ties"] == 0.5 and deployed["differing"] == [0]
    assert same["mean"] == 0.5 and same["mean_up_to_ties"] == 1.0 and same["ties_at_cut"] == 1
