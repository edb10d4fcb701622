"""The circuit breaker state machine, on an injected clock."""

from __future__ import annotations

from shoal.coordinator.gates.breakers import CLOSED, HALF_OPEN, OPEN, Breakers

from .test_core import Wall

KEY = ["node:a/shell"]


def breakers(wall: Wall) -> Breakers:
    return Breakers(threshold=3, cooldown=30.0, clock=wall, wall=wall)


def test_opens_after_consecutive_failures_only() -> None:
    b = breakers(Wall())
    b.failed(KEY, "t1", "boom")
    b.failed(KEY, "t2", "boom")
    assert b.succeeded(KEY, "t3") == []  # a success in between starts the count again
    assert b.get(KEY[0]) is None
    b.failed(KEY, "t4", "boom")
    b.failed(KEY, "t5", "boom")
    (opened,) = b.failed(KEY, "t6", "disk full")
    assert (opened.state, opened.failures, opened.last_error) == (OPEN, 3, "disk full")
    assert not b.passes(KEY[0]) and b.tripped == 1
    assert b.failed(KEY, "t7", "late") == []  # results from before it opened change nothing
    assert b.succeeded(KEY, "t8") == [] and b.get(KEY[0]) is opened


def test_one_probe_after_the_cooldown_decides() -> None:
    wall = Wall()
    b = breakers(wall)
    for i in range(3):
        b.failed(KEY, f"t{i}", "boom")
    wall.now += 29
    assert b.half_open(KEY[0]) is None  # not yet
    wall.now += 1
    assert b.half_open(KEY[0]) is not None and b.passes(KEY[0])
    (probing,) = b.probing(KEY, "probe")
    assert probing.state == HALF_OPEN and not b.passes(KEY[0])  # one probe at a time
    assert b.succeeded(KEY, "someone-else") == []
    (reopened,) = b.failed(KEY, "probe", "still broken")
    assert reopened.state == OPEN and reopened.retry_at == wall.now + 30

    wall.now += 30
    b.half_open(KEY[0])
    b.probing(KEY, "probe-2")
    assert b.abandoned(KEY, "probe-2")[0].probe == ""  # cancelled: another probe may go
    b.probing(KEY, "probe-3")
    (closed,) = b.succeeded(KEY, "probe-3")
    assert closed.state == CLOSED and b.get(KEY[0]) is None and b.tripped == 0
