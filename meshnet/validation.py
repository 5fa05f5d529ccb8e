"""Validation mode (SPEC-istio §3.9): prove that a connection is really captured.

A server listens on the proxy's ports (15001, 15006) of loopback; a client, running as the
proxy's UID, dials 127.0.0.6:<probe port>. The rules redirect it to 15006; the server reads
SO_ORIGINAL_DST and sees the probe port. No capture within the timeout: exit 126.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

from meshnet import logs
from meshnet.environment import HostSystem, detect_ip
from meshnet.errors import EnvironmentFactError, ValidationFailed
from meshnet.options import Options

SO_ORIGINAL_DST = 80
FAILURE_MESSAGE = """iptables validation failed; workload is not ready for Istio.
When using Istio CNI, this can occur if a pod is scheduled before the node is ready.

If installed with 'cni.repair.deletePods=true', this pod should automatically be deleted and retry.
Otherwise, this pod will need to be manually removed so that it is scheduled on a node with istio-cni running, allowing iptables rules to be established."""  # noqa: E501 - Istio's text


def run(opts: Options) -> None:
    """Serve, probe once a second, and succeed when a probe arrives captured."""
    ipv6 = _host_is_ipv6(opts)
    listen, target = ("::1", "::6") if ipv6 else ("127.0.0.1", "127.0.0.6")
    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    captured = threading.Event()
    servers = _listen(family, listen, (opts.proxy_port, opts.inbound_capture_port))
    try:
        for server in servers:
            threading.Thread(
                target=_serve, args=(server, opts.probe_port, captured), daemon=True
            ).start()
        if not _probe_until(family, listen, target, opts.probe_port, captured, opts.probe_timeout):
            raise ValidationFailed(FAILURE_MESSAGE)
    finally:
        for server in servers:
            server.close()
    logs.get().info("iptables validation passed", probe=f"{target}:{opts.probe_port}")


def _host_is_ipv6(opts: Options) -> bool:
    try:
        return detect_ip(HostSystem().interface_addresses(), opts.dual_stack).host_ip.version == 6
    except EnvironmentFactError:
        return opts.enable_ipv6


def _listen(family: int, address: str, ports: tuple[int, ...]) -> list[socket.socket]:
    servers: list[socket.socket] = []
    for port in ports:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((address, port))
            sock.listen(16)
        except OSError as err:
            logs.get().warning("cannot listen", address=address, port=port, error=err.strerror)
            sock.close()
            continue
        servers.append(sock)
    if not servers:
        raise ValidationFailed(f"no listener available: {address} ports {ports}")
    return servers


def _serve(server: socket.socket, probe_port: int, captured: threading.Event) -> None:
    while True:
        try:
            conn, _peer = server.accept()
        except OSError:
            return  # closed by run()
        with conn:
            port = _original_port(conn)
            if port is not None:
                conn.sendall(str(port).encode())
                if port == probe_port:
                    captured.set()


def _original_port(conn: socket.socket) -> int | None:
    try:
        if conn.family == socket.AF_INET6:
            raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        else:
            raw = conn.getsockopt(socket.IPPROTO_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return None
    port: int = struct.unpack_from("!H", raw, 2)[0]
    return port


def _probe_until(
    family: int, local: str, target: str, port: int, captured: threading.Event, timeout: float
) -> bool:
    deadline = time.monotonic() + timeout
    while not captured.is_set() and time.monotonic() < deadline:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as client:
                client.settimeout(max(0.1, min(1.0, deadline - time.monotonic())))
                client.bind((local, 0))
                client.connect((target, port))
        except OSError as err:
            logs.get().debug("validation probe not captured yet", error=str(err))
        captured.wait(min(1.0, max(0.0, deadline - time.monotonic())))
    return captured.is_set()
