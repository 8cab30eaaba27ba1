"""Latent-sharded training (sae_platform.latent_parallel) on 4 CPU processes (gloo, spawned once): every
variant with its latents split over 4 ranks (the Switch SAE's 8 experts two per rank: expert parallelism,
sae_platform.expert_parallel) equals one process at the same seed and global batch over 50 steps (loss
curve to float tolerance; L0 and dead fraction per metrics row exactly, as they are divided once from
integer counts summed over the ranks; final weights to float tolerance, dead-latent counters exactly);
so does a 2-D run of 2 data-parallel replicas x 2 latent shards; a TopK and a Switch run killed after a
checkpoint resume under another layout and end equal; a rank holds 1/R of one process's parameter and
Adam bytes. Also: the training step's torchrun path starts the latent ranks, and bad layouts are
refused."""

import dataclasses
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_trainer import SETTINGS, make_shuffled

from sae_platform.catalog import checkpoint_name
from sae_platform.errors import PlatformError
from sae_platform.latent_parallel import LatentShardedSAE, Layout, current_layout, state_bytes
from sae_platform.launch import launch_training
from sae_platform.sae import build_sae
from sae_platform.settings import SettingsError
from sae_platform.sharded_checkpoint import gathered_state
from sae_platform.storage import ArtifactStore
from sae_platform.trainer import TrainSettings, _optimizer, load_sae, train_sae

STEPS = 50
# Not a power of two: a shard's count / BATCH is then rounded, so an L0 summed from the shards' own
# divisions would differ from one process's in the last bits (the fault this module's L0 check catches).
BATCH = 200
# AuxK is on: 128 latents at k 2 and a latent silent for one batch is dead, so 5-30% of them are dead at
# any time and the sharded AuxK, dead counters and fired sets are compared too. One (sharded) checkpoint, at
# the end: what the comparison reads.
BASE = dataclasses.replace(SETTINGS, n_latents=128, k=2, batch_size=BATCH, dead_after_tokens=BATCH,
                           token_budget=BATCH * STEPS, checkpoint_every_tokens=BATCH * STEPS,
                           selection_precision="float32")
ROWS = {"n_partitions": 2, "rows": 1100}  # 1,688 training rows: 8 batches an epoch
VARIANTS = {
    "topk": BASE,
    "multi": dataclasses.replace(BASE, k=10, hparams={"multi_topk": True}),  # 4k = 40 > a shard's 32 latents
    "batchtopk": dataclasses.replace(BASE, variant="batchtopk"),
    "matryoshka": dataclasses.replace(BASE, variant="matryoshka_batchtopk"),
    "jumprelu": dataclasses.replace(BASE, variant="jumprelu", hparams={"target_l0": 8, "l0_coeff": 1.0}),
    "relu": dataclasses.replace(BASE, variant="relu"),
    # on paired rows [input 8 | output 8]: b_dec and W_skip replicated, AuxK against the target
    "skip_transcoder": dataclasses.replace(BASE, hparams={"skip_connection": True}),
    # 8 experts of 16 latents, 2 per rank; AuxK among the routed expert's dead latents
    "switch": dataclasses.replace(BASE, variant="switch", hparams={"n_experts": 8}),
}
PAIRED = {"skip_transcoder"}


def _store(root: str, name: str) -> ArtifactStore:
    """The store run ``name`` trains in: ``root``, or its twin of transcoder rows (made by ``trained``)."""
    return ArtifactStore(f"{root}-paired" if name in PAIRED else root)
RANKS = 4  # one spawn of 4 processes: the 2-D run (2 data replicas x 2 latent shards), then every variant on 4 shards
SHARDS = 4
GRID = dataclasses.replace(BASE, dead_after_tokens=10**9, world_size=RANKS, latent_parallel=2)
BYTES_SHAPE = {"d_model": 64, "n_latents": 1024}  # measured on a shard of a wider SAE than the runs
BYTES = {"topk": {"k": 4}, "switch": {"k": 4, "n_experts": 8}}  # the switch router (8 x 64) is replicated
# Killed after the checkpoint at step 25, then resumed under another layout: 1 process -> 4 shards, 4 -> 1
RESUMED = {name: dataclasses.replace(VARIANTS[name], checkpoint_every_tokens=BATCH * 25) for name in ("topk", "switch")}


class Killed(Exception):
    """Raised by every rank at step 30, after the checkpoint at step 25: a run that died."""


def _die_at_30(row: dict) -> None:
    if row["step"] == 30:
        raise Killed


def _killed(store, name: str, settings: TrainSettings) -> None:
    with pytest.raises(Killed):
        train_sae(store, "main", name, settings, log=lambda m: None, on_metrics=_die_at_30)


def _sharded(settings: TrainSettings) -> TrainSettings:
    return dataclasses.replace(settings, world_size=SHARDS, latent_parallel=SHARDS)


def _worker(rank: int, rendezvous: str, root: str, out: str) -> None:
    """One rank: the 2-D run, every variant sharded over all the ranks, then a shard's state bytes."""
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=RANKS)
    try:
        torch.set_num_threads(1)
        store = ArtifactStore(root)
        grid = train_sae(store, "main", "grid", GRID, log=lambda m: None)["history"]
        one_to_four = {}
        for name, settings in RESUMED.items():
            _killed(store, f"{name}-four-to-one", _sharded(settings))
            one_to_four[name] = train_sae(store, "main", f"{name}-one-to-four", _sharded(settings),
                                          log=lambda m: None)["resumed_from_step"]
        histories = {name: train_sae(_store(root, name), "main", f"{name}-sharded", _sharded(settings),
                                     log=lambda m: None)["history"] for name, settings in VARIANTS.items()}
        measured = {variant: _state_bytes(_sharded(BASE), current_layout(SHARDS), variant) for variant in BYTES}
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump({"grid": grid, "histories": histories, "bytes": measured, "one_to_four": one_to_four}, f)
    finally:
        dist.destroy_process_group()


def _state_bytes(settings: TrainSettings, layout=None, variant: str = "topk") -> int:
    """Parameter + buffer + Adam bytes after one step of a ``variant`` SAE of BYTES_SHAPE (a shard with
    ``layout``)."""
    torch.manual_seed(0)
    d, n = BYTES_SHAPE["d_model"], BYTES_SHAPE["n_latents"]
    sae = LatentShardedSAE(variant, d, n, layout, **BYTES[variant]) if layout else build_sae(variant, d, n,
                                                                                              **BYTES[variant])
    optimizer = _optimizer(sae, settings, torch.device("cpu"))
    x = torch.randn(32, d)
    sae.loss(x, sae(x))[0].backward()
    optimizer.step()
    return state_bytes(sae, optimizer)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The sharded runs (spawned ranks) and, meanwhile, the same runs in this one process."""
    root = tmp_path_factory.mktemp("latent_parallel")
    store = make_shuffled(ArtifactStore(str(root / "artifacts")), **ROWS)
    make_shuffled(_store(store.root_url, next(iter(PAIRED))), **ROWS, attrs={"d_in": 8})
    for name, settings in RESUMED.items():
        _killed(store, f"{name}-one-to-four", settings)  # the ranks resume it as 4 shards
    workers = mp.spawn(_worker, args=(str(root / "rendezvous"), store.root_url, str(root)), nprocs=RANKS, join=False)
    torch.set_num_threads(1)
    runs = {**VARIANTS, "grid": dataclasses.replace(GRID, world_size=1, latent_parallel=1)}
    one = {name: train_sae(_store(store.root_url, name), "main", f"{name}-one", settings, log=lambda m: None)
           for name, settings in runs.items()}
    while not workers.join():
        pass
    for name, settings in RESUMED.items():
        one[f"{name}-four-to-one"] = train_sae(store, "main", f"{name}-four-to-one", settings, log=lambda m: None)
    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in range(RANKS)]
    return store, one, ranks


def _assert_close(one: dict, sharded: dict, atol=5e-5):
    for name, tensor in one.items():
        other = sharded[name]
        assert other.shape == tensor.shape, name
        assert torch.allclose(tensor, other, atol=atol, rtol=1e-3), \
            f"{name} differs by {float((tensor - other).abs().max()):.3g}"


def _counters(store, run) -> torch.Tensor:
    from safetensors.torch import load

    path = store.resolve(checkpoint_name(run))
    return load(store.fs.cat_file(f"{path}/trainer_state.safetensors"))["tokens_since_fired"]


def _assert_same_run(store, one: dict, history: list[dict], one_name: str, sharded_name: str) -> None:
    """Loss curve, L0 and dead fraction per metrics row (those two exactly), final weights and dead counters."""
    assert len(history) == len(one["history"]) == STEPS // SETTINGS.log_every_steps
    for a, b in zip(one["history"], history, strict=True):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-3, abs=1e-6)
        assert (a["l0"], a["dead_fraction"]) == (b["l0"], b["dead_fraction"]), a["step"]
    weights, _ = load_sae(store, one_name)
    gathered = gathered_state(store, sharded_name, prefix="sae.")
    _assert_close(weights.state_dict(), {k.removeprefix("sae."): v for k, v in gathered.items()})
    counters = gathered_state(store, sharded_name, prefix="trainer.")["trainer.tokens_since_fired"]
    assert torch.equal(_counters(store, one_name), counters)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_latent_sharded_run_equals_one_process(trained, name):
    store, one, ranks = trained
    store = _store(store.root_url, name)
    assert store.pointer(checkpoint_name(f"{name}-sharded"))["sharded"] == {"n_latents": 128, "n_shards": SHARDS}
    history = ranks[0]["histories"][name]
    for other in ranks[1:]:  # every latent rank computes the same loss of the same summed reconstruction
        assert [row["loss"] for row in history] == [row["loss"] for row in other["histories"][name]]
    _assert_same_run(store, one[name], history, f"{name}-one", f"{name}-sharded")


def test_dead_latents_are_exercised(trained):
    """AuxK and the dead counters are compared above only if latents die during the runs."""
    _, one, _ = trained
    for name in ("topk", "batchtopk", "matryoshka", "switch"):
        assert any(row["dead_fraction"] > 0 for row in one[name]["history"]), name


def test_two_data_replicas_of_two_latent_shards_equal_one_process(trained):
    """A 2-D layout: 4 ranks, 2 data replicas x 2 latent shards. Every latent stays alive: AuxK
    normalises by each data replica's slice (sae_platform/distributed.py)."""
    store, one, ranks = trained
    assert store.pointer(checkpoint_name("grid"))["sharded"] == {"n_latents": 128, "n_shards": 2}
    _assert_same_run(store, one["grid"], ranks[0]["grid"], "grid-one", "grid")


@pytest.mark.parametrize("name", list(RESUMED))
def test_a_killed_run_resumes_under_another_layout_and_ends_equal(trained, name):
    """4 latent shards -> 1 process (read from the overlapping shards), 1 process -> 4 shards (the
    unsharded checkpoint sliced; a switch SAE's experts with their Adam state, its router replicated),
    both from the checkpoint at step 25: the same weights, Adam-driven over the 25 steps after it, as
    the uninterrupted one-process run."""
    store, one, ranks = trained
    four_to_one, one_to_four = f"{name}-four-to-one", f"{name}-one-to-four"
    assert one[four_to_one]["resumed_from_step"] == 25 and not store.pointer(checkpoint_name(four_to_one)).get(
        "sharded")
    assert all(rank["one_to_four"][name] == 25 for rank in ranks)
    weights = load_sae(store, f"{name}-one")[0].state_dict()
    _assert_close(weights, load_sae(store, four_to_one)[0].state_dict())
    gathered = gathered_state(store, one_to_four, prefix="sae.")
    _assert_close(weights, {k.removeprefix("sae."): v for k, v in gathered.items()})
    assert torch.equal(_counters(store, f"{name}-one"), _counters(store, four_to_one))
    assert torch.equal(_counters(store, f"{name}-one"), gathered_state(store, one_to_four, prefix="trainer.")[
        "trainer.tokens_since_fired"])


@pytest.mark.parametrize("variant", list(BYTES))
def test_a_shard_holds_one_over_r_of_the_parameter_and_adam_bytes(trained, variant):
    """A switch shard: its 2 of 8 experts' rows and Adam moments, beside the replicated router."""
    _, _, ranks = trained
    whole = _state_bytes(BASE, variant=variant)
    for rank in ranks:
        assert rank["bytes"][variant] / whole == pytest.approx(1 / SHARDS, rel=0.05), (rank["bytes"], whole)


def test_the_training_step_launches_the_latent_ranks_with_torchrun(store):
    """The path of the Dagster training step (launch_training -> torchrun -> run_rank): world_size ranks,
    latent_parallel of them per replica, each committing its shard."""
    make_shuffled(store, **ROWS)
    logs = []
    short = dataclasses.replace(BASE, token_budget=BATCH * 5, world_size=2, latent_parallel=2)
    result = launch_training(store, "main", "launched", short, "cpu", log=logs.append)
    assert result["steps"] == 5 and any("1 data-parallel x 2 latent-parallel on 2 ranks" in m and
                                         "--nproc_per_node 2" in m for m in logs)
    assert store.pointer(checkpoint_name("launched"))["sharded"] == {"n_latents": 128, "n_shards": 2}


def test_a_switch_shard_draws_one_process_experts_and_the_whole_router():
    """Built alone (no process group), each of 4 expert shards holds exactly one process's rows of its 2
    experts at the same seed and the whole router; its forward alone is refused (only the shards
    together are the SAE: sae_platform.expert_parallel)."""
    torch.manual_seed(3)
    whole = build_sae("switch", 8, 128, k=2, n_experts=8)
    for rank in range(4):
        torch.manual_seed(3)
        shard = LatentShardedSAE("switch", 8, 128, Layout(latent_parallel=4, latent_rank=rank), k=2, n_experts=8)
        assert shard.local.experts_held == range(2 * rank, 2 * rank + 2) and shard.local.expert_size == 16
        for name in ("W_enc", "W_dec", "b_enc"):
            assert torch.equal(getattr(shard.local, name), getattr(whole, name)[32 * rank:32 * (rank + 1)]), name
        assert torch.equal(shard.local.W_router, whole.W_router) and shard.config == whole.config
    with pytest.raises(PlatformError, match="holds experts 6..7 of 8 only"):
        shard.local(torch.randn(4, 8))


def test_layouts_that_cannot_run_are_refused_naming_the_fix():
    with pytest.raises(SettingsError, match="(?s)not divisible by latent_parallel 3.*n_latents a multiple"):
        TrainSettings(n_latents=64, world_size=3, latent_parallel=3)
    with pytest.raises(SettingsError, match="world_size 2 is not a multiple of latent_parallel 4"):
        TrainSettings(world_size=2, latent_parallel=4)
    with pytest.raises(SettingsError, match=r"(?s)n_experts 6 is not divisible by latent_parallel 4.*n_experts: 8"):
        TrainSettings(variant="switch", n_latents=96, world_size=4, latent_parallel=4, hparams={"n_experts": 6})
    with pytest.raises(SettingsError, match="(?s)n_experts 8 is not divisible by latent_parallel 16.*n_experts: 16"):
        TrainSettings(variant="switch", world_size=16, latent_parallel=16)  # the default 8 experts
    TrainSettings(variant="switch", world_size=4, latent_parallel=4)  # 2 of the default 8 experts per rank
    with pytest.raises(SettingsError, match="batch_size 255 is not divisible by the 2 data-parallel"):
        TrainSettings(batch_size=255, token_budget=1000, world_size=4, latent_parallel=2)
    TrainSettings(batch_size=255, token_budget=1000, world_size=2, latent_parallel=2)  # one replica: any batch
    assert os.environ.get("RANK") is None  # the checks run before any process group exists
