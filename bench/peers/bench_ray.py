"""Ray local cluster (ray.init(num_cpus=2)); cluster start-up is timed separately and excluded."""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common
import ray

name = "ray_default"
common.install_term_handler()
print(f"== {name}", flush=True)
me = os.getpid()
started = False
try:
    t0 = time.perf_counter()
    ray.init(num_cpus=2, log_to_driver=False)
    started = True
    init_s = time.perf_counter() - t0

    @ray.remote
    def noop(x):
        return x

    t0 = time.perf_counter()
    ray.get(noop.remote(-1), timeout=120)
    ready_s = time.perf_counter() - t0
    ray.get([noop.remote(i) for i in range(common.WARMUP)], timeout=120)

    def one_run(n):
        refs = [noop.remote(i) for i in range(n)]
        t_sub = time.perf_counter()
        return ray.get(refs, timeout=600), t_sub

    thr = common.throughput_runs(one_run)
    lat = common.latency_runs(lambda i: ray.get(noop.remote(i), timeout=30))
    common.write_result(
        name,
        {
            "system": "ray",
            "config": "ray.init(num_cpus=2), @ray.remote defaults (num_cpus=1 per task)",
            "submit": "[noop.remote(i) ...] then ray.get(list)",
            "latency_call": "ray.get(noop.remote(i))",
            "cluster_init_s": init_s,
            "worker_ready_s": ready_s,
            "throughput": thr,
            "latency": lat,
            "versions": common.pkg_versions(["ray"]),
            "redis_server": None,
        },
    )
finally:
    tree = common.descendants(me)
    if started:
        ray.shutdown()
    time.sleep(1)
    import signal

    for pid, start in tree:
        if common.kill_exact(pid, start, signal.SIGKILL):
            print(f"  leftover ray process pid {pid} killed", flush=True)
