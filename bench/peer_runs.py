"""Ray and Dramatiq on this machine, for bench/functions.py --peers: the scripts of
bench/peers/ run in each peer's own virtualenv (Dramatiq with a Redis of its own on
loopback), with the same workloads as Shoal's functions: `n` calls of a trivial function
submitted in bulk and every result collected, then sequential round trips.

The virtualenvs are not made here: `python3 -m venv /tmp/peers/ray && /tmp/peers/ray/bin/pip
install ray`, and the same for `dramatiq[redis]` in /tmp/peers/dramatiq, with Debian's
redis-server installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from _common import Figure, figure

__all__ = ["PEERS", "peer_figures", "run_peers"]

PEERS = Path(__file__).resolve().parent / "peers"
VENVS = Path(os.environ.get("PEERS_VENVS", "/tmp/peers"))
_RUNS = {
    "dramatiq": ["bench_dramatiq.py", "2", "8"],  # 2 processes of 8 threads: 2 cores
    "ray": ["bench_ray.py"],
}


def _run(argv: list[str], env: dict[str, str], timeout: float) -> str:
    """Run one peer's script; what it printed (its last lines when it failed)."""
    done = subprocess.run(
        argv,
        cwd=PEERS,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-5:])
        raise RuntimeError(f"{argv[1]} exited {done.returncode}: {tail}")
    return done.stdout


def _redis(action: str, env: dict[str, str]) -> None:
    """Start or stop the Redis of bench/peers/redis_ctl.sh (by its pid file)."""
    subprocess.run(
        ["bash", "redis_ctl.sh", action],
        cwd=PEERS,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,  # the server it starts keeps what it is given open
        stderr=subprocess.DEVNULL,
        timeout=30,
        check=True,
    )


def run_peers(n: int, trips: int, timeout: float) -> list[dict[str, Any]]:
    """Each peer's figures: {"system", "calls_per_s", "p50_ms", "p99_ms"} or {"system",
    "error"} when it could not run here."""
    out: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="shoal-bench-peers-") as results:
        env = {
            **os.environ,
            "PEERS_OUT": results,
            "PEERS_N": str(n),
            "PEERS_RUNS": "1",
            "PEERS_LAT_N": str(trips),
            "PEERS_WARMUP": "50",
            "PEERS_STATE": results,  # a Redis of this run's own, on a port of its own
            "PEERS_REDIS_PORT": os.environ.get("PEERS_REDIS_PORT", "6391"),
        }
        for system, script in _RUNS.items():
            python = VENVS / system / "bin" / "python"
            if not python.exists():
                out.append({"system": system, "error": f"no {python}"})
                continue
            redis = system == "dramatiq"
            try:
                if redis:
                    _redis("start", env)
                _run([str(python), *script], env, timeout)
            except (RuntimeError, OSError, subprocess.SubprocessError) as err:
                out.append({"system": system, "error": str(err)})
                continue
            finally:
                if redis:
                    _redis("stop", env)
            for raw in sorted(Path(results, "raw").glob("*.json")):
                data = json.loads(raw.read_text())
                if data.get("system") != system:
                    continue
                out.append(
                    {
                        "system": f"{system} ({data['config']})" if redis else system,
                        "calls_per_s": data["throughput"]["median"],
                        "p50_ms": data["latency"]["p50_ms"],
                        "p99_ms": data["latency"]["p99_ms"],
                        "versions": data.get("versions", {}),
                    }
                )
    return out


def peer_figures(peers: list[dict[str, Any]]) -> list[Figure]:
    """What `run_peers` gave, as figures: calls per second and round trips of each peer."""
    out = []
    for peer in peers:
        name = peer["system"]
        if "error" in peer:
            out.append(figure(f"{name} calls per second", None, "calls/s", note=peer["error"]))
            continue
        out += [
            figure(f"{name} calls per second", peer["calls_per_s"], "calls/s"),
            figure(f"{name} round trip p50", peer["p50_ms"], "ms"),
            figure(f"{name} round trip p99", peer["p99_ms"], "ms"),
        ]
    return out
