"""Our trainer's lr and lr schedule against eai-sparsify's default optimizer, on the demo's rows.

Side (e) of ``train_throughput.py`` (its ``train_ours``, ``demo_rows``, held-out scores and sparsify's
side), swept: ours at each ``--runs`` setting (``LR:SCHEDULE[:WARMUP_TOKENS]``; schedules of
``sae_platform.lr_schedule``) and sparsify with its own default optimizer and lr (schedule-free
SignSGD at 5e-3/sqrt(n/2^14)), each trained from the same init seed on the same shuffled demo rows
(batch 1,024, the demo's 200,000-token dead criterion, AuxK on every side) for each ``--budgets``
token budget, and with ``--then`` the best runs and the baseline (the first of ``--runs``) for a
longer one; then held-out FVU and the latents silent on the same 8,192 held-out rows, computed here
from every side's reconstructions. One JSON line per run, appended to ``--out`` as each run ends (a
long sweep stopped early keeps what it measured). Measurements: docs/results.md, "The lr and its
schedule against sparsify".

    SAE_PLATFORM_ROOT=<a demo root> python benchmarks/lr_sweep.py --budgets 102400 --then 614400 \\
        --runs 5e-4:constant 1e-3:constant 1e-3:linear_decay
"""

import argparse  # noqa: I001 - train_throughput first: it imports sae_platform before torch (huge pages)
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

from bench_help import HelpFormatter
from train_throughput import (
    DEMO_TRAINING,
    QUALITY_BATCH,
    QUALITY_DEAD_TOKENS,
    demo_rows,
    heldout_scores,
    reconstruct_heldout,
    train_ours,
    usable_cores,
)

import torch
from peer_venv import open_peer

from sae_platform.errors import PlatformError
from sae_platform.sae import TopKSAE
from sae_platform.trainer import TrainSettings

DEFAULT_RUNS = [f"{lr}:{schedule}" for schedule in ("constant", "linear_decay")
                for lr in ("5e-4", "1e-3", "2e-3", "4e-3")]


def parse_run(spec: str) -> TrainSettings:
    """``LR:SCHEDULE[:WARMUP_TOKENS]`` as the demo's training settings with those three changed;
    ValueError naming the spec and its expected form when it is not one."""
    parts = spec.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError("expected LR:SCHEDULE or LR:SCHEDULE:WARMUP_TOKENS")
        return dataclasses.replace(DEMO_TRAINING, lr=float(parts[0]), lr_schedule=parts[1],
                                   lr_warmup_tokens=int(parts[2]) if len(parts) == 3 else 0)
    except (ValueError, PlatformError) as error:
        raise ValueError(f"--runs {spec!r}: {error} (e.g. 1e-3:linear_decay or 2e-3:linear_decay:20480)") from None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--budgets", type=int, nargs="+", default=[102_400], help="training tokens per run")
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS,
                        help="our settings, LR:SCHEDULE[:WARMUP_TOKENS] each")
    parser.add_argument("--then", type=int, default=None,
                        help="then train the --best runs of the first budget (lowest FVU) for this many tokens, "
                             "and the first of --runs (the baseline) when it is not among them")
    parser.add_argument("--best", type=int, default=2, help="how many runs --then trains")
    parser.add_argument("--no-peer", action="store_true", help="ours only (sparsify's side not run)")
    parser.add_argument("--n-latents", type=int, default=16384, help="dictionary size")
    parser.add_argument("--k", type=int, default=32, help="active latents per row")
    parser.add_argument("--out", type=Path, default=None, help="append the JSON lines to this file too")
    args = parser.parse_args(argv)
    try:
        args.runs = [parse_run(spec) for spec in args.runs]
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(usable_cores())
    device = torch.device("cpu")
    longest = max(args.budgets + ([args.then] if args.then else []))
    rows = demo_rows(longest // QUALITY_BATCH, device)
    if rows is None:
        return 1
    train, holdout, data = rows
    print(f"{data}; {args.n_latents:,} latents, k {args.k}, batch {QUALITY_BATCH}, {torch.get_num_threads()} thread(s)")
    peer = None if args.no_peer else open_peer("sparsify", torch.get_num_threads())
    try:
        with tempfile.TemporaryDirectory(prefix="lr_sweep-") as folder:
            sides = Sides(args, train, holdout, data, peer, Path(folder))
            fvus = {}
            for budget in args.budgets:
                fvus.update({(budget, i): sides.ours(settings, budget) for i, settings in enumerate(args.runs)})
                sides.sparsify(budget)
            if args.then:  # the best --best of the first budget's runs and the baseline, at the longer budget
                ranked = sorted(range(len(args.runs)), key=lambda i: fvus[(args.budgets[0], i)])
                for i in ranked[:args.best] + ([0] if 0 not in ranked[:args.best] else []):
                    sides.ours(args.runs[i], args.then)
                sides.sparsify(args.then)
    finally:
        if peer is not None:
            peer.close()
    return 0


class Sides:
    """Ours and sparsify trained on the same rows, each run scored and emitted as it ends."""

    def __init__(self, args, train, holdout, data: str, peer, folder: Path):
        self.args, self.train, self.holdout, self.data = args, train, holdout, data
        self.peer, self.folder = peer, folder
        if peer is not None:
            from safetensors.torch import save_file

            save_file({"train": train.contiguous(), "holdout": holdout.contiguous()}, str(folder / "rows.safetensors"))
            peer.call("load", path=str(folder / "rows.safetensors"))

    def ours(self, settings: TrainSettings, budget: int) -> float:
        """Train ours at ``settings`` for ``budget`` tokens; its held-out FVU."""
        started = time.perf_counter()
        sae, seconds = train_ours(self.train, self.args.n_latents, self.args.k, budget // QUALITY_BATCH, settings,
                                  self.train.device)
        fvu, dead = heldout_scores(self.holdout, *reconstruct_heldout(sae, self.holdout))
        emit(self.args, {"side": "ours", "lr": settings.lr, "lr_schedule": settings.lr_schedule,
                         "lr_warmup_tokens": settings.lr_warmup_tokens, "optimizer": "Adam",
                         "picks_in": str(sae.selection_dtype or "float32").removeprefix("torch.")},
             budget, fvu, dead, seconds, started, self.data)
        return fvu

    def sparsify(self, budget: int) -> None:
        """Train sparsify (its default optimizer and lr) for ``budget`` tokens, when its venv is there."""
        if self.peer is None:
            return
        from safetensors.torch import load_file

        started, name, recon = time.perf_counter(), f"q{budget}", str(self.folder / "recon.safetensors")
        built = self.peer.call("build", name=name, d=self.train.shape[1], n=self.args.n_latents, k=self.args.k,
                               seed=0, first="train", dead_tokens=QUALITY_DEAD_TOKENS,
                               auxk_alpha=TopKSAE.DEFAULTS["aux_coeff"])
        seconds = self.peer.call("train", name=name, data="train", batch=QUALITY_BATCH,
                                 steps=budget // QUALITY_BATCH)["seconds"]
        self.peer.call("reconstruct", name=name, data="holdout", out=recon)
        theirs = load_file(recon)
        fvu, dead = heldout_scores(self.holdout, theirs["recon"], theirs["fired"].bool())
        emit(self.args, {"side": "sparsify", "lr": built["lr"], "lr_schedule": "schedule-free",
                         "optimizer": built["optimizer"], **self.peer.label}, budget, fvu, dead, seconds, started,
             self.data)


def emit(args, side: dict, budget: int, fvu: float, dead: float, seconds: float, started: float, data: str) -> None:
    """Print one run's row and its JSON line (also appended to ``args.out``)."""
    warmup = f"+warmup {side['lr_warmup_tokens']:,}" if side.get("lr_warmup_tokens") else ""
    print(f"{budget:>9,} tokens  {side['side']:9s} lr {side['lr']:<8g} {side['lr_schedule'] + warmup:28s} "
          f"held-out FVU {fvu:.4f}  silent {dead:6.1%}  ({seconds:.0f} s in steps)", flush=True)
    line = {"metric": "heldout_fvu_lr_sweep", **side, "tokens_trained": budget, "heldout_fvu": fvu,
            "silent_on_heldout": dead, "batch_size": QUALITY_BATCH, "dead_after_tokens": QUALITY_DEAD_TOKENS,
            "n_latents": args.n_latents, "k": args.k, "train_seconds": round(seconds, 1),
            "wall_s": round(time.perf_counter() - started, 1), "threads": torch.get_num_threads(), "data": data,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps(line), flush=True)
    if args.out:
        with args.out.open("a") as stream:
            stream.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    sys.exit(main())
