"""When and where intermediate LoRAs and training states are written, and which are pruned.

Names (kohya's): `<name>-step00000500.safetensors` every `save_every_n_steps`,
`<name>-000003.safetensors` every `save_every_n_epochs`, the final `<name>.safetensors`; with
`save_state`, a `-state` folder beside each (`<name>-step00000500-state`, `<name>-state`).
`save_last_n_steps` keeps only the step saves of the last N steps, `save_last_n_epochs` only
the last N epoch saves; the final file is never pruned.
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


class Checkpointer:
    def __init__(self, saving, out_dir: Path, final_path: Path,
                 save_lora: Callable[[Path, int, int], None],
                 save_state: Callable[[Path, Position], None] | None, is_main: bool):
        self.s = saving
        self.dir = Path(out_dir)
        self.final_path = final_path
        self.save_lora = save_lora
        self.save_state = save_state if saving.save_state else None
        self.is_main = is_main
        self.name = saving.output_name

    def _write(self, stem: str, step: int, epoch: int, position: Position) -> None:
        if not self.is_main:
            return
        self.save_lora(self.dir / f"{stem}.safetensors", step, epoch)
        if self.save_state:
            self.save_state(self.dir / f"{stem}-state", position)

    def after_step(self, step: int, epoch: int, total: int, position: Position) -> None:
        every = self.s.save_every_n_steps
        if every and step % every == 0 and step < total:
            self._write(f"{self.name}-step{step:08d}", step, epoch, position)
            if self.s.save_last_n_steps:
                self._prune(re.compile(rf"^{re.escape(self.name)}-step(\d{{8}})"),
                            lambda n: n <= step - self.s.save_last_n_steps)

    def after_epoch(self, epoch: int, step: int, total: int, position: Position) -> None:
        every = self.s.save_every_n_epochs
        if every and epoch % every == 0 and step < total:
            self._write(f"{self.name}-{epoch:06d}", step, epoch, position)
            if self.s.save_last_n_epochs:
                self._prune(re.compile(rf"^{re.escape(self.name)}-(\d{{6}})(?:-state)?"
                                       r"(?:\.safetensors)?$"),
                            lambda n: n <= epoch - self.s.save_last_n_epochs * every)

    def final(self, step: int, epoch: int, position: Position) -> None:
        if not self.is_main:
            return
        self.save_lora(self.final_path, step, epoch)
        if self.save_state:
            self.save_state(self.dir / f"{self.name}-state", position)

    def _prune(self, pattern: re.Pattern, old: Callable[[int], bool]) -> None:
        if not self.is_main:
            return
        for p in self.dir.iterdir():
            m = pattern.match(p.name)
            if m and old(int(m.group(1))):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
