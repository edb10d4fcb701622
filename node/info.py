"""What a node says it is (its NodeInfo): its settings, what it found on its machine, and what
its executors offer."""

from __future__ import annotations

import platform
import socket

import psutil

from shoal import __version__
from shoal.config import NodeSettings
from shoal.node.executors.base import Executor
from shoal.node.fingerprint import Fingerprint
from shoal.v1 import node_pb2

__all__ = ["node_info"]


def node_info(
    settings: NodeSettings,
    node_id: str,
    machine: Fingerprint,
    executors: dict[str, Executor],
) -> node_pb2.NodeInfo:
    """The node's fingerprint and capabilities: settings first, what was found otherwise."""
    s = settings
    info = node_pb2.NodeInfo(
        node_id=node_id,
        hostname=socket.gethostname(),
        version=__version__,
        labels=s.labels,
        executors=sorted(executors),
        slots=s.slots,
        resources=node_pb2.Resources(
            cpus=s.cpus if s.cpus is not None else psutil.cpu_count() or 1,
            memory_mb=(
                s.memory_mb if s.memory_mb is not None else psutil.virtual_memory().total >> 20
            ),
            gpus=s.gpus if s.gpus is not None else len(machine.gpus),
        ),
        models=s.models,
        weight=s.weight,
        python_version=platform.python_version(),
        detected_gpus=[node_pb2.Gpu(name=g.name, memory_mb=g.memory_mb) for g in machine.gpus],
        docker_available=machine.docker_available,
        ollama_models=machine.ollama_models,  # an Ollama executor says what it holds
    )
    for executor in executors.values():
        executor.offers(info)
    return info
