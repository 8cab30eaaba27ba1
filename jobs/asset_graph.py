"""The asset graph of the code location as a plain table, for commands that must answer without
importing Dagster, torch and every asset module (``sae-platform lineage``: well under 2 s).

The stage declarations (``assets/*.py``, their ``deps``) are the fact; this is its copy, bound
to it by ``tests/test_cli.py::test_the_static_asset_graph_is_the_definitions_graph``, which
fails as soon as the two differ and prints the table to paste here.
"""

# asset key → the assets it reads (its direct upstreams), as Dagster's resolved asset graph has them
ASSET_PARENTS: dict[str, tuple[str, ...]] = {
    "activations": ("base_model",),
    "base_model": (),
    "circuit_tracer_export": ("sae_checkpoint",),
    "feature_browser": ("feature_contexts", "feature_explanations", "feature_topk", "sae_absorption", "sae_eval",
                        "sae_sparse_probing"),
    "feature_codes": ("activations", "sae_checkpoint"),
    "feature_context_windows": ("activations", "feature_codes", "feature_topk"),
    "feature_contexts": ("feature_context_windows",),
    "feature_explanations": ("feature_contexts",),
    "feature_llm_explanations": ("feature_contexts",),
    "feature_stats_partial": ("activations", "feature_codes", "sae_checkpoint"),
    "feature_topk": ("feature_stats_partial",),
    "neuronpedia_export": ("feature_contexts", "feature_explanations", "feature_topk"),
    "sae_absorption": ("sae_checkpoint",),
    "sae_checkpoint": ("shuffled_activations",),
    "sae_comparison": ("sae_absorption", "sae_eval", "sae_sparse_probing"),
    "sae_eval": ("sae_checkpoint",),
    "sae_sparse_probing": ("sae_checkpoint",),
    "scaling_laws": ("sae_eval",),
    "shuffle_final": ("shuffle_pass_2",),
    "shuffle_pass_1": ("shuffle_plan",),
    "shuffle_pass_2": ("shuffle_pass_1",),
    "shuffle_plan": ("activations",),
    "shuffled_activations": ("shuffle_final",),
}
