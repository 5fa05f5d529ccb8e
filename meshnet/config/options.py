"""Options: every knob of a run, parsed, validated and typed, with Istio's precedence rules.

`gather()` picks each raw value from the command line, the alias env variable, the primary env
variable or the default (in that order of precedence, as Istio's `pkg/flag/flag.go`). `build()`
validates the raw values (stricter than Istio, which validates almost nothing and ignores a
malformed env value) and adds the facts Istio's FillConfigFromEnvironment derives, asking a
`System` only for what the flags leave open.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from meshnet.config.facts import IPAddress, System, detect_ip, parse_resolv_conf
from meshnet.config.flags import ALL_FLAGS, DEFAULT_PROXY_ID, Flag
from meshnet.errors import EnvironmentFactError, OptionError, UsageError

OUTPUT_FORMATS = ("restore", "transcript", "json", "nft", "dot")
_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}
# A user or group name as shadow-utils accepts it (32 bytes); fullmatch, so no trailing newline.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,30}\$?")
# Bytes no value may hold: control characters end a restore line or an nft statement.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Interface names: what Linux dev_valid_name allows, narrowed to characters that neither
# iptables-restore nor nft reads as syntax (no quotes, `;`, `#`, braces, `\`, `*` which nft
# reads as a wildcard, `,` which separates items, no leading `-` or `!`). `+` is iptables'
# wildcard and means that only as the last character, where it stays allowed.
_INTERFACE = re.compile(r"[A-Za-z0-9_.@][A-Za-z0-9_.@-]{0,14}")
_LOG_LEVEL = re.compile(
    r"(?:[A-Za-z0-9_.-]+:)?(?:debug|info|warn|warning|error|fatal|none)"
    r"(?:,(?:[A-Za-z0-9_.-]+:)?(?:debug|info|warn|warning|error|fatal|none))*"
)
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
MAX_OWNER_GROUPS = 64
_Fail = Callable[[str], OptionError]  # builds the error for a problem text


@dataclass(frozen=True, slots=True)
class Raw:
    """One option's text and where it came from (for error messages)."""

    text: str
    origin: str
    explicit: bool = False  # set on the command line or in the environment
    from_cli: bool = False  # set on the command line (typed flags then fail like cobra's)


@dataclass(frozen=True, slots=True)
class Selection:
    """A comma list option that may also be '*' (all). Empty means none."""

    wildcard: bool
    items: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return not self.wildcard and not self.items


@dataclass(frozen=True, slots=True)
class Cidrs:
    """CIDRs split by family, text kept as Istio prints it (host bits kept, IPv6 canonical)."""

    wildcard: bool
    v4: tuple[str, ...]
    v6: tuple[str, ...]

    def has_loopback(self) -> bool:
        return any(ipaddress.ip_interface(c).ip.is_loopback for c in (*self.v4, *self.v6))


@dataclass(frozen=True, slots=True)
class Options:
    """A whole run's configuration. Nothing downstream reads env variables or files."""

    proxy_port: int
    inbound_capture_port: int
    inbound_tunnel_port: int
    proxy_uids: tuple[str, ...]
    proxy_gids: tuple[str, ...]
    inbound_interception_mode: str
    inbound_ports: Selection
    local_exclude_ports: tuple[int, ...]
    exclude_interfaces: tuple[str, ...]
    service_cidr: Cidrs
    service_exclude_cidr: Cidrs
    outbound_ports: tuple[int, ...]
    outbound_ports_exclude: tuple[int, ...]
    kube_virt_interfaces: tuple[str, ...]
    tproxy_mark: int
    tproxy_route_table: int
    dry_run: bool
    probe_port: int
    probe_timeout: float
    skip_rule_apply: bool
    run_validation: bool
    redirect_dns: bool
    drop_invalid: bool
    dual_stack: bool
    capture_all_dns: bool
    network_namespace: str
    cni_mode: bool
    reconcile: bool
    cleanup_only: bool
    force_apply: bool
    native_nftables: bool
    force_iptables_binary: str
    owner_groups_include: Selection
    owner_groups_exclude: tuple[str, ...]
    ipv4_loopback_cidr: str
    enable_ipv6: bool
    dns_servers_v4: tuple[str, ...]
    dns_servers_v6: tuple[str, ...]
    output_format: str
    log_format: str
    cidr_sets: bool
    log_level: str

    @property
    def tproxy(self) -> bool:
        """Only the exact string TPROXY switches mode; anything else is REDIRECT (Istio)."""
        return self.inbound_interception_mode == "TPROXY"


def invalid(item: Raw, problem: str) -> OptionError:
    """One line naming where the value came from, the value escaped (it may hold anything)."""
    return OptionError(f"invalid value {shown(item.text)} for {item.origin}: {problem}")


def shown(text: str) -> str:
    """A value for an error line: repr-escaped (no raw newline or control character survives),
    cut short so a huge value cannot flood the log."""
    return repr(text if len(text) <= 200 else text[:200] + "...")


def gather(cli: Mapping[str, str | None], environ: Mapping[str, str]) -> dict[str, Raw]:
    """Pick each option's raw text: command line > alias env > primary env > default."""
    raw: dict[str, Raw] = {}
    for flag in ALL_FLAGS:
        raw[flag.key] = _pick(flag, cli.get(flag.key), environ)
    return raw


def _pick(flag: Flag, given: str | None, environ: Mapping[str, str]) -> Raw:
    if given is not None:
        return Raw(given, flag.origin(), explicit=True, from_cli=True)
    for name in (flag.alias_env, flag.env):
        if name and name in environ:
            return Raw(environ[name], flag.origin(from_env=name), explicit=True)
    return Raw(flag.default, flag.origin())


def build(raw: Mapping[str, Raw], system: System) -> Options:
    """Validate every raw value and derive the facts Istio computes at run time."""
    for item in raw.values():
        if _CONTROL.search(item.text):
            raise invalid(item, "control characters (newline, NUL, ...) are not allowed")
    values = _Values(raw)
    uids = _proxy_uids(values, system)
    gid_text = raw["proxy_gid"].text or ",".join(uids)  # Istio: GID defaults to the UID *text*
    redirect_dns = values.boolean("redirect_dns")
    capture_all = values.boolean("capture_all_dns")
    dns_v4, dns_v6 = _dns_servers(values, system, redirect_dns and not capture_all)
    return Options(
        proxy_port=values.port("envoy_port"),
        inbound_capture_port=values.port("inbound_capture_port"),
        inbound_tunnel_port=values.port("inbound_tunnel_port"),
        proxy_uids=uids,
        proxy_gids=_ids(Raw(gid_text, raw["proxy_gid"].origin), system, user=False),
        inbound_interception_mode=raw["inbound_interception_mode"].text,
        inbound_ports=values.port_selection("inbound_ports"),
        local_exclude_ports=values.ports("local_exclude_ports"),
        exclude_interfaces=values.interfaces("exclude_interfaces"),
        service_cidr=values.cidrs("service_cidr"),
        service_exclude_cidr=values.cidrs("service_exclude_cidr", allow_wildcard=False),
        outbound_ports=values.ports("outbound_ports"),
        outbound_ports_exclude=values.ports("outbound_ports_exclude"),
        kube_virt_interfaces=values.interfaces("kube_virt_interfaces"),
        # Mark 0 is every unmarked packet: `ip rule fwmark 0 lookup T` would capture them all.
        tproxy_mark=values.number("tproxy_mark", 1, 2**32 - 1),
        tproxy_route_table=values.number("tproxy_route_table", 1, 2**32 - 1),
        dry_run=values.boolean("dry_run"),
        probe_port=values.uint16_port("probe_port"),
        probe_timeout=values.duration("probe_timeout"),
        skip_rule_apply=values.boolean("skip_rule_apply"),
        run_validation=values.boolean("run_validation"),
        redirect_dns=redirect_dns,
        drop_invalid=values.boolean("drop_invalid"),
        dual_stack=values.boolean("dual_stack"),
        capture_all_dns=capture_all,
        network_namespace=raw["network_namespace"].text,
        cni_mode=values.boolean("cni_mode"),
        reconcile=values.boolean("reconcile"),
        cleanup_only=values.boolean("cleanup_only"),
        force_apply=values.boolean("force_apply"),
        native_nftables=values.boolean("native_nftables"),
        force_iptables_binary=values.iptables_binary(),
        owner_groups_include=values.owner_groups_include(),
        owner_groups_exclude=values.group_names("owner_groups_exclude"),
        ipv4_loopback_cidr=values.loopback_cidr(),
        enable_ipv6=_enable_ipv6(values, system),
        dns_servers_v4=dns_v4,
        dns_servers_v6=dns_v6,
        output_format=values.choice("output_format", OUTPUT_FORMATS),
        log_format=_log_format(values),
        cidr_sets=values.boolean("cidr_sets"),
        log_level=values.log_level("log_output_level"),
    )


class _Values:
    """Typed readers over the raw map; each error names the flag or env variable and value."""

    def __init__(self, raw: Mapping[str, Raw]) -> None:
        self._raw = raw

    def fail(self, key: str, problem: str) -> OptionError:
        return invalid(self._raw[key], problem)

    def text(self, key: str) -> str:
        return self._raw[key].text

    def fail_typed(self, key: str, problem: str) -> OptionError:
        """A bad bool/uint16/duration: a usage error (exit 255) on the command line, as cobra."""
        error = self.fail(key, problem)
        return UsageError(str(error)) if self._raw[key].from_cli else error

    def boolean(self, key: str) -> bool:
        text = self.text(key)
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise self.fail_typed(key, "expected a boolean (true or false)")

    def uint16_port(self, key: str) -> int:
        text = self.text(key)
        if not (text.isascii() and text.isdigit()) or int(text) > 65535:
            raise self.fail_typed(key, "expected a number from 0 to 65535 (uint16)")
        return self.port(key)

    def number(self, key: str, low: int, high: int) -> int:
        text = self.text(key)
        if not text.isdigit() or not text.isascii() or not low <= int(text) <= high:
            raise self.fail(key, f"expected a decimal number from {low} to {high}")
        return int(text)

    def port(self, key: str) -> int:
        return _port(self.text(key), lambda problem: self.fail(key, problem))

    def ports(self, key: str) -> tuple[int, ...]:
        return tuple(_port(p, lambda m: self.fail(key, m)) for p in _split(self.text(key)))

    def port_selection(self, key: str) -> Selection:
        if self.text(key) == "*":
            return Selection(True, ())
        return Selection(False, tuple(str(p) for p in self.ports(key)))

    def interfaces(self, key: str) -> tuple[str, ...]:
        names = _split(self.text(key))
        for name in names:
            if not _valid_interface(name):
                raise self.fail(
                    key,
                    f"{name!r} is not a valid interface name (1-15 characters: letters, digits "
                    "and _.-@; a trailing + is a wildcard)",
                )
        return tuple(names)

    def log_level(self, key: str) -> str:
        text = self.text(key)
        if not _LOG_LEVEL.fullmatch(text):
            raise self.fail(key, "expected LEVEL or SCOPE:LEVEL[,...] (debug, info, warn, ...)")
        return text

    def cidrs(self, key: str, allow_wildcard: bool = True) -> Cidrs:
        text = self.text(key)
        if text == "*":
            if not allow_wildcard:
                raise self.fail(key, "invalid value for OUTBOUND_IP_RANGES_EXCLUDE ('*')")
            return Cidrs(True, (), ())
        v4: list[str] = []
        v6: list[str] = []
        for item in _split(text):
            canonical = _prefix(item, lambda m: self.fail(key, m))
            (v6 if ":" in canonical else v4).append(canonical)
        return Cidrs(False, tuple(v4), tuple(v6))

    def group_names(self, key: str) -> tuple[str, ...]:
        groups = _split(self.text(key))
        for group in groups:
            if not ((group.isascii() and group.isdigit()) or _NAME.fullmatch(group)):
                raise self.fail(key, f"{group!r} is not a group name or GID")
        return tuple(groups)

    def owner_groups_include(self) -> Selection:
        if self.text("owner_groups_include") == "*":
            return Selection(True, ())
        groups = self.group_names("owner_groups_include")
        if len(groups) > MAX_OWNER_GROUPS:
            raise self.fail(
                "owner_groups_include",
                "number of owner groups whose outgoing traffic should be redirected to Envoy "
                f"cannot exceed {MAX_OWNER_GROUPS}, got {len(groups)}",
            )
        return Selection(False, groups)

    def iptables_binary(self) -> str:
        text = self.text("force_iptables_binary")
        if text not in ("", "legacy", "nft"):
            raise self.fail(
                "force_iptables_binary",
                f"invalid FORCE_IPTABLES_BINARY value {text!r} (expected legacy or nft)",
            )
        return text

    def loopback_cidr(self) -> str:
        key = "ipv4_loopback_cidr"
        text = self.text(key)
        iface = _interface(text, lambda m: self.fail(key, f"failed to parse CIDR {text!r}: {m}"))
        if iface.version != 4 or not iface.ip.is_loopback:
            raise self.fail(
                key, f"expected valid IPv4 loopback address in CIDR {text}; found {iface.ip}"
            )
        bits = iface.network.prefixlen
        if not 8 <= bits <= 32:
            raise self.fail(
                key, f"expected CIDR {text} to have mask in range [8, 32]; found {bits}"
            )
        return f"{iface.ip}/{bits}"  # the input's spelling for any valid input, as Istio

    def duration(self, key: str) -> float:
        text = self.text(key)
        parts = _DURATION_PART.findall(text)
        if text in ("0",):
            return 0.0
        if not parts or "".join(n + u for n, u in parts) != text:
            raise self.fail_typed(key, "expected a Go duration such as 5s, 500ms or 1m30s")
        return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)

    def choice(self, key: str, allowed: tuple[str, ...]) -> str:
        text = self.text(key)
        if text not in allowed:
            raise self.fail(key, f"expected one of {', '.join(allowed)}")
        return text


def _split(text: str) -> list[str]:
    """Istio's split: on commas, empty elements dropped, no trimming."""
    return [item for item in text.split(",") if item]


def _port(text: str, fail: _Fail) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 65535:
        raise fail(f"{text!r} is not a port (expected 1-65535)")
    return int(text)


def _address(text: str, fail: _Fail) -> IPAddress:
    """An IP address, strictly: Python also accepts an IPv6 zone (`fe80::1%eth0`) whose text
    it keeps verbatim, newlines included; a zone means nothing in a firewall rule: refused."""
    if "%" in text:
        raise fail(f"{text!r} is not an IP address: zone/scope ids (%...) are not allowed")
    try:
        return ipaddress.ip_address(text)
    except ValueError as err:
        raise fail(f"{text!r} is not an IP address") from err


def address_text(address: IPAddress, dotted: bool) -> str:
    """An address's text, generated from the parsed value. `dotted`: an IPv6 address the user
    wrote with an embedded IPv4 part (`::127.0.0.53`) keeps that form, as Istio prints it."""
    if address.version == 4 or not dotted:
        return str(address)
    value = int(address)
    quad = str(ipaddress.IPv4Address(value & 0xFFFFFFFF))
    groups = [f"{(value >> (112 - 16 * i)) & 0xFFFF:x}" for i in range(6)]
    start, length = _longest_zero_run(groups)
    if length < 2:
        return ":".join(groups) + ":" + quad
    left, right = ":".join(groups[:start]), ":".join(groups[start + length :])
    return f"{left}::{right}:{quad}" if right else f"{left}::{quad}"


def _longest_zero_run(groups: list[str]) -> tuple[int, int]:
    best = (0, 0)
    run_start = None
    for index, group in enumerate([*groups, "end"]):
        if group == "0":
            run_start = index if run_start is None else run_start
            continue
        if run_start is not None and index - run_start > best[1]:
            best = (run_start, index - run_start)
        run_start = None
    return best


def _interface(text: str, fail: _Fail) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    """ADDRESS/BITS (netip.ParsePrefix): decimal bits without leading zeros, no netmask form."""
    address, slash, bits = text.partition("/")
    if not slash:
        raise fail("no '/' (expected ADDRESS/BITS, e.g. 10.0.0.0/8)")
    parsed = _address(address, fail)
    if (
        not (bits.isascii() and bits.isdigit())
        or int(bits) > parsed.max_prefixlen
        or (len(bits) > 1 and bits[0] == "0")
    ):
        raise fail(f"bad prefix length {bits!r}")
    return ipaddress.ip_interface((parsed, int(bits)))


def _prefix(text: str, fail: _Fail) -> str:
    """netip.ParsePrefix + String(): host bits kept, IPv6 canonical, text made from the value."""
    iface = _interface(text, lambda problem: fail(f"{text!r} is not a CIDR: {problem}"))
    return f"{iface.ip}/{iface.network.prefixlen}"


def _valid_interface(name: str) -> bool:
    """Linux dev_valid_name (1-15 bytes, no `/`, `:` or whitespace, not . or ..), narrowed to
    characters neither iptables-restore nor nft reads as syntax; `+` only as the last one."""
    body = name[:-1] if name.endswith("+") and len(name) > 1 else name
    return len(name) < 16 and name not in (".", "..") and bool(_INTERFACE.fullmatch(body))


def _proxy_uids(values: _Values, system: System) -> tuple[str, ...]:
    raw = values._raw["proxy_uid"]
    if raw.text:
        return _ids(raw, system, user=True)
    user = values.text("envoy_user") or "istio-proxy"
    uid = system.user_id(user)
    return (str(uid) if uid is not None else DEFAULT_PROXY_ID,)


def _ids(raw: Raw, system: System, *, user: bool) -> tuple[str, ...]:
    """UIDs or GIDs: numbers, or names that resolve (iptables resolves names too, later)."""
    ids = _split(raw.text)
    kind = "user" if user else "group"
    for item in ids:
        if item.isascii() and item.isdigit():
            if int(item) > 2**32 - 2:
                raise invalid(raw, f"{item} too large")
            continue
        if not _NAME.fullmatch(item):
            raise invalid(raw, f"{item!r} is not a {kind} name or ID")
        known = system.user_id(item) is not None if user else system.group_exists(item)
        if not known:
            raise invalid(raw, f"unknown {kind} {item!r}")
    return tuple(ids)


def _enable_ipv6(values: _Values, system: System) -> bool:
    text = values.text("enable_ipv6")
    if text == "auto":
        return detect_ip(system.interface_addresses(), values.boolean("dual_stack")).ipv6
    return values.boolean("enable_ipv6")


def _dns_servers(
    values: _Values, system: System, read_resolv: bool
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """--dns-servers as written (text made from each parsed address); else resolv.conf
    canonicalised, only when Istio would read it."""
    raw = values._raw["dns_servers"]
    if raw.explicit:
        fail = functools.partial(values.fail, "dns_servers")
        texts = [address_text(_address(t, fail), "." in t) for t in _split(raw.text)]
    elif read_resolv:
        try:
            text = system.read_text(values.text("resolv_conf"))
        except EnvironmentFactError as err:
            raise values.fail("resolv_conf", str(err)) from None
        found = parse_resolv_conf(text)
        texts = [str(addr) for addr in found]
    else:
        texts = []
    v4 = tuple(t for t in texts if ":" not in t)
    v6 = tuple(t for t in texts if ":" in t)
    return v4, v6


def _log_format(values: _Values) -> str:
    if values.boolean("log_as_json"):
        return "json"
    return values.choice("log_format", ("text", "json"))
