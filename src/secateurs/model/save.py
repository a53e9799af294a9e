"""Save a pruned model as a normal Hugging Face folder plus ``secateurs.json``, atomically.

The folder is written under a temporary name beside OUT and renamed only when complete, so an
interrupted or failed save never leaves a half-written OUT, and OUT can never be the input model.
Each temporary folder has an owner file beside it (pid and host); a process killed mid-save cannot
clean up, so the next save into the same folder removes temporary folders whose owner is gone.
Everything about OUT that can be known in advance (overlap, writable, free space) is checked
before any work by :func:`check_output`; an OS error during the save itself becomes one line.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

from safetensors import SafetensorError

from ..errors import UsageError
from ..files import replace_folder, write_atomic
from .load import LoadedModel
from .slice import remote_code_files

RECORD = "secateurs.json"
OWNER_SUFFIX = ".owner"


def check_out(out: str | Path, input_path: Path | None, overwrite: bool) -> Path:
    """Validate OUT against the input and what is already there; returns it resolved."""
    target = Path(out).expanduser().resolve()
    if input_path is not None:
        source = input_path.resolve()
        # A folder input owns everything under it; a file input (.gguf) only itself, so a sibling
        # folder is fine, but neither may be replaced by OUT or an OUT above it.
        owned = source if source.is_dir() else None
        if target == source or target in source.parents or (owned is not None and owned in target.parents):
            raise UsageError(f"--out {out} overlaps the input model {input_path}; choose another folder")
    if target.exists() and not overwrite:
        raise UsageError(f"--out {out} already exists; pass --overwrite or choose another folder")
    if target.exists() and not target.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder; choose another path")
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


def check_output(out: str | Path, source: str | None, overwrite: bool, expected_bytes: int | None = None) -> Path:
    """Everything about OUT that can be known before the model loads: not over the input (MODEL as
    typed), free or ``overwrite``, creatable, writable, room for ``expected_bytes``; returns it resolved."""
    target = check_out(out, local_input(source) if source else None, overwrite)
    check_writable(target, f"--out {out}", expected_bytes)
    return target


def check_output_file(path: str | Path, flag: str) -> Path:
    """A file output (``--json``): not a folder, and its folder creatable and writable; returns it resolved."""
    target = Path(path).expanduser().resolve()
    if target.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file name")
    check_writable(target, f"{flag} {path}")
    return target


def write_output_file(path: str | Path, text: str, flag: str) -> Path:
    """Write a small output file atomically (its folder created); an OS error becomes one line."""
    target = Path(path).expanduser().resolve()
    try:
        write_atomic(target, text)
    except OSError as exc:
        raise UsageError(f"could not write {flag} {path}: {exc.strerror or exc}; nothing was written") from None
    return target


def local_input(source: str) -> Path | None:
    """The input model's path when MODEL names something on disk (for the overlap check)."""
    path = Path(source).expanduser()
    return path if path.exists() else None


def previous_stages(input_path: Path | None) -> list[dict]:
    """The stages recorded in the input's ``secateurs.json``, so chained runs keep their history."""
    if input_path is None or not (input_path / RECORD).is_file():
        return []
    try:
        return list(json.loads((input_path / RECORD).read_text()).get("stages", []))
    except (json.JSONDecodeError, AttributeError):
        return []


def save_model(
    loaded: LoadedModel, out: str | Path, record: dict, overwrite: bool = False, extras: dict[str, bytes] | None = None
) -> Path:
    """Write model, tokenizer, ``secateurs.json`` and ``extras`` (file name → bytes, e.g. a plot) to
    OUT via a temporary folder and a rename, so they appear together or not at all."""
    target = check_out(out, loaded.local_path, overwrite)
    check_writable(target, f"--out {out}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned(target.parent)
        tmp, owner = make_temporary(target.parent, f".{target.name}.tmp-")
    except OSError as exc:
        raise UsageError(f"could not write --out {out}: {exc.strerror or exc}; nothing was written") from None
    try:
        loaded.model.save_pretrained(tmp)
        for name, source in remote_code_files(loaded.model).items():  # per-layer widths: see slice.py
            (tmp / name).write_text(source)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        (tmp / RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
        for name, data in (extras or {}).items():
            (tmp / name).write_bytes(data)
        replace_folder(tmp, target)
    except (OSError, SafetensorError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f"could not write --out {out}: {os_reason(exc)}; nothing was written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        owner.unlink(missing_ok=True)
    return target


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
