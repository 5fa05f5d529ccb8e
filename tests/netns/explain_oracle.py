"""`meshnet explain` must agree with the kernel: every probe is also explained and compared.

The interception tests record the flags they applied per topology; a wrapper around
`Topology.probe` then walks the same connection through the same plan with `explain` and
fails the test when the predicted verdict differs from where the connection really landed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from meshnet import explain
from meshnet.cli.app import istio_iptables
from meshnet.config import options
from meshnet.explain import probe
from meshnet.plan import iptables, nftables
from tests.support.fakes import FakeSystem

from .harness import FAMILIES, Landing, Topology

APPLIED: dict[int, tuple[list[str], dict[str, str]]] = {}
CAPTURE_PORTS = {("proxy", 15001), ("proxy", 15006), ("dns", 15053)}


def record(topo: Topology, argv: Sequence[str], env: Mapping[str, str] | None) -> None:
    APPLIED[id(topo)] = (list(argv), dict(env or {}))


def check(
    topo: Topology,
    ns: str,
    dst: str,
    port: int,
    proto: str,
    uid: int | None,
    gid: int | None,
    landing: Landing,
    src: str | None = None,
) -> None:
    applied = APPLIED.get(id(topo))
    if applied is None or not landing.ok:
        return
    spec = _probe_spec(topo, ns, dst, port, proto, uid or 0, gid or 0)
    if spec is not None and src is not None:
        spec += f" src=[{src}]" if ":" in src else f" src={src}"
    if spec is None:
        return
    result = _explain(*applied, probe.parse(spec))
    kernel = landing.port if (landing.label, landing.port) in CAPTURE_PORTS else None
    predicted = result.verdict.port if result.verdict.kind in ("redirect", "tproxy") else None
    if kernel != predicted:
        pytest.fail(
            f"explain disagrees with the kernel for {spec!r}: the connection landed at "
            f"{landing.where}, explain says:\n{explain.render_text(result)}"
        )


def _probe_spec(
    topo: Topology, ns: str, dst: str, port: int, proto: str, uid: int, gid: int
) -> str | None:
    fam = next(f for f in FAMILIES if (":" in dst) == (f.version == 6))
    host = f"[{dst}]" if fam.version == 6 else dst
    local = {fam.pod, fam.pod2}
    if ns == topo.pod_ns:
        oif = (
            "lo"
            if dst in local or dst == fam.loopback
            else ("eth1" if dst == fam.peer2 else "eth0")
        )
        return f"out {proto} uid={uid} gid={gid} dst={host}:{port} oif={oif}"
    if ns in topo.namespaces:
        third = topo.second_link == "third" and ns == topo.third_ns
        iif = "eth1" if third or dst == fam.pod2 else "eth0"
        return f"in {proto} dst={host}:{port} iif={iif}"
    return None


def _explain(argv: list[str], env: dict[str, str], parsed: probe.Probe) -> Any:
    params = istio_iptables.make_context("istio-iptables", argv[1:]).params
    params["network_namespace"] = None
    system = FakeSystem(("192.0.2.1", "2001:db8::1"))
    opts = options.build(options.gather(params, env), system)
    if opts.native_nftables:
        return explain.explain_nft(nftables.ruleset(opts), parsed)
    return explain.explain_iptables(iptables.ruleset(opts), parsed)


@pytest.fixture(autouse=True)
def explain_agrees_with_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every probe of a module that imports this fixture is also explained and compared."""
    original = Topology.probe

    def probe(
        self: Topology,
        ns: str,
        dst: str,
        port: int,
        proto: str = "tcp",
        uid: int | None = 0,
        gid: int | None = 0,
        timeout: float = 2.0,
        src: str | None = None,
    ) -> Landing:
        landing = original(self, ns, dst, port, proto, uid, gid, timeout, src)
        check(self, ns, dst, port, proto, uid, gid, landing, src)
        return landing

    monkeypatch.setattr(Topology, "probe", probe)
