"""Writing files so they appear whole or not at all.

Every output secateurs writes (models, reports, checkpoints, benchmark JSON, kernel caches) goes
through :func:`write_atomic` or :func:`replace_folder`: a temporary name in the target's own folder
(so the final rename never crosses a file system), then ``os.replace``. A crash, a full disk or a
Ctrl-C leaves the previous file or the new one, never half of either.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

Content = bytes | str | Callable[[Path], None]


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
