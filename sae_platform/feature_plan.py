"""How many feature shards: the feature tables' plan (docs/design.md, "Feature tables, context
windows, browser"; docs/scale.md, "Feature tables").

Pure arithmetic on the SAE's width, the feature settings, the tokens of one activation batch and
a memory budget per job; it reads and writes nothing (like ``shuffle_plan``; the pipeline's one
call is ``feature_layout.plan_layout``). Pass 1 runs per activation batch, the batch encoded once
and then each shard's partial from its own codes in turn; pass 2 and the stages after it run per
shard group, each of its shards in turn; at any time a job holds the state, partial and merge
buffers of ONE shard's latents plus that shard's share of a batch's sparse codes, so its memory is

    fixed + latents_per_shard * bytes_per_latent + batch_tokens * k * CODE_ENTRY_BYTES / n_shards

and the planner picks the fewest shards that keep it within the budget. The shard count is a
multiple of ``n_groups``, the pipeline's fixed number of shard GROUPS (``catalog.N_FEATURE_SHARDS``,
its static Dagster partitions): group g runs shards g, g + n_groups, g + 2 n_groups, ... one after
the other, so every group gets the same number of shards and an SAE small enough for one shard per
group keeps today's layout (shard i = group i).

What a job does not hold: every other shard's state, and in pass 1 the SAE (a shard's pass 1
reads its codes, committed by the batch's one encode). Pass 2 of a TopK-style SAE reads only its
shard's decoder rows, by slice from the checkpoint (``sharded_checkpoint.decoder_rows``, for the
logit effects): ``weight_bytes_per_latent`` (d_model x 4 B); a dense variant's jobs read their
shard's encoder rows too, to encode its rows (``latent_slice``). ``sae_bytes`` plans a job that
loads the whole SAE (none of the pipeline's shard jobs now).
"""

import math
from dataclasses import dataclass

from sae_platform.errors import PlatformError, require_counts

# Per latent (sae_platform/features.py): a Partial's arrays, top_act f4 + top_row i8 per top-k
# slot, res_key i8 + res_row i8 + res_act f4 per reservoir slot, count i8 + sum f8 + max f4,
# hist i8 per histogram bin: a partial in memory (full rows). A partial holds only the latents that
# fired in its batch; the plan counts every latent of the shard (a batch can fire them all).
TOP_SLOT_BYTES, RES_SLOT_BYTES, SCALAR_BYTES, HIST_BIN_BYTES = 12, 20, 20, 8
# _ShardState per latent: two selectors (an int64 [features, 2m] slot buffer each, key and slot),
# fill and threshold per selector, count / sum / max, the histogram and the witness flag.
STATE_SLOT_BYTES, STATE_SCALAR_BYTES = 16, 2 * 16 + 20 + 1
# Pass 2 folds each partial's rows into the shard's merge state (feature_merge._fold: the state, the
# partial and their union's temporaries; the most when every latent fired), then builds the examples table (one
# row per top, random and interval example) and its sorted copy; the pass-1 job holds its state while
# it builds the partial: the larger of the two bounds a job.
MERGE_COPIES = 3
# Bytes per example row while pass 2 builds the examples table, measured: benchmarks/feature_shards.py's
# pass-2 job peaked at 2,453 MiB for 65,536 latents (240 example rows each at the defaults), of
# which ~350 MiB the interpreter and 512 MiB the SAE it loads (d_model 64): 1,591 MiB, 25.4 kB per
# latent, less 3 partials (14.4 kB) = 46 B per example row.
EXAMPLE_ROW_BYTES = 46
# One stored code of a shard: row int32 + latent int32 + value float32, read back into int64 /
# float32 tensors while pass 1 replays them (12 B on disk, 20 B in torch, both alive at once).
CODE_ENTRY_BYTES = 12 + 20
# A job's memory before any shard: the interpreter with torch, numpy, polars and the store client.
FIXED_JOB_BYTES = 400 << 20


class FeaturePlanError(PlatformError):
    """A feature-shard plan that cannot be met (a budget below one latent's job)."""


@dataclass(frozen=True)
class FeatureShardPlan:
    """How the latents are cut into feature shards, and what one shard's job holds (bytes)."""

    n_latents: int
    n_shards: int
    n_groups: int
    bytes_per_latent: int
    batch_code_bytes: int  # one activation batch's sparse codes, all shards
    memory_budget_bytes: int
    sae_bytes: int = 0  # SAE weights every shard job loads whatever its shard (the whole SAE)

    @property
    def shards_per_group(self) -> int:
        return self.n_shards // self.n_groups

    @property
    def latents_per_shard(self) -> int:
        """The widest shard's latents (``features.feature_shards`` sizes differ by at most one)."""
        return -(-self.n_latents // self.n_shards)

    def group_shards(self, group: int) -> list[int]:
        """The shards group ``group`` runs one after the other: group, group + n_groups, …"""
        if not 0 <= group < self.n_groups:
            raise FeaturePlanError(f"shard group {group} is outside [0, {self.n_groups})",
                                   f"use a group between 0 and {self.n_groups - 1}")
        return list(range(group, self.n_shards, self.n_groups))

    def describe(self) -> dict:
        """The layout as recorded with the tables and in the stages' metadata (JSON-ready)."""
        return {"n_shards": self.n_shards, "n_groups": self.n_groups, "shards_per_group": self.shards_per_group,
                "latents_per_shard": self.latents_per_shard, "job_bytes": self.job_bytes,
                "memory_budget_bytes": self.memory_budget_bytes}

    @property
    def job_bytes(self) -> int:
        """The planned peak of one shard's job (pass 1 of one batch, or pass 2)."""
        return (FIXED_JOB_BYTES + self.sae_bytes + self.latents_per_shard * self.bytes_per_latent
                + -(-self.batch_code_bytes // self.n_shards))


def partial_bytes_per_latent(top_k: int, reservoir_size: int, n_hist_bins: int) -> int:
    """Bytes of one latent's pass-1 partial in memory (``features.Partial``'s arrays, full rows); the
    stored one holds only its filled slots (``partial_store``), so at most this."""
    return top_k * TOP_SLOT_BYTES + reservoir_size * RES_SLOT_BYTES + SCALAR_BYTES + n_hist_bins * HIST_BIN_BYTES


def stored_partials_bytes(n_latents: int, n_entries: int, top_k: int, reservoir_size: int, n_hist_bins: int) -> int:
    """At most the bytes of one batch's stored partials (``partial_store``'s filled-slots layout) over
    ``n_latents`` latents, the batch having ``n_entries`` activating (token, latent) entries: per
    fired latent its id, count / sum / max and histogram bitmask; of the slots, each latent's full
    rows or each entry's one top-k slot, reservoir slot and nonzero bin, whichever totals fewer. A
    bound, since which latents fill their rows depends on the data (npz headers and the exactness
    witness, every entry of ``check_features`` latents a shard, not counted)."""
    per_latent = 8 + SCALAR_BYTES + -(-n_hist_bins // 8)
    full_rows = top_k * TOP_SLOT_BYTES + reservoir_size * RES_SLOT_BYTES + n_hist_bins * HIST_BIN_BYTES
    per_entry = TOP_SLOT_BYTES + RES_SLOT_BYTES + HIST_BIN_BYTES
    return min(n_latents, n_entries) * per_latent + min(n_latents * full_rows, n_entries * per_entry)


def state_bytes_per_latent(top_k: int, reservoir_size: int, n_hist_bins: int) -> int:
    """Bytes of one latent's streaming pass-1 state (``features._ShardState``)."""
    return STATE_SLOT_BYTES * (top_k + reservoir_size) + STATE_SCALAR_BYTES + n_hist_bins * HIST_BIN_BYTES


def job_bytes_per_latent(top_k: int, reservoir_size: int, n_hist_bins: int, interval_examples: int = 20) -> int:
    """What one latent costs a shard's job at its peak: pass 1's state and partial together, or
    pass 2's fold (``MERGE_COPIES`` partials) plus its examples table (top_k + reservoir_size +
    ``interval_examples`` rows of ``EXAMPLE_ROW_BYTES``), whichever is larger."""
    partial = partial_bytes_per_latent(top_k, reservoir_size, n_hist_bins)
    examples = (top_k + reservoir_size + interval_examples) * EXAMPLE_ROW_BYTES
    return max(state_bytes_per_latent(top_k, reservoir_size, n_hist_bins) + partial, MERGE_COPIES * partial + examples)


def plan_feature_shards(n_latents: int, *, top_k: int, reservoir_size: int, n_hist_bins: int, batch_tokens: int,
                        k: int, memory_budget_bytes: int, n_groups: int, sae_bytes: int = 0,
                        weight_bytes_per_latent: int = 0, interval_examples: int = 20) -> FeatureShardPlan:
    """The fewest feature shards (a multiple of ``n_groups``) whose jobs each fit
    ``memory_budget_bytes``: ``FeatureShardPlan.job_bytes`` <= budget.

    ``batch_tokens``: rows of the largest activation batch; ``k``: codes per row (the SAE's k; a
    dense variant's mean active latents). The SAE's weights, in the jobs that load them (pass 2:
    the interval examples and logit effects): ``sae_bytes`` when a job loads the whole SAE (as
    ``load_sae`` does today), ``weight_bytes_per_latent`` when it reads only its shard's rows
    (a latent-sharded checkpoint). ``interval_examples``: interval example rows per latent
    (n_intervals x per_interval). Raises FeaturePlanError naming the budget when even one latent
    per shard does not fit, or for non-positive sizes."""
    require_counts({"n_latents": n_latents, "n_groups": n_groups, "top_k": top_k, "reservoir_size": reservoir_size,
                    "n_hist_bins": n_hist_bins}, FeaturePlanError)
    per_latent = (job_bytes_per_latent(top_k, reservoir_size, n_hist_bins, interval_examples)
                  + int(weight_bytes_per_latent))
    codes = max(0, int(batch_tokens)) * max(0, int(k)) * CODE_ENTRY_BYTES
    room = int(memory_budget_bytes) - FIXED_JOB_BYTES - int(sae_bytes)
    smallest = FIXED_JOB_BYTES + int(sae_bytes) + per_latent  # one latent per shard: the floor
    if room <= per_latent:
        raise FeaturePlanError(f"a feature-shard job budget of {_mib(memory_budget_bytes)} leaves no room for one "
                               f"latent's state ({per_latent} B) beyond the job's fixed {_mib(FIXED_JOB_BYTES)} "
                               f"and the {_mib(sae_bytes)} of SAE weights every job loads",
                               "raise the job memory budget (resources.features.config.memory_budget_bytes) well "
                               f"above {_mib(smallest)}, or "
                               "read the SAE shard by shard (weight_bytes_per_latent instead of sae_bytes)")
    n_shards = max(1, math.ceil((n_latents * per_latent + codes) / room))
    n_shards = n_groups * math.ceil(n_shards / n_groups)
    while True:
        plan = FeatureShardPlan(n_latents, n_shards, n_groups, per_latent, codes, int(memory_budget_bytes),
                                int(sae_bytes))
        if plan.job_bytes <= memory_budget_bytes:  # the ceilings of uneven shards can overshoot by a latent
            return plan
        n_shards += n_groups  # terminates: both shares shrink towards 0 < room - per_latent


def _mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.0f} MiB"
