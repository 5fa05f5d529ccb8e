"""The CNI commands: ADD applies the pod's rules, CHECK verifies them, DEL removes them."""

from __future__ import annotations

import os
import shutil
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from meshnet import logs
from meshnet.apply import backend, iptables_engine, sweep
from meshnet.cni.kube import plugin_client
from meshnet.cni.plugin.main import (
    ERR_INTERNAL,
    ERR_INVALID_ENV,
    KUBECONFIG_NAME,
    SELF_POD_PREFIX,
    Call,
    k8s_args,
    require_env,
)
from meshnet.cni.plugin.pod import PodDecision, decide, origin_of
from meshnet.config import options
from meshnet.config.flags import ENV_ONLY
from meshnet.config.options import Options, Raw
from meshnet.errors import CniError, MeshnetError
from meshnet.host import netns, nslock
from meshnet.host.system import HostSystem
from meshnet.plan import iptables
from meshnet.render import transcript

# The node agent imports this module before its first call: the iptables engine and plan with it.
_WARM = (iptables_engine, iptables)

# Env-only options come from the plugin's own environment, as in Istio; nothing else does.
_PLUGIN_ENV = tuple(flag.env for flag in ENV_ONLY if flag.env)


def add(call: Call) -> dict[str, Any]:
    require_env(call, "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH")
    _refuse_own_namespace(call)
    # The lock is held from the pod lookup on: a second ADD of this container waits, then finds
    # the rules in place; a DEL waits for the ADD, then removes what it installed.
    with _pod_lock(call.netns):
        decision = _pod_decision(call)
        if decision.skip_reason is None:
            _program(call, decision)
    return _result(call)


def check(call: Call) -> None:
    require_env(call, "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH")
    _refuse_own_namespace(call)
    decision = _pod_decision(call)
    if decision.skip_reason is not None:
        return
    with netns.entered(call.netns):  # verify holds the namespace's lock
        drift = backend.select(_options(call, decision)).verify().differences
    if drift:
        raise CniError(ERR_INTERNAL, "pod rules drifted: " + "; ".join(drift[:5]))


def delete(call: Call) -> None:
    """Remove everything Istio or meshnet installed (the pod, and so its annotations, may be
    gone); a namespace that is gone, or a CNI_NETNS that is not one, leaves nothing to do."""
    if not call.netns:
        return
    _refuse_own_namespace(call)
    if not sweep.is_network_namespace(netns.resolve(call.netns)):
        return
    with netns.entered(call.netns):  # the sweep waits for a running ADD (the namespace lock)
        sweep.sweep(lockfile=netns.resolve(call.netns))


def status(call: Call) -> None:
    """CNI 1.1 STATUS: ready when a rules backend is installed."""
    tools = backend.kind(native_nftables=bool(call.config.get("native_nftables"))).tools
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        raise CniError(50, f"plugin not available: {', '.join(missing)} not found in PATH")


def gc(call: Call) -> None:
    """Nothing to collect: a pod's rules live and die with its namespace."""


def program_pod(netns_path: str, pod: dict[str, Any], native_nftables: bool) -> str | None:
    """ADD's programming for a pod that is already running (the repair controller's entry):
    the same skip rules, annotations and engine. Returns the skip reason, None when programmed."""
    decision = decide(pod)
    if decision.skip_reason is None:
        call = Call("ADD", {"CNI_NETNS": netns_path}, {"native_nftables": native_nftables})
        _program(call, decision)
    return decision.skip_reason


def _pod_lock(ns: str) -> AbstractContextManager[None]:
    """The pod namespace's lock; none when CNI_NETNS is no namespace (entering it reports that)."""
    if sweep.is_network_namespace(netns.resolve(ns)):
        return nslock.held_from_outside(ns)
    return nullcontext()


def _refuse_own_namespace(call: Call) -> None:
    """As skel: never program the namespace the plugin itself runs in (the node's)."""
    try:
        target = os.stat(netns.resolve(call.netns))
    except OSError:
        return  # reported with a clear message when it is entered
    own = os.stat("/proc/self/ns/net")
    if (target.st_dev, target.st_ino) == (own.st_dev, own.st_ino):
        raise CniError(
            ERR_INVALID_ENV, "plugin's netns and netns from CNI_NETNS should not be the same"
        )


def _pod_decision(call: Call) -> PodDecision:
    args = k8s_args(call.env)
    name, namespace = args.get("K8S_POD_NAME", ""), args.get("K8S_POD_NAMESPACE", "")
    log = logs.get().bind(pod=f"{namespace}/{name}", container=call.env.get("CNI_CONTAINERID"))
    if name.startswith(SELF_POD_PREFIX) and namespace == call.config.get("pod_namespace"):
        return _skip(log, "the CNI node agent's own pod")
    if not name or not namespace:
        return _skip(log, "not a kubernetes pod")
    if namespace in (call.config.get("exclude_namespaces") or []):
        return _skip(log, f"namespace {namespace} is excluded")
    config = plugin_client.load_kubeconfig(os.path.join(call.run_dir, KUBECONFIG_NAME))
    pod = plugin_client.get_pod(
        config,
        namespace,
        name,
        attempts=int(call.config.get("pod_fetch_attempts", 30)),
        interval=float(call.config.get("pod_fetch_interval", 1.0)),
    )
    decision = decide(pod)
    if decision.skip_reason is not None:
        return _skip(log, decision.skip_reason)
    return decision


def _skip(log: Any, reason: str) -> PodDecision:
    log.info("no rules for this pod", reason=reason)
    return PodDecision(reason, {})


def _options(call: Call, decision: PodDecision) -> Options:
    environ = {name: call.env[name] for name in _PLUGIN_ENV if name in call.env}
    raw = options.gather({}, environ)
    for key, text in decision.flags.items():
        raw[key] = Raw(text, origin_of(key), explicit=True)
    raw["network_namespace"] = Raw(call.netns, "CNI_NETNS", explicit=True)
    raw["native_nftables"] = Raw(
        "true" if call.config.get("native_nftables") else "false", "native_nftables", explicit=True
    )
    raw["dns_servers"] = Raw("", "CNI", explicit=True)  # never the host's resolv.conf
    return options.build(raw, HostSystem())


def _program(call: Call, decision: PodDecision) -> None:
    dry_run_file = call.env.get("DRY_RUN_FILE_PATH", "")
    with netns.entered(call.netns):
        opts = _options(call, decision)
        if dry_run_file:
            _write_transcript(dry_run_file, opts)
        else:
            backend.select(opts).program()
    logs.get().info("pod rules in place", netns=call.netns, dry_run=bool(dry_run_file))


def _write_transcript(path: str, opts: Options) -> None:
    """The dry-run file holds Istio's iptables stub transcript, whichever backend is configured
    (Istio turns on dry-run from DRY_RUN_FILE_PATH for iptables only: cni/pkg/plugin/
    sidecar_iptables_linux.go)."""
    text = transcript.render(backend.IptablesBackend.from_options(opts).ruleset)
    try:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as err:
        raise MeshnetError(f"cannot write DRY_RUN_FILE_PATH {path}: {err.strerror}") from err


def _result(call: Call) -> dict[str, Any]:
    """prevResult unchanged, in the config's version (Istio's PrintResult)."""
    previous = call.config.get("prevResult")
    result: dict[str, Any] = {"cniVersion": call.version}
    if isinstance(previous, dict):
        result.update((k, v) for k, v in previous.items() if k.lower() != "cniversion")
        if call.version == "1.0.0" and result.get("dns") == {}:
            del result["dns"]
    return result
