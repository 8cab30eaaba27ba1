"""The Dagster instance on a real PostgreSQL server (config/dagster-postgres.yaml), through the real CLI.

A throwaway server is started for this module: `initdb` into a temp dir, `pg_ctl start` on a free port
of 127.0.0.1 (trust auth, user postgres), stopped with `pg_ctl stop -m immediate` at teardown.
PostgreSQL refuses to run as root: as root the server runs as the `postgres` system user (runuser).
The server binaries come from Debian's postgresql package: `.ci/install-postgres` (run by `make test`).
"""

import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DB_NAME = "dagster_test"
PG_USER = "postgres"
ACTIVATIONS_KEY = json.dumps(["activations"])  # how the event log stores AssetKey("activations")


def find_server_bin() -> Path | None:
    """The directory holding initdb and pg_ctl: newest /usr/lib/postgresql/*/bin, else PATH."""
    def version(path: str) -> tuple:
        part = Path(path).parent.name
        return tuple(int(x) for x in part.split(".") if x.isdigit())

    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if os.access(os.path.join(d, "initdb"), os.X_OK) and os.access(os.path.join(d, "pg_ctl"), os.X_OK):
            return Path(d)
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return Path(os.path.realpath(pg_ctl)).parent
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    def __init__(self, bin_dir: Path, base: Path, as_user: str | None):
        self.bin_dir, self.base, self.as_user = bin_dir, base, as_user
        self.data, self.sockets, self.log = base / "data", base / "sockets", base / "server.log"
        self.host, self.port = "127.0.0.1", 0

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        if self.as_user:
            cmd = ["runuser", "-u", self.as_user, "--", *cmd]
        # cwd: a directory the server user can enter (not the repo, which may be root-only).
        proc = subprocess.run(cmd, cwd=self.base, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
                               f"\n{self.log.read_text() if self.log.exists() else ''}")
        return proc

    def start(self) -> None:
        self.sockets.mkdir()
        if self.as_user:
            owner = pwd.getpwnam(self.as_user)
            for path in (self.base, self.sockets):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", PG_USER, "--auth=trust", "--encoding=UTF8",
                  "--no-locale", "--no-sync")
        for attempt in range(3):  # the free port can be taken between probing it and binding it
            self.port = _free_port()
            options = (f"-c listen_addresses={self.host} -p {self.port} -k {self.sockets} "
                       "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
            proc = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30",
                             "-o", options, "start", check=attempt == 2)
            if proc.returncode == 0:
                break
        conn = self.connect("postgres")
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE {DB_NAME}")
        finally:
            conn.close()

    def stop(self) -> None:
        if self.data.exists():
            self._run("pg_ctl", "-D", str(self.data), "stop", "-m", "immediate", check=False)

    def connect(self, db: str = DB_NAME):
        import psycopg2  # installed with dagster-postgres

        return psycopg2.connect(host=self.host, port=self.port, user=PG_USER, dbname=db, connect_timeout=10)

    def env(self) -> dict[str, str]:
        """What config/dagster-postgres.yaml reads."""
        return {"DAGSTER_PG_HOST": self.host, "DAGSTER_PG_PORT": str(self.port), "DAGSTER_PG_USER": PG_USER,
                "DAGSTER_PG_PASSWORD": "", "DAGSTER_PG_DB": DB_NAME}

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def pg_server():
    bin_dir = find_server_bin()
    if bin_dir is None:
        if os.environ.get("SAE_PLATFORM_SKIP_POSTGRES") == "1":
            pytest.skip("no PostgreSQL server binaries and SAE_PLATFORM_SKIP_POSTGRES=1")
        pytest.fail("no PostgreSQL server (initdb, pg_ctl) in /usr/lib/postgresql/*/bin or PATH: "
                    "run .ci/install-postgres (or `make postgres`), or set SAE_PLATFORM_SKIP_POSTGRES=1 to skip")
    as_user = None
    if os.geteuid() == 0:  # "initdb: cannot be run as root"
        as_user = "postgres"
        try:
            pwd.getpwnam(as_user)
        except KeyError:
            pytest.fail("running as root and there is no 'postgres' system user to run the server as: "
                        "run .ci/install-postgres (Debian's postgresql package creates it)")
        if shutil.which("runuser") is None:
            pytest.fail("running as root and `runuser` (util-linux) is missing: cannot drop to 'postgres'")
    # Not pytest's tmp_path: its parents are root-only (0700), the postgres user could not enter them.
    base = Path(tempfile.mkdtemp(prefix="sae-pg-"))
    server = PgServer(bin_dir, base, as_user)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def _is_sqlite(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(16) == b"SQLite format 3\x00"


def test_dagster_job_execute_stores_everything_in_postgres(pg_server, tiny_model_dir, text_dir, tmp_path,
                                                           monkeypatch):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "config" / "dagster-postgres.yaml", home / "dagster.yaml")
    artifacts = tmp_path / "artifacts"
    env = {**os.environ, "DAGSTER_HOME": str(home), "SAE_PLATFORM_ROOT": str(artifacts),
           "SAE_PLATFORM_INBOX": str(text_dir / "*"), "SAE_PLATFORM_DATA": str(tmp_path), **pg_server.env()}
    bin_dir = Path(sys.executable).parent

    # The dynamic partitions go to the instance, i.e. into PostgreSQL.
    reg = subprocess.run([str(bin_dir / "sae-platform"), "register"], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert reg.returncode == 0, reg.stderr[-3000:]
    assert "3 partitions registered" in reg.stdout

    run_config = tmp_path / "run.yaml"
    run_config.write_text(json.dumps({
        "resources": {"language_model": {"config": {"source": str(tiny_model_dir), "layer": 1, "device": "cpu"}},
                      "caching": {"config": {"ctx_len": 32, "batch_size": 4}}},
    }))  # JSON is YAML
    started = time.time()
    run = subprocess.run([str(bin_dir / "dagster"), "job", "execute", "-m", "jobs.definitions",
                          "-j", "cache_activations", "-c", str(run_config),
                          "--tags", json.dumps({"dagster/partition": "alpha"})],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert "RUN_SUCCESS" in run.stderr + run.stdout
    assert (artifacts / "activations").exists()

    # Read PostgreSQL itself.
    runs = pg_server.query("SELECT run_id, status, partition FROM runs WHERE pipeline_name = %s",
                           ("cache_activations",))
    assert len(runs) == 1 and runs[0][1:] == ("SUCCESS", "alpha"), runs
    run_id = runs[0][0]
    materializations = pg_server.query(
        "SELECT run_id, partition FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION' "
        "AND asset_key = %s", (ACTIVATIONS_KEY,))
    assert materializations == [(run_id, "alpha")]
    partitions = pg_server.query("SELECT partition FROM dynamic_partitions WHERE partitions_def_name = %s "
                                 "ORDER BY partition", ("activation_batches",))
    assert [p for (p,) in partitions] == ["alpha", "beta", "gamma"]

    # And through Dagster's own API, reading the same yaml from $DAGSTER_HOME.
    from dagster import AssetKey, DagsterInstance

    for key in ("DAGSTER_HOME", *pg_server.env()):
        monkeypatch.setenv(key, env[key])
    with DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        event = instance.get_latest_materialization_event(AssetKey("activations"))
        assert event is not None and event.run_id == run_id
        assert event.asset_materialization.partition == "alpha"
        assert instance.get_dynamic_partitions("activation_batches") == ["alpha", "beta", "gamma"]

    # Nothing went to SQLite under $DAGSTER_HOME.
    files = [p for p in home.rglob("*") if p.is_file()]
    sqlite = [p for p in files if p.suffix in {".db", ".sqlite", ".sqlite3"} or _is_sqlite(p)]
    assert sqlite == [], sqlite
    assert not (home / "history").exists() and not (home / "schedules").exists()
    print(f"dagster job execute on postgres: {time.time() - started:.1f} s")

    # On a shared instance a process id means nothing: recover refuses unless told all runs ran here.
    refused = subprocess.run([str(bin_dir / "sae-platform"), "recover"], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--all-runs-on-this-host" in refused.stderr, refused.stderr[-2000:]
    allowed = subprocess.run([str(bin_dir / "sae-platform"), "recover", "--all-runs-on-this-host"], env=env,
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert allowed.returncode == 0 and "0 dead run(s)" in allowed.stdout, allowed.stdout + allowed.stderr
