"""Layered loading: defaults < `base` files < the config file < accelerate's env (only
`mixed_precision`, only when no file sets it) < CLI flags < `--set` (always last).

Every problem is collected and raised at once as a ``ConfigError``; each message names the
file (or "command line"), the section, the key, the value and the fix.
"""
from __future__ import annotations

import difflib
import os
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from library.config import kohya_vocab, schema, values
from library.config.migrate import migrate


class ConfigError(Exception):
    """Bad configuration: every problem found, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass
class Entry:
    value: Any
    origin: str          # "config.toml" or "command line"
    section: str         # the section the user wrote it in ("" for top level / CLI)
    key: str = ""        # the spelling the user wrote (an alias, say); "" = canonical name


class Layers:
    """Raw values keyed by canonical key name, later layers overriding earlier ones."""

    def __init__(self):
        self.entries: dict[str, Entry] = {}
        self.problems: list[str] = []
        self.warnings: list[str] = []
        # Keys whose value failed typing or range checks: cross-key checks skip them, so
        # one mistake is reported once.
        self.failed: set[str] = set()
        # Set when a file could not be read or a section was unknown: "required key" checks
        # would then report keys the user did write, so they are skipped.
        self.incomplete = False

    def put(self, key: str, entry: Entry):
        self.entries[key] = entry


def _suggest(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def where(origin: str, section: str, key: str) -> str:
    sec = f"[{section}] " if section else ""
    return f"{origin}: {sec}{key}"


def locate(layers: Layers, key: str) -> str:
    """Where a canonical key was set, as the user wrote it: `file: [section] alias (alias
    of key)`; a key nobody set is placed in its home section of "config"."""
    home = schema.key_homes()[key][0]
    e = layers.entries.get(key)
    if e is None:
        return where("config", home, key)
    name = key if not e.key or e.key == key else f"{e.key} (alias of {key})"
    return where(e.origin, e.section or home, name)


def resolve_config_path(path: str) -> Path:
    """kohya accepts `--config_file config` for config.toml."""
    p = Path(path)
    if not p.exists() and p.suffix != ".toml" and p.with_name(p.name + ".toml").exists():
        return p.with_name(p.name + ".toml")
    return p


def read_toml(path: Path, layers: Layers) -> dict | None:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        layers.incomplete = True
        layers.problems.append(f"{path}: config file not found (check the path given to "
                               "--config_file or in `base`)")
    except tomllib.TOMLDecodeError as e:
        layers.incomplete = True
        layers.problems.append(f"{path}: invalid TOML: {e} (fix the syntax at that line "
                               "and column)")
    except OSError as e:
        layers.incomplete = True
        layers.problems.append(f"{path}: cannot read config file: {e}")
    return None


def add_file(path: Path, layers: Layers, stack: tuple[Path, ...] = ()) -> None:
    """Add one TOML file (after its `base` files) to the layers."""
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in stack + (path,))
        layers.problems.append(f"{path}: `base` include cycle: {chain} (remove one of the "
                               "includes)")
        return
    data = read_toml(path, layers)
    if data is None:
        return
    data, notes = migrate(data, str(path))
    layers.warnings.extend(notes)
    base = data.pop("base", [])
    if isinstance(base, str):
        base = [base]
    if not isinstance(base, list) or not all(isinstance(b, str) for b in base):
        layers.problems.append(f"{path}: base: expected a list of TOML file paths, got "
                               f"{base!r}")
        base = []
    for b in base:
        add_file(path.parent / b, layers, stack + (path,))
    add_mapping(data, str(path), layers)


def add_mapping(data: dict, origin: str, layers: Layers) -> None:
    """Place every key of a parsed TOML document into the layers, the way sd-scripts reads a
    config file: every table whatever its name, a key's meaning from its name; the same key
    twice takes the later value (with a warning naming both places). One summary line tells
    what was read and which keys have no effect here."""
    read = Reading()
    _walk(data, (), origin, layers, read, {})
    line = read.summary(origin)
    if line:
        layers.warnings.append(line)


# Keys whose value may be a table: `[optimizer_args]` is that key's value, not a section.
TABLE_KEYS = ("network_args", "optimizer_args", "lr_scheduler_args", "custom_attributes")


def _is_section(name: str, val: Any) -> bool:
    """A table is a section, unless it is the value of a table key (`[optimizer_args]`) and
    holds values that are not all tables (LoRA_Easy_Training_Scripts writes sections as
    `[network_args.args]`, and `[train_mode]` holding `train_mode = "lora"`)."""
    if not isinstance(val, dict):
        return False
    if name in TABLE_KEYS:
        return bool(val) and all(isinstance(x, dict) for x in val.values())
    return True


def _walk(table: dict, path: tuple[str, ...], origin: str, layers: Layers, read: "Reading",
          seen: dict) -> None:
    for name, val in table.items():
        if not path and name == "config_version":
            continue
        if _is_section(name, val):
            _walk(val, path + (name,), origin, layers, read, seen)
            continue
        section = ".".join(path)
        read.keys += 1
        if path:
            read.tables.add(path)  # tables that hold keys (not [general_args] of [.args])
        home = schema.key_homes().get(name, ("",))[0]
        if section and home and schema.SECTION_ALIASES.get(section, section) != home:
            read.away += 1
        place(name, val, origin, section, where(origin, section, name), layers, read, seen)


class Reading:
    """What one file (or the command line) gave: for the summary line."""

    def __init__(self):
        self.keys = 0
        self.away = 0                          # keys outside their canonical section
        self.tables: set[tuple[str, ...]] = set()
        self.no_effect: dict[str, str] = {}    # name -> reason
        self.off: list[str] = []               # refused-when-set names given their off value

    def summary(self, origin: str, *, flags: bool = False) -> str | None:
        if not (self.away or self.no_effect or self.off):
            return None
        dash = "--" if flags else ""
        parts = []
        if not flags:
            tables = f" from {len(self.tables)} table{'s' * (len(self.tables) != 1)}" \
                if self.tables else ""
            parts.append(f"read {self.keys} key{'s' * (self.keys != 1)}{tables} as "
                         "sd-scripts does (by name, whatever the table)")
        if self.no_effect:
            by_reason: dict[str, list[str]] = {}
            for name, reason in self.no_effect.items():
                by_reason.setdefault(reason, []).append(dash + name)
            groups = "; ".join(f"{', '.join(names)} ({reason})"
                               for reason, names in by_reason.items())
            n = len(self.no_effect)
            parts.append(f"{n} {'have' if n != 1 else 'has'} no effect here: {groups}")
        if self.off:
            n = len(self.off)
            parts.append(f"{n} {'are' if n != 1 else 'is'} off or empty, read as unset: "
                         + ", ".join(dash + k for k in self.off))
        return f"{origin}: {'; '.join(parts)} ({kohya_vocab.DOC_LINK})"


def place(name: str, value: Any, origin: str, section: str, label: str, layers: Layers,
          read: Reading, seen: dict) -> None:
    """One key as the user wrote it: a schema key or alias, a vocabulary name (translated,
    no effect, or refused) or a typo. `label` names it in messages; `seen` holds the keys
    already given by this file or command line, to warn when one is given twice."""
    homes = schema.key_homes()
    if name in homes:
        _put(homes[name][1].name, name, value, origin, section, layers, seen)
        return
    if not kohya_vocab.known(name):
        kind = "option" if label.startswith("command line: --") else "key"
        names = list(homes) + sorted(kohya_vocab.ALL_NAMES)
        layers.problems.append(f"{label}: unknown {kind}{_suggest(name, names)}")
        return
    verdict = kohya_vocab.judge(name, value)
    if verdict.kind == "set":
        for key, v in verdict.sets:
            _put(key, name, v, origin, section, layers, seen)
    elif verdict.kind == "refused":
        layers.problems.append(f"{label}: {verdict.reason}")
    elif verdict.kind == "no_effect":
        read.no_effect[name] = verdict.reason
    else:
        read.off.append(name)


def _put(key: str, spelling: str, value: Any, origin: str, section: str, layers: Layers,
         seen: dict) -> None:
    entry = Entry(value, origin, section, spelling)
    prev = seen.get(key)
    if prev is not None and not _same(prev.value, value):
        layers.warnings.append(
            f"{origin}: {key} is given twice: {_as_written(prev)} = {prev.value!r} and "
            f"{_as_written(entry)} = {value!r}; the later one is used, as in sd-scripts "
            "(remove one)")
    seen[key] = entry
    layers.put(key, entry)


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values of any TOML type; unequal if incomparable
        return False


def _as_written(e: Entry) -> str:
    if e.origin.startswith("command line"):
        return f"--{e.key}"
    return f"[{e.section}] {e.key}" if e.section else e.key


def add_cli(overrides: list[tuple[str, Any]], layers: Layers) -> None:
    read, seen = Reading(), {}
    for key, v in overrides:
        place(key, v, "command line", "", f"command line: --{key}", layers, read, seen)
    line = read.summary("command line", flags=True)
    if line:
        layers.warnings.append(line)


def add_set(assignments: list[str], layers: Layers) -> None:
    """`--set section.key=value` (section optional)."""
    read, seen = Reading(), {}
    for item in assignments:
        lhs, eq, rhs = item.partition("=")
        if not eq:
            layers.problems.append(f"command line: --set {item!r}: expected section.key=value")
            continue
        section, _, key = lhs.strip().rpartition(".")
        if section:
            canon = schema.SECTION_ALIASES.get(section, section)
            if canon not in schema.SECTIONS:
                layers.problems.append(f"command line: --set {item!r}: unknown section "
                                       f"[{section}]{_suggest(section, schema.SECTIONS)}")
                continue
        if key not in schema.key_homes() and not kohya_vocab.known(key):
            names = list(schema.key_homes()) + sorted(kohya_vocab.ALL_NAMES)
            layers.problems.append(f"command line: --set {item!r}: unknown key "
                                   f"{key}{_suggest(key, names)}")
            continue
        place(key, values.parse_scalar(rhs), "command line (--set)", section,
              f"command line: --set {item!r}", layers, read, seen)
    line = read.summary("command line (--set)", flags=True)
    if line:
        layers.warnings.append(line)


# Spellings that only diffusers' example scripts (train_text_to_image_lora.py,
# train_dreambooth_lora.py) use. A run written with them saves what those scripts save.
DIFFUSERS_SCRIPT_SPELLINGS = ("rank",)


def diffusers_script_defaults(layers: Layers, flags: set[str]) -> None:
    """A diffusers-script command line (`--rank 8 ...`, seed 000's guide) writes
    `output_dir/pytorch_lora_weights.safetensors` in the diffusers layout, as the script
    would, so the guide's `load_lora_weights(output_dir, weight_name=...)` finds it; unless
    save_model_as or output_name is set. `flags`: the option names of the command line."""
    spelled = {e.key for e in layers.entries.values() if e.key} | flags
    if spelled & set(DIFFUSERS_SCRIPT_SPELLINGS) and not {"save_model_as", "output_name"} & \
            set(layers.entries):
        layers.put("save_model_as", Entry("diffusers", "diffusers-script default", "saving"))


def build(layers: Layers) -> schema.Config:
    """Typed, range-checked Config from the layers; problems are appended to layers."""
    sections = {}
    for sec_name, cls in schema.SECTIONS.items():
        kwargs = {}
        for f in fields(cls):
            if f.name not in layers.entries:
                continue
            e = layers.entries[f.name]
            loc = locate(layers, f.name)
            if unset_value(f.name, e.value):
                if values.base_type(f.type)[1]:
                    kwargs[f.name] = None
                continue  # a non-optional key keeps its default
            try:
                v = values.convert(f.type, e.value)
            except ValueError as err:
                layers.problems.append(f"{loc}: {err}")
                layers.failed.add(f.name)
                continue
            problem = check_field(f, v)
            if problem:
                layers.problems.append(f"{loc}: {problem}")
                layers.failed.add(f.name)
                continue
            kwargs[f.name] = v
        sections[sec_name] = cls(**kwargs)
    return schema.Config(**sections)


def unset_value(key: str, raw: Any) -> bool:
    """sd-scripts reads `""` (front-ends write it for every empty field) as unset, and 0 as
    off for the keys it tests for truth (kohya_vocab.ZERO_IS_UNSET)."""
    if isinstance(raw, str) and not raw.strip():
        return True
    return key in kohya_vocab.ZERO_IS_UNSET and not isinstance(raw, bool) and \
        isinstance(raw, (int, float)) and raw == 0


def check_field(f, v) -> str | None:
    """Choices, minimums and planned-only keys of one field; a message or None."""
    meta = f.metadata
    if v is None:
        return None
    if meta.get("choices"):
        choices = meta["choices"]
        if str(v).lower() not in [c.lower() for c in choices]:
            return (f"invalid value {v!r}; expected one of: {', '.join(choices)}"
                    f"{_suggest(str(v), choices)}")
    minimum = meta.get("minimum")
    if minimum is not None and isinstance(v, (int, float)) and not isinstance(v, bool):
        if v < minimum or (meta.get("exclusive_min") and v == minimum):
            rel = ">" if meta.get("exclusive_min") else ">="
            return f"value {v!r} out of range; it must be {rel} {minimum:g}"
    if meta.get("planned") and v != f.default:
        return ("is not supported by this version of tomlora yet; remove it from the "
                "config (see docs/CONFIG.md)")
    return None


def normalise(cfg: schema.Config) -> schema.Config:
    """Canonical spellings for case-insensitive choices (e.g. `adamw8bit` -> `AdamW8bit`)."""
    out = {}
    for sec_name, cls in schema.SECTIONS.items():
        sec = getattr(cfg, sec_name)
        changes = {}
        for f in fields(cls):
            v = getattr(sec, f.name)
            for c in f.metadata.get("choices", ()):
                if isinstance(v, str) and v.lower() == c.lower() and v != c:
                    changes[f.name] = c
        out[sec_name] = replace(sec, **changes) if changes else sec
    return replace(cfg, **out)


def accelerate_env_layer(layers: Layers) -> None:
    """`accelerate launch --mixed_precision=fp16` passes the choice through the environment."""
    mp = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if mp and "mixed_precision" not in layers.entries:
        layers.put("mixed_precision", Entry(mp, "accelerate launch --mixed_precision", ""))

