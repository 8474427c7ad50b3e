"""Config-file migrations between `config_version`s.

A file states the schema version it was written for (`config_version = 1`); when a key is
renamed or moved in a later version, add a step here that rewrites the old spelling, so old
files keep loading and the user is told what changed.
"""
from __future__ import annotations

from library.config.schema import CONFIG_VERSION

# version -> function(data) -> (data, notes). Step N migrates a version-N file to N+1.
STEPS: dict = {}


def migrate(data: dict, origin: str) -> tuple[dict, list[str]]:
    version = data.get("config_version", CONFIG_VERSION)
    notes: list[str] = []
    if not isinstance(version, int) or version < 1 or version > CONFIG_VERSION:
        notes.append(f"{origin}: config_version {version!r} is unknown (this tomlora reads "
                     f"1..{CONFIG_VERSION}); reading it as version {CONFIG_VERSION}")
        return data, notes
    while version < CONFIG_VERSION:
        data, step_notes = STEPS[version](dict(data))
        notes.extend(f"{origin}: {n}" for n in step_notes)
        version += 1
    return data, notes
