"""The resolved config as TOML (written beside the LoRA and by --output_config)."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import tomli_w

from library.config.schema import Config


def config_to_dict(cfg: Config) -> dict:
    """Sections of set keys; None (unset) values are left out, as TOML has no null."""
    out: dict = {"config_version": cfg.config_version}
    for section, values in asdict(cfg).items():
        if isinstance(values, dict):
            out[section] = {k: (list(v) if isinstance(v, tuple) else v)
                            for k, v in values.items() if v is not None}
    return out


def config_to_toml(cfg: Config) -> str:
    return tomli_w.dumps(config_to_dict(cfg))


def write_config_toml(cfg: Config, path: Path) -> None:
    # Imported here: networks.kohya_file imports torch, and the config package stays light
    # (`--output_config` and the config tests load no torch).
    from networks.kohya_file import atomic_write_bytes
    atomic_write_bytes(Path(path), config_to_toml(cfg).encode("utf-8"))
