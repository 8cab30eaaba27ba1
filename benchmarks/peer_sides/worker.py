"""The peer side of benchmarks/peer_venv.py's line protocol, run by a peer's own venv python.

Imports nothing of the platform (the peer venv does not have it): only torch, safetensors and the
peer. ``python worker.py --side sparsify_side --threads N`` takes the real stdout for its answers
before it imports the side module (``DISTRIBUTION``, ``OPS``), so anything else printed (the peer's
own logs, at import too) goes to stderr; then it answers one JSON line per command read from stdin.
"""

import argparse
import importlib.metadata
import json
import os
import sys
import traceback


def serve() -> None:
    """Answer commands until stdin closes: ``side.OPS[op](**fields)`` returns the answer's fields.

    The first line is ``{"ok": true, "peer": ..., "peer_version": ...}``. A command that raises
    answers ``{"ok": false, "error": "<type>: <message>"}`` (traceback on stderr) and the loop goes on.
    """
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", required=True, help="the side module, e.g. sparsify_side")
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args()
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import torch

    torch.set_num_threads(args.threads)
    side = importlib.import_module(args.side)
    ops, distribution = side.OPS, side.DISTRIBUTION
    version = importlib.metadata.version(distribution)
    answers.write(json.dumps({"ok": True, "peer": distribution, "peer_version": version,
                              "torch": torch.__version__, "threads": torch.get_num_threads()}) + "\n")
    for line in sys.stdin:
        command = json.loads(line)
        op = command.pop("op")
        try:
            answer = {"ok": True, **ops[op](**command)}
        except Exception as error:  # noqa: BLE001 - every failure goes back to the benchmark, named
            traceback.print_exc()
            answer = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        answers.write(json.dumps(answer) + "\n")


if __name__ == "__main__":
    serve()
