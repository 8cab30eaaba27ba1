"""Proof that circuit-tracer loads our transcoder sets and computes an attribution graph with them.

Two processes, because circuit-tracer and the platform live in separate environments:

1. ``export`` (the platform's venv): a Llama-layout model (a tiny random one built here, or
   ``--model DIR``, e.g. the embedded SmolLM2), one JumpReLU transcoder per MLP layer
   (``hook_resid_mid -> hook_mlp_out``; built with ``sae.build_sae`` and calibrated on the model's
   own activations, read with ``hooks``), written by ``circuit_tracer.write_transcoder_set``. It
   also saves a probe: resid_mid rows and our transcoders' codes and outputs for them.
2. ``load`` (circuit-tracer's venv, ``CIRCUIT_TRACER_PYTHON``, default /work/venvs/circuit-tracer,
   built by ``make circuit-tracer-venv``): circuit-tracer's own loader (``load_transcoders``) reads
   the set, its transcoders must give our codes and outputs on the probe rows, and
   ``ReplacementModel`` (nnsight backend, which loads a local Hugging Face folder) plus
   ``attribute`` build the graph of a prompt.

Prints one JSON line per step; exits non-zero on any failure.
    python benchmarks/circuit_tracer_check.py [--model DIR] [--tokens 16] [--latents 64]
    python benchmarks/circuit_tracer_check.py --model smollm2 --store ROOT --set smollm2-plt   # a trained set
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_help import HelpFormatter

CIRCUIT_TRACER_PYTHON = os.environ.get("CIRCUIT_TRACER_PYTHON", "/work/venvs/circuit-tracer/bin/python")
TESTS = Path(__file__).resolve().parents[1] / "tests"
PROMPT = "The quick brown fox jumps over the lazy dog because the dog was sleeping in the sun today"


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def readable_by_older_transformers(model_dir: Path) -> None:
    """circuit-tracer 0.5.0 pins transformers <= 4.57, which does not know the tokenizer class
    newer releases save (``TokenizersBackend``); the tokenizer file itself is the same, so name
    the class 4.57 reads it with. Only folders this script wrote are changed."""
    path = model_dir / "tokenizer_config.json"
    config = json.loads(path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        path.write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))


def trained_set(args, n_layers: int) -> dict | None:
    """With ``--store ROOT --set NAME``: the members' trained checkpoints (``NAME-L<i>``) and the folder
    ``circuit_tracer_export`` committed for them in that (local) artifact root; None otherwise."""
    if not args.store:
        return None
    import yaml

    from sae_platform.catalog import circuit_tracer_name
    from sae_platform.storage import open_store
    from sae_platform.trainer import load_sae

    store = open_store(args.store)
    version = store.resolve(circuit_tracer_name(args.set))
    if version is None:
        raise SystemExit(f"no committed circuit_tracer/{args.set} in {args.store}: materialize circuit_tracer_export")
    folder = Path(store.url(version))
    config = yaml.safe_load((folder / "config.yaml").read_text())
    saes = [load_sae(store, f"{args.set}-L{layer}")[0] for layer in range(n_layers)]
    return {"saes": saes, "folder": folder, "activation": config.get("activation", "jumprelu or relu")}


def export(args) -> None:
    import torch

    from sae_platform.circuit_tracer import local_config, write_transcoder_set
    from sae_platform.model import load_hooked_model
    from sae_platform.sae import build_sae

    work = Path(args.work)
    model_dir = args.model
    if model_dir == "smollm2":  # the embedded GGUF, converted once to a Hugging Face folder
        from sae_platform.model import EMBEDDED_MODEL, convert_to_safetensors

        model_dir = str(work / "smollm2")
        convert_to_safetensors(EMBEDDED_MODEL, model_dir)
    elif model_dir is None:
        sys.path[:0] = [str(TESTS), str(TESTS.parent)]
        from conftest import build_tiny_model

        model_dir = str(build_tiny_model(work / "tiny_llama"))
    readable_by_older_transformers(Path(model_dir))
    hooked = load_hooked_model(model_dir, device="cpu", autocast="none")
    text = (PROMPT + " ") * 8
    ids = hooked.tokenizer(text, return_tensors="pt").input_ids[:, :128]
    names = [f"blocks.{i}.{site}" for i in range(hooked.n_layers) for site in ("hook_resid_mid", "hook_mlp_out")]
    with torch.no_grad():
        acts = hooked.read(ids, names)
    torch.manual_seed(0)
    trained = trained_set(args, hooked.n_layers)
    saes, probe = [], {}
    for layer in range(hooked.n_layers):
        x = acts[f"blocks.{layer}.hook_resid_mid"].reshape(-1, hooked.d_model).float()
        y = acts[f"blocks.{layer}.hook_mlp_out"].reshape(-1, hooked.d_model).float()
        if trained:
            sae = trained["saes"][layer]
        else:
            sae = build_sae("jumprelu", hooked.d_model, args.latents, d_out=hooked.d_model)
            sae.calibrate_(x, y)
        with torch.no_grad():
            codes = sae.encode_dense(x)
            out = sae.decode(sae.encode(x), x)
        probe.update({f"x{layer}": x, f"codes{layer}": codes.float(), f"out{layer}": out.float()})
        saes.append(sae)
    if trained:  # the set circuit_tracer_export committed, as it is
        folder, result = trained["folder"], {"activation": trained["activation"]}
    else:
        folder = work / "set"
        result = write_transcoder_set(saes, str(folder), name="check-plt", feature_input_hook="hook_resid_mid",
                                      model_name=model_dir)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in probe.items()}, str(work / "probe.safetensors"))
    (work / "local_config.json").write_text(json.dumps(local_config(str(folder))))
    emit(step="export", model=model_dir, n_layers=hooked.n_layers, d_model=hooked.d_model, n_latents=saes[0].n_latents,
         activation=result["activation"], files=sorted(os.listdir(folder)))
    (work / "model_dir").write_text(model_dir)


def load(args) -> None:
    import torch
    from circuit_tracer import ReplacementModel, attribute
    from circuit_tracer.utils.hf_utils import load_transcoders
    from safetensors.torch import load_file

    work = Path(args.work)
    config = json.loads((work / "local_config.json").read_text())
    started = time.perf_counter()
    transcoders = load_transcoders(config, device=torch.device("cpu"), lazy_encoder=False, lazy_decoder=False)
    probe = load_file(str(work / "probe.safetensors"))
    # Differences relative to each tensor's largest magnitude: trained transcoders write raw
    # mlp_out units (up to hundreds), where float32 rounding of the folded weights is ~1e-7 relative.
    worst = {"codes": 0.0, "out": 0.0}
    relative = {"codes": 0.0, "out": 0.0}
    with torch.no_grad():
        for layer, tc in enumerate(transcoders):
            x = probe[f"x{layer}"]
            codes = tc.encode(x)
            for key, ours, theirs in (("codes", probe[f"codes{layer}"], codes),
                                      ("out", probe[f"out{layer}"], tc.decode(codes, x))):
                diff = float((theirs - ours).abs().max())
                worst[key] = max(worst[key], diff)
                relative[key] = max(relative[key], diff / max(float(ours.abs().max()), 1e-6))
    emit(step="load", n_layers=len(transcoders), feature_input_hook=transcoders.feature_input_hook,
         activation=type(transcoders[0].activation_function).__name__, max_abs_diff_codes=worst["codes"],
         max_abs_diff_out=worst["out"], max_rel_diff_codes=relative["codes"], max_rel_diff_out=relative["out"],
         seconds=round(time.perf_counter() - started, 3))
    if max(relative.values()) > 1e-4:
        raise SystemExit(f"circuit-tracer's transcoders differ from ours: {worst} (relative: {relative})")
    model_dir = (work / "model_dir").read_text()
    started = time.perf_counter()
    model = ReplacementModel.from_pretrained_and_transcoders(model_dir, transcoders, backend="nnsight",
                                                             device=torch.device("cpu"), dtype=torch.float32)
    loaded = time.perf_counter() - started
    # Start with the start token ourselves: circuit-tracer 0.5.0 prepends one only when its id is
    # not 0 (common.ensure_tokenized filters ids by truthiness), and both models here use id 0.
    start = model.tokenizer.bos_token_id if model.tokenizer.bos_token_id is not None else model.tokenizer.eos_token_id
    ids = torch.tensor([start, *model.tokenizer(PROMPT).input_ids[:args.tokens - 1]])
    started = time.perf_counter()
    graph = attribute(ids, model, max_n_logits=5, batch_size=64, max_feature_nodes=args.max_feature_nodes)
    seconds = time.perf_counter() - started
    emit(step="attribute", tokens=int(ids.numel()), active_features=int(graph.active_features.shape[0]),
         selected_features=int(graph.selected_features.shape[0]), logits=int(len(graph.logit_targets)),
         adjacency=list(graph.adjacency_matrix.shape),
         adjacency_finite=bool(torch.isfinite(graph.adjacency_matrix).all()),
         model_load_seconds=round(loaded, 2), graph_seconds=round(seconds, 2), torch_threads=torch.get_num_threads())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", help="a local Llama-layout Hugging Face folder, or smollm2 (the embedded "
                        "SmolLM2-135M); default: a tiny random Llama")
    parser.add_argument("--tokens", type=int, default=16, help="prompt length in tokens")
    parser.add_argument("--latents", type=int, default=64, help="latents per transcoder")
    parser.add_argument("--max-feature-nodes", type=int, default=None)
    parser.add_argument("--phase", choices=("both", "export", "load"), default="both",
                        help="export the transcoders, load them in circuit-tracer, or both")
    parser.add_argument("--work", help="working folder (default: a temporary one)")
    parser.add_argument("--store", help="a local artifact root holding a trained set that circuit_tracer_export "
                                        "committed (with --set and --model smollm2): check that set, not a "
                                        "calibrated one")
    parser.add_argument("--set", default="smollm2-plt", help="the transcoder set's sweep entry name (with --store)")
    args = parser.parse_args()
    if args.phase == "export":
        return export(args)
    if args.phase == "load":
        return load(args)
    if not Path(CIRCUIT_TRACER_PYTHON).exists():
        raise SystemExit(f"circuit-tracer's environment {CIRCUIT_TRACER_PYTHON} is missing: run "
                         "`make circuit-tracer-venv` (or set CIRCUIT_TRACER_PYTHON)")
    with tempfile.TemporaryDirectory() as work:
        common = [__file__, "--work", work, "--tokens", str(args.tokens), "--latents", str(args.latents),
                  *(["--model", args.model] if args.model else []),
                  *(["--store", args.store, "--set", args.set] if args.store else []),
                  *(["--max-feature-nodes", str(args.max_feature_nodes)] if args.max_feature_nodes else [])]
        subprocess.run([sys.executable, *common, "--phase", "export"], check=True)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # circuit-tracer's venv only
        subprocess.run([CIRCUIT_TRACER_PYTHON, *common, "--phase", "load"], check=True, env=env)


if __name__ == "__main__":
    main()
