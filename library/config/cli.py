"""The command line: `--config_file`, `--set`, `--output_config` and one `--key` per schema key.

Every schema key (and each alias: kohya dataset-config names, the diffusers scripts' flags)
is a flag, and so is every other name of the kohya vocabulary (kohya_vocab.py), read the
same way as in a file. Boolean keys work as bare flags (`--gradient_checkpointing`) or with
a value.
"""
from __future__ import annotations

import argparse
import difflib
from dataclasses import fields
from typing import Any

from library.config import kohya_vocab, schema, values

_FLAG = object()  # a flag given without a value
GIVEN = "given_in_order"  # namespace attribute: every key flag as (dest, spelling, value)


class _Given(argparse.Action):
    """Records each key flag in command-line order with the spelling used, so a key given
    twice (`--network_dim 8 --rank 16`) is seen twice and warned about, as in a file."""

    def __call__(self, parser, namespace, value, option_string=None):
        if getattr(namespace, GIVEN, None) is None:
            setattr(namespace, GIVEN, [])
        getattr(namespace, GIVEN).append((self.dest, option_string[2:], value))

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_network.py", allow_abbrev=False,
        description="Train a LoRA for SD1.5 / SDXL from a TOML config. Every config key is "
                    "also a --key flag; see docs/CONFIG.md.")
    p.add_argument("--config_file", help="TOML config (`.toml` may be omitted).")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="Override one key, e.g. --set optimizer.learning_rate=5e-5.")
    p.add_argument("--output_config", metavar="PATH", nargs="?", const=_FLAG,
                   help="Write the resolved config to PATH and exit.")
    for sec_name, cls in schema.SECTIONS.items():
        group = p.add_argument_group(f"[{sec_name}]")
        for f in fields(cls):
            names = [f"--{f.name}"] + [f"--{a}" for a in f.metadata.get("aliases", ())]
            kind, _ = values.base_type(f.type)
            nargs = "*" if kind in ("dict", "FloatOrPair") else "?"
            extra = {"const": _FLAG} if nargs == "?" else {}
            group.add_argument(*names, dest=f"key:{f.name}", nargs=nargs, default=None,
                               action=_Given, help=f.metadata["doc"], **extra)
    # Every other name of the kohya vocabulary (kohya_vocab.py) is a flag too: bare
    # (`--lowram`), with a value, or with several (`--lr_scheduler_args a=1 b=2`).
    for name in sorted(kohya_vocab.ALL_NAMES - set(kohya_vocab.COMMAND_LINE)):
        p.add_argument(f"--{name}", dest=f"vocab:{name}", nargs="*", default=None,
                       action=_Given, help=argparse.SUPPRESS)
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
            names = list(homes) + sorted(kohya_vocab.ALL_NAMES)
            close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            problems.append(f"command line: --{name}: unknown option{hint}")
            # `--learning_rat 1e-4`: the word after an unknown flag is its value, not a
            # second problem.
            if "=" not in item and i < len(unknown) and not unknown[i].startswith("-"):
                i += 1
        else:
            problems.append(f"command line: unexpected argument {item!r}")
    if ns.output_config is _FLAG:  # sd-scripts' bare flag writes over --config_file
        problems.append("command line: --output_config: needs a PATH to write the resolved "
                        "config to (tomlora never writes over the --config_file it reads)")
        ns.output_config = None
    overrides: list[tuple[str, Any]] = []
    for dest, spelled, v in getattr(ns, GIVEN, []):
        if dest.startswith("key:"):
            kind, _ = values.base_type(homes[dest[4:]][1].type)
            if v is _FLAG:
                if kind != "bool":
                    problems.append(f"command line: --{spelled}: needs a value")
                    continue
                v = True
            overrides.append((spelled, v))
        else:
            words = [values.parse_scalar(w) for w in v]
            bare = [] if spelled in kohya_vocab.MULTI_VALUE else True
            overrides.append((spelled, bare if not words else
                              words[0] if len(words) == 1 else words))
    return ns, overrides, problems
