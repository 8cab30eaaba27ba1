"""Real servers that integration tests start on 127.0.0.1 and throw away: PostgreSQL (the Dagster
instance), moto's S3 server (artifacts) and Redis (the Celery broker). conftest.py makes each a
fixture; the system packages come from .ci/install-postgres and .ci/install-redis (`make test`).

PostgreSQL: `initdb` into a temp dir, `pg_ctl start` on a free port of 127.0.0.1 (trust auth, user
postgres), stopped with `pg_ctl stop -m immediate` at teardown. PostgreSQL refuses to run as root:
as root the server runs as the `postgres` system user (runuser).
Redis: `redis-server` on a free port of 127.0.0.1, no persistence, its dir a temp dir; killed at teardown.
"""

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

DB_NAME = "dagster_test"
PG_USER = "postgres"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
            self.port = free_port()
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


def server_missing(problem: str, name: str, skip_env: str):
    """A test server's binaries are absent: skip when ``skip_env`` is 1, else fail naming the fix
    (``.ci/install-<name>``, which ``make test`` runs)."""
    if os.environ.get(skip_env) == "1":
        pytest.skip(f"{problem} and {skip_env}=1")
    pytest.fail(f"{problem}: run .ci/install-{name} (or `make {name}`), or set {skip_env}=1 to skip")


@contextlib.contextmanager
def postgres_server():
    """A throwaway PostgreSQL server (module docstring); pytest.fail/skip when it cannot run here."""
    bin_dir = find_server_bin()
    if bin_dir is None:
        server_missing("no PostgreSQL server (initdb, pg_ctl) in /usr/lib/postgresql/*/bin or PATH", "postgres",
                       "SAE_PLATFORM_SKIP_POSTGRES")
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


@contextlib.contextmanager
def s3_server():
    """moto's S3 server on a free port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def new_bucket(endpoint: str, monkeypatch):
    """(boto3 client, name of a new empty bucket) on ``endpoint``, with moto's dummy credentials set."""
    import boto3

    for key, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=endpoint)
    bucket = f"sae-{len(client.list_buckets()['Buckets'])}"
    client.create_bucket(Bucket=bucket)
    return client, bucket


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


def find_redis_server() -> str | None:
    return shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if os.access(p, os.X_OK)), None)


@contextlib.contextmanager
def redis_server():
    """A throwaway Redis on a free port of 127.0.0.1; yields its URL (``redis://127.0.0.1:PORT``)."""
    binary = find_redis_server()
    if binary is None:
        server_missing("no redis-server on PATH", "redis", "SAE_PLATFORM_SKIP_REDIS")
    base = Path(tempfile.mkdtemp(prefix="sae-redis-"))
    port = free_port()
    process = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(base),
                                "--save", "", "--appendonly", "no", "--protected-mode", "yes"],
                               stdout=open(base / "redis.log", "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start:\n{(base / 'redis.log').read_text()}")
            time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait()
        shutil.rmtree(base, ignore_errors=True)
