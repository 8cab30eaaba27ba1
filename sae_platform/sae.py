"""Sparse autoencoders: TopK, BatchTopK, Matryoshka BatchTopK, JumpReLU, ReLU+L1 and Switch, behind one
interface.

Every variant reconstructs an activation as a sparse, non-negative combination of unit-norm
dictionary rows plus a bias,

    x * input_scale  ~=  sum_i a_i W_dec[i] + b_pre,

so downstream code (evaluation, top-K tables, the browser) sees one flat dictionary of
``n_latents`` directions whatever the variant. The model takes raw activations and returns the
reconstruction in the same raw units; ``input_scale`` (a buffer, saved with the checkpoint) puts
the inputs at E||x||^2 = d_model internally (mean square 1 per coordinate), so losses,
coefficients and the learning-rate rule mean the same thing at every layer and model.

Recipe (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"): b_pre at the geometric
median of a sample, W_enc = W_dec^T at init, decoder rows renormalised after every step with the
gradient component along each row removed first, Adam with eps 6.25e-10 and lr ~ 1/sqrt(n_latents),
AuxK on dead latents.

Speed. For the TopK family only k of n_latents latents are active, so everything but the dense
encoder matmul can be made sparse (as Gao et al.'s kernels do): the decoder and its gradients
are embedding-bag gathers over the active rows, and the encoder *gradient* touches only the
selected (row, latent) pairs. The dense pre-activations are computed without autograd and only
read by the selection, so no [batch, n_latents] tensor is saved for backward. The Switch SAE
(Mudide 2024) also cuts the encoder matmul: each row is routed to one expert and only that
expert's rows of W_enc are multiplied.

Devices: everything is created on the parameters' / inputs' device; the only host syncs per
training step are BatchTopK's exactness check and Switch's per-expert row counts.
"""

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_platform.errors import PlatformError

ADAM_EPS = 6.25e-10  # Gao et al.: a small eps matters with tiny gradients on huge dictionaries
Variant = Literal["topk", "batchtopk", "matryoshka_batchtopk", "switch", "jumprelu", "relu"]
VARIANTS: tuple[Variant, ...] = get_args(Variant)  # the same names as a tuple (settings choices, tests)
# Pre-activation elements per chunk when encoding without a training graph: bounds inference
# memory for big dictionaries (1M latents x 4096 rows would be 16 GB at once).
ENCODE_CHUNK_ELEMENTS = 1 << 25
# The same bound for the training forward, larger: one block covers 4096 rows x 64k latents.
TRAIN_BLOCK_ELEMENTS = 1 << 28


def lr_for(n_latents: int) -> float:
    """Adam learning rate for a dictionary of n_latents (Gao et al.: lr ~ 1/sqrt(n), 2e-4 at 16k)."""
    if n_latents < 1:
        raise PlatformError(f"n_latents must be positive, got {n_latents}", "pass the dictionary size, e.g. 16384")
    return 2e-4 * math.sqrt(16384 / n_latents)


def geometric_median(x: Tensor, iters: int = 50, eps: float = 1e-8) -> Tensor:
    """Weiszfeld's iteration. b_pre starts here rather than at the mean because a few huge-norm
    rows (attention sinks, outlier tokens) drag the mean far from where the bulk of the data is."""
    x = x.double()
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(eps)
        y = (w[:, None] * x).sum(0) / w.sum()
    return y


def input_scale_for(x: Tensor) -> float:
    """The scalar that brings a sample to E||x||^2 = d_model (per-coordinate mean square 1).

    A fixed scalar, not per-row normalisation, so reconstructions map back to raw units exactly
    and the relative norms of tokens (which carry information) survive."""
    mean_sq = x.double().pow(2).sum(1).mean()
    return math.sqrt(x.shape[1] / max(float(mean_sq), 1e-30))


def normalized_mse(recon: Tensor, x: Tensor) -> Tensor:
    """MSE relative to predicting the batch mean (= fraction of variance unexplained)."""
    x = x.to(recon.dtype)
    return (recon - x).pow(2).mean() / (x - x.mean(0)).pow(2).mean().clamp_min(1e-30)


# ---------------------------------------------------------------------------------------------
# Sparse code matrices: CSR patterns and the three kernels the TopK family needs.
# ---------------------------------------------------------------------------------------------

class Pattern:
    """Where the nonzeros of a [batch, n_latents] code matrix sit, in CSR order (by row).

    Encoder and decoder backward both need the transpose (by latent); it is computed once per
    pattern and shared."""

    def __init__(self, cols: Tensor, offsets: Tensor, n_latents: int, width: int | None = None):
        self.cols, self.offsets, self.n_latents, self.width = cols, offsets, n_latents, width
        self._rows = None
        self._by_col = None

    @classmethod
    def regular(cls, indices: Tensor, n_latents: int) -> "Pattern":
        """Exactly indices.shape[1] entries per row (TopK)."""
        batch, width = indices.shape
        offsets = torch.arange(0, batch * width + 1, width, device=indices.device)
        return cls(indices.reshape(-1), offsets, n_latents, width)

    @classmethod
    def from_rows(cls, rows: Tensor, cols: Tensor, batch: int, n_latents: int) -> "Pattern":
        """Any number of entries per row; rows must be sorted ascending."""
        counts = torch.bincount(rows, minlength=batch)
        return cls(cols, F.pad(counts.cumsum(0), (1, 0)), n_latents)

    @property
    def batch(self) -> int:
        return self.offsets.numel() - 1

    @property
    def rows(self) -> Tensor:
        if self._rows is None:
            batch_ids = torch.arange(self.batch, device=self.cols.device)
            # output_size keeps this free of a device sync on CUDA
            self._rows = batch_ids.repeat_interleave(self.offsets.diff(), output_size=self.cols.numel())
        return self._rows

    def by_col(self) -> tuple[Tensor, Tensor, Tensor]:
        """(perm, rows[perm], col_offsets): the entries regrouped by latent."""
        if self._by_col is None:
            perm = self.cols.argsort()
            counts = torch.bincount(self.cols, minlength=self.n_latents)
            self._by_col = perm, self.rows[perm], F.pad(counts.cumsum(0), (1, 0))
        return self._by_col

    def padded(self, vals: Tensor) -> tuple[Tensor, Tensor]:
        """[batch, K] values and indices, K the largest row count; padding has value 0."""
        if self.width is not None:
            return vals.reshape(self.batch, self.width), self.cols.reshape(self.batch, self.width)
        width = max(int(self.offsets.diff().max()) if self.batch else 0, 1)
        pos = torch.arange(self.cols.numel(), device=self.cols.device) - self.offsets[self.rows]
        where = (self.rows, pos)
        values = vals.new_zeros(self.batch, width).index_put(where, vals)
        indices = self.cols.new_zeros(self.batch, width).index_put(where, self.cols)
        return values, indices


def spmm(pattern: Pattern, vals: Tensor, table: Tensor) -> Tensor:
    """S @ table for the sparse S = (pattern, vals): an embedding bag over table's rows."""
    return F.embedding_bag(pattern.cols, table, pattern.offsets, mode="sum",
                           per_sample_weights=vals.reshape(-1), include_last_offset=True)


def spmm_t(pattern: Pattern, vals: Tensor, y: Tensor) -> Tensor:
    """S^T @ y, [n_latents, d]. Re-expressed as an embedding bag over y's rows grouped by latent:
    on CPU ~5x faster than embedding_bag's own weight-gradient kernel, and no [nnz, d] temporary."""
    perm, rows, col_offsets = pattern.by_col()
    return F.embedding_bag(rows, y, col_offsets, mode="sum",
                           per_sample_weights=vals.reshape(-1)[perm], include_last_offset=True)


def sddmm(pattern: Pattern, y: Tensor, table: Tensor) -> Tensor:
    """(y @ table^T) sampled at the pattern's entries, [nnz], without a [nnz, d] gather: the
    kernel behind embedding_bag's per_sample_weights gradient."""
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        y, table, pattern.cols, pattern.offsets, pattern.rows, 0, -1)


class _SparseDecode(torch.autograd.Function):
    """S @ W_dec with both gradients sparse (values: sampled dots; W_dec: touched rows only)."""

    @staticmethod
    def forward(ctx, vals, w_dec, pattern):
        ctx.save_for_backward(vals, w_dec)
        ctx.pattern = pattern
        return spmm(pattern, vals, w_dec)

    @staticmethod
    def backward(ctx, grad):
        vals, w_dec = ctx.saved_tensors
        grad = grad.contiguous()
        grad_vals = sddmm(ctx.pattern, grad, w_dec).view_as(vals) if ctx.needs_input_grad[0] else None
        grad_w = spmm_t(ctx.pattern, vals, grad) if ctx.needs_input_grad[1] else None
        return grad_vals, grad_w, None


class _SelectedPre(torch.autograd.Function):
    """The selected pre-activations ((xs - b_pre) @ W_enc^T + b_enc at the pattern's entries),
    made differentiable after the fact.

    Forward reuses the values the no-grad dense matmul already produced. Backward touches only
    the selected (row, latent) pairs, so the encoder weight gradient costs O(nnz * d) instead of a
    second dense batch x n_latents x d matmul, and no [batch, n_latents] tensor is saved.
    b_pre's gradient is -grad_b_enc @ W_enc: one [n_latents] x [n_latents, d] product instead
    of a per-row gather."""

    @staticmethod
    def forward(ctx, xs, b_pre, w_enc, b_enc, vals, pattern):
        xc = xs.detach() - b_pre.detach()
        ctx.save_for_backward(xc, w_enc)
        ctx.pattern = pattern
        return vals.view_as(vals)

    @staticmethod
    def backward(ctx, grad):
        xc, w_enc = ctx.saved_tensors
        pattern, flat = ctx.pattern, grad.reshape(-1).contiguous()
        need_xs, need_b_pre, need_w, need_b = ctx.needs_input_grad[:4]
        grad_xs = spmm(pattern, flat, w_enc) if need_xs else None
        grad_w = spmm_t(pattern, flat, xc) if need_w else None
        grad_b = grad_b_pre = None
        if need_b or need_b_pre:
            grad_b = torch.zeros(pattern.n_latents, dtype=grad.dtype, device=grad.device)
            grad_b.index_add_(0, pattern.cols, flat)
            grad_b_pre = -(grad_b @ w_enc) if need_b_pre else None
        return grad_xs, grad_b_pre, grad_w, grad_b if need_b else None, None, None


# ---------------------------------------------------------------------------------------------
# JumpReLU's straight-through estimators (Rajamanoharan et al. 2024, "Jumping Ahead").
# ---------------------------------------------------------------------------------------------

def _rectangle(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """K((pre - theta) / eps) with K the unit rectangle: which pre-activations sit near the jump."""
    return ((pre - threshold).abs() < bandwidth / 2).to(pre.dtype)


class _JumpReLU(torch.autograd.Function):
    """pre * H(pre - theta); theta's gradient is the rectangle-kernel pseudo-derivative
    -(theta/eps) K(.), the only way a threshold learns from a loss that is flat almost everywhere."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > threshold)
        grad_theta = -(threshold / eps) * (grad * _rectangle(pre, threshold, eps)).sum(0)
        return grad_pre, grad_theta, None


class _Step(torch.autograd.Function):
    """H(pre - theta) for the L0 penalty; only theta gets a (pseudo-)gradient, -(1/eps) K(.)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        return None, -(grad * _rectangle(pre, threshold, eps)).sum(0) / eps, None


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------

@dataclass
class Codes:
    """Padded sparse codes: row b's activations are values[b] at latents indices[b]; entries
    with value 0 are inactive (padding, or a TopK pick that ReLU zeroed).

    Values are in normalised units: latent i with value a adds a * W_dec[i] / input_scale
    (output_scale for a transcoder) to the raw reconstruction (``SparseAutoencoder.decode``)."""

    values: Tensor   # [batch, K]
    indices: Tensor  # [batch, K] int64, global latent ids

    def to_dense(self, n_latents: int) -> Tensor:
        """[batch, n_latents], zeros where inactive."""
        dense = self.values.new_zeros(self.values.shape[0], n_latents)
        return dense.scatter_add_(1, self.indices, self.values)


@dataclass
class SAEOutput:
    """One forward pass. ``parts`` holds the unweighted auxiliary loss terms that need the
    model's internals (AuxK, L1, L0, load balance); ``SparseAutoencoder.loss`` weights them."""

    recon: Tensor                 # [batch, d_model], raw (input) units
    l0: Tensor                    # scalar: mean active latents per row
    fired: Tensor                 # bool [n_latents]: fired at least once in this batch
    parts: dict[str, Tensor] = field(default_factory=dict)
    dense: Tensor | None = None   # [batch, n_latents] codes (ReLU, JumpReLU)
    sparse: tuple[Pattern, Tensor] | None = None  # (pattern, flat values) for the TopK family

    @property
    def codes(self) -> Codes:
        if self.sparse is not None:
            pattern, vals = self.sparse
            return Codes(*pattern.padded(vals))
        return _dense_to_codes(self.dense)


def _dense_to_codes(z: Tensor) -> Codes:
    width = max(int((z > 0).sum(1).max()) if z.shape[0] else 0, 1)
    values, indices = z.topk(min(width, z.shape[1]), dim=1)
    return Codes(values.clamp_min(0), indices)


def _sparse_stats(pattern: Pattern, vals: Tensor) -> tuple[Tensor, Tensor]:
    """(l0, fired) without a device sync."""
    active = (vals.detach().reshape(-1) > 0).to(vals.dtype)
    hits = torch.zeros(pattern.n_latents, dtype=vals.dtype, device=vals.device).index_add_(0, pattern.cols, active)
    return active.sum() / max(pattern.batch, 1), hits > 0


def _dense_stats(z: Tensor) -> tuple[Tensor, Tensor]:
    active = z.detach() > 0
    return active.sum(1).to(z.dtype).mean(), active.any(0)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

class SparseAutoencoder(nn.Module):
    """Shared parameters, normalisation, init, decoder constraint and the eval-time helpers.

    Parameters: W_enc [n_latents, d_model] (row i reads latent i), b_enc [n_latents],
    W_dec [n_latents, d_out] (row i is latent i's direction, kept unit-norm), b_pre [d_model].
    Rows-as-latents on both sides means slicing latents is slicing rows, and the sparse kernels
    are embedding bags over rows.

    Shapes in the method docstrings: ``x`` [batch, d_model] raw activations (a transcoder also
    accepts its paired store rows [batch, d_model + d_out] and reads the first d_model columns);
    reconstructions [batch, d_out] in raw output units, d_out = d_model for an SAE. A width other
    than d_model raises PlatformError."""

    variant = "base"
    DEFAULTS: dict = {}
    COEFFS: dict = {}  # loss part name -> hyperparameter holding its weight
    # Precision of the dense pre-activations from which a training step *picks* its latents (TopK
    # family); None: the parameters' own. The picked values are recomputed exactly, so the loss and
    # its gradients are exact for the picked latents; only near-ties at the k-th place may resolve
    # differently. Set by the trainer (TrainSettings.selection_precision); never used at inference.
    selection_dtype: torch.dtype | None = None

    def __init__(self, d_model: int, n_latents: int, device=None, dtype=torch.float32, **hparams):
        super().__init__()
        self.d_out = hparams.pop("d_out", None)
        self.d_model, self.n_latents = d_model, n_latents
        self.hparams = {**self.DEFAULTS, **hparams}
        w_dec = torch.randn(n_latents, self.d_out or d_model, device=device, dtype=dtype)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        if self.d_out is None:
            self.W_enc = nn.Parameter(w_dec.clone())
        else:  # input and output spaces differ: no tied init
            w_enc = torch.randn(n_latents, d_model, device=device, dtype=dtype)
            self.W_enc = nn.Parameter(w_enc / w_enc.norm(dim=1, keepdim=True))
            self.b_dec = nn.Parameter(torch.zeros(self.d_out, device=device, dtype=dtype))
            self.register_buffer("output_scale", torch.ones((), device=device, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(n_latents, device=device, dtype=dtype))
        self.b_pre = nn.Parameter(torch.zeros(d_model, device=device, dtype=dtype))
        self.register_buffer("input_scale", torch.ones((), device=device, dtype=dtype))

    @property
    def config(self) -> dict:
        """Everything build_sae needs to rebuild this model (weights come from state_dict)."""
        extra = {} if self.d_out is None else {"d_out": self.d_out}
        return {"variant": self.variant, "d_model": self.d_model, "n_latents": self.n_latents, **extra, **self.hparams}

    @property
    def is_transcoder(self) -> bool:
        """A transcoder (Dunefsky et al. 2024, "Transcoders Find Interpretable LLM Feature
        Circuits"): encodes one activation (an MLP's input, d_model wide) and decodes into
        another (its output, d_out wide). Its output has its own bias ``b_dec`` [d_out] and scalar
        ``output_scale``; an SAE decodes into its input space with b_pre and input_scale."""
        return self.d_out is not None

    @property
    def b_out(self) -> Tensor:
        """[d_out], normalised units: the output bias (b_dec of a transcoder, b_pre of an SAE)."""
        return self.b_dec if self.is_transcoder else self.b_pre

    @property
    def _out_scale(self) -> Tensor:
        return self.output_scale if self.is_transcoder else self.input_scale

    def _target(self, xs: Tensor, target: Tensor | None) -> Tensor | None:
        """What the normalised reconstruction should match: xs for an SAE; a transcoder's target
        (raw [batch, d_out]) in normalised output units, or None when not given (no loss parts)."""
        if not self.is_transcoder:
            return xs
        if target is None:
            return None
        if target.shape[-1] != self.d_out:
            raise PlatformError(f"transcoder targets have width {target.shape[-1]} but d_out is {self.d_out}",
                                "pass the paired output activations (e.g. hook_mlp_out) of the same rows")
        return target.to(self.W_dec.dtype) * self.output_scale

    # --- init and normalisation -------------------------------------------------------------

    @torch.no_grad()
    def set_input_scale_(self, sample: Tensor) -> None:
        """input_scale from ``sample`` [rows, d_model] raw (``input_scale_for``)."""
        self.input_scale.fill_(input_scale_for(sample))

    @torch.no_grad()
    def init_b_pre_(self, sample: Tensor, iters: int = 50) -> None:
        """b_pre [d_model] := the geometric median of ``sample`` [rows, d_model] raw, normalised
        (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", §A.1). Call after
        set_input_scale_: b_pre lives in normalised units. Raises PlatformError on a wrong width."""
        median = geometric_median(self._normalize(sample), iters)
        self.b_pre.copy_(median.to(self.b_pre.dtype))

    def calibrate_(self, sample: Tensor, target: Tensor | None = None) -> None:
        """Input scale and b_pre from one data sample [rows, d_model] raw, in the order they depend
        on each other; a transcoder also sets output_scale and b_dec from the paired ``target``
        rows [rows, d_out] raw. Raises PlatformError on a wrong width, or for a transcoder without
        ``target``."""
        self.set_input_scale_(sample)
        self.init_b_pre_(sample)
        if self.is_transcoder:
            if target is None:
                raise PlatformError("a transcoder is calibrated on paired rows, but no target rows were given",
                                    "pass the output activations of the same rows: calibrate_(inputs, targets)")
            with torch.no_grad():
                self.output_scale.fill_(input_scale_for(target))
                self.b_dec.copy_(geometric_median(target.to(self.W_dec.dtype) * self.output_scale).to(self.b_dec.dtype))

    def _normalize(self, x: Tensor) -> Tensor:
        if self.is_transcoder and x.shape[-1] == self.d_model + self.d_out:
            x = x[..., :self.d_model]  # paired rows [input | target] of a transcoder store: read the input
        if x.shape[-1] != self.d_model:
            raise PlatformError(f"activations have width {x.shape[-1]} but this SAE expects d_model {self.d_model}",
                                "train or load an SAE for the layer and model these activations came from")
        return x.to(self.W_dec.dtype) * self.input_scale

    def _centered(self, x: Tensor) -> Tensor:
        return self._normalize(x) - self.b_pre

    def _to_raw(self, recon_n: Tensor) -> Tensor:
        return recon_n / self._out_scale

    # --- decoder constraint -------------------------------------------------------------------

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Unit-norm rows: otherwise a sparsity penalty could be gamed by shrinking codes and
        growing directions, and activations would not be comparable across latents."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Drop the gradient component along each decoder row before the optimizer step: that
        component only changes the row's norm, which normalize_decoder_ undoes anyway, and it
        would otherwise pollute Adam's moment estimates.

        On CPU the rows go in cache-sized blocks: whole-matrix temporaries made this 5x slower."""
        grad, w = self.W_dec.grad, self.W_dec
        if grad is None:
            return
        rows = self.n_latents if w.is_cuda else max(1, (1 << 18) // self.d_model)
        for start in range(0, self.n_latents, rows):
            g, v = grad[start:start + rows], w[start:start + rows]
            along = (g * v).sum(1, keepdim=True) / (v * v).sum(1, keepdim=True).clamp_min(1e-12)
            g.addcmul_(v, along, value=-1)

    # --- encoding / decoding for evaluation ------------------------------------------------------

    def encode(self, x: Tensor) -> Codes:
        """Inference codes of ``x`` [batch, d_model] raw: Codes [batch, K], K the largest number of
        active latents in a row (at least 1; k for TopK and Switch), values >= 0 in normalised
        units. Runs without autograd. Subclasses override this or encode_dense."""
        return _dense_to_codes(self.encode_dense(x))

    def encode_dense(self, x: Tensor) -> Tensor:
        """Activations of ``x`` [batch, d_model] raw as a dense [batch, n_latents] tensor
        (normalised units); for eval-sized batches."""
        return self.encode(x).to_dense(self.n_latents)

    def encode_slice(self, x: Tensor, start: int, stop: int) -> Tensor:
        """Activations of latents [start, stop) only for ``x`` [batch, d_model] raw:
        [batch, stop - start], normalised units, exact. Raises PlatformError unless
        0 <= start < stop <= n_latents.

        Default (TopK, Switch): whether a latent is active depends on all the others, so the full
        selection runs (in chunks, memory-bounded) and only the slice is kept. Variants whose
        activation is per-latent (ReLU, JumpReLU, BatchTopK at inference) override this to
        multiply only the slice's rows of W_enc."""
        self._check_slice(start, stop)
        codes = self.encode(x)
        inside = (codes.indices >= start) & (codes.indices < stop)
        out = codes.values.new_zeros(codes.values.shape[0], stop - start)
        local = torch.where(inside, codes.indices - start, 0)
        return out.scatter_add_(1, local, codes.values * inside)

    def _check_slice(self, start: int, stop: int) -> None:
        if not 0 <= start < stop <= self.n_latents:
            raise PlatformError(f"latent slice [{start}, {stop}) is outside [0, {self.n_latents})",
                                "pass 0 <= start < stop <= n_latents")

    def decode(self, codes: Codes) -> Tensor:
        """Reconstruction from (possibly padded) codes, values and indices [batch, K]:
        x_hat = (sum_j values[:, j] W_dec[indices[:, j]] + b_out) / input_scale (output_scale for
        a transcoder), [batch, d_out], raw units. Padding entries (value 0) add nothing."""
        recon = F.embedding_bag(codes.indices, self.W_dec, mode="sum", per_sample_weights=codes.values)
        return self._to_raw(recon + self.b_out)

    # --- training --------------------------------------------------------------------------

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, target: Tensor | None = None) -> SAEOutput:
        """One training (or evaluation) pass.

        x: [batch, d_model] raw. dead_mask: bool [n_latents], the latents counted as dead (turns
        on AuxK in the variants that have it; the others ignore it). target: a transcoder's paired
        output rows [batch, d_out] raw, needed for its loss parts (an SAE's target is x).
        Returns SAEOutput: recon [batch, d_out] raw, l0 (scalar), fired (bool [n_latents]) and the
        unweighted loss parts. Raises PlatformError if x or target has the wrong width."""
        raise NotImplementedError

    def loss(self, x: Tensor, out: SAEOutput) -> tuple[Tensor, dict[str, Tensor]]:
        """(total, named weighted terms), all scalars: "mse" = mean((out.recon - x)^2) times the
        output scale squared (per element, in normalised units, where inputs have mean square 1 per
        coordinate) plus each of out.parts times its coefficient (``COEFFS``).
        ``x``: [batch, d_out] raw, what the reconstruction should match: the input for an SAE,
        the target for a transcoder."""
        err = (out.recon - x.to(out.recon.dtype)) * self._out_scale
        terms = {"mse": err.pow(2).mean()}
        for name, part in out.parts.items():
            terms[name] = self.hparams[self.COEFFS[name]] * part
        return sum(terms.values()), terms


def _aux_target(xs: Tensor, recon_n: Tensor) -> Tensor:
    return (xs - recon_n).detach()


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
        the dead latents: (vals, idx, aux or None), all [batch, *].

        The dense pre-activations are the one [batch, n_latents] tensor of the step. They are
        computed without autograd, in row blocks of at most TRAIN_BLOCK_ELEMENTS (one block for
        typical sizes; bounded memory for huge dictionaries), into a scratch block kept between
        training steps: re-allocating it cost ~10% of a CPU step in page faults. Selection copies
        what it keeps, so the reuse is safe."""
        batch, n = xs.shape[0], self.n_latents
        xc = xs.detach() - self.b_pre
        low = self.training and self.selection_dtype not in (None, xs.dtype)
        if low:  # pick in low precision, then recompute the picked values exactly (below)
            xc_s, w_s, b_s = (t.detach().to(self.selection_dtype) for t in (xc, self.W_enc, self.b_enc))
        else:
            xc_s, w_s, b_s = xc, self.W_enc, self.b_enc
        rows = max(1, min(batch, TRAIN_BLOCK_ELEMENTS // n))
        block = self._scratch_block(rows, xc_s)
        vals, idx = xc_s.new_empty(batch, width), torch.empty(batch, width, dtype=torch.long, device=xs.device)
        k_aux = self.hparams["k_aux"]
        aux = None
        if dead_mask is not None and k_aux > 0:
            aux = xc_s.new_empty(batch, k_aux), torch.empty(batch, k_aux, dtype=torch.long, device=xs.device)
            alive = ~dead_mask.to(device=xs.device, dtype=torch.bool)
        for start in range(0, batch, rows):
            stop = min(start + rows, batch)
            pre = torch.addmm(b_s, xc_s[start:stop], w_s.t(), out=block[:stop - start])
            torch.topk(pre, width, dim=1, sorted=sort, out=(vals[start:stop], idx[start:stop]))
            if aux is not None:  # pre is spent: mask it in place rather than copy it
                pre.masked_fill_(alive, float("-inf"))
                torch.topk(pre, k_aux, dim=1, sorted=False, out=(aux[0][start:stop], aux[1][start:stop]))
        if low:
            vals = self._exact_pre(xc, vals, idx)
            aux = None if aux is None else (self._exact_pre(xc, *aux), aux[1])
        return vals, idx, aux

    def _exact_pre(self, xc: Tensor, picked: Tensor, idx: Tensor) -> Tensor:
        """The pre-activations at ``idx`` [batch, w] recomputed in the parameters' precision (O(batch
        * w * d_model): one dot product per pick); entries picked as -inf (masked) stay -inf."""
        exact = sddmm(Pattern.regular(idx, self.n_latents), xc, self.W_enc).view_as(idx) + self.b_enc[idx]
        return torch.where(torch.isneginf(picked), float("-inf"), exact)

    def _scratch_block(self, rows: int, like: Tensor) -> Tensor:
        if not self.training:
            return like.new_empty(rows, self.n_latents)
        block = getattr(self, "_scratch", None)
        if block is None or block.shape != (rows, self.n_latents) or block.device != like.device \
                or block.dtype != like.dtype:
            self._scratch = None  # free the old block before allocating the new one
            block = self._scratch = like.new_empty(rows, self.n_latents)
        return block

    def _sparse_decode(self, pattern: Pattern, vals: Tensor) -> Tensor:
        return _SparseDecode.apply(vals, self.W_dec, pattern)

    def _aux_part(self, xs, ys, recon_n, aux, dead_mask, scale=None) -> Tensor:
        """AuxK: the dead latents (read from xs) model the error against the target ys."""
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
        width."""
        k, multi = self.hparams["k"], self.hparams["multi_topk"]
        xs = self._normalize(x)
        ys = self._target(xs, target)
        width = min(4 * k, self.n_latents) if multi else k
        top_vals, top_idx, aux = self._scan(xs, width, dead_mask, sort=multi)  # sorted: top k come first
        wide = Pattern.regular(top_idx, self.n_latents)
        z_wide = _SelectedPre.apply(xs, self.b_pre, self.W_enc, self.b_enc, top_vals, wide).relu()
        parts = {}
        if multi and ys is not None:
            parts["multi_topk"] = (self._sparse_decode(wide, z_wide) + self.b_out - ys).pow(2).mean()
        if multi:
            pattern, z = Pattern.regular(top_idx[:, :k], self.n_latents), z_wide[:, :k]
        else:
            pattern, z = wide, z_wide
        recon_n = self._sparse_decode(pattern, z) + self.b_out
        if aux is not None and ys is not None:
            parts["auxk"] = self._aux_part(xs, ys, recon_n, aux, dead_mask)
        l0, fired = _sparse_stats(pattern, z)
        return SAEOutput(self._to_raw(recon_n), l0, fired, parts, sparse=(pattern, z.reshape(-1)))

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
            vals, idx = pre.topk(min(k, stop - start), dim=1)
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
        cand_vals, cand_idx, aux = self._scan(xs, per_row, dead_mask)
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
        Raises PlatformError on a wrong width."""
        xs = self._normalize(x)
        ys = self._target(xs, target)
        if self.training:
            pattern, sel_vals, aux = self._select_batch(xs, dead_mask)
        else:
            with torch.no_grad():
                pattern, sel_vals = self._select_threshold(F.linear(xs - self.b_pre, self.W_enc, self.b_enc))
            aux = self._scan(xs, 1, dead_mask)[2] if dead_mask is not None else None
        z = _SelectedPre.apply(xs, self.b_pre, self.W_enc, self.b_enc, sel_vals, pattern).relu()
        recon_n, parts = self._decode_parts(pattern, z, ys)
        if aux is not None and ys is not None:
            parts["auxk"] = self._aux_part(xs, ys, recon_n, aux, dead_mask)
        l0, fired = _sparse_stats(pattern, z)
        return SAEOutput(self._to_raw(recon_n), l0, fired, parts, sparse=(pattern, z))

    def _decode_parts(self, pattern: Pattern, z: Tensor, ys: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        """(normalised reconstruction, extra loss parts against the target ys) from the selected codes."""
        return self._sparse_decode(pattern, z) + self.b_out, {}

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
        Raises PlatformError unless 0 <= start < stop <= n_latents."""
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

    def _decode_parts(self, pattern: Pattern, z: Tensor, ys: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        widths = self.hparams["matryoshka_widths"]
        cols, rows, flat = pattern.cols, pattern.rows, z.reshape(-1)
        recon_n, inner, lo = self.b_out.expand(pattern.batch, -1), [], 0
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


class SwitchSAE(TopKSAE):
    """Switch SAE (Mudide et al. 2024, "Efficient Dictionary Learning with Switch Sparse
    Autoencoders", arXiv:2410.08201): a softmax router sends each row to one of n_experts TopK
    SAEs over n_latents / n_experts latents each.

    Only the chosen expert's encoder rows are multiplied (rows grouped by expert, one matmul per
    expert), so encoder FLOPs fall by n_experts; the public implementation computes the dense
    encoder and masks it, which never realises that saving. Expert e's latent j is global latent
    e * (n_latents / n_experts) + j, and the code values include the router probability
    (x_hat = p * W_dec^T z + b_pre, which is how the router gets a gradient), so downstream code
    sees one flat dictionary obeying the same decode rule as every other variant.
    Load balancing: balance_coeff * E * sum_e f_e P_e (Fedus et al. 2022, "Switch Transformers",
    §2.2). Not available as a transcoder."""

    variant = "switch"
    DEFAULTS = {"n_experts": 8, "k": 32, "k_aux": None, "aux_coeff": 1 / 32, "balance_coeff": 0.01}
    COEFFS = {"auxk": "aux_coeff", "balance": "balance_coeff"}

    def __init__(self, d_model, n_latents, device=None, dtype=torch.float32, **hparams):
        super().__init__(d_model, n_latents, device, dtype, **hparams)
        n_experts = self.hparams["n_experts"]
        self.expert_size = n_latents // n_experts
        self.hparams["k_aux"] = min(self.hparams["k_aux"], self.expert_size)
        router = torch.randn(n_experts, d_model, device=device, dtype=dtype) / math.sqrt(d_model)
        self.W_router = nn.Parameter(router)
        self.b_router = nn.Parameter(torch.zeros(n_experts, device=device, dtype=dtype))

    def route(self, xc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Route centred normalised rows ``xc`` = x * input_scale - b_pre [batch, d_model]:
        (probs [batch, n_experts], chosen expert [batch] int64, its probability [batch])."""
        probs = F.linear(xc, self.W_router, self.b_router).softmax(-1)
        p, expert = probs.max(-1)
        return probs, expert, p

    def expert_pre(self, e: int, xc_rows: Tensor) -> Tensor:
        """Pre-activations of expert e, [rows, n_latents / n_experts], for the centred normalised
        rows routed to it, ``xc_rows`` [rows, d_model]: the only encoder matmul."""
        lo, hi = e * self.expert_size, (e + 1) * self.expert_size
        return F.linear(xc_rows, self.W_enc[lo:hi], self.b_enc[lo:hi])

    @torch.no_grad()
    def _select(self, xc: Tensor, expert: Tensor, dead_mask: Tensor | None, with_aux: bool):
        """Per-expert TopK (and AuxK among that expert's dead latents), returned in input row
        order with global latent ids: (vals, idx, aux or None, rows per expert)."""
        k, k_aux, m = self.hparams["k"], self.hparams["k_aux"], self.expert_size
        order = expert.argsort(stable=True)
        counts = torch.bincount(expert, minlength=self.hparams["n_experts"])
        x_sorted = xc.detach()[order]
        picks, aux_picks, start = [], [], 0
        for e, count in enumerate(counts.tolist()):
            if count == 0:
                continue
            pre = self.expert_pre(e, x_sorted[start:start + count])
            picks.append(pre.topk(k, dim=1, sorted=False))
            if with_aux:  # pre is spent: mask it in place rather than copy it
                pre.masked_fill_(~dead_mask[e * m:(e + 1) * m].to(pre.device), float("-inf"))
                aux_picks.append(pre.topk(k_aux, dim=1, sorted=False))
            start += count
        offset = expert[order][:, None] * m  # expert-local -> global latent ids

        def unsort(pairs):  # back to input row order, global ids
            vals, idx = torch.cat([v for v, _ in pairs]), torch.cat([i for _, i in pairs]) + offset
            return (torch.empty_like(vals).index_copy_(0, order, vals),
                    torch.empty_like(idx).index_copy_(0, order, idx))

        aux = unsort(aux_picks) if with_aux else None
        return *unsort(picks), aux, counts.to(xc.dtype)

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, target: Tensor | None = None) -> SAEOutput:
        """x [batch, d_model] raw -> SAEOutput, recon [batch, d_model] raw; codes: k entries per
        row, p * ReLU(TopK_k(expert pre-activations)), global latent ids. Parts: "balance" always,
        "auxk" given dead_mask [n_latents] (among the chosen expert's dead latents). ``target`` is
        ignored (an SAE's target is x). Raises PlatformError on a wrong width."""
        xs = self._normalize(x)
        xc = xs - self.b_pre
        probs, expert, p = self.route(xc)
        with_aux = dead_mask is not None and self.hparams["k_aux"] > 0
        sel_vals, sel_idx, aux, counts = self._select(xc, expert, dead_mask, with_aux)
        pattern = Pattern.regular(sel_idx, self.n_latents)
        z = _SelectedPre.apply(xs, self.b_pre, self.W_enc, self.b_enc, sel_vals, pattern).relu() * p[:, None]
        recon_n = self._sparse_decode(pattern, z) + self.b_pre
        n_experts = self.hparams["n_experts"]
        parts = {"balance": n_experts * (counts / x.shape[0] * probs.mean(0)).sum()}
        if aux is not None:
            parts["auxk"] = self._aux_part(xs, xs, recon_n, aux, dead_mask, scale=p.detach()[:, None])
        l0, fired = _sparse_stats(pattern, z)
        return SAEOutput(self._to_raw(recon_n), l0, fired, parts, sparse=(pattern, z.reshape(-1)))

    @torch.no_grad()
    def encode(self, x: Tensor) -> Codes:
        """x [batch, d_model] raw -> Codes [batch, k], values including the router probability."""
        xc = self._centered(x)
        _, expert, p = self.route(xc)
        vals, idx, _, _ = self._select(xc, expert, None, False)
        return Codes(vals.relu() * p[:, None], idx)


class _DenseSAE(SparseAutoencoder):
    """Shared path of the variants whose activation is per latent: dense codes, dense decode."""

    def _activate(self, pre: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def _slice_activation(self, pre: Tensor, start: int, stop: int) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, target: Tensor | None = None) -> SAEOutput:
        """x [batch, d_model] raw -> SAEOutput, recon [batch, d_out] raw, dense codes
        [batch, n_latents] (``dense``), part "l1" (ReLU) or "l0" (JumpReLU). dead_mask and target
        are accepted for a uniform trainer and ignored: these variants have no AuxK and no loss
        part that needs the target. Raises PlatformError on a wrong width."""
        xc = self._centered(x)
        z, parts = self._activate(F.linear(xc, self.W_enc, self.b_enc))
        recon_n = z @ self.W_dec + self.b_out
        l0, fired = _dense_stats(z)
        return SAEOutput(self._to_raw(recon_n), l0, fired, parts, dense=z)

    @torch.no_grad()
    def encode_dense(self, x: Tensor) -> Tensor:
        """x [batch, d_model] raw -> [batch, n_latents] activations, normalised units."""
        return self._activate(F.linear(self._centered(x), self.W_enc, self.b_enc))[0]

    @torch.no_grad()
    def encode_slice(self, x: Tensor, start: int, stop: int) -> Tensor:
        """[batch, stop - start], multiplying only the slice's rows of W_enc. Raises PlatformError
        unless 0 <= start < stop <= n_latents."""
        self._check_slice(start, stop)
        pre = F.linear(self._centered(x), self.W_enc[start:stop], self.b_enc[start:stop])
        return self._slice_activation(pre, start, stop)


class ReLUSAE(_DenseSAE):
    """z = ReLU(W_enc (x - b_pre) + b_enc) with an L1 penalty weighted by decoder row norms
    (Bricken et al. 2023, "Towards Monosemanticity", and Conerly et al.'s April 2024 update): the
    weighting keeps the penalty honest if the trainer ever lets decoder norms float.

    l1_coeff defaults to Anthropic's lambda = 5 (on summed squared error) expressed for this
    module's per-element MSE: 5 / d_model."""

    variant = "relu"
    DEFAULTS = {"l1_coeff": None}
    COEFFS = {"l1": "l1_coeff"}

    def __init__(self, d_model, n_latents, device=None, dtype=torch.float32, **hparams):
        super().__init__(d_model, n_latents, device, dtype, **hparams)
        if self.hparams["l1_coeff"] is None:
            self.hparams["l1_coeff"] = 5.0 / d_model

    def _activate(self, pre):
        z = pre.relu()
        return z, {"l1": (z * self.W_dec.norm(dim=1)).sum(1).mean()}

    def _slice_activation(self, pre, start, stop):
        return pre.relu()


class JumpReLUSAE(_DenseSAE):
    """z = pre * H(pre - theta) with a learned per-latent threshold theta and an L0 penalty
    (Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU
    Sparse Autoencoders", §3). Both are piecewise constant in theta, so theta learns through
    straight-through pseudo-derivatives with a rectangle kernel of width `bandwidth` (§4).
    theta is stored as log theta, keeping it positive."""

    variant = "jumprelu"
    DEFAULTS = {"l0_coeff": 1e-3, "bandwidth": 1e-3, "init_threshold": 1e-3}
    COEFFS = {"l0": "l0_coeff"}

    def __init__(self, d_model, n_latents, device=None, dtype=torch.float32, **hparams):
        super().__init__(d_model, n_latents, device, dtype, **hparams)
        init = math.log(self.hparams["init_threshold"])
        self.log_threshold = nn.Parameter(torch.full((n_latents,), init, device=device, dtype=dtype))

    def _activate(self, pre):
        theta, eps = self.log_threshold.exp(), self.hparams["bandwidth"]
        z = _JumpReLU.apply(pre, theta, eps)
        return z, {"l0": _Step.apply(pre, theta, eps).sum(1).mean()}

    def _slice_activation(self, pre, start, stop):
        theta = self.log_threshold[start:stop].exp()
        return pre * (pre > theta)


_CLASSES = {cls.variant: cls for cls in (TopKSAE, BatchTopKSAE, MatryoshkaBatchTopKSAE, SwitchSAE, JumpReLUSAE,
                                          ReLUSAE)}


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PlatformError(f"{name} must be a positive integer, got {value!r}", f"set {name} to an integer >= 1")


def _check_hparams(variant: Variant, n_latents: int, hp: dict) -> None:
    if "k" in hp:
        _positive_int("k", hp["k"])
        per = n_latents // hp["n_experts"] if variant == "switch" else n_latents
        where = "latents per expert (n_latents / n_experts)" if variant == "switch" else "n_latents"
        if hp["k"] > per:
            raise PlatformError(f"k = {hp['k']} is larger than the {per} {where}",
                                f"use k <= {per}, or a bigger dictionary")
    if hp.get("k_aux") is not None and (isinstance(hp["k_aux"], bool) or not isinstance(hp["k_aux"], int)
                                         or hp["k_aux"] < 0):
        raise PlatformError(f"k_aux must be a non-negative integer, got {hp['k_aux']!r}",
                            "use 0 to switch AuxK off, or e.g. 256")
    if "matryoshka_widths" in hp:
        matryoshka_widths(n_latents, hp["matryoshka_widths"])
    for name in ("aux_coeff", "multi_coeff", "balance_coeff", "l1_coeff", "l0_coeff", "matryoshka_coeff"):
        if hp.get(name) is not None and not hp[name] >= 0:
            raise PlatformError(f"{name} must be >= 0, got {hp[name]!r}", f"set {name} to a non-negative number")
    for name in ("bandwidth", "init_threshold"):
        if name in hp and not hp[name] > 0:
            raise PlatformError(f"{name} must be > 0, got {hp[name]!r}", f"set {name} to a small positive number, e.g. 1e-3")
    if "threshold_momentum" in hp and not 0 <= hp["threshold_momentum"] < 1:
        raise PlatformError(f"threshold_momentum must be in [0, 1), got {hp['threshold_momentum']!r}",
                            "use e.g. 0.99")


def build_sae(variant: Variant, d_model: int, n_latents: int, *, device=None, dtype=torch.float32,
              d_out: int | None = None, **hparams) -> SparseAutoencoder:
    """The one constructor the platform uses: build_sae(**sae.config) rebuilds a model.
    ``d_out`` makes it a transcoder (d_model in, d_out out; every variant but switch; Dunefsky et
    al. 2024, "Transcoders Find Interpretable LLM Feature Circuits"). ``hparams``: the variant's
    DEFAULTS keys. Raises PlatformError for an unknown variant or setting, a switch transcoder,
    or an out-of-range size or setting."""
    if variant not in _CLASSES:
        raise PlatformError(f"unknown SAE variant {variant!r}", f"use one of {', '.join(VARIANTS)}")
    _positive_int("d_model", d_model)
    _positive_int("n_latents", n_latents)
    if d_out is not None:
        _positive_int("d_out", d_out)
        if variant == "switch":
            raise PlatformError("a switch transcoder is not supported: the router and AuxK of the switch SAE read "
                                "and reconstruct the same space", "train a topk, batchtopk, matryoshka_batchtopk, "
                                "jumprelu or relu transcoder")
    cls = _CLASSES[variant]
    unknown = sorted(set(hparams) - set(cls.DEFAULTS))
    if unknown:
        raise PlatformError(f"{variant} SAE has no setting(s) {', '.join(unknown)}",
                            f"its settings are: {', '.join(cls.DEFAULTS) or '(none)'}")
    hp = {**cls.DEFAULTS, **hparams}
    if variant == "switch":
        _positive_int("n_experts", hp["n_experts"])
        if n_latents % hp["n_experts"]:
            raise PlatformError(f"n_latents = {n_latents} is not divisible by n_experts = {hp['n_experts']}",
                                "pick n_latents as a multiple of n_experts, e.g. 16384 with 8 experts")
    _check_hparams(variant, n_latents, hp)
    if d_out is not None:
        hparams["d_out"] = d_out
    return cls(d_model, n_latents, device=device, dtype=dtype, **hparams)
