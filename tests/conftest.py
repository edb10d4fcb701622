"""What every test shares."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from xdist.remote import Producer  # type: ignore[import-untyped]

from tests.chaos.summary import take_published
from tests.integration.docker_engine import docker_engine as docker_engine  # one per session
from tests.postgres import PostgresServer, postgres_server
from tests.workers import GroupScheduling

_FIGURES = "published"
"""The user property that carries a test's published figures (from an xdist worker too)."""


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Producer) -> GroupScheduling | None:
    """`--dist loadgroup` shares tests among workers by the groups of tests/workers.py."""
    return GroupScheduling(config, log) if config.getvalue("dist") == "loadgroup" else None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item) -> None:
    """Each phase's published lines go into the test's report (built after this hook)."""
    item.user_properties.extend((_FIGURES, line) for line in take_published())


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "teardown":  # the last report: it carries the lines of every phase
        _figures.extend(str(v) for k, v in report.user_properties if k == _FIGURES)


_figures: list[str] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Figures tests published (chaos scenarios, discovery times), again at the end."""
    if _figures:
        terminalreporter.section("figures")
        for line in _figures:
            terminalreporter.write_line(line)


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
