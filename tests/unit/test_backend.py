"""The two engines without root: they run against fakes of what they read and write (no
iptables, nft or namespace is touched)."""

from __future__ import annotations

import pytest

from meshnet import engine, nftengine, options
from meshnet.errors import BackendError, ReadBackError
from meshnet.options import Options
from meshnet.plan import iptables, nftables
from tests.unit.test_options import FakeSystem

STANDARD = {
    "proxy_port": "15001",
    "inbound_capture_port": "15006",
    "proxy_uid": "1337",
    "inbound_interception_mode": "REDIRECT",
    "service_cidr": "*",
    "service_exclude_cidr": "",
    "inbound_ports": "*",
    "local_exclude_ports": "15090,15021,15020",
    "enable_ipv6": "false",
}


def opts(*extra: str, **given: str) -> Options:
    """Istio's standard sidecar flags, IPv6 off, plus `extra` bool flags and `given` values."""
    bools = {name.removeprefix("--").replace("-", "_"): "true" for name in extra}
    return options.build(options.gather({**STANDARD, **given, **bools}, {}), FakeSystem())


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


def test_nft_read_back_mismatch_is_a_read_back_error_and_rolls_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    drift = iter([["nat: missing chain output"], ["nat: missing chain output"], []])
    monkeypatch.setattr(nftengine, "Nft", FakeNft)
    monkeypatch.setattr(nftengine, "compare", lambda ruleset, live: next(drift))
    chosen = opts("--native-nftables", "--reconcile")
    with pytest.raises(ReadBackError, match="nftables rules read back differ"):
        nftengine.program(chosen, nftables.ruleset(chosen))
    applied, rollback = FakeNft.last.applied
    assert "add table inet istio-proxy-nat" in applied
    assert rollback.startswith("add table inet istio-proxy-nat\ndelete table inet istio-proxy-nat")


class EmptySave:
    """An iptables runner whose tables hold nothing after the restore."""

    def save(self) -> str:
        return ""


def test_iptables_read_back_mismatch_is_a_read_back_error() -> None:
    plan = engine.FamilyPlan("ipv4", EmptySave(), iptables.ruleset(opts()).ipv4)
    with pytest.raises(ReadBackError, match="ipv4 rules read back differ") as raised:
        engine._read_back([plan])
    assert isinstance(raised.value, BackendError)
