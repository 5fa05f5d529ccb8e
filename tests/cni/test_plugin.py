"""`meshnet-cni` as a runtime runs it: a process, CNI_* env, netconf on stdin, real namespaces.

Every test that touches a namespace makes its own (and always deletes it); the Kubernetes API
is `FakeApi` on 127.0.0.1. Rules are applied for real and read back with iptables-save / nft.
Every test runs twice, through the installed plugin (the C forwarder): once served by a
resident `meshnet cni agent`, once with no agent, so the forwarder runs the standalone plugin.
Istio's counterparts: `cni/pkg/plugin/plugin.go` (ADD) and `sidecar_redirect.go` (annotations).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.cni.agents import Agent, forwarder_dir, through_agent, through_fallback
from tests.cni.fakes import (
    FakeApi,
    cni_env,
    in_netns,
    mesh_pod,
    netns_state,
    pod_namespace,
    write_kubeconfig,
)
from tests.netns.harness import V4, Topology, require_root_netns

pytestmark = pytest.mark.netns

POD = ("default", "web-0")
ISTIO_NAT_CHAINS = ("ISTIO_INBOUND", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT", "ISTIO_REDIRECT")
NFT_TABLE = "istio-proxy-nat"
APP_UID = 1000


def the_pod(**kwargs: Any) -> dict[str, Any]:
    """The mesh pod POD, with `mesh_pod` options."""
    return mesh_pod(POD[1], POD[0], **kwargs)


def prev_result(version: str = "1.0.0") -> dict[str, Any]:
    """What the bridge plugin would have passed down the chain, in the config's version."""
    ip: dict[str, Any] = {"address": "192.0.2.1/24", "gateway": "192.0.2.254", "interface": 0}
    if version < "1.0.0":
        ip["version"] = "4"
    return {
        "cniVersion": version,
        "interfaces": [{"name": "eth0", "mac": "02:00:00:00:00:01", "sandbox": "/var/run/netns/x"}],
        "ips": [ip],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {},
    }


def netconf(run_dir: Path, version: str = "1.0.0", **extra: Any) -> str:
    conf: dict[str, Any] = {
        "cniVersion": version,
        "name": "k8s-pod-network",
        "type": "meshnet-cni",
        "cni_agent_run_dir": str(run_dir),
        "pod_namespace": "istio-system",
        "exclude_namespaces": ["kube-system"],
        "pod_fetch_attempts": 3,
        "pod_fetch_interval": 0.1,
        "prevResult": prev_result(version),
    }
    conf.update(extra)
    return json.dumps(conf)


def cni_error(result: Any) -> dict[str, Any]:
    """The CNI error document a failed call must print (stdout only), exit 1."""
    assert result.returncode == 1, f"exit {result.returncode}: {result.stdout}{result.stderr}"
    error = json.loads(result.stdout)
    assert isinstance(error.get("code"), int) and error["code"] > 0, error
    assert isinstance(error.get("msg"), str) and error["msg"], error
    return dict(error)


def ok(result: Any) -> str:
    assert result.returncode == 0, f"exit {result.returncode}: {result.stdout}{result.stderr}"
    return str(result.stdout)


def iptables_save(ns: str, ipv6: bool = False) -> str:
    out = in_netns(ns, ["ip6tables-save" if ipv6 else "iptables-save"])
    assert out.returncode == 0, out.stderr
    return "\n".join(line for line in out.stdout.splitlines() if not line.startswith("#"))


def istio_lines(save: str) -> list[str]:
    """Every chain declaration, rule or jump that mentions an ISTIO chain."""
    return [line for line in save.splitlines() if "ISTIO" in line]


def nft_tables(ns: str) -> list[str]:
    out = in_netns(ns, ["nft", "list", "tables"])
    assert out.returncode == 0, out.stderr
    return [line.split()[-1] for line in out.stdout.splitlines() if line.startswith("table")]


# --------------------------------------------------------------------------- the two paths


def run_plugin(
    env: dict[str, str], stdin: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    raise AssertionError("replaced by the `path` fixture")


@pytest.fixture(scope="module")
def forwarder() -> Iterator[Path]:
    with forwarder_dir() as path:
        yield path


@pytest.fixture(scope="module")
def module_agent() -> Iterator[Agent]:
    with tempfile.TemporaryDirectory(prefix="meshnet-agent-") as tmp:
        with Agent(Path(tmp) / "run") as agent:
            yield agent


@pytest.fixture(params=["agent", "fallback"], autouse=True)
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, forwarder: Path) -> str:
    """Route every `run_plugin` of the test through the forwarder, to the agent or not."""
    if request.param == "agent":
        agent: Agent = request.getfixturevalue("module_agent")
        runner = partial(through_agent, forwarder, agent.run_dir)
    else:
        runner = partial(through_fallback, forwarder)
    monkeypatch.setattr(sys.modules[__name__], "run_plugin", runner)
    return str(request.param)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def api() -> Iterator[FakeApi]:
    with FakeApi() as fake:
        fake.pods[POD] = the_pod()
        yield fake


@pytest.fixture
def run_dir(tmp_path: Path, api: FakeApi) -> Path:
    write_kubeconfig(tmp_path / "run", api.url)
    return tmp_path / "run"


@pytest.fixture
def pod_ns() -> Iterator[str]:
    require_root_netns()
    with pod_namespace() as path:
        yield path


@pytest.fixture
def pod_ns6() -> Iterator[str]:
    require_root_netns()
    with pod_namespace(ipv6=True) as path:
        yield path


# --------------------------------------------------------------------------- protocol


def test_version_lists_the_supported_spec_versions() -> None:
    out = json.loads(ok(run_plugin({"CNI_COMMAND": "VERSION"}, "")))
    assert out["cniVersion"] == "1.1.0"
    assert out["supportedVersions"] == [
        "0.1.0",
        "0.2.0",
        "0.3.0",
        "0.3.1",
        "0.4.0",
        "1.0.0",
        "1.1.0",
    ]


@pytest.mark.parametrize("nft", [False, True], ids=["iptables", "nftables"])
def test_status_is_ok_when_a_backend_is_installed(tmp_path: Path, nft: bool) -> None:
    conf = netconf(tmp_path, "1.1.0", native_nftables=nft)
    assert ok(run_plugin({"CNI_COMMAND": "STATUS"}, conf)).strip() == ""


def test_status_fails_with_code_50_when_the_backend_is_missing(tmp_path: Path, path: str) -> None:
    if path == "agent":
        pytest.skip("the agent runs the tools from its own PATH, not the caller's")
    # PATH without nft (nor iptables): the plugin must say it is not available.
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {"CNI_COMMAND": "STATUS", "PATH": str(empty)}
    error = cni_error(run_plugin(env, netconf(tmp_path, "1.1.0", native_nftables=True)))
    assert error["code"] == 50 and "nft" in error["msg"]


def test_gc_is_ok(tmp_path: Path) -> None:
    conf = json.loads(netconf(tmp_path, "1.1.0"))
    conf["cni.dev/valid-attachments"] = [{"containerID": "ctr-0", "ifname": "eth0"}]
    del conf["prevResult"]
    assert ok(run_plugin({"CNI_COMMAND": "GC"}, json.dumps(conf))).strip() == ""


@pytest.mark.parametrize(
    ("command", "version"), [("CHECK", "0.3.1"), ("STATUS", "1.0.0"), ("GC", "1.0.0")]
)
def test_command_below_its_spec_version_is_rejected_like_skel(
    tmp_path: Path, command: str, version: str
) -> None:
    """skel: CHECK exists from 0.4.0, STATUS and GC from 1.1.0 (code 1, incompatible)."""
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": "c", "CNI_NETNS": "/nonexistent"}
    env |= {"CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni"}
    error = cni_error(run_plugin(env, netconf(tmp_path, version)))
    assert error["code"] == 1, error
    assert f"config version does not allow {command}" in error["msg"]


def test_no_command_prints_usage_on_stderr() -> None:
    result = run_plugin({}, "")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "meshnet-cni" in result.stderr and "1.1.0" in result.stderr


def test_unknown_command_is_a_cni_error(tmp_path: Path) -> None:
    error = cni_error(run_plugin({"CNI_COMMAND": "FROB"}, netconf(tmp_path)))
    assert error["code"] == 4 and error["msg"] == "unknown CNI_COMMAND: FROB", error
    assert error["cniVersion"] == "1.0.0"


# --------------------------------------------------------------------------- ADD / CHECK / DEL


@pytest.mark.parametrize("version", ["1.0.0", "0.4.0", "1.1.0"])
def test_add_applies_rules_and_prints_prev_result(
    api: FakeApi, run_dir: Path, pod_ns: str, version: str
) -> None:
    conf = netconf(run_dir, version)
    printed = json.loads(ok(run_plugin(cni_env("ADD", pod_ns), conf)))
    want = {k: v for k, v in prev_result(version).items() if k != "cniVersion"}
    if version == "1.0.0":
        del want["dns"]  # types.PrintResult drops an empty dns object for 1.0.0
    assert printed == {"cniVersion": version, **want}
    save = iptables_save(pod_ns)
    for chain in ISTIO_NAT_CHAINS:
        assert f":{chain} " in save, save
    assert "-A PREROUTING -p tcp -j ISTIO_INBOUND" in save
    assert "-A OUTPUT -j ISTIO_OUTPUT" in save
    assert "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in save
    assert "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006" in save
    assert api.requests == [f"/api/v1/namespaces/{POD[0]}/pods/{POD[1]}"]


def test_add_twice_is_idempotent(run_dir: Path, pod_ns: str) -> None:
    conf = netconf(run_dir)
    ok(run_plugin(cni_env("ADD", pod_ns), conf))
    first = netns_state(pod_ns)
    ok(run_plugin(cni_env("ADD", pod_ns), conf))
    assert netns_state(pod_ns) == first


def test_check_passes_then_fails_after_a_rule_is_deleted_by_hand(
    run_dir: Path, pod_ns: str
) -> None:
    conf = netconf(run_dir)
    ok(run_plugin(cni_env("ADD", pod_ns), conf))
    assert ok(run_plugin(cni_env("CHECK", pod_ns), conf)).strip() == ""
    rule = ["-t", "nat", "-D", "ISTIO_REDIRECT", "-p", "tcp", "-j", "REDIRECT"]
    deleted = in_netns(pod_ns, ["iptables", *rule, "--to-ports", "15001"])
    assert deleted.returncode == 0, deleted.stderr
    error = cni_error(run_plugin(cni_env("CHECK", pod_ns), conf))
    assert "ISTIO_REDIRECT" in error["msg"], error


def test_check_of_a_skipped_pod_passes_without_rules(
    api: FakeApi, run_dir: Path, pod_ns: str
) -> None:
    api.pods[POD] = the_pod(annotations={"sidecar.istio.io/inject": "false"})
    before = netns_state(pod_ns)
    ok(run_plugin(cni_env("CHECK", pod_ns), netconf(run_dir)))
    assert netns_state(pod_ns) == before


def test_del_removes_every_istio_chain_and_jump_and_is_idempotent(
    run_dir: Path, pod_ns: str
) -> None:
    conf = netconf(run_dir)
    ok(run_plugin(cni_env("ADD", pod_ns), conf))
    assert istio_lines(iptables_save(pod_ns))
    # DEL needs no pod object: the pod may be gone from the API by then.
    assert ok(run_plugin(cni_env("DEL", pod_ns), conf)).strip() == ""
    assert istio_lines(iptables_save(pod_ns)) == []
    ok(run_plugin(cni_env("DEL", pod_ns), conf))
    assert istio_lines(iptables_save(pod_ns)) == []
    # and a fresh ADD after DEL works again
    ok(run_plugin(cni_env("ADD", pod_ns), conf))
    assert len([c for c in ISTIO_NAT_CHAINS if f":{c} " in iptables_save(pod_ns)]) == 4


def test_concurrent_adds_of_one_container_all_succeed_with_the_rules_in_place(
    run_dir: Path, pod_ns: str
) -> None:
    conf = netconf(run_dir)
    with ThreadPoolExecutor(4) as pool:
        calls = [pool.submit(run_plugin, cni_env("ADD", pod_ns), conf) for _ in range(4)]
        for call in calls:
            ok(call.result())
    save = iptables_save(pod_ns)
    assert [c for c in ISTIO_NAT_CHAINS if f":{c} " not in save] == [], save
    assert save.count("-A OUTPUT -j ISTIO_OUTPUT") == 1, save
    ok(run_plugin(cni_env("CHECK", pod_ns), conf))


def test_del_during_an_add_waits_for_it_then_removes_everything(
    api: FakeApi, run_dir: Path, pod_ns: str
) -> None:
    conf = netconf(run_dir)
    api.delay = 1.0  # the ADD is in its pod lookup when the DEL arrives
    with ThreadPoolExecutor(2) as pool:
        adding = pool.submit(run_plugin, cni_env("ADD", pod_ns), conf)
        deadline = time.monotonic() + 30
        while not api.requests and time.monotonic() < deadline and not adding.done():
            time.sleep(0.01)
        assert api.requests, "the ADD never looked the pod up"
        deleting = pool.submit(run_plugin, cni_env("DEL", pod_ns), conf)
        ok(adding.result())
        ok(deleting.result())
    assert istio_lines(iptables_save(pod_ns)) == []


def test_dual_stack_pod_gets_ipv6_rules_and_del_removes_them(
    api: FakeApi, run_dir: Path, pod_ns6: str
) -> None:
    # Istio's detection: without ISTIO_DUAL_STACK the first address (IPv4 here) decides.
    pod = the_pod()
    pod["spec"]["containers"][1]["env"] = [{"name": "ISTIO_DUAL_STACK", "value": "true"}]
    api.pods[POD] = pod
    conf = netconf(run_dir)
    ok(run_plugin(cni_env("ADD", pod_ns6), conf))
    assert istio_lines(iptables_save(pod_ns6, ipv6=True)), "IPv6 pod without ip6tables rules"
    ok(run_plugin(cni_env("DEL", pod_ns6), conf))
    assert istio_lines(iptables_save(pod_ns6)) == []
    assert istio_lines(iptables_save(pod_ns6, ipv6=True)) == []


def test_del_succeeds_when_the_namespace_is_gone(api: FakeApi, run_dir: Path) -> None:
    require_root_netns()
    conf = netconf(run_dir)
    with pod_namespace() as path:
        ok(run_plugin(cni_env("ADD", path), conf))
    assert not Path(path).exists()
    assert ok(run_plugin(cni_env("DEL", path), conf)).strip() == ""
    # the runtime may also send no CNI_NETNS at all once the sandbox is gone
    assert ok(run_plugin(cni_env("DEL", ""), conf)).strip() == ""


def routing(ns: str) -> str:
    """Policy rules and routes of both families, and lo's addresses (link-local left out)."""
    parts = []
    for argv in (
        ["-4", "rule"],
        ["-6", "rule"],
        ["-4", "route", "show", "table", "all"],
        ["-6", "route", "show", "table", "all"],
        ["addr", "show", "dev", "lo"],
    ):
        out = in_netns(ns, ["ip", *argv])
        assert out.returncode == 0, out.stderr
        parts.append("".join(line for line in out.stdout.splitlines(True) if "fe80:" not in line))
    return "\n---\n".join(parts)


def test_del_of_a_tproxy_pod_removes_rules_routes_and_address(
    api: FakeApi, run_dir: Path, pod_ns6: str
) -> None:
    pod = the_pod(annotations={"sidecar.istio.io/interceptionMode": "TPROXY"})
    pod["spec"]["containers"][1]["env"] = [{"name": "ISTIO_DUAL_STACK", "value": "true"}]
    api.pods[POD] = pod
    conf = netconf(run_dir)
    before = routing(pod_ns6)
    ok(run_plugin(cni_env("ADD", pod_ns6), conf))
    added = routing(pod_ns6)
    assert added.count("fwmark 0x539 lookup 133") == 2, added
    assert added.count("local default dev lo table 133") == 2 and "::6/128" in added, added
    assert ":ISTIO_TPROXY" in iptables_save(pod_ns6, ipv6=True)

    assert ok(run_plugin(cni_env("DEL", pod_ns6), conf)).strip() == ""

    assert routing(pod_ns6) == before
    assert istio_lines(iptables_save(pod_ns6)) == istio_lines(iptables_save(pod_ns6, True)) == []


def test_del_removes_nft_tables_whatever_the_config_says(run_dir: Path, pod_ns: str) -> None:
    before = netns_state(pod_ns)
    ok(run_plugin(cni_env("ADD", pod_ns), netconf(run_dir, native_nftables=True)))
    assert NFT_TABLE in nft_tables(pod_ns)

    ok(run_plugin(cni_env("DEL", pod_ns), netconf(run_dir)))  # no native_nftables here

    assert netns_state(pod_ns) == before


def test_del_of_the_plugins_own_namespace_is_refused(run_dir: Path) -> None:
    error = cni_error(run_plugin(cni_env("DEL", "/proc/self/ns/net"), netconf(run_dir)))
    assert error["code"] == 4 and "should not be the same" in error["msg"], error


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_del_with_a_cni_netns_that_is_not_a_namespace_succeeds(
    run_dir: Path, tmp_path: Path, kind: str
) -> None:
    not_a_namespace = tmp_path / "not-a-netns"
    if kind == "file":
        not_a_namespace.write_text("")
    else:
        not_a_namespace.mkdir()

    result = run_plugin(cni_env("DEL", str(not_a_namespace)), netconf(run_dir))

    assert ok(result).strip() == ""
    assert '"level": "error"' not in result.stderr  # the fallback path logs a warning first


def test_native_nftables_add_check_del(run_dir: Path, pod_ns: str) -> None:
    conf = netconf(run_dir, native_nftables=True)
    before_iptables = iptables_save(pod_ns)
    ok(run_plugin(cni_env("ADD", pod_ns), conf))
    tables = nft_tables(pod_ns)
    assert NFT_TABLE in tables and all(t.startswith("istio-proxy-") for t in tables), tables
    assert iptables_save(pod_ns) == before_iptables, "nft mode must not write iptables rules"
    state = netns_state(pod_ns)
    ok(run_plugin(cni_env("ADD", pod_ns), conf))
    assert netns_state(pod_ns) == state
    ok(run_plugin(cni_env("CHECK", pod_ns), conf))

    listing = in_netns(pod_ns, ["nft", "-a", "list", "table", "inet", NFT_TABLE]).stdout
    match = re.search(r"redirect to :15001 # handle (\d+)", listing)
    assert match, listing
    deleted = in_netns(
        pod_ns, ["nft", "delete", "rule", "inet", NFT_TABLE, "istio-redirect", "handle", match[1]]
    )
    assert deleted.returncode == 0, deleted.stderr
    cni_error(run_plugin(cni_env("CHECK", pod_ns), conf))

    ok(run_plugin(cni_env("DEL", pod_ns), conf))
    assert [t for t in nft_tables(pod_ns) if t.startswith("istio-proxy-")] == []
    ok(run_plugin(cni_env("DEL", pod_ns), conf))


# --------------------------------------------------------------------------- skips


SKIPPED_PODS = {
    "no-istio-proxy": the_pod(proxy=False),
    "inject-false-label": the_pod(labels={"sidecar.istio.io/inject": "false"}),
    "inject-false-annotation": the_pod(annotations={"sidecar.istio.io/inject": "false"}),
    "gateway": the_pod(proxy_args=["proxy", "router"]),
    "istio-init": {
        **the_pod(),
        "spec": {
            "initContainers": [{"name": "istio-init"}],
            "containers": mesh_pod()["spec"]["containers"],
        },
    },
}
_no_status = the_pod()
del _no_status["metadata"]["annotations"]["sidecar.istio.io/status"]
SKIPPED_PODS["no-status-annotation"] = _no_status


@pytest.mark.parametrize("pod", list(SKIPPED_PODS.values()), ids=list(SKIPPED_PODS))
def test_skipped_pod_leaves_the_namespace_untouched(
    api: FakeApi, run_dir: Path, pod_ns: str, pod: dict[str, Any]
) -> None:
    api.pods[POD] = pod
    before = netns_state(pod_ns)
    printed = json.loads(ok(run_plugin(cni_env("ADD", pod_ns), netconf(run_dir))))
    assert printed["ips"] == prev_result()["ips"]
    assert netns_state(pod_ns) == before
    assert len(api.requests) == 1


@pytest.mark.parametrize(
    ("labels", "annotations"),
    [
        ({"sidecar.istio.io/inject": "true"}, {"sidecar.istio.io/inject": "false"}),
        ({}, {"sidecar.istio.io/inject": "maybe"}),
    ],
    ids=["label-beats-annotation", "non-bool-ignored"],
)
def test_inject_value_that_is_not_false_still_gets_rules(
    api: FakeApi,
    run_dir: Path,
    pod_ns: str,
    labels: dict[str, str],
    annotations: dict[str, str],
) -> None:
    api.pods[POD] = the_pod(labels=labels, annotations=annotations)
    ok(run_plugin(cni_env("ADD", pod_ns), netconf(run_dir)))
    assert istio_lines(iptables_save(pod_ns))


@pytest.mark.parametrize(
    ("pod_name", "pod_namespace_", "args"),
    [
        ("meshnet-cni-node-abc", "istio-system", None),
        ("web-0", "kube-system", None),
        ("", "", "IgnoreUnknown=1"),
        ("", "", ""),
    ],
    ids=["self-pod", "excluded-namespace", "not-kubernetes", "no-cni-args"],
)
def test_skip_without_asking_the_api(
    api: FakeApi,
    run_dir: Path,
    pod_ns: str,
    pod_name: str,
    pod_namespace_: str,
    args: str | None,
) -> None:
    api.pods[(pod_namespace_, pod_name)] = mesh_pod(pod_name, pod_namespace_)
    before = netns_state(pod_ns)
    env = cni_env("ADD", pod_ns, pod_name, pod_namespace_, args=args)
    ok(run_plugin(env, netconf(run_dir)))
    assert netns_state(pod_ns) == before
    assert api.requests == []


def test_self_pod_skips_even_without_a_kubeconfig(tmp_path: Path, pod_ns: str) -> None:
    """Istio #60668: the node agent's own pod must not need the (not yet written) kubeconfig."""
    env = cni_env("ADD", pod_ns, "meshnet-cni-node-xyz", "istio-system")
    ok(run_plugin(env, netconf(tmp_path / "empty")))


def test_self_pod_name_in_another_namespace_is_not_skipped(
    api: FakeApi, run_dir: Path, pod_ns: str
) -> None:
    api.pods[("default", "meshnet-cni-node-abc")] = mesh_pod("meshnet-cni-node-abc")
    ok(run_plugin(cni_env("ADD", pod_ns, "meshnet-cni-node-abc"), netconf(run_dir)))
    assert istio_lines(iptables_save(pod_ns))


# --------------------------------------------------------------------------- failures


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_api_unreachable_fails_closed_within_the_retry_budget(tmp_path: Path, pod_ns: str) -> None:
    write_kubeconfig(tmp_path / "run", f"http://127.0.0.1:{_closed_port()}")
    before = netns_state(pod_ns)
    start = time.monotonic()
    error = cni_error(run_plugin(cni_env("ADD", pod_ns), netconf(tmp_path / "run")))
    elapsed = time.monotonic() - start
    assert "failed to get pod default/web-0 after 3 attempts" in error["msg"], error
    assert elapsed < 10, f"3 attempts 0.1 s apart took {elapsed:.1f}s"
    assert netns_state(pod_ns) == before


def test_transient_api_errors_use_the_whole_budget_then_fail(
    api: FakeApi, run_dir: Path, pod_ns: str
) -> None:
    api.status_override = 503
    before = netns_state(pod_ns)
    error = cni_error(run_plugin(cni_env("ADD", pod_ns), netconf(run_dir)))
    assert "503" in error["msg"], error
    assert len(api.requests) == 3
    assert netns_state(pod_ns) == before


@pytest.mark.parametrize(
    ("token", "pod_name", "status"),
    [("wrong-token", "web-0", 401), (None, "missing-pod", 404)],
    ids=["unauthorized", "pod-not-found"],
)
def test_definitive_api_errors_fail_at_once(
    api: FakeApi, tmp_path: Path, pod_ns: str, token: str | None, pod_name: str, status: int
) -> None:
    if token is None:
        write_kubeconfig(tmp_path / "run", api.url)
    else:
        write_kubeconfig(tmp_path / "run", api.url, token=token)
    before = netns_state(pod_ns)
    conf = netconf(tmp_path / "run", pod_fetch_attempts=30, pod_fetch_interval=1)
    start = time.monotonic()
    error = cni_error(run_plugin(cni_env("ADD", pod_ns, pod_name), conf))
    assert f"HTTP {status}" in error["msg"], error
    assert len(api.requests) == 1, "401/403/404 must not be retried"
    assert time.monotonic() - start < 5
    assert netns_state(pod_ns) == before


@pytest.mark.parametrize(
    ("annotation", "value"),
    [
        ("traffic.sidecar.istio.io/excludeInboundPorts", "*"),
        ("sidecar.istio.io/interceptionMode", "NONE"),
        ("traffic.sidecar.istio.io/includeOutboundIPRanges", "10.0.0.0/33"),
        ("traffic.sidecar.istio.io/includeInboundPorts", "http"),
        ("traffic.sidecar.istio.io/excludeOutboundPorts", "70000"),
        ("traffic.sidecar.istio.io/excludeInterfaces", "bad name!"),
    ],
    ids=["exclude-inbound-star", "mode-none", "bad-cidr", "bad-port", "port-range", "bad-iface"],
)
def test_invalid_annotation_fails_naming_it(
    api: FakeApi, run_dir: Path, pod_ns: str, annotation: str, value: str
) -> None:
    api.pods[POD] = the_pod(annotations={annotation: value})
    before = netns_state(pod_ns)
    error = cni_error(run_plugin(cni_env("ADD", pod_ns), netconf(run_dir)))
    assert annotation in error["msg"], error
    assert value in error["msg"], error
    assert netns_state(pod_ns) == before


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("pod_fetch_attempts", "abc"),
        ("pod_fetch_attempts", 0),
        ("pod_fetch_attempts", 2.5),
        ("pod_fetch_interval", "soon"),
        ("pod_fetch_interval", -1),
    ],
)
def test_bad_netconf_number_fails_naming_the_field(
    api: FakeApi, run_dir: Path, pod_ns: str, field: str, value: object
) -> None:
    before = netns_state(pod_ns)
    conf = json.loads(netconf(run_dir))
    conf[field] = value

    error = cni_error(run_plugin(cni_env("ADD", pod_ns), json.dumps(conf)))

    assert error["code"] == 7, error
    assert field in error["msg"] and json.dumps(value) in error["msg"], error
    assert "panicked" not in error["msg"], error
    assert error["cniVersion"] == "1.0.0", error
    assert api.requests == []
    assert netns_state(pod_ns) == before


def test_malformed_stdin_is_a_decode_error(pod_ns: str) -> None:
    before = netns_state(pod_ns)
    error = cni_error(run_plugin(cni_env("ADD", pod_ns), '{"cniVersion": "1.0.0", '))
    assert error["code"] == 6 and "failed to parse network configuration" in error["msg"]
    assert netns_state(pod_ns) == before


def test_unsupported_config_version_is_code_1(run_dir: Path, pod_ns: str) -> None:
    conf = json.loads(netconf(run_dir))
    conf["cniVersion"] = "9.9.9"
    error = cni_error(run_plugin(cni_env("ADD", pod_ns), json.dumps(conf)))
    assert error["code"] == 1, error


def test_own_namespace_is_refused(api: FakeApi, run_dir: Path) -> None:
    error = cni_error(run_plugin(cni_env("ADD", "/proc/self/ns/net"), netconf(run_dir)))
    assert error["code"] == 4 and "should not be the same" in error["msg"], error
    assert api.requests == []


def test_missing_cni_netns_is_an_env_error(api: FakeApi, run_dir: Path) -> None:
    error = cni_error(run_plugin(cni_env("ADD", ""), netconf(run_dir)))
    assert error["code"] == 4 and "CNI_NETNS" in error["msg"], error
    assert api.requests == []


def test_add_into_a_namespace_that_does_not_exist_fails(api: FakeApi, run_dir: Path) -> None:
    missing = "/var/run/netns/mnt-never-made-0"
    error = cni_error(run_plugin(cni_env("ADD", missing), netconf(run_dir)))
    assert missing in error["msg"], error
    assert not Path(missing).exists()


def test_unknown_cni_arg_without_ignore_unknown_fails(
    api: FakeApi, run_dir: Path, pod_ns: str
) -> None:
    before = netns_state(pod_ns)
    args = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;FOO=bar"
    error = cni_error(run_plugin(cni_env("ADD", pod_ns, args=args), netconf(run_dir)))
    assert "FOO" in error["msg"], error
    assert netns_state(pod_ns) == before
    # the same key is fine once the runtime says IgnoreUnknown=1, as containerd does
    ok(run_plugin(cni_env("ADD", pod_ns, args="IgnoreUnknown=1;" + args), netconf(run_dir)))
    assert istio_lines(iptables_save(pod_ns))


# --------------------------------------------------------------------------- traffic


def test_add_captures_real_traffic(api: FakeApi, run_dir: Path) -> None:
    require_root_netns()
    with Topology() as topo:
        ok(run_plugin(cni_env("ADD", str(topo.pod_path)), netconf(run_dir)))
        topo.start_listeners(topo.pod_ns, "proxy", [15001, 15006])
        topo.start_listeners(topo.pod_ns, "app", [8080])
        topo.start_listeners(topo.peer_ns, "peer", [80])

        out = topo.probe(topo.pod_ns, V4.peer, 80, uid=APP_UID, gid=APP_UID)
        assert out.landed_at("proxy", 15001), out.where
        assert out.orig_dst == V4.addr(V4.peer, 80), out.where

        inbound = topo.probe(topo.peer_ns, V4.pod, 8080)
        assert inbound.landed_at("proxy", 15006), inbound.where
        assert inbound.orig_dst == V4.addr(V4.pod, 8080), inbound.where

        # the proxy's own traffic (uid 1337) is not captured
        direct = topo.probe(topo.pod_ns, V4.peer, 80, uid=1337, gid=1337)
        assert direct.landed_at("peer", 80), direct.where

        # after DEL, nothing is captured any more
        ok(run_plugin(cni_env("DEL", str(topo.pod_path)), netconf(run_dir)))
        after = topo.probe(topo.pod_ns, V4.peer, 80, uid=APP_UID, gid=APP_UID)
        assert after.landed_at("peer", 80), after.where


def test_tproxy_pod_gets_its_policy_route_in_its_own_namespace(
    api: FakeApi, run_dir: Path, pod_ns: str
) -> None:
    """The route is made over netlink (pyroute2), in the pod's namespace, not the caller's."""
    api.pods[POD] = the_pod(annotations={"sidecar.istio.io/interceptionMode": "TPROXY"})
    own_rules = subprocess.run(["ip", "rule"], capture_output=True, text=True, check=True).stdout
    ok(run_plugin(cni_env("ADD", pod_ns), netconf(run_dir)))
    assert "fwmark 0x539 lookup 133" in in_netns(pod_ns, ["ip", "rule"]).stdout
    assert "local" in in_netns(pod_ns, ["ip", "route", "show", "table", "133"]).stdout
    assert subprocess.run(["ip", "rule"], capture_output=True, text=True).stdout == own_rules
    ok(run_plugin(cni_env("DEL", pod_ns), netconf(run_dir)))
    assert "lookup 133" not in in_netns(pod_ns, ["ip", "rule"]).stdout
