"""Stand-ins for the host that `options.build` asks: users, groups, addresses, files."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence

from meshnet.cli.app import istio_iptables
from meshnet.config import options
from meshnet.config.facts import IPAddress
from meshnet.config.options import Options


class FakeSystem:
    """A host with users istio-proxy (1337), envoy (101) and root, groups istio-proxy and root,
    the given interface addresses, and `resolv` as the text of every file read (reads recorded)."""

    def __init__(self, addresses: tuple[str, ...] = ("192.0.2.1",), resolv: str = "") -> None:
        self.addresses = [ipaddress.ip_address(a) for a in addresses]
        self.resolv = resolv
        self.reads: list[str] = []

    def user_id(self, name: str) -> int | None:
        return {"istio-proxy": 1337, "envoy": 101, "root": 0}.get(name)

    def group_exists(self, name: str) -> bool:
        return name in ("istio-proxy", "root")

    def interface_addresses(self) -> list[IPAddress]:
        return list(self.addresses)

    def read_text(self, path: str) -> str:
        self.reads.append(path)
        return self.resolv


def options_from_argv(
    args: Sequence[str], env: Mapping[str, str] | None = None, system: FakeSystem | None = None
) -> Options:
    """Options from an istio-iptables argv, parsed by the real click command, on a FakeSystem."""
    given = istio_iptables.make_context("istio-iptables", list(args)).params
    return options.build(options.gather(given, env or {}), system or FakeSystem())
