"""The complete sweep: remove everything meshnet or Istio installed in a network namespace.

`meshnet clean` and CNI DEL use it: the flags of an init container that ran weeks ago (or of a
pod that is gone) are not known, so nothing here depends on them. Everything is read from the
live state of the calling thread's namespace:

- iptables, both families, both variants (legacy and nft): every jump into an `ISTIO_*`
  chain, every `ISTIO_*` chain, and the few rules Istio puts straight into built-in chains
  (TPROXY marks, excluded interfaces), as Istio's BuildCleanupFromState
  (cni/pkg/iptables/iptables.go) extended to those rules; one restore per variant and family,
  so each is atomic;
- meshnet's nftables tables (inet `istio-proxy-nat`, `-mangle`, `-raw`);
- meshnet's ipsets (--cidr-sets);
- TPROXY policy routing: every `fwmark X lookup T` rule whose table T holds the
  `local default dev lo` route (tools/common/tproxy/run_linux.go), and that route;
- the `::6/128` address on lo.

Rules of other owners are never touched: only lines this module recognises are deleted, and
iptables-restore `--noflush` leaves every other rule byte-identical.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from meshnet import logs
from meshnet.apply import ipset, routes
from meshnet.apply.iptables_tool import IptablesRunner, describe
from meshnet.errors import RouteError
from meshnet.host import nslock, proc
from meshnet.plan.steps import set_name

_SAVE_TIMEOUT = 30.0
_NS_GET_NSTYPE = 0xB703  # ioctl(2) on a namespace file: its CLONE_NEW* type
_CLONE_NEWNET = 0x40000000
_IPSETS = tuple(set_name(kind, fam) for kind in ("include", "exclude") for fam in ("ipv4", "ipv6"))
_FAMILY_FLAG: dict[int, str] = {socket.AF_INET: "-4", socket.AF_INET6: "-6"}

# Rules Istio appends to built-in chains without jumping to an ISTIO_* chain, as iptables-save
# spells them (both variants print them alike). Removed only from a save that also holds
# ISTIO_* chains, so an identical rule in a namespace Istio never touched stays.
_BUILTIN_RULES: dict[tuple[str, str], tuple[re.Pattern[str], ...]] = {
    ("mangle", "PREROUTING"): (
        re.compile(
            r"-p tcp -m mark --mark \S+ -j CONNMARK --save-mark "
            r"--nfmask 0xffffffff --ctmask 0xffffffff"
        ),
        re.compile(r"-i \S+ -j RETURN"),  # -c, TPROXY mode
    ),
    ("mangle", "OUTPUT"): (
        re.compile(r"-o lo -p tcp -m mark --mark \S+ -j RETURN"),
        re.compile(
            r"! -d \S+ -o lo -p tcp -m owner --(uid|gid)-owner \S+ "
            r"-j MARK --set-xmark 0x53a/0xffffffff"  # constants.OutboundMark 1338
        ),
        re.compile(
            r"-p tcp -m connmark --mark \S+ -j CONNMARK --restore-mark "
            r"--nfmask 0xffffffff --ctmask 0xffffffff"
        ),
        re.compile(r"-o \S+ -j RETURN"),  # -c, TPROXY mode
    ),
    ("nat", "PREROUTING"): (re.compile(r"-i \S+ -j RETURN"),),  # -c and -k
    ("nat", "OUTPUT"): (re.compile(r"-o \S+ -j RETURN"),),  # -c
}


@dataclass(frozen=True, slots=True)
class IptablesRemoval:
    """One variant and family: the restore text that deletes what Istio left in it."""

    tool: str  # "iptables-nft", "ip6tables-legacy", ...
    text: str
    chains: tuple[str, ...]  # the ISTIO_* chains it deletes, "table/chain"


@dataclass(frozen=True, slots=True)
class Removal:
    """Everything one sweep removes, as read from the namespace."""

    iptables: tuple[IptablesRemoval, ...] = ()
    nft_tables: tuple[str, ...] = ()
    ipsets: tuple[str, ...] = ()
    policy_routes: tuple[routes.PolicyRoute, ...] = ()
    loopback_v6: bool = False

    @property
    def empty(self) -> bool:
        return not (
            self.iptables
            or self.nft_tables
            or self.ipsets
            or self.policy_routes
            or self.loopback_v6
        )

    def render(self) -> str:
        """The removal as the commands that would do it (what `clean --dry-run` prints)."""
        if self.empty:
            return "# nothing to remove: no rules, tables, routes or addresses of Istio here\n"
        out: list[str] = []
        for part in self.iptables:
            out += [f"# {part.tool}-restore --noflush", part.text.rstrip("\n")]
        if self.nft_tables:
            out += ["# nft -f -", *(f"delete table inet {t}" for t in self.nft_tables)]
        if self.ipsets:
            out += ["# ipset", *(f"ipset destroy {name}" for name in self.ipsets)]
        if self.policy_routes or self.loopback_v6:
            out.append("# ip")
        for r in self.policy_routes:
            flag = _FAMILY_FLAG[r.family]
            out.append(
                f"ip {flag} rule del priority {r.priority} fwmark {r.mark:#x} lookup {r.table}"
            )
            out.append(f"ip {flag} route del local default dev lo table {r.table}")
        if self.loopback_v6:
            out.append(f"ip -6 addr del {routes.IPV6_INBOUND_ADDRESS}/128 dev lo")
        return "\n".join(out) + "\n"


def is_network_namespace(path: str) -> bool:
    """Whether `path` is a network namespace file (False: missing, or anything else)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, _NS_GET_NSTYPE) == _CLONE_NEWNET
    except OSError:
        return False  # ENOTTY: a regular file or directory, not a namespace
    finally:
        os.close(fd)


def find() -> Removal:
    """Read what Istio or meshnet left in the current namespace (changes nothing)."""
    return Removal(
        iptables=tuple(_find_iptables()),
        nft_tables=_find_nft_tables(),
        ipsets=_find_ipsets(),
        policy_routes=_find_policy_routes(),
        loopback_v6=routes.has_ipv6_loopback(),
    )


def remove(removal: Removal, *, lockfile: str | None = None) -> None:
    """Remove what `find` saw, in dependency order: rules, then the sets they match, then
    routing. `lockfile` is the pod's netns path in CNI mode (a pod-scoped xtables lock)."""
    log = logs.get()
    for part in removal.iptables:
        IptablesRunner(describe(part.tool), lockfile=lockfile).restore(part.text)
        log.info("removed Istio's iptables rules", backend=part.tool, chains=list(part.chains))
    if removal.nft_tables:
        from meshnet.apply.nft_tool import Nft

        Nft().apply("".join(f"delete table inet {t}\n" for t in removal.nft_tables))
        log.info("removed nftables tables", tables=list(removal.nft_tables))
    if removal.ipsets:
        ipset.destroy(removal.ipsets)
        log.info("removed ipsets", sets=list(removal.ipsets))
    _remove_routing(removal)


def sweep(*, lockfile: str | None = None) -> Removal:
    """Find and remove everything, as the namespace's one writer; returns what was removed."""
    with nslock.held():  # a running apply finishes first
        removal = find()
        if removal.empty:
            logs.get().info("nothing of Istio's to remove")
        else:
            remove(removal, lockfile=lockfile)
        return removal


# --------------------------------------------------------------------------- iptables


def _find_iptables() -> Iterable[IptablesRemoval]:
    for prefix in ("iptables", "ip6tables"):
        for variant in ("legacy", "nft"):
            tool = f"{prefix}-{variant}"
            if proc.which(f"{tool}-save") is None:
                continue
            # The save tools only: no detection probe (DEL runs for every pod, often many at
            # once, and a legacy probe would leave an empty nat table behind).
            dump = proc.run([f"{tool}-save"], timeout=_SAVE_TIMEOUT)
            if dump.returncode != 0:
                continue
            text, chains = removal_text(dump.stdout)
            if text:
                yield IptablesRemoval(tool, text, tuple(chains))


def removal_text(save: str) -> tuple[str, list[str]]:
    """Restore input deleting Istio's rules in built-in chains, then flushing and deleting the
    ISTIO_* chains; and the chains deleted ("table/chain"). Empty when there is nothing: a
    save without ISTIO_* chains was never touched by Istio, whatever its rules look like."""
    if ":ISTIO_" not in save:
        return "", []
    out: list[str] = []
    deleted: list[str] = []
    table = ""
    deletes: list[str] = []
    chains: list[str] = []
    for line in [*save.splitlines(), "*"]:
        if line.startswith("*"):
            if chains or deletes:
                out += [f"*{table}", *deletes]
                out += [f"-F {c}" for c in chains] + [f"-X {c}" for c in chains] + ["COMMIT"]
                deleted += [f"{table}/{c}" for c in chains]
            table, deletes, chains = line[1:].strip(), [], []
        elif line.startswith(":ISTIO_"):
            chains.append(line[1:].split()[0])
        elif line.startswith("-A ") and _is_istio_builtin_rule(table, line):
            deletes.append("-D " + line[3:])
    return ("\n".join(out) + "\n" if out else ""), deleted


def _is_istio_builtin_rule(table: str, line: str) -> bool:
    chain, _, spec = line[3:].partition(" ")
    if chain.startswith("ISTIO_"):
        return False  # flushed with its chain
    tokens = spec.split()
    if "-j" in tokens[:-1] and tokens[tokens.index("-j") + 1].startswith("ISTIO_"):
        return True
    return any(p.fullmatch(spec) for p in _BUILTIN_RULES.get((table, chain), ()))


# --------------------------------------------------------------------------- nft, ipset


def _find_nft_tables() -> tuple[str, ...]:
    if proc.which("nft") is None:
        return ()
    listed = proc.run(["nft", "list", "tables", "inet"], timeout=_SAVE_TIMEOUT)
    if listed.returncode != 0:
        logs.get().warning("cannot list nftables tables", error=proc.stderr_summary(listed))
        return ()
    present = {line.split()[-1] for line in listed.stdout.splitlines() if line.startswith("table")}
    if not any(name.startswith("istio-proxy-") for name in present):
        return ()
    from meshnet.plan.nftables import TABLES  # only now: it costs ~15 ms to import

    return tuple(t for t in TABLES if t in present)


def _find_ipsets() -> tuple[str, ...]:
    if proc.which("ipset") is None:
        return ()
    listed = proc.run(["ipset", "list", "-n"], timeout=_SAVE_TIMEOUT)
    present = set(listed.stdout.split()) if listed.returncode == 0 else set()
    return tuple(name for name in _IPSETS if name in present)


# --------------------------------------------------------------------------- routing


def _find_policy_routes() -> tuple[routes.PolicyRoute, ...]:
    try:
        return routes.find_tproxy_routes()
    except RouteError as err:
        logs.get().warning("cannot read the policy routing rules", error=str(err))
        return ()


def _remove_routing(removal: Removal) -> None:
    if removal.policy_routes:
        routes.remove_tproxy_routes(removal.policy_routes)
        logs.get().info(
            "removed TPROXY policy routing",
            rules=[f"fwmark {r.mark:#x} lookup {r.table}" for r in removal.policy_routes],
        )
    if removal.loopback_v6:
        routes.remove_ipv6_loopback()
