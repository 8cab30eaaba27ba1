"""Related features for the browser: nearest decoder directions and co-occurring features.

``nearest_by_decoder``: for each latent of a range, the ``k`` other latents whose decoder rows
have the highest cosine similarity (exact, not approximate): ``W_dec`` is normalised once and
multiplied block by block, [block, n_latents] at a time, keeping a running top-k, so memory is
``block x n_latents`` floats whatever the width (1M latents: 4,096 x 1M x 4 B = 16 GiB would be
too much, so the block shrinks to keep ``max_elements``). Runs on W_dec's device.

``cooccurring``: from sparse firings (flat token positions, latent ids), for each latent the
latents that fire on the same tokens most often, ranked by the fraction of its firings they share.
"""

import numpy as np
import torch

from sae_platform.errors import PlatformError

MAX_ELEMENTS = 1 << 24  # one similarity block: 16M floats (64 MB)


@torch.no_grad()
def nearest_by_decoder(W_dec: torch.Tensor, start: int, stop: int, k: int = 10,
                       max_elements: int = MAX_ELEMENTS) -> tuple[np.ndarray, np.ndarray]:
    """(indices [stop - start, k] int64, cosines [stop - start, k] float32) of the nearest other
    latents by decoder cosine, best first, for latents ``start..stop``. A latent is never its own
    neighbour; with fewer than k + 1 latents the rest is -1 / NaN."""
    n = W_dec.shape[0]
    if not 0 <= start <= stop <= n:
        raise PlatformError(f"latent range [{start}, {stop}) is outside the SAE's {n} latents",
                            "pass a range inside [0, n_latents)")
    unit = W_dec.float() / W_dec.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    kk = min(k, n - 1)
    out_i = np.full((stop - start, k), -1, dtype=np.int64)
    out_c = np.full((stop - start, k), np.nan, dtype=np.float32)
    if kk <= 0:
        return out_i, out_c
    block = max(1, max_elements // n)
    for a in range(start, stop, block):
        b = min(a + block, stop)
        sims = unit[a:b] @ unit.T  # [block, n]
        sims[torch.arange(b - a), torch.arange(a, b)] = -float("inf")
        vals, idx = sims.topk(kk, dim=1)
        out_i[a - start:b - start, :kk] = idx.cpu().numpy()
        out_c[a - start:b - start, :kk] = vals.cpu().numpy()
    return out_i, out_c


def cooccurring(positions: np.ndarray, features: np.ndarray, wanted, k: int = 5) -> dict[int, list[tuple[int, float]]]:
    """For each latent of ``wanted``: up to ``k`` (latent, share) pairs, where share is the fraction
    of its firing tokens on which the other latent fires too; best first."""
    positions, features = np.asarray(positions, dtype=np.int64), np.asarray(features, dtype=np.int64)
    by_pos = np.argsort(positions, kind="stable")
    pos_sorted, feat_by_pos = positions[by_pos], features[by_pos]
    by_feat = np.argsort(features, kind="stable")
    feat_sorted, pos_by_feat = features[by_feat], positions[by_feat]
    out = {}
    for f in wanted:
        f = int(f)
        lo, hi = np.searchsorted(feat_sorted, [f, f + 1])
        tokens = np.unique(pos_by_feat[lo:hi])
        if not len(tokens):
            out[f] = []
            continue
        starts = np.searchsorted(pos_sorted, tokens)
        ends = np.searchsorted(pos_sorted, tokens, side="right")
        others = np.concatenate([feat_by_pos[s:e] for s, e in zip(starts, ends, strict=True)])
        others = others[others != f]
        if not len(others):
            out[f] = []
            continue
        ids, counts = np.unique(others, return_counts=True)
        order = np.lexsort((ids, -counts))[:k]
        out[f] = [(int(ids[i]), float(counts[i]) / len(tokens)) for i in order]
    return out
