"""Running a peer package (SAELens, sparsify) in its own virtual environment, as a subprocess.

The peers pin torch and transformers differently from the platform and from each other, so none is
ever installed into the project's venv: ``make peer-venvs`` builds one venv per peer at a pinned
version (``make sparsify-venv``, ``make sae-lens-venv``), and a benchmark drives the peer's side
(``benchmarks/peer_sides/<peer>_side.py``, one module per peer) in that venv's python through a line protocol:

* ``benchmarks/peer_sides/worker.py --side <peer>_side`` runs in the peer's venv (nothing of the
  platform imported there);
* the benchmark writes the data both sides use (safetensors) into a temporary folder and sends one
  JSON command per line on the worker's stdin (``{"op": "step", "name": "topk"}``);
* the worker answers each with one JSON line on its stdout, ``{"ok": true, ...}`` or
  ``{"ok": false, "error": "..."}`` (anything the peer itself prints goes to stderr);
* its first line names the peer and its installed version, which every JSON line of the
  benchmark carries as ``peer`` and ``peer_version``.

Timings are taken inside the worker around the peer's own call, so the pipe costs nothing; the
benchmark interleaves ``step`` commands with its own steps round by round.

A peer whose venv is absent is skipped: ``open_peer`` prints one line naming the missing python and
the make target that builds it, and returns None. ``<PEER>_PYTHON`` (e.g. ``SPARSIFY_PYTHON``)
points at another interpreter.
"""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SIDES = Path(__file__).resolve().parent / "peer_sides"


@dataclass(frozen=True)
class Peer:
    """One peer: its short name, the venv ``make <make_target>`` builds, its side module in benchmarks/peer_sides/."""

    name: str
    make_target: str
    side: str
    venv: str

    @property
    def env_var(self) -> str:
        """The variable that overrides the interpreter, e.g. SAE_LENS_PYTHON."""
        return self.name.upper().replace("-", "_") + "_PYTHON"

    @property
    def python(self) -> Path:
        return Path(os.environ.get(self.env_var) or Path(self.venv) / "bin" / "python")


# The venv folders match the Makefile's SPARSIFY_VENV and SAE_LENS_VENV defaults.
PEERS = {
    "sparsify": Peer("sparsify", "sparsify-venv", "sparsify_side", "/work/venvs/sparsify"),
    "sae-lens": Peer("sae-lens", "sae-lens-venv", "saelens_side", "/work/venvs/sae-lens"),
}


class PeerMissing(RuntimeError):
    """The peer's interpreter does not exist; the message names it and the make target."""


class PeerFailed(RuntimeError):
    """The peer's side answered an error, or died; the message names the peer and the command."""


def peer_python(name: str) -> Path:
    """The python of peer ``name``'s venv.

    Raises:
        PeerMissing: no interpreter there; the message names the path, the override variable and
            the make target that builds the venv.
    """
    peer = PEERS[name]
    python = peer.python
    if not python.is_file():
        raise PeerMissing(f"{name} side skipped: its venv is not built (no {python}); run `make {peer.make_target}` "
                          f"(or `make peer-venvs`), or point {peer.env_var} at a python that has it")
    return python


class PeerProcess:
    """A running peer side: ``call(op, **fields)`` sends one command and returns its answer (a dict).

    Attributes:
        name: the key in PEERS (``sparsify``); package, version: its registry name and installed version
            (``eai-sparsify``, ``1.3.3``), from the worker's first line.
    """

    def __init__(self, name: str, threads: int):
        self.name = name
        python = peer_python(name)
        command = [str(python), str(SIDES / "worker.py"), "--side", PEERS[name].side, "--threads", str(threads)]
        self._proc = subprocess.Popen(command,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        hello = self._read("start")
        self.package, self.version = hello["peer"], hello["peer_version"]

    def _read(self, op: str) -> dict:
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.wait()
            raise PeerFailed(f"{self.name} side exited with status {code} during {op!r} (its stderr is above)")
        answer = json.loads(line)
        if not answer.pop("ok"):
            raise PeerFailed(f"{self.name} side failed in {op!r}: {answer['error']}")
        return answer

    def call(self, op: str, **fields) -> dict:
        """Send ``{"op": op, **fields}``; return the answer without its ``ok``.

        Raises:
            PeerFailed: the side answered an error (its message and traceback on stderr) or exited.
        """
        self._proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self._proc.stdin.flush()
        return self._read(op)

    @property
    def label(self) -> dict:
        """The fields every JSON line about this peer carries."""
        return {"peer": self.package, "peer_version": self.version}

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.wait(timeout=60)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_peer(name: str, threads: int) -> PeerProcess | None:
    """Start peer ``name``'s side, or print why it is skipped (venv absent: the make target) and return None."""
    try:
        return PeerProcess(name, threads)
    except PeerMissing as missing:
        print(missing, file=sys.stdout, flush=True)
        return None
