"""Finding training images and their captions on disk.

Layouts read:
- kohya: `train_data_dir/N_name class/` subfolders; N is the repeat count and the rest of
  the folder name is the fallback caption (class tokens) for images without a caption file;
- diffusers / HF imagefolder: images beside `metadata.csv` or `metadata.jsonl` with a
  `file_name` column and a caption column (seed 000's layout), see ``metadata.py``;
- a plain folder of images (repeats 1, with a warning: kohya would find no data there);
- one subset of a kohya dataset TOML (``scan_subset``): an `image_dir` read directly, with
  its own `num_repeats`, `class_tokens` and caption options, or a `metadata_file`.
`reg_data_dir` uses the same layouts; its images are flagged `is_reg` and balanced as kohya
does (``balance_reg``).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from library.data.captions import CaptionError, find_other_caption_files, read_caption
from library.data.images import is_image_file
from library.data.options import SubsetOptions

_REPEAT_DIR = re.compile(r"^(\d+)_(.*)$")


@dataclass(frozen=True)
class Item:
    image: Path
    caption: str            # caption text; several lines when enable_wildcard is on
    repeats: int
    is_reg: bool
    folder: str             # folder name as the user wrote it, for reports and tag counts
    caption_found: bool     # False when the folder's class tokens stand in
    opts: SubsetOptions = SubsetOptions()
    source: str = ""        # the folder / metadata file the item came from (report key)
    mask: Path | None = None  # masked_loss: the mask image (library/data/masks.py)


@dataclass
class FolderReport:
    folder: str
    repeats: int
    images: int
    captions: int
    is_reg: bool
    other_caption_exts: list[str] = field(default_factory=list)
    source: str = ""


@dataclass
class Scan:
    items: list[Item] = field(default_factory=list)
    folders: list[FolderReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


def scan_folder(folder: Path, repeats: int, fallback: str | None, is_reg: bool,
                caption_extension: str, scan: Scan, label: str,
                opts: SubsetOptions = SubsetOptions()) -> FolderReport:
    """The images directly in `folder`, each with its caption file or `fallback`."""
    report = FolderReport(label, repeats, 0, 0, is_reg, source=str(folder))
    others: set[str] = set()
    siblings = os.listdir(folder)
    for img in images_in(folder):
        try:
            cap = read_caption(img, caption_extension, None, opts.enable_wildcard)
        except CaptionError as e:
            scan.problems.append(str(e))
            continue
        if isinstance(cap, list):
            cap = "\n".join(cap)
        found = bool(cap)
        if not found:
            others.update(Path(o).suffix for o in find_other_caption_files(
                img, caption_extension, siblings))
        text = cap if found else (fallback or "")
        scan.items.append(Item(img, text, repeats, is_reg, label, found, opts, str(folder)))
        report.images += 1
        report.captions += int(found)
    report.other_caption_exts = sorted(others)
    scan.folders.append(report)
    # Class images of a reg folder normally train on the folder's class tokens: only a
    # caption file with another extension is worth a warning there.
    if report.images and report.captions < report.images and (others or not is_reg):
        missing = report.images - report.captions
        msg = (f"{folder}: {missing} of {report.images} images have no {caption_extension} "
               f"caption; they train with the caption {fallback or '(empty)'!r}")
        if others:
            msg += (f". Found {', '.join(sorted(others))} files instead: set "
                    f"caption_extension = \"{sorted(others)[0]}\"")
        scan.warnings.append(msg)
    return report


def scan_dir(root: Path, *, is_reg: bool, caption_extension: str, caption_column: str,
             image_column: str, scan: Scan, opts: SubsetOptions = SubsetOptions()) -> None:
    """`train_data_dir` / `reg_data_dir`: metadata file, N_name subfolders or loose images."""
    from library.data.metadata import scan_table_metadata
    key = "reg_data_dir" if is_reg else "train_data_dir"
    for meta_name in ("metadata.jsonl", "metadata.csv"):
        if (root / meta_name).is_file():
            scan_table_metadata(root, root / meta_name, is_reg, caption_column, image_column,
                                scan, opts)
            return
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    repeat_dirs = []
    for d in subdirs:
        m = _REPEAT_DIR.match(d.name)
        if m:
            repeat_dirs.append((d, int(m.group(1)), m.group(2).strip()))
        elif images_in(d):
            scan.warnings.append(
                f"{d}: ignored: the folder name has no repeat prefix; rename it like "
                f"\"10_{d.name}\" (10 repeats) to train on it")
    for d, repeats, tokens in repeat_dirs:
        if repeats < 1:
            scan.warnings.append(f"{d}: repeat count 0, folder skipped")
            continue
        scan_folder(d, repeats, tokens, is_reg, caption_extension, scan, d.name, opts)
    loose = images_in(root)
    if loose:
        hint = "kohya expects them in subfolders like \"10_name class\""
        if _REPEAT_DIR.match(root.name):
            hint = (f"{root.name!r} looks like one of the N_name folders: set {key} to its "
                    f"parent {str(root.parent)!r} so its repeats and class tokens count")
        scan.warnings.append(f"{key}: {root} holds {len(loose)} images directly; they train "
                             f"with repeats 1. {hint}")
        scan_folder(root, 1, None, is_reg, caption_extension, scan, root.name, opts)
    if not is_reg:
        warn_reg_lookalikes(repeat_dirs, scan)


def scan_subset(image_dir: Path | None, *, num_repeats: int, is_reg: bool,
                class_tokens: str | None, caption_extension: str,
                metadata_file: Path | None, opts: SubsetOptions, scan: Scan,
                label: str, caption_column: str = "caption",
                image_column: str = "file_name") -> None:
    """One `[[datasets.subsets]]` entry of a kohya dataset TOML."""
    from library.data.metadata import scan_finetune_json, scan_table_metadata
    before, reports_before = len(scan.items), len(scan.folders)
    if metadata_file is not None:
        if metadata_file.suffix.lower() in (".csv", ".jsonl"):
            scan_table_metadata(image_dir or metadata_file.parent, metadata_file, is_reg,
                                caption_column, image_column, scan, opts)
        else:
            scan_finetune_json(metadata_file, image_dir, is_reg, opts, scan)
    else:
        report = scan_folder(image_dir, num_repeats, class_tokens, is_reg, caption_extension,
                             scan, image_dir.name, opts)
        if not report.images:
            nested = [d.name for d in sorted(image_dir.iterdir())
                      if d.is_dir() and _REPEAT_DIR.match(d.name)]
            hint = (f"; it holds kohya folders ({', '.join(nested[:3])}): point image_dir at "
                    "one of them (a subset reads its image_dir directly), or use "
                    "train_data_dir instead of dataset_config") if nested else ""
            scan.warnings.append(f"{label}: image_dir {str(image_dir)!r} has no images{hint}")
    # num_repeats applies to every subset kind (metadata readers give repeats 1).
    for k in range(before, len(scan.items)):
        scan.items[k] = replace(scan.items[k], repeats=num_repeats)
    for report in scan.folders[reports_before:]:
        report.repeats = num_repeats


def warn_reg_lookalikes(repeat_dirs, scan: Scan) -> None:
    """A folder that looks like regularization images trained as data (seed 002's
    `100_classname` beside `10_subject_classname`): its class tokens are a strict subset of
    another folder's, and it reads like class images: none of its images has a caption file
    (they train on the class tokens). Token subsets alone would also flag `10_sks dog`
    beside `4_sks dog sketch`, two captioned subject folders."""
    reports = {f.source: f for f in scan.folders}
    token_sets = [(d, set(re.split(r"[\s_]+", t)) - {""}) for d, _, t in repeat_dirs]
    for d, toks in token_sets:
        mine = reports.get(str(d))
        if mine is None or not mine.images:
            continue
        for other, other_toks in token_sets:
            theirs = reports.get(str(other))
            if other == d or not toks or not toks < other_toks or theirs is None:
                continue
            if mine.captions == 0:
                scan.warnings.append(
                    f"{d}: looks like regularization images for {other.name} (its class "
                    f"tokens are part of that folder's); move it to reg_data_dir so it is "
                    "balanced and weighted by prior_loss_weight instead of trained as data")
                break


def balance_reg(items: list[Item]) -> list[Item]:
    """kohya's balancing (DreamBoothDataset): the regularization samples of an epoch match
    the training samples (images x repeats).

    Reg images are taken in order with their own repeats until the count reaches the
    training samples; images past that point are left out (kohya never registers them).
    While the count is still short after every reg image is in, each image gets one more
    repeat, in order, until it matches. Without training images the reg images are kept
    as they are (the doctor reports "no training images" anyway).
    """
    train = [i for i in items if not i.is_reg]
    reg = [i for i in items if i.is_reg]
    target = sum(i.repeats for i in train)
    if not reg or not target:
        return items
    repeats: list[int] = []
    n = 0
    for r in reg:  # first pass: register images with their own repeats
        repeats.append(r.repeats)
        n += r.repeats
        if n >= target:
            break
    while n < target:  # later passes: one extra repeat per image
        for j in range(len(repeats)):
            repeats[j] += 1
            n += 1
            if n >= target:
                break
    return train + [replace(r, repeats=k) for r, k in zip(reg, repeats)]


def scan_sources(train_data_dir: str, reg_data_dir: str | None, *, caption_extension: str,
                 caption_column: str = "caption", image_column: str = "file_name",
                 opts: SubsetOptions = SubsetOptions()) -> Scan:
    """The main config's dataset: train_data_dir (+ reg_data_dir), balanced."""
    scan = Scan()
    caption_extension = normalise_extension(caption_extension)
    scan_dir(Path(train_data_dir), is_reg=False, caption_extension=caption_extension,
             caption_column=caption_column, image_column=image_column, scan=scan, opts=opts)
    if reg_data_dir:
        scan_dir(Path(reg_data_dir), is_reg=True, caption_extension=caption_extension,
                 caption_column=caption_column, image_column=image_column, scan=scan,
                 opts=opts)
    require_training_images(scan, f"train_data_dir: no training images found in "
                            f"{train_data_dir}")
    return scan


def require_training_images(scan: Scan, where: str) -> None:
    if not any(not i.is_reg for i in scan.items):
        scan.problems.append(
            f"{where} (looked for png/jpg/jpeg/webp/bmp in N_name subfolders, beside "
            "metadata.csv/jsonl, or in the folder itself)")


def normalise_extension(ext: str) -> str:
    return ext if ext.startswith(".") else "." + ext
