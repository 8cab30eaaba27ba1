"""sparsify's side of the benchmarks (benchmarks/peer_venv.py's protocol), run by /work/venvs/sparsify's python.

``multihook_setup``/``multihook_run``: sparsify's all-layers path, the forward pass ``Trainer.fit``
runs per batch: a forward hook on every hook point's module of the Hugging Face model, each taking the
module's output (the tensor of a tuple), flattening batch and position and keeping a detached copy (its
``all_outputs``) and the rows of the tokens it trains on; the full forward (sparsify does not stop early).
Our hook point names map to its modules: ``blocks.L.hook_resid_post`` is ``layers.L``,
``blocks.L.hook_mlp_out`` is ``layers.L.mlp``, ``blocks.L.hook_attn_out`` is ``layers.L.self_attn``.

A training step is what ``sparsify.Trainer.fit`` does per batch with ``loss_fn="fvu"`` on one hook point,
taken from eai-sparsify 1.3.3's trainer.py without the model forward, the logging and the checkpoints:
``set_decoder_norm_to_unit_norm``, ``SparseCoder.forward(x, dead_mask=...)`` (its fused TopK encoder and its
sparse embedding-bag decoder), loss ``fvu + auxk_alpha * auxk_loss``, backward,
``remove_gradient_parallel_to_decoder_directions``, the optimizer step, the firing bookkeeping. The
optimizer is sparsify's default (``signum``: ``ScheduleFreeWrapper(SignSGD, momentum=0.95)`` at
``5e-3 / sqrt(n_latents / 2**14)``), and ``b_dec`` starts at the first batch's mean as the trainer sets it.
"""

import time

import torch
from safetensors.torch import load_file, save_file
from schedulefree import ScheduleFreeWrapper
from sparsify import SparseCoder, SparseCoderConfig
from sparsify.sign_sgd import SignSGD
from timing import step_ops  # benchmarks/peer_sides/timing.py, beside this module

DATA: dict[str, torch.Tensor] = {}
SIDES: dict[str, dict] = {}
DISTRIBUTION = "eai-sparsify"


def load(path: str) -> dict:
    DATA.update(load_file(path))
    return {"tensors": sorted(DATA)}


def build(name: str, d: int, n: int, k: int, seed: int, first: str, auxk_alpha: float = 0.0,
          dead_tokens: int | None = None, dead: str | None = None, bf16_autocast: bool = False) -> dict:
    """A SparseCoder and its trainer state; ``dead`` names a fixed dead mask (timing AuxK), else
    ``dead_tokens`` is the trainer's dead_feature_threshold. ``bf16_autocast`` runs its forward under
    bf16 autocast on the CPU, as ``SparseCoder.forward`` does on CUDA (its decorator enables autocast
    for "cuda" only, so on the CPU it runs in float32 by default)."""
    torch.manual_seed(seed)
    sae = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k), device="cpu", dtype=torch.float32)
    sae.b_dec.data = DATA[first].mean(0)  # trainer.py, global_step 0: b_dec = the batch mean
    lr = 5e-3 / (sae.num_latents / (2**14)) ** 0.5
    opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=lr)]), momentum=0.95)
    opt.train()
    SIDES[name] = {"sae": sae, "opt": opt, "auxk_alpha": auxk_alpha, "dead_tokens": dead_tokens,
                   "fixed_dead": DATA[dead].bool() if dead else None,
                   "since": torch.zeros(n, dtype=torch.long), "bf16_autocast": bf16_autocast}
    return {"lr": lr, "optimizer": "signum (ScheduleFreeWrapper(SignSGD), momentum 0.95)"}


def _step(side: dict, x: torch.Tensor) -> None:
    sae, opt = side["sae"], side["opt"]
    sae.set_decoder_norm_to_unit_norm()
    if side["fixed_dead"] is not None:
        dead_mask = side["fixed_dead"]
    elif side["auxk_alpha"] > 0:
        dead_mask = side["since"] > side["dead_tokens"]
    else:
        dead_mask = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=side["bf16_autocast"]):
        out = sae(x, dead_mask=dead_mask)
    loss = out.fvu + side["auxk_alpha"] * out.auxk_loss + out.multi_topk_fvu / 8
    loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        fired = torch.zeros_like(side["since"], dtype=torch.bool)
        fired[out.latent_indices.flatten()] = True
        side["since"] += x.shape[0]
        side["since"][fired] = 0


@torch.no_grad()
def reconstruct(name: str, data: str, out: str) -> dict:
    """Reconstructions of DATA[data] and which latents fired, saved to ``out`` (recon, fired); the
    schedule-free optimizer's averaged weights, as the trainer saves them (``optimizer.eval()``)."""
    side = SIDES[name]
    side["opt"].eval()
    x = DATA[data]
    recon = torch.empty_like(x)
    fired = torch.zeros(side["sae"].num_latents, dtype=torch.bool)
    for lo in range(0, len(x), 2048):
        enc = side["sae"].encode(x[lo:lo + 2048])
        recon[lo:lo + 2048] = side["sae"].decode(enc.top_acts, enc.top_indices)
        fired[enc.top_indices[enc.top_acts > 0].flatten()] = True
    side["opt"].train()
    save_file({"recon": recon, "fired": fired.to(torch.uint8)}, out)
    return {}


SPARSIFY_MODULE = {"hook_resid_post": "", "hook_mlp_out": ".mlp", "hook_attn_out": ".self_attn"}


def sparsify_hookpoint(hook_point: str) -> str:
    """Our hook point (``blocks.4.hook_mlp_out``) as sparsify's hookpoint, a module of the base model."""
    _, layer, site = hook_point.split(".")
    if site not in SPARSIFY_MODULE:
        raise ValueError(f"hook point {hook_point!r}: sparsify hooks module outputs; one of {sorted(SPARSIFY_MODULE)}")
    return f"layers.{layer}{SPARSIFY_MODULE[site]}"


def multihook_setup(model_dir: str, hook_points: list[str], tokens: str, batch_size: int, ctx_len: int) -> dict:
    """The model (AutoModelForCausalLM, as sparsify loads it) and its hook points' modules."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.requires_grad_(False)
    names = [sparsify_hookpoint(h) for h in hook_points]
    SIDES["multihook"] = {"model": model, "modules": [model.base_model.get_submodule(n) for n in names],
                          "ids": DATA[tokens].long(), "batch_size": batch_size}
    return {"hookpoints": names}


@torch.no_grad()
def multihook_run() -> dict:
    """One pass over every batch, every hook point read from the one forward pass per batch."""
    side = SIDES["multihook"]
    kept = []

    def hook(module, inputs, outputs):
        if isinstance(outputs, tuple):
            outputs = outputs[0]
        flat = outputs.flatten(0, 1)
        kept.append(flat.detach().clone()[mask.flatten(0, 1)])

    start, rows = time.perf_counter(), 0
    for lo in range(0, len(side["ids"]), side["batch_size"]):
        x = side["ids"][lo:lo + side["batch_size"]]
        mask = torch.ones_like(x, dtype=torch.bool)  # exclude_tokens is empty by default: every token kept
        handles = [m.register_forward_hook(hook) for m in side["modules"]]
        try:
            side["model"](x)
        finally:
            for handle in handles:
                handle.remove()
        rows += kept[0].shape[0]
        kept.clear()
    return {"seconds": time.perf_counter() - start, "rows": rows}


OPS = {"load": load, "build": build, **step_ops(DATA, SIDES, _step), "reconstruct": reconstruct,
       "multihook_setup": multihook_setup, "multihook_run": multihook_run}
