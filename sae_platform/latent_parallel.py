"""Latent-sharded SAE training: tensor parallelism over the dictionary's latents, composed with data
parallelism as a 2-D layout of ``data_parallel x latent_parallel`` ranks (docs/scale.md, "16M latents").

Why: a replicated rank holds the whole SAE, its gradients and Adam's two moments (16 bytes per
parameter): at 2^24 latents of a 4,096-wide model, 2 TiB, on no device. Sharding the latent axis
(Gao et al. 2024, "Scaling and evaluating sparse autoencoders", A.6) divides that by the latent
ranks R, and no latent gradient is ever all-reduced over them: each rank owns its rows.

Layout (``resources.training.config``: ``world_size`` W ranks, ``latent_parallel`` R of them per
latent group): a torch ``DeviceMesh`` of shape (W / R, R), dims ("data", "latent"); global rank
d * R + r is latent shard r of data replica d, so the R ranks of one latent group are adjacent
(one NVLink machine when R <= nproc_per_node). Each latent group reads one data-parallel slice of
the batch (``sae_platform.distributed``); the ranks of one data group hold the same shard and
average its gradients (``distributed.average_gradients`` over the data group).

A shard (``LatentShardedSAE``) of latent rank r holds rows [r * n / R, (r + 1) * n / R) of W_enc,
b_enc, W_dec (and JumpReLU's threshold), so its Adam state is the shard's too; b_pre (and a
transcoder's b_dec and W_skip, a switch SAE's router), the input / output scales and BatchTopK's
inference threshold are replicated. Its initial rows are the very rows one process draws at the same seed
(``sae.base.unit_rows``: per-block generators), drawn without the others.

One training step, per variant (every collective over the latent group):

* TopK (+ Multi-TopK): each rank picks its local top-w per row (w = k, or 4k for Multi-TopK); the
  values and global ids of every rank's candidates are all-gathered (B x w x 8 bytes from each rank:
  float32 value, int32 id) and every rank keeps the same global top-w (value, then the lower global
  id on an exact tie: torch.topk leaves that order unspecified in one process; exact float ties do
  not occur in practice). Each rank decodes only its winners; one all-reduce sums the partial
  reconstructions (Multi-TopK's 4k reconstruction rides in the same all-reduce). A shard narrower
  than w offers all its latents.
* BatchTopK / Matryoshka: each rank picks its local top k * B of the batch, the candidates
  (value, global flat id) are all-gathered and the batch-wide top k * B kept. Matryoshka's
  prefix groups [w_{j-1}, w_j) are over global ids: a shard decodes its winners of each group
  (zero for the groups it does not intersect) and one all-reduce of the [groups, B, d] partials
  gives every rank every prefix's reconstruction. The threshold's EMA is updated from the global
  selection, the same on every rank.
* AuxK: the same sharded top-k_aux among the (locally held) dead latents; its partial
  reconstructions are summed by a second all-reduce (AuxK's target is the main residual).
* ReLU / JumpReLU: elementwise, so the shard's codes are local; the partial reconstruction and
  the penalties' sums over latents (L1, L0; ``dense._DenseSAE._code``) are summed in one
  all-reduce, then JumpReLU's target_l0 term is taken of the global L0.
* Switch: expert parallelism (``sae_platform.expert_parallel``): n_experts divisible by R puts
  whole experts on each rank (the shard's latents are its experts'), the router is replicated;
  each rank encodes and decodes the rows routed to its experts, one all-reduce sums the partial
  reconstructions, and the router's gradient through the codes is summed over the latent group.

Statistics (the logged L0, AuxK's "any latent dead", the dead fraction) are summed over the latent
group as integer counts and divided once (``LatentShardedSAE.summed_counts``,
``sae.base.mean_active``), so they equal one process's exactly, not to float rounding.

Gradients: the summed reconstruction's gradient is the same on every latent rank, which is each
partial's gradient (backward of the sum is the identity); b_pre's gradient through the shards'
encoders is summed over the latent group in the backward pass (``_SharedByShards``); everything
replicated thus gets the same gradient on every latent rank, as in one process. Dead-latent
counters and fired masks are the shard's [n / R]; decoder renormalisation and removing the
gradient along decoder rows are per row, hence local.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from sae_platform.distributed import rank_and_world
from sae_platform.errors import PlatformError, require_counts
from sae_platform.expert_parallel import switch_forward
from sae_platform.sae import build_sae, variant_class
from sae_platform.sae.base import SAEOutput, _dense_stats, _sparse_stats
from sae_platform.sae.kernels import Pattern, _SelectedPre
from sae_platform.sae.topk import _aux_target, _auxk_loss, _batch_topk
from sae_platform.settings import SettingsError
from sae_platform.sharded_checkpoint import LatentLayout, sharded_commit, write_replicated, write_shard
from sae_platform.storage import ArtifactStore

SHARDED_VARIANTS = ("topk", "batchtopk", "matryoshka_batchtopk", "jumprelu", "relu", "switch")


def check_layout(variant: str, n_latents: int, world_size: int, latent_parallel: int, batch_size: int,
                 hparams: dict | None = None) -> None:
    """Refuse (SettingsError, naming the fix) a latent-parallel layout that cannot run: world_size
    not a multiple of latent_parallel, a switch SAE's n_experts (``hparams``, else its default) not
    divisible by it (each rank holds whole experts), n_latents not divisible by it (shards are
    equal, so the all-gathers are), batch_size not divisible by the data-parallel degree, or a
    variant without a sharded forward, or a count that is not a positive integer. A k wider than a
    shard is fine: that shard then offers all its latents."""
    where = "resources.training.config"
    require_counts({"n_latents": n_latents, "world_size": world_size, "latent_parallel": latent_parallel,
                    "batch_size": batch_size}, SettingsError, f"{where}.")
    if latent_parallel == 1:
        return
    if world_size % latent_parallel:
        raise SettingsError(f"{where}: world_size {world_size} is not a multiple of latent_parallel "
                            f"{latent_parallel} (world_size counts every rank: data_parallel x latent_parallel)",
                            f"set world_size to a multiple of {latent_parallel}, e.g. {latent_parallel}")
    if variant == "switch":
        _check_whole_experts({**variant_class(variant).DEFAULTS, **(hparams or {})}["n_experts"], latent_parallel)
    if n_latents % latent_parallel:
        raise SettingsError(f"{where}: n_latents {n_latents} is not divisible by latent_parallel {latent_parallel}: "
                            "every latent rank holds an equal shard",
                            f"use n_latents a multiple of {latent_parallel}, e.g. "
                            f"{n_latents // latent_parallel * latent_parallel + latent_parallel}")
    data_parallel = world_size // latent_parallel
    if batch_size % data_parallel:
        raise SettingsError(f"{where}: batch_size {batch_size} is not divisible by the {data_parallel} data-parallel "
                            f"replicas (world_size {world_size} / latent_parallel {latent_parallel})",
                            f"make batch_size a multiple of {data_parallel}")
    if variant not in SHARDED_VARIANTS:
        raise SettingsError(f"{where}: variant {variant} cannot be latent-sharded",
                            f"set latent_parallel: 1 for {variant} (data parallelism via world_size still "
                            f"applies), or use one of {', '.join(SHARDED_VARIANTS)}")


def _check_whole_experts(n_experts, latent_parallel: int) -> None:
    """SettingsError unless the n_experts of a switch SAE split evenly over the latent ranks (expert
    parallelism: ``sae_platform.expert_parallel``). A non-integer is left to build_sae's check."""
    if isinstance(n_experts, int) and not isinstance(n_experts, bool) and n_experts % latent_parallel:
        multiple = (n_experts // latent_parallel + 1) * latent_parallel
        raise SettingsError(f"resources.training.config: a switch SAE's n_experts {n_experts} is not divisible by "
                            f"latent_parallel {latent_parallel}: expert parallelism puts whole experts on each latent "
                            "rank", f"use hparams: {{n_experts: {multiple}}} (a multiple of {latent_parallel}, and "
                            f"n_latents a multiple of it), or a latent_parallel that divides {n_experts}")


@dataclass(frozen=True)
class Layout:
    """This rank's place in the (data_parallel, latent_parallel) mesh and the two process groups
    (None: the default group, or no group at all when one process)."""

    data_parallel: int = 1
    latent_parallel: int = 1
    data_rank: int = 0
    latent_rank: int = 0
    data_group: object | None = None
    latent_group: object | None = None

    def __post_init__(self):
        require_counts({"data_parallel": self.data_parallel, "latent_parallel": self.latent_parallel})

    def shard(self, n_latents: int) -> range:
        """The global latent ids this rank holds: [r * n / R, (r + 1) * n / R)."""
        width = n_latents // self.latent_parallel
        return range(self.latent_rank * width, (self.latent_rank + 1) * width)


def current_layout(latent_parallel: int, device: torch.device | str = "cpu") -> Layout:
    """The layout of this process inside the current process group (sae_platform.launch joins it):
    with latent_parallel 1 the data group is the whole world, as before latent sharding existed.
    Raises PlatformError when latent_parallel is not a positive integer or the world size is not a
    multiple of it."""
    require_counts({"latent_parallel": latent_parallel})
    rank, world = rank_and_world()
    if latent_parallel == 1:
        return Layout(data_parallel=world, data_rank=rank)
    if world % latent_parallel:
        raise PlatformError(f"{world} ranks cannot form latent groups of {latent_parallel}",
                            "launch world_size = data_parallel x latent_parallel ranks (sae_platform.launch)")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(torch.device(device).type, (world // latent_parallel, latent_parallel),
                            mesh_dim_names=("data", "latent"))
    return Layout(world // latent_parallel, latent_parallel, mesh.get_local_rank("data"),
                  mesh.get_local_rank("latent"), mesh.get_group("data"), mesh.get_group("latent"))


class _SumOverShards(torch.autograd.Function):
    """Forward: the sum of every latent rank's partial tensor (one all-reduce). Backward: the
    identity, since every latent rank computes the same loss of the same sum, so the sum's gradient,
    present on each rank, is each partial's."""

    @staticmethod
    def forward(ctx, partial, group):
        total = partial.contiguous().clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SharedByShards(torch.autograd.Function):
    """A replicated tensor read by every shard's encoder (b_pre): forward the identity, backward the
    sum over the latent group of the shards' gradients (each shard sees only its latents' part)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class LatentShardedSAE(nn.Module):
    """One latent rank's shard of an SAE (see the module docstring), behind the interface the trainer
    uses: forward (training mode), loss, param_groups, calibrate_, normalize_decoder_,
    remove_parallel_grad_, training_warning, config.

    ``local`` is a model of the variant over the shard's n / R latents holding this rank's rows; its
    state_dict keys are the one-process model's, its tensors the shard's rows (what a sharded
    checkpoint stores). ``config`` is the whole SAE's (global n_latents and hyper-parameters).
    A switch SAE's ``local`` is an expert shard (``SwitchSAE`` with ``whole_n_latents``): this rank's
    whole experts and the whole router (``sae_platform.expert_parallel``).
    Raises PlatformError for a variant without a sharded forward, the hyper-parameter errors of
    ``build_sae`` at the global size (checked on the meta device: nothing allocated), or a switch
    SAE whose n_experts do not split evenly over the latent ranks."""

    def __init__(self, variant: str, d_model: int, n_latents: int, layout: Layout, device=None,
                 dtype=torch.float32, **hparams):
        super().__init__()
        if variant not in SHARDED_VARIANTS:
            raise PlatformError(f"variant {variant} has no latent-sharded forward",
                                f"train it with latent_parallel 1, or use one of {', '.join(SHARDED_VARIANTS)}")
        whole = build_sae(variant, d_model, n_latents, device="meta", dtype=dtype, **hparams)  # draws nothing
        self.layout, self.rows, self.n_latents = layout, layout.shard(n_latents), n_latents
        self.variant, self.config_ = variant, whole.config
        local_hparams = dict(whole.hparams)
        if variant == "matryoshka_batchtopk":  # a shard's own widths would not be the SAE's prefixes
            local_hparams["matryoshka_widths"] = None
        extra = {key: value for key, value in hparams.items() if key in ("d_out", "skip_connection")}
        if variant == "switch":  # an expert shard: whole experts of the whole dictionary, the whole router
            extra["whole_n_latents"] = n_latents
        self.local = type(whole)(d_model, len(self.rows), device=device, dtype=dtype, first_latent=self.rows.start,
                                 **extra, **local_hparams)
        self.local.hparams.update({k: v for k, v in whole.hparams.items() if k != "k_aux"})  # k_aux: the shard's

    # --- what the trainer calls ------------------------------------------------------------

    @property
    def config(self) -> dict:
        """The whole SAE's config (build_sae(**config) builds it unsharded)."""
        return self.config_

    @property
    def selection_dtype(self):
        return self.local.selection_dtype

    @selection_dtype.setter
    def selection_dtype(self, dtype) -> None:
        self.local.selection_dtype = dtype

    @property
    def hparams(self) -> dict:
        return self.local.hparams

    def calibrate_(self, sample: Tensor, target: Tensor | None = None) -> None:
        """As ``SparseAutoencoder.calibrate_``: the replicated scales and biases, from the same sample
        on every rank, so they are equal everywhere."""
        self.local.calibrate_(sample, target)

    def param_groups(self, lr: float) -> list[dict]:
        return self.local.param_groups(lr)

    def loss(self, x: Tensor, out: SAEOutput):
        """As ``SparseAutoencoder.loss``: out.recon and out.parts are the whole SAE's on every rank."""
        return self.local.loss(x, out)

    def normalize_decoder_(self) -> None:
        self.local.normalize_decoder_()

    def remove_parallel_grad_(self) -> None:
        self.local.remove_parallel_grad_()

    def training_warning(self, l0: float) -> str | None:
        """The shard's own check (JumpReLU: its thresholds stalled); called on rank 0 only, so it
        reads rank 0's shard, a sample of 1 / R of the latents."""
        return self.local.training_warning(l0)

    def summed_counts(self, active: Tensor, dead_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """(active (row, latent) pairs of the whole SAE, its dead latents), int64 scalars, from this
        shard's count ``active`` and its dead mask [n / R] (None: 0 dead): one all-reduce of integers
        over the latent group, so every statistic divided from them (L0: ``sae.base.mean_active``,
        the dead fraction) is one process's exactly. A collective: every latent rank calls it."""
        dead = active.new_zeros(()) if dead_mask is None else dead_mask.sum().to(active)
        counts = torch.stack([active.detach(), dead])
        dist.all_reduce(counts, group=self.layout.latent_group)
        return counts[0], counts[1]

    def dead_count(self, dead: Tensor) -> int:
        """The number of *all* latents dead, from this shard's mask ``dead`` [n / R] (a collective:
        every latent rank calls it)."""
        return int(self.summed_counts(dead.new_zeros((), dtype=torch.int64), dead)[1])

    # --- the sharded forward -------------------------------------------------------------------

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, target: Tensor | None = None) -> SAEOutput:
        """x [batch, d_model] raw (the same rows on every rank of the latent group) -> SAEOutput with
        recon [batch, d_out] raw and l0 of the whole SAE, fired [n / R] of this shard; dead_mask: the
        shard's [n / R]. Training mode only (evaluation reads a gathered or sharded checkpoint).
        Raises PlatformError in eval mode or on a wrong width."""
        if not self.training:
            raise PlatformError("a latent shard runs training steps only",
                                "evaluate the checkpoint (load_sae), not the shard")
        if self.variant in ("relu", "jumprelu"):
            return self._dense_forward(x, target)
        if self.variant == "switch":
            return switch_forward(self, x, dead_mask)
        return self._topk_family_forward(x, dead_mask, target)

    def _sum(self, partial: Tensor) -> Tensor:
        return _SumOverShards.apply(partial, self.layout.latent_group)

    def _share(self, tensor: Tensor) -> Tensor:
        """``tensor``, replicated on every latent rank and read by each shard's part of the SAE
        (b_pre, a switch router's probabilities): its gradient is summed over the latent group."""
        return _SharedByShards.apply(tensor, self.layout.latent_group)

    def _gather(self, tensor: Tensor) -> Tensor:
        """[R, *tensor.shape]: every latent rank's ``tensor``, in rank order (= global id order)."""
        parts = [torch.empty_like(tensor) for _ in range(self.layout.latent_parallel)]
        dist.all_gather(parts, tensor.contiguous(), group=self.layout.latent_group)
        return torch.stack(parts)

    def _global_top(self, vals: Tensor, ids: Tensor, width: int, id_bound: int) -> tuple[Tensor, Tensor]:
        """Every rank's candidates (vals, global ids < ``id_bound``) [batch, w] (or [w] for the
        batch-wide pick) -> the top ``width`` of their union along the last axis, sorted by value
        (descending), then id (ascending) on an exact tie; the same on every rank. Ids travel as int32
        when they fit (a TopK candidate: 8 bytes with its float32 value, docs/scale.md)."""
        wire = torch.int32 if id_bound <= torch.iinfo(torch.int32).max else torch.int64
        vals = torch.cat(self._gather(vals).unbind(0), dim=-1)
        ids = torch.cat(self._gather(ids.to(wire)).unbind(0), dim=-1).long()
        by_id = ids.argsort(dim=-1)
        vals, ids = vals.gather(-1, by_id), ids.gather(-1, by_id)
        vals, pick = vals.sort(dim=-1, descending=True, stable=True)
        return vals[..., :width], ids.gather(-1, pick[..., :width])

    def _own(self, rows: Tensor, ids: Tensor, vals: Tensor, xs: Tensor, b_pre: Tensor):
        """The entries (rows, global ids, pre-activation values, all [m]) this shard holds, made
        differentiable: (local pattern, codes [nnz] after ReLU, which of the m entries they are)."""
        mine = (ids >= self.rows.start) & (ids < self.rows.stop)
        local = self.local
        pattern = Pattern.from_rows(rows[mine], ids[mine] - self.rows.start, xs.shape[0], len(self.rows))
        z = _SelectedPre.apply(xs, b_pre, local.W_enc, local.b_enc, vals[mine], pattern).relu()
        return pattern, z, mine

    def _regular_top(self, scanned: tuple[Tensor, Tensor], width: int, xs: Tensor, b_pre: Tensor):
        """Per-row global top ``width`` from each shard's scan (vals, local ids) [batch, w]:
        (local pattern, codes, position of each local entry in its row's sorted top)."""
        vals, ids = self._global_top(scanned[0], scanned[1] + self.rows.start, width, self.n_latents)
        rows = torch.arange(xs.shape[0], device=xs.device).repeat_interleave(width)
        position = torch.arange(width, device=xs.device).repeat(xs.shape[0])
        pattern, z, mine = self._own(rows, ids.reshape(-1), vals.reshape(-1), xs, b_pre)
        return pattern, z, position[mine]

    def _batch_top(self, xs: Tensor, scanned: tuple[Tensor, Tensor], total: int, b_pre: Tensor):
        """BatchTopK's batch-wide top ``total`` over the shards: (local pattern, codes, the global
        selected values, sorted row-major)."""
        batch, n_local, local = xs.shape[0], len(self.rows), self.local
        full_pre = lambda: F.linear(xs - local.b_pre, local.W_enc, local.b_enc)  # noqa: E731
        vals, flat = _batch_topk(*scanned, min(total, batch * n_local), n_local, full_pre)
        ids = (flat // n_local) * self.n_latents + flat % n_local + self.rows.start  # global flat ids
        vals, ids = self._global_top(vals, ids, total, batch * self.n_latents)
        ids, order = ids.sort()  # row-major, as CSR needs
        vals = vals[order]
        pattern, z, _ = self._own(ids // self.n_latents, ids % self.n_latents, vals, xs, b_pre)
        return pattern, z, vals

    def _topk_family_forward(self, x: Tensor, dead_mask: Tensor | None, target: Tensor | None) -> SAEOutput:
        local, hp, n_local = self.local, self.config, len(self.rows)
        xs = local._normalize(x)
        ys = local._target(xs, target)
        b_pre = self._share(local.b_pre)
        k, batch = hp["k"], xs.shape[0]
        partials, widths = [], []
        if self.variant == "topk":
            width = min(4 * k, self.n_latents) if hp["multi_topk"] else k
            vals, ids, aux = local._scan(xs, min(width, n_local), dead_mask)
            pattern, z, position = self._regular_top((vals, ids), width, xs, b_pre)
            if hp["multi_topk"]:  # the wide code is sorted: its first k per row are the top k
                wide, z_wide, top = pattern, z, position < k
                pattern, z = Pattern.from_rows(wide.rows[top], wide.cols[top], batch, n_local), z_wide[top]
            partials.append(local._sparse_decode(pattern, z))
            if hp["multi_topk"] and ys is not None:
                partials.append(local._sparse_decode(wide, z_wide))
        else:
            per_row = min(n_local, hp["candidates_per_k"] * k)
            vals, ids, aux = local._scan(xs, per_row, dead_mask)
            pattern, z, selected = self._batch_top(xs, (vals, ids), k * batch, b_pre)
            local._update_threshold(selected)
            widths = hp["matryoshka_widths"] if self.variant == "matryoshka_batchtopk" else [self.n_latents]
            partials.extend(self._group_decodes(pattern, z, widths))
        total, offset = self._sum(torch.stack(partials)), local._offset(xs)
        parts = {}
        if self.variant == "topk":
            recon_n = total[0] + offset
            if len(partials) > 1:
                parts["multi_topk"] = (total[1] + offset - ys).pow(2).mean()
        else:
            recon_n, inner = offset, []
            for group, width in zip(total, widths, strict=True):
                recon_n = recon_n + group
                if width < self.n_latents and ys is not None:
                    inner.append((recon_n - ys).pow(2).mean())
            if inner:
                parts["matryoshka"] = sum(inner)
        active, fired = _sparse_stats(pattern, z)
        active, dead = self.summed_counts(active, dead_mask)
        if aux is not None and ys is not None:
            parts["auxk"] = self._aux_part(xs, ys, recon_n, aux, dead > 0, b_pre)
        return SAEOutput.counted(local._to_raw(recon_n), active, fired, parts, sparse=(pattern, z))

    def _group_decodes(self, pattern: Pattern, z: Tensor, widths: list[int]) -> list[Tensor]:
        """The shard's decode of its selected latents in each prefix group [w_{j-1}, w_j) (global ids):
        [groups] tensors [batch, d_out], zero for a group the shard does not intersect."""
        ids, lo, out = pattern.cols + self.rows.start, 0, []
        for hi in widths:
            keep = (ids >= lo) & (ids < hi)
            group = Pattern.from_rows(pattern.rows[keep], pattern.cols[keep], pattern.batch, len(self.rows))
            out.append(self.local._sparse_decode(group, z[keep]))
            lo = hi
        return out

    def _aux_part(self, xs, ys, recon_n, aux, any_dead, b_pre) -> Tensor:
        """AuxK over the shards: the global top k_aux among the dead latents model the residual."""
        k_aux = min(self.config["k_aux"], self.n_latents)
        pattern, z, _ = self._regular_top(aux, k_aux, xs, b_pre)
        aux_recon = self._sum(self.local._sparse_decode(pattern, z))
        return _auxk_loss(aux_recon, _aux_target(ys, recon_n), any_dead)

    def _dense_forward(self, x: Tensor, target: Tensor | None) -> SAEOutput:
        local = self.local
        xs = local._normalize(x)
        b_pre = self._share(local.b_pre)
        z, sums = local._code(F.linear(xs - b_pre, local.W_enc, local.b_enc))
        partial = z @ local.W_dec
        names = sorted(sums)
        total = self._sum(torch.cat([partial.reshape(-1), torch.stack([sums[n] for n in names])]))
        recon_n = total[:partial.numel()].view_as(partial) + local._offset(xs)
        parts = local._penalties(dict(zip(names, total[partial.numel():], strict=True)))
        active, fired = _dense_stats(z)
        active, _ = self.summed_counts(active, None)
        return SAEOutput.counted(local._to_raw(recon_n), active, fired, parts, dense=z)


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes this process holds of the model's parameters and buffers and the optimizer's state
    tensors (Adam: two moments per parameter): what latent sharding divides."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def commit_shards(store: ArtifactStore, name: str, sae: LatentShardedSAE, tensors: dict[str, Tensor],
                  json_files: dict[str, bytes], **pointer_info) -> None:
    """Commit a checkpoint of artifact ``name`` written in shards (``sharded_checkpoint``): every rank
    calls this; the latent ranks of data replica 0 each write their shard of ``tensors`` (this rank's
    ``sharded_checkpoint.training_tensors``), global rank 0 also the replicated tensors and
    ``json_files`` ({file name: bytes}), writes the index and commits with ``pointer_info``. The other
    replicas hold the same shards and write nothing. No process gathers the SAE."""
    layout = sae.layout
    if layout.data_rank != 0:
        return
    shards = LatentLayout(sae.n_latents, layout.latent_parallel)
    root = layout.latent_rank == 0

    def share(path: str | None) -> str:
        box = [path]
        dist.broadcast_object_list(box, group_src=0, group=layout.latent_group)
        return box[0]

    with sharded_commit(store, name, sae.variant, shards, root=root, share=share,
                        wait=lambda: dist.barrier(group=layout.latent_group), **pointer_info) as version:
        write_shard(store, version, sae.variant, shards, layout.latent_rank, tensors)
        if root:
            write_replicated(store, version, sae.variant, tensors)
            for file, content in json_files.items():
                store.fs.pipe_file(f"{version}/{file}", content)


def agreed_non_finite(bad: list[str]) -> list[str]:
    """The names holding NaN/inf on any rank (``bad``: this rank's), the same list on every rank, so
    that all refuse a checkpoint together (a collective over the world)."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, bad)
    return sorted({name for names in everyone for name in names})
