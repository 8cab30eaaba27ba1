"""sae-platform's compute core: storage, base model hooks, corpus, activation caching, …

Nothing here imports Dagster; the ``assets``/``resources``/``jobs`` packages wrap it.
"""

__version__ = "0.1.0"
