"""The network attacker's view of a group of processes: every socket they listen on (Linux /proc).

A TCP socket in LISTEN state, or a UDP socket bound but not connected, is reachable by anyone who can
route to its address; one bound to 127.0.0.0/8 or ::1 is reachable only from this machine. The
sockets are matched to processes through /proc/<pid>/fd (socket:[inode]), so only the processes
asked about count, whatever else runs on the machine. No psutil: it is not a dependency.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

_TCP_LISTEN = "0A"
_UDP_UNCONNECTED = "07"


@dataclass(frozen=True)
class Listener:
    pid: int
    command: str = field(compare=False)  # a Ray worker renames itself as it works: the same socket
    protocol: str  # tcp, tcp6, udp, udp6
    host: str
    port: int

    @property
    def loopback(self) -> bool:
        address = ipaddress.ip_address(self.host)
        mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is loopback too
        return (mapped or address).is_loopback

    def __str__(self) -> str:
        return f"{self.protocol} {self.host}:{self.port} (pid {self.pid}: {self.command[:120]})"


def _decode_address(hex_address: str) -> tuple[str, int]:
    host_hex, port_hex = hex_address.split(":")
    raw = bytes.fromhex(host_hex)
    # The kernel prints each 32-bit word of the address in host byte order (little-endian here).
    host = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(host)), int(port_hex, 16)


def _open_sockets() -> dict[str, tuple[str, str, int]]:
    """inode -> (protocol, host, port) of every listening socket on the machine."""
    found: dict[str, tuple[str, str, int]] = {}
    for protocol, state in (("tcp", _TCP_LISTEN), ("tcp6", _TCP_LISTEN), ("udp", _UDP_UNCONNECTED), ("udp6", _UDP_UNCONNECTED)):
        try:
            lines = Path(f"/proc/net/{protocol}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != state:
                continue
            host, port = _decode_address(fields[1])
            found[fields[9]] = (protocol, host, port)
    return found


def _socket_inodes(pid: int) -> set[str]:
    inodes: set[str] = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    except OSError:  # gone, or not ours
        pass
    return inodes


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def _parent(pid: int) -> int:
    stat = _read(f"/proc/{pid}/stat").decode(errors="replace")
    try:
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (IndexError, ValueError):
        return 0


def processes(*, roots: Iterable[int] = (), environ_contains: str | None = None) -> set[int]:
    """The live processes that are ``roots`` or whose environment contains ``environ_contains``, with all
    their descendants. The environment catches detached children that were re-parented to init."""
    pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    chosen = set(roots)
    if environ_contains:
        needle = environ_contains.encode()
        chosen |= {pid for pid in pids if needle in _read(f"/proc/{pid}/environ")}
    parents = {pid: _parent(pid) for pid in pids}
    grew = True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in chosen and pid not in chosen}
        chosen |= children
        grew = bool(children)
    return {pid for pid in chosen if pid in parents}


def listeners(pids: Iterable[int]) -> list[Listener]:
    """Every socket the processes ``pids`` listen on."""
    sockets = _open_sockets()
    found = []
    for pid in pids:
        command = _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ").decode(errors="replace").strip()
        for inode in _socket_inodes(pid):
            if inode in sockets:
                protocol, host, port = sockets[inode]
                found.append(Listener(pid, command, protocol, host, port))
    return sorted(set(found), key=lambda item: (item.pid, item.port))


def watch(pids: Callable[[], set[int]], until: Callable[[], bool], interval: float = 0.2) -> tuple[set[int], list[Listener]]:
    """Poll the listeners of ``pids()`` until ``until()``; every process and every listener seen."""
    import time

    seen_pids: set[int] = set()
    seen: set[Listener] = set()
    while not until():
        current = pids()
        seen_pids |= current
        seen.update(listeners(current))
        time.sleep(interval)
    return seen_pids, sorted(seen, key=lambda item: (item.pid, item.port))
