"""Aspect-ratio buckets and crop geometry (pure functions, no I/O).

Units, because they are easy to mix up:

* Every size in this module is ``(width, height)`` in pixels, as kohya and PIL write it:
  ``resolution``, buckets, ``image_size`` and ``CropBox.scaled_size``.
* ``CropBox.left`` / ``CropBox.top`` are pixel offsets of the crop inside the *scaled*
  image (after resizing to cover the bucket, before cropping).
* SDXL's micro-conditioning wants ``(height, width)`` order instead:
  ``original_size = (orig_h, orig_w)``, ``crop_top_left = (top, left)``,
  ``target_size = (bucket_h, bucket_w)``. ``sdxl_size_conditioning`` builds those six
  numbers from the values here, so nobody has to swap axes by hand.

The bucket list follows kohya-ss/sd-scripts ``library/model_util.py::make_bucket_resolutions``
(area-preserving: for each width, the tallest height whose area fits). Selection uses the
distance in log aspect ratio, which is what decides how much of the image a cover-crop cuts
away (see ``select_bucket``).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Iterable, NamedTuple, Sequence

Size = tuple[int, int]  # (width, height) in pixels

CROP_MODES = ("center", "random")


class CropBox(NamedTuple):
    """Where an image lands in its bucket: scale to ``scaled_size``, then crop.

    ``scaled_size`` is (width, height) of the resized image; ``left``/``top`` are the crop's
    top-left corner inside it. The crop itself is the bucket's size.
    """

    scaled_size: Size
    left: int
    top: int

    @property
    def crop_top_left(self) -> tuple[int, int]:
        """(top, left): SDXL's ``crops_coords_top_left`` order."""
        return (self.top, self.left)


# ---------------------------------------------------------------------------------------
# Bucket list
# ---------------------------------------------------------------------------------------


def default_max_bucket_reso(resolution: Size, step: int = 64) -> int:
    """Default ``max_bucket_reso``: twice the longer side, rounded up to ``step``.

    This reproduces kohya's SD1.5 default (1024 for resolution 512) and scales with the
    resolution, so SDXL at 1024 gets 2048 and the usual SDXL buckets such as (832, 1216)
    exist; kohya's fixed 1024 would cap every SDXL bucket at a side of 1024.
    """
    _check_positive_size(resolution, "resolution")
    return _ceil_to(2 * max(resolution), step)


def default_min_bucket_reso(resolution: Size, step: int = 64) -> int:
    """Default ``min_bucket_reso``: half the shorter side, rounded down to ``step``.

    Kohya's SD1.5 default (256 for resolution 512). Together with the default maximum
    (2x), the extreme buckets of a square resolution are exactly 1:4 and 4:1 with the full
    area, e.g. (512, 2048) for SDXL at 1024.
    """
    _check_positive_size(resolution, "resolution")
    return max(step, (min(resolution) // 2) // step * step)


def bucket_settings_errors(resolution: Size, min_reso: int, max_reso: int, step: int) -> list[str]:
    """Every problem with a bucket configuration, as messages naming key, value and fix.

    Empty when the settings are usable. The config loader reports these all at once;
    ``make_buckets`` raises them as one ``ValueError``.
    """
    errors = []
    if len(resolution) != 2 or min(resolution) <= 0:
        errors.append(f"resolution = {tuple(resolution)}: both sides must be positive integers")
        return errors
    if step <= 0 or step % 8:
        errors.append(
            f"bucket_reso_steps = {step}: must be a positive multiple of 8 (the VAE downsamples "
            "by 8); use 64, the usual value"
        )
        return errors
    if min_reso <= 0:
        errors.append(f"min_bucket_reso = {min_reso}: must be positive")
    if min_reso > max_reso:
        errors.append(f"min_bucket_reso = {min_reso} is larger than max_bucket_reso = {max_reso}")
    if min_reso > min(resolution):
        errors.append(
            f"min_bucket_reso = {min_reso} is larger than the shorter side of resolution "
            f"{tuple(resolution)}; lower it to at most {min(resolution)}"
        )
    if max_reso < max(resolution):
        errors.append(
            f"max_bucket_reso = {max_reso} is smaller than the longer side of resolution "
            f"{tuple(resolution)}; raise it to at least {max(resolution)} "
            f"(default for this resolution: {default_max_bucket_reso(resolution, step)})"
        )
    return errors


def make_buckets(resolution: Size, min_reso: int, max_reso: int, step: int) -> list[Size]:
    """Kohya's area-preserving bucket list, sorted and unique.

    max_area = resolution[0] * resolution[1]. For each width w = min_reso, min_reso + step,
    ..., max_reso the bucket (w, h) takes the largest h that is a multiple of ``step``, keeps
    w * h <= max_area and h <= max_reso; it is kept only if h >= min_reso, and its transpose
    (h, w) is added too. The square bucket (floor(sqrt(max_area)) rounded down to ``step``)
    is always included. Same output as kohya's ``make_bucket_resolutions`` whenever
    ``min_reso`` is a multiple of ``step``; otherwise we start at the next multiple, so
    every side stays a multiple of ``step``.
    """
    errors = bucket_settings_errors(resolution, min_reso, max_reso, step)
    if errors:
        raise ValueError("; ".join(errors))
    max_area = resolution[0] * resolution[1]
    square = int(math.isqrt(max_area)) // step * step
    buckets = {(square, square)}
    for width in range(_ceil_to(min_reso, step), max_reso + 1, step):
        height = min(max_reso, (max_area // width) // step * step)
        if height >= min_reso:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


def fixed_size_bucket(resolution: Size) -> Size:
    """The single bucket used when ``enable_bucket = false``: ``resolution`` itself.

    Every image is resized to cover it and cropped to it (``crop_box`` with "center", or
    "random" for ``random_crop``), as the diffusers example scripts do, instead of kohya's
    error for images larger than the resolution.
    """
    _check_positive_size(resolution, "resolution")
    return (int(resolution[0]), int(resolution[1]))


# ---------------------------------------------------------------------------------------
# Assigning an image to a bucket
# ---------------------------------------------------------------------------------------


def aspect_error(image_size: Size, bucket: Size) -> float:
    """|log(image aspect) - log(bucket aspect)|: 0 for a perfect fit.

    A cover-crop keeps exp(-error) of the image's area, so the smallest error is the
    bucket that crops away the least. Symmetric under transposition, unlike kohya's plain
    difference of w/h ratios, so a portrait image and its landscape twin get mirrored buckets.
    """
    return abs(math.log(image_size[0] / image_size[1]) - math.log(bucket[0] / bucket[1]))


def select_bucket(
    image_size: Size,
    buckets: Sequence[Size],
    no_upscale: bool,
    resolution: Size,
    step: int,
) -> Size:
    """The bucket (w, h) an image of ``image_size`` (w, h) trains in.

    Default: an exact size match wins (kohya keeps pre-bucketed images untouched); otherwise
    the bucket with the smallest ``aspect_error``, ties going to the larger area, then to the
    first in sorted order.

    ``no_upscale`` (kohya ``bucket_no_upscale``; ``buckets`` is ignored): the bucket comes from
    the image itself, as in kohya's ``BucketManager.select_bucket``. An image larger than the
    resolution's area is first scaled down to that area keeping its aspect, with one side
    rounded to ``step`` (whichever rounding keeps the aspect closer); each side is then
    rounded *down* to ``step``, so the bucket never exceeds the image and nothing is upscaled.
    Raises ValueError when a side would be below ``step`` (the doctor reports such images).
    """
    _check_positive_size(image_size, "image size")
    if not no_upscale:
        if not buckets:
            raise ValueError("no buckets to choose from")
        size = (int(image_size[0]), int(image_size[1]))
        if size in buckets:
            return size
        return min(buckets, key=lambda b: (aspect_error(size, b), -b[0] * b[1], b))

    width, height = _fit_area(image_size, resolution[0] * resolution[1], step)
    bucket = (width // step * step, height // step * step)
    if min(bucket) < step:
        raise ValueError(
            f"image {image_size[0]}x{image_size[1]} is too small for bucket_no_upscale with "
            f"bucket_reso_steps = {step}: a side would be 0; use a larger image or turn off "
            "bucket_no_upscale"
        )
    return bucket


def _fit_area(image_size: Size, max_area: int, step: int) -> Size:
    """kohya's no_upscale size: the image itself, or scaled down to ``max_area``."""
    width, height = image_size
    if width * height <= max_area:
        return (width, height)
    aspect = width / height
    scaled_w = math.sqrt(max_area * aspect)
    scaled_h = max_area / scaled_w
    # Round one side to the step, derive the other; keep the variant whose aspect is closer.
    w_first = _round_to(scaled_w, step)
    h_of_w = _round_to(w_first / aspect, step)
    h_first = _round_to(scaled_h, step)
    w_of_h = _round_to(h_first * aspect, step)
    err_w = abs(w_first / h_of_w - aspect) if h_of_w else math.inf
    err_h = abs(w_of_h / h_first - aspect) if h_first else math.inf
    if err_w < err_h:
        return (w_first, _round_half_up(w_first / aspect))
    return (_round_half_up(h_first * aspect), h_first)


# ---------------------------------------------------------------------------------------
# Crop geometry
# ---------------------------------------------------------------------------------------


def crop_box(
    image_size: Size, bucket: Size, mode: str = "center", rng: random.Random | None = None
) -> CropBox:
    """Scale ``image_size`` (w, h) to cover ``bucket`` (w, h), then place the crop.

    The scale is the smallest that keeps the aspect and makes both sides >= the bucket's;
    sides are rounded half up (kohya's rounding) and never below the bucket, so one side
    equals the bucket and the other overhangs by the aspect mismatch. ``mode`` "center"
    takes the middle (floor of half the overhang, as kohya does); "random" draws the left
    offset, then the top offset, with ``rng.randint`` (required for "random").
    """
    if mode not in CROP_MODES:
        raise ValueError(f"crop mode {mode!r}: expected one of {', '.join(CROP_MODES)}")
    _check_positive_size(image_size, "image size")
    _check_positive_size(bucket, "bucket")
    scale = max(bucket[0] / image_size[0], bucket[1] / image_size[1])
    scaled = (
        max(bucket[0], _round_half_up(image_size[0] * scale)),
        max(bucket[1], _round_half_up(image_size[1] * scale)),
    )
    spare_w, spare_h = scaled[0] - bucket[0], scaled[1] - bucket[1]
    if mode == "center":
        return CropBox(scaled, spare_w // 2, spare_h // 2)
    if rng is None:
        raise ValueError('crop mode "random" needs an rng (random.Random)')
    left = rng.randint(0, spare_w)
    top = rng.randint(0, spare_h)
    return CropBox(scaled, left, top)


def flip_crop_box(box: CropBox, bucket: Size) -> CropBox:
    """The same crop after mirroring the scaled image left-right (for ``flip_aug``).

    The crop's left edge becomes ``scaled_w - left - bucket_w``; top is unchanged.
    """
    return CropBox(box.scaled_size, box.scaled_size[0] - box.left - bucket[0], box.top)


def sdxl_size_conditioning(
    image_size: Size, bucket: Size, box: CropBox, flipped: bool = False
) -> tuple[int, int, int, int, int, int]:
    """SDXL ``add_time_ids`` for one image, in SDXL's (height, width) order.

    Returns (orig_h, orig_w, crop_top, crop_left, target_h, target_w): original_size is the
    image's size on disk (after EXIF rotation), crop_top_left is the crop actually applied
    in the scaled image (mirrored when ``flipped``), target_size is the bucket.
    """
    if flipped:
        box = flip_crop_box(box, bucket)
    return (image_size[1], image_size[0], box.top, box.left, bucket[1], bucket[0])


def bucket_histogram(assignments: Iterable[Size]) -> dict[Size, int]:
    """How many items went to each bucket, keys sorted by (w, h).

    Pass one entry per item (repeat an image ``repeats`` times to count training samples).
    """
    counts = Counter((int(w), int(h)) for w, h in assignments)
    return {bucket: counts[bucket] for bucket in sorted(counts)}


# ---------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------


def _check_positive_size(size: Sequence[int], what: str) -> None:
    if len(size) != 2 or size[0] <= 0 or size[1] <= 0:
        raise ValueError(f"{what} {tuple(size)}: expected (width, height), both positive")


def _ceil_to(value: int, step: int) -> int:
    return -(-value // step) * step


def _round_half_up(value: float) -> int:
    # kohya rounds with int(x + 0.5); Python's round() would round halves to even.
    return int(math.floor(value + 0.5))


def _round_to(value: float, step: int) -> int:
    """Round half up to an integer, then down to a multiple of ``step`` (kohya's round_to_steps)."""
    rounded = _round_half_up(value)
    return rounded - rounded % step
