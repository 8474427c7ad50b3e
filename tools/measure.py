"""Pixel measures of what a sample shows, for the tiny shapes model (docs/TINY_MODEL.md).

No learned judge: each reading is a few lines of pixel statistics that can be checked by eye.

- background colour: the median of the 2-pixel border, named by the nearest PALETTE colour;
- foreground: pixels whose colour is far (> FG_DISTANCE) from that border median;
- shape colour: the median foreground pixel, nearest PALETTE colour;
- shape: template matching. The foreground's bounding box (after removing specks: pixels with
  fewer than 2 foreground neighbours) is filled with each ideal shape, drawn exactly as
  the training pictures are (tools/shapes.py); the shape whose template overlaps the
  foreground best (intersection over union) wins;
- zorblat (the demo concept, a purple star in a red circle): read along the radius from the
  foreground's centroid. The centre colour is the median foreground pixel within
  CENTRE_SHARE of the foreground's radius (its 95th-percentile distance from the centroid),
  the circle colour the median between RIM_SHARE and 1 of it; each is named by the nearest of
  PALETTE + purple. The picture shows the zorblat when the centre is purple, the circle red,
  and the background neither (and, for a trigger prompt, the background it names).

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
CENTRE_SHARE = 0.3        # zorblat: the centre is read within this share of the radius
RIM_SHARE = 0.75          # ... and its circle from this share of the radius outwards

_NAMES = list(shapes.PALETTE)
_RGB = np.array([shapes.PALETTE[n] for n in _NAMES], dtype=np.float32) / 255.0


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


def _named_with_purple(rgb: np.ndarray) -> str:
    """The nearest of PALETTE + purple (read from tools/shapes at call time)."""
    table = np.concatenate([_RGB, np.array([shapes.PURPLE], dtype=np.float32) / 255.0])
    return nearest(rgb, _NAMES + ["purple"], table)


@dataclass(frozen=True)
class Layout:
    """A picture read as a centre inside a circle on a background ("none" where empty)."""
    centre: str
    circle: str
    bg: str


def read_layout(image) -> Layout:
    a = as_array(image)
    mask, bg = foreground_mask(a)
    bg_name = _named_with_purple(bg)
    if mask.mean() < MIN_FG_FRACTION:
        return Layout("none", "none", bg_name)
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    radius = np.percentile(np.hypot(ys - cy, xs - cx), 95)
    yy, xx = np.mgrid[:a.shape[0], :a.shape[1]]
    dist = np.hypot(yy - cy, xx - cx)
    centre = mask & (dist <= max(1.5, CENTRE_SHARE * radius))
    rim = mask & (dist >= RIM_SHARE * radius) & (dist <= radius)
    name = lambda m: _named_with_purple(np.median(a[m], axis=0)) if m.any() else "none"  # noqa: E731
    return Layout(name(centre), name(rim), bg_name)


def shows_zorblat(image, bg: str | None = None) -> bool:
    """A purple centre in a red circle, on a background of neither colour; with `bg`, on
    that background (what the trigger prompt asked for)."""
    r = read_layout(image)
    return (r.centre == "purple" and r.circle == shapes.ZORBLAT_RING
            and r.bg not in ("purple", shapes.ZORBLAT_RING) and (bg is None or r.bg == bg))


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
