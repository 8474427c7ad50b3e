#!/usr/bin/env python
"""Print the metadata of a LoRA .safetensors file, readably.

    python tools/show_metadata.py my_lora.safetensors [--json] [--key ss_tag_frequency]

Groups kohya's `ss_*` keys, `modelspec.*`, the hashes and everything else; JSON values are
parsed: `ss_tag_frequency` is shown as the most frequent tags per folder, `tomlora_config`
(the resolved training config) as TOML-like sections. Only the header is read, not the tensors.
`--json` prints the metadata as one JSON object (JSON values parsed) for scripts.
Exit codes: 0 done, 2 the file cannot be read.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TOP_TAGS = 10


def read_metadata(path: Path) -> tuple[dict[str, str], int]:
    """(metadata, number of tensors) from the header alone."""
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        if not 2 <= size <= 100_000_000:
            raise ValueError("not a safetensors file (bad header length)")
        try:
            header = json.loads(fh.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError("not a safetensors file (header is not JSON)") from None
    meta = header.pop("__metadata__", None) or {}
    return {str(k): str(v) for k, v in meta.items()}, len(header)


def parsed(value: str):
    """A JSON value as Python, anything else as the string."""
    if value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            pass
    return value


def _tags(freq) -> list[str]:
    if not isinstance(freq, dict):
        return [f"  {freq}"]
    lines = []
    for folder, tags in freq.items():
        if not isinstance(tags, dict):
            lines.append(f"  {folder}: {tags}")
            continue
        top = sorted(tags.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_TAGS]
        more = f", ... ({len(tags) - len(top)} more)" if len(tags) > len(top) else ""
        lines.append(f"  {folder} ({len(tags)} tags): "
                     + ", ".join(f"{t} ({n})" for t, n in top) + more)
    return lines


def _config(cfg) -> list[str]:
    if not isinstance(cfg, dict):
        return [f"  {cfg}"]
    lines = []
    for section, values in cfg.items():
        if isinstance(values, dict):
            lines.append(f"  [{section}]")
            lines += [f"    {k} = {json.dumps(v)}" for k, v in values.items() if v is not None]
        else:
            lines.append(f"  {section} = {json.dumps(values)}")
    return lines


def describe_network(meta: dict[str, str]) -> str | None:
    """One line naming the network: plain LoRA, or the LyCORIS algorithm and its options
    (ss_network_module = lycoris.kohya, ss_network_args)."""
    module = meta.get("ss_network_module")
    if not module:
        return None
    args = parsed(meta.get("ss_network_args", "{}"))
    args = args if isinstance(args, dict) else {}
    dim, alpha = meta.get("ss_network_dim", "?"), meta.get("ss_network_alpha", "?")
    if module == "lycoris.kohya":
        algo = str(args.get("algo", "lora"))
        names = {"lora": "LoCon", "locon": "LoCon", "loha": "LoHa", "lokr": "LoKr",
                 "full": "full (diff)", "ia3": "(IA)3"}
        extra = [f"{k}={args[k]}" for k in ("preset", "factor", "conv_dim", "conv_alpha",
                                             "use_tucker", "dora_wd") if k in args]
        return (f"network: LyCORIS {names.get(algo, algo)} (lycoris.kohya, algo={algo}), "
                f"dim {dim}, alpha {alpha}" + (", " + ", ".join(extra) if extra else ""))
    return f"network: {module}, dim {dim}, alpha {alpha}"


def format_metadata(meta: dict[str, str], tensors: int) -> str:
    groups = {"kohya (ss_*)": {}, "modelspec": {}, "hashes": {}, "other": {}}
    for k in sorted(meta):
        if k.startswith("ss_"):
            groups["kohya (ss_*)"][k] = meta[k]
        elif k.startswith("modelspec."):
            groups["modelspec"][k] = meta[k]
        elif k.startswith("sshs_"):
            groups["hashes"][k] = meta[k]
        else:
            groups["other"][k] = meta[k]
    lines = [f"{tensors} tensors, {len(meta)} metadata keys"]
    network = describe_network(meta)
    if network:
        lines.append(network)
    for title, items in groups.items():
        if not items:
            continue
        lines.append(f"\n== {title}")
        for k, v in items.items():
            if k == "ss_tag_frequency":
                lines += [f"{k}:"] + _tags(parsed(v))
            elif k == "tomlora_config":
                lines += [f"{k}:"] + _config(parsed(v))
            elif len(v) > 200 and v[:1] in "[{":
                lines.append(f"{k}: {json.dumps(parsed(v))[:200]}... ({len(v)} chars)")
            else:
                lines.append(f"{k}: {v}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("file", type=Path)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--key", help="print only this key's value (parsed JSON pretty-printed)")
    a = p.parse_args(argv)
    try:
        meta, tensors = read_metadata(a.file)
    except (OSError, ValueError) as e:
        print(f"show_metadata: {a.file}: {e}", file=sys.stderr)
        return 2
    if a.key:
        if a.key not in meta:
            print(f"show_metadata: {a.file}: no key {a.key!r}; keys: {', '.join(sorted(meta))}",
                  file=sys.stderr)
            return 2
        value = parsed(meta[a.key])
        print(value if isinstance(value, str) else json.dumps(value, indent=2))
    elif a.json:
        print(json.dumps({k: parsed(v) for k, v in meta.items()}, indent=2, sort_keys=True))
    else:
        print(format_metadata(meta, tensors))
    return 0


if __name__ == "__main__":
    sys.exit(main())
