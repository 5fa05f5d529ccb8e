"""CNI network config files: the plugin entry, the primary file, merge and removal.

Everything here works on text and values (Istio's `createCNIConfigFile` and `insertCNIConfig`
in `cni/pkg/install/cniconfig.go`, `checkValidCNIConfig` and `Cleanup` in `install.go`), plus
read-only scans of the conf dir.
Writing files is the installer's job (`meshnet.cni.install.config`).

Istio decodes JSON into Go maps and encodes with `json.MarshalIndent`; `loads` and `marshal`
keep its layout (sorted keys, 2-space indent), so merged files match Istio's goldens byte for
byte, but not its losses: a number is written back as it was read (Go rounds it to a float64:
12345678901234567890 becomes 12345678901234567000) and `<>&` stay as they are (Go writes
`\u003c`...).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from meshnet.errors import MeshnetError

# libcni.ConfFiles as the runtimes call it (containerd, CRI-O): Istio passes only .conf and
# .conflist, but a .json file sorting first is the runtime's primary config, so it is ours too.
CONF_EXTENSIONS = (".conf", ".conflist", ".json")
SINGLE_EXTENSIONS = (".conf", ".json")  # one plugin per file: wrapped into a list on merge
WRAPPED_NAME = "k8s-pod-network"
WRAPPED_VERSION = "0.3.1"  # Istio forces 0.3.1 when wrapping a .conf (istio/istio#32137)
ENTRY_VERSION = "0.3.1"


class CniConfigError(MeshnetError):
    """A CNI config file cannot be read, parsed or merged."""


@dataclass(frozen=True, slots=True)
class PluginConfig:
    """The keys of the plugin's stdin config that the installer writes (Istio's `plugin.Config`)."""

    plugin_name: str
    plugin_log_level: str
    cni_agent_run_dir: str
    pod_namespace: str
    exclude_namespaces: tuple[str, ...] = ()
    native_nftables: bool = False
    # Ambient keys: meshnet has no ambient mode, but Istio's entry always carries them.
    ambient_enabled: bool = False
    enablement_selectors: tuple[Any, ...] = ()
    enable_ambient_detection_retry: bool = False


def plugin_entry(config: PluginConfig) -> dict[str, Any]:
    """The entry in Go struct field order (`plugin.Config`), as `istio-cni.conf` shows it."""
    return {
        "cniVersion": ENTRY_VERSION,
        "name": config.plugin_name,
        "type": config.plugin_name,
        "ipam": {},
        "dns": {},
        "plugin_log_level": config.plugin_log_level,
        "cni_agent_run_dir": config.cni_agent_run_dir,
        "ambient_enabled": config.ambient_enabled,
        "enablement_selectors": list(config.enablement_selectors),
        # A nil Go slice encodes as null, which is what an empty EXCLUDE_NAMESPACES gives.
        "exclude_namespaces": list(config.exclude_namespaces) or None,
        "pod_namespace": config.pod_namespace,
        "native_nftables": config.native_nftables,
        "enable_ambient_detection_retry": config.enable_ambient_detection_retry,
    }


def render_entry(config: PluginConfig) -> str:
    """The standalone config file: the entry alone, keys in struct order."""
    return marshal(plugin_entry(config), sort_keys=False)


# --- JSON in Istio's layout, values kept exactly ----------------------------------------------


@dataclass(frozen=True, slots=True)
class Number:
    """A JSON number as its source text, so that it is written back digit for digit."""

    text: str


def loads(text: str, what: str) -> dict[str, Any]:
    """Decode like Go's `json.Unmarshal` into `map[string]any`, numbers kept as `Number`."""
    try:
        value = json.loads(text, parse_int=Number, parse_float=Number, parse_constant=_nan)
    except ValueError as err:
        raise CniConfigError(f"error loading {what} (JSON error): {err}") from None
    if value is None:  # Go leaves the map nil: no keys
        return {}
    if not isinstance(value, dict):
        raise CniConfigError(
            f"error loading {what} (JSON error): a JSON object is required, "
            f"not {type(value).__name__}"
        )
    return value


def marshal(value: Any, sort_keys: bool = True) -> str:
    """Go's `json.MarshalIndent(value, "", "  ")` plus the trailing newline Istio adds."""
    return _encode(value, "", sort_keys) + "\n"


def _nan(text: str) -> Any:
    raise ValueError(f"invalid character {text[0]!r} looking for beginning of value")


def _encode(value: Any, indent: str, sort_keys: bool) -> str:
    inner = indent + "  "
    if isinstance(value, dict):
        if not value:
            return "{}"
        keys = sorted(value) if sort_keys else list(value)
        items = [f"{inner}{_string(k)}: {_encode(value[k], inner, sort_keys)}" for k in keys]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list | tuple):
        if not value:
            return "[]"
        items = [inner + _encode(item, inner, sort_keys) for item in value]
        return "[\n" + ",\n".join(items) + "\n" + indent + "]"
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, Number):
        return value.text
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _float(value)
    raise CniConfigError(f"cannot encode {type(value).__name__} as JSON")


def _string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # no HTML escaping: a config is not a web page


def _float(number: float) -> str:
    """encoding/json's float64 format (for values given as options, not read from files)."""
    if not math.isfinite(number):
        raise CniConfigError(f"unsupported value: {number}")
    magnitude = abs(number)
    if magnitude != 0 and (magnitude < 1e-6 or magnitude >= 1e21):
        mantissa, _, exponent = repr(number).partition("e")
        sign, digits = exponent[0], exponent[1:].lstrip("0") or "0"
        # Go prints at least two exponent digits, then trims "e-07" to "e-7" (but not "e+21").
        return f"{mantissa}e{sign}{digits if sign == '-' else digits.zfill(2)}"
    text = format(Decimal(repr(number)), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


# --- merge and removal ----------------------------------------------------------------------


def insert(entry_text: str, existing_text: str, plugin_type: str) -> str:
    """Istio's `insertCNIConfig`: add our entry to the existing config and return the new text.

    A single-plugin file is wrapped into a list (both `cniVersion`s dropped, as Istio does);
    in a list, the first plugin of our type is replaced by appending the new entry.
    """
    entry = loads(entry_text, "plugin CNI config")
    existing = loads(existing_text, "existing CNI config")
    entry.pop("cniVersion", None)
    if "type" in existing:
        existing.pop("cniVersion", None)
        merged = {"name": WRAPPED_NAME, "cniVersion": WRAPPED_VERSION, "plugins": [existing, entry]}
        return marshal(merged)
    plugins = _plugins(existing, "existing CNI config")
    index = _first_of_type(plugins, plugin_type, "existing CNI plugin")
    if index is not None:
        del plugins[index]
    existing["plugins"] = [*plugins, entry]
    return marshal(existing)


def remove(existing_text: str, plugin_type: str, where: str) -> str | None:
    """Istio's `Cleanup` edit: drop the first plugin of our type; None when there is none."""
    existing = loads(existing_text, f"CNI config {where}")
    plugins = _plugins(existing, where)
    index = _first_of_type(plugins, plugin_type, where)
    if index is None:
        return None
    del plugins[index]
    existing["plugins"] = plugins
    return marshal(existing)


def chained_problem(text: str, plugin_type: str, where: str) -> str | None:
    """Why a chained config file lacks our plugin, or None when it holds it."""
    try:
        plugins = _plugins(loads(text, f"CNI config {where}"), where)
        if _first_of_type(plugins, plugin_type, where) is not None:
            return None
    except CniConfigError as err:
        return str(err)
    return f"{plugin_type} CNI config removed from CNI config file: {where}"


def standalone_problem(text: str, plugin_type: str, where: str) -> str | None:
    """Why a standalone config file is not ours, or None when it is."""
    try:
        if loads(text, f"CNI config {where}").get("type") == plugin_type:
            return None
    except CniConfigError as err:
        return str(err)
    return f"{plugin_type} CNI config file modified: {where}"


def _plugins(config: dict[str, Any], where: str) -> list[Any]:
    plugins = config.get("plugins")
    if not isinstance(plugins, list):
        raise CniConfigError(f"{where}: error reading plugin list from CNI config")
    return plugins


def _first_of_type(plugins: list[Any], plugin_type: str, where: str) -> int | None:
    for index, plugin in enumerate(plugins):
        if not isinstance(plugin, dict):
            raise CniConfigError(f"{where}: error reading plugin from CNI config plugin list")
        if plugin.get("type") == plugin_type:
            return index
    return None


# --- the primary config file ------------------------------------------------------------------


def find_primary(conf_dir: Path) -> str | None:
    """The file the runtime uses: the first valid config in sorted order (libcni.ConfFiles)."""
    try:
        found = _candidates(conf_dir)
    except OSError:
        return None
    for name, problem in found:
        if problem is None:
            return name
    return None


def no_primary_reason(conf_dir: Path) -> str:
    """Why `find_primary` finds nothing: the dir, or each config file and what is wrong in it."""
    try:
        found = _candidates(conf_dir)
    except FileNotFoundError:
        return f"CNI conf dir {conf_dir} does not exist (is the host's dir mounted?)"
    except OSError as err:
        return f"CNI conf dir {conf_dir} cannot be read: {err.strerror}"
    if not found:
        return f"no CNI config file (.conf, .conflist, .json) in {conf_dir}"
    problems = "; ".join(f"{name}: {problem}" for name, problem in found)
    return f"no valid CNI config in {conf_dir}: {problems}"


def _candidates(conf_dir: Path) -> list[tuple[str, str | None]]:
    """Config files in sorted order, each with why it is not valid (None: valid)."""
    with os.scandir(conf_dir) as entries:
        names = sorted(
            entry.name
            for entry in entries
            if entry.name.endswith(CONF_EXTENSIONS) and entry.is_file()
        )
    return [(name, config_invalid(name, _read(conf_dir / name))) for name in names]


def config_invalid(name: str, text: str | None) -> str | None:
    """libcni's checks: a list with plugins that each have a type, or one config with a type."""
    if text is None:
        return "unreadable"
    try:
        config = loads(text, name)
    except CniConfigError as err:
        return str(err)
    if not name.endswith(".conflist"):
        return None if _is_plugin(config) else "no plugin type"
    plugins = config.get("plugins")
    if not isinstance(config.get("name"), str):
        return "no network name"
    if not isinstance(config.get("cniVersion", ""), str):
        return "cniVersion is not a string"
    if not isinstance(plugins, list) or not plugins:
        return "no plugins"
    if not all(_is_plugin(plugin) for plugin in plugins):
        return "a plugin without a type"
    return None


def merge_problem(text: str, where: str) -> str | None:
    """Why `insert` cannot merge into this text, or None (a named file has no extension rule)."""
    try:
        config = loads(text, f"CNI config {where}")
        if "type" not in config:
            _first_of_type(_plugins(config, where), "\0", where)  # checks every plugin
    except CniConfigError as err:
        return str(err)
    return None


def _is_plugin(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("type"), str) and bool(value["type"])


def _read(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError:  # vanished or unreadable between listing and reading: not a candidate
        return None


def siblings(path: Path) -> tuple[Path, ...]:
    """Names the same config may have after a merge renamed it (`.conf` <-> `.conflist`)."""
    if path.suffix in SINGLE_EXTENSIONS:
        return (path.with_suffix(".conflist"),)
    if path.suffix == ".conflist":
        return tuple(path.with_suffix(ext) for ext in SINGLE_EXTENSIONS)
    return ()


# --- the user's original file ------------------------------------------------------------------


def backup_name(name: str, plugin_type: str) -> str:
    """Where the installer keeps a user's file it changed: an extension no runtime loads."""
    return f"{name}.{plugin_type}-orig"


def holds_plugin(text: str, plugin_type: str) -> bool:
    """True when the config has a plugin of our type (unreadable configs: False)."""
    try:
        config = loads(text, "CNI config")
        if config.get("type") == plugin_type:
            return True
        plugins = config.get("plugins")
        return isinstance(plugins, list) and any(
            isinstance(plugin, dict) and plugin.get("type") == plugin_type for plugin in plugins
        )
    except CniConfigError:
        return False


def only_ours_added(original: str, current: str, plugin_type: str) -> bool:
    """True when `current` is what `insert` made of `original`, give or take our entry.

    Then the original can be put back as it was; otherwise someone else changed the file
    since, and only our entry is removed from it.
    """
    if holds_plugin(original, plugin_type):
        return False  # putting it back would bring back a plugin of ours
    try:
        merged = insert(marshal({"type": plugin_type}), original, plugin_type)
        return remove(merged, plugin_type, "merged") == remove(current, plugin_type, "current")
    except CniConfigError:
        return False
