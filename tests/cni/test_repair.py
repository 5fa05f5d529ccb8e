"""The repair controller against a list + watch API stub, in each mode (cni/pkg/repair).

The stub (tests/cni/fakes.py WatchApi) serves chunked watch events with resourceVersions and
answers 410 Gone once its history is compacted. Repair mode programs a real pod namespace that
the controller finds through /proc, from the address of a process living in it.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshnet import errors
from meshnet.cni import metrics, repair
from meshnet.cni.kube import agent_client, plugin_client
from meshnet.cni.repair import Controller, RepairSettings, is_broken
from tests.cni.fakes import TOKEN, WatchApi, broken_pod, in_netns, mesh_pod
from tests.netns.harness import require_root_netns

NODE = "node-a"


def sample(name: str, **labels: str) -> float:
    """One sample of the exposition, parsed with Prometheus's text parser (0 when absent)."""
    body, _ = metrics.exposition()
    for family in text_string_to_metric_families(body.decode()):
        for item in family.samples:
            if item.name == name and item.labels == labels:
                return float(item.value)
    return 0.0


def repaired(kind: str, result: str) -> float:
    return sample("istio_cni_repair_pods_repaired_total", type=kind, result=result)


@pytest.fixture
def api() -> Iterator[WatchApi]:
    with WatchApi() as stub:
        yield stub


def start(api: WatchApi, **options: Any) -> Controller:
    settings = replace(RepairSettings(node_name=NODE, resync_seconds=60), **options)
    config = plugin_client.Kubeconfig(server=api.url, token=TOKEN, ca_data=None, insecure=False)
    controller = Controller(settings, agent_client.PodApi(lambda: config))
    controller.start()
    return controller


def test_delete_mode_deletes_a_broken_pod_with_preconditions_only_once(api: WatchApi) -> None:
    api.put(broken_pod("web-0", "uid-del-0", NODE))
    api.put(broken_pod("web-1", "uid-del-1", "node-b"))  # another node's: not ours
    api.put(mesh_pod(name="healthy") | {"spec": {"nodeName": NODE}})
    before = repaired("delete", "success")
    controller = start(api, repair_pods=False, delete_pods=True)
    try:
        api.wait_for(lambda: repaired("delete", "success") == before + 1)
        assert api.count("GET", fieldSelector="spec.nodeName%3Dnode-a") >= 1
        deletes = [(p, b) for m, p, b in api.requests if m == "DELETE"]
        assert deletes == [
            (
                "/api/v1/namespaces/default/pods/web-0",
                {
                    "kind": "DeleteOptions",
                    "apiVersion": "v1",
                    "preconditions": {"uid": "uid-del-0", "resourceVersion": "101"},
                },
            )
        ]
        assert ("default", "web-1") in api.pods and ("default", "healthy") in api.pods
        assert repaired("delete", "success") == before + 1
    finally:
        controller.stop()


def test_label_mode_patches_the_status_subresource_then_skips(api: WatchApi) -> None:
    before_ok, before_skip = repaired("label", "success"), repaired("label", "skip")
    controller = start(api, repair_pods=False, label_pods=True)
    try:
        api.wait_for(lambda: api.count("GET", watch="1") >= 1)
        api.put(broken_pod("web-2", "uid-label", NODE))  # arrives through the watch
        api.wait_for(lambda: api.count("PATCH") == 1)
        _, path, body = next(r for r in api.requests if r[0] == "PATCH")
        assert path == "/api/v1/namespaces/default/pods/web-2/status"
        assert body == {"metadata": {"labels": {"cni.istio.io/uninitialized": "true"}}}
        labels = api.pods[("default", "web-2")]["metadata"]["labels"]
        assert labels["cni.istio.io/uninitialized"] == "true"
        # The patch comes back as a MODIFIED event: already labeled, so skipped, not patched.
        api.wait_for(lambda: repaired("label", "skip") > before_skip)
        assert api.count("PATCH") == 1
        assert repaired("label", "success") == before_ok + 1
    finally:
        controller.stop()


def test_a_410_gone_relists_and_resumes(api: WatchApi) -> None:
    controller = start(api, repair_pods=False, label_pods=True)
    try:
        api.wait_for(lambda: api.count("GET", watch="1") >= 1)
        lists = api.count("GET") - api.count("GET", watch="1")
        api.expire()  # the watch in progress ends with ERROR 410
        api.wait_for(lambda: api.count("GET") - api.count("GET", watch="1") == lists + 1)
        api.put(broken_pod("late", "uid-late", NODE))  # after the relist: seen on the new watch
        api.wait_for(lambda: api.count("PATCH", "/api/v1/namespaces/default/pods/late") == 1)
        watches = [p for m, p, _ in api.requests if m == "GET" and "watch=1" in p]
        assert f"resourceVersion={api.oldest}" in watches[-1]  # resumed from the relist
    finally:
        controller.stop()


def test_unreachable_api_is_retried_with_backoff_and_counted() -> None:
    before = sample("meshnet_cni_repair_watch_errors_total", reason="unreachable")
    settings = RepairSettings(node_name=NODE)
    dead = plugin_client.Kubeconfig(
        server="http://127.0.0.1:9", token="", ca_data=None, insecure=False
    )
    controller = Controller(settings, agent_client.PodApi(lambda: dead))
    controller.start()
    try:
        for _ in range(400):  # the first retry comes after 0.5 s
            if sample("meshnet_cni_repair_watch_errors_total", reason="unreachable") >= before + 2:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the controller did not retry the unreachable API")
    finally:
        controller.stop()


# --------------------------------------------------------------------------- repair mode


@pytest.fixture
def running_pod() -> Iterator[tuple[str, str, int]]:
    """A pod namespace with a unique IPv6 address and a process in it (the "pause").

    Yields (namespace name, pod IP, pid). The address is random in 2001:db8::/32 so that no
    other test's namespace (many use 192.0.2.1) can be mistaken for this pod.
    """
    require_root_netns()
    name = f"mnr-{secrets.token_hex(4)}"
    ip = f"2001:db8:{secrets.randbelow(0xFFFF):x}:{secrets.randbelow(0xFFFF):x}::7"
    subprocess.run(["ip", "netns", "add", name], check=True)
    pause = None
    try:
        for args in (
            ["link", "set", "lo", "up"],
            ["link", "add", "eth0", "type", "veth", "peer", "name", "eth1"],
            ["link", "set", "eth0", "up"],
            ["addr", "add", f"{ip}/64", "dev", "eth0", "nodad"],
        ):
            subprocess.run(["ip", "-n", name, *args], check=True)
        pause = subprocess.Popen(["ip", "netns", "exec", name, "sleep", "600"])
        yield name, ip, pause.pid
    finally:
        if pause is not None:
            pause.kill()
            pause.wait()
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.mark.netns
def test_repair_mode_programs_the_running_pod_namespace_once(
    api: WatchApi, running_pod: tuple[str, str, int]
) -> None:
    name, ip, pid = running_pod
    _wait_for_netns_of(pid, name)
    assert "ISTIO_OUTPUT" not in in_netns(name, ["ip6tables-save"]).stdout
    before, before_fail = repaired("repair", "success"), repaired("repair", "fail")
    api.put(broken_pod("web-r", "uid-repair", NODE, pod_ip=ip))
    controller = start(api, host_proc=Path("/proc"))
    try:
        api.wait_for(lambda: repaired("repair", "success") == before + 1)
        for tool in ("iptables-save", "ip6tables-save"):
            rules = in_netns(name, [tool]).stdout
            assert "-A ISTIO_OUTPUT" in rules and "-j ISTIO_REDIRECT" in rules, rules
            assert "--to-ports 15001" in rules
        # More events for the same UID (the pod keeps crash-looping until it restarts), and a
        # relist after 410: never programmed again.
        pod = api.pods[("default", "web-r")]
        pod["status"]["initContainerStatuses"][0]["restartCount"] = 4
        api.put(pod)
        api.expire()
        api.wait_for(lambda: api.count("GET", watch="1", resourceVersion=str(api.oldest)) >= 1)
        assert api.count("GET") - api.count("GET", watch="1") == 2  # listed again, reconciled
        assert repaired("repair", "success") == before + 1
        assert repaired("repair", "fail") == before_fail
    finally:
        controller.stop()


@pytest.mark.netns
def test_repair_mode_with_native_nftables_writes_the_nft_tables(
    api: WatchApi, running_pod: tuple[str, str, int]
) -> None:
    name, ip, pid = running_pod
    _wait_for_netns_of(pid, name)
    before = repaired("repair", "success")
    api.put(broken_pod("web-n", "uid-nft", NODE, pod_ip=ip))
    controller = start(api, host_proc=Path("/proc"), native_nftables=True)
    try:
        api.wait_for(lambda: repaired("repair", "success") == before + 1)
        tables = in_netns(name, ["nft", "list", "tables"]).stdout
        assert "table inet istio-proxy-nat" in tables, tables
        assert "ISTIO_OUTPUT" not in in_netns(name, ["iptables-save"]).stdout
    finally:
        controller.stop()


@pytest.mark.netns
def test_repair_failures_are_counted_and_retried_up_to_five_times_per_uid(
    api: WatchApi, running_pod: tuple[str, str, int]
) -> None:
    before, before_ok = repaired("repair", "fail"), repaired("repair", "success")
    nowhere = f"2001:db8:ffff:{secrets.randbelow(0xFFFF):x}::9"
    api.put(broken_pod("ghost", "uid-ghost", NODE, pod_ip=nowhere))
    controller = start(api, host_proc=Path("/proc"))
    try:
        api.wait_for(lambda: repaired("repair", "fail") == before + 1)
        for restart in range(6):  # the pod keeps crash-looping: an event per restart
            pod = api.pods[("default", "ghost")]
            pod["status"]["initContainerStatuses"][0]["restartCount"] = 4 + restart
            api.put(pod)
        # A repairable pod, handled after all those events (one watch, in order): by then the
        # first was tried 5 times, and the watch survived its failures.
        name, ip, pid = running_pod
        _wait_for_netns_of(pid, name)
        api.put(broken_pod("real", "uid-real", NODE, pod_ip=ip))
        api.wait_for(lambda: repaired("repair", "success") == before_ok + 1)
        assert repaired("repair", "fail") == before + repair.MAX_ATTEMPTS
    finally:
        controller.stop()


def _wait_for_netns_of(pid: int, name: str) -> None:
    """`ip netns exec` enters the namespace right after fork: wait until the pid is in it."""
    target = Path(f"/var/run/netns/{name}").stat().st_ino
    for _ in range(400):
        try:
            if Path(f"/proc/{pid}/ns/net").stat().st_ino == target:
                return
        except OSError:
            pass
        subprocess.run(["sleep", "0.01"], check=False)
    raise AssertionError("the pause process never entered its namespace")


# --------------------------------------------------------------------------- unit


def _terminated(code: int, reason: str = "Error") -> dict[str, Any]:
    return {"terminated": {"exitCode": code, "reason": reason}}


@pytest.mark.parametrize(
    ("state", "last", "annotated", "broken"),
    [
        ({"waiting": {}}, _terminated(126), True, True),
        ({"waiting": {}}, _terminated(126), False, False),  # no sidecar annotation
        ({"waiting": {}}, _terminated(1), True, False),  # another failure
        (_terminated(0, "Completed"), _terminated(126), True, False),  # succeeded since
        ({"running": {}}, {}, True, False),  # never terminated
    ],
)
def test_is_broken_follows_istios_filter(
    state: dict[str, Any], last: dict[str, Any], annotated: bool, broken: bool
) -> None:
    pod = broken_pod("p", "u", NODE)
    status = pod["status"]["initContainerStatuses"][0]
    status["state"], status["lastState"] = state, last
    if not annotated:
        del pod["metadata"]["annotations"]["sidecar.istio.io/status"]
    assert is_broken(pod, RepairSettings()) is broken


def test_termination_message_and_container_name_filters() -> None:
    pod = broken_pod("p", "u", NODE)
    pod["status"]["initContainerStatuses"][0]["lastState"]["terminated"]["message"] = " no rules "
    assert is_broken(pod, RepairSettings(init_termination_message="no rules"))
    assert not is_broken(pod, RepairSettings(init_termination_message="other"))
    assert not is_broken(pod, RepairSettings(init_container_name="istio-init"))


def test_mode_precedence_is_istios() -> None:
    assert RepairSettings().action == "repair"
    assert RepairSettings(repair_pods=False, delete_pods=True, label_pods=True).action == "delete"
    assert RepairSettings(repair_pods=False, label_pods=True).action == "label"
    assert RepairSettings(repair_pods=False).action is None
    selectors = RepairSettings(node_name="n1", field_selectors="status.phase=Pending").selectors()
    assert selectors.field == "status.phase=Pending,spec.nodeName=n1"


def test_unknown_metric_labels_are_refused() -> None:
    with pytest.raises(ValueError, match="type='fix'"):
        metrics.pod_repair("fix", "success")


def test_the_plugin_and_the_cli_never_import_the_resident_modules() -> None:
    """The per-pod plugin and `meshnet istio-iptables` stay light: no metrics, no watch."""
    code = (
        "import sys, meshnet.cni.plugin.main, meshnet.cni.plugin.commands, meshnet.cli.app\n"
        "bad = [m for m in ('prometheus_client', 'meshnet.cni.metrics', 'meshnet.cni.repair',"
        " 'meshnet.cni.kube.agent_client', 'meshnet.cni.install') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == ""


def test_the_watch_speaks_tls_with_the_kubeconfig_ca(api: WatchApi, tmp_path: Path) -> None:
    """As in a cluster: https, verified against the CA the installer put in the kubeconfig."""
    import ssl

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    api.server.socket = context.wrap_socket(api.server.socket, server_side=True)
    api.put(broken_pod("tls", "uid-tls", NODE))
    port = api.server.server_address[1]
    trusted = plugin_client.Kubeconfig(f"https://127.0.0.1:{port}", TOKEN, cert.read_bytes(), False)
    assert len(agent_client.PodApi(lambda: trusted).list_pods(agent_client.Selectors()).items) == 1
    stranger = plugin_client.Kubeconfig(f"https://127.0.0.1:{port}", TOKEN, None, False)
    with pytest.raises(errors.ApiError, match="CERTIFICATE_VERIFY_FAILED"):
        agent_client.PodApi(lambda: stranger).list_pods(agent_client.Selectors())
