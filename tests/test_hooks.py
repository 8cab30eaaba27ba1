"""Hook points on five model families (tiny random configs built here, no download): every cached
value equals an independent computation (output_hidden_states for the residual stream, a hook of
the test's own on the sub-block for attention/MLP outputs), the pass stops after the deepest hook,
logit effects fold the final norm, and the start token is found."""

import pytest
import torch

from sae_platform.errors import ModelError
from sae_platform.hooks import (
    HookPoint,
    check_hook_point,
    decoder_blocks,
    family_of,
    parse_hook_point,
    read_hook_points,
    sae_hook_points,
    splice_hooks,
    start_token_id,
)
from tests.tl_reference import transformer_lens_model

SITES = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "ln2.hook_normalized", "hook_mlp_out",
         "hook_resid_post")
N_LAYERS = 3


def _config(family: str):
    import transformers as T

    small = {"vocab_size": 97}
    if family == "llama":
        return T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                             num_key_value_heads=2, **small)
    if family == "qwen2":
        return T.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                             num_key_value_heads=2, **small)
    if family == "gpt2":
        return T.GPT2Config(n_embd=32, n_layer=N_LAYERS, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0,
                            **small)
    if family in ("gpt_neox", "gpt_neox_sequential"):
        return T.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                               use_parallel_residual=family == "gpt_neox", bos_token_id=0, eos_token_id=0, **small)
    if family == "gemma2":
        return T.Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=8, **small)
    if family == "opt":
        return T.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                           word_embed_proj_dim=32, bos_token_id=2, eos_token_id=2, pad_token_id=1, **small)
    raise AssertionError(family)


FAMILIES = ("llama", "qwen2", "gpt2", "gpt_neox", "gpt_neox_sequential", "gemma2", "opt")
# The test's own idea of where each sub-block's output is (written out here, not imported).
SUBMODULES = {
    "llama": ("model.layers", "self_attn", "mlp", "post_attention_layernorm"),
    "qwen2": ("model.layers", "self_attn", "mlp", "post_attention_layernorm"),
    "gpt2": ("transformer.h", "attn", "mlp", "ln_2"),
    "gpt_neox": ("gpt_neox.layers", "attention", "mlp", "post_attention_layernorm"),
    "gpt_neox_sequential": ("gpt_neox.layers", "attention", "mlp", "post_attention_layernorm"),
    "gemma2": ("model.layers", "post_attention_layernorm", "post_feedforward_layernorm", "pre_feedforward_layernorm"),
    "opt": ("model.decoder.layers", "self_attn", "fc2", "final_layer_norm"),
}


def _get(module, path):
    for attr in path.split("."):
        module = getattr(module, attr)
    return module


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = _config(request.param)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random norm gains and biases: a fold that ignored them would show
        for name, param in model.named_parameters():
            if "norm" in name or "ln" in name:
                param.normal_(0.3 if name.endswith("weight") else 0.0, 0.2)
    return request.param, model


CENTRED = ("gpt2", "gpt_neox", "gpt_neox_sequential", "opt")  # LayerNorm families


def _tl_normalized(norm, x, centred: bool):
    """TransformerLens's ``hook_normalized``, written out from transformer_lens/components/rms_norm.py
    and layer_norm.py (RMSNorm.forward / LayerNorm.forward): ``x = x - x.mean(-1)`` (LayerNorm only),
    ``scale = (x.pow(2).mean(-1) + eps).sqrt()``, ``hook_normalized(x / scale)``; the gain
    ``* self.w`` (``+ self.b``) is applied after the hook."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    x = x.float()
    if centred:
        x = x - x.mean(-1, keepdim=True)
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def _reference(family, model, ids, layer):
    """Independent values: hidden_states for the residual stream, own hooks on the sub-blocks."""
    blocks_path, attn_path, mlp_path, ln2_path = SUBMODULES[family]
    block = _get(model, blocks_path)[layer]
    got = {}
    handles = [
        _get(block, attn_path).register_forward_hook(
            lambda m, i, o: got.__setitem__("attn", o[0] if isinstance(o, tuple) else o)),
        _get(block, mlp_path).register_forward_hook(lambda m, i, o: got.__setitem__("mlp", o)),
    ]
    try:
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    finally:
        for h in handles:
            h.remove()
    pre, post = hidden[layer], hidden[layer + 1]
    ln2 = _get(block, ln2_path)
    parallel = family == "gpt_neox"
    mid = pre + got["attn"]
    normalized = _tl_normalized(ln2, pre if parallel else mid, family in CENTRED)
    ref = {"hook_resid_pre": pre, "hook_attn_out": got["attn"], "ln2.hook_normalized": normalized,
           "hook_mlp_out": got["mlp"].reshape(*ids.shape, -1)}  # OPT: fc2 runs on [batch * seq, d]
    if layer < N_LAYERS - 1:  # HF applies the final norm to the last entry of hidden_states
        ref["hook_resid_post"] = post
    if not parallel:
        ref["hook_resid_mid"] = mid
    return ref


@pytest.mark.parametrize("layer", [0, 1])
def test_every_hook_point_equals_an_independent_computation(family_model, layer):
    family, model = family_model
    ids = torch.randint(3, 97, (2, 9))
    ref = _reference(family, model, ids, layer)
    names = [f"blocks.{layer}.{site}" for site in SITES if site in ref]
    got = read_hook_points(model, ids, names)  # all of them from one pass
    for site, expected in ref.items():
        torch.testing.assert_close(got[f"blocks.{layer}.{site}"], expected.float(), atol=1e-5, rtol=1e-5)
    # The sub-block outputs add up to the residual stream in every family (parallel or not)
    full = read_hook_points(model, ids, [f"blocks.{layer}.{s}" for s in
                                         ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")])
    torch.testing.assert_close(full[f"blocks.{layer}.hook_resid_pre"] + full[f"blocks.{layer}.hook_attn_out"]
                               + full[f"blocks.{layer}.hook_mlp_out"], full[f"blocks.{layer}.hook_resid_post"],
                               atol=1e-5, rtol=1e-5)


def test_the_pass_stops_after_the_deepest_hook(family_model):
    family, model = family_model
    blocks = decoder_blocks(model)
    hooks_before = [len(b._forward_hooks) + len(b._forward_pre_hooks) for b in blocks]
    ran = []
    handles = [b.register_forward_pre_hook(lambda m, a, n=n: ran.append(n)) for n, b in enumerate(blocks)]
    mlp = _get(blocks[1], SUBMODULES[family][2])
    handles.append(mlp.register_forward_hook(lambda m, i, o: ran.append("mlp1")))
    try:
        read_hook_points(model, torch.randint(3, 97, (1, 5)), ["blocks.0.hook_mlp_out", "blocks.1.hook_attn_out"])
    finally:
        for h in handles:
            h.remove()
    assert ran == [0, 1], "block 1's MLP and block 2 must not run"
    assert [len(b._forward_hooks) + len(b._forward_pre_hooks) for b in blocks] == hooks_before, "hooks removed"


def test_parallel_attention_has_no_resid_mid(family_model):
    family, model = family_model
    if family != "gpt_neox":
        check_hook_point(model, "blocks.1.hook_resid_mid")
        return
    with pytest.raises(ModelError, match="(?s)parallel attention and MLP.*blocks.1.hook_resid_pre"):
        check_hook_point(model, "blocks.1.hook_resid_mid")


def test_splice_at_every_hook_point_changes_what_follows(family_model):
    """Replacing a hook point's value by itself changes nothing; by zero it changes the logits."""
    family, model = family_model
    ids = torch.randint(3, 97, (2, 7))
    with torch.no_grad():
        clean = model(input_ids=ids, use_cache=False).logits
    for site in SITES:
        if family == "gpt_neox" and site == "hook_resid_mid":
            continue
        point = parse_hook_point(f"blocks.1.{site}")
        for replace, same in ((lambda v, s: v.clone(), True), (lambda v, s: torch.zeros_like(v), False)):
            handles = splice_hooks(model, point, replace)
            try:
                with torch.no_grad():
                    logits = model(input_ids=ids, use_cache=False).logits
            finally:
                for h in handles:
                    h.remove()
            assert torch.allclose(logits, clean, atol=1e-5) == same, (site, same)


def test_unknown_hook_points_list_the_valid_names(family_model):
    _, model = family_model
    with pytest.raises(ModelError,
                       match=r"(?s)unknown hook point 'blocks.1.hook_resid'.*blocks.L \(0..2\).hook_mlp_out"):
        check_hook_point(model, "blocks.1.hook_resid")
    with pytest.raises(ModelError, match="names block 7, but the model has 3 blocks"):
        check_hook_point(model, "blocks.7.hook_mlp_out")
    with pytest.raises(ModelError, match="unknown hook point 'hook_embed'"):
        parse_hook_point("hook_embed")
    assert parse_hook_point("blocks.2.ln2.hook_normalized") == HookPoint(2, "mlp_in")


def test_logit_effects_fold_the_final_norm(family_model):
    """d @ W_U_folded^T equals the head applied to the final norm of d, rescaled by the norm's
    token-independent factor (1/rms, or 1/std and the bias for LayerNorm)."""
    from sae_platform.logits import unembedding_matrix

    family, model = family_model
    w_u = unembedding_matrix(model).double()
    lm = model
    norm = {"llama": "model.norm", "qwen2": "model.norm", "gemma2": "model.norm", "gpt2": "transformer.ln_f",
            "gpt_neox": "gpt_neox.final_layer_norm", "gpt_neox_sequential": "gpt_neox.final_layer_norm",
            "opt": "model.decoder.final_layer_norm"}[family]
    final_norm, head = _get(lm, norm).double(), lm.get_output_embeddings().double()
    try:
        d = torch.randn(5, 32, dtype=torch.float64) * 100  # large: the norm's eps is negligible
        with torch.no_grad():
            if isinstance(final_norm, torch.nn.LayerNorm):
                scale = (d.var(1, unbiased=False) + final_norm.eps).sqrt()[:, None]
                expected = (head(final_norm(d)) - head(final_norm.bias[None])) * scale
            else:
                expected = head(final_norm(d)) * d.pow(2).mean(1, keepdim=True).sqrt()
        torch.testing.assert_close(d @ w_u.T, expected, rtol=1e-6, atol=1e-6)
    finally:
        lm.float()


@pytest.mark.parametrize("bos,eos,config_bos,expected", [
    ("<|endoftext|>", "<|endoftext|>", None, "<|endoftext|>"),   # GPT-2, Pythia: one token for both
    ("<s>", "</s>", None, "<s>"),                                # Llama, Mistral
    ("<bos>", "<eos>", None, "<bos>"),                           # Gemma
    ("</s>", "</s>", None, "</s>"),                              # OPT: </s> is its BOS
    (None, "<|endoftext|>", "<s>", "<s>"),                       # tokenizer without BOS: the config's id
    (None, "<|endoftext|>", None, "<|endoftext|>"),              # Qwen2: no BOS at all, EOS starts
])
def test_start_token_per_family(bos, eos, config_bos, expected):
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<bos>", "<eos>", "<|endoftext|>", "a", "b"])}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                  bos_token=bos, eos_token=eos, unk_token="<unk>")
    config = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                         bos_token_id=vocab.get(config_bos), eos_token_id=None)
    model = LlamaForCausalLM(config)
    assert start_token_id(model, tok) == vocab[expected]
    model.config.sae_platform_start_token = "b"  # the platform's own choice wins (the embedded SmolLM2)
    assert start_token_id(model, tok) == vocab["b"]
    # ... even when it is also the unk token (SmolLM2's <|endoftext|> is both)
    model.config.sae_platform_start_token = "<unk>"
    assert start_token_id(model, tok) == vocab["<unk>"]


def test_unsupported_layouts_are_refused():
    from transformers import OPTConfig, OPTForCausalLM

    post_ln = OPTForCausalLM(OPTConfig(hidden_size=16, ffn_dim=16, num_hidden_layers=1, num_attention_heads=2,
                                       word_embed_proj_dim=16, vocab_size=10, do_layer_norm_before=False))
    with pytest.raises(ModelError, match="do_layer_norm_before"):
        family_of(post_ln)
    with pytest.raises(ModelError, match="no hook-point layout for Linear"):
        family_of(torch.nn.Linear(2, 2))


# Families TransformerLens converts from a local Hugging Face directory (its Gemma2 conversion
# works only from official names, so Gemma2 is checked against the written-out definition above).
TL_FAMILIES = ("llama", "qwen2", "gpt2", "gpt_neox", "gpt_neox_sequential", "opt")


def test_every_hook_point_equals_transformer_lens(family_model, tmp_path):
    """Every hook point of every block, read by us from the Hugging Face model, equals
    TransformerLens's run_with_cache value of the same name on the same weights."""
    family, model = family_model
    if family not in TL_FAMILIES:
        pytest.skip(f"TransformerLens converts {family} only from its official model names")
    hooked = transformer_lens_model(model, tmp_path)
    ids = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        _, cache = hooked.run_with_cache(ids)
    names = [f"blocks.{layer}.{site}" for layer in range(N_LAYERS) for site in SITES
             if not (family == "gpt_neox" and site == "hook_resid_mid")]
    ours = read_hook_points(model, ids, names)
    for name in names:
        torch.testing.assert_close(ours[name], cache[name].float(), atol=2e-5, rtol=2e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_olmo2_olmo3_granite_are_refused_by_name():
    """Llama's module names, but sub-block outputs normalised (OLMo2/3) or scaled by
    residual_multiplier (Granite): refused by name, never taken for the Llama layout."""
    import transformers as T

    small = {"vocab_size": 11, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
             "num_attention_heads": 2}
    for config, family, why in ((T.Olmo2Config(**small), "OLMo2", "normalises each sub-block's output"),
                                (T.Olmo3Config(**small), "OLMo3", "normalises each sub-block's output"),
                                (T.GraniteConfig(residual_multiplier=0.22, **small), "Granite", "residual_multiplier")):
        model = T.AutoModelForCausalLM.from_config(config)
        with pytest.raises(ModelError, match=f"(?s){family} models.*{why}.*supported type: llama"):
            read_hook_points(model, torch.zeros(1, 2, dtype=torch.long), ["blocks.0.hook_mlp_out"])
    # a type nobody listed is refused, not guessed from its module names
    cohere = T.AutoModelForCausalLM.from_config(T.CohereConfig(**small))
    with pytest.raises(ModelError, match="no hook-point layout for CohereForCausalLM \\(model_type 'cohere'\\)"):
        family_of(cohere)
    llama = T.LlamaForCausalLM(T.LlamaConfig(**small))
    llama.config.residual_multiplier = 0.5  # a derivative that scales the residual additions
    with pytest.raises(ModelError, match="residual_multiplier 0.5"):
        family_of(llama)


def test_sae_hook_points_pair_what_an_sae_reads_with_where_it_writes(family_model):
    _, model = family_model
    out, reads = sae_hook_points(model, "blocks.1.hook_mlp_out", None, transcoder=False)
    assert out == reads == HookPoint(1, "mlp_out")
    out, reads = sae_hook_points(model, "blocks.1.hook_mlp_out", "blocks.1.ln2.hook_normalized", transcoder=True)
    assert (out, reads) == (HookPoint(1, "mlp_out"), HookPoint(1, "mlp_in"))
    with pytest.raises(ModelError, match="transcoder needs its input"):
        sae_hook_points(model, "blocks.1.hook_mlp_out", None, transcoder=True)
    with pytest.raises(ModelError, match="only for transcoders"):
        sae_hook_points(model, "blocks.1.hook_attn_out", "blocks.1.hook_resid_pre", transcoder=False)
    with pytest.raises(ModelError, match="computed after"):
        sae_hook_points(model, "blocks.0.hook_mlp_out", "blocks.1.ln2.hook_normalized", transcoder=True)
    with pytest.raises(ModelError, match="valid|use one of"):
        sae_hook_points(model, "blocks.1.hook_mlp", None, transcoder=False)
