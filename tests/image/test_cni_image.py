"""The CNI node image installs the plugin into host dirs, keeps it ready, and cleans up on SIGTERM.

The container runs as the DaemonSet runs it (deploy/cni-daemonset.yaml): the manifest's args,
the ConfigMap's options as env, a read-only root file system, no capabilities, and the host's
CNI conf, bin and run dirs mounted in, here temporary dirs the test made. Its network is a
namespace the test made, so /readyz is probed on that namespace's loopback.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.netns.harness import PYTHON, Topology

from . import manifests, podman
from .conftest import Images

PLUGIN = "meshnet-cni"
BRIDGE_CONFLIST = {
    "cniVersion": "1.0.0",
    "name": "k8s-pod-network",
    "plugins": [
        {
            "type": "bridge",
            "bridge": "cni0",
            "ipam": {"type": "host-local", "subnet": "192.0.2.0/24"},
        },
        {"type": "portmap", "capabilities": {"portMappings": True}},
    ],
}
CONFLIST_NAME = "10-bridge.conflist"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
READY_TIMEOUT = 20.0  # the installer is ready in about a second
_READYZ = (
    "import sys, urllib.request\n"
    "try:\n"
    "    sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=2).status == 200 else 1)\n"
    "except Exception:\n"
    "    sys.exit(1)\n"
)


@dataclass(frozen=True)
class HostDirs:
    """Temporary stand-ins for the node's dirs, mounted where the DaemonSet mounts them."""

    conf: Path
    bin: Path
    run: Path
    service_account: Path
    netns: Path

    @property
    def conflist(self) -> Path:
        return self.conf / CONFLIST_NAME

    @property
    def plugin(self) -> Path:
        return self.bin / PLUGIN

    @property
    def kubeconfig(self) -> Path:
        return self.run / f"{PLUGIN}-kubeconfig"


@pytest.fixture
def host_dirs(tmp_path: Path) -> HostDirs:
    names = ("net.d", "bin", "run", "serviceaccount", "netns")
    dirs = HostDirs(*(tmp_path / name for name in names))
    for path in (dirs.conf, dirs.bin, dirs.run, dirs.service_account, dirs.netns):
        path.mkdir()
    dirs.conflist.write_text(json.dumps(BRIDGE_CONFLIST, indent=2) + "\n")
    (dirs.service_account / "token").write_text("test-token\n")
    (dirs.service_account / "ca.crt").write_text(
        "-----BEGIN CERTIFICATE-----\nTUVTSE5FVCBURVNUIENB\n-----END CERTIFICATE-----\n"
    )
    return dirs


def _mounts(dirs: HostDirs) -> list[str]:
    """The DaemonSet's volumeMounts, each pointed at a temporary dir."""
    container = manifests.installer_container()
    sources = {
        "cni-bin-dir": dirs.bin,
        "cni-net-dir": dirs.conf,
        "cni-run-dir": dirs.run,
        "host-proc": Path("/proc"),  # the repair controller's view of the node's processes
        "host-netns": dirs.netns,  # the node agent's view of the runtime's pod namespaces
    }
    flags = [
        f"--volume={sources[m['name']]}:{m['mountPath']}{':ro' if m.get('readOnly') else ''}"
        for m in container["volumeMounts"]
    ]
    return [*flags, f"--volume={dirs.service_account}:{SA_DIR}:ro"]


def _env() -> list[str]:
    env = {
        **manifests.installer_env(),
        "POD_NAMESPACE": "kube-system",  # the DaemonSet's fieldRef
        "KUBERNETES_NODE_NAME": "node-1",
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": "6443",
    }
    return [f"--env={key}={value}" for key, value in env.items()]


def start_installer(images: Images, topo: Topology, dirs: HostDirs, containers: list[str]) -> str:
    container = manifests.installer_container()
    name = podman.container_name("cni")
    containers.append(name)
    args = [
        "--detach",
        "--name",
        name,
        "--network",
        f"ns:{topo.pod_path}",
        "--user",
        "0:0",
        "--cap-drop",
        "ALL",
        "--read-only",  # readOnlyRootFilesystem: true, and no tmpfs a kubelet would not add
        "--read-only-tmpfs=false",
        *_mounts(dirs),
        *_env(),
        images.cni,
        *container["args"],
    ]
    result = podman.run(args)
    assert result.returncode == 0, f"podman run failed: {result.stderr}"
    return name


def plugin_types(path: Path) -> list[str]:
    try:
        config: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [plugin.get("type", "") for plugin in config.get("plugins", [])]


def plugin_version_works(binary: Path) -> bool:
    """The installed plugin runs on the host, outside any image: CNI_COMMAND=VERSION."""
    if not os.path.lexists(binary):
        return False
    result = subprocess.run(
        [str(binary)],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": "VERSION"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return result.returncode == 0 and "supportedVersions" in result.stdout


def ready(topo: Topology) -> bool:
    result = topo.exec(topo.pod_ns, [PYTHON, "-c", _READYZ, "http://127.0.0.1:8000/readyz"])
    return result.returncode == 0


def missing_pieces(dirs: HostDirs) -> list[str]:
    """What a complete installation lacks (empty: all there)."""
    checks: dict[str, Callable[[], bool]] = {
        f"{PLUGIN} in {CONFLIST_NAME}": lambda: PLUGIN in plugin_types(dirs.conflist),
        f"{dirs.plugin} runs VERSION": lambda: plugin_version_works(dirs.plugin),
        "kubeconfig written": lambda: dirs.kubeconfig.exists(),
    }
    return [what for what, check in checks.items() if not check()]


def wait_ready(topo: Topology, name: str) -> None:
    """Until /readyz answers 200: the installer says it has installed everything."""
    deadline = time.monotonic() + READY_TIMEOUT
    while not ready(topo):
        state = podman.podman(["inspect", "--format", "{{.State.Status}}", name]).stdout.strip()
        if state != "running" or time.monotonic() > deadline:
            pytest.fail(f"installer {state}, never ready:\n{container_logs(name)}", pytrace=False)
        time.sleep(0.3)


def container_logs(name: str) -> str:
    logs = podman.podman(["logs", name])
    return logs.stdout + logs.stderr


def stop(name: str) -> int:
    """SIGTERM (as the kubelet does), wait for the exit; returns its exit code."""
    result = podman.podman(["stop", "--time", "10", name], timeout=30)
    assert result.returncode == 0, result.stderr
    code = podman.podman(["inspect", "--format", "{{.State.ExitCode}}", name]).stdout.strip()
    return int(code)


def test_installer_installs_then_cleans_up_on_sigterm(
    images: Images, topology: Topology, host_dirs: HostDirs, containers: list[str]
) -> None:
    name = start_installer(images, topology, host_dirs, containers)
    wait_ready(topology, name)
    missing = missing_pieces(host_dirs)
    assert not missing, f"ready, but missing {missing}:\n{container_logs(name)}"
    entry = json.loads(host_dirs.conflist.read_text())["plugins"][-1]
    assert entry["cni_agent_run_dir"] == manifests.installer_env()["CNI_AGENT_RUN_DIR"]
    assert entry["exclude_namespaces"] == ["kube-system"]

    code = stop(name)
    assert code == 0, f"installer exited {code} on SIGTERM:\n{container_logs(name)}"
    assert plugin_types(host_dirs.conflist) == ["bridge", "portmap"]
    assert not host_dirs.kubeconfig.exists()
    assert not os.path.lexists(host_dirs.plugin)
    # Exactly what it added is removed: the bin dir was empty before.
    assert sorted(p.name for p in host_dirs.bin.iterdir()) == []
