"""Column names and schemas of the feature tables, shared by their writers and the browser.

Every table the feature stages write (and the probe table of an evaluation) is declared here, once:
its column names and its schema (name -> dtype, in the written order). Kept free of torch so that
generating or serving the browser never loads it.
"""

import polars as pl

# -- the feature_stats table (written by sae_platform.feature_merge) ---------------------------
FEATURE = "feature"
N_TOKENS_TOTAL = "n_tokens_total"
COUNT = "count"
DENSITY = "density"
MAX = "max"
MEAN = "mean"
SUM = "sum"
HISTOGRAM = "histogram"
STATS_SCHEMA = {
    FEATURE: pl.Int64,          # global latent id
    N_TOKENS_TOTAL: pl.Int64,   # tokens seen (all partitions)
    COUNT: pl.Int64,            # tokens with activation > 0
    DENSITY: pl.Float64,        # count / n_tokens_total
    MAX: pl.Float32,            # largest activation (0.0 when count == 0)
    MEAN: pl.Float64,           # sum / count (null when count == 0)
    SUM: pl.Float64,
    HISTOGRAM: pl.List(pl.Int64),  # counts on features.HIST_EDGES' bins, underflow and overflow included
}

# -- the feature_examples table (written by sae_platform.feature_merge) -------------------------
KIND = "kind"
RANK = "rank"
INTERVAL = "interval"
ACTIVATION = "activation"
PARTITION = "partition"
ROW = "row"
EXAMPLE_COLUMNS = (FEATURE, KIND, RANK, INTERVAL, ACTIVATION, PARTITION, ROW)
EXAMPLE_SCHEMA = {FEATURE: pl.Int64, KIND: pl.String, RANK: pl.Int32, INTERVAL: pl.Int32,
                  ACTIVATION: pl.Float32, PARTITION: pl.String, ROW: pl.Int64}
# the values of KIND, in the tables' and the pages' order; other kinds follow, alphabetically
KIND_TOP, KIND_INTERVAL, KIND_RANDOM = "top", "interval", "random"
KIND_ORDER = (KIND_TOP, KIND_INTERVAL, KIND_RANDOM)

# -- the context windows (written by sae_platform.contexts) ------------------------------------
CONTEXT_ID = "context_id"
POSITION = "position"
DOC_ID = "doc_id"
CENTER = "center"
TOKEN_IDS = "token_ids"
TOKEN_STRS = "token_strs"
ACTS = "acts"
HAS_ACT = "has_act"
WINDOW_SCHEMA = {
    **EXAMPLE_SCHEMA,
    CONTEXT_ID: pl.Int32,   # row of the partition's ``tokens``
    POSITION: pl.Int32,     # the example token's position in that context
    DOC_ID: pl.Int32,       # document (documents.parquet of the partition)
    CENTER: pl.Int32,       # index of the example token inside the window lists
    TOKEN_IDS: pl.List(pl.Int32),
    TOKEN_STRS: pl.List(pl.String),
    ACTS: pl.List(pl.Float32),   # the example's feature on every window token
    HAS_ACT: pl.List(pl.Boolean),  # False: the token has no stored row (act is 0.0)
}

# -- the logit effects (sae_platform.logits.logit_effects, written by the feature_topk asset) ---
TOP_TOKEN_IDS, TOP_TOKEN_STRS, TOP_SCORES = "top_token_ids", "top_token_strs", "top_scores"
BOTTOM_TOKEN_IDS, BOTTOM_TOKEN_STRS, BOTTOM_SCORES = "bottom_token_ids", "bottom_token_strs", "bottom_scores"
LOGIT_SCHEMA = {
    FEATURE: pl.Int64,
    TOP_TOKEN_IDS: pl.List(pl.Int64), TOP_TOKEN_STRS: pl.List(pl.String), TOP_SCORES: pl.List(pl.Float32),
    BOTTOM_TOKEN_IDS: pl.List(pl.Int64), BOTTOM_TOKEN_STRS: pl.List(pl.String), BOTTOM_SCORES: pl.List(pl.Float32),
}

# -- the N2G explanations of a feature shard (sae_platform.explain.explanations_frame, written by
#    sae_platform.metrics.explain_shard) ---------------------------------------------------------
EXPLANATION = "explanation"
PATTERNS = "patterns"
PRECISION = "precision"
RECALL = "recall"
N_MATCHES = "n_matches"
N_FIRINGS = "n_firings"
NEIGHBORS = "neighbors"
NEIGHBOR_COSINES = "neighbor_cosines"
COOCCURRING = "cooccurring"
COOCCURRING_SHARES = "cooccurring_shares"
EXPLANATION_SCHEMA = {
    FEATURE: pl.Int64, EXPLANATION: pl.String, PATTERNS: pl.List(pl.List(pl.Int64)),
    PRECISION: pl.Float64, RECALL: pl.Float64, N_MATCHES: pl.Int64, N_FIRINGS: pl.Int64,
    NEIGHBORS: pl.List(pl.Int64), NEIGHBOR_COSINES: pl.List(pl.Float32),
    COOCCURRING: pl.List(pl.Int64), COOCCURRING_SHARES: pl.List(pl.Float32),
}

# -- the LLM explanations of a feature shard (rows of sae_platform.llm_explain.llm_explain_shard,
#    written by the feature_llm_explanations asset) ------------------------------------------------
LLM_EXPLANATION_SCHEMA = {
    FEATURE: pl.Int64, EXPLANATION: pl.String, "balanced_accuracy": pl.Float64,
    "true_positive_rate": pl.Float64, "true_negative_rate": pl.Float64,
    "n_positive": pl.Int64, "n_negative": pl.Int64,
    "error": pl.String,  # why the feature has no scores (an unusable answer), else null
}

# -- the probe table of an evaluation (rows of sae_platform.metrics.probe_metrics, probes.json
#    beside sae_eval's report) ---------------------------------------------------------------------
PROBE_SCHEMA = {
    "property": pl.String, "positives": pl.Int64, "tokens": pl.Int64, "entropy": pl.Float64,
    "sae_loss": pl.Float64, "sae_best_latent": pl.Int64, "neuron_loss": pl.Float64, "best_neuron": pl.Int64,
}
