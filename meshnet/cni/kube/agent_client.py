"""The node agent's pod calls: list, watch, delete, patch, over stdlib `http.client`.

A resident process, so import time matters little; a Kubernetes client library was measured
and not taken (README "Node agent"): the `kubernetes` package costs 0.34 s and 35 MB of
memory to import here and adds 126 MB to the node image, and it still leaves the informer
loop (relist on 410 Gone, resume from resourceVersion, back off) to the caller. What it would
do for us is a dozen lines of HTTP below. The kubeconfig is the one the installer writes for
the plugin, read again for every request, so a rotated token is picked up.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from meshnet.cni.kube import plugin_client
from meshnet.errors import ApiError, Gone, MeshnetError

REQUEST_TIMEOUT = 10.0
WATCH_SLACK = 30.0  # the server ends a watch after timeoutSeconds; this long past it, we do


@dataclass(frozen=True, slots=True)
class Selectors:
    field: str = ""
    label: str = ""

    def query(self, **extra: str) -> str:
        params = {"fieldSelector": self.field, "labelSelector": self.label, **extra}
        return urllib.parse.urlencode({k: v for k, v in params.items() if v})


@dataclass(frozen=True, slots=True)
class PodList:
    items: list[dict[str, Any]]
    resource_version: str


class PodApi:
    """Pod calls against the API server named by `load()`'s kubeconfig."""

    def __init__(self, load: Callable[[], plugin_client.Kubeconfig]) -> None:
        self._load = load
        self._lock = threading.Lock()
        self._watching: http.client.HTTPConnection | None = None
        self._closed = False

    def list_pods(self, selectors: Selectors) -> PodList:
        body = self._call("GET", "/api/v1/pods?" + selectors.query(), None)
        items = body.get("items") or []
        return PodList(items, str((body.get("metadata") or {}).get("resourceVersion", "")))

    def watch_pods(
        self, selectors: Selectors, resource_version: str, timeout_seconds: int
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """(type, object) per watch event until the server ends the watch or `abort()`."""
        query = selectors.query(
            watch="1",
            resourceVersion=resource_version,
            allowWatchBookmarks="true",
            timeoutSeconds=str(timeout_seconds),
        )
        connection, config = self._connect(timeout_seconds + WATCH_SLACK)
        with self._lock:
            if self._closed:
                connection.close()
                return
            self._watching = connection
        try:
            response = _send(connection, config, "GET", "/api/v1/pods?" + query, None, {})
            _raise_for_status(response, "watch pods")
            while line := response.readline():
                if not line.strip():
                    continue
                event = _json(line, "watch event")
                kind, obj = str(event.get("type", "")), event.get("object") or {}
                if kind == "ERROR":
                    code = int(obj.get("code") or 0)
                    error = Gone if code == 410 else ApiError
                    raise error(code, f"watch pods: {obj.get('message', 'error event')}")
                yield kind, obj
        except (OSError, http.client.HTTPException) as err:
            if not self._closed:
                raise ApiError(0, f"watch pods: {err}") from None
        finally:
            with self._lock:
                self._watching = None
            connection.close()

    def delete_pod(self, namespace: str, name: str, uid: str, resource_version: str) -> None:
        """Delete the pod only if it is still the one we judged (Istio's preconditions)."""
        options = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "preconditions": {"uid": uid, "resourceVersion": resource_version},
        }
        self._call("DELETE", _pod_path(namespace, name), options)

    def patch_pod_status(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        """A JSON merge patch through the `status` subresource (lower privilege than `pods`,
        and it may change metadata: cni/pkg/repair/repaircontroller.go)."""
        path = _pod_path(namespace, name) + "/status"
        self._call("PATCH", path, patch, "application/merge-patch+json")

    def abort(self) -> None:
        """From another thread: end the watch in progress now, and every later one at once."""
        with self._lock:
            self._closed = True
            connection = self._watching
        if connection is not None and connection.sock is not None:
            try:
                connection.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the server

    def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        what = f"{method} {path.split('?', 1)[0]}"
        connection, config = self._connect(REQUEST_TIMEOUT)
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = {} if data is None else {"Content-Type": content_type}
            response = _send(connection, config, method, path, data, headers)
            _raise_for_status(response, what)
            return _json(response.read(), what)
        except (OSError, http.client.HTTPException) as err:
            raise ApiError(0, f"{what}: {err}") from None
        finally:
            connection.close()

    def _connect(
        self, timeout: float
    ) -> tuple[http.client.HTTPConnection, plugin_client.Kubeconfig]:
        """A connection (not yet opened) to the API server, and the kubeconfig it came from."""
        try:
            config = self._load()
            return plugin_client.new_connection(config, timeout), config
        except MeshnetError as err:  # the kubeconfig is not written yet, unreadable, bad CA
            raise ApiError(0, str(err)) from None


def _send(
    connection: http.client.HTTPConnection,
    config: plugin_client.Kubeconfig,
    method: str,
    path: str,
    data: bytes | None,
    headers: dict[str, str],
) -> http.client.HTTPResponse:
    headers = {"Accept": "application/json", **headers}
    if config.token:
        headers["Authorization"] = f"Bearer {config.token}"
    connection.request(method, plugin_client.api_path(config, path), body=data, headers=headers)
    return connection.getresponse()


def _pod_path(namespace: str, name: str) -> str:
    quote = urllib.parse.quote
    return f"/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(name, safe='')}"


def _raise_for_status(response: http.client.HTTPResponse, what: str) -> None:
    if 200 <= response.status < 300:
        return
    try:
        message = str(json.loads(response.read()).get("message", ""))
    except (ValueError, AttributeError, OSError):
        message = ""
    error = Gone if response.status == 410 else ApiError
    raise error(response.status, f"{what}: HTTP {response.status} {response.reason} {message}")


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        raise ApiError(0, f"{what}: the API server sent invalid JSON") from None
    if not isinstance(value, dict):
        raise ApiError(0, f"{what}: the API server sent JSON that is not an object")
    return value
