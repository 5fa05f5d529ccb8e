"""The repository tracks sources only: nothing that a command generates."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.support import CONFORMANCE, REPO

GENERATED = re.compile(
    r"(^|/)(\.venv|venv|__pycache__|build|dist|\.mypy_cache|\.ruff_cache|\.pytest_cache|"
    r"\.hypothesis|[^/]*\.egg-info)(/|$)|\.py[co]$|\.so$"
)


def _tracked() -> list[str]:
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout (an unpacked archive has no index to check)")
    out = subprocess.run(
        ["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True, check=True
    )
    return out.stdout.splitlines()


def test_no_generated_files_are_tracked() -> None:
    tracked = _tracked()
    assert tracked, "git ls-files listed nothing"
    generated = [path for path in tracked if GENERATED.search(path)]
    assert generated == []


def test_the_pattern_catches_what_it_should() -> None:
    for path in (".venv/bin/python", "meshnet/__pycache__/x.cpython-311.pyc", "build/x", "a.so"):
        assert GENERATED.search(path), path
    assert not GENERATED.search("meshnet/render/dot.py")


def test_conformance_corpus_is_in_the_repository() -> None:
    tracked = set(_tracked())
    for suite in ("istio-iptables", "istio-nftables", "cni-plugin", "cni-install"):
        index = (CONFORMANCE / suite / "cases.json").relative_to(REPO).as_posix()
        assert index in tracked, index
        assert (CONFORMANCE / suite / "PROVENANCE.md").is_file()
