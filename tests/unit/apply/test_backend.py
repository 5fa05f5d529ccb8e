"""The backend choice and the one decision both engines make, without root: the engines run
against fakes of what they read and write (no iptables, nft or namespace is touched)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from meshnet.apply import backend, iptables_engine, nft_engine
from meshnet.apply.backend import Action, Assessment, Decision, Request, decide
from meshnet.config import options
from meshnet.config.options import Options
from meshnet.errors import BackendError, DriftError, ReadBackError
from tests.support import STANDARD_ARGS, meshnet
from tests.support.cli import STANDARD_FLAGS
from tests.support.fakes import FakeSystem

DRIFT = ("ipv4 nat ISTIO_OUTPUT: 4 rules, 5 planned",)
IN_SYNC = Assessment(residue=True, delta=False, ours_present=True)
FRESH = Assessment(residue=False, delta=True, ours_present=False)
FOREIGN = Assessment(residue=True, delta=True, ours_present=False)
DRIFTED = Assessment(residue=True, delta=True, ours_present=True, drift=DRIFT)
INTERRUPTED = Assessment(residue=True, delta=True, ours_present=True, drift=DRIFT, interrupted=True)
NOTHING = Assessment(residue=False, delta=False, ours_present=False)  # nft: no plan, no tables
STANDARD = {**STANDARD_FLAGS, "enable_ipv6": "false"}
DNS_WARNING = "REDIRECT_DNS is set, but CAPTURE_ALL_DNS is false"


def found(assessment: Assessment) -> Callable[[], Assessment]:
    return lambda: assessment


def opts(*extra: str, **given: str) -> Options:
    """Istio's standard sidecar flags, IPv6 off, plus `extra` bool flags and `given` values."""
    bools = {name.removeprefix("--").replace("-", "_"): "true" for name in extra}
    return options.build(options.gather({**STANDARD, **given, **bools}, {}), FakeSystem())


# --------------------------------------------------------------------------- decide()


@pytest.mark.parametrize(
    ("request_", "assessment", "expected"),
    [
        (Request(), IN_SYNC, Decision(Action.NOOP)),
        (Request(), FRESH, Decision(Action.APPLY)),
        (Request(), FOREIGN, Decision(Action.APPLY)),
        (Request(), DRIFTED, Decision(Action.DRIFT, drift=DRIFT)),
        (Request(), INTERRUPTED, Decision(Action.COMPLETE, drift=DRIFT)),
        (Request(), NOTHING, Decision(Action.NOOP)),
        (Request(reconcile=True), DRIFTED, Decision(Action.RECONCILE, drift=DRIFT)),
        (Request(reconcile=True), INTERRUPTED, Decision(Action.RECONCILE, drift=DRIFT)),
        (Request(reconcile=True), FOREIGN, Decision(Action.RECONCILE)),
        (Request(reconcile=True), FRESH, Decision(Action.APPLY)),
        (Request(reconcile=True), IN_SYNC, Decision(Action.NOOP)),
        (Request(force_apply=True), IN_SYNC, Decision(Action.APPLY, forced=True)),
        (Request(force_apply=True), FRESH, Decision(Action.APPLY)),
        (Request(force_apply=True), NOTHING, Decision(Action.APPLY)),
        (Request(force_apply=True), DRIFTED, Decision(Action.DRIFT, drift=DRIFT)),
        (
            Request(force_apply=True, reconcile=True),
            DRIFTED,
            Decision(Action.RECONCILE, drift=DRIFT),
        ),
    ],
)
def test_decide(request_: Request, assessment: Assessment, expected: Decision) -> None:
    assert decide(request_, found(assessment)) == expected


def test_cleanup_only_cleans_without_assessing() -> None:
    def not_called() -> Assessment:
        raise AssertionError("--cleanup-only assessed the namespace")

    for request_ in (Request(cleanup_only=True), Request(True, reconcile=True, force_apply=True)):
        assert decide(request_, not_called) == Decision(Action.CLEAN)


def test_request_reads_the_three_flags() -> None:
    assert Request.of(opts()) == Request()
    assert Request.of(opts("--reconcile", "--force-apply")) == Request(False, True, True)
    assert Request.of(opts("--cleanup-only")) == Request(cleanup_only=True)


# --------------------------------------------------------------------------- select()


def test_select_plans_for_the_chosen_backend_only() -> None:
    assert isinstance(backend.select(opts()), backend.IptablesBackend)
    assert isinstance(backend.select(opts("--native-nftables")), backend.NftablesBackend)
    dry_nft = opts("--dry-run", output_format="nft")
    assert isinstance(backend.select(dry_nft), backend.NftablesBackend)


def test_each_backend_names_the_tools_it_needs() -> None:
    assert backend.kind(native_nftables=False).tools == ("iptables-restore", "iptables-save")
    assert backend.kind(native_nftables=True).tools == ("nft",)


def test_dry_run_prints_the_chosen_backends_rules() -> None:
    assert "-A ISTIO_OUTPUT" in backend.select(opts("--dry-run")).dry_run()
    nft_text = backend.select(opts("--dry-run", "--native-nftables")).dry_run()
    assert nft_text.startswith("add table inet istio-proxy-nat")


# --------------------------------------------------------------------------- the two engines


class FakeNft:
    """meshnet's three tables as `nft list table` prints them; `apply` records transactions."""

    listing = "table inet {table} {{\n\tchain output {{\n\t\tcounter\n\t}}\n}}\n"
    last: FakeNft

    def __init__(self, *, cni_mode: bool = False) -> None:
        self.applied: list[str] = []
        FakeNft.last = self

    def require(self) -> tuple[int, ...]:
        return (1, 0, 9)

    def list_table(self, table: str) -> str | None:
        return self.listing.format(table=table)

    def apply(self, transaction: str) -> None:
        self.applied.append(transaction)


class Engines:
    """Runs either engine's program() on a namespace that holds rules of ours."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, drift: tuple[str, ...]) -> None:
        self.applied: list[str] = []
        self._drift = drift
        read_backs = iter([list(drift)])  # then in sync: the apply took
        monkeypatch.setattr(nft_engine, "Nft", FakeNft)
        monkeypatch.setattr(nft_engine, "compare", lambda ruleset, live: next(read_backs, []))
        monkeypatch.setattr(nft_engine.routes, "configure_for", lambda o: None)
        monkeypatch.setattr(iptables_engine, "families", lambda o, ruleset: [])
        monkeypatch.setattr(iptables_engine, "assess", self._assess)
        monkeypatch.setattr(iptables_engine, "_apply_all_or_nothing", self._record)
        monkeypatch.setattr(iptables_engine.routes, "configure_for", lambda o: None)

    def _assess(self, plans: object) -> Assessment:
        return Assessment(True, bool(self._drift), True, self._drift)

    def _record(self, *args: object) -> None:
        self.applied.append("iptables")

    def program(self, name: str, *flags: str) -> list[str]:
        """Run the engine; what it applied."""
        if name == "nftables":
            chosen = backend.NftablesBackend.from_options(opts("--native-nftables", *flags))
            try:
                chosen.program()
            finally:
                self.applied += FakeNft.last.applied
        else:
            backend.IptablesBackend.from_options(opts(*flags)).program()
        return self.applied


@pytest.fixture(params=["iptables", "nftables"])
def engine_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_force_apply_does_not_replace_drifted_rules(
    monkeypatch: pytest.MonkeyPatch, engine_name: str
) -> None:
    """Both engines refuse drift with --force-apply (Istio's flag re-applies rules in sync;
    --reconcile is what replaces drifted ones)."""
    engines = Engines(monkeypatch, DRIFT)
    with pytest.raises(DriftError, match="--reconcile"):
        engines.program(engine_name, "--force-apply")
    assert engines.applied == []


def test_force_apply_over_rules_in_place_applies_and_warns(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], engine_name: str
) -> None:
    engines = Engines(monkeypatch, ())
    assert engines.program(engine_name, "--force-apply")
    assert backend.FORCED in capsys.readouterr().err


def test_rules_in_place_are_left_alone(monkeypatch: pytest.MonkeyPatch, engine_name: str) -> None:
    assert Engines(monkeypatch, ()).program(engine_name) == []


def test_reconcile_replaces_drifted_rules(
    monkeypatch: pytest.MonkeyPatch, engine_name: str
) -> None:
    assert Engines(monkeypatch, DRIFT).program(engine_name, "--reconcile")


def test_nft_read_back_mismatch_is_a_read_back_error_and_rolls_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    drift = iter([["nat: missing chain output"], ["nat: missing chain output"], []])
    monkeypatch.setattr(nft_engine, "Nft", FakeNft)
    monkeypatch.setattr(nft_engine, "compare", lambda ruleset, live: next(drift))
    chosen = backend.NftablesBackend.from_options(opts("--native-nftables", "--reconcile"))
    with pytest.raises(ReadBackError, match="nftables rules read back differ"):
        chosen.program()
    applied, rollback = FakeNft.last.applied
    assert "add table inet istio-proxy-nat" in applied
    assert rollback.startswith("add table inet istio-proxy-nat\ndelete table inet istio-proxy-nat")


class EmptySave:
    """An iptables runner whose tables hold nothing after the restore."""

    def save(self) -> str:
        return ""


def test_iptables_read_back_mismatch_is_a_read_back_error() -> None:
    ruleset = backend.IptablesBackend.from_options(opts()).ruleset
    plan = iptables_engine.FamilyPlan("ipv4", EmptySave(), ruleset.ipv4)
    with pytest.raises(ReadBackError, match="ipv4 rules read back differ") as raised:
        iptables_engine._read_back([plan])
    assert isinstance(raised.value, BackendError)


# --------------------------------------------------------------------------- one plan


@pytest.mark.parametrize("extra", [[], ["--native-nftables"]], ids=["iptables", "nftables"])
def test_the_dns_warning_is_logged_once(extra: list[str]) -> None:
    args = ["istio-iptables", *STANDARD_ARGS, "--redirect-dns", "--dry-run", *extra]
    result = meshnet([*args, "--enable-ipv6", "false", "--dns-servers", ""])
    assert result.returncode == 0, result.stderr
    assert result.stderr.count(DNS_WARNING) == 1, result.stderr


@pytest.mark.parametrize(
    ("decision", "done"),
    [
        (Decision(Action.CLEAN), ["clean"]),
        (Decision(Action.NOOP), ["keep"]),
        (Decision(Action.APPLY), ["apply apply"]),
        (Decision(Action.RECONCILE, drift=("x",)), ["apply reconcile"]),
        (Decision(Action.COMPLETE, drift=("x",)), ["apply complete"]),
    ],
)
def test_carry_out_does_one_step_per_action(decision: Decision, done: list[str]) -> None:
    seen: list[str] = []
    steps = backend.Steps(
        "nftables",
        clean=lambda: seen.append("clean"),
        keep=lambda: seen.append("keep"),
        apply=lambda d: seen.append(f"apply {d.action.value}"),
    )
    backend.carry_out(decision, steps)
    assert seen == done


def test_carry_out_refuses_drift_with_the_engines_one_message() -> None:
    drift = tuple(f"nat ISTIO_OUTPUT: missing rule {n}" for n in range(7))
    steps = backend.Steps("nftables", clean=lambda: None, keep=lambda: None, apply=lambda d: None)
    with pytest.raises(DriftError) as caught:
        backend.carry_out(Decision(Action.DRIFT, drift=drift), steps)
    assert str(caught.value) == (
        "existing nftables rules differ from the plan: "
        + "; ".join(drift[:5])
        + " (and 2 more). Re-run with --reconcile to replace them, "
        "or see `meshnet verify` for the full diff"
    )
