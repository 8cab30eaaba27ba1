"""Steering: the model's greedy continuation of a prompt with and without SAE features added at the
SAE's hook point, token by token (the live server's ``POST /api/steer``, ``sae-platform steer``).

The methods are Neuronpedia's (its inference server, ``apps/inference/neuronpedia_inference``:
``schemas/steer.py`` ``NPSteerMethod``, ``endpoints/steer/completion.py`` and
``inference_utils/steering.py`` ``OrthogonalProjector``; github.com/hijohnnylin/neuronpedia). With
``v`` a feature's decoder direction in the model's raw units at the hook point and ``s`` its
strength, each applied to the value ``h`` at every steered position, one feature after another:

* ``additive`` (SIMPLE_ADDITIVE): ``h + s·v``.
* ``orthogonal`` (ORTHOGONAL_DECOMP): ``(I − P) h + s·P h``, ``P = v vᵀ / ‖v‖²``: the projection on
  ``v`` is replaced by ``s`` times itself (Neuronpedia's definition: here ``s`` is a factor).
* ``cap`` (PROJECTION_CAP): the coefficient of ``h`` along ``v``, ``c = h·v / ‖v‖²``, is clipped at
  ``s``: ``h − max(0, c − s)·v``; below the cap nothing changes.

Units: ``v = W_dec[f] / input_scale`` (a transcoder's: ``/ output_scale``), what one unit of the
latent's activation adds to the SAE's reconstruction (``SparseAutoencoder.decode``), so a strength is
in the activation units of the feature tables and the browser: ``additive`` with ``s`` the feature's
max activation adds what the latent adds when it fires at its max (Neuronpedia's default strength is
the feature's ``maxActApprox`` for the same reason), and ``cap`` at ``s`` means "never more than a
firing of ``s``". Neuronpedia's vectors are unit-norm SAELens decoder rows, where both readings agree.

Positions: every position of the prompt and of the continuation is steered, as Neuronpedia's hook
does, except the start token in front (the attention sink, which no SAE was trained on).
**Conditional steering** (``Condition``) steers only the positions where a condition feature's
activation, encoded by the same SAE from the value it reads there (before steering), exceeds a
threshold (Neuronpedia issue #35 asks for this; IBM's activation-steering "conditional activation
steering" gates whole prompts by a condition vector, this gates per position by an SAE feature).

Baseline and steered run as one batch of two rows with a key/value cache, greedy (argmax),
deterministic: the same inputs give the same tokens.
"""

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from sae_platform.errors import PlatformError
from sae_platform.hooks import sae_hook_points, splice_hooks

METHODS = ("additive", "orthogonal", "cap")   # Neuronpedia's SIMPLE_ADDITIVE, ORTHOGONAL_DECOMP, PROJECTION_CAP
MAX_FEATURES = 8                              # features steered at once


@dataclass(frozen=True)
class Condition:
    """Steer only where latent ``feature``'s activation (normalised units, as the feature tables')
    is above ``threshold``."""

    feature: int
    threshold: float


def check_method(method) -> str:
    """``method`` if it is one of ``METHODS``; PlatformError naming them otherwise."""
    if method not in METHODS:
        raise PlatformError(f"unknown steering method {method!r}",
                            f"use one of {', '.join(METHODS)} (Neuronpedia's additive, orthogonal decomposition "
                            "and projection cap)")
    return method


def check_features(features, n_latents: int) -> list[tuple[int, float]]:
    """``features`` as ``[(latent id, strength)]``: 1..MAX_FEATURES pairs of an id in
    ``[0, n_latents)`` and a finite number. PlatformError naming the bad entry and the fix."""
    if not isinstance(features, (list, tuple)) or not 1 <= len(features) <= MAX_FEATURES:
        raise PlatformError(f"steering needs 1..{MAX_FEATURES} features, got "
                            f"{len(features) if isinstance(features, (list, tuple)) else type(features).__name__}",
                            "pass [[feature id, strength], ...]")
    checked = []
    for entry in features:
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise PlatformError(f"steering feature {entry!r} is not a [feature id, strength] pair",
                                "pass [[feature id, strength], ...]")
        checked.append((check_latent(entry[0], n_latents, "steering feature"),
                        check_number(entry[1], f"the strength of feature {entry[0]}")))
    return checked


def check_latent(latent, n_latents: int, what: str) -> int:
    """``latent`` if it is an int in ``[0, n_latents)``; PlatformError otherwise."""
    if isinstance(latent, bool) or not isinstance(latent, int) or not 0 <= latent < n_latents:
        raise PlatformError(f"{what} {latent!r} is not a latent of this SAE (0..{n_latents - 1})",
                            f"pass an integer latent id between 0 and {n_latents - 1}")
    return latent


def check_number(value, what: str) -> float:
    """``value`` as a float if it is a finite number; PlatformError naming ``what`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PlatformError(f"{what} must be a finite number, got {value!r}", "pass a number such as 5 or -2.5")
    return float(value)


def steering_vectors(sae, feature_ids: Sequence[int]) -> torch.Tensor:
    """[len(feature_ids), d_out] float32, raw units: what one unit of each latent's activation adds
    to the SAE's output (its decoder row over the output scale)."""
    rows = sae.W_dec.detach()[torch.as_tensor(list(feature_ids), device=sae.W_dec.device)].float()
    scale = sae.output_scale if sae.is_transcoder else sae.input_scale
    return rows / scale.float()


def apply_steering(h: torch.Tensor, vectors: torch.Tensor, strengths: Sequence[float], method: str) -> torch.Tensor:
    """``h`` [..., d] steered by each row of ``vectors`` [n, d] with its strength, in order, by
    ``method`` (the module docstring's formulas); float32, the shape of ``h``."""
    check_method(method)
    out = h.float()
    for v, s in zip(vectors.to(out.device), strengths, strict=True):
        if method == "additive":
            out = out + s * v
            continue
        coeff = (out @ v / (v @ v))[..., None]        # h's coefficient along v
        if method == "orthogonal":
            out = out + (s - 1.0) * coeff * v          # (I - P) h + s P h
        else:
            out = out - (coeff - s).clamp_min(0) * v   # the coefficient clipped at s
    return out


def condition_mask(sae, read: torch.Tensor, condition: Condition | None) -> torch.Tensor | None:
    """bool [...]: where ``condition``'s latent, encoded from ``read`` [..., d_in] raw, is above
    its threshold (None: no condition, steer everywhere)."""
    if condition is None:
        return None
    device = sae.W_dec.device
    with torch.autocast(device.type, enabled=False):
        acts = sae.encode_slice(read.reshape(-1, read.shape[-1]).to(device, torch.float32),
                                condition.feature, condition.feature + 1)[:, 0]
    return (acts > condition.threshold).reshape(read.shape[:-1]).to(read.device)


def steer(hooked, sae, prompt_tokens: Sequence[int], features, method: str = "additive", max_new_tokens: int = 32,
          condition: Condition | None = None, *, hook_point: str | None = None, input_hook_point: str | None = None,
          stop_at_eos: bool = True) -> Iterator[tuple[int | None, int | None]]:
    """The greedy continuations of ``prompt_tokens`` (token ids, without the start token, which is
    put in front as the training contexts have it): yields one ``(baseline token, steered token)``
    per step, at most ``max_new_tokens``; a side that produced the end-of-text token yields None
    from then on (``stop_at_eos``), and it ends when both have.

    ``features``: ``[(latent id, strength)]`` (strengths in activation units; see the module
    docstring), steered at ``hook_point`` (default the model's; a transcoder writes ``hook_point``
    and reads ``input_hook_point``), by ``method``, only where ``condition`` holds when given.
    Arguments are checked when called, before any token: PlatformError for a bad method, feature,
    strength, condition or token count; ModelError for a hook point the model lacks or a wrong
    SAE/transcoder pairing (``hooks.sae_hook_points``). The model runs as the iterator is read."""
    check_method(method)
    features = check_features(features, sae.n_latents)
    if condition is not None:
        condition = Condition(check_latent(condition.feature, sae.n_latents, "the condition feature"),
                              check_number(condition.threshold, "the condition threshold"))
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise PlatformError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}", "pass e.g. 32")
    point, source = sae_hook_points(hooked.model, hook_point or hooked.hook_name, input_hook_point,
                                    sae.is_transcoder)
    vectors = steering_vectors(sae, [f for f, _ in features])
    return _continuations(hooked, sae, prompt_tokens, vectors, [s for _, s in features], method, max_new_tokens,
                          condition, point, source if input_hook_point else None, stop_at_eos)


@torch.inference_mode()
def _continuations(hooked, sae, prompt_tokens, vectors, strengths, method, max_new_tokens, condition, point, source,
                   stop_at_eos) -> Iterator[tuple[int | None, int | None]]:
    """``steer``'s generator, its arguments checked; the splice hooks stay on the model until it
    ends or is closed (the caller holds the model for that long)."""
    state = {"offset": 0}   # absolute position of the first token of the running forward pass

    def replace(value: torch.Tensor, source_value: torch.Tensor | None) -> torch.Tensor | None:
        row = value[1]                                   # [seq, d]: the steered row (row 0 is the baseline)
        positions = torch.arange(state["offset"], state["offset"] + row.shape[0], device=row.device)
        where = positions >= 1                           # never the start token
        mask = condition_mask(sae, (row if source_value is None else source_value[1]), condition)
        where = where if mask is None else where & mask
        if not bool(where.any()):
            return None
        new = value.clone()
        steered = apply_steering(row, vectors, strengths, method).to(row.dtype)
        new[1] = torch.where(where[:, None], steered, row)
        return new

    ids = torch.tensor([[hooked.start_token_id, *map(int, prompt_tokens)]] * 2, device=hooked.device)
    eos = getattr(hooked.tokenizer, "eos_token_id", None) if stop_at_eos else None
    ended = [False, False]
    handles = splice_hooks(hooked.model, point, replace, source)
    try:
        cache = None
        for _ in range(max_new_tokens):
            with torch.autocast(hooked.device.type, dtype=hooked.autocast or torch.bfloat16,
                                enabled=hooked.autocast is not None):
                out = hooked.model(input_ids=ids, cache=cache, use_cache=True)
            state["offset"] += ids.shape[1]
            cache = out.past_key_values
            nxt = out.logits[:, -1].float().argmax(-1)
            step = tuple(None if ended[i] else int(nxt[i]) for i in range(2))
            yield step
            ended = [ended[i] or (eos is not None and step[i] == eos) for i in range(2)]
            if all(ended):
                return
            ids = nxt[:, None]
    finally:
        for handle in handles:
            handle.remove()
