"""Column names and schemas of the feature tables, shared by their writers and the browser.

Kept free of torch so that generating or serving the browser never loads it.
"""

import polars as pl

# -- the feature_examples table (written by sae_platform.features) ------------------------------
FEATURE = "feature"
KIND = "kind"
RANK = "rank"
INTERVAL = "interval"
ACTIVATION = "activation"
PARTITION = "partition"
ROW = "row"
EXAMPLE_COLUMNS = (FEATURE, KIND, RANK, INTERVAL, ACTIVATION, PARTITION, ROW)
EXAMPLE_SCHEMA = {FEATURE: pl.Int64, KIND: pl.String, RANK: pl.Int32, INTERVAL: pl.Int32,  # as features.py
                  ACTIVATION: pl.Float32, PARTITION: pl.String, ROW: pl.Int64}
KIND_ORDER = ("top", "interval", "random")  # page order; other kinds follow, alphabetically

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
TOP_TOKEN_IDS, TOP_TOKEN_STRS, TOP_SCORES = "top_token_ids", "top_token_strs", "top_scores"
BOTTOM_TOKEN_IDS, BOTTOM_TOKEN_STRS, BOTTOM_SCORES = "bottom_token_ids", "bottom_token_strs", "bottom_scores"
LOGIT_SCHEMA = {
    FEATURE: pl.Int64,
    TOP_TOKEN_IDS: pl.List(pl.Int64), TOP_TOKEN_STRS: pl.List(pl.String), TOP_SCORES: pl.List(pl.Float32),
    BOTTOM_TOKEN_IDS: pl.List(pl.Int64), BOTTOM_TOKEN_STRS: pl.List(pl.String), BOTTOM_SCORES: pl.List(pl.Float32),
}
