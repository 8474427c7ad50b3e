"""One sweep run as a child process: its log, Ctrl-C forwarding, peak memory, `.done`.

The child runs in its own session (process group), so a terminal's Ctrl-C reaches only the
sweep, which forwards it once: the child stops cleanly (its files are saved atomically),
the sweep waits for it, records the run as interrupted and writes the summary. A second
Ctrl-C kills the child. SIGTERM is handled the same way.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DONE = ".done"
LOG = "train.log"


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    wall_s: float
    peak_rss_gib: float | None   # max RSS of the child (os.wait4), GiB
    interrupted: bool


def atomic_write_text(path: Path, text: str) -> None:
    """Temp file + rename: a reader (or a crash) sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def read_done(run_dir: Path) -> dict | None:
    try:
        data = json.loads((run_dir / DONE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_done(run_dir: Path, final_lora: Path, fingerprint: str) -> bool:
    """Finished by an earlier sweep with the same resolved config: the final LoRA is there
    and the marker says exit code 0. A changed base config or override runs it again."""
    done = read_done(run_dir)
    return bool(done) and done.get("exit_code") == 0 and final_lora.is_file() and \
        done.get("config_sha1") == fingerprint


def write_done(run_dir: Path, outcome: Outcome, fingerprint: str, argv: list[str]) -> None:
    atomic_write_text(run_dir / DONE, json.dumps({
        "exit_code": outcome.exit_code, "wall_s": outcome.wall_s,
        "peak_rss_gib": outcome.peak_rss_gib, "config_sha1": fingerprint, "argv": argv,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1) + "\n")


def rss_gib(ru_maxrss: int) -> float:
    # Linux reports KiB, macOS bytes.
    return ru_maxrss / (2**30 if sys.platform == "darwin" else 2**20)


class Runner:
    """Runs children one at a time; `stop_signal` is set once SIGINT/SIGTERM arrived."""

    def __init__(self):
        self.child: subprocess.Popen | None = None
        self.stop_signal: int | None = None
        self._previous = {}

    def __enter__(self) -> "Runner":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
            print(f"\n{signal.Signals(signum).name}: stopping the current run (again to "
                  "kill it)", file=sys.stderr, flush=True)
            self._send(signum)
        else:
            self._send(signal.SIGKILL)

    def _send(self, signum: int) -> None:
        if self.child is not None and self.child.returncode is None:
            try:
                os.killpg(self.child.pid, signum)
            except (ProcessLookupError, PermissionError):
                pass

    def run(self, cmd: list[str], log_path: Path) -> Outcome:
        """Run `cmd` (an argv list, never a shell string), stdout+stderr into `log_path`."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        with open(log_path, "wb") as log:
            # Unbuffered: train.log shows progress live and keeps stdout/stderr in order.
            env = os.environ | {"PYTHONUNBUFFERED": "1"}
            self.child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True,
                                          env=env)
            if self.stop_signal is not None:  # arrived while the child was starting
                self._send(self.stop_signal)
            # wait4 (not Popen.wait) also gives this child's own resource usage: its peak
            # RSS, where RUSAGE_CHILDREN would give the maximum over all earlier runs too.
            _, status, usage = os.wait4(self.child.pid, 0)
            code = os.waitstatus_to_exitcode(status)
            self.child.returncode = code
        self.child = None
        # A run that finished anyway (the signal came as it exited) counts as done.
        return Outcome(code, time.monotonic() - start, rss_gib(usage.ru_maxrss),
                       self.stop_signal is not None and code != 0)
