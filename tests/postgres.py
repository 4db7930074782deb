"""A throw-away PostgreSQL server for tests: a fresh cluster (initdb) in a temporary folder, listening on
127.0.0.1 only, on a free port, with trust auth for 127.0.0.1 and no fsync; stopped and deleted afterwards,
also when the test fails.

Test files import the fixture by name: `from postgres import postgres_url  # noqa: F401`.
The binaries come from Debian's `postgresql` package (`bash scripts/setup.sh --test` installs it). Where they
are missing the tests skip, unless CNNKIT_REQUIRE_POSTGRES is set (CI sets it), then they fail.
PostgreSQL refuses to run as root, so as root the server runs as the package's `postgres` system user.
"""
from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

BINARIES = ("initdb", "pg_ctl", "postgres")
INSTALL_HINT = "install it with `apt-get install postgresql` (or `bash scripts/setup.sh --test`)"
DATABASE = "cnnkit"
# The server's settings: reachable from this machine only, sockets in its own folder (not
# /var/run/postgresql, which belongs to the system's clusters), and durability traded for speed
# (a throw-away cluster has nothing to lose on a crash).
SERVER_CONF = """
listen_addresses = '127.0.0.1'
unix_socket_directories = '{socket_dir}'
fsync = off
synchronous_commit = off
full_page_writes = off
"""
# Who may connect: anyone on 127.0.0.1 without a password; nothing else (not even the unix socket).
HBA_CONF = "host all all 127.0.0.1/32 trust\n"


@dataclass(frozen=True)
class Postgres:
    url: str   # a SQLAlchemy URL of the empty database DATABASE
    port: int
    root: Path  # the temporary folder holding the cluster (data/) and the server log (server.log)


def unavailable(reason: str):
    """Skip the test, or fail it where CI requires the server (CNNKIT_REQUIRE_POSTGRES)."""
    if os.environ.get("CNNKIT_REQUIRE_POSTGRES"):
        pytest.fail(f"{reason} (CNNKIT_REQUIRE_POSTGRES is set)")
    pytest.skip(reason)


def find_bindir() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres: Debian keeps them off PATH in
    /usr/lib/postgresql/VERSION/bin (newest version first), elsewhere pg_config or PATH names it."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                        key=lambda d: [int(p) for p in Path(d).parent.name.split(".") if p.isdigit()], reverse=True)
    if shutil.which("pg_config"):
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=30)
            candidates.append(out.stdout.strip())
    if shutil.which("initdb"):
        candidates.append(str(Path(shutil.which("initdb")).resolve().parent))
    for d in candidates:
        if d and all(os.access(Path(d, b), os.X_OK) for b in BINARIES):
            return Path(d)
    return None


def server_user() -> list[str]:
    """The command prefix that runs PostgreSQL's programs: as root, `runuser -u postgres --` (postgres
    will not run as root); otherwise nothing (the current user owns the cluster)."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        unavailable(f"running as root and there is no `postgres` user to run the server as; {INSTALL_HINT}")
    if shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--"]
    unavailable("running as root and `runuser` (util-linux) is missing, so the server cannot drop root")


def free_port() -> int:
    """A port free on 127.0.0.1 now (the OS picks it); a race with another program is possible, so
    start() retries with a new one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    # cwd is the cluster's folder: the postgres user may not be allowed into the test's working directory.
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, "LC_ALL": "C", "LANG": "C"})


def init_cluster(bindir: Path, as_user: list[str], root: Path) -> Path:
    """initdb into ROOT/data with our settings; returns the data folder."""
    data = root / "data"
    # --no-sync: nothing to make durable; superuser `postgres` (the name in the URL); C locale, so the
    # cluster does not depend on which locales this machine has generated.
    out = run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
               "--no-sync", "-E", "UTF8", "--locale=C"], cwd=root)
    if out.returncode != 0:
        raise RuntimeError(f"initdb failed (exit {out.returncode}):\n{out.stdout}\n{out.stderr}")
    with open(data / "postgresql.conf", "a") as f:
        f.write(SERVER_CONF.format(socket_dir=data))
    (data / "pg_hba.conf").write_text(HBA_CONF)
    return data


def start(bindir: Path, as_user: list[str], root: Path, data: Path, tries: int = 3) -> int:
    """pg_ctl start on a free port, waiting until it accepts connections; returns the port."""
    log = root / "server.log"
    for _ in range(tries):
        port = free_port()
        out = run([*as_user, str(bindir / "pg_ctl"), "start", "-w", "-t", "60", "-D", str(data),
                   "-l", str(log), "-o", f"-p {port}"], cwd=root)
        if out.returncode == 0:
            return port
        server_log = log.read_text(errors="replace") if log.exists() else ""
        if "could not bind" not in server_log:  # anything but losing the port race is a real failure
            break
    raise RuntimeError(f"pg_ctl start failed (exit {out.returncode}):\n{out.stdout}\n{out.stderr}\n{server_log}")


def create_database(port: int) -> None:
    import psycopg2  # imported here so that a module importing the fixture loads without it

    conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres", connect_timeout=30)
    try:
        conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {DATABASE}")
    finally:
        conn.close()


@contextlib.contextmanager
def running_postgres() -> Iterator[Postgres]:
    """Start a fresh server and yield it; stop it (immediately: nothing to flush) and delete its folder
    on the way out, whatever happened inside."""
    bindir = find_bindir()
    if bindir is None:
        unavailable(f"PostgreSQL ({', '.join(BINARIES)}) is not installed; {INSTALL_HINT}")
    try:
        import psycopg2  # noqa: F401  (the driver the URL names)
    except ImportError:
        unavailable("psycopg2 is not installed; `bash scripts/setup.sh --test` installs the test dependencies")
    as_user = server_user()
    # Under /tmp (not pytest's tmp_path, whose parents the postgres user cannot traverse), owned by
    # the user the server runs as (mkdtemp makes it 0700: no one else reads the cluster or its log).
    root = Path(tempfile.mkdtemp(prefix="cnnkit-pg-"))
    data = None
    try:
        if as_user:
            shutil.chown(root, "postgres", "postgres")
        data = init_cluster(bindir, as_user, root)
        port = start(bindir, as_user, root, data)
        create_database(port)
        yield Postgres(f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{DATABASE}", port, root)
    finally:
        try:
            if data is not None and (data / "postmaster.pid").exists():
                run([*as_user, str(bindir / "pg_ctl"), "stop", "-w", "-m", "immediate", "-D", str(data)], cwd=root)
        finally:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """SQLAlchemy URL of the database `cnnkit` on a throw-away server, one per test module: start to stop
    takes 1-2.5 s on 2 busy CPU cores, most of it initdb (copying a ready cluster instead is no faster
    here), too long to pay per test. Tests in one module share the server, so each uses its own names
    (study, table)."""
    with running_postgres() as pg:
        yield pg.url
