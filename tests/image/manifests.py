"""Reading deploy/*.yaml: with PyYAML when the venv has it, else Debian's python3-yaml."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support import IN_CI, REPO

DEPLOY = REPO / "deploy"
INIT_MANIFEST = DEPLOY / "init-container.yaml"
CNI_MANIFEST = DEPLOY / "cni-daemonset.yaml"
SYSTEM_PYTHON = "/usr/bin/python3"
_TO_JSON = (
    "import json, sys, yaml; json.dump(list(yaml.safe_load_all(open(sys.argv[1]))), sys.stdout)"
)

# The args Istio's injector writes for istio-init by default (SPEC-istio §5.2, last block).
STANDARD_ARGS = [
    "istio-iptables",
    *("-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT"),
    *("-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"),
    "--log_output_level=default:info",
]


def load(path: Path) -> list[dict[str, Any]]:
    """Every document in a YAML file (empty documents dropped)."""
    try:
        import yaml  # type: ignore[import-untyped]

        docs = list(yaml.safe_load_all(path.read_text()))
    except ImportError:
        docs = _load_with_system_python(path)
    return [doc for doc in docs if doc is not None]


def _load_with_system_python(path: Path) -> list[Any]:
    # The venv has no PyYAML (not a project dependency); Debian's python3-yaml parses instead.
    try:
        result = subprocess.run(
            [SYSTEM_PYTHON, "-c", _TO_JSON, str(path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except FileNotFoundError:
        result = None
    if result is None or result.returncode != 0:
        detail = result.stderr.strip().splitlines()[-1:] if result else ["no /usr/bin/python3"]
        message = f"cannot parse YAML: no PyYAML in the venv, and {SYSTEM_PYTHON}: {detail}"
        if IN_CI:
            pytest.fail(message + " (apt-get install python3-yaml)", pytrace=False)
        pytest.skip(message)
    loaded: list[Any] = json.loads(result.stdout)
    return loaded


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
