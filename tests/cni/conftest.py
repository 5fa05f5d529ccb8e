"""Fixtures shared by the CNI plugin tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.cni.fakes import OWN_NETNS, delete_netns_batch
from tests.netns.harness import CREATED_NETNS


@pytest.fixture(scope="session", autouse=True)
def no_leaked_cni_namespaces() -> Iterator[None]:
    """Fail the run if a namespace made by the CNI tests survives it (and remove it).

    Only our own (OWN_NETNS, and the harness's record): a concurrent run's are alive on purpose.
    """
    yield
    ours = sorted(OWN_NETNS | CREATED_NETNS)
    leaked = [name for name in ours if os.path.exists(f"/var/run/netns/{name}")]
    still = delete_netns_batch(leaked)
    if leaked:
        pytest.fail(
            f"network namespaces leaked by the CNI tests: {leaked} (not removable: {still})",
            pytrace=False,
        )
