"""One Kubernetes GET per pod, with the plugin's kubeconfig: stdlib only.

The plugin runs once per pod sandbox, possibly 110 at once on a node; a Kubernetes client
library costs 0.5-1.4 s per process here (DESIGN.md), urllib ~0.09 s.
"""

from __future__ import annotations

import base64
import json
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from meshnet.errors import MeshnetError


class KubeError(MeshnetError):
    """The pod could not be fetched."""


@dataclass(frozen=True, slots=True)
class Kubeconfig:
    server: str
    token: str
    ca_data: bytes | None
    insecure: bool


def load_kubeconfig(path: str) -> Kubeconfig:
    """Read the installer's kubeconfig (the few keys it writes; no YAML library needed)."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as err:
        raise KubeError(
            f"failed to createNewK8sClient: cannot read {path}: {err.strerror}"
        ) from err
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().lstrip("- ").partition(":")
        if sep and key in (
            "server",
            "token",
            "certificate-authority-data",
            "insecure-skip-tls-verify",
        ):
            values.setdefault(key, value.strip().strip('"'))
    if "server" not in values:
        raise KubeError(f"failed to createNewK8sClient: no server in {path}")
    ca = values.get("certificate-authority-data")
    return Kubeconfig(
        server=values["server"],
        token=values.get("token", ""),
        ca_data=base64.b64decode(ca) if ca else None,
        insecure=values.get("insecure-skip-tls-verify") == "true",
    )


def get_pod(
    config: Kubeconfig, namespace: str, name: str, attempts: int, interval: float
) -> dict[str, Any]:
    """GET the pod, retrying transient failures; fail closed when the budget is spent."""
    last = "no attempt made"
    for attempt in range(max(1, attempts)):
        if attempt:
            time.sleep(interval)
        try:
            return _get_once(config, namespace, name)
        except _Transient as err:
            last = str(err)
    raise KubeError(
        f"failed to get pod {namespace}/{name} after {max(1, attempts)} attempts: {last}"
    )


class _Transient(Exception):
    pass


def _get_once(config: Kubeconfig, namespace: str, name: str) -> dict[str, Any]:
    url = f"{config.server.rstrip('/')}/api/v1/namespaces/{namespace}/pods/{name}"
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if config.token:
        request.add_header("Authorization", f"Bearer {config.token}")
    try:
        with urllib.request.urlopen(request, timeout=5, context=tls_context(config)) as response:
            pod: dict[str, Any] = json.load(response)
            return pod
    except urllib.error.HTTPError as err:
        if err.code in (401, 403, 404):  # definitive: retrying cannot help
            raise KubeError(
                f"failed to get pod {namespace}/{name}: HTTP {err.code} {err.reason}"
            ) from None
        raise _Transient(f"HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise _Transient(str(getattr(err, "reason", err))) from None


def tls_context(config: Kubeconfig) -> ssl.SSLContext | None:
    """The TLS policy of the kubeconfig (None for plain http); shared with the pod watch."""
    if not config.server.startswith("https:"):
        return None
    if config.insecure:
        return ssl._create_unverified_context()  # the kubeconfig asks for it explicitly
    context = ssl.create_default_context()
    if config.ca_data:
        context.load_verify_locations(cadata=config.ca_data.decode())
    return context
