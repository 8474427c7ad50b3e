"""Captions from metadata files instead of caption files beside each image.

* ``scan_table_metadata``: the diffusers scripts' / HF imagefolder `metadata.csv` or
  `metadata.jsonl`: one row per image, a `file_name` column (relative to the folder) and a
  caption column (`caption_column`, default `caption`).
* ``scan_finetune_json``: kohya's fine-tuning `metadata_file` (what its
  `merge_captions_to_metadata.py` writes): a JSON object mapping an image key to
  `{"caption": ..., "tags": ...}`. The key is a path (absolute or relative to the working
  directory) or a name inside `image_dir`, with or without the image extension. The caption
  is `caption`, `tags` or both joined by the subset's caption_separator, as kohya does.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from library.data.images import IMAGE_EXTENSIONS
from library.data.options import SubsetOptions
from library.data.sources import FolderReport, Item, Scan


def scan_table_metadata(root: Path, meta: Path, is_reg: bool, caption_column: str,
                        image_column: str, scan: Scan,
                        opts: SubsetOptions = SubsetOptions()) -> None:
    try:
        if meta.suffix.lower() == ".csv":
            with open(meta, newline="", encoding="utf-8-sig") as fh:
                rows = list(csv.DictReader(fh))
        else:
            rows = [json.loads(line) for line in meta.read_text(encoding="utf-8").splitlines()
                    if line.strip()]
    except (OSError, ValueError) as e:
        scan.problems.append(f"{meta}: cannot read: {e}")
        return
    report = FolderReport(meta.name, 1, 0, 0, is_reg, source=str(meta))
    missing_caption = 0
    for i, row in enumerate(rows, start=2 if meta.suffix.lower() == ".csv" else 1):
        if not isinstance(row, dict) or image_column not in row or caption_column not in row:
            cols = sorted(row) if isinstance(row, dict) else type(row).__name__
            scan.problems.append(
                f"{meta}: row {i} has columns {cols}; expected {image_column!r} and "
                f"{caption_column!r} (set image_column / caption_column)")
            return
        img = root / str(row[image_column])
        if not img.is_file():
            scan.problems.append(f"{meta}: row {i}: image {img} not found (fix the "
                                 f"{image_column} value or add the file)")
            continue
        cap = str(row[caption_column] or "").strip()
        if opts.enable_wildcard:
            cap = "\n".join(line.strip() for line in cap.splitlines() if line.strip())
        scan.items.append(Item(img, cap, 1, is_reg, meta.name, bool(cap), opts, str(meta)))
        report.images += 1
        report.captions += int(bool(cap))
        missing_caption += int(not cap)
    scan.folders.append(report)
    if missing_caption:
        scan.warnings.append(f"{meta}: {missing_caption} of {report.images} rows have an "
                             f"empty {caption_column!r}; they train with an empty caption")


def _find_image(key: str, image_dir: Path | None) -> Path | None:
    candidates = [Path(key)]
    if image_dir is not None:
        candidates.append(image_dir / key)
    for c in list(candidates):
        if c.suffix.lower() not in IMAGE_EXTENSIONS:
            candidates += [c.with_name(c.name + e) for e in IMAGE_EXTENSIONS]
            candidates += [c.with_name(c.name + e.upper()) for e in IMAGE_EXTENSIONS]
    return next((c for c in candidates if c.is_file()), None)


def scan_finetune_json(meta: Path, image_dir: Path | None, is_reg: bool,
                       opts: SubsetOptions, scan: Scan) -> None:
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        scan.problems.append(f"{meta}: cannot read the metadata_file: {e}")
        return
    if not isinstance(data, dict):
        scan.problems.append(f"{meta}: expected a JSON object {{\"image\": {{\"caption\": "
                             f"...}}}}, got a {type(data).__name__}")
        return
    report = FolderReport(meta.name, 1, 0, 0, is_reg, source=str(meta))
    glue = opts.caption_separator.strip() + " " if opts.caption_separator.strip() else " "
    for key, md in data.items():
        img = _find_image(str(key), image_dir)
        if img is None:
            where = f" or in image_dir {str(image_dir)!r}" if image_dir else ""
            scan.problems.append(f"{meta}: image {key!r} not found (as a path{where}); fix "
                                 "the key or set image_dir")
            continue
        md = md if isinstance(md, dict) else {}
        caption, tags = md.get("caption"), md.get("tags")
        text = caption if caption is not None else tags
        if caption is not None and tags:
            text = f"{caption}{glue}{tags}"
        text = str(text or "").strip()
        if not opts.enable_wildcard:
            text = text.splitlines()[0].strip() if text else ""
        scan.items.append(Item(img, text, 1, is_reg, meta.name, bool(text), opts, str(meta)))
        report.images += 1
        report.captions += int(bool(text))
    scan.folders.append(report)
    if report.captions < report.images:
        scan.warnings.append(f"{meta}: {report.images - report.captions} images have neither "
                             "caption nor tags; they train with an empty caption")
