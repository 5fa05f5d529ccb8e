"""The repository tracks sources only: nothing that a command generates."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.support.conformance import CONFORMANCE
from tests.support.repo import REPO

GENERATED = re.compile(
    r"(^|/)(\.venv|venv|__pycache__|build|dist|\.mypy_cache|\.ruff_cache|\.pytest_cache|"
    r"\.hypothesis|[^/]*\.egg-info)(/|$)|\.py[co]$|\.so$"
)
# Comments and docstrings cite Istio's sources, never the project's own spec or design notes.
SPEC_CITATION = re.compile(r"SPEC(-istio)?(\.md)? §|SPEC\.md|SPEC-istio|DESIGN\.md")
CITATION_CHECKED = ("meshnet/", "cni-plugin/", "bench/", "tests/", "README.md")


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


def test_sources_do_not_cite_the_spec_files() -> None:
    this_file = Path(__file__).resolve().relative_to(REPO).as_posix()
    checked = [
        path for path in _tracked() if path.startswith(CITATION_CHECKED) and path != this_file
    ]
    assert checked, "no tracked sources under " + ", ".join(CITATION_CHECKED)
    citations = []
    for path in checked:
        file = REPO / path
        if not file.is_file():  # deleted in the work tree but still in the index
            continue
        text = file.read_bytes().decode("utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), start=1):
            if SPEC_CITATION.search(line):
                citations.append(f"{path}:{number}: {line.strip()}")
    assert citations == []


def test_the_citation_pattern_catches_what_it_should() -> None:
    for text in ("(SPEC-istio §3.6)", "SPEC.md §7", "(SPEC §2)", "see SPEC.md", "DESIGN.md"):
        assert SPEC_CITATION.search(text), text
    assert not SPEC_CITATION.search("`tools/istio-iptables/pkg/capture/run.go` SPECIAL")


def test_conformance_corpus_is_in_the_repository() -> None:
    tracked = set(_tracked())
    for suite in ("istio-iptables", "istio-nftables", "cni-plugin", "cni-install"):
        index = (CONFORMANCE / suite / "cases.json").relative_to(REPO).as_posix()
        assert index in tracked, index
        assert (CONFORMANCE / suite / "PROVENANCE.md").is_file()
