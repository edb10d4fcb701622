"""Stdlib-only helpers shared by every bench_*.py (each runs in its own venv)."""

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# Logs and results go to a writable folder (this one may be read-only).
OUT = os.environ.get("PEERS_OUT", "/tmp/peers/out")
os.makedirs(os.path.join(OUT, "logs"), exist_ok=True)
os.makedirs(os.path.join(OUT, "raw"), exist_ok=True)
PORT = int(os.environ.get("PEERS_REDIS_PORT", "6390"))
N_TASKS = int(os.environ.get("PEERS_N", "20000"))
RUNS = int(os.environ.get("PEERS_RUNS", "3"))
N_LAT = int(os.environ.get("PEERS_LAT_N", "2000"))
WARMUP = int(os.environ.get("PEERS_WARMUP", "200"))
EXPECTED_SUM = N_TASKS * (N_TASKS - 1) // 2


def redis_cli(*args):
    return subprocess.run(
        ["redis-cli", "-p", str(PORT), *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.strip()


def redis_version():
    info = redis_cli("INFO", "server")
    for line in info.splitlines():
        if line.startswith("redis_version:"):
            return line.split(":", 1)[1].strip()
    return "?"


def _stat_start(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
        rest = data[data.rindex(")") + 2 :].split()
        return int(rest[1]), rest[19]  # ppid, starttime
    except (OSError, ValueError, IndexError):
        return None


def descendants(root):
    """(pid, starttime) of every live descendant of root, from /proc."""
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat_start(int(name))
            if st:
                children.setdefault(st[0], []).append((int(name), st[1]))
    out, todo = [], [root]
    while todo:
        for pid, start in children.get(todo.pop(), []):
            out.append((pid, start))
            todo.append(pid)
    return out


def kill_exact(pid, start, sig):
    """Signal pid only if it is still the same process (same start time)."""
    st = _stat_start(pid)
    if st and st[1] == start:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        return True
    return False


class Procs:
    """Processes this bench started; stopped by pid (TERM, then KILL) in stop_all()."""

    def __init__(self):
        self.procs = []

    def start(self, cmd, log_name, env=None):
        log = open(os.path.join(OUT, "logs", log_name), "w")  # noqa: SIM115  (the child's)
        e = dict(os.environ)
        e["PYTHONPATH"] = HERE + os.pathsep + e.get("PYTHONPATH", "")
        if env:
            e.update(env)
        p = subprocess.Popen(
            cmd, cwd=HERE, env=e, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs.append(p)
        print(f"  started pid {p.pid}: {' '.join(cmd)}", flush=True)
        return p

    def stop_all(self, grace=20):
        for p in self.procs:
            if p.poll() is not None:
                continue
            tree = descendants(p.pid)
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                print(f"  pid {p.pid} ignored TERM; KILL", flush=True)
                p.kill()
                p.wait(10)
            time.sleep(0.5)
            for pid, start in tree:
                if kill_exact(pid, start, signal.SIGKILL):
                    print(f"  leftover child pid {pid} killed", flush=True)
        self.procs = []


def install_term_handler():
    def _h(signum, frame):
        raise SystemExit(f"signal {signum}")

    signal.signal(signal.SIGTERM, _h)


def pct(values, p):
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    f = int(k)
    c = min(f + 1, len(s) - 1)
    return s[f] + (s[c] - s[f]) * (k - f)


def throughput_runs(one_run, runs=RUNS, n=N_TASKS):
    """one_run(n) -> (list of results, perf_counter() when the last submit returned).
    Wall time runs from just before the first submit to the moment all results are in hand."""
    rates, walls, submits = [], [], []
    for r in range(runs):
        t0 = time.perf_counter()
        vals, t_sub = one_run(n)
        wall = time.perf_counter() - t0
        submits.append(t_sub - t0)
        total = sum(vals)
        if len(vals) != n or total != n * (n - 1) // 2:
            raise RuntimeError(f"bad results: count={len(vals)} sum={total}")
        rates.append(n / wall)
        walls.append(wall)
        print(
            f"  throughput run {r + 1}: {n} tasks in {wall:.2f}s = {n / wall:.0f} tasks/s "
            f"(submit phase {t_sub - t0:.2f}s; sum ok)",
            flush=True,
        )
    return {
        "n": n,
        "runs": runs,
        "wall_s": walls,
        "submit_phase_s": submits,
        "tasks_per_s": rates,
        "median": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
    }


def latency_runs(one_trip, n=N_LAT):
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        v = one_trip(i)
        lat.append((time.perf_counter() - t0) * 1000)
        if v != i:
            raise RuntimeError(f"bad latency result {v} != {i}")
    out = {
        "n": n,
        "p50_ms": pct(lat, 50),
        "p99_ms": pct(lat, 99),
        "mean_ms": statistics.mean(lat),
        "min_ms": min(lat),
        "max_ms": max(lat),
    }
    print(
        f"  latency: p50 {out['p50_ms']:.2f} ms  p99 {out['p99_ms']:.2f} ms  "
        f"max {out['max_ms']:.1f} ms",
        flush=True,
    )
    return out


def pkg_versions(names):
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in names:
        with contextlib.suppress(PackageNotFoundError):
            out[n] = version(n)
    return out


def write_result(name, obj):
    obj.setdefault("python", sys.version.split()[0])
    obj.setdefault("name", name)
    path = os.path.join(OUT, "raw", f"{name}.json")
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
    print(f"  wrote {path}", flush=True)
