"""Placement: priority then arrival, credits never exceeded, least loaded, no head-of-line block."""

from __future__ import annotations

from dataclasses import dataclass

from shoal.coordinator.scheduler import NodeSlots, PlacementClass, Scheduler

SHELL = PlacementClass("shell", frozenset())
GPU = PlacementClass("shell", frozenset({("gpu", "true")}))
DOCKER = PlacementClass("docker", frozenset())


@dataclass(eq=False)
class T:
    seq: int
    priority: int = 3
    placement: PlacementClass = SHELL
    queued: bool = True


def node(
    name: str, slots: int, executors: tuple[str, ...] = ("shell",), **labels: str
) -> NodeSlots:
    return NodeSlots(name, frozenset(executors), labels, slots)


def test_priority_first_then_fifo() -> None:
    s = Scheduler()
    tasks = [T(1, 4), T(2, 3), T(3, 1), T(4, 3), T(5, 1)]
    for t in tasks:
        s.queue.push(t)
    s.add_node(node("a", 10))
    order = [t.seq for t, _ in s.schedule()]
    assert order == [3, 5, 2, 4, 1]


def test_never_more_than_free_slots() -> None:
    s = Scheduler()
    for i in range(10):
        s.queue.push(T(i))
    a, b = node("a", 3), node("b", 2)
    s.add_node(a)
    s.add_node(b)
    assert len(s.schedule()) == 5
    assert (a.running, b.running) == (3, 2)
    assert s.schedule() == []
    a.running -= 1
    assert [n.node_id for _, n in s.schedule()] == ["a"]
    assert len(s.queue) == 4


def test_least_loaded_node_wins() -> None:
    s = Scheduler()
    a, b = node("a", 4), node("b", 4)
    a.running = 3
    s.add_node(a)
    s.add_node(b)
    s.queue.push(T(1))
    ((_, chosen),) = s.schedule()
    assert chosen is b


def test_unplaceable_task_does_not_block_others() -> None:
    s = Scheduler()
    s.queue.push(T(1, 1, DOCKER))  # nobody offers docker
    s.queue.push(T(2, 1, GPU))  # nobody has gpu=true
    s.queue.push(T(3, 5, SHELL))
    s.add_node(node("a", 1))
    assert [t.seq for t, _ in s.schedule()] == [3]
    assert not s.offered(DOCKER)
    s.add_node(node("g", 1, gpu="true"))
    assert [t.seq for t, _ in s.schedule()] == [2]


def test_cancelled_tasks_are_skipped() -> None:
    s = Scheduler()
    first, second = T(1), T(2)
    s.queue.push(first)
    s.queue.push(second)
    first.queued = False
    s.queue.discard()
    s.add_node(node("a", 5))
    assert [t.seq for t, _ in s.schedule()] == [2]
    assert len(s.queue) == 0
