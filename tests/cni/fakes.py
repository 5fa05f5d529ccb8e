"""Test doubles for the CNI plugin: a Kubernetes API on 127.0.0.1, namespaces, plugin runs."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

TOKEN = "test-token-" + secrets.token_hex(4)


class FakeApi:
    """Serves pods at /api/v1/namespaces/NS/pods/NAME; checks the bearer token."""

    def __init__(self) -> None:
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.requests: list[str] = []
        self.status_override: int | None = None
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                api.requests.append(self.path)
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
