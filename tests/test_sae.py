"""SAE models: shapes, sparse kernels against dense references, the decoder constraint, AuxK,
Switch routing cost, BatchTopK inference, training on data with a known sparse structure,
input normalisation, checkpoint config and argument errors. Small dims: the file runs in seconds."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from sae_platform.errors import PlatformError
from sae_platform.sae import (
    ADAM_EPS,
    VARIANTS,
    Pattern,
    _batch_topk,
    _SelectedPre,
    _SparseDecode,
    build_sae,
    dense_topk_reference,
    geometric_median,
    input_scale_for,
    lr_for,
    normalized_mse,
    sddmm,
    spmm,
    spmm_t,
)
from sae_platform.sae.kernels import take_columns, topk_rows

D, N, K = 16, 64, 4
# The CPU always; the CUDA device where there is one (`make gpu-check` runs the `cuda`-marked tests on a GPU).
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                    reason="no CUDA device")])]
SMALL = {"topk": {"k": K}, "batchtopk": {"k": K}, "matryoshka_batchtopk": {"k": K, "matryoshka_widths": [8, 24]},
         "switch": {"k": K, "n_experts": 4},
         "jumprelu": {}, "relu": {}}


def make_data(n_rows, seed=0, n_true=32, active=3, scale=1.0, offset=0.0):
    """Rows that are sparse non-negative combinations of a hidden unit-norm dictionary."""
    truth = F.normalize(torch.randn(n_true, D, generator=torch.Generator().manual_seed(1234)), dim=1)
    g = torch.Generator().manual_seed(seed)
    picks = torch.rand(n_rows, n_true, generator=g).argsort(1)[:, :active]
    coeffs = torch.zeros(n_rows, n_true).scatter_(1, picks, 0.5 + torch.rand(n_rows, active, generator=g))
    return (coeffs @ truth) * scale + offset


def sae_for(variant, seed=0, **kw):
    torch.manual_seed(seed)
    return build_sae(variant, D, N, **{**SMALL[variant], **kw})


def calibrated(variant, x, **kw):
    sae = sae_for(variant, **kw)
    sae.calibrate_(x)
    return sae


# --- shapes and sparsity ---------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_shapes_and_codes(variant):
    x = make_data(32)
    sae = calibrated(variant, x)
    out = sae(x)
    assert out.recon.shape == x.shape
    assert out.fired.shape == (N,) and out.fired.dtype == torch.bool
    codes = out.codes
    assert codes.values.shape == codes.indices.shape and codes.values.shape[0] == 32
    assert int(codes.indices.max()) < N and bool((codes.values >= 0).all())
    assert torch.allclose(out.l0, (codes.values > 0).sum(1).float().mean())


def test_topk_has_exactly_k_active_per_row():
    x = make_data(64)
    sae = calibrated("topk", x)
    codes = sae(x).codes
    assert codes.values.shape == (64, K)
    assert bool(((codes.values > 0).sum(1) == K).all())
    assert bool((codes.indices.sort(1).values.diff(dim=1) > 0).all())  # k distinct latents
    # they are the k largest pre-activations
    pre = F.linear(sae._centered(x), sae.W_enc, sae.b_enc)
    assert torch.allclose(codes.values.sort(1).values, pre.topk(K, dim=1).values.sort(1).values, atol=1e-5)


@pytest.mark.parametrize("variant", ["topk", "batchtopk", "switch"])
def test_relu_after_topk_silences_negative_picks(variant):
    x = make_data(32)
    sae = calibrated(variant, x)
    with torch.no_grad():
        sae.b_enc.fill_(-100.0)  # every pre-activation negative: TopK still picks k, ReLU zeroes them
    out = sae(x)
    assert float(out.l0) == 0 and not bool(out.fired.any())
    torch.testing.assert_close(out.recon, (sae.b_pre / sae.input_scale).expand_as(x))


# --- sparse kernels vs dense references --------------------------------------------------------

def irregular_pattern(batch=12, seed=0, device="cpu"):
    """Rows with 0..6 entries, the first row empty: the BatchTopK shape."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 7, (batch,), generator=g)
    counts[0] = 0
    rows = torch.arange(batch).repeat_interleave(counts)
    cols = torch.cat([torch.randperm(N, generator=g)[:c] for c in counts.tolist()])
    return (Pattern.from_rows(rows.to(device), cols.to(device), batch, N),
            torch.randn(rows.numel(), generator=g).to(device))


def dense_of(pattern, vals):
    return torch.zeros(pattern.batch, N, device=vals.device).index_put((pattern.rows, pattern.cols), vals,
                                                                       accumulate=True)


@pytest.mark.parametrize("kind", ["regular", "irregular"])
def test_sparse_decode_matches_dense_decode_values_and_gradients(kind):
    if kind == "regular":
        g = torch.Generator().manual_seed(1)
        pattern = Pattern.regular(torch.rand(10, N, generator=g).topk(K, dim=1).indices, N)
        vals0 = torch.randn(10 * K, generator=g)
    else:
        pattern, vals0 = irregular_pattern()
    table0 = torch.randn(N, D)
    upstream = torch.randn(pattern.batch, D)

    vals, table = vals0.clone().requires_grad_(), table0.clone().requires_grad_()
    sparse_out = _SparseDecode.apply(vals, table, pattern)
    (sparse_out * upstream).sum().backward()

    ref_vals, ref_table = vals0.clone().requires_grad_(), table0.clone().requires_grad_()
    dense_out = dense_of(pattern, ref_vals) @ ref_table
    (dense_out * upstream).sum().backward()

    torch.testing.assert_close(sparse_out, dense_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vals.grad, ref_vals.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(table.grad, ref_table.grad, atol=1e-5, rtol=1e-5)
    assert table.grad.abs().sum() > 0 and vals.grad.abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_kernels_match_dense_algebra(device):
    pattern, vals = irregular_pattern(seed=3, device=device)
    s = dense_of(pattern, vals)
    y, table = torch.randn(pattern.batch, D, device=device), torch.randn(N, D, device=device)
    torch.testing.assert_close(spmm(pattern, vals, table), s @ table, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(spmm_t(pattern, vals, y), s.T @ y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sddmm(pattern, y, table), (y @ table.T)[pattern.rows, pattern.cols], atol=1e-5,
                               rtol=1e-5)
    values, indices = pattern.padded(vals)
    torch.testing.assert_close(torch.zeros(pattern.batch, N, device=device).scatter_add_(1, indices, values), s)


def test_by_col_groups_the_entries_by_latent_in_row_order():
    pattern, _ = irregular_pattern(batch=200, seed=6)
    perm, rows, col_offsets = pattern.by_col()
    cols = pattern.cols[perm]
    assert torch.equal(perm.sort().values, torch.arange(pattern.cols.numel()))  # a permutation
    assert torch.equal(rows, pattern.rows[perm])
    assert bool((cols.diff() >= 0).all())  # grouped by latent, ascending
    assert bool((rows.diff()[cols.diff() == 0] > 0).all())  # within a latent, rows ascending
    assert torch.equal(col_offsets, F.pad(torch.bincount(pattern.cols, minlength=N).cumsum(0), (1, 0)))


@pytest.mark.parametrize("batch", [12, 200])  # fewer rows than the table (dots run latent by latent), and more
@pytest.mark.parametrize("device", DEVICES)
def test_sddmm_gives_each_entrys_dot_bit_for_bit_in_csr_order(batch, device):
    pattern, _ = irregular_pattern(batch=batch, seed=5, device=device)
    y, table = torch.randn(batch, D, device=device), torch.randn(N, D, device=device)
    entry_by_entry = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        y, table, pattern.cols, pattern.offsets, pattern.rows, 0, -1)
    assert torch.equal(sddmm(pattern, y, table), entry_by_entry)
    torch.testing.assert_close(entry_by_entry, (y[pattern.rows] * table[pattern.cols]).sum(1), atol=1e-5, rtol=1e-5)
    empty = Pattern.from_rows(pattern.rows[:0], pattern.cols[:0], batch, N)
    assert sddmm(empty, y, table).shape == (0,)


def _check_topk_rows(x, k, sorted=False):
    values, indices = topk_rows(x, k, sorted=sorted)
    expected = torch.topk(x, k, dim=1).values
    assert torch.equal(values.sort(1, descending=True).values, expected)  # the same values, ties included
    assert torch.equal(x.gather(1, indices), values)  # each index holds its value
    assert torch.equal(indices.sort(1).values.diff(1) > 0, torch.ones_like(indices[:, 1:], dtype=torch.bool))
    if sorted:
        assert torch.equal(values, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [1, 4, 32, 128])
def test_topk_rows_gives_torch_topks_values_through_its_chunks(dtype, k):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(64, 4096, generator=g).to(dtype)
    _check_topk_rows(x, k)
    _check_topk_rows(x, k, sorted=True)
    ties = torch.randint(0, 6, (64, 4096), generator=g).to(dtype)  # thousands of equal values per row
    _check_topk_rows(ties, k)
    masked = x.masked_fill(torch.rand(64, 4096, generator=g) < 0.9, float("-inf"))  # AuxK's dead-only scan
    _check_topk_rows(masked, k)
    few = x.masked_fill(torch.arange(4096) >= k // 2, float("-inf"))  # fewer finite entries than k
    _check_topk_rows(few, k)
    # 16-bit floats pick their chunks on the bits, which order only values >= +0.0 as the floats do:
    # rows with fewer than k chunks holding one (all negative; a few rows so; -0.0 beside +0.0) must not.
    _check_topk_rows(x - 8.0, k)
    _check_topk_rows(torch.where(torch.arange(64).unsqueeze(1) % 3 == 0, x - 8.0, x), k)
    signed_zeros = torch.zeros(64, 4096).masked_fill(torch.rand(64, 4096, generator=g) < 0.5, -0.0)
    rare_negatives = x.abs().float().masked_fill(torch.rand(64, 4096, generator=g) < 0.99, 0.0)
    _check_topk_rows((signed_zeros - rare_negatives).to(dtype), k)
    _check_topk_rows(masked.masked_fill(torch.rand(64, 4096, generator=g) < 0.5, -3.0), k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_take_columns_is_indexing_the_columns(dtype):
    x = (torch.randn(5, 300) * 100).to(dtype)
    columns = torch.tensor([299, 0, 7, 7, 150])
    assert torch.equal(take_columns(x, columns), x[:, columns])
    assert take_columns(x, columns[:0]).shape == (5, 0)


def test_topk_rows_falls_back_to_torch_topk_where_chunks_do_not_fit():
    x = torch.randn(8, 1001)  # not a multiple of the chunk count
    for got, want in zip(topk_rows(x, 5), torch.topk(x, 5, dim=1, sorted=False), strict=True):
        assert torch.equal(got, want)
    wide_k = torch.randn(8, 4096)  # k above n / 32: the candidates would be most of the row
    for got, want in zip(topk_rows(wide_k, 200), torch.topk(wide_k, 200, dim=1, sorted=False), strict=True):
        assert torch.equal(got, want)


def test_a_topk_sae_wide_enough_for_chunked_picks_matches_the_dense_reference():
    x = make_data(64, seed=4, scale=3.0, offset=0.5)
    sae = build_sae("topk", D, 1024, k=K)  # 1,024 latents, k 4: topk_rows picks through its chunks
    sae.calibrate_(x)
    out = sae(x)
    torch.testing.assert_close(out.recon, dense_topk_reference(sae, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_forward_and_all_gradients_match_dense_reference(device):
    x = make_data(48, seed=2, scale=3.0, offset=0.5).to(device)
    sae = calibrated("topk", x, device=device)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)  # non-zero so its gradient path is exercised
    out = sae(x)
    sae.loss(x, out)[0].backward()
    sparse_grads = {name: p.grad.clone() for name, p in sae.named_parameters()}

    sae.zero_grad()
    ref = dense_topk_reference(sae, x)
    torch.testing.assert_close(out.recon, ref, atol=1e-5, rtol=1e-5)
    ((ref - x) * sae.input_scale).pow(2).mean().backward()
    for name, p in sae.named_parameters():
        torch.testing.assert_close(sparse_grads[name], p.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_dense_topk_reference_refuses_other_variants():
    with pytest.raises(PlatformError, match="forward of a topk SAE, not of a batchtopk SAE"):
        dense_topk_reference(sae_for("batchtopk"), make_data(4))


def test_selected_pre_gradient_reaches_input_when_asked():
    x = make_data(8).requires_grad_()
    sae = calibrated("topk", x.detach())
    xs = x * sae.input_scale
    pre = F.linear(xs - sae.b_pre, sae.W_enc, sae.b_enc)
    vals, idx = pre.detach().topk(K, dim=1)
    picked = _SelectedPre.apply(xs, sae.b_pre, sae.W_enc, sae.b_enc, vals, Pattern.regular(idx, N))
    (picked * torch.arange(K)).sum().backward(retain_graph=True)
    grad_sparse = x.grad.clone()
    x.grad = None
    (pre.gather(1, idx) * torch.arange(K)).sum().backward()
    torch.testing.assert_close(grad_sparse, x.grad, atol=1e-5, rtol=1e-5)


# --- decoder constraint ----------------------------------------------------------------------

def test_normalize_decoder_gives_unit_rows():
    sae = sae_for("topk")
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(N, 1) * 5 + 0.1)
    assert not torch.allclose(sae.W_dec.norm(dim=1), torch.ones(N))
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(N))


@pytest.mark.parametrize("variant", ["topk", "relu"])
def test_remove_parallel_grad_leaves_only_the_perpendicular_part(variant):
    x = make_data(64)
    sae = calibrated(variant, x)
    sae.loss(x, sae(x))[0].backward()
    before = sae.W_dec.grad.clone()
    sae.remove_parallel_grad_()
    after, w = sae.W_dec.grad, sae.W_dec.detach()
    assert before.abs().sum() > 0
    assert torch.allclose((after * w).sum(1), torch.zeros(N), atol=1e-6)
    expected = before - (before * w).sum(1, keepdim=True) * w  # rows are unit-norm
    torch.testing.assert_close(after, expected, atol=1e-6, rtol=1e-5)


# --- AuxK ------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["topk", "batchtopk", "switch"])
def test_auxk_is_zero_without_dead_latents_and_positive_with_them(variant):
    x = make_data(64)
    sae = calibrated(variant, x)
    none_dead = sae(x, dead_mask=torch.zeros(N, dtype=torch.bool))
    assert none_dead.parts["auxk"].item() == 0.0
    dead = torch.zeros(N, dtype=torch.bool)
    dead[::2] = True
    some_dead = sae(x, dead_mask=dead)
    assert some_dead.parts["auxk"].item() > 0
    some_dead.parts["auxk"].backward()
    touched = sae.W_enc.grad.abs().sum(1) > 0
    assert bool(touched[dead].any()) and not bool(touched[~dead].any())  # only dead latents learn from AuxK
    total, terms = sae.loss(x, some_dead)
    torch.testing.assert_close(terms["auxk"], some_dead.parts["auxk"] / 32)


@pytest.mark.parametrize("selection", [None, torch.bfloat16])
@pytest.mark.parametrize("n_dead", [3, 300, 1024])  # fewer dead than k_aux (masked), more (gathered), all
def test_auxk_picks_the_top_k_aux_pre_activations_of_the_dead_latents(selection, n_dead):
    x = make_data(64, seed=9, scale=3.0, offset=0.5)
    sae = build_sae("topk", D, 1024, k=K, k_aux=64)  # 1,024 latents: wide enough for topk_rows' chunks
    sae.calibrate_(x)
    sae.selection_dtype = selection
    dead = torch.zeros(1024, dtype=torch.bool)
    dead[torch.randperm(1024, generator=torch.Generator().manual_seed(n_dead))[:n_dead]] = True
    xs = sae._normalize(x)
    _, _, (aux_vals, aux_idx) = sae._scan(xs, K, dead)
    pre = F.linear(xs - sae.b_pre, sae.W_enc, sae.b_enc).detach()
    expected = pre.masked_fill(~dead, float("-inf")).topk(64, dim=1).values
    got = aux_vals.sort(1, descending=True).values
    if selection is None:  # float32 picks: the dense top k_aux among the dead, to the bit
        assert torch.equal(got, expected)
    else:  # bf16 picks (values recomputed in float32): the same but for near-ties at bf16's rounding
        torch.testing.assert_close(got, expected, atol=0.01, rtol=0.01)
    finite = torch.isfinite(aux_vals)  # as many picks as latents are dead, up to k_aux; the rest -inf
    assert finite.sum(1).tolist() == [min(n_dead, 64)] * 64
    assert bool(dead[aux_idx[finite]].all())  # dead latents only, each with its own pre-activation
    torch.testing.assert_close(aux_vals[finite], pre.gather(1, aux_idx)[finite])
    flat = (torch.arange(64).unsqueeze(1) * 1024 + aux_idx)[finite]
    assert flat.unique().numel() == flat.numel()  # no latent twice in a row


@pytest.mark.parametrize("variant", ["topk", "batchtopk"])
@pytest.mark.parametrize("length", [N // 2, N - 1, 2 * N])
def test_a_dead_mask_of_another_length_is_refused(variant, length):
    """AuxK gathers the dead latents' ids: a mask of another length than n_latents would name other latents."""
    x = make_data(64)
    sae = calibrated(variant, x, k_aux=8)
    dead = torch.zeros(length, dtype=torch.bool)
    dead[:20] = True  # more than k_aux dead: the gathered columns
    with pytest.raises(PlatformError, match=rf"dead_mask has shape \({length},\) but this SAE has {N} latents"):
        sae(x, dead_mask=dead)


@pytest.mark.parametrize("variant", ["topk", "batchtopk", "switch"])
def test_with_no_latent_dead_auxk_picks_nothing_and_the_step_is_the_same(variant, monkeypatch):
    """No dead latent: AuxK's term is 0, so its masked second top-k, picks and decode are skipped (they
    were ~40% of a demo training step); the loss, its terms and every gradient are those of the full
    path, which computes the term and multiplies it by 0 (one dead latent: the path runs)."""
    x = make_data(64)
    sae = calibrated(variant, x)
    none_dead, one_dead = torch.zeros(N, dtype=torch.bool), torch.zeros(N, dtype=torch.bool)
    one_dead[3] = True
    calls = []
    for owner in (torch, torch.Tensor):  # torch.topk(pre, ...) and pre.topk(...)
        monkeypatch.setattr(owner, "topk", lambda *a, real=owner.topk, **kw: calls.append(1) or real(*a, **kw))

    def step(dead_mask):
        sae.zero_grad(set_to_none=True)
        calls.clear()
        out = sae(x, dead_mask=dead_mask)
        total, terms = sae.loss(x, out)
        total.backward()
        return len(calls), total.detach(), terms, {n: p.grad.clone() for n, p in sae.named_parameters()
                                                    if p.grad is not None}

    picks_none, total, terms, grads = step(none_dead)
    picks_without, total_without, terms_without, grads_without = step(None)
    picks_one = step(one_dead)[0]
    assert picks_none == picks_without < picks_one  # the AuxK top-k runs only with a dead latent
    assert terms["auxk"].item() == 0.0 and "auxk" not in terms_without  # the term is kept, at 0
    assert torch.equal(total, total_without)
    assert grads.keys() == grads_without.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, grads_without[name]), name


@pytest.mark.parametrize("k", [K, 1])  # k 1: the top k of the 4k picks is a strided [batch, 1] view
def test_multi_topk_adds_the_4k_term(k):
    x = make_data(64)
    sae = calibrated("topk", x, multi_topk=True, k=k)
    out = sae(x)
    total, terms = sae.loss(x, out)
    assert set(terms) == {"mse", "multi_topk"}
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_pre]
    # the k term's gradients, through the sparse kernels (which need contiguous latent ids) and the dense reference
    sparse = torch.autograd.grad(terms["mse"], params, retain_graph=True)
    dense = torch.autograd.grad(((dense_topk_reference(sae, x) - x) * sae.input_scale).pow(2).mean(), params)
    for got, expected in zip(sparse, dense, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    sae.hparams["k"] = 4 * k  # the same model read at 4k, through the dense reference
    expected = ((dense_topk_reference(sae, x) - x) * sae.input_scale).pow(2).mean()
    torch.testing.assert_close(out.parts["multi_topk"], expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(total, terms["mse"] + out.parts["multi_topk"] / 8)
    assert out.codes.values.shape == (64, k)


# --- Switch --------------------------------------------------------------------------------

def test_switch_encodes_each_row_with_its_expert_only(monkeypatch):
    x = make_data(96)
    sae = calibrated("switch", x)
    _, expert, _ = sae.route(sae._centered(x))
    seen = {}
    original = sae.expert_pre

    def spy(e, rows):
        seen[e] = rows.shape[0]
        return original(e, rows)

    monkeypatch.setattr(sae, "expert_pre", spy)
    out = sae(x)
    expected = torch.bincount(expert, minlength=4)
    assert seen == {e: int(c) for e, c in enumerate(expected) if c > 0}
    assert sum(seen.values()) == 96
    # global latent ids: every code of row b lies in its expert's block
    m = N // 4
    idx = out.codes.indices
    assert bool(((idx // m) == expert[:, None]).all())
    assert len(set((idx // m).flatten().tolist())) > 1  # more than one expert in use


def test_switch_encoder_flops_fall_by_the_number_of_experts():
    d, n, batch, experts = 32, 512, 256, 8
    x = torch.randn(batch, d)

    def forward_flops(sae):
        with FlopCounterMode(display=False) as counter:
            sae(x)
        return counter.get_total_flops()

    dense = forward_flops(build_sae("topk", d, n, k=4))
    switch = forward_flops(build_sae("switch", d, n, k=4, n_experts=experts))
    assert dense == 2 * batch * d * n
    router = 2 * batch * d * experts
    assert switch == 2 * batch * d * n // experts + router


def test_switch_router_gets_gradient_and_balance_term():
    x = make_data(64)
    sae = calibrated("switch", x)
    out = sae(x)
    total, terms = sae.loss(x, out)
    assert "balance" in terms and float(out.parts["balance"]) >= 1.0 - 1e-5  # >= 1, equality when balanced
    terms["mse"].backward()
    assert sae.W_router.grad.abs().sum() > 0  # through the probability scaling of the codes


# --- BatchTopK -----------------------------------------------------------------------------------

def test_batch_topk_selects_k_per_row_on_average_and_learns_a_threshold():
    x = make_data(64)
    sae = calibrated("batchtopk", x)
    assert torch.isnan(sae.threshold)
    out = sae(x)
    counts = (out.codes.values > 0).sum(1)
    assert int(counts.sum()) == K * 64 and int(counts.max()) > int(counts.min())
    assert torch.isfinite(sae.threshold) and float(sae.threshold) > 0
    sae.eval()
    one = sae.encode(x[:1])
    dense_one = sae.encode_dense(x[:1])
    pre = F.linear(sae._centered(x[:1]), sae.W_enc, sae.b_enc)
    torch.testing.assert_close(dense_one, torch.where(pre > sae.threshold, pre, 0))
    assert int((one.values > 0).sum()) == int((pre > sae.threshold).sum())


def test_matryoshka_prefix_losses_and_all_gradients_match_a_dense_reference():
    """Every nested prefix [0, w) reconstructs on its own: the sparse group-by-group decode gives
    the same reconstruction, prefix losses and parameter gradients as dense autograd over the
    same batch-wide selection."""
    x = make_data(48, seed=3, scale=3.0, offset=0.5)
    sae = calibrated("matryoshka_batchtopk", x)
    assert sae.hparams["matryoshka_widths"] == [8, 24, N]
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    out = sae(x)
    total, terms = sae.loss(x, out)
    total.backward()
    sparse_grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    z_sel = out.codes.to_dense(N).detach()  # which (row, latent) pairs the batch-wide TopK chose

    sae.zero_grad()
    xs = x * sae.input_scale
    pre = F.linear(xs - sae.b_pre, sae.W_enc, sae.b_enc)
    z = torch.where(z_sel > 0, pre, 0).relu()
    prefix = [z[:, :w] @ sae.W_dec[:w] + sae.b_pre for w in (8, 24, N)]
    torch.testing.assert_close(out.recon, prefix[-1] / sae.input_scale, atol=1e-5, rtol=1e-5)
    inner = sum((r - xs).pow(2).mean() for r in prefix[:-1])
    torch.testing.assert_close(terms["matryoshka"], inner, atol=1e-6, rtol=1e-5)
    ((prefix[-1] - xs).pow(2).mean() + inner).backward()
    for name, p in sae.named_parameters():
        torch.testing.assert_close(sparse_grads[name], p.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_matryoshka_infers_like_batchtopk_and_trains_its_first_prefix_to_reconstruct(one_thread):
    data = make_data(4096, seed=5, scale=40.0, offset=3.0)
    first = {}
    for variant in ("batchtopk", "matryoshka_batchtopk"):
        sae = sae_for(variant)
        train(sae, data, steps=200)
        sae.eval()
        with torch.no_grad():
            codes = sae.encode(data[:512])
            pre = F.linear(sae._centered(data[:512]), sae.W_enc, sae.b_enc)
            torch.testing.assert_close(sae.encode_dense(data[:512]), torch.where(pre > sae.threshold, pre, 0).relu())
            keep = codes.indices < 8  # decode with the first prefix of 8 latents only
            recon = sae.decode(type(codes)(codes.values * keep, codes.indices))
        first[variant] = float(normalized_mse(recon, data[:512]))
    assert first["matryoshka_batchtopk"] < 0.7 * first["batchtopk"], first


@pytest.mark.parametrize("skewed", [False, True])
def test_batch_topk_candidate_shortcut_is_exact(skewed):
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(32, 200, generator=g)
    if skewed:  # one row holds more than per_row of the winners: the shortcut must fall back
        pre[3] += 10
    recomputed = []

    def full_pre():
        recomputed.append(True)
        return pre

    cand_vals, cand_idx = pre.topk(20, dim=1, sorted=False)
    vals, flat = _batch_topk(cand_vals, cand_idx, 5 * 32, 200, full_pre)
    ref_vals, ref_flat = pre.reshape(-1).topk(5 * 32)
    assert bool(recomputed) == skewed
    assert set(flat.tolist()) == set(ref_flat.tolist())
    torch.testing.assert_close(vals.sort().values, ref_vals.sort().values)


# --- JumpReLU -----------------------------------------------------------------------------------

def test_jumprelu_threshold_learns_through_the_straight_through_estimator():
    x = make_data(64)
    sae = calibrated("jumprelu", x, init_threshold=0.05, bandwidth=0.1)
    out = sae(x)
    out.parts["l0"].backward()
    grad = sae.threshold.grad
    assert grad is not None and bool((grad < 0).any())  # L0 pushes thresholds up
    assert bool((grad <= 0).all())
    codes = sae.encode_dense(x)
    theta = sae.threshold
    assert bool(((codes == 0) | (codes > theta)).all())


# --- JumpReLU's sparsity control (issue 31.6) -------------------------------------------------

def jumprelu_l0(seed=0, steps=300, **hparams) -> tuple[float, float]:
    """(L0, normalized MSE) on held-out rows of a JumpReLU SAE trained with ``hparams`` on rows
    that are 3-sparse combinations of a planted dictionary, with the default lr of its size."""
    data = make_data(8192, seed=5, scale=10.0, offset=1.0)
    held_out = make_data(1024, seed=6, scale=10.0, offset=1.0)
    sae = sae_for("jumprelu", seed=seed, **hparams)
    train(sae, data, steps=steps, batch=256, lr=lr_for(N))
    with torch.no_grad():
        out = sae(held_out)
    return float(out.l0), float(normalized_mse(out.recon, held_out))


def test_jumprelu_l0_coeff_sets_the_sparsity(one_thread):
    """The coefficient used to have no effect: 1e-3 and 1e-1 gave the same run to 4 digits (the
    threshold, stored as log θ, moved θ·lr per step under Adam; SAELens #719)."""
    loose, loose_mse = jumprelu_l0(l0_coeff=1e-3)
    tight, tight_mse = jumprelu_l0(l0_coeff=1e-1)
    assert tight < 0.5 * loose, (loose, tight)   # a higher coefficient, clearly fewer active latents ...
    assert tight_mse > loose_mse                 # ... bought with reconstruction
    assert loose < N / 2


@pytest.mark.parametrize("target", [4, 8, 16])
def test_jumprelu_target_l0_brings_l0_to_the_target(target, one_thread):
    l0, _ = jumprelu_l0(target_l0=target, l0_coeff=1.0)
    assert 0.5 * target <= l0 <= 1.5 * target, (target, l0)


def test_jumprelu_defaults_are_the_papers_in_these_units_and_checkpoints_of_log_theta_load():
    sae = sae_for("jumprelu")
    eps = 1e-3 * math.sqrt(D)  # the paper's 0.001 at E||x||^2 = 1; here E||x||^2 = D
    assert sae.hparams["bandwidth"] == sae.hparams["init_threshold"] == pytest.approx(eps)
    assert sae.hparams["threshold_lr_scale"] == pytest.approx(math.sqrt(D))
    assert [g["lr"] for g in sae.param_groups(1e-3)] == pytest.approx([1e-3, 1e-3 * math.sqrt(D)])
    assert build_sae(**sae.config).hparams == sae.hparams  # the resolved values are stored
    old = {k: v for k, v in sae.state_dict().items() if k != "threshold"}
    old["log_threshold"] = torch.full((N,), math.log(0.25))  # a checkpoint of an earlier version
    sae.load_state_dict(old)
    torch.testing.assert_close(sae.threshold.detach(), torch.full((N,), 0.25))


def test_jumprelu_stalled_thresholds_are_warned_about():
    x = make_data(256)
    sae = calibrated("jumprelu", x, target_l0=4)
    assert sae.training_warning(40.0) is None  # the first check only records θ
    warning = sae.training_warning(40.0)
    assert "stopped moving" in warning and "L0 40.0" in warning and "threshold_lr_scale" in warning
    assert sae.training_warning(4.5) is None   # near the target: nothing to say
    with torch.no_grad():
        sae.threshold.add_(0.1)
    assert sae.training_warning(40.0) is None  # moving


# --- training on data with a known sparse dictionary ----------------------------------------------

def train(sae, data, steps=300, batch=128, lr=1e-2):
    sae.calibrate_(data[:1024])
    opt = torch.optim.Adam(sae.param_groups(lr), lr=lr, eps=ADAM_EPS)  # as the trainer builds it
    since_fired = torch.zeros(sae.n_latents)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = data[torch.randint(0, data.shape[0], (batch,), generator=g)]
        out = sae(x, dead_mask=since_fired > 20 * batch)
        total, _ = sae.loss(x, out)
        opt.zero_grad()
        total.backward()
        sae.remove_parallel_grad_()
        opt.step()
        sae.normalize_decoder_()
        since_fired = torch.where(out.fired, 0, since_fired + batch)


@pytest.fixture
def one_thread():
    """Tiny matrices gain nothing from threads, and on a shared 2-core machine the thread
    hand-offs cost more than the work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_reduces_normalized_mse(variant, one_thread):
    data = make_data(4096, seed=5, scale=40.0, offset=3.0)
    held_out = make_data(512, seed=6, scale=40.0, offset=3.0)
    extra = {"relu": {"l1_coeff": 3e-2},
             "jumprelu": {"l0_coeff": 3e-2, "init_threshold": 0.1, "bandwidth": 0.05}}.get(variant, {})
    sae = sae_for(variant, **extra)
    sae.calibrate_(data[:1024])
    sae.eval()
    with torch.no_grad():
        before = float(normalized_mse(sae(held_out).recon, held_out))
    sae.train()
    train(sae, data)
    sae.eval()
    with torch.no_grad():
        out = sae(held_out)
    after = float(normalized_mse(out.recon, held_out))
    assert after < 0.4 * before and after < 0.3, (before, after)
    assert float(out.l0) < N / 2  # and sparse: the L1 / L0 variants did not buy MSE with density


# --- normalisation, init helpers, eval helpers -------------------------------------------------------

def test_input_normalisation_round_trip_in_original_units():
    base = make_data(256, seed=7, offset=2.0)
    c = 1000.0
    small, big = calibrated("topk", base), calibrated("topk", base * c)  # same seed: same weights
    torch.testing.assert_close(big.input_scale * c, small.input_scale)
    scaled = base * c * big.input_scale
    torch.testing.assert_close(scaled.pow(2).sum(1).mean(), torch.tensor(float(D)), rtol=1e-4, atol=1e-4)
    out_small, out_big = small(base), big(base * c)
    # the reconstruction comes back in the caller's units ...
    torch.testing.assert_close(out_big.recon, out_small.recon * c, rtol=1e-4, atol=1e-4 * c)
    assert float(normalized_mse(out_big.recon, base * c)) < 1.0
    # ... also through encode -> decode, which is forward's reconstruction
    torch.testing.assert_close(big.decode(big.encode(base * c)), out_big.recon, rtol=1e-4, atol=1e-4 * c)
    # and the loss lives in normalised units: the same number at any input scale
    torch.testing.assert_close(big.loss(base * c, out_big)[0], small.loss(base, out_small)[0], rtol=1e-4, atol=1e-6)


def test_decode_is_codes_times_dictionary_plus_bias_in_raw_units():
    x = make_data(16, offset=1.0, scale=30.0)
    sae = calibrated("switch", x)
    codes = sae.encode(x)
    by_hand = (codes.to_dense(N) @ sae.W_dec + sae.b_pre) / sae.input_scale
    torch.testing.assert_close(sae.decode(codes), by_hand, rtol=1e-5, atol=1e-4)


def test_input_scale_is_saved_and_config_rebuilds_the_model():
    x = make_data(128, scale=7.0)
    for variant in VARIANTS:
        sae = calibrated(variant, x)
        sae(x)  # BatchTopK learns its threshold here
        sae.eval()
        clone = build_sae(**sae.config)
        clone.load_state_dict(sae.state_dict())
        clone.eval()
        assert "input_scale" in sae.state_dict()
        torch.testing.assert_close(clone(x).recon, sae(x).recon)


@pytest.mark.parametrize("variant", VARIANTS)
def test_encode_slice_matches_dense_encode(variant):
    x = make_data(40)
    sae = calibrated(variant, x)
    sae(x)
    sae.eval()
    dense = sae.encode_dense(x)
    assert dense.shape == (40, N)
    torch.testing.assert_close(sae.encode_slice(x, 10, 37), dense[:, 10:37])
    torch.testing.assert_close(sae.decode(sae.encode(x)), sae(x).recon, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant, extra", [("topk", {"multi_topk": True}), ("batchtopk", {})])
def test_training_forward_in_row_blocks_matches_one_block(variant, extra, monkeypatch):
    import sae_platform.sae.topk as sae_module  # the module that reads the constant

    x = make_data(48, seed=9)
    dead = torch.zeros(N, dtype=torch.bool)
    dead[5:40] = True
    results = []
    for block_elements in (None, 5 * N):  # 5 rows per block, the last block partial
        if block_elements:
            monkeypatch.setattr(sae_module, "TRAIN_BLOCK_ELEMENTS", block_elements)
        sae = calibrated(variant, x, **extra)
        out = sae(x, dead_mask=dead)
        total, _ = sae.loss(x, out)
        total.backward()
        results.append((out.recon, out.parts, {n: p.grad for n, p in sae.named_parameters()}))
    (recon_a, parts_a, grads_a), (recon_b, parts_b, grads_b) = results
    torch.testing.assert_close(recon_a, recon_b)
    assert parts_a.keys() == parts_b.keys() and "auxk" in parts_a
    for name in parts_a:
        torch.testing.assert_close(parts_a[name], parts_b[name])
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name)


@pytest.mark.parametrize("variant, extra", [("topk", {}), ("topk", {"multi_topk": True}), ("batchtopk", {}),
                                            ("matryoshka_batchtopk", {})])
def test_low_precision_selection_keeps_the_picked_values_exact(variant, extra):
    """bf16 picks, float32 values: every picked pre-activation (main and AuxK) equals the float32
    pre-activation of that (row, latent), so loss and gradients are exact for the picks; the picks
    themselves agree with float32's but for near-ties; AuxK still picks only dead latents."""
    x = make_data(96, seed=5)
    dead = torch.zeros(N, dtype=torch.bool)
    dead[7:10] = True  # fewer dead latents than k_aux (8): the rest of AuxK's picks stay -inf
    sae = calibrated(variant, x, **extra)
    reference = sae(x, dead_mask=dead)
    sae.selection_dtype = torch.bfloat16
    out = sae(x, dead_mask=dead)
    xs = sae._normalize(x)
    pre = F.linear(xs - sae.b_pre, sae.W_enc, sae.b_enc).detach()
    pattern, z = out.sparse
    rows, cols = pattern.rows, pattern.cols
    torch.testing.assert_close(z.detach().reshape(-1), pre[rows, cols].relu())
    picked = set(zip(rows.tolist(), cols.tolist(), strict=True))
    ref_pattern = reference.sparse[0]
    agree = len(picked & set(zip(ref_pattern.rows.tolist(), ref_pattern.cols.tolist(), strict=True)))
    assert agree >= 0.95 * len(picked)
    vals, idx, aux = sae._scan(xs, 4, dead)
    torch.testing.assert_close(vals, pre.gather(1, idx))
    aux_vals, aux_idx = aux
    finite = torch.isfinite(aux_vals)
    assert dead[aux_idx[finite]].all() and finite.sum(1).eq(3).all()
    torch.testing.assert_close(aux_vals[finite], pre.gather(1, aux_idx)[finite])
    total, _ = sae.loss(x, out)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in sae.parameters() if p.grad is not None)
    sae.eval()  # inference never picks in low precision
    torch.testing.assert_close(sae.encode(x).values, build_sae_like(sae).encode(x).values)


def test_low_precision_picks_follow_w_enc_and_b_enc_as_they_change():
    """The bf16 copy of W_enc (b_enc folded in as a column) is refreshed on every forward: a latent whose
    bias is made the largest is picked in every row, then another one after the bias moves, and a
    latent whose encoder row is set to a row's direction is picked in that row."""
    x = make_data(64, seed=9)
    sae = calibrated("topk", x)
    sae.selection_dtype = torch.bfloat16
    xs = sae._normalize(x)
    for favourite in (3, 40):
        with torch.no_grad():
            sae.b_enc.zero_()
            sae.b_enc[favourite] = 1e3
        _, idx, _ = sae._scan(xs, K, None)
        assert (idx == favourite).any(1).all(), favourite
        other = 40 if favourite == 3 else 3
        assert not (idx == other).any(1).all(), other  # no longer (or not yet) in every row
    with torch.no_grad():
        sae.b_enc.zero_()
        idx = sae._scan(xs, K, None)[1]
        latent = int(torch.bincount(idx.reshape(-1), minlength=N).argmin())  # picked least often
        sae.W_enc[latent] = 10 * (xs[0] - sae.b_pre)  # now row 0's strongest latent by far
        assert (sae._scan(xs, K, None)[1][0] == latent).any()


def build_sae_like(sae):
    twin = build_sae(sae.variant, sae.d_model, sae.n_latents, **sae.hparams)
    twin.load_state_dict(sae.state_dict())
    return twin.eval()


def test_training_scratch_follows_the_batch_size():
    x = make_data(48)
    sae = calibrated("topk", x)
    first = sae(x).recon
    sae(x[:7])  # a smaller batch replaces the scratch block
    torch.testing.assert_close(sae(x).recon, first)
    torch.testing.assert_close(sae(x[:7]).recon, first[:7])


def test_topk_encode_chunks_agree_with_one_pass(monkeypatch):
    import sae_platform.sae.topk as sae_module  # the module that reads the constant

    x = make_data(40)
    sae = calibrated("topk", x)
    whole = sae.encode_dense(x)
    monkeypatch.setattr(sae_module, "ENCODE_CHUNK_ELEMENTS", 40 * 7)  # 7 latents per chunk
    torch.testing.assert_close(sae.encode_dense(x), whole)


def test_geometric_median_ignores_outliers():
    g = torch.Generator().manual_seed(0)
    bulk = torch.randn(500, D, generator=g) * 0.1 + 2.0
    outliers = torch.full((20, D), 500.0)
    x = torch.cat([bulk, outliers])
    median = geometric_median(x)
    assert float((median - 2.0).abs().max()) < 0.1
    assert float((x.mean(0) - 2.0).abs().max()) > 10


def test_geometric_median_is_weiszfelds_iteration_as_written_in_the_direct_form():
    """The two matrix-vector products per iteration give the iterates of the textbook form, which
    holds two more [n, d] tensors (x - y and w * x) per iteration."""
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(2000, D, generator=g) * 3 + 1, torch.randn(20, D, generator=g) * 300])
    direct, y = x.double(), x.double().mean(0)
    for _ in range(50):
        w = 1.0 / (direct - y).norm(dim=1).clamp_min(1e-8)
        y = (w[:, None] * direct).sum(0) / w.sum()
    torch.testing.assert_close(geometric_median(x), y, atol=1e-10, rtol=1e-10)


def test_b_pre_starts_at_the_geometric_median_in_normalised_units():
    x = make_data(256, offset=4.0)
    sae = calibrated("topk", x)
    expected = geometric_median(x * input_scale_for(x)).float()
    torch.testing.assert_close(sae.b_pre.detach(), expected, atol=1e-5, rtol=1e-5)


def test_encoder_starts_as_decoder_transpose():
    sae = sae_for("topk")
    torch.testing.assert_close(sae.W_enc, sae.W_dec)  # both stored as [n_latents, d_model]
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(N))


def test_learning_rate_rule():
    assert lr_for(16384) == pytest.approx(2e-4)
    assert lr_for(4 * 16384) == pytest.approx(1e-4)
    assert ADAM_EPS == 6.25e-10


# --- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, kwargs, words", [
    (("topk", D, N), {"k": N + 1}, "larger than"),
    (("switch", D, N), {"k": 20, "n_experts": 4}, "per expert"),
    (("switch", D, 60), {"k": 2, "n_experts": 8}, "divisible"),
    (("mystery", D, N), {}, "unknown SAE variant"),
    (("vector", D, 2), {}, "exactly one latent"),
    (("topk", D, N), {"l1_coeff": 1.0}, "no setting"),
    (("topk", D, 0), {}, "n_latents"),
    (("topk", D, N), {"k": 0}, "positive integer"),
    (("jumprelu", D, N), {"bandwidth": 0.0}, "bandwidth"),
    (("relu", D, N), {"l1_coeff": -1.0}, "l1_coeff"),
    (("matryoshka_batchtopk", D, N), {"matryoshka_widths": [16, 8]}, "strictly increasing"),
    (("matryoshka_batchtopk", D, N), {"matryoshka_widths": [8, 2 * N]}, "at most n_latents"),
    (("matryoshka_batchtopk", D, N), {"matryoshka_widths": "8,16"}, "list of integers"),
])
def test_bad_arguments_raise_a_clear_platform_error(args, kwargs, words):
    with pytest.raises(PlatformError) as info:
        build_sae(*args, **kwargs)
    assert words in info.value.problem and info.value.fix


def test_wrong_activation_width_is_a_platform_error():
    sae = sae_for("topk")
    with pytest.raises(PlatformError, match="d_model 16"):
        sae(torch.randn(4, D + 1))


@pytest.mark.parametrize("variant", VARIANTS)
def test_an_empty_slice_encodes_to_no_column(variant):
    """A feature shard may hold no latent (more shards than latents: a vector's one-latent dictionary)."""
    assert sae_for(variant).encode_slice(torch.randn(3, D), 5, 5).shape == (3, 0)


def test_encode_slice_rejects_out_of_range():
    sae = sae_for("relu")
    with pytest.raises(PlatformError, match="outside"):
        sae.encode_slice(torch.randn(2, D), 10, N + 1)


def test_lr_for_rejects_empty_dictionary():
    with pytest.raises(PlatformError):
        lr_for(0)
    assert math.isfinite(lr_for(1))


# --- transcoders ----------------------------------------------------------------------------------

def make_pairs(n_rows, seed=0, n_true=32, active=3, d_out=D + 4):
    """(x, y) that share one sparse code: x = c @ truth_in, y = c @ truth_out + offset (an MLP-like
    map a transcoder can learn, and an SAE on x alone cannot produce y)."""
    g0 = torch.Generator().manual_seed(4321)
    truth_in = F.normalize(torch.randn(n_true, D, generator=g0), dim=1)
    truth_out = torch.randn(n_true, d_out, generator=g0) * 3
    g = torch.Generator().manual_seed(seed)
    picks = torch.rand(n_rows, n_true, generator=g).argsort(1)[:, :active]
    coeffs = torch.zeros(n_rows, n_true).scatter_(1, picks, 0.5 + torch.rand(n_rows, active, generator=g))
    return coeffs @ truth_in * 20, coeffs @ truth_out + 2.0


@pytest.mark.parametrize("variant", ["topk", "batchtopk", "matryoshka_batchtopk", "relu"])
def test_transcoder_learns_the_paired_map(variant, one_thread):
    x, y = make_pairs(4096, seed=1)
    hx, hy = make_pairs(512, seed=2)
    extra = {"relu": {"l1_coeff": 3e-2}}.get(variant, {})
    torch.manual_seed(0)
    sae = build_sae(variant, D, N, d_out=D + 4, **{**SMALL[variant], **extra})
    assert sae.is_transcoder and sae.W_dec.shape == (N, D + 4) and sae.config["d_out"] == D + 4
    sae.calibrate_(x[:1024], y[:1024])
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2, eps=ADAM_EPS)
    g = torch.Generator().manual_seed(0)
    since_fired = torch.zeros(N)
    for _ in range(300):
        rows = torch.randint(0, len(x), (128,), generator=g)
        out = sae(x[rows], dead_mask=since_fired > 2560, target=y[rows])
        assert out.recon.shape == (128, D + 4)
        total, terms = sae.loss(y[rows], out)
        opt.zero_grad()
        total.backward()
        sae.remove_parallel_grad_()
        opt.step()
        sae.normalize_decoder_()
        since_fired = torch.where(out.fired, 0, since_fired + 128)
    sae.eval()
    with torch.no_grad():
        recon = sae.decode(sae.encode(hx))
    assert float(normalized_mse(recon, hy)) < 0.3
    rebuilt = build_sae(**sae.config)
    rebuilt.load_state_dict(sae.state_dict())  # output_scale and b_dec are in the checkpoint
    rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.decode(rebuilt.encode(hx)), recon)


@pytest.mark.parametrize("variant", ["topk", "batchtopk", "matryoshka_batchtopk", "relu"])
def test_a_skip_transcoder_learns_the_linear_part_of_the_map(variant, one_thread):
    """A skip transcoder (Paulo et al. 2025) adds W_skip x to the decoded latents: zero at init (the
    same outputs as the plain transcoder), trained like every other parameter, and on a target with
    a dense linear part in x (of a dense noise no few latents can span) it ends far below the plain
    transcoder's error at the same steps."""
    x, y = make_pairs(4096, seed=1)
    hx, hy = make_pairs(512, seed=2)
    g5 = torch.Generator().manual_seed(5)
    linear = torch.randn(D + 4, D, generator=g5) / D ** 0.5
    x, hx = x + 3 * torch.randn(x.shape, generator=g5), hx + 3 * torch.randn(hx.shape, generator=g5)
    y, hy = y + x @ linear.T, hy + hx @ linear.T
    errors = {}
    for skip in (False, True):
        torch.manual_seed(0)
        sae = build_sae(variant, D, N, d_out=D + 4, skip_connection=skip, **SMALL[variant])
        sae.calibrate_(x[:1024], y[:1024])
        if skip:
            assert sae.W_skip.shape == (D + 4, D) and sae.config["skip_connection"] is True
            plain = build_sae(variant, D, N, d_out=D + 4, **SMALL[variant])
            plain.load_state_dict({k: v for k, v in sae.state_dict().items() if k != "W_skip"})
            with torch.no_grad():
                torch.testing.assert_close(sae(hx).recon, plain(hx).recon)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-2, eps=ADAM_EPS)
        g = torch.Generator().manual_seed(0)
        for _ in range(200):
            rows = torch.randint(0, len(x), (128,), generator=g)
            total, _ = sae.loss(y[rows], sae(x[rows], target=y[rows]))
            opt.zero_grad()
            total.backward()
            sae.remove_parallel_grad_()
            opt.step()
            sae.normalize_decoder_()
        sae.eval()
        with torch.no_grad():
            errors[skip] = float(normalized_mse(sae.decode(sae.encode(hx), hx), hy))
            if skip:
                rebuilt = build_sae(**sae.config)
                rebuilt.load_state_dict(sae.state_dict())
                rebuilt.eval()
                torch.testing.assert_close(rebuilt.decode(rebuilt.encode(hx), hx), sae.decode(sae.encode(hx), hx))
                with pytest.raises(PlatformError, match="pass the input rows"):
                    sae.decode(sae.encode(hx))
    assert errors[True] < 0.5 * errors[False], errors


def test_a_skip_connection_is_a_transcoder_setting():
    with pytest.raises(PlatformError, match="transcoder setting"):
        build_sae("topk", D, N, k=K, skip_connection=True)
    with pytest.raises(PlatformError, match="true or false"):
        build_sae("topk", D, N, d_out=D, k=K, skip_connection="yes")


def test_transcoder_auxk_models_the_target_error():
    x, y = make_pairs(64)
    torch.manual_seed(0)
    sae = build_sae("topk", D, N, d_out=D + 4, k=K)
    sae.calibrate_(x, y)
    dead = torch.zeros(N, dtype=torch.bool)
    dead[N // 2:] = True
    out = sae(x, dead_mask=dead, target=y)
    assert float(out.parts["auxk"]) > 0
    assert "auxk" not in sae(x, dead_mask=dead).parts  # without the target there is no error to model
    with pytest.raises(PlatformError, match="no target rows"):
        build_sae("topk", D, N, d_out=D, k=K).calibrate_(x)
    with pytest.raises(PlatformError, match="switch transcoder"):
        build_sae("switch", D, N, d_out=D, k=K, n_experts=4)


@pytest.mark.parametrize("selection_dtype", [None, torch.bfloat16])
def test_a_training_forward_under_inference_mode_leaves_the_next_training_step_working(selection_dtype):
    """The kept scratch block and bf16 copy of W_enc, first made under torch.inference_mode, are made
    anew outside it (torch refuses to write an inference tensor there)."""
    x = make_data(48, seed=8)
    sae = calibrated("topk", x)
    sae.selection_dtype = selection_dtype
    with torch.inference_mode():
        sae(x)
    loss, _ = sae.loss(x, sae(x))
    loss.backward()
    assert torch.isfinite(sae.W_enc.grad).all()
