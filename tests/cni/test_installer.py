"""The installer daemon as a real process, against temporary host dirs (SPEC-istio §5.4).

Each daemon test starts `python -m meshnet.cni.install` with a conf dir, a bin dir, a run dir
and a fake service-account dir, drives it through files and signals, and always kills it by
PID. The last tests check, in-process, what Istio's goldens do not cover.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshnet.cni import conflist
from meshnet.cni.install import ENV_OPTIONS, Settings, create_cni_config_file
from meshnet.errors import OptionError
from tests.support import REPO, clean_env

PLUGIN = "meshnet-cni"
TIMEOUT = 8.0  # generous bound for every wait; the daemon polls every 0.5 s
BRIDGE = {
    "cniVersion": "0.4.0",
    "name": "dbnet",
    "type": "bridge",
    "bridge": "cni0",
    "ipam": {"type": "host-local", "subnet": "10.1.0.0/16"},
}
LIST = {
    "cniVersion": "0.4.0",
    "name": "dbnet",
    "plugins": [
        {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}},
        {"type": "tuning", "sysctl": {"net.core.somaxconn": "500"}},
    ],
}


@dataclass(frozen=True, slots=True)
class Host:
    """The node's directories as the installer's pod sees them."""

    conf_dir: Path
    bin_dir: Path
    run_dir: Path
    sa_dir: Path
    plugin_source: Path
    log: Path

    @property
    def kubeconfig(self) -> Path:
        return self.run_dir / f"{PLUGIN}-kubeconfig"

    @property
    def binary(self) -> Path:
        return self.bin_dir / PLUGIN

    def snapshot(self) -> dict[str, bytes]:
        """Every file in the conf, bin and run dirs, by path."""
        return {
            str(path.relative_to(self.conf_dir.parent)): path.read_bytes()
            for directory in (self.conf_dir, self.bin_dir, self.run_dir)
            for path in sorted(directory.iterdir())
        }


@pytest.fixture
def host(tmp_path: Path) -> Host:
    layout = Host(
        conf_dir=tmp_path / "net.d",
        bin_dir=tmp_path / "bin",
        run_dir=tmp_path / "run",
        sa_dir=tmp_path / "serviceaccount",
        plugin_source=tmp_path / "image" / PLUGIN,
        log=tmp_path / "installer.log",
    )
    for directory in (layout.conf_dir, layout.bin_dir, layout.run_dir, layout.sa_dir):
        directory.mkdir()
    layout.plugin_source.parent.mkdir()
    layout.plugin_source.write_bytes(b"#!/bin/sh\necho dummy meshnet-cni\n")
    (layout.bin_dir / "bridge").write_bytes(b"another plugin")  # must stay untouched
    (layout.run_dir / "other-file").write_bytes(b"not ours")
    (layout.sa_dir / "token").write_text("token-one")
    (layout.sa_dir / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nfake\n")
    return layout


class Daemon:
    """One installer process and its readiness port."""

    def __init__(self, host: Host, port: int, **overrides: str | None) -> None:
        self.host = host
        self.port = port
        env = {k: v for k, v in clean_env().items() if k not in {o.name for o in ENV_OPTIONS}}
        env.update(
            {
                "MESHNET_CNI_PLUGIN_BINARY": str(host.plugin_source),
                "MESHNET_CNI_BIN_DIRS": str(host.bin_dir),
                "MESHNET_CNI_SERVICE_ACCOUNT_DIR": str(host.sa_dir),
                "MESHNET_CNI_READINESS_PORT": str(port),
                "MESHNET_LOG_LEVEL": "debug",
                "MOUNTED_CNI_NET_DIR": str(host.conf_dir),
                "CNI_AGENT_RUN_DIR": str(host.run_dir),
                "KUBERNETES_SERVICE_HOST": "127.0.0.1",
                "KUBERNETES_SERVICE_PORT": "6443",
                "POD_NAMESPACE": "meshnet-system",
                "MONITORING_PORT": "0",
            }
        )
        for name, value in overrides.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        self._log = host.log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "meshnet.cni.install"],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )

    def readyz(self) -> int | None:
        """The HTTP status of /readyz, or None while nothing listens."""
        url = f"http://127.0.0.1:{self.port}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return int(response.status)
        except urllib.error.HTTPError as err:
            return err.code
        except OSError:
            return None

    def terminate(self, signum: int = signal.SIGTERM) -> int:
        os.kill(self.process.pid, signum)
        return self.process.wait(timeout=TIMEOUT)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=TIMEOUT)
        self._log.close()

    def logs(self) -> str:
        return self.host.log.read_text(errors="replace")


@pytest.fixture
def start(host: Host) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def launch(**overrides: str | None) -> Daemon:
        daemon = Daemon(host, _free_port(), **overrides)
        started.append(daemon)
        return daemon

    try:
        yield launch
    finally:
        for daemon in started:
            daemon.kill()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def eventually(check: Callable[[], bool], what: str, daemon: Daemon) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if check():
            return
        assert daemon.process.poll() is None, f"installer exited early:\n{daemon.logs()}"
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting until {what}\n{daemon.logs()}")


def write_json(path: Path, value: Any, mode: int = 0o644) -> None:
    """Write as another CNI would: a temp file without a CNI extension, then rename."""
    temp = path.with_name(f".{path.name}.writing")
    temp.write_text(json.dumps(value, indent=2) + "\n")
    temp.chmod(mode)
    temp.rename(path)


def plugins_of(path: Path) -> list[dict[str, Any]]:
    try:
        plugins = json.loads(path.read_text()).get("plugins", [])
    except (OSError, ValueError):
        return []
    return list(plugins)


def types_of(path: Path) -> list[str]:
    return [str(plugin.get("type")) for plugin in plugins_of(path)]


def test_waits_without_config_then_merges_a_bridge_conf(
    host: Host, start: Callable[..., Daemon]
) -> None:
    daemon = start()
    eventually(lambda: host.kubeconfig.exists() and host.binary.exists(), "installed", daemon)
    eventually(lambda: daemon.readyz() == 503, "/readyz answers 503", daemon)
    time.sleep(0.6)  # more than one poll: it must keep waiting and write nothing
    assert list(host.conf_dir.iterdir()) == []

    write_json(host.conf_dir / "10-bridge.conf", BRIDGE)
    merged = host.conf_dir / "10-bridge.conflist"
    eventually(lambda: types_of(merged) == ["bridge", PLUGIN], "merged into a conflist", daemon)
    assert not (host.conf_dir / "10-bridge.conf").exists()
    eventually(lambda: daemon.readyz() == 200, "/readyz answers 200", daemon)

    assert daemon.terminate() == 0, daemon.logs()
    wrapped_bridge = {k: v for k, v in BRIDGE.items() if k != "cniVersion"}  # Istio's quirk
    assert plugins_of(merged) == [wrapped_bridge]


def test_appends_to_an_existing_conflist_and_keeps_its_mode(
    host: Host, start: Callable[..., Daemon]
) -> None:
    config = host.conf_dir / "10-list.conflist"
    write_json(config, LIST, mode=0o640)
    daemon = start()
    eventually(lambda: daemon.readyz() == 200, "/readyz answers 200", daemon)

    plugins = plugins_of(config)
    assert [p["type"] for p in plugins] == ["bridge", "tuning", PLUGIN]
    entry = plugins[-1]
    assert entry["name"] == PLUGIN
    assert entry["cni_agent_run_dir"] == str(host.run_dir)
    assert entry["pod_namespace"] == "meshnet-system"
    assert "cniVersion" not in entry
    assert config.stat().st_mode & 0o777 == 0o640


def test_writes_the_binary_and_kubeconfig(host: Host, start: Callable[..., Daemon]) -> None:
    write_json(host.conf_dir / "10-list.conflist", LIST)
    daemon = start()
    eventually(lambda: daemon.readyz() == 200, "/readyz answers 200", daemon)

    assert host.binary.read_bytes() == host.plugin_source.read_bytes()
    assert host.binary.stat().st_mode & 0o777 == 0o755
    ca = base64.b64encode((host.sa_dir / "ca.crt").read_bytes()).decode()
    assert host.kubeconfig.read_text() == (
        "apiVersion: v1\n"
        "clusters:\n"
        "- cluster:\n"
        f"    certificate-authority-data: {ca}\n"
        "    server: https://127.0.0.1:6443\n"
        "  name: local\n"
        "contexts:\n"
        "- context:\n"
        "    cluster: local\n"
        "    user: meshnet-cni\n"
        "  name: meshnet-cni-context\n"
        "current-context: meshnet-cni-context\n"
        "kind: Config\n"
        "users:\n"
        "- name: meshnet-cni\n"
        "  user:\n"
        "    token: token-one\n"
    )
    assert host.kubeconfig.stat().st_mode & 0o777 == 0o600


def test_replaces_an_existing_entry_of_its_type(host: Host, start: Callable[..., Daemon]) -> None:
    config = host.conf_dir / "10-list.conflist"
    stale = {"type": PLUGIN, "name": PLUGIN, "kubernetes": {"kubeconfig": "/old"}}
    write_json(config, {**LIST, "plugins": [LIST["plugins"][0], stale, LIST["plugins"][1]]})
    daemon = start()
    eventually(lambda: daemon.readyz() == 200, "/readyz answers 200", daemon)

    plugins = plugins_of(config)
    assert [p["type"] for p in plugins] == ["bridge", "tuning", PLUGIN]
    assert "kubernetes" not in plugins[-1]


def test_reinserts_when_another_cni_rewrites_the_config(
    host: Host, start: Callable[..., Daemon]
) -> None:
    config = host.conf_dir / "10-list.conflist"
    write_json(config, LIST)
    daemon = start()
    eventually(lambda: daemon.readyz() == 200, "/readyz answers 200", daemon)

    write_json(config, LIST)  # the other CNI puts its own version back
    assert daemon.readyz() == 503
    eventually(lambda: types_of(config) == ["bridge", "tuning", PLUGIN], "re-inserted", daemon)
    eventually(lambda: daemon.readyz() == 200, "/readyz answers 200 again", daemon)


def test_token_rotation_rewrites_the_kubeconfig(host: Host, start: Callable[..., Daemon]) -> None:
    write_json(host.conf_dir / "10-list.conflist", LIST)
    daemon = start()
    eventually(lambda: daemon.readyz() == 200, "/readyz answers 200", daemon)

    rotated = host.sa_dir / ".token.new"
    rotated.write_text("token-two")
    rotated.rename(host.sa_dir / "token")
    eventually(
        lambda: "token: token-two\n" in host.kubeconfig.read_text(), "kubeconfig rewritten", daemon
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_removes_exactly_what_it_added(
    host: Host, start: Callable[..., Daemon], signum: int
) -> None:
    config = host.conf_dir / "10-list.conflist"
    write_json(config, LIST)
    write_json(host.conf_dir / "99-other.conflist", {**LIST, "name": "other"})
    original_plugins = plugins_of(config)
    before = host.snapshot()
    daemon = start()
    eventually(lambda: daemon.readyz() == 200, "/readyz answers 200", daemon)

    assert daemon.terminate(signum) == 0, daemon.logs()
    after = host.snapshot()
    assert plugins_of(config) == original_plugins
    assert not host.kubeconfig.exists() and not host.binary.exists()
    changed = {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}
    assert changed == {"net.d/10-list.conflist"}  # re-serialised by the cleanup; nothing else


def test_missing_api_server_env_is_an_error_and_leaves_nothing(
    host: Host, start: Callable[..., Daemon]
) -> None:
    write_json(host.conf_dir / "10-list.conflist", LIST)
    before = host.snapshot()
    daemon = start(KUBERNETES_SERVICE_HOST=None)

    assert daemon.process.wait(timeout=TIMEOUT) == 1
    assert "KUBERNETES_SERVICE_HOST not set. Is this not running within a pod?" in daemon.logs()
    assert host.snapshot() == before  # the binary it copied first was removed again


# --- in-process: what the goldens do not cover ---------------------------------------------


def test_numbers_and_html_characters_are_encoded_as_go_does() -> None:
    text = '{"b": [1.0, 1e-5, 1.5e-7, 1e21, 12345678901234567890, -0], "a": "<&>"}'
    assert conflist.marshal(conflist.loads(text, "test")) == (
        "{\n"
        '  "a": "\\u003c\\u0026\\u003e",\n'
        '  "b": [\n    1,\n    0.00001,\n    1.5e-7,\n    1e+21,\n'
        "    12345678901234567000,\n    -0\n  ]\n"
        "}\n"
    )


def test_primary_is_the_first_valid_file_in_sorted_order(tmp_path: Path) -> None:
    (tmp_path / "00-broken.conflist").write_text("{")
    (tmp_path / "01-empty.conflist").write_text('{"name": "x", "plugins": []}')
    (tmp_path / "02-untyped.conf").write_text('{"name": "x"}')
    (tmp_path / "03-readme.txt").write_text(json.dumps(BRIDGE))
    (tmp_path / "10-bridge.json").write_text(json.dumps(BRIDGE))
    (tmp_path / "20-list.conflist").write_text(json.dumps(LIST))
    assert conflist.find_primary(tmp_path) == "10-bridge.json"


def test_a_json_primary_is_wrapped_into_a_conflist(tmp_path: Path) -> None:
    # Runtimes read .json files too; a list inside a .json would not load, so it is renamed.
    (tmp_path / "10-bridge.json").write_text(json.dumps(BRIDGE))
    settings = Settings.from_env({"MOUNTED_CNI_NET_DIR": str(tmp_path)})
    written = create_cni_config_file(settings, lambda seconds: False)
    assert written == tmp_path / "10-bridge.conflist"
    assert types_of(written) == ["bridge", PLUGIN]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["10-bridge.conflist"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CHAINED_CNI_PLUGIN", "yes"),
        ("KUBECONFIG_MODE", "rw-------"),
        ("MESHNET_CNI_READINESS_PORT", "80000"),
        ("CNI_CONF_NAME", "../etc/passwd"),
        ("AMBIENT_ENABLED", "true"),
    ],
)
def test_malformed_options_are_errors_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(OptionError, match=name):
        Settings.from_env({name: value})


@pytest.mark.parametrize(("value", "mode"), [("0640", 0o640), ("420", 0o644), ("0o600", 0o600)])
def test_kubeconfig_mode_is_parsed_like_go(value: str, mode: int) -> None:
    assert Settings.from_env({"KUBECONFIG_MODE": value}).kubeconfig_mode == mode
