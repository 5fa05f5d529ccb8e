"""Test doubles for the CNI plugin: a Kubernetes API on 127.0.0.1, namespaces, plugin runs."""

from __future__ import annotations

import json
import os
import secrets
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

TOKEN = "test-token-" + secrets.token_hex(4)


@dataclass(frozen=True, slots=True)
class Pki:
    """A cluster CA, the API server's certificate (127.0.0.1 and ::1) and a client's."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here: verification against it fails


def make_pki(directory: Path) -> Pki:
    """Self-signed CAs and leaf certificates, made with the openssl tool (EC P-256, 1 day)."""
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    for name in ("ca", "other-ca"):
        openssl(
            *("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"),
            *("-nodes", "-days", "1", "-subj", f"/CN=meshnet test {name}"),
            *("-keyout", f"{name}.key", "-out", f"{name}.crt"),
        )
    leaves = {
        "server": ("/CN=kube-apiserver", "subjectAltName=IP:127.0.0.1,IP:::1"),
        "client": ("/CN=meshnet-cni/O=system:nodes", "extendedKeyUsage=clientAuth"),
    }
    for name, (subject, extension) in leaves.items():
        openssl(
            *("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"),
            *("-subj", subject, "-keyout", f"{name}.key", "-out", f"{name}.csr"),
        )
        (directory / f"{name}.ext").write_text(extension + "\n")
        openssl(
            *("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key"),
            *("-CAcreateserial", "-days", "1", "-extfile", f"{name}.ext", "-out", f"{name}.crt"),
        )
    return Pki(
        ca=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
        other_ca=directory / "other-ca.crt",
    )


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class FakeApi:
    """Serves pods at /api/v1/namespaces/NS/pods/NAME; checks the bearer token.

    pki: serve HTTPS with its server certificate; require_client_cert: the TLS handshake
    demands a client certificate signed by its CA, which then authenticates the request in
    place of the token (as the API server's x509 authenticator does). host: 127.0.0.1 or ::1.
    keep_alive: HTTP/1.1 with kept-alive connections (`clients` records each connection's
    address); `delay` seconds before each answer; `most_at_once` GETs in progress together.
    """

    def __init__(
        self,
        pki: Pki | None = None,
        require_client_cert: bool = False,
        host: str = "127.0.0.1",
        keep_alive: bool = False,
    ) -> None:
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.requests: list[str] = []
        self.status_override: int | None = None
        self.host = host
        self.clients: set[tuple[str, int]] = set()
        self.delay = 0.0
        self.most_at_once = 0
        self._at_once = 0
        self._lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if keep_alive else "HTTP/1.0"

            def do_GET(self) -> None:
                api.requests.append(self.path)
                api.clients.add(self.client_address)
                with api._lock:
                    api._at_once += 1
                    api.most_at_once = max(api.most_at_once, api._at_once)
                try:
                    if api.delay:
                        time.sleep(api.delay)
                    self._answer()
                finally:
                    with api._lock:
                        api._at_once -= 1

            def _answer(self) -> None:
                by_cert = require_client_cert and bool(self.connection.getpeercert())  # type: ignore[attr-defined]
                if not by_cert and self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self._reply(401, {"message": "Unauthorized"})
                if api.status_override is not None:
                    return self._reply(api.status_override, {"message": "injected"})
                parts = self.path.strip("/").split("/")
                if len(parts) == 6 and parts[:3] == ["api", "v1", "namespaces"]:
                    pod = api.pods.get((parts[3], parts[5]))
                    if pod is not None:
                        return self._reply(200, pod)
                return self._reply(404, {"message": "not found"})

            def _reply(self, code: int, body: Mapping[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        server_class = _Server6 if ":" in host else ThreadingHTTPServer
        self.server = server_class((host, 0), Handler)
        self.scheme = "http"
        if pki is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(pki.server_cert, pki.server_key)
            if require_client_cert:
                context.verify_mode = ssl.CERT_REQUIRED
                context.load_verify_locations(pki.ca)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.server.server_address[1]}"

    def __enter__(self) -> FakeApi:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def write_kubeconfig(run_dir: Path, server: str, token: str = TOKEN) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "meshnet-cni-kubeconfig").write_text(
        "apiVersion: v1\nclusters:\n- cluster:\n    insecure-skip-tls-verify: true\n"
        f"    server: {server}\n  name: local\ncontexts:\n- context:\n    cluster: local\n"
        "    user: meshnet-cni\n  name: meshnet-cni-context\ncurrent-context: meshnet-cni-context\n"
        f"kind: Config\nusers:\n- name: meshnet-cni\n  user:\n    token: {token}\n"
    )


def run_plugin(
    env: Mapping[str, str], stdin: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the plugin as the runtime does: a process, CNI_* env, config on stdin."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    full.update(env)
    return subprocess.run(
        [sys.executable, "-m", "meshnet.cni"],
        input=stdin,
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@contextmanager
def pod_namespace(ipv6: bool = False) -> Iterator[str]:
    """A namespace with one veth address (IPv4 only unless ipv6); always deleted."""
    name = f"mnt-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for args in (
            ["link", "set", "lo", "up"],
            ["link", "add", "eth0", "type", "veth", "peer", "name", "eth1"],
            ["link", "set", "eth0", "up"],
            ["addr", "add", "192.0.2.1/24", "dev", "eth0"],
        ):
            subprocess.run(["ip", "-n", name, *args], check=True)
        if ipv6:
            subprocess.run(
                ["ip", "-n", name, "addr", "add", "2001:db8::1/64", "dev", "eth0", "nodad"],
                check=True,
            )
        yield f"/var/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def get_rules(text: str) -> dict[str, str]:
    """Istio's getRules: restore sections per table, save lines dropped."""
    tables = {}
    for chunk in text.split("COMMIT"):
        lines = [
            line
            for line in chunk.strip("\n").split("\n")
            if line not in ("iptables-save", "ip6tables-save")
        ]
        if lines and lines[0].startswith("* "):
            tables[lines[0][2:]] = "\n".join([*lines, "COMMIT"])
    return tables


# --------------------------------------------------------------------------- added for the
# plugin, libcni-chain and load tests (tests/cni/test_plugin.py, test_libcni_chain.py,
# test_load.py) and bench/cni_add.py.

OWN_NETNS: set[str] = set()
"""Every namespace created through `make_netns_batch` (or `netns_group`) in this process."""

CNI_ARGS_PREFIX = "IgnoreUnknown=1"  # what containerd and CRI-O always send first


def mesh_pod(
    name: str = "web-0",
    namespace: str = "default",
    annotations: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
    proxy_args: list[str] | None = None,
    proxy: bool = True,
) -> dict[str, Any]:
    """A sidecar-injected pod object as the API server returns it (cases.json's shape)."""
    containers: list[dict[str, Any]] = [{"name": "app", "resources": {}}]
    if proxy:
        sidecar: dict[str, Any] = {"name": "istio-proxy", "resources": {}, "securityContext": {}}
        sidecar["args"] = proxy_args if proxy_args is not None else ["proxy", "sidecar"]
        containers.append(sidecar)
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": dict(labels or {}),
            "annotations": {"sidecar.istio.io/status": "{}", **(annotations or {})},
        },
        "spec": {"containers": containers},
        "status": {},
    }


def cni_env(
    command: str,
    netns: str,
    pod_name: str = "web-0",
    pod_ns: str = "default",
    container_id: str = "ctr-0",
    args: str | None = None,
) -> dict[str, str]:
    """The CNI_* variables a runtime sets for one call (args=None: the usual K8S_* args)."""
    if args is None:
        args = f"{CNI_ARGS_PREFIX};K8S_POD_NAMESPACE={pod_ns};K8S_POD_NAME={pod_name}"
    return {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns,
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/usr/lib/cni",
        "CNI_ARGS": args,
    }


def widen_backlog(api: FakeApi, backlog: int = 1024) -> None:
    """Raise the listen backlog (socketserver's default is 5): 110 plugins connect at once."""
    api.server.socket.listen(backlog)


def _ns_name(path_or_name: str) -> str:
    return path_or_name.rsplit("/", 1)[-1]


def in_netns(ns: str, argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """`ip netns exec NS ARGV` (ns: a name or /var/run/netns/NAME), output captured."""
    return subprocess.run(
        ["ip", "netns", "exec", _ns_name(ns), *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def netns_state(ns: str) -> str:
    """Everything a CNI call could change in a namespace's netfilter, minus comments."""
    parts = []
    for argv in (["iptables-save"], ["ip6tables-save"], ["nft", "list", "ruleset"]):
        out = in_netns(ns, argv).stdout
        parts.append("\n".join(line for line in out.splitlines() if not line.startswith("#")))
    return "\n---\n".join(parts)


def make_netns_batch(names: list[str], address: str | None = "192.0.2.1/24") -> None:
    """Create namespaces with lo up, all in one `ip -batch` (recorded in OWN_NETNS first).

    address: also `eth0` (a veth whose peer stays inside) with this address, up: a pod has an
    address, and the plugin's IPv6 detection, like Istio's, fails without one. None: lo only.
    """
    import tempfile

    OWN_NETNS.update(names)
    setup = ["link set lo up"]
    if address is not None:
        setup += ["link add eth0 type veth peer name eth1", f"addr add {address} dev eth0"]
        setup += ["link set eth0 up"]
    with tempfile.NamedTemporaryFile("w", prefix="meshnet-netns-", suffix=".batch") as batch:
        batch.write("".join(f"{line}\n" for line in setup))
        batch.flush()
        commands = "".join(f"netns add {n}\n" for n in names)
        commands += "".join(f"netns exec {n} ip -batch {batch.name}\n" for n in names)
        subprocess.run(["ip", "-batch", "-"], input=commands, text=True, check=True, timeout=120)


def delete_netns_batch(names: list[str]) -> list[str]:
    """Delete those of `names` that exist; returns the ones still present afterwards."""
    present = [n for n in names if os.path.exists(f"/var/run/netns/{n}")]
    if present:
        subprocess.run(
            ["ip", "-force", "-batch", "-"],
            input="".join(f"netns del {n}\n" for n in present),
            text=True,
            capture_output=True,
            check=False,
            timeout=120,
        )
    return [n for n in names if os.path.exists(f"/var/run/netns/{n}")]


@contextmanager
def netns_group(names: list[str], address: str | None = "192.0.2.1/24") -> Iterator[list[str]]:
    """Namespaces created together (see make_netns_batch) and always deleted together;
    yields their paths."""
    try:
        make_netns_batch(names, address)
        yield [f"/var/run/netns/{n}" for n in names]
    finally:
        left = delete_netns_batch(names)
        if left:
            raise RuntimeError(f"could not delete namespaces {left}")


# --------------------------------------------------------------------------- added for the
# repair controller (tests/cni/test_repair.py): list + watch with resourceVersions.


class WatchApi:
    """`/api/v1/pods` list and watch (chunked JSON lines), pod DELETE and status PATCH.

    Every change gets the next resourceVersion and is kept as a watch event. `expire()` drops
    the history, as etcd compaction does: a watch from an older version gets an ERROR event
    with a 410 Status, and a watch in progress ends with one.
    """

    def __init__(self) -> None:
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.history: list[tuple[int, str, dict[str, Any]]] = []
        self.version = 100
        self.oldest = 0  # events before this version are compacted away
        self.requests: list[tuple[str, str, Any]] = []  # (method, path, JSON body)
        self.cond = threading.Condition()
        self.closing = False
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                query = self._start("GET")
                if query is None:
                    return
                if query.get("watch") == "1":
                    return api._watch(self, query)
                with api.cond:
                    items = [p for p in api.pods.values() if api._selected(p, query)]
                    body = {"kind": "PodList", "metadata": {"resourceVersion": str(api.version)}}
                    self._json(200, {**body, "items": json.loads(json.dumps(items))})

            def do_DELETE(self) -> None:
                if self._start("DELETE") is not None:
                    api._delete(self)

            def do_PATCH(self) -> None:
                if self._start("PATCH") is not None:
                    api._patch(self)

            def _start(self, method: str) -> dict[str, str] | None:
                import urllib.parse

                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                self.body = body
                with api.cond:
                    api.requests.append((method, self.path, body))
                    api.cond.notify_all()
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    self._json(401, {"kind": "Status", "code": 401, "message": "Unauthorized"})
                    return None
                parsed = urllib.parse.urlsplit(self.path)
                self.route = parsed.path
                return dict(urllib.parse.parse_qsl(parsed.query))

            def _json(self, code: int, body: Mapping[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def chunk(self, event: Mapping[str, Any]) -> None:
                data = json.dumps(event).encode() + b"\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> WatchApi:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self.server.shutdown()
        self.server.server_close()

    # --- changes, as the API server's clients make them -------------------------------------

    def put(self, pod: dict[str, Any]) -> None:
        """Create or replace a pod (ADDED or MODIFIED)."""
        meta = pod["metadata"]
        key = (meta["namespace"], meta["name"])
        with self.cond:
            kind = "MODIFIED" if key in self.pods else "ADDED"
            self._record(kind, pod)
            self.pods[key] = pod

    def expire(self) -> None:
        """Compact the history: every resourceVersion seen so far is now too old."""
        with self.cond:
            self.version += 1
            self.oldest = self.version
            self.cond.notify_all()

    def count(self, method: str, prefix: str = "/", **query: str) -> int:
        with self.cond:
            return sum(
                1
                for m, path, _ in self.requests
                if m == method
                and path.startswith(prefix)
                and all(f"{k}={v}" in path for k, v in query.items())
            )

    def wait_for(self, check: Any, timeout: float = 20) -> None:
        """Until `check()` holds: woken by each request, and every 50 ms for checks on other
        state (metrics)."""
        import time

        deadline = time.monotonic() + timeout
        with self.cond:
            while not check():
                if time.monotonic() > deadline:
                    raise AssertionError(f"API stub: timed out; requests so far: {self.requests}")
                self.cond.wait(0.05)

    # --- handlers ---------------------------------------------------------------------------

    def _record(self, kind: str, pod: dict[str, Any]) -> None:
        self.version += 1
        pod["metadata"]["resourceVersion"] = str(self.version)
        self.history.append((self.version, kind, json.loads(json.dumps(pod))))
        self.cond.notify_all()

    @staticmethod
    def _selected(pod: Mapping[str, Any], query: Mapping[str, str]) -> bool:
        for term in filter(None, query.get("fieldSelector", "").split(",")):
            field, _, value = term.partition("=")
            assert field == "spec.nodeName", f"unsupported field selector {term}"
            if pod.get("spec", {}).get("nodeName", "") != value:
                return False
        return True

    def _watch(self, handler: Any, query: Mapping[str, str]) -> None:
        import time

        since = int(query.get("resourceVersion") or 0)
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 60)
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        gone = {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"}
        try:
            while True:
                with self.cond:
                    if since < self.oldest:
                        handler.chunk({"type": "ERROR", "object": gone})
                        break
                    events = [e for e in self.history if e[0] > since]
                    if not events:
                        left = deadline - time.monotonic()
                        if self.closing or left <= 0:
                            break
                        self.cond.wait(min(left, 0.5))
                        continue
                for version, kind, pod in events:
                    since = version
                    if self._selected(pod, query):
                        handler.chunk({"type": kind, "object": pod})
            handler.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the client went away
        handler.close_connection = True

    def _pod_key(self, route: str) -> tuple[str, str]:
        parts = route.strip("/").split("/")
        return parts[3], parts[5]

    def _delete(self, handler: Any) -> None:
        key = self._pod_key(handler.route)
        wanted = (handler.body or {}).get("preconditions", {})
        with self.cond:
            pod = self.pods.get(key)
            if pod is None:
                return handler._json(404, {"kind": "Status", "code": 404, "message": "not found"})
            meta = pod["metadata"]
            if wanted.get("uid") not in (None, meta.get("uid")) or wanted.get(
                "resourceVersion"
            ) not in (None, meta.get("resourceVersion")):
                return handler._json(409, {"kind": "Status", "code": 409, "message": "conflict"})
            del self.pods[key]
            self._record("DELETED", pod)
        handler._json(200, {"kind": "Status", "status": "Success"})

    def _patch(self, handler: Any) -> None:
        assert handler.route.endswith("/status"), handler.route
        assert handler.headers.get("Content-Type") == "application/merge-patch+json"
        key = self._pod_key(handler.route)
        with self.cond:
            pod = self.pods.get(key)
            if pod is None:
                return handler._json(404, {"kind": "Status", "code": 404, "message": "not found"})
            labels = (handler.body or {}).get("metadata", {}).get("labels", {})
            pod["metadata"].setdefault("labels", {}).update(labels)
            self._record("MODIFIED", pod)
        handler._json(200, pod)


def broken_pod(
    name: str, uid: str, node: str, pod_ip: str = "192.0.2.10", exit_code: int = 126
) -> dict[str, Any]:
    """A sidecar pod whose istio-validation init container last exited with `exit_code` and
    is now waiting to restart (CrashLoopBackOff), as the kubelet reports it."""
    pod = mesh_pod(name=name)
    pod["metadata"]["uid"] = uid
    pod["spec"]["nodeName"] = node
    pod["status"] = {
        "phase": "Pending",
        "podIP": pod_ip,
        "podIPs": [{"ip": pod_ip}],
        "initContainerStatuses": [
            {
                "name": "istio-validation",
                "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {"terminated": {"exitCode": exit_code, "reason": "Error"}},
                "ready": False,
                "restartCount": 3,
            }
        ],
    }
    return pod
