"""Typed settings for each Shoal process.

Precedence, lowest first: the TOML file (`SHOAL_CONFIG`, else ~/.config/shoal/config.toml,
one table per process: [coordinator], [node], [client]), `SHOAL_*` environment variables,
then command-line flags (passed as keyword arguments).
"""

from __future__ import annotations

import difflib
import os
import socket
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from shoal.errors import FailedPrecondition, Unauthenticated
from shoal.validation import Limits

__all__ = [
    "ADMIN_TOKEN_FILE",
    "DEFAULT_COORDINATOR",
    "DEFAULT_PORT",
    "STORE_FILE",
    "ClientSettings",
    "CoordinatorSettings",
    "CoreOptions",
    "Limits",
    "NodeSettings",
    "config_path",
    "coordinator_target",
    "default_data_dir",
    "local_token_hint",
    "read_token",
]

DEFAULT_COORDINATOR = "127.0.0.1:7070"
DEFAULT_PORT = 7070


def coordinator_target(address: str) -> str:
    """A coordinator address as given (`-c`, SHOAL_COORDINATOR, `[client] coordinator`), each
    of its comma-separated hosts with the default port if it names none; empty: the default.
    gRPC's own default port is 443."""
    hosts = [h.strip() for h in address.split(",") if h.strip()]
    if not hosts:
        return DEFAULT_COORDINATOR
    if any(":/" in h or h.startswith("unix:") for h in hosts):  # a gRPC target of its own
        return address
    return ",".join(f"{h}:{DEFAULT_PORT}" if ":" not in h or h.endswith("]") else h for h in hosts)


def config_path() -> Path:
    env = os.environ.get("SHOAL_CONFIG")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "shoal" / "config.toml"


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "shoal"


ADMIN_TOKEN_FILE = "admin.token"
"""Where `shoal up` and `shoal coordinator` keep the local admin token, in their data dir."""
STORE_FILE = "shoal.db"
"""The coordinator's embedded store, in its data dir (its lock and state files beside it)."""


def read_token(token: str = "", token_file: Path | None = None) -> str:
    """The token to present: given, else read from `token_file`, else the local admin token.

    The local admin token is the one `shoal up` / `shoal coordinator` wrote to the default
    data dir; it lets commands on the coordinator's own machine work with no set-up.
    """
    if token:
        return token.strip()
    path = token_file or default_data_dir() / ADMIN_TOKEN_FILE
    try:
        return path.read_text().strip()
    except OSError as err:
        if token_file is not None:
            raise Unauthenticated(f"cannot read token file {path}: {err.strerror}") from None
        return ""


def local_token_hint(token: str) -> str:
    """What to say of a token `read_token` found by itself (the local admin token, or none)
    when a coordinator refuses it."""
    path = default_data_dir() / ADMIN_TOKEN_FILE
    if not token:
        return (
            f"no token was given, and there is none in {path}: set SHOAL_TOKEN, or"
            " SHOAL_TOKEN_FILE to the admin.token in the coordinator's data dir"
        )
    return (
        f"the token is the local admin token in {path}; a coordinator started with another"
        " data dir has its own admin.token there: set SHOAL_TOKEN_FILE to it"
    )


class _Settings(BaseSettings):
    _table: ClassVar[str] = ""

    @field_validator("*", mode="before")
    @classmethod
    def _empty_path_is_unset(cls, value: Any, info: ValidationInfo) -> Any:
        """An optional path given empty (`SHOAL_TOKEN_FILE=`) is unset, as in a shell, not "."."""
        name = info.field_name
        if value == "" and name is not None and cls.model_fields[name].annotation == Path | None:
            return None
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        table: dict[str, Any] = {}
        path = config_path()
        if path.is_file():
            try:
                with path.open("rb") as f:
                    table = tomllib.load(f).get(cls._table, {})
            except (OSError, tomllib.TOMLDecodeError) as err:
                why = err.strerror if isinstance(err, OSError) else str(err)
                raise FailedPrecondition(f"cannot read config file {path}: {why}") from None
            if unknown := sorted(set(table) - set(cls.model_fields)):  # a misspelt key
                near = difflib.get_close_matches(unknown[0], cls.model_fields, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise FailedPrecondition(
                    f"config file {path}: [{cls._table}] has no setting {unknown[0]!r}{hint}"
                )
        return init_settings, env_settings, InitSettingsSource(settings_cls, table)


class CoreOptions(Limits):
    """The coordinator engine's tunables, each with its default, read from nothing: a test
    builds one with a few overrides; `CoordinatorSettings` reads them with the process's own
    from file, environment and flags. Durations are timedelta."""

    # Nodes heartbeat this often; one silent for a lease is lost and its tasks run elsewhere.
    # (A node's own lease is renewed by the coordinator's answers, at least 4 times a lease.)
    heartbeat_interval: timedelta = timedelta(seconds=3)
    lease: timedelta = timedelta(seconds=10)
    # With more nodes than heartbeat_interval x this, heartbeats are spaced out to keep to this
    # many a second, and leases lengthened in proportion (3,000 nodes: every 6 s, lease 20 s).
    max_heartbeat_rate: float = Field(default=500.0, gt=0)
    # After a restart, tasks that may still run on a node wait this long (default: a lease)
    # for their node to reconnect and report them, before they are dispatched again.
    restart_grace: timedelta | None = None
    # A task no connected node could ever run (no node has its executor, labels, tool, model
    # or resources) fails after waiting this long for one, unless its spec says wait_for_node
    # (never within restart_grace of a restart or of a node leaving: it may be back).
    unplaceable_grace: timedelta = timedelta(seconds=5)
    # Circuit breakers: open after this many consecutive infrastructure failures of a node,
    # an executor of a node or a backend; one probe is let through after the cooldown.
    breaker_threshold: int = Field(default=5, ge=1)
    breaker_cooldown: timedelta = timedelta(seconds=30)
    # The longest ttl a lock lease takes at once (renew it to hold it longer).
    max_lock_ttl: timedelta = timedelta(hours=1)
    # A catch_up=all schedule runs at most this many missed firings at once (after downtime,
    # or when the wall clock steps ahead); the rest are skipped.
    max_catch_up: int = Field(default=10, ge=1, le=100)
    # Quotas on keys, on top of those set with `shoal quota set` (fields of shoal.v1.Quota:
    # [[coordinator.quotas]] key = "provider:openai", rate = 10, cost_per_day = 5.0), and the
    # price of LLM tokens in dollars per million, by model: {"gpt-4o" = [2.5, 10.0]}.
    quotas: list[dict[str, Any]] = Field(default_factory=list)
    pricing: dict[str, tuple[float, float]] = Field(default_factory=dict)
    event_capacity: int = 100_000
    # Output events held in memory for watchers to replay (the oldest go first); a watcher
    # slower than that is cut, and resumes from its cursor.
    event_bytes: int = Field(default=64 << 20, gt=0)
    finished_cache: int = 10_000
    # Messages per second a node session may send (a token bucket; excess is read later).
    node_message_rate: float = 2000.0
    node_message_burst: int = 4000
    # Scheduling: the routing strategy of tasks that name none, and tenant weights for
    # fair sharing within a priority (a tenant not listed weighs 1).
    routing: Literal["least_loaded", "round_robin", "random", "weighted", "affinity"] = (
        "least_loaded"
    )
    tenant_weights: dict[str, float] = Field(default_factory=dict)


class CoordinatorSettings(_Settings, CoreOptions):
    """`shoal coordinator` and the coordinator half of `shoal up`: the engine's options and the
    process's own (listen address, store, discovery, connections, TLS)."""

    _table = "coordinator"
    model_config = SettingsConfigDict(env_prefix="SHOAL_COORDINATOR_", extra="ignore")

    listen: str = DEFAULT_COORDINATOR
    data_dir: Path = Field(default_factory=default_data_dir)
    # mDNS: the coordinator advertises `_shoal._tcp` with its cluster name (nodes started without
    # a coordinator address join the one of their cluster), and watches the nodes advertised
    # for its cluster. auto: only when it listens beyond loopback; on; off.
    cluster: str = "default"
    advertise: Literal["auto", "on", "off"] = "auto"
    # Sessions this coordinator dials (Node.Attach), for nodes that cannot reach it: `adopt`
    # every node advertised for its cluster by mDNS, and always the nodes at `nodes` (host:port
    # of their service). A node that dials in itself is not dialled too: one session per node.
    adopt: bool = False
    nodes: list[str] = Field(default_factory=list)
    # host:port addresses nodes reach this coordinator at besides its own (NAT, a proxy): a
    # node that found it by itself has it prove its identity for the address it dialled.
    reachable_at: list[str] = Field(default_factory=list)
    # Prometheus metrics at http://<metrics_listen>/metrics (e.g. "127.0.0.1:9464"); off when
    # empty. Unauthenticated: bind it where only the scraper reaches.
    metrics_listen: str = ""
    # The HTTP/JSON API, its live events (SSE) and the dashboard at http://<http_listen>/ (e.g.
    # "127.0.0.1:7080"); off when empty. Same tokens, roles, TLS and loopback rule as gRPC.
    http_listen: str = ""
    # FULL: an acknowledged task survives power loss; NORMAL: survives a process crash only.
    synchronous: str = "FULL"
    # Where tasks are kept: "" for SQLite in data_dir, or "postgresql://user@host/db", which
    # several coordinators may share (one leads, the others stand by and take over).
    store: str = ""
    max_message_bytes: int = 16 << 20
    # Connections: one that has not finished its TLS and HTTP/2 handshake within
    # handshake_timeout is closed, and one without calls for idle_timeout; beyond
    # max_connections (kept under the process's open-file limit, which serving commands raise
    # to its hard limit) new ones are refused; one carries at most max_streams calls at once.
    handshake_timeout: timedelta = timedelta(seconds=10)
    idle_timeout: timedelta = timedelta(minutes=5)
    max_connections: int = Field(default=10_000, ge=1)
    max_streams: int = Field(default=1_000, ge=1)
    # Authentication: bearer tokens checked on every call but health. Off is allowed on
    # loopback only.
    auth: bool = True
    # TLS: the server's certificate and key (PEM); with `tls_client_ca` and
    # `require_client_cert` (one needs the other), clients must present a certificate signed by
    # that CA (mTLS), whose name a node's must match.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    require_client_cert: bool = False


class NodeSettings(_Settings):
    """`shoal node` and the node half of `shoal up`."""

    _table = "node"
    model_config = SettingsConfigDict(env_prefix="SHOAL_NODE_", extra="ignore")

    # host:port of the coordinator; empty: find the one advertising `cluster` by mDNS (and
    # look again before each reconnect, so the node follows it when it moves).
    coordinator: str = ""
    cluster: str = "default"
    node_id: str = ""  # default: hostname plus a random suffix
    listen: str = "127.0.0.1:0"  # the node's own service (health, Info, Execute)
    # host:port addresses coordinators reach the node's service at besides its own (NAT, a
    # proxy): an adopting coordinator proves itself for the address it dialled.
    reachable_at: list[str] = Field(default_factory=list)
    # mDNS: advertise `_shoal-node._tcp` (node id, executors, labels, models). auto: only when
    # the node's service listens beyond loopback; on; off.
    advertise: Literal["auto", "on", "off"] = "auto"
    slots: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    labels: dict[str, str] = Field(default_factory=dict)
    executors: list[str] = Field(default_factory=list)  # empty: every available executor
    # Settings of third-party executors, by executor name ([node.executor_options.<name>]).
    executor_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    weight: float = Field(default=1.0, gt=0)  # share of work under weighted routing
    # What tasks may reserve here (ResourceRequest); unset: what the machine has.
    cpus: int | None = None
    memory_mb: int | None = None
    gpus: int | None = None
    models: list[str] = Field(default_factory=list)  # LLM models this node serves
    output_tail_bytes: int = 64 << 10
    # A task's output streamed to its followers: past this many bytes only the end of each
    # stream is sent, after a marker saying how much was cut (its result keeps its tails).
    max_output_bytes: int = Field(default=8 << 20, ge=0)
    reconnect_max: timedelta = timedelta(seconds=5)
    # Where tasks run (a task's cwd is relative to it); unset: the node's own directory.
    workdir: Path | None = None
    # On SIGTERM or `shoal drain`: how long running tasks may take to finish before they are
    # given back to the coordinator.
    drain_grace: timedelta = timedelta(seconds=30)
    # A JSON-lines record of every attempt this node starts, finishes or gives back.
    ledger: Path | None = None
    # The token presented to the coordinator (else read from token_file, else the local
    # admin token); callers of the node's own service must present it too.
    token: str = ""
    token_file: Path | None = None
    # Whether callers of the node's own service must present that token; off is allowed on
    # loopback only (health is open either way).
    auth: bool = True
    # No coordinator at all: the node serves its own service only (Info, health, and Execute,
    # Get, Cancel of tasks run directly on it).
    standalone: bool = False
    # TLS towards the coordinator: the CA that signed its certificate, and this node's own
    # certificate and key for mTLS.
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # TLS on the node's own service too (for an adopting coordinator, and direct callers),
    # with tls_cert and tls_key (a certificate for the addresses it is dialled at: `shoal
    # certs issue NODE --host ...`); with service_require_client_cert, callers must present a
    # certificate signed by tls_ca (mTLS).
    service_tls: bool = False
    service_require_client_cert: bool = False
    # Secrets tasks may ask for by name (SecretRef): inline values, and a directory with one
    # file per secret (file name = secret name). Values never leave the node.
    secrets: dict[str, str] = Field(default_factory=dict)
    secrets_dir: Path | None = None
    # The tenants that may use each secret (`[node.secret_tenants]`, `NAME = ["acme", ...]`):
    # "" stands for tasks without a tenant, "*" for every task. A secret not listed here is for
    # tasks without a tenant only; a task of another tenant that asks for it fails.
    secret_tenants: dict[str, list[str]] = Field(default_factory=dict)
    # shell and python tasks run as this user: a name, or "uid[:gid]", each task in a
    # directory of its own. "node" (or "") runs them as the node's own user, in `workdir`.
    # "auto": when the node runs as root, a uid of its own for each running task (from
    # 1,900,000,000 up, no account needed; every process of it is killed when the task ends);
    # the node's own user otherwise.
    run_as: str = "auto"
    # The resource guard: background work must not fight the machine's own user. While the
    # machine's foreground load (CPU or memory used by everything but this node and its tasks,
    # in percent of the machine) stays over `guard_cpu_percent` or `guard_memory_percent` for
    # `guard_busy_after`, the node is throttled: it takes no task below `guard_min_priority`.
    # It is calm again once both stay `guard_margin_percent` points under their thresholds for
    # `guard_calm_after`.
    guard: bool = True
    guard_cpu_percent: float = Field(default=70.0, gt=0, le=100)
    guard_memory_percent: float = Field(default=85.0, gt=0, le=100)
    guard_margin_percent: float = Field(default=10.0, ge=0, lt=100)
    guard_busy_after: timedelta = timedelta(seconds=3)
    guard_calm_after: timedelta = timedelta(seconds=10)
    # The lowest priority still taken while throttled: critical, high, normal, low or background.
    guard_min_priority: Literal["critical", "high", "normal", "low", "background"] = "high"
    # throttle: take no work below the floor while throttled. pause: also stop (SIGSTOP) the
    # process groups of the running background tasks meanwhile, and resume them (SIGCONT) once
    # calm; their timeout does not run while they are stopped.
    guard_policy: Literal["throttle", "pause"] = "throttle"
    # ollama (and llm tasks for provider "ollama"): the Ollama server; empty: $OLLAMA_HOST,
    # else http://127.0.0.1:11434.
    ollama_host: str = ""
    # llm: each cloud provider's API key and base URL. A key left unset is read from the
    # provider's usual variable (OPENAI_API_KEY, ANTHROPIC_API_KEY, GEMINI_API_KEY or
    # GOOGLE_API_KEY); an empty base URL is the provider's own. Keys come only from here,
    # never from a task, and are kept out of reprs and logs.
    llm_openai_api_key: SecretStr | None = None
    llm_openai_base_url: str = ""
    llm_anthropic_api_key: SecretStr | None = None
    llm_anthropic_base_url: str = ""
    llm_gemini_api_key: SecretStr | None = None
    llm_gemini_base_url: str = ""
    # http: the hosts tasks may call, redirects included: exact names or `*.example.com`
    # (its subdomains), each with an optional `:port` (none: any port); `*` is every host.
    # Empty (the default): http tasks may call nothing.
    http_allow_hosts: list[str] = Field(default_factory=list)
    # http: whether a wildcard entry (`*`, `*.example.com`) may reach loopback, link-local,
    # private and other non-public addresses; without it only an entry naming the host or
    # address exactly does.
    http_allow_private: bool = False
    # http: the largest response body kept whole (the "body" artifact, and "json" in the
    # output); a longer one still streams as output.
    http_max_body_bytes: int = Field(default=1 << 20, ge=0)
    # http: how long connecting to a host may take (the task's own timeout bounds the rest).
    http_connect_timeout: timedelta = timedelta(seconds=10)
    # tool: the tools (entry-point group `shoal.tools`) this node offers; empty: every one
    # installed.
    tools: list[str] = Field(default_factory=list)
    # function: modules whose `@shoal.task` functions this node runs, imported once into
    # warm worker processes (one per slot).
    imports: list[str] = Field(default_factory=list)
    # docker: a container's limits when its task sets none (a task may ask for less, never
    # more): memory in MB (no swap on top), CPUs, and processes at once.
    docker_memory_mb: int = Field(default=512, ge=6)
    docker_cpus: float = Field(default=1.0, gt=0)
    docker_pids: int = Field(default=128, ge=1)
    # docker: the user containers run as ("uid:gid"; empty: the image's own, often root).
    docker_user: str = "65534:65534"
    # docker: whether a task may ask for a network; otherwise containers have none at all.
    docker_allow_network: bool = False
    # docker: host paths mounted into every container ("/data:/data:ro"); tasks never choose
    # mounts. Empty (the default): none.
    docker_mounts: list[str] = Field(default_factory=list)
    # docker: the size of the tmpfs at a container's /tmp, in MB (it counts as its memory).
    docker_tmpfs_mb: int = Field(default=64, ge=1)

    def resolved_node_id(self) -> str:
        return self.node_id or f"{socket.gethostname()}-{os.urandom(3).hex()}"


class ClientSettings(_Settings):
    """The SDK and CLI commands that talk to a coordinator."""

    _table = "client"
    model_config = SettingsConfigDict(env_prefix="SHOAL_", extra="ignore")

    coordinator: str = DEFAULT_COORDINATOR
    token: str = ""  # SHOAL_TOKEN
    token_file: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
