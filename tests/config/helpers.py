"""Helpers of the config tests: load a command line, collect the problems it reports."""
from __future__ import annotations

from pathlib import Path

import pytest

from library.config import ConfigError, LoadedConfig, load_config

REPO = Path(__file__).resolve().parents[2]


def load(argv, *, check_paths: bool = False) -> LoadedConfig:
    return load_config([str(a) for a in argv], check_paths=check_paths)


def problems(argv, *, check_paths: bool = False) -> list[str]:
    """Every problem of a command line that must not load."""
    with pytest.raises(ConfigError) as info:
        load(argv, check_paths=check_paths)
    return info.value.problems


def only_problem(argv, *, check_paths: bool = False) -> str:
    found = problems(argv, check_paths=check_paths)
    assert len(found) == 1, found
    return found[0]
