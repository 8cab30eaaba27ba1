"""k-sparse probing of each sweep entry (``sae_sparse_probing``), one partition per SAE like ``sae_eval``.

Up to date when its committed result was computed from the same checkpoint, shuffled store (so the
same cached contexts), label sidecars and settings (``sparse_probing.probing_inputs``, recorded in
its pointer). The labels are read from the text source's sidecars at every run (a few small
files); a bad sidecar is named in the log and the metadata, and the other tasks run.
"""

from dagster import MetadataValue

from assets.metadata import table_preview
from assets.partitions import SAE_SWEEP
from assets.stage import Stage, StageRun, pointer_version
from assets.training import TRAIN_JOB, shuffle_name
from sae_platform import sparse_probing
from sae_platform.catalog import SAEBENCH_SPARSE_PROBING, SPARSE_PROBING_RESULT, sparse_probing_name
from sae_platform.errors import PlatformError
from sae_platform.model import pick_device
from sae_platform.text_labels import TextLabels, read_text_labels

ACCURACY_COLUMNS = {key: "float" for key in sparse_probing.ACCURACIES}


def _labels(run: StageRun) -> TextLabels:
    """The inbox's label sidecars; an inbox that cannot be listed leaves only the source tasks."""
    source = run.resources.text_source
    try:
        inbox = source.scan(run.store)
    except (PlatformError, OSError) as error:
        run.log.warning(f"the text source could not be listed, so no label sidecar is read: {error}")
        return TextLabels(problems=[f"the text source could not be listed: {error}"])
    labels = read_text_labels(inbox.files, [(s.url, s.reason) for s in inbox.skipped], source.storage_options)
    for problem in labels.problems:
        run.log.warning(problem)
    return labels


def _inputs(run: StageRun, labels: TextLabels) -> dict:
    return sparse_probing.probing_inputs(run.store, run.partition_key, shuffle_name(run),
                                         run.resources.evaluation.settings(), labels.digests)


def probing_unchanged(run: StageRun) -> str | None:
    if sparse_probing.probing_current(run.store, run.partition_key, _inputs(run, _labels(run))):
        return "probed from the same checkpoint, cached contexts, label sidecars and settings"
    return None


def probe_sae(run: StageRun) -> dict:
    """Sparse probing of one SAE: a table per task and the averages, with the result files' paths."""
    store, name = run.store, run.partition_key
    labels = _labels(run)
    device = pick_device(run.resources.evaluation.device, warn=run.log.warning)
    result = sparse_probing.probe_sae(store, name, run.resources.evaluation.settings(), labels, device,
                                      inputs=_inputs(run, labels), log=run.log.info)
    folder = store.resolve(sparse_probing_name(name))
    skipped = table_preview(result["skipped"], {"task": "string", "reason": "string"})
    if result["no_score"]:
        run.log.warning(f"{name}: no sparse-probing score: {result['no_score']}")
        return {"hook_name": result["hook_name"], "no_score": result["no_score"], "skipped": skipped,
                "result": MetadataValue.path(store.url(f"{folder}/{SPARSE_PROBING_RESULT}"))}
    averages = result["averages"]["all"]
    run.log.info(f"{name}: {averages['n_tasks']} tasks, SAE top-1 {averages['sae_top_1_test_accuracy']:.3f} "
                 f"(residual top-1 {averages['llm_top_1_test_accuracy']:.3f}); {len(result['skipped'])} skipped")
    return {
        "hook_name": result["hook_name"],
        "averages": MetadataValue.md(averages_markdown(result["averages"])),
        "tasks": table_preview([{"task": t["task"], "kind": t["kind"], "n_test": t["n_test"],
                                 **{k: t[k] for k in ACCURACY_COLUMNS}} for t in result["tasks"]],
                               {"task": "string", "kind": "string", "n_test": "int", **ACCURACY_COLUMNS}),
        "skipped": skipped,
        "label_problems": MetadataValue.md("\n".join(f"- {p}" for p in result["label_problems"]) or "none"),
        **averages,
        **{f"seconds_{step}": seconds for step, seconds in result["seconds"].items()},
        "result": MetadataValue.path(store.url(f"{folder}/{SPARSE_PROBING_RESULT}")),
        "saebench_result": MetadataValue.path(store.url(f"{folder}/{SAEBENCH_SPARSE_PROBING}")),
    }


def averages_markdown(averages: dict) -> str:
    """The averages as a Markdown table: one row per group of tasks, residual and SAE side by side."""
    ks = sparse_probing.K_VALUES
    head = ("| tasks | n | " + " | ".join(f"residual top-{k}" for k in ks) + " | residual all | "
            + " | ".join(f"SAE top-{k}" for k in ks) + " | SAE all |")
    lines = [head, "|" + "---|" * (2 * len(ks) + 4)]
    for kind, row in averages.items():
        cells = [row[f"llm_top_{k}_test_accuracy"] for k in ks] + [row["llm_test_accuracy"]]
        cells += [row[f"sae_top_{k}_test_accuracy"] for k in ks] + [row["sae_test_accuracy"]]
        lines.append(f"| {kind} | {row['n_tasks']} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines)


SAE_SPARSE_PROBING = Stage(
    asset="sae_sparse_probing", group="training", kinds=frozenset({"pytorch"}), job=TRAIN_JOB,
    description="k-sparse probing (SAEBench): logistic probes on the top 1, 2, 5 and all mean-pooled latents per "
                "context against the same probes on the raw activations at the hook point, on binary tasks from "
                "the corpus (which text a context comes from; labels declared in <text>.labels.json sidecars).",
    partitions=SAE_SWEEP, deps=("sae_checkpoint",), resources=("storage", "shuffle", "evaluation", "text_source"),
    up_to_date=probing_unchanged, body=probe_sae,
    version=pointer_version(lambda run: sparse_probing_name(run.partition_key)))

STAGES = [SAE_SPARSE_PROBING]
