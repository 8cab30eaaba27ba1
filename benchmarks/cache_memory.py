"""Peak memory of caching one text file, against the file's size (issue 12, case 10).

Caching reads, decodes and tokenizes a file a piece at a time and stops once ``max_contexts``
contexts are full (``corpus.stream_contexts``), so its peak memory must not grow with the file:
a 50 MB file must cost about what a 1 MB file costs. Each measurement runs ``cache_text_file`` in a
fresh subprocess and reads that process's peak resident set size (``ru_maxrss``); the figure is
the ratio of the two peaks (goal <= 1.2). Before the fix, caching took ~150 MB per MB of text.

``--quick`` (< 1 minute on 2 CPU cores) uses a tiny random Llama with a real byte-level BPE
tokenizer (as tests/conftest.py does), so the text path, not the model, dominates what is measured;
without it the embedded SmolLM2-135M is used. Output: one JSON object per line, one per figure,
with ``metric``, ``value``, ``baseline``, ``ratio``, ``goal`` and ``lower_is_better``.

    python benchmarks/cache_memory.py --quick
    python benchmarks/cache_memory.py --small-mb 1 --large-mb 50 --max-contexts 160
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_help import HelpFormatter

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. To be, or not to be, that is the question.\n")


def write_text(path: Path, megabytes: int) -> None:
    line = TEXT.encode()
    block = line * (1_000_000 // len(line) + 1)
    with open(path, "wb") as f:
        for _ in range(megabytes):
            f.write(block[:1_000_000])


def child(args) -> None:
    """Cache one file and print this process's peak RSS (MB) as JSON."""
    from sae_platform.activations import CacheSettings, cache_text_file
    from sae_platform.corpus import list_source
    from sae_platform.model import load_hooked_model
    from sae_platform.storage import ArtifactStore

    model = load_hooked_model(args.model_dir, args.layer, "cpu", "none")
    (text_file,) = list_source(args.child)
    started = time.perf_counter()
    summary = cache_text_file(ArtifactStore(args.root), text_file, model, args.model_dir,
                              CacheSettings(ctx_len=args.ctx_len, batch_size=16), max_contexts=args.max_contexts)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_mb": peak_kb / 1024, "n_contexts": summary["n_contexts"],
                      "seconds": time.perf_counter() - started}))


def measure(args, text: Path, model_dir: str, root: Path) -> dict:
    command = [sys.executable, __file__, "--child", str(text), "--model-dir", model_dir, "--root", str(root),
               "--max-contexts", str(args.max_contexts), "--ctx-len", str(args.ctx_len)]
    if args.layer is not None:
        command += ["--layer", str(args.layer)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model (< 1 minute on 2 cores)")
    parser.add_argument("--small-mb", type=int, default=1, help="size of the small text file in MB")
    parser.add_argument("--large-mb", type=int, default=50, help="size of the large text file in MB")
    parser.add_argument("--max-contexts", type=int, default=160, help="contexts cached from each file")
    parser.add_argument("--ctx-len", type=int, default=128, help="tokens per context")
    parser.add_argument("--layer", type=int, default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    with tempfile.TemporaryDirectory(prefix="cache_memory-") as scratch:
        scratch = Path(scratch)
        if args.quick:
            sys.path.insert(0, str(REPO / "tests"))
            from conftest import build_tiny_model

            model_dir = str(build_tiny_model(scratch / "tiny"))
            args.layer = 1 if args.layer is None else args.layer
        else:
            from sae_platform.model import EMBEDDED_MODEL, ensure_base_model
            from sae_platform.storage import ArtifactStore

            model_dir, _ = ensure_base_model(ArtifactStore(str(REPO / ".cache" / "bench_artifacts")), EMBEDDED_MODEL)
        peaks = {}
        for megabytes in (args.small_mb, args.large_mb):
            inbox = scratch / f"inbox{megabytes}"
            inbox.mkdir()
            write_text(inbox / f"text_{megabytes}mb.txt", megabytes)
            peaks[megabytes] = measure(args, inbox / "*", model_dir, scratch / f"artifacts{megabytes}")
            (inbox / f"text_{megabytes}mb.txt").unlink()
        small, large = peaks[args.small_mb], peaks[args.large_mb]
        assert small["n_contexts"] == large["n_contexts"] == args.max_contexts, peaks
        print(json.dumps({"metric": f"cache_peak_rss_mb_{args.large_mb}mb_vs_{args.small_mb}mb_file",
                          "value": round(large["peak_rss_mb"], 1), "baseline": round(small["peak_rss_mb"], 1),
                          "ratio": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3), "goal": 1.2,
                          "lower_is_better": True}))


if __name__ == "__main__":
    main()
