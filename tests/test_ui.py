"""The UI runs what the demo runs, driven through the real webserver: a `dagster dev` (webserver and
daemon) on the tiny model, talked to through its GraphQL API with the requests the UI's buttons send
(dagster-webserver's ui-core: LaunchpadSession.tsx, LaunchAssetExecutionButton.tsx,
LaunchAssetChoosePartitionsDialog.tsx, ConfigFetch.tsx).

1. The Launchpad of full_pipeline opens pre-filled with SAE_PLATFORM_RUN_CONFIG (its "default" preset).
2. *Launch Run* with that preset builds the same artifacts as `dagster job execute … full_pipeline -c
   <file>` on a second, separate root.
3. *Materialize* on one partition of sae_eval, launched as the UI does (no run config of its own),
   reads the file's settings (ce_contexts: 2, not the default 32), so it finds full_pipeline's
   evaluation current and skips; on sae_checkpoint and shuffle_plan likewise (same data version).
   Each skipped asset's page (its newest materialization, through GraphQL) still shows what the
   build showed: figures, curves, export, and which run built it.
4. *Materialize all* (an asset backfill of every asset and partition) is refused by its first runs
   with a message naming full_pipeline, and writes nothing.
5. After a new batch is cached, the asset graph marks shuffle_plan stale, and nothing else.

They run in the order 1, 2, 4 (while the CLI run finishes), 3, 5. The sensors and the schedule are
switched off first (as a user would, on the Automation page): the files the test puts in the inbox
must be built by the runs launched here, not by the inbox sensor.
"""

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import TINY_SAE, deployment, stop_process_group
from test_stage import BATCHES, _same_artifacts

from sae_platform.storage import ArtifactStore

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 300
UI_TAGS = [{"key": "dagster/from_ui", "value": "true"}]  # what the UI adds to every launch (uiExecutionTags.tsx)

LAUNCH = """
mutation LaunchPipelineExecution($executionParams: ExecutionParams!) {
  launchPipelineExecution(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on InvalidSubsetError { message }
    ... on PipelineNotFoundError { message }
    ... on PythonError { message stack }
  }
}"""


class UI:
    """The webserver's GraphQL endpoint, and the one code location it serves."""

    def __init__(self, port: int, process: subprocess.Popen, log: Path):
        self.url, self.process, self.log = f"http://127.0.0.1:{port}/graphql", process, log
        self.location = self.repository = None

    def query(self, text: str, **variables) -> dict:
        request = urllib.request.Request(self.url, data=json.dumps({"query": text, "variables": variables}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            out = json.loads(response.read())
        assert not out.get("errors"), out["errors"]
        return out["data"]

    @property
    def repository_selector(self) -> dict:
        return {"repositoryLocationName": self.location, "repositoryName": self.repository}

    def job_selector(self, job: str) -> dict:
        return {**self.repository_selector, "pipelineName": job}

    def wait_until_loaded(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "dagster dev exited:\n" + self.log.read_text()[-4000:]
            try:
                data = self.query("""{ workspaceOrError { __typename ... on Workspace { locationEntries {
                    name loadStatus locationOrLoadError { __typename
                      ... on RepositoryLocation { name repositories { name } }
                      ... on PythonError { message } } } } } }""")
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1)
                continue
            (entry,) = data["workspaceOrError"]["locationEntries"]
            loaded = entry["locationOrLoadError"]
            if entry["loadStatus"] == "LOADED" and loaded:
                assert loaded["__typename"] == "RepositoryLocation", loaded
                self.location, self.repository = loaded["name"], loaded["repositories"][0]["name"]
                return
            time.sleep(1)
        pytest.fail("the code location did not load:\n" + self.log.read_text()[-4000:])

    def launch(self, execution_params: dict) -> str:
        result = self.query(LAUNCH, executionParams=execution_params)["launchPipelineExecution"]
        assert result["__typename"] == "LaunchRunSuccess", result
        return result["run"]["runId"]

    def run(self, run_id: str) -> dict:
        return self.query("""query ($runId: ID!) { runOrError(runId: $runId) { __typename
            ... on Run { runId status jobName tags { key value } } } }""", runId=run_id)["runOrError"]

    def wait_for_run(self, run_id: str, timeout_s: float = RUN_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.run(run_id)["status"]
            if status in ("SUCCESS", "FAILURE", "CANCELED"):
                return status
            time.sleep(2)
        pytest.fail(f"run {run_id} not finished after {timeout_s} s:\n{self.errors(run_id)}\n"
                    + self.log.read_text()[-4000:])

    def errors(self, run_id: str) -> str:
        """The failure messages of a run's event log, as the run page shows them."""
        data = self.query("""query ($runId: ID!) { logsForRun(runId: $runId) { __typename
            ... on EventConnection { events { __typename
              ... on ExecutionStepFailureEvent { stepKey error { message causes { message } } }
              ... on RunFailureEvent { message } } } } }""", runId=run_id)["logsForRun"]
        lines = []
        for event in data.get("events", []):
            if event["__typename"] == "ExecutionStepFailureEvent":
                error = event["error"] or {}
                lines += [error.get("message", "")] + [c["message"] for c in error.get("causes") or []]
            elif event["__typename"] == "RunFailureEvent":
                lines.append(event["message"])
        return "\n".join(lines)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def ui(tmp_path, tiny_model_dir, text_dir):
    """`dagster dev` on a fresh DAGSTER_HOME and artifact root (what `make ui` starts)."""
    from dagster import DagsterInstance

    (tmp_path / "ui").mkdir()
    env = {**deployment(tmp_path / "ui", tiny_model_dir, text_dir), "PYTHONPATH": str(REPO),
           "SAE_PLATFORM_SENSOR_INTERVAL_S": "3600"}  # one tick at start (empty inbox), before they are stopped
    DagsterInstance.from_config(env["DAGSTER_HOME"]).get_runs()  # the SQLite schema, before two processes race
    log, port = tmp_path / "dagster_dev.log", _free_port()
    with open(log, "w") as out:
        process = subprocess.Popen([str(Path(sys.executable).parent / "dagster"), "dev", "-w", "workspace.yaml",
                                    "-h", "127.0.0.1", "-p", str(port)],
                                   cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        server = UI(port, process, log)
        server.wait_until_loaded()
        yield server, env
    finally:
        stop_process_group(process)


def _stop_automation(server: UI) -> None:
    """Switch off every sensor and schedule (Automation page), as the daemon would otherwise build
    the inbox's files on its own."""
    data = server.query("""query ($selector: RepositorySelector!) {
        sensorsOrError(repositorySelector: $selector) { ... on Sensors { results { name sensorState { id } } } }
        schedulesOrError(repositorySelector: $selector) { ... on Schedules { results { name scheduleState { id } } } }
      }""", selector=server.repository_selector)
    for sensor in data["sensorsOrError"]["results"]:
        out = server.query("""mutation ($id: String!) { stopSensor(id: $id) { __typename
            ... on StopSensorMutationResult { instigationState { status } } ... on PythonError { message } } }""",
                           id=sensor["sensorState"]["id"])["stopSensor"]
        assert out["instigationState"]["status"] == "STOPPED", (sensor["name"], out)
    for schedule in data["schedulesOrError"]["results"]:
        out = server.query("""mutation ($id: String!) { stopRunningSchedule(id: $id) { __typename
            ... on ScheduleStateResult { scheduleState { status } } ... on PythonError { message } } }""",
                           id=schedule["scheduleState"]["id"])["stopRunningSchedule"]
        assert out["scheduleState"]["status"] == "STOPPED", (schedule["name"], out)


def _materialize(server: UI, asset: str, partition: str | None = None) -> tuple[str, str, dict | None]:
    """*Materialize* on an asset (LaunchAssetExecutionButton.tsx): the job the UI picks (the first job
    every selected asset is in) and the asset's checks; for one partition (LaunchAssetChoosePartitionsDialog,
    single run) the partition's run config and tags as the webserver gives them (ConfigFetch.tsx), else
    no run config at all."""
    (node,) = server.query("""query ($keys: [AssetKeyInput!]) { assetNodes(assetKeys: $keys) { jobNames
        assetChecksOrError { ... on AssetChecks { checks { name jobNames } } } } }""",
                           keys=[{"path": [asset]}])["assetNodes"]
    job = node["jobNames"][0]
    config, tags, run_config = None, [], "{}"
    if partition is not None:
        config = server.query("""query ($params: PipelineSelector!, $partition: String!, $keys: [AssetKeyInput!]!) {
            pipelineOrError(params: $params) { __typename ... on Pipeline {
              partition(partitionName: $partition, selectedAssetKeys: $keys) {
                runConfigOrError { __typename ... on PartitionRunConfig { yaml } ... on PythonError { message } }
                tagsOrError { __typename ... on PartitionTags { results { key value } } ... on PythonError { message } }
              } } } }""", params=server.job_selector(job), partition=partition,
                              keys=[{"path": [asset]}])["pipelineOrError"]["partition"]
        tags, run_config = config["tagsOrError"]["results"], config["runConfigOrError"]["yaml"]
    checks = [{"name": c["name"], "assetKey": {"path": [asset]}} for c in node["assetChecksOrError"]["checks"]
              if not c["jobNames"] or job in c["jobNames"]]
    return server.launch({
        "mode": "default",
        "executionMetadata": {"tags": tags + UI_TAGS},
        "runConfigData": run_config,
        "selector": {**server.job_selector(job), "assetSelection": [{"path": [asset]}], "assetCheckSelection": checks},
    }), job, config


def _latest_materialization(server: UI, asset: str, partition: str | None = None) -> dict:
    """The newest materialization, as the asset page shows it: its run, data version tag and metadata."""
    (event,) = server.query("""query ($key: AssetKeyInput!, $partitions: [String!]) {
        assetOrError(assetKey: $key) { ... on Asset {
          assetMaterializations(partitions: $partitions, limit: 1) { runId tags { key value }
            metadataEntries { label __typename
              ... on IntMetadataEntry { intValue } ... on FloatMetadataEntry { floatValue }
              ... on TextMetadataEntry { text } } } } } }""", key={"path": [asset]},
                            partitions=[partition] if partition else None)["assetOrError"]["assetMaterializations"]
    return {"run_id": event["runId"], "tags": {t["key"]: t["value"] for t in event["tags"]},
            "metadata": {e["label"]: e.get("intValue", e.get("floatValue", e.get("text")))
                         for e in event["metadataEntries"]}}


def _stale_assets(server: UI) -> set[str]:
    """Every (asset, partition) the asset graph shows as stale."""
    nodes = server.query("{ assetNodes { assetKey { path } isPartitioned partitionKeys staleStatus } }")["assetNodes"]
    stale = set()
    for node in nodes:
        name = "/".join(node["assetKey"]["path"])
        if not node["isPartitioned"]:
            if node["staleStatus"] == "STALE":
                stale.add(name)
            continue
        (one,) = server.query("""query ($keys: [AssetKeyInput!], $partitions: [String!]!) {
            assetNodes(assetKeys: $keys) { staleStatusByPartition(partitions: $partitions) } }""",
                              keys=[node["assetKey"]], partitions=node["partitionKeys"])["assetNodes"]
        stale |= {f"{name}[{p}]" for p, s in zip(node["partitionKeys"], one["staleStatusByPartition"]) if s == "STALE"}
    return stale


def test_the_ui_runs_what_the_demo_runs(ui, tmp_path, tiny_model_dir, text_dir):
    server, env = ui
    started = time.monotonic()
    timings = {}

    # The reference: the CLI on a second, separate root with the same inputs, while the UI works.
    (tmp_path / "cli").mkdir()
    cli_env = {**deployment(tmp_path / "cli", tiny_model_dir, text_dir), "PYTHONPATH": str(REPO)}
    _stop_automation(server)  # before any file arrives in the inbox
    for env_ in (env, cli_env):
        for batch in BATCHES:
            shutil.copy(text_dir / f"{batch}.txt", Path(env_["SAE_PLATFORM_INBOX"]).parent / f"{batch}.txt")
    run_config = Path(env["SAE_PLATFORM_RUN_CONFIG"])
    with open(tmp_path / "cli.log", "w") as cli_log:  # test_full_pipeline's command, in the background
        cli = subprocess.Popen([str(Path(sys.executable).parent / "dagster"), "job", "execute", "-m",
                                "jobs.definitions", "-j", "full_pipeline", "-c", cli_env["SAE_PLATFORM_RUN_CONFIG"]],
                               cwd=REPO, env=cli_env, stdout=cli_log, stderr=subprocess.STDOUT)

    # 1. The Launchpad opens pre-filled with the run config file.
    # The Launchpad's first session is the job's first preset when it has no partition set
    # (ExecutionSessionStorage.tsx useInitialDataForMode): its "default" preset is the job's default run config.
    launchpad = server.query("""query ($selector: PipelineSelector!, $repository: RepositorySelector!) {
        pipelineOrError(params: $selector) { __typename
          ... on Pipeline { name isJob isAssetJob presets { name mode runConfigYaml } tags { key value } } }
        partitionSetsOrError(pipelineName: "full_pipeline", repositorySelector: $repository) {
          ... on PartitionSets { results { name } } } }""",
                             selector=server.job_selector("full_pipeline"), repository=server.repository_selector)
    job = launchpad["pipelineOrError"]
    assert job["__typename"] == "Pipeline" and job["isJob"] and not job["isAssetJob"], job
    assert launchpad["partitionSetsOrError"]["results"] == []
    presets = {p["name"]: p for p in job["presets"]}
    assert list(presets) == ["default"], presets
    assert yaml.safe_load(presets["default"]["runConfigYaml"]) == yaml.safe_load(run_config.read_text())

    # 2. Launch Run from the Launchpad, with that preset (LaunchpadSession.tsx buildExecutionVariables).
    run_id = server.launch({
        "runConfigData": presets["default"]["runConfigYaml"],
        "selector": {**server.job_selector("full_pipeline"), "assetSelection": [], "assetCheckSelection": []},
        "mode": presets["default"]["mode"],
        "executionMetadata": {"tags": [{"key": "dagster/preset_name", "value": "default"}]
                              + [{"key": t["key"], "value": t["value"]} for t in job["tags"]] + UI_TAGS},
    })
    status = server.wait_for_run(run_id)
    assert status == "SUCCESS", server.errors(run_id)
    timings["launch_run"] = time.monotonic() - started

    # 4. Materialize all: one asset backfill of every asset over all partitions (LaunchAssetChoosePartitionsDialog,
    # target "pureAll"), launched by the daemon; its first runs cancel it and refuse, nothing red, nothing written.
    root = Path(env["SAE_PLATFORM_ROOT"])
    before = _files(root)
    nodes = [n for n in server.query("""{ assetNodes { assetKey { path } isMaterializable isPartitioned
        dependencyKeys { path } } }""")["assetNodes"] if n["isMaterializable"]]
    keys = [n["assetKey"] for n in nodes]
    assert len(keys) >= 13, keys
    # The dialog's target is "pureAll" (allPartitions) when no root of the selection is partitioned.
    roots = [n for n in nodes if not any(d in keys for d in n["dependencyKeys"])]
    assert [r["assetKey"]["path"] for r in roots if r["isPartitioned"]] == [], roots
    backfill = server.query("""mutation ($params: LaunchBackfillParams!) {
        launchPartitionBackfill(backfillParams: $params) { __typename
          ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message stack } } }""",
                            params={"tags": UI_TAGS, "assetSelection": keys, "allPartitions": True})
    backfill = backfill["launchPartitionBackfill"]
    assert backfill["__typename"] == "LaunchBackfillSuccess", backfill
    backfill_id = backfill["backfillId"]

    cli.wait(timeout=RUN_TIMEOUT_S)  # meanwhile the CLI run finishes: compare the artifacts
    assert cli.returncode == 0, (tmp_path / "cli.log").read_text()[-5000:]
    _same_artifacts(ArtifactStore(env["SAE_PLATFORM_ROOT"]), ArtifactStore(cli_env["SAE_PLATFORM_ROOT"]))
    timings["cli_compared"] = time.monotonic() - started

    deadline = time.monotonic() + 150  # the backfill daemon ticks every 30 s
    refused, page = [], {}
    while time.monotonic() < deadline:
        runs = server.query("""query ($filter: RunsFilter) { runsOrError(filter: $filter) {
            ... on Runs { results { runId status } } } }""",
                            filter={"tags": [{"key": "dagster/backfill", "value": backfill_id}]})
        runs = runs["runsOrError"]["results"]
        page = server.query("""query ($id: String!) { partitionBackfillOrError(backfillId: $id) {
            ... on PartitionBackfill { status error { message stack } assetBackfillData { assetBackfillStatuses {
              ... on AssetPartitionsStatusCounts { assetKey { path } numPartitionsFailed numPartitionsInProgress }
              ... on UnpartitionedAssetStatus { assetKey { path } failed inProgress } } } } } }""",
                            id=backfill_id)["partitionBackfillOrError"]
        finished = runs and all(r["status"] in ("SUCCESS", "FAILURE", "CANCELED") for r in runs)
        if finished and page["status"] != "REQUESTED":
            refused = runs
            break
        time.sleep(2)
    assert refused, f"the backfill launched no run that finished in time:\n{server.log.read_text()[-4000:]}"
    # Its page: canceled, the message readable (no stack trace), no asset failed or in progress.
    message = page["error"]["message"]
    assert page["status"] == "CANCELED" and page["error"]["stack"] == [], page
    assert "Materialize all" in message and "full_pipeline" in message, message
    statuses = page["assetBackfillData"]["assetBackfillStatuses"]
    assert statuses and not any(s.get("failed") or s.get("inProgress") or s.get("numPartitionsFailed")
                                or s.get("numPartitionsInProgress") for s in statuses), statuses
    # Its runs end without failing and without materializing; each logs the message at error level.
    for run in refused:
        assert run["status"] == "SUCCESS", (run, server.errors(run["runId"]))
        logged = server.query("""query ($runId: ID!) { logsForRun(runId: $runId) { ... on EventConnection {
            events { __typename ... on MessageEvent { level message } } } } }""", runId=run["runId"])
        events = logged["logsForRun"]["events"]
        assert [e["message"] for e in events if e.get("level") == "ERROR"] == [message], events
        assert not any(e["__typename"] == "MaterializationEvent" for e in events), events
    # No asset shows a failure: no failed partition, no failed latest run.
    assets = server.query("""{ assetNodes { assetKey { path } partitionStats { numFailed numMaterializing } } }""")
    assert not any((n["partitionStats"] or {}).get("numFailed") for n in assets["assetNodes"]), assets
    latest = server.query("""query ($keys: [AssetKeyInput!]!) { assetsLatestInfo(assetKeys: $keys) {
        assetKey { path } latestRun { status } } }""", keys=keys)["assetsLatestInfo"]
    assert not any((a["latestRun"] or {}).get("status") == "FAILURE" for a in latest), latest
    assert _files(root) == before, "a refused backfill writes nothing"
    assert sorted(p.name for p in (root / "sae").iterdir()) == [TINY_SAE], "no other SAE of the sweep is trained"
    print(f"backfill {backfill_id}: {len(refused)} run(s) refused, backfill {page['status']}:",
          next(line for line in message.splitlines() if "Materialize all" in line)[:300])
    timings["backfill_refused"] = time.monotonic() - started

    # 3. Materialize on one partition of sae_eval: no run config of its own, the file's settings.
    run_id, job_name, partition_config = _materialize(server, "sae_eval", TINY_SAE)
    assert yaml.safe_load(partition_config["runConfigOrError"]["yaml"]) in (None, {}), partition_config
    assert {"key": "dagster/partition", "value": TINY_SAE} in partition_config["tagsOrError"]["results"]
    status = server.wait_for_run(run_id)
    assert status == "SUCCESS", server.errors(run_id)
    launched = server.query("""query ($runId: ID!) { runOrError(runId: $runId) { ... on Run { runConfigYaml } } }""",
                            runId=run_id)["runOrError"]
    assert yaml.safe_load(launched["runConfigYaml"]) in (None, {}), launched  # no run config: resource defaults
    evaluation = _latest_materialization(server, "sae_eval", TINY_SAE)
    assert evaluation["run_id"] == run_id
    # Evaluated by full_pipeline from the same inputs with the file's settings: skipped, and the asset's page
    # still shows that build's figures (ce_contexts 2 is the file's; the default is 32) and names the build.
    assert "up_to_date" in evaluation["metadata"], evaluation
    assert evaluation["metadata"]["ce_n_contexts"] == 2, evaluation
    assert {"fvu", "l0", "latent_density", "built_by_run", "built_at"} <= set(evaluation["metadata"]), evaluation
    # The same for the checkpoint: a skip keeps its training curves and its SAELens export on the page.
    checkpoint_before = _latest_materialization(server, "sae_checkpoint", TINY_SAE)
    run_id, _, _ = _materialize(server, "sae_checkpoint", TINY_SAE)
    assert server.wait_for_run(run_id) == "SUCCESS", server.errors(run_id)
    checkpoint = _latest_materialization(server, "sae_checkpoint", TINY_SAE)
    assert checkpoint["run_id"] == run_id and "up_to_date" in checkpoint["metadata"], checkpoint
    assert set(checkpoint_before["metadata"]) <= set(checkpoint["metadata"]), checkpoint
    assert {"training_curves", "saelens_export", "final_nmse"} <= set(checkpoint["metadata"]), checkpoint
    assert checkpoint["metadata"]["built_by_run"] == checkpoint_before["run_id"]
    # ... and on an unpartitioned asset (one click, runConfigData "{}"): shuffle_plan keeps the committed
    # plan, which full_pipeline made with the file's shuffle settings (the first complaint).
    plan_before = _latest_materialization(server, "shuffle_plan")
    run_id, _, _ = _materialize(server, "shuffle_plan")
    status = server.wait_for_run(run_id)
    assert status == "SUCCESS", server.errors(run_id)
    plan = _latest_materialization(server, "shuffle_plan")
    assert plan["run_id"] == run_id and "up_to_date" in plan["metadata"], plan
    assert set(plan_before["metadata"]) <= set(plan["metadata"]), plan  # the page keeps the plan's figures
    assert plan["tags"]["dagster/data_version"] == plan_before["tags"]["dagster/data_version"]
    _same_artifacts(ArtifactStore(env["SAE_PLATFORM_ROOT"]), ArtifactStore(cli_env["SAE_PLATFORM_ROOT"]))
    timings["materialize"] = time.monotonic() - started
    print(f"Materialize ran job {job_name}; shuffle_plan: {plan['metadata']['up_to_date']}")

    # 5. A new batch cached (Materialize on its new partition): the shuffle plan is stale, nothing else.
    # After full_pipeline and the skips of step 3 nothing is stale (a skip keeps the data version).
    assert _stale_assets(server) == set(), "after full_pipeline and the skipped materializations"
    inbox = Path(env["SAE_PLATFORM_INBOX"]).parent
    (inbox / "delta.txt").write_text((text_dir / "gamma.txt").read_text() * 2)
    added = server.query("""mutation ($selector: RepositorySelector!) {
        addDynamicPartition(repositorySelector: $selector, partitionsDefName: "activation_batches",
                            partitionKey: "delta") { __typename } }""", selector=server.repository_selector)
    assert added["addDynamicPartition"]["__typename"] == "AddDynamicPartitionSuccess", added
    run_id, _, _ = _materialize(server, "activations", "delta")
    status = server.wait_for_run(run_id)
    assert status == "SUCCESS", server.errors(run_id)
    assert _stale_assets(server) == {"shuffle_plan"}
    timings["stale"] = time.monotonic() - started

    # Every run of the instance was launched here: no sensor or schedule built anything behind our back.
    runs = server.query("{ runsOrError { ... on Runs { results { jobName tags { key value } } } } }")
    launched = sorted((r["jobName"], any(t["key"] == "dagster/backfill" for t in r["tags"]))
                      for r in runs["runsOrError"]["results"])
    assert launched == sorted([("full_pipeline", False), *[("__ASSET_JOB", True)] * len(refused),
                               *[("__ASSET_JOB", False)] * 4]), launched
    print("elapsed (s):", {k: round(v) for k, v in timings.items()})
