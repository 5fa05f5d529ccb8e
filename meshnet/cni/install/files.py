"""Atomic file writes, the plugin executable's install into the bin dirs, the kubeconfig."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import tempfile
from pathlib import Path

from meshnet import logs
from meshnet.cni.install.settings import Settings
from meshnet.cni.kube import kubeconfig
from meshnet.errors import InstallError


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write a sibling temp file `<name>.tmp.*`, then rename it over `path`."""
    try:
        handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.tmp.")
    except OSError as err:
        raise InstallError(_write_failure(path, err)) from None
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fchmod(stream.fileno(), mode)  # exact mode, whatever the umask
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except OSError as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise InstallError(_write_failure(path, err)) from None


def _write_failure(path: Path, err: OSError) -> str:
    hint = ""
    if err.errno == 30:  # EROFS
        hint = " (read-only file system: point the option at the host's writable CNI dir)"
    elif isinstance(err, FileNotFoundError):
        hint = f" ({path.parent} does not exist: is the host directory mounted?)"
    return f"cannot write {path}: {err.strerror}{hint}"


STANDALONE_DIR = "meshnet-cni-standalone"  # the forwarder's fallback, beside it (forwarder.c)


def install_binary(source: Path, bin_dir: Path, name: str) -> Path:
    """Copy the plugin executable to `<bin_dir>/<name>`, mode 0755, atomically."""
    for stale in bin_dir.glob(f"{name}.tmp.*"):  # left by an interrupted copy
        stale.unlink(missing_ok=True)
    real = source.resolve()  # the image links the executable from its build directory
    if any((real.parent / part).is_dir() for part in ("_internal", STANDALONE_DIR)):
        return _install_onedir(real, bin_dir, name)
    try:
        data = source.read_bytes()
    except OSError as err:
        raise InstallError(
            f"cannot read the plugin executable {source}: {err.strerror} "
            "(set MESHNET_CNI_PLUGIN_BINARY)"
        ) from None
    target = bin_dir / name
    if not _same_file(target, data, 0o755):
        atomic_write(target, data, 0o755)
    return target


def _install_onedir(source: Path, bin_dir: Path, name: str) -> Path:
    """A build directory: the executable needs what is beside it, a PyInstaller onedir its
    `_internal/`, the forwarder its standalone plugin in `meshnet-cni-standalone/` (it execs
    that when the agent is unreachable, found from its own resolved path).

    The directory is copied to `<bin_dir>/<name>.d/<digest>/` (under a temporary name, then
    renamed), and `<bin_dir>/<name>` becomes a relative symlink to the executable in it,
    replaced atomically; older copies are removed once nothing points at them.
    """
    digest = _tree_digest(source.parent)
    versions = bin_dir / f"{name}.d"
    current = versions / digest
    try:
        if not current.is_dir():
            versions.mkdir(exist_ok=True)
            staging = versions / f".tmp.{secrets.token_hex(4)}"
            shutil.copytree(source.parent, staging, symlinks=True)
            staging.rename(current)
        target = bin_dir / name
        relative = f"{name}.d/{digest}/{source.name}"
        if not (target.is_symlink() and os.readlink(target) == relative):
            link = bin_dir / f"{name}.tmp.{secrets.token_hex(4)}"
            link.symlink_to(relative)
            link.replace(target)
        for old in versions.iterdir():
            if old.name != digest:
                shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        raise InstallError(_write_failure(bin_dir / name, err)) from None
    return target


def _tree_digest(root: Path) -> str:
    """Content hash of a directory tree (names and bytes), naming one build's copy."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _same_file(path: Path, data: bytes, mode: int) -> bool:
    """True when `path` already holds `data` with `mode`: no rewrite, no churn for watchers."""
    try:
        status = path.stat()
        if status.st_mode & 0o7777 != mode or status.st_size != len(data):
            return False
        return path.read_bytes() == data
    except OSError:
        return False


def write_kubeconfig(settings: Settings) -> Path:
    """`<run dir>/<plugin>-kubeconfig` from the service-account token and CA."""
    api, sa_dir = settings.api, settings.service_account_dir
    server = kubeconfig.server_url(api)
    token = kubeconfig.read_token(sa_dir)
    ca = None if api.skip_tls_verify else kubeconfig.ca_path(api, sa_dir)
    ca_data = None if ca is None else kubeconfig.read_ca(ca)
    text = kubeconfig.render(server, token, ca_data, settings.plugin_name)
    try:
        settings.run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InstallError(f"cannot create {settings.run_dir}: {err.strerror}") from None
    path = settings.kubeconfig_path
    atomic_write(path, text.encode(), settings.kubeconfig_mode)
    logs.get().debug(
        "wrote kubeconfig",
        path=str(path),
        content=kubeconfig.render_redacted(server, ca, settings.plugin_name),
    )
    return path
