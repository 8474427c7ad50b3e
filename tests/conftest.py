"""Shared pytest fixtures: tiny SD1.5 / SDXL diffusers folders built offline once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.make_tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory) -> Path:
    """A tiny SD1.5-shaped diffusers pipeline folder (seed 0). Treat it as read-only."""
    return build_tiny_model("sd15", tmp_path_factory.mktemp("tiny") / "tiny-sd15", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    """A tiny SDXL-shaped diffusers pipeline folder (seed 0). Treat it as read-only."""
    return build_tiny_model("sdxl", tmp_path_factory.mktemp("tiny") / "tiny-sdxl", seed=0)
