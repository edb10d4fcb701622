"""Priority floors: a node whose machine is busy takes only tasks down to some priority."""

from __future__ import annotations

import random
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.coordinator.placement import (
    PRIORITY_LEVELS,
    NodeSlots,
    PlacementClass,
    Requirements,
    Resources,
    Routing,
    Scheduler,
)

CRITICAL, HIGH, NORMAL, LOW, BACKGROUND = range(1, 6)
BUSY = "its machine is busy"
SHELL = Requirements(PlacementClass("shell"))


@dataclass(eq=False)
class T:
    seq: int
    priority: int = NORMAL
    placement: Requirements = SHELL
    queued: bool = True
    tenant: str = ""
    tag: float = 0.0


def node(name: str, slots: int = 4, *, cpu_milli: int = 0) -> NodeSlots:
    return NodeSlots(name, frozenset({"shell"}), {}, slots, cpu_milli=cpu_milli)


def sched(*nodes: NodeSlots) -> Scheduler:
    s = Scheduler(rng=random.Random(7))
    for n in nodes:
        s.add_node(n)
    return s


def dispatched(s: Scheduler) -> list[tuple[int, str]]:
    return [(t.seq, n.node_id) for t, n in s.schedule()]


def test_a_busy_node_takes_high_priority_work_and_no_lower() -> None:
    s = sched(node("a"))
    s.set_min_priority("a", HIGH, BUSY)
    background, normal, high, critical = T(1, BACKGROUND), T(2, NORMAL), T(3, HIGH), T(4, CRITICAL)
    for t in (background, normal, high, critical):
        s.queue.push(t)
    assert dispatched(s) == [(4, "a"), (3, "a")]
    assert s.explain(background) == (
        "node a takes only HIGH or higher priority now: its machine is busy"
    )
    assert s.explain(normal) == s.explain(background)


def test_lower_priorities_go_to_nodes_that_still_take_them() -> None:
    a, b = node("a"), node("b")
    s = sched(a, b)
    s.set_min_priority("a", HIGH, BUSY)
    for i in range(4):
        s.queue.push(T(i, BACKGROUND))
    assert {n for _, n in dispatched(s)} == {"b"}
    assert a.running == 0


def test_a_parked_background_task_never_holds_back_later_high_ones_of_its_class() -> None:
    s = sched(node("a"))
    s.set_min_priority("a", HIGH, BUSY)
    waiting = T(1, BACKGROUND)
    s.queue.push(waiting)
    assert dispatched(s) == []  # its class is parked from the background level down
    s.queue.push(T(2, HIGH))  # the same class, a higher level: not parked
    s.queue.push(T(3, LOW))  # lower than the floor: waits too
    assert dispatched(s) == [(2, "a")]
    assert waiting.queued


def test_the_floor_lifting_dispatches_what_waited_in_order() -> None:
    s = sched(node("a"))
    s.set_min_priority("a", HIGH, BUSY)
    for t in (T(1, BACKGROUND), T(2, NORMAL), T(3, LOW)):
        s.queue.push(t)
    assert dispatched(s) == []
    s.set_min_priority("a", NORMAL, BUSY)  # a partial lift
    assert dispatched(s) == [(2, "a")]
    s.set_min_priority("a")
    assert dispatched(s) == [(3, "a"), (1, "a")]
    assert s.nodes["a"].limited_because == ""


def test_room_freed_on_a_node_that_takes_the_level_wakes_the_class() -> None:
    a, b = node("a", 4), node("b", 1)
    s = sched(a, b)
    s.set_min_priority("a", HIGH, BUSY)
    first = T(1, BACKGROUND)
    s.queue.push(first)
    assert dispatched(s) == [(1, "b")]
    second = T(2, BACKGROUND)
    s.queue.push(second)
    assert dispatched(s) == []  # a has room but is busy; b is full
    assert s.explain(second) == "waiting for a free slot on 1 fitting node"
    s.release(b, first)
    assert dispatched(s) == [(2, "b")]


def test_room_freed_on_a_busy_node_does_not_wake_what_it_will_not_take() -> None:
    a = node("a", 1)
    s = sched(a)
    running = T(1, HIGH)
    s.queue.push(running)
    assert dispatched(s) == [(1, "a")]
    s.set_min_priority("a", HIGH, BUSY)
    s.queue.push(T(2, BACKGROUND))
    assert dispatched(s) == []
    s.release(a, running)
    assert len(s.queue._blocked) == 1  # still parked: a takes no background work now
    assert dispatched(s) == []


def test_resource_requests_obey_the_floor_too() -> None:
    big = Requirements(PlacementClass("shell", resources=Resources(cpu_milli=2000)))
    s = sched(node("a", cpu_milli=4000), node("b", cpu_milli=4000))
    s.set_min_priority("a", CRITICAL, BUSY)
    s.set_min_priority("b", NORMAL, BUSY)
    low = T(1, LOW, big)
    s.queue.push(low)
    s.queue.push(T(2, NORMAL, big))
    assert dispatched(s) == [(2, "b")]
    assert s.explain(low) == (
        "no fitting node takes LOW priority now ("
        "a takes only CRITICAL or higher priority now: its machine is busy; "
        "b takes only NORMAL or higher priority now: its machine is busy)"
    )


def test_hard_affinity_waits_for_its_node_to_take_the_level_again() -> None:
    sticky = Requirements(
        PlacementClass("shell", affinity_key="k"), Routing.AFFINITY, affinity_key="k"
    )
    s = sched(node("a"), node("b"))
    s.queue.push(T(1, BACKGROUND, sticky))
    ((_, first),) = dispatched(s)
    other = "b" if first == "a" else "a"
    s.set_min_priority(first, HIGH, BUSY)
    waiting = T(2, BACKGROUND, sticky)
    s.queue.push(waiting)
    assert dispatched(s) == []  # not to the other node: the affinity is hard
    assert s.explain(waiting) == (
        f"hard affinity: waiting for node {first}"
        " (it takes only HIGH or higher priority now: its machine is busy)"
    )
    s.queue.push(T(3, HIGH, sticky))
    assert dispatched(s) == [(3, first)]
    s.set_min_priority(first)
    assert dispatched(s) == [(2, first)]
    assert s.nodes[other].running == 0


def test_the_lowest_priority_means_no_floor() -> None:
    s = sched(node("a"))
    s.set_min_priority("a", BACKGROUND, BUSY)
    assert s.nodes["a"].max_level == PRIORITY_LEVELS - 1
    assert s.nodes["a"].limited_because == ""
    s.queue.push(T(1, BACKGROUND))
    assert dispatched(s) == [(1, "a")]


def test_an_unknown_node_is_ignored() -> None:
    s = sched(node("a"))
    s.set_min_priority("gone", HIGH, BUSY)
    s.queue.push(T(1, BACKGROUND))
    assert dispatched(s) == [(1, "a")]


_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(1, 5), st.booleans()),
        st.tuples(st.just("floor"), st.sampled_from("ab"), st.integers(0, 5)),
        st.tuples(st.just("finish"), st.integers(0, 50), st.just(False)),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(_OPS)
def test_no_task_ever_goes_below_its_nodes_floor_and_nothing_is_lost(
    ops: list[tuple[str, object, object]],
) -> None:
    nodes = {"a": node("a", 2), "b": node("b", 3, cpu_milli=4000)}
    s = sched(*nodes.values())
    big = Requirements(PlacementClass("shell", resources=Resources(cpu_milli=1000)))
    running: list[tuple[T, NodeSlots]] = []
    pushed = 0

    def dispatch() -> None:
        for task, n in s.schedule():
            assert n.max_level >= task.priority - 1, (task, n)
            running.append((task, n))  # type: ignore[arg-type]

    for op, x, y in ops:
        if op == "push":
            assert isinstance(x, int)
            s.queue.push(T(pushed, x, big if y else SHELL))
            pushed += 1
        elif op == "floor":
            assert isinstance(x, str) and isinstance(y, int)
            s.set_min_priority(x, y, BUSY)
        elif running:
            assert isinstance(x, int)
            task, n = running.pop(x % len(running))
            s.release(n, task)
        dispatch()
    for name in nodes:  # calm again: everything queued goes, in time
        s.set_min_priority(name)
    dispatch()
    while running:
        task, n = running.pop()
        s.release(n, task)
        dispatch()
    assert len(s.queue) == 0
