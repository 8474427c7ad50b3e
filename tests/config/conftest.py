"""Fixtures of the config tests."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _no_accelerate_env(monkeypatch):
    """`accelerate launch` exports ACCELERATE_MIXED_PRECISION; tests that need it set it."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)


@pytest.fixture
def write(tmp_path):
    """write("name.toml", text) -> the resolved path of a new file under tmp_path."""
    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path.resolve()
    return _write
