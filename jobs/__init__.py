"""Jobs, the assembled Dagster definitions, and the ``sae-platform`` CLI."""

import sae_platform  # noqa: F401 - first, before anything imports torch: its huge-page setting (sae_platform/__init__.py)
