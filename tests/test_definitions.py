"""The code location as a whole: a snapshot of the asset graph and the jobs (as dagster-open-platform
does), so that an accidental change to the graph fails here; and the one-vocabulary rules.

After an intended change to the graph, regenerate the snapshot and review its diff:
    UPDATE_SNAPSHOTS=1 python -m pytest tests/test_definitions.py
"""

import json
import os
from pathlib import Path

import pytest
import yaml
from dagster import Definitions, DynamicPartitionsDefinition, MultiPartitionsDefinition, StaticPartitionsDefinition

from assets import STAGES
from jobs.definitions import ASSET_JOBS, build_definitions
from jobs.settings import Settings
from resources import STAGE_SETTINGS, stage_resource
from sae_platform.settings import SettingsError, default_of

REPO = Path(__file__).resolve().parents[1]
SNAPSHOT = Path(__file__).parent / "snapshots" / "definitions.json"


def _settings(tmp_path, run_config: str | None = None) -> Settings:
    return Settings(root_url=str(tmp_path / "artifacts"), data_dir=str(tmp_path), inbox=str(tmp_path / "inbox" / "*"),
                    s3_endpoint_url=None, run_config=run_config)


def _partitions(partitions_def) -> object:
    if partitions_def is None:
        return None
    if isinstance(partitions_def, DynamicPartitionsDefinition):
        return f"dynamic:{partitions_def.name}"
    if isinstance(partitions_def, MultiPartitionsDefinition):
        return {d.name: _partitions(d.partitions_def) for d in partitions_def.partitions_defs}
    if isinstance(partitions_def, StaticPartitionsDefinition):
        return partitions_def.get_partition_keys()
    return type(partitions_def).__name__


def snapshot(defs: Definitions) -> dict:
    graph = defs.resolve_asset_graph()
    assets = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        assets[key.to_user_string()] = {
            "group": node.group_name, "partitions": _partitions(node.partitions_def),
            "deps": sorted(k.to_user_string() for k in node.parent_keys),
            "checks": sorted(c.name for c in node.check_keys),
            "blocking_checks": sorted(c.name for c in node.check_keys if graph.get_check_spec(c).blocking),
        }
    jobs = {job.name: sorted(node.name for node in job.graph.node_defs) for job in defs.resolve_all_job_defs()
            if not job.name.startswith("__")}
    return {"assets": assets, "jobs": jobs,
            "sensors": sorted(s.name for s in defs.sensors), "schedules": sorted(s.name for s in defs.schedules)}


def test_asset_graph_and_jobs_match_the_snapshot(tmp_path):
    current = snapshot(build_definitions(_settings(tmp_path)))
    if os.environ.get("UPDATE_SNAPSHOTS"):
        SNAPSHOT.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
    assert current == json.loads(SNAPSHOT.read_text()), (
        "the asset graph or the jobs changed; if intended, run UPDATE_SNAPSHOTS=1 pytest tests/test_definitions.py "
        "and review the snapshot's diff")


def test_definitions_load_as_a_code_server_would(tmp_path):
    Definitions.validate_loadable(build_definitions(_settings(tmp_path, str(REPO / "config" / "demo.yaml"))))


def test_each_stage_is_one_asset_and_one_full_pipeline_step(tmp_path):
    defs = build_definitions(_settings(tmp_path))
    steps = {node.name for node in defs.resolve_job_def("full_pipeline").graph.node_defs}
    assets = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert set(STAGES) == assets
    assert {stage.op_name for stage in STAGES.values()} <= steps


def test_each_stage_has_one_name_and_declares_its_asset_job(tmp_path):
    """Besides its asset key, a stage has one name: its body's, which is its full_pipeline step; and the
    asset jobs are the ones the stages declare, each selecting exactly the stages that name it."""
    from assets.stage import Stage, upstream_keys

    names = [stage.op_name for stage in STAGES.values()]
    assert names == [stage.body.__name__ for stage in STAGES.values()]
    assert len(set(names)) == len(names) and not set(names) & set(STAGES)
    with pytest.raises(TypeError, match="named function"):
        Stage(asset="x", description="", group="g", body=lambda run: {}, version=lambda run: None)
    assert all(stage.job for stage in STAGES.values())
    declared = list(STAGES)  # in dependency order, which full_pipeline and `sae-platform features` follow
    for position, stage in enumerate(STAGES.values()):
        assert {key.to_user_string() for key in upstream_keys(stage)} <= set(declared[:position]), stage.asset
    graph = build_definitions(_settings(tmp_path)).resolve_asset_graph()
    assert [job.name for job in ASSET_JOBS] == list(dict.fromkeys(stage.job.name for stage in STAGES.values()))
    for job in ASSET_JOBS:
        declared = [stage for stage in STAGES.values() if stage.job.name == job.name]
        assert job.description == declared[0].job.description
        assert {key.to_user_string() for key in job.selection.resolve(graph)} == {stage.asset for stage in declared}


def test_no_stage_reads_op_config_every_setting_is_a_resource(tmp_path):
    """One vocabulary: a stage's settings are resources.<stage>.config whichever job runs it, so no
    stage op (asset or full_pipeline step) takes op config, and an old `ops.<step>.config` is refused."""
    defs = build_definitions(_settings(tmp_path))
    stage_ops = {stage.op_name for stage in STAGES.values()} | set(STAGES)
    checked = 0
    for job in defs.resolve_all_job_defs():
        for node in job.graph.node_defs:
            if node.name in stage_ops:
                config_type = node.config_schema.as_field().config_type
                assert config_type.kind.name == "PERMISSIVE_SHAPE" and not config_type.fields, (job.name, node.name)
                checked += 1
    assert checked >= 2 * len(STAGES)
    result = defs.resolve_job_def("full_pipeline").execute_in_process(
        run_config={"ops": {"convert_base_model": {"config": {"token_budget": 1000, "batchsize": 2}}}},
        raise_on_error=False)
    message = result.failure_data_for_node("convert_base_model").error.cause.message
    assert "stages take no op config" in message and "unknown: batchsize, token_budget" in message
    result = build_definitions(_settings(tmp_path)).resolve_job_def("train_saes").execute_in_process(
        partition_key="relu-4k", run_config={"ops": {"sae_checkpoint": {"config": {"token_budget": 1000}}}},
        raise_on_error=False)
    message = result.failure_data_for_node("sae_checkpoint").error.cause.message
    assert "ops.sae_checkpoint.config.token_budget -> resources.training.config.token_budget" in message


def test_launchpad_opens_with_the_run_config_file_and_materialize_uses_its_settings(tmp_path):
    demo = REPO / "config" / "demo.yaml"
    defs = build_definitions(_settings(tmp_path, str(demo)))
    assert defs.resolve_job_def("full_pipeline").run_config == yaml.safe_load(demo.read_text())
    resources = defs.resources
    assert resources["training"].token_budget == 614_400 and resources["caching"].max_contexts == 160
    assert resources["shuffle"].memory_budget_bytes == 48 << 20
    # what the file does not set keeps the default declared once, in sae_platform
    from sae_platform.trainer import TrainSettings

    assert resources["training"].holdout_rows == default_of(TrainSettings, "holdout_rows") == 8192


def test_the_10x_demo_is_the_demo_with_more_contexts_and_its_run_config_validates(tmp_path):
    """config/demo-10x.yaml (issue 25.5): config/demo.yaml with only max_contexts raised, so the two cannot
    drift apart; it loads as the code location's run config file and validates as full_pipeline's."""
    from dagster import validate_run_config

    demo, tenfold = (yaml.safe_load((REPO / "config" / name).read_text()) for name in ("demo.yaml", "demo-10x.yaml"))
    contexts = tenfold["resources"]["caching"]["config"].pop("max_contexts")
    assert contexts > demo["resources"]["caching"]["config"].pop("max_contexts")
    assert tenfold == demo
    defs = build_definitions(_settings(tmp_path, str(REPO / "config" / "demo-10x.yaml")))
    assert defs.resources["caching"].max_contexts == contexts
    validate_run_config(defs.resolve_job_def("full_pipeline"), defs.resolve_job_def("full_pipeline").run_config)


def test_every_stage_setting_has_its_documentation_and_default_from_the_core():
    for key, (settings_class, left_out, _) in STAGE_SETTINGS.items():
        resource = stage_resource(key)
        for name, field in type(resource).model_fields.items():
            if name == "device":
                continue
            assert field.description, (key, name)
            assert getattr(resource, name) == default_of(settings_class, name), (key, name)


def test_a_bad_setting_in_the_run_config_file_is_refused_when_the_code_loads(tmp_path):
    bad = tmp_path / "run.yaml"
    bad.write_text("resources:\n  training:\n    config: {batch_size: -256}\n")
    with pytest.raises(SettingsError, match="resources.training.config.batch_size = -256 is too small"):
        build_definitions(_settings(tmp_path, str(bad)))
    bad.write_text("resources:\n  training:\n    config: {batchsize: 256}\n")
    with pytest.raises(SettingsError, match="unknown setting.*batchsize"):
        build_definitions(_settings(tmp_path, str(bad)))


def test_no_step_or_asset_waits_for_an_optional_stage(tmp_path):
    """An optional stage (the LLM explanations) can fail without blocking anything: no asset depends
    on it and, in full_pipeline, no step waits for its step (the browser is written either way)."""
    from assets.stage import upstream_keys

    optional = [stage for stage in STAGES.values() if stage.optional]
    assert [stage.asset for stage in optional] == ["feature_llm_explanations", "neuronpedia_export"]
    structure = build_definitions(_settings(tmp_path)).resolve_job_def("full_pipeline").graph.dependency_structure
    for stage in optional:
        assert not structure.output_to_downstream_inputs_for_node(stage.op_name), stage.op_name
        assert not [s.asset for s in STAGES.values() if stage.asset in {k.to_user_string() for k in upstream_keys(s)}]


NUMBER_WORDS = {"four": 4, "five": 5, "six": 6, "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17}


def test_the_readme_and_docs_name_what_this_build_has(tmp_path):
    """The asset and group counts the README states, and every job the docs name (`X` run/job,
    ``-j X``), are those of the definitions: a doc number or name that drifts fails here."""
    import re

    defs = build_definitions(_settings(tmp_path))
    graph = defs.resolve_asset_graph()
    keys = list(graph.get_all_asset_keys())
    groups = {graph.get(k).group_name for k in keys}
    readme = (REPO / "README.md").read_text()
    stated = re.search(r"(\w+) assets from `base_model` to `feature_browser` in (\w+)\s+groups", readme)
    assert stated, "README: the sentence stating the asset count is gone"
    count = lambda word: int(word) if word.isdigit() else NUMBER_WORDS[word.lower()]  # noqa: E731
    assert (count(stated.group(1)), count(stated.group(2))) == (len(keys), len(groups)) == (23, 4)
    jobs = {job.name for job in defs.resolve_all_job_defs()} | {k.to_user_string() for k in keys}  # "`sae_eval` run"
    for doc in [REPO / "README.md", *(REPO / "docs").glob("*.md")]:
        text = doc.read_text()
        named = set(re.findall(r"`(\w+)` (?:job|run)\b", text)) | set(re.findall(r"-j (\w+)", text))
        assert named <= jobs, f"{doc.name} names jobs this build does not have: {sorted(named - jobs)}"
