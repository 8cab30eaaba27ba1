"""sae-platform's compute core: storage, base model hooks, corpus, activation caching, …

Nothing here imports Dagster; the ``assets``/``resources``/``jobs`` packages wrap it.

Importing this package before torch backs torch's CPU tensors of 2 MB and more with transparent
huge pages (``HUGE_PAGES_ENV``, see ``enable_huge_pages``).
"""

import os
import sys

__version__ = "0.1.0"

# torch's CPU allocator madvises its allocations of >= 2 MB for transparent huge pages when this
# variable is 1. It reads it once, at its first allocation, so it is set here, before torch loads.
HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"


def enable_huge_pages() -> bool:
    """Turn torch's huge-page allocation on for this process (and the processes it starts) unless
    the environment already says (``THP_MEM_ALLOC_ENABLE=0`` keeps it off). Why: a training step frees
    and re-allocates its [n_latents, d_model] gradients every step, and on 4 KB pages each fresh
    allocation is page-faulted in page by page (~22,000-30,000 faults a step at 16,384 x 576 on CPU);
    2 MB pages make that 7,570 (and the training loop's ``glibc_malloc.freed_blocks_reused``, ~80).
    Returns True when the variable is 1 before torch loads;
    False once torch is imported (too late to matter) or when the environment turned it off."""
    if "torch" in sys.modules:  # too late: its allocator may already have read the variable
        return False
    return os.environ.setdefault(HUGE_PAGES_ENV, "1") == "1"


enable_huge_pages()
