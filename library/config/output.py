"""The resolved config as TOML (written beside the LoRA and by --output_config)."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import tomli_w

from library.config.schema import Config


# Keys never written out (the saved config, the LoRA metadata, TensorBoard), as sd-scripts
# leaves them out of its saved config.
SECRET_KEYS = ("wandb_api_key",)


def without_secrets(sections: dict) -> dict:
    """asdict(Config) with the SECRET_KEYS removed from every section."""
    return {name: ({k: v for k, v in values.items() if k not in SECRET_KEYS}
                   if isinstance(values, dict) else values)
            for name, values in sections.items()}


def config_to_dict(cfg: Config) -> dict:
    """Sections of set keys; None (unset) values and secrets are left out, as TOML has no
    null and the file is shared."""
    out: dict = {"config_version": cfg.config_version}
    for section, values in without_secrets(asdict(cfg)).items():
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
