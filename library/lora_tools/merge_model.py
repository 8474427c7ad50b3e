"""Bake LoRAs into a base model, tensor by tensor.

`plan(model, loras)` matches every LoRA module to the model tensor it changes (checking family,
names and shapes before anything is written); `write_merged(model, plan, out)` then streams
each weight file: read one tensor, add sum(ratio * delta) in fp32, cast, write, drop. Peak
memory is about one tensor group (the largest tensor, its fp32 copy and its deltas), not the
model. The output has the input's form (diffusers folder or single file) and every other file
of a folder (configs, tokenizers, VAE) is copied.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from library.lora_tools import cli
from library.lora_tools.lora_file import Module, family_of, read_modules
from library.lora_tools.model_files import BaseModel, Slot, canonical_stem
from library.lora_tools.st_io import LazyFile, StreamWriter

NAMES = {"sd15": "SD1.5", "sdxl": "SDXL"}


@dataclass
class Change:
    slot: Slot
    module: Module
    ratio: float
    source: str


def _fits(module: Module, slot: Slot) -> bool:
    if not module.is_lora:
        return True  # the delta function checks its own shapes
    want, have = tuple(module.out_shape), tuple(slot.shape)
    # a 1x1 conv may be stored as a Linear on either side (SD1.5 proj_in/out)
    squeeze = lambda s: s[:2] if len(s) == 4 and s[2:] == (1, 1) else s  # noqa: E731
    return want == have or squeeze(want) == squeeze(have)


def plan(model: BaseModel, loras: list[tuple[str, float]]
         ) -> dict[tuple[Path, str], list[Change]]:
    """{(file, tensor name): changes}; ValueError naming the LoRA file and module."""
    changes: dict[tuple[Path, str], list[Change]] = {}
    for path, ratio in loras:
        modules, meta = read_modules(path, family=model.family, unet_config=model.unet_config)
        fam = family_of(modules, meta)
        if fam and fam != model.family:
            raise ValueError(f"{path}: an {NAMES[fam]} LoRA, but the model is "
                             f"{NAMES[model.family]} ({model.root})")
        missing = []
        for stem, m in modules.items():
            name = canonical_stem(stem, model)
            if name is None:
                missing.append(stem)
                continue
            for slot in model.slots[name]:
                if not _fits(m, slot):
                    raise ValueError(f"{path}: module {stem}: its delta is "
                                     f"{list(m.out_shape)} but the model's weight is "
                                     f"{list(slot.shape)} (a LoRA for another model?)")
                changes.setdefault((slot.file, slot.key), []).append(
                    Change(slot, m, ratio, str(path)))
        if missing:
            raise ValueError(f"{path}: {len(missing)} of {len(modules)} modules name no weight "
                             f"of the model {model.root} (first: {missing[0]}); a LoRA for "
                             "another model?")
    return changes


def merged_tensor(t: torch.Tensor, changes: list[Change], device: str = "cpu"
                  ) -> torch.Tensor:
    """t + sum(ratio * delta) computed in fp32, in t's dtype."""
    w = t.to(device=device, dtype=torch.float32)
    for c in changes:
        rows = slice(*c.slot.rows) if c.slot.rows else slice(None)
        part = w[rows]
        part += c.ratio * c.module.delta(part).to(device).reshape(part.shape)
    return w.to(t.dtype).cpu()


def _stream_file(src: LazyFile, dst: Path, changes: dict, dtype: torch.dtype | None,
                 metadata: dict | None, bar) -> None:
    names = sorted(src.entries, key=lambda k: src.entries[k].start)  # read sequentially

    def out_dtype(d: torch.dtype) -> torch.dtype:
        return dtype if dtype is not None and d.is_floating_point else d

    layout = [(k, out_dtype(src.entries[k].dtype), src.entries[k].shape) for k in names]
    meta = dict(src.metadata) if metadata is None else metadata
    with StreamWriter(dst, layout, meta) as w:
        for name in names:
            t = src.read(name)
            todo = changes.get((src.path, name))
            if todo:
                t = merged_tensor(t, todo)
                bar.update(len(todo))
            w.write(name, t.to(out_dtype(t.dtype)))
            del t


def _copy_folder(src: Path, dst: Path, skip: set[Path]) -> None:
    for path in src.rglob("*"):
        rel = path.relative_to(src)
        if path.is_dir():
            (dst / rel).mkdir(parents=True, exist_ok=True)
        elif path not in skip:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dst / rel)


def write_merged(model: BaseModel, changes: dict, out: Path, *, dtype: torch.dtype | None,
                 note: dict, quiet: bool = False) -> Path:
    """Write the merged model in the input's form to `out` (atomically)."""
    total = sum(len(v) for v in changes.values())
    bar = cli.progress(range(total), "merge", total, quiet)
    if model.kind == "single_file":
        lazy = model.lazy[model.root]
        meta = {**lazy.metadata, "tomlora_merged_loras": json.dumps(note)}
        _stream_file(lazy, out, changes, dtype, meta, bar)
        bar.close()
        return out
    # diffusers folder: build in a temporary sibling and rename, so no half model is left
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        weights = set(model.files)
        if dtype is not None:  # every weight file is rewritten in the new precision
            weights |= {p for p in model.root.rglob("*.safetensors")}
        _copy_folder(model.root, tmp, weights)
        for f in sorted(weights):
            lazy = model.lazy.get(f) or LazyFile(f)
            _stream_file(lazy, tmp / f.relative_to(model.root), changes, dtype, None, bar)
        (tmp / "tomlora_merged_loras.json").write_text(json.dumps(note, indent=1))
        if out.exists():  # --overwrite: replace only once the new folder is complete
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    return out
