"""`meshnet cni install`: the node daemon that installs and keeps the CNI plugin.

Istio's counterpart is install-cni (`cni/pkg/install/install.go`).

It copies the plugin executable into the host's CNI bin dirs, writes the plugin's kubeconfig,
inserts the plugin into the node's primary CNI config (chained mode, the default) or writes a
config of its own (standalone), then keeps all of it in place: when another component rewrites
the config, the token rotates or the binary changes, it installs again. `/readyz` answers 200
while the installation is valid. On SIGTERM or SIGINT it removes exactly what it added.

Design choices:
- **Polling, not inotify.** Every `MESHNET_CNI_POLL_INTERVAL` (0.5 s) it compares a snapshot of
  the conf dir listing, the installed binaries and the service-account dir (a few `stat` calls
  and one 1 KB read). Inotify watches on files die when the file is atomically replaced (Istio
  re-creates its fsnotify watcher on every loop for that reason), need ctypes here, and are
  easy to get wrong on bind-mounted host paths; a 0.5 s poll costs well under 1% of a core and
  reacts faster than any runtime reloads its config.
- **No Kubernetes client, no watchdog**: the daemon never talks to the API server (it only
  writes a kubeconfig for the plugin, with PyYAML), and a poll loop needs no library.
- **The user's config is never lost**: a file it changes is kept beside it under a name no
  runtime loads, and put back on SIGTERM when only our entry changed since.
- Readiness is computed per request from the files themselves, so a config that someone
  rewrote answers 503 at once, not only after the next poll.

Options are environment variables (Istio's names, plus `MESHNET_CNI_*` for meshnet's own); see
`ENV_OPTIONS`. Ambient mode is out of scope: `AMBIENT_ENABLED=true` is rejected.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import socketserver
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshnet import logs
from meshnet.cni import conflist, kube, kubeapi, kubeconfig, metrics, repair

if TYPE_CHECKING:
    from meshnet.cni import agent
from meshnet.errors import MeshnetError, OptionError

DEFAULT_PLUGIN_NAME = "meshnet-cni"
DEFAULT_SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
THROTTLE_RATE = 0.2  # Istio: installs per second before the loop counts as "rapid" (burst 1)
THROTTLE_MAX_SLEEP = 1.0
THROTTLE_WARN_HITS = 5
# The node agent's socket in CNI_AGENT_RUN_DIR (`meshnet cni agent` serves it; the plugin's
# forwarder connects to it).
AGENT_SOCKET_NAME = "meshnet-cni.sock"

# A wait step: sleep up to the given seconds; False means "give up" (stop requested, deadline).
Wait = Callable[[float], bool]


class InstallError(MeshnetError):
    """The plugin could not be installed or removed (files, dirs, permissions)."""


class InstallCancelled(Exception):
    """A wait was given up (signal or deadline). Not an error: the daemon cleans up and exits 0."""


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


# --- files -------------------------------------------------------------------------------------


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write a sibling temp file `<name>.tmp.*`, then rename it over `path`."""
    try:
        handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.tmp.")
    except OSError as err:
        raise InstallError(_write_failure(path, err)) from None
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fchmod(stream.fileno(), mode)  # exact mode, whatever the umask
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except OSError as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise InstallError(_write_failure(path, err)) from None


def _write_failure(path: Path, err: OSError) -> str:
    hint = ""
    if err.errno == 30:  # EROFS
        hint = " (read-only file system: point the option at the host's writable CNI dir)"
    elif isinstance(err, FileNotFoundError):
        hint = f" ({path.parent} does not exist: is the host directory mounted?)"
    return f"cannot write {path}: {err.strerror}{hint}"


STANDALONE_DIR = "meshnet-cni-standalone"  # the forwarder's fallback, beside it (forwarder.c)


def install_binary(source: Path, bin_dir: Path, name: str) -> Path:
    """Copy the plugin executable to `<bin_dir>/<name>`, mode 0755, atomically."""
    for stale in bin_dir.glob(f"{name}.tmp.*"):  # left by an interrupted copy
        stale.unlink(missing_ok=True)
    real = source.resolve()  # the image links the executable from its build directory
    if any((real.parent / part).is_dir() for part in ("_internal", STANDALONE_DIR)):
        return _install_onedir(real, bin_dir, name)
    try:
        data = source.read_bytes()
    except OSError as err:
        raise InstallError(
            f"cannot read the plugin executable {source}: {err.strerror} "
            "(set MESHNET_CNI_PLUGIN_BINARY)"
        ) from None
    target = bin_dir / name
    if not _same_file(target, data, 0o755):
        atomic_write(target, data, 0o755)
    return target


def _install_onedir(source: Path, bin_dir: Path, name: str) -> Path:
    """A build directory: the executable needs what is beside it, a PyInstaller onedir its
    `_internal/`, the forwarder its standalone plugin in `meshnet-cni-standalone/` (it execs
    that when the agent is unreachable, found from its own resolved path).

    The directory is copied to `<bin_dir>/<name>.d/<digest>/` (under a temporary name, then
    renamed), and `<bin_dir>/<name>` becomes a relative symlink to the executable in it,
    replaced atomically; older copies are removed once nothing points at them.
    """
    digest = _tree_digest(source.parent)
    versions = bin_dir / f"{name}.d"
    current = versions / digest
    try:
        if not current.is_dir():
            versions.mkdir(exist_ok=True)
            staging = versions / f".tmp.{secrets.token_hex(4)}"
            shutil.copytree(source.parent, staging, symlinks=True)
            staging.rename(current)
        target = bin_dir / name
        relative = f"{name}.d/{digest}/{source.name}"
        if not (target.is_symlink() and os.readlink(target) == relative):
            link = bin_dir / f"{name}.tmp.{secrets.token_hex(4)}"
            link.symlink_to(relative)
            link.replace(target)
        for old in versions.iterdir():
            if old.name != digest:
                shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        raise InstallError(_write_failure(bin_dir / name, err)) from None
    return target


def _tree_digest(root: Path) -> str:
    """Content hash of a directory tree (names and bytes), naming one build's copy."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _same_file(path: Path, data: bytes, mode: int) -> bool:
    """True when `path` already holds `data` with `mode`: no rewrite, no churn for watchers."""
    try:
        status = path.stat()
        if status.st_mode & 0o7777 != mode or status.st_size != len(data):
            return False
        return path.read_bytes() == data
    except OSError:
        return False


def write_kubeconfig(settings: Settings) -> Path:
    """`<run dir>/<plugin>-kubeconfig` from the service-account token and CA."""
    api, sa_dir = settings.api, settings.service_account_dir
    server = kubeconfig.server_url(api)
    token = kubeconfig.read_token(sa_dir)
    ca = None if api.skip_tls_verify else kubeconfig.ca_path(api, sa_dir)
    ca_data = None if ca is None else kubeconfig.read_ca(ca)
    text = kubeconfig.render(server, token, ca_data, settings.plugin_name)
    try:
        settings.run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InstallError(f"cannot create {settings.run_dir}: {err.strerror}") from None
    path = settings.kubeconfig_path
    atomic_write(path, text.encode(), settings.kubeconfig_mode)
    logs.get().debug(
        "wrote kubeconfig",
        path=str(path),
        content=kubeconfig.render_redacted(server, ca, settings.plugin_name),
    )
    return path


# --- the CNI config ------------------------------------------------------------------------------


def create_cni_config_file(settings: Settings, wait: Wait) -> Path:
    """Istio's `createCNIConfigFile`: write our entry; returns the file it lives in.

    Chained: wait for the primary config, merge into it, and give a single-plugin file the
    `.conflist` name (writing the list under the new name first, then moving the old file
    aside, so the runtime never sees a list inside a `.conf`). Standalone: our own file.
    The user's version of a file it changes is kept beside it (`conflist.backup_name`), byte
    for byte with its mode and owner, for `remove_cni_config` to put back.
    """
    entry = conflist.render_entry(settings.plugin_config())
    if not settings.chained:
        path = settings.standalone_path
        atomic_write(path, entry.encode(), settings.standalone_mode)
        return path
    path = wait_for_primary(settings, wait)
    data, status = _read_config(path)
    existing = data.decode("utf-8", errors="replace")
    merged = conflist.insert(entry, existing, settings.plugin_name)
    target = path.with_suffix(".conflist") if path.suffix in conflist.SINGLE_EXTENSIONS else path
    if target == path and merged == existing:
        return target  # already merged: rewriting would only wake up other watchers
    if target == path:
        if not conflist.holds_plugin(existing, settings.plugin_name):
            _write_like(_backup_of(settings, path), data, status)  # their latest version
        _write_like(_through_symlink(path), merged.encode(), status)
        return target
    if os.path.lexists(target) and not conflist.holds_plugin(
        _read_text(target) or "", settings.plugin_name
    ):
        _move_aside(settings, target)  # a list of theirs under the new name: Istio overwrites it
    _write_like(target, merged.encode(), status)
    _move_aside(settings, path)
    return target


def _move_aside(settings: Settings, path: Path) -> None:
    """Rename a user's file to its backup name: bytes, mode, owner, even a symlink, stay."""
    try:
        os.replace(path, _backup_of(settings, path))
    except OSError as err:
        raise InstallError(f"cannot move {path} aside: {err.strerror}") from None


def wait_for_primary(settings: Settings, wait: Wait) -> Path:
    """The config file to merge into: CNI_CONF_NAME, else the primary one, once it is usable."""
    logged = None
    while True:
        path = _merge_target(settings)
        if path is not None:
            return path
        reason = waiting_reason(settings)
        if reason != logged:  # each new reason once: a malformed file is named, not repeated
            logs.get().info("waiting for a CNI config to merge into", reason=reason)
            logged = reason
        _pause(wait, settings.poll_interval)


def _merge_target(settings: Settings) -> Path | None:
    name = settings.cni_conf_name or conflist.find_primary(settings.conf_dir)
    if not name:
        return None
    path = settings.conf_dir / name
    for candidate in (path, *conflist.siblings(path)):
        text = _read_text(candidate) if candidate.is_file() else None
        if text is not None and conflist.merge_problem(text, str(candidate)) is None:
            return candidate
    return None


def waiting_reason(settings: Settings) -> str:
    """Why there is no config to merge into yet: for the log and for /readyz."""
    if not settings.cni_conf_name or not settings.conf_dir.is_dir():
        return conflist.no_primary_reason(settings.conf_dir)
    path = settings.conf_dir / settings.cni_conf_name
    for candidate in (path, *conflist.siblings(path)):
        if candidate.is_file():
            text = _read_text(candidate)
            if text is None:
                return f"cannot read CNI config file {candidate}"
            return conflist.merge_problem(text, str(candidate)) or f"merging into {candidate}"
    return f"waiting for the CNI config file {path} to be written"


def _pause(wait: Wait, seconds: float) -> None:
    if not wait(seconds):
        raise InstallCancelled


def _read_config(path: Path) -> tuple[bytes, os.stat_result]:
    try:
        return path.read_bytes(), path.stat()
    except FileNotFoundError:
        raise InstallError(f"CNI config file {path} removed during configuration") from None
    except OSError as err:
        raise InstallError(f"cannot read CNI config file {path}: {err.strerror}") from None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return None


def _backup_of(settings: Settings, path: Path) -> Path:
    return path.with_name(conflist.backup_name(path.name, settings.plugin_name))


def _through_symlink(path: Path) -> Path:
    """A symlinked config is written where it points: the link stays as the user made it."""
    if not path.is_symlink():
        return path
    target = path.resolve()
    logs.get().info("CNI config is a symlink; writing through it", path=str(path), to=str(target))
    return target


def _write_like(path: Path, data: bytes, status: os.stat_result) -> None:
    """Write `data` with the mode and owner of `status` (a file's, or its backup's)."""
    atomic_write(path, data, status.st_mode & 0o7777)
    with contextlib.suppress(PermissionError):  # not root: the file stays the installer's
        os.chown(path, status.st_uid, status.st_gid)


def config_problem(settings: Settings, path: Path | None) -> str | None:
    """Istio's `checkValidCNIConfig`: why the installation needs (re)writing, or None.

    Only a chained install without CNI_CONF_NAME follows whichever file becomes primary; with
    a configured name, or standalone, a preemption is logged (`preempted_by`), not repaired.
    """
    if path is None:
        return (
            waiting_reason(settings)
            if settings.chained
            else "the CNI config has not been written yet"
        )
    if settings.chained and not settings.cni_conf_name:
        primary = conflist.find_primary(settings.conf_dir)
        if primary is None:
            return waiting_reason(settings)
        if settings.conf_dir / primary != path:
            return f"CNI config file {path} preempted by {settings.conf_dir / primary}"
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return f"CNI config file removed: {path}"
    if settings.chained:
        return conflist.chained_problem(text, settings.plugin_name, str(path))
    return conflist.standalone_problem(text, settings.plugin_name, str(path))


def preempted_by(settings: Settings, path: Path) -> Path | None:
    """The primary config file when it is not `path` (the runtime will not run our plugin)."""
    primary = conflist.find_primary(settings.conf_dir)
    if primary is None or settings.conf_dir / primary == path:
        return None
    return settings.conf_dir / primary


def remove_cni_config(settings: Settings, path: Path) -> None:
    """Istio's cleanup of the config: drop our plugin from a chained file, delete our own file.

    When the user's original was kept and the file has changed only by our entry since, the
    original comes back instead, as it was (a converted `.conf` under its own name).
    """
    if not settings.chained:
        path.unlink(missing_ok=True)
        return
    try:
        data, status = _read_config(path)
    except InstallError:
        return  # already gone: nothing of ours left in it
    text = data.decode("utf-8", errors="replace")
    if _restore_original(settings, path, text):
        return
    cleaned = conflist.remove(text, settings.plugin_name, str(path))
    if cleaned is None:
        logs.get().info("no plugin of ours in the CNI config; left untouched", path=str(path))
        return
    _write_like(_through_symlink(path), cleaned.encode(), status)


def _restore_original(settings: Settings, path: Path, current: str) -> bool:
    """Put back the kept original of `path` (merged in place, or converted); False: none fits."""
    log = logs.get()
    for original in (path, *conflist.siblings(path)):
        backup = _backup_of(settings, original)
        if not os.path.lexists(backup):
            continue
        kept = _read_text(backup)
        if kept is None or not conflist.only_ours_added(kept, current, settings.plugin_name):
            log.warning(
                "CNI config changed since the merge: removing only our plugin; original kept",
                path=str(path),
                original=str(backup),
            )
            return False
        try:
            if original == path:
                _write_like(_through_symlink(path), backup.read_bytes(), backup.stat())
                backup.unlink()
            else:
                os.replace(backup, original)
                path.unlink()
        except OSError as err:
            raise InstallError(f"cannot restore {original} from {backup}: {err.strerror}") from None
        log.info("restored the original CNI config", path=str(original))
        return True
    return False


# --- the daemon ---------------------------------------------------------------------------------


class _Throttle:
    """Go's `rate.NewLimiter(0.2, 1)`, used as Istio does: to detect a reinstall loop."""

    def __init__(self) -> None:
        self._tokens = 1.0
        self._last: float | None = None
        self.hits = 0

    def reserve(self, now: float) -> float:
        """Take a token; return how long until it would really be available."""
        if self._last is not None:
            self._tokens = min(1.0, self._tokens + (now - self._last) * THROTTLE_RATE)
        self._last = now
        self._tokens -= 1
        return 0.0 if self._tokens >= 0 else -self._tokens / THROTTLE_RATE


class Installer:
    """Installs the plugin, keeps it installed until `stop` is set, and removes it."""

    def __init__(self, settings: Settings, stop: threading.Event) -> None:
        self.settings = settings
        self.config_path: Path | None = None
        self._stop = stop
        self._ready = threading.Event()
        self._binaries: list[Path] = []
        self._kubeconfig: Path | None = None
        self._log = logs.get().bind(plugin=settings.plugin_name)

    def run(self) -> None:
        """Istio's `Installer.Run`: install, then reinstall whenever a watched file changes."""
        try:
            self.install_all()
            self._log.info("initial installation complete; watching for changes")
            throttle = _Throttle()
            while not self._stop.is_set():
                self._throttle(throttle)
                if not self._sleep_watch_install():
                    return
                self._log.info("detected changes to the node's CNI setup; checking")
                self.install_all()
        except InstallCancelled:
            return

    def install_all(self) -> None:
        """Binaries, kubeconfig, then the CNI config only when it is not valid already.
        A failure is counted with Istio's result for its step (istio_cni_installs_total)."""
        with _counted(metrics.INSTALL_COPY_BINARIES_FAILURE):
            for bin_dir in self.settings.bin_dirs:
                plugin, name = self.settings.plugin_binary, self.settings.plugin_name
                target = install_binary(plugin, bin_dir, name)
                if target not in self._binaries:
                    self._binaries.append(target)
        with _counted(metrics.INSTALL_CREATE_KUBECONFIG_FAILURE):
            self._kubeconfig = write_kubeconfig(self.settings)
        problem = config_problem(self.settings, self.config_path)
        if problem is None:
            self._warn_if_preempted()
            self._log.info("valid CNI config present; not modifying", path=str(self.config_path))
            return
        self._log.info("CNI config needs (re)writing", reason=problem)
        with _counted(metrics.INSTALL_CREATE_CNI_CONFIG_FAILURE):
            self.config_path = create_cni_config_file(self.settings, self._wait)
        self._log.info("wrote CNI config", path=str(self.config_path))

    def is_ready(self) -> bool:
        """Readiness: installed, watching, and the config on disk still valid right now."""
        return not self.readiness_problems()

    def readiness_problems(self) -> list[str]:
        """What keeps the node from being ready, checked on the files now; empty: ready."""
        settings = self.settings
        problems = [
            f"plugin binary missing: {bin_dir / settings.plugin_name}"
            for bin_dir in settings.bin_dirs
            if not os.path.exists(bin_dir / settings.plugin_name)  # follows the onedir link
        ]
        if not settings.kubeconfig_path.is_file():
            problems.append(f"kubeconfig missing: {settings.kubeconfig_path}")
        config = config_problem(settings, self.config_path)
        if config is not None:
            problems.append(config)
        if settings.agent_socket_check or settings.agent:
            agent = agent_socket_problem(settings.run_dir / AGENT_SOCKET_NAME)
            if agent is not None:
                problems.append(agent)
        if not problems and not self._ready.is_set():
            problems.append("installation in progress")
        return problems

    def cleanup(self) -> None:
        """Remove our plugin entry (or file), the kubeconfig and the binaries we installed."""
        failures: list[str] = []
        steps = (self._remove_config, self._remove_kubeconfig, self._remove_binaries)
        for step in steps:
            try:
                step()
            except (MeshnetError, OSError) as err:  # try every step, then report them all
                failures.append(str(err))
        if failures:
            raise InstallError("cleanup incomplete: " + "; ".join(failures))
        self._log.info("cleanup complete")

    def _remove_config(self) -> None:
        if self.config_path is not None and self.config_path.exists():
            self._log.info("removing our CNI config", path=str(self.config_path))
            remove_cni_config(self.settings, self.config_path)

    def _remove_kubeconfig(self) -> None:
        if self._kubeconfig is not None:
            self._kubeconfig.unlink(missing_ok=True)

    def _remove_binaries(self) -> None:
        for binary in self._binaries:
            self._log.info("removing binary", path=str(binary))
            binary.unlink(missing_ok=True)
            shutil.rmtree(binary.parent / f"{binary.name}.d", ignore_errors=True)  # onedir

    def _wait(self, seconds: float) -> bool:
        return not self._stop.wait(seconds)

    def _warn_if_preempted(self) -> None:
        primary = preempted_by(self.settings, self.config_path) if self.config_path else None
        if primary is not None:
            self._log.warning(
                "CNI config file preempted", path=str(self.config_path), by=str(primary)
            )

    def _throttle(self, throttle: _Throttle) -> None:
        delay = throttle.reserve(time.monotonic())
        if delay == 0:
            throttle.hits = 0  # no install in the last 5 s
            return
        self._stop.wait(min(delay, THROTTLE_MAX_SLEEP))
        throttle.hits += 1
        if throttle.hits > THROTTLE_WARN_HITS:
            hint = ""
            if "cilium" in str(self.config_path):
                hint = " Hint: Cilium CNI was detected; ensure 'cni.exclusive=false' in its config."
            self._log.warning(
                "Configuration has been reconciled multiple times in a short period of time. "
                f"This may be due to a conflicting component constantly reverting our work.{hint}"
            )

    def _sleep_watch_install(self) -> bool:
        """Ready until a watched file changes (True: check again) or stop is set (False)."""
        before = self._snapshot()  # taken first, so a change during the check is not missed
        try:
            if config_problem(self.settings, self.config_path) is not None:
                return True
            self._ready.set()
            metrics.set_install_ready(True)
            metrics.install_result(metrics.INSTALL_SUCCESS)  # as Istio: once per valid install
            while not self._stop.wait(self.settings.poll_interval):
                if self._snapshot() != before:
                    return True
            return False
        finally:
            self._ready.clear()
            metrics.set_install_ready(False)

    def _snapshot(self) -> tuple[object, ...]:
        """What Istio's fsnotify watcher watches: conf dir, our binaries, the service account."""
        settings = self.settings
        binaries = tuple(_stat_key(bin_dir / settings.plugin_name) for bin_dir in settings.bin_dirs)
        token = _read_or_none(settings.service_account_dir / "token")
        return (
            _dir_key(settings.conf_dir),
            binaries,
            _dir_key(settings.service_account_dir),
            token,
        )


@contextlib.contextmanager
def _counted(failure: str) -> Iterator[None]:
    try:
        yield
    except MeshnetError:
        metrics.install_result(failure)
        raise


def _stat_key(path: Path | os.DirEntry[str]) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)  # follows symlinks: a rotated `..data` link changes the target
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size, st.st_mode)


def _dir_key(directory: Path) -> tuple[object, ...]:
    try:
        with os.scandir(directory) as entries:
            return tuple(sorted((entry.name, _stat_key(entry)) for entry in entries))
    except OSError:
        return ("unreadable",)


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


# --- readiness and metrics ---------------------------------------------------------------------

# A route answers (status, body, content type).
Route = Callable[[], tuple[int, bytes, str]]
_TEXT = "text/plain; charset=utf-8"


def agent_socket_problem(path: Path) -> str | None:
    """None when the node agent's Unix socket accepts a connection, else why not."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError as err:
            return f"node agent socket {path} does not answer: {err.strerror or err}"
    return None


def readyz_route(problems: Callable[[], list[str]]) -> Route:
    """`/readyz`: 200 `ok`, or 503 with one line per missing piece."""

    def answer() -> tuple[int, bytes, str]:
        missing = problems()
        if not missing:
            return 200, b"ok\n", _TEXT
        return 503, "".join(f"not ready: {line}\n" for line in missing).encode(), _TEXT

    return answer


def metrics_route() -> tuple[int, bytes, str]:
    body, content_type = metrics.exposition()
    return 200, body, content_type


class _HttpServer(socketserver.ThreadingTCPServer):
    """A few GET routes. A bare TCPServer: HTTPServer's bind does a reverse DNS lookup."""

    allow_reuse_address = True
    daemon_threads = True

    def __init__(
        self, port: int, routes: Mapping[str, Route], family: socket.AddressFamily
    ) -> None:
        self.address_family = family
        self.routes = routes
        # All addresses: the kubelet probes the pod IP.
        host = "::" if family == socket.AF_INET6 else "0.0.0.0"
        super().__init__((host, port), _RouteHandler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:  # one socket for IPv4 and IPv6, as Go's ":8000"
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class _RouteHandler(BaseHTTPRequestHandler):
    server: _HttpServer

    def do_GET(self) -> None:
        route = self.server.routes.get(self.path.split("?", 1)[0])
        if route is None:
            self._reply(404, b"not found\n", _TEXT)
        else:
            self._reply(*route())

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the kubelet and Prometheus ask every few seconds; a line per request is noise


def serve(port: int, routes: Mapping[str, Route], option: str) -> _HttpServer:
    """Serve `routes` on all addresses in a daemon thread; `option` names the port's variable."""
    try:
        server = _HttpServer(port, routes, socket.AF_INET6)
    except OSError:
        try:  # no IPv6 in this kernel or namespace
            server = _HttpServer(port, routes, socket.AF_INET)
        except OSError as err:
            raise InstallError(
                f"cannot serve {', '.join(routes)} on port {port}: {err.strerror} (set {option})"
            ) from None
    # A short poll so that shutdown() at exit returns at once (the default waits up to 0.5 s).
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=option, daemon=True
    )
    thread.start()
    return server


def serve_readiness(port: int, problems: Callable[[], list[str]]) -> _HttpServer:
    return serve(port, {"/readyz": readyz_route(problems)}, "MESHNET_CNI_READINESS_PORT")


def serve_metrics(port: int) -> _HttpServer:
    return serve(port, {"/metrics": metrics_route}, "MONITORING_PORT")


def _start_agent(settings: Settings) -> agent.Agent | None:
    """The node agent in this process (MESHNET_CNI_AGENT=true): one resident process per node
    that installs, repairs and serves the per-pod CNI calls, its requests counted in /metrics."""
    if not settings.agent:
        return None
    from meshnet.cni import agent

    environ = {**os.environ, "CNI_AGENT_RUN_DIR": str(settings.run_dir)}
    node_agent = agent.Agent(agent.Settings.from_env(environ), hooks=(metrics.record_call,))
    node_agent.start()
    return node_agent


def start_repair(settings: Settings) -> repair.Controller | None:
    """The repair controller in a daemon thread, reading the plugin's kubeconfig; None when
    disabled, or when no node name is known (watching every node's pods from here is wrong:
    their namespaces are not on this host)."""
    options = settings.repair
    if not options.enabled:
        logs.get().info("repair controller disabled (REPAIR_ENABLED=false)")
        return None
    if not options.node_name:
        logs.get().warning(
            "repair controller not started: set REPAIR_NODE_NAME or KUBERNETES_NODE_NAME"
        )
        return None
    path = str(settings.kubeconfig_path)
    controller = repair.Controller(options, kubeapi.PodApi(lambda: kube.load_kubeconfig(path)))
    controller.start()
    return controller


# --- entry points ---------------------------------------------------------------------------------

_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def run(settings: Settings) -> int:
    """Install and keep the plugin until SIGTERM/SIGINT, then clean up. Returns the exit code.

    The signals are blocked and taken synchronously (sigtimedwait) by this thread while the
    install loop runs in a worker: no handler ever interrupts a half-written file. They stay
    blocked on return, so a second SIGTERM cannot kill the process on its way out.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)  # before any thread starts
    stop = threading.Event()
    installer = Installer(settings, stop)
    logs.get().info("starting", conf_dir=str(settings.conf_dir), chained=settings.chained)
    servers = []
    if settings.readiness_port:
        servers.append(serve_readiness(settings.readiness_port, installer.readiness_problems))
    if settings.monitoring_port:
        try:
            servers.append(serve_metrics(settings.monitoring_port))
        except InstallError as err:  # as Istio: metrics are not worth failing the node for
            logs.get().error(str(err))
    controller = start_repair(settings)
    node_agent = _start_agent(settings)
    failure: list[BaseException] = []
    worker = threading.Thread(target=_capture(installer.run, failure), name="install")
    worker.start()
    try:
        _wait_for_signal(worker)
    finally:
        stop.set()
        if controller is not None:
            controller.stop()  # a repair in progress finishes; the watch ends at once
        if node_agent is not None:
            node_agent.stop()  # in-flight CNI calls finish; new ones fall back meanwhile
        worker.join()
        for server in servers:
            server.shutdown()
            server.server_close()
        _capture(installer.cleanup, failure)()
    if failure:
        raise failure[0]  # the first failure; a later cleanup failure was logged
    return 0


def _wait_for_signal(worker: threading.Thread) -> None:
    """Return on SIGTERM/SIGINT, or when the worker has ended (with an error)."""
    while worker.is_alive():
        received = signal.sigtimedwait(_SIGNALS, 0.2)
        if received is not None:
            if received.si_signo not in _SIGNALS:
                continue  # under load this CPython has returned si_signo 0 here
            name = signal.Signals(received.si_signo).name
            logs.get().info("signal received; cleaning up", signal=name)
            return


def _capture(target: Callable[[], None], failure: list[BaseException]) -> Callable[[], None]:
    def call() -> None:
        try:
            target()
        except BaseException as err:  # handed to the main thread, which re-raises the first
            if failure:
                logs.get().error(str(err))
            failure.append(err)

    return call


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """`python -m meshnet.cni.install`: options from the environment only (see ENV_OPTIONS)."""
    args = list(sys.argv[1:] if argv is None else argv)
    env = os.environ if environ is None else environ
    if args in (["-h"], ["--help"]):
        sys.stdout.write(_usage())
        return 0
    logs.configure("json" if env.get("MESHNET_LOG_FORMAT") == "json" else "text")
    if args:
        sys.stderr.write(f"Error: unexpected arguments {args}; options are env variables\n")
        return 255
    try:
        settings = Settings.from_env(env)
        logs.configure(settings.log_format, f"default:{settings.log_level}")
        return run(settings)
    except MeshnetError as err:
        logs.get().error(str(err))
        return err.exit_code


def _usage() -> str:
    lines = ["usage: meshnet cni install  (options are environment variables)", ""]
    width = max(len(option.name) for option in ENV_OPTIONS)
    for option in ENV_OPTIONS:
        default = f" [default {option.default!r}]" if option.default else ""
        lines.append(f"  {option.name:<{width}}  {option.help}{default}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
