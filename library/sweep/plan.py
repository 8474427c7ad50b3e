"""The runs of a sweep and the argv each one gets.

A sweep is a list of axes; each axis is a list of options and each option a tuple of
overrides. A `key=v1,v2` argument or a `[sweep]` list is one axis of single-key options; a
sweep TOML's `[[runs]]` list is one axis whose options are whole tables. The runs are the
Cartesian product of the axes, in order (the last axis varies fastest).
"""
from __future__ import annotations

import difflib
import itertools
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from library.config import schema
from library.sweep.values import Override, SweepError, exact_id, from_toml, parse_assignment, \
    run_name, short_hash

# Keys the sweep sets itself for every run, so runs cannot collide or overlay wrongly.
MANAGED = ("output_dir", "logging_dir", "log_tracker_name")
TOML_KEYS = ("base", "name", "out", "train_args", "sweep", "runs")

Option = tuple[Override, ...]


@dataclass(frozen=True)
class Run:
    name: str
    overrides: Option


@dataclass
class Sweep:
    base: str | None                      # the training config (--config_file), if any
    axes: list[list[Option]] = field(default_factory=list)
    name: str | None = None
    out: str | None = None
    train_args: list[str] = field(default_factory=list)


def canonical(key: str) -> str | None:
    """The schema name of `section.key` / `key` / an alias; None when unknown (the config
    loader reports unknown keys with a suggestion)."""
    home = schema.key_homes().get(key.rpartition(".")[2])
    return home[1].name if home else None


def is_sweep_toml(path: Path) -> bool:
    """A sweep TOML has a `[sweep]` table or a `[[runs]]` list; a training config has
    neither (they would be unknown sections there)."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError):
        return False  # the config loader reports it with file, line and column
    return "sweep" in data or "runs" in data


def flatten(table: dict) -> list[tuple[str, object]]:
    """`{optimizer = {learning_rate = 1}}` (unquoted dotted keys) -> `optimizer.learning_rate`;
    a table under another key (network_args = {...}) is a value."""
    sections = set(schema.SECTIONS) | set(schema.SECTION_ALIASES)
    out = []
    for k, v in table.items():
        if isinstance(v, dict) and k in sections:
            out.extend((f"{k}.{kk}", vv) for kk, vv in v.items())
        else:
            out.append((k, v))
    return out


def read_sweep_toml(path: Path) -> Sweep:
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    problems = []
    for k in data:
        if k not in TOML_KEYS:
            close = difflib.get_close_matches(k, TOML_KEYS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"{path}: {k}: unknown sweep key{hint}; expected "
                            f"{', '.join(TOML_KEYS)}")
    base = data.get("base")
    if base is not None and not isinstance(base, str):
        problems.append(f"{path}: base: expected the path of a training config, got {base!r}")
        base = None
    args = data.get("train_args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        problems.append(f"{path}: train_args: expected a list of strings, got {args!r}")
        args = []
    sweep = Sweep(str(path.parent / base) if base else None, name=data.get("name"),
                  out=data.get("out"), train_args=list(args))
    table = data.get("sweep", {})
    if not isinstance(table, dict):
        problems.append(f"{path}: sweep: expected a [sweep] table of lists, got {table!r}")
        table = {}
    for key, values in flatten(table):
        if not isinstance(values, list) or not values:
            problems.append(f"{path}: [sweep] {key}: expected a non-empty list of values, "
                            f"got {values!r}")
            continue
        try:
            sweep.axes.append([(from_toml(key, v),) for v in values])
        except ValueError as e:
            problems.append(f"{path}: [sweep] {key}: {e}")
    runs = data.get("runs")
    if runs is not None:
        if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs) or \
                not runs:
            problems.append(f"{path}: runs: expected [[runs]] tables of overrides")
        else:
            axis = []
            for i, r in enumerate(runs, 1):
                try:
                    axis.append(tuple(from_toml(k, v) for k, v in flatten(r)))
                except ValueError as e:
                    problems.append(f"{path}: [[runs]] #{i}: {e}")
            sweep.axes.append(axis)
    if problems:
        raise SweepError(problems)
    return sweep


def cli_axes(items: list[str]) -> list[list[Option]]:
    axes, problems = [], []
    for item in items:
        try:
            _, overrides = parse_assignment(item)
        except ValueError as e:
            problems.append(f"command line: {e}")
            continue
        axes.append([(o,) for o in overrides])
    if problems:
        raise SweepError(problems)
    return axes


def check_axes(axes: list[list[Option]]) -> None:
    """A key may vary on one axis only (two axes setting it would silently let one win),
    and never a key the sweep manages itself."""
    problems, owner = [], {}
    for n, axis in enumerate(axes):
        for option in axis:
            seen = set()
            for o in option:
                canon = canonical(o.key) or o.key
                if canon in MANAGED:
                    problems.append(f"{o.key}: set by the sweep for every run (each run gets "
                                    f"<sweep>/<run name>/ and a TensorBoard run of its name); "
                                    "it cannot be swept")
                if canon in seen:
                    problems.append(f"{o.key}: given twice in one run ({exact_id(option)!r})")
                seen.add(canon)
                if owner.setdefault(canon, n) != n:
                    problems.append(f"{o.key}: swept twice; give all its values in one list")
    if problems:
        raise SweepError(sorted(set(problems), key=problems.index))


def build_runs(axes: list[list[Option]]) -> list[Run]:
    """The Cartesian product of the axes, named after their overrides; names that collide
    (same text after sanitising, or case-insensitively) get a hash of the exact values."""
    check_axes(axes)
    combos = [tuple(o for option in combo for o in option) for combo in itertools.product(*axes)]
    names = [run_name(c) for c in combos]
    folded = [n.casefold() for n in names]
    runs = []
    for combo, name, f in zip(combos, names, folded):
        if folded.count(f) > 1:
            name = f"{name}__{short_hash(exact_id(combo))}"
        runs.append(Run(name, combo))
    if len({r.name.casefold() for r in runs}) != len(runs):
        raise SweepError(["the same combination of values is listed twice; remove the "
                          "duplicate"])
    return runs


def swept_keys(runs: list[Run]) -> list[str]:
    """Summary columns: every overridden key (as written), in order of first appearance."""
    keys: list[str] = []
    for r in runs:
        for o in r.overrides:
            if o.key not in keys:
                keys.append(o.key)
    return keys


def run_argv(sweep: Sweep, run: Run, run_dir: Path, logs: Path) -> list[str]:
    """train_network.py's argv: base config, the user's extra args, the sweep's own outputs,
    then the overrides as `--set` (applied last by the loader, so they win)."""
    argv = ["--config_file", sweep.base] if sweep.base else []
    argv += list(sweep.train_args)
    # Flags, not --set: their values are taken verbatim (a folder named "123" stays a str).
    argv += ["--output_dir", str(run_dir), "--logging_dir", str(logs),
             "--log_tracker_name", run.name, "--overwrite", "true"]
    for o in run.overrides:
        argv += ["--set", o.set_arg()]
    return argv
