"""Training-step throughput of the SAE models against dense references and the matmul limit.

What is timed, in one run, with the sides interleaved round by round (so drift and other
processes hit every side alike) and medians quoted after an untimed warm-up round. A step is
what the trainer does: forward, loss, backward, remove_parallel_grad_, Adam (fused where torch
has it), normalize_decoder_. No latents are dead, so AuxK is off on every side.

(a) **TopK, sparse** (``sae_platform.sae.TopKSAE``: the encoder gradient and the decoder run as
    embedding bags over the k active latents) against **TopK, dense reference**: the textbook
    autograd version of the same model (codes scattered into a dense [batch, n_latents] tensor,
    x_hat = z @ W_dec). Goal >= 1.5x tokens/s.
(b) **Useful FLOP/s** of the sparse TopK step. Once decoding is sparse, the matmuls that
    dominate a textbook step are the encoder forward (2·B·d·n) and the encoder weight gradient
    (2·B·d·n); their total divided by the step time is set against the same two matmuls run bare
    (``torch.mm`` into preallocated outputs, timed in the same rounds: the CPU's limit). Goal >= 0.6.
    The sparse step computes the weight gradient in O(B·k·d), so this ratio can pass 1; the
    stricter companion figure counts only the dense FLOPs really executed (the encoder forward)
    against the bare forward matmul.
(c) **Switch SAE**, 8 experts, same total latents, against the sparse TopK step: goal >= 3x
    tokens/s (the encoder matmul shrinks 8x; everything else stays).

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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make the package importable without installing it
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sae_platform.sae import ADAM_EPS, build_sae, lr_for  # noqa: E402

GOAL_SPARSE_VS_DENSE = 1.5
GOAL_FLOPS_FRACTION = 0.6
GOAL_SWITCH_VS_TOPK = 3.0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few rounds: < 1 minute on 2 CPU cores")
    parser.add_argument("--batch", type=int, default=4096, help="rows per step (default: %(default)s)")
    parser.add_argument("--d-model", type=int, default=576, help="activation width (default: %(default)s)")
    parser.add_argument("--n-latents", type=int, default=16384, help="dictionary size (default: %(default)s)")
    parser.add_argument("--k", type=int, default=32, help="active latents per row (default: %(default)s)")
    parser.add_argument("--experts", type=int, default=8, help="Switch SAE experts (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (quick: 3, else 7)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all usable cores)")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 7
    return args


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def make_adam(sae):
    try:
        return torch.optim.Adam(sae.parameters(), lr=lr_for(sae.n_latents), eps=ADAM_EPS, fused=True)
    except (RuntimeError, TypeError):  # a torch without fused Adam for this device
        return torch.optim.Adam(sae.parameters(), lr=lr_for(sae.n_latents), eps=ADAM_EPS)


def dense_reference_recon(sae, x):
    """The textbook TopK SAE through plain autograd, on `sae`'s own parameters."""
    xc = x * sae.input_scale - sae.b_pre
    pre = F.linear(xc, sae.W_enc, sae.b_enc)
    vals, idx = pre.topk(sae.hparams["k"], dim=1)
    z = torch.zeros_like(pre).scatter(1, idx, vals.relu())
    return (z @ sae.W_dec + sae.b_pre) / sae.input_scale


def make_step(sae, x, dense=False):
    opt = make_adam(sae)

    def step():
        if dense:
            loss = ((dense_reference_recon(sae, x) - x) * sae.input_scale).pow(2).mean()
        else:
            loss, _ = sae.loss(x, sae(x))
        opt.zero_grad()
        loss.backward()
        sae.remove_parallel_grad_()
        opt.step()
        sae.normalize_decoder_()

    return step


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


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main(argv=None) -> int:
    args = parse_args(argv)
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
    steps = {
        "topk_sparse": make_step(models["topk_sparse"], x),
        "topk_dense_ref": make_step(models["topk_dense_ref"], x, dense=True),
        "switch": make_step(models["switch"], x),
    }
    mm_forward, mm_weight_grad = make_matmuls(batch, d, n, device)
    steps["matmul_forward"], steps["matmul_weight_grad"] = mm_forward, mm_weight_grad

    runs = {name: [] for name in steps}
    for round_index in range(args.rounds + 1):  # round 0 warms up: allocations, thread pools
        for name, step in steps.items():
            seconds = timed(step, device)
            if round_index:
                runs[name].append(seconds)
    med = {name: statistics.median(times) for name, times in runs.items()}
    wall_s = time.perf_counter() - wall
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    tps = {name: batch / med[name] for name in ("topk_sparse", "topk_dense_ref", "switch")}
    useful = 4 * batch * d * n  # encoder forward + encoder weight gradient
    mm_s = med["matmul_forward"] + med["matmul_weight_grad"]
    step_flops = useful / med["topk_sparse"]
    limit_flops = useful / mm_s
    dense_flops = 2 * batch * d * n / med["topk_sparse"]
    fwd_limit = 2 * batch * d * n / med["matmul_forward"]
    routed = torch.bincount(models["switch"].route(models["switch"]._centered(x))[1], minlength=args.experts)

    print(f"SAE training step, d_model {d}, {n:,} latents, k {k}, batch {batch:,}, device {device}, "
          f"{torch.get_num_threads()} thread(s), median of {args.rounds} round(s) after 1 warm-up")
    print(f"{'side':28s} {'ms/step':>9s} {'tokens/s':>10s}   runs (ms)")
    for name in runs:
        tok = f"{batch / med[name]:10.0f}" if name in tps else f"{'':10s}"
        print(f"{name:28s} {med[name] * 1e3:9.1f} {tok}   {' '.join(f'{t * 1e3:.0f}' for t in runs[name])}")
    print(f"(a) sparse vs dense-reference TopK: {tps['topk_sparse'] / tps['topk_dense_ref']:.2f}x "
          f"(goal >= {GOAL_SPARSE_VS_DENSE})")
    print(f"(b) useful FLOP/s {step_flops / 1e9:.1f} G vs bare matmuls {limit_flops / 1e9:.1f} G: "
          f"{step_flops / limit_flops:.2f} (goal >= {GOAL_FLOPS_FRACTION}); dense FLOPs actually executed "
          f"{dense_flops / 1e9:.1f} G/s vs bare forward matmul {fwd_limit / 1e9:.1f} G/s: {dense_flops / fwd_limit:.2f}")
    print(f"(c) Switch ({args.experts} experts) vs TopK: {tps['switch'] / tps['topk_sparse']:.2f}x "
          f"(goal >= {GOAL_SWITCH_VS_TOPK}); rows per expert in this batch: {routed.tolist()}")
    busy = load_before is not None and load_before > 1.0
    print(f"wall time {wall_s:.1f} s; load average {load_before:.2f} -> {load_after:.2f} on {usable_cores()} CPUs"
          if load_before is not None else f"wall time {wall_s:.1f} s")
    if busy:
        print("WARNING: the machine was busy with other work when the run started; the timings are noisy")
    print()

    common = {"batch": batch, "d_model": d, "n_latents": n, "k": k, "device": str(device),
              "threads": torch.get_num_threads(), "rounds": args.rounds, "quick": args.quick,
              "wall_s": round(wall_s, 1), "load_before": load_before, "load_after": load_after}
    ms = lambda name: [round(t * 1e3, 1) for t in runs[name]]  # noqa: E731
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
    sys.stdout.flush()
    for line in lines:
        print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
