"""The shuffle's plan: how many passes, and how much each job may hold (docs/design.md, "The shuffle").

Pure arithmetic on the data's size, the row size, K buckets, the memory budget M and N first-pass
jobs; it reads and writes nothing. With job memory M and K buckets, P passes (the final in-memory
one included) shuffle M, K·M, K²·M, ... ``sae_platform.shuffle`` pins a plan to its inputs and runs it.
"""

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from sae_platform.errors import StorageError, require_counts

ID_BYTES = 8
FINAL_SHARE = 0.7  # of the budget, for a final bucket and its permutation; the rest for reading/writing
SIGMAS = 6  # bucket sizes are random: plan for the mean plus 6 standard deviations
OUTPUT_CHUNK_BYTES = 4 << 20
MIN_GOOD_FILE_BYTES = 4 << 20  # smaller (job, bucket) files cost throughput (docs/design.md, "The shuffle")
MAX_PASSES = 6


@dataclass(frozen=True)
class ShufflePlan:
    """How many passes, and how much each job may hold; derived from sizes and the budget only."""

    n_rows: int
    row_bytes: int  # activation bytes per row; the id adds ID_BYTES on disk
    n_buckets: int  # K
    memory_budget_bytes: int  # M, per job
    n_jobs: int  # N: jobs of the first scatter pass
    n_passes: int  # P, the final in-memory shuffle included
    block_rows: int  # rows a scatter job reads at once
    chunk_rows: int  # rows per chunk of the shuffled output
    warnings: tuple[str, ...] = ()

    @property
    def record_bytes(self) -> int:
        return self.row_bytes + ID_BYTES

    @property
    def n_final_buckets(self) -> int:
        return self.n_buckets ** (self.n_passes - 1)

    def jobs_in_pass(self, pass_index: int) -> int:
        """Scatter pass 1 splits the input N ways; later passes run one job per bucket."""
        if not 1 <= pass_index <= self.n_passes:
            raise StorageError(f"pass {pass_index} does not exist: the plan has passes 1..{self.n_passes}",
                               "use a pass index from the plan (ShufflePlan.n_passes)")
        if pass_index == self.n_passes:
            return self.n_final_buckets
        return self.n_jobs if pass_index == 1 else self.n_buckets ** (pass_index - 1)


def plan_shuffle(n_rows: int, row_bytes: int, n_buckets: int, memory_budget_bytes: int, n_jobs: int,
                 input_chunk_rows: int = 1) -> ShufflePlan:
    """Fewest passes such that every final bucket fits in memory: P with n ≤ cap·K^(P-1).

    cap is what one job can shuffle in memory; random bucket sizes get a 6-sigma margin. Raises
    StorageError naming the count when one is not a positive integer (no rows: cache some first).
    """
    require(n_rows >= 1, "there are no rows to shuffle", "cache some activations first")
    require_counts({"row_bytes": row_bytes, "input_chunk_rows": input_chunk_rows}, StorageError)
    require(n_buckets >= 2, f"n_buckets={n_buckets}: a scatter pass needs at least 2 buckets", "use n_buckets >= 2")
    require(n_jobs >= 1, f"n_jobs={n_jobs}: at least one job must run", "use n_jobs >= 1")
    record = row_bytes + ID_BYTES
    budget = int(memory_budget_bytes)
    # Scatter holds the block it read and the read's chunk buffers, two buffers of gathered rows
    # (one being written), plus ids, bucket numbers and the sort order.
    per_row = 4 * record + 32
    block_rows = budget // per_row
    if block_rows < input_chunk_rows:
        raise StorageError(
            f"memory budget {mib(budget)} cannot hold one input chunk ({input_chunk_rows} rows x {record} B) "
            f"four times over, which a scatter job needs",
            f"raise memory_budget_bytes to at least {mib(per_row * input_chunk_rows)}")
    block_rows -= block_rows % input_chunk_rows
    chunk_rows = max(1, min(OUTPUT_CHUNK_BYTES, budget // 16) // row_bytes)
    bucket_rows = final_bucket_rows(budget, row_bytes)
    if bucket_rows < 1:
        raise StorageError(f"memory budget {mib(budget)} cannot hold even one row in memory",
                           f"raise memory_budget_bytes well above {mib(2 * (record + 8))}")
    n_passes = 1
    while not _fits(n_rows / n_buckets ** (n_passes - 1), bucket_rows, random=n_passes > 1):
        n_passes += 1
        if n_passes > MAX_PASSES:
            raise StorageError(
                f"{mib(n_rows * record)} of rows need more than {MAX_PASSES} passes with "
                f"K={n_buckets} buckets and a {mib(budget)} budget",
                "raise n_buckets or memory_budget_bytes")
    plan = ShufflePlan(n_rows, row_bytes, n_buckets, budget, n_jobs, n_passes, block_rows, chunk_rows)
    return ShufflePlan(**{**asdict(plan), "warnings": tuple(_small_file_warnings(plan))})


def final_bucket_rows(memory_budget_bytes: int, row_bytes: int) -> int:
    """Rows one job can shuffle in memory: records plus an 8-byte permutation index each."""
    return int(FINAL_SHARE * memory_budget_bytes) // (row_bytes + ID_BYTES + 8)


def _fits(mean_rows: float, limit_rows: int, random: bool) -> bool:
    # Bucket sizes after a scatter pass are binomial: sd <= sqrt(mean).
    return mean_rows + (SIGMAS * math.sqrt(mean_rows) if random else 0) <= limit_rows


def _small_file_warnings(plan: ShufflePlan) -> Iterator[str]:
    data = plan.n_rows * plan.record_bytes
    for p in range(1, plan.n_passes):
        files = plan.jobs_in_pass(p) * plan.n_buckets
        if data / files < MIN_GOOD_FILE_BYTES:
            yield (f"pass {p} writes {files} files of ~{mib(data / files)}; files under "
                   f"{mib(MIN_GOOD_FILE_BYTES)} cost throughput: use fewer jobs or buckets")


def require(condition: bool, problem: str, fix: str) -> None:
    """StorageError(problem, fix) unless ``condition``: the shuffle's checks of its inputs and settings."""
    if not condition:
        raise StorageError(problem, fix)


def mib(n_bytes: float) -> str:
    """``n_bytes`` in MiB, one decimal: how the shuffle's plan and logs state sizes."""
    return f"{n_bytes / 2**20:.1f} MiB"
