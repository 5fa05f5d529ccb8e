"""CNI network config files: the plugin entry, the primary file, merge and removal.

Everything here works on text and values (SPEC-istio §5.4 `createCNIConfigFile`,
`insertCNIConfig`, `checkValidCNIConfig`, `Cleanup`), plus read-only scans of the conf dir.
Writing files is the installer's job (`meshnet.cni.install`).

Istio decodes JSON into Go maps and encodes with `json.MarshalIndent`; the helpers `loads` and
`marshal` reproduce that exactly (sorted keys, 2-space indent, HTML-escaped `<>&`, numbers
re-encoded as float64), so merged files match Istio's goldens byte for byte.
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
    """The keys of the plugin's stdin config that the installer writes (SPEC-istio §5.1)."""

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


# --- Go-compatible JSON -------------------------------------------------------------------


def loads(text: str, what: str) -> dict[str, Any]:
    """Decode like Go's `json.Unmarshal` into `map[string]any`: an object, numbers as float64."""
    try:
        value = json.loads(text, parse_int=_go_number, parse_float=_go_number, parse_constant=_nan)
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


def _go_number(text: str) -> int | float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"number {text} does not fit a float64")
    if number.is_integer() and abs(number) < 1e21 and not _negative_zero(number):
        # float64 precision, printed without exponent: 1.0 -> 1, 12345678901234567890 ->
        # 12345678901234567000. Negative zero stays a float so it prints as Go's "-0".
        return int(Decimal(repr(number)))
    return number


def _negative_zero(number: float) -> bool:
    return number == 0 and math.copysign(1, number) < 0


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
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _float(value)
    raise CniConfigError(f"cannot encode {type(value).__name__} as JSON")


# Go's encoder escapes these for HTML safety; Python's does not.
_GO_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


def _string(text: str) -> str:
    encoded = json.dumps(text, ensure_ascii=False)
    for char, escape in _GO_ESCAPES.items():
        encoded = encoded.replace(char, escape)
    return encoded


def _float(number: float) -> str:
    """encoding/json's float64 format: shortest digits, exponent only below 1e-6 or from 1e21."""
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
        names = sorted(
            entry.name
            for entry in os.scandir(conf_dir)
            if entry.name.endswith(CONF_EXTENSIONS) and entry.is_file()
        )
    except FileNotFoundError:
        return None
    for name in names:
        if is_valid_config(name, _read(conf_dir / name)):
            return name
    return None


def is_valid_config(name: str, text: str | None) -> bool:
    """A list with plugins that each have a type, or a single config with a type (libcni)."""
    if text is None:
        return False
    try:
        config = loads(text, name)
    except CniConfigError:
        return False
    if not name.endswith(".conflist"):
        return _is_plugin(config)
    plugins = config.get("plugins")
    return (
        isinstance(config.get("name"), str)
        and isinstance(config.get("cniVersion", ""), str)
        and isinstance(plugins, list)
        and bool(plugins)
        and all(_is_plugin(plugin) for plugin in plugins)
    )


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
