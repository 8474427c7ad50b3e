"""`opt()`: one schema field, its default and the metadata the loader, the docs and the CLI
read (the keys are listed in library/config/schema.py)."""
from __future__ import annotations

from dataclasses import field
from typing import Any


def opt(default: Any, doc: str, *, aliases: tuple[str, ...] = (), choices: tuple[str, ...] = (),
        planned: bool = False, minimum: float | None = None, exclusive_min: bool = False):
    """A schema field: default plus the metadata the loader, the docs and the CLI read."""
    meta = {"doc": doc, "aliases": aliases, "choices": choices, "planned": planned,
            "minimum": minimum, "exclusive_min": exclusive_min}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)
