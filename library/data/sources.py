"""Finding training images and their captions on disk.

Layouts read:
- kohya: `train_data_dir/N_name class/` subfolders; N is the repeat count and the rest of
  the folder name is the fallback caption (class tokens) for images without a caption file;
- diffusers / HF imagefolder: images beside `metadata.csv` or `metadata.jsonl` with a
  `file_name` column and a caption column (seed 000's layout);
- a plain folder of images (repeats 1, with a warning: kohya would find no data there).
`reg_data_dir` uses the same layouts; its images are flagged `is_reg` and balanced as kohya
does (their repeats grow until they match the training images).
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from library.data.captions import find_other_caption_files, read_caption
from library.data.images import is_image_file

_REPEAT_DIR = re.compile(r"^(\d+)_(.*)$")


@dataclass(frozen=True)
class Item:
    image: Path
    caption: str            # caption text (file, metadata row, or the folder's class tokens)
    repeats: int
    is_reg: bool
    folder: str             # folder name as the user wrote it, for reports
    caption_found: bool     # False when the folder's class tokens stand in


@dataclass
class FolderReport:
    folder: str
    repeats: int
    images: int
    captions: int
    is_reg: bool
    other_caption_exts: list[str] = field(default_factory=list)


@dataclass
class Scan:
    items: list[Item] = field(default_factory=list)
    folders: list[FolderReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


def _scan_folder(folder: Path, repeats: int, fallback: str | None, is_reg: bool,
                 caption_extension: str, scan: Scan, label: str) -> None:
    report = FolderReport(label, repeats, 0, 0, is_reg)
    others: set[str] = set()
    for img in _images_in(folder):
        cap = read_caption(img, caption_extension, None, False)
        found = cap is not None and cap != ""
        if not found:
            others.update(Path(o).suffix for o in find_other_caption_files(img,
                                                                          caption_extension))
        text = cap if found else (fallback or "")
        scan.items.append(Item(img, text, repeats, is_reg, label, found))
        report.images += 1
        report.captions += int(found)
    report.other_caption_exts = sorted(others)
    scan.folders.append(report)
    if report.images and report.captions < report.images:
        missing = report.images - report.captions
        msg = (f"{folder}: {missing} of {report.images} images have no {caption_extension} "
               f"caption; they train with the caption {fallback or '(empty)'!r}")
        if others:
            msg += (f". Found {', '.join(sorted(others))} files instead: set "
                    f"caption_extension = \"{sorted(others)[0]}\"")
        scan.warnings.append(msg)


def _scan_metadata(root: Path, meta: Path, is_reg: bool, caption_column: str,
                   image_column: str, scan: Scan) -> None:
    try:
        if meta.suffix == ".csv":
            with open(meta, newline="", encoding="utf-8-sig") as fh:
                rows = list(csv.DictReader(fh))
        else:
            rows = [json.loads(line) for line in meta.read_text(encoding="utf-8").splitlines()
                    if line.strip()]
    except (OSError, ValueError) as e:
        scan.problems.append(f"{meta}: cannot read: {e}")
        return
    report = FolderReport(meta.name, 1, 0, 0, is_reg)
    for i, row in enumerate(rows, start=2 if meta.suffix == ".csv" else 1):
        if image_column not in row or caption_column not in row:
            scan.problems.append(
                f"{meta}: row {i} has columns {sorted(row)}; expected {image_column!r} and "
                f"{caption_column!r} (set image_column / caption_column)")
            return
        img = root / str(row[image_column])
        if not img.is_file():
            scan.problems.append(f"{meta}: row {i}: image {img} not found")
            continue
        cap = str(row[caption_column] or "").strip()
        scan.items.append(Item(img, cap, 1, is_reg, meta.name, bool(cap)))
        report.images += 1
        report.captions += int(bool(cap))
    scan.folders.append(report)


def scan_dir(root: Path, *, is_reg: bool, caption_extension: str, caption_column: str,
             image_column: str, scan: Scan) -> None:
    key = "reg_data_dir" if is_reg else "train_data_dir"
    for meta_name in ("metadata.jsonl", "metadata.csv"):
        if (root / meta_name).is_file():
            _scan_metadata(root, root / meta_name, is_reg, caption_column, image_column, scan)
            return
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    repeat_dirs = []
    for d in subdirs:
        m = _REPEAT_DIR.match(d.name)
        if m:
            repeat_dirs.append((d, int(m.group(1)), m.group(2).strip()))
        elif _images_in(d):
            scan.warnings.append(
                f"{d}: ignored: the folder name has no repeat prefix; rename it like "
                f"\"10_{d.name}\" (10 repeats) to train on it")
    for d, repeats, tokens in repeat_dirs:
        if repeats < 1:
            scan.warnings.append(f"{d}: repeat count 0, folder skipped")
            continue
        _scan_folder(d, repeats, tokens, is_reg, caption_extension, scan, d.name)
    loose = _images_in(root)
    if loose:
        scan.warnings.append(
            f"{key}: {root} holds {len(loose)} images directly; they train with repeats 1. "
            "kohya expects them in subfolders like \"10_name class\"")
        _scan_folder(root, 1, None, is_reg, caption_extension, scan, root.name)
    if not is_reg:
        warn_reg_lookalikes(repeat_dirs, scan)


def warn_reg_lookalikes(repeat_dirs, scan: Scan) -> None:
    """A folder whose class tokens are a strict subset of another's looks like regularization
    images (seed 002's `100_classname` beside `10_subject_classname`)."""
    token_sets = [(d, set(re.split(r"[\s_]+", t)) - {""}) for d, _, t in repeat_dirs]
    for d, toks in token_sets:
        for other, other_toks in token_sets:
            if other != d and toks and toks < other_toks:
                scan.warnings.append(
                    f"{d}: looks like regularization images for {other.name} (its class "
                    f"tokens are part of that folder's); move it to reg_data_dir so it is "
                    "balanced and weighted by prior_loss_weight instead of trained as data")
                break


def balance_reg(items: list[Item]) -> list[Item]:
    """kohya's balancing: reg images repeat (one extra repeat at a time, in order) until the
    reg samples reach the number of training samples (images x repeats)."""
    train = [i for i in items if not i.is_reg]
    reg = [i for i in items if i.is_reg]
    if not reg:
        return items
    target = sum(i.repeats for i in train)
    repeats = [r.repeats for r in reg]
    n = sum(repeats)
    while n < target:
        for j in range(len(reg)):
            repeats[j] += 1
            n += 1
            if n >= target:
                break
    return train + [replace(r, repeats=k) for r, k in zip(reg, repeats)]


def scan_sources(train_data_dir: str, reg_data_dir: str | None, *, caption_extension: str,
                 caption_column: str = "caption", image_column: str = "file_name") -> Scan:
    scan = Scan()
    if not caption_extension.startswith("."):
        caption_extension = "." + caption_extension
    scan_dir(Path(train_data_dir), is_reg=False, caption_extension=caption_extension,
             caption_column=caption_column, image_column=image_column, scan=scan)
    if reg_data_dir:
        scan_dir(Path(reg_data_dir), is_reg=True, caption_extension=caption_extension,
                 caption_column=caption_column, image_column=image_column, scan=scan)
    if not any(not i.is_reg for i in scan.items):
        scan.problems.append(
            f"train_data_dir: no training images found in {train_data_dir} (looked for "
            "png/jpg/jpeg/webp/bmp in N_name subfolders, beside metadata.csv/jsonl, or in the "
            "folder itself)")
    scan.items = balance_reg(scan.items)
    return scan
