"""The installer's two exceptions: a failure, and a wait given up."""

from __future__ import annotations

from meshnet.errors import MeshnetError


class InstallError(MeshnetError):
    """The plugin could not be installed or removed (files, dirs, permissions)."""


class InstallCancelled(Exception):
    """A wait was given up (signal or deadline). Not an error: the daemon cleans up and exits 0."""
