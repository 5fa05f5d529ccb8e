"""A minimal rtnetlink dump with the standard library, in the calling thread's namespace.

For the questions asked on every run (the interface addresses of IPv6 detection, whether any
fwmark policy rule exists before a CNI DEL), where pyroute2's ~300 ms import would be most of
the run. Everything that changes routing goes through pyroute2 (`meshnet.apply.routes`).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

HEADER_LEN = 16  # struct nlmsghdr
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_REQUEST_DUMP = 0x1 | 0x300  # NLM_F_REQUEST | NLM_F_DUMP
_NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER


class NetlinkError(OSError):
    """The kernel answered the dump with an error (e.g. IPv6 disabled in this namespace)."""


def dump(msg_type: int, family: int, header_len: int) -> Iterator[bytes]:
    """The payload of every message a `RTM_GET*` dump answers; `header_len` is the size of the
    request's family header (struct ifaddrmsg 8, struct fib_rule_hdr 12). OSError when no
    netlink socket can be opened, NetlinkError when the kernel refuses the dump."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        body = bytes([family]) + bytes(header_len - 1)
        header = struct.pack("=LHHLL", HEADER_LEN + len(body), msg_type, _REQUEST_DUMP, 1, 0)
        sock.sendto(header + body, (0, 0))
        while True:
            data = sock.recv(1 << 16)
            offset = 0
            while offset + HEADER_LEN <= len(data):
                length, kind = struct.unpack_from("=LH", data, offset)
                if kind == _NLMSG_DONE:
                    return
                if kind == _NLMSG_ERROR or length < HEADER_LEN:
                    raise NetlinkError(f"netlink dump of message type {msg_type} failed")
                yield data[offset + HEADER_LEN : offset + length]
                offset += (length + 3) & ~3


def attributes(payload: bytes, offset: int) -> dict[int, bytes]:
    """The netlink attributes of a message payload from `offset` (past its family header)."""
    found: dict[int, bytes] = {}
    while offset + 4 <= len(payload):
        length, kind = struct.unpack_from("=HH", payload, offset)
        if length < 4:
            break
        found[kind & _NLA_TYPE_MASK] = payload[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return found
