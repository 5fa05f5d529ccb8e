"""TPROXY policy routing and the ::6 loopback address, via pyroute2.

Istio sets both up in ConfigureRoutes (`tools/common/tproxy/run_linux.go`).

Each call opens its own netlink socket in the calling thread's current network namespace (so
it acts inside `meshnet.host.netns.entered`) and closes it before returning. pyroute2 is imported
lazily: it costs ~70-350 ms and only TPROXY and IPv6 setups need it.

Differences from Istio, on purpose: an identical `ip rule` already present is not an error,
and removal functions exist so `clean` can undo what was added.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from meshnet.config.options import Options
from meshnet.errors import RouteError
from meshnet.host import netlink

__all__ = [
    "IPV6_INBOUND_ADDRESS",
    "PolicyRoute",
    "configure_tproxy",
    "differences_for",
    "ensure_ipv6_loopback",
    "find_tproxy_routes",
    "has_ipv6_loopback",
    "remove_ipv6_loopback",
    "remove_tproxy",
    "remove_tproxy_routes",
]

IPV6_INBOUND_ADDRESS = "::6"
"""Envoy's inbound passthrough source address for IPv6 (added to lo as ::6/128)."""

_FR_ACT_TO_TBL = 1
_ALL_ONES = 0xFFFFFFFF
_LINK_RETRIES = 5  # as Istio's LinkByNameWithRetries
_RTN_LOCAL = 2  # route type "local"
_RTM_GETRULE, _FIB_RULE_HDR_LEN, _FRA_FWMARK = 34, 12, 10
_DEFAULT_ROUTES: dict[int, str] = {socket.AF_INET: "0.0.0.0/0", socket.AF_INET6: "::/0"}


def configure_for(opts: Options) -> None:
    """Istio's ConfigureRoutes for these options: ::6 on lo with IPv6; TPROXY policy routing.

    All or nothing: on failure, what this call added is removed again.
    """
    added_loopback = opts.enable_ipv6 and ensure_ipv6_loopback()
    try:
        if _uses_tproxy_routes(opts):
            configure_tproxy(opts.tproxy_mark, opts.tproxy_route_table, opts.enable_ipv6)
    except RouteError:
        if added_loopback:
            remove_ipv6_loopback()
        raise


def remove_for(opts: Options) -> None:
    """Undo `configure_for` (meshnet's clean; Istio re-adds the routes instead)."""
    if _uses_tproxy_routes(opts):
        remove_tproxy(opts.tproxy_mark, opts.tproxy_route_table, opts.enable_ipv6)
    if opts.enable_ipv6:
        remove_ipv6_loopback()


def differences_for(opts: Options) -> list[str]:
    """What `configure_for` would add that is missing (empty: in place, or nothing to add).

    A run killed between its rules and its routes leaves rules without routes: this is what
    lets `verify` report that as drift rather than "in sync".
    """
    tproxy = _uses_tproxy_routes(opts)
    if not tproxy and not opts.enable_ipv6:
        return []  # pyroute2 is not imported when nothing can be missing
    lines: list[str] = []
    if opts.enable_ipv6 and not has_ipv6_loopback():
        lines.append(f"routes: missing address {IPV6_INBOUND_ADDRESS}/128 on lo")
    if not tproxy:
        return lines  # pyroute2 is not imported for the address alone
    with _iproute() as ipr:
        lo = _loopback_index(ipr)
        for family in _families(opts.enable_ipv6):
            name = "ipv4" if family == socket.AF_INET else "ipv6"
            mark, table = opts.tproxy_mark, opts.tproxy_route_table
            if not _matching_rules(ipr, family, mark, table):
                lines.append(f"routes: missing {name} rule fwmark {mark:#x} lookup {table}")
            if not _has_local_route(ipr, family, table, lo):
                lines.append(f"routes: missing {name} route local default dev lo table {table}")
    return lines


@dataclass(frozen=True, slots=True)
class PolicyRoute:
    """A TPROXY `ip rule` (`fwmark MARK lookup TABLE` at PRIORITY) whose table holds the
    `local default dev lo` route Istio's TPROXY setup adds (tools/common/tproxy/run_linux.go)."""

    family: int
    priority: int
    mark: int
    table: int


def find_tproxy_routes() -> tuple[PolicyRoute, ...]:
    """Every TPROXY policy route in either family, whatever its mark and table (for a complete
    removal when the flags that made them are not known)."""
    if not _has_fwmark_rule():
        return ()
    found: list[PolicyRoute] = []
    with _iproute() as ipr:
        lo = _loopback_index(ipr)
        for family in _families(True):
            found += _tproxy_routes(ipr, family, lo)
    return tuple(found)


def remove_tproxy_routes(found: Sequence[PolicyRoute]) -> None:
    """Remove the rules `find_tproxy_routes` saw, then their tables' local routes."""
    with _iproute() as ipr:
        lo = _loopback_index(ipr)
        for r in found:
            _delete_rule(ipr, r.family, r.mark, r.table, r.priority)
        for family, table in sorted({(r.family, r.table) for r in found}):
            _delete_local_route(ipr, family, table, lo)


def has_ipv6_loopback() -> bool:
    """::6/128 on lo, from procfs (the calling thread's namespace; no pyroute2 import)."""
    try:
        with open("/proc/thread-self/net/if_inet6", encoding="ascii") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return False  # IPv6 disabled: no address can be there
    six = "0" * 31 + "6"
    # Fields: address, ifindex, prefix length (hex), scope, flags, name.
    return any(f[0] == six and f[2] == "80" and f[-1] == "lo" for f in map(str.split, lines) if f)


def _has_fwmark_rule() -> bool:
    """Whether any policy rule of either family matches a fwmark, from a stdlib netlink dump:
    a CNI DEL runs for every pod, and most have none (pyroute2 costs ~150 ms to import)."""
    try:
        return any(_family_has_fwmark_rule(family) for family in _families(True))
    except OSError:
        return True  # no netlink socket: pyroute2 will report what is wrong


def _family_has_fwmark_rule(family: int) -> bool:
    try:
        rules = netlink.dump(_RTM_GETRULE, family, _FIB_RULE_HDR_LEN)
        return any(_FRA_FWMARK in netlink.attributes(p, _FIB_RULE_HDR_LEN) for p in rules)
    except netlink.NetlinkError:
        return False  # e.g. IPv6 disabled: no rules of that family


def _tproxy_routes(ipr: Any, family: int, lo: int) -> list[PolicyRoute]:
    try:
        rules = ipr.get_rules(family=family)
    except _netlink_errors() as err:
        if _code(err) == errno.EAFNOSUPPORT:
            return []  # IPv6 disabled in this namespace
        raise RouteError(f"failed to list netlink rules: {_describe(err)}") from None
    found = []
    for rule in rules:
        mark, table = rule.get("FRA_FWMARK"), rule.get("FRA_TABLE") or rule["table"]
        if mark is None or not _is_tproxy_rule(rule, mark, table):
            continue
        if _has_local_route(ipr, family, table, lo):
            found.append(PolicyRoute(family, int(rule.get("priority") or 0), mark, table))
    return found


def _uses_tproxy_routes(opts: Options) -> bool:
    # Istio: only with TPROXY and a non-empty inbound port list.
    return opts.tproxy and not opts.inbound_ports.empty


def configure_tproxy(mark: int, table: int, ipv6: bool) -> None:
    """`ip rule add fwmark MARK lookup TABLE` + `ip route add local default dev lo table TABLE`.

    Both per family (IPv4, and IPv6 when `ipv6`).

    Idempotent: an identical rule is kept as is, an existing route is ignored (Istio's EEXIST).
    All or nothing: on failure, the rules and routes this call added are removed again.
    """
    with _iproute() as ipr:
        lo = _loopback_index(ipr)
        rules: list[int] = []
        added_routes: list[int] = []
        try:
            for family in _families(ipv6):
                if not _matching_rules(ipr, family, mark, table):
                    _add_rule(ipr, family, mark, table)
                    rules.append(family)
            for family in _families(ipv6):
                if _add_local_route(ipr, family, table, lo):
                    added_routes.append(family)
        except RouteError:
            for family in added_routes:
                _delete_local_route(ipr, family, table, lo)
            for family in rules:
                for priority in _matching_rules(ipr, family, mark, table):
                    _delete_rule(ipr, family, mark, table, priority)
            raise


def remove_tproxy(mark: int, table: int, ipv6: bool) -> None:
    """Remove exactly what `configure_tproxy` adds; rules or routes already absent are fine."""
    with _iproute() as ipr:
        lo = _loopback_index(ipr)
        for family in _families(ipv6):
            for priority in _matching_rules(ipr, family, mark, table):
                _delete_rule(ipr, family, mark, table, priority)
        for family in _families(ipv6):
            _delete_local_route(ipr, family, table, lo)


def ensure_ipv6_loopback() -> bool:
    """Add ::6/128 to lo (`ip -6 addr add ::6/128 dev lo`); False when it was already there."""
    with _iproute() as ipr:
        lo = _loopback_index(ipr)
        try:
            ipr.addr("add", index=lo, address=IPV6_INBOUND_ADDRESS, prefixlen=128)
        except _netlink_errors() as err:
            if _code(err) == errno.EEXIST:
                return False
            raise RouteError(f"failed to add IPv6 inbound address: {_describe(err)}") from None
    return True


def remove_ipv6_loopback() -> bool:
    """Remove ::6/128 from lo; False when it was not there."""
    with _iproute() as ipr:
        lo = _loopback_index(ipr)
        try:
            ipr.addr("del", index=lo, address=IPV6_INBOUND_ADDRESS, prefixlen=128)
        except _netlink_errors() as err:
            if _code(err) in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ESRCH):
                return False
            raise RouteError(f"failed to remove IPv6 inbound address: {_describe(err)}") from None
    return True


@contextmanager
def _iproute() -> Iterator[Any]:
    from pyroute2 import IPRoute

    try:
        ipr = IPRoute()
    except OSError as err:
        raise RouteError(f"cannot open a netlink socket: {err.strerror}") from None
    try:
        yield ipr
    finally:
        ipr.close()


def _families(ipv6: bool) -> tuple[int, ...]:
    return (socket.AF_INET, socket.AF_INET6) if ipv6 else (socket.AF_INET,)


def _loopback_index(ipr: Any) -> int:
    from pyroute2.netlink.exceptions import NetlinkDumpInterrupted

    for _ in range(_LINK_RETRIES):
        try:
            found = ipr.link_lookup(ifname="lo")
        except NetlinkDumpInterrupted:
            continue  # the link table changed during the dump: ask again
        except _netlink_errors() as err:
            raise RouteError(f"failed to find 'lo' link: {_describe(err)}") from None
        if not found:
            raise RouteError("failed to find 'lo' link: link not found")
        return int(found[0])
    raise RouteError(f"failed to find 'lo' link: netlink dump interrupted {_LINK_RETRIES} times")


def _matching_rules(ipr: Any, family: int, mark: int, table: int) -> list[int]:
    """Priorities of rules identical to `fwmark MARK lookup TABLE` (no other selector)."""
    try:
        rules = ipr.get_rules(family=family)
    except _netlink_errors() as err:
        raise RouteError(f"failed to list netlink rules: {_describe(err)}") from None
    return [int(rule.get("priority") or 0) for rule in rules if _is_tproxy_rule(rule, mark, table)]


def _is_tproxy_rule(rule: Any, mark: int, table: int) -> bool:
    rule_table = rule.get("FRA_TABLE") or rule["table"]
    return (
        rule.get("FRA_FWMARK") == mark
        and rule.get("FRA_FWMASK") in (None, _ALL_ONES)
        and rule_table == table
        and rule["action"] == _FR_ACT_TO_TBL
        and rule["src_len"] == 0
        and rule["dst_len"] == 0
        and rule["flags"] == 0  # not inverted ("not fwmark ...")
        and rule.get("FRA_IIFNAME") is None
        and rule.get("FRA_OIFNAME") is None
    )


def _add_rule(ipr: Any, family: int, mark: int, table: int) -> None:
    try:
        # priority=None: let the kernel assign it as `ip rule add` and Istio do (pyroute2
        # would otherwise send 32000).
        ipr.rule("add", family=family, fwmark=mark, table=table, priority=None)
    except _netlink_errors() as err:
        if _code(err) == errno.EEXIST:  # added concurrently since we looked: same outcome
            return
        raise RouteError(f"failed to configure netlink rule: {_describe(err)}") from None


def _delete_rule(ipr: Any, family: int, mark: int, table: int, priority: int) -> None:
    try:
        ipr.rule("del", family=family, fwmark=mark, table=table, priority=priority)
    except _netlink_errors() as err:
        if _code(err) == errno.ENOENT:
            return
        raise RouteError(f"failed to remove netlink rule: {_describe(err)}") from None


def _route_spec(family: int, table: int, lo: int) -> dict[str, Any]:
    # scope host is required for a `local` route; the kernel also matches it on delete.
    return {
        "family": family,
        "dst": _DEFAULT_ROUTES[family],
        "type": "local",
        "scope": "host",
        "oif": lo,
        "table": table,
    }


def _add_local_route(ipr: Any, family: int, table: int, lo: int) -> bool:
    """Add the route; False when it was already there."""
    try:
        ipr.route("add", **_route_spec(family, table, lo))
    except _netlink_errors() as err:
        if _code(err) == errno.EEXIST:
            return False
        hint = " (is 'lo' up?)" if _code(err) == errno.ENETDOWN else ""
        raise RouteError(f"failed to add route: {_describe(err)}{hint}") from None
    return True


def _has_local_route(ipr: Any, family: int, table: int, lo: int) -> bool:
    try:
        found = ipr.get_routes(family=family, table=table)
    except _netlink_errors() as err:
        raise RouteError(f"failed to list routes: {_describe(err)}") from None
    return any(
        route.get("type") == _RTN_LOCAL
        and route.get("dst_len") == 0
        and route.get("RTA_OIF") == lo
        and (route.get("RTA_TABLE") or route.get("table")) == table
        for route in found
    )


def _delete_local_route(ipr: Any, family: int, table: int, lo: int) -> None:
    try:
        ipr.route("del", **_route_spec(family, table, lo))
    except _netlink_errors() as err:
        if _code(err) in (errno.ESRCH, errno.ENOENT):
            return
        raise RouteError(f"failed to remove route: {_describe(err)}") from None


def _netlink_errors() -> tuple[type[Exception], ...]:
    from pyroute2.netlink.exceptions import NetlinkError

    return (NetlinkError, OSError)


def _code(err: Exception) -> int | None:
    code = getattr(err, "code", None) or getattr(err, "errno", None)
    return code if isinstance(code, int) else None


def _describe(err: Exception) -> str:
    """The errno text the way Go (and so Istio) prints it: "file exists", "network is down"."""
    code = _code(err)
    if code is None:
        return str(err)
    text = os.strerror(code)
    return text[:1].lower() + text[1:]
