"""What the test suites share; no test module imports another test module.

- `repo`: REPO, IN_CI.
- `cli`: run the real CLI (`meshnet`, `clean_env`, `STANDARD_ARGS`) and split its restore output.
- `conformance`: the corpus recorded from Istio's tools.
- `goldens`: meshnet's own golden configurations, reused by other suites.
- `fakes`: the host `options.build` asks (FakeSystem).
- `netstate`: a namespace's state as comparable text (the root suites).

The real-namespace harness stays in `tests/netns/harness.py` and the CNI fakes in `tests/cni/`.
The names below were this package's when it was one file; they stay importable from here.
"""

from __future__ import annotations

from .cli import STANDARD_ARGS, clean_env, meshnet, restore_blocks
from .conformance import CONFORMANCE, conformance_cases, conformance_index
from .repo import IN_CI, REPO

__all__ = [
    "CONFORMANCE",
    "IN_CI",
    "REPO",
    "STANDARD_ARGS",
    "clean_env",
    "conformance_cases",
    "conformance_index",
    "meshnet",
    "restore_blocks",
]
