"""The installer daemon (Istio's `cni/pkg/install`) as a real process, against temporary host dirs.

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

from meshnet.cni.install import conflist
from meshnet.cni.install.config import create_cni_config_file, remove_cni_config
from meshnet.cni.install.settings import ENV_OPTIONS, Settings
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
        return self.readyz_reply()[0]

    def readyz_reply(self) -> tuple[int | None, str]:
        """The status and body of /readyz ((None, "") while nothing listens)."""
        url = f"http://127.0.0.1:{self.port}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()
        except OSError:
            return None, ""

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
    waiting = f"not ready: no CNI config file (.conf, .conflist, .json) in {host.conf_dir}\n"
    eventually(lambda: daemon.readyz_reply() == (503, waiting), "/readyz says why", daemon)
    time.sleep(0.6)  # more than one poll: it must keep waiting and write nothing
    assert list(host.conf_dir.iterdir()) == []

    conf = host.conf_dir / "10-bridge.conf"
    write_json(conf, BRIDGE)
    original = conf.read_bytes()
    merged = host.conf_dir / "10-bridge.conflist"
    eventually(lambda: types_of(merged) == ["bridge", PLUGIN], "merged into a conflist", daemon)
    assert not conf.exists()
    eventually(lambda: daemon.readyz() == 200, "/readyz answers 200", daemon)
    wrapped_bridge = {k: v for k, v in BRIDGE.items() if k != "cniVersion"}  # Istio's quirk
    assert plugins_of(merged)[0] == wrapped_bridge

    assert daemon.terminate() == 0, daemon.logs()
    assert sorted(p.name for p in host.conf_dir.iterdir()) == ["10-bridge.conf"]
    assert conf.read_bytes() == original  # the user's file, not the wrapped list


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
    assert plugins_of(config) == original_plugins
    assert not host.kubeconfig.exists() and not host.binary.exists()
    assert host.snapshot() == before  # the conflist byte for byte, not re-serialised


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
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "10-bridge.conflist",
        "10-bridge.json.meshnet-cni-orig",  # the user's file, which no runtime loads there
    ]


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


# --- the user's CNI config is never lost ---------------------------------------------------

# As another CNI may write it: numbers Go would round, characters Go would escape, odd layout.
EXACT_CONF = (
    '{ "cniVersion": "1.0.0", "name": "mynet", "type": "bridge",\n'
    '  "bigint": 12345678901234567890, "float": 1.50, "tiny": 1e-7, "negzero": -0,\n'
    '  "html": "<a&b>", "sep": "x\\u2028y", "unicode": "\\u00e9t\\u00e9" }\n'
)


def in_process(conf_dir: Path, **env: str) -> Settings:
    return Settings.from_env({"MOUNTED_CNI_NET_DIR": str(conf_dir), **env})


def test_numbers_and_strings_survive_the_merge_exactly(tmp_path: Path) -> None:
    (tmp_path / "10-mynet.conf").write_text(EXACT_CONF)
    written = create_cni_config_file(in_process(tmp_path), lambda seconds: False)
    text = written.read_text()
    for literal in ("12345678901234567890", "1.50", "1e-7", "-0", '"<a&b>"', '"été"'):
        assert f": {literal}" in text, text
    assert '"x\u2028y"' in text, text
    assert "\\u003c" not in text and "12345678901234567000" not in text
    user_plugin = json.loads(text)["plugins"][0]
    assert {k: v for k, v in user_plugin.items()} == {
        k: v for k, v in json.loads(EXACT_CONF).items() if k != "cniVersion"
    }


def test_a_converted_conf_comes_back_byte_for_byte_with_its_mode_and_owner(
    host: Host, start: Callable[..., Daemon]
) -> None:
    conf = host.conf_dir / "10-mynet.conf"
    conf.write_text(EXACT_CONF)
    conf.chmod(0o604)
    os.chown(conf, 4321, 8765)
    daemon = start()
    eventually(lambda: daemon.readyz() == 200, "/readyz answers 200", daemon)
    backup = host.conf_dir / f"10-mynet.conf.{PLUGIN}-orig"
    assert sorted(p.name for p in host.conf_dir.iterdir()) == [backup.name, "10-mynet.conflist"]
    assert backup.read_text() == EXACT_CONF  # kept while the list is in place

    assert daemon.terminate() == 0, daemon.logs()
    assert sorted(p.name for p in host.conf_dir.iterdir()) == ["10-mynet.conf"]
    status = conf.stat()
    assert conf.read_text() == EXACT_CONF
    assert (status.st_mode & 0o7777, status.st_uid, status.st_gid) == (0o604, 4321, 8765)


def test_a_merged_conflist_keeps_its_owner(host: Host, start: Callable[..., Daemon]) -> None:
    config = host.conf_dir / "10-list.conflist"
    write_json(config, LIST, mode=0o640)
    os.chown(config, 4321, 8765)
    daemon = start()
    eventually(lambda: types_of(config)[-1:] == [PLUGIN], "merged", daemon)
    status = config.stat()
    assert (status.st_mode & 0o7777, status.st_uid, status.st_gid) == (0o640, 4321, 8765)


def test_a_config_changed_after_the_merge_keeps_the_change_and_the_original(
    host: Host, start: Callable[..., Daemon]
) -> None:
    config = host.conf_dir / "10-list.conflist"
    write_json(config, LIST)
    original = config.read_bytes()
    daemon = start()
    eventually(lambda: daemon.readyz() == 200, "/readyz answers 200", daemon)
    changed = json.loads(config.read_text())
    changed["plugins"].insert(1, {"type": "portmap", "capabilities": {"portMappings": True}})
    write_json(config, changed)  # someone adds a plugin and keeps ours: no re-merge needed

    assert daemon.terminate() == 0, daemon.logs()
    assert types_of(config) == ["bridge", "portmap", "tuning"]
    backup = host.conf_dir / f"10-list.conflist.{PLUGIN}-orig"
    assert backup.read_bytes() == original
    assert "CNI config changed since the merge" in daemon.logs()


def test_a_symlinked_conflist_is_written_through_and_restored(
    host: Host, start: Callable[..., Daemon]
) -> None:
    real = host.conf_dir.parent / "cni-configs" / "list.conflist"
    real.parent.mkdir()
    write_json(real, LIST, mode=0o640)
    original = real.read_bytes()
    link = host.conf_dir / "10-list.conflist"
    link.symlink_to("../cni-configs/list.conflist")
    daemon = start()
    eventually(lambda: daemon.readyz() == 200, "/readyz answers 200", daemon)
    assert link.is_symlink() and os.readlink(link) == "../cni-configs/list.conflist"
    assert types_of(real) == ["bridge", "tuning", PLUGIN]
    assert real.stat().st_mode & 0o777 == 0o640

    assert daemon.terminate() == 0, daemon.logs()
    assert link.is_symlink() and os.readlink(link) == "../cni-configs/list.conflist"
    assert real.read_bytes() == original
    assert sorted(p.name for p in host.conf_dir.iterdir()) == ["10-list.conflist"]


def test_a_symlinked_conf_is_moved_aside_whole_and_put_back(tmp_path: Path) -> None:
    (tmp_path / "elsewhere.json").write_text(json.dumps(BRIDGE))
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    link = conf_dir / "10-bridge.conf"
    link.symlink_to("../elsewhere.json")
    settings = in_process(conf_dir)
    written = create_cni_config_file(settings, lambda seconds: False)
    backup = conf_dir / f"10-bridge.conf.{PLUGIN}-orig"
    assert backup.is_symlink() and not link.exists()
    assert (tmp_path / "elsewhere.json").read_text() == json.dumps(BRIDGE)  # target untouched

    remove_cni_config(settings, written)
    assert link.is_symlink() and os.readlink(link) == "../elsewhere.json"
    assert sorted(p.name for p in conf_dir.iterdir()) == ["10-bridge.conf"]


def test_an_old_stale_entry_is_removed_not_restored(tmp_path: Path) -> None:
    stale = {"type": PLUGIN, "name": PLUGIN}
    (tmp_path / "10-list.conflist").write_text(json.dumps({**LIST, "plugins": [stale]}))
    settings = in_process(tmp_path)
    written = create_cni_config_file(settings, lambda seconds: False)
    remove_cni_config(settings, written)
    assert types_of(written) == []  # putting the original back would bring the stale entry back


def test_readyz_and_the_log_name_a_malformed_config(
    host: Host, start: Callable[..., Daemon]
) -> None:
    (host.conf_dir / "10-broken.conflist").write_text('{"name": "x", "plugins": [')
    (host.conf_dir / "20-untyped.conf").write_text('{"name": "x"}')
    daemon = start()
    expected = (
        f"not ready: no valid CNI config in {host.conf_dir}: 10-broken.conflist: "
        "error loading 10-broken.conflist (JSON error): Expecting value: line 1 column 27 "
        "(char 26); 20-untyped.conf: no plugin type\n"
    )
    eventually(lambda: daemon.readyz_reply() == (503, expected), "/readyz says why", daemon)
    eventually(lambda: expected[len("not ready: ") : -1] in daemon.logs(), "logged", daemon)


def test_a_named_malformed_config_is_waited_for_not_fatal(
    host: Host, start: Callable[..., Daemon]
) -> None:
    config = host.conf_dir / "10-list.conflist"
    config.write_text('{"plugins": {"not": "a list"}}')
    daemon = start(CNI_CONF_NAME="10-list.conflist")
    reason = f"{config}: error reading plugin list from CNI config"
    eventually(lambda: daemon.readyz_reply() == (503, f"not ready: {reason}\n"), "reason", daemon)
    eventually(lambda: reason in daemon.logs(), "logged", daemon)
    write_json(config, LIST)
    eventually(lambda: daemon.readyz() == 200, "merged once the file is fixed", daemon)
    assert types_of(config) == ["bridge", "tuning", PLUGIN]


def test_readyz_and_the_log_name_a_missing_conf_dir(
    host: Host, start: Callable[..., Daemon]
) -> None:
    missing = host.conf_dir.parent / "not-mounted"
    daemon = start(MOUNTED_CNI_NET_DIR=str(missing))
    reason = f"CNI conf dir {missing} does not exist (is the host's dir mounted?)"
    eventually(lambda: daemon.readyz_reply() == (503, f"not ready: {reason}\n"), "reason", daemon)
    eventually(lambda: reason in daemon.logs(), "logged", daemon)


def test_converting_keeps_a_list_of_theirs_under_the_new_name(tmp_path: Path) -> None:
    (tmp_path / "10-net.conf").write_text(json.dumps(BRIDGE))
    theirs = json.dumps({**LIST, "name": "theirs"})
    (tmp_path / "10-net.conflist").write_text(theirs)  # sorts after the .conf: not primary
    create_cni_config_file(in_process(tmp_path), lambda seconds: False)
    assert (tmp_path / f"10-net.conflist.{PLUGIN}-orig").read_text() == theirs
    assert (tmp_path / f"10-net.conf.{PLUGIN}-orig").read_text() == json.dumps(BRIDGE)
    assert types_of(tmp_path / "10-net.conflist") == ["bridge", PLUGIN]


def test_the_original_survives_a_killed_installer(host: Host, start: Callable[..., Daemon]) -> None:
    conf = host.conf_dir / "10-mynet.conf"
    conf.write_text(EXACT_CONF)
    first = start()
    eventually(lambda: first.readyz() == 200, "/readyz answers 200", first)
    first.kill()  # SIGKILL: no cleanup; the next pod on the node finds our list in place
    second = start()
    eventually(lambda: second.readyz() == 200, "/readyz answers 200 again", second)
    assert second.terminate() == 0, second.logs()
    assert sorted(p.name for p in host.conf_dir.iterdir()) == ["10-mynet.conf"]
    assert conf.read_text() == EXACT_CONF
