"""Ctrl-C (SIGINT) and SIGTERM: stop after the current step and save, instead of losing the
work since the last save.

`GracefulStop.install()` before the loop: the first signal only sets `stop.requested` (the
loop checks it after each step, saves the LoRA and state under the step's name and exits
130 / 143); a second signal raises `Interrupted` at once. Stopping at once tears nothing:
every file is written under a temporary name and renamed (library/durable.py), and the next
run removes the temporary leftovers. Before the loop (model loading, caching) a signal
raises `Interrupted` straight away: nothing has been trained yet.

`run_main(main)` is the script's entry point: it turns `Interrupted` / KeyboardInterrupt
into one line and exit code 130 (SIGINT) or 143 (SIGTERM) instead of a traceback.

Test hook: with `TOMLORA_TEST_STEP_FILE` set, `after_step` writes the step number to that
file after step `TOMLORA_TEST_STEP` (default: the first step it sees) and waits (up to
60 s) for a signal, so a test can signal a subprocess right after a known step without
sleeping on a guess.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupted(KeyboardInterrupt):
    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum, frame):
    raise Interrupted(signum)


class GracefulStop:
    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 130)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def install(self) -> "GracefulStop":
        if _main_thread():
            for s in EXIT_CODES:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise Interrupted(signum)  # the second signal: stop at once
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving "
              "(press Ctrl-C again to stop at once without saving)", file=sys.stderr,
              flush=True)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def summary(self, step: int, saved: list[Path]) -> str:
        """The one line printed on the way out."""
        state = next((p for p in saved if p.name.endswith("-state")), None)
        return (f"{self.name}: stopped after step {step}; saved "
                + " and ".join(str(p) for p in saved)
                + (f"; resume with --resume {state}" if state else ""))

    def after_step(self, step: int) -> bool:
        """True when the loop should stop (a signal came)."""
        flag = os.environ.get("TOMLORA_TEST_STEP_FILE")
        at = int(os.environ.get("TOMLORA_TEST_STEP", step))
        if flag and step == at and not self.requested:
            Path(flag).write_text(str(step))
            deadline = time.time() + 60
            while not self.requested and time.time() < deadline:
                time.sleep(0.01)
        return self.requested


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def run_main(main) -> int:
    """Call `main()` with SIGTERM raising like Ctrl-C; either becomes one line and exit code
    130 / 143."""
    if _main_thread():
        signal.signal(signal.SIGTERM, _raise)
    try:
        return main()
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"\n{signal.Signals(signum).name}: stopped at once; files saved before are "
              "intact (temporary files are removed by the next run in this output_dir)",
              file=sys.stderr)
        return EXIT_CODES[signum]
