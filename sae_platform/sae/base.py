"""What every SAE variant shares: the training recipe's helpers, the output types and the
``SparseAutoencoder`` base class.

Recipe helpers (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"): ``ADAM_EPS``,
``lr_for`` (Adam lr ~ 1/sqrt(n_latents)), ``geometric_median`` (b_pre's init),
``input_scale_for`` (the scalar that puts inputs at E||x||^2 = d_model) and ``normalized_mse``.
Outputs: ``Codes`` (padded sparse codes), ``SAEOutput`` (one forward pass) and the l0 / fired
statistics of sparse and dense codes. ``SparseAutoencoder``: parameters, input normalisation,
calibration, the decoder constraint, encode / decode for evaluation and the weighted loss; the
variants (``topk.py``, ``switch.py``, ``dense.py``) supply forward and encoding.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_platform.errors import PlatformError
from sae_platform.sae.kernels import Pattern, row_dots

ADAM_EPS = 6.25e-10  # Gao et al.: a small eps matters with tiny gradients on huge dictionaries


def lr_for(n_latents: int) -> float:
    """Adam learning rate for a dictionary of n_latents (Gao et al.: lr ~ 1/sqrt(n), 2e-4 at 16k)."""
    if n_latents < 1:
        raise PlatformError(f"n_latents must be positive, got {n_latents}", "pass the dictionary size, e.g. 16384")
    return 2e-4 * math.sqrt(16384 / n_latents)


def geometric_median(x: Tensor, iters: int = 50, eps: float = 1e-8) -> Tensor:
    """The geometric median of rows ``x`` [n, d] by Weiszfeld's iteration, in float64; returns [d].
    b_pre starts here rather than at the mean because a few huge-norm rows (attention sinks, outlier
    tokens) drag the mean far from where the bulk of the data is.

    Each iteration is two matrix-vector products over ``x``: the distances come from
    ||x - y||^2 = ||x||^2 - 2 x.y + ||y||^2 and the weighted sum from w @ x, so the only [n, d]
    tensor held is ``x`` in float64 (the direct form made two more per iteration: 3x the memory
    of a 16,384-row calibration sample, and 8x the time)."""
    x = x.double()
    squared_norms = x.pow(2).sum(1)
    y = x.mean(0)
    for _ in range(iters):
        distances = (squared_norms - 2 * (x @ y) + y.dot(y)).clamp_min(0).sqrt()
        w = 1.0 / distances.clamp_min(eps)
        y = (w @ x) / w.sum()
    return y


# Rows of the initial dictionary drawn per block from their own generator: rows [a, b) of a
# dictionary are the same whichever process draws them (a latent shard draws only its own blocks),
# and no process ever holds more than one block beyond its rows. Changing it changes every init.
INIT_BLOCK_ROWS = 4096


def unit_rows(seed: int, rows: range, width: int, device=None, dtype=torch.float32) -> Tensor:
    """Rows ``rows`` (a range of latent ids) of the initial dictionary of ``seed``: [len(rows), width],
    each row a standard normal draw scaled to unit norm. Block b (rows [b, b + 1) * INIT_BLOCK_ROWS)
    comes from a generator seeded with (seed, b) on ``device``'s type, so a latent shard draws the
    very rows one process would, without drawing the others (sae_platform.latent_parallel)."""
    out = torch.empty(len(rows), width, device=device, dtype=dtype)
    if not len(rows) or out.is_meta:  # meta: shapes only (latent_parallel checks a layout on them)
        return out
    generator = torch.Generator(device=out.device)
    for block in range(rows.start // INIT_BLOCK_ROWS, (rows.stop - 1) // INIT_BLOCK_ROWS + 1):
        generator.manual_seed((seed * 1_000_003 + block) % 2**63)
        drawn = torch.randn(INIT_BLOCK_ROWS, width, generator=generator, device=out.device, dtype=dtype)
        lo, hi = max(rows.start, block * INIT_BLOCK_ROWS), min(rows.stop, (block + 1) * INIT_BLOCK_ROWS)
        out[lo - rows.start:hi - rows.start] = drawn[lo - block * INIT_BLOCK_ROWS:hi - block * INIT_BLOCK_ROWS]
    return out.div_(out.norm(dim=1, keepdim=True))


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
    l0: Tensor                    # scalar: mean active latents per row (``mean_active`` of ``active``)
    fired: Tensor                 # bool [n_latents]: fired at least once in this batch
    parts: dict[str, Tensor] = field(default_factory=dict)
    dense: Tensor | None = None   # [batch, n_latents] codes (ReLU, JumpReLU)
    sparse: tuple[Pattern, Tensor] | None = None  # (pattern, flat values) for the TopK family
    active: Tensor | None = None  # int64 scalar: active (row, latent) pairs of the batch, what ranks sum

    @classmethod
    def counted(cls, recon: Tensor, active: Tensor, fired: Tensor, parts: dict[str, Tensor], **codes) -> "SAEOutput":
        """The output of a batch of ``recon.shape[0]`` rows with ``active`` (int64) active (row, latent)
        pairs: its l0 is ``mean_active`` of them, in recon's dtype. ``codes``: ``dense`` or ``sparse``."""
        return cls(recon, mean_active(active, recon.shape[0], recon.dtype), fired, parts, active=active, **codes)

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


def mean_active(active: Tensor, rows: int, dtype: torch.dtype) -> Tensor:
    """L0, the mean active latents per row (a scalar of ``dtype``), from ``active``, the int64 count of
    active (row, latent) pairs over ``rows`` rows. The one division of every L0: a latent shard or a
    data-parallel replica sums the integer counts of its peers first and divides once, so its L0 is
    one process's bit for bit (dividing each part, then summing, is not)."""
    return active.to(dtype) / max(rows, 1)


def _sparse_stats(pattern: Pattern, vals: Tensor) -> tuple[Tensor, Tensor]:
    """(active: int64 count of the active entries, fired: bool [n_latents]) without a device sync."""
    active = vals.detach().reshape(-1) > 0
    hits = torch.zeros(pattern.n_latents, dtype=vals.dtype, device=vals.device).index_add_(
        0, pattern.cols, active.to(vals.dtype))
    return active.sum(), hits > 0


def _dense_stats(z: Tensor) -> tuple[Tensor, Tensor]:
    """(active: int64 count of the codes > 0, fired: bool [n_latents]) of codes ``z`` [batch, n_latents]."""
    active = z.detach() > 0
    return active.sum(), active.any(0)


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
    than d_model raises PlatformError.

    Init: rows of ``unit_rows`` (per-block generators seeded from one draw of the global RNG, so
    ``torch.manual_seed`` fixes them); the keyword ``first_latent`` (default 0) makes this model rows
    [first_latent, first_latent + n_latents) of the whole dictionary: a latent shard
    (sae_platform.latent_parallel) starts from the rows one process would hold there."""

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
        self.skip_connection = bool(hparams.pop("skip_connection", False))
        self.d_model, self.n_latents = d_model, n_latents
        start = hparams.pop("first_latent", 0)  # a latent shard (sae_platform.latent_parallel): its first row
        self.hparams = {**self.DEFAULTS, **hparams}
        w_dec, w_enc = self._initial_dictionary(range(start, start + n_latents), d_model, device, dtype)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_enc)
        if self.d_out is not None:
            self.b_dec = nn.Parameter(torch.zeros(self.d_out, device=device, dtype=dtype))
            self.register_buffer("output_scale", torch.ones((), device=device, dtype=dtype))
            if self.skip_connection:  # zero at init: training starts from the plain transcoder
                self.W_skip = nn.Parameter(torch.zeros(self.d_out, d_model, device=device, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(n_latents, device=device, dtype=dtype))
        self.b_pre = nn.Parameter(torch.zeros(d_model, device=device, dtype=dtype))
        self.register_buffer("input_scale", torch.ones((), device=device, dtype=dtype))

    def _initial_dictionary(self, rows: range, d_model: int, device, dtype) -> tuple[Tensor, Tensor]:
        """(W_dec [rows, d_out], W_enc [rows, d_model]) at init: ``unit_rows`` of a seed drawn once from
        the global RNG, W_enc = W_dec (tied) for an SAE, its own rows for a transcoder. On the meta
        device nothing is drawn (a checkpoint's weights are loaded into it: ``with_weights``), so
        opening a checkpoint neither spends seconds of RNG on a wide dictionary nor moves the RNG."""
        width = self.d_out or d_model
        if torch.device(device or "cpu").type == "meta":
            return (torch.empty(len(rows), width, device=device, dtype=dtype),
                    torch.empty(len(rows), d_model, device=device, dtype=dtype))
        seed = int(torch.randint(0, 2**62, (), dtype=torch.long))  # one draw of the global RNG (torch.manual_seed)
        w_dec = unit_rows(seed, rows, width, device=device, dtype=dtype)
        if self.d_out is None:
            return w_dec, w_dec.clone()
        return w_dec, unit_rows(seed + 1, rows, d_model, device=device, dtype=dtype)  # two spaces: not tied

    @property
    def config(self) -> dict:
        """Everything build_sae needs to rebuild this model (weights come from state_dict)."""
        extra = {} if self.d_out is None else {"d_out": self.d_out}
        if self.skip_connection:
            extra["skip_connection"] = True
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

    def _offset(self, xs: Tensor) -> Tensor:
        """What the output adds to the decoded latents, normalised units: b_out [d_out], plus for a
        skip transcoder the affine skip connection xs @ W_skip.T [batch, d_out] (Paulo, Shabalin
        and Belrose 2025, "Transcoders Beat Sparse Autoencoders for Interpretability", section 2:
        y = W_dec z + W_skip x + b_dec). ``xs``: the normalised input [batch, d_model]."""
        if not self.skip_connection:
            return self.b_out
        return F.linear(xs, self.W_skip, self.b_out)

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

        grad[i] -= (grad[i] . W_dec[i]) / |W_dec[i]|^2 * W_dec[i], in place, for every row i of the
        [n_latents, d_out] gradient; a zero row of W_dec leaves its gradient row as it is."""
        grad, w = self.W_dec.grad, self.W_dec
        if grad is None:
            return
        along = row_dots(grad, w) / torch.linalg.vector_norm(w, dim=1).square().clamp_min(1e-12)
        grad.addcmul_(w, along.unsqueeze(1), value=-1)

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
        [batch, stop - start], normalised units, exact; [batch, 0] for an empty slice (a feature
        shard with no latent: ``features.feature_shards``). Raises PlatformError unless
        0 <= start <= stop <= n_latents.

        Default (TopK, Switch): whether a latent is active depends on all the others, so the full
        selection runs (in chunks, memory-bounded) and only the slice is kept. Variants whose
        activation is per-latent (ReLU, JumpReLU, BatchTopK at inference) override this to
        multiply only the slice's rows of W_enc."""
        self._check_slice(start, stop)
        if start == stop:
            return x.new_zeros(x.shape[0], 0, dtype=self.W_dec.dtype)
        codes = self.encode(x)
        inside = (codes.indices >= start) & (codes.indices < stop)
        out = codes.values.new_zeros(codes.values.shape[0], stop - start)
        local = torch.where(inside, codes.indices - start, 0)
        return out.scatter_add_(1, local, codes.values * inside)

    def _check_slice(self, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= self.n_latents:
            raise PlatformError(f"latent slice [{start}, {stop}) is outside [0, {self.n_latents})",
                                "pass 0 <= start <= stop <= n_latents")

    def decode(self, codes: Codes, x: Tensor | None = None, offset: bool = True) -> Tensor:
        """Reconstruction from (possibly padded) codes, values and indices [batch, K]:
        x_hat = (sum_j values[:, j] W_dec[indices[:, j]] + b_out) / input_scale (output_scale for
        a transcoder), [batch, d_out], raw units. Padding entries (value 0) add nothing. A skip
        transcoder also adds its skip connection of the input ``x`` [batch, d_model] raw (the rows
        the codes came from), which it then requires: PlatformError without it. ``offset`` False:
        the latents' part alone (no b_out, no skip), what one latent shard adds to a sharded SAE's
        reconstruction (``sharded_sae``)."""
        recon = F.embedding_bag(codes.indices, self.W_dec, mode="sum", per_sample_weights=codes.values)
        if not offset:
            return self._to_raw(recon)
        if not self.skip_connection:
            return self._to_raw(recon + self.b_out)
        if x is None:
            raise PlatformError("a skip transcoder's output depends on its input, but decode was given codes only",
                                "pass the input rows the codes came from: sae.decode(codes, x)")
        return self._to_raw(recon + self._offset(self._normalize(x)))

    # --- training --------------------------------------------------------------------------

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, target: Tensor | None = None) -> SAEOutput:
        """One training (or evaluation) pass.

        x: [batch, d_model] raw. dead_mask: bool [n_latents], the latents counted as dead (turns
        on AuxK in the variants that have it; the others ignore it). target: a transcoder's paired
        output rows [batch, d_out] raw, needed for its loss parts (an SAE's target is x).
        Returns SAEOutput: recon [batch, d_out] raw, l0 (scalar), fired (bool [n_latents]) and the
        unweighted loss parts. Raises PlatformError if x or target has the wrong width."""
        raise NotImplementedError

    def param_groups(self, lr: float) -> list[dict]:
        """The optimizer's parameter groups at Adam lr ``lr``: one group, every parameter in
        ``parameters()`` order (a variant whose parameter needs its own lr overrides this)."""
        return [{"params": list(self.parameters()), "lr": lr}]

    def training_warning(self, l0: float) -> str | None:
        """Something training should say about this model, checked at every metrics row with the
        batch's L0 (mean active latents per token); None: nothing (JumpReLU: stalled thresholds)."""
        return None

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


def with_weights(model: SparseAutoencoder, state: dict[str, Tensor], device=None,
                 left_out: tuple[str, ...] = ()) -> SparseAutoencoder:
    """``model`` (built on the meta device: shapes only, no init drawn, nothing allocated) holding the
    tensors of ``state`` (a checkpoint's state_dict) on ``device`` as its parameters and buffers.
    They are taken as they are (``load_state_dict(assign=True)``), not copied into a second,
    initialised set: at 2^20 latents x 576 that set was GBs and seconds of RNG. ``left_out``: the
    tensors ``state`` does not hold, which stay on the meta device (a part of the model never run:
    a dense SAE's pass 1 encodes, so it reads no W_dec; any use of one raises). Raises RuntimeError
    (``load_state_dict``'s, or naming them) for a missing or unexpected tensor or a shape that differs."""
    loaded = model.load_state_dict({name: tensor.to(device) for name, tensor in state.items()}, assign=True,
                                   strict=not left_out)
    if left_out and (loaded.unexpected_keys or sorted(loaded.missing_keys) != sorted(left_out)):
        raise RuntimeError(f"the tensors given to a {type(model).__name__} lack {sorted(loaded.missing_keys)} and add "
                           f"{sorted(loaded.unexpected_keys)}, where only {sorted(left_out)} may be left out")
    return model
