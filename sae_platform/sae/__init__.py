"""Sparse autoencoders: TopK, BatchTopK, Matryoshka BatchTopK, JumpReLU, ReLU+L1 and Switch, behind one
interface; and the one-latent ``vector`` dictionary of a user-supplied direction.

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

Layout, one concept per module (submodules import from each other, never from this package):

- ``kernels``: sparse code matrices (``Pattern``, CSR) and their kernels ``spmm`` / ``spmm_t`` /
  ``sddmm``, with the autograd Functions the TopK family and Switch decode and encode through;
- ``base``: the recipe helpers (``ADAM_EPS``, ``lr_for``, ``geometric_median``,
  ``input_scale_for``, ``normalized_mse``), the outputs ``Codes`` / ``SAEOutput`` (and ``mean_active``,
  the one division of an L0), the ``SparseAutoencoder`` base class and ``with_weights`` (a model built
  on the meta device given a checkpoint's tensors: opening a checkpoint draws no init);
- ``topk``: ``TopKSAE`` (+AuxK, Multi-TopK), ``dense_topk_reference``, ``BatchTopKSAE``,
  ``MatryoshkaBatchTopKSAE``;
- ``switch``: ``SwitchSAE``;
- ``dense``: ``ReLUSAE``, ``JumpReLUSAE`` and JumpReLU's straight-through estimators;
- ``vector``: ``VectorDictionary``, a user-supplied direction as a one-latent dictionary (built, never
  trained: ``UNTRAINED_VARIANTS``);
- this module: the variant registry (``Variant``, ``VARIANTS``), the hyper-parameter checks and
  ``build_sae``, the one constructor; it re-exports the public names of the others.
"""

from typing import Literal, get_args

import torch

from sae_platform.errors import PlatformError
from sae_platform.sae.base import (
    ADAM_EPS,
    Codes,
    SAEOutput,
    SparseAutoencoder,
    geometric_median,
    input_scale_for,
    lr_for,
    mean_active,
    normalized_mse,
    with_weights,
)
from sae_platform.sae.dense import JumpReLUSAE, ReLUSAE
from sae_platform.sae.kernels import Pattern, _SelectedPre, _SparseDecode, sddmm, spmm, spmm_t  # noqa: F401  (tests/test_sae.py imports them)
from sae_platform.sae.switch import SwitchSAE
from sae_platform.sae.topk import (
    BatchTopKSAE,
    MatryoshkaBatchTopKSAE,
    TopKSAE,
    _batch_topk,  # noqa: F401  (tests/test_sae.py imports it)
    dense_topk_reference,
    matryoshka_widths,
)
from sae_platform.sae.vector import VectorDictionary

# ENCODE_CHUNK_ELEMENTS and TRAIN_BLOCK_ELEMENTS are deliberately not re-exported: topk.py reads its own
# globals, so a copy here could be patched without effect; patch sae_platform.sae.topk instead.
__all__ = ["ADAM_EPS", "VARIANTS", "BatchTopKSAE", "Codes", "JumpReLUSAE", "MatryoshkaBatchTopKSAE", "Pattern",
           "ReLUSAE", "SAEOutput", "SparseAutoencoder", "SwitchSAE", "TopKSAE", "Variant", "build_sae",
           "dense_topk_reference", "geometric_median", "input_scale_for", "lr_for", "matryoshka_widths", "mean_active",
           "normalized_mse", "sddmm", "spmm", "spmm_t", "UNTRAINED_VARIANTS", "variant_class", "VectorDictionary",
           "with_weights"]

Variant = Literal["topk", "batchtopk", "matryoshka_batchtopk", "switch", "jumprelu", "relu"]
VARIANTS: tuple[Variant, ...] = get_args(Variant)  # the same names as a tuple (settings choices, tests)
# Dictionaries that are built, not trained (``build_sae`` and ``load_sae`` know them; the trainer's
# settings do not accept them): ``vector``, a user-supplied direction (``sae_platform.vectors``).
UNTRAINED_VARIANTS = ("vector",)

_CLASSES = {cls.variant: cls for cls in (TopKSAE, BatchTopKSAE, MatryoshkaBatchTopKSAE, SwitchSAE, JumpReLUSAE,
                                          ReLUSAE, VectorDictionary)}


def variant_class(variant: str) -> type:
    """The model class of SAE variant ``variant`` (what ``build_sae`` builds), without building
    one. PlatformError for an unknown variant."""
    if variant not in _CLASSES:
        raise PlatformError(f"unknown SAE variant {variant!r}",
                            f"use one of {', '.join(VARIANTS + UNTRAINED_VARIANTS)}")
    return _CLASSES[variant]


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
        if hp.get(name) is not None and not hp[name] > 0:
            raise PlatformError(f"{name} must be > 0, got {hp[name]!r}",
                                f"set {name} to a small positive number, e.g. 1e-3, or leave it out")
    if hp.get("target_l0") is not None and not 0 < hp["target_l0"] <= n_latents:
        raise PlatformError(f"target_l0 must be in (0, n_latents = {n_latents}], got {hp['target_l0']!r}",
                            "set target_l0 to the active latents per token you want, e.g. 64, or leave it out")
    if hp.get("threshold_lr_scale") is not None and not hp["threshold_lr_scale"] >= 0:
        raise PlatformError(f"threshold_lr_scale must be >= 0, got {hp['threshold_lr_scale']!r}",
                            "leave it out (sqrt(d_model)), or set a number >= 0 (0 freezes the thresholds)")
    if "threshold_momentum" in hp and not 0 <= hp["threshold_momentum"] < 1:
        raise PlatformError(f"threshold_momentum must be in [0, 1), got {hp['threshold_momentum']!r}",
                            "use e.g. 0.99")


def build_sae(variant: Variant, d_model: int, n_latents: int, *, device=None, dtype=torch.float32,
              d_out: int | None = None, skip_connection: bool = False, **hparams) -> SparseAutoencoder:
    """The one constructor the platform uses: build_sae(**sae.config) rebuilds a model.
    ``d_out`` makes it a transcoder (d_model in, d_out out; every variant but switch; Dunefsky et
    al. 2024, "Transcoders Find Interpretable LLM Feature Circuits"). ``skip_connection`` gives a
    transcoder a learned affine skip W_skip [d_out, d_model], zero at init (a skip transcoder:
    Paulo, Shabalin and Belrose 2025, "Transcoders Beat Sparse Autoencoders for
    Interpretability"). ``hparams``: the variant's DEFAULTS keys. Raises PlatformError for an
    unknown variant or setting, a switch transcoder, a skip connection on an SAE (not a
    transcoder), or an out-of-range size or setting."""
    cls = variant_class(variant)
    _positive_int("d_model", d_model)
    _positive_int("n_latents", n_latents)
    if d_out is not None:
        _positive_int("d_out", d_out)
        if variant == "switch":
            raise PlatformError("a switch transcoder is not supported: the router and AuxK of the switch SAE read "
                                "and reconstruct the same space", "train a topk, batchtopk, matryoshka_batchtopk, "
                                "jumprelu or relu transcoder")
    if not isinstance(skip_connection, bool):
        raise PlatformError(f"skip_connection must be true or false, got {skip_connection!r}",
                            "write hparams: {skip_connection: true} for a skip transcoder, or leave it out")
    if skip_connection and d_out is None:
        raise PlatformError("skip_connection is a transcoder setting: an SAE reconstructs its own input, so a "
                            "learned skip from input to output would reconstruct it without any latent",
                            "give the entry a transcoder hook point ('blocks.L.<input> -> blocks.L.hook_mlp_out'), "
                            "or drop skip_connection")
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
    if skip_connection:
        hparams["skip_connection"] = True
    return cls(d_model, n_latents, device=device, dtype=dtype, **hparams)
