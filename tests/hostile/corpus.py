"""Hostile values: each one reproduced a way to rewrite a pod's firewall, read a node file, hang
a run or cut a pod off. Every case names the option it targets; the tests feed it through that
option's flag, its env variable and, where one maps to it, the pod annotation or field.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from meshnet.cni.plugin.pod import ANNOTATIONS, EXCLUDE_INBOUND, REROUTE
from meshnet.config.flags import ALL_FLAGS, Flag

# iptables-restore lines smuggled through an IPv6 scope id (Python keeps `%...` verbatim).
RESTORE_INJECTION = (
    "fe80::1%1\nCOMMIT\n*filter\n-I INPUT -j DROP\nCOMMIT\n*nat\n-A OUTPUT -m comment --comment x"
)


@dataclass(frozen=True)
class Case:
    name: str
    key: str  # the option (meshnet.config.flags key) the value is given to
    value: str
    extra: tuple[str, ...] = ()  # flags that make the option matter
    finding: int = 0  # the issue 10 finding it reproduces (0: an extra case)

    @property
    def flag(self) -> Flag:
        return next(f for f in ALL_FLAGS if f.key == self.key)


DNS = ("--redirect-dns",)
CASES: tuple[Case, ...] = (
    # 1. iptables-restore injection through a scope id.
    Case("scope-id-exclude", "service_exclude_cidr", RESTORE_INJECTION + "/128", finding=1),
    Case("scope-id-include", "service_cidr", RESTORE_INJECTION + "/128", finding=1),
    Case("scope-id-dns", "dns_servers", RESTORE_INJECTION, DNS, finding=1),
    Case("scope-id-plain", "service_exclude_cidr", "fe80::1%eth0/128", finding=1),
    # 2. nft command injection (include reads node files; monitor never ends).
    Case("nft-include-interface", "exclude_interfaces", ';include"ho*";', finding=2),
    Case(
        "nft-include-cidr", "service_exclude_cidr", 'fe80::1%1;include"hostname";#/128', finding=2
    ),
    Case("nft-monitor", "exclude_interfaces", "lo;monitor#", finding=2),
    Case("nft-include-virt", "kube_virt_interfaces", 'x;include"/etc/passwd"', finding=2),
    # 3. a quote in an interface name silently breaks the exclusion.
    Case("quote-interface", "exclude_interfaces", 'a"b', finding=3),
    Case("quote-virt", "kube_virt_interfaces", "a'b", finding=3),
    Case("negated-interface", "exclude_interfaces", "!=eth0", finding=3),
    # 4. a failed apply left injected rules: the DNS injection with a v6 restore.
    Case(
        "rollback-dns", "dns_servers", RESTORE_INJECTION, (*DNS, "--enable-ipv6", "true"), finding=4
    ),
    # 5. TPROXY mark 0 matches every packet.
    Case("tproxy-mark-zero", "tproxy_mark", "0", ("-m", "TPROXY"), finding=5),
    # 6. values that passed validation and failed late, or not at all.
    Case("group-newline", "owner_groups_exclude", "root\n", finding=6),
    Case("resolv-dev-zero", "resolv_conf", "/dev/zero", DNS, finding=6),
    Case("resolv-directory", "resolv_conf", "/etc", DNS, finding=6),
    Case("log-level-newline", "log_output_level", "x\ny:z", finding=6),
    Case("log-level-unknown", "log_output_level", "x:z", finding=6),
    # Extra: other strings that reach rule text.
    Case("uid-newline", "proxy_uid", "1337\n"),
    Case("gid-name-nul", "proxy_gid", "root\x00"),
    Case("interface-nul", "exclude_interfaces", "eth0\x00;include"),
    Case("port-injection", "inbound_ports", "80\n-A INPUT -j DROP"),
    Case("loopback-cidr-zone", "ipv4_loopback_cidr", "127.0.0.1%1/32"),
    Case("owner-groups-space", "owner_groups_include", "root -j DROP"),
)

# Where an annotation (or pod field) sets an option in CNI mode.
ANNOTATION_OF = {key: annotation for annotation, (key, _default) in ANNOTATIONS.items()}
ANNOTATION_OF["local_exclude_ports"] = EXCLUDE_INBOUND
ANNOTATION_OF["kube_virt_interfaces"] = REROUTE[0]
BASE = {  # a standard run; a case's own option is left out so its env variable applies
    "proxy_uid": ("-u", "1337"),
    "inbound_ports": ("-b", "*"),
    "enable_ipv6": ("--enable-ipv6", "true"),
}


def _base(case: Case) -> list[str]:
    return [arg for key, args in BASE.items() if key != case.key for arg in args]


def cli_args(case: Case) -> list[str] | None:
    """The case through the option's command-line flag (None: the option has no flag)."""
    if case.flag.long is None:
        return None
    return [*_base(case), *case.extra, f"{case.flag.long}={case.value}"]


def env_args(case: Case) -> tuple[list[str], dict[str, str]] | None:
    """The case through the option's env variable (None: it has none)."""
    name = case.flag.alias_env or case.flag.env
    if name is None:
        return None
    return [*_base(case), *case.extra], {name: case.value}


def annotation_cases() -> Iterator[tuple[Case, str]]:
    """(case, annotation) for every case whose option a pod annotation sets."""
    for case in CASES:
        annotation = ANNOTATION_OF.get(case.key)
        if annotation is not None:
            yield case, annotation
