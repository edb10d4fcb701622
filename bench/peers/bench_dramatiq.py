"""Dramatiq + Redis broker + Results middleware (Redis backend).

Usage: bench_dramatiq.py PROCESSES THREADS"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common
from dramatiq import group
from dramatiq_tasks import noop

nproc, nthr = int(sys.argv[1]), int(sys.argv[2])
name = f"dramatiq_p{nproc}_t{nthr}"
common.install_term_handler()
print(f"== {name}", flush=True)
common.redis_cli("FLUSHALL")
procs = common.Procs()
try:
    dbin = os.path.join(os.path.dirname(sys.executable), "dramatiq")
    procs.start(
        [dbin, "dramatiq_tasks", "--processes", str(nproc), "--threads", str(nthr)], f"{name}.log"
    )
    t0 = time.perf_counter()
    noop.send(-1).get_result(block=True, timeout=120_000)
    ready_s = time.perf_counter() - t0
    list(
        group(noop.message(i) for i in range(common.WARMUP))
        .run()
        .get_results(block=True, timeout=120_000)
    )

    def one_run(n):
        g = group(noop.message(i) for i in range(n)).run()
        t_sub = time.perf_counter()
        return list(g.get_results(block=True, timeout=600_000)), t_sub

    thr = common.throughput_runs(one_run)
    lat = common.latency_runs(lambda i: noop.send(i).get_result(block=True, timeout=30_000))
    common.write_result(
        name,
        {
            "system": "dramatiq",
            "config": f"processes={nproc} threads={nthr}",
            "submit": "group(noop.message(i) ...).run().get_results(block=True)",
            "latency_call": "noop.send(i).get_result(block=True)",
            "worker_ready_s": ready_s,
            "throughput": thr,
            "latency": lat,
            "versions": common.pkg_versions(["dramatiq", "redis", "hiredis"]),
            "redis_server": common.redis_version(),
        },
    )
finally:
    procs.stop_all()
