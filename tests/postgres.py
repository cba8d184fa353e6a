"""A throwaway PostgreSQL server for tests: initdb + pg_ctl from the Debian package, on 127.0.0.1
and a free port, stopped at the end. Skips, saying why, where no server can be started."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile

import pytest


def _binaries() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


def _as_server_user(cmd: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root; the Debian package has a `postgres` user
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--"] + cmd
    return cmd


@pytest.fixture(scope="session")
def postgres_url():
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'psycopg[binary]')")
    bindir = _binaries()
    if bindir is None:
        if os.environ.get("CI"):  # `make test` installs them: missing in CI is a failure
            pytest.fail("no PostgreSQL server binaries; `make test` should have installed them")
        pytest.skip("no PostgreSQL server binaries (Debian: apt-get install postgresql)")
    base = tempfile.mkdtemp(prefix="inhouse-pg-")
    data, sock = os.path.join(base, "data"), os.path.join(base, "sock")
    os.makedirs(sock)
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        shutil.chown(sock, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        subprocess.run(_as_server_user([f"{bindir}/initdb", "-D", data, "-U", "postgres",
                                        "--auth=trust"]),
                       check=True, capture_output=True, timeout=120)
        subprocess.run(_as_server_user([f"{bindir}/pg_ctl", "-D", data, "-w", "-l",
                                        os.path.join(base, "log"), "-o",
                                        f"-p {port} -k {sock} -c listen_addresses=127.0.0.1",
                                        "start"]),
                       check=True, capture_output=True, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError, LookupError) as e:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"could not start a PostgreSQL server: {e}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_server_user([f"{bindir}/pg_ctl", "-D", data, "-m", "immediate",
                                        "stop"]), capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)
