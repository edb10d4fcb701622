"""The `http` executor against a real server on loopback: allowlist, redirects, results."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from google.protobuf import json_format

from shoal.config import NodeSettings
from shoal.node.executors.addresses import is_public
from shoal.node.executors.base import ExecutionContext, Outcome
from shoal.node.executors.http import HostAllowlist, HttpExecutor
from shoal.node.secrets import Redactor
from shoal.v1 import task_pb2
from tests.contract.loopback import LoopbackHttp
from tests.integration.harness import free_port


@pytest.fixture
async def server() -> AsyncIterator[LoopbackHttp]:
    async with LoopbackHttp() as http:
        yield http


class _Run:
    """Runs http specs on an executor built with `settings`, keeping what they emit."""

    def __init__(self, **settings: Any) -> None:
        self.executor = HttpExecutor(NodeSettings(**settings))
        self.chunks: list[task_pb2.OutputChunk] = []

    async def __call__(
        self,
        url: str,
        *,
        method: str = "",
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> Outcome:
        spec = task_pb2.HttpSpec(url=url, method=method, body=body, headers=headers)
        ctx = ExecutionContext("t", self.chunks.append, 64)
        return await self.executor.run(task_pb2.TaskSpec(http=spec), ctx)

    def said(self, stream: int = task_pb2.OUTPUT_STREAM_STDOUT) -> str:
        return "".join(c.data for c in self.chunks if c.stream == stream)


@pytest.fixture
async def run(server: LoopbackHttp) -> AsyncIterator[_Run]:
    made = _Run(http_allow_hosts=[f"127.0.0.1:{server.port}"], http_max_body_bytes=1000)
    try:
        yield made
    finally:
        await made.executor.aclose()


def _output(outcome: Outcome) -> dict[str, Any]:
    return json_format.MessageToDict(outcome.result.output)


@pytest.mark.parametrize(
    ("entry", "url", "allowed"),
    [
        ("example.com", "https://example.com/x", True),
        ("example.com", "http://example.com:8080/", True),  # no port: any port
        ("Example.COM.", "https://example.com./", True),
        ("example.com", "https://api.example.com/", False),
        ("example.com", "https://example.com.evil.net/", False),
        ("*.example.com", "https://api.example.com/", True),
        ("*.example.com", "https://a.b.example.com/", True),
        ("*.example.com", "https://example.com/", False),
        ("*.example.com", "https://badexample.com/", False),
        ("example.com:443", "https://example.com/", True),  # the scheme's default port
        ("example.com:443", "http://example.com/", False),
        ("example.com:8443", "https://example.com:8443/", True),
        ("[::1]:8080", "http://[::1]:8080/", True),
        ("[::1]", "http://[::1]:9/", True),
        ("[::1]:8080", "http://[::1]:8081/", False),
        ("*", "https://anything.net:1234/", True),
    ],
)
def test_the_allowlist_matches_hosts_and_ports(entry: str, url: str, allowed: bool) -> None:
    assert HostAllowlist([entry]).allows(httpx.URL(url)) is allowed


@pytest.mark.parametrize(
    "entry", ["", "host:port", "host:0", "host:70000", "*example.com", "[::1", "[::1]x"]
)
def test_an_entry_that_is_no_host_pattern_is_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="http_allow_hosts"):
        HostAllowlist([entry])


async def test_nothing_is_allowed_until_configured(server: LoopbackHttp) -> None:
    run = _Run()
    assert not run.executor.available()  # so a node does not offer it
    outcome = await run(server.url("/json"))
    assert outcome.state == task_pb2.TASK_STATE_FAILED
    assert outcome.result.error == (
        f"host 127.0.0.1:{server.port} is not in this node's http_allow_hosts"
    )
    assert not outcome.result.infrastructure_failure  # the task's: no breaker counts it
    assert server.served == {}


async def test_a_json_response_is_the_output_and_the_body_an_artifact(
    run: _Run, server: LoopbackHttp
) -> None:
    outcome = await run(server.url("/json"))
    assert outcome.state == task_pb2.TASK_STATE_SUCCEEDED
    assert outcome.result.exit_code == 200
    output = _output(outcome)
    assert output["status"] == 200
    assert output["headers"]["content-type"] == "application/json"
    assert output["json"] == {"greeting": "hello", "n": 3}
    [body] = outcome.result.artifacts
    assert (body.name, body.media_type) == ("body", "application/json")
    assert json.loads(body.data) == {"greeting": "hello", "n": 3}
    assert outcome.result.stdout == run.said() == '{"greeting": "hello", "n": 3}'


async def test_json_that_is_no_object_stays_out_of_the_output(
    run: _Run, server: LoopbackHttp
) -> None:
    outcome = await run(server.url("/list"))
    assert outcome.state == task_pb2.TASK_STATE_SUCCEEDED
    assert "json" not in _output(outcome)
    assert outcome.result.artifacts[0].data == b"[1, 2]"


async def test_method_headers_and_body_are_sent(run: _Run, server: LoopbackHttp) -> None:
    outcome = await run(
        server.url("/echo"), method="put", body=b"payload", headers={"X-Shoal": "yes"}
    )
    echo = _output(outcome)["json"]
    assert echo["method"] == "PUT"
    assert echo["body"] == "payload"
    assert echo["headers"]["x-shoal"] == "yes"


async def test_a_4xx_fails_the_task_and_a_5xx_is_the_backends(
    run: _Run, server: LoopbackHttp
) -> None:
    missing = await run(server.url("/status/404"))
    assert missing.state == task_pb2.TASK_STATE_FAILED
    assert (missing.result.exit_code, missing.result.error) == (404, "HTTP 404 Not Found")
    assert not missing.result.infrastructure_failure
    assert missing.result.stdout == "status 404\n"
    down = await run(server.url("/status/503"))
    assert down.state == task_pb2.TASK_STATE_FAILED
    assert down.result.exit_code == 503
    assert down.result.infrastructure_failure


async def test_a_refused_connection_is_an_infrastructure_failure(run: _Run) -> None:
    port = free_port()
    run.executor.allowlist = HostAllowlist([f"127.0.0.1:{port}"])
    outcome = await run(f"http://127.0.0.1:{port}/")
    assert outcome.state == task_pb2.TASK_STATE_FAILED
    assert outcome.result.infrastructure_failure
    assert "ConnectError" in outcome.result.error


async def test_redirects_are_followed_to_allowed_hosts_only(
    run: _Run, server: LoopbackHttp
) -> None:
    followed = await run(server.url(f"/redirect?to={server.url('/json')}"))
    assert followed.state == task_pb2.TASK_STATE_SUCCEEDED
    assert _output(followed)["json"]["greeting"] == "hello"
    elsewhere = server.url("/json", host="localhost")  # the same server, another host name
    refused = await run(server.url(f"/redirect?to={elsewhere}"))
    assert refused.state == task_pb2.TASK_STATE_FAILED
    assert refused.result.error == (
        f"host localhost:{server.port} is not in this node's http_allow_hosts"
    )
    assert server.served["/json"] == 1  # the refused hop was never sent


async def test_a_body_over_the_cap_streams_but_is_not_kept(run: _Run, server: LoopbackHttp) -> None:
    outcome = await run(server.url("/big?n=5000"))
    assert outcome.state == task_pb2.TASK_STATE_SUCCEEDED
    assert not outcome.result.artifacts
    assert run.said() == "x" * 5000
    assert outcome.result.stdout == "x" * 64  # the tail the context keeps
    assert "5000 bytes" in run.said(task_pb2.OUTPUT_STREAM_PROGRESS)


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x", "/relative", "http://"])
async def test_a_url_that_cannot_be_called_fails_the_task(run: _Run, url: str) -> None:
    outcome = await run(url)
    assert outcome.state == task_pb2.TASK_STATE_FAILED
    assert not outcome.result.infrastructure_failure
    assert outcome.result.error


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("192.168.0.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("224.0.0.1", False),
        ("0.0.0.0", False),
        ("::1", False),
        ("fe80::1", False),
        ("fd00::1", False),
        ("ff02::1", False),
        ("::ffff:127.0.0.1", False),
        ("93.184.215.14", True),
        ("2606:4700::6810:84e5", True),
    ],
)
def test_only_public_unicast_addresses_are_public(address: str, public: bool) -> None:
    assert is_public(ipaddress.ip_address(address)) is public


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_a_wildcard_does_not_reach_loopback(server: LoopbackHttp, host: str) -> None:
    run = _Run(http_allow_hosts=["*"])
    try:
        outcome = await run(server.url("/json", host=host))
    finally:
        await run.executor.aclose()
    assert outcome.state == task_pb2.TASK_STATE_FAILED
    what = "127.0.0.1" if host == "127.0.0.1" else f"host {host} resolves to 127.0.0.1, which"
    assert f"{what} is not a public address" in outcome.result.error
    assert not outcome.result.infrastructure_failure  # the task's: no breaker counts it
    assert server.served == {}


@pytest.mark.parametrize(
    ("settings", "host"),
    [
        ({"http_allow_hosts": ["localhost"]}, "localhost"),  # named exactly
        ({"http_allow_hosts": ["*", "127.0.0.1"]}, "localhost"),  # its address named exactly
        ({"http_allow_hosts": ["*"], "http_allow_private": True}, "localhost"),
    ],
)
async def test_loopback_is_reached_where_the_node_says_so(
    server: LoopbackHttp, settings: dict[str, Any], host: str
) -> None:
    run = _Run(**settings)
    try:
        outcome = await run(server.url("/json", host=host))
    finally:
        await run.executor.aclose()
    assert outcome.state == task_pb2.TASK_STATE_SUCCEEDED, outcome.result.error
    assert server.served["/json"] == 1


async def test_a_redirect_through_a_wildcard_does_not_reach_loopback(server: LoopbackHttp) -> None:
    # The first hop's host is named exactly; the second is allowed by the wildcard only.
    run = _Run(http_allow_hosts=[f"localhost:{server.port}", "*"])
    try:
        outcome = await run(server.url(f"/redirect?to={server.url('/json')}", host="localhost"))
    finally:
        await run.executor.aclose()
    assert outcome.state == task_pb2.TASK_STATE_FAILED
    assert "127.0.0.1 is not a public address" in outcome.result.error
    assert server.served == {"/redirect": 1}


SECRET = "tok-5c2e9a7f1b3d"


async def _with_secret(run: _Run, url: str, headers: dict[str, str]) -> Outcome:
    """Run an http spec that lists the secret `api-token`, resolved (as the node does) to
    SECRET."""
    spec = task_pb2.TaskSpec(http=task_pb2.HttpSpec(url=url, headers=headers))
    spec.secrets.add(name="api-token", env="TOKEN")
    ctx = ExecutionContext(
        "t", run.chunks.append, 4096, secret_env={"TOKEN": SECRET}, redactor=Redactor([SECRET])
    )
    return await run.executor.run(spec, ctx)


async def test_a_header_takes_a_secret_that_only_the_server_sees(
    run: _Run, server: LoopbackHttp
) -> None:
    outcome = await _with_secret(
        run,
        server.url("/echo"),
        {"Authorization": "Bearer ${{ secrets.api-token }}", "X-Key": "${{secrets.api-token}}"},
    )
    assert outcome.state == task_pb2.TASK_STATE_SUCCEEDED, outcome.result.error
    [(_, sent)] = server.received
    assert (sent["authorization"], sent["x-key"]) == (f"Bearer {SECRET}", SECRET)
    echoed = _output(outcome)["json"]["headers"]
    assert (echoed["authorization"], echoed["x-key"]) == ("Bearer ***", "***")
    assert SECRET not in outcome.result.SerializeToString().decode("latin-1")
    assert SECRET not in run.said() and "Bearer ***" in run.said()


async def test_a_secret_header_is_not_sent_where_a_redirect_leads(server: LoopbackHttp) -> None:
    run = _Run(http_allow_hosts=[f"127.0.0.1:{server.port}", f"localhost:{server.port}"])
    try:
        elsewhere = server.url("/echo", host="localhost")  # another origin
        outcome = await _with_secret(
            run,
            server.url(f"/redirect?to={elsewhere}"),
            {"X-Key": "${{ secrets.api-token }}", "X-Plain": "kept"},
        )
    finally:
        await run.executor.aclose()
    assert outcome.state == task_pb2.TASK_STATE_SUCCEEDED, outcome.result.error
    [(_, first), (_, second)] = server.received
    assert first["x-key"] == SECRET
    assert "x-key" not in second and second["x-plain"] == "kept"


async def test_a_header_naming_a_secret_the_task_does_not_list_fails_it(
    run: _Run, server: LoopbackHttp
) -> None:
    outcome = await _with_secret(run, server.url("/echo"), {"X-Key": "${{ secrets.other }}"})
    assert outcome.state == task_pb2.TASK_STATE_FAILED
    assert "secret 'other', which is not one of the task's secrets" in outcome.result.error
    assert not outcome.result.infrastructure_failure
    assert server.served == {}
