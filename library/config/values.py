"""Turning raw TOML / command-line values into the schema's types.

Each function takes the raw value and returns the typed value or raises ``ValueError`` with a
short reason ("expected an integer, got 'abc'"); the loader adds file, section and key.
"""
from __future__ import annotations

import ast
from typing import Any

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def base_type(type_str: str) -> tuple[str, bool]:
    """'Optional[int]' -> ('int', True); 'float' -> ('float', False)."""
    t = type_str.replace(" ", "")
    if t.startswith("Optional[") and t.endswith("]"):
        return t[len("Optional["):-1], True
    return t, False


def parse_scalar(text: str) -> Any:
    """Type a string from a `k=v` list or the command line: int, float, bool, list or str."""
    s = text.strip()
    low = s.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s)
    except ValueError:
        pass
    if s[:1] in "[(" and s[-1:] in "])" or "," in s:
        # `betas=(0.9,0.99)`, and `betas=0.9,0.99` as kohya files write it (sd-scripts reads
        # these values with ast.literal_eval, a bare comma making a tuple)
        try:
            parsed = ast.literal_eval(s)
        except (ValueError, SyntaxError):
            parsed = None
        if isinstance(parsed, (list, tuple)):
            return list(parsed)
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'":
        return s[1:-1]
    return s


def to_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
        return v.strip().lower() in _TRUE
    raise ValueError(f"expected true or false, got {v!r}")


def to_int(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError(f"expected an integer, got {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str):
        try:
            f = float(v.strip())
        except ValueError:
            raise ValueError(f"expected an integer, got {v!r}") from None
        if f.is_integer():
            return int(f)
    raise ValueError(f"expected an integer, got {v!r}")


def to_float(v: Any) -> float:
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


def to_str(v: Any) -> str:
    if isinstance(v, str):
        return v
    raise ValueError(f"expected a string, got {v!r}")


def to_resolution(v: Any) -> tuple[int, int]:
    """`512`, `"768,512"`, `[768, 512]` -> (width, height)."""
    if isinstance(v, str):
        parts = [p for p in v.replace("x", ",").split(",") if p.strip()]
        v = [to_int(p) for p in parts]
    if isinstance(v, bool):
        raise ValueError(f"expected a size like 512 or [768, 512], got {v!r}")
    if isinstance(v, int):
        v = [v]
    if isinstance(v, (list, tuple)) and 1 <= len(v) <= 2:
        w = to_int(v[0])
        h = to_int(v[-1])
        return (w, h)
    raise ValueError(f"expected a size like 512, \"768,512\" or [768, 512], got {v!r}")


def to_kv_table(v: Any) -> dict:
    """`network_args`/`optimizer_args`: a TOML table, or a list of "k=v" strings (typed)."""
    if isinstance(v, dict):
        return {str(k): (parse_scalar(x) if isinstance(x, str) else x) for k, x in v.items()}
    if isinstance(v, str):
        v = v.split() if "=" in v else [v]
    if isinstance(v, (list, tuple)):
        out = {}
        for item in v:
            if not isinstance(item, str) or "=" not in item:
                raise ValueError(f"expected \"key=value\" strings, got {item!r}")
            k, _, x = item.partition("=")
            out[k.strip()] = parse_scalar(x)
        return out
    raise ValueError(f"expected a table or a list of \"key=value\" strings, got {v!r}")


def to_float_or_pair(v: Any) -> float | tuple[float, ...]:
    """`text_encoder_lr`: one number, or a list of one or two (SDXL: TE1, TE2); kohya's CLI
    takes `--text_encoder_lr 1e-4 5e-5`, so a list of strings is accepted too."""
    if isinstance(v, str):
        v = v.replace(",", " ").split()
    if isinstance(v, (list, tuple)):
        if not 1 <= len(v) <= 2:
            raise ValueError(f"expected one number or a list of two (TE1, TE2), got {v!r}")
        numbers = [to_float(x) for x in v]
    else:
        numbers = [to_float(v)]
    if any(x < 0 for x in numbers):
        raise ValueError(f"learning rates must be >= 0, got {v!r}")
    return numbers[0] if len(numbers) == 1 else tuple(numbers)


def to_table_list(v: Any) -> list[dict]:
    """`subsets`: an array of tables (`[[subsets]]`)."""
    if isinstance(v, dict):
        v = [v]
    if isinstance(v, (list, tuple)) and all(isinstance(x, dict) for x in v):
        return [dict(x) for x in v]
    raise ValueError(f"expected an array of tables ([[subsets]] with image_dir, "
                     f"num_repeats, ...), got {v!r}")


CONVERTERS = {"bool": to_bool, "int": to_int, "float": to_float, "str": to_str,
              "tuple": to_resolution, "dict": to_kv_table,
              "FloatOrPair": to_float_or_pair, "list": to_table_list}


def convert(type_str: str, v: Any) -> Any:
    name, optional = base_type(type_str)
    if v is None or (optional and isinstance(v, str) and v.strip().lower() in ("none", "")):
        if optional:
            return None
        raise ValueError("a value is required")
    return CONVERTERS[name](v)
