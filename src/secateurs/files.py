"""Writing files so they appear whole or not at all.

Every output secateurs writes (models, reports, checkpoints, benchmark JSON, kernel caches) goes
through :func:`write_atomic` or :func:`replace_folder`: a temporary name in the target's own folder
(so the final rename never crosses a file system), then ``os.replace``. A crash, a full disk or a
Ctrl-C leaves the previous file or the new one, never half of either.

A folder built in place (a saved model, a cached shortcut) is made by :func:`make_temporary`, which
writes an owner file (pid and host) beside it: a process killed mid-write cannot clean up, so the
next write into the same folder calls :func:`remove_abandoned`, which removes temporary folders whose
owner is gone. :func:`check_writable` finds what can be known before any work (a read-only or full
disk), and :func:`os_reason` turns an OS error during the write into a few words for a one-line error.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import UsageError

Content = bytes | str | Callable[[Path], None]
OWNER_SUFFIX = ".owner"


def write_atomic(path: str | Path, content: Content, make_parents: bool = True) -> Path:
    """Write ``content`` (bytes, text, or a function that writes the file at the path it is given)
    to ``path`` through a temporary file and a rename. On any failure the temporary file is removed
    and the exception propagates unchanged, so each caller words its own one-line error."""
    target = Path(path)
    if make_parents:
        target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(name)
    try:
        if callable(content):
            os.close(handle)
            content(tmp)
        else:
            with os.fdopen(handle, "wb") as out:
                out.write(content.encode() if isinstance(content, str) else content)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def replace_folder(tmp: Path, target: Path) -> Path:
    """Move the finished folder ``tmp`` to ``target``, replacing an existing ``target`` only once the
    new one is complete: the old folder is renamed aside, the new one renamed in, then the old removed."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        old.rmdir()
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old)
    else:
        tmp.rename(target)
    return target


def check_writable(target: Path, flag: str, expected_bytes: int | None = None) -> None:
    """``target`` can be created: its nearest existing parent is a folder we can write in (probed with
    a real temporary file, so read-only mounts are caught too) with room for ``expected_bytes``."""
    base = target.parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise UsageError(f"{flag}: {base} is a file, so nothing can be created under it; choose another path")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as exc:
        raise UsageError(f"{flag}: cannot write in {base} ({exc.strerror or exc}); choose a writable folder") from None
    if expected_bytes:
        free = shutil.disk_usage(base).free
        if free < expected_bytes:
            raise UsageError(
                f"{flag}: the output needs about {expected_bytes / 2**30:.2f} GiB and {base} has "
                f"{free / 2**30:.2f} GiB free; free space or choose another disk"
            )


def make_temporary(parent: Path, prefix: str) -> tuple[Path, Path]:
    """A new hidden folder in ``parent`` and its owner file (pid, host), written before any content."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    owner = tmp.with_name(tmp.name + OWNER_SUFFIX)
    owner.write_text(json.dumps({"secateurs_temporary": tmp.name, "pid": os.getpid(), "host": socket.gethostname()}))
    return tmp, owner


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_abandoned(parent: Path) -> list[Path]:
    """Remove the temporary folders in ``parent`` that a killed secateurs process left: only those
    with an owner file naming this host and a process that no longer runs; returns what was removed."""
    removed = []
    host = socket.gethostname()
    for owner in parent.glob(f".*{OWNER_SUFFIX}"):
        try:
            info = json.loads(owner.read_text())
            name, pid = str(info["secateurs_temporary"]), int(info["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if info.get("host") != host or _alive(pid) or owner.name != name + OWNER_SUFFIX:
            continue
        shutil.rmtree(parent / name, ignore_errors=True)
        owner.unlink(missing_ok=True)
        removed.append(parent / name)
    return removed


def os_reason(exc: BaseException) -> str:
    """The operating system's reason in a few words (safetensors wraps it in its own message)."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    text = str(exc)
    for needle, reason in (("StorageFull", "no space left on device"), ("ReadOnlyFilesystem", "read-only file system"),
                           ("PermissionDenied", "permission denied")):
        if needle in text:
            return reason
    return text.splitlines()[0][:200] if text else type(exc).__name__
