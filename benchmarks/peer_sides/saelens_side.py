"""SAELens's side of the benchmarks (benchmarks/peer_venv.py's protocol), run by /work/venvs/sae-lens's python.

``multihook_setup``/``multihook_run``: SAELens's multi-hook activation caching (since 6.44): an
``ActivationsStore.from_config_multi_hook`` over a TransformerLens ``HookedTransformer`` of the same
local Hugging Face model, one ``run_with_cache`` forward per batch for every hook point, stopping after
the deepest (``_get_filtered_multi_hook_llm_batch``: the per-batch read that feeds its mixing buffer).

A training step is SAELens's own (``sae_lens.training.sae_trainer.SAETrainer._train_step`` without
logging and schedulers): ``TopKTrainingSAE.training_forward_pass`` with its AuxK loss, the firing
statistics, backward, ``clip_grad_norm_`` at 1.0, Adam.
"""

import time

import torch
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput
from safetensors.torch import load_file, save_file
from timing import step_ops  # benchmarks/peer_sides/timing.py, beside this module

DATA: dict[str, torch.Tensor] = {}
SIDES: dict[str, dict] = {}
DISTRIBUTION = "sae-lens"


def load(path: str) -> dict:
    DATA.update(load_file(path))
    return {"tensors": sorted(DATA)}


def build(name: str, d: int, n: int, k: int, seed: int, lr: float, dead_tokens: int | None = None,
          dead: str | None = None) -> dict:
    """A TopKTrainingSAE and its Adam; ``dead`` names a fixed dead mask (timing AuxK), else a latent
    silent for ``dead_tokens`` tokens is dead (None: never)."""
    torch.manual_seed(seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=n, k=k, dtype="float32", device="cpu"))
    SIDES[name] = {"sae": sae, "opt": torch.optim.Adam(sae.parameters(), lr=lr), "dead_tokens": dead_tokens,
                   "fixed_dead": DATA[dead].bool() if dead else None, "since": torch.zeros(n)}
    return {"lr": lr}


def _step(side: dict, x: torch.Tensor) -> None:
    sae, since = side["sae"], side["since"]
    if side["fixed_dead"] is not None:
        mask = side["fixed_dead"]
    elif side["dead_tokens"] is not None:
        mask = since >= side["dead_tokens"]
    else:
        mask = torch.zeros(len(since), dtype=torch.bool)
    sae.train()
    out = sae.training_forward_pass(step_input=TrainStepInput(
        sae_in=x, coefficients={}, dead_neuron_mask=mask, n_training_steps=0, is_logging_step=False))
    with torch.no_grad():
        did_fire = out.feature_acts.bool().float().sum(-2).bool()
        since.add_(x.shape[0])
        since[did_fire] = 0
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
    side["opt"].step()
    side["opt"].zero_grad()


@torch.no_grad()
def reconstruct(name: str, data: str, out: str) -> dict:
    """Reconstructions of DATA[data] and which latents fired, saved to ``out`` (recon, fired)."""
    sae = SIDES[name]["sae"]
    sae.eval()
    x = DATA[data]
    recon = torch.empty_like(x)
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for lo in range(0, len(x), 2048):
        acts = sae.encode(x[lo:lo + 2048])
        recon[lo:lo + 2048] = sae.decode(acts)
        fired |= (acts > 0).any(0)
    save_file({"recon": recon, "fired": fired.to(torch.uint8)}, out)
    return {}


def hooked_transformer(model_dir: str):
    """TransformerLens's HookedTransformer of a local Hugging Face folder, unprocessed (no folding or centring,
    the same activations as the Hugging Face model): HookedTransformer.from_pretrained itself refuses a name
    outside TransformerLens's list, so this runs its steps (config, state dict, load) on the folder."""
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = loading.get_pretrained_model_config(model_dir, fold_ln=False, device="cpu", dtype=torch.float32)
    state = loading.get_pretrained_state_dict(model_dir, cfg, hf_model=hf, dtype=torch.float32)
    model = HookedTransformer(cfg, AutoTokenizer.from_pretrained(model_dir), move_to_device=False)
    model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                      fold_value_biases=False, refactor_factored_attn_matrices=False)
    return model.eval()


def multihook_setup(model_dir: str, hook_points: list[str], tokens: str, batch_size: int, ctx_len: int) -> dict:
    """SAELens's multi-hook store over the contexts in DATA[tokens] ([contexts, ctx_len] token ids)."""
    from datasets import Dataset
    from sae_lens.training.activations_store import ActivationsStore

    model = hooked_transformer(model_dir)
    ids = DATA[tokens].long()
    dataset = Dataset.from_dict({"input_ids": ids.tolist()})
    store = ActivationsStore.from_config_multi_hook(
        model, dataset=dataset, hook_names=hook_points, hook_d_ins={h: model.cfg.d_model for h in hook_points},
        streaming=False, context_size=ctx_len, store_batch_size_prompts=batch_size, prepend_bos=False,
        train_batch_size_tokens=batch_size * ctx_len, n_batches_in_buffer=2, total_training_tokens=ids.numel(),
        device="cpu", dtype="float32")
    SIDES["multihook"] = {"store": store, "n_batches": len(ids) // batch_size}
    return {"d_model": model.cfg.d_model, "n_layers": model.cfg.n_layers}


@torch.no_grad()
def multihook_run() -> dict:
    """One pass over every batch: each batch's activations at every hook point from one forward pass."""
    side = SIDES["multihook"]
    start = time.perf_counter()
    rows = 0
    for _ in range(side["n_batches"]):
        acts = side["store"]._get_filtered_multi_hook_llm_batch()
        rows += next(iter(acts.values())).shape[0]
    return {"seconds": time.perf_counter() - start, "rows": rows}


OPS = {"load": load, "build": build, **step_ops(DATA, SIDES, _step), "reconstruct": reconstruct,
       "multihook_setup": multihook_setup, "multihook_run": multihook_run}
