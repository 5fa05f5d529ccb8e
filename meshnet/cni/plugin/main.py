"""`meshnet-cni`: the CNI chained plugin (Istio's `cni/pkg/plugin/plugin.go`), sidecar mode.

The container runtime runs it once per pod sandbox with the network config on stdin and the
CNI_* variables in the environment. stdout carries only the CNI result or error; logs go to
stderr as JSON. Imports stay light (stdlib, plan, engine): this runs ~110 times at once on
a busy node.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshnet import logs
from meshnet.errors import CniError, MeshnetError

SUPPORTED_VERSIONS = ("0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
PLUGIN_TYPE = "meshnet-cni"
KUBECONFIG_NAME = "meshnet-cni-kubeconfig"
SELF_POD_PREFIX = "meshnet-cni-node-"
K8S_ARGS = (
    "IgnoreUnknown",
    "K8S_POD_NAME",
    "K8S_POD_NAMESPACE",
    "K8S_POD_INFRA_CONTAINER_ID",
    "K8S_POD_UID",
)
# CNI spec error codes.
ERR_INCOMPATIBLE_VERSION = 1
ERR_INVALID_ENV = 4
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_INTERNAL = 999
USAGE = f"CNI plugin {PLUGIN_TYPE}: supported versions {', '.join(SUPPORTED_VERSIONS)}\n"


@dataclass(frozen=True, slots=True)
class Call:
    """One invocation: the command, the CNI_* variables and the parsed stdin config."""

    command: str
    env: Mapping[str, str]
    config: dict[str, Any]

    @property
    def version(self) -> str:
        return str(self.config.get("cniVersion", "0.1.0"))

    @property
    def netns(self) -> str:
        return self.env.get("CNI_NETNS", "")

    @property
    def run_dir(self) -> str:
        return str(self.config.get("cni_agent_run_dir") or "/var/run/meshnet-cni")


def main() -> None:
    sys.exit(run(sys.stdin.read() if _needs_stdin() else "", os.environ))


def _needs_stdin() -> bool:
    return os.environ.get("CNI_COMMAND", "") not in ("VERSION", "")


def run(stdin: str, environ: Mapping[str, str]) -> int:
    """Handle one CNI call as the standalone process: print the output, return the exit code."""
    logs.configure("json")  # before anything can log: stdout is reserved for the CNI result
    output, code = respond(stdin, environ, configure_logs=True)
    if output:
        sys.stdout.write(output)
        sys.stdout.flush()
    return code


def respond(
    stdin: str, environ: Mapping[str, str], *, configure_logs: bool = False
) -> tuple[str, int]:
    """Handle one CNI call: (what goes to stdout, exit code). Never raises.

    configure_logs: take the log level from the netconf (the standalone process); a resident
    agent serving many calls keeps its own logger.
    """
    command = environ.get("CNI_COMMAND", "")
    if not command:
        sys.stderr.write(USAGE)
        return "", 1
    version = "1.1.0"
    try:
        if command == "VERSION":
            return _render(
                {"cniVersion": "1.1.0", "supportedVersions": list(SUPPORTED_VERSIONS)}
            ), 0
        call = Call(command, environ, _parse_config(stdin))
        version = call.version
        _check_numbers(call.config)
        if configure_logs:
            logs.configure("json", f"default:{call.config.get('plugin_log_level') or 'info'}")
        result = _dispatch(call)
        return ("" if result is None else _render(result)), 0
    except CniError as err:
        return _fail(version, err.code, str(err))
    except MeshnetError as err:
        return _fail(version, ERR_INTERNAL, str(err))
    except Exception as err:  # the runtime must always get a CNI error, never a traceback
        return _fail(version, ERR_INTERNAL, f"{PLUGIN_TYPE} panicked during {command}: {err!r}")


# The first spec version that has each command; older configs are refused as skel does.
_SINCE = {"CHECK": "0.4.0", "STATUS": "1.1.0", "GC": "1.1.0"}


def _dispatch(call: Call) -> dict[str, Any] | None:
    from meshnet.cni.plugin import commands

    since = _SINCE.get(call.command)
    if since is not None and _version_tuple(call.version) < _version_tuple(since):
        raise CniError(ERR_INCOMPATIBLE_VERSION, f"config version does not allow {call.command}")
    handlers = {
        "ADD": commands.add,
        "DEL": commands.delete,
        "CHECK": commands.check,
        "STATUS": commands.status,
        "GC": commands.gc,
    }
    handler = handlers.get(call.command)
    if handler is None:
        raise CniError(ERR_INVALID_ENV, f"unknown CNI_COMMAND: {call.command}")
    return handler(call)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def _parse_config(stdin: str) -> dict[str, Any]:
    try:
        config = json.loads(stdin)
    except ValueError as err:
        raise CniError(ERR_DECODE, f"failed to parse network configuration: {err}") from None
    if not isinstance(config, dict):
        raise CniError(ERR_DECODE, "failed to parse network configuration: not a JSON object")
    version = str(config.get("cniVersion", "0.1.0"))
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            ERR_INCOMPATIBLE_VERSION,
            f"incompatible CNI versions: config is {version!r}, plugin supports "
            f"{list(SUPPORTED_VERSIONS)}",
        )
    return config


# meshnet's netconf numbers: (field, lowest value, whole numbers only). JSON numbers or their
# text are accepted; anything else fails the call here, before any work, naming the field.
_NUMBERS = (("pod_fetch_attempts", 1, True), ("pod_fetch_interval", 0, False))


def _check_numbers(config: Mapping[str, Any]) -> None:
    for name, low, whole in _NUMBERS:
        if name in config and _number(config[name], whole, low) is None:
            kind = "a whole number" if whole else "a number of seconds"
            raise CniError(
                ERR_INVALID_CONFIG,
                f"invalid network configuration: {name} must be {kind} >= {low}, "
                f"got {json.dumps(config[name])}",
            )


def _number(value: object, whole: bool, low: int) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value) if not whole or isinstance(value, float) else int(value)
    except ValueError:
        return None
    if not math.isfinite(number) or number < low or (whole and number != int(number)):
        return None
    return number


def k8s_args(environ: Mapping[str, str]) -> dict[str, str]:
    """CNI_ARGS as libcni's LoadArgs: unknown keys are an error unless IgnoreUnknown is set."""
    pairs: dict[str, str] = {}
    for item in filter(None, environ.get("CNI_ARGS", "").split(";")):
        key, sep, value = item.partition("=")
        if not sep:
            raise CniError(ERR_INVALID_ENV, f"ARGS: invalid pair {item!r}")
        pairs[key] = value
    ignore = pairs.get("IgnoreUnknown", "").lower() in ("1", "true")
    unknown = [key for key in pairs if key not in K8S_ARGS]
    if unknown and not ignore:
        raise CniError(ERR_INVALID_ENV, f"ARGS: unknown args {unknown}")
    return pairs


def require_env(call: Call, *names: str) -> None:
    missing = [name for name in names if not call.env.get(name)]
    if missing:
        raise CniError(ERR_INVALID_ENV, f"required env variables [{', '.join(missing)}] missing")


def _render(document: Mapping[str, Any]) -> str:
    return json.dumps(document, indent=4) + "\n"


def _fail(version: str, code: int, message: str) -> tuple[str, int]:
    logs.get().error(message, code=code)
    return _render({"cniVersion": version, "code": code, "msg": message}), 1
