"""The init image, run the way a kubelet runs Istio's istio-init, captures real traffic.

The container gets exactly what deploy/init-container.yaml gives it: the image's entrypoint
with the manifest's args, uid/gid 0, every capability dropped but the ones it adds, no new
privileges, and the pod's network namespace (one the test made with tests/netns/harness.py).
Then real connections show where traffic lands, as in the engine suite.
"""

from __future__ import annotations

import re
import subprocess
import time
from typing import Any

from tests.netns.harness import V4, Topology

from . import manifests, podman
from .conftest import TIMINGS, Images

APP_UID = 1000
OUTBOUND = 15001
INBOUND = 15006
_COUNTERS = re.compile(r"\[\d+:\d+\]")
# Every view of the namespace's netfilter state, both iptables variants and nft.
_DUMPS = (
    ("iptables-nft-save",),
    ("ip6tables-nft-save",),
    ("iptables-legacy-save",),
    ("ip6tables-legacy-save",),
    ("nft", "list", "ruleset"),
)


def _capability_flags(container: dict[str, Any]) -> list[str]:
    caps = container["securityContext"]["capabilities"]
    flags = ["--cap-drop", ",".join(caps["drop"])]
    if caps.get("add"):
        flags += ["--cap-add", ",".join(caps["add"])]
    return flags


def _user_flags(container: dict[str, Any]) -> list[str]:
    context = container["securityContext"]
    return ["--user", f"{context['runAsUser']}:{context['runAsGroup']}"]


def run_init(
    images: Images, topo: Topology, containers: list[str], caps: list[str] | None = None
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run the manifest's istio-init container in the pod namespace; (result, wall seconds)."""
    container = manifests.init_container()
    name = podman.container_name("init")
    containers.append(name)
    args = [
        "--rm",
        "--name",
        name,
        "--network",
        f"ns:{topo.pod_path}",
        *_user_flags(container),
        *(caps if caps is not None else _capability_flags(container)),
        images.init,
        *container["args"],
    ]
    started = time.monotonic()
    result = podman.run(args)
    return result, time.monotonic() - started


def netfilter_state(topo: Topology) -> dict[str, str]:
    """The pod namespace's rules in every backend, without timestamps and counters."""
    state = {}
    for argv in _DUMPS:
        out = topo.exec(topo.pod_ns, argv).stdout
        lines = [_COUNTERS.sub("", line) for line in out.splitlines() if not line.startswith("#")]
        state[" ".join(argv)] = "\n".join(lines)
    return state


def start_listeners(topo: Topology) -> None:
    topo.start_listeners(topo.pod_ns, "proxy", [OUTBOUND, INBOUND])
    topo.start_listeners(topo.pod_ns, "app", [8080])
    topo.start_listeners(topo.peer_ns, "peer", [80])


def test_init_container_captures_outbound_and_inbound(
    images: Images, topology: Topology, containers: list[str]
) -> None:
    start_listeners(topology)
    before = topology.probe(topology.pod_ns, V4.peer, 80, uid=APP_UID, gid=APP_UID)
    assert before.landed_at("peer", 80), f"before the init container: {before.where}"

    result, seconds = run_init(images, topology, containers)
    TIMINGS["init container in the pod namespace (podman run, wall)"] = seconds
    assert result.returncode == 0, f"init container exited {result.returncode}: {result.stderr}"

    outbound = topology.probe(topology.pod_ns, V4.peer, 80, uid=APP_UID, gid=APP_UID)
    assert outbound.landed_at("proxy", OUTBOUND), outbound.where
    assert outbound.orig_dst == V4.addr(V4.peer, 80), outbound.where
    inbound = topology.probe(topology.peer_ns, V4.pod, 8080)
    assert inbound.landed_at("proxy", INBOUND), inbound.where
    assert inbound.orig_dst == V4.addr(V4.pod, 8080), inbound.where


def test_rerun_exits_0_and_changes_nothing(
    images: Images, topology: Topology, containers: list[str]
) -> None:
    first, _ = run_init(images, topology, containers)
    assert first.returncode == 0, first.stderr
    applied = netfilter_state(topology)

    again, seconds = run_init(images, topology, containers)
    TIMINGS["init container re-run (no-op, podman run, wall)"] = seconds
    assert again.returncode == 0, f"re-run exited {again.returncode}: {again.stderr}"
    assert netfilter_state(topology) == applied


def test_without_net_admin_fails_clearly_and_leaves_the_namespace_alone(
    images: Images, topology: Topology, containers: list[str]
) -> None:
    before = netfilter_state(topology)
    result, _ = run_init(images, topology, containers, caps=["--cap-drop", "ALL"])
    assert result.returncode != 0, "istio-iptables without NET_ADMIN must fail"
    message = result.stderr.lower()
    assert "permission denied" in message or "net_admin" in message, result.stderr
    assert "traceback" not in message, result.stderr  # one clear line, not a crash
    assert netfilter_state(topology) == before


def test_podman_overhead_floor(images: Images, topology: Topology, containers: list[str]) -> None:
    """The same container running /bin/true: how much of the init time is podman's own."""
    name = podman.container_name("floor")
    containers.append(name)
    args = ["--rm", "--name", name, "--network", f"ns:{topology.pod_path}"]
    started = time.monotonic()
    result = podman.run([*args, "--entrypoint", "/bin/true", images.init])
    TIMINGS["podman run of /bin/true in the same namespace (floor)"] = time.monotonic() - started
    assert result.returncode == 0, result.stderr
