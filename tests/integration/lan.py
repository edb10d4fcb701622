"""A LAN of "hosts" made of network namespaces on one bridge, for mDNS tests (root only).

The bridge lives in a namespace of its own (so the machine's firewall never sees its
traffic); each host is a namespace linked to it by a veth pair, with a route that sends
multicast out of that link. The test process (root namespace) joins too, as the observer at
`observer_ip`: it reaches every host, and an mDNS responder bound to that address sees what
the hosts announce. Named after this test process's pid, so concurrent runs do not collide
and a run that died leaves something recognisable (`create` removes a leftover).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

from tests.integration.harness import run_tool

__all__ = ["Host", "Lan", "lan_unavailable"]


def lan_unavailable() -> str:
    """Why this machine cannot build a LAN of namespaces ('' when it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    return ""


@dataclass(frozen=True)
class Host:
    """A namespace on the LAN: `ip` on its interface `ifname`."""

    name: str
    ifname: str
    ip: str

    def exec_prefix(self) -> list[str]:
        """Prepend to an argv to run it inside this host."""
        return ["ip", "netns", "exec", self.name]


@dataclass
class Lan:
    """`shlan<pid>-<host>` namespaces on the bridge of `shlan<pid>`, in 10.78.<n>.0/24."""

    tag: str
    subnet: str
    hosts: dict[str, Host] = field(default_factory=dict)

    @classmethod
    def for_this_process(cls) -> Lan:
        pid = os.getpid()
        return cls(tag=f"shl{pid % 10_000_000}", subnet=f"10.78.{pid % 250}")

    @property
    def bridge_ns(self) -> str:
        return f"{self.tag}-lan"

    @property
    def observer_ip(self) -> str:
        return f"{self.subnet}.254"

    @property
    def _observer_if(self) -> str:
        return f"{self.tag}o"  # interface names hold 15 characters

    async def create(self, names: list[str]) -> None:
        """The bridge, one host per name (10.78.<n>.1, .2, …) and the observer's link."""
        await self.delete(names)  # a leftover of a run that died under the same pid
        try:
            await _run("ip", "netns", "add", self.bridge_ns)
            await _run("ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
            await _run("ip", "-n", self.bridge_ns, "link", "set", "br0", "up")
            for index, name in enumerate(names, start=1):
                host = Host(f"{self.tag}-{name}", f"{self.tag}{name}", f"{self.subnet}.{index}")
                self.hosts[name] = host
                await _run("ip", "netns", "add", host.name)
                await _run("ip", "-n", host.name, "link", "set", "lo", "up")
                await self._link(host.name, host.ifname, host.ip)
                await _run("ip", "-n", host.name, "route", "add", "224.0.0.0/4", "dev", host.ifname)
            await self._link("", self._observer_if, self.observer_ip)
        except BaseException:
            await self.delete(names)
            raise

    async def _link(self, namespace: str, ifname: str, ip: str) -> None:
        """A veth pair: `ifname` with `ip` in `namespace` (root when ''), its peer on br0."""
        peer = f"{ifname}b"
        await _run("ip", "link", "add", ifname, "type", "veth", "peer", "name", peer)
        await _run("ip", "link", "set", peer, "netns", self.bridge_ns)
        await _run("ip", "-n", self.bridge_ns, "link", "set", peer, "master", "br0", "up")
        if namespace:
            await _run("ip", "link", "set", ifname, "netns", namespace)
        prefix = ["ip", "-n", namespace] if namespace else ["ip"]
        await _run(*prefix, "addr", "add", f"{ip}/24", "dev", ifname)
        await _run(*prefix, "link", "set", ifname, "up")

    async def delete(self, names: list[str] | None = None) -> None:
        """Remove every link and namespace; idempotent, and never raises for what is gone.

        Links are deleted explicitly: the kernel drops a namespace's devices only once its
        last process is gone, which may be after this returns.
        """
        names = names if names is not None else list(self.hosts)
        await _run("ip", "link", "del", self._observer_if, check=False)
        for name in names:
            host = f"{self.tag}-{name}"
            await _run("ip", "-n", host, "link", "del", f"{self.tag}{name}", check=False)
            await _run("ip", "netns", "del", host, check=False)
        await _run("ip", "netns", "del", self.bridge_ns, check=False)
        self.hosts.clear()


async def _run(*argv: str, check: bool = True) -> None:
    done = await run_tool(argv, timeout=20.0)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr}")
