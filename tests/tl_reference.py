"""The same weights as a Hugging Face model, run by TransformerLens (a peer: it defines what the hook
point names mean). TransformerLens comes with the dev extra's sae-lens; tests skip with a message
when it is absent."""

import pytest


def transformer_lens_model(model, tmp_path):
    """The same weights as a TransformerLens HookedTransformer, unfolded (fold_ln and centring off,
    so every hook holds the unprocessed model's value)."""
    tl = pytest.importorskip("transformer_lens", reason="TransformerLens (a dependency of the dev extra's "
                             "sae-lens) is not installed: install the dev extra to compare hook points with it")
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config, get_pretrained_state_dict

    if model.config.model_type == "gpt2":
        model.config.n_ctx = model.config.n_positions  # TL reads n_ctx, which GPT2Config no longer has
    model.save_pretrained(tmp_path)
    cfg = get_pretrained_model_config(str(tmp_path), device="cpu")
    cfg.tokenizer_name = None  # the tiny model has no tokenizer
    hooked = tl.HookedTransformer(cfg, tokenizer=None, move_to_device=False)
    hooked.load_and_process_state_dict(get_pretrained_state_dict(str(tmp_path), cfg, hf_model=model), fold_ln=False,
                                       center_writing_weights=False, center_unembed=False, fold_value_biases=False)
    return hooked.eval()
