"""Configuration: one typed schema (schema.py) and its layered loader.

`load_config(argv)` is the entry point: it returns a frozen `Config` and the warnings, or
raises `ConfigError` listing every problem (file, section, key, value, fix).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from library.config import cli, loader
from library.config.loader import ConfigError
from library.config.schema import Config
from library.config.validate import family_problems, round_resolution, validate
from library.config.validate_training import canonical_optimizer

__all__ = ["Config", "ConfigError", "LoadedConfig", "family_problems", "load_config"]


@dataclass(frozen=True)
class LoadedConfig:
    config: Config
    warnings: tuple[str, ...]
    config_file: str | None
    output_config: str | None
    # Canonical keys given on the command line (flags or --set): they also override the
    # kohya dataset_config, which is read later by the data layer (library/data).
    cli_keys: frozenset[str] = frozenset()


def load_config(argv: list[str], *, check_paths: bool = True) -> LoadedConfig:
    ns, overrides, problems = cli.parse(argv)
    layers = loader.Layers()
    layers.problems.extend(problems)
    config_file = None
    if ns.config_file:
        path = loader.resolve_config_path(ns.config_file)
        config_file = str(path)
        loader.add_file(path, layers)
    loader.accelerate_env_layer(layers)
    loader.add_cli(overrides, layers)
    loader.add_set(ns.set, layers)
    loader.diffusers_script_defaults(
        layers, {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")})
    # a class path is no choice: the optimizer name is put in its canonical case here
    cfg = round_resolution(canonical_optimizer(loader.normalise(loader.build(layers))), layers)
    # Cross-key checks run even when other keys failed, so every problem comes out at once;
    # check_paths=False (--output_config, configs of another machine) skips only the checks
    # of required paths and of files and folders that must exist.
    validate(cfg, layers, check_paths=check_paths)
    if layers.problems:
        raise ConfigError(layers.problems)
    cli_keys = frozenset(k for k, e in layers.entries.items()
                         if e.origin.startswith("command line"))
    return LoadedConfig(cfg, tuple(layers.warnings), config_file, ns.output_config, cli_keys)
