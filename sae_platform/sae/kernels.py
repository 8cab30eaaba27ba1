"""Sparse code matrices: CSR patterns and the three kernels the TopK family needs.

A TopK-family code is k of n_latents latents per row, so everything but the dense encoder matmul
can be made sparse (as Gao et al. 2024's kernels do): the decoder and its gradients are
embedding-bag gathers over the active rows, and the encoder *gradient* touches only the selected
(row, latent) pairs.

``Pattern`` (where the nonzeros of a [batch, n_latents] code sit, CSR by row), the kernels
``spmm`` (S @ table), ``spmm_t`` (S^T @ y) and ``sddmm`` (y @ table^T sampled at S), ``topk_rows``
(the picks: an exact row-wise top-k faster than torch's on CPU), ``row_dots``
(the decoder constraint's row-wise dot products), and the two
autograd Functions built on them: ``_SparseDecode`` (the decoder) and ``_SelectedPre`` (the
selected pre-activations, differentiable after a no-grad selection). Used by the TopK family
(``topk.py``), Switch (``switch.py``) and the decoder constraint (``base.py``); no model code here.
"""

import torch
import torch.nn.functional as F
from torch import Tensor


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
        """Exactly indices.shape[1] entries per row (TopK). ``indices`` may be a view (Multi-TopK's first k
        columns): the kernels' embedding bags need contiguous ids, and a [batch, 1] slice flattens to a
        strided view, so the ids are copied where they are not contiguous."""
        batch, width = indices.shape
        offsets = torch.arange(0, batch * width + 1, width, device=indices.device)
        return cls(indices.reshape(-1).contiguous(), offsets, n_latents, width)

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
        """(perm, rows[perm], col_offsets): the entries regrouped by latent, each latent's in row order;
        perm and rows[perm] [nnz] int64, col_offsets [n_latents + 1] int64 (latent c's entries are
        perm[col_offsets[c]:col_offsets[c + 1]]). Computed once per pattern and cached. Sorted as int32
        (latent ids fit), stably: half the time of sorting the int64 ids (3.7 vs 7.2 ms for an AuxK
        pattern's 1M entries on 2 CPU cores)."""
        if self._by_col is None:
            perm = torch.sort(self.cols.to(torch.int32), stable=True).indices
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
    """(y @ table^T) sampled at the pattern's entries, [nnz] in CSR order: for entry (r, c), the dot
    product y[r] . table[c]; y [batch, d], table [n_latents, d], same dtype (the result's). No [nnz, d]
    gather: the kernel behind embedding_bag's per_sample_weights gradient, one dot product per entry.
    Used to recompute the picked pre-activations exactly and for the sparse decoder's gradient with
    respect to the picked values.

    When the table has more rows than y, the dots run latent by latent (``Pattern.by_col``, which the
    backward's ``spmm_t`` shares): each table row is then read once, in order, and y's rows, the
    smaller operand, are the ones gathered. Run entry by entry instead, each entry gathers a row of
    the big table: 2.6x slower on CPU (16,384 x 576 table, 4,096 rows, k = 32), the same dots bit for
    bit."""
    if table.shape[0] <= y.shape[0]:
        return torch.ops.aten._embedding_bag_per_sample_weights_backward(
            y, table, pattern.cols, pattern.offsets, pattern.rows, 0, -1)
    perm, rows, col_offsets = pattern.by_col()
    by_latent = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        table, y, rows, col_offsets, pattern.cols[perm], 0, -1)
    return torch.empty_like(by_latent).index_put_((perm,), by_latent)


# Columns per strided chunk in topk_rows: 8 measured fastest at 16,384 latents, k 32 (bf16 and float32).
TOPK_CHUNK = 8


def topk_rows(x: Tensor, k: int, sorted: bool = False) -> tuple[Tensor, Tensor]:
    """Each row's k largest entries of ``x`` [rows, n] (2-D, k <= n): (values, column indices), [rows, k]
    each (values in x's dtype, indices int64), the values exactly those of ``torch.topk(x, k, dim=1)``;
    only the indices of equal values may differ, whose order torch.topk leaves unspecified too. NaN, which
    torch.topk ranks above every number: a row's NaNs are picked as torch picks them, except that in bf16
    and float16 a NaN with its sign bit set may be left out (its chunk ranks below the others on the bits,
    ``_top_chunks``).
    ``sorted``: values in descending order (else in no stated order). A k above n raises torch.topk's
    RuntimeError. The training step's picks (TopK family, AuxK, Switch) and TopK's encode use it.

    Why: on CPU, torch.topk costs ~1.3 ns an element, as it copies each row into (value, index) pairs
    and partial-sorts them. Here each row is viewed as [8, n/8] (``TOPK_CHUNK`` = 8), so that chunk c
    of the n/8 chunks holds the 8 strided columns c, c + n/8, ..., c + 7n/8, and each chunk's maximum
    is one vectorised max over the view's 8 rows (``_top_chunks``). The k chunks with the largest
    maxima are found the same way (recursively), and only their 8k entries go to torch.topk. Exact:
    fewer than k chunks have a maximum above the k-th largest maximum t, so every entry above t lies in
    a chosen chunk, and the chosen chunks hold at least k entries >= t (their maxima). At 4,096 x 16,384,
    k 32 on 2 AVX512-BF16 cores: 48 -> 34 ms in bf16 (torch.topk -> chunks), -> 25-30 ms with the 16-bit
    maxima taken on the bits (``_top_chunks``); 57 -> 42 ms in float32. Falls back to torch.topk on
    other devices, for a non-contiguous ``x``, and where the chunks would not pay (n not a multiple of
    8, or k above n / 32)."""
    rows, n = x.shape
    if x.device.type != "cpu" or not x.is_contiguous() or n % TOPK_CHUNK or k * TOPK_CHUNK * 4 > n:
        return torch.topk(x, k, dim=1, sorted=sorted)
    width = n // TOPK_CHUNK
    strided = x.view(rows, TOPK_CHUNK, width)
    chunks = _top_chunks(strided, k)  # [rows, k]: the chunks holding the top k
    candidates = strided.gather(2, chunks.unsqueeze(1).expand(rows, TOPK_CHUNK, k))  # [rows, 8, k]
    values, pos = candidates.reshape(rows, TOPK_CHUNK * k).topk(k, dim=1, sorted=sorted)
    return values, chunks.gather(1, pos % k) + width * (pos // k)


# 16-bit floats whose bits, read as int16, order the values >= +0.0 as the floats do (IEEE sign-magnitude).
_SIGN_MAGNITUDE_16 = (torch.bfloat16, torch.float16)


def _top_chunks(strided: Tensor, k: int) -> Tensor:
    """The k chunks (columns of ``strided`` [rows, 8, width]) with the largest maxima, [rows, k] int64.

    16-bit floats: the maxima are taken on the bits read as int16, 2.6x faster than the float max (4.8
    vs 12.3 ms at 4,096 x 16,384 on 2 AVX512-BF16 cores: an integer max needs no conversion to float32).
    IEEE floats are sign and magnitude, so those bits order every chunk whose maximum is >= +0.0 as the
    float maxima do and put every other chunk below them (its sign bit makes it negative): the k chunks
    picked are right wherever each row has at least k chunks with a maximum >= +0.0 (a TopK pick, almost
    always; ``_at_least_nonnegative``). Elsewhere (an AuxK scan of few dead latents) the float maxima
    pick them, and where that check could not say yes (k above width / 8: AuxK's 256 picks from fewer
    than 16,384 gathered columns) the bits are not taken at all (~5 ms a scan saved)."""
    if strided.dtype in _SIGN_MAGNITUDE_16 and _could_say_yes(strided.shape[2], k):
        bits = strided.view(torch.int16).amax(1)  # [rows, width]: the maximum's bits where it is >= +0.0
        if _at_least_nonnegative(bits, k):
            return topk_rows(bits, k)[1]
    return topk_rows(strided.amax(1), k)[1]


def _could_say_yes(width: int, k: int) -> bool:
    """Whether ``_at_least_nonnegative`` can say True for keys of this width: not where it counts groups
    of 8 (a width that is a multiple of 8) and there are fewer groups than k."""
    return width % TOPK_CHUNK != 0 or width // TOPK_CHUNK >= k


def _at_least_nonnegative(keys: Tensor, k: int) -> bool:
    """Whether each row of ``keys`` [rows, width] holds at least k entries >= 0. Never True wrongly, but
    may be False where the rows do hold k when the width is a multiple of 8: then it counts the groups of
    8 holding an entry >= 0, a tenth of the work of counting the entries (0.5 vs 5 ms at 4,096 x 2,048),
    and a False only costs ``_top_chunks`` its float maxima."""
    rows, width = keys.shape
    if width % TOPK_CHUNK == 0:
        keys = keys.view(rows, TOPK_CHUNK, width // TOPK_CHUNK).amax(1)
    return bool(((keys >= 0).sum(1) >= k).all())


def take_columns(x: Tensor, columns: Tensor) -> Tensor:
    """``x[:, columns]`` for ``x`` [rows, n] and int64 ``columns`` [m]: [rows, m], a copy, in x's dtype. A
    column outside [0, n) raises torch's RuntimeError (no wrap-around of negative ids, unlike
    ``x[:, columns]``). Why: AuxK's picks rank only the dead latents' columns. Through gather
    with the column ids broadcast over the rows, 16-bit floats as int16: at 4,096 x 16,384 taking 8,192
    columns, 10 ms in float32 and bfloat16, where index_select took 18 and 80 ms (bf16 has no vectorised
    gather or index_select on CPU; the same bits as int16 do)."""
    index = columns.expand(x.shape[0], -1)
    if x.dtype in _SIGN_MAGNITUDE_16:
        return x.view(torch.int16).gather(1, index).view(x.dtype)
    return x.gather(1, index)


# Rows per block in row_dots on CPU: the [block, d] product stays in cache (4.7 MB at d 576).
ROW_DOT_BLOCK = 2048


def row_dots(a: Tensor, b: Tensor) -> Tensor:
    """[n], in a's dtype: the dot product of each row of ``a`` with the same row of ``b`` (both [n, d]).
    The decoder's parallel-gradient removal calls it every training step.

    On CPU in blocks of ``ROW_DOT_BLOCK`` rows, so each block's [block, d] product is written and
    summed while in cache: 2.0 ms at 16,384 x 576 on 2 cores, where n batched 1 x d by d x 1 products
    (``bmm``) took 4.6 ms and the whole [n, d] product at once 3.3 ms. Elsewhere, the whole product."""
    if a.device.type != "cpu":
        return (a * b).sum(1)
    out = a.new_empty(a.shape[0])
    for start in range(0, a.shape[0], ROW_DOT_BLOCK):
        stop = start + ROW_DOT_BLOCK
        torch.sum(a[start:stop] * b[start:stop], 1, out=out[start:stop])
    return out


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
