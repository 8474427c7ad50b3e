"""Loss masks from mask images (`masked_loss` with `conditioning_data_dir`, kohya's meaning).

Each training image's mask is the image with the same file stem in the conditioning folder
(any image extension). Its red channel, scaled to [0, 1], weights the loss per pixel: white
trains fully, black not at all (kohya reads the red channel of the conditioning image).
The mask gets the image's own resize, crop and flip, then is area-averaged to latent size
(``dataset.latent_mask``), exactly as an alpha mask; with `cache_latents` it is cached with
the latent, and the disk key includes the mask file's bytes.

Which folder: a kohya dataset_config subset's own `conditioning_data_dir`; with
`train_data_dir`, the `conditioning_data_dir` of [dataset], where the mask of
`train_data_dir/10_name/img.png` is `conditioning_data_dir/10_name/img.*` or, when that
subfolder does not exist, `conditioning_data_dir/img.*`. Regularization images never have
masks (they train everywhere). A training image without a mask is a data error naming it;
mask images that match no training image are listed in a warning.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from library.data.images import image_size, is_image_file, load_image


def masks_by_stem(folder: Path) -> dict[str, Path]:
    """{file stem: mask image} of the images directly in `folder` (first name wins)."""
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and is_image_file(p):
            out.setdefault(p.stem, p)
    return out


def attach_masks(items: list, folder_of, label: str) -> tuple[list, list[str], list[str]]:
    """(items with `mask` set, problems, warnings). `folder_of(item)` is the conditioning
    folder to look in for a training item, or None when its subset has no masks."""
    listings: dict[Path, dict[str, Path]] = {}
    used: set[Path] = set()
    out, problems = [], []
    for it in items:
        folder = None if it.is_reg else folder_of(it)
        if folder is None:
            out.append(it)
            continue
        if folder not in listings:
            listings[folder] = masks_by_stem(folder)
        mask = listings[folder].get(it.image.stem)
        if mask is None:
            problems.append(f"{it.image}: no mask image {it.image.stem}.* in {folder} "
                            f"({label}: masked_loss needs one per training image; add it, "
                            "or move the image out)")
            out.append(it)
            continue
        used.add(mask)
        out.append(replace(it, mask=mask))
    warnings = []
    for folder, masks in listings.items():
        extra = sorted(p.name for p in masks.values() if p not in used)
        if extra:
            warnings.append(f"{folder}: {len(extra)} mask image(s) match no training image "
                            f"and are unused: {', '.join(extra[:5])}"
                            f"{', ...' if len(extra) > 5 else ''}")
    return out, problems, warnings


def mask_size_problems(items: list, sizes: list[tuple[int, int]]) -> list[str]:
    """A mask must have its image's size (kohya refuses others too): it is cropped with the
    image's crop box."""
    problems = []
    for it, size in zip(items, sizes):
        if it.mask is None:
            continue
        try:
            msize = image_size(it.mask)
        except Exception as e:  # an unreadable mask is reported like an unreadable image
            problems.append(f"{it.mask}: cannot read the mask image ({e})")
            continue
        if tuple(msize) != tuple(size):
            problems.append(f"{it.mask}: mask is {msize[0]}x{msize[1]} but its image "
                            f"{it.image} is {size[0]}x{size[1]}; masks must match their "
                            "image's size")
    return problems


def load_mask(path: Path) -> np.ndarray:
    """The red channel of a mask image as float32 (H, W) in [0, 1] (after EXIF rotation, as
    the image)."""
    red = np.asarray(load_image(path))[:, :, 0]  # 8-bit RGB; grayscale masks repeat
    return red.astype(np.float32) / 255.0
