"""One run at a time per output_dir: a lock file held for the run's lifetime.

`<output_dir>/.tomlora.lock` holds the owner's PID, host and start time. It is created
atomically (written under a temporary name, then hard-linked into place, which fails if the
name exists), so two runs started together cannot both get it. A lock whose PID is no longer
running on this host is stale (the run was killed): it is taken over with a warning naming
it. A live lock, or one from another host (whose process cannot be checked from here), stops
the new run with an error naming the other run.

Taking the lock is also the check that output_dir can be created and written, before any
model loads.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from library.durable import remove_leftovers, tmp_path

LOCK_NAME = ".tomlora.lock"


class LockError(Exception):
    """output_dir is in use or cannot be written."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    def __init__(self, out_dir: Path):
        self.dir = Path(out_dir)
        self.path = self.dir / LOCK_NAME
        self.created_dir = False
        self.held = False
        self.note: str | None = None  # set when a stale lock was taken over

    def acquire(self) -> "RunLock":
        try:
            self.created_dir = not self.dir.exists()
            self.dir.mkdir(parents=True, exist_ok=True)
            me = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            for _ in range(3):
                if self._create(json.dumps(me).encode()):
                    self.held = True
                    return self
                self._handle_existing()
        except OSError as e:
            raise LockError(f"output_dir {self.dir}: cannot write there ({e.strerror or e}); "
                            "choose a folder you can write to") from None
        raise LockError(f"output_dir {self.dir}: could not take the lock {self.path}")

    def _create(self, data: bytes) -> bool:
        tmp = tmp_path(self.path)
        tmp.write_bytes(data)
        try:
            os.link(tmp, self.path)  # atomic, and fails if another run holds the name
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: exclusive create instead
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _handle_existing(self) -> None:
        try:
            other = json.loads(self.path.read_text())
            pid, host = int(other["pid"]), str(other["host"])
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, ValueError, KeyError, TypeError):
            other, pid, host = {}, -1, ""
        here = socket.gethostname()
        if host == here and pid > 0 and pid != os.getpid() and _alive(pid):
            raise LockError(f"output_dir {self.dir} is in use by another run (PID {pid} on "
                            f"{host}, started {other.get('started', '?')}); wait for it to "
                            "finish or choose another output_dir")
        if host and host != here:
            raise LockError(f"output_dir {self.dir} is locked by a run on host {host} (PID "
                            f"{pid}, started {other.get('started', '?')}); if that run has "
                            f"ended, delete {self.path}, or choose another output_dir")
        self.note = (f"output_dir {self.dir}: took over a stale lock of a run that is no "
                     f"longer running (PID {pid}, started {other.get('started', '?')})"
                     if pid > 0 else f"output_dir {self.dir}: replaced an unreadable lock file")
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        self.path.unlink(missing_ok=True)
        if self.created_dir:  # a run that wrote nothing leaves no empty folder behind
            try:
                self.dir.rmdir()
            except OSError:
                pass


def claim_output_dir(out_dir: Path, cleanup) -> list[str]:
    """Lock `out_dir` until `cleanup` (an ExitStack) closes, then remove the temporary files
    an interrupted run left there. Returns the notes to log; LockError if it is in use.
    Under `accelerate launch` only the main process (RANK 0) locks and tidies: the others
    are the same run."""
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return []
    lock = cleanup.enter_context(RunLock(out_dir))
    return [n for n in [lock.note] if n] + [
        f"{out_dir}: removed {name}, left by an interrupted run"
        for name in remove_leftovers(out_dir)]
