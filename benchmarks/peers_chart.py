"""Bars per benchmark, ours against each peer, from the benchmarks' JSON lines (docs/results.md's chart).

Reads every JSON line that names a ``peer`` (with ``peer_version``) from the given files (default: every
``benchmarks/results/*.jsonl``; each benchmark's output saved there, e.g.
``python benchmarks/train_throughput.py | tee benchmarks/results/train_throughput.jsonl``; lines that are not
JSON objects are ignored, so a whole run's output can be saved). Lines are grouped into one panel per
benchmark: the metric without its ``_vs_<peer>`` suffix (``topk_train_tokens_per_s_vs_sparsify`` and
``..._vs_saelens`` share a panel). Each panel has a bar for ours (``value``) and one per peer
(``baseline``), labelled with the figure and the ratio against its goal; ``lower_is_better`` lines say so in
the title. A line with ``noisy`` true marks its panel "loaded machine".

    python benchmarks/peers_chart.py [FILE.jsonl ...] [--out docs/peers.png]

Raises SystemExit naming the files when none holds a peer line.
"""

import argparse
import json
import math
import re
import sys
from pathlib import Path

from bench_help import HelpFormatter

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_OUT = REPO / "docs" / "peers.png"


def peer_lines(paths: list[Path]) -> list[dict]:
    """Every JSON object line comparing ours with a peer (``peer``, ``value`` and ``baseline`` fields), in file
    order (a later line for the same metric and peer wins); lines of one side only (lr_sweep.py's) are left out."""
    found = {}
    for path in paths:
        for text in path.read_text().splitlines():
            text = text.strip()
            if not text.startswith("{"):
                continue
            try:
                line = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(line, dict) and {"peer", "metric", "value", "baseline"} <= line.keys():
                found[(line["metric"], line["peer"])] = line
    return list(found.values())


def benchmark_of(metric: str) -> str:
    """The panel a metric belongs to: its name without the ``_vs_<peer>`` part."""
    return re.sub(r"_vs_[a-z0-9]+", "", metric)


def panels(lines: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for line in lines:
        grouped.setdefault(benchmark_of(line["metric"]), []).append(line)
    return grouped


def draw(grouped: dict[str, list[dict]], out: Path) -> None:
    """One bar panel per benchmark into ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(grouped))
    rows = math.ceil(len(grouped) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for ax, (name, lines) in zip(axes.flat, grouped.items()):
        ours = {round(line["value"], 6) for line in lines}
        labels, values, colors = [], [], []
        if len(ours) == 1:
            labels.append("ours")
            values.append(lines[0]["value"])
            colors.append("#2a7ab0")
        for line in lines:
            if len(ours) > 1:
                labels.append(f"ours\n(vs {line['peer']})")
                values.append(line["value"])
                colors.append("#2a7ab0")
            labels.append(f"{line['peer']}\n{line['peer_version']}")
            values.append(line["baseline"])
            colors.append("#b0b0b0")
        bars = ax.bar(range(len(values)), values, color=colors)
        ax.set_xticks(range(len(values)), labels, fontsize=8)
        for bar, value in zip(bars, values):
            ax.annotate(f"{value:,.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=8)
        better = "lower is better" if lines[0].get("lower_is_better") else "higher is better"
        ratios = ", ".join(f"{line['ratio']:.2f}x vs {line['peer']} (goal {line['goal']})" for line in lines)
        loaded = " [loaded machine]" if any(line.get("noisy") for line in lines) else ""
        ax.set_title(f"{name}{loaded}\n{lines[0].get('unit', '')}, {better}\n{ratios}", fontsize=8)
        ax.margins(y=0.15)
    for ax in list(axes.flat)[len(grouped):]:
        ax.set_visible(False)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("files", nargs="*", type=Path, help="JSON-lines files (default: benchmarks/results/*.jsonl)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG to write")
    args = parser.parse_args(argv)
    files = args.files or sorted(RESULTS.glob("*.jsonl"))
    lines = peer_lines(files)
    if not lines:
        raise SystemExit(f"no JSON line naming a peer in {[str(f) for f in files] or str(RESULTS / '*.jsonl')}; "
                         "save a benchmark's output there first (see this script's docstring)")
    grouped = panels(lines)
    draw(grouped, args.out)
    print(f"{args.out}: {len(grouped)} panel(s), {len(lines)} peer line(s) from {len(files)} file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
