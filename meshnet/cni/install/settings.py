"""The installer's options: environment variables (`ENV_OPTIONS`), parsed into `Settings`.

Istio's names, the fields of its `InstallConfig` (`cni/pkg/config/config.go`), plus
`MESHNET_CNI_*` for meshnet's own.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshnet.cni import repair
from meshnet.cni.install import conflist
from meshnet.cni.kube import kubeconfig
from meshnet.errors import OptionError

DEFAULT_PLUGIN_NAME = "meshnet-cni"
DEFAULT_SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# The node agent's socket in CNI_AGENT_RUN_DIR (`meshnet cni agent` serves it; the plugin's
# forwarder connects to it).
AGENT_SOCKET_NAME = "meshnet-cni.sock"


@dataclass(frozen=True, slots=True)
class EnvOption:
    name: str
    default: str
    help: str


ENV_OPTIONS: tuple[EnvOption, ...] = (
    EnvOption("MESHNET_CNI_PLUGIN_NAME", DEFAULT_PLUGIN_NAME, "plugin type, name and binary name"),
    EnvOption("MESHNET_CNI_PLUGIN_BINARY", "/opt/cni/bin/<plugin name>", "executable to install"),
    EnvOption("MESHNET_CNI_BIN_DIRS", "/host/opt/cni/bin", "host CNI bin dirs (comma list)"),
    EnvOption("MESHNET_CNI_SERVICE_ACCOUNT_DIR", DEFAULT_SERVICE_ACCOUNT_DIR, "token and ca.crt"),
    EnvOption("MESHNET_CNI_READINESS_PORT", "8000", "port of /readyz (0: no server)"),
    EnvOption("MESHNET_CNI_POLL_INTERVAL", "0.5", "seconds between checks of the watched files"),
    EnvOption("MONITORING_PORT", "15014", "port of the Prometheus /metrics (0: no server)"),
    EnvOption(
        "MESHNET_CNI_AGENT",
        "false",
        f"also serve the node agent (`meshnet cni agent`) on <CNI_AGENT_RUN_DIR>/"
        f"{AGENT_SOCKET_NAME} in this process, with its requests in /metrics",
    ),
    EnvOption(
        "MESHNET_CNI_AGENT_SOCKET_CHECK",
        "false",
        f"/readyz also needs <CNI_AGENT_RUN_DIR>/{AGENT_SOCKET_NAME} to accept a connection",
    ),
    EnvOption("REPAIR_ENABLED", "true", "run the repair controller"),
    EnvOption("REPAIR_REPAIR_PODS", "true", "repair broken pods in place (needs the host /proc)"),
    EnvOption("REPAIR_DELETE_PODS", "false", "delete broken pods (when not repairing)"),
    EnvOption("REPAIR_LABEL_PODS", "false", "label broken pods (when not repairing or deleting)"),
    EnvOption("REPAIR_BROKEN_POD_LABEL_KEY", "cni.istio.io/uninitialized", "label key"),
    EnvOption("REPAIR_BROKEN_POD_LABEL_VALUE", "true", "label value"),
    EnvOption("REPAIR_NODE_NAME", "<KUBERNETES_NODE_NAME>", "node whose pods are watched"),
    EnvOption("REPAIR_SIDECAR_ANNOTATION", "sidecar.istio.io/status", "only pods with it"),
    EnvOption("REPAIR_INIT_CONTAINER_NAME", "istio-validation", "the crash-looping container"),
    EnvOption("REPAIR_INIT_CONTAINER_TERMINATION_MESSAGE", "", "its message, if matched"),
    EnvOption("REPAIR_INIT_CONTAINER_EXIT_CODE", "126", "its exit code (0: any)"),
    EnvOption("REPAIR_LABEL_SELECTORS", "", "extra label selector for the pod watch"),
    EnvOption("REPAIR_FIELD_SELECTORS", "", "extra field selector for the pod watch"),
    EnvOption("MESHNET_REPAIR_HOST_PROC", "/host/proc", "the host's /proc, mounted"),
    EnvOption("MESHNET_REPAIR_RESYNC_PERIOD", "300", "seconds between looks at every pod"),
    EnvOption("MESHNET_LOG_FORMAT", "text", "installer logs on stderr: text or json"),
    EnvOption("MESHNET_LOG_LEVEL", "info", "installer log level"),
    EnvOption("CNI_CONF_NAME", "", "config file to insert into (default: the primary one)"),
    EnvOption("CHAINED_CNI_PLUGIN", "true", "insert into the primary config (false: own file)"),
    EnvOption("MOUNTED_CNI_NET_DIR", "/host/etc/cni/net.d", "the host's CNI conf dir"),
    EnvOption("CNI_AGENT_RUN_DIR", "/var/run/meshnet-cni", "kubeconfig dir (plugin's run dir)"),
    EnvOption("KUBECONFIG_MODE", "0600", "kubeconfig file mode"),
    EnvOption("CNI_CONF_GROUP_READ", "false", "standalone config mode 0640 instead of 0600"),
    EnvOption("KUBE_CA_FILE", "", "API server CA (default: <service account dir>/ca.crt)"),
    EnvOption("SKIP_TLS_VERIFY", "false", "kubeconfig without CA verification"),
    EnvOption("KUBERNETES_SERVICE_PROTOCOL", "https", "API server scheme"),
    EnvOption("KUBERNETES_SERVICE_HOST", "", "API server host (set by Kubernetes)"),
    EnvOption("KUBERNETES_SERVICE_PORT", "", "API server port (set by Kubernetes)"),
    EnvOption("PLUGIN_LOG_LEVEL", "info", "plugin_log_level in the plugin entry"),
    EnvOption("EXCLUDE_NAMESPACES", "", "namespaces the plugin skips (comma list)"),
    EnvOption("POD_NAMESPACE", "", "namespace of the installer's own pods"),
    EnvOption("NATIVE_NFTABLES", "false", "the plugin writes nftables instead of iptables"),
    EnvOption("ENABLE_AMBIENT_DETECTION_RETRY", "false", "copied into the entry (ambient key)"),
    EnvOption("AMBIENT_ENABLED", "false", "must be false: meshnet has no ambient mode"),
    EnvOption("AMBIENT_ENABLEMENT_SELECTOR", "", "copied into the entry as JSON (ambient key)"),
    EnvOption("ISTIO_OWNED_CNI_CONFIG", "false", "accepted; only acts with ambient, so unused"),
)


@dataclass(frozen=True, slots=True)
class Settings:
    """Every installer option, parsed and validated."""

    plugin_name: str = DEFAULT_PLUGIN_NAME
    plugin_binary: Path = Path("/opt/cni/bin") / DEFAULT_PLUGIN_NAME
    bin_dirs: tuple[Path, ...] = (Path("/host/opt/cni/bin"),)
    service_account_dir: Path = Path(DEFAULT_SERVICE_ACCOUNT_DIR)
    readiness_port: int = 8000
    poll_interval: float = 0.5
    monitoring_port: int = 15014
    agent_socket_check: bool = False
    agent: bool = False
    repair: repair.RepairSettings = field(default_factory=repair.RepairSettings)
    log_format: str = "text"
    log_level: str = "info"
    cni_conf_name: str = ""
    chained: bool = True
    conf_dir: Path = Path("/host/etc/cni/net.d")
    run_dir: Path = Path("/var/run/meshnet-cni")
    kubeconfig_mode: int = 0o600
    conf_group_read: bool = False
    api: kubeconfig.ApiServer = field(default_factory=lambda: kubeconfig.ApiServer("", ""))
    plugin_log_level: str = "info"
    exclude_namespaces: tuple[str, ...] = ()
    pod_namespace: str = ""
    native_nftables: bool = False
    enable_ambient_detection_retry: bool = False
    enablement_selectors: tuple[Any, ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Read every option from the environment; a malformed value is an OptionError."""
        env = _Env(environ)
        if env.boolean("AMBIENT_ENABLED", False):
            raise OptionError("AMBIENT_ENABLED=true: meshnet installs the sidecar-mode plugin only")
        env.boolean("ISTIO_OWNED_CNI_CONFIG", False)  # validated; owned configs need ambient
        name = env.filename("MESHNET_CNI_PLUGIN_NAME", DEFAULT_PLUGIN_NAME)
        return cls(
            plugin_name=name,
            plugin_binary=Path(env.text("MESHNET_CNI_PLUGIN_BINARY", f"/opt/cni/bin/{name}")),
            bin_dirs=tuple(Path(d) for d in env.items("MESHNET_CNI_BIN_DIRS", "/host/opt/cni/bin")),
            service_account_dir=Path(
                env.text("MESHNET_CNI_SERVICE_ACCOUNT_DIR", DEFAULT_SERVICE_ACCOUNT_DIR)
            ),
            readiness_port=env.integer("MESHNET_CNI_READINESS_PORT", 8000, 0, 65535),
            poll_interval=env.seconds("MESHNET_CNI_POLL_INTERVAL", 0.5),
            monitoring_port=env.integer("MONITORING_PORT", 15014, 0, 65535),
            agent_socket_check=env.boolean("MESHNET_CNI_AGENT_SOCKET_CHECK", False),
            agent=env.boolean("MESHNET_CNI_AGENT", False),
            repair=_repair_settings(env),
            log_format=env.choice("MESHNET_LOG_FORMAT", "text", ("text", "json")),
            log_level=env.text("MESHNET_LOG_LEVEL", "info"),
            cni_conf_name=env.filename("CNI_CONF_NAME", ""),
            chained=env.boolean("CHAINED_CNI_PLUGIN", True),
            conf_dir=Path(env.text("MOUNTED_CNI_NET_DIR", "/host/etc/cni/net.d")),
            run_dir=Path(env.text("CNI_AGENT_RUN_DIR", "/var/run/meshnet-cni")),
            kubeconfig_mode=env.mode("KUBECONFIG_MODE", 0o600),
            conf_group_read=env.boolean("CNI_CONF_GROUP_READ", False),
            api=kubeconfig.ApiServer(
                host=env.text("KUBERNETES_SERVICE_HOST", ""),
                port=env.text("KUBERNETES_SERVICE_PORT", ""),
                protocol=env.text("KUBERNETES_SERVICE_PROTOCOL", "https"),
                ca_file=env.text("KUBE_CA_FILE", ""),
                skip_tls_verify=env.boolean("SKIP_TLS_VERIFY", False),
            ),
            plugin_log_level=env.text("PLUGIN_LOG_LEVEL", "info"),
            exclude_namespaces=env.items("EXCLUDE_NAMESPACES", ""),
            pod_namespace=env.text("POD_NAMESPACE", ""),
            native_nftables=env.boolean("NATIVE_NFTABLES", False),
            enable_ambient_detection_retry=env.boolean("ENABLE_AMBIENT_DETECTION_RETRY", False),
            enablement_selectors=env.json_list("AMBIENT_ENABLEMENT_SELECTOR"),
        )

    def plugin_config(self) -> conflist.PluginConfig:
        return conflist.PluginConfig(
            plugin_name=self.plugin_name,
            plugin_log_level=self.plugin_log_level,
            cni_agent_run_dir=str(self.run_dir),
            pod_namespace=self.pod_namespace,
            exclude_namespaces=self.exclude_namespaces,
            native_nftables=self.native_nftables,
            enablement_selectors=self.enablement_selectors,
            enable_ambient_detection_retry=self.enable_ambient_detection_retry,
        )

    @property
    def kubeconfig_path(self) -> Path:
        return self.run_dir / f"{self.plugin_name}-kubeconfig"

    @property
    def standalone_path(self) -> Path:
        return self.conf_dir / (self.cni_conf_name or f"YYY-{self.plugin_name}.conf")

    @property
    def standalone_mode(self) -> int:
        return 0o640 if self.conf_group_read else 0o600


def _repair_settings(env: _Env) -> repair.RepairSettings:
    return repair.RepairSettings(
        enabled=env.boolean("REPAIR_ENABLED", True),
        repair_pods=env.boolean("REPAIR_REPAIR_PODS", True),
        delete_pods=env.boolean("REPAIR_DELETE_PODS", False),
        label_pods=env.boolean("REPAIR_LABEL_PODS", False),
        label_key=env.text("REPAIR_BROKEN_POD_LABEL_KEY", "cni.istio.io/uninitialized"),
        label_value=env.text("REPAIR_BROKEN_POD_LABEL_VALUE", "true"),
        node_name=env.text("REPAIR_NODE_NAME", env.text("KUBERNETES_NODE_NAME", "")),
        sidecar_annotation=env.text("REPAIR_SIDECAR_ANNOTATION", "sidecar.istio.io/status"),
        init_container_name=env.text("REPAIR_INIT_CONTAINER_NAME", "istio-validation"),
        init_termination_message=env.text("REPAIR_INIT_CONTAINER_TERMINATION_MESSAGE", ""),
        init_exit_code=env.integer("REPAIR_INIT_CONTAINER_EXIT_CODE", 126, 0, 255),
        label_selectors=env.text("REPAIR_LABEL_SELECTORS", ""),
        field_selectors=env.text("REPAIR_FIELD_SELECTORS", ""),
        native_nftables=env.boolean("NATIVE_NFTABLES", False),
        host_proc=Path(env.text("MESHNET_REPAIR_HOST_PROC", "/host/proc")),
        resync_seconds=env.seconds("MESHNET_REPAIR_RESYNC_PERIOD", 300, high=86400),
    )


class _Env:
    """Typed reads of environment variables; every error names the variable and the value."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def text(self, name: str, default: str) -> str:
        """The value; unset or empty gives the default (viper treats empty as unset)."""
        return self._environ.get(name) or default

    def boolean(self, name: str, default: bool) -> bool:
        value = self._environ.get(name)
        if value is None or value == "":
            return default
        # strconv.ParseBool's spellings; Istio ignores anything else, meshnet rejects it.
        if value in ("1", "t", "T", "true", "TRUE", "True"):
            return True
        if value in ("0", "f", "F", "false", "FALSE", "False"):
            return False
        raise OptionError(f"{name}={value!r}: not a boolean (true or false)")

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        value = self._environ.get(name, "")
        if not value:
            return default
        if not value.isdigit() or not low <= int(value) <= high:
            raise OptionError(f"{name}={value!r}: not a number from {low} to {high}")
        return int(value)

    def seconds(self, name: str, default: float, high: float = 60) -> float:
        value = self._environ.get(name, "")
        try:
            seconds = float(value) if value else default
        except ValueError:
            seconds = -1
        if not 0.01 <= seconds <= high:
            raise OptionError(f"{name}={value!r}: not a number of seconds from 0.01 to {high:g}")
        return seconds

    def mode(self, name: str, default: int) -> int:
        value = self._environ.get(name, "")
        if not value:
            return default
        try:
            mode = _go_int(value)
        except ValueError:
            mode = -1
        if not 0 <= mode <= 0o7777:
            raise OptionError(f"{name}={value!r}: not a file mode such as 0600")
        return mode

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self._environ.get(name) or default
        if value not in choices:
            raise OptionError(f"{name}={value!r}: expected one of {', '.join(choices)}")
        return value

    def filename(self, name: str, default: str) -> str:
        value = self._environ.get(name) or default
        if "/" in value or value in (".", ".."):
            raise OptionError(f"{name}={value!r}: must be a file name, not a path")
        return value

    def items(self, name: str, default: str) -> tuple[str, ...]:
        """A comma list, items trimmed and empty ones dropped (Istio's EXCLUDE_NAMESPACES)."""
        value = self._environ.get(name) or default
        return tuple(item.strip() for item in value.split(",") if item.strip())

    def json_list(self, name: str) -> tuple[Any, ...]:
        value = self._environ.get(name, "").strip()
        if not value:
            return ()
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if not isinstance(parsed, list):
            raise OptionError(f"{name}={value!r}: give a JSON list (YAML is not supported)")
        return tuple(parsed)


def _go_int(text: str) -> int:
    """strconv.ParseInt(text, 0, ...): 0x hex, 0o or leading 0 octal, 0b binary, else decimal."""
    lowered = text.strip().lower()
    for prefix, base in (("0x", 16), ("0o", 8), ("0b", 2)):
        if lowered.startswith(prefix):
            return int(lowered[2:], base)
    if len(lowered) > 1 and lowered.startswith("0"):
        return int(lowered[1:], 8)
    return int(lowered, 10)
