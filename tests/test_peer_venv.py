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
