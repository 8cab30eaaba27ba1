"""The scaling grid of config/sweep-scaling.yaml on an artifact root's shuffled store ``main``, through
the core trainer and evaluation (not Dagster; `scaling_laws` does the same fit from the sweep's
sae_eval reports): train each entry with config/demo.yaml's training settings, measure its held-out
FVU, then fit sae_platform.scaling's forms. Prints one JSON line per SAE and one with the fit; writes
the plot and the fit beside the root.

    python benchmarks/scaling_grid.py ROOT      # e.g. a copy of the demo's artifacts (activations, shuffled)
"""
import json
import sys
import time
from pathlib import Path

import torch

from sae_platform.catalog import checkpoint_version, load_sweep
from sae_platform.evaluate import heldout_activation_batches, reconstruction_metrics
from sae_platform.heldout import checkpoint_heldout
from sae_platform.plots import scaling_laws_png
from sae_platform.scaling import ScalingPoint, fit_scaling_laws, scaling_summary
from sae_platform.shuffled import open_shuffled
from sae_platform.storage import open_store
from sae_platform.trainer import TrainSettings, load_sae, train_sae

REPO = Path(__file__).resolve().parents[1]

torch.set_num_threads(2)
root = Path(sys.argv[1]).resolve()
store = open_store(str(root))
sweep = load_sweep(REPO / "config" / "sweep-scaling.yaml")
base = dict(token_budget=614400, batch_size=1024, lr=0.001, checkpoint_every_tokens=614400, dead_after_tokens=200000)
points, started = [], time.time()
for name, spec in sweep.items():
    t0 = time.time()
    spec = {k: v for k, v in spec.items() if k not in ("hook_point",)}
    settings = TrainSettings(**{**base, **spec})
    train_sae(store, "main", name, settings, log=lambda m: None)
    sae, cfg = load_sae(store, name)
    heldout = checkpoint_heldout(store, name, checkpoint_version(store, name), cfg, open_shuffled(store, "main"))
    m = reconstruction_metrics(sae, heldout_activation_batches(store, "main", heldout))
    points.append(ScalingPoint(name, settings.n_latents, settings.k, m["fvu"]))
    print(json.dumps({"sae": name, "n_latents": settings.n_latents, "k": settings.k, "fvu": m["fvu"], "l0": m["l0"],
                      "seconds": round(time.time() - t0, 1)}), flush=True)
fit = fit_scaling_laws(points)
print(json.dumps({"wall_s": round(time.time() - started), "summary": scaling_summary(fit)}, default=str), flush=True)
(root.parent / "scaling_laws.png").write_bytes(scaling_laws_png(points, fit))
(root.parent / "scaling_fit.json").write_text(json.dumps({**fit, "points": [vars(p) for p in points]}, default=str))
