"""Reading deploy/*.yaml with PyYAML (a runtime dependency of meshnet)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.support.repo import REPO

DEPLOY = REPO / "deploy"
INIT_MANIFEST = DEPLOY / "init-container.yaml"
CNI_MANIFEST = DEPLOY / "cni-daemonset.yaml"
# The args Istio's injector writes for istio-init by default (its injection-template.yaml).
STANDARD_ARGS = [
    "istio-iptables",
    *("-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT"),
    *("-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"),
    "--log_output_level=default:info",
]


def load(path: Path) -> list[dict[str, Any]]:
    """Every document in a YAML file (empty documents dropped)."""
    docs = list(yaml.safe_load_all(path.read_text()))
    return [doc for doc in docs if doc is not None]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc.get("kind") == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def init_container() -> dict[str, Any]:
    """The istio-init container of deploy/init-container.yaml."""
    pod = one(load(INIT_MANIFEST), "Pod")
    containers: list[dict[str, Any]] = pod["spec"]["initContainers"]
    return next(c for c in containers if c["name"] == "istio-init")


def installer_env() -> dict[str, str]:
    """The installer's options as the DaemonSet gives them: the ConfigMap's data."""
    config = one(load(CNI_MANIFEST), "ConfigMap")
    return {key: str(value) for key, value in config["data"].items()}


def installer_container() -> dict[str, Any]:
    daemonset = one(load(CNI_MANIFEST), "DaemonSet")
    container: dict[str, Any] = daemonset["spec"]["template"]["spec"]["containers"][0]
    return container
