"""A real CNI chain, driven by libcni (the reference runtime library): bridge → meshnet-cni.

`libcni_driver/main.go` is built offline with Debian's Go toolchain and libcni sources
(packages `golang-go` and `golang-github-appc-cni-dev`). It runs inside a throw-away "node"
namespace, so the bridge plugin's bridge and veth ends never touch the host; the pod
namespace is made separately, as a runtime does. The Kubernetes API (`FakeApi`) listens on
the node namespace's 127.0.0.1, where the plugin looks for it. `meshnet-cni` is the installed
forwarder; every test runs with a `meshnet cni agent` in the node namespace serving it, and
without one (the forwarder runs the standalone plugin).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshnet.host import netns
from tests.cni.agents import Agent, forwarder_dir, plugin_dir
from tests.cni.fakes import FakeApi, in_netns, mesh_pod, write_kubeconfig
from tests.netns.harness import Topology, fmt_addr, require_root_netns, split_addr

pytestmark = pytest.mark.netns

HERE = Path(__file__).parent
DRIVER_SRC = HERE / "libcni_driver"
GOPATH = Path("/usr/share/gocode")
LIBCNI = GOPATH / "src/github.com/containernetworking/cni/libcni"
GO_PACKAGES = ("golang-go", "golang-github-appc-cni-dev")
REFERENCE_PLUGINS = ("bridge", "host-local", "loopback")
SUBNET = "198.51.100.0/24"
GATEWAY = "198.51.100.1"
BRIDGE = "mnt-br0"
APP_UID = 1000
PROXY_UID = 1337
DRIVER_TIMEOUT = 120.0


# --------------------------------------------------------------------------- the driver


def _go_missing() -> list[str]:
    missing = []
    if shutil.which("go") is None:
        missing.append("golang-go")
    if not LIBCNI.is_dir():
        missing.append("golang-github-appc-cni-dev")
    return missing


def _install_go() -> None:
    """Install the Debian packages when absent (scripts/setup.sh should have done it)."""
    missing = _go_missing()
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.fail(f"libcni driver needs Debian packages {missing}; install them", pytrace=False)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *GO_PACKAGES],
    )
    for argv in steps:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            pytest.fail(
                f"cannot install {list(GO_PACKAGES)} ({' '.join(argv)}): {done.stderr[-2000:]}",
                pytrace=False,
            )
    if still := _go_missing():
        pytest.fail(f"{still} still missing after apt-get install", pytrace=False)


def build_driver(out_dir: Path) -> Path:
    """`go build` in GOPATH mode against Debian's libcni sources: no network needed."""
    binary = out_dir / "driver"
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": str(GOPATH),
        "GOPROXY": "off",
        "GOFLAGS": "",
        "CGO_ENABLED": "0",
        "GOCACHE": str(out_dir / "gocache"),
    }
    built = subprocess.run(
        ["go", "build", "-o", str(binary), "."],
        cwd=DRIVER_SRC,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if built.returncode != 0:
        pytest.fail(f"go build of the libcni driver failed: {built.stderr}", pytrace=False)
    shutil.rmtree(out_dir / "gocache", ignore_errors=True)
    return binary


@pytest.fixture(scope="session")
def driver() -> Iterator[Path]:
    require_root_netns()
    _install_go()
    with tempfile.TemporaryDirectory(prefix="meshnet-libcni-") as tmp:
        yield build_driver(Path(tmp))


@pytest.fixture(scope="session")
def forwarder() -> Iterator[Path]:
    with forwarder_dir() as path:
        yield path


def make_bin_dir(bin_dir: Path, forwarder: Path) -> None:
    """The reference plugins (symlinks), `meshnet-cni` (the forwarder) and its fallback."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in REFERENCE_PLUGINS:
        (bin_dir / name).symlink_to(Path("/usr/lib/cni") / name)
    plugin_dir(bin_dir, forwarder)


def conflist(work: Path) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": "meshnet-chain",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": SUBNET, "gateway": GATEWAY}]],
                    "dataDir": str(work / "ipam"),
                },
            },
            {
                "type": "meshnet-cni",
                "cni_agent_run_dir": str(work / "run"),
                "pod_namespace": "istio-system",
                "exclude_namespaces": ["kube-system"],
                "pod_fetch_attempts": 3,
                "pod_fetch_interval": 0.1,
            },
        ],
    }


# --------------------------------------------------------------------------- the node


@dataclass
class Node:
    topo: Topology  # owns the namespaces and listeners, and removes them all
    name: str
    api: FakeApi
    driver: Path
    work: Path
    conflist: Path
    served: bool  # a `meshnet cni agent` serves the forwarder

    def run(
        self, command: str, pod_ns: str, container_id: str, pod: str = "web-0"
    ) -> subprocess.CompletedProcess[str]:
        args = (
            f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod};"
            f"K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID=uid-{container_id}"
        )
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("CNI_")},
            "DRIVER_CNI_PATH": str(self.work / "bin"),
            "DRIVER_CACHE_DIR": str(self.work / "cache"),
        }
        argv = [str(self.driver), command, str(self.conflist), f"/var/run/netns/{pod_ns}"]
        argv += [container_id, "eth0", args]
        result = subprocess.run(
            ["ip", "netns", "exec", self.name, *argv],
            env=env,
            capture_output=True,
            text=True,
            timeout=DRIVER_TIMEOUT,
            check=False,
        )
        if result.returncode == 0:  # libcni passes the plugin's stderr on only then
            fell_back = "agent unreachable; running the standalone plugin" in result.stderr
            assert fell_back != self.served, result.stderr
        return result

    def new_pod_ns(self, tag: str) -> str:
        name = f"mnt-{self.topo.suffix}-{tag}"
        self.topo.add_netns(name)
        return name


@pytest.fixture(params=["agent", "fallback"])
def node(request: pytest.FixtureRequest, driver: Path, forwarder: Path) -> Iterator[Node]:
    topo = Topology()
    served = request.param == "agent"
    with tempfile.TemporaryDirectory(prefix="meshnet-chain-") as tmp:
        work = Path(tmp)
        agent = Agent(work / "run", netns=f"mnt-{topo.suffix}-node")
        try:
            name = f"mnt-{topo.suffix}-node"
            topo.add_netns(name)
            with netns.entered(name):  # the API's socket lives in the node namespace
                api = FakeApi()
            with api:
                api.pods[("default", "web-0")] = mesh_pod("web-0", "default")
                write_kubeconfig(work / "run", api.url)
                make_bin_dir(work / "bin", forwarder)
                path = work / "chain.conflist"
                path.write_text(json.dumps(conflist(work), indent=2))
                if served:
                    agent.start()
                yield Node(topo, name, api, driver, work, path, served)
        finally:
            agent.close()
            topo.close()


def istio_lines(ns: str) -> list[str]:
    save = in_netns(ns, ["iptables-save"])
    assert save.returncode == 0, save.stderr
    return [line for line in save.stdout.splitlines() if "ISTIO" in line]


def succeeded(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"driver exit {result.returncode}: {result.stderr}"
    return result.stdout


# --------------------------------------------------------------------------- tests


def test_chain_add_captures_traffic_check_detects_drift_del_cleans(node: Node) -> None:
    pod = node.new_pod_ns("pod")
    result = json.loads(succeeded(node.run("add", pod, "ctr-1")))
    # the chain's result is the bridge's, passed through meshnet-cni unchanged
    assert result["cniVersion"] == "1.0.0"
    pod_ip = result["ips"][0]["address"].split("/")[0]
    assert pod_ip.startswith("198.51.100.") and pod_ip != GATEWAY, result
    assert result["ips"][0]["gateway"] == GATEWAY
    assert any(i.get("sandbox") == f"/var/run/netns/{pod}" for i in result["interfaces"])
    lines = istio_lines(pod)
    for chain in ("ISTIO_INBOUND", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT", "ISTIO_REDIRECT"):
        assert f":{chain} - [0:0]" in lines, lines
    assert node.api.requests == ["/api/v1/namespaces/default/pods/web-0"]
    assert istio_lines(node.name) == [], "rules must go to the pod, not the node"

    # real traffic: the app's connection to the gateway is captured at the pod's 15001
    topo = node.topo
    topo.start_listeners(pod, "proxy", [15001, 15006])
    topo.start_listeners(node.name, "node", [8080])
    out = topo.probe(pod, GATEWAY, 8080, uid=APP_UID, gid=APP_UID)
    assert out.landed_at("proxy", 15001), out.where
    assert out.orig_dst == fmt_addr(GATEWAY, 8080), out.where
    # the proxy's own uid reaches the node through the bridge
    direct = topo.probe(pod, GATEWAY, 8080, uid=PROXY_UID, gid=PROXY_UID)
    assert direct.landed_at("node", 8080), direct.where
    assert direct.peer_ip == pod_ip
    # inbound from the node to the pod is captured at 15006
    inbound = topo.probe(node.name, pod_ip, 8080)
    assert inbound.landed_at("proxy", 15006), inbound.where
    assert inbound.orig_dst == fmt_addr(pod_ip, 8080), inbound.where
    assert split_addr(inbound.peer or "")[0] == GATEWAY

    succeeded(node.run("check", pod, "ctr-1"))
    deleted = in_netns(pod, ["iptables", "-t", "nat", "-D", "ISTIO_OUTPUT", "-j", "ISTIO_REDIRECT"])
    assert deleted.returncode == 0, deleted.stderr
    drifted = node.run("check", pod, "ctr-1")
    assert drifted.returncode != 0, "CHECK passed with a rule missing"
    assert "drift" in drifted.stderr and "ISTIO_OUTPUT" in drifted.stderr, drifted.stderr

    succeeded(node.run("del", pod, "ctr-1"))
    assert istio_lines(pod) == []
    links = in_netns(pod, ["ip", "-o", "link"]).stdout
    assert "eth0" not in links, "bridge DEL should have removed the pod's veth"
    succeeded(node.run("del", pod, "ctr-1"))  # DEL twice, as runtimes do


def test_chain_skipped_pod_gets_an_address_but_no_rules(node: Node) -> None:
    node.api.pods[("default", "plain-0")] = mesh_pod("plain-0", proxy=False)
    pod = node.new_pod_ns("plain")
    result = json.loads(succeeded(node.run("add", pod, "ctr-2", pod="plain-0")))
    assert result["ips"][0]["address"].startswith("198.51.100.")
    assert istio_lines(pod) == []
    succeeded(node.run("check", pod, "ctr-2", pod="plain-0"))
    succeeded(node.run("del", pod, "ctr-2", pod="plain-0"))


def test_chain_add_fails_closed_when_the_pod_cannot_be_fetched(node: Node) -> None:
    pod = node.new_pod_ns("gone")
    failed = node.run("add", pod, "ctr-3", pod="no-such-pod")
    assert failed.returncode != 0
    assert "HTTP 404" in failed.stderr, failed.stderr
    assert istio_lines(pod) == []
    # the runtime cleans up after a failed ADD with DEL, which must succeed
    succeeded(node.run("del", pod, "ctr-3", pod="no-such-pod"))


def test_chain_del_after_the_pod_namespace_is_gone(node: Node) -> None:
    pod = node.new_pod_ns("short")
    succeeded(node.run("add", pod, "ctr-4"))
    subprocess.run(["ip", "netns", "del", pod], check=True)
    succeeded(node.run("del", pod, "ctr-4"))
