"""`sweep_summary.csv` and `sweep_summary.md`: one row per run, read from the runs' own
TensorBoard events (so the summary and TensorBoard cannot disagree).

Peak memory: `peak_gpu_gib` is the largest `perf/peak_gpu_gib` scalar the run logged
(torch.cuda.max_memory_allocated; "n/a" on CPU); `peak_rss_gib` is the child process's
maximum resident set size, from os.wait4 (the whole process: CPU tensors, Python, libraries).
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

from library.sweep.runner import atomic_write_text

STATUSES = ("done", "failed", "skipped-done", "interrupted", "pending")
METRICS = ["status", "exit_code", "loss_average", "loss_validation", "steps", "wall_s",
           "peak_gpu_gib", "peak_rss_gib", "output", "log"]
NA = "n/a"


@dataclass
class Scalars:
    loss_average: float | None = None    # the last loss/average
    loss_validation: float | None = None  # the last loss/validation
    steps: int | None = None              # the step of the last loss/average
    peak_gpu_gib: float | None = None


@dataclass
class Row:
    run: str
    values: dict[str, str]                # swept key (as written) -> value label
    status: str
    output: str
    log: str
    exit_code: int | None = None
    wall_s: float | None = None
    peak_rss_gib: float | None = None
    scalars: Scalars = field(default_factory=Scalars)


def read_scalars(run_logdir: Path) -> Scalars:
    """The summary numbers of one TensorBoard run folder (all its event files)."""
    if not run_logdir.is_dir():
        return Scalars()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    # Keep every scalar (the default reservoir samples long runs); skip images.
    acc = EventAccumulator(str(run_logdir), size_guidance={
        "scalars": 0, "images": 1, "tensors": 1, "histograms": 1, "audio": 1,
        "compressedHistograms": 1})
    acc.Reload()
    tags = set(acc.Tags().get("scalars", []))

    def events(tag):
        return sorted(acc.Scalars(tag), key=lambda e: (e.step, e.wall_time)) \
            if tag in tags else []

    s = Scalars()
    avg = events("loss/average")
    if avg:
        s.loss_average, s.steps = float(avg[-1].value), int(avg[-1].step)
    val = events("loss/validation")
    if val:
        s.loss_validation = float(val[-1].value)
    gpu = events("perf/peak_gpu_gib")
    if gpu:
        s.peak_gpu_gib = max(float(e.value) for e in gpu)
    return s


def _number(v, fmt: str | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return NA
    if fmt is None or isinstance(v, int):
        return repr(v) if isinstance(v, float) else str(v)
    return format(v, fmt)


def cells(row: Row, keys: list[str], exact: bool) -> list[str]:
    """One row's cells; `exact` keeps full float precision (CSV), else short (Markdown)."""
    s = row.scalars

    def f(v, fmt):
        return _number(v, None if exact else fmt)

    return [row.run, *(row.values.get(k, "") for k in keys), row.status,
            "" if row.exit_code is None else str(row.exit_code),
            f(s.loss_average, ".4f"), f(s.loss_validation, ".4f"),
            NA if s.steps is None else str(s.steps), f(row.wall_s, ".1f"),
            f(s.peak_gpu_gib, ".2f"), f(row.peak_rss_gib, ".2f"), row.output, row.log]


def header(keys: list[str]) -> list[str]:
    return ["run", *keys, *METRICS]


def to_csv(rows: list[Row], keys: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header(keys))
    for r in rows:
        w.writerow(cells(r, keys, exact=True))
    return buf.getvalue()


def to_markdown(rows: list[Row], keys: list[str]) -> str:
    def esc(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    head = header(keys)
    lines = ["| " + " | ".join(esc(h) for h in head) + " |",
             "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in cells(r, keys, exact=False)) + " |"
              for r in rows]
    return "\n".join(lines) + "\n"


def write_summary(sweep_dir: Path, rows: list[Row], keys: list[str]) -> tuple[Path, Path]:
    """Both files, each written atomically (temp + rename)."""
    csv_path, md_path = sweep_dir / "sweep_summary.csv", sweep_dir / "sweep_summary.md"
    atomic_write_text(csv_path, to_csv(rows, keys))
    atomic_write_text(md_path, to_markdown(rows, keys))
    return csv_path, md_path
