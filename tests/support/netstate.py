"""A network namespace's state as text, comparable before and after a run: iptables-save of
both backends and both families (comment lines dropped, counters zeroed), `nft list ruleset`
(counters zeroed), policy rules, routes of every table, lo's addresses."""

from __future__ import annotations

import difflib
import re

BACKENDS = ("nft", "legacy")
SAVERS = tuple(
    f"{tool}-{backend}-save" for backend in BACKENDS for tool in ("iptables", "ip6tables")
)
ROUTING = {
    "rules4": ("-4", "rule", "show"),
    "rules6": ("-6", "rule", "show"),
    "routes4": ("-4", "route", "show", "table", "all"),
    "routes6": ("-6", "route", "show", "table", "all"),
    "lo": ("addr", "show", "dev", "lo"),
}
COUNTERS = re.compile(r"\[\d+:\d+\]")
NFT_COUNTERS = re.compile(r"packets \d+ bytes \d+")


def normalize_save(text: str) -> str:
    """iptables-save output without `#` lines (timestamps, warnings) and with zero counters."""
    return "".join(
        COUNTERS.sub("[0:0]", line) + "\n" for line in text.splitlines() if not line.startswith("#")
    )


def assert_same_state(after: dict[str, str], before: dict[str, str]) -> None:
    """Equal namespace states; otherwise a unified diff of each differing part."""
    diffs = [
        "".join(
            difflib.unified_diff(
                before[key].splitlines(keepends=True),
                after.get(key, "").splitlines(keepends=True),
                f"{key} before",
                f"{key} after",
            )
        )
        for key in before
        if after.get(key) != before[key]
    ]
    assert not diffs, "namespace state changed:\n" + "\n".join(diffs)
