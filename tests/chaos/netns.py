"""A network namespace joined to the root one by a veth pair, and partitions of that link.

Root only. A process started under `exec_prefix()` reaches the root namespace at `host_ip`
and nothing else; `partition()` drops every packet on the link, or only those to and from one
port of the root namespace (iptables rules inside the namespace, so they go away with it),
until `heal()`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field

from tests.integration.harness import run_tool

__all__ = ["NetworkNamespace", "netns_unavailable"]

_PREFIX = "shoal-chaos-"


def netns_unavailable() -> str:
    """Why this machine cannot run namespace scenarios ('' when it can)."""
    if os.geteuid() != 0:
        return "network namespaces and iptables need root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    try:
        subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as err:
        return f"`ip netns` is unavailable: {err}"
    return ""


@dataclass
class NetworkNamespace:
    """`shoal-chaos-<pid>`, linked to the root namespace by 10.77.<n>.1 <-> 10.77.<n>.2.

    Named by this test process's pid, so concurrent runs on one machine do not collide and a
    run that died leaves something recognisable (`create` removes a leftover of the same name).
    """

    name: str
    host_if: str
    ns_if: str
    host_ip: str
    ns_ip: str
    partitioned: bool = False
    _rules: list[list[str]] = field(default_factory=list)

    @classmethod
    def for_this_process(cls) -> NetworkNamespace:
        pid = os.getpid()
        subnet = f"10.77.{pid % 250}"
        return cls(
            name=f"{_PREFIX}{pid}",
            host_if=f"shc{pid % 10_000_000}h",  # interface names hold 15 characters
            ns_if=f"shc{pid % 10_000_000}n",
            host_ip=f"{subnet}.1",
            ns_ip=f"{subnet}.2",
        )

    @classmethod
    def numbered(cls, index: int) -> NetworkNamespace:
        """The `index`-th (0-9) of several namespaces of this process, each on its own subnet
        (10.90+index.<pid>), apart from `for_this_process`'s and tests/integration/lan.py's."""
        if not 0 <= index <= 9:
            raise ValueError(f"namespace index {index} is not 0-9")
        pid = os.getpid()
        tag = f"shc{pid % 1_000_000}x{index}"  # interface names hold 15 characters
        subnet = f"10.{90 + index}.{pid % 250}"
        return cls(
            name=f"{_PREFIX}{pid}-{index}",
            host_if=f"{tag}h",
            ns_if=f"{tag}n",
            host_ip=f"{subnet}.1",
            ns_ip=f"{subnet}.2",
        )

    def exec_prefix(self) -> list[str]:
        """Prepend to an argv to run it inside the namespace (same process: it execs)."""
        return ["ip", "netns", "exec", self.name]

    async def create(self) -> None:
        await self.delete()  # a leftover of a run that died under the same pid
        try:
            await _ip("netns", "add", self.name)
            await _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            await _ip("link", "set", self.ns_if, "netns", self.name)
            await _ip("addr", "add", f"{self.host_ip}/24", "dev", self.host_if)
            await _ip("link", "set", self.host_if, "up")
            await self._in_ns("ip", "addr", "add", f"{self.ns_ip}/24", "dev", self.ns_if)
            await self._in_ns("ip", "link", "set", self.ns_if, "up")
            await self._in_ns("ip", "link", "set", "lo", "up")
        except BaseException:
            await self.delete()
            raise

    async def delete(self) -> None:
        """Remove the link and the namespace (its iptables rules go with it); idempotent.

        The host end is deleted explicitly: the kernel drops a namespace's devices only once
        its last user is gone, which may be after this returns.
        """
        await _ip("link", "del", self.host_if, check=False)
        await _ip("netns", "del", self.name, check=False)
        self._rules.clear()
        self.partitioned = False

    async def partition(self, port: int | None = None) -> None:
        """Drop every packet in and out of the namespace's end of the link; with `port`, only
        TCP to and from that port on the root namespace's side (a server there is cut off,
        while the namespace still reaches and serves everything else)."""
        if self.partitioned:
            raise RuntimeError(f"{self.name} is already partitioned")
        rules = [["INPUT", "-i", self.ns_if], ["OUTPUT", "-o", self.ns_if]]
        if port is not None:
            rules[0] += ["-p", "tcp", "--sport", str(port)]
            rules[1] += ["-p", "tcp", "--dport", str(port)]
        for rule in rules:
            await self._in_ns("iptables", "-w", "-A", *rule, "-j", "DROP")
            self._rules.append(rule)
        self.partitioned = True

    async def heal(self) -> None:
        while self._rules:
            await self._in_ns("iptables", "-w", "-D", *self._rules.pop(), "-j", "DROP")
        self.partitioned = False

    async def _in_ns(self, *argv: str) -> None:
        await _checked([*self.exec_prefix(), *argv])


async def _ip(*args: str, check: bool = True) -> None:
    await _checked(["ip", *args], check=check)


async def _checked(argv: list[str], *, check: bool = True) -> None:
    """Run a command; with `check`, fail unless it exits 0."""
    done = await run_tool(argv, timeout=20.0)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr}")
