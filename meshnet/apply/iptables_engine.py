"""The engine: the only place that changes a system.

It runs in the current network namespace (the CLI enters `--network-namespace` first):
detect the iptables binaries, check the existing state, apply every family as one unit
(rolled back on any failure, including a read-back that does not match the plan), and
configure TPROXY routes. `clean` and `verify` work from the same plan.

Plans are compared with live state only after iptables itself has spelled them: the plan is
restored into a private, empty namespace and saved (`IptablesRunner.canonicalize`), because
iptables-save respells rules (`-m tcp` added, marks in hex, options reordered).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import cached_property

from meshnet import logs
from meshnet.apply import ipset, routes
from meshnet.apply.backend import Action, Assessment, Request, Steps, carry_out, decide
from meshnet.apply.iptables_tool import IptablesRunner, detect
from meshnet.config.options import Options
from meshnet.errors import BackendError, MeshnetError, NamespaceError, ReadBackError
from meshnet.host import netns, nslock
from meshnet.plan.cleanup import cleanup_commands
from meshnet.plan.model import TABLES, Family, IpSet, Rule, Ruleset
from meshnet.render.restore import restore_lines
from meshnet.state import iptables_save

GUARDRAILS = tuple(
    (chain, proto) for chain in ("INPUT", "FORWARD", "OUTPUT") for proto in ("tcp", "udp")
)


@dataclass(frozen=True)  # no slots: cached_property keeps the restore text built once
class FamilyPlan:
    """One family: its runner (None when ip6tables is unusable and IPv6 is off) and rules.

    What needs the tools (the plan canonicalised by iptables, the save before any change) is
    asked for by the methods that say so, and each is read once (`_read`).
    """

    family: Family
    runner: IptablesRunner | None
    rules: tuple[Rule, ...]
    sets: tuple[IpSet, ...] = ()
    _read: dict[str, iptables_save.State | str | None] = field(
        default_factory=dict, compare=False, repr=False
    )

    @cached_property
    def text(self) -> str:
        lines = restore_lines(self.rules)
        return "\n".join(lines) + "\n" if lines else ""

    def require_runner(self) -> IptablesRunner:
        if self.runner is None:
            raise BackendError(f"no usable {self.family} iptables binary")
        return self.runner

    def read_canonical(self) -> iptables_save.State | None:
        """The plan as iptables-save would print it once applied (iptables-restore and
        iptables-save in a private namespace, run once).

        None when no private namespace can be made: an init container has NET_ADMIN and
        NET_RAW but not the CAP_SYS_ADMIN that unshare needs. Comparisons then use Istio's
        method (rule counts and `iptables -C`), which cannot see the order of rules.
        """
        if "canonical" not in self._read:
            self._read["canonical"] = self._canonicalize()
        found = self._read["canonical"]
        return found if isinstance(found, iptables_save.State) else None

    def _canonicalize(self) -> iptables_save.State | None:
        if not self.rules:
            return iptables_save.parse_save("")
        prepare = (lambda: ipset.load(self.sets)) if self.sets else None
        try:
            return iptables_save.parse_save(self.require_runner().canonicalize(self.text, prepare))
        except NamespaceError as err:
            logs.get().debug("comparing with iptables -C instead", reason=str(err))
            return None

    def differences(self, current: iptables_save.State) -> list[str]:
        """Readable differences between the live state and this plan (empty: in sync)."""
        expected = self.read_canonical()
        if expected is not None:
            lines = iptables_save.diff_states(expected, current)
        else:
            lines = self._differences_by_checks(current)
        return lines + ipset.diff(self.sets)

    def structure_differences(self, current: iptables_save.State) -> list[str]:
        """Planned chains missing, ISTIO_* rule counts, and jumps missing from built-in chains."""
        lines = self._chain_differences(current)
        for table, chains in iptables_save.planned_state(self.rules).tables.items():
            for chain, rules in chains.items():
                if not chain.startswith("ISTIO"):
                    have = iptables_save.jump_targets(current.rules(table, chain))
                    missing = iptables_save.jump_targets(rules) - have
                    lines += [f"{table} {chain}: missing jump to {t}" for t in sorted(missing)]
        return lines

    def _chain_differences(self, current: iptables_save.State) -> list[str]:
        # The restore text's spelling: only chain names and rule counts are compared.
        planned = iptables_save.planned_state(self.rules)
        lines: list[str] = []
        for table, chains in planned.tables.items():
            for chain, rules in chains.items():
                have = current.chains(table).get(chain)
                if chain.startswith("ISTIO") and have is None:
                    lines.append(f"{table}: missing chain {chain}")
                elif chain.startswith("ISTIO_") and have is not None and len(have) != len(rules):
                    lines.append(f"{table} {chain}: {len(have)} rules, {len(rules)} planned")
        lines += [
            f"{table}: unexpected chain {chain}"
            for table, chain in current.istio_chains()
            if chain not in planned.chains(table)
        ]
        return lines

    def _differences_by_checks(self, current: iptables_save.State) -> list[str]:
        lines = self._chain_differences(current)
        runner = self.require_runner()
        for command in iptables_save.planned_checks(self.rules):
            if not runner.check(command):
                table, chain, rule = command[1], command[3], " ".join(command[4:])
                lines.append(f"{table} {chain}: missing rule: -A {chain} {rule}")
        return lines

    def read_initial_save(self) -> str | None:
        """The save output before meshnet changed anything (None: it cannot be read), read
        once. Detection has just saved this backend (its kernel probe leaves no rule behind),
        so that output is reused instead of running the save again.
        """
        if "initial" not in self._read:
            saved = self.runner.binary.saved if self.runner is not None else None
            self._read["initial"] = saved if saved is not None else self.read_save()
        found = self._read["initial"]
        return found if isinstance(found, str) else None

    def read_save(self) -> str | None:
        if self.runner is None:
            return None
        try:
            return self.runner.save()
        except BackendError:
            return None


def families(opts: Options, ruleset: Ruleset) -> list[FamilyPlan]:
    """Detect the binaries (Istio's DetectIptablesVersion); a v6 failure matters only with IPv6."""
    lockfile = (
        netns.resolve(opts.network_namespace) if opts.cni_mode and opts.network_namespace else None
    )
    v4 = IptablesRunner(
        detect(False, opts.force_iptables_binary, lockfile=lockfile), lockfile=lockfile
    )
    v6: IptablesRunner | None = None
    if ruleset.ipv6_enabled:
        # Istio also detects and saves ip6tables with IPv6 off, only to ignore what it finds
        # (residue in a family with nothing planned is ignored): meshnet skips that work.
        v6 = IptablesRunner(
            detect(True, opts.force_iptables_binary, lockfile=lockfile), lockfile=lockfile
        )
    logs.get().info(
        "iptables binaries", ipv4=v4.binary.binary, ipv6=v6.binary.binary if v6 else None
    )
    if ruleset.ipsets:
        ipset.require()
    return [
        FamilyPlan("ipv4", v4, ruleset.ipv4, ruleset.sets("ipv4")),
        FamilyPlan("ipv6", v6, ruleset.ipv6, ruleset.sets("ipv6")),
    ]


def assess(plans: list[FamilyPlan]) -> Assessment:
    """Istio's VerifyIptablesState, computed from one save per family (no `-C` processes)."""
    per_family: list[tuple[bool, bool, bool]] = []
    ours = False
    whole_tables_missing = True
    drift: list[str] = []
    for plan in plans:
        saved = plan.read_initial_save()
        current = iptables_save.parse_save(saved) if saved is not None else None
        if current is None or current.is_empty:
            per_family.append((False, bool(plan.rules), bool(plan.rules)))
            continue
        ours = ours or bool(current.istio_chains())
        lines = plan.differences(current)
        drift += [f"{plan.family} {line}" for line in lines]
        whole_tables_missing = whole_tables_missing and _only_whole_tables_missing(current, lines)
        # Istio never checks order: only missing rules, chains and ISTIO_* counts are a delta.
        delta = any("out of order" not in line for line in lines)
        per_family.append((True, delta, bool(plan.rules)))
    residue, delta = iptables_save.combine(per_family)
    interrupted = residue and delta and ours and whole_tables_missing
    return Assessment(residue, delta, ours, tuple(drift), interrupted)


def _only_whole_tables_missing(current: iptables_save.State, lines: list[str]) -> bool:
    """Every difference is something missing from a table that holds no ISTIO_* chain."""
    ours = {table for table, _ in current.istio_chains()}
    return all(
        ": missing " in line  # a rule or chain of a table; an ipset's missing member is drift
        and line.split()[0].rstrip(":") in TABLES
        and line.split()[0].rstrip(":") not in ours
        for line in lines
    )


def program(opts: Options, ruleset: Ruleset) -> None:
    """istio-iptables without --dry-run: check state, then apply, reconcile, or do nothing.

    One writer per namespace: the lock covers detection (its probe writes a rule), the state
    check, the apply, the routes and the read-back, so a concurrent run sees all of this run's
    changes or none, and a rollback only ever undoes this run's own changes.
    """
    with nslock.held():
        _program(opts, ruleset)


def _program(opts: Options, ruleset: Ruleset) -> None:
    plans = families(opts, ruleset)
    steps = Steps(
        "iptables",
        clean=lambda: clean(opts, plans),
        keep=lambda: routes.configure_for(opts),
        apply=lambda decision: _apply_all_or_nothing(opts, ruleset, plans, decision.action),
    )
    carry_out(decide(Request.of(opts), lambda: assess(plans)), steps)


def _apply_all_or_nothing(
    opts: Options, ruleset: Ruleset, plans: list[FamilyPlan], action: Action
) -> None:
    """Apply every family; on any failure put every table back as it was found.
    RECONCILE and COMPLETE remove the planned rules first; only RECONCILE puts up guardrails."""
    reconcile = action in (Action.RECONCILE, Action.COMPLETE)
    active = [p for p in plans if p.rules]
    snapshots = {p.family: p.read_initial_save() or "" for p in active}
    sets = [s for p in active for s in p.sets]
    had_sets = ipset.existing() if sets else set()
    try:
        ipset.load(sets)  # complete before any rule can match against them
        with _guardrails(active) if action is Action.RECONCILE else nullcontext():
            if reconcile:
                logs.get().info("reconciling: removing the drifted rules before applying")
                for plan in active:
                    _remove_planned(plan)
            for plan in active:
                plan.require_runner().restore(plan.text, {r.table for r in plan.rules})
                logs.get().info("applied rules", family=plan.family, rules=len(plan.rules))
            _read_back(active)
            routes.configure_for(opts)
    except MeshnetError:
        for plan in active:
            _roll_back(plan, snapshots[plan.family])
        ipset.destroy(s.name for s in sets if s.name not in had_sets)
        raise


def _read_back(plans: list[FamilyPlan]) -> None:
    """After a restore: every planned chain is there with its rule count, jumps included.

    iptables-restore commits each table whole, so what can go wrong is a missing table or chain
    (another writer, the wrong backend), not a misspelt rule: structure is checked, cheaply.
    """
    for plan in plans:
        lines = plan.structure_differences(iptables_save.parse_save(plan.read_save() or ""))
        lines += ipset.diff(plan.sets)
        if lines:
            shown = "; ".join(lines[:5])
            raise ReadBackError(f"{plan.family} rules read back differ from the plan: {shown}")


def _roll_back(plan: FamilyPlan, snapshot: str) -> None:
    """Restore the tables the snapshot holds; empty the planned tables it did not hold."""
    runner = plan.require_runner()
    held = {line[1:].strip() for line in snapshot.splitlines() if line.startswith("*")}
    planned = {rule.table for rule in plan.rules}
    empty = [f"*{table}\nCOMMIT\n" for table in sorted(planned - held)]
    try:
        runner.restore_replace(snapshot + "".join(empty))
    except BackendError as err:
        logs.get().error(
            "rollback failed; the namespace may hold partial rules",
            family=plan.family,
            error=str(err),
        )
        return
    logs.get().warning("rolled back", family=plan.family)


@contextmanager
def _guardrails(plans: list[FamilyPlan]) -> Iterator[None]:
    """Istio's reconcile guardrails: drop TCP/UDP in filter while rules are being replaced."""
    for plan in plans:
        runner = plan.require_runner()
        for chain, proto in GUARDRAILS:
            runner.run(("-t", "filter", "-D", chain, "-p", proto, "-j", "DROP"))  # stale ones
        for chain, proto in GUARDRAILS:
            added = runner.run(("-t", "filter", "-I", chain, "1", "-p", proto, "-j", "DROP"))
            if added.returncode != 0:
                raise BackendError(f"cannot insert guardrail in {chain}: {added.stderr.strip()}")
    try:
        yield
    finally:
        for plan in plans:
            for chain, proto in GUARDRAILS:
                plan.require_runner().run(("-t", "filter", "-D", chain, "-p", proto, "-j", "DROP"))


def _remove_planned(plan: FamilyPlan) -> None:
    """Istio's cleanup for one family: each command on its own, failures ignored."""
    runner = plan.require_runner()
    for command in cleanup_commands(plan.rules):
        runner.run(command)


def remove(opts: Options, ruleset: Ruleset) -> None:
    """--cleanup-only's removal on its own (one writer per namespace)."""
    with nslock.held():
        clean(opts, families(opts, ruleset))


def clean(opts: Options, plans: list[FamilyPlan]) -> None:
    """Remove what these flags install: rules (Istio's BuildCleanupV4/V6), TPROXY routes, ::6."""
    for plan in plans:
        if plan.rules and plan.runner is not None:
            _remove_planned(plan)
            logs.get().info("removed rules", family=plan.family)
    ipset.destroy(s.name for plan in plans for s in plan.sets)  # after the rules using them
    routes.remove_for(opts)


def verify(opts: Options, ruleset: Ruleset) -> tuple[list[str], dict[str, str]]:
    """Readable differences between the live state and everything an apply installs (rules of
    every family, TPROXY ip rules and routes, ::6), empty when equal; and the binary used
    per family."""
    with nslock.held():  # detection writes a probe rule; a running apply is waited for
        lines: list[str] = []
        plans = families(opts, ruleset)
        for plan in plans:
            if not plan.rules:
                continue
            current = iptables_save.parse_save(plan.read_initial_save() or "")
            lines += [f"{plan.family} {line}" for line in plan.differences(current)]
        backends: dict[str, str] = {
            p.family: p.runner.binary.binary for p in plans if p.runner is not None
        }
        return lines + routes.differences_for(opts), backends
