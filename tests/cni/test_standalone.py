"""cni-plugin/build.sh's output runs without the venv's Python: the forwarder `meshnet-cni`,
with no agent to serve it, runs the standalone PyInstaller plugin beside it."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cni.fakes import FakeApi, pod_namespace, write_kubeconfig
from tests.netns.harness import require_root_netns
from tests.support import REPO

MESH_POD = {
    "kind": "Pod",
    "apiVersion": "v1",
    "metadata": {
        "name": "web",
        "namespace": "shop",
        "annotations": {"sidecar.istio.io/status": "{}"},
    },
    "spec": {"containers": [{"name": "app"}, {"name": "istio-proxy", "securityContext": {}}]},
}


@pytest.fixture(scope="module")
def executable(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        ["bash", str(REPO / "cni-plugin" / "build.sh"), str(out)],
        check=True,
        timeout=600,
        capture_output=True,
    )
    yield out / "meshnet-cni"


def _run(binary: Path, env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    # No PYTHONPATH, no venv on PATH: only the system tools the plugin drives.
    clean = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **env}
    return subprocess.run(
        [str(binary)],
        input=stdin,
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_version(executable: Path) -> None:
    standalone = executable.parent / "meshnet-cni-standalone" / "meshnet-cni"
    answers = [_run(binary, {"CNI_COMMAND": "VERSION"}) for binary in (executable, standalone)]
    assert all(result.returncode == 0 for result in answers), answers
    assert answers[0].stdout == answers[1].stdout
    assert "1.1.0" in json.loads(answers[0].stdout)["supportedVersions"]


def test_add_applies_the_pod_rules(executable: Path, tmp_path: Path) -> None:
    require_root_netns()
    config = {
        "cniVersion": "1.0.0",
        "name": "k8s",
        "type": "meshnet-cni",
        "cni_agent_run_dir": str(tmp_path),
        "pod_fetch_attempts": 2,
        "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "192.0.2.1/24"}]},
    }
    with FakeApi() as api, pod_namespace() as netns:
        api.pods[("shop", "web")] = MESH_POD
        write_kubeconfig(tmp_path, api.url)
        env = {
            "CNI_COMMAND": "ADD",
            "CNI_CONTAINERID": "c1",
            "CNI_NETNS": netns,
            "CNI_IFNAME": "eth0",
            "CNI_PATH": "/usr/lib/cni",
            "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web",
        }
        result = _run(executable, env, json.dumps(config))
        saved = subprocess.run(
            ["ip", "netns", "exec", os.path.basename(netns), "iptables-save"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    assert result.returncode == 0, result.stdout + result.stderr
    assert "running the standalone plugin" in result.stderr
    assert json.loads(result.stdout)["ips"] == config["prevResult"]["ips"]
    assert "-A ISTIO_OUTPUT -j ISTIO_REDIRECT" in saved
