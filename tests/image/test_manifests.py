"""deploy/*.yaml and the Dockerfiles, checked without a cluster or a build.

`kubectl apply --dry-run=client` needs an API server for discovery even with
--validate=false, so it cannot run offline; these checks cover what it would catch for these
files (required fields, references between objects, the DaemonSet selector) plus what matters
here (Istio's exact init args and security context, paths the installer and host must share).
With the `kubernetes-validate` package installed, every object is also checked against the
Kubernetes OpenAPI schema.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from meshnet.cni.install.settings import ENV_OPTIONS, Settings
from tests.support.repo import REPO

from . import manifests
from .manifests import CNI_MANIFEST, INIT_MANIFEST, STANDARD_ARGS, load, one

NAMESPACED = {"ServiceAccount", "ConfigMap", "DaemonSet", "Pod"}
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def daemonset() -> dict[str, Any]:
    return one(load(CNI_MANIFEST), "DaemonSet")


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = daemonset()["spec"]["template"]["spec"]
    return spec


@pytest.mark.parametrize("path", [INIT_MANIFEST, CNI_MANIFEST], ids=lambda p: p.name)
def test_every_object_has_kind_api_version_and_name(path: Path) -> None:
    docs = load(path)
    assert docs, f"{path} has no objects"
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), doc
        assert doc.get("metadata", {}).get("name"), doc
        if doc["kind"] in NAMESPACED and path == CNI_MANIFEST:
            assert doc["metadata"].get("namespace") == "kube-system", doc["metadata"]


def test_init_args_are_exactly_istios_injected_args() -> None:
    assert manifests.init_container()["args"] == STANDARD_ARGS


def test_init_security_context_and_resources_match_istio() -> None:
    container = manifests.init_container()
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        "privileged": False,
        "readOnlyRootFilesystem": False,
        "runAsGroup": 0,
        "runAsNonRoot": False,
        "runAsUser": 0,
    }
    assert container["resources"] == {
        "limits": {"cpu": "2", "memory": "1Gi"},
        "requests": {"cpu": "10m", "memory": "40Mi"},
    }


def test_images_are_the_ones_build_sh_tags() -> None:
    assert manifests.init_container()["image"] == f"localhost/meshnet-init:{VERSION}"
    assert manifests.installer_container()["image"] == f"localhost/meshnet-cni:{VERSION}"


def test_daemonset_selector_matches_its_template_labels() -> None:
    spec = daemonset()["spec"]
    selector = spec["selector"]["matchLabels"]
    labels = spec["template"]["metadata"]["labels"]
    assert selector and selector.items() <= labels.items()


def test_service_account_exists_and_is_bound_to_a_role_that_gets_pods() -> None:
    docs = load(CNI_MANIFEST)
    account = one(docs, "ServiceAccount")["metadata"]
    assert pod_spec()["serviceAccountName"] == account["name"]
    binding = one(docs, "ClusterRoleBinding")
    subject = {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
    assert subject in binding["subjects"]
    role = one(docs, "ClusterRole")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert any(
        "pods" in rule["resources"] and "get" in rule["verbs"] and rule["apiGroups"] == [""]
        for rule in role["rules"]
    )


def test_daemonset_runs_on_every_node_in_the_host_network() -> None:
    spec = pod_spec()
    assert spec["hostNetwork"] is True
    assert {"operator": "Exists"} in spec["tolerations"]  # no key: tolerates every taint
    assert spec["priorityClassName"] == "system-node-critical"


def test_installer_readiness_probe_is_readyz_on_8000() -> None:
    probe = manifests.installer_container()["readinessProbe"]["httpGet"]
    assert (probe["path"], probe["port"]) == ("/readyz", 8000)
    assert manifests.installer_env()["MESHNET_CNI_READINESS_PORT"] == "8000"


def test_installer_env_comes_from_the_configmap_and_the_downward_api() -> None:
    container = manifests.installer_container()
    config = one(load(CNI_MANIFEST), "ConfigMap")
    assert {"configMapRef": {"name": config["metadata"]["name"]}} in container["envFrom"]
    assert all(isinstance(value, str) for value in config["data"].values()), config["data"]
    env = {item["name"]: item for item in container["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def test_host_dirs_are_mounted_where_the_installer_looks() -> None:
    spec, env = pod_spec(), manifests.installer_env()
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in manifests.installer_container()["volumeMounts"]}
    assert set(mounts.values()) <= volumes.keys(), "a volumeMount names no volume"

    def host_path(container_path: str) -> str:
        path: str = volumes[mounts[container_path]]["hostPath"]["path"]
        return path

    assert host_path(env["MOUNTED_CNI_NET_DIR"]) == "/etc/cni/net.d"
    assert host_path(env["MESHNET_CNI_BIN_DIRS"]) == "/opt/cni/bin"
    # The host's runtime runs the plugin, which reads the kubeconfig at the path the
    # installer writes into the CNI config: the run dir must be the same path on both sides.
    assert host_path(env["CNI_AGENT_RUN_DIR"]) == env["CNI_AGENT_RUN_DIR"]


def test_manifests_pass_the_kubernetes_schema() -> None:
    validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate not installed (optional schema check)"
    )
    for path in (INIT_MANIFEST, CNI_MANIFEST):
        for doc in load(path):
            validate.validate(doc, "1.30.0", strict=True)


# --------------------------------------------------------------------------- Dockerfiles


def _stage(dockerfile: str, name: str) -> str:
    text = (REPO / dockerfile).read_text()
    match = re.search(rf"^FROM \S+ AS {name}\n(.*?)(?=^FROM |\Z)", text, re.M | re.S)
    assert match, f"{dockerfile} has no stage {name}"
    lines = match.group(0).splitlines()
    while lines and (not lines[-1].strip() or lines[-1].startswith("#")):
        lines.pop()  # the next stage's heading comment
    return "\n".join(lines)


def test_both_dockerfiles_share_one_build_stage() -> None:
    # Identical text means identical cache keys: the CNI build reuses the init build's layers.
    assert _stage("Dockerfile.init", "build") == _stage("Dockerfile.cni", "build")


@pytest.mark.parametrize("dockerfile", ["Dockerfile.init", "Dockerfile.cni"])
def test_dockerfile_base_is_an_argument_and_entrypoint_is_meshnet(dockerfile: str) -> None:
    text = (REPO / dockerfile).read_text()
    assert "ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim\n" in text
    assert 'ENTRYPOINT ["meshnet"]\n' in text


def test_init_image_is_the_final_stage_of_dockerfile_init() -> None:
    stages = re.findall(r"^FROM \S+ AS (\S+)$", (REPO / "Dockerfile.init").read_text(), re.M)
    assert stages[-1] == "init"  # a plain `podman build -f Dockerfile.init .` gives it


# --------------------------------------------------------------------------- node agent


def installer_settings() -> Settings:
    """The ConfigMap's options read by the installer's own parser (so they are valid)."""
    return Settings.from_env(one(load(CNI_MANIFEST), "ConfigMap")["data"])


def test_configmap_keys_are_installer_options() -> None:
    known = {option.name for option in ENV_OPTIONS}
    data = one(load(CNI_MANIFEST), "ConfigMap")["data"]
    assert set(data) <= known, f"not installer options: {sorted(set(data) - known)}"


def test_cluster_role_grants_exactly_what_the_enabled_repair_mode_needs() -> None:
    repair = installer_settings().repair
    needed = {("pods", "get")}  # the plugin reads each pod
    if repair.enabled:
        needed |= {("pods", "list"), ("pods", "watch")}
        by_action = {"delete": {("pods", "delete")}, "label": {("pods/status", "patch")}}
        needed |= by_action.get(repair.action or "", set())
    rules = one(load(CNI_MANIFEST), "ClusterRole")["rules"]
    assert all(rule["apiGroups"] == [""] for rule in rules)
    granted = {(res, verb) for rule in rules for res in rule["resources"] for verb in rule["verbs"]}
    assert granted == needed


def test_metrics_port_is_declared_and_annotated_for_scraping() -> None:
    port = installer_settings().monitoring_port
    assert port == 15014  # Istio's
    annotations = daemonset()["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(port),
        "prometheus.io/path": "/metrics",
    }
    ports = manifests.installer_container()["ports"]
    assert {"name": "metrics", "containerPort": port, "protocol": "TCP"} in ports


def test_repair_mode_has_the_host_proc_node_name_and_capabilities_it_needs() -> None:
    repair = installer_settings().repair
    assert repair.enabled and repair.action == "repair"
    container = manifests.installer_container()
    env = {item["name"]: item for item in container["env"]}
    assert env["REPAIR_NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    proc = mounts[str(repair.host_proc)]
    assert proc.get("readOnly") is True
    volumes = {volume["name"]: volume for volume in pod_spec()["volumes"]}
    assert volumes[proc["name"]]["hostPath"] == {"path": "/proc", "type": "Directory"}
    capabilities = container["securityContext"]["capabilities"]
    assert capabilities["drop"] == ["ALL"]
    assert set(capabilities["add"]) == {"NET_ADMIN", "NET_RAW", "SYS_PTRACE", "SYS_ADMIN"}
    assert container["securityContext"]["privileged"] is False
