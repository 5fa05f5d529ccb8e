"""The real machine as the option builder asks it (`meshnet.config.facts.System`): user and
group lookup, interface addresses (a stdlib rtnetlink dump), bounded file reads, all in the
calling thread's network namespace."""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import socket
import stat

from meshnet.config.facts import IPAddress
from meshnet.errors import EnvironmentFactError
from meshnet.host import netlink


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
