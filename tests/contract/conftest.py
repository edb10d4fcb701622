"""The contract runs the docker executor against a real engine (see docker_engine.py)."""

from tests.integration.docker_engine import docker_engine

__all__ = ["docker_engine"]
