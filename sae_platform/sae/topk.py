"""The TopK family: TopK (+AuxK, Multi-TopK), BatchTopK and Matryoshka BatchTopK.

All three pick a fixed budget of latents (k per row, or k * batch over the batch) from dense
pre-activations computed without autograd, then make only the picked entries differentiable
(``kernels._SelectedPre``) and decode them with the sparse embedding-bag decoder
(``kernels._SparseDecode``), so no [batch, n_latents] tensor is saved for backward.
Also here: the AuxK loss on dead latents, ``dense_topk_reference`` (the textbook dense TopK
forward that the sparse one is tested and benchmarked against), BatchTopK's batch-wide
selection ``_batch_topk``, the checked ``matryoshka_widths`` and the memory bounds
``ENCODE_CHUNK_ELEMENTS`` / ``TRAIN_BLOCK_ELEMENTS`` (module globals read at call time: patch
them here, in ``sae_platform.sae.topk``, to change them).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_platform.errors import PlatformError
from sae_platform.sae.base import Codes, SAEOutput, SparseAutoencoder, _sparse_stats
from sae_platform.sae.kernels import Pattern, _SelectedPre, _SparseDecode, sddmm, take_columns, topk_rows

# Pre-activation elements per chunk when encoding without a training graph: bounds inference
# memory for big dictionaries (1M latents x 4096 rows would be 16 GB at once).
ENCODE_CHUNK_ELEMENTS = 1 << 25
# The same bound for the training forward, larger: one block covers 4096 rows x 64k latents.
TRAIN_BLOCK_ELEMENTS = 1 << 28


def _aux_target(xs: Tensor, recon_n: Tensor) -> Tensor:
    return (xs - recon_n).detach()


def _into(outs: tuple[Tensor, Tensor], picked: tuple[Tensor, Tensor]) -> None:
    for out, part in zip(outs, picked, strict=True):
        out.copy_(part)


def _dead_or_none(dead_mask: Tensor | None) -> Tensor | None:
    """``dead_mask`` when some latent is dead, else None: what a forward hands its AuxK scan. With
    none dead the AuxK term is exactly 0 (``_auxk_loss`` multiplies by "any dead"), yet its masked
    second top-k, its k_aux picks (256 a row at d_model 576, 8x the main k) and their sparse decode
    and backward were ~55% of a demo training step (cProfile, 120 steps), where no latent is dead for
    most of the run. One host sync on CUDA, as the trainer's per-step finite-loss check already makes."""
    return dead_mask if dead_mask is not None and bool(dead_mask.any()) else None


def _dead_top(pre: Tensor, dead: Tensor, dead_ids: Tensor, k_aux: int) -> tuple[Tensor, Tensor]:
    """AuxK's picks: each row's top ``k_aux`` of ``pre`` [rows, n_latents] among the dead latents
    (``dead`` [n_latents] bool, ``dead_ids`` [n_dead] int64, its nonzero ids): (values in pre's dtype,
    int64 latent ids), [rows, k_aux]; the values those of the dense masked top-k, ids of equal values
    may differ.

    Where at least k_aux latents are dead, their columns are gathered and ranked alone: with half the
    16,384 latents dead 1.3x faster than masking the alive ones to -inf over the whole [rows, n_latents]
    block and ranking it all (92 vs 121 ms at 4,096 rows, k_aux 256, float32), with 2-5% dead 3-8x.
    Where fewer are (at k_aux 256 of 16,384: under 1.6%), the alive ones are masked in place (pre is
    spent, and overwritten) and the picks fill up with them, as -inf."""
    if dead_ids.numel() >= k_aux:
        vals, positions = topk_rows(take_columns(pre, dead_ids), k_aux)
        return vals, dead_ids[positions]
    return topk_rows(pre.masked_fill_(~dead, float("-inf")), k_aux)


def _auxk_loss(aux_recon: Tensor, error: Tensor, any_dead: Tensor) -> Tensor:
    """Gao et al.'s AuxK: MSE of the dead latents' reconstruction of the residual, over the
    residual's variance (so its scale does not shrink as the main loss improves); zero when
    nothing is dead."""
    var = (error - error.mean(0)).pow(2).mean().clamp_min(1e-30)
    return (aux_recon - error).pow(2).mean() / var * any_dead


class TopKSAE(SparseAutoencoder):
    """z = ReLU(TopK(W_enc (x - b_pre) + b_enc)), x_hat = W_dec^T z + b_pre (Gao et al. 2024,
    "Scaling and evaluating sparse autoencoders", §2.3; x in normalised units).

    k fixes L0 directly, so there is no sparsity coefficient to tune. AuxK (weight 1/32, §2.4) lets
    the k_aux most active dead latents model the residual, which keeps them from staying dead.
    multi_topk adds L(4k)/8 so the code stays good when read at other k (Multi-TopK, §5.3).
    ``dense_topk_reference`` is the same forward in plain dense autograd, what this one is
    tested against."""

    variant = "topk"
    DEFAULTS = {"k": 32, "k_aux": None, "aux_coeff": 1 / 32, "multi_topk": False, "multi_coeff": 1 / 8}
    COEFFS = {"auxk": "aux_coeff", "multi_topk": "multi_coeff"}

    def __init__(self, d_model, n_latents, device=None, dtype=torch.float32, **hparams):
        super().__init__(d_model, n_latents, device, dtype, **hparams)
        if self.hparams["k_aux"] is None:  # Gao et al.: a power of two near d_model / 2
            self.hparams["k_aux"] = 2 ** max(0, round(math.log2(d_model / 2)))
        self.hparams["k_aux"] = min(self.hparams["k_aux"], n_latents)

    @torch.no_grad()
    def _scan(self, xs: Tensor, width: int, dead_mask: Tensor | None, sort: bool = False):
        """Each row's top-`width` pre-activations and, given dead_mask, AuxK's top k_aux among
        the dead latents: (vals, idx, aux or None), all [batch, *]. Raises PlatformError for a dead_mask
        that is not [n_latents].

        The dense pre-activations are the one [batch, n_latents] tensor of the step. They are
        computed without autograd, in row blocks of at most TRAIN_BLOCK_ELEMENTS (one block for
        typical sizes; bounded memory for huge dictionaries), into a scratch block kept between
        training steps: re-allocating it cost ~10% of a CPU step in page faults. Selection copies
        what it keeps, so the reuse is safe."""
        batch, n = xs.shape[0], self.n_latents
        xc = xs.detach() - self.b_pre
        low = self.training and self.selection_dtype not in (None, xs.dtype)
        if low:  # pick in low precision, then recompute the picked values exactly (below)
            xc_s, w_s, b_s = self._selection_operands(xc)
        else:
            xc_s, w_s, b_s = xc, self.W_enc, self.b_enc
        rows = max(1, min(batch, TRAIN_BLOCK_ELEMENTS // n))
        block = self._scratch_block(rows, xc_s)
        vals, idx = xc_s.new_empty(batch, width), torch.empty(batch, width, dtype=torch.long, device=xs.device)
        k_aux = self.hparams["k_aux"]
        aux = None
        if dead_mask is not None and k_aux > 0:
            if dead_mask.shape != (n,):  # AuxK gathers the dead ids: a mask of another length would pass silently
                raise PlatformError(f"dead_mask has shape {tuple(dead_mask.shape)} but this SAE has {n} latents",
                                    "pass one flag per latent, a bool tensor [n_latents] (True: dead)")
            aux = xc_s.new_empty(batch, k_aux), torch.empty(batch, k_aux, dtype=torch.long, device=xs.device)
            dead = dead_mask.to(device=xs.device, dtype=torch.bool)
            dead_ids = dead.nonzero().squeeze(1)
        for start in range(0, batch, rows):
            stop = min(start + rows, batch)
            pre = torch.mm(xc_s[start:stop], w_s.t(), out=block[:stop - start]) if b_s is None \
                else torch.addmm(b_s, xc_s[start:stop], w_s.t(), out=block[:stop - start])
            _into((vals[start:stop], idx[start:stop]), topk_rows(pre, width, sorted=sort))
            if aux is not None:
                _into((aux[0][start:stop], aux[1][start:stop]), _dead_top(pre, dead, dead_ids, k_aux))
        if low:
            vals = self._exact_pre(xc, vals, idx)
            aux = None if aux is None else (self._exact_pre(xc, *aux), aux[1])
        return vals, idx, aux

    def _selection_operands(self, xc: Tensor) -> tuple[Tensor, Tensor, None]:
        """The pick's matmul operands for ``xc`` [batch, d_model] (the centred input): (x, w, None), x
        [batch, d_model + 1] and w [n_latents, d_model + 1], both in ``selection_dtype``, with b_enc folded
        in as one more input column (ones in x's last column, b_enc in w's), so ``x @ w.T`` is the
        pre-activations with the bias added as the matmul accumulates (in float32), and the None tells
        ``_scan`` there is no bias left to add. Why: addmm's separate pass over the [batch, n_latents]
        output was ~12% of the bf16 matmul (4,096 x 16,384 x 576). The bias is rounded to
        ``selection_dtype`` like W_enc; only which latents are picked depends on it, as the picked values
        are recomputed in float32 (``_exact_pre``).

        w is W_enc's low-precision copy, kept between training steps and refreshed in place from the
        current W_enc and b_enc on every call, as the scratch block is (a fresh 19 MB block each step
        was faulted in page by page): it is overwritten by the next call, so it is not for keeping."""
        d, dtype = xc.shape[1], self.selection_dtype
        w = self._kept("_selection_w", (self.n_latents, d + 1), dtype, xc.device)
        w[:, :d].copy_(self.W_enc.detach())
        w[:, d].copy_(self.b_enc.detach())
        x = torch.empty(xc.shape[0], d + 1, dtype=dtype, device=xc.device)
        x[:, :d].copy_(xc)
        x[:, d] = 1
        return x, w, None

    def _exact_pre(self, xc: Tensor, picked: Tensor, idx: Tensor) -> Tensor:
        """The pre-activations at ``idx`` [batch, w] recomputed in the parameters' precision (O(batch
        * w * d_model): one dot product per pick); entries picked as -inf (masked) stay -inf."""
        exact = sddmm(Pattern.regular(idx, self.n_latents), xc, self.W_enc).view_as(idx) + self.b_enc[idx]
        return torch.where(torch.isneginf(picked), float("-inf"), exact)

    def _scratch_block(self, rows: int, like: Tensor) -> Tensor:
        if not self.training:
            return like.new_empty(rows, self.n_latents)
        return self._kept("_scratch", (rows, self.n_latents), like.dtype, like.device)

    def _kept(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """The tensor kept on the module under ``name`` between training steps (not a buffer: never
        saved), allocated anew when its shape, dtype or device changed, or when it was made under
        ``torch.inference_mode`` and is now written outside it (which torch refuses)."""
        kept = getattr(self, name, None)
        if kept is None or kept.shape != shape or kept.dtype != dtype or kept.device != device \
                or (kept.is_inference() and not torch.is_inference_mode_enabled()):
            setattr(self, name, None)  # free the old one before allocating the new one
            kept = torch.empty(shape, dtype=dtype, device=device)
            setattr(self, name, kept)
        return kept

    def _sparse_decode(self, pattern: Pattern, vals: Tensor) -> Tensor:
        return _SparseDecode.apply(vals, self.W_dec, pattern)

    def _with_auxk(self, dead_mask: Tensor | None) -> bool:
        """Whether the forward's parts hold "auxk" (its value is 0 while no latent is dead)."""
        return dead_mask is not None and self.hparams["k_aux"] > 0

    def _aux_part(self, xs, ys, recon_n, aux, dead_mask, scale=None) -> Tensor:
        """AuxK: the dead latents (read from xs) model the error against the target ys; exactly 0
        when ``aux`` is None (no latent dead: the scan skipped it, ``_dead_or_none``)."""
        if aux is None:
            return xs.new_zeros(())
        aux_vals, aux_idx = aux
        pattern = Pattern.regular(aux_idx, self.n_latents)
        z = _SelectedPre.apply(xs, self.b_pre, self.W_enc, self.b_enc, aux_vals, pattern).relu()
        if scale is not None:
            z = z * scale
        aux_recon = self._sparse_decode(pattern, z)
        return _auxk_loss(aux_recon, _aux_target(ys, recon_n), dead_mask.any())

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, target: Tensor | None = None) -> SAEOutput:
        """x [batch, d_model] raw -> SAEOutput with recon [batch, d_out] raw and sparse codes with
        exactly k entries per row (a pick that ReLU zeroed stays, with value 0). Parts: "auxk"
        (given dead_mask [n_latents] and k_aux > 0) and "multi_topk" (MSE at 4k, normalised units);
        for a transcoder both need ``target`` [batch, d_out] raw. Raises PlatformError on a wrong
        width, or a dead_mask with dead latents that is not [n_latents]."""
        k, multi = self.hparams["k"], self.hparams["multi_topk"]
        xs = self._normalize(x)
        ys = self._target(xs, target)
        width = min(4 * k, self.n_latents) if multi else k
        top_vals, top_idx, aux = self._scan(xs, width, _dead_or_none(dead_mask), sort=multi)  # sorted: top k first
        wide = Pattern.regular(top_idx, self.n_latents)
        z_wide = _SelectedPre.apply(xs, self.b_pre, self.W_enc, self.b_enc, top_vals, wide).relu()
        parts, offset = {}, self._offset(xs)
        if multi and ys is not None:
            parts["multi_topk"] = (self._sparse_decode(wide, z_wide) + offset - ys).pow(2).mean()
        if multi:
            pattern, z = Pattern.regular(top_idx[:, :k], self.n_latents), z_wide[:, :k]
        else:
            pattern, z = wide, z_wide
        recon_n = self._sparse_decode(pattern, z) + offset
        if ys is not None and self._with_auxk(dead_mask):
            parts["auxk"] = self._aux_part(xs, ys, recon_n, aux, dead_mask)
        active, fired = _sparse_stats(pattern, z)
        return SAEOutput.counted(self._to_raw(recon_n), active, fired, parts, sparse=(pattern, z.reshape(-1)))

    @torch.no_grad()
    def encode(self, x: Tensor) -> Codes:
        """x [batch, d_model] raw -> Codes [batch, k]: each row's k largest pre-activations after
        ReLU, normalised units. Chunked over latents: no [batch, n_latents] tensor."""
        vals, idx = self._topk_chunked(self._centered(x), self.hparams["k"])
        return Codes(vals.relu(), idx)

    def _topk_chunked(self, xc: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Row-wise top-k of the pre-activations, merged over latent chunks so that no
        [batch, n_latents] tensor exists (same result as one big topk, up to float ties)."""
        chunk = max(k, ENCODE_CHUNK_ELEMENTS // max(xc.shape[0], 1))
        best = None
        for start in range(0, self.n_latents, chunk):
            stop = min(start + chunk, self.n_latents)
            pre = F.linear(xc, self.W_enc[start:stop], self.b_enc[start:stop])
            vals, idx = topk_rows(pre, min(k, stop - start), sorted=True)
            idx += start
            if best is not None:
                vals, pick = torch.cat([best[0], vals], 1).topk(k, dim=1)
                idx = torch.cat([best[1], idx], 1).gather(1, pick)
            best = vals, idx
        return best


def dense_topk_reference(sae: TopKSAE, x: Tensor) -> Tensor:
    """The textbook TopK SAE forward through plain autograd, on ``sae``'s own parameters: the
    reference that TopKSAE's sparse kernels are tested against (tests/test_sae.py) and that
    benchmarks/train_throughput.py times them against. Dense codes, dense decoder:

        pre   = W_enc (x * input_scale - b_pre) + b_enc          [batch, n_latents]
        z     = scatter of ReLU(TopK_k(pre)) into zeros           [batch, n_latents]
        x_hat = (z @ W_dec + b_pre) / input_scale                 [batch, d_model]

    (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", §2.3), k = sae.hparams["k"].

    x: [batch, d_model] raw. Returns x_hat [batch, d_model] in raw units, differentiable in every
    parameter. Raises PlatformError unless ``sae`` is a TopK SAE (variant "topk", not a
    transcoder): the other variants select differently."""
    if sae.variant != "topk" or sae.is_transcoder:
        kind = f"{sae.variant} transcoder" if sae.is_transcoder else f"{sae.variant} SAE"
        raise PlatformError(f"dense_topk_reference is the forward of a topk SAE, not of a {kind}",
                            "pass a model from build_sae('topk', d_model, n_latents)")
    xc = x * sae.input_scale - sae.b_pre
    pre = F.linear(xc, sae.W_enc, sae.b_enc)
    vals, idx = pre.topk(sae.hparams["k"], dim=1)
    z = torch.zeros_like(pre).scatter(1, idx, vals.relu())
    return (z @ sae.W_dec + sae.b_pre) / sae.input_scale


def _batch_topk(cand_vals: Tensor, cand_idx: Tensor, total: int, n: int, full_pre) -> tuple[Tensor, Tensor]:
    """Exact top `total` entries of a [batch, n] matrix as (values, flat indices), from each
    row's top candidates (cand_vals, cand_idx).

    A flat topk over batch * n elements is ~5x slower on CPU than a row-wise one and needs the
    whole matrix at once. The candidates suffice whenever no row's smallest candidate reaches
    the cut (every non-candidate then lies below it); otherwise full_pre() recomputes the
    matrix for a flat topk."""
    per_row = cand_vals.shape[1]
    vals, pos = cand_vals.reshape(-1).topk(total, sorted=False)
    if per_row == n or not bool((cand_vals.min(1).values >= vals.min()).any()):
        return vals, (pos // per_row) * n + cand_idx.reshape(-1)[pos]
    return full_pre().reshape(-1).topk(total, sorted=False)


class BatchTopKSAE(TopKSAE):
    """TopK over the whole batch: k * batch activations shared among rows (Bussmann et al. 2024,
    "BatchTopK Sparse Autoencoders", arXiv:2412.06410), so hard tokens can use more latents than
    easy ones at the same average L0.

    A row's code then depends on its batch-mates, which is wrong at inference; there a global
    threshold is used instead: an exponential moving average of the smallest activation
    selected in each training batch (a buffer, saved with the checkpoint)."""

    variant = "batchtopk"
    DEFAULTS = {"k": 32, "k_aux": None, "aux_coeff": 1 / 32, "threshold_momentum": 0.99, "candidates_per_k": 4}
    COEFFS = {"auxk": "aux_coeff"}

    def __init__(self, d_model, n_latents, device=None, dtype=torch.float32, **hparams):
        super().__init__(d_model, n_latents, device, dtype, **hparams)
        self.register_buffer("threshold", torch.full((), float("nan"), device=device, dtype=dtype))

    @torch.no_grad()
    def _select_batch(self, xs: Tensor, dead_mask: Tensor | None):
        """(pattern, values, aux) of the batch-wide top k * batch."""
        batch, n, k = xs.shape[0], self.n_latents, self.hparams["k"]
        per_row = min(n, self.hparams["candidates_per_k"] * k)
        cand_vals, cand_idx, aux = self._scan(xs, per_row, _dead_or_none(dead_mask))
        full_pre = lambda: F.linear(xs - self.b_pre, self.W_enc, self.b_enc)  # noqa: E731
        vals, flat = _batch_topk(cand_vals, cand_idx, k * batch, n, full_pre)
        flat, order = flat.sort()  # row-major: groups entries by row, as CSR needs
        vals = vals[order]
        self._update_threshold(vals)
        return Pattern.from_rows(flat // n, flat % n, batch, n), vals, aux

    def _update_threshold(self, vals: Tensor) -> None:
        """EMA of the smallest selected activation, written without a device sync."""
        if not self.training:
            return
        smallest = torch.where(vals > 0, vals, torch.inf).min()
        m = self.hparams["threshold_momentum"]
        ema = torch.where(torch.isnan(self.threshold), smallest, m * self.threshold + (1 - m) * smallest)
        self.threshold.copy_(torch.where(torch.isfinite(smallest), ema, self.threshold))

    def _select_threshold(self, pre: Tensor) -> tuple[Pattern, Tensor]:
        if torch.isnan(self.threshold):  # never trained: the per-row TopK rule is the best guess
            vals, idx = pre.topk(self.hparams["k"], dim=1)
            return Pattern.regular(idx, self.n_latents), vals
        rows, cols = (pre > self.threshold).nonzero(as_tuple=True)
        return Pattern.from_rows(rows, cols, pre.shape[0], self.n_latents), pre[rows, cols]

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, target: Tensor | None = None) -> SAEOutput:
        """x [batch, d_model] raw -> SAEOutput, recon [batch, d_out] raw. Training mode: the
        k * batch largest pre-activations of the batch (any number per row; ReLU then drops
        negative picks), and the threshold's EMA is updated; eval mode: pre > threshold (each
        row's top k before any training step). Parts: "auxk" given dead_mask [n_latents] (and
        "matryoshka" for that variant); a transcoder needs ``target`` [batch, d_out] raw for them.
        Raises PlatformError on a wrong width, or a dead_mask with dead latents that is not [n_latents]."""
        xs = self._normalize(x)
        ys = self._target(xs, target)
        if self.training:
            pattern, sel_vals, aux = self._select_batch(xs, dead_mask)
        else:
            with torch.no_grad():
                pattern, sel_vals = self._select_threshold(F.linear(xs - self.b_pre, self.W_enc, self.b_enc))
            dead = _dead_or_none(dead_mask)
            aux = self._scan(xs, 1, dead)[2] if dead is not None else None
        z = _SelectedPre.apply(xs, self.b_pre, self.W_enc, self.b_enc, sel_vals, pattern).relu()
        recon_n, parts = self._decode_parts(pattern, z, ys, self._offset(xs))
        if ys is not None and self._with_auxk(dead_mask):
            parts["auxk"] = self._aux_part(xs, ys, recon_n, aux, dead_mask)
        active, fired = _sparse_stats(pattern, z)
        return SAEOutput.counted(self._to_raw(recon_n), active, fired, parts, sparse=(pattern, z))

    def _decode_parts(self, pattern: Pattern, z: Tensor, ys: Tensor | None,
                      offset: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(normalised reconstruction, extra loss parts against the target ys) from the selected
        codes; ``offset``: ``_offset`` of the batch (b_out, plus a skip transcoder's skip term)."""
        return self._sparse_decode(pattern, z) + offset, {}

    @torch.no_grad()
    def encode(self, x: Tensor) -> Codes:
        """x [batch, d_model] raw -> Codes [batch, K] by the global threshold (pre > threshold; each
        row's top k before any training step), K the most latents active in a row, padded with 0.
        Computes the dense [batch, n_latents] pre-activations at once."""
        pattern, vals = self._select_threshold(F.linear(self._centered(x), self.W_enc, self.b_enc))
        return Codes(*pattern.padded(vals.relu()))

    @torch.no_grad()
    def encode_slice(self, x: Tensor, start: int, stop: int) -> Tensor:
        """[batch, stop - start] by the threshold, multiplying only the slice's rows of W_enc.
        Raises PlatformError unless 0 <= start <= stop <= n_latents."""
        if torch.isnan(self.threshold):
            return super().encode_slice(x, start, stop)
        self._check_slice(start, stop)
        pre = F.linear(self._centered(x), self.W_enc[start:stop], self.b_enc[start:stop])
        return torch.where(pre > self.threshold, pre, 0).relu()


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning Multi-Level Features with
    Matryoshka Sparse Autoencoders", arXiv:2503.17547; SAELens ``matryoshka_batchtopk``,
    dictionary_learning ``MatryoshkaBatchTopKSAE``): the BatchTopK selection over the whole
    dictionary, and every nested prefix of latents [0, w) for w in ``matryoshka_widths`` must
    reconstruct the input on its own: loss = MSE(full) + matryoshka_coeff * sum over inner
    prefixes of MSE(prefix) (SAELens weighs each inner level 1). Early latents learn general
    features, later ones refine them, which reduces feature absorption.

    Sparse kernels as for TopK: the selected entries are split by prefix group (entries are in
    CSR order, so a group is a filtered pattern), each group is decoded once with the
    embedding-bag decoder, and the prefixes are running sums of the group decodes: O(nnz * d)
    in all, never a dense [batch, n_latents] code. Inference is BatchTopK's global threshold,
    so it exports to SAELens as ``jumprelu`` exactly like BatchTopK (as SAELens saves its own).

    ``matryoshka_widths``: strictly increasing prefix sizes ending at n_latents (appended if
    missing); default n_latents / 16, / 4 and n_latents. forward, encode: as BatchTopK's, plus the
    "matryoshka" part (the sum of the inner prefixes' MSE, normalised units)."""

    variant = "matryoshka_batchtopk"
    DEFAULTS = {**BatchTopKSAE.DEFAULTS, "matryoshka_widths": None, "matryoshka_coeff": 1.0}
    COEFFS = {**BatchTopKSAE.COEFFS, "matryoshka": "matryoshka_coeff"}

    def __init__(self, d_model, n_latents, device=None, dtype=torch.float32, **hparams):
        super().__init__(d_model, n_latents, device, dtype, **hparams)
        self.hparams["matryoshka_widths"] = matryoshka_widths(n_latents, self.hparams["matryoshka_widths"])

    def _decode_parts(self, pattern: Pattern, z: Tensor, ys: Tensor | None,
                      offset: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        widths = self.hparams["matryoshka_widths"]
        cols, rows, flat = pattern.cols, pattern.rows, z.reshape(-1)
        recon_n, inner, lo = offset.expand(pattern.batch, -1), [], 0
        for hi in widths:
            keep = (cols >= lo) & (cols < hi)
            group = Pattern.from_rows(rows[keep], cols[keep], pattern.batch, self.n_latents)
            recon_n = recon_n + self._sparse_decode(group, flat[keep])
            if hi < self.n_latents and ys is not None:
                inner.append((recon_n - ys).pow(2).mean())
            lo = hi
        return recon_n, ({"matryoshka": sum(inner)} if inner else {})


def matryoshka_widths(n_latents: int, widths) -> list[int]:
    """Checked prefix widths: positive, strictly increasing, the last one n_latents."""
    if widths is None:
        widths = sorted({max(1, n_latents // 16), max(1, n_latents // 4)} - {n_latents})
    if not isinstance(widths, list | tuple) or not all(isinstance(w, int) and not isinstance(w, bool) for w in widths):
        raise PlatformError(f"matryoshka_widths must be a list of integers, got {widths!r}",
                            "use e.g. [1024, 4096, 16384] for 16384 latents")
    widths = list(widths)
    if not widths or widths[-1] != n_latents:
        widths.append(n_latents)
    if widths[0] < 1 or any(b <= a for a, b in zip(widths, widths[1:], strict=False)) or widths[-1] > n_latents:
        raise PlatformError(f"matryoshka_widths {widths} must be positive, strictly increasing and at most "
                            f"n_latents = {n_latents}", f"use e.g. [{n_latents // 16}, {n_latents // 4}, {n_latents}]")
    return widths
