"""Start-up mistakes of the serving commands (`shoal coordinator`, `shoal node`, `shoal up`):
each ends the real process with one `error:` line on stderr and exit status 1, no traceback."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal import certs

from .harness import STARTUP, CliProcesses, free_port

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def shoal(cli: CliProcesses, monkeypatch: pytest.MonkeyPatch) -> CliProcesses:
    """`cli`, its processes given no token file (each test says what it needs)."""
    monkeypatch.delenv("SHOAL_TOKEN_FILE")
    monkeypatch.delenv("SHOAL_NODE_TOKEN_FILE")
    return cli


@pytest.fixture
def taken() -> Iterator[int]:
    """A loopback port something else listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


async def fails_at_start(processes: CliProcesses, *args: str) -> str:
    """Run `shoal ARGS`; assert it exits 1 with one `error:` line last on stderr and no
    traceback; return that line."""
    started = await processes.start(*args, pipe=True)
    _, err = await asyncio.wait_for(started.proc.communicate(), STARTUP)
    stderr = err.decode()
    lines = stderr.splitlines()
    assert started.proc.returncode == 1, stderr
    assert "Traceback" not in stderr and "Event loop is closed" not in stderr, stderr
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], stderr
    return lines[-1]


def _serving(command: str, port: int, tmp_path: Path) -> list[str]:
    listen = f"127.0.0.1:{port}"
    if command == "node":
        return ["node", "-c", "127.0.0.1:1", "--listen", listen, "--no-auth"]
    return [command, "--listen", listen, "--data-dir", str(tmp_path / command)]


@pytest.mark.parametrize("command", ["coordinator", "node", "up"])
async def test_a_port_in_use_is_one_line(
    shoal: CliProcesses, tmp_path: Path, taken: int, command: str
) -> None:
    line = await fails_at_start(shoal, *_serving(command, taken, tmp_path))
    assert line.startswith(f"error: cannot listen on 127.0.0.1:{taken}: address already in use")


async def test_a_port_another_coordinator_serves_is_in_use(
    shoal: CliProcesses, tmp_path: Path
) -> None:
    # gRPC's default SO_REUSEPORT would let a second coordinator share the port silently.
    port = free_port()
    await shoal.coordinator(port, tmp_path / "data")
    line = await fails_at_start(
        shoal, "coordinator", "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "b")
    )
    assert line.startswith(f"error: cannot listen on 127.0.0.1:{port}: address already in use")


async def test_the_metrics_port_in_use_is_one_line(
    shoal: CliProcesses, tmp_path: Path, taken: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHOAL_COORDINATOR_METRICS_LISTEN", f"127.0.0.1:{taken}")
    line = await fails_at_start(shoal, *_serving("coordinator", 0, tmp_path))
    assert line.startswith(
        f"error: cannot serve metrics on 127.0.0.1:{taken}: address already in use"
    )


async def test_the_http_port_in_use_is_one_line(
    shoal: CliProcesses, tmp_path: Path, taken: int
) -> None:
    line = await fails_at_start(
        shoal, *_serving("coordinator", 0, tmp_path), "--http-listen", f"127.0.0.1:{taken}"
    )
    assert line.startswith(
        f"error: cannot listen on 127.0.0.1:{taken} (HTTP): address already in use"
    )


async def test_a_token_with_a_line_break_is_one_line(
    shoal: CliProcesses, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token_file = tmp_path / "two-lines.token"
    token_file.write_text("shoal_abc_def\nshoal_ghi_jkl\n")
    line = await fails_at_start(shoal, "node", "-c", "127.0.0.1:1", "--token-file", str(token_file))
    assert "the token holds a line break" in line
    # A client command with such a token says the same, before it sends anything.
    monkeypatch.setenv("SHOAL_TOKEN_FILE", str(token_file))
    assert await fails_at_start(shoal, "ls", "-c", "127.0.0.1:1") == line


def _unusable_pem(tmp_path: Path) -> list[str]:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    return ["--tls-cert", str(bad), "--tls-key", str(bad)]


def _pair_and_missing_ca(tmp_path: Path) -> list[str]:
    certs.init_ca(tmp_path / "ca")
    cert, key = certs.issue(tmp_path / "ca", "n1")
    return [
        "--tls-ca",
        str(tmp_path / "missing-ca.pem"),
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
    ]


@pytest.mark.parametrize(
    ("command", "extra", "env", "expected"),
    [
        (
            "coordinator",
            lambda p: ["--tls-cert", str(p / "no.pem"), "--tls-key", str(p / "no.key")],
            {},
            "error: cannot use {tmp}/no.key: No such file or directory",
        ),
        (
            "coordinator",
            _unusable_pem,
            {},
            "error: cannot listen on 127.0.0.1:0: the TLS certificate or key is unusable"
            " (each a PEM file, of one key pair)",
        ),
        (
            "node",
            _pair_and_missing_ca,
            {},
            "error: cannot use {tmp}/missing-ca.pem: No such file or directory",
        ),
        (
            "coordinator",
            lambda p: ["--data-dir", str(p / "file" / "data")],
            {},
            "error: cannot use {tmp}/file/data: Not a directory",
        ),
        (
            "coordinator",
            lambda p: ["--listen", "nonsense"],
            {},
            "error: cannot listen on nonsense: expected host:port, such as 127.0.0.1:7070",
        ),
        (
            "node",
            lambda p: [],
            {"SHOAL_CONFIG": "{tmp}/bad.toml"},
            "error: cannot read config file {tmp}/bad.toml: Expected ']' at the end of a table"
            " declaration (at line 1, column 6)",
        ),
        (
            "node",
            lambda p: [],
            {"SHOAL_CONFIG": "{tmp}/typo.toml"},
            "error: config file {tmp}/typo.toml: [node] has no setting 'slot' (did you mean"
            " 'slots'?)",
        ),
        (
            "coordinator",
            lambda p: [],
            {"SHOAL_COORDINATOR_LEASE": "soon"},
            "error: bad setting: lease: Input should be a valid timedelta, invalid digit in"
            " duration (got 'soon')",
        ),
    ],
    ids=[
        "missing-cert",
        "unusable-cert",
        "node-missing-ca",
        "data-dir",
        "listen",
        "toml",
        "typo",
        "env",
    ],
)
async def test_other_start_up_mistakes_are_one_line(
    shoal: CliProcesses,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    extra: object,
    env: dict[str, str],
    expected: str,
) -> None:
    (tmp_path / "file").write_text("")
    (tmp_path / "bad.toml").write_text("[node\n")
    (tmp_path / "typo.toml").write_text("[node]\nslot = 7\n")
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(tmp=tmp_path))
    assert callable(extra)
    args = [*_serving(command, 0, tmp_path), *extra(tmp_path)]
    assert await fails_at_start(shoal, *args) == expected.format(tmp=tmp_path)


@pytest.mark.parametrize("command", ["node", "up"])
async def test_a_module_that_does_not_import_is_one_line(
    shoal: CliProcesses, tmp_path: Path, command: str
) -> None:
    """A mistake in --import stops the start (the node would offer no functions)."""
    args = [*_serving(command, 0, tmp_path), "--import", "no_such_tasks_module"]
    line = await fails_at_start(shoal, *args)
    assert line.startswith(
        "error: --import: no_such_tasks_module: ModuleNotFoundError: No module named"
    ), line


async def test_verbose_keeps_the_traceback(shoal: CliProcesses, tmp_path: Path, taken: int) -> None:
    started = await shoal.start(*_serving("coordinator", taken, tmp_path), "--verbose", pipe=True)
    _, err = await asyncio.wait_for(started.proc.communicate(), STARTUP)
    assert started.proc.returncode == 1
    lines = err.decode().splitlines()
    assert "Traceback (most recent call last):" in lines
    assert any(
        line.startswith(f"error: cannot listen on 127.0.0.1:{taken}: address already in use")
        for line in lines
    )
