"""Our entry in the node's CNI config: create or merge it, check it, remove it, restore the
user's original. The JSON merge itself is `conflist`; this module does the files.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from meshnet import logs
from meshnet.cni.install import conflist
from meshnet.cni.install.files import atomic_write
from meshnet.cni.install.settings import Settings
from meshnet.errors import InstallCancelled, InstallError

# A wait step: sleep up to the given seconds; False means "give up" (stop requested, deadline).
Wait = Callable[[float], bool]


def create_cni_config_file(settings: Settings, wait: Wait) -> Path:
    """Istio's `createCNIConfigFile`: write our entry; returns the file it lives in.

    Chained: wait for the primary config, merge into it, and give a single-plugin file the
    `.conflist` name (writing the list under the new name first, then moving the old file
    aside, so the runtime never sees a list inside a `.conf`). Standalone: our own file.
    The user's version of a file it changes is kept beside it (`conflist.backup_name`), byte
    for byte with its mode and owner, for `remove_cni_config` to put back.
    """
    entry = conflist.render_entry(settings.plugin_config())
    if not settings.chained:
        path = settings.standalone_path
        atomic_write(path, entry.encode(), settings.standalone_mode)
        return path
    path = wait_for_primary(settings, wait)
    data, status = _read_config(path)
    existing = data.decode("utf-8", errors="replace")
    merged = conflist.insert(entry, existing, settings.plugin_name)
    target = path.with_suffix(".conflist") if path.suffix in conflist.SINGLE_EXTENSIONS else path
    if target == path and merged == existing:
        return target  # already merged: rewriting would only wake up other watchers
    if target == path:
        if not conflist.holds_plugin(existing, settings.plugin_name):
            _write_like(_backup_of(settings, path), data, status)  # their latest version
        _write_like(_through_symlink(path), merged.encode(), status)
        return target
    if os.path.lexists(target) and not conflist.holds_plugin(
        _read_text(target) or "", settings.plugin_name
    ):
        _move_aside(settings, target)  # a list of theirs under the new name: Istio overwrites it
    _write_like(target, merged.encode(), status)
    _move_aside(settings, path)
    return target


def _move_aside(settings: Settings, path: Path) -> None:
    """Rename a user's file to its backup name: bytes, mode, owner, even a symlink, stay."""
    try:
        os.replace(path, _backup_of(settings, path))
    except OSError as err:
        raise InstallError(f"cannot move {path} aside: {err.strerror}") from None


def wait_for_primary(settings: Settings, wait: Wait) -> Path:
    """The config file to merge into: CNI_CONF_NAME, else the primary one, once it is usable."""
    logged = None
    while True:
        path = _merge_target(settings)
        if path is not None:
            return path
        reason = waiting_reason(settings)
        if reason != logged:  # each new reason once: a malformed file is named, not repeated
            logs.get().info("waiting for a CNI config to merge into", reason=reason)
            logged = reason
        _pause(wait, settings.poll_interval)


def _merge_target(settings: Settings) -> Path | None:
    name = settings.cni_conf_name or conflist.find_primary(settings.conf_dir)
    if not name:
        return None
    path = settings.conf_dir / name
    for candidate in (path, *conflist.siblings(path)):
        text = _read_text(candidate) if candidate.is_file() else None
        if text is not None and conflist.merge_problem(text, str(candidate)) is None:
            return candidate
    return None


def waiting_reason(settings: Settings) -> str:
    """Why there is no config to merge into yet: for the log and for /readyz."""
    if not settings.cni_conf_name or not settings.conf_dir.is_dir():
        return conflist.no_primary_reason(settings.conf_dir)
    path = settings.conf_dir / settings.cni_conf_name
    for candidate in (path, *conflist.siblings(path)):
        if candidate.is_file():
            text = _read_text(candidate)
            if text is None:
                return f"cannot read CNI config file {candidate}"
            return conflist.merge_problem(text, str(candidate)) or f"merging into {candidate}"
    return f"waiting for the CNI config file {path} to be written"


def _pause(wait: Wait, seconds: float) -> None:
    if not wait(seconds):
        raise InstallCancelled


def _read_config(path: Path) -> tuple[bytes, os.stat_result]:
    try:
        return path.read_bytes(), path.stat()
    except FileNotFoundError:
        raise InstallError(f"CNI config file {path} removed during configuration") from None
    except OSError as err:
        raise InstallError(f"cannot read CNI config file {path}: {err.strerror}") from None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return None


def _backup_of(settings: Settings, path: Path) -> Path:
    return path.with_name(conflist.backup_name(path.name, settings.plugin_name))


def _through_symlink(path: Path) -> Path:
    """A symlinked config is written where it points: the link stays as the user made it."""
    if not path.is_symlink():
        return path
    target = path.resolve()
    logs.get().info("CNI config is a symlink; writing through it", path=str(path), to=str(target))
    return target


def _write_like(path: Path, data: bytes, status: os.stat_result) -> None:
    """Write `data` with the mode and owner of `status` (a file's, or its backup's)."""
    atomic_write(path, data, status.st_mode & 0o7777)
    with contextlib.suppress(PermissionError):  # not root: the file stays the installer's
        os.chown(path, status.st_uid, status.st_gid)


def config_problem(settings: Settings, path: Path | None) -> str | None:
    """Istio's `checkValidCNIConfig`: why the installation needs (re)writing, or None.

    Only a chained install without CNI_CONF_NAME follows whichever file becomes primary; with
    a configured name, or standalone, a preemption is logged (`preempted_by`), not repaired.
    """
    if path is None:
        return (
            waiting_reason(settings)
            if settings.chained
            else "the CNI config has not been written yet"
        )
    if settings.chained and not settings.cni_conf_name:
        primary = conflist.find_primary(settings.conf_dir)
        if primary is None:
            return waiting_reason(settings)
        if settings.conf_dir / primary != path:
            return f"CNI config file {path} preempted by {settings.conf_dir / primary}"
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return f"CNI config file removed: {path}"
    if settings.chained:
        return conflist.chained_problem(text, settings.plugin_name, str(path))
    return conflist.standalone_problem(text, settings.plugin_name, str(path))


def preempted_by(settings: Settings, path: Path) -> Path | None:
    """The primary config file when it is not `path` (the runtime will not run our plugin)."""
    primary = conflist.find_primary(settings.conf_dir)
    if primary is None or settings.conf_dir / primary == path:
        return None
    return settings.conf_dir / primary


def remove_cni_config(settings: Settings, path: Path) -> None:
    """Istio's cleanup of the config: drop our plugin from a chained file, delete our own file.

    When the user's original was kept and the file has changed only by our entry since, the
    original comes back instead, as it was (a converted `.conf` under its own name).
    """
    if not settings.chained:
        path.unlink(missing_ok=True)
        return
    try:
        data, status = _read_config(path)
    except InstallError:
        return  # already gone: nothing of ours left in it
    text = data.decode("utf-8", errors="replace")
    if _restore_original(settings, path, text):
        return
    cleaned = conflist.remove(text, settings.plugin_name, str(path))
    if cleaned is None:
        logs.get().info("no plugin of ours in the CNI config; left untouched", path=str(path))
        return
    _write_like(_through_symlink(path), cleaned.encode(), status)


def _restore_original(settings: Settings, path: Path, current: str) -> bool:
    """Put back the kept original of `path` (merged in place, or converted); False: none fits."""
    log = logs.get()
    for original in (path, *conflist.siblings(path)):
        backup = _backup_of(settings, original)
        if not os.path.lexists(backup):
            continue
        kept = _read_text(backup)
        if kept is None or not conflist.only_ours_added(kept, current, settings.plugin_name):
            log.warning(
                "CNI config changed since the merge: removing only our plugin; original kept",
                path=str(path),
                original=str(backup),
            )
            return False
        try:
            if original == path:
                _write_like(_through_symlink(path), backup.read_bytes(), backup.stat())
                backup.unlink()
            else:
                os.replace(backup, original)
                path.unlink()
        except OSError as err:
            raise InstallError(f"cannot restore {original} from {backup}: {err.strerror}") from None
        log.info("restored the original CNI config", path=str(original))
        return True
    return False
