"""Placement: priorities, tenant fairness, matching, the resource ledger, routing, explain()."""

from __future__ import annotations

import ast
import inspect
import random
from collections import Counter
from dataclasses import dataclass

import pytest

from shoal.coordinator.placement import (
    ROUTERS,
    AffinityMap,
    NodeSlots,
    Op,
    PlacementClass,
    Preference,
    Queued,
    Requirements,
    Resources,
    RouteState,
    Routing,
    Scheduler,
    Selector,
    node_slots_of,
    requirements_of,
)
from shoal.coordinator.placement import scheduler as scheduler_module
from shoal.v1 import node_pb2, task_pb2

ONE_SLOT = Resources()


def req(
    executor: str = "shell",
    *,
    labels: dict[str, str] | None = None,
    selectors: tuple[Selector, ...] = (),
    model: str = "",
    resources: Resources = ONE_SLOT,
    routing: Routing | None = None,
    preferred: tuple[Preference, ...] = (),
    affinity: str = "",
    hard: bool = False,
) -> Requirements:
    cls = PlacementClass(
        executor,
        frozenset((labels or {}).items()),
        tuple(sorted(selectors)),
        model,
        resources,
        affinity if hard else "",
    )
    if affinity and routing is None:
        routing = Routing.AFFINITY
    return Requirements(cls, routing, preferred, affinity)


SHELL = req()
GPU = req(labels={"gpu": "true"})
DOCKER = req("docker")


@dataclass(eq=False)
class T:
    seq: int
    priority: int = 3
    placement: Requirements = SHELL
    queued: bool = True
    tenant: str = ""
    tag: float = 0.0


def node(
    name: str,
    slots: int,
    executors: tuple[str, ...] = ("shell",),
    *,
    cpu_milli: int = 0,
    memory_mb: int = 0,
    gpus: int = 0,
    weight: float = 1.0,
    models: tuple[str, ...] = (),
    **labels: str,
) -> NodeSlots:
    return NodeSlots(
        name,
        frozenset(executors),
        labels,
        slots,
        cpu_milli=cpu_milli,
        memory_mb=memory_mb,
        gpus=gpus,
        weight=weight,
        models=frozenset(models),
    )


def sched(*nodes: NodeSlots, **kwargs: object) -> Scheduler:
    s = Scheduler(rng=random.Random(7), **kwargs)  # type: ignore[arg-type]
    for n in nodes:
        s.add_node(n)
    return s


def run_one_by_one(s: Scheduler) -> list[tuple[Queued, NodeSlots]]:
    """Dispatch until the queue is empty, finishing each task before the next dispatch."""
    done: list[tuple[Queued, NodeSlots]] = []
    while batch := s.schedule():
        for task, n in batch:
            s.release(n, task)
        done += batch
    return done


# -- the original contract ---------------------------------------------------------------------


def test_priority_first_then_fifo() -> None:
    s = sched(node("a", 10))
    for t in [T(1, 4), T(2, 3), T(3, 1), T(4, 3), T(5, 1)]:
        s.queue.push(t)
    assert [t.seq for t, _ in s.schedule()] == [3, 5, 2, 4, 1]


def test_never_more_than_free_slots() -> None:
    a, b = node("a", 3), node("b", 2)
    s = sched(a, b)
    for i in range(10):
        s.queue.push(T(i))
    first = s.schedule()
    assert len(first) == 5
    assert (a.running, b.running) == (3, 2)
    assert s.schedule() == []
    task, _ = next((t, n) for t, n in first if n is a)
    s.release(a, task)
    assert [n.node_id for _, n in s.schedule()] == ["a"]
    assert len(s.queue) == 4


def test_least_loaded_node_wins() -> None:
    a, b = node("a", 4), node("b", 4)
    a.running = 3
    s = sched(a, b)
    s.queue.push(T(1))
    ((_, chosen),) = s.schedule()
    assert chosen is b


def test_unplaceable_task_does_not_block_others() -> None:
    s = sched(node("a", 1))
    s.queue.push(T(1, 1, DOCKER))  # nobody offers docker
    s.queue.push(T(2, 1, GPU))  # nobody has gpu=true
    s.queue.push(T(3, 5, SHELL))
    assert [t.seq for t, _ in s.schedule()] == [3]
    assert not s.offered(DOCKER.cls)
    s.add_node(node("g", 1, gpu="true"))
    assert [t.seq for t, _ in s.schedule()] == [2]


def test_cancelled_tasks_are_skipped() -> None:
    s = sched()
    first, second = T(1), T(2)
    s.queue.push(first)
    s.queue.push(second)
    first.queued = False
    s.queue.remove(first)
    s.add_node(node("a", 5))
    assert [t.seq for t, _ in s.schedule()] == [2]
    assert len(s.queue) == 0


def test_the_module_is_transport_free() -> None:
    tree = ast.parse(inspect.getsource(scheduler_module))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m == "grpc" or m.startswith(("grpc.", "grpc_"))}
    assert not any(m.endswith("_grpc") for m in imported)


# -- priorities and tenants --------------------------------------------------------------------


def test_priority_order_and_fifo_within_a_priority_on_one_slot() -> None:
    rng = random.Random(1)
    s = sched(node("a", 1))
    tasks = [T(i, rng.randint(1, 5)) for i in range(200)]
    for t in tasks:
        s.queue.push(t)
    order = [t for t, _ in run_one_by_one(s)]
    assert order == sorted(tasks, key=lambda t: (t.priority, t.seq))


def test_priority_beyond_the_range_is_clamped() -> None:
    s = sched(node("a", 1))
    for t in [T(1, 9), T(2, 0), T(3, 5)]:
        s.queue.push(t)
    assert [t.seq for t, _ in run_one_by_one(s)] == [2, 1, 3]


def test_two_flooding_tenants_share_by_weight() -> None:
    s = sched(node("a", 1), tenant_weights={"big": 3.0, "small": 1.0})
    seq = 0
    for tenant in ("big", "small"):  # the big tenant's flood arrives first
        for _ in range(2000):
            seq += 1
            s.queue.push(T(seq, tenant=tenant))
    served: list[Queued] = []
    while len(served) < 1000:
        ((task, n),) = s.schedule()
        s.release(n, task)
        served.append(task)
    count = Counter(t.tenant for t in served)
    assert abs(count["big"] / count["small"] - 3.0) <= 0.3
    for tenant in ("big", "small"):  # FIFO within a tenant
        seqs = [t.seq for t in served if t.tenant == tenant]
        assert seqs == sorted(seqs)


def test_a_late_tenant_is_served_at_once_but_banks_no_credit() -> None:
    s = sched(node("a", 1))
    for i in range(10_000):
        s.queue.push(T(i, tenant="flood"))

    def serve(n: int) -> list[str]:
        out = []
        for _ in range(n):
            ((task, node_),) = s.schedule()
            s.release(node_, task)
            out.append(task.tenant)
        return out

    serve(100)
    for i in range(200):
        s.queue.push(T(10_000 + i, tenant="late"))
    served = serve(100)
    assert "late" in served[:2]  # not behind the backlog
    assert 45 <= served.count("late") <= 55  # but sharing from now on, not catching up


def test_fairness_holds_across_placement_classes() -> None:
    s = sched(node("a", 1, ("shell", "python")), tenant_weights={"x": 1, "y": 1})
    python = req("python")
    for i in range(300):
        s.queue.push(T(i, tenant="x"))  # x uses shell only
        s.queue.push(T(1000 + i, placement=python, tenant="y"))  # y uses python only
    served = Counter(t.tenant for t, _ in run_one_by_one(s)[:200])
    assert served["x"] == served["y"] == 100


def test_push_front_keeps_a_requeued_task_ahead() -> None:
    s = sched(node("a", 1))
    for i in range(5):
        s.queue.push(T(i))
    ((first, _),) = s.schedule()
    s.remove_node("a")  # the node left: its task goes back
    s.queue.push_front(first)
    s.add_node(node("a2", 1))
    assert [t.seq for t, _ in run_one_by_one(s)] == [0, 1, 2, 3, 4]


def test_tenant_weights_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Scheduler(tenant_weights={"t": 0.0})


# -- matching ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "matching"),
    [
        (Selector("gpu", Op.IN, ("a100", "h100")), {"n-a100", "n-h100"}),
        (Selector("gpu", Op.NOT_IN, ("a100",)), {"n-h100", "n-t4", "n-none"}),
        (Selector("gpu", Op.EXISTS), {"n-a100", "n-h100", "n-t4"}),
        (Selector("gpu", Op.DOES_NOT_EXIST), {"n-none"}),
    ],
)
def test_each_selector_operator(selector: Selector, matching: set[str]) -> None:
    nodes = [node(f"n-{g}", 100, gpu=g) for g in ("a100", "h100", "t4")] + [node("n-none", 100)]
    s = sched(*nodes)
    for i in range(50):
        s.queue.push(T(i, placement=req(selectors=(selector,))))
    landed = {n.node_id for _, n in s.schedule()}
    assert landed == matching  # least loaded spreads 50 tasks over every matching node


def test_selectors_and_labels_only_ever_land_on_matching_nodes() -> None:
    rng = random.Random(3)
    zones, gpus = ("a", "b", "c"), ("a100", "t4", None)
    nodes = []
    for i in range(12):
        labels = {"zone": rng.choice(zones)}
        if (g := rng.choice(gpus)) is not None:
            labels["gpu"] = g
        if rng.random() < 0.5:
            labels["ssd"] = "true"
        nodes.append(NodeSlots(f"n{i:02}", frozenset({"shell"}), labels, 3))
    s = sched(*nodes)
    ops = list(Op)
    valued = (Op.IN, Op.NOT_IN)
    tasks = []
    for i in range(600):
        labels = {"zone": rng.choice(zones)} if rng.random() < 0.5 else {}
        selectors = tuple(
            Selector(key, op, tuple(sorted(rng.sample(vals, 2))) if op in valued else ())
            for key, vals in (("gpu", ["a100", "t4", "h100"]), ("ssd", ["true", "false"]))
            if rng.random() < 0.6
            for op in (rng.choice(ops),)
        )
        t = T(i, rng.randint(1, 5), req(labels=labels, selectors=selectors))
        tasks.append(t)
        s.queue.push(t)
    running: list[tuple[Queued, NodeSlots]] = []
    started: set[int] = set()
    for _ in range(100):
        batch = s.schedule()
        for task, n in batch:
            assert task.placement.cls.fits(n), (task.placement, n)
            started.add(task.seq)
        running += batch
        rng.shuffle(running)
        for task, n in running[: len(running) // 2]:
            s.release(n, task)
        del running[: len(running) // 2]
    for task, n in running:
        s.release(n, task)
    for task, n in run_one_by_one(s):
        assert task.placement.cls.fits(n), (task.placement, n)
        started.add(task.seq)
    left = [t for t in tasks if t.seq not in started]
    assert 0 < len(left) < 300
    for t in left:  # only what no node matches is left, and it says why
        assert not any(t.placement.cls.fits(n) for n in nodes)
        assert s.explain(t).startswith("no node matches")


def test_model_must_be_offered() -> None:
    s = sched(node("a", 2), node("b", 2, models=("llama3",)))
    s.queue.push(T(1, placement=req(model="llama3")))
    s.queue.push(T(2, placement=req(model="mistral")))
    assert [(t.seq, n.node_id) for t, n in s.schedule()] == [(1, "b")]
    assert s.explain(T(2, placement=req(model="mistral"))) == "no node offers model 'mistral'"


def test_a_tool_task_goes_to_a_node_that_offers_its_tool() -> None:
    nodes = [
        node_pb2.NodeInfo(node_id=n, executors=["tool"], slots=2, tools=tools)
        for n, tools in (("a", ["add"]), ("b", ["slugify"]))
    ]
    s = sched(*(node_slots_of(info) for info in nodes))
    slug = task_pb2.TaskSpec(tool=task_pb2.ToolSpec(name="slugify"))
    other = task_pb2.TaskSpec(tool=task_pb2.ToolSpec(name="resize"))
    s.queue.push(T(1, placement=requirements_of(slug)))
    s.queue.push(T(2, placement=requirements_of(other)))
    assert [(t.seq, n.node_id) for t, n in s.schedule()] == [(1, "b")]
    assert s.explain(T(2, placement=requirements_of(other))) == "no node offers tool 'resize'"


def test_a_node_with_the_model_loaded_is_preferred() -> None:
    a, b, c = (
        node_slots_of(
            node_pb2.NodeInfo(
                node_id=n, executors=["ollama"], slots=4, ollama_models=["llama3"], loaded_models=m
            )
        )
        for n, m in (("a", []), ("b", ["llama3"]), ("c", []))
    )
    s = sched(a, b, c)
    chat = task_pb2.TaskSpec(ollama=task_pb2.OllamaSpec(model="llama3"), model="llama3")
    for seq in range(1, 5):
        s.queue.push(T(seq, placement=requirements_of(chat)))
    # b until it is full, then the others: a loaded model saves its load time, not a queue.
    placed = [n.node_id for _, n in s.schedule()]
    assert placed == ["b", "b", "b", "b"]
    s.queue.push(T(5, placement=requirements_of(chat)))
    assert [n.node_id for _, n in s.schedule()] in (["a"], ["c"])


def test_models_a_node_found_on_its_ollama_server_count_as_offered() -> None:
    info = node_pb2.NodeInfo(
        node_id="b", executors=["ollama"], slots=1, models=["given"], ollama_models=["llama3"]
    )
    assert node_slots_of(info).models == {"given", "llama3"}


def test_a_joining_node_is_seen_by_cached_classes_and_a_leaving_one_forgotten() -> None:
    s = sched(node("a", 1))
    s.queue.push(T(1, placement=GPU))
    assert s.schedule() == []
    s.add_node(node("g", 1, gpu="true"))
    ((task, g),) = s.schedule()
    s.release(g, task)
    s.remove_node("g")
    waiting = T(2, placement=GPU)
    s.queue.push(waiting)
    assert s.schedule() == []
    assert s.explain(waiting) == "no node matches label gpu=true"


# -- the resource ledger -----------------------------------------------------------------------


def test_resources_are_never_oversubscribed() -> None:
    rng = random.Random(11)
    nodes = [
        node("small", 4, ("shell", "python"), cpu_milli=4000, memory_mb=8192),
        node("big", 16, ("shell", "python"), cpu_milli=32_000, memory_mb=65_536, gpus=2),
        node("gpu", 4, ("shell",), cpu_milli=8000, memory_mb=16_384, gpus=4),
    ]
    s = sched(*nodes, tenant_weights={"t0": 2.0})
    running: list[tuple[Queued, NodeSlots]] = []
    started: set[int] = set()
    tasks: list[T] = []

    def check() -> None:
        for n in nodes:
            assert 0 <= n.running <= n.slots
            assert 0 <= n.used_cpu_milli <= n.cpu_milli
            assert 0 <= n.used_memory_mb <= n.memory_mb
            assert 0 <= n.used_gpus <= n.gpus
            held = [t.placement.cls.resources for t, m in running if m is n]
            assert n.running == sum(r.slots for r in held)
            assert n.used_cpu_milli == sum(r.cpu_milli for r in held)
            assert n.used_memory_mb == sum(r.memory_mb for r in held)
            assert n.used_gpus == sum(r.gpus for r in held)

    for i in range(3000):
        resources = Resources(
            slots=rng.choice((1, 1, 1, 2, 3)),
            cpu_milli=rng.choice((0, 250, 1000, 2000, 6000)),
            memory_mb=rng.choice((0, 512, 4096, 20_000)),
            gpus=rng.choice((0, 0, 0, 1, 2, 3, 8)),  # 8 GPUs fit nowhere
        )
        t = T(
            i,
            rng.randint(1, 5),
            req(rng.choice(("shell", "python")), resources=resources),
            tenant=f"t{rng.randrange(3)}",
        )
        tasks.append(t)
        s.queue.push(t)
        if rng.random() < 0.1:
            t.queued = False
            s.queue.remove(t)
        if rng.random() < 0.3:
            batch = s.schedule()
            started.update(t.seq for t, _ in batch)
            running += batch
            check()
        for _ in range(rng.randrange(3)):
            if running:
                task, n = running.pop(rng.randrange(len(running)))
                s.release(n, task)
                check()
    while running:  # drain: everything that fits anywhere eventually runs
        task, n = running.pop(rng.randrange(len(running)))
        s.release(n, task)
        batch = s.schedule()
        started.update(t.seq for t, _ in batch)
        running += batch
        check()
    left = [t for t in tasks if t.queued and t.seq not in started]
    assert len(started) > 2000
    assert left  # what is left fits no node at all (8 GPUs, or 3 GPUs for python), and says so
    for t in left:
        assert not any(t.placement.cls.fits(n) for n in nodes)
        assert s.explain(t).startswith("needs ")
    assert len(s.queue) == len(left)


def test_zero_capacity_means_none() -> None:
    s = sched(node("a", 4))  # reports no CPUs, memory or GPUs
    s.queue.push(T(1, placement=req(resources=Resources(memory_mb=1))))
    s.queue.push(T(2))
    assert [t.seq for t, _ in s.schedule()] == [2]


def test_a_multi_slot_task_takes_its_slots() -> None:
    a = node("a", 4)
    s = sched(a)
    big = req(resources=Resources(slots=3))
    s.queue.push(T(1, placement=big))
    s.queue.push(T(2, placement=big))
    s.queue.push(T(3))
    assert [t.seq for t, _ in s.schedule()] == [1, 3]
    assert a.running == 4


def test_draining_node_takes_nothing_until_undrained() -> None:
    a = node("a", 2)
    s = sched(a)
    s.set_accepting("a", False)
    waiting = T(1)
    s.queue.push(waiting)
    assert s.schedule() == []
    assert s.explain(waiting) == "the only fitting node (a) is draining"
    s.set_accepting("a", True)
    assert [t.seq for t, _ in s.schedule()] == [1]


# -- never blocked at the head -----------------------------------------------------------------


def test_an_unplaceable_critical_task_explains_itself_and_delays_nobody() -> None:
    g = node("g", 8, gpus=4)
    s = sched(g, node("c", 8))
    holder = T(0, placement=req(resources=Resources(gpus=3)))
    s.queue.push(holder)
    s.schedule()
    stuck = T(1, 1, req(resources=Resources(gpus=4)))  # critical, waits for 4 free GPUs
    s.queue.push(stuck)
    for i in range(2, 12):
        s.queue.push(T(i, 5))  # background work of another class
    assert sorted(t.seq for t, _ in s.schedule()) == list(range(2, 12))
    assert stuck.queued
    assert s.explain(stuck) == "needs 4 GPUs; the most any fitting node has free is 1"
    s.release(g, holder)
    assert [t.seq for t, _ in s.schedule()] == [1]


def test_parked_classes_cost_nothing_per_dispatch() -> None:
    s = sched(node("a", 1))
    for i in range(100):  # 100 classes nobody can place
        s.queue.push(T(i, 1, req(labels={"k": str(i)})))
    s.queue.push(T(100, 5))
    assert [t.seq for t, _ in s.schedule()] == [100]
    assert len(s.queue._blocked) == 100
    assert all(not h for h in s.queue._heaps)  # parked lanes left the heaps


# -- routing -----------------------------------------------------------------------------------


def test_round_robin_cycles_per_class() -> None:
    s = sched(node("a", 100), node("b", 100), node("c", 100))
    rr = req(routing=Routing.ROUND_ROBIN)
    for i in range(7):
        s.queue.push(T(i, placement=rr))
    assert [n.node_id for _, n in s.schedule()] == ["a", "b", "c", "a", "b", "c", "a"]
    s.queue.push(T(7, placement=rr))
    assert [n.node_id for _, n in s.schedule()] == ["b"]  # the cursor survives the class draining


def test_round_robin_skips_full_nodes() -> None:
    s = sched(node("a", 1), node("b", 100), node("c", 100))
    for i in range(5):
        s.queue.push(T(i, placement=req(routing=Routing.ROUND_ROBIN)))
    assert [n.node_id for _, n in s.schedule()] == ["a", "b", "c", "b", "c"]


def test_weighted_follows_node_weights() -> None:
    s = sched(node("light", 10_000, weight=1.0), node("heavy", 10_000, weight=3.0))
    for i in range(4000):
        s.queue.push(T(i, placement=req(routing=Routing.WEIGHTED)))
    count = Counter(n.node_id for _, n in s.schedule())
    assert abs(count["heavy"] / count["light"] - 3.0) <= 0.3


def test_random_is_reproducible_with_an_injected_rng() -> None:
    def picks(seed: int) -> list[str]:
        s = Scheduler(rng=random.Random(seed))
        for name in ("a", "b", "c"):
            s.add_node(node(name, 1000))
        for i in range(300):
            s.queue.push(T(i, placement=req(routing=Routing.RANDOM)))
        return [n.node_id for _, n in s.schedule()]

    assert picks(5) == picks(5)
    assert picks(5) != picks(6)
    assert set(Counter(picks(5)).values()) and min(Counter(picks(5)).values()) > 70


def test_default_routing_is_configurable() -> None:
    s = sched(node("a", 100), node("b", 100), routing=Routing.ROUND_ROBIN)
    for i in range(4):
        s.queue.push(T(i))
    assert [n.node_id for _, n in s.schedule()] == ["a", "b", "a", "b"]


def test_preferred_labels_rank_before_the_strategy() -> None:
    ssd, plain = node("b-ssd", 2, disk="ssd"), node("a-plain", 2)
    s = sched(plain, ssd)
    prefer = req(preferred=(Preference("disk", "ssd", 2.0),))
    for i in range(4):
        s.queue.push(T(i, placement=prefer))
    # least loaded would alternate; the preferred node takes what it has room for first
    assert [n.node_id for _, n in s.schedule()] == ["b-ssd", "b-ssd", "a-plain", "a-plain"]


def test_preference_scores_add_up() -> None:
    s = sched(node("a", 1, zone="x"), node("b", 1, zone="x", gpu="t4"), node("c", 1, gpu="t4"))
    prefer = req(preferred=(Preference("zone", "x"), Preference("gpu", "", 0.5)))
    for i in range(3):
        s.queue.push(T(i, placement=prefer))
    assert [n.node_id for _, n in s.schedule()] == ["b", "a", "c"]


def test_soft_affinity_sticks_and_falls_back() -> None:
    a, b = node("a", 2), node("b", 8)
    s = sched(a, b)
    sticky = req(affinity="session-1")
    s.queue.push(T(1, placement=sticky))
    ((_, first),) = s.schedule()
    assert first is a  # least loaded on a tie: node id order
    s.queue.push(T(2, placement=sticky))
    assert [n.node_id for _, n in s.schedule()] == ["a"]  # though b is less loaded
    s.queue.push(T(3, placement=sticky))
    assert [n.node_id for _, n in s.schedule()] == ["b"]  # a is full: fall back
    assert s.affinity.get("session-1") == "b"  # and remember where it ran last


def test_hard_affinity_waits_for_its_node() -> None:
    a, b = node("a", 1), node("b", 4)
    s = sched(a, b)
    pinned = req(affinity="k", hard=True)
    s.queue.push(T(1, placement=pinned))
    ((t1, n1),) = s.schedule()
    assert n1 is a  # never ran: anywhere, and remembered
    waiting = T(2, placement=pinned)
    s.queue.push(waiting)
    s.queue.push(T(3))  # other work is not held up
    assert [(t.seq, n.node_id) for t, n in s.schedule()] == [(3, "b")]
    assert s.explain(waiting) == (
        "hard affinity: waiting for node a (waiting for a free slot on 1 fitting node)"
    )
    s.set_accepting("a", False)
    assert s.explain(waiting) == "hard affinity: waiting for node a (draining)"
    s.release(a, t1)
    assert s.schedule() == []
    s.set_accepting("a", True)
    assert [(t.seq, n.node_id) for t, n in s.schedule()] == [(2, "a")]


def test_hard_affinity_waits_for_a_node_that_left() -> None:
    s = sched(node("a", 1), node("b", 1))
    pinned = req(affinity="k", hard=True)
    s.queue.push(T(1, placement=pinned))
    s.schedule()
    s.remove_node("a")
    waiting = T(2, placement=pinned)
    s.queue.push(waiting)
    assert s.schedule() == []
    assert s.explain(waiting) == "hard affinity: waiting for node a (not connected)"
    s.add_node(node("a", 1))
    assert [n.node_id for _, n in s.schedule()] == ["a"]


def test_hard_affinity_follows_a_forgotten_key_anywhere() -> None:
    s = sched(node("a", 1), node("b", 1), node("c", 1), affinity_keys=1)
    s.queue.push(T(1, 1, req(affinity="k", hard=True)))
    assert [n.node_id for _, n in s.schedule()] == ["a"]  # k -> a, and a is now full
    waiting = T(2, 1, req(affinity="k", hard=True))
    s.queue.push(waiting)
    assert s.schedule() == []
    # A task of another key evicts k from the 1-key map: the critical task, no longer tied to
    # a, runs elsewhere in the same pass.
    s.queue.push(T(3, 3, req(affinity="other")))
    assert [(t.seq, n.node_id) for t, n in s.schedule()] == [(3, "b"), (2, "c")]
    assert s.affinity.get("k") == "c"


def test_affinity_map_is_a_bounded_lru() -> None:
    m = AffinityMap(2)
    assert m.remember("x", "a") == (True, None)
    assert m.remember("y", "b") == (True, None)
    assert m.remember("x", "a") == (False, None)  # x is now the most recent
    assert m.remember("z", "c") == (True, "y")
    assert (m.get("x"), m.get("y"), len(m)) == ("a", None, 2)


@pytest.mark.parametrize("name", list(Routing))
def test_router_contract(name: Routing) -> None:
    """Every strategy: one of the candidates, among the most preferred, reproducible."""
    rng = random.Random(2)
    router = ROUTERS[name](random.Random(9), AffinityMap())
    again = ROUTERS[name](random.Random(9), AffinityMap())
    state, state2 = RouteState(), RouteState()
    for _ in range(200):
        candidates = [
            node(f"n{i}", 4, weight=rng.choice((0.5, 1.0, 2.0)), tier=rng.choice("ab"))
            for i in range(rng.randint(1, 6))
        ]
        for n in candidates:
            n.running = rng.randrange(4)
        want = req(preferred=(Preference("tier", "a"),), affinity="k")
        chosen = router.choose(candidates, want, state)
        assert chosen in candidates
        assert chosen.labels["tier"] == "a" or all(n.labels["tier"] == "b" for n in candidates)
        assert again.choose(candidates, want, state2) is chosen
    assert set(ROUTERS) == set(Routing)


# -- explain -----------------------------------------------------------------------------------


def test_explain_names_the_first_unmet_constraint() -> None:
    s = sched()

    def why(r: Requirements) -> str:
        return s.explain(T(1, placement=r))

    assert why(SHELL) == "no connected node offers executor 'shell'"  # none at all
    s.add_node(node("a", 2, ("shell",), cpu_milli=2000, memory_mb=1024, gpus=1, gpu="t4"))
    s.add_node(node("b", 2, ("shell", "docker"), cpu_milli=4000, memory_mb=4096))
    assert why(req("python")) == "no connected node offers executor 'python'"
    assert why(req("docker", labels={"gpu": "t4"})) == "no node matches label gpu=t4"
    gpu_a100 = Selector("gpu", Op.IN, ("a100",))
    assert why(req(selectors=(gpu_a100,))) == "no node matches selector gpu in (a100)"
    no_gpu = Selector("gpu", Op.DOES_NOT_EXIST)
    assert why(req("docker", selectors=(no_gpu,))) == "ready: waiting for the next dispatch"
    assert why(req(resources=Resources(gpus=4))) == (
        "needs 4 GPUs; the most any matching node has in all is 1"
    )
    assert why(req(resources=Resources(memory_mb=8192))) == (
        "needs 8192 MB; the most any matching node has in all is 4096"
    )
    assert why(req(resources=Resources(cpu_milli=2500, gpus=1))) == (
        "needs 2.5 CPUs; the most any matching node has in all is 2"
    )
    s.queue.push(T(2, placement=req(resources=Resources(cpu_milli=1500))))  # on a
    s.queue.push(T(3, placement=req(resources=Resources(cpu_milli=3500))))  # on b
    assert len(s.schedule()) == 2
    assert why(req(resources=Resources(cpu_milli=1000))) == (
        "needs 1 CPU; the most any fitting node has free is 0.5"
    )
    assert why(req(resources=Resources(slots=2))) == (
        "needs 2 slots; the most any fitting node has free is 1"
    )
    s.queue.push(T(4))
    s.queue.push(T(5))
    assert len(s.schedule()) == 2
    assert why(SHELL) == "waiting for a free slot on 2 fitting nodes"


def test_explain_when_no_node_has_the_whole_request_free_at_once() -> None:
    a = node("a", 2, cpu_milli=4000, memory_mb=4000)
    b = node("b", 2, cpu_milli=4000, memory_mb=4000)
    s = sched(a, b)
    s.queue.push(T(1, placement=req(resources=Resources(cpu_milli=3500))))
    s.queue.push(T(2, placement=req(resources=Resources(memory_mb=3500))))
    assert [n.node_id for _, n in s.schedule()] == ["a", "b"]
    both = T(3, placement=req(resources=Resources(cpu_milli=1000, memory_mb=1000)))
    assert s.explain(both) == (
        "waiting for 2 fitting nodes to have all of its request free at once"
    )


def test_explain_for_a_task_no_longer_queued_is_empty() -> None:
    s = sched(node("a", 1))
    assert s.explain(T(1, queued=False)) == ""


# -- conversion at the edge --------------------------------------------------------------------


def test_requirements_of_a_spec() -> None:
    sel = task_pb2.LabelSelector
    spec = task_pb2.TaskSpec(
        shell=task_pb2.ShellSpec(argv=["true"]),
        required_labels={"zone": "eu"},
        selectors=[
            sel(key="gpu", values=["h100", "a100", "a100"]),  # unspecified operator: IN
            sel(key="spot", operator=sel.OPERATOR_DOES_NOT_EXIST, values=["ignored"]),
        ],
        preferred_labels=[task_pb2.PreferredLabel(key="disk", value="ssd")],
        resources=task_pb2.ResourceRequest(cpu=0.25, memory_mb=512, gpus=1),
        model="llama3",
        affinity_key="chat-7",
        hard_affinity=True,
    )
    r = requirements_of(spec)
    assert r.cls == PlacementClass(
        "shell",
        frozenset({("zone", "eu")}),
        (Selector("gpu", Op.IN, ("a100", "h100")), Selector("spot", Op.DOES_NOT_EXIST)),
        "llama3",
        Resources(slots=1, cpu_milli=250, memory_mb=512, gpus=1),
        "chat-7",
    )
    assert r.routing is Routing.AFFINITY
    assert r.preferred == (Preference("disk", "ssd", 1.0),)
    assert r.affinity_key == "chat-7"
    # The same constraints in another order are the same class.
    spec2 = task_pb2.TaskSpec()
    spec2.CopyFrom(spec)
    spec2.selectors.reverse()
    assert requirements_of(spec2).cls == r.cls


def test_requirements_of_defaults() -> None:
    r = requirements_of(task_pb2.TaskSpec(shell=task_pb2.ShellSpec(argv=["true"])))
    assert r == Requirements(PlacementClass("shell"))
    rr = task_pb2.TaskSpec(routing=task_pb2.ROUTING_STRATEGY_ROUND_ROBIN, affinity_key="k")
    assert requirements_of(rr).routing is Routing.ROUND_ROBIN
    assert requirements_of(rr).affinity_key == ""  # a soft key under another strategy
    assert requirements_of(task_pb2.TaskSpec(affinity_key="k")).routing is Routing.AFFINITY
    odd = task_pb2.TaskSpec(resources=task_pb2.ResourceRequest(cpu=float("nan")))
    assert requirements_of(odd).cls.resources.cpu_milli == 0
    inf = task_pb2.TaskSpec(resources=task_pb2.ResourceRequest(cpu=float("inf")))
    assert not PlacementClass("", resources=requirements_of(inf).cls.resources).fits(
        node("x", 1, ("",), cpu_milli=10**9)
    )


def test_node_slots_of_a_hello() -> None:
    info = node_pb2.NodeInfo(
        node_id="n1",
        executors=["shell", "ollama"],
        labels={"zone": "eu"},
        slots=0,
        resources=node_pb2.Resources(cpus=8, memory_mb=16_000, gpus=1),
        models=["llama3"],
    )
    n = node_slots_of(info)
    assert (n.node_id, n.slots, n.cpu_milli, n.memory_mb, n.gpus) == ("n1", 1, 8000, 16_000, 1)
    assert n.executors == {"shell", "ollama"} and n.models == {"llama3"}
    assert n.labels == {"zone": "eu"} and n.weight == 1.0
