"""The rules backends: the one choice between iptables-restore and nft, and the one decision both
engines make from what they find in the namespace.

`select(opts)` picks the backend and plans for it alone. The engines (`iptables_engine` for
iptables-restore, `nft_engine` for nft) assess the live state, then act on `decide()`:

- in sync: nothing to do (Istio's `residue && !delta`), unless --force-apply;
- nothing of ours in the namespace: apply;
- ours, but different: refuse (DriftError) unless --reconcile replaces it, or what is missing is
  the rest of an interrupted apply, which a re-run completes;
- --cleanup-only: remove what these flags install, without assessing.

--force-apply keeps Istio's meaning (`tools/istio-iptables/pkg/capture/run.go`
`executeCommands`: the apply step runs when `delta || ForceApply`): apply even though the rules
are already in place. It never replaces drifted rules; that is --reconcile's job.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, ClassVar, NamedTuple, Protocol

from meshnet.config.options import Options
from meshnet.errors import DriftError, MeshnetError

# The value types are NamedTuples and the backends plain classes, not frozen dataclasses: this
# module is on the init container's path, where each frozen dataclass costs ~0.5 ms to create
# at import and a NamedTuple ~0.07 ms (measured here).

if TYPE_CHECKING:
    from meshnet.explain import Explanation
    from meshnet.explain.probe import Probe
    from meshnet.plan.model import Ruleset
    from meshnet.plan.nftables import NftRuleset

__all__ = [
    "FORCED",
    "Action",
    "Assessment",
    "Backend",
    "Decision",
    "IptablesBackend",
    "NftablesBackend",
    "Request",
    "Steps",
    "Verification",
    "carry_out",
    "decide",
    "drift_message",
    "kind",
    "select",
]

FORCED = "--force-apply: applying over rules that are already in place"


class Assessment(NamedTuple):
    """What an engine found, compared with its plan: Istio's (residue, delta), and more."""

    residue: bool  # the namespace holds rules the check looks at
    delta: bool  # the live state differs from the plan (Istio's: also whenever no residue)
    ours_present: bool  # some of them are Istio's or meshnet's: a blind apply would clash
    drift: tuple[str, ...] = ()  # the differences, readable
    # Whole tables or families of the plan are missing and the rest is in place: what a run
    # killed between two table commits (or two families) leaves. A re-run completes it.
    interrupted: bool = False


class Action(enum.Enum):
    CLEAN = "clean"  # --cleanup-only: remove what these flags install
    NOOP = "no-op"  # the rules are in place
    APPLY = "apply"  # nothing of ours is there (or --force-apply over rules in place)
    RECONCILE = "reconcile"  # --reconcile: guardrails, remove the planned rules, apply
    COMPLETE = "complete"  # an interrupted apply: remove the planned rules, apply
    DRIFT = "drift"  # ours, but different: refuse


class Request(NamedTuple):
    """The flags that steer the decision."""

    cleanup_only: bool = False
    reconcile: bool = False
    force_apply: bool = False

    @classmethod
    def of(cls, opts: Options) -> Request:
        return cls(opts.cleanup_only, opts.reconcile, opts.force_apply)


class Decision(NamedTuple):
    action: Action
    forced: bool = False  # APPLY over rules already in place (--force-apply): warned about
    drift: tuple[str, ...] = ()  # for DRIFT's error and COMPLETE's log line


def decide(request: Request, assess: Callable[[], Assessment]) -> Decision:
    """The action for these flags and this state; `assess` is called unless --cleanup-only."""
    if request.cleanup_only:
        return Decision(Action.CLEAN)
    found = assess()
    if not found.delta and not request.force_apply:
        return Decision(Action.NOOP)
    if found.residue and found.delta:
        if request.reconcile:
            return Decision(Action.RECONCILE, drift=found.drift)
        if found.interrupted:
            return Decision(Action.COMPLETE, drift=found.drift)
        if found.ours_present:
            return Decision(Action.DRIFT, drift=found.drift)
    return Decision(Action.APPLY, forced=found.residue and not found.delta)


class Steps(NamedTuple):
    """What one engine does for each action of a decision."""

    noun: str  # how its messages name its rules: "iptables", "nftables"
    clean: Callable[[], None]
    keep: Callable[[], None]  # the rules are in place: only what lives beside them (routes)
    apply: Callable[[Decision], None]  # APPLY, RECONCILE or COMPLETE


def carry_out(decision: Decision, steps: Steps) -> None:
    """Both engines' answer to each action: the same logs, warnings and errors."""
    from meshnet import logs

    if decision.action is Action.CLEAN:
        steps.clean()
    elif decision.action is Action.NOOP:
        logs.get().info(f"{steps.noun} rules already in place; nothing to apply")
        steps.keep()
    elif decision.action is Action.DRIFT:
        raise DriftError(drift_message(steps.noun, decision.drift))
    else:
        if decision.forced:
            logs.get().warning(FORCED)
        if decision.action is Action.COMPLETE:
            missing = "; ".join(decision.drift[:3])
            logs.get().info("completing an interrupted apply", missing=missing)
        steps.apply(decision)


def drift_message(noun: str, drift: tuple[str, ...]) -> str:
    shown = "; ".join(drift[:5])
    more = f" (and {len(drift) - 5} more)" if len(drift) > 5 else ""
    return (
        f"existing {noun} rules differ from the plan: {shown}{more}. "
        "Re-run with --reconcile to replace them, or see `meshnet verify` for the full diff"
    )


class Verification(NamedTuple):
    differences: tuple[str, ...]  # live state vs plan, readable; empty when in sync
    used: Mapping[str, str]  # family -> the tool that read it ("iptables-nft", "nftables")


class Backend(Protocol):
    """One plan for one backend, in the current network namespace."""

    tools: ClassVar[tuple[str, ...]]  # the executables it needs on PATH (CNI STATUS)

    @property
    def warnings(self) -> tuple[str, ...]: ...

    def program(self) -> None:
        """istio-iptables without --dry-run: assess, then act on `decide()`."""

    def verify(self) -> Verification: ...

    def clean(self) -> None:
        """Remove what these flags install (--cleanup-only)."""

    def dry_run(self) -> str:
        """What --dry-run prints, in the chosen --output-format."""

    def explain(self, probe: Probe) -> Explanation: ...


def kind(
    *, native_nftables: bool, nft_output: bool = False
) -> type[IptablesBackend] | type[NftablesBackend]:
    """The one place that chooses: nft with --native-nftables, or for a dry run printing nft."""
    return NftablesBackend if native_nftables or nft_output else IptablesBackend


def select(opts: Options) -> Backend:
    """The backend for these options, with its plan (and only its own)."""
    nft_output = opts.dry_run and opts.output_format == "nft"
    return kind(native_nftables=opts.native_nftables, nft_output=nft_output).from_options(opts)


class IptablesBackend:
    """iptables-restore and ip6tables-restore (`iptables_engine`)."""

    tools: ClassVar[tuple[str, ...]] = ("iptables-restore", "iptables-save")
    __slots__ = ("opts", "ruleset")

    def __init__(self, opts: Options, ruleset: Ruleset) -> None:
        self.opts, self.ruleset = opts, ruleset

    @classmethod
    def from_options(cls, opts: Options) -> IptablesBackend:
        from meshnet.plan import iptables

        return cls(opts, iptables.ruleset(opts))

    @property
    def warnings(self) -> tuple[str, ...]:
        return self.ruleset.warnings

    def program(self) -> None:
        from meshnet.apply import iptables_engine

        iptables_engine.program(self.opts, self.ruleset)

    def verify(self) -> Verification:
        from meshnet.apply import iptables_engine

        lines, used = iptables_engine.verify(self.opts, self.ruleset)
        return Verification(tuple(lines), used)

    def clean(self) -> None:
        from meshnet.apply import iptables_engine

        iptables_engine.remove(self.opts, self.ruleset)

    def dry_run(self) -> str:
        from meshnet.render import restore, transcript

        if self.opts.output_format == "transcript":
            return transcript.render(self.ruleset, cleanup_only=self.opts.cleanup_only)
        if self.opts.output_format == "json":
            from meshnet.render import jsonout  # the json encoder only for this output

            return jsonout.render(self.ruleset)
        if self.opts.output_format == "dot":
            from meshnet.render import dot

            return dot.render(self.ruleset)
        return restore.render(self.ruleset)

    def explain(self, probe: Probe) -> Explanation:
        from meshnet import explain

        return explain.explain_iptables(self.ruleset, probe)


class NftablesBackend:
    """One `nft -f -` transaction on meshnet's inet tables (`nft_engine`)."""

    tools: ClassVar[tuple[str, ...]] = ("nft",)
    __slots__ = ("opts", "ruleset")

    def __init__(self, opts: Options, ruleset: NftRuleset) -> None:
        self.opts, self.ruleset = opts, ruleset

    @classmethod
    def from_options(cls, opts: Options) -> NftablesBackend:
        from meshnet.plan import nftables

        return cls(opts, nftables.ruleset(opts))

    @property
    def warnings(self) -> tuple[str, ...]:
        return self.ruleset.warnings

    def program(self) -> None:
        from meshnet.apply import nft_engine

        nft_engine.program(self.opts, self.ruleset)

    def verify(self) -> Verification:
        from meshnet.apply import nft_engine

        families = ("ipv4", "ipv6")[: 1 + self.ruleset.ipv6_enabled]
        lines = nft_engine.verify(self.opts, self.ruleset)
        return Verification(tuple(lines), {family: "nftables" for family in families})

    def clean(self) -> None:
        from meshnet.apply import nft_engine

        nft_engine.remove(self.opts)

    def dry_run(self) -> str:
        """Istio's nft mode ignores --dry-run (it applies); meshnet honours it."""
        if self.opts.output_format not in ("nft", "restore", "dot"):
            raise MeshnetError(
                f"--output-format {self.opts.output_format} is not available with "
                "--native-nftables (use nft)"
            )
        if self.opts.output_format == "dot":
            from meshnet.render import dot

            return dot.render_nft(self.ruleset)
        from meshnet.render import nft

        return nft.render(self.ruleset)

    def explain(self, probe: Probe) -> Explanation:
        from meshnet import explain

        return explain.explain_nft(self.ruleset, probe)
