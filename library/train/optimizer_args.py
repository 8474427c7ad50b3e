"""Typing of `optimizer_args` values: each accepted argument has one of these converters.

Values arrive from a TOML table (already numbers, booleans, lists) or from kohya-style
"key=value" strings, where `betas=0.9,0.999` stays a string; both forms give the same typed
value here. A converter raises ValueError with a short reason; the caller names the key.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable


def number(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError(f"expected a number, got {v!r}")
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v.strip())
        except ValueError:
            pass
    raise ValueError(f"expected a number, got {v!r}")


def integer(v: Any) -> int:
    f = number(v)
    if not f.is_integer():
        raise ValueError(f"expected a whole number, got {v!r}")
    return int(f)


def flag(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    raise ValueError(f"expected true or false, got {v!r}")


def optional_number(v: Any) -> float | None:
    if v is None or (isinstance(v, str) and v.strip().lower() in ("none", "null", "")):
        return None
    return number(v)


def numbers(n: int) -> Callable[[Any], tuple]:
    """A fixed-length tuple of numbers: [0.9, 0.999], "0.9,0.999" or "(0.9, 0.999)"."""
    example = ", ".join(["0.9", "0.999", "0.9999"][:n])

    def convert(v: Any) -> tuple:
        items = v
        if isinstance(v, str):
            items = [p for p in v.strip().strip("()[]").split(",") if p.strip()]
        if not isinstance(items, (list, tuple)) or len(items) != n:
            raise ValueError(f"expected {n} numbers like [{example}], got {v!r}")
        try:
            return tuple(number(x) for x in items)
        except ValueError:
            raise ValueError(f"expected {n} numbers like [{example}], got {v!r}") from None

    convert.__name__ = f"{n} numbers"
    return convert


def type_args(optimizer: str, args: dict, accepted: dict[str, Callable]) -> tuple[dict, list]:
    """(typed args, problems). Each problem names optimizer_args, the key and the fix."""
    typed, problems = {}, []
    for key, raw in args.items():
        if key not in accepted:
            hint = ""
            if key == "lr":
                hint = " (set learning_rate instead)"
            else:
                close = difflib.get_close_matches(key, accepted, n=1)
                if close:
                    hint = f" (did you mean {close[0]}?)"
            names = ", ".join(accepted) or "none"
            problems.append(f"optimizer_args: {key!r} is not an argument of {optimizer}"
                            f"{hint}; accepted: {names}")
            continue
        try:
            typed[key] = accepted[key](raw)
        except ValueError as e:
            problems.append(f"optimizer_args: {key} for {optimizer}: {e}")
    return typed, problems
