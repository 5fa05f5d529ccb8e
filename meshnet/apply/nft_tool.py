"""The native nftables backend: `nft` presence and version, one `nft -f -` transaction, listing.

A transaction is all or nothing: nft applies every line of the input or none of them.
"""

from __future__ import annotations

import re

from meshnet.errors import BackendError
from meshnet.host import proc
from meshnet.render.nft import check_script

MIN_VERSION = (1, 0, 1)  # knftables' requirement, which Istio inherits
_VERSION = re.compile(r"v(\d+(?:\.\d+)+)")
# nft answers in milliseconds; a script that waits (`monitor`) must end in a clear error.
_TIMEOUT = 10.0


class Nft:
    """Runs `nft` in the current network namespace."""

    def __init__(self, *, cni_mode: bool = False) -> None:
        self._cni_mode = cni_mode

    def require(self) -> tuple[int, ...]:
        """The nft version; BackendError with Istio's message when nft is missing or too old."""
        if proc.which("nft") is None:
            where = "on the host filesystem" if self._cni_mode else "in the sidecar container image"
            raise BackendError(
                f"nativeNftables is enabled, but the nft binary is missing {where}: "
                'exec: "nft": executable file not found in $PATH'
            )
        result = proc.run(["nft", "--version"], timeout=_TIMEOUT)
        match = _VERSION.search(result.stdout)
        if result.returncode != 0 or match is None:
            raise BackendError(f"cannot read the nft version: {proc.stderr_summary(result)}")
        version = tuple(int(part) for part in match.group(1).split("."))
        if version < MIN_VERSION:
            raise BackendError(
                f"nft version {match.group(1)} is too old: meshnet needs nft >= 1.0.1"
            )
        return version

    def apply(self, transaction: str) -> None:
        """`nft -f -`: the whole transaction, or nothing (never a file include or a monitor)."""
        result = proc.run(["nft", "-f", "-"], stdin=check_script(transaction), timeout=_TIMEOUT)
        if result.returncode != 0:
            raise BackendError(f"`nft -f -` failed: {proc.stderr_summary(result)}")

    def check(self, transaction: str) -> None:
        """`nft --check -f -`: parse and validate without committing."""
        argv = ["nft", "--check", "-f", "-"]
        result = proc.run(argv, stdin=check_script(transaction), timeout=_TIMEOUT)
        if result.returncode != 0:
            raise BackendError(f"`nft --check -f -` failed: {proc.stderr_summary(result)}")

    def list_table(self, table: str) -> str | None:
        """`nft list table inet T` (None when the table does not exist)."""
        result = proc.run(["nft", "list", "table", "inet", table], timeout=_TIMEOUT)
        if result.returncode != 0:
            if "No such file or directory" in result.stderr:
                return None
            raise BackendError(
                f"`nft list table inet {table}` failed: {proc.stderr_summary(result)}"
            )
        return result.stdout
