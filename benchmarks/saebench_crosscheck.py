"""Cross-check ``sae_platform.absorption`` against SAEBench 0.6.0's own absorption functions.

    PYTHONPATH=. .venv/bin/python benchmarks/saebench_crosscheck.py [--saebench-python PY] [--tokenizer DIR]

SAEBench runs in its own environment (``PY``, default ``/work/venvs/sae-bench/bin/python``:
``python -m venv DIR && DIR/bin/pip install sae-bench==0.6.0``), as a subprocess of this script
(``--side saebench``), on the same inputs; nothing is downloaded. Compared, on inputs both accept:

1. the alphabetic vocabulary of one tokenizer (``--tokenizer``: a Hugging Face folder; default the
   tests' tiny byte-level BPE model, built into a temporary folder): SAEBench ``get_alpha_tokens``;
2. the train/test prompts from one seed: SAEBench ``create_dataset_probe_training`` after
   ``random.seed``; ours ``split_prompts`` with ``random.Random`` of the same seed;
3. the absorption fraction and full absorption of 400 words: SAEBench's
   ``FeatureAbsorptionCalculator.calculate_absorption`` with a stub model that returns planted
   activations at the word position and a ReLU SAE with unit-norm decoder rows (where SAEBench's
   activation x cosine and our raw-unit contribution are the same quantity); ours
   ``absorption_of_word`` on the same tensors;
4. the split-feature rule on F1 sequences: SAEBench ``add_feature_splits_to_metrics_df``.

Prints one JSON line with the agreement of each; exit status 1 when any differs.
"""

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_help import HelpFormatter

SEED, D_MODEL, N_LATENTS, N_WORDS = 42, 16, 48, 400
TEMPLATE, POSITION = "{word} has the first letter:", -6
F1_SEQUENCES = [[0.5, 0.54, 0.56, 0.9], [0.9, 0.91, 0.95, 0.99], [0.2, 0.4, 0.6, 0.8], [0.7, 0.7, 0.8, 0.9]]


def planted(torch):
    """Activations [N_WORDS, d], a ReLU SAE (W_enc [d, n], b_enc [n], unit-norm W_dec [n, d]), a
    unit probe direction and main latents, where some words fire the main latent and others a
    token-specific absorber aligned with the probe."""
    gen = torch.Generator().manual_seed(SEED)
    direction = torch.nn.functional.normalize(torch.randn(D_MODEL, generator=gen), dim=0)
    w_dec = torch.nn.functional.normalize(torch.randn(N_LATENTS, D_MODEL, generator=gen), dim=1)
    w_dec[0] = direction                                                        # the main latent
    for i in range(1, 6):                                                       # absorbers, cos 0.3..0.9
        other = torch.nn.functional.normalize(torch.randn(D_MODEL, generator=gen), dim=0)
        cos = 0.15 * (i + 1)
        w_dec[i] = torch.nn.functional.normalize(cos * direction + (1 - cos ** 2) ** 0.5 * other, dim=0)
    w_enc = w_dec.T.clone()
    b_enc = -0.5 * torch.ones(N_LATENTS)
    codes = torch.relu(torch.randn(N_WORDS, N_LATENTS, generator=gen) * 0.5)
    codes[:, :6] *= (torch.rand(N_WORDS, 6, generator=gen) < 0.5)
    acts = codes @ w_dec + 0.1 * torch.randn(N_WORDS, D_MODEL, generator=gen)
    return acts, w_enc, b_enc, w_dec, direction, [0]


def _without_torchvision() -> None:
    """The sae-bench venv's torchvision does not match its torch (``torchvision::nms does not
    exist``); nothing here needs it, so transformers is told it is absent."""
    import transformers.utils as utils
    import transformers.utils.import_utils as import_utils

    import_utils.is_torchvision_available = utils.is_torchvision_available = lambda: False


def saebench_side(args) -> dict:
    import torch

    _without_torchvision()
    import pandas as pd
    from sae_bench.evals.absorption import feature_absorption_calculator as fac
    from sae_bench.evals.absorption.k_sparse_probing import add_feature_splits_to_metrics_df
    from sae_bench.evals.absorption.probing import create_dataset_probe_training
    from sae_bench.evals.absorption.prompting import first_letter_formatter
    from sae_bench.evals.absorption.vocab import get_alpha_tokens
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(Path(args.tokenizer) / "tokenizer.json"))
    vocab = get_alpha_tokens(tokenizer)
    ordered = json.loads(Path(args.work, "vocab.json").read_text())  # ours, in token-id order
    random.seed(SEED)
    train, test = create_dataset_probe_training(ordered, first_letter_formatter(), 1, TEMPLATE, max_icl_examples=10)
    acts, w_enc, b_enc, w_dec, direction, main = planted(torch)
    words = [f"w{i}" for i in range(N_WORDS)]

    class StubSAE:
        device, dtype, W_dec = torch.device("cpu"), torch.float32, w_dec

        def encode(self, x):
            return torch.relu(x @ w_enc + b_enc)

    class StubModel:
        def run_with_cache(self, prompts, names_filter):
            rows = torch.stack([acts[int(p.rsplit("\n", 1)[-1].split(" ", 1)[0][1:])] for p in prompts])
            out = torch.zeros(len(prompts), -POSITION, D_MODEL)
            out[:, POSITION] = rows
            return None, {names_filter[0]: out}

        def to_tokens(self, _prompt):
            return torch.zeros(1, -POSITION)

    calculator = fac.FeatureAbsorptionCalculator(model=StubModel(), icl_word_list=words, max_icl_examples=10,
                                                 base_template=TEMPLATE, word_token_pos=POSITION)
    absorbed = calculator.calculate_absorption(StubSAE(), words, direction, main, layer=0, show_progress=False)
    frame = pd.DataFrame([{"letter": letter, **{f"f1_sparse_sae_{k}": f for k, f in enumerate(seq, 1)},
                           **{f"sparse_sae_k_{k}_feats": list(range(k)) for k in range(1, 5)}}
                          for letter, seq in zip("abcdefghijklmnopqrstuvwxyz", F1_SEQUENCES)])
    frame = frame.reindex(range(26)).assign(letter=list("abcdefghijklmnopqrstuvwxyz")).fillna(0)
    frame[[f"sparse_sae_k_{k}_feats" for k in range(1, 5)]] = frame[[f"sparse_sae_k_{k}_feats"
                                                                      for k in range(1, 5)]].map(
        lambda v: __import__("numpy").array(v if isinstance(v, list) else [0]))
    add_feature_splits_to_metrics_df(frame, max_k_value=4)
    return {"vocab": sorted(vocab), "train": [p.base for p, _ in train], "test": [p.base for p, _ in test],
            "fractions": [float(r.absorption_fraction) for r in absorbed.word_results],
            "full": [bool(r.is_full_absorption) for r in absorbed.word_results],
            "splits": [list(map(int, s)) for s in frame["split_feats"][:len(F1_SEQUENCES)]]}


def our_side(args) -> dict:
    import torch
    from transformers import AutoTokenizer

    from sae_platform import absorption_probes as ap
    from sae_platform.absorption import absorption_of_word

    vocab = ap.alpha_vocabulary(AutoTokenizer.from_pretrained(args.tokenizer))
    Path(args.work, "vocab.json").write_text(json.dumps(vocab))
    train, test = ap.split_prompts(vocab, TEMPLATE, random.Random(SEED))
    acts, w_enc, b_enc, w_dec, direction, main = planted(torch)
    latents = torch.relu(acts @ w_enc + b_enc)
    cosines = w_dec @ direction
    scored = [absorption_of_word(acts[i], latents[i], direction, cosines, main) for i in range(N_WORDS)]
    feats = {k: list(range(k)) for k in range(1, 5)}
    return {"vocab": sorted(vocab), "train": [p.base for p in train], "test": [p.base for p in test],
            "fractions": [f for f, _ in scored], "full": [full for _, full in scored],
            "splits": [ap.split_features(dict(enumerate(seq, 1)), feats, 0.03) for seq in F1_SEQUENCES]}


def compare(ours: dict, theirs: dict) -> dict:
    fractions = [abs(a - b) for a, b in zip(ours["fractions"], theirs["fractions"], strict=True)]
    return {
        "vocabulary_equal": ours["vocab"] == theirs["vocab"], "vocabulary_size": len(ours["vocab"]),
        "prompts_equal": ours["train"] == theirs["train"] and ours["test"] == theirs["test"],
        "prompts": len(ours["train"]) + len(ours["test"]),
        "words_scored": len(fractions), "max_fraction_difference": max(fractions),
        "mean_absorption_fraction": [sum(ours["fractions"]) / N_WORDS, sum(theirs["fractions"]) / N_WORDS],
        "full_absorption_equal": ours["full"] == theirs["full"], "full_absorptions": sum(ours["full"]),
        "split_features_equal": ours["splits"] == theirs["splits"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--side", choices=("ours", "saebench"), default="ours",
                        help="which side this process computes (saebench: the subprocess in its environment)")
    parser.add_argument("--saebench-python", default="/work/venvs/sae-bench/bin/python",
                        help="the Python of the environment SAEBench is installed in")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    if args.side == "saebench":
        Path(args.work, "saebench.json").write_text(json.dumps(saebench_side(args)))
        return 0
    with tempfile.TemporaryDirectory() as work:
        args.work = work
        if args.tokenizer is None:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from conftest import build_tiny_model

            args.tokenizer = str(build_tiny_model(Path(work) / "tiny"))
        ours = our_side(args)
        subprocess.run([args.saebench_python, __file__, "--side", "saebench", "--tokenizer", args.tokenizer,
                        "--work", work], check=True)
        report = compare(ours, json.loads(Path(work, "saebench.json").read_text()))
    print(json.dumps(report))
    agree = (report["vocabulary_equal"] and report["prompts_equal"] and report["full_absorption_equal"]
             and report["split_features_equal"] and report["max_fraction_difference"] < 1e-5)
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
