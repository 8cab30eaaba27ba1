"""SAEBench's core metrics (Karvonen et al. 2025, "SAEBench", ``sae_bench/evals/core``) beyond
what ``sae_platform.evaluate`` already measures, and the meta-SAE decoder check.

Everything streams over batches in float64 sums, or works in row chunks of bounded size, so a
16k x 16k latent-similarity matrix never exists at once. Definitions (each one's key in
``eval/<sae>/report.json``; units and direction in ``sae_platform.metric_info``):

- ``explained_variance`` = 1 - SSE / sum ||x - mean||^2 = 1 - FVU: variance about the *mean*
  (predicting the per-dimension mean scores 0, a perfect reconstruction 1).
  ``explained_variance_about_zero`` = 1 - SSE / sum ||x||^2: the legacy figure of SAEBench and of
  SAELens before v6.45.1 (issue #659), which divides by the second moment about zero; on
  residual streams with a large mean it reads high (docs/results.md, "SAEBench").
- ``cossim``: mean over rows of cos(x, x_hat) (a zero vector counts as cosine 0).
- ``l2_norm_in`` / ``l2_norm_out``: mean ||x|| / ||x_hat||; ``l2_ratio``: mean over rows of
  ||x_hat|| / ||x|| (an input norm below 1e-4 divides by 1, as SAEBench does).
- ``relative_reconstruction_bias`` = E||x_hat||^2 / E<x, x_hat> (Rajamanoharan et al. 2024,
  "Improving Dictionary Learning with Gated SAEs", eq. 10), over the whole held-out set: 1 means
  no systematic shrinkage, < 1 shrinkage.
- ``l1``: mean over rows of the sum of the codes (normalised units: the same numbers as the
  SAELens export's feature activations, ``sae_platform.export``).
- From the per-latent density: ``frac_alive`` (fired at least once), ``freq_over_1_percent`` /
  ``freq_over_10_percent`` (share of latents with density > 1% / > 10%) and their
  ``normalized_freq_over_*`` (those latents' share of all firings).
- ``consistent_activation_heuristic`` (per latent): tokens it fires on / contexts it fires in at
  least once, over the held-out contexts (SAEBench's definition); NaN for a latent that never
  fires there. The report holds its mean over latents that fired.
- Per latent, from the weights: ``encoder_decoder_cosine`` (cos of row i of W_enc and of W_dec;
  SAEs only: a transcoder's rows live in different spaces), ``max_encoder_cosine`` /
  ``max_decoder_cosine`` (largest cosine to any *other* latent's row); the report holds their
  means (``average_max_*``, ``mean_encoder_decoder_cosine``).
- ``kl_div_with_sae`` / ``kl_div_with_ablation`` / ``kl_div_score``: see
  ``evaluate.downstream_ce``.
- ``meta_sae_fve``: ``meta_sae_decoder_fve`` below.
"""

import math

import numpy as np
import torch

from sae_platform.errors import PlatformError
from sae_platform.sae import ADAM_EPS, build_sae

# Elements of one [chunk, n_latents] block of the latent-similarity matrix: 64 MiB of float32.
SIMILARITY_CHUNK_ELEMENTS = 1 << 24
SMALL_INPUT_NORM = 1e-4  # SAEBench: an input norm below this divides the L2 ratio by 1


class ShapeSums:
    """Running float64 sums (on the data's device, one host sync at the end) behind the
    reconstruction figures of SAEBench that ``evaluate.reconstruction_metrics`` adds to its own.
    ``add`` takes one batch: target ``x`` and reconstruction ``recon`` [rows, d] float64 (raw
    units) and the code values [rows, K] (normalised units)."""

    NAMES = ("sum_sq", "cos", "norm_in", "norm_out", "ratio", "recon_sq", "dot", "l1")

    def __init__(self, device):
        self.sums = {name: torch.zeros((), dtype=torch.float64, device=device) for name in self.NAMES}

    def add(self, x: torch.Tensor, recon: torch.Tensor, code_values: torch.Tensor) -> None:
        norm_in, norm_out = x.norm(dim=1), recon.norm(dim=1)
        dot = (x * recon).sum(1)
        parts = {
            "sum_sq": norm_in.pow(2).sum(),
            "cos": (dot / (norm_in * norm_out).clamp_min(1e-300)).sum(),
            "norm_in": norm_in.sum(), "norm_out": norm_out.sum(),
            "ratio": (norm_out / torch.where(norm_in < SMALL_INPUT_NORM, 1.0, norm_in)).sum(),
            "recon_sq": norm_out.pow(2).sum(), "dot": dot.sum(),
            "l1": code_values.double().clamp_min(0).sum(),
        }
        for name, value in parts.items():
            self.sums[name] += value

    def figures(self, n_rows: int, sse: float, fvu: float) -> dict:
        """The figures over ``n_rows`` rows, given the total squared error ``sse`` and the FVU
        (about the mean) that ``reconstruction_metrics`` measured."""
        s = {name: float(value) for name, value in self.sums.items()}
        return {
            "explained_variance": 1.0 - fvu,
            "explained_variance_about_zero": 1.0 - sse / max(s["sum_sq"], 1e-300),
            "cossim": s["cos"] / n_rows,
            "l2_norm_in": s["norm_in"] / n_rows,
            "l2_norm_out": s["norm_out"] / n_rows,
            "l2_ratio": s["ratio"] / n_rows,
            "relative_reconstruction_bias": s["recon_sq"] / s["dot"] if s["dot"] != 0 else float("nan"),
            "l1": s["l1"] / n_rows,
        }


def frequency_figures(density: np.ndarray) -> dict:
    """SAEBench's frequency figures from per-latent densities [n_latents] (fraction of tokens):
    ``frac_alive``, ``freq_over_1_percent`` / ``freq_over_10_percent`` (share of latents denser
    than 1% / 10%) and ``normalized_freq_over_*`` (those latents' share of all firings: the sum of
    their densities / the sum of every density; 0 when nothing fires)."""
    density = np.asarray(density, dtype=np.float64)
    total = density.sum()
    figures = {"frac_alive": float((density > 0).mean())}
    for name, cut in (("1_percent", 0.01), ("10_percent", 0.1)):
        figures[f"freq_over_{name}"] = float((density > cut).mean())
        figures[f"normalized_freq_over_{name}"] = float(density[density > cut].sum() / total) if total > 0 else 0.0
    return figures


def consistent_activation(contexts: np.ndarray, features: np.ndarray, n_latents: int) -> np.ndarray:
    """SAEBench's consistent-activation heuristic per latent, float64 [n_latents]: the tokens a
    latent fires on / the contexts (prompts) it fires in at least once; NaN where it never fires.
    ``contexts`` and ``features`` [nnz]: the context index and latent id of every non-zero code
    (``metrics.HeldoutCodes``: positions // ctx_len and features)."""
    contexts, features = np.asarray(contexts, np.int64), np.asarray(features, np.int64)
    tokens = np.bincount(features, minlength=n_latents).astype(np.float64)
    pairs = np.unique(features * (int(contexts.max(initial=0)) + 1) + contexts)
    prompts = np.bincount(pairs // (int(contexts.max(initial=0)) + 1), minlength=n_latents).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(prompts > 0, tokens / np.maximum(prompts, 1), np.nan)


def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def max_cosine_to_others(rows: torch.Tensor, chunk_elements: int | None = None,
                         of: torch.Tensor | None = None) -> torch.Tensor:
    """Per row of ``rows`` [n, d]: the largest cosine similarity to any *other* row, float32 [n]
    (-inf for a single row). ``of`` (int64 row indices): only those rows are measured (against
    every row) and the others are NaN. Computed in blocks of at most ``chunk_elements`` entries of
    the [n, n] similarity matrix (default ``SIMILARITY_CHUNK_ELEMENTS``), on the rows' device."""
    unit = _unit_rows(rows.float())
    n = unit.shape[0]
    measured = torch.arange(n, device=unit.device) if of is None else of.to(unit.device)
    chunk = max(1, (chunk_elements or SIMILARITY_CHUNK_ELEMENTS) // max(n, 1))
    out = torch.full((n,), float("nan"), dtype=torch.float32, device=unit.device)
    for start in range(0, len(measured), chunk):
        block = measured[start:start + chunk]
        sims = unit[block] @ unit.t()
        sims[torch.arange(len(block), device=unit.device), block] = float("-inf")  # not itself
        out[block] = sims.max(dim=1).values
    return out


def measured_latents(n_latents: int, max_latents: int, seed: int = 0) -> torch.Tensor | None:
    """Which latents the max-cosine figures measure: every one (None) when ``n_latents`` <=
    ``max_latents``, else a seeded sample of ``max_latents`` of them (sorted int64): each costs
    n_latents x d_model multiply-adds, so all of them is quadratic in n_latents (2 x 1.3 PFLOP at
    2^20 latents, d_model 576: hours on a CPU). The sample's mean estimates SAEBench's mean."""
    if n_latents <= max_latents:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_latents, generator=generator)[:max_latents].sort().values


@torch.no_grad()
def latent_geometry(sae, chunk_elements: int | None = None, max_latents: int | None = None) -> dict[str, np.ndarray]:
    """Per-latent weight figures, float32 numpy [n_latents] each: ``max_encoder_cosine``,
    ``max_decoder_cosine`` and (an SAE, not a transcoder) ``encoder_decoder_cosine``; see the
    module docstring. The two max cosines are measured for every latent, or for
    :func:`measured_latents`' sample when ``max_latents`` is below n_latents (NaN elsewhere;
    0 measures none). Memory: one [chunk, n_latents] block at a time."""
    out = {}
    if max_latents != 0:
        of = None if max_latents is None else measured_latents(sae.n_latents, max_latents)
        out = {"max_encoder_cosine": max_cosine_to_others(sae.W_enc, chunk_elements, of),
               "max_decoder_cosine": max_cosine_to_others(sae.W_dec, chunk_elements, of)}
    if not sae.is_transcoder:
        out["encoder_decoder_cosine"] = (_unit_rows(sae.W_enc.float()) * _unit_rows(sae.W_dec.float())).sum(1)
    return {name: value.cpu().numpy() for name, value in out.items()}


def geometry_figures(geometry: dict[str, np.ndarray]) -> dict:
    """The report's means of ``latent_geometry``'s per-latent arrays (other keys are ignored)."""
    names = {"max_encoder_cosine": "average_max_encoder_cosine", "max_decoder_cosine": "average_max_decoder_cosine",
             "encoder_decoder_cosine": "mean_encoder_decoder_cosine"}
    figures = {name: float(np.nanmean(geometry[key])) for key, name in names.items()
               if key in geometry and len(geometry[key]) > 1}
    if "max_decoder_cosine" in geometry and np.isnan(geometry["max_decoder_cosine"]).any():
        figures["max_cosine_latents_measured"] = int(np.isfinite(geometry["max_decoder_cosine"]).sum())
    return figures


def meta_sae_decoder_fve(decoder: torch.Tensor, *, steps: int, width_ratio: float = 0.25, k: int = 4,
                         batch_size: int = 256, lr: float = 5e-4, seed: int = 0) -> dict:
    """The meta-SAE decoder check (Bussmann et al. 2025, "Learning Multi-Level Features with
    Matryoshka Sparse Autoencoders", App. D.1; SAEBench ``meta_structure``): a BatchTopK SAE
    (``sae_platform.sae.BatchTopKSAE``) of ceil(width_ratio * n_latents) latents (at least k) and
    k = 4 is trained for ``steps`` Adam steps (constant lr, as SAEBench) on batches of
    ``batch_size`` decoder rows drawn with replacement, then scored on every row by its inference
    rule. SAEBench trains 1,500 steps of 1,024 rows (under a minute on a GPU); the default here,
    with ``sae_eval``'s 300 steps, is a quarter of that batch so the check stays seconds on CPU.
    High explained variance means the decoder directions share structure (they compose from
    fewer, more general directions).

    ``decoder``: [n_latents, d] decoder rows (any scale: the figure is scale-free). Seeded by
    ``seed`` (the row sampling and the meta-SAE's init), on the decoder's device.
    Returns ``meta_sae_fve`` (1 - SSE / squared deviation of the rows from their mean),
    ``meta_sae_mse`` (per element), ``meta_sae_width`` and ``meta_sae_k``. PlatformError for
    fewer than 2 rows or ``steps`` < 1."""
    n_rows, d = decoder.shape
    if n_rows < 2 or steps < 1:
        raise PlatformError(f"the meta-SAE needs at least 2 decoder rows and 1 step, got {n_rows} rows, {steps} steps",
                            "run it on a trained SAE with meta_sae_steps >= 1 (0 skips it)")
    rows = decoder.detach().float()
    device = rows.device
    width = max(math.ceil(n_rows * width_ratio), k)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        meta = build_sae("batchtopk", d, width, device=device, k=k, k_aux=0)
    meta.calibrate_(rows)
    optimizer = torch.optim.Adam(meta.param_groups(lr), lr=lr, eps=ADAM_EPS)
    meta.train()
    for _ in range(steps):
        batch = rows[torch.randint(0, n_rows, (batch_size,), generator=generator).to(device)]
        loss, _ = meta.loss(batch, meta(batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        meta.remove_parallel_grad_()
        optimizer.step()
        meta.normalize_decoder_()
    meta.eval()
    sse = deviation = 0.0
    mean = rows.double().mean(0)
    with torch.no_grad():
        for start in range(0, n_rows, batch_size):
            batch = rows[start:start + batch_size]
            recon = meta.decode(meta.encode(batch)).double()
            sse += float((recon - batch.double()).pow(2).sum())
            deviation += float((batch.double() - mean).pow(2).sum())
    return {"meta_sae_fve": 1.0 - sse / deviation if deviation > 0 else 0.0, "meta_sae_mse": sse / rows.numel(),
            "meta_sae_width": width, "meta_sae_k": k}
