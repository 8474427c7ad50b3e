"""Helpers of the config tests: load a command line, collect the problems it reports."""
from __future__ import annotations

from pathlib import Path

import pytest

from library.config import ConfigError, LoadedConfig, load_config, schema

REPO = Path(__file__).resolve().parents[2]


def load(argv, *, check_paths: bool = False) -> LoadedConfig:
    return load_config([str(a) for a in argv], check_paths=check_paths)


def problems(argv, *, check_paths: bool = False) -> list[str]:
    """Every problem of a command line that must not load."""
    with pytest.raises(ConfigError) as info:
        load(argv, check_paths=check_paths)
    return info.value.problems


def problems_if_any(argv, *, check_paths: bool = False) -> list[str]:
    """The problems of a command line; [] when it loads."""
    try:
        load(argv, check_paths=check_paths)
    except ConfigError as e:
        return e.problems
    return []


def only_problem(argv, *, check_paths: bool = False) -> str:
    found = problems(argv, check_paths=check_paths)
    assert len(found) == 1, found
    return found[0]


def planned_keys(keys) -> tuple[str, ...]:
    """Those of `keys` (canonical names or aliases) that the schema marks as planned (known,
    not implemented yet), in the given order. Tests of real-world configs expect exactly
    these to be refused, and xfail (strictly) the full load while any is left."""
    homes = schema.key_homes()
    return tuple(k for k in keys if homes[k][1].metadata.get("planned"))


def planned_xfail(planned, reason: str):
    """Strict xfail while `planned` is not empty: the marker goes away by itself when the
    keys land, and a config that loads while a key is still planned fails the suite."""
    return pytest.mark.xfail(bool(planned), strict=True, raises=ConfigError, reason=reason)
