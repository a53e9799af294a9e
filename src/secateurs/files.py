"""Writing files so they appear whole or not at all.

Every output secateurs writes (models, reports, checkpoints, benchmark JSON, kernel caches) goes
through :func:`write_atomic` or :func:`replace_folder`: a temporary name in the target's own folder
(so the final rename never crosses a file system), then ``os.replace``. A crash, a full disk or a
Ctrl-C leaves the previous file or the new one, never half of either.

A folder built in place (a saved model, a cached shortcut, a recipe's OUT) is built in
:func:`temporary_folder`, removed if the build fails. It writes an owner file (pid and host) beside
it (:func:`make_temporary`): a process killed mid-write cannot clean up, so the next one into the
same parent first calls :func:`remove_abandoned`, which removes temporary folders whose owner is gone.
:func:`check_writable` finds what can be known before any work (a read-only or full disk), and
:func:`os_reason` turns an OS error during the write into a few words for a one-line error.

Two runs never write one output: :func:`output_lock` holds a lock file beside OUT (``.OUT.lock``,
which also covers ``--stream``'s ``.OUT.partial``) from after the pre-flight checks to the final
rename. It is the same kind of owner file (pid and host), locked with ``flock`` so the kernel drops
the lock when its process dies: a second run gets one line naming the first's pid, and the lock
file of a killed run is simply taken over. :func:`resolve_out` and :func:`check_replaceable` keep a
path that cannot be resolved, or a folder ``--overwrite`` must not replace, to one line before any work.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UsageError

Content = bytes | str | Callable[[Path], None]
OWNER_SUFFIX = ".owner"
LOCK_SUFFIX = ".lock"
# Set by the process holding a lock, so the torchrun ranks it launches (``--nproc``) write under it.
HOLDER_ENV = "SECATEURS_LOCK_HOLDER"
_held: dict[Path, tuple[int, int]] = {}  # lock file → (thread holding it, nesting depth)
_held_guard = threading.Lock()


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


@contextmanager
def temporary_folder(parent: Path, prefix: str) -> Iterator[Path]:
    """A new hidden folder in ``parent`` (abandoned ones removed first) to build a folder in before it
    is renamed into place: removed with what it holds if the block fails, its owner file removed either way."""
    parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(parent)
    tmp, owner = make_temporary(parent, prefix)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        owner.unlink(missing_ok=True)


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


def resolve_out(out: str | Path, flag: str = "--out") -> Path:
    """``out`` as an absolute path, or one line when it cannot be one: bytes that are not UTF-8 (they
    would fail only when the record is written, after the work) or a symbolic link loop."""
    text = os.fspath(out)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{flag} {text!r} is not valid UTF-8; choose a name in UTF-8") from None
    try:
        return Path(text).expanduser().resolve()
    except RuntimeError:  # Python < 3.13 reports a loop this way
        raise UsageError(f"{flag} {text}: a symbolic link in it loops; choose another path") from None
    except OSError as exc:
        raise UsageError(f"{flag} {text} cannot be resolved ({os_reason(exc)}); choose another path") from None


def check_protected(target: Path, flag: str) -> None:
    """``target`` is not a folder secateurs may ever replace: the current folder, one above it, the
    home folder or one above it (a typo there would lose everything)."""
    here = Path.cwd().resolve()
    if target == here:
        raise UsageError(f"{flag} {target} is the current folder; secateurs never replaces it; choose a new folder")
    if target in here.parents:
        raise UsageError(f"{flag} {target} holds the current folder; secateurs never replaces it; choose a new folder")
    try:
        home = Path.home().resolve()
    except (RuntimeError, KeyError):  # no home folder known
        home = None
    if home is not None and (target == home or target in home.parents):
        raise UsageError(
            f"{flag} {target} is or holds the home folder; secateurs never replaces it; choose a new folder"
        )


def check_replaceable(target: Path, flag: str, marker: str) -> None:
    """What ``--overwrite`` may replace: an empty folder or a secateurs output (``marker`` present),
    and never a protected folder (:func:`check_protected`)."""
    check_protected(target, flag)
    if target.is_dir() and not (target / marker).is_file() and any(target.iterdir()):
        raise UsageError(
            f"{flag} {target} holds files secateurs did not write (no {marker}); --overwrite replaces only an "
            "empty folder or a secateurs output; choose another folder"
        )


def lock_file(target: Path) -> Path:
    """The lock file of output ``target``: beside it, so it survives ``target`` being replaced."""
    return target.parent / f".{target.name}{LOCK_SUFFIX}"


@contextmanager
def output_lock(target: Path, flag: str = "--out") -> Iterator[None]:
    """Hold ``target`` (and ``.target.partial``) against every other writer while the block runs.

    Nested use by the same thread (a stage inside a run that already holds it) is free; another
    thread or process gets a one-line :class:`UsageError` naming the holder's pid. Under torchrun
    only rank 0 writes, under the lock its launcher holds (``--nproc``) or its own.
    """
    path = lock_file(target)
    me = threading.get_ident()
    with _held_guard:
        held = _held.get(path)
        if held is not None and held[0] != me:
            raise UsageError(_busy(target, flag, f"pid {os.getpid()}, this process"))
        if held is not None:
            _held[path] = (me, held[1] + 1)
    if held is not None:
        try:
            yield
        finally:
            with _held_guard:
                _held[path] = held
        return
    if _launcher_holds(path):
        yield
        return
    handle = _acquire(path, target, flag)
    with _held_guard:
        _held[path] = (me, 1)
    try:
        yield
    finally:
        with _held_guard:
            _held.pop(path, None)
            if not _held:
                os.environ.pop(HOLDER_ENV, None)
        path.unlink(missing_ok=True)
        os.close(handle)


def _busy(target: Path, flag: str, holder: str) -> str:
    return (f"{flag} {target} is being written by another secateurs run ({holder}); "
            "wait for it to end or choose another folder")


def _read_owner(path: Path) -> dict:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _launcher_holds(path: Path) -> bool:
    """A torchrun rank: rank 0 writes under its launcher's lock (if it holds one), other ranks never write."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if os.environ.get("RANK", "0") != "0":
        return True
    info = _read_owner(path)
    return str(info.get("pid")) == os.environ.get(HOLDER_ENV) and info.get("host") == socket.gethostname()


def _acquire(path: Path, target: Path, flag: str) -> int:
    """Open and ``flock`` the lock file, then write this process's pid and host into it.

    The lock is retried when the file was replaced between open and lock (its releasing holder
    unlinks it), so two runs can never each lock a different file of the same name.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(handle)
                info = _read_owner(path)
                holder = f"pid {info['pid']} on {info.get('host', '?')}" if "pid" in info else "its pid not yet written"
                raise UsageError(_busy(target, flag, holder)) from None
            except OSError:
                os.close(handle)
                raise
            try:
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(handle).st_ino:
                break
            os.close(handle)
        owner = {"secateurs_lock": target.name, "pid": os.getpid(), "host": socket.gethostname()}
        try:
            os.ftruncate(handle, 0)
            os.write(handle, json.dumps(owner).encode())
        except OSError:
            path.unlink(missing_ok=True)
            os.close(handle)
            raise
    except OSError as exc:
        raise UsageError(f"could not lock {flag} {target} ({os_reason(exc)}); choose a writable folder") from None
    os.environ[HOLDER_ENV] = str(os.getpid())
    return handle
