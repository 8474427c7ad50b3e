#!/usr/bin/env python
"""Generate docs/CONFIG.md from the config schema (library/config/schema.py) and the CLI.

    python tools/gen_config_docs.py           # (re)write docs/CONFIG.md
    python tools/gen_config_docs.py --check   # exit 1 if docs/CONFIG.md is stale

The schema is the single source of truth: keys, types, defaults, docs, aliases, choices,
ranges and the `planned` marker all come from the dataclass fields; the "Coming from
sd-scripts" table from library/config/kohya_vocab.py and sd_scripts_names.py. tests/config/test_docs.py keeps the file current.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from library.config import cli, kohya_vocab, schema, sd_scripts_names, values  # noqa: E402

DOC_PATH = ROOT / "docs" / "CONFIG.md"

# Not in the schema: the contract of train_network.py (DESIGN.md section 4).
EXIT_CODES = (
    ("0", "done"),
    ("2", "bad config or data: every problem is listed, nothing was trained or written"),
    ("1", "failure during training: the last good checkpoint and state stay intact"),
)

# The precedence of the layers, lowest first, as library/config/__init__.py applies them.
LAYERS = (
    "schema defaults (this page)",
    "`base` files of the config file: `base = \"file.toml\"` or a list, paths relative to the "
    "file that names them; a base file may have its own `base` (applied before it), and a "
    "later entry of the list overrides an earlier one",
    "the config file given with `--config_file`",
    "`ACCELERATE_MIXED_PRECISION` (set by `accelerate launch --mixed_precision=...`): only "
    "for `mixed_precision`, and only when no config or base file sets it",
    "command-line flags `--key value` / `--key=value`",
    "`--set section.key=value`, applied last whatever its place on the command line; among "
    "several `--set` of one key the last one wins",
)

_TYPE_NAMES = {
    "bool": "bool",
    "int": "int",
    "float": "float",
    "str": "string",
    "tuple": "resolution",
    "dict": "table",
    "FloatOrPair": "float or [float, float]",
    "list": "array of tables",
}


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def type_name(f) -> str:
    name, optional = values.base_type(f.type)
    out = _TYPE_NAMES.get(name, name)
    return f"{out} (optional)" if optional else out


def toml_literal(v) -> str:
    """A default as the user would write it in TOML; unset (None) as `unset`."""
    if v is None:
        return "unset"
    if isinstance(v, bool):
        return "`true`" if v else "`false`"
    if isinstance(v, str):
        return f'`"{v}"`'
    if isinstance(v, dict):
        inner = ", ".join(f"{k} = {toml_literal(x).strip('`')}" for k, x in v.items())
        return f"`{{{inner}}}`" if inner else "`{}`"
    if isinstance(v, (list, tuple)):
        return "`[" + ", ".join(toml_literal(x).strip("`") for x in v) + "]`"
    return f"`{v!r}`"


def default_of(f):
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def range_of(f) -> str:
    minimum = f.metadata.get("minimum")
    if minimum is None:
        return ""
    rel = ">" if f.metadata.get("exclusive_min") else "≥"
    return f"{rel} {minimum:g}"


def meaning(f) -> str:
    doc = f.metadata["doc"]
    if f.metadata.get("planned"):
        return f"**not implemented yet**: setting it to anything but the default is an error. {doc}"
    return doc


def section_aliases() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {s: [] for s in schema.SECTIONS}
    for alias, canon in schema.SECTION_ALIASES.items():
        out[canon].append(alias)
    return out


def cli_only_flags() -> list[tuple[str, str]]:
    """The flags that are not config keys, with their help text from the parser."""
    parser = cli.build_parser()
    keyed = {"help"}
    rows = []
    for action in parser._actions:  # argparse has no public list of its actions
        if action.dest in keyed or action.dest.startswith(("key:", "special:")):
            continue
        flag = action.option_strings[-1]
        meta = action.metavar or ("PATH" if action.dest != "set" else "SECTION.KEY=VALUE")
        rows.append((f"{flag} {meta}", action.help or ""))
    return rows


def kohya_state(name: str) -> tuple[str, str]:
    """(state, what it does here) of one sd-scripts or front-end name."""
    homes = schema.key_homes()
    if name in homes:
        sec, f = homes[name]
        if f.metadata.get("planned"):
            return "refused when set", "not implemented yet; accepted at its default"
        if f.name != name:
            return "implemented", f"alias of [{sec}] `{f.name}`"
        return "implemented", f"[{sec}] `{f.name}`"
    if name in kohya_vocab.TRANSLATED:
        return "implemented", "means " + kohya_vocab.TRANSLATED[name].means
    if name in kohya_vocab.COMMAND_LINE:
        return "implemented", "command line: " + kohya_vocab.COMMAND_LINE[name]
    if name in kohya_vocab.NO_EFFECT:
        return "no effect", kohya_vocab.NO_EFFECT[name]
    if name in kohya_vocab.PENDING_IMPLEMENTATION:
        return "being implemented", ("not supported in this build yet: refused when set, "
                                     "accepted when off or empty")
    r = kohya_vocab.REFUSED[name]
    fix = r.fix[0].upper() + r.fix[1:] if not r.fix.startswith("is ") else \
        f"`{name}` {r.fix}"
    off = ", ".join(repr(o) for o in r.off)
    return ("refused" if r.always else "refused when set",
            fix + (f" (accepted: {off})" if off else ""))


def render_kohya(w) -> None:
    w("## Coming from sd-scripts")
    w("")
    w("A config written for kohya-ss/sd-scripts' `train_network.py` / "
      "`sdxl_train_network.py`, by the kohya_ss GUI, LoRA_Easy_Training_Scripts or "
      "lora-scripts runs unchanged, model and data paths aside. Every option of those "
      "scripts (read from sd-scripts commit "
      f"`{kohya_vocab.SD_SCRIPTS_COMMIT[:10]}`), every key of sd-scripts' dataset config and "
      "the keys these front-ends write is in one of three states, in a file and as a "
      "`--flag` alike:")
    w("")
    w("- **implemented**: the key of the same name, an alias, or a translation;")
    w("- **no effect**: accepted; the run prints one summary line naming these keys and why;")
    w("- **refused** (exit code 2) with what to do. Most are refused only **when set**: the "
      "off value front-ends write for an unused field (`false`, `\"\"`, `0`, an empty list) "
      "is read as unset, as sd-scripts reads it.")
    w("")
    w("`\"\"` is unset for every key (its default); `0` is unset for "
      + ", ".join(f"`{k}`" for k in kohya_vocab.ZERO_IS_UNSET)
      + ", which sd-scripts tests for truth. A name in none of these lists is a typo, "
      "reported with a \"did you mean\".")
    w("")
    names = list(dict.fromkeys(sd_scripts_names.SD_SCRIPTS_OPTIONS
                               + sd_scripts_names.DATASET_CONFIG_KEYS
                               + tuple(kohya_vocab.FRONT_END_KEYS)))
    counts: dict[str, int] = {}
    for name in sd_scripts_names.SD_SCRIPTS_OPTIONS:
        state = kohya_state(name)[0]
        counts[state] = counts.get(state, 0) + 1
    w(f"Of sd-scripts' {len(sd_scripts_names.SD_SCRIPTS_OPTIONS)} options: "
      + ", ".join(f"{n} {state}" for state, n in counts.items()) + ".")
    w("")
    w("| name | from | state | here |")
    w("|---|---|---|---|")
    for name in names:
        origin = kohya_origin(name)
        state, what = kohya_state(name)
        w(f"| `{name}` | {origin} | {state} | {_cell(what)} |")
    w("")


def kohya_origin(name: str) -> str:
    parts = []
    if name in sd_scripts_names.SD_SCRIPTS_OPTIONS:
        parts.append("option")
    if name in sd_scripts_names.DATASET_CONFIG_KEYS:
        parts.append("dataset config")
    if name in kohya_vocab.FRONT_END_KEYS:
        parts.append(kohya_vocab.FRONT_END_KEYS[name])
    return ", ".join(parts)


def render() -> str:
    out: list[str] = []
    w = out.append
    w("# Configuration reference")
    w("")
    w("<!-- Generated by tools/gen_config_docs.py from library/config/schema.py; do not edit. "
      "Run `python tools/gen_config_docs.py` after changing the schema. -->")
    w("")
    w("A run is configured by one TOML file (`--config_file`), command-line flags, or both. "
      "Key names are kohya-ss/sd-scripts' names. Every key below is also a command-line flag "
      "`--key`. Loading is strict: an unknown key, a value of the wrong type, out of range or "
      "not among the choices stops the run before any model loads, with every problem "
      "listed at once, each naming the file, the section and the key.")
    w("")
    w("## Layers")
    w("")
    w("Later layers override earlier ones:")
    w("")
    for i, layer in enumerate(LAYERS, 1):
        w(f"{i}. {layer}")
    w("")
    w("Within one file, a key given twice (in two tables, or under two spellings such as "
      "`network_dim` and `rank`) takes the later value, as sd-scripts does, with a warning "
      "naming both places when the values differ.")
    w("")
    w("## Sections")
    w("")
    w("The config file is read the way sd-scripts reads it: every table, whatever its name "
      "(`[additional_network_arguments]`, `[sdxl_arguments]`, `[Basics]`, ...), and keys at "
      "the top level; a key's meaning comes from its name, not its table. Tables inside "
      "tables (`[network_args.args]`, as LoRA_Easy_Training_Scripts writes) are read too; a "
      "table named after a key (`[optimizer_args]`) is that key's value. The sections below "
      "are the documented form, the one tomlora writes. A config in kohya's style gets one "
      "summary line: how many keys were read from how many tables, and which have no effect "
      "here (see [Coming from sd-scripts](#coming-from-sd-scripts)).")
    w("")
    w("| section | also written as |")
    w("|---|---|")
    for sec, aliases in section_aliases().items():
        w(f"| `[{sec}]` | {', '.join(f'`[{a}]`' for a in aliases) or '-'} |")
    w("")
    w("Types: `resolution` is `512`, `\"768,512\"` or `[768, 512]` (width, height); `table` is "
      "a TOML table (`{conv_dim = 4}`) or a list of `\"key=value\"` strings "
      "(`[\"conv_dim=4\"]`), whose values are typed as int, float, bool or string. "
      "`(optional)` keys may be left unset. Choices are matched case-insensitively.")
    w("")
    w("## Keys")
    for sec, cls in schema.SECTIONS.items():
        w("")
        w(f"### [{sec}]")
        w("")
        w("| key | type | default | range / choices | aliases | meaning |")
        w("|---|---|---|---|---|---|")
        for f in fields(cls):
            choices = ", ".join(f"`{c}`" for c in f.metadata.get("choices", ()))
            limits = " ".join(x for x in (range_of(f), choices) if x) or "-"
            aliases = ", ".join(f"`{a}`" for a in f.metadata.get("aliases", ())) or "-"
            w(f"| `{f.name}` | {type_name(f)} | {_cell(toml_literal(default_of(f)))} | "
              f"{_cell(limits)} | {aliases} | {_cell(meaning(f))} |")
    w("")
    w("## Command line")
    w("")
    w("`python train_network.py [--config_file FILE] [--key VALUE ...] [--set SECTION.KEY=VALUE "
      "...]`")
    w("")
    w("Flags that are not config keys:")
    w("")
    w("| flag | meaning |")
    w("|---|---|")
    for flag, help_text in cli_only_flags():
        w(f"| `{flag}` | {_cell(help_text)} |")
    w("")
    w("Every key is a flag: `--network_dim 16` or `--network_dim=16`, and so is each alias "
      "(`--rank 16`). Boolean keys also work as bare flags (`--gradient_checkpointing`). "
      "Table keys take several words: `--network_args conv_dim=4 conv_alpha=1`. "
      "`--config_file config` finds `config.toml`, as kohya's scripts do.")
    w("")
    w("### Flags of the diffusers example scripts")
    w("")
    w("The flags of `train_text_to_image_lora.py` / `train_dreambooth_lora.py` that share "
      "a key's name (`--resolution`, `--center_crop`, `--learning_rate`, ...) are that key. "
      "`accelerate launch --mixed_precision=...` is read from the environment (see Layers). "
      "Aliases, in a file or as flags (kohya dataset-config and diffusers-script names):")
    w("")
    w("| alias | key |")
    w("|---|---|")
    for sec, cls in schema.SECTIONS.items():
        for f in fields(cls):
            for alias in f.metadata.get("aliases", ()):
                w(f"| `{alias}` | `{f.name}` ([{sec}]) |")
    w("")
    w("The other flags of these scripts (`--use_8bit_adam`, `--push_to_hub`, "
      "`--dataset_name`) are in the table of the next section.")
    w("")
    render_kohya(w)
    w("## Exit codes")
    w("")
    w("| code | meaning |")
    w("|---|---|")
    for code, text in EXIT_CODES:
        w(f"| {code} | {text} |")
    w("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if docs/CONFIG.md differs from the schema")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        current = DOC_PATH.read_text(encoding="utf-8") if DOC_PATH.is_file() else None
        if current != text:
            print(f"{DOC_PATH.relative_to(ROOT)} is stale; run: python tools/gen_config_docs.py",
                  file=sys.stderr)
            return 1
        print(f"{DOC_PATH.relative_to(ROOT)} is current")
        return 0
    DOC_PATH.parent.mkdir(parents=True, exist_ok=True)
    DOC_PATH.write_text(text, encoding="utf-8")
    print(f"wrote {DOC_PATH.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
