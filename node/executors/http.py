"""`http`: one HTTP(S) request to a host the node allows; the response body streams as stdout.

The status is the exit code: 2xx and 3xx succeed, 4xx fail the task, and 5xx or a host that
cannot be reached are infrastructure failures (the backend failed, not the task). Redirects are
followed, and every hop's host is checked against `http_allow_hosts`; a host outside it is the
task's failure. A header value may name a secret the task lists, `${{ secrets.NAME }}`: it is
filled in here, sent to the task's own origin only (not to where it redirects), and masked in
whatever the response shows.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from shoal.config import NodeSettings
from shoal.node.executors.addresses import IPAddress, checked_transport, is_public
from shoal.node.executors.base import ExecutionContext, Executor, Outcome, TaskError, register
from shoal.node.secrets import MASK, Redactor
from shoal.specs import SECRET_REFERENCE
from shoal.v1 import task_pb2

__all__ = ["HostAllowlist", "HttpExecutor"]

_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class _HostPattern:
    host: str  # an exact name, `*.suffix` or `*`
    port: int | None  # None: any port

    @classmethod
    def parse(cls, entry: str) -> _HostPattern:
        text = entry.strip().lower()
        host, port = text, None
        if text.startswith("["):  # an IPv6 literal, as in URLs
            host, bracket, rest = text[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise ValueError(f"http_allow_hosts: {entry!r} is not [IPv6] or [IPv6]:port")
            if rest:
                port = cls._port(entry, rest[1:])
        elif text.count(":") == 1:
            host, _, digits = text.partition(":")
            port = cls._port(entry, digits)
        host = host.rstrip(".")
        if not host or (host.startswith("*") and host != "*" and not host.startswith("*.")):
            raise ValueError(f"http_allow_hosts: {entry!r} is not a host name or *.domain")
        return cls(host, port)

    @staticmethod
    def _port(entry: str, digits: str) -> int:
        if not digits.isdigit() or not 0 < int(digits) < 65536:
            raise ValueError(f"http_allow_hosts: {entry!r} has no valid port")
        return int(digits)

    def matches(self, host: str, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.host == "*":
            return True
        if self.host.startswith("*."):
            return host.endswith(self.host[1:])
        return host == self.host

    @property
    def exact(self) -> bool:
        """Whether it names one host (no wildcard)."""
        return not self.host.startswith("*")


class HostAllowlist:
    """The hosts a node's http tasks may call (see NodeSettings.http_allow_hosts).

    Raises ValueError, naming it, for an entry that is no host pattern.
    """

    def __init__(self, entries: Sequence[str]) -> None:
        self._patterns = [_HostPattern.parse(e) for e in entries]

    def allows(self, url: httpx.URL) -> bool:
        host = url.host.lower().rstrip(".")
        port = url.port or _DEFAULT_PORTS.get(url.scheme, 0)
        return any(p.matches(host, port) for p in self._patterns)

    def names(self, host: str, port: int) -> bool:
        """Whether an entry without a wildcard allows `host` (a name or an address) at `port`:
        only such an entry lets tasks reach a loopback or private address."""
        host = host.lower().rstrip(".")
        return any(p.exact and p.matches(host, port) for p in self._patterns)


class _BadUrl(TaskError):
    """The task's URL cannot be called at all (no host, another scheme)."""


class _Refused(TaskError):
    """A request (or one of its redirects) goes where this node does not let tasks go.

    The task's failure, not the node's: the allowlist is not advertised, so a task that calls a
    host only some nodes allow is placed (by labels) on those.
    """


def _failed(error: str, *, infrastructure: bool = False, **fields: Any) -> Outcome:
    result = task_pb2.TaskResult(error=error, infrastructure_failure=infrastructure, **fields)
    return Outcome(task_pb2.TASK_STATE_FAILED, result)


@register
class HttpExecutor(Executor):
    name = "http"

    def __init__(self, settings: NodeSettings) -> None:
        super().__init__(settings)
        self.allowlist = HostAllowlist(settings.http_allow_hosts)
        self._client: httpx.AsyncClient | None = None

    def available(self) -> bool:
        """Offered only where some host is allowed: elsewhere every http task would fail."""
        return bool(self.settings.http_allow_hosts)

    def _http(self) -> httpx.AsyncClient:
        """The node's client, made on first use (on the node's loop); its pool is shared."""
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(
                    None, connect=self.settings.http_connect_timeout.total_seconds()
                ),
                follow_redirects=True,
                # No proxy variables or .netrc of the node: tasks must not borrow its credentials.
                trust_env=False,
                event_hooks={"request": [self._check_hop]},
                transport=checked_transport(self._may_connect),
            )
        return self._client

    def _may_connect(self, host: str, port: int, address: IPAddress) -> bool:
        """Whether a connection to `host` may go to `address`: a public one, or one the
        allowlist names (the address, or the host without a wildcard): `*.example.com` must
        not lead to the node's own services or its network."""
        return (
            is_public(address)
            or self.settings.http_allow_private
            or self.allowlist.names(host, port)
            or self.allowlist.names(str(address), port)
        )

    def _check(self, url: httpx.URL) -> None:
        """Raise _BadUrl or _Refused unless a task may call `url`."""
        if url.scheme not in _DEFAULT_PORTS:
            raise _BadUrl(f"only http and https URLs can be called, not {str(url)!r}")
        if not url.host:
            raise _BadUrl(f"URL {str(url)!r} names no host")
        if not self.allowlist.allows(url):
            host = url.netloc.decode("ascii", "replace")
            raise _Refused(f"host {host} is not in this node's http_allow_hosts")

    async def _check_hop(self, request: httpx.Request) -> None:
        # httpx calls request hooks before every hop of a redirect chain, the first included.
        self._check(request.url)
        held = request.extensions.get(_SECRET_HEADERS)
        if held is not None and _origin(request.url) != held[0]:
            # A secret goes only where the task sent it, not wherever that host redirects.
            for name in held[1]:
                request.headers.pop(name, None)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def run(self, spec: task_pb2.TaskSpec, ctx: ExecutionContext) -> Outcome:
        h = spec.http
        client = self._http()
        try:
            url = httpx.URL(h.url)
            self._check(url)
            headers, secret_headers = _with_secrets(spec, ctx)
            request = client.build_request(
                (h.method or "GET").upper(), url, headers=headers, content=h.body or None
            )
            if secret_headers:
                request.extensions[_SECRET_HEADERS] = (_origin(url), secret_headers)
            response = await client.send(request, stream=True)
        except TaskError as err:
            return err.outcome()
        except httpx.TooManyRedirects:
            return _failed(f"{h.url} redirects more than {client.max_redirects} times")
        except (httpx.InvalidURL, httpx.UnsupportedProtocol, httpx.LocalProtocolError) as err:
            return _failed(f"invalid request: {_describe(err)}")
        except httpx.HTTPError as err:  # refused, DNS, TLS, reset: the backend is not there
            return _failed(f"{h.url} failed: {_describe(err)}", infrastructure=True)
        except (ValueError, TypeError) as err:  # headers or method httpx cannot send
            return _failed(f"invalid request: {err}")
        try:
            return await self._receive(response, ctx)
        finally:
            # Unread (cancelled, timed out), the connection is closed rather than pooled.
            await response.aclose()

    async def _receive(self, response: httpx.Response, ctx: ExecutionContext) -> Outcome:
        """Stream the body as stdout, keep its tail and (within the cap) the whole of it."""
        cap = self.settings.http_max_body_bytes
        limit = ctx.output_tail_bytes
        try:
            decoder = codecs.getincrementaldecoder(response.charset_encoding or "utf-8")("replace")
        except LookupError:
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
        kept: bytearray | None = bytearray()
        tail = ""
        size = 0
        redactor = ctx.redactor.stream()  # a server may echo the task's secret headers
        try:
            async for data in response.aiter_bytes():
                size += len(data)
                if kept is not None:
                    kept += data
                    if len(kept) > cap:
                        kept = None
                text = redactor.feed(decoder.decode(data))
                if text:
                    ctx.emit(task_pb2.OutputChunk(stream=task_pb2.OUTPUT_STREAM_STDOUT, data=text))
                    tail = tail + text if len(tail) < 2 * limit else tail[-limit:] + text
        except httpx.HTTPError as err:  # the body broke off
            return _failed(
                f"{response.request.method} {response.url}: reading the response failed:"
                f" {_describe(err)}",
                infrastructure=True,
                exit_code=response.status_code,
                stdout=tail[-limit:],
            )
        if text := redactor.feed(decoder.decode(b"", final=True)) + redactor.flush():
            ctx.emit(task_pb2.OutputChunk(stream=task_pb2.OUTPUT_STREAM_STDOUT, data=text))
            tail += text
        status = response.status_code
        result = task_pb2.TaskResult(exit_code=status, stdout=tail[-limit:])
        output: dict[str, Any] = {"status": status, "headers": dict(response.headers)}
        media_type = response.headers.get("content-type", "application/octet-stream")
        if kept is not None:
            if ctx.redactor:
                kept = _redact_bytes(kept, ctx.redactor)
            result.artifacts.add(name="body", data=bytes(kept), media_type=media_type)
            if (body := _json_object(media_type, kept)) is not None:
                output["json"] = body
        else:
            ctx.emit(
                task_pb2.OutputChunk(
                    stream=task_pb2.OUTPUT_STREAM_PROGRESS,
                    data=f"the body ({size} bytes) is over http_max_body_bytes ({cap}):"
                    " it is not kept\n",
                )
            )
        if ctx.redactor:
            try:
                output = _redact_json(output, ctx.redactor)
            except RecursionError:  # JSON nested too deep to walk: the body stays an artifact
                del output["json"]
                output = _redact_json(output, ctx.redactor)
        try:
            result.output.update(output)
        except (ValueError, OverflowError):  # JSON a Struct cannot hold: NaN, huge numbers
            del output["json"]
            result.output.Clear()
            result.output.update(output)
        if status < 400:
            return Outcome(task_pb2.TASK_STATE_SUCCEEDED, result)
        result.error = f"HTTP {status} {response.reason_phrase}".rstrip()
        result.infrastructure_failure = status >= 500  # the backend failed: it feeds breakers
        return Outcome(task_pb2.TASK_STATE_FAILED, result)


_SECRET_HEADERS = "shoal.secret_headers"
"""A request extension: (the origin the task called, the headers that carry its secrets)."""


def _origin(url: httpx.URL) -> tuple[str, str, int]:
    return url.scheme, url.host.lower(), url.port or _DEFAULT_PORTS.get(url.scheme, 0)


def _with_secrets(
    spec: task_pb2.TaskSpec, ctx: ExecutionContext
) -> tuple[dict[str, str], list[str]]:
    """The task's headers with each `${{ secrets.NAME }}` filled in from its resolved secrets,
    and the names of the headers that got one. Raises TaskError for a secret it does not list."""
    headers = dict(spec.http.headers)
    filled: list[str] = []
    for name, value in headers.items():
        if "${{" not in value:
            continue
        headers[name] = SECRET_REFERENCE.sub(lambda m: _secret(spec, ctx, m.group(1)), value)
        filled.append(name)
    return headers, filled


def _secret(spec: task_pb2.TaskSpec, ctx: ExecutionContext, name: str) -> str:
    for ref in spec.secrets:
        if ref.name == name and (value := ctx.secret_env.get(ref.env or ref.name)) is not None:
            return value
    raise TaskError(f"a header refers to secret {name!r}, which is not one of the task's secrets")


def _redact_bytes(data: bytearray, redactor: Redactor) -> bytearray:
    for value in redactor.values:  # longest first, as Redactor does
        data = data.replace(value.encode(), MASK.encode())
    return data


def _redact_json(value: Any, redactor: Redactor) -> Any:
    """`value` (JSON) with every secret in its strings, keys included, masked."""
    if isinstance(value, str):
        return redactor.redact(value)
    if isinstance(value, dict):
        return {redactor.redact(k): _redact_json(v, redactor) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_json(v, redactor) for v in value]
    return value


def _json_object(media_type: str, body: bytes | bytearray) -> dict[str, Any] | None:
    """The body as a JSON object, when it is declared JSON and is one."""
    kind = media_type.partition(";")[0].strip().lower()
    if kind != "application/json" and not kind.endswith("+json"):
        return None
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _describe(err: Exception) -> str:
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
