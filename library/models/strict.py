"""Build a model from its config and load converted weights strictly.

diffusers' `from_single_file` loads with `strict=False` and does not report missing weights
(they stay randomly initialised or on the meta device), so a checkpoint that does not fit
its config would train silently on garbage. Here every parameter must come from the file,
and a mismatch is an error naming the config folder to fix.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from library.models.errors import ModelLoadError


def load_strict(build: Callable[[], torch.nn.Module], state: dict, *, what: str, source: str,
                config_dir: Path | str) -> torch.nn.Module:
    """`build()` runs without allocating weights; the tensors of `state` become the
    parameters (no copy), in the dtype they were stored in."""
    from accelerate import init_empty_weights
    with init_empty_weights():
        model = build()
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    hint = (f"the {what} weights in {source} do not match the config in {config_dir}; if this "
            "checkpoint is a fine-tune with other shapes, set model_config_dir to a diffusers "
            "folder (configs and tokenizers, no weights needed) that describes it")
    if missing or unexpected:
        raise ModelLoadError(f"{hint} ({len(missing)} missing, e.g. {missing[:2]}; "
                             f"{len(unexpected)} unexpected, e.g. {unexpected[:2]})")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:  # shape mismatches
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln),
                      str(e).splitlines()[0])
        raise ModelLoadError(f"{hint} ({detail})") from None
    return model.eval()


def cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model.to(dtype)` only when some floating weight differs (diffusers warns on every
    `.to(dtype)` call, even a no-op one)."""
    if any(p.is_floating_point() and p.dtype != dtype for p in model.parameters()):
        model = model.to(dtype)
    return model
