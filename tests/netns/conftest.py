"""Fixtures for the real-traffic namespace tests (see harness.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .harness import SecondLink, Topology, delete_netns, netns_leftovers, require_root_netns

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Conftest hooks see the whole session's items: mark only the ones in this directory.
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.netns)


@pytest.fixture(scope="session", autouse=True)
def no_leaked_namespaces() -> Iterator[None]:
    """Fail the run if any mnt-* namespace it created survives it (and remove those).

    Only our own: a concurrent run's namespaces are alive on purpose, not leaked.
    """
    yield
    leaked = netns_leftovers(only_ours=True)
    for ns in leaked:
        delete_netns(ns)
    if leaked:
        pytest.fail(f"network namespaces leaked by the tests: {leaked}", pytrace=False)


@pytest.fixture
def topology() -> Iterator[Topology]:
    """A fresh pod<->peer topology, torn down after the test whatever happens."""
    require_root_netns()
    with Topology() as topo:
        yield topo


@pytest.fixture
def make_topology() -> Iterator[Callable[..., Topology]]:
    """Factory for extra or differently shaped topologies (e.g. second_link="third");
    every one it made is closed after the test."""
    require_root_netns()
    made: list[Topology] = []

    def make(second_link: SecondLink = "none") -> Topology:
        topo = Topology(second_link=second_link)
        made.append(topo)
        return topo.__enter__()

    try:
        yield make
    finally:
        errors = []
        for topo in reversed(made):
            try:
                topo.close()
            except RuntimeError as exc:
                errors.append(str(exc))
        if errors:
            pytest.fail("; ".join(errors), pytrace=False)
