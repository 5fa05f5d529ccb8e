"""Istio's install-cni goldens (cni-install/cases.json), with the plugin named `istio-cni`.

`create` runs one installer pass (`create_cni_config_file`) into a temporary conf dir with the
options given as Istio's environment variables; `insert` runs the merge alone; `cleanup` runs
the installer's config cleanup. Files are compared after stripping the whole text.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from meshnet.cni.install import conflist
from meshnet.cni.install.config import Wait, create_cni_config_file, remove_cni_config
from meshnet.cni.install.settings import Settings
from meshnet.errors import InstallCancelled
from tests.conftest import RAN
from tests.support.conformance import CONFORMANCE, conformance_index

SUITE = CONFORMANCE / "cni-install"
GIVE_UP_AFTER = 0.1  # Istio's test cancels its context after 100 ms
# The README's mapping from case settings to the installer's environment variables.
ENV_NAMES = {
    "plugin_name": "MESHNET_CNI_PLUGIN_NAME",
    "plugin_log_level": "PLUGIN_LOG_LEVEL",
    "cni_agent_run_dir": "CNI_AGENT_RUN_DIR",
    "pod_namespace": "POD_NAMESPACE",
    "exclude_namespaces": "EXCLUDE_NAMESPACES",
    "ambient_enabled": "AMBIENT_ENABLED",
    "ambient_enablement_selector": "AMBIENT_ENABLEMENT_SELECTOR",
    "enable_ambient_detection_retry": "ENABLE_AMBIENT_DETECTION_RETRY",
    "native_nftables": "NATIVE_NFTABLES",
    "istio_owned_cni_config": "ISTIO_OWNED_CNI_CONFIG",
    "chained_cni_plugin": "CHAINED_CNI_PLUGIN",
    "cni_conf_name": "CNI_CONF_NAME",
}


def _cases(kind: str) -> list[Any]:
    return [pytest.param(case, id=case["name"]) for case in conformance_index("cni-install")[kind]]


def _passed() -> None:
    RAN["cni-install"] = RAN.get("cni-install", 0) + 1


def _settings(case_settings: dict[str, Any], conf_dir: Path) -> Settings:
    env = {"MOUNTED_CNI_NET_DIR": str(conf_dir), "MESHNET_CNI_POLL_INTERVAL": "0.02"}
    for key, value in case_settings.items():
        env[ENV_NAMES[key]] = str(value).lower() if isinstance(value, bool) else str(value)
    return Settings.from_env(env)


def _give_up_after(seconds: float) -> Wait:
    deadline = time.monotonic() + seconds

    def wait(step: float) -> bool:
        time.sleep(max(0.0, min(step, deadline - time.monotonic())))
        return time.monotonic() < deadline

    return wait


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


@pytest.mark.parametrize("case", _cases("create"))
def test_create(case: dict[str, Any], tmp_path: Path) -> None:
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    for source, name in case["existing_files"].items():
        shutil.copyfile(SUITE / source, conf_dir / name)
    settings = _settings(case["settings"], conf_dir)
    before = _snapshot(conf_dir)

    if case.get("expect") == "wait":
        with pytest.raises(InstallCancelled):
            create_cni_config_file(settings, _give_up_after(GIVE_UP_AFTER))
        assert _snapshot(conf_dir) == before, "the installer wrote while it should wait"
    else:
        written = create_cni_config_file(settings, _give_up_after(GIVE_UP_AFTER))
        assert written == conf_dir / case["expected_file"]
        golden = (SUITE / case["golden"]).read_text()
        assert written.read_text().strip() == golden.strip()
    _passed()


@pytest.mark.parametrize("case", _cases("insert"))
def test_insert(case: dict[str, Any]) -> None:
    entry = (SUITE / case["plugin_entry"]).read_text()
    existing = (SUITE / case["existing"]).read_text()
    if case.get("expect") == "error":
        with pytest.raises(conflist.CniConfigError):
            conflist.insert(entry, existing, "istio-cni")
    else:
        merged = conflist.insert(entry, existing, "istio-cni")
        assert merged.strip() == (SUITE / case["golden"]).read_text().strip()
    _passed()


@pytest.mark.parametrize("case", _cases("cleanup"))
def test_cleanup(case: dict[str, Any], tmp_path: Path) -> None:
    config = tmp_path / case["config_file"]
    shutil.copyfile(SUITE / case["existing"], config)
    remove_cni_config(_settings(case["settings"], tmp_path), config)
    if case.get("expect") == "deleted":
        assert not config.exists()
    else:
        assert config.read_text().strip() == (SUITE / case["expected"]).read_text().strip()
    _passed()


def test_entry_matches_istio_cni_conf() -> None:
    """`istio-cni.conf` is exactly the entry the create settings produce (README, cni-install)."""
    case = conformance_index("cni-install")["create"][0]
    settings = _settings(case["settings"], Path("/unused"))
    rendered = conflist.render_entry(settings.plugin_config())
    assert rendered == (SUITE / "istio-cni.conf").read_text()
