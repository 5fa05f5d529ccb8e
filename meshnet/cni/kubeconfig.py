"""The plugin's kubeconfig: clientcmd v1 YAML built from the service-account token and CA.

SPEC-istio §5.4 (`kubeconfig.go`): keys sorted as `sigs.k8s.io/yaml` writes them. The text is
rendered by hand (a dozen fixed lines) rather than with a YAML library: meshnet depends on
nothing beyond click and structlog, and the plugin's reader (`meshnet.cni.kube`) parses exactly
these lines.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from pathlib import Path

from meshnet.errors import MeshnetError


class KubeconfigError(MeshnetError):
    """The kubeconfig cannot be built: API server address, token or CA missing."""


@dataclass(frozen=True, slots=True)
class ApiServer:
    """Where and how the plugin reaches the Kubernetes API (the pod's service env)."""

    host: str
    port: str
    protocol: str = "https"
    ca_file: str = ""  # empty: <service account dir>/ca.crt
    skip_tls_verify: bool = False


def server_url(api: ApiServer) -> str:
    """`https://host:port`; an IPv6 host is bracketed."""
    if not api.host:
        raise KubeconfigError("KUBERNETES_SERVICE_HOST not set. Is this not running within a pod?")
    if not api.port:
        raise KubeconfigError("KUBERNETES_SERVICE_PORT not set. Is this not running within a pod?")
    host = f"[{api.host}]" if ":" in api.host and not api.host.startswith("[") else api.host
    return f"{api.protocol or 'https'}://{host}:{api.port}"


def read_token(service_account_dir: Path) -> str:
    """The service-account token, without surrounding whitespace (a bearer token has none)."""
    path = service_account_dir / "token"
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise KubeconfigError(
            f"service account token file {path} does not exist. Is this not running within a pod?"
        ) from None
    except OSError as err:
        raise KubeconfigError(f"cannot read service account token {path}: {err.strerror}") from None


def ca_path(api: ApiServer, service_account_dir: Path) -> Path:
    return Path(api.ca_file) if api.ca_file else service_account_dir / "ca.crt"


def read_ca(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KubeconfigError(
            f"file does not exist: {path} (set KUBE_CA_FILE, or SKIP_TLS_VERIFY=true)"
        ) from None
    except OSError as err:
        raise KubeconfigError(f"cannot read CA file {path}: {err.strerror}") from None


def render(server: str, token: str, ca_data: bytes | None, plugin_name: str) -> str:
    """The kubeconfig text; `ca_data=None` means `insecure-skip-tls-verify: true`."""
    if ca_data is None:
        tls = "insecure-skip-tls-verify: true"
    else:
        tls = f"certificate-authority-data: {base64.b64encode(ca_data).decode('ascii')}"
    return _document(server, _scalar(token), tls, plugin_name)


def render_redacted(server: str, ca: Path | None, plugin_name: str) -> str:
    """The same text with the secrets left out, for the log (as Istio logs it)."""
    if ca is None:
        tls = "insecure-skip-tls-verify: true"
    else:
        tls = f"certificate-authority-data: <CA cert from {ca}>"
    return _document(server, "<redacted>", tls, plugin_name)


def _document(server: str, token: str, tls: str, plugin_name: str) -> str:
    user = _scalar(plugin_name)
    context = _scalar(plugin_name + "-context")
    return (
        "apiVersion: v1\n"
        "clusters:\n"
        "- cluster:\n"
        f"    {tls}\n"
        f"    server: {_scalar(server)}\n"
        "  name: local\n"
        "contexts:\n"
        "- context:\n"
        "    cluster: local\n"
        f"    user: {user}\n"
        f"  name: {context}\n"
        f"current-context: {context}\n"
        "kind: Config\n"
        "users:\n"
        f"- name: {user}\n"
        "  user:\n"
        f"    token: {token}\n"
    )


# A YAML plain scalar that no YAML 1.1 reader turns into a bool, null or number.
_PLAIN = re.compile(r"[A-Za-z0-9/+_.][A-Za-z0-9/+_.=:\[\]@%~-]*")
_NUMBER = re.compile(r"[-+]?(\.\d+|\d[\d_]*(\.\d*)?)([eE][-+]?\d+)?|0x[0-9a-fA-F_]+|0o?[0-7_]+")
_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~", ".inf", ".nan"}


def _scalar(text: str) -> str:
    """Plain when it is safe (as go-yaml writes it), else a double-quoted (JSON) string."""
    if _PLAIN.fullmatch(text) and not _NUMBER.fullmatch(text) and text.lower() not in _WORDS:
        return text
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a YAML double-quoted scalar
