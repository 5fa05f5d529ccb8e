"""The architecture, as import contracts: the pure packages never reach the system.

`plan`, `render`, `state`, `explain` and `config` turn values into values; only `apply` writes
to the kernel and only `host` touches processes, namespaces and netlink. Every import
statement counts, also the lazy ones inside functions, so a contract cannot be broken by
importing late.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.repo import REPO

PACKAGE = REPO / "meshnet"
PURE = ("plan", "render", "state", "explain", "config")
EDGES = ("meshnet.apply", "meshnet.host", "meshnet.cni", "meshnet.cli", "meshnet.logs")
MAX_LINES = 500


def _imports(path: Path) -> set[str]:
    """Every module an import statement in `path` names (absolute imports only: meshnet has no
    relative ones)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _modules(package: str) -> list[Path]:
    return sorted((PACKAGE / package).rglob("*.py"))


@pytest.mark.parametrize("package", PURE)
def test_pure_packages_import_no_edge(package: str) -> None:
    broken = {
        f"{path.relative_to(REPO)} imports {name}"
        for path in _modules(package)
        for name in _imports(path)
        if name.startswith(EDGES)
    }
    assert not broken, sorted(broken)


def test_importing_the_pure_packages_loads_no_edge_module() -> None:
    """The same contract at run time: what the static check sees is what Python loads."""
    code = (
        "import sys\n"
        "import meshnet.plan.steps, meshnet.plan.iptables, meshnet.plan.nftables\n"
        "import meshnet.render.restore, meshnet.render.nft, meshnet.render.dot\n"
        "import meshnet.state.iptables_save, meshnet.state.nft_listing, meshnet.explain\n"
        "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('meshnet'))))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout.split()
    assert "meshnet.plan.steps" in loaded
    assert [m for m in loaded if m.startswith(EDGES)] == []


def test_no_module_is_over_the_size_limit() -> None:
    long = {
        str(path.relative_to(REPO)): lines
        for path in PACKAGE.rglob("*.py")
        if (lines := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long


def test_every_package_says_what_it_holds() -> None:
    """Each package's __init__ starts with a docstring (the README's layout is built from them)."""
    missing = [
        str(init.relative_to(REPO))
        for init in PACKAGE.rglob("__init__.py")
        if ast.get_docstring(ast.parse(init.read_text())) is None
    ]
    assert not missing, missing
