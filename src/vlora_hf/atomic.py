"""Write a folder so that no interruption leaves it half-written or lost.

The folder is built in ``.NAME.tmp-PID-XXXX`` beside the target ``NAME``; once complete it is renamed to
``.NAME.new-PID-XXXX`` (complete, waiting), then swapped in: ``NAME -> .NAME.old-PID-XXXX``, ``.NAME.new-* -> NAME``,
the old folder removed. Every step is one rename, so after a kill at any point the names say what happened, and
the next write to ``NAME`` (or :func:`recover`) finishes or undoes it and says so:

- ``.NAME.new-*`` present: the new folder was complete; the swap is finished.
- ``.NAME.old-*`` present and ``NAME`` missing: the old folder is restored.
- ``.NAME.old-*`` present beside ``NAME``: the swap had finished; the old folder is removed.
- ``.NAME.tmp-PID-*`` whose process is gone: a partial write; removed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def _siblings(target: Path, kind: str) -> list[Path]:
    return sorted(p for p in target.parent.glob(f".{target.name}.{kind}-*") if p.is_dir())


def _owner_alive(path: Path) -> bool:
    pid = path.name.rsplit(".tmp-", 1)[-1].split("-", 1)[0]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def recover(target: str | os.PathLike, log: Callable[[str], None] = _say) -> list[str]:
    """Finish or undo an interrupted write to ``target`` and remove stale partial folders; returns (and logs)
    one message per action taken."""
    target = Path(target).absolute()
    messages: list[str] = []
    ready, old = _siblings(target, "new"), _siblings(target, "old")
    if ready:
        newest = max(ready, key=lambda p: p.stat().st_mtime)
        if target.exists():
            parked = target.with_name(f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
            os.rename(target, parked)
            old.append(parked)
        os.rename(newest, target)
        messages.append(f"finished an interrupted write: {target} now holds the new folder from {newest.name}")
        for extra in ready:
            if extra != newest:
                shutil.rmtree(extra, ignore_errors=True)
    elif old and not target.exists():
        newest = max(old, key=lambda p: p.stat().st_mtime)
        os.rename(newest, target)
        old.remove(newest)
        messages.append(f"restored {target} from {newest.name}, left by an interrupted write")
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
        messages.append(f"removed {path.name}, the previous {target.name} left by an interrupted write")
    for path in _siblings(target, "tmp"):
        if not _owner_alive(path):
            shutil.rmtree(path, ignore_errors=True)
            messages.append(f"removed {path.name}, a partial folder left by an interrupted write")
    for message in messages:
        log(message)
    return messages


def _normal_permissions(folder: Path) -> None:
    """mkdtemp makes 0700 folders and some writers 0600 files: give the result the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    for root, _, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def _refuse_unless(target: Path, replace: bool) -> None:
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not replace:
        raise ValueError(f"{target} is not empty (replacing it was not asked for)")


def swap_in(folder: Path, target: Path) -> None:
    """Put the complete ``folder`` at ``target`` (replacing it) with renames a kill cannot leave half-done."""
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    ready = target.with_name(f".{target.name}.new-{tag}")
    os.rename(folder, ready)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{tag}")
        os.rename(target, old)
    try:
        os.rename(ready, target)
    except OSError:
        if old is not None:
            os.rename(old, target)
        shutil.rmtree(ready, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, replace: bool = False,
                  log: Callable[[str], None] = _say) -> Iterator[Path]:
    """Yield an empty temp folder beside ``target``; when the block succeeds it becomes ``target`` (replacing a
    non-empty one only with ``replace``), when it fails it vanishes. Interrupted earlier writes to ``target`` are
    recovered first (see :func:`recover`)."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target, log)
    _refuse_unless(target, replace)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        _normal_permissions(tmp)
        _refuse_unless(target, replace)  # nobody filled it meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_in(tmp, target)


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``target`` (same suffix, so writers that infer the format from it work); when the
    block succeeds it replaces ``target`` in one rename, when it fails it vanishes. Parent folders are created."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}{target.suffix}")
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


__all__ = ["atomic_file", "atomic_folder", "recover", "swap_in"]
