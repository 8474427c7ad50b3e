"""Durable files: write under a temporary name, fsync, rename.

A crash, a kill or a full disk leaves either the old file or the new one, never a torn one.
Every temporary name (files and state folders) starts with `TMP_PREFIX`, so the next run in
the folder finds and removes what a killed run left (`remove_leftovers`); a leftover can
never pass for a save (it starts with a dot and matches no save name).

Fault injection for the reliability tests (tests/reliability): `TOMLORA_FAULT` holds
comma-separated `ACTION@N` items; at the N-th save point of the process (each durable write
is one, just before its rename; `save_point` marks others) the action runs:
`kill` (SIGKILL itself), `enospc` (raise OSError ENOSPC), `sigint` / `sigterm` (send itself
the signal). Unset, the hook costs one dict lookup.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import signal
from pathlib import Path

TMP_PREFIX = ".tomlora-tmp-"
# Temporary names written by earlier versions (before TMP_PREFIX): removed the same way.
_LEGACY = re.compile(r"^\..+\.tmp(-\d+)?$|^.+-state\.(tmp|old)$")

# An older state folder moved aside while its replacement was renamed in (state.py).
_MOVED_ASIDE = re.compile(rf"^{re.escape(TMP_PREFIX)}(.+)-old-\d+$")

_points = 0


def save_point(what: str) -> None:
    """A point where a kill or a fault must leave every file intact (test hook)."""
    global _points
    spec = os.environ.get("TOMLORA_FAULT")
    if not spec:
        return
    _points += 1
    for item in spec.split(","):
        action, _, n = item.strip().partition("@")
        if n.isdigit() and int(n) == _points:
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif action == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), what)
            elif action in ("sigint", "sigterm"):
                os.kill(os.getpid(), signal.SIGINT if action == "sigint" else signal.SIGTERM)


def tmp_path(path: Path) -> Path:
    """The temporary sibling `path` is written under before the rename."""
    path = Path(path)
    return path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, then rename: a crash never leaves a torn file.
    An OSError (disk full, permission) names `path`; the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        save_point(str(path))
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        if e.errno is None or e.filename == str(path):
            raise
        raise OSError(e.errno, e.strerror, str(path)) from None  # name the file, not the tmp
    finally:
        if tmp.exists():
            tmp.unlink()


def is_leftover(name: str) -> bool:
    return name.startswith(TMP_PREFIX) or bool(_LEGACY.match(name))


def remove_leftovers(folder: Path) -> list[str]:
    """Remove the temporary files and folders an interrupted run left in `folder` (and its
    sample/ subfolder); returns their names. An older state folder caught between the two
    renames of a swap is put back instead. Call only while holding the folder's lock."""
    removed = []
    for d in (Path(folder), Path(folder) / "sample"):
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            moved = _MOVED_ASIDE.match(p.name)
            if moved and p.is_dir() and not (d / moved.group(1)).exists():
                # killed between the two renames of a state swap: the old state is whole
                p.rename(d / moved.group(1))
                removed.append(f"{p.name} (restored as {moved.group(1)})")
                continue
            if is_leftover(p.name):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                removed.append(p.name if d == Path(folder) else f"sample/{p.name}")
    return removed
