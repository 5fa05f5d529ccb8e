"""The plugin's kubeconfig: clientcmd v1 YAML built from the service-account token and CA.

Istio's `cni/pkg/install/kubeconfig.go`: clientcmd's v1 layout, keys sorted as
`sigs.k8s.io/yaml` writes them, rendered with PyYAML (the plugin's reader, `plugin_client`,
reads any kubeconfig clientcmd reads).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

from meshnet.errors import KubeconfigError


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
    missing = f"service account token file {path} does not exist. Is this not running within a pod?"
    data = _read(path, missing, f"cannot read service account token {path}")
    return data.decode("utf-8").strip()


def ca_path(api: ApiServer, service_account_dir: Path) -> Path:
    return Path(api.ca_file) if api.ca_file else service_account_dir / "ca.crt"


def read_ca(path: Path) -> bytes:
    missing = f"file does not exist: {path} (set KUBE_CA_FILE, or SKIP_TLS_VERIFY=true)"
    return _read(path, missing, f"cannot read CA file {path}")


def _read(path: Path, missing: str, unreadable: str) -> bytes:
    """A file's bytes; KubeconfigError with Istio's message when it is absent or unreadable."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KubeconfigError(missing) from None
    except OSError as err:
        raise KubeconfigError(f"{unreadable}: {err.strerror}") from None


def render(server: str, token: str, ca_data: bytes | None, plugin_name: str) -> str:
    """The kubeconfig text; `ca_data=None` means `insecure-skip-tls-verify: true`."""
    tls: dict[str, str | bool] = {"insecure-skip-tls-verify": True}
    if ca_data is not None:
        tls = {"certificate-authority-data": base64.b64encode(ca_data).decode("ascii")}
    return _document(server, token, tls, plugin_name)


def render_redacted(server: str, ca: Path | None, plugin_name: str) -> str:
    """The same text with the secrets left out, for the log (as Istio logs it)."""
    tls: dict[str, str | bool] = {"insecure-skip-tls-verify": True}
    if ca is not None:
        tls = {"certificate-authority-data": f"<CA cert from {ca}>"}
    return _document(server, "<redacted>", tls, plugin_name)


def _document(server: str, token: str, tls: dict[str, str | bool], plugin_name: str) -> str:
    import yaml  # here: the commands that never write a kubeconfig do not load it

    context = plugin_name + "-context"
    document = {
        "apiVersion": "v1",
        "clusters": [{"cluster": {**tls, "server": server}, "name": "local"}],
        "contexts": [{"context": {"cluster": "local", "user": plugin_name}, "name": context}],
        "current-context": context,
        "kind": "Config",
        "users": [{"name": plugin_name, "user": {"token": token}}],
    }
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    # Keys sorted and lists not indented, as sigs.k8s.io/yaml writes; no line folding.
    text: str = yaml.dump(
        document, Dumper=dumper, sort_keys=True, default_flow_style=False, width=1 << 30
    )
    return text
