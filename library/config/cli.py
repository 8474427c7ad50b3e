"""The command line: `--config_file`, `--set`, `--output_config` and one `--key` per schema key.

Every schema key (and each alias: kohya dataset-config names, the diffusers scripts' flags)
is a flag. Boolean keys work as bare flags (`--gradient_checkpointing`) or with a value.
"""
from __future__ import annotations

import argparse
import difflib
from dataclasses import fields
from typing import Any

from library.config import schema, values

_FLAG = object()  # a flag given without a value

# Flags of the diffusers example scripts that set a key to a fixed value.
FLAG_TRANSLATIONS = {
    "use_8bit_adam": ("optimizer_type", "AdamW8bit"),
}
# Flags we refuse with a pointer to what to do instead.
REFUSED = {
    "dataset_name": "hub datasets are not read at run time; download the dataset and pass "
                    "--train_data_dir with its folder (images + metadata.csv/jsonl)",
    "push_to_hub": "tomlora does not upload; copy the LoRA from output_dir yourself",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_network.py", allow_abbrev=False,
        description="Train a LoRA for SD1.5 / SDXL from a TOML config. Every config key is "
                    "also a --key flag; see docs/CONFIG.md.")
    p.add_argument("--config_file", help="TOML config (`.toml` may be omitted).")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="Override one key, e.g. --set optimizer.learning_rate=5e-5.")
    p.add_argument("--output_config", metavar="PATH",
                   help="Write the resolved config to PATH and exit.")
    for sec_name, cls in schema.SECTIONS.items():
        group = p.add_argument_group(f"[{sec_name}]")
        for f in fields(cls):
            names = [f"--{f.name}"] + [f"--{a}" for a in f.metadata.get("aliases", ())]
            kind, _ = values.base_type(f.type)
            nargs = "*" if kind in ("dict", "FloatOrPair") else "?"
            extra = {"const": _FLAG} if nargs == "?" else {}
            group.add_argument(*names, dest=f"key:{f.name}", nargs=nargs, default=None,
                               help=f.metadata["doc"], **extra)
    for flag in list(FLAG_TRANSLATIONS) + list(REFUSED):
        p.add_argument(f"--{flag}", dest=f"special:{flag}", nargs="?", const=_FLAG,
                       default=None, help=argparse.SUPPRESS)
    return p


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[tuple[str, Any]], list[str]]:
    """-> (namespace, [(key, raw value)], problems)."""
    parser = build_parser()
    ns, unknown = parser.parse_known_args(argv)
    problems: list[str] = []
    homes = schema.key_homes()
    i = 0
    while i < len(unknown):
        item = unknown[i]
        i += 1
        if item.startswith("--"):
            name = item[2:].split("=", 1)[0]
            close = difflib.get_close_matches(name, list(homes), n=1, cutoff=0.6)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            problems.append(f"command line: --{name}: unknown option{hint}")
            # `--learning_rat 1e-4`: the word after an unknown flag is its value, not a
            # second problem.
            if "=" not in item and i < len(unknown) and not unknown[i].startswith("-"):
                i += 1
        else:
            problems.append(f"command line: unexpected argument {item!r}")
    overrides: list[tuple[str, Any]] = []
    for dest, v in vars(ns).items():
        if v is None:
            continue
        if dest.startswith("key:"):
            key = dest[4:]
            f = homes[key][1]
            kind, _ = values.base_type(f.type)
            if v is _FLAG:
                if kind != "bool":
                    problems.append(f"command line: --{key}: needs a value")
                    continue
                v = True
            overrides.append((key, v))
        elif dest.startswith("special:"):
            flag = dest[8:]
            if flag in REFUSED:
                problems.append(f"command line: --{flag}: not supported: {REFUSED[flag]}")
            elif v is _FLAG or values.to_bool(v):
                overrides.append(FLAG_TRANSLATIONS[flag])
    return ns, overrides, problems
