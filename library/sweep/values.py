"""Override values: `key=v1,v2` on the command line, typed values from a sweep TOML, and
the filesystem-safe run names built from them (pure functions, no I/O)."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

OPEN = {"[": "]", "(": ")", "{": "}"}
QUOTES = "\"'"
MAX_NAME = 96  # longer run names are cut and made unique with a hash (path limits, legibility)


class SweepError(Exception):
    """Bad sweep request: every problem found, one per line (as ConfigError)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class Override:
    """One key set to one value for a run.

    `key` as the user wrote it (`optimizer.learning_rate` or `learning_rate`); `text` is what
    `--set key=text` gets (train_network.py types it with values.parse_scalar, exactly as if
    the user had typed it); `label` is the human form for names and summary columns."""
    key: str
    text: str
    label: str

    @property
    def bare_key(self) -> str:
        return self.key.rpartition(".")[2]

    def set_arg(self) -> str:
        return f"{self.key}={self.text}"


def split_values(text: str) -> list[str]:
    """`a,b` -> ['a', 'b']; commas inside quotes or brackets stay:
    `[768,512],[512,768]` -> ['[768,512]', '[512,768]'], `"a, b",c` -> ['"a, b"', 'c'].
    ValueError on an unclosed quote or bracket."""
    parts, cur, stack, quote = [], [], [], None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in QUOTES and (not cur or cur[-1] in "[({,=: "):
            # A quote opens only at the start of a value or an item, so the apostrophe
            # in `it's` is a plain character.
            quote = ch
        elif ch in OPEN:
            stack.append(OPEN[ch])
        elif stack and ch == stack[-1]:
            stack.pop()
        elif ch in ")]}":
            raise ValueError(f"unbalanced {ch!r} in {text!r}")
        elif ch == "," and not stack:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    if quote or stack:
        missing = quote or stack[-1]
        raise ValueError(f"unclosed value in {text!r} (missing {missing!r})")
    parts.append("".join(cur))
    return parts


def unquote(text: str) -> str:
    s = text.strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in QUOTES:
        return s[1:-1]
    return s


def parse_assignment(item: str) -> tuple[str, list[Override]]:
    """`section.key=v1,v2` -> (key, one Override per value). ValueError when malformed."""
    key, eq, rhs = item.partition("=")
    key = key.strip()
    if not eq or not key:
        raise ValueError(f"{item!r}: expected key=value1,value2 (or section.key=...)")
    return key, [Override(key, v.strip(), unquote(v)) for v in split_values(rhs)]


def typed_text(value) -> str:
    """A TOML value as the text that `--set` (values.parse_scalar) reads back as that value.
    Strings are always quoted, so `"8"` stays the string "8" and `"a, b"` one value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{value!r} is not a finite number")
        return repr(value)
    if isinstance(value, str):
        # parse_scalar strips exactly one pair of outer quotes, with no escapes to undo
        return f'"{value}"'
    if isinstance(value, dict):  # network_args / optimizer_args: a list of "k=v" strings
        return repr([f"{k}={typed_label(v)}" for k, v in value.items()])
    if isinstance(value, (list, tuple)):
        if any(isinstance(v, (dict, list, tuple)) for v in value):
            raise ValueError(f"nested lists and tables are not supported: {value!r}")
        return repr(list(value))
    raise ValueError(f"unsupported value {value!r} ({type(value).__name__})")


def typed_label(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(typed_label(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}={typed_label(v)}" for k, v in value.items()) + "}"
    return repr(value)


def from_toml(key: str, value) -> Override:
    return Override(key, typed_text(value), typed_label(value))


def safe_part(text: str) -> str:
    """Letters (any script), digits and `.-+` kept; every other run of characters (spaces,
    slashes, quotes, commas, brackets) becomes one `_`."""
    out, gap = [], False
    for ch in text:
        if ch.isalnum() or ch in ".-+":
            out.append(ch)
            gap = False
        elif not gap:
            out.append("_")
            gap = True
    return "".join(out).strip("_.") or "_"


def short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]


def run_name(overrides: tuple[Override, ...]) -> str:
    """`network_dim=8__learning_rate=1e-4`; `base` for a run without overrides."""
    if not overrides:
        return "base"
    name = "__".join(f"{safe_part(o.bare_key)}={safe_part(o.label)}" for o in overrides)
    if len(name) > MAX_NAME:
        name = name[:MAX_NAME - 10].rstrip("_") + "__" + short_hash(exact_id(overrides))
    return name


def exact_id(overrides: tuple[Override, ...]) -> str:
    return "\n".join(o.set_arg() for o in overrides)
