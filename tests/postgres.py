"""A real PostgreSQL for the tests: Debian's server binaries, a cluster made by initdb in a
temporary directory, run as an unprivileged user on a free loopback port (fsync on)."""

from __future__ import annotations

import contextlib
import glob
import ipaddress
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import psycopg

from tests.integration.harness import free_port

__all__ = ["PostgresServer", "postgres_server"]

_USER = "shoal"  # the database superuser the cluster is made with


def _bin_dir() -> Path:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
    )
    if not found:
        raise RuntimeError(
            "PostgreSQL's server is not installed (Debian: apt-get install postgresql)"
        )
    return Path(found[-1]).parent


class PostgresServer:
    """One running cluster; `database()` makes a fresh, empty database and gives its URL."""

    def __init__(self, root: Path, port: int, process: subprocess.Popen[bytes]) -> None:
        self.root = root
        self.port = port
        self.process = process
        self._made = 0

    def url(self, dbname: str = "postgres", host: str = "127.0.0.1") -> str:
        return f"postgresql://{_USER}@{host}:{self.port}/{dbname}"

    def database(self) -> str:
        self._made += 1
        name = f"t{os.getpid()}_{self._made}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _as_owner(argv: list[str]) -> list[str]:
    """Run as `nobody` when the tests run as root (PostgreSQL refuses to run as root)."""
    if os.geteuid() != 0:
        return argv
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *argv]


@contextlib.contextmanager
def postgres_server(also_on: Sequence[str] = ()) -> Iterator[PostgresServer]:
    """Start a cluster on 127.0.0.1 (and the addresses `also_on`, where it trusts clients of
    their /24); stop it and remove its files at the end."""
    bin_dir = _bin_dir()
    root = Path(tempfile.mkdtemp(prefix="shoal-pg-"))
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
    data = root / "data"
    try:
        subprocess.run(
            _as_owner(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    _USER,
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-instructions",
                ]
            ),
            check=True,
            capture_output=True,
        )
        with (data / "pg_hba.conf").open("a") as hba:
            for address in also_on:
                net = ipaddress.ip_network(f"{address}/24", strict=False)
                hba.write(f"host all all {net} trust\n")
        port = free_port()
        log = open(root / "server.log", "wb")  # noqa: SIM115 - the server writes it until the end
        process = subprocess.Popen(
            _as_owner(
                [
                    str(bin_dir / "postgres"),
                    "-D",
                    str(data),
                    "-k",
                    str(root),
                    "-p",
                    str(port),
                    "-c",
                    "listen_addresses=" + ",".join(["127.0.0.1", *also_on]),
                    "-c",
                    "fsync=on",
                    "-c",
                    "max_connections=200",
                ]
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        server = PostgresServer(root, port, process)
        deadline = time.monotonic() + 60
        while True:
            try:
                psycopg.connect(server.url(), connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "PostgreSQL did not start: " + (root / "server.log").read_text()[-2000:]
                    ) from None
                # Its socket has no event to wait on: wait on the process (it may die) meanwhile.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=0.05)
        try:
            yield server
        finally:
            process.terminate()  # SIGTERM: a smart shutdown; SIGINT would be fast
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
