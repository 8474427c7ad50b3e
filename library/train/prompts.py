"""Sample prompt files -> `PromptSpec`s (pure: no torch, no models). Syntax: docs/SAMPLING.md.

- `.txt`: one prompt per line with kohya's options (`--n` negative prompt, `--w` width, `--h`
  height, `--d` seed, `--l` CFG scale, `--s` steps, `--ss` sampler). `#` lines and blank lines
  are skipped. An option's value runs until the next ` --x ` option, so negative prompts may
  contain spaces.
- `.toml`: `[[prompt]]` tables, a `prompt = [...]` list (of tables or strings), or kohya's
  `[prompt]` defaults with `[[prompt.subset]]` tables.
- `.json`: a list of objects (or strings); kohya's `{"prompt": {..., "subset": [...]}}` too.
Table keys: prompt, negative_prompt, width, height, seed, scale, sample_steps, sample_sampler.
A string item is read like a `.txt` line.

A prompt without a seed gets `base_seed + its index`, so repeated samples are comparable.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from library.train import samplers

# kohya's sample defaults (sd-scripts train_util.sample_image_inference)
DEFAULT_STEPS = 30
DEFAULT_SCALE = 7.5
# Largest sample side in pixels: 4x SDXL's native 1024 (an SDXL image at 4096 px is ~16 MP).
MAX_SIDE = 4096


@dataclass(frozen=True)
class PromptSpec:
    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    seed: int | None = None
    scale: float = DEFAULT_SCALE
    steps: int = DEFAULT_STEPS
    sampler: str = "ddim"


# txt option -> PromptSpec field
TXT_OPTIONS = {"n": "negative_prompt", "w": "width", "h": "height", "d": "seed", "l": "scale",
               "s": "steps", "ss": "sampler"}
# table key -> PromptSpec field (kohya's keys first, then a few common spellings)
TABLE_KEYS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "width": "width",
              "height": "height", "seed": "seed", "scale": "scale", "sample_steps": "steps",
              "sample_sampler": "sampler", "steps": "steps", "sampler": "sampler",
              "guidance_scale": "scale"}
_OPTION = re.compile(r"(?:^|\s)--([A-Za-z]+)(?=\s|$)")


def _int(v: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or isinstance(v, float):
        raise ValueError
    n = int(str(v).strip())
    if n < lo or (hi is not None and n > hi):
        raise ValueError
    return n


def convert(field: str, value: Any) -> Any:
    """One PromptSpec field from a file value; ValueError with what was expected."""
    try:
        if field in ("prompt", "negative_prompt"):
            if not isinstance(value, str):
                raise ValueError
            return value.strip()
        if field in ("width", "height"):
            # kohya rounds sizes down to a multiple of 8 (the VAE's downsampling factor).
            # Its floor of 64 is not kept: the pretrained tiny model draws at 32x32. The
            # ceiling catches typos (100000) that would fail at the first sample, mid-run.
            n = _int(value, 8, MAX_SIDE)
            return n - n % 8
        if field == "seed":
            return _int(value, 0, 2**63 - 1)
        if field == "steps":
            return _int(value, 1, 1000)
        if field == "scale":
            if isinstance(value, bool):
                raise ValueError
            x = float(str(value).strip())
            if not math.isfinite(x) or x < 0:
                raise ValueError
            return x
    except (TypeError, ValueError):
        expected = {"prompt": "a string", "negative_prompt": "a string",
                    "width": f"an integer from 8 to {MAX_SIDE}",
                    "height": f"an integer from 8 to {MAX_SIDE}",
                    "seed": "an integer >= 0", "steps": "an integer from 1 to 1000",
                    "scale": "a number >= 0"}[field]
        raise ValueError(f"expected {expected}") from None
    if field == "sampler":
        return samplers.canonical(str(value))
    raise ValueError(f"unknown field {field!r}")


def parse_line(line: str) -> dict[str, Any]:
    """One `.txt` line -> {field: value}. Raises ValueError('--x value: problem')."""
    marks = list(_OPTION.finditer(line))
    out: dict[str, Any] = {"prompt": line[:marks[0].start()] if marks else line}
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(line)
        name, value = m.group(1), line[m.end():end].strip()
        field = TXT_OPTIONS.get(name.lower())
        if field is None:
            raise ValueError(f"--{name}: unknown option; valid options: "
                             + ", ".join(f"--{k}" for k in TXT_OPTIONS))
        if field != "negative_prompt" and not value:
            raise ValueError(f"--{name}: needs a value")
        try:
            out[field] = convert(field, value)
        except ValueError as e:
            raise ValueError(f"--{name} {value!r}: {e}") from None
    out["prompt"] = out["prompt"].strip()
    return out


def _from_table(item: Any, defaults: dict | None = None) -> dict[str, Any]:
    if isinstance(item, str):
        return parse_line(item)
    if not isinstance(item, dict):
        raise ValueError(f"expected a table/object or a string, got {type(item).__name__}")
    out = dict(defaults or {})
    for key, value in item.items():
        field = TABLE_KEYS.get(key)
        if field is None:
            raise ValueError(f"{key}: unknown key; valid keys: "
                             + ", ".join(k for k in TABLE_KEYS))
        try:
            out[field] = convert(field, value)
        except ValueError as e:
            raise ValueError(f"{key} = {value!r}: {e}") from None
    return out


def _items(data: Any, path: Path) -> list[tuple[Any, dict]]:
    """The prompt items of a parsed TOML/JSON document, with shared defaults (kohya's
    `[prompt]` table around `[[prompt.subset]]`)."""
    if isinstance(data, dict):
        if "prompt" not in data:
            raise ValueError(f"{path}: expected a `prompt` list or [[prompt]] tables")
        data = data["prompt"]
    if isinstance(data, dict) and "subset" in data:
        shared = {k: v for k, v in data.items() if k != "subset"}
        defaults = _from_table(shared) if shared else {}
        if not isinstance(data["subset"], list):
            raise ValueError(f"{path}: prompt.subset must be a list of tables")
        return [(item, defaults) for item in data["subset"]]
    if isinstance(data, (str, dict)):
        data = [data]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of prompts, got {type(data).__name__}")
    return [(item, {}) for item in data]


def read_prompt_items(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(location, fields) per prompt of a file, without defaults applied. Locations are
    `file:line` (txt) or `file: prompt N` (toml/json)."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise ValueError(f"{path}: cannot read the prompt file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x}); "
                         "save the prompt file as UTF-8") from None
    out = []
    if suffix in (".toml", ".json"):
        try:
            if suffix == ".toml":
                import tomllib
                data = tomllib.loads(text)
            else:
                data = json.loads(text)
        except Exception as e:  # tomllib/json errors carry the line themselves
            raise ValueError(f"{path}: not valid {suffix[1:].upper()}: {e}") from None
        for i, (item, defaults) in enumerate(_items(data, path)):
            where = f"{path}: prompt {i + 1}"
            try:
                out.append((where, _from_table(item, defaults)))
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        return out
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"{path}:{lineno}"
        try:
            out.append((where, parse_line(stripped)))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    return out


def load_prompts(path: str | Path, *, width: int, height: int, steps: int = DEFAULT_STEPS,
                 scale: float = DEFAULT_SCALE, sampler: str = "ddim",
                 negative_prompt: str = "", base_seed: int | None = None) -> list[PromptSpec]:
    """Every prompt of a `.txt`/`.toml`/`.json` file, defaults filled in. ValueError names the
    file, the line (or prompt number) and the option."""
    base = PromptSpec("", negative_prompt, width, height, None, scale, steps,
                      samplers.canonical(sampler))
    specs = []
    for i, (where, fields) in enumerate(read_prompt_items(path)):
        if not fields.get("prompt"):
            raise ValueError(f"{where}: empty prompt")
        spec = replace(base, **fields)
        if spec.seed is None and base_seed is not None:
            spec = replace(spec, seed=base_seed + i)
        specs.append(spec)
    if not specs:
        raise ValueError(f"{path}: no prompts found")
    return specs


def a1111_parameters(spec: PromptSpec, model: str = "", extra: dict | None = None) -> str:
    """The PNG `parameters` text in A1111's layout, which image viewers and web UIs read."""
    lines = [spec.prompt]
    if spec.negative_prompt:
        lines.append(f"Negative prompt: {spec.negative_prompt}")
    pairs = {"Steps": spec.steps, "Sampler": samplers.label(spec.sampler),
             "CFG scale": f"{spec.scale:g}", "Seed": spec.seed,
             "Size": f"{spec.width}x{spec.height}"}
    if model:
        pairs["Model"] = model
    pairs.update(extra or {})
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs.items()))
    return "\n".join(lines)
