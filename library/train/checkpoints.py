"""When and where intermediate LoRAs and training states are written, and which are pruned.

Names (kohya's): `<name>-step00000500.safetensors` every `save_every_n_steps`,
`<name>-000003.safetensors` every `save_every_n_epochs`, the final `<name>.safetensors`; with
`save_state`, a `-state` folder beside each (`<name>-step00000500-state`, `<name>-state`).
`save_last_n_steps` keeps only the step saves of the last N steps, `save_last_n_epochs` only
the last N epoch saves; `save_last_n_steps_state` / `save_last_n_epochs_state` do the same for
the state folders (default: the same N). The final file is never pruned.
`save_state_on_train_end` writes the final `-state` folder without save_state (kohya);
`save_n_epoch_ratio` sets the epoch interval from the run's length.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Callable

from library.train.state import Position


def existing_saves(out_dir: Path, name: str) -> list[Path]:
    """Intermediate saves (and state folders) of `name` already in `out_dir`, by name: what
    a new run of that output_name would replace or mix with its own saves."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    pattern = re.compile(rf"^{re.escape(name)}(?:-step\d{{8}}|-\d{{6}})?"
                         r"(?:-state|\.safetensors)$")
    final = f"{name}.safetensors"  # the final file has its own check (and name, diffusers)
    return sorted(p for p in out_dir.iterdir() if pattern.match(p.name) and p.name != final)


def epoch_interval(saving, epochs: int) -> int | None:
    """Epochs between epoch saves: save_every_n_epochs, or with save_n_epoch_ratio about that
    many saves over the run's `epochs` (kohya: floor(epochs / ratio), at least 1)."""
    if saving.save_n_epoch_ratio:
        return max(1, epochs // saving.save_n_epoch_ratio)
    return saving.save_every_n_epochs


class Checkpointer:
    def __init__(self, saving, out_dir: Path, final_path: Path,
                 save_lora: Callable[[Path, int, int], None],
                 save_state: Callable[[Path, Position], None] | None, is_main: bool,
                 epochs: int = 0):
        self.s = saving
        self.dir = Path(out_dir)
        self.final_path = final_path
        self.save_lora = save_lora
        self.save_state = save_state if saving.save_state else None
        # the final (and interrupted) save also writes a state with save_state_on_train_end
        self.end_state = save_state if saving.save_state or saving.save_state_on_train_end \
            else None
        self.is_main = is_main
        self.name = saving.output_name
        self.every_epochs = epoch_interval(saving, epochs)
        self.last_save: tuple[int, str] | None = None  # (step, name) of the last save

    def _write(self, stem: str, step: int, epoch: int, position: Position) -> None:
        self.last_save = (step, stem)
        if not self.is_main:
            return
        self.save_lora(self.dir / f"{stem}.safetensors", step, epoch)
        if self.save_state:
            self.save_state(self.dir / f"{stem}-state", position)

    def after_step(self, step: int, epoch: int, total: int, position: Position) -> None:
        every = self.s.save_every_n_steps
        if every and step % every == 0 and step < total:
            self._write(f"{self.name}-step{step:08d}", step, epoch, position)
            pattern = re.compile(rf"^{re.escape(self.name)}-step(\d{{8}})")
            self._prune(pattern, self.s.save_last_n_steps, self.s.save_last_n_steps_state,
                        lambda n, keep: n <= step - keep)

    def after_epoch(self, epoch: int, step: int, total: int, position: Position) -> None:
        every = self.every_epochs
        if every and epoch % every == 0 and step < total:
            self._write(f"{self.name}-{epoch:06d}", step, epoch, position)
            pattern = re.compile(rf"^{re.escape(self.name)}-(\d{{6}})(?:-state)?"
                                 r"(?:\.safetensors)?$")
            self._prune(pattern, self.s.save_last_n_epochs, self.s.save_last_n_epochs_state,
                        lambda n, keep: n <= epoch - keep * every)

    def final(self, step: int, epoch: int, position: Position) -> None:
        if not self.is_main:
            return
        self.save_lora(self.final_path, step, epoch)
        if self.end_state:
            self.end_state(self.dir / f"{self.name}-state", position)

    def interrupted(self, step: int, epoch: int, position: Position) -> list[Path]:
        """Ctrl-C / SIGTERM: the LoRA (and state) under the step's name, unless this very
        step was just saved. Returns the paths of the saves that now hold this step."""
        saved_now = self.last_save is not None and self.last_save[0] == step
        stem = self.last_save[1] if saved_now else f"{self.name}-step{step:08d}"
        lora, state = self.dir / f"{stem}.safetensors", self.dir / f"{stem}-state"
        if self.is_main:
            if not saved_now:
                self.save_lora(lora, step, epoch)
            if self.end_state and not state.is_dir():
                self.end_state(state, position)
        return [lora] + ([state] if self.end_state else [])

    def _prune(self, pattern: re.Pattern, keep_files: int | None, keep_states: int | None,
               old: Callable[[int, int], bool]) -> None:
        """Remove the step/epoch saves older than the last `keep_files`, and the state
        folders older than the last `keep_states` (default `keep_files`)."""
        keep_states = keep_states or keep_files
        if not self.is_main or not (keep_files or keep_states):
            return
        for p in self.dir.iterdir():
            m = pattern.match(p.name)
            if not m:
                continue
            keep = keep_states if p.name.endswith("-state") else keep_files
            if keep and old(int(m.group(1)), keep):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
