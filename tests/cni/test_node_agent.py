"""The installer daemon's node-agent duties, as a real process: `/metrics` (scraped and parsed
with Prometheus's text parser), `/readyz` with the reasons it is not ready (the node agent's
socket among them), and the repair controller driven by the daemon against the API stub."""

from __future__ import annotations

import re
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshnet.cni import metrics
from meshnet.cni.install.settings import AGENT_SOCKET_NAME, Settings
from meshnet.errors import OptionError
from tests.cni.fakes import TOKEN, WatchApi, broken_pod
from tests.cni.test_installer import (  # the daemon harness and its fixtures
    BRIDGE,
    Daemon,
    Host,
    _free_port,
    eventually,
    host,
    start,
    write_json,
)

__all__ = ["host", "start"]  # fixtures used here by name


def fetch(url: str) -> tuple[int | None, str]:
    """(status, body), or (None, "") while nothing listens."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError:
        return None, ""


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = fetch(f"http://127.0.0.1:{port}/metrics")
    assert status == 200, body
    samples = {}
    for family in text_string_to_metric_families(body):
        for item in family.samples:
            samples[(item.name, tuple(sorted(item.labels.items())))] = float(item.value)
    return samples


@pytest.fixture
def agent_socket(host: Host) -> Iterator[Callable[[bool], None]]:
    """Switch a listening Unix socket at <run dir>/<AGENT_SOCKET_NAME> on (True) or off (False)."""
    path = host.run_dir / AGENT_SOCKET_NAME
    state: dict[str, socket.socket] = {}

    def switch(on: bool) -> None:
        if on and "sock" not in state:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(path))
            listener.listen(16)
            state["sock"] = listener
        elif not on and "sock" in state:
            state.pop("sock").close()
            path.unlink()

    try:
        yield switch
    finally:
        switch(False)


def test_readyz_says_what_is_missing_and_flips_with_the_agent_socket(
    host: Host, start: Callable[..., Daemon], agent_socket: Callable[[bool], None]
) -> None:
    daemon = start(MESHNET_CNI_AGENT_SOCKET_CHECK="true", REPAIR_ENABLED="false")
    url = f"http://127.0.0.1:{daemon.port}/readyz"
    eventually(lambda: fetch(url)[0] == 503, "/readyz answers 503", daemon)
    _, body = fetch(url)
    assert "not ready: no CNI config file (.conf, .conflist, .json) in" in body
    assert f"node agent socket {host.run_dir / AGENT_SOCKET_NAME} does not answer" in body

    write_json(host.conf_dir / "10-bridge.conf", BRIDGE)
    eventually(lambda: "CNI config" not in fetch(url)[1], "the config is merged", daemon)
    status, body = fetch(url)
    assert status == 503 and body.startswith("not ready: node agent socket"), body
    assert body.count("\n") == 1  # only the socket is missing now

    agent_socket(True)
    eventually(lambda: fetch(url) == (200, "ok\n"), "ready with the agent socket", daemon)
    agent_socket(False)
    eventually(lambda: fetch(url)[0] == 503, "not ready once the socket is gone", daemon)
    assert "does not answer" in fetch(url)[1]
    assert daemon.terminate() == 0, daemon.logs()


def test_metrics_report_installs_and_readiness(host: Host, start: Callable[..., Daemon]) -> None:
    port = _free_port()
    daemon = start(MONITORING_PORT=str(port), REPAIR_ENABLED="false")
    eventually(lambda: fetch(f"http://127.0.0.1:{port}/metrics")[0] == 200, "metrics", daemon)
    assert scrape(port)[("istio_cni_install_ready", ())] == 0  # no primary config yet
    assert fetch(f"http://127.0.0.1:{port}/other")[0] == 404

    write_json(host.conf_dir / "10-bridge.conf", BRIDGE)
    eventually(lambda: daemon.readyz() == 200, "ready", daemon)
    samples = scrape(port)
    assert samples[("istio_cni_install_ready", ())] == 1
    assert samples[("istio_cni_installs_total", (("result", "SUCCESS"),))] == 1
    assert ("meshnet_cni_agent_queue_depth", ()) in samples
    assert ("meshnet_cni_fallback_total", ()) in samples
    assert not any(name.endswith("_created") for name, _ in samples)  # Istio has none

    (host.conf_dir / "10-bridge.conflist").unlink()  # someone removes the config
    eventually(lambda: scrape(port)[("istio_cni_install_ready", ())] == 0, "not ready", daemon)
    assert daemon.terminate() == 0, daemon.logs()


def test_a_bad_monitoring_port_is_a_one_line_error(start: Callable[..., Daemon]) -> None:
    daemon = start(MONITORING_PORT="99999")
    assert daemon.process.wait(timeout=10) == 1
    assert "MONITORING_PORT='99999': not a number from 0 to 65535" in daemon.logs()


def test_the_daemon_runs_the_repair_controller_on_this_nodes_pods(
    host: Host, start: Callable[..., Daemon]
) -> None:
    (host.sa_dir / "token").write_text(TOKEN)
    write_json(host.conf_dir / "10-bridge.conf", BRIDGE)
    port = _free_port()
    with WatchApi() as api:
        api.put(broken_pod("web-0", "uid-daemon", "node-x"))
        daemon = start(
            MONITORING_PORT=str(port),
            KUBERNETES_SERVICE_PROTOCOL="http",
            KUBERNETES_SERVICE_PORT=str(api.server.server_address[1]),
            KUBERNETES_NODE_NAME="node-x",
            REPAIR_REPAIR_PODS="false",
            REPAIR_LABEL_PODS="true",
            REPAIR_BROKEN_POD_LABEL_KEY="example.com/broken",
            REPAIR_BROKEN_POD_LABEL_VALUE="yes",
        )
        api.wait_for(lambda: api.count("PATCH") == 1)
        labels = api.pods[("default", "web-0")]["metadata"]["labels"]
        assert labels == {"example.com/broken": "yes"}
        key = ("istio_cni_repair_pods_repaired_total", (("result", "success"), ("type", "label")))
        eventually(lambda: scrape(port).get(key) == 1, "the label is counted", daemon)
        assert daemon.terminate() == 0, daemon.logs()
    assert not Path(host.kubeconfig).exists()  # cleanup still ran


@dataclass(frozen=True)
class _Call:
    command: str
    exit_code: int
    seconds: float
    queue_depth: int
    timed_out: bool


def test_agent_request_metrics_histogram_fallbacks_and_queue_depth() -> None:
    def samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        body, content_type = metrics.exposition()
        assert content_type.startswith("text/plain; version=0.0.4")
        parsed = {}
        for family in text_string_to_metric_families(body.decode()):
            for item in family.samples:
                parsed[(item.name, tuple(sorted(item.labels.items())))] = float(item.value)
        return parsed

    name = "meshnet_cni_request_duration_seconds"
    ok = (("command", "ADD"), ("result", "ok"))
    before = samples()
    metrics.record_call(_Call("ADD", 0, 0.03, 4, False))
    metrics.record_call(_Call("ADD", 0, 0.2, 2, False))
    metrics.record_call(_Call("DEL", 0, 31.0, 0, True))
    metrics.fallback_used()
    after = samples()

    def delta(key: tuple[str, tuple[tuple[str, str], ...]]) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta((f"{name}_count", ok)) == 2
    assert delta((f"{name}_bucket", (ok[0], ("le", "0.05"), ok[1]))) == 1
    assert delta((f"{name}_bucket", (ok[0], ("le", "0.25"), ok[1]))) == 2
    assert delta((f"{name}_sum", ok)) == pytest.approx(0.23)
    assert delta((f"{name}_count", (("command", "DEL"), ("result", "timeout")))) == 1
    assert delta(("meshnet_cni_fallback_total", ())) == 1
    assert after[("meshnet_cni_agent_queue_depth", ())] == 0  # the last call's view


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("REPAIR_DELETE_PODS", "maybe", "REPAIR_DELETE_PODS='maybe': not a boolean"),
        ("REPAIR_INIT_CONTAINER_EXIT_CODE", "300", "not a number from 0 to 255"),
        ("MESHNET_REPAIR_RESYNC_PERIOD", "0", "not a number of seconds from 0.01 to 86400"),
        ("MESHNET_CNI_AGENT_SOCKET_CHECK", "yes", "MESHNET_CNI_AGENT_SOCKET_CHECK='yes'"),
    ],
)
def test_bad_node_agent_options_are_named(name: str, value: str, message: str) -> None:
    with pytest.raises(OptionError, match=re.escape(message)):
        Settings.from_env({name: value})


def test_node_agent_options_are_read_with_istios_defaults() -> None:
    settings = Settings.from_env({"KUBERNETES_NODE_NAME": "n1", "REPAIR_LABEL_PODS": "true"})
    assert settings.monitoring_port == 15014 and not settings.agent_socket_check
    repair = settings.repair
    assert (repair.node_name, repair.action, repair.label_key) == (
        "n1",
        "repair",
        "cni.istio.io/uninitialized",
    )
    assert (
        Settings.from_env({"REPAIR_NODE_NAME": "n2", "KUBERNETES_NODE_NAME": "n1"}).repair.node_name
        == "n2"
    )


def _ask_agent(path: Path, command: str) -> tuple[int, bytes]:
    """One request on the agent's socket, the way the forwarder frames it."""
    from meshnet.cni import wire

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(str(path))
        conn.sendall(wire.encode_request(command, {"CNI_COMMAND": command}, b""))
        conn.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    assert data[:1] == b"A", data
    return wire.decode_reply(data[1:])


def test_the_daemon_serves_the_node_agent_and_counts_its_requests(
    host: Host, start: Callable[..., Daemon]
) -> None:
    port = _free_port()
    daemon = start(MONITORING_PORT=str(port), REPAIR_ENABLED="false", MESHNET_CNI_AGENT="true")
    path = host.run_dir / AGENT_SOCKET_NAME
    eventually(path.exists, "the agent socket", daemon)
    assert oct(path.stat().st_mode & 0o777) == "0o600"

    code, stdout = _ask_agent(path, "VERSION")
    assert code == 0 and b'"supportedVersions"' in stdout, stdout
    key = ("meshnet_cni_request_duration_seconds_count", (("command", "VERSION"), ("result", "ok")))
    eventually(lambda: scrape(port).get(key) == 1, "the request counted in /metrics", daemon)

    write_json(host.conf_dir / "10-bridge.conf", BRIDGE)
    eventually(lambda: daemon.readyz() == 200, "ready with the agent serving", daemon)
    assert daemon.terminate() == 0, daemon.logs()
    assert not path.exists(), "the agent's socket is removed on SIGTERM"
