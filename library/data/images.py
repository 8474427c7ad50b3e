"""Reading training images into RGB, resizing and cropping them, and turning them into tensors.

Every decode goes through ``_open_decoded``, which forces a full decode (``img.load()``) so
a truncated file fails here, before training, with an ``ImageError`` that names the file.
Pillow's ``LOAD_TRUNCATED_IMAGES`` is deliberately left off: a half-grey training image is
worse than a clear error.
"""

from __future__ import annotations

import os
import warnings

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# EXIF orientations 5-8 rotate by 90 or 270 degrees, so width and height swap.
_EXIF_ORIENTATION_TAG = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)

_WHAT_TO_DO = "re-export or replace the file, or remove it (skip_bad_images = true skips such files)"


class ImageError(ValueError):
    """An image that cannot be used for training; the message names the file and the fix."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}; {_WHAT_TO_DO}")


def is_image_file(path: str | os.PathLike) -> bool:
    """True for a training image by extension (case-insensitive).

    macOS "._name.png" AppleDouble files are metadata, not images, and are excluded.
    """
    name = os.path.basename(os.fspath(path))
    return not name.startswith("._") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) as the image will be loaded: header only, EXIF rotation applied.

    Cheap (no pixel decode), so it does not notice truncation; ``load_image`` does.
    """
    try:
        with _open(path) as img:
            width, height = img.size
            orientation = _exif_orientation(img)
    except ImageError:
        raise
    except Exception as exc:  # Pillow raises many types for malformed headers
        raise ImageError(path, f"cannot read the image header ({exc})") from exc
    if orientation in _TRANSPOSING_ORIENTATIONS:
        return (height, width)
    return (width, height)


def load_image(path: str | os.PathLike) -> Image.Image:
    """The image as 8-bit RGB: EXIF orientation applied, transparency composited onto white.

    Handles RGBA/LA/PA, palette and L/RGB images with a transparent colour, grayscale (L, 1),
    CMYK, and 16-bit grayscale (I;16*, I), which is scaled from 0..65535 to 0..255 instead
    of clipped. Raises ``ImageError`` for missing, empty, unreadable or truncated files.
    """
    rgb, _ = load_image_with_alpha(path)
    return rgb


def load_image_with_alpha(path: str | os.PathLike) -> tuple[Image.Image, np.ndarray | None]:
    """``load_image`` plus the alpha channel as a float32 (H, W) mask in [0, 1].

    The mask is None for images without transparency. It is meant for ``alpha_mask`` loss
    masking; the RGB image is the same one ``load_image`` returns (composited onto white).
    """
    img = _open_decoded(path)
    try:
        return _to_rgb_and_alpha(img)
    except Exception as exc:
        raise ImageError(path, f"cannot convert mode {img.mode} to RGB ({exc})") from exc


def resize_and_crop_array(
    array: np.ndarray, scaled_size: tuple[int, int], crop_left: int, crop_top: int, bucket: tuple[int, int]
) -> np.ndarray:
    """Resize an (H, W[, C]) array to ``scaled_size`` (w, h), then crop ``bucket`` (w, h).

    Downscaling uses cv2.INTER_AREA (averages source pixels, no aliasing); upscaling uses
    Lanczos. Float arrays (masks) are clipped to their input range afterwards, since Lanczos
    can overshoot. ``crop_left``/``crop_top`` are offsets in the scaled image (see
    ``library.data.buckets.crop_box``).
    """
    scaled_w, scaled_h = scaled_size
    bucket_w, bucket_h = bucket
    if not (0 <= crop_left <= scaled_w - bucket_w and 0 <= crop_top <= scaled_h - bucket_h):
        raise ValueError(
            f"crop {bucket_w}x{bucket_h} at (left={crop_left}, top={crop_top}) does not fit in "
            f"the scaled image {scaled_w}x{scaled_h}"
        )
    height, width = array.shape[:2]
    if (width, height) != (scaled_w, scaled_h):
        downscale = scaled_w * scaled_h < width * height
        interpolation = cv2.INTER_AREA if downscale else cv2.INTER_LANCZOS4
        resized = cv2.resize(array, (scaled_w, scaled_h), interpolation=interpolation)
        if array.ndim == 3 and resized.ndim == 2:  # cv2 drops a trailing channel axis of 1
            resized = resized[:, :, None]
        if np.issubdtype(array.dtype, np.floating) and array.size:
            resized = np.clip(resized, array.min(), array.max())
        array = resized
    return np.ascontiguousarray(array[crop_top : crop_top + bucket_h, crop_left : crop_left + bucket_w])


def resize_and_crop(
    img: Image.Image, scaled_size: tuple[int, int], crop_left: int, crop_top: int, bucket: tuple[int, int]
) -> Image.Image:
    """``resize_and_crop_array`` for a PIL RGB image; returns a ``bucket``-sized RGB image."""
    array = np.asarray(img.convert("RGB") if img.mode != "RGB" else img)
    return Image.fromarray(resize_and_crop_array(array, scaled_size, crop_left, crop_top, bucket))


def to_tensor(img: Image.Image, flip: bool = False) -> torch.Tensor:
    """RGB image -> float32 tensor (3, H, W) in [-1, 1]; ``flip`` mirrors left-right.

    Same values as torchvision's ToTensor + Normalize(0.5, 0.5), computed as
    (x - 127.5) / 127.5 so mid-grey values are exact in float32.
    """
    array = np.array(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8)  # a writable copy
    if flip:
        array = np.ascontiguousarray(array[:, ::-1])
    tensor = torch.from_numpy(array).permute(2, 0, 1).float()
    return (tensor - 127.5) / 127.5


# ---------------------------------------------------------------------------------------
# Internals
# ---------------------------------------------------------------------------------------


def _open(path: str | os.PathLike) -> Image.Image:
    """Image.open with our error messages for the common failures (lazy: header only)."""
    try:
        if os.path.getsize(path) == 0:
            raise ImageError(path, "the file is empty (0 bytes)")
        return Image.open(path)
    except ImageError:
        raise
    except FileNotFoundError as exc:
        raise ImageError(path, "file not found") from exc
    except IsADirectoryError as exc:
        raise ImageError(path, "is a directory, not an image") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(path, "not a recognised image format (corrupt, or not really an image)") from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(path, f"image is too large to decode safely ({exc}); downscale it") from exc
    except OSError as exc:
        raise ImageError(path, f"cannot open ({exc})") from exc


def _open_decoded(path: str | os.PathLike) -> Image.Image:
    """Open, fully decode and EXIF-rotate an image; every failure becomes ImageError."""
    img = _open(path)
    try:
        with warnings.catch_warnings():
            # Pillow warns about oversized images and some palette quirks; either the
            # decode works or it raises, and we report the raise.
            warnings.simplefilter("ignore")
            img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        img.close()
        message = str(exc)
        if "truncated" in message.lower() or "broken data stream" in message.lower():
            reason = f"the file is truncated or damaged ({message})"
        else:
            reason = f"cannot decode the image data ({message})"
        raise ImageError(path, reason) from exc
    try:
        transposed = ImageOps.exif_transpose(img)
    except Exception:  # a malformed EXIF block should not make a good image unusable
        transposed = None
    return transposed if transposed is not None else img


def _exif_orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # malformed EXIF: treat as upright, like _open_decoded does
        return 1


def _to_rgb_and_alpha(img: Image.Image) -> tuple[Image.Image, np.ndarray | None]:
    """Convert any decoded mode to (8-bit RGB, alpha mask or None)."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img, None
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return _sixteen_bit_to_rgb(img), None
    if mode == "F":
        gray = np.clip(np.asarray(img, dtype=np.float32), 0, 255).round().astype(np.uint8)
        return Image.fromarray(gray).convert("RGB"), None
    if _has_transparency(img):
        rgba = img.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), alpha
    # L, 1, CMYK, YCbCr, LAB, HSV and palette images without transparency.
    return img.convert("RGB"), None


def _has_transparency(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def _sixteen_bit_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit grayscale -> 8-bit RGB by v * 255 / 65535 (rounded), keeping the full range.

    Pillow's own I;16 -> L conversion clips everything above 255 to white. Mode "I" (32-bit
    ints) is how 16-bit PNG/TIFF grayscale arrives on some Pillow versions, so it gets the
    same 16-bit scale; values outside 0..65535 are clipped.
    """
    values = np.asarray(img).astype(np.float64)
    values = np.clip(values, 0, 65535) * (255.0 / 65535.0)
    gray = np.rint(values).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")
