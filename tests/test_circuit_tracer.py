"""Transcoder sets for circuit-tracer: the sweep shape, the one-pass caching entries and the written
layout (checked against tests/snapshots/circuit_tracer_layout.json, circuit-tracer 0.5.0's keys and
shapes, and against its encode/decode formula); benchmarks/circuit_tracer_check.py runs circuit-tracer
itself when its environment exists."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from sae_platform.activations import CacheSettings, expand_every_block, hook_entries
from sae_platform.catalog import load_sweep, load_transcoder_sets
from sae_platform.circuit_tracer import CIRCUIT_TRACER_TOPK_NOTE, local_config, write_transcoder_set
from sae_platform.errors import PlatformError
from sae_platform.sae import build_sae
from sae_platform.settings import SettingsError

REPO = Path(__file__).resolve().parents[1]
LAYOUT = json.loads((REPO / "tests" / "snapshots" / "circuit_tracer_layout.json").read_text())
D, N, LAYERS = 24, 40, 3


def test_a_transcoder_set_entry_trains_one_transcoder_per_mlp_layer(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("plain: {variant: topk, n_latents: 64, k: 8}\n"
                     "plt: {variant: batchtopk, n_latents: 64, k: 8, "
                     "transcoder_set: {n_layers: 3, input: hook_resid_mid}}\n")
    specs = load_sweep(sweep)
    assert list(specs) == ["plain", "plt-L0", "plt-L1", "plt-L2"]
    assert specs["plt-L2"] == {"variant": "batchtopk", "n_latents": 64, "k": 8,
                               "hook_point": "blocks.2.hook_resid_mid -> blocks.2.hook_mlp_out"}
    (tset,) = load_transcoder_sets(sweep).values()
    assert tset.members == ["plt-L0", "plt-L1", "plt-L2"] and tset.input == "hook_resid_mid"


@pytest.mark.parametrize("block, wrong", [
    ("{n_layers: 0}", "n_layers is 0"), ("{n_layers: 2, input: hook_mlp_out}", "input is 'hook_mlp_out'"),
    ("{layers: all}", "not a mapping of n_layers and input")])
def test_a_bad_transcoder_set_names_the_entry_and_the_fix(tmp_path, block, wrong):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"plt: {{variant: relu, n_latents: 64, transcoder_set: {block}}}\n")
    with pytest.raises(SettingsError, match=wrong) as error:
        load_sweep(sweep)
    assert "'plt'" in str(error.value) and str(sweep) in str(error.value)


def test_a_set_member_name_clashing_with_an_entry_is_refused(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("plt-L1: {variant: relu, n_latents: 64}\n"
                     "plt: {variant: relu, n_latents: 64, transcoder_set: {n_layers: 2}}\n")
    with pytest.raises(SettingsError, match="plt-L1"):
        load_sweep(sweep)


def test_one_hook_points_entry_caches_a_pair_for_every_block(tiny_hooked):
    pairs = "blocks.*.ln2.hook_normalized -> blocks.*.hook_mlp_out"
    assert expand_every_block(["blocks.0.hook_resid_post", pairs], 2) == [
        "blocks.0.hook_resid_post", "blocks.0.ln2.hook_normalized -> blocks.0.hook_mlp_out",
        "blocks.1.ln2.hook_normalized -> blocks.1.hook_mlp_out"]
    entries = hook_entries(tiny_hooked, CacheSettings(hook_points=[pairs]))
    assert [e.spec for e in entries] == [f"blocks.{i}.ln2.hook_normalized -> blocks.{i}.hook_mlp_out"
                                         for i in range(tiny_hooked.n_layers)]


def _transcoder(variant, layer, **hparams):
    """A calibrated transcoder with generic weights (scales far from 1, nonzero biases)."""
    torch.manual_seed(10 + layer)
    sae = build_sae(variant, D, N, d_out=D, **hparams)
    x, y = torch.randn(128, D) * 30 + 7, torch.randn(128, D) * 0.2 - 1
    sae.calibrate_(x, y)
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        sae.b_enc.copy_(0.2 * torch.randn(N))
        if variant == "jumprelu":
            sae.threshold.copy_(torch.empty(N).uniform_(math.log(0.05), math.log(0.8)).exp())
        if variant == "batchtopk":
            sae.threshold.fill_(0.35)
        if sae.skip_connection:
            sae.W_skip.copy_(0.2 * torch.randn_like(sae.W_skip))
    return sae, x


def circuit_tracer_forward(tensors: dict, x: torch.Tensor, config: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """circuit-tracer 0.5.0's SingleLayerTranscoder.encode/decode, with the activation its config asks for."""
    pre = F.linear(x, tensors["W_enc"], tensors["b_enc"])
    if "activation_function.threshold" in tensors:
        z = pre * (pre > tensors["activation_function.threshold"])
    elif config.get("activation") == "topk":
        keep = torch.zeros_like(pre).scatter_(-1, pre.topk(config["k"], dim=-1).indices, 1)
        z = F.relu(pre * keep)
    else:
        z = F.relu(pre)
    skip = x @ tensors["W_skip"].T if "W_skip" in tensors else 0
    return z, z @ tensors["W_dec"] + tensors["b_dec"] + skip


@pytest.mark.parametrize("variant, hparams, activation", [
    ("relu", {}, "relu"), ("jumprelu", {}, "jumprelu"), ("batchtopk", {"k": 6}, "jumprelu"),
    ("topk", {"k": 6}, "topk"), ("batchtopk", {"k": 6, "skip_connection": True}, "jumprelu")])
def test_the_written_set_has_circuit_tracers_layout_and_reproduces_our_transcoders(tmp_path, variant, hparams,
                                                                                    activation):
    saes = [_transcoder(variant, layer, **hparams) for layer in range(LAYERS)]
    result = write_transcoder_set([s for s, _ in saes], str(tmp_path / "set"), name="plt",
                                  feature_input_hook="ln2.hook_normalized", model_name="tiny")
    config = yaml.safe_load((tmp_path / "set" / "config.yaml").read_text())
    for key, allowed in LAYOUT["config_required"].items():
        assert config[key] in (allowed if isinstance(allowed, list) else [allowed]), key
    assert (config.get("activation"), config.get("k")) == (("topk", 6) if variant == "topk" else (None, None))
    assert result["activation"] == activation and (("note" in result) == (variant == "topk"))
    assert sorted(os.listdir(tmp_path / "set")) == ["config.yaml"] + [LAYOUT["layer_file"].format(i=i)
                                                                      for i in range(LAYERS)]
    sizes = {"d_transcoder": N, "d_model": D}
    for layer, (sae, x) in enumerate(saes):
        tensors = load_file(tmp_path / "set" / LAYOUT["layer_file"].format(i=layer))
        required = set(LAYOUT["tensors"])
        assert required <= set(tensors) <= required | set(LAYOUT["optional_tensors"])
        for key, tensor in tensors.items():
            dims = (LAYOUT["tensors"] | LAYOUT["optional_tensors"])[key]
            assert list(tensor.shape) == [sizes[d] for d in dims] and tensor.dtype == torch.float32, key
        assert ("activation_function.threshold" in tensors) == (activation == "jumprelu")
        assert ("W_skip" in tensors) == bool(hparams.get("skip_connection"))
        codes, out = circuit_tracer_forward(tensors, x, config)
        with torch.no_grad():
            torch.testing.assert_close(codes, sae.encode_dense(x), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(out, sae.decode(sae.encode(x), x), atol=1e-4, rtol=1e-4)
    assert local_config(str(tmp_path / "set"))["transcoders"][-1].endswith(f"layer_{LAYERS - 1}.safetensors")


def test_a_set_of_mixed_rules_or_a_plain_sae_is_refused(tmp_path):
    mixed = [_transcoder("relu", 0)[0], _transcoder("topk", 1, k=6)[0]]
    with pytest.raises(PlatformError, match="mixes activation rules"):
        write_transcoder_set(mixed, str(tmp_path / "a"), name="plt", feature_input_hook="hook_resid_mid",
                             model_name="tiny")
    plain = build_sae("relu", D, N)
    plain.calibrate_(torch.randn(64, D))
    with pytest.raises(PlatformError, match="not a transcoder"):
        write_transcoder_set([plain], str(tmp_path / "b"), name="plt", feature_input_hook="hook_resid_mid",
                             model_name="tiny")
    assert "ReLU" in CIRCUIT_TRACER_TOPK_NOTE


CIRCUIT_TRACER_PYTHON = os.environ.get("CIRCUIT_TRACER_PYTHON", "/work/venvs/circuit-tracer/bin/python")


@pytest.mark.skipif(not Path(CIRCUIT_TRACER_PYTHON).exists(),
                    reason=f"circuit-tracer's environment {CIRCUIT_TRACER_PYTHON} is absent (make circuit-tracer-venv)")
def test_circuit_tracer_loads_the_set_and_builds_an_attribution_graph():
    """benchmarks/circuit_tracer_check.py: a tiny random Llama, one transcoder per layer written by
    our code, loaded by circuit-tracer's own loader (same codes and outputs as ours), and a graph."""
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "circuit_tracer_check.py"), "--tokens", "8"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    lines = {row["step"]: row for row in map(json.loads, filter(None, (line for line in run.stdout.splitlines()
                                                                        if line.startswith("{"))))}
    assert lines["load"]["activation"] == "JumpReLU" and lines["load"]["max_abs_diff_codes"] < 1e-3
    assert lines["attribute"]["tokens"] == 8 and lines["attribute"]["adjacency_finite"]
