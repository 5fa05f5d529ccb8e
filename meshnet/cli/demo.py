"""`meshnet demo`: the main job on an embedded default, end to end, on this machine.

It builds a throw-away pod namespace and a peer joined by a veth, applies Istio's standard
sidecar rules inside the pod (`-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x "" -b '*'
-d 15090,15021,15020`, dual stack), opens real connections, prints where each one landed, and
removes everything, whatever happens (Ctrl-C and SIGTERM included). Needs root.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

import click

from meshnet.apply import backend
from meshnet.config import options
from meshnet.errors import MeshnetError
from meshnet.host import netns, proc
from meshnet.host.system import HostSystem

STANDARD_ARGS = {
    "envoy_port": "15001",
    "inbound_capture_port": "15006",
    "proxy_uid": "1337",
    "inbound_interception_mode": "REDIRECT",
    "service_cidr": "*",
    "service_exclude_cidr": "",
    "inbound_ports": "*",
    "local_exclude_ports": "15090,15021,15020",
    "dual_stack": "true",
}
POD = {4: "192.0.2.1", 6: "2001:db8::1"}
PEER = {4: "192.0.2.2", 6: "2001:db8::2"}
LOOPBACK = {4: "127.0.0.1", 6: "::1"}
SO_ORIGINAL_DST = 80


@dataclass(frozen=True, slots=True)
class Connection:
    source: str  # "pod" or "peer"
    uid: int
    dst: str
    port: int
    want: str  # where Istio's rules send it: "label:port"
    why: str

    @property
    def family(self) -> int:
        return 6 if ":" in self.dst else 4


def _probes() -> list[Connection]:
    probes: list[Connection] = []
    for v in (4, 6):
        probes += [
            Connection("pod", 1000, PEER[v], 80, "proxy:15001", "app → peer: captured (outbound)"),
            Connection("pod", 1337, PEER[v], 80, "peer:80", "proxy's own traffic: direct"),
            Connection("peer", 0, POD[v], 8080, "proxy:15006", "peer → app: captured (inbound)"),
            Connection("peer", 0, POD[v], 15021, "health:15021", "health port: excluded by -d"),
            Connection("pod", 1000, LOOPBACK[v], 8080, "app:8080", "loopback: not captured"),
            Connection("pod", 1337, POD[v], 8080, "proxy:15006", "proxy → own pod IP: inbound"),
        ]
    return probes


def run() -> None:
    if os.geteuid() != 0:
        raise MeshnetError("meshnet demo needs root (it creates network namespaces)")
    name = f"meshnet-demo-{secrets.token_hex(3)}"
    with _interrupt_as_exception(), _namespaces(name) as (pod, peer):
        _apply_standard_rules(pod)
        with _listeners(pod, peer):
            rows = [_run_probe(probe, pod, peer) for probe in _probes()]
    _print_table(rows)
    click.echo(f"\nnamespaces {name}-pod and {name}-peer removed; nothing left behind.")
    wrong = [probe for probe, landed, _orig in rows if landed != probe.want]
    if wrong:
        raise MeshnetError(f"{len(wrong)} connection(s) did not land where Istio's rules send them")
    click.echo(f"all {len(rows)} connections landed where Istio's rules send them.")


@contextmanager
def _interrupt_as_exception() -> Iterator[None]:
    def stop(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _namespaces(name: str) -> Iterator[tuple[str, str]]:
    pod, peer = f"{name}-pod", f"{name}-peer"
    made: list[str] = []
    try:
        for ns in (pod, peer):
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", pod, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", peer)
        for ns, addrs in ((pod, POD), (peer, PEER)):
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "addr", "add", f"{addrs[4]}/24", "dev", "eth0")
            _ip("-n", ns, "addr", "add", f"{addrs[6]}/64", "dev", "eth0", "nodad")
        click.echo(f"created pod namespace {pod} and peer namespace {peer}")
        yield pod, peer
    finally:
        for ns in reversed(made):
            proc.run(["ip", "netns", "del", ns], timeout=10)


def _ip(*args: str) -> None:
    result = proc.run(["ip", *args], timeout=10)
    if result.returncode != 0:
        raise MeshnetError(f"ip {' '.join(args)} failed: {proc.stderr_summary(result)}")


def _apply_standard_rules(pod: str) -> None:
    with netns.entered(pod):
        opts = options.build(options.gather(STANDARD_ARGS, {}), HostSystem())
        chosen = backend.IptablesBackend.from_options(opts)
        chosen.program()
    click.echo(
        "applied: meshnet istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT "
        "-i '*' -x \"\" -b '*' -d 15090,15021,15020 --dual-stack "
        f"({len(chosen.ruleset.ipv4)} IPv4 + {len(chosen.ruleset.ipv6)} IPv6 rules)"
    )


@contextmanager
def _listeners(pod: str, peer: str) -> Iterator[None]:
    plan = {
        pod: {15001: "proxy", 15006: "proxy", 8080: "app", 15021: "health"},
        peer: {80: "peer", 8080: "peer"},
    }
    sockets: list[socket.socket] = []
    try:
        for ns, ports in plan.items():
            with netns.entered(ns):
                for port, label in ports.items():
                    for family in (socket.AF_INET, socket.AF_INET6):
                        sockets.append(_listen(family, port, label))
        yield
    finally:
        for sock in sockets:
            sock.close()


def _listen(family: int, port: int, label: str) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    sock.listen(16)
    threading.Thread(target=_serve, args=(sock, port, label), daemon=True).start()
    return sock


def _serve(sock: socket.socket, port: int, label: str) -> None:
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        with conn:
            report = {"label": label, "port": port, "orig": _original_dst(conn)}
            conn.sendall(json.dumps(report).encode() + b"\n")


def _original_dst(conn: socket.socket) -> str:
    try:
        if conn.family == socket.AF_INET6:
            raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
            return f"[{socket.inet_ntop(socket.AF_INET6, raw[8:24])}]:{_port(raw)}"
        raw = conn.getsockopt(socket.IPPROTO_IP, SO_ORIGINAL_DST, 16)
        return f"{socket.inet_ntop(socket.AF_INET, raw[4:8])}:{_port(raw)}"
    except OSError:
        host, port = conn.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _port(raw: bytes) -> int:
    value: int = struct.unpack_from("!H", raw, 2)[0]
    return value


def _run_probe(probe: Connection, pod: str, peer: str) -> tuple[Connection, str, str]:
    family = socket.AF_INET6 if probe.family == 6 else socket.AF_INET
    with netns.entered(pod if probe.source == "pod" else peer), _as_user(probe.uid):
        client = socket.socket(family, socket.SOCK_STREAM)  # -m owner sees the creator
    with client:
        client.settimeout(2)
        try:
            client.connect((probe.dst, probe.port))
            report = json.loads(client.makefile().readline())
        except (OSError, ValueError) as err:
            return probe, f"failed: {err}", "-"
    return probe, f"{report['label']}:{report['port']}", report["orig"]


@contextmanager
def _as_user(uid: int) -> Iterator[None]:
    if uid == 0:
        yield
        return
    os.setegid(uid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def _print_table(rows: list[tuple[Connection, str, str]]) -> None:
    header = ("from", "uid", "to", "landed at", "original dst", "", "why")
    table = [header] + [
        (
            p.source,
            str(p.uid),
            f"[{p.dst}]:{p.port}" if ":" in p.dst else f"{p.dst}:{p.port}",
            landed,
            orig,
            "ok" if landed == p.want else f"WRONG (want {p.want})",
            p.why,
        )
        for p, landed, orig in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    click.echo()
    for row in table:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
