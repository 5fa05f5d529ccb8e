"""Test doubles for the CNI plugin: a Kubernetes API on 127.0.0.1, namespaces, plugin runs."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

TOKEN = "test-token-" + secrets.token_hex(4)


class FakeApi:
    """Serves pods at /api/v1/namespaces/NS/pods/NAME; checks the bearer token.

    keep_alive: HTTP/1.1 with kept-alive connections (`clients` records each connection's
    address); `delay` seconds before each answer; `most_at_once` GETs in progress together.
    """

    def __init__(self, keep_alive: bool = False) -> None:
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.requests: list[str] = []
        self.status_override: int | None = None
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
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
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

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

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
