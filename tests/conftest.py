"""What every test shares."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.postgres import PostgresServer, postgres_server


@pytest.fixture(autouse=True)
def _hermetic_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No user config file or SHOAL_* variable reaches what the tests start.

    Nor does the machine's load: nodes run with their resource guard off (another test run on
    the machine would otherwise decide where tasks go); tests of the guard turn it on.

    Tasks run as the node's user: the tests hand them files in tmp_path, which pytest makes
    private to the user running the tests, and the interpreter may live where only that user
    may look (a pyenv under /root); tests of `run_as` set it themselves.
    """
    for name in list(os.environ):
        if name.startswith("SHOAL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SHOAL_NODE_GUARD", "false")
    monkeypatch.setenv("SHOAL_NODE_RUN_AS", "node")
    monkeypatch.setenv("SHOAL_CONFIG", str(tmp_path / "no-such-config.toml"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the whole session (see tests/postgres.py)."""
    with postgres_server() as server:
        yield server


@pytest.fixture
def postgres_url(postgres: PostgresServer) -> str:
    """A fresh, empty database on the session's server."""
    return postgres.database()
