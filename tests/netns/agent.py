#!/usr/bin/env python3
"""Traffic agent run inside a network namespace by the netns test harness.

Stdlib only, no meshnet imports: it is executed as a plain script via
``ip netns exec NS python agent.py ...`` so it must not depend on the package under test.

serve   listen on TCP/UDP ports (IPv4 and IPv6, separate sockets) and answer every
        connection or datagram with one JSON line describing where it landed.
probe   drop privileges, connect (or send a datagram), print what the server said.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ipaddress
import json
import os
import selectors
import signal
import socket
import struct
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

# Linux constants; several are missing from the socket module on 3.11.
SO_ORIGINAL_DST = 80  # SOL_IP; IP6T_SO_ORIGINAL_DST under SOL_IPV6 has the same value
SOL_IPV6 = 41
IP_PKTINFO = 8
IP_TRANSPARENT = 19
IP_RECVORIGDSTADDR = 20  # cmsg type IP_ORIGDSTADDR has the same value
IPV6_RECVPKTINFO = 49
IPV6_PKTINFO = 50
IPV6_RECVORIGDSTADDR = 74  # cmsg type IPV6_ORIGDSTADDR has the same value
IPV6_TRANSPARENT = 75

SOCKADDR_IN_LEN = 16
SOCKADDR_IN6_LEN = 28
MAX_REPLY = 64 * 1024
CMSG_SPACE = 256


# --------------------------------------------------------------------------- addresses


def fmt_addr(ip: str, port: int) -> str:
    """``ip:port`` for IPv4, ``[ip]:port`` for IPv6 (so the port split is unambiguous)."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def parse_sockaddr(raw: bytes) -> str:
    """Decode a struct sockaddr_in / sockaddr_in6 as returned by getsockopt or a cmsg."""
    family = struct.unpack_from("=H", raw)[0]  # sa_family is host byte order
    port = struct.unpack_from("!H", raw, 2)[0]  # sin_port / sin6_port are network order
    if family == socket.AF_INET:
        return fmt_addr(socket.inet_ntop(socket.AF_INET, raw[4:8]), port)
    if family == socket.AF_INET6:
        return fmt_addr(socket.inet_ntop(socket.AF_INET6, raw[8:24]), port)
    raise ValueError(f"unknown address family {family}")


def sockname(sock: socket.socket) -> str:
    return fmt_addr(*sock.getsockname()[:2])


def original_dst(conn: socket.socket) -> tuple[str, str]:
    """(address, how it was found): SO_ORIGINAL_DST, else the local address.

    SO_ORIGINAL_DST is conntrack's pre-NAT destination. It fails (ENOENT) when the
    connection has no conntrack entry (e.g. no nat table in the namespace); for TPROXY
    the local address already *is* the original destination. IPv6 needs the separate
    IP6T_SO_ORIGINAL_DST at SOL_IPV6: SOL_IP on an AF_INET6 socket does not work.
    """
    try:
        if conn.family == socket.AF_INET6:
            raw = conn.getsockopt(SOL_IPV6, SO_ORIGINAL_DST, SOCKADDR_IN6_LEN)
        else:
            raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, SOCKADDR_IN_LEN)
        return parse_sockaddr(raw), "so_original_dst"
    except (OSError, ValueError):
        return sockname(conn), "sockname"


# --------------------------------------------------------------------------- privileges


def drop_privileges(uid: int | None, gid: int | None, keep_saved_root: bool = False) -> None:
    """Become gid/uid. Groups first: after setuid we could no longer change them.

    keep_saved_root leaves the saved uid at 0 so ``seteuid(0)`` can briefly regain
    CAP_NET_ADMIN (needed for IP_TRANSPARENT) while sockets stay owned by ``uid``.
    """
    if gid is not None:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
    if uid is not None:
        os.setresuid(uid, uid, 0 if keep_saved_root else uid)


@contextlib.contextmanager
def as_root(active: bool) -> Iterator[None]:
    """Temporarily regain euid 0 (see drop_privileges(keep_saved_root=True))."""
    if not active:
        yield
        return
    euid = os.geteuid()
    os.seteuid(0)
    try:
        yield
    finally:
        os.seteuid(euid)


# --------------------------------------------------------------------------- serve


@dataclass(frozen=True)
class Bind:
    proto: str  # "tcp" | "udp"
    family: socket.AddressFamily
    port: int
    transparent: bool


def make_socket(bind: Bind, regain_root: bool) -> socket.socket:
    kind = socket.SOCK_STREAM if bind.proto == "tcp" else socket.SOCK_DGRAM
    # Created with the current (possibly dropped) fsuid/fsgid: that is what the
    # iptables owner match sees for packets this socket sends.
    sock = socket.socket(bind.family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        v6 = bind.family == socket.AF_INET6
        if v6:
            # Separate v4 and v6 sockets, so never accept v4-mapped traffic here.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        with as_root(regain_root):
            if bind.transparent:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                if v6:
                    sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
            sock.bind(("::" if v6 else "0.0.0.0", bind.port))
        if bind.proto == "udp":
            enable_udp_cmsgs(sock, v6)
        else:
            sock.listen(512)
        sock.setblocking(False)
        return sock
    except BaseException:
        sock.close()
        raise


def enable_udp_cmsgs(sock: socket.socket, v6: bool) -> None:
    if v6:
        sock.setsockopt(SOL_IPV6, IPV6_RECVORIGDSTADDR, 1)
        sock.setsockopt(SOL_IPV6, IPV6_RECVPKTINFO, 1)
    else:
        sock.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
        sock.setsockopt(socket.SOL_IP, IP_PKTINFO, 1)


class Server:
    def __init__(self, label: str, socks: list[tuple[Bind, socket.socket]]) -> None:
        self.label = label
        self.selector = selectors.DefaultSelector()
        for bind, sock in socks:
            self.selector.register(sock, selectors.EVENT_READ, bind)

    def report(self, port: int, orig_dst: tuple[str, str], peer: str, local: str) -> bytes:
        record = {"label": self.label, "port": port, "orig_dst": orig_dst[0]}
        record |= {"orig_dst_via": orig_dst[1], "peer": peer, "local": local}
        return json.dumps(record).encode() + b"\n"

    def run(self) -> None:
        while True:
            for key, _ in self.selector.select():
                bind: Bind = key.data
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                if bind.proto == "tcp":
                    self.accept_all(sock, bind)
                else:
                    self.answer_datagrams(sock, bind)

    def accept_all(self, listener: socket.socket, bind: Bind) -> None:
        # Drain the backlog; each reply is a few hundred bytes so it always fits the
        # fresh socket's send buffer and handling inline cannot stall the loop.
        while True:
            try:
                conn, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                print(f"accept on {bind.port}: {exc}", file=sys.stderr, flush=True)
                return
            with conn:
                conn.settimeout(1.0)
                line = self.report(
                    bind.port, original_dst(conn), fmt_addr(*peer[:2]), sockname(conn)
                )
                with contextlib.suppress(OSError):
                    conn.sendall(line)
                    conn.shutdown(socket.SHUT_WR)

    def answer_datagrams(self, sock: socket.socket, bind: Bind) -> None:
        while True:
            try:
                _, ancdata, _, peer = sock.recvmsg(MAX_REPLY, CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. a queued ICMP error; select() will call again
                print(f"recv on {bind.port}: {exc}", file=sys.stderr, flush=True)
                return
            dst = udp_destination(ancdata)
            local = dst[0] if dst else sockname(sock)
            line = self.report(bind.port, dst or (local, "sockname"), fmt_addr(*peer[:2]), local)
            send_reply(sock, line, peer, ancdata)


def udp_destination(ancdata: Sequence[tuple[int, int, bytes]]) -> tuple[str, str] | None:
    """The datagram's destination from IP(V6)_ORIGDSTADDR.

    That is the address the packet carried on arrival: the original one under TPROXY,
    the already-rewritten one under REDIRECT (UDP has no SO_ORIGINAL_DST equivalent here).
    """
    for level, kind, data in ancdata:
        if (level, kind) in ((socket.SOL_IP, IP_RECVORIGDSTADDR), (SOL_IPV6, IPV6_RECVORIGDSTADDR)):
            with contextlib.suppress(ValueError, struct.error, OSError):
                return parse_sockaddr(data), "origdstaddr"
    return None


def send_reply(
    sock: socket.socket,
    line: bytes,
    peer: tuple[str, int] | tuple[str, int, int, int],
    ancdata: Sequence[tuple[int, int, bytes]],
) -> None:
    """Reply from the address the datagram was sent to (a wildcard-bound socket would
    otherwise let routing choose, and a connected client would drop the answer)."""
    pktinfo = reply_pktinfo(ancdata)
    if pktinfo is not None:
        try:
            sock.sendmsg([line], [pktinfo], 0, peer)
            return
        except OSError:
            pass  # e.g. a non-local TPROXY destination: let the kernel pick the source
    with contextlib.suppress(OSError):
        sock.sendto(line, peer)


def reply_pktinfo(ancdata: Sequence[tuple[int, int, bytes]]) -> tuple[int, int, bytes] | None:
    for level, kind, data in ancdata:
        if (level, kind) == (socket.SOL_IP, IP_PKTINFO):
            # struct in_pktinfo {int ifindex; in_addr spec_dst; in_addr addr}
            return (level, kind, struct.pack("=i4s4s", 0, data[8:12], b"\0" * 4))
        if (level, kind) == (SOL_IPV6, IPV6_PKTINFO):
            # struct in6_pktinfo {in6_addr addr; int ifindex}
            return (level, kind, data[:16] + struct.pack("=i", 0))
    return None


def plan_binds(tcp: list[int], udp: list[int], transparent: set[int]) -> list[Bind]:
    binds = []
    for proto, ports in (("tcp", tcp), ("udp", udp)):
        for port in ports:
            for family in (socket.AF_INET, socket.AF_INET6):
                binds.append(Bind(proto, family, port, port in transparent))
    return binds


def die_with_parent(parent: int) -> None:
    """Get SIGTERM if the harness dies (e.g. pytest SIGKILLed by a CI timeout).

    Set only after the last credential change: changing uid/gid clears the setting.
    """
    PR_SET_PDEATHSIG = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(0)


def serve(args: argparse.Namespace) -> int:
    # SIGTERM -> SystemExit, which unwinds out of select() and closes the sockets.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    parent = os.getppid()
    regain_root = args.uid is not None and os.geteuid() == 0
    drop_privileges(args.uid, args.gid, keep_saved_root=regain_root)
    socks = []
    try:
        binds = plan_binds(args.tcp, args.udp, set(args.transparent_port))
        for bind in binds:
            socks.append((bind, make_socket(bind, regain_root)))
        if regain_root:
            drop_privileges(args.uid, None)  # now drop the saved root uid for good
        die_with_parent(parent)
        print("READY", flush=True)
        Server(args.label, socks).run()
    finally:
        for _, sock in socks:
            sock.close()
    return 0


# --------------------------------------------------------------------------- probe


def probe(args: argparse.Namespace) -> int:
    try:
        # Credentials must be set before socket(): the owner match uses the socket's.
        drop_privileges(args.uid, args.gid)
        result = {"ok": True, "landed": json.loads(exchange(args))}
    except (OSError, ValueError) as exc:
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result), flush=True)
    return 0


def exchange(args: argparse.Namespace) -> bytes:
    family = socket.AF_INET6 if ipaddress.ip_address(args.dst).version == 6 else socket.AF_INET
    kind = socket.SOCK_STREAM if args.proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(family, kind) as sock:
        sock.settimeout(args.timeout)
        if args.src:
            sock.bind((args.src, 0))
        sock.connect((args.dst, args.port))
        if args.proto == "udp":
            sock.send(b"probe\n")
            return sock.recv(MAX_REPLY)
        return read_to_eof(sock)


def read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(MAX_REPLY):
        chunks.append(chunk)
    data = b"".join(chunks)
    if not data:
        raise ValueError("connection closed without a reply")
    return data


# --------------------------------------------------------------------------- CLI


def port_list(text: str) -> list[int]:
    ports = [int(p) for p in text.split(",") if p.strip()]
    if not all(0 < p < 65536 for p in ports):
        raise argparse.ArgumentTypeError(f"bad port list {text!r}")
    return ports


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    srv = sub.add_parser("serve", help="listen and report where connections land")
    srv.add_argument("--label", required=True)
    srv.add_argument("--tcp", type=port_list, default=[])
    srv.add_argument("--udp", type=port_list, default=[])
    srv.add_argument("--transparent-port", type=port_list, default=[])
    srv.add_argument("--uid", type=int)
    srv.add_argument("--gid", type=int)
    srv.set_defaults(func=serve)

    prb = sub.add_parser("probe", help="connect once and print where it landed")
    prb.add_argument("--proto", choices=("tcp", "udp"), default="tcp")
    prb.add_argument("--dst", required=True)
    prb.add_argument("--port", type=int, required=True)
    prb.add_argument("--uid", type=int)
    prb.add_argument("--gid", type=int)
    prb.add_argument("--src")
    prb.add_argument("--timeout", type=float, default=2.0)
    prb.set_defaults(func=probe)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve" and not (args.tcp or args.udp):
        parser.error("serve needs --tcp and/or --udp ports")
    if args.command == "probe":
        try:
            ipaddress.ip_address(args.dst)
        except ValueError:
            parser.error(f"--dst must be an IP address, got {args.dst!r}")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
