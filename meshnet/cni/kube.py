"""One Kubernetes GET per pod, with the plugin's kubeconfig: stdlib only.

The plugin runs once per pod sandbox, possibly 110 at once on a node; a Kubernetes client
library costs 0.5-1.4 s per process here, http.client ~0.09 s.
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import threading
import time
import urllib.parse
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
    url = urllib.parse.urlsplit(config.server)
    path = f"{url.path.rstrip('/')}/api/v1/namespaces/{namespace}/pods/{name}"
    headers = {"Accept": "application/json"}
    if config.token:
        headers["Authorization"] = f"Bearer {config.token}"
    while True:
        connection, kept = _connection(config, url)
        try:
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            body = response.read()
        except (http.client.HTTPException, OSError) as err:
            connection.close()
            if kept:
                continue  # the server closed a kept-alive connection: once more on a new one
            raise _Transient(str(err)) from None
        if not response.will_close:
            _give_back(config, connection)
        break
    if response.status in (401, 403, 404):  # definitive: retrying cannot help
        raise KubeError(
            f"failed to get pod {namespace}/{name}: HTTP {response.status} {response.reason}"
        )
    if response.status != 200:
        raise _Transient(f"HTTP {response.status} {response.reason}")
    try:
        pod: dict[str, Any] = json.loads(body)
    except ValueError as err:
        raise _Transient(str(err)) from None
    return pod


# Kept-alive connections and TLS contexts, shared by the threads of a resident agent (one
# process serving many pods); a standalone plugin process uses one of each and exits.
_LOCK = threading.Lock()
_IDLE: dict[tuple[str, str], list[http.client.HTTPConnection]] = {}
_CONTEXTS: dict[tuple[bytes | None, bool], ssl.SSLContext] = {}


def _connection(
    config: Kubeconfig, url: urllib.parse.SplitResult
) -> tuple[http.client.HTTPConnection, bool]:
    """An idle connection to the server (True: kept alive from an earlier GET) or a new one."""
    with _LOCK:
        idle = _IDLE.get((config.server, config.token))
        if idle:
            return idle.pop(), True
    host, port = url.hostname or "", url.port
    context = _tls(config)
    if context is None:
        return http.client.HTTPConnection(host, port, timeout=5), False
    return http.client.HTTPSConnection(host, port, timeout=5, context=context), False


def _give_back(config: Kubeconfig, connection: http.client.HTTPConnection) -> None:
    with _LOCK:
        _IDLE.setdefault((config.server, config.token), []).append(connection)


def _tls(config: Kubeconfig) -> ssl.SSLContext | None:
    if not config.server.startswith("https:"):
        return None
    key = (config.ca_data, config.insecure)
    with _LOCK:
        if key in _CONTEXTS:
            return _CONTEXTS[key]
    if config.insecure:
        context = ssl._create_unverified_context()  # the kubeconfig asks for it explicitly
    else:
        context = ssl.create_default_context()
        if config.ca_data:
            context.load_verify_locations(cadata=config.ca_data.decode())
    with _LOCK:
        return _CONTEXTS.setdefault(key, context)
