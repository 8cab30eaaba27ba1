"""The peer-venv protocol of the benchmarks (benchmarks/peer_venv.py): a peer whose venv is absent is
skipped with a line naming the make target that builds it, and a peer side that cannot start fails
with its name; no peer is installed for these tests."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import peer_venv  # noqa: E402
import train_throughput  # noqa: E402


@pytest.fixture
def no_peers(monkeypatch, tmp_path):
    for peer in peer_venv.PEERS.values():
        monkeypatch.setenv(peer.env_var, str(tmp_path / "absent" / "bin" / "python"))


def test_an_absent_peer_venv_is_skipped_naming_its_make_target(no_peers, capsys):
    assert peer_venv.open_peer("sparsify", threads=1) is None
    message = capsys.readouterr().out
    assert "sparsify side skipped" in message and "make sparsify-venv" in message and "absent/bin/python" in message
    with pytest.raises(peer_venv.PeerMissing, match="make sae-lens-venv"):
        peer_venv.peer_python("sae-lens")


def test_a_peer_side_that_cannot_start_fails_naming_the_peer(monkeypatch):
    # The project's own python has no sparsify: the side dies importing it, and the error says which peer.
    monkeypatch.setenv("SPARSIFY_PYTHON", sys.executable)
    with pytest.raises(peer_venv.PeerFailed, match="sparsify side exited with status 1 during 'start'"):
        peer_venv.PeerProcess("sparsify", threads=1)


def test_the_training_benchmark_runs_without_peers_and_says_which_are_skipped(no_peers, monkeypatch, tmp_path,
                                                                              capsys):
    monkeypatch.setenv("SAE_PLATFORM_ROOT", str(tmp_path / "no_store"))
    assert train_throughput.main(["--quick", "--batch", "64", "--d-model", "16", "--n-latents", "64", "--k", "4",
                                  "--experts", "2", "--rounds", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "sae-lens side skipped" in out and "make sae-lens-venv" in out
    assert "sparsify side skipped" in out and "make sparsify-venv" in out
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert lines and not [line for line in lines if "peer" in line or "saelens" in line["metric"]]


def test_the_chart_draws_one_panel_per_benchmark_from_every_file(tmp_path):
    import peers_chart

    line = {"metric": "topk_train_tokens_per_s_vs_saelens", "value": 900.0, "baseline": 100.0, "ratio": 9.0,
            "goal": 6.0, "unit": "tokens/s", "peer": "sae-lens", "peer_version": "6.54.12"}
    (tmp_path / "train.jsonl").write_text("a table line\n" + json.dumps(line) + "\n" + json.dumps(
        {**line, "metric": "topk_train_tokens_per_s_vs_sparsify", "baseline": 300.0, "ratio": 3.0,
         "peer": "eai-sparsify", "peer_version": "1.3.3"}) + "\n{\"metric\": \"no peer\", \"value\": 1}\n")
    (tmp_path / "dash.jsonl").write_text(json.dumps(
        {"metric": "dashboard_features_per_s_vs_saedashboard", "value": 30.0, "baseline": 10.0, "ratio": 3.0,
         "goal": 3.0, "peer": "sae-dashboard", "peer_version": "0.8.0", "noisy": True}) + "\n")
    out = tmp_path / "peers.png"
    assert peers_chart.main([str(tmp_path / "train.jsonl"), str(tmp_path / "dash.jsonl"), "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    grouped = peers_chart.panels(peers_chart.peer_lines([tmp_path / "train.jsonl", tmp_path / "dash.jsonl"]))
    assert sorted(grouped) == ["dashboard_features_per_s", "topk_train_tokens_per_s"]
    assert [line["peer"] for line in grouped["topk_train_tokens_per_s"]] == ["sae-lens", "eai-sparsify"]
    (tmp_path / "empty.jsonl").write_text("no lines here\n")
    with pytest.raises(SystemExit, match="no JSON line naming a peer"):
        peers_chart.main([str(tmp_path / "empty.jsonl")])
