"""Facts read from the running system: user and group lookup, interface addresses, resolv.conf.

Everything that Istio derives at run time (FillConfigFromEnvironment) is read here and nowhere
else, so the option builder and the planner stay pure and tests can inject a fake `System`.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import socket
import stat
from dataclasses import dataclass
from typing import Protocol

from meshnet import netlink
from meshnet.errors import EnvironmentFactError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class System(Protocol):
    """What the option builder may ask of the machine."""

    def user_id(self, name: str) -> int | None: ...

    def group_exists(self, name: str) -> bool: ...

    def interface_addresses(self) -> list[IPAddress]: ...

    def read_text(self, path: str) -> str: ...


class HostSystem:
    """The real machine (in the current network namespace)."""

    def user_id(self, name: str) -> int | None:
        try:
            return pwd.getpwnam(name).pw_uid
        except KeyError:
            return None

    def group_exists(self, name: str) -> bool:
        try:
            grp.getgrnam(name)
        except KeyError:
            return False
        return True

    def interface_addresses(self) -> list[IPAddress]:
        return netlink_addresses()

    def read_text(self, path: str) -> str:
        return read_bounded(path)


MAX_READ = 64 * 1024  # a resolv.conf is a few hundred bytes; glibc reads far less than this


def read_bounded(path: str, limit: int = MAX_READ) -> str:
    """A small regular file's text. A device (/dev/zero), FIFO or directory, or a file over
    `limit` bytes, is refused by name; the error never quotes what the file holds."""
    shown = repr(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError) as err:
        reason = err.strerror if isinstance(err, OSError) else str(err)
        raise EnvironmentFactError(f"failed to load {shown}: {reason}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise EnvironmentFactError(f"failed to load {shown}: not a regular file")
        data = os.read(fd, limit + 1)
    except OSError as err:
        raise EnvironmentFactError(f"failed to load {shown}: {err.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise EnvironmentFactError(f"failed to load {shown}: larger than {limit} bytes")
    return data.decode("utf-8", errors="replace")


@dataclass(frozen=True, slots=True)
class IpDetection:
    host_ip: IPAddress
    ipv6: bool


def detect_ip(addresses: list[IPAddress], dual_stack: bool) -> IpDetection:
    """Istio's getLocalIP: the first usable address decides, or with dual stack any IPv6 one."""
    usable = [addr for addr in (_unmap(a) for a in addresses) if _usable(addr)]
    if not usable:
        raise EnvironmentFactError(
            "no valid local IP address found (pass --enable-ipv6 true|false to skip detection)"
        )
    if not dual_stack:
        return IpDetection(usable[0], usable[0].version == 6)
    first_v6 = next((addr for addr in usable if addr.version == 6), None)
    return IpDetection(usable[0], first_v6 is not None)


def parse_resolv_conf(text: str) -> list[IPAddress]:
    """`nameserver` entries in canonical form; unparseable entries are dropped, as Istio does."""
    servers: list[IPAddress] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                servers.append(_unmap(ipaddress.ip_address(fields[1])))
            except ValueError:
                continue
    return servers


def _unmap(addr: IPAddress) -> IPAddress:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _usable(addr: IPAddress) -> bool:
    return not (addr.is_loopback or addr.is_link_local or _is_link_local_multicast(addr))


def _is_link_local_multicast(addr: IPAddress) -> bool:
    if addr.version == 4:
        return addr in ipaddress.ip_network("224.0.0.0/24")
    return addr in ipaddress.ip_network("ff02::/16")


# --- addresses from a stdlib rtnetlink dump (pyroute2 costs ~300 ms to import) -------------

_RTM_GETADDR = 22
_IFADDRMSG_LEN = 8
_IFA_ADDRESS = 1
_IFA_LOCAL = 2


def netlink_addresses() -> list[IPAddress]:
    """All interface addresses in kernel order (IPv4 first), like Go's net.InterfaceAddrs."""
    try:
        messages = list(netlink.dump(_RTM_GETADDR, socket.AF_UNSPEC, _IFADDRMSG_LEN))
    except netlink.NetlinkError:
        raise EnvironmentFactError("netlink address dump failed") from None
    return [address for payload in messages if (address := _address_of(payload)) is not None]


def _address_of(payload: bytes) -> IPAddress | None:
    family = payload[0]
    attrs = netlink.attributes(payload, _IFADDRMSG_LEN)
    # Go prefers IFA_LOCAL for IPv4 (it differs from IFA_ADDRESS on point-to-point links).
    raw = attrs.get(_IFA_LOCAL) if family == socket.AF_INET else None
    raw = raw or attrs.get(_IFA_ADDRESS)
    if raw is None or family not in (socket.AF_INET, socket.AF_INET6):
        return None
    return ipaddress.ip_address(raw)
