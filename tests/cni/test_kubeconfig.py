"""The plugin reads any kubeconfig clientcmd reads (JSON or YAML), through a real ADD.

Each test writes `<run dir>/meshnet-cni-kubeconfig`, runs `meshnet-cni` ADD as a runtime does,
and checks that the pod GET reached `FakeApi` (plain HTTP, HTTPS, IPv6, client certificates)
or that the ADD failed with one line naming the file and what is unusable. The pod has no
sidecar, so a successful ADD needs no namespace; the last test programs a real one.
"""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshnet.cni.kube import kubeconfig as kubeconfig_writer
from tests.cni.fakes import (
    TOKEN,
    FakeApi,
    Pki,
    cni_env,
    in_netns,
    make_pki,
    mesh_pod,
    pod_namespace,
    run_plugin,
)
from tests.netns.harness import require_root_netns

POD = ("default", "web-0")
POD_PATH = "/api/v1/namespaces/default/pods/web-0"
NO_NETNS = "/var/run/netns/meshnet-test-none"  # a skipped pod's namespace is never entered


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def serve(pki: Pki | None = None, **kwargs: Any) -> FakeApi:
    api = FakeApi(pki, **kwargs)
    api.pods[POD] = mesh_pod(POD[1], POD[0], proxy=False)
    return api


@pytest.fixture
def https(pki: Pki) -> Iterator[FakeApi]:
    with serve(pki) as api:
        yield api


def kubeconfig(
    server: str, cluster: dict[str, Any] | None = None, user: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Istio's layout: one cluster, context and user, the context current."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c1", "cluster": {"server": server, **(cluster or {})}}],
        "contexts": [{"name": "ctx", "context": {"cluster": "c1", "user": "u1"}}],
        "current-context": "ctx",
        "users": [{"name": "u1", "user": {"token": TOKEN} if user is None else user}],
    }


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def add(
    run_dir: Path, config: dict[str, Any] | str, as_json: bool = False, netns: str = NO_NETNS
) -> subprocess.CompletedProcess[str]:
    """ADD with this kubeconfig (a dict: YAML unless as_json; a str: written as is)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(config, dict):
        config = json.dumps(config, indent=2) if as_json else yaml.safe_dump(config)
    (run_dir / "meshnet-cni-kubeconfig").write_text(config)
    netconf = {
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "meshnet-cni",
        "cni_agent_run_dir": str(run_dir),
        "pod_fetch_attempts": 1,
        "pod_fetch_interval": 0.1,
    }
    return run_plugin(cni_env("ADD", netns), json.dumps(netconf))


def succeeds(result: Any, api: FakeApi) -> None:
    assert result.returncode == 0, f"exit {result.returncode}: {result.stdout}{result.stderr}"
    assert api.requests == [POD_PATH]


def fails(result: Any, *expected: str) -> str:
    assert result.returncode == 1, f"exit {result.returncode}: {result.stdout}{result.stderr}"
    message = str(json.loads(result.stdout)["msg"])
    assert "\n" not in message, message
    for text in expected:
        assert text in message, message
    return message


# --------------------------------------------------------------------------- usable


@pytest.mark.parametrize("as_json", [True, False], ids=["json", "yaml"])
def test_plain_http_kubeconfig_in_json_or_yaml(tmp_path: Path, as_json: bool) -> None:
    with serve() as api:
        succeeds(add(tmp_path / "run", kubeconfig(api.url), as_json=as_json), api)


def test_yaml_as_kubectl_writes_it_with_comments_and_other_contexts(tmp_path: Path) -> None:
    with serve() as api:
        text = (
            "# written by hand\n"
            "apiVersion: v1\nkind: Config\npreferences: {}\n"
            "clusters:\n"
            "- name: other\n  cluster: {server: 'https://192.0.2.9:6443'}\n"
            f'- name: mine\n  cluster:\n    server: "{api.url}"\n'
            "contexts:\n"
            "- {name: a, context: {cluster: other, user: nobody}}\n"
            "- name: b\n  context:\n    cluster: mine\n    user: me\n    namespace: x\n"
            "current-context: b\n"
            f"users:\n- name: me\n  user:\n    token: >-\n      {TOKEN}\n"
        )
        succeeds(add(tmp_path / "run", text), api)


@pytest.mark.parametrize("ca", [True, False], ids=["ca", "insecure"])
def test_the_kubeconfig_the_installer_writes(
    tmp_path: Path, pki: Pki, https: FakeApi, ca: bool
) -> None:
    text = kubeconfig_writer.render(
        https.url, TOKEN, pki.ca.read_bytes() if ca else None, "meshnet-cni"
    )
    succeeds(add(tmp_path / "run", text), https)


@pytest.mark.parametrize("ca", ["file", "data"])
def test_https_with_the_cluster_ca_from_a_file_or_data(
    tmp_path: Path, pki: Pki, https: FakeApi, ca: str
) -> None:
    cluster = (
        {"certificate-authority": str(pki.ca)}
        if ca == "file"
        else {"certificate-authority-data": b64(pki.ca)}
    )
    succeeds(add(tmp_path / "run", kubeconfig(https.url, cluster)), https)


def test_relative_files_are_relative_to_the_kubeconfig(
    tmp_path: Path, pki: Pki, https: FakeApi
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "ca.pem").write_bytes(pki.ca.read_bytes())
    (run / "token").write_text(TOKEN + "\n")
    config = kubeconfig(https.url, {"certificate-authority": "ca.pem"}, {"tokenFile": "token"})
    succeeds(add(run, config), https)


def test_ipv6_server_literal(tmp_path: Path, pki: Pki) -> None:
    with serve(pki, host="::1") as api:
        assert api.url.startswith("https://[::1]:")
        config = kubeconfig(api.url, {"certificate-authority-data": b64(pki.ca)})
        succeeds(add(tmp_path / "run", config), api)


def test_insecure_skip_tls_verify_accepts_an_unknown_server_certificate(
    tmp_path: Path, https: FakeApi
) -> None:
    config = kubeconfig(https.url, {"insecure-skip-tls-verify": True})
    succeeds(add(tmp_path / "run", config), https)


def test_the_server_certificate_is_verified_against_the_cluster_ca(
    tmp_path: Path, pki: Pki, https: FakeApi
) -> None:
    config = kubeconfig(https.url, {"certificate-authority": str(pki.other_ca)})
    fails(add(tmp_path / "run", config), "failed to get pod default/web-0", "CERTIFICATE_VERIFY")
    assert https.requests == []


def test_token_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(f"{TOKEN}\n")
    with serve() as api:
        succeeds(add(tmp_path / "run", kubeconfig(api.url, user={"tokenFile": str(token)})), api)


def test_token_wins_over_token_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("a-stale-token\n")
    with serve() as api:
        config = kubeconfig(api.url, user={"token": TOKEN, "tokenFile": str(token)})
        succeeds(add(tmp_path / "run", config), api)


@pytest.mark.parametrize("form", ["files", "data"])
def test_client_certificate_authenticates_without_a_token(
    tmp_path: Path, pki: Pki, form: str
) -> None:
    if form == "files":
        user = {"client-certificate": str(pki.client_cert), "client-key": str(pki.client_key)}
    else:
        user = {
            "client-certificate-data": b64(pki.client_cert),
            "client-key-data": b64(pki.client_key),
        }
    with serve(pki, require_client_cert=True) as api:
        config = kubeconfig(api.url, {"certificate-authority": str(pki.ca)}, user)
        succeeds(add(tmp_path / "run", config), api)


def test_without_its_client_certificate_the_server_refuses(tmp_path: Path, pki: Pki) -> None:
    with serve(pki, require_client_cert=True) as api:
        config = kubeconfig(api.url, {"certificate-authority": str(pki.ca)})
        fails(add(tmp_path / "run", config), "failed to get pod default/web-0")
        assert api.requests == []


@pytest.mark.netns
def test_a_mesh_pod_gets_its_rules_with_a_client_certificate_kubeconfig(
    tmp_path: Path, pki: Pki
) -> None:
    require_root_netns()
    user = {"client-certificate": str(pki.client_cert), "client-key": str(pki.client_key)}
    with serve(pki, require_client_cert=True) as api, pod_namespace() as ns:
        api.pods[POD] = mesh_pod(POD[1], POD[0])
        config = kubeconfig(api.url, {"certificate-authority-data": b64(pki.ca)}, user)
        succeeds(add(tmp_path / "run", config, as_json=True, netns=ns), api)
        save = in_netns(ns, ["iptables-save", "-t", "nat"]).stdout
        assert ":ISTIO_OUTPUT" in save and "-j ISTIO_REDIRECT" in save, save


# --------------------------------------------------------------------------- unusable


def _without(config: dict[str, Any], *path: str | int) -> dict[str, Any]:
    node: Any = config
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return config


UNUSABLE: list[tuple[str, Any, str]] = [
    ("no-current-context", lambda c, p: _without(c, "current-context"), "no current-context"),
    (
        "unknown-context",
        lambda c, p: {**c, "current-context": "gone"},
        "no context named 'gone' in contexts",
    ),
    (
        "unknown-cluster",
        lambda c, p: {**c, "clusters": []},
        "no cluster named 'c1' in clusters",
    ),
    ("unknown-user", lambda c, p: {**c, "users": []}, "no user named 'u1' in users"),
    (
        "no-server",
        lambda c, p: _without(c, "clusters", 0, "cluster", "server"),
        "cluster 'c1' has no server",
    ),
    (
        "server-not-a-url",
        lambda c, p: {**c, "clusters": [{"name": "c1", "cluster": {"server": "localhost"}}]},
        "server 'localhost' is not an http(s) URL",
    ),
    (
        "ca-file-missing",
        lambda c, p: _set_cluster(c, {"certificate-authority": "/nonexistent/ca.crt"}),
        "cannot read certificate-authority /nonexistent/ca.crt: No such file or directory",
    ),
    (
        "ca-data-not-base64",
        lambda c, p: _set_cluster(c, {"certificate-authority-data": "not base64!"}),
        "certificate-authority-data is not base64",
    ),
    (
        "ca-data-not-pem",
        lambda c, p: _set_cluster(c, {"certificate-authority-data": "aGVsbG8="}),
        "certificate-authority(-data) holds no PEM certificate",
    ),
    (
        "insecure-not-a-bool",
        lambda c, p: _set_cluster(c, {"insecure-skip-tls-verify": "yes please"}),
        "insecure-skip-tls-verify is not true or false",
    ),
    (
        "token-file-missing",
        lambda c, p: _set_user(c, {"tokenFile": "/nonexistent/token"}),
        "cannot read tokenFile /nonexistent/token: No such file or directory",
    ),
    (
        "cert-without-key",
        lambda c, p: _set_user(c, {"client-certificate": str(p.client_cert)}),
        "user 'u1' has a client certificate but no client-key(-data)",
    ),
    (
        "key-without-cert",
        lambda c, p: _set_user(c, {"client-key-data": b64(p.client_key)}),
        "user 'u1' has a client key but no client-certificate(-data)",
    ),
    (
        "cert-and-wrong-key",
        lambda c, p: _set_user(
            c, {"client-certificate": str(p.client_cert), "client-key": str(p.server_key)}
        ),
        "client-certificate and client-key:",
    ),
    (
        "exec-credentials",
        lambda c, p: _set_user(c, {"exec": {"command": "aws", "apiVersion": "v1"}}),
        "user 'u1' uses exec credentials, not supported",
    ),
    ("not-a-mapping", lambda c, p: "- just\n- a list\n", "not a kubeconfig"),
    ("not-yaml", lambda c, p: "clusters: [\n", "not valid YAML at line 2"),
]


def _set_cluster(config: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    config["clusters"][0]["cluster"].update(values)
    return config


def _set_user(config: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    config["users"][0]["user"] = values
    return config


@pytest.mark.parametrize(("change", "expected"), [pytest.param(c, e, id=i) for i, c, e in UNUSABLE])
def test_unusable_kubeconfig_fails_the_add_naming_the_file_and_the_problem(
    tmp_path: Path, pki: Pki, https: FakeApi, change: Any, expected: str
) -> None:
    config = change(kubeconfig(https.url, {"certificate-authority": str(pki.ca)}), pki)
    path = tmp_path / "run" / "meshnet-cni-kubeconfig"
    fails(
        add(tmp_path / "run", config),
        f"failed to createNewK8sClient: kubeconfig {path}: ",
        expected,
    )
    assert https.requests == []


def test_missing_kubeconfig_names_the_file(tmp_path: Path) -> None:
    netconf = {"cniVersion": "1.0.0", "name": "n", "type": "meshnet-cni"}
    netconf["cni_agent_run_dir"] = str(tmp_path)
    result = run_plugin(cni_env("ADD", NO_NETNS), json.dumps(netconf))
    fails(result, f"cannot read {tmp_path / 'meshnet-cni-kubeconfig'}: No such file or directory")
