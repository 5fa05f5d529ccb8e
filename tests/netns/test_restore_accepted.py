"""The kernel's own tools accept meshnet's restore text (iptables-restore --test)."""

from __future__ import annotations

import pytest

from tests.support.cli import meshnet, restore_blocks
from tests.support.goldens import CASES

from .harness import Topology


@pytest.mark.parametrize("variant", ["nft", "legacy"])
@pytest.mark.parametrize("case", ["standard-dual-stack", "tproxy", "dns-servers"])
def test_restore_text_passes_iptables_restore_test(
    topology: Topology, case: str, variant: str
) -> None:
    result = meshnet(["istio-iptables", *CASES[case], "--dry-run"])
    assert result.returncode == 0, result.stderr
    blocks = restore_blocks(result.stdout)
    assert set(blocks) == {"ipv4", "ipv6"}
    for family, binary in (("ipv4", "iptables"), ("ipv6", "ip6tables")):
        tool = [f"{binary}-{variant}-restore", "--noflush", "--test"]
        checked = topology.exec(topology.pod_ns, tool, input=blocks[family])
        assert checked.returncode == 0, (family, checked.stderr)
        # A bad match, not a bad jump: iptables-nft-restore --test does not resolve jumps.
        broken = blocks[family].replace("-p tcp", "-p no-such-protocol", 1)
        rejected = topology.exec(topology.pod_ns, tool, input=broken)
        assert rejected.returncode != 0, "iptables-restore --test must be able to fail"
