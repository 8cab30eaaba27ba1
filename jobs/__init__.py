"""Jobs, the assembled Dagster definitions, and the ``sae-platform`` CLI."""
