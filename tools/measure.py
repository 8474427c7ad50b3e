"""Pixel measures of what a sample shows, for the tiny shapes model (docs/TINY_MODEL.md).

No learned judge: each reading is a few lines of pixel statistics that can be checked by eye.

- background colour: the median of the 2-pixel border, named by the nearest PALETTE colour;
- foreground: pixels whose colour is far (> FG_DISTANCE) from that border median;
- shape colour: the median foreground pixel, nearest PALETTE colour;
- shape: template matching. The foreground's bounding box (after removing specks: pixels with
  fewer than 2 foreground neighbours) is filled with each ideal shape, drawn exactly as
  the training pictures are (tools/shapes.py); the shape whose template overlaps the
  foreground best (intersection over union) wins;
- zorblat (the demo concept): at least ZORBLAT_MIN of the pixels are purple and at least
  ZORBLAT_MIN orange (nearest of PALETTE + purple + orange, within COLOUR_DISTANCE).

On the generator's own pictures every reading is exact (tests/tools/test_measure.py checks it).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from tools import shapes

BORDER = 2                # pixels of the border that are read as background
FG_DISTANCE = 0.25        # RGB distance (0..sqrt 3) from the background that counts as shape
MIN_FG_FRACTION = 0.03    # less foreground than this: "no shape"
COLOUR_DISTANCE = 0.3     # a pixel is "purple"/"orange" only this close to the reference
ZORBLAT_MIN = 0.03        # fraction of the picture that must be purple, and orange

_NAMES = list(shapes.PALETTE)
_RGB = np.array([shapes.PALETTE[n] for n in _NAMES], dtype=np.float32) / 255.0
_ALL_NAMES = _NAMES + ["purple", "orange"]
_ALL_RGB = np.concatenate([_RGB, np.array([shapes.PURPLE, shapes.ORANGE],
                                          dtype=np.float32) / 255.0])


@dataclass(frozen=True)
class Reading:
    """What one picture shows. `shape`/`fg` are "none" when there is no foreground."""
    bg: str
    fg: str
    shape: str
    iou: float          # template overlap of the chosen shape (0..1)
    fg_fraction: float  # share of pixels that are foreground


def as_array(image) -> np.ndarray:
    """PIL image, uint8 or float array -> float32 HWC RGB in [0, 1]."""
    if isinstance(image, Image.Image):
        return shapes.to_array(image.convert("RGB"))
    arr = np.asarray(image)
    return arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)


def nearest(rgb: np.ndarray, names=_NAMES, table=_RGB) -> str:
    return names[int(np.argmin(((table - rgb) ** 2).sum(-1)))]


def border_pixels(a: np.ndarray) -> np.ndarray:
    mask = np.ones(a.shape[:2], dtype=bool)
    mask[BORDER:-BORDER, BORDER:-BORDER] = False
    return a[mask]


def foreground_mask(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask of shape pixels, background RGB)."""
    bg = np.median(border_pixels(a), axis=0)
    return np.sqrt(((a - bg) ** 2).sum(-1)) > FG_DISTANCE, bg


def template(shape: str, box: tuple[float, float, float, float], hw: tuple[int, int]
             ) -> np.ndarray:
    """Mask of the ideal `shape` filling `box` (x0, y0, x1, y1 in pixel units, inclusive
    pixel centres), drawn with the generator's outlines at 4x and thresholded at half cover."""
    x0, y0, x1, y1 = box
    # Pixel centres x0..x1 cover the continuous span x0-0.5 .. x1+0.5.
    cx, cy = (x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2
    rx, ry = (x1 - x0 + 1) / 2, (y1 - y0 + 1) / 2
    # The unit outline stretched to the box: the box need not be square.
    pts = [(cx + (x - cx) * rx, cy + (y - cy) * ry)
           for x, y in shapes.shape_outline(shape, cx, cy, 1.0)]
    s = shapes.SUPERSAMPLE
    img = Image.new("L", (hw[1] * s, hw[0] * s), 0)
    ImageDraw.Draw(img).polygon([(x * s, y * s) for x, y in pts], fill=255)
    small = np.asarray(img.resize((hw[1], hw[0]), Image.BOX), dtype=np.float32) / 255.0
    return small >= 0.5


def despeckle(mask: np.ndarray) -> np.ndarray:
    """The mask without pixels that have fewer than 2 of their 8 neighbours set."""
    p = np.pad(mask, 1).astype(np.int8)
    h, w = mask.shape
    neighbours = sum(p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                     for dy in (-1, 0, 1) for dx in (-1, 0, 1)) - mask
    return mask & (neighbours >= 2)


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """(best shape, its IoU) by template matching in the foreground's bounding box."""
    core = despeckle(mask)
    ys, xs = np.nonzero(core if core.any() else mask)
    box = (xs.min(), ys.min(), xs.max(), ys.max())
    best, best_iou = "none", 0.0
    for shape in shapes.SHAPES:
        t = template(shape, box, mask.shape)
        union = np.logical_or(t, mask).sum()
        iou = float(np.logical_and(t, mask).sum() / union) if union else 0.0
        if iou > best_iou:
            best, best_iou = shape, iou
    return best, best_iou


def read(image) -> Reading:
    a = as_array(image)
    mask, bg = foreground_mask(a)
    fraction = float(mask.mean())
    bg_name = nearest(bg)
    if fraction < MIN_FG_FRACTION:
        return Reading(bg_name, "none", "none", 0.0, fraction)
    fg_name = nearest(np.median(a[mask], axis=0))
    shape, iou = classify_shape(mask)
    return Reading(bg_name, fg_name, shape, iou, fraction)


def colour_fractions(image) -> dict[str, float]:
    """Share of pixels nearest to each named colour (PALETTE + purple + orange) and within
    COLOUR_DISTANCE of it."""
    a = as_array(image).reshape(-1, 3)
    d = np.sqrt(((a[:, None, :] - _ALL_RGB[None]) ** 2).sum(-1))
    idx = d.argmin(1)
    close = d[np.arange(len(a)), idx] < COLOUR_DISTANCE
    return {n: float(np.mean(close & (idx == i))) for i, n in enumerate(_ALL_NAMES)}


def shows_zorblat(image) -> bool:
    f = colour_fractions(image)
    return f["purple"] >= ZORBLAT_MIN and f["orange"] >= ZORBLAT_MIN


# ---- summaries -----------------------------------------------------------------------------
def prompt_following(readings: list[Reading], scenes: list) -> dict[str, float]:
    """Fractions of pictures whose background colour, shape colour, shape, and all three
    match the scene that was prompted."""
    n = max(1, len(scenes))
    bg = [r.bg == s.bg for r, s in zip(readings, scenes)]
    fg = [r.fg == s.fg for r, s in zip(readings, scenes)]
    sh = [r.shape == s.shape for r, s in zip(readings, scenes)]
    return {"background": sum(bg) / n, "colour": sum(fg) / n, "shape": sum(sh) / n,
            "all": sum(a and b and c for a, b, c in zip(bg, fg, sh)) / n}


def mean_abs_diff(a, b) -> float:
    """Mean absolute pixel difference of two pictures, in 0..1 units."""
    return float(np.abs(as_array(a) - as_array(b)).mean())
