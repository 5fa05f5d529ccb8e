"""The configurations users run most, named: meshnet's own goldens in `tests/goldens/NAME.FMT`.

Other suites reuse them (dot, nft, restore into a real kernel) so each covers the same cases.
"""

from __future__ import annotations

from .cli import STANDARD_ARGS
from .repo import REPO

GOLDENS = REPO / "tests" / "goldens"
STANDARD = [*STANDARD_ARGS]
CASES = {
    "standard": [*STANDARD, "--enable-ipv6", "false"],
    "standard-dual-stack": [*STANDARD, "--dual-stack", "--enable-ipv6", "true"],
    "tproxy": [
        *("TPROXY" if arg == "REDIRECT" else arg for arg in STANDARD_ARGS),
        "--enable-ipv6",
        "true",
    ],
    "dns-capture": [*STANDARD, "--redirect-dns", "--capture-all-dns", "--enable-ipv6", "false"],
    "dns-servers": [
        *STANDARD,
        "--redirect-dns",
        "--dns-servers",
        "192.0.2.53,2001:db8::53",
        "--enable-ipv6",
        "true",
    ],
}
