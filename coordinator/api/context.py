"""What every servicer of the coordinator shares about the call it serves."""

from __future__ import annotations

from typing import Any, TypeAlias

from shoal._channel import CLIENT_KEY

__all__ = ["Ctx", "client_of"]

Ctx: TypeAlias = Any  # grpc.aio.ServicerContext (grpcio ships no type hints)


def client_of(context: Ctx) -> str:
    """Who calls, for a place in line: the client's own name if it gives one, else its peer."""
    for key, value in context.invocation_metadata() or ():
        if key == CLIENT_KEY and isinstance(value, str):
            return value[:64]
    return str(context.peer())
