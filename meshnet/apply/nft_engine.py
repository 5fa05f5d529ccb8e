"""The engine for --native-nftables: the same decisions as `iptables_engine`, on three inet tables.

A transaction replaces meshnet's tables atomically, so there is no rollback of half-applied
rules to do: nft applies all of it or none of it. Live tables are compared with the plan after
nft itself has printed both (`nft list table`), the plan having been applied in a private,
empty namespace, so spelling never causes false drift.
"""

from __future__ import annotations

from collections.abc import Mapping

from meshnet import logs
from meshnet.apply import routes
from meshnet.apply.backend import Assessment, Request, Steps, carry_out, decide
from meshnet.apply.nft_tool import Nft
from meshnet.config.options import Options
from meshnet.errors import MeshnetError, NamespaceError, ReadBackError
from meshnet.host import netns, nslock
from meshnet.plan.nftables import TABLES, NftRuleset
from meshnet.render import nft as render
from meshnet.state import nft_listing
from meshnet.state.nft_listing import Listing


def program(opts: Options, ruleset: NftRuleset) -> None:
    """Apply, reconcile, or do nothing; clean with --cleanup-only (one writer per namespace:
    the lock is held from the state check to the routes and the read-back)."""
    with nslock.held():
        _program(opts, ruleset)


def _program(opts: Options, ruleset: NftRuleset) -> None:
    nft = Nft(cni_mode=opts.cni_mode)
    nft.require()
    steps = Steps(
        "nftables",
        clean=lambda: clean(opts, nft),
        keep=lambda: routes.configure_for(opts),
        # A transaction replaces the tables: reconciling is applying.
        apply=lambda _decision: _apply(opts, nft, ruleset),
    )
    carry_out(decide(Request.of(opts), lambda: assess(ruleset, _live(nft))), steps)


def assess(ruleset: NftRuleset, live: dict[str, Listing | None]) -> Assessment:
    """Only meshnet's own tables are read, so any residue is ours."""
    drift = compare(ruleset, live)
    present = any(live.values())
    return Assessment(residue=present, delta=bool(drift), ours_present=present, drift=tuple(drift))


def _apply(opts: Options, nft: Nft, ruleset: NftRuleset) -> None:
    previous = {table: nft.list_table(table) for table in TABLES}
    live = {table: nft_listing.parse(listing) for table, listing in previous.items()}
    nft.apply(_replacing(live) + render.render(ruleset))
    try:
        drift = compare(ruleset, _live(nft))
        if drift:
            raise ReadBackError(
                "nftables rules read back differ from the plan: " + "; ".join(drift[:5])
            )
        routes.configure_for(opts)
    except MeshnetError:
        nft.apply(_replacing(_live(nft)) + "".join(t for t in previous.values() if t))
        logs.get().warning("rolled back the nftables tables")
        raise
    logs.get().info("applied nftables rules", tables=[t.name for t in ruleset.tables])


def _replacing(live: Mapping[str, object]) -> str:
    """Delete meshnet's existing tables first (Istio's add+flush keeps stale empty chains)."""
    return "".join(f"add table inet {t}\ndelete table inet {t}\n" for t, v in live.items() if v)


def remove(opts: Options) -> None:
    """--cleanup-only's removal on its own (one writer per namespace)."""
    nft = Nft(cni_mode=opts.cni_mode)
    nft.require()
    with nslock.held():
        clean(opts, nft)


def clean(opts: Options, nft: Nft) -> None:
    """Delete meshnet's three tables (nothing else), then the routes meshnet added."""
    remove_tables(nft)
    routes.remove_for(opts)


def remove_tables(nft: Nft) -> None:
    with nslock.held():
        _remove_tables(nft)


def _remove_tables(nft: Nft) -> None:
    present = {table: listing for table, listing in _live(nft).items() if listing is not None}
    if present:
        nft.apply(_replacing(present))
        logs.get().info("removed nftables tables", tables=sorted(present))


def verify(opts: Options, ruleset: NftRuleset) -> list[str]:
    """Differences in the tables, the TPROXY ip rules and routes and ::6 (empty: in sync)."""
    nft = Nft(cni_mode=opts.cni_mode)
    nft.require()
    with nslock.held():  # a running apply is waited for, not seen half done
        return compare(ruleset, _live(nft)) + routes.differences_for(opts)


def compare(ruleset: NftRuleset, live: dict[str, Listing | None]) -> list[str]:
    """Differences between live tables and the plan (empty: in sync)."""
    try:
        return nft_listing.diff(_expected(ruleset), live)
    except NamespaceError as err:
        # No CAP_SYS_ADMIN (an init container): compare chains, sets and rule counts.
        logs.get().debug("comparing nftables rule counts instead", reason=str(err))
        return nft_listing.diff_counts(ruleset, live)


def _live(nft: Nft) -> dict[str, Listing | None]:
    return {table: nft_listing.parse(nft.list_table(table)) for table in TABLES}


def _expected(ruleset: NftRuleset) -> dict[str, Listing | None]:
    """The plan as nft prints it, from a private namespace that is gone afterwards."""

    def apply_and_list() -> dict[str, Listing | None]:
        nft = Nft()
        nft.apply(render.render(ruleset))
        return _live(nft)

    return netns.run_isolated(apply_and_list)
