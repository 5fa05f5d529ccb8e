"""The one error hierarchy. The CLI maps each class to an exit code and one line on stderr."""

from __future__ import annotations


class MeshnetError(Exception):
    """Base class: a failure a user can act on. The message is the whole story."""

    exit_code: int = 1


class OptionError(MeshnetError):
    """A flag or environment value is invalid (exit 1, as Istio's validation errors)."""


class UsageError(OptionError):
    """A typed flag (bool, uint16, duration) got a value of the wrong type on the command line:
    Istio's flag parser (cobra) rejects these before running, with exit status 255."""

    exit_code = 255


class EnvironmentFactError(MeshnetError):
    """A fact about the running system could not be read (user lookup, addresses, resolv.conf)."""


class BackendError(MeshnetError):
    """An iptables/nft binary is missing, unusable, or rejected the rules."""


class NamespaceError(MeshnetError):
    """A network namespace could not be entered."""


class RouteError(MeshnetError):
    """TPROXY policy routing or the ::6 loopback address could not be configured."""


class DriftError(MeshnetError):
    """Existing rules differ from the plan and --reconcile was not given."""


class ValidationFailed(MeshnetError):
    """--run-validation did not see its probe captured (Istio's exit code 126)."""

    exit_code = 126


class UnsafeTextError(MeshnetError):
    """A value would change the meaning of the rule text it is rendered into (a newline, a
    quote, nft syntax): refused before any text reaches iptables-restore or nft."""
