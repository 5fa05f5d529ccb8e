"""Validation mode (`--run-validation`): prove that a connection is really captured.

A server listens on the proxy's ports (15001, 15006) of loopback; a client, running as the
proxy's UID, dials 127.0.0.6:<probe port>. The rules redirect it to 15006; the server reads
SO_ORIGINAL_DST and sees the probe port. No capture within the timeout: exit 126.

Istio's istio-validation container runs as the proxy UID, so its client is exempt as the proxy
is (tools/istio-iptables/pkg/validation/vld.go). meshnet gives the same answer whoever runs it:
when the caller is another user and may change identity (root), the client runs in a forked
child that drops to the proxy's UID and GID first.
"""

from __future__ import annotations

import grp
import os
import pwd
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from meshnet import logs
from meshnet.config.facts import detect_ip
from meshnet.config.flags import DEFAULT_PROXY_ID
from meshnet.config.options import Options
from meshnet.errors import EnvironmentFactError, ValidationFailed
from meshnet.host.system import HostSystem

SO_ORIGINAL_DST = 80


def failure_message(opts: Options, target: str, identity: str) -> str:
    return (
        f"validation failed: a connection from {identity} to {target}:{opts.probe_port} was not "
        f"redirected to the proxy ports {opts.proxy_port}/{opts.inbound_capture_port} within "
        f"{opts.probe_timeout:g}s, so this namespace does not capture traffic. Apply the rules "
        "first (`meshnet istio-iptables` with the pod's flags, or the CNI plugin on its node), "
        "check them with `meshnet verify`, and run validation with the same -u/-g, -p and -z; "
        "a pod scheduled before the CNI plugin was ready must be recreated"
    )


def check(opts: Options) -> None:
    """Serve, probe once a second, and succeed when a probe arrives captured."""
    ipv6 = _host_is_ipv6(opts)
    listen, target = ("::1", "::6") if ipv6 else ("127.0.0.1", "127.0.0.6")
    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    captured = threading.Event()
    servers = _listen(family, listen, (opts.proxy_port, opts.inbound_capture_port))
    uid, gid = _proxy_ids(opts)
    identity = f"uid {uid} gid {gid}"
    try:
        # Fork before any thread exists: the child only dials and exits.
        with _client_as(uid, gid, servers, family, listen, target, opts) as in_child:
            for server in servers:
                threading.Thread(
                    target=_serve, args=(server, opts.probe_port, captured), daemon=True
                ).start()
            if in_child:
                ok = captured.wait(opts.probe_timeout)
            else:
                ok = _probe_until(
                    family, listen, target, opts.probe_port, captured, opts.probe_timeout
                )
                identity = f"uid {os.geteuid()} gid {os.getegid()}"
        if not ok:
            raise ValidationFailed(failure_message(opts, target, identity))
    finally:
        for server in servers:
            server.close()
    logs.get().info(
        "iptables validation passed", probe=f"{target}:{opts.probe_port}", client=identity
    )


def _proxy_ids(opts: Options) -> tuple[int, int]:
    """The first proxy UID and GID (the proxy itself runs as them), as numbers. Names were
    checked to resolve when the options were built."""
    uid_text = opts.proxy_uids[0] if opts.proxy_uids else DEFAULT_PROXY_ID
    uid = int(uid_text) if uid_text.isdigit() else pwd.getpwnam(uid_text).pw_uid
    gid_text = opts.proxy_gids[0] if opts.proxy_gids else str(uid)
    gid = int(gid_text) if gid_text.isdigit() else grp.getgrnam(gid_text).gr_gid
    return uid, gid


@contextmanager
def _client_as(
    uid: int,
    gid: int,
    servers: list[socket.socket],
    family: int,
    listen: str,
    target: str,
    opts: Options,
) -> Iterator[bool]:
    """Run the probing client in a child as uid/gid when this process is someone else and may
    switch (yields True); otherwise yield False and the caller probes itself, as Istio."""
    if (os.geteuid(), os.getegid()) == (uid, gid) or os.geteuid() != 0:
        if os.geteuid() != uid:
            logs.get().warning(
                "not running as the proxy uid and cannot switch: the probe may not be captured",
                uid=os.geteuid(),
                proxy_uid=uid,
            )
        yield False
        return
    pid = os.fork()
    if pid == 0:  # the child: drop to the proxy's identity, dial until killed or timed out
        code = 1
        try:
            for server in servers:
                server.close()
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            never = threading.Event()
            _probe_until(family, listen, target, opts.probe_port, never, opts.probe_timeout)
            code = 0
        finally:
            os._exit(code)
    try:
        yield True
    finally:
        os.kill(pid, signal.SIGKILL)  # our own child, by its pid
        os.waitpid(pid, 0)


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
