"""One Kubernetes GET per pod, with the plugin's kubeconfig: urllib, no client library.

The plugin runs once per pod sandbox, possibly 110 at once on a node; a Kubernetes client
library costs 0.5-1.4 s per process here, urllib ~0.09 s. The kubeconfig is read as clientcmd
reads it (k8s.io/client-go/tools/clientcmd): JSON with the stdlib, anything else with PyYAML,
imported only then (it costs ~15 ms per process).
"""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import os
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

from meshnet.errors import KubeError


@dataclass(frozen=True, slots=True)
class Kubeconfig:
    """What the GET needs from the current context: clientcmd's rest.Config, in short."""

    server: str
    token: str = ""
    ca_data: bytes | None = None  # PEM; None: the system's trust store
    insecure: bool = False
    client_cert: bytes | None = None  # PEM certificate (chain) and key, both or neither
    client_key: bytes | None = None
    source: str = ""  # the file, for error messages


def load_kubeconfig(path: str) -> Kubeconfig:
    """The current context's cluster and user; an unusable file is one KubeError naming it."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as err:
        raise KubeError(
            f"failed to createNewK8sClient: cannot read {path}: {err.strerror}"
        ) from None
    try:
        return _Reader(path).config(_parse(data))
    except _Unusable as err:
        raise KubeError(f"failed to createNewK8sClient: kubeconfig {path}: {err}") from None


class _Unusable(Exception):
    """What is missing or wrong in the kubeconfig (the message names the key)."""


def _parse(data: bytes) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except ValueError:
        document = _parse_yaml(data)
    if not isinstance(document, dict):
        raise _Unusable("not a kubeconfig (a mapping with clusters, contexts and users)")
    return document


def _parse_yaml(data: bytes) -> Any:
    import yaml  # only for files that are not JSON: the import costs each plugin process

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        return yaml.load(data, Loader=loader)  # a safe loader: plain data only
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise _Unusable(f"not valid YAML{where}: {problem}") from None


class _Reader:
    """clientcmd's lookups: current-context -> context -> cluster and user."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._dir = os.path.dirname(os.path.abspath(path))

    def config(self, document: dict[str, Any]) -> Kubeconfig:
        name = _string(document, "current-context")
        if not name:
            raise _Unusable("no current-context")
        context = _named(document, "contexts", "context", name)
        cluster_name = _string(context, "cluster")
        if not cluster_name:
            raise _Unusable(f"context {name!r} names no cluster")
        cluster = _named(document, "clusters", "cluster", cluster_name)
        user_name = _string(context, "user")
        user = _named(document, "users", "user", user_name) if user_name else {}
        token, cert, key = self._credentials(user, user_name)
        server = _string(cluster, "server")
        _check_server(server, cluster_name)
        return Kubeconfig(
            server=server,
            token=token,
            ca_data=self._ca(cluster),
            insecure=_bool(cluster, "insecure-skip-tls-verify"),
            client_cert=cert,
            client_key=key,
            source=self._path,
        )

    def _ca(self, cluster: dict[str, Any]) -> bytes | None:
        data = self._data_or_file(cluster, "certificate-authority")
        if data is None:
            return None
        if b"-----BEGIN CERTIFICATE-----" not in data:
            raise _Unusable("certificate-authority(-data) holds no PEM certificate")
        return data

    def _credentials(
        self, user: dict[str, Any], name: str
    ) -> tuple[str, bytes | None, bytes | None]:
        for unsupported in ("exec", "auth-provider"):
            if user.get(unsupported):
                raise _Unusable(f"user {name!r} uses {unsupported} credentials, not supported")
        token = _string(user, "token")
        token_file = _string(user, "tokenFile")
        if not token and token_file:  # clientcmd: token wins over tokenFile
            token = self._read(token_file, "tokenFile").decode("utf-8", "replace").strip()
            if not token:
                raise _Unusable(f"tokenFile {token_file} is empty")
        cert = self._data_or_file(user, "client-certificate")
        key = self._data_or_file(user, "client-key")
        if (cert is None) != (key is None):
            given, missing = ("certificate", "key") if key is None else ("key", "certificate")
            raise _Unusable(f"user {name!r} has a client {given} but no client-{missing}(-data)")
        return token, cert, key

    def _data_or_file(self, section: dict[str, Any], key: str) -> bytes | None:
        """`<key>-data` (base64) wins over `<key>` (a file path), as in clientcmd."""
        encoded = "".join(_string(section, f"{key}-data").split())  # Go skips newlines
        if encoded:
            try:
                return base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise _Unusable(f"{key}-data is not base64") from None
        file = _string(section, key)
        return self._read(file, key) if file else None

    def _read(self, file: str, key: str) -> bytes:
        path = os.path.join(self._dir, file)  # relative to the kubeconfig, as clientcmd does
        try:
            with open(path, "rb") as handle:
                return handle.read()
        except OSError as err:
            raise _Unusable(f"cannot read {key} {path}: {err.strerror}") from None


def _named(document: dict[str, Any], section: str, field: str, name: str) -> dict[str, Any]:
    entries = document.get(section) or []
    if not isinstance(entries, list):
        raise _Unusable(f"{section} is not a list")
    for entry in entries:
        if isinstance(entry, dict) and entry.get("name") == name:
            value = entry.get(field) or {}
            if not isinstance(value, dict):
                raise _Unusable(f"{field} {name!r} is not a mapping")
            return value
    raise _Unusable(f"no {field} named {name!r} in {section}")


def _string(section: dict[str, Any], key: str) -> str:
    value = section.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _Unusable(f"{key} is not a string")
    return value


def _bool(section: dict[str, Any], key: str) -> bool:
    value = section.get(key, False)
    if not isinstance(value, bool):
        raise _Unusable(f"{key} is not true or false")
    return value


def _check_server(server: str, cluster: str) -> None:
    if not server:
        raise _Unusable(f"cluster {cluster!r} has no server")
    try:
        url = urllib.parse.urlsplit(server)
        url.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError as err:
        raise _Unusable(f"server {server!r}: {err}") from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise _Unusable(f"server {server!r} is not an http(s) URL")


def get_pod(
    config: Kubeconfig, namespace: str, name: str, attempts: int, interval: float
) -> dict[str, Any]:
    """GET the pod, retrying transient failures; fail closed when the budget is spent."""
    last = "no attempt made"
    tls_context(config)  # a bad CA or client certificate fails before any attempt
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
    path = api_path(config, f"/api/v1/namespaces/{namespace}/pods/{name}")
    headers = {"Accept": "application/json"}
    if config.token:
        headers["Authorization"] = f"Bearer {config.token}"
    while True:
        connection, kept = _connection(config)
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
_IDLE: dict[tuple[str, str, bytes | None], list[http.client.HTTPConnection]] = {}
_CONTEXTS: dict[tuple[bytes | None, bool, bytes | None, bytes | None], ssl.SSLContext] = {}


def _connection(config: Kubeconfig) -> tuple[http.client.HTTPConnection, bool]:
    """An idle connection to the server (True: kept alive from an earlier GET) or a new one."""
    with _LOCK:
        idle = _IDLE.get((config.server, config.token, config.client_cert))
        if idle:
            return idle.pop(), True
    return new_connection(config, timeout=5), False


def new_connection(config: Kubeconfig, timeout: float) -> http.client.HTTPConnection:
    """A connection (opened by its first request) to the kubeconfig's server, with its TLS
    policy; shared with the node agent's pod watch."""
    url = urllib.parse.urlsplit(config.server)
    host, port = url.hostname or "", url.port
    context = tls_context(config)
    if context is None:
        return http.client.HTTPConnection(host, port, timeout=timeout)
    return http.client.HTTPSConnection(host, port, timeout=timeout, context=context)


def api_path(config: Kubeconfig, path: str) -> str:
    """`path` below the server URL's own path (an API server may be served under a prefix)."""
    return urllib.parse.urlsplit(config.server).path.rstrip("/") + path


def _give_back(config: Kubeconfig, connection: http.client.HTTPConnection) -> None:
    with _LOCK:
        _IDLE.setdefault((config.server, config.token, config.client_cert), []).append(connection)


def tls_context(config: Kubeconfig) -> ssl.SSLContext | None:
    """The TLS policy of the kubeconfig (None for plain http); shared with the pod watch."""
    if not config.server.startswith("https:"):
        return None
    key = (config.ca_data, config.insecure, config.client_cert, config.client_key)
    with _LOCK:
        if key in _CONTEXTS:
            return _CONTEXTS[key]
    if config.insecure:
        context = ssl._create_unverified_context()  # the kubeconfig asks for it explicitly
    else:
        context = ssl.create_default_context()
        if config.ca_data:
            try:
                context.load_verify_locations(cadata=config.ca_data.decode("ascii", "replace"))
            except ssl.SSLError as err:
                raise KubeError(
                    f"failed to createNewK8sClient: kubeconfig {config.source}: "
                    f"certificate-authority: {err}"
                ) from None
    if config.client_cert is not None and config.client_key is not None:
        _load_client_cert(context, config)
    with _LOCK:
        return _CONTEXTS.setdefault(key, context)


def _load_client_cert(context: ssl.SSLContext, config: Kubeconfig) -> None:
    """ssl loads a certificate and key only from files: anonymous memory files, never disk."""
    fds = [os.memfd_create("meshnet-client-cert"), os.memfd_create("meshnet-client-key")]
    try:
        for fd, data in zip(fds, (config.client_cert, config.client_key), strict=True):
            with open(fd, "wb", closefd=False) as stream:
                stream.write(data or b"")
        context.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
    except (ssl.SSLError, OSError) as err:
        raise KubeError(
            f"failed to createNewK8sClient: kubeconfig {config.source}: "
            f"client-certificate and client-key: {err}"
        ) from None
    finally:
        for fd in fds:
            os.close(fd)
