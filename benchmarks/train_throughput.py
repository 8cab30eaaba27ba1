"""Training-step throughput of the SAE models against dense references and the matmul limit.

What is timed, in one run, with the sides interleaved round by round (so drift and other
processes hit every side alike) and medians quoted after an untimed warm-up (a round; with
--quick one step per side at 1/8 of the batch, see QUICK_ROUNDS). A step is
what the trainer does: forward, loss, backward, remove_parallel_grad_, Adam (fused where torch
has it), normalize_decoder_. No latents are dead, so AuxK is off on every side.

(a) **TopK, sparse** (``sae_platform.sae.TopKSAE``: the encoder gradient and the decoder run as
    embedding bags over the k active latents) against **TopK, dense reference**
    (``sae_platform.sae.dense_topk_reference``): the textbook autograd version of the same model
    (codes scattered into a dense [batch, n_latents] tensor, x_hat = z @ W_dec). Goal >= 1.5x
    tokens/s.
(b) **Useful FLOP/s** of the sparse TopK step. Once decoding is sparse, the matmuls that
    dominate a textbook step are the encoder forward (2·B·d·n) and the encoder weight gradient
    (2·B·d·n); their total divided by the step time is set against the same two matmuls run bare
    (``torch.mm`` into preallocated outputs, timed in the same rounds: the CPU's limit). Goal >= 0.6.
    The sparse step computes the weight gradient in O(B·k·d), so this ratio can pass 1; the
    stricter companion figure counts only the dense FLOPs really executed (the encoder forward)
    against the bare forward matmul.
(c) **Switch SAE**, 8 experts, same total latents, against the sparse TopK step: goal >= 3x
    tokens/s (the encoder matmul shrinks 8x; everything else stays).
(d) **The peers' own steps**, each in its own venv (``make peer-venvs``; benchmarks/peer_venv.py runs
    it as a subprocess, on the same rows from a safetensors file and the same thread count, and skips a
    peer whose venv is absent with a line naming its make target), interleaved with ours round by
    round, each timed inside its process:
    **SAELens** (``sae_lens.TopKTrainingSAE``): its training step as its ``SAETrainer._train_step``
    runs it (``training_forward_pass``, firing statistics, backward, grad-norm clipping at 1.0, Adam):
    goal >= 6x its tokens/s with no dead latents, and >= 4x with AuxK active on both sides (half the
    latents marked dead, the same mask).
    **sparsify** (``eai-sparsify``'s ``SparseCoder``: its fused TopK encoder with the index_add
    backward and its embedding-bag sparse decoder): its ``Trainer.fit`` step (loss_fn fvu) with its
    default optimizer (signum: schedule-free SignSGD): goal >= 1.5x its tokens/s, without and with
    AuxK (the same mask, AuxK weight 1/32 as ours).
    Where bf16 is native (see (f)), two more lines: each side as it trains by default on this device
    (``..._defaults``: ours picking in bf16, the peer in float32, as neither peer autocasts its SAE step
    on a CPU), and, for sparsify, both in bf16 (``..._bf16``: its forward under bf16 autocast, as
    ``SparseCoder.forward`` runs on CUDA). The float32 line per peer and sparsify's ``..._bf16`` line
    (not the AuxK or ``..._defaults`` lines) also carry ``ceiling_ratio`` and ``floor_ms``: the peer's
    step time over the floor of any exact TopK step in the same precision (the bare dense encoder matmul
    and the fastest exact top-k selection we know over every latent, ``make_floor``, timed in the same
    rounds), the most any exact TopK implementation built on them could reach against that peer.
(f) **Picking in bf16** (the trainer's default where the device multiplies bf16 natively:
    ``training.config.selection_precision: auto``): the same sparse TopK step with the dense
    pre-activations it picks from computed in bf16 and the picked values recomputed in float32,
    against float32 picks (side (a)'s step). Goal >= 1.5x tokens/s. Skipped with a message where
    bf16 is not native (there ``auto`` keeps float32). Sides (a)-(d) pick in float32, as the peers do;
    where bf16 is native, one more line per peer sets (f)'s step (our default there) against the peer's
    step as it runs by default (float32 throughout: sparsify and SAELens use no autocast in their SAE step).
(e) **Quality on the same rows for the same budget** (per peer present, and a shuffled demo store
    under $SAE_PLATFORM_ROOT, else skipped with a message): each trained on the same shuffled
    demo rows, batch 1,024, the same dead criterion (no fire for 200,000 tokens turns AuxK on, every
    side), ours at the demo's lr and lr schedule (config/demo.yaml), SAELens at the demo's lr (Adam, constant)
    and sparsify with its own default optimizer and lr;
    then held-out FVU (against the mean) and the fraction of latents that never fire on the held-out
    rows, computed here from every side's reconstructions of the same held-out rows.
    ``--quality-data synthetic`` trains on seeded synthetic rows instead (a sparse sum of feature
    directions in superposition, plus an offset and noise): no demo store needed, the same rows on
    every side. Ours is the trainer's step
    (``sae_platform.trainer``: sae(x, dead_mask), loss, remove_parallel_grad_, Adam,
    normalize_decoder_), picking as the trainer does by default (``selection_precision: auto``).
    Goal: ours at least as good on both. --quick trains 4,096 tokens
    (the JSON line says which), a smoke figure; the full mode trains the demo's 614,400.

Output: a table, then one JSON object per line, one per figure, with ``metric``, ``value``,
``baseline``, ``ratio`` and ``goal``.

    python benchmarks/train_throughput.py --quick     # < 1 minute on 2 CPU cores
    python benchmarks/train_throughput.py             # more rounds
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_help import HelpFormatter

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make the package importable without installing it
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))  # peer_venv beside this script, also when imported by a test

import sae_platform  # noqa: E402, F401, I001 - before torch: its huge-page setting applies to every side (peers inherit it)
import torch  # noqa: E402
from peer_venv import open_peer  # noqa: E402

from sae_platform.glibc_malloc import freed_blocks_reused  # noqa: E402
from sae_platform.lr_schedule import base_lrs, set_lr  # noqa: E402
from sae_platform.sae import ADAM_EPS, build_sae, dense_topk_reference, lr_for  # noqa: E402
from sae_platform.sae.kernels import topk_rows  # noqa: E402
from sae_platform.settings import read_run_config  # noqa: E402
from sae_platform.trainer import TrainSettings, selection_dtype  # noqa: E402

GOAL_SPARSE_VS_DENSE = 1.5
GOAL_FLOPS_FRACTION = 0.6
GOAL_SWITCH_VS_TOPK = 3.0
GOAL_VS_SAELENS = 6.0
GOAL_VS_SAELENS_AUXK = 4.0
GOAL_BF16_PICKS = 1.5
GOAL_VS_SPARSIFY = 1.5
GOAL_VS_SPARSIFY_AUXK = 1.5
# (e) trains ours as `make demo` does: batch, lr, its schedule and the dead criterion come from
# config/demo.yaml's resources.training.config (the other sides take the batch and the dead criterion)
DEMO_TRAINING = TrainSettings(**read_run_config(str(REPO / "config" / "demo.yaml"))["resources"]["training"]["config"])
QUALITY_BATCH, QUALITY_DEAD_TOKENS = DEMO_TRAINING.batch_size, DEMO_TRAINING.dead_after_tokens
QUALITY_HOLDOUT = 8192
CALIBRATION_ROWS = 8192
# --quick: under a minute on 2 CPU cores (issue 17). At the full shapes one round of all fourteen
# sides (ours, the two peers' six, the matmuls and floors) takes ~21 s, the warm-up ~18 s (the peers'
# first steps) and (e) ~1.2 s per 1,024 tokens (both sides), so --quick warms every side up with one
# step at 1/8 of the batch (what a warm-up is for: thread pools, lazy init, Adam state; the full mode
# warms up with a whole round), times 1 round and trains 4,096 tokens for (e): ~55 s in all on the
# AVX512-BF16 machine, 2026-12-07 (84 s with 2 rounds, 60 s with 1 round and 6,144 tokens). That was
# 70.6 s in an hour when the machine ran 20-40% slower, so --quick also halves the batch (QUICK_BATCH:
# every step about halves, the round and the warm-up with it). Its ratios are one round's at half the
# batch and its FVU four steps': smoke figures; the README quotes the full mode's medians of 7.
QUICK_ROUNDS, QUICK_QUALITY_TOKENS, QUICK_BATCH = 1, 4_096, 2_048
FULL_BATCH = 4_096


PEER_GOALS = {"sae-lens": (GOAL_VS_SAELENS, GOAL_VS_SAELENS_AUXK),
              "sparsify": (GOAL_VS_SPARSIFY, GOAL_VS_SPARSIFY_AUXK)}
PEER_STEP_IS = {
    "sae-lens": "TopKTrainingSAE, its SAETrainer._train_step (forward, firing stats, backward, clip_grad_norm 1.0, "
                "Adam at our lr)",
    "sparsify": "SparseCoder (fused TopK encoder, embedding-bag decoder), its Trainer.fit step with loss_fn fvu "
                "(forward, backward, remove_gradient_parallel_to_decoder_directions, its default signum optimizer: "
                "ScheduleFreeWrapper(SignSGD)), firing bookkeeping",
}


def start_peers(threads: int, tensors: dict, folder: Path) -> dict:
    """The peers whose venv is built (benchmarks/peer_venv.py), each with ``tensors`` loaded; a missing one is
    skipped with a line naming its make target."""
    from safetensors.torch import save_file

    path = folder / "rows.safetensors"
    save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, str(path))
    peers = {}
    for name in PEER_STEP_IS:
        peer = open_peer(name, threads)
        if peer is not None:
            peer.call("load", path=str(path))
            peers[name] = peer
    return peers


def build_peer(peer, name: str, d: int, n: int, k: int, dead: str | None = None, dead_tokens: int | None = None,
               lr: float | None = None, aux_coeff: float = 0.0, first: str = "x", bf16_autocast: bool = False) -> None:
    """One SAE on the peer's side: SAELens at ``lr`` (Adam, ours); sparsify with its own optimizer and lr,
    AuxK at ``aux_coeff`` (ours) when ``dead`` or ``dead_tokens`` is given, its forward under bf16 autocast
    when ``bf16_autocast`` (as it runs on CUDA)."""
    if peer.name == "sae-lens":
        peer.call("build", name=name, d=d, n=n, k=k, seed=0, lr=lr, dead=dead, dead_tokens=dead_tokens)
    else:
        peer.call("build", name=name, d=d, n=n, k=k, seed=0, first=first, dead=dead, dead_tokens=dead_tokens,
                  auxk_alpha=aux_coeff if (dead or dead_tokens) else 0.0, bf16_autocast=bf16_autocast)


def peer_slug(name: str) -> str:
    """The peer as it appears in metric and step names: saelens, sparsify."""
    return name.replace("-", "")


def peer_step(peer, name: str, data: str = "x"):
    """A step callable like make_step's, run on the peer's side; it returns the seconds the peer measured."""
    def step(batch=None):
        return peer.call("step", name=name, data=data, rows=None if batch is None else len(batch))["seconds"]

    return step


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few rounds: < 1 minute on 2 CPU cores")
    parser.add_argument("--batch", type=int, default=None,
                        help=f"rows per step (default: {FULL_BATCH:,}; quick: {QUICK_BATCH:,})")
    parser.add_argument("--d-model", type=int, default=576, help="activation width")
    parser.add_argument("--n-latents", type=int, default=16384, help="dictionary size")
    parser.add_argument("--k", type=int, default=32, help="active latents per row")
    parser.add_argument("--experts", type=int, default=8, help="Switch SAE experts")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"timed rounds after the warm-up (quick: {QUICK_ROUNDS}, else 7)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all usable cores)")
    parser.add_argument("--quality-tokens", type=int, default=None,
                        help=f"(e) training budget per side (default: 614,400 as the demo; quick: "
                             f"{QUICK_QUALITY_TOKENS:,})")
    parser.add_argument("--quality-data", choices=("demo", "synthetic"), default="demo",
                        help="(e)'s rows: the shuffled demo store or seeded synthetic superposition rows")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = QUICK_ROUNDS if args.quick else 7
    if args.batch is None:
        args.batch = QUICK_BATCH if args.quick else FULL_BATCH
    return args


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def make_adam(sae):
    try:
        return torch.optim.Adam(sae.param_groups(lr_for(sae.n_latents)), eps=ADAM_EPS, fused=True)
    except (RuntimeError, TypeError):  # a torch without fused Adam for this device
        return torch.optim.Adam(sae.param_groups(lr_for(sae.n_latents)), eps=ADAM_EPS)


def make_step(sae, x, dense=False, dead_mask=None):
    opt = make_adam(sae)

    def step(batch=None):
        xb = x if batch is None else batch
        if dense:
            loss = ((dense_topk_reference(sae, xb) - xb) * sae.input_scale).pow(2).mean()
        else:
            loss, _ = sae.loss(xb, sae(xb, dead_mask=dead_mask))
        opt.zero_grad()
        loss.backward()
        sae.remove_parallel_grad_()
        opt.step()
        sae.normalize_decoder_()

    return step


def useful_step_flops(batch: int, d: int, n: int) -> int:
    """FLOPs of the dense matmuls a textbook TopK step cannot avoid: the encoder forward (2·B·d·n)
    and the encoder weight gradient (2·B·d·n); figure (b)'s and gpu_check.py's numerator."""
    return 4 * batch * d * n


def make_matmuls(batch, d, n, device):
    """The two dense matmuls of a textbook step, bare, into preallocated outputs."""
    x = torch.randn(batch, d, device=device)
    w = torch.randn(n, d, device=device)
    b = torch.zeros(n, device=device)
    grad_pre = torch.randn(batch, n, device=device)
    pre_out, grad_w_out = torch.empty(batch, n, device=device), torch.empty(n, d, device=device)
    forward = lambda: torch.addmm(b, x, w.t(), out=pre_out)  # noqa: E731
    weight_grad = lambda: torch.mm(grad_pre.t(), x, out=grad_w_out)  # noqa: E731
    return forward, weight_grad


def make_floor(batch, d, n, k, device, dtype):
    """A zero-argument callable that does, bare, what every exact TopK step must: the dense encoder
    matmul of random x [batch, d] by w [n, d] (n latents) into a preallocated [batch, n] output, then each
    row's top ``k`` of it, in ``dtype`` on ``device``. No bias: b_enc can ride in the matmul as one more
    input column (as our bf16 picks do), and a separate bias pass over the output would cost ~10 ms at
    4,096 x 16,384 x 576 on the AVX512-BF16 CPU. The selection is the fastest exact one we know,
    ``kernels.topk_rows`` (faster than torch.topk on CPU; torch.topk elsewhere). Why: a peer's step time
    over this one's bounds the ratio any exact TopK step built on these could reach against it
    (``ceiling_ratio`` and ``floor_ms`` in the peer lines)."""
    x, w = torch.randn(batch, d, device=device, dtype=dtype), torch.randn(n, d, device=device, dtype=dtype)
    pre = torch.empty(batch, n, device=device, dtype=dtype)
    return lambda: topk_rows(torch.mm(x, w.t(), out=pre), k)


def timed(fn, device) -> float:
    """Seconds ``fn()`` took; a peer's step returns the seconds its own process measured, which count instead."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    measured = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return measured if isinstance(measured, float) else time.perf_counter() - start


def demo_rows(n_steps: int, device):
    """(train, held-out, description) from the shuffled demo store under $SAE_PLATFORM_ROOT, or None (said why)."""
    import numpy as np

    from sae_platform.shuffled import iter_shuffled, open_shuffled
    from sae_platform.storage import ArtifactStore

    root = os.environ.get("SAE_PLATFORM_ROOT", str(REPO / "artifacts"))
    try:
        store = ArtifactStore(root)
        shuffled = open_shuffled(store, "main")
    except Exception as error:  # noqa: BLE001 - any missing piece: say so and skip this line
        print(f"(e) quality side by side skipped: no shuffled demo store under {root} ({error}); run `make demo`, "
              "or train on synthetic rows with --quality-data synthetic")
        return None
    n_rows = shuffled.n_rows
    held = min(QUALITY_HOLDOUT, n_rows // 5)
    # Only the rows training reads (batch i is rows [i*B, (i+1)*B) until the budget wraps around
    # the training rows, then all of them) and the held-out tail: the same batches as loading the
    # whole store, without reading and converting rows no step uses.
    used = min(n_rows - held, max(n_steps * QUALITY_BATCH, CALIBRATION_ROWS))

    def load(start, stop):
        blocks = iter_shuffled(store, "main", batch_rows=8192, start=start, stop=stop)
        return torch.from_numpy(np.concatenate([a for _, a in blocks]).astype(np.float32)).to(device)

    return (load(0, used), load(n_rows - held, n_rows),
            f"shuffled store 'main' under {root}: {n_rows - held:,} training rows ({used:,} read), {held:,} held out")


def synthetic_rows(n_steps: int, d: int, device):
    """(train, held-out, description): rows made as an SAE assumes activations are, a sparse sum of feature
    directions in superposition (4·d unit directions, 16 active per row, exponential magnitudes) plus an
    offset and noise; seeded, so every side and every run sees the same rows."""
    g = torch.Generator().manual_seed(0)
    n_features, active = 4 * d, 16
    directions = torch.nn.functional.normalize(torch.randn(n_features, d, generator=g), dim=1)
    offset = 2.0 * torch.randn(d, generator=g)

    def make(count):
        idx = torch.randint(0, n_features, (count, active), generator=g)
        mags = torch.empty(count, active).exponential_(1.0, generator=g)
        rows = torch.nn.functional.embedding_bag(idx, directions, per_sample_weights=mags, mode="sum")
        return (rows + offset + 0.05 * torch.randn(count, d, generator=g)).to(device)

    used = max(n_steps * QUALITY_BATCH, CALIBRATION_ROWS)
    return (make(used), make(QUALITY_HOLDOUT),
            f"synthetic: {n_features:,} unit directions in {d} dims, {active} active per row (Exp(1) magnitudes), "
            f"offset, noise 0.05; {used:,} training rows, {QUALITY_HOLDOUT:,} held out, seed 0")


def train_ours(train, n: int, k: int, n_steps: int, settings: TrainSettings, device):
    """(our TopK SAE, seconds in its steps) after ``n_steps`` steps of ``settings.batch_size`` rows of
    ``train`` (batch i is rows [i*B, (i+1)*B), wrapping), as the trainer steps: sae(x, dead_mask), loss,
    remove_parallel_grad_, Adam at ``settings``' lr and schedule (``TrainSettings.lr_factor``),
    normalize_decoder_; dead after ``settings.dead_after_tokens`` silent tokens; picks as the trainer
    does by default (``selection_precision: auto``)."""
    torch.manual_seed(0)
    ours = build_sae("topk", train.shape[1], n, k=k, device=device)
    ours.calibrate_(train[:CALIBRATION_ROWS])
    ours.selection_dtype = selection_dtype("auto", device)  # as the trainer picks by default
    opt = torch.optim.Adam(ours.parameters(), lr=settings.learning_rate, eps=ADAM_EPS)
    initial_lrs = base_lrs(opt)
    batch, dead_steps = settings.batch_size, settings.dead_after_tokens // settings.batch_size
    since, seconds = torch.zeros(n, device=device), 0.0
    with freed_blocks_reused():  # as the trainer's loop
        for step in range(n_steps):
            lo = (step * batch) % (len(train) - batch + 1)
            x = train[lo:lo + batch]
            t0 = time.perf_counter()
            out = ours(x, dead_mask=since >= dead_steps)
            loss, _ = ours.loss(x, out)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            ours.remove_parallel_grad_()
            set_lr(opt, initial_lrs, settings.lr_factor(step, n_steps))
            opt.step()
            with torch.no_grad():
                ours.normalize_decoder_()
            since += 1
            since[out.fired] = 0
            seconds += time.perf_counter() - t0
    return ours, seconds


@torch.no_grad()
def reconstruct_heldout(sae, holdout):
    """(reconstructions of ``holdout`` [rows, d], bool [n_latents]: fired on any of them), in chunks of 2,048."""
    chunks = [sae(holdout[lo:lo + 2048]) for lo in range(0, len(holdout), 2048)]
    return torch.cat([c.recon for c in chunks]), torch.stack([c.fired for c in chunks]).any(0)


def heldout_scores(holdout, recon, fired) -> tuple[float, float]:
    """Held-out FVU (squared error over the variance about the held-out mean) and the fraction of
    latents silent on every held-out row."""
    var = float(((holdout - holdout.mean(0)) ** 2).sum())
    return (float(((holdout - recon.to(holdout.device)) ** 2).sum()) / var,
            float(1 - fired.to(holdout.device).float().mean()))


def quality_side_by_side(args, device, n, k, common, peers, folder: Path) -> list[dict]:
    """(e): ours and each peer trained on the same shuffled demo rows for the same budget; held-out FVU
    and silent latents measured here, on every side's reconstructions of the same held-out rows."""
    from safetensors.torch import load_file, save_file

    budget = args.quality_tokens or (QUICK_QUALITY_TOKENS if args.quick else 614_400)
    n_steps = budget // QUALITY_BATCH
    rows = synthetic_rows(n_steps, args.d_model, device) if args.quality_data == "synthetic" else \
        demo_rows(n_steps, device)
    if rows is None:
        return []
    train, holdout, data = rows
    held, used = len(holdout), len(train)
    d = train.shape[1]
    ours, ours_s = train_ours(train, n, k, n_steps, DEMO_TRAINING, device)
    fvu_o, dead_o = heldout_scores(holdout, *reconstruct_heldout(ours, holdout))
    rows = folder / "quality_rows.safetensors"
    save_file({"train": train[:used].cpu().contiguous(), "holdout": holdout.cpu().contiguous()}, str(rows))
    lines = []
    for peer in peers.values():
        peer.call("load", path=str(rows))
        build_peer(peer, "quality", d, n, k, dead_tokens=QUALITY_DEAD_TOKENS, lr=DEMO_TRAINING.learning_rate,
                   aux_coeff=ours.hparams["aux_coeff"], first="train")
        their_s = peer.call("train", name="quality", data="train", batch=QUALITY_BATCH, steps=n_steps)["seconds"]
        out_path = folder / f"recon-{peer.name}.safetensors"
        peer.call("reconstruct", name="quality", data="holdout", out=str(out_path))
        theirs = load_file(str(out_path))
        fvu_s, dead_s = heldout_scores(holdout, theirs["recon"], theirs["fired"].bool())
        print(f"(e) same {n_steps * QUALITY_BATCH:,} {args.quality_data} tokens (batch {QUALITY_BATCH}): held-out FVU "
              f"ours {fvu_o:.3f} vs {peer.package} {fvu_s:.3f}; never firing on {held:,} held-out rows: ours "
              f"{dead_o:.1%} vs {peer.package} {dead_s:.1%}; training s ours {ours_s:.1f} vs {peer.package} "
              f"{their_s:.1f}")
        lines.append({
            "metric": f"topk_heldout_fvu_vs_{peer_slug(peer.name)}_same_rows", "value": fvu_o, "baseline": fvu_s,
            "ratio": fvu_o / fvu_s, "goal": 1.0, "lower_is_better": True, "unit": "FVU", **peer.label,
            "dead_fraction": dead_o, "baseline_dead_fraction": dead_s,
            "dead_is": f"latents that never fire on the {held} held-out rows",
            "tokens_trained": n_steps * QUALITY_BATCH, "quick_budget": bool(args.quick and not args.quality_tokens),
            "batch_size": QUALITY_BATCH, "lr": DEMO_TRAINING.learning_rate, "lr_schedule": DEMO_TRAINING.lr_schedule,
            "lr_warmup_tokens": DEMO_TRAINING.lr_warmup_tokens, "dead_after_tokens": QUALITY_DEAD_TOKENS,
            "baseline_optimizer": "Adam at lr" if peer.name == "sae-lens" else "its default signum, its own lr",
            "train_seconds": ours_s, "baseline_train_seconds": their_s,
            "ours_picks_in": str(ours.selection_dtype or "float32").removeprefix("torch."),
            "data": data,
            **{k_: v for k_, v in common.items() if k_ not in ("batch",)}})
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    peers = {}
    try:
        with tempfile.TemporaryDirectory(prefix="train_throughput-") as folder:
            return run(args, Path(folder), peers)
    finally:
        for peer in peers.values():
            peer.close()


def run(args, folder: Path, peers: dict) -> int:
    """The whole benchmark; ``peers`` (filled here) are closed by the caller; ``folder`` holds the rows they read."""
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    torch.set_num_threads(args.threads or usable_cores())
    torch.manual_seed(0)
    batch, d, n, k = args.batch, args.d_model, args.n_latents, args.k
    wall = time.perf_counter()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    # Activation-like rows: an offset, a few strong directions, noise.
    x = (torch.randn(batch, d, device=device) + 2.0
         + torch.randn(batch, 8, device=device) @ torch.randn(8, d, device=device))
    models = {
        "topk_sparse": build_sae("topk", d, n, k=k, device=device),
        "topk_dense_ref": build_sae("topk", d, n, k=k, device=device),
        "switch": build_sae("switch", d, n, k=k, n_experts=args.experts, device=device),
    }
    for sae in models.values():
        sae.calibrate_(x[:1024])
    low = selection_dtype("auto", device)
    if low is not None:  # (f): the trainer's default picks on this device
        models["topk_bf16_picks"] = build_sae("topk", d, n, k=k, device=device)
        models["topk_bf16_picks"].calibrate_(x[:1024])
        models["topk_bf16_picks"].selection_dtype = low
    else:
        print(f"(f) skipped: bf16 is not native on {device}, where the trainer keeps float32 picks")
    steps = {
        "topk_sparse": make_step(models["topk_sparse"], x),
        "topk_dense_ref": make_step(models["topk_dense_ref"], x, dense=True),
        "switch": make_step(models["switch"], x),
    }
    if low is not None:
        steps["topk_bf16_picks"] = make_step(models["topk_bf16_picks"], x)
    # (d), (g): the peers' steps on the same rows; AuxK: half the latents dead, the same mask on every side
    dead = torch.zeros(n, dtype=torch.bool, device=device)
    dead[torch.randperm(n, device=device)[:n // 2]] = True
    peers.update(start_peers(torch.get_num_threads(), {"x": x, "dead": dead.to(torch.uint8)}, folder))
    if peers:
        models["topk_sparse_auxk"] = build_sae("topk", d, n, k=k, device=device)
        models["topk_sparse_auxk"].calibrate_(x[:1024])
        steps["topk_sparse_auxk"] = make_step(models["topk_sparse_auxk"], x, dead_mask=dead)
    for name, peer in peers.items():
        slug = peer_slug(name)
        build_peer(peer, "topk", d, n, k, lr=lr_for(n))
        build_peer(peer, "topk_auxk", d, n, k, dead="dead", lr=lr_for(n),
                   aux_coeff=models["topk_sparse"].hparams["aux_coeff"])
        steps[f"{slug}_topk"], steps[f"{slug}_topk_auxk"] = peer_step(peer, "topk"), peer_step(peer, "topk_auxk")
        if low is not None and name == "sparsify":  # its CUDA precision, on this CPU: bf16 against our bf16 picks
            build_peer(peer, "topk_bf16", d, n, k, bf16_autocast=True)
            steps["sparsify_topk_bf16"] = peer_step(peer, "topk_bf16")
    mm_forward, mm_weight_grad = make_matmuls(batch, d, n, device)
    steps["matmul_forward"], steps["matmul_weight_grad"] = mm_forward, mm_weight_grad
    steps["matmul_floor_float32"] = make_floor(batch, d, n, k, device, torch.float32)
    if low is not None:
        steps["matmul_floor_bf16"] = make_floor(batch, d, n, k, device, low)

    runs = {name: [] for name in steps}
    with freed_blocks_reused() as reused:  # in this process, as the trainer's loop runs (the peers: their own)
        if args.quick:  # warm-up at 1/8 of the batch: the one-time costs (thread pools, lazy init, Adam state)
            for name, step in steps.items():
                step() if name.startswith("matmul") else step(x[:max(1, batch // 8)])
        for round_index in range(args.rounds + (0 if args.quick else 1)):  # full: round 0 is the warm-up
            for name, step in steps.items():
                seconds = timed(step, device)
                if round_index or args.quick:
                    runs[name].append(seconds)
    med = {name: statistics.median(times) for name, times in runs.items()}
    wall_s = time.perf_counter() - wall
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    tps = {name: batch / med[name] for name in med if not name.startswith("matmul")}
    useful = useful_step_flops(batch, d, n)
    mm_s = med["matmul_forward"] + med["matmul_weight_grad"]
    step_flops = useful / med["topk_sparse"]
    limit_flops = useful / mm_s
    dense_flops = 2 * batch * d * n / med["topk_sparse"]
    fwd_limit = 2 * batch * d * n / med["matmul_forward"]
    routed = torch.bincount(models["switch"].route(models["switch"]._centered(x))[1], minlength=args.experts)

    print(f"SAE training step, d_model {d}, {n:,} latents, k {k}, batch {batch:,}, device {device}, "
          f"{torch.get_num_threads()} thread(s), median of {args.rounds} round(s) after 1 warm-up"
          f"{' at 1/8 of the batch' if args.quick else ''}")
    print(f"{'side':28s} {'ms/step':>9s} {'tokens/s':>10s}   runs (ms)")
    for name in runs:
        tok = f"{batch / med[name]:10.0f}" if name in tps else f"{'':10s}"
        print(f"{name:28s} {med[name] * 1e3:9.1f} {tok}   {' '.join(f'{t * 1e3:.0f}' for t in runs[name])}")
    print(f"(a) sparse vs dense-reference TopK: {tps['topk_sparse'] / tps['topk_dense_ref']:.2f}x "
          f"(goal >= {GOAL_SPARSE_VS_DENSE})")
    print(f"(b) useful FLOP/s {step_flops / 1e9:.1f} G vs bare matmuls {limit_flops / 1e9:.1f} G: "
          f"{step_flops / limit_flops:.2f} (goal >= {GOAL_FLOPS_FRACTION}); dense FLOPs actually executed "
          f"{dense_flops / 1e9:.1f} G/s vs bare forward matmul {fwd_limit / 1e9:.1f} G/s: "
          f"{dense_flops / fwd_limit:.2f} "
          f"(goal >= {GOAL_FLOPS_FRACTION})")
    print(f"(c) Switch ({args.experts} experts) vs TopK: {tps['switch'] / tps['topk_sparse']:.2f}x "
          f"(goal >= {GOAL_SWITCH_VS_TOPK}); rows per expert in this batch: {routed.tolist()}")
    for name, peer in peers.items():
        slug, (goal, goal_auxk) = peer_slug(name), PEER_GOALS[name]
        print(f"(d) ours vs {peer.package} {peer.version} TopK step: {tps['topk_sparse'] / tps[f'{slug}_topk']:.2f}x "
              f"(goal >= {goal}); with AuxK (half dead): "
              f"{tps['topk_sparse_auxk'] / tps[f'{slug}_topk_auxk']:.2f}x (goal >= {goal_auxk})"
              + (f"; each at its default precision here (ours picking in bf16): "
                 f"{tps['topk_bf16_picks'] / tps[f'{slug}_topk']:.2f}x" if low is not None else "")
              + (f"; both in bf16 (its forward under bf16 autocast): "
                 f"{tps['topk_bf16_picks'] / tps[f'{slug}_topk_bf16']:.2f}x" if f"{slug}_topk_bf16" in tps else "")
              + f"; the most any exact TopK step could reach (its step / bare matmul + top-k): "
                f"{med[f'{slug}_topk'] / med['matmul_floor_float32']:.2f}x in float32"
              + (f", {med[f'{slug}_topk_bf16'] / med['matmul_floor_bf16']:.2f}x in bf16"
                 if f"{slug}_topk_bf16" in tps else ""))
    if low is not None:
        print(f"(f) picking in bf16 vs float32: {tps['topk_bf16_picks'] / tps['topk_sparse']:.2f}x "
              f"(goal >= {GOAL_BF16_PICKS})")
    busy = load_before is not None and load_before > 1.0
    print(f"wall time {wall_s:.1f} s; load average {load_before:.2f} -> {load_after:.2f} on {usable_cores()} CPUs"
          if load_before is not None else f"wall time {wall_s:.1f} s")
    if busy:
        print("WARNING: the machine was busy with other work when the run started; the timings are noisy")
    print()

    common = {"batch": batch, "d_model": d, "n_latents": n, "k": k, "device": str(device),
              "threads": torch.get_num_threads(), "rounds": args.rounds, "quick": args.quick,
              "wall_s": round(wall_s, 1), "load_before": load_before, "load_after": load_after,
              "ours_malloc": "freed blocks reused, as the trainer's loop" if reused
              else "as set before the run (environment, or glibc's own adaptation)"}
    ms = lambda name: [round(t * 1e3, 1) for t in runs[name]]  # noqa: E731

    def ceiling(peer_side: str, floor: str) -> dict:
        """The peer's step over the bare floor of an exact TopK step in the same precision (make_floor)."""
        return {"ceiling_ratio": med[peer_side] / med[floor], "floor_ms": round(med[floor] * 1e3, 1),
                "ceiling_is": "the peer's step time over the bare dense encoder matmul + the fastest exact top-k we "
                              "know (kernels.topk_rows) in the same precision, same rounds: the highest ratio an "
                              "exact TopK step built on them could reach"}
    lines = [
        {"metric": "topk_train_tokens_per_s", "value": tps["topk_sparse"], "baseline": tps["topk_dense_ref"],
         "ratio": tps["topk_sparse"] / tps["topk_dense_ref"], "goal": GOAL_SPARSE_VS_DENSE, "unit": "tokens/s",
         "baseline_is": "same TopK SAE through plain autograd with dense codes and a dense decoder matmul",
         "sparse_runs_ms": ms("topk_sparse"), "dense_runs_ms": ms("topk_dense_ref"), **common},
        {"metric": "topk_train_useful_flops_per_s", "value": step_flops, "baseline": limit_flops,
         "ratio": step_flops / limit_flops, "goal": GOAL_FLOPS_FRACTION, "unit": "FLOP/s",
         "useful_flops_per_step": useful, "useful_is": "encoder forward 2BDn + encoder weight gradient 2BDn",
         "baseline_is": "the same two matmuls, bare torch.addmm/mm into preallocated outputs, same rounds",
         "note": "the sparse step computes the encoder weight gradient in O(B*k*d), so this can exceed 1",
         "matmul_forward_runs_ms": ms("matmul_forward"), "matmul_weight_grad_runs_ms": ms("matmul_weight_grad"),
         **common},
        {"metric": "topk_train_dense_flops_share", "value": dense_flops, "baseline": fwd_limit,
         "ratio": dense_flops / fwd_limit, "goal": GOAL_FLOPS_FRACTION, "unit": "FLOP/s",
         "value_is": "2BDn (the one dense matmul a sparse step executes) / step time",
         "baseline_is": "bare encoder forward matmul", **common},
        {"metric": "switch_train_tokens_per_s", "value": tps["switch"], "baseline": tps["topk_sparse"],
         "ratio": tps["switch"] / tps["topk_sparse"], "goal": GOAL_SWITCH_VS_TOPK, "unit": "tokens/s",
         "n_experts": args.experts, "rows_per_expert": routed.tolist(),
         "baseline_is": "sparse TopK SAE with the same total latents", "switch_runs_ms": ms("switch"), **common},
    ]
    if low is not None:
        lines.append({"metric": "topk_train_tokens_per_s_bf16_picks", "value": tps["topk_bf16_picks"],
                      "baseline": tps["topk_sparse"], "ratio": tps["topk_bf16_picks"] / tps["topk_sparse"],
                      "goal": GOAL_BF16_PICKS, "unit": "tokens/s",
                      "value_is": "sparse TopK step picking from bf16 pre-activations, picked values recomputed in "
                                  "float32 (the trainer's selection_precision: auto on this device)",
                      "baseline_is": "the same step picking from float32 pre-activations (side a)",
                      "bf16_runs_ms": ms("topk_bf16_picks"), **common})
    for name, peer in peers.items():
        slug, (goal, goal_auxk) = peer_slug(name), PEER_GOALS[name]
        lines += [
            {"metric": f"topk_train_tokens_per_s_vs_{slug}", "value": tps["topk_sparse"], **peer.label,
             "baseline": tps[f"{slug}_topk"], "ratio": tps["topk_sparse"] / tps[f"{slug}_topk"],
             "goal": goal, "unit": "tokens/s", "dead_latents": 0,
             "baseline_is": f"{peer.package} {peer.version} {PEER_STEP_IS[name]}, in its own venv",
             **ceiling(f"{slug}_topk", "matmul_floor_float32"),
             "ours_runs_ms": ms("topk_sparse"), f"{slug}_runs_ms": ms(f"{slug}_topk"), **common},
            {"metric": f"topk_train_tokens_per_s_vs_{slug}_auxk", "value": tps["topk_sparse_auxk"], **peer.label,
             "baseline": tps[f"{slug}_topk_auxk"], "ratio": tps["topk_sparse_auxk"] / tps[f"{slug}_topk_auxk"],
             "goal": goal_auxk, "unit": "tokens/s", "dead_latents": n // 2,
             "baseline_is": f"{peer.package} {peer.version} step with the same dead mask (its AuxK)",
             "ours_runs_ms": ms("topk_sparse_auxk"), f"{slug}_runs_ms": ms(f"{slug}_topk_auxk"), **common},
        ]
        if low is not None:  # each side as it trains by default on this device: ours picks in bf16, the peer in fp32
            lines.append({
                "metric": f"topk_train_tokens_per_s_vs_{slug}_defaults", "value": tps["topk_bf16_picks"],
                **peer.label, "baseline": tps[f"{slug}_topk"], "ratio": tps["topk_bf16_picks"] / tps[f"{slug}_topk"],
                "goal": goal, "unit": "tokens/s", "dead_latents": 0, "ours_picks_in": str(low).removeprefix("torch."),
                "value_is": "our step as the trainer runs it by default on this device (selection_precision: auto "
                            "picks from bf16 pre-activations, picked values, loss and gradients in float32)",
                "baseline_is": f"{peer.package} {peer.version} {PEER_STEP_IS[name]}, in its own venv, as it runs by "
                               "default (float32 throughout)",
                "ours_runs_ms": ms("topk_bf16_picks"), f"{slug}_runs_ms": ms(f"{slug}_topk"), **common})
        if f"{slug}_topk_bf16" in tps:
            lines.append({
                "metric": f"topk_train_tokens_per_s_vs_{slug}_bf16", "value": tps["topk_bf16_picks"], **peer.label,
                "baseline": tps[f"{slug}_topk_bf16"], "ratio": tps["topk_bf16_picks"] / tps[f"{slug}_topk_bf16"],
                "goal": goal, "unit": "tokens/s", "dead_latents": 0, "ours_picks_in": str(low).removeprefix("torch."),
                "value_is": "our step picking in bf16 (the trainer's default on this device)",
                "baseline_is": f"{peer.package} {peer.version} {PEER_STEP_IS[name]}, in its own venv, its forward "
                               "under bf16 autocast on this CPU, as SparseCoder.forward runs on CUDA",
                **ceiling(f"{slug}_topk_bf16", "matmul_floor_bf16"),
                "ours_runs_ms": ms("topk_bf16_picks"), f"{slug}_runs_ms": ms(f"{slug}_topk_bf16"), **common})
    if peers:
        started = time.perf_counter()
        quality = quality_side_by_side(args, device, n, k, common, peers, folder)
        for line in quality:
            line["quality_wall_s"] = round(time.perf_counter() - started, 1)
        lines += quality
    print(f"whole run {time.perf_counter() - wall:.1f} s (timed rounds {wall_s:.1f} s)")
    noisy = busy or (load_after is not None and load_after > usable_cores() + 0.5)  # as the WARNING says
    for line in lines:
        line["noisy"] = noisy
    sys.stdout.flush()
    for line in lines:
        print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
