"""How `--dist loadgroup` shares the suite among pytest-xdist workers: the tests of one group
run one after another on one worker; every other test goes wherever a worker is free.

Groups are chosen here, by path, in the controller: pytest-xdist's own `xdist_group` marks
are read from a node id that pytest (9.2) no longer lets a plugin change, so they go unseen.
"""

from __future__ import annotations

import pytest
from xdist.remote import Producer  # type: ignore[import-untyped]
from xdist.scheduler import LoadScopeScheduling  # type: ignore[import-untyped]

__all__ = ["GROUPS", "GroupScheduling", "group_of"]

GROUPS: dict[str, tuple[str, ...]] = {
    # Chaos scenarios kill processes, cut links, step clocks and time the recovery, and the
    # fuzzer keeps a core busy for minutes: none of them runs beside another of them.
    "chaos-and-fuzz": ("tests/chaos/", "tests/fuzz/"),
    # A browser in the root network namespace hears every mDNS group joined there: it would
    # see what another test's nodes announce.
    "mdns": (
        "tests/integration/test_advertisement.py::",
        "tests/integration/test_discovery.py::",
        "tests/integration/test_standby_discovery.py::",
    ),
    # One worker starts a dockerd of its own when no engine answers (tests/integration/
    # docker_engine.py).
    "docker": ("tests/integration/test_docker.py::", "tests/contract/test_contract.py::"),
    # The wheel (minutes on 2 cores) is built once, by the module's fixture, for all its tests.
    "packaging": ("tests/integration/test_packaging.py::",),
}
"""Each group's node id prefixes (paths from the repository's root)."""


def group_of(nodeid: str) -> str:
    """The group of the test `nodeid`, or `nodeid` itself when it belongs to none."""
    for group, prefixes in GROUPS.items():
        if nodeid.startswith(prefixes):
            return f"group:{group}"
    return nodeid


class GroupScheduling(LoadScopeScheduling):  # type: ignore[misc]
    """pytest-xdist's scheduling by scope, with the scopes of `group_of`."""

    def __init__(self, config: pytest.Config, log: Producer | None = None) -> None:
        super().__init__(config, log)
        self.log = Producer("groupsched") if log is None else log.groupsched

    def _split_scope(self, nodeid: str) -> str:
        return group_of(nodeid)
