"""Typed settings for each Shoal process.

Precedence, lowest first: the TOML file (`SHOAL_CONFIG`, else ~/.config/shoal/config.toml,
one table per process: [coordinator], [node], [client]), `SHOAL_*` environment variables,
then command-line flags (passed as keyword arguments).
"""

from __future__ import annotations

import os
import socket
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

__all__ = [
    "DEFAULT_COORDINATOR",
    "ClientSettings",
    "CoordinatorSettings",
    "NodeSettings",
    "config_path",
    "default_data_dir",
]

DEFAULT_COORDINATOR = "127.0.0.1:7070"


def config_path() -> Path:
    env = os.environ.get("SHOAL_CONFIG")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "shoal" / "config.toml"


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "shoal"


class _Settings(BaseSettings):
    _table: ClassVar[str] = ""

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
            with path.open("rb") as f:
                table = tomllib.load(f).get(cls._table, {})
        return init_settings, env_settings, InitSettingsSource(settings_cls, table)


class CoordinatorSettings(_Settings):
    """`shoal coordinator` and the coordinator half of `shoal up`."""

    _table = "coordinator"
    model_config = SettingsConfigDict(env_prefix="SHOAL_COORDINATOR_", extra="ignore")

    listen: str = DEFAULT_COORDINATOR
    data_dir: Path = Field(default_factory=default_data_dir)
    # FULL: an acknowledged task survives power loss; NORMAL: survives a process crash only.
    synchronous: str = "FULL"
    heartbeat_interval: timedelta = timedelta(seconds=2)
    lease: timedelta = timedelta(seconds=10)
    event_capacity: int = 100_000
    finished_cache: int = 10_000
    max_message_bytes: int = 16 << 20
    max_spec_bytes: int = 1 << 20
    max_batch: int = 10_000


class NodeSettings(_Settings):
    """`shoal node` and the node half of `shoal up`."""

    _table = "node"
    model_config = SettingsConfigDict(env_prefix="SHOAL_NODE_", extra="ignore")

    coordinator: str = DEFAULT_COORDINATOR
    node_id: str = ""  # default: hostname plus a random suffix
    listen: str = "127.0.0.1:0"  # the node's own service (health, Info)
    slots: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    labels: dict[str, str] = Field(default_factory=dict)
    executors: list[str] = Field(default_factory=list)  # empty: every available executor
    output_tail_bytes: int = 64 << 10
    reconnect_max: timedelta = timedelta(seconds=5)

    def resolved_node_id(self) -> str:
        return self.node_id or f"{socket.gethostname()}-{os.urandom(3).hex()}"


class ClientSettings(_Settings):
    """The SDK and CLI commands that talk to a coordinator."""

    _table = "client"
    model_config = SettingsConfigDict(env_prefix="SHOAL_", extra="ignore")

    coordinator: str = DEFAULT_COORDINATOR
