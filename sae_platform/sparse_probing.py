"""k-sparse probing on tasks built from the user's own corpus (SAEBench's sparse probing, offline).

SAEBench (Karvonen et al. 2025, ``sae_bench/evals/sparse_probing/``; Gurnee et al. 2023's
k-sparse probes): mean-pool the SAE's latents over each context, pick the k latents whose class
means differ most on the training contexts (``get_top_k_mean_diff_mask``), fit a logistic
regression on those k alone (``train_sklearn_probe``: L2, C = 1) and report its test accuracy,
for k ∈ {1, 2, 5} and on every latent; the same probes on the mean-pooled raw activations at the
SAE's hook point are the baseline ("llm" in SAEBench's files). An SAE whose latents carry the
task's concept in one or two latents scores near the full probe at k = 1 or 2.

The tasks need no download: binary tasks from what the inbox already knows.

* ``source=<key>``: which text a context comes from, one text against the rest (every cached
  text the SAE was trained on: the inputs of its shuffled store).
* ``<label>=<value>``: the document-level labels the user declared for the texts in sidecar files
  (``text_labels``), the texts with that value against the other texts declaring the label (a
  label with two values gives one task: its other value is the complement).

Contexts are the cached ones (``activations``): each context's training rows (the rows caching
stored, by ``training_rows``; start tokens and attention sinks never enter a mean), read from the
activation partitions the SAE's shuffled store pins, at the hook-point store it was built from.
Each task takes the same number of contexts from each class (at most ``max_contexts`` per class,
SAEBench's 4,000 train + 1,000 test), a seeded sample, and splits each class 80/20 into train and
test as SAEBench's sizes do; a task with fewer than ``min_contexts`` per class is skipped with
its counts as the reason. Two differences from SAEBench, both recorded in the result: the probe
on all residual channels and on all latents is the same L-BFGS fit as the k-sparse ones (SAEBench
trains those two with Adam on a GPU), and the contexts are the SAE's training text rather than
held-out datasets (the train/test split is over contexts).
"""

import json
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from sae_platform.activations import activation_attrs, activation_hook_entry
from sae_platform.catalog import (
    SAEBENCH_SPARSE_PROBING,
    SPARSE_PROBING_RESULT,
    checkpoint_pin,
    checkpoint_version,
    export_name,
    partition_name,
    shuffled_name,
    sparse_probing_name,
    store_group_of,
    trained_on,
)
from sae_platform.evaluate import SPARSE_PROBING_SETTINGS
from sae_platform.export import CFG_FILENAME
from sae_platform.metric_info import SPARSE_PROBING_K_VALUES
from sae_platform.probes import fit_logistic, logistic_accuracy
from sae_platform.shuffled import open_shuffled
from sae_platform.text_labels import LabelValue, TextLabels
from sae_platform.trainer import load_sae

K_VALUES = SPARSE_PROBING_K_VALUES  # SAEBench's default k_values (the one definition: metric_info)
TEST_FRACTION = 0.2  # SAEBench: 4,000 train and 1,000 test contexts per class
SOURCE = "source"  # the task kind "which text a context comes from", and its name prefix
LABEL = "label"
READ_ROWS = 4096


@dataclass
class ContextMeans:
    """Mean-pooled values over the training rows of every cached context that has any.

    ``keys``: the partition (source text) of each context [n]; ``residual`` [n, d_model] float32,
    raw units (a transcoder's input); ``latents`` [n, n_latents] float32, the SAE's codes in its
    normalised units (``sae.encode``)."""

    keys: np.ndarray
    residual: np.ndarray
    latents: np.ndarray


@torch.no_grad()
def context_means(store, sae, shuffle_name: str, read_rows: int = READ_ROWS) -> ContextMeans:
    """Mean residual and mean latent codes per context, over the activation partitions (their
    pinned versions) behind shuffled store ``shuffle_name``, at the hook-point store it was built
    from. Raises StorageError when a pinned partition version is gone."""
    index = open_shuffled(store, shuffle_name).index
    group = store_group_of(index)
    device, dtype = sae.W_dec.device, sae.W_dec.dtype
    keys, residuals, latents = [], [], []
    for pinned in index["inputs"]:
        name, version = partition_name(pinned["key"]), pinned["version"]
        what = f"activation partition {pinned['key']!r}"
        with store.reading(name, version, what):
            data = store.open_checked_group(name, version, group, what)
            context_id = np.asarray(data["context_id"][:], dtype=np.int64)
            n_contexts = int(data["tokens"].shape[0])
            residual = torch.zeros(n_contexts, sae.d_model, dtype=torch.float64, device=device)
            codes = torch.zeros(n_contexts * sae.n_latents, dtype=torch.float64, device=device)
            for start in range(0, len(context_id), read_rows):
                rows = torch.from_numpy(np.asarray(data["acts"][start:start + read_rows])).to(device, dtype)
                ctx = torch.from_numpy(context_id[start:start + read_rows]).to(device)
                residual.index_add_(0, ctx, rows[:, :sae.d_model].double())
                encoded = sae.encode(rows)
                flat = (ctx[:, None] * sae.n_latents + encoded.indices).reshape(-1)
                codes.index_add_(0, flat, encoded.values.reshape(-1).double())
        store.check_version(name, version, what)
        counts = torch.from_numpy(np.bincount(context_id, minlength=n_contexts)).to(device).double()
        kept = counts > 0
        keys += [pinned["key"]] * int(kept.sum())
        residuals.append((residual[kept] / counts[kept, None]).float().cpu().numpy())
        latents.append((codes.view(n_contexts, -1)[kept] / counts[kept, None]).float().cpu().numpy())
    return ContextMeans(np.array(keys), np.concatenate(residuals), np.concatenate(latents))


@dataclass(frozen=True)
class Task:
    """One binary task over contexts: ``positive`` bool [n] among ``member`` bool [n]."""

    name: str
    kind: str  # SOURCE or LABEL
    positive: np.ndarray
    member: np.ndarray


def source_tasks(keys: np.ndarray) -> list[Task]:
    """One task per source text: its contexts against every other text's."""
    everyone = np.ones(len(keys), dtype=bool)
    return [Task(f"{SOURCE}={key}", SOURCE, keys == key, everyone) for key in sorted(set(keys.tolist()))]


def label_tasks(keys: np.ndarray, labels: dict[str, dict[str, LabelValue]]) -> tuple[list[Task], list[dict]]:
    """Tasks from the declared labels (``text_labels.TextLabels.labels``: key → {label: value}),
    over the contexts of the texts that declare each label; and the labels that give no task
    ({"task", "reason"}: one value only)."""
    tasks, skipped = [], []
    for label in sorted({name for declared in labels.values() for name in declared}):
        value_of = {key: _spelled(declared[label]) for key, declared in labels.items() if label in declared}
        values = sorted(set(value_of.values()))
        if len(values) < 2:
            skipped.append({"task": f"{label}=*", "reason": f"every text declaring {label!r} gives it the value "
                                                            f"{values[0]}: nothing to tell apart"})
            continue
        member = np.isin(keys, list(value_of))
        for value in values[:1] if len(values) == 2 else values:
            holders = [key for key, v in value_of.items() if v == value]
            tasks.append(Task(f"{label}={value}", LABEL, np.isin(keys, holders), member))
    return tasks, skipped


def _spelled(value: LabelValue) -> str:
    """A label value as a task name spells it: a string as it is, true/false and integers as JSON
    (so true and 1, equal in Python, stay two values)."""
    return value if isinstance(value, str) else json.dumps(value)


@dataclass(frozen=True)
class Split:
    """A task's balanced, seeded train/test contexts (indices into ContextMeans) and labels."""

    train: np.ndarray
    train_y: np.ndarray
    test: np.ndarray
    test_y: np.ndarray


def split_task(task: Task, seed: int, min_contexts: int, max_contexts: int) -> Split | str:
    """The same number of contexts from each class (at most ``max_contexts``), sampled with a
    generator seeded by ``seed`` and the task's name, each class split TEST_FRACTION into test;
    or, when a class has fewer than ``min_contexts``, the reason the task is skipped."""
    pos = np.flatnonzero(task.member & task.positive)
    neg = np.flatnonzero(task.member & ~task.positive)
    n = min(len(pos), len(neg), max_contexts)
    if n < min_contexts:
        return (f"{len(pos)} contexts in the class and {len(neg)} outside it: fewer than min_contexts "
                f"({min_contexts}) per class")
    rng = np.random.default_rng([seed, zlib.crc32(task.name.encode())])
    pos, neg = rng.choice(pos, n, replace=False), rng.choice(neg, n, replace=False)
    n_test = max(1, round(n * TEST_FRACTION))
    train, test = np.concatenate([pos[n_test:], neg[n_test:]]), np.concatenate([pos[:n_test], neg[:n_test]])
    return Split(train, np.repeat([True, False], n - n_test), test, np.repeat([True, False], n_test))


def top_k_mean_diff(x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` columns of ``x`` [n, d] whose means over the positive and negative rows (``y``
    bool [n]) differ most in absolute value, largest first (SAEBench's ``get_top_k_mean_diff_mask``)."""
    diff = np.abs(x[y].mean(axis=0, dtype=np.float64) - x[~y].mean(axis=0, dtype=np.float64))
    return np.argsort(-diff, kind="stable")[:k]


def probe_accuracies(x: np.ndarray, split: Split, prefix: str, k_values=K_VALUES) -> dict:
    """Test accuracy of the probe on every column of ``x`` [n, d] (``<prefix>_test_accuracy``) and
    on the top k columns by class-mean difference on the training contexts
    (``<prefix>_top_<k>_test_accuracy``, with the columns as ``<prefix>_top_<k>_columns``): the keys
    of SAEBench's result details."""
    train, test = x[split.train], x[split.test]
    out = {f"{prefix}_test_accuracy": _accuracy(train, split.train_y, test, split.test_y)}
    for k in k_values:
        columns = top_k_mean_diff(train, split.train_y, k)
        out[f"{prefix}_top_{k}_test_accuracy"] = _accuracy(train[:, columns], split.train_y, test[:, columns],
                                                           split.test_y)
        out[f"{prefix}_top_{k}_columns"] = columns.tolist()
    return out


def _accuracy(train: np.ndarray, train_y: np.ndarray, test: np.ndarray, test_y: np.ndarray) -> float:
    weights, bias = fit_logistic(train, train_y)
    return logistic_accuracy(test, test_y, weights, bias)


ACCURACIES = ("llm_test_accuracy", *(f"llm_top_{k}_test_accuracy" for k in K_VALUES),
              "sae_test_accuracy", *(f"sae_top_{k}_test_accuracy" for k in K_VALUES))


def sparse_probing(means: ContextMeans, labels: dict[str, dict[str, LabelValue]], *, seed: int,
                   min_contexts: int, max_contexts: int, log=None) -> dict:
    """Every task's accuracies (``ACCURACIES``, plus its train/test sizes and the chosen columns),
    the tasks skipped with their reason, and the averages over the tasks that ran (all of them,
    and per kind). When no task has enough contexts, ``no_score`` says why and there are no
    averages: a score from no task would be no score at all."""
    tasks = source_tasks(means.keys)
    more, skipped = label_tasks(means.keys, labels)
    results = []
    for task in tasks + more:
        split = split_task(task, seed, min_contexts, max_contexts)
        if isinstance(split, str):
            skipped.append({"task": task.name, "reason": split})
            continue
        row = {"task": task.name, "kind": task.kind, "n_train": len(split.train), "n_test": len(split.test),
               **probe_accuracies(means.residual, split, "llm"), **probe_accuracies(means.latents, split, "sae")}
        results.append(row)
        if log:
            log(f"{task.name}: SAE top-1 {row['sae_top_1_test_accuracy']:.3f}, all latents "
                f"{row['sae_test_accuracy']:.3f}; residual top-1 {row['llm_top_1_test_accuracy']:.3f}, all "
                f"{row['llm_test_accuracy']:.3f} ({row['n_test']} test contexts)")
    no_score = None if results else (
        f"no task has min_contexts contexts in each class ({len(means.keys)} contexts from "
        f"{len(set(means.keys.tolist()))} text(s)): cache more texts, declare labels (docs/inbox.md, \"Labels\"), or "
        "lower resources.evaluation.config.sparse_probing_min_contexts")
    return {"tasks": results, "skipped": skipped, "n_contexts": len(means.keys), "no_score": no_score,
            "averages": {kind: _averages([r for r in results if kind in ("all", r["kind"])])
                         for kind in ("all", SOURCE, LABEL) if any(kind in ("all", r["kind"]) for r in results)}}


def _averages(rows: list[dict]) -> dict:
    return {key: float(np.mean([r[key] for r in rows])) for key in ACCURACIES} | {"n_tasks": len(rows)}


# -- SAEBench's output schema (sae_bench/evals/sparse_probing/eval_output.py) -------------------------

SAEBENCH_EVAL_TYPE = "sparse_probing"  # EVAL_TYPE_ID_SPARSE_PROBING
NOT_SAEBENCH = "none: computed by sae-platform (sae_platform/sparse_probing.py), not by SAEBench"


def saebench_output(result: dict, *, eval_id: str, evaluated_at_ms: int, model_name: str, ctx_len: int, seed: int,
                    sae_cfg: dict | None) -> dict:
    """``result`` (:func:`sparse_probing`) as SAEBench's ``SparseProbingEvalOutput`` JSON: its eval
    config (the tasks as ``dataset_names``, train/test sizes of the largest task), the averages over
    the tasks as ``eval_result_metrics`` ("llm": the raw activations at the hook point, "sae": the
    latents), one ``eval_result_details`` entry per task (``dataset_name``: the task), ``sae_cfg_dict``
    the SAELens cfg.json of the SAE's export (None when it has none). What SAEBench has no field for
    (task kinds, skipped tasks, the chosen latents, how the contexts and probes differ from
    SAEBench's) is in ``eval_result_unstructured``."""
    tasks, averages = result["tasks"], result["averages"]["all"]
    metric = lambda row, prefix: {key: row[key] for key in ACCURACIES if key.startswith(prefix)}  # noqa: E731
    return {
        "eval_type_id": SAEBENCH_EVAL_TYPE,
        "eval_config": {
            "random_seed": seed, "dataset_names": [t["task"] for t in tasks],
            "probe_train_set_size": max(t["n_train"] for t in tasks),
            "probe_test_set_size": max(t["n_test"] for t in tasks),
            "context_length": ctx_len, "sae_batch_size": READ_ROWS, "llm_batch_size": None, "llm_dtype": "",
            "model_name": model_name, "k_values": list(K_VALUES), "lower_vram_usage": False},
        "eval_id": eval_id,
        "datetime_epoch_millis": evaluated_at_ms,
        "eval_result_metrics": {"llm": metric(averages, "llm_"), "sae": metric(averages, "sae_")},
        "eval_result_details": [{"dataset_name": t["task"], **metric(t, "llm_"), **metric(t, "sae_")} for t in tasks],
        "sae_bench_commit_hash": NOT_SAEBENCH,
        "sae_lens_id": None, "sae_lens_release_id": None, "sae_lens_version": None,
        "sae_cfg_dict": sae_cfg,
        "eval_result_unstructured": {
            "no_saebench_analogue": {
                "tasks": "binary tasks from the user's own corpus: source=<text> (one text against the rest) and "
                         "<label>=<value> (labels declared in sidecar files), not SAEBench's datasets",
                "contexts": "the cached contexts of the SAE's training text, mean-pooled over their training rows; "
                            "the train/test split is over contexts, balanced per task",
                "full_probes": "llm_test_accuracy and sae_test_accuracy use the same L2 logistic regression "
                               "(C = 1, L-BFGS) as the top-k probes; SAEBench trains those two with Adam on a GPU",
                "sae_bench_commit_hash": NOT_SAEBENCH},
            "task_kinds": {t["task"]: t["kind"] for t in tasks},
            "task_sizes": {t["task"]: {"n_train": t["n_train"], "n_test": t["n_test"]} for t in tasks},
            "sae_top_k_latents": {t["task"]: {k: t[f"sae_top_{k}_columns"] for k in K_VALUES} for t in tasks},
            "averages_by_kind": result["averages"],
            "skipped_tasks": result["skipped"],
            "label_problems": result.get("label_problems", []),
            "n_contexts": result["n_contexts"]},
    }


# -- the stored result -------------------------------------------------------------------------------

def probing_inputs(store, sae_name: str, shuffle_name: str, settings, label_digests: dict[str, str]) -> dict:
    """Everything ``sae_name``'s sparse probing is computed from, as JSON: the checkpoint version,
    the shuffled store's version (which pins the activation partitions read), each label sidecar's
    SHA-256 (``text_labels.TextLabels.digests``) and the settings of
    ``evaluate.SPARSE_PROBING_SETTINGS`` (``settings``: ``evaluate.EvalSettings``). Recorded in the
    commit's pointer, so an unchanged result is recognised without recomputing it."""
    shuffled = store.pointer(shuffled_name(shuffle_name)) or {}
    return {"checkpoint": checkpoint_version(store, sae_name), "shuffled": shuffled.get("version"),
            "labels": dict(sorted(label_digests.items())),
            "settings": {key: getattr(settings, key) for key in SPARSE_PROBING_SETTINGS}}


def probing_current(store, sae_name: str, inputs: dict) -> bool:
    """Whether the committed sparse probing of ``sae_name`` was computed from exactly ``inputs``."""
    pointer = store.pointer(sparse_probing_name(sae_name))
    return pointer is not None and pointer.get("inputs") == json.loads(json.dumps(inputs))


def probe_sae(store, sae_name: str, settings, labels: TextLabels, device: str | torch.device = "cpu", *,
              inputs: dict | None = None, log=None) -> dict:
    """Run :func:`sparse_probing` on checkpoint ``sae_name`` (the contexts behind the shuffled store
    it was trained on, ``labels`` from the inbox's sidecars, ``settings``: ``evaluate.EvalSettings``)
    and commit ``sparse_probing/<sae_name>``: ``result.json`` (with the sidecars' problems as
    ``label_problems`` and the wall seconds of pooling and of the probes as ``seconds``) and the
    same figures in SAEBench's schema (:func:`saebench_output`).
    Returns the result; without a task to score (``no_score``) only ``result.json`` is written."""
    checkpoint = checkpoint_version(store, sae_name)  # read before loading: a later commit then mismatches
    sae, cfg = load_sae(store, sae_name, device)
    shuffle = trained_on(store, sae_name, cfg)
    started = time.perf_counter()
    means = context_means(store, sae, shuffle)
    pooled = time.perf_counter()
    result = sparse_probing(means, labels.labels, seed=settings.sparse_probing_seed,
                            min_contexts=settings.sparse_probing_min_contexts,
                            max_contexts=settings.sparse_probing_max_contexts, log=log)
    result["label_problems"] = labels.problems
    result["seconds"] = {"context_means": round(pooled - started, 2),
                         "probes": round(time.perf_counter() - pooled, 2)}
    attrs = activation_attrs(store, shuffle)
    result["hook_name"] = activation_hook_entry(store, shuffle).reads
    export = store.pointer(export_name(sae_name))
    sae_cfg = store.read_json(f"{store.resolve(export_name(sae_name))}/{CFG_FILENAME}") if export else None
    evaluated_at_ms = int(time.time() * 1000)
    saebench = None if result["no_score"] else saebench_output(
        result, eval_id=f"{sae_name}-{checkpoint}-{evaluated_at_ms}", evaluated_at_ms=evaluated_at_ms,
        model_name=str(attrs.get("model", "")), ctx_len=int(attrs.get("ctx_len") or 0),
        seed=settings.sparse_probing_seed, sae_cfg=sae_cfg)
    pins = {"inputs": inputs} if inputs is not None else {}
    with store.writing(sparse_probing_name(sae_name), checkpoint_step=cfg["step"], **checkpoint_pin(checkpoint),
                       **pins) as version:
        store.write_json(f"{version}/{SPARSE_PROBING_RESULT}", result)
        if saebench is not None:
            store.write_json(f"{version}/{SAEBENCH_SPARSE_PROBING}", saebench)
    return result
