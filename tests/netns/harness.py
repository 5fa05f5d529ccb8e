"""Real-traffic harness: network namespaces joined by veth pairs, listeners and probes.

A ``Topology`` builds (and always tears down) this layout::

    pod ns  eth0 192.0.2.1/24  2001:db8::1/64   <-veth->  peer ns  eth0 192.0.2.2/24  2001:db8::2/64
    pod ns  eth1 198.51.100.1/24 2001:db8:1::1/64 <-veth->  (optional) peer or third ns, ...::2

Listeners are ``agent.py serve`` processes; probes are short ``agent.py probe`` runs
that report which listener a connection landed on and what SO_ORIGINAL_DST it saw.
Traffic is confined to loopback and the documentation ranges above.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

import pytest

AGENT = Path(__file__).with_name("agent.py")
PYTHON = sys.executable
NETNS_DIR = Path("/var/run/netns")
NS_PREFIX = "mnt-"

CMD_TIMEOUT = 10.0
READY_TIMEOUT = 5.0
STOP_TIMEOUT = 2.0

# Only these may ever be probed: loopback plus the documentation ranges we assign.
ALLOWED_NETS = tuple(
    ipaddress.ip_network(n)
    for n in ("127.0.0.0/8", "::1/128", "192.0.2.0/24", "198.51.100.0/24", "2001:db8::/32")
)

SecondLink = Literal["none", "peer", "third"]


@dataclass(frozen=True)
class Family:
    """Per-address-family constants so tests can be parametrized over v4/v6."""

    name: str
    version: int
    pod: str
    peer: str
    pod2: str  # pod's eth1 address
    peer2: str  # far side of eth1
    loopback: str
    inbound_passthrough: str  # Istio's 127.0.0.6 / ::6 source for inbound passthrough
    restore: str  # iptables-restore binary for this family
    save: str

    def addr(self, ip: str, port: int) -> str:
        return fmt_addr(ip, port)


V4 = Family(
    name="ipv4",
    version=4,
    pod="192.0.2.1",
    peer="192.0.2.2",
    pod2="198.51.100.1",
    peer2="198.51.100.2",
    loopback="127.0.0.1",
    inbound_passthrough="127.0.0.6",
    restore="iptables-restore",
    save="iptables-save",
)
V6 = Family(
    name="ipv6",
    version=6,
    pod="2001:db8::1",
    peer="2001:db8::2",
    pod2="2001:db8:1::1",
    peer2="2001:db8:1::2",
    loopback="::1",
    inbound_passthrough="::6",
    restore="ip6tables-restore",
    save="ip6tables-save",
)
FAMILIES = (V4, V6)


def fmt_addr(ip: str, port: int) -> str:
    """Same rendering as agent.py: ``ip:port`` for IPv4, ``[ip]:port`` for IPv6."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def split_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Landing:
    """Where one probe ended up (or why it failed)."""

    ok: bool
    label: str | None = None
    port: int | None = None
    orig_dst: str | None = None
    peer: str | None = None
    local: str | None = None
    error: str | None = None
    # How the server learned orig_dst: "so_original_dst" (NAT/REDIRECT seen by
    # conntrack), "sockname" (TCP without it, e.g. TPROXY) or "origdstaddr" (UDP).
    orig_dst_via: str | None = None

    @classmethod
    def from_probe_output(cls, stdout: str) -> Landing:
        result = json.loads(stdout)
        if not result["ok"]:
            return cls(ok=False, error=result["error"])
        landed = result["landed"]
        return cls(
            ok=True,
            label=landed.get("label"),
            port=landed.get("port"),
            orig_dst=landed.get("orig_dst"),
            peer=landed.get("peer"),
            local=landed.get("local"),
            orig_dst_via=landed.get("orig_dst_via"),
        )

    def landed_at(self, label: str, port: int) -> bool:
        return self.ok and (self.label, self.port) == (label, port)

    @property
    def where(self) -> str:
        """Short human form for assertion messages."""
        if not self.ok:
            return f"failed: {self.error}"
        return f"{self.label}:{self.port} orig_dst={self.orig_dst} peer={self.peer}"

    @property
    def peer_ip(self) -> str | None:
        return split_addr(self.peer)[0] if self.peer else None


# --------------------------------------------------------------------------- processes


def run(
    argv: Sequence[str],
    *,
    input: str | None = None,
    timeout: float = CMD_TIMEOUT,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # fixed argument list, no shell
        list(argv), input=input, capture_output=True, text=True, timeout=timeout, check=check
    )


def run_checked(
    argv: Sequence[str], *, input: str | None = None, timeout: float = CMD_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    proc = run(argv, input=input, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def netns_argv(ns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


@dataclass
class Listener:
    """A running ``agent.py serve``; `ip netns exec` execs in place, so pid is the agent."""

    ns: str
    label: str
    proc: subprocess.Popen[bytes]
    stderr: IO[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr_text(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace").strip()

    def stop(self) -> None:
        """SIGTERM by PID, then SIGKILL; always reaps and closes our pipes."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(STOP_TIMEOUT)
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.stderr.close()


def serve_argv(
    label: str,
    tcp: Iterable[int],
    udp: Iterable[int],
    transparent: Iterable[int],
    uid: int | None,
    gid: int | None,
) -> list[str]:
    argv = [PYTHON, str(AGENT), "serve", "--label", label]
    for flag, ports in (("--tcp", tcp), ("--udp", udp), ("--transparent-port", transparent)):
        if ports := list(ports):
            argv += [flag, ",".join(map(str, ports))]
    for flag, ident in (("--uid", uid), ("--gid", gid)):
        if ident is not None:
            argv += [flag, str(ident)]
    return argv


def wait_ready(listener: Listener, timeout: float) -> None:
    """Block until the agent prints READY; raise with its stderr if it dies or stalls."""
    stdout = listener.proc.stdout
    assert stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(stdout, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if sel.select(left):
                line = stdout.readline()
                if line.strip() == b"READY":
                    return
                if not line:  # EOF: the agent exited
                    break
    code = listener.proc.poll()
    state = f"exited with {code}" if code is not None else f"not READY after {timeout}s"
    raise RuntimeError(
        f"listener {listener.label!r} in {listener.ns} {state}: {listener.stderr_text()}"
    )


def check_probe_target(dst: str) -> None:
    """Network hygiene guard: refuse anything outside loopback/documentation ranges."""
    ip = ipaddress.ip_address(dst)
    if not any(ip in net for net in ALLOWED_NETS):
        raise ValueError(f"refusing to send test traffic to {dst}")


def probe(
    ns: str,
    dst: str,
    port: int,
    proto: str = "tcp",
    uid: int | None = 0,
    gid: int | None = 0,
    timeout: float = 2.0,
    src: str | None = None,
) -> Landing:
    """Connect once from ``ns`` as uid/gid and report where it landed."""
    check_probe_target(dst)
    argv = [PYTHON, str(AGENT), "probe", "--proto", proto, "--dst", dst, "--port", str(port)]
    argv += ["--timeout", str(timeout)]
    for flag, value in (("--uid", uid), ("--gid", gid), ("--src", src)):
        if value is not None:
            argv += [flag, str(value)]
    proc = run_checked(netns_argv(ns, argv), timeout=timeout + CMD_TIMEOUT)
    return Landing.from_probe_output(proc.stdout)


# --------------------------------------------------------------------------- namespaces


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


# Every namespace this process created, so a session check can tell our leaks from
# those of a concurrent test run (which it must not delete).
CREATED_NETNS: set[str] = set()


def netns_leftovers(only_ours: bool = False) -> list[str]:
    """Existing namespaces named mnt-* (only_ours: just those this process created)."""
    try:
        names = [n for n in os.listdir(NETNS_DIR) if n.startswith(NS_PREFIX)]
    except FileNotFoundError:
        return []
    return sorted(n for n in names if not only_ours or n in CREATED_NETNS)


def delete_netns(name: str) -> None:
    run_checked(["ip", "netns", "delete", name])


@dataclass
class Topology:
    """Pod and peer namespaces joined by veth; context manager that always cleans up.

    second_link: "none"; "peer" adds pod eth1 <-> peer eth1; "third" adds pod eth1 <->
    eth0 of a third namespace (``third_ns``). Both use 198.51.100.0/24 + 2001:db8:1::/64.
    """

    second_link: SecondLink = "none"
    suffix: str = field(default_factory=lambda: secrets.token_hex(4))
    namespaces: list[str] = field(default_factory=list, init=False)
    listeners: list[Listener] = field(default_factory=list, init=False)
    closed: bool = field(default=False, init=False)

    @property
    def pod_ns(self) -> str:
        return f"{NS_PREFIX}{self.suffix}-pod"

    @property
    def peer_ns(self) -> str:
        return f"{NS_PREFIX}{self.suffix}-peer"

    @property
    def third_ns(self) -> str:
        return f"{NS_PREFIX}{self.suffix}-third"

    @property
    def pod_path(self) -> Path:
        return netns_path(self.pod_ns)

    @property
    def peer_path(self) -> Path:
        return netns_path(self.peer_ns)

    @property
    def third_path(self) -> Path:
        return netns_path(self.third_ns)

    # ---- lifecycle

    def __enter__(self) -> Topology:
        try:
            self.setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def setup(self) -> None:
        self.add_netns(self.pod_ns)
        self.add_netns(self.peer_ns)
        self.add_veth(
            self.pod_ns, "eth0", self.peer_ns, "eth0", (V4.pod, V6.pod), (V4.peer, V6.peer)
        )
        if self.second_link == "none":
            return
        far_ns, far_dev = self.peer_ns, "eth1"
        if self.second_link == "third":
            self.add_netns(self.third_ns)
            far_ns, far_dev = self.third_ns, "eth0"
        self.add_veth(
            self.pod_ns, "eth1", far_ns, far_dev, (V4.pod2, V6.pod2), (V4.peer2, V6.peer2)
        )

    def close(self) -> None:
        """Stop listeners, then delete namespaces; tries everything, reports all failures.

        Listeners go first: a process inside a namespace keeps it alive after
        `ip netns delete` removes the name, and we must not orphan it.
        """
        errors: list[str] = []
        for listener in reversed(self.listeners):
            try:
                listener.stop()
            except Exception as exc:
                errors.append(f"stop {listener.label} pid {listener.pid}: {exc}")
        self.listeners.clear()
        for ns in reversed(self.namespaces):
            try:
                if netns_path(ns).exists():
                    delete_netns(ns)
            except Exception as exc:
                errors.append(f"delete netns {ns}: {exc}")
        self.namespaces.clear()
        self.closed = True
        if errors:
            raise RuntimeError("topology cleanup failed: " + "; ".join(errors))

    # ---- building blocks

    def add_netns(self, name: str) -> None:
        self.namespaces.append(name)  # record before creating: close() tolerates absence
        CREATED_NETNS.add(name)
        run_checked(["ip", "netns", "add", name])
        run_checked(["ip", "-n", name, "link", "set", "lo", "up"])

    def add_veth(
        self,
        ns_a: str,
        dev_a: str,
        ns_b: str,
        dev_b: str,
        addrs_a: Sequence[str],
        addrs_b: Sequence[str],
    ) -> None:
        # Created directly inside the namespaces: nothing ever lives in the root ns, and
        # deleting either namespace destroys the pair.
        run_checked(
            [
                "ip",
                "-n",
                ns_a,
                "link",
                "add",
                dev_a,
                "type",
                "veth",
                "peer",
                "name",
                dev_b,
                "netns",
                ns_b,
            ]
        )
        for ns, dev, addrs in ((ns_a, dev_a, addrs_a), (ns_b, dev_b, addrs_b)):
            # Up *before* adding addresses: v6 addresses added to a down link left the
            # first neighbour solicitation unanswered, so the first v6 connection after
            # setup stalled for the 1 s ND retransmit timer.
            run_checked(["ip", "-n", ns, "link", "set", dev, "up"])
            for addr in addrs:
                self.add_addr(ns, dev, addr)

    @staticmethod
    def add_addr(ns: str, dev: str, addr: str) -> None:
        if ":" in addr:
            # nodad: skip duplicate address detection, otherwise the address stays
            # "tentative" (unusable for bind/source selection) for ~1-2 s.
            run_checked(["ip", "-n", ns, "addr", "add", f"{addr}/64", "dev", dev, "nodad"])
        else:
            run_checked(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev])

    # ---- use

    def exec(
        self,
        ns: str,
        argv: Sequence[str],
        *,
        input: str | None = None,
        timeout: float = CMD_TIMEOUT,
        check: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ip netns exec ns argv`` (text mode, captured output)."""
        return run(netns_argv(ns, argv), input=input, timeout=timeout, check=check)

    def iptables_restore(
        self,
        ns: str,
        rules: str,
        *,
        family: Family = V4,
        command: str | None = None,
        noflush: bool = True,
    ) -> None:
        """Feed ``rules`` to (ip6)tables-restore inside ``ns``; raise with stderr on error."""
        argv = [command or family.restore] + (["--noflush"] if noflush else [])
        proc = self.exec(ns, argv, input=rules)
        if proc.returncode != 0:
            raise RuntimeError(f"{argv[0]} in {ns} failed: {proc.stderr.strip()}")

    def start_listeners(
        self,
        ns: str,
        label: str,
        tcp_ports: Iterable[int] = (),
        udp_ports: Iterable[int] = (),
        transparent_ports: Iterable[int] = (),
        uid: int | None = None,
        gid: int | None = None,
        timeout: float = READY_TIMEOUT,
    ) -> Listener:
        """Start ``agent.py serve`` in ns; returns once every socket is bound."""
        argv = serve_argv(label, tcp_ports, udp_ports, transparent_ports, uid, gid)
        # stderr to a file, not a pipe: nobody drains it while the agent runs.
        stderr = tempfile.TemporaryFile()
        try:
            proc = subprocess.Popen(  # fixed argument list, no shell
                netns_argv(ns, argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
        except BaseException:
            stderr.close()
            raise
        listener = Listener(ns, label, proc, stderr)
        self.listeners.append(listener)  # registered before waiting: close() reaps it
        wait_ready(listener, timeout)
        return listener

    def probe(
        self,
        ns: str,
        dst: str,
        port: int,
        proto: str = "tcp",
        uid: int | None = 0,
        gid: int | None = 0,
        timeout: float = 2.0,
        src: str | None = None,
    ) -> Landing:
        return probe(ns, dst, port, proto=proto, uid=uid, gid=gid, timeout=timeout, src=src)


# --------------------------------------------------------------------------- gating


def _netns_unusable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "iptables-restore", "ip6tables-restore"):
        if shutil.which(tool) is None:
            return f"{tool} not found on PATH"
    name = f"{NS_PREFIX}{secrets.token_hex(4)}-check"
    try:
        made = run(["ip", "netns", "add", name])
        if made.returncode != 0:
            return f"`ip netns add` failed: {made.stderr.strip()}"
        lo = run(["ip", "-n", name, "link", "set", "lo", "up"])
        if lo.returncode != 0:
            return f"cannot configure a namespace: {lo.stderr.strip()}"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`ip netns` unusable: {exc}"
    finally:
        if netns_path(name).exists():
            run(["ip", "netns", "delete", name])
    return None


_GATE: list[str | None] = []  # memoized: the check creates a namespace, do it once


def require_root_netns() -> None:
    """Skip (or with CI=true, fail) when namespaces with real traffic cannot be used."""
    if not _GATE:
        _GATE.append(_netns_unusable_reason())
    reason = _GATE[0]
    if reason is None:
        return
    message = f"netns tests cannot run: {reason}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)
