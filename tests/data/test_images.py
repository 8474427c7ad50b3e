"""Image loading, size probing, resize/crop and tensor conversion (library/data/images.py).

Every test writes real files with Pillow into tmp_path, so the decoders really run.
"""

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from library.data.images import (
    IMAGE_EXTENSIONS,
    ImageError,
    image_size,
    is_image_file,
    load_image,
    load_image_with_alpha,
    resize_and_crop,
    resize_and_crop_array,
    to_tensor,
)


def _save(img, path, **kwargs):
    img.save(path, **kwargs)
    return str(path)


def _jpeg_bytes(size=(64, 48)):
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- modes


def test_rgba_png_composited_onto_white(tmp_path):
    array = np.zeros((4, 4, 4), dtype=np.uint8)
    array[..., 0] = 255  # red everywhere
    array[:2, :, 3] = 255  # top half opaque
    array[2:, :, 3] = 0  # bottom half fully transparent
    array[3, 3] = (0, 0, 0, 128)  # half-transparent black
    path = _save(Image.fromarray(array, "RGBA"), tmp_path / "a.png")
    img = load_image(path)
    out = np.asarray(img)
    assert img.mode == "RGB" and img.size == (4, 4)
    assert (out[:2] == (255, 0, 0)).all()
    assert (out[2, :] == 255).all()  # transparent -> white, not red or black
    assert abs(int(out[3, 3, 0]) - 127) <= 1

    rgb, alpha = load_image_with_alpha(path)
    assert alpha.dtype == np.float32 and alpha.shape == (4, 4)
    assert alpha[0, 0] == 1.0 and alpha[2, 0] == 0.0
    assert alpha[3, 3] == pytest.approx(128 / 255)


def test_la_png_composited(tmp_path):
    img = Image.new("LA", (3, 3), (0, 0))
    path = _save(img, tmp_path / "la.png")
    assert (np.asarray(load_image(path)) == 255).all()


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (4, 2), 1)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    img.putpixel((0, 0), 0)  # index 0 is the transparent colour
    path = _save(img, tmp_path / "p.png", transparency=0)
    out = np.asarray(load_image(path))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[1, 1]) == (0, 255, 0)
    _, alpha = load_image_with_alpha(path)
    assert alpha[0, 0] == 0.0 and alpha[1, 1] == 1.0


def test_palette_without_transparency(tmp_path):
    img = Image.new("P", (2, 2), 1)
    img.putpalette([0, 0, 0, 10, 20, 30] + [0] * (256 * 3 - 6))
    path = _save(img, tmp_path / "p.png")
    rgb, alpha = load_image_with_alpha(path)
    assert alpha is None and tuple(np.asarray(rgb)[0, 0]) == (10, 20, 30)


@pytest.mark.parametrize("mode, value, expected", [("L", 77, 77), ("1", 1, 255), ("1", 0, 0)])
def test_grayscale_to_rgb(tmp_path, mode, value, expected):
    path = _save(Image.new(mode, (5, 3), value), tmp_path / "g.png")
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (5, 3)
    assert (np.asarray(img) == expected).all()


def test_cmyk_jpeg_to_rgb(tmp_path):
    path = _save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "c.jpg", quality=95)
    img = load_image(path)
    r, g, b = (int(v) for v in np.asarray(img)[8, 8])
    assert img.mode == "RGB"
    assert r > 200 and g < 60 and b < 60  # cyan-free, full magenta+yellow = red


def test_sixteen_bit_png_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 512).round().astype(np.uint16).reshape(1, 512)
    source = Image.fromarray(values)
    assert source.mode.startswith("I;16")
    path = _save(source, tmp_path / "deep.png")
    out = np.asarray(load_image(path))[0, :, 0].astype(int)
    assert out[0] == 0 and out[-1] == 255
    assert (np.diff(out) >= 0).all()  # monotone
    assert len(np.unique(out)) == 256  # the full 8-bit range is used, nothing clipped
    assert abs(out[256] - 128) <= 1


def test_rgb_passthrough(tmp_path):
    array = np.random.default_rng(1).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    path = _save(Image.fromarray(array), tmp_path / "x.png")
    rgb, alpha = load_image_with_alpha(path)
    assert alpha is None and (np.asarray(rgb) == array).all()


# --------------------------------------------------------------------------- EXIF


@pytest.mark.parametrize("orientation, expected", [(1, (64, 32)), (3, (64, 32)), (6, (32, 64)), (8, (32, 64))])
def test_exif_orientation(tmp_path, orientation, expected):
    array = np.zeros((32, 64, 3), dtype=np.uint8)
    array[:, :32] = 255  # left half white, so the rotation is visible
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(Image.fromarray(array), tmp_path / f"o{orientation}.jpg", exif=exif, quality=95)
    assert image_size(path) == expected
    img = load_image(path)
    assert img.size == expected
    out = np.asarray(img).astype(int)
    if orientation == 6:  # rotated 90 degrees clockwise: the white half is now on top
        assert out[:16].mean() > 200 and out[48:].mean() < 50


# --------------------------------------------------------------------------- errors


def _zero_byte(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    return path, "empty"


def _truncated_jpeg(tmp_path):
    data = _jpeg_bytes((256, 256))
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    return path, "truncated"


def _truncated_png(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(buffer, "PNG")
    data = buffer.getvalue()
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    return path, "truncated"


def _random_bytes(tmp_path):
    path = tmp_path / "noise.png"
    path.write_bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path, "not a recognised image"


def _text_file(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    return path, "not a recognised image"


def _missing(tmp_path):
    return tmp_path / "nope.png", "not found"


@pytest.mark.parametrize("make", [_zero_byte, _truncated_jpeg, _truncated_png, _random_bytes, _text_file, _missing])
def test_bad_files_raise_image_error(tmp_path, make):
    path, fragment = make(tmp_path)
    with pytest.raises(ImageError) as info:
        load_image(path)
    error = info.value
    assert isinstance(error, ValueError)
    assert str(path) in str(error) and error.path == str(path)
    assert fragment in str(error)
    assert "skip_bad_images" in str(error)  # says what to do


@pytest.mark.parametrize("make", [_zero_byte, _random_bytes, _missing])
def test_image_size_bad_files(tmp_path, make):
    path, _ = make(tmp_path)
    with pytest.raises(ImageError, match=str(path)):
        image_size(path)


def test_image_size_is_header_only(tmp_path):
    # A truncated file still has a valid header: image_size answers, load_image refuses.
    path, _ = _truncated_jpeg(tmp_path)
    assert image_size(path) == (256, 256)
    with pytest.raises(ImageError):
        load_image(path)


# --------------------------------------------------------------------------- resize / crop / tensor


def test_resize_and_crop_geometry_without_resize():
    array = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    img = Image.fromarray(array)
    out = resize_and_crop(img, (8, 6), 2, 1, (4, 4))
    assert out.size == (4, 4)
    assert (np.asarray(out) == array[1:5, 2:6]).all()


def test_downscale_uses_area_averaging():
    # A 1-pixel checkerboard halves to flat grey with area averaging (nearest/bilinear alias).
    board = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)
    img = Image.fromarray(np.stack([board] * 3, axis=-1))
    out = np.asarray(resize_and_crop(img, (32, 32), 0, 0, (32, 32))).astype(int)
    assert np.abs(out - 127.5).max() <= 1


@pytest.mark.parametrize(
    "source, scaled, left, top, bucket",
    [((100, 50), (1024, 512), 256, 0, (512, 512)), ((1000, 700), (731, 512), 109, 0, (512, 512)),
     ((300, 400), (384, 512), 0, 0, (384, 512)), ((640, 384), (640, 384), 0, 0, (640, 384))],
)
def test_resize_and_crop_output_size(source, scaled, left, top, bucket):
    img = Image.new("RGB", source, (10, 200, 30))
    out = resize_and_crop(img, scaled, left, top, bucket)
    assert out.size == bucket and out.mode == "RGB"
    assert (np.abs(np.asarray(out).astype(int) - (10, 200, 30)) <= 1).all()


def test_resize_and_crop_rejects_bad_crop():
    with pytest.raises(ValueError, match="does not fit"):
        resize_and_crop(Image.new("RGB", (10, 10)), (10, 10), 5, 0, (8, 8))


def test_resize_and_crop_array_mask_stays_in_range():
    mask = np.zeros((20, 20), dtype=np.float32)
    mask[:, 10:] = 1.0
    out = resize_and_crop_array(mask, (60, 60), 2, 3, (50, 50))  # Lanczos upscale overshoots
    assert out.shape == (50, 50) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_to_tensor_values_and_flip():
    array = np.zeros((2, 3, 3), dtype=np.uint8)
    array[:, 0] = 255  # left column white
    array[0, 2] = (0, 128, 255)
    img = Image.fromarray(array)
    tensor = to_tensor(img)
    assert tensor.shape == (3, 2, 3) and tensor.dtype == torch.float32
    assert tensor.min() >= -1 and tensor.max() <= 1
    assert torch.allclose(tensor[:, 1, 0], torch.ones(3))
    assert torch.allclose(tensor[:, 1, 1], -torch.ones(3))
    assert torch.allclose(tensor[:, 0, 2], torch.tensor([-1.0, 128 / 127.5 - 1, 1.0]))
    flipped = to_tensor(img, flip=True)
    assert torch.equal(flipped, torch.flip(tensor, dims=[2]))


# --------------------------------------------------------------------------- extensions


@pytest.mark.parametrize(
    "name, expected",
    [("a.png", True), ("a.PNG", True), ("dir/b.JpEg", True), ("c.jpg", True), ("d.webp", True),
     ("e.bmp", True), ("f.txt", False), ("g.npz", False), ("h", False), ("png", False),
     ("._i.png", False), ("archive.png.txt", False), (os.path.join("x.png", "y.caption"), False)],
)
def test_is_image_file(name, expected):
    assert is_image_file(name) is expected


def test_image_extensions():
    assert IMAGE_EXTENSIONS == (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# --------------------------------------------------------------------------- webp and bmp


def _noise(size=(40, 24), channels=3, seed=5):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)


@pytest.mark.parametrize("name,kwargs", [("a.webp", {"lossless": True}), ("a.bmp", {})])
def test_webp_lossless_and_bmp_decode_exactly(tmp_path, name, kwargs):
    pixels = _noise()
    path = _save(Image.fromarray(pixels), tmp_path / name, **kwargs)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (40, 24) and image_size(path) == (40, 24)
    np.testing.assert_array_equal(np.asarray(img), pixels)


def test_lossy_webp_decodes_within_codec_tolerance(tmp_path):
    # smooth content: lossy webp at high quality stays within a few levels per channel
    x = np.linspace(0, 255, 64)
    pixels = np.stack([np.add.outer(x[:32] * 0, x), np.add.outer(x[:32], x * 0),
                       np.full((32, 64), 128.0)], axis=-1).astype(np.uint8)
    path = _save(Image.fromarray(pixels), tmp_path / "a.webp", quality=95)
    img = np.asarray(load_image(path)).astype(int)
    assert img.shape == pixels.shape
    assert np.abs(img - pixels).mean() < 3 and np.abs(img - pixels).max() < 40


def test_rgba_webp_is_composited_and_keeps_its_alpha(tmp_path):
    pixels = _noise(channels=3)
    alpha = np.zeros((24, 40), np.uint8)
    alpha[:, 20:] = 255  # left half transparent, right half opaque
    rgba = np.dstack([pixels, alpha])
    path = _save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.webp", lossless=True, exact=True)
    rgb, mask = load_image_with_alpha(path)
    rgb = np.asarray(rgb)
    np.testing.assert_array_equal(rgb[:, 20:], pixels[:, 20:])
    assert (rgb[:, :20] == 255).all()  # composited onto white
    np.testing.assert_array_equal(mask, alpha.astype(np.float32) / 255)


def test_bmp_palette_and_grayscale_decode_to_rgb(tmp_path):
    gray = _noise(channels=1)[..., 0]
    path = _save(Image.fromarray(gray, "L"), tmp_path / "g.bmp")
    np.testing.assert_array_equal(np.asarray(load_image(path)), np.stack([gray] * 3, -1))
    pal = Image.fromarray(_noise()).quantize(16)
    path = _save(pal, tmp_path / "p.bmp")
    np.testing.assert_array_equal(np.asarray(load_image(path)), np.asarray(pal.convert("RGB")))
