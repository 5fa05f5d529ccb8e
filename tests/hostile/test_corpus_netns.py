"""The hostile-input corpus against real namespaces: every case, through its flag, its env
variable and (where one maps to it) the CNI plugin's pod annotation, on iptables-nft,
iptables-legacy and native nftables. Each run must fail, leave the namespace byte for byte as
it was (rules of every backend, policy routes, lo addresses), print nothing from any file, and
end within the subprocess timeout."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshnet.apply.iptables_tool import IptablesRunner, describe
from meshnet.errors import BackendError
from meshnet.host import netns
from tests.cni.fakes import FakeApi, cni_env, mesh_pod, run_plugin, write_kubeconfig
from tests.hostile.corpus import (
    CASES,
    RESTORE_INJECTION,
    Case,
    annotation_cases,
    cli_args,
    env_args,
)
from tests.netns.harness import require_root_netns
from tests.support.cli import meshnet

pytestmark = pytest.mark.netns

BACKENDS = ("iptables-nft", "iptables-legacy", "nftables")
BACKEND_ARGS = {
    "iptables-nft": ("--force-iptables-binary", "nft"),
    "iptables-legacy": ("--force-iptables-binary", "legacy"),
    "nftables": ("--native-nftables",),
}
TIMEOUT = 15.0  # a run that hangs (nft `monitor`) fails the test with TimeoutExpired
DUMPS = (
    ("iptables-nft-save",),
    ("ip6tables-nft-save",),
    ("iptables-legacy-save",),
    ("ip6tables-legacy-save",),
    ("nft", "list", "ruleset"),
    ("ip", "rule"),
    ("ip", "-6", "rule"),
    ("ip", "-6", "route", "show", "table", "all"),
    ("ip", "-6", "addr", "show", "dev", "lo"),
)
_COUNTERS = re.compile(r"\[\d+:\d+\]")  # chain packet counters move with any traffic
# Foreign state each backend's namespace starts with: it must survive every run unchanged.
FOREIGN = {
    "iptables-nft": [
        ["iptables-nft", "-A", "INPUT", "-s", "198.51.100.9/32", "-j", "ACCEPT"],
        ["ip6tables-nft", "-A", "INPUT", "-s", "2001:db8:9::9/128", "-j", "ACCEPT"],
    ],
    "iptables-legacy": [
        ["iptables-legacy", "-A", "INPUT", "-s", "198.51.100.8/32", "-j", "ACCEPT"],
        ["ip6tables-legacy", "-A", "INPUT", "-s", "2001:db8:9::8/128", "-j", "ACCEPT"],
    ],
    "nftables": [
        ["nft", "add", "table", "inet", "foreign"],
        ["nft", "add", "chain", "inet", "foreign", "c"],
        ["nft", "add", "rule", "inet", "foreign", "c", "ip", "saddr", "198.51.100.7", "accept"],
    ],
}


def _exec(ns: str, argv: list[str] | tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=30, check=False
    )


def snapshot(ns: str) -> dict[str, str]:
    out = {}
    for argv in DUMPS:
        text = _exec(ns, argv).stdout
        lines = [_COUNTERS.sub("[-]", line) for line in text.splitlines() if line[:1] != "#"]
        out[" ".join(argv)] = "\n".join(lines)
    return out


@pytest.fixture(scope="module")
def namespaces() -> Iterator[dict[str, tuple[str, dict[str, str]]]]:
    """One namespace per backend, with a veth address of each family and foreign rules;
    yields backend -> (name, its snapshot). Always deleted."""
    require_root_netns()
    made: dict[str, tuple[str, dict[str, str]]] = {}
    try:
        for backend in BACKENDS:
            name = f"mnt-hostile-{secrets.token_hex(3)}"
            subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
            made[backend] = (name, {})
            for args in (
                ["link", "set", "lo", "up"],
                ["link", "add", "eth0", "type", "veth", "peer", "name", "eth1"],
                ["link", "set", "eth0", "up"],
                ["addr", "add", "192.0.2.1/24", "dev", "eth0"],
                ["addr", "add", "2001:db8::1/64", "dev", "eth0", "nodad"],
            ):
                subprocess.run(["ip", "-n", name, *args], check=True, timeout=30)
            for argv in FOREIGN[backend]:
                assert _exec(name, argv).returncode == 0, argv
            made[backend] = (name, snapshot(name))
        yield made
    finally:
        for name, _ in made.values():
            subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)


def _file_lines() -> set[str]:
    """Lines of the files the cases point nft's include or a read at."""
    lines: set[str] = set()
    for path in ("/etc/hostname", "/etc/passwd", "/etc/hosts"):
        try:
            lines |= {line.strip() for line in Path(path).read_text().splitlines() if line.strip()}
        except OSError:
            continue
    return lines


FILE_LINES = _file_lines()


def assert_refused(result: subprocess.CompletedProcess[str], origin: str, where: str) -> None:
    out = result.stdout + result.stderr
    assert result.returncode != 0, f"{where}: exit 0\n{out}"
    assert "Traceback" not in out and "\x00" not in out, out
    assert "root:x:0" not in out and "In file included from" not in out, out
    leaked = [line for line in out.splitlines() if line.strip() in FILE_LINES]
    assert not leaked, f"{where}: printed file lines {leaked}"
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and origin in errors[0], f"{where}: {errors}"


def _assert_unchanged(ns: str, before: dict[str, str], where: str) -> None:
    after = snapshot(ns)
    changed = {k: after[k] for k in before if before[k] != after[k]}
    assert not changed, f"{where} changed the namespace: {changed}"


CHANNELS = ("flag", "env")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channel", CHANNELS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_cli_refuses_and_changes_nothing(
    namespaces: dict[str, tuple[str, dict[str, str]]], backend: str, channel: str, case: Case
) -> None:
    ns, before = namespaces[backend]
    if channel == "flag":
        args = cli_args(case)
        env: dict[str, str] = {}
        origin = str(case.flag.long)
    else:
        found = env_args(case)
        args, env = found if found is not None else (None, {})
        origin = f"env {next(iter(env))}" if env else ""
    if args is None:
        pytest.skip(f"{case.key} has no {channel}")
    if "\x00" in case.value:
        pytest.skip("argv and environ cannot carry a NUL (a pod annotation can)")
    argv = ["istio-iptables", "--network-namespace", f"/var/run/netns/{ns}", *args]
    result = meshnet([*argv, *BACKEND_ARGS[backend]], env=env, timeout=TIMEOUT)
    where = f"{case.name} by {channel} on {backend}"
    assert_refused(result, origin, where)
    _assert_unchanged(ns, before, where)


# --- the CNI plugin: the same values as pod annotations ----------------------------------------


@pytest.fixture(scope="module")
def api() -> Iterator[FakeApi]:
    with FakeApi() as fake:
        yield fake


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, api: FakeApi) -> Path:
    path = tmp_path_factory.mktemp("hostile") / "run"
    write_kubeconfig(path, api.url)
    return path


def _netconf(run_dir: Path, native: bool) -> str:
    return json.dumps(
        {
            "cniVersion": "1.0.0",
            "name": "k8s-pod-network",
            "type": "meshnet-cni",
            "cni_agent_run_dir": str(run_dir),
            "pod_namespace": "istio-system",
            "pod_fetch_attempts": 2,
            "pod_fetch_interval": 0.1,
            "native_nftables": native,
            "prevResult": {"cniVersion": "1.0.0", "interfaces": [], "ips": []},
        }
    )


def _cni_add(
    api: FakeApi, run_dir: Path, ns: str, backend: str, pod: dict[str, Any]
) -> subprocess.CompletedProcess[str]:
    name = f"hostile-{secrets.token_hex(4)}"
    pod["metadata"]["name"] = name
    api.pods[("default", name)] = pod
    env = cni_env("ADD", f"/var/run/netns/{ns}", pod_name=name)
    return run_plugin(env, _netconf(run_dir, backend == "nftables"), timeout=TIMEOUT)


def _cni_refused(result: subprocess.CompletedProcess[str], named: str, where: str) -> None:
    assert result.returncode == 1, f"{where}: exit {result.returncode} {result.stdout}"
    error = json.loads(result.stdout)
    assert error["code"] > 0 and named in error["msg"] and "\n" not in error["msg"], error
    out = result.stdout + result.stderr
    assert "Traceback" not in out and "root:x:0" not in out, out
    leaked = [line for line in error["msg"].split(": ") if line.strip() in FILE_LINES]
    assert not leaked, f"{where}: printed file lines {leaked}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("case", "annotation"), list(annotation_cases()), ids=[c.name for c, _ in annotation_cases()]
)
def test_cni_refuses_annotation_and_changes_nothing(
    namespaces: dict[str, tuple[str, dict[str, str]]],
    api: FakeApi,
    run_dir: Path,
    backend: str,
    case: Case,
    annotation: str,
) -> None:
    """iptables-nft and -legacy: the plugin detects the backend from the foreign rules."""
    ns, before = namespaces[backend]
    result = _cni_add(api, run_dir, ns, backend, mesh_pod(annotations={annotation: case.value}))
    where = f"{case.name} as {annotation} on {backend}"
    _cni_refused(result, annotation, where)
    _assert_unchanged(ns, before, where)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cni_names_a_bad_run_as_user_field(
    namespaces: dict[str, tuple[str, dict[str, str]]], api: FakeApi, run_dir: Path, backend: str
) -> None:
    ns, before = namespaces[backend]
    pod = mesh_pod()
    pod["spec"]["containers"][1]["securityContext"] = {"runAsUser": "1337\n-A INPUT -j DROP"}
    result = _cni_add(api, run_dir, ns, backend, pod)
    _cni_refused(result, "securityContext.runAsUser", f"runAsUser on {backend}")
    assert "annotation" not in json.loads(result.stdout)["msg"]
    _assert_unchanged(ns, before, f"runAsUser on {backend}")


# --- finding 4's second line of defence: the restore itself refuses unplanned tables ----------


@pytest.mark.parametrize("backend", ("iptables-nft", "iptables-legacy"))
def test_restore_refuses_text_naming_an_unplanned_table(
    namespaces: dict[str, tuple[str, dict[str, str]]], backend: str
) -> None:
    ns, before = namespaces[backend]
    injected = "* nat\n-N ISTIO_OUTPUT\n-A ISTIO_OUTPUT -d " + RESTORE_INJECTION + " -j RETURN\n"
    with netns.entered(f"/var/run/netns/{ns}"):
        runner = IptablesRunner(describe(backend))
        with pytest.raises(BackendError, match="'filter'"):
            runner.restore(injected + "COMMIT\n", {"nat", "raw"})
    _assert_unchanged(ns, before, f"restore guard on {backend}")
