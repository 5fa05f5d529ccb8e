"""Every istio-iptables flag and env variable, with Istio's names, short letters and defaults.

This table is the single source for the CLI's options and `--help`, and for the precedence rules
(command line > alias env > primary env > default, as Istio's `pkg/flag/flag.go` binds them).
Values stay text here; `options.py` parses and validates them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["str", "bool"]

# The proxy's UID and GID when nothing names them (istio-proxy's ids in Istio's images).
DEFAULT_PROXY_ID = "1337"


@dataclass(frozen=True, slots=True)
class Flag:
    key: str  # the field name in Options and in the raw-value map
    long: str | None  # "--envoy-port"; None for env-only options
    short: str | None = None  # "-p"
    env: str | None = None  # the BindEnv name
    alias_env: str | None = None  # the AdditionalEnv name; beats `env`
    default: str = ""
    kind: Kind = "str"
    help: str = ""

    def origin(self, *, from_env: str | None = None) -> str:
        """How an error names where a value came from."""
        if from_env is not None:
            return f"env {from_env}"
        names = [n for n in (self.short, self.long) if n]
        return "/".join(names) if names else f"env {self.env}"


ISTIO_FLAGS: tuple[Flag, ...] = (
    Flag(
        "envoy_port",
        "--envoy-port",
        "-p",
        None,
        None,
        "15001",
        help="Port to which all outbound TCP traffic of the pod is redirected (no env variable).",
    ),
    Flag(
        "inbound_capture_port",
        "--inbound-capture-port",
        "-z",
        "INBOUND_CAPTURE_PORT",
        default="15006",
        help="Port to which all inbound TCP traffic of the pod is redirected.",
    ),
    Flag(
        "inbound_tunnel_port",
        "--inbound-tunnel-port",
        "-e",
        "INBOUND_TUNNEL_PORT",
        default="15008",
        help="Inbound tunnel port; never captured inbound.",
    ),
    Flag(
        "proxy_uid",
        "--proxy-uid",
        "-u",
        "PROXY_UID",
        help="Comma list of UIDs whose traffic is not captured "
        "(default: the UID of $ENVOY_USER, else 1337).",
    ),
    Flag(
        "proxy_gid",
        "--proxy-gid",
        "-g",
        "PROXY_GID",
        help="Comma list of GIDs whose traffic is not captured (default: the --proxy-uid text).",
    ),
    Flag(
        "inbound_interception_mode",
        "--istio-inbound-interception-mode",
        "-m",
        "ISTIO_INBOUND_INTERCEPTION_MODE",
        help="Inbound interception mode: TPROXY, or REDIRECT (any other value means REDIRECT).",
    ),
    Flag(
        "inbound_ports",
        "--istio-inbound-ports",
        "-b",
        "ISTIO_INBOUND_PORTS",
        help="Comma list of inbound ports to capture; '*' for all; empty for none.",
    ),
    Flag(
        "local_exclude_ports",
        "--istio-local-exclude-ports",
        "-d",
        "ISTIO_LOCAL_EXCLUDE_PORTS",
        help="Comma list of inbound ports to exclude (only with -b '*').",
    ),
    Flag(
        "exclude_interfaces",
        "--istio-exclude-interfaces",
        "-c",
        "ISTIO_EXCLUDE_INTERFACES",
        help="Comma list of interfaces whose traffic is never captured.",
    ),
    Flag(
        "service_cidr",
        "--istio-service-cidr",
        "-i",
        "ISTIO_SERVICE_CIDR",
        help="Comma list of outbound CIDRs to capture; '*' for all; empty for none.",
    ),
    Flag(
        "service_exclude_cidr",
        "--istio-service-exclude-cidr",
        "-x",
        "ISTIO_SERVICE_EXCLUDE_CIDR",
        help="Comma list of outbound CIDRs never captured.",
    ),
    Flag(
        "outbound_ports",
        "--istio-outbound-ports",
        "-q",
        "ISTIO_OUTBOUND_PORTS",
        help="Comma list of outbound TCP ports always captured, whatever the destination.",
    ),
    Flag(
        "outbound_ports_exclude",
        "--istio-local-outbound-ports-exclude",
        "-o",
        "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE",
        help="Comma list of outbound TCP/UDP ports never captured.",
    ),
    Flag(
        "kube_virt_interfaces",
        "--kube-virt-interfaces",
        "-k",
        "KUBE_VIRT_INTERFACES",
        help="Comma list of virtual interfaces whose inbound traffic is treated as outbound.",
    ),
    Flag(
        "tproxy_mark",
        "--istio-inbound-tproxy-mark",
        "-t",
        "ISTIO_INBOUND_TPROXY_MARK",
        default=DEFAULT_PROXY_ID,
        help="Packet mark used by TPROXY inbound capture (decimal).",
    ),
    Flag(
        "tproxy_route_table",
        "--istio-inbound-tproxy-route-table",
        "-r",
        "ISTIO_INBOUND_TPROXY_ROUTE_TABLE",
        default="133",
        help="Routing table used by TPROXY inbound capture (decimal).",
    ),
    Flag(
        "dry_run",
        "--dry-run",
        "-n",
        "DRY_RUN",
        kind="bool",
        default="false",
        help="Print the rules instead of applying them; touches nothing, needs no root.",
    ),
    Flag(
        "probe_port",
        "--iptables-probe-port",
        None,
        "IPTABLES_PROBE_PORT",
        default="15002",
        help="Port used by --run-validation.",
    ),
    Flag(
        "probe_timeout",
        "--probe-timeout",
        None,
        "PROBE_TIMEOUT",
        default="5s",
        help="Timeout of --run-validation (Go duration, e.g. 5s).",
    ),
    Flag(
        "skip_rule_apply",
        "--skip-rule-apply",
        None,
        "SKIP_RULE_APPLY",
        kind="bool",
        default="false",
        help="Apply nothing: no detection, no rules, no routes.",
    ),
    Flag(
        "run_validation",
        "--run-validation",
        None,
        "RUN_VALIDATION",
        kind="bool",
        default="false",
        help="Check that interception works (exit 126 when it does not).",
    ),
    Flag(
        "redirect_dns",
        "--redirect-dns",
        None,
        "REDIRECT_DNS",
        "ISTIO_META_DNS_CAPTURE",
        kind="bool",
        default="false",
        help="Redirect DNS traffic to the proxy's port 15053.",
    ),
    Flag(
        "drop_invalid",
        "--drop-invalid",
        None,
        "DROP_INVALID",
        "INVALID_DROP",
        kind="bool",
        default="false",
        help="Drop packets in conntrack state INVALID.",
    ),
    Flag(
        "dual_stack",
        "--dual-stack",
        None,
        "DUAL_STACK",
        "ISTIO_DUAL_STACK",
        kind="bool",
        default="false",
        help="Dual-stack IP detection (IPv6 on when any IPv6 address exists).",
    ),
    Flag(
        "capture_all_dns",
        "--capture-all-dns",
        None,
        "CAPTURE_ALL_DNS",
        kind="bool",
        default="false",
        help="With --redirect-dns: capture DNS to every server.",
    ),
    Flag(
        "network_namespace",
        "--network-namespace",
        None,
        "NETWORK_NAMESPACE",
        help="Network namespace to work in: a path or a name under /var/run/netns.",
    ),
    Flag(
        "cni_mode",
        "--cni-mode",
        None,
        "CNI_MODE",
        kind="bool",
        default="false",
        help="Run as the CNI plugin does (pod-scoped xtables lock).",
    ),
    Flag(
        "reconcile",
        "--reconcile",
        None,
        "RECONCILE",
        kind="bool",
        default="false",
        help="Replace drifted rules instead of failing.",
    ),
    Flag(
        "cleanup_only",
        "--cleanup-only",
        None,
        "CLEANUP_ONLY",
        kind="bool",
        default="false",
        help="Remove the rules these flags would install, then exit.",
    ),
    Flag(
        "force_apply",
        "--force-apply",
        None,
        "FORCE_APPLY",
        kind="bool",
        default="false",
        help="Apply even when the state check says the rules are in place.",
    ),
    Flag(
        "native_nftables",
        "--native-nftables",
        None,
        "NATIVE_NFTABLES",
        kind="bool",
        default="false",
        help="Use native nftables instead of iptables.",
    ),
    Flag(
        "force_iptables_binary",
        "--force-iptables-binary",
        None,
        "FORCE_IPTABLES_BINARY",
        help="Force the iptables backend: legacy or nft.",
    ),
)

ENV_ONLY: tuple[Flag, ...] = (
    Flag("owner_groups_include", None, env="ISTIO_OUTBOUND_OWNER_GROUPS", default="*"),
    Flag("owner_groups_exclude", None, env="ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE"),
    Flag(
        "ipv4_loopback_cidr", None, env="ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", default="127.0.0.1/32"
    ),
    Flag("envoy_user", None, env="ENVOY_USER", default="istio-proxy"),
)

EXTENSIONS: tuple[Flag, ...] = (
    Flag(
        "enable_ipv6",
        "--enable-ipv6",
        None,
        "MESHNET_ENABLE_IPV6",
        default="auto",
        help="[meshnet] IPv6 rules: auto (Istio's detection), true or false.",
    ),
    Flag(
        "dns_servers",
        "--dns-servers",
        None,
        "MESHNET_DNS_SERVERS",
        help="[meshnet] DNS servers for --redirect-dns, used verbatim; "
        "absent: read --resolv-conf; empty: none.",
    ),
    Flag(
        "resolv_conf",
        "--resolv-conf",
        None,
        "MESHNET_RESOLV_CONF",
        default="/etc/resolv.conf",
        help="[meshnet] resolv.conf read for DNS servers.",
    ),
    Flag(
        "output_format",
        "--output-format",
        None,
        "MESHNET_OUTPUT_FORMAT",
        default="restore",
        help="[meshnet] What --dry-run prints: restore, transcript, json, nft, dot.",
    ),
    Flag(
        "cidr_sets",
        "--cidr-sets",
        None,
        "MESHNET_CIDR_SETS",
        kind="bool",
        default="false",
        help="[meshnet] Match -i/-x CIDR lists with one ipset (nft: one named set) per list "
        "and family instead of one rule per CIDR.",
    ),
    Flag(
        "log_format",
        "--log-format",
        None,
        "MESHNET_LOG_FORMAT",
        default="text",
        help="[meshnet] Log format on stderr: text or json.",
    ),
)

# Istio's inherited pilot-agent logging flags: accepted for compatibility.
LOG_FLAGS: tuple[Flag, ...] = (
    Flag(
        "log_output_level",
        "--log_output_level",
        default="default:info",
        help="Log level, as Istio's scope:level list (e.g. default:debug).",
    ),
    Flag(
        "log_as_json",
        "--log_as_json",
        kind="bool",
        default="false",
        help="Logs as JSON (same as --log-format json).",
    ),
    Flag("log_target", "--log_target", default="stdout", help="Accepted for compatibility."),
    Flag("log_caller", "--log_caller", help="Accepted for compatibility."),
    Flag(
        "log_stacktrace_level",
        "--log_stacktrace_level",
        default="default:none",
        help="Accepted for compatibility.",
    ),
)

ALL_FLAGS: tuple[Flag, ...] = ISTIO_FLAGS + ENV_ONLY + EXTENSIONS + LOG_FLAGS
# Every env variable meshnet reads, so tests can run with a clean environment.
ENV_NAMES: frozenset[str] = frozenset(
    name for flag in ALL_FLAGS for name in (flag.env, flag.alias_env) if name
)


def default(key: str) -> str:
    """The default of the flag or env option `key`."""
    return next(flag.default for flag in ALL_FLAGS if flag.key == key)
