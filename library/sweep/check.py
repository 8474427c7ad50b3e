"""Every run's config, loaded and validated before the first run starts.

Each run's argv goes through `library.config.load_config` exactly as train_network.py will
read it (path checks on), so a typo in one value stops the whole sweep before any training.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from library.config import ConfigError, load_config
from library.config.output import config_to_toml
from library.sweep.plan import Run, Sweep, run_argv
from library.sweep.runner import LOG


@dataclass(frozen=True)
class Planned:
    run: Run
    argv: list[str]          # train_network.py's arguments
    dir: Path                # <sweep>/<run name>: the run's output_dir
    final: Path              # the final LoRA file
    output_name: str
    fingerprint: str         # sha1 of the resolved config, kept in the `.done` marker

    @property
    def log(self) -> Path:
        return self.dir / LOG


def final_lora(cfg) -> Path:
    # As train_network.output_paths (tools never import the training script).
    s = cfg.saving
    name = "pytorch_lora_weights.safetensors" if s.save_model_as == "diffusers" else \
        f"{s.output_name}.safetensors"
    return Path(s.output_dir) / name


def plan_runs(sweep: Sweep, runs: list[Run], sweep_dir: Path
              ) -> tuple[list[Planned], list[str], list[str]]:
    """-> (planned runs, problems, warnings). A problem shared by every run (a bad base
    config) is listed once; one that only some runs have names them."""
    planned, by_problem, warnings = [], {}, []
    logs = sweep_dir / "logs"
    for run in runs:
        run_dir = sweep_dir / run.name
        argv = run_argv(sweep, run, run_dir, logs)
        try:
            loaded = load_config(argv, check_paths=True)
        except ConfigError as e:
            for p in e.problems:
                by_problem.setdefault(p, []).append(run.name)
            continue
        warnings += [w for w in loaded.warnings if w not in warnings]
        cfg = loaded.config
        digest = hashlib.sha1(config_to_toml(cfg).encode("utf-8")).hexdigest()
        planned.append(Planned(run, argv, run_dir, final_lora(cfg), cfg.saving.output_name,
                               digest))
    problems = []
    for p, names in by_problem.items():
        if len(names) == len(runs):
            problems.append(p)
        else:
            problems.append(f"{p} (run{'s' * (len(names) > 1)}: {', '.join(names)})")
    return planned, problems, warnings
