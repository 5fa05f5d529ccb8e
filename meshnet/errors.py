"""The one error hierarchy. The CLI maps each class to an exit code and one line on stderr;
the CNI plugin reports CniError's code in its error JSON."""

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


class ReadBackError(BackendError):
    """The rules read back after an apply differ from the plan (the apply is rolled back)."""


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


# --- the CNI plugin, installer, node agent and Kubernetes client -------------------------


class LockTimeout(MeshnetError):
    """Another meshnet run kept the namespace's lock for the whole wait."""


class CniError(MeshnetError):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class InstallError(MeshnetError):
    """The plugin could not be installed or removed (files, dirs, permissions)."""


class InstallCancelled(Exception):
    """A wait was given up (signal or deadline). Not an error: the daemon cleans up and exits 0."""


class KubeError(MeshnetError):
    """The pod could not be fetched."""


class ApiError(MeshnetError):
    """A pod call failed: `status` is the HTTP status, 0 when the server was not reached."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Gone(ApiError):
    """410: the resourceVersion is too old to watch from; list again."""


class KubeconfigError(MeshnetError):
    """The kubeconfig cannot be built: API server address, token or CA missing."""


class AgentError(MeshnetError):
    """The agent cannot serve (socket directory, socket, another agent) or read a request."""
