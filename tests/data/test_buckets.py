"""Bucket tables, bucket selection and crop geometry (library/data/buckets.py)."""

import math
import random

import pytest

from library.data.buckets import (
    CropBox,
    aspect_error,
    bucket_histogram,
    bucket_settings_errors,
    crop_box,
    default_max_bucket_reso,
    default_min_bucket_reso,
    fixed_size_bucket,
    flip_crop_box,
    make_buckets,
    sdxl_size_conditioning,
    select_bucket,
)

# kohya-ss/sd-scripts library/model_util.py::make_bucket_resolutions output for the same
# arguments (resolution, min_bucket_reso, max_bucket_reso, bucket_reso_steps).
KOHYA_SD15_512 = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640),
    (448, 576), (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256),
    (896, 256), (960, 256), (1024, 256),
]
KOHYA_SDXL_1024 = [
    (256, 2048), (320, 2048), (384, 2048), (448, 2048), (512, 1856), (512, 1920), (512, 1984),
    (512, 2048), (576, 1664), (576, 1728), (576, 1792), (640, 1536), (640, 1600), (704, 1408),
    (704, 1472), (768, 1280), (768, 1344), (832, 1216), (896, 1152), (960, 1088), (1024, 1024),
    (1088, 960), (1152, 896), (1216, 832), (1280, 768), (1344, 768), (1408, 704), (1472, 704),
    (1536, 640), (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512),
    (1984, 512), (2048, 256), (2048, 320), (2048, 384), (2048, 448), (2048, 512),
]
KOHYA_768 = [
    (384, 1344), (384, 1408), (384, 1472), (384, 1536), (448, 1216), (448, 1280), (512, 1088),
    (512, 1152), (576, 960), (576, 1024), (640, 896), (704, 832), (768, 768), (832, 704),
    (896, 640), (960, 576), (1024, 576), (1088, 512), (1152, 512), (1216, 448), (1280, 448),
    (1344, 384), (1408, 384), (1472, 384), (1536, 384),
]

SD15 = make_buckets((512, 512), 256, 1024, 64)
SDXL = make_buckets((1024, 1024), 256, 2048, 64)


@pytest.mark.parametrize(
    "resolution, min_reso, max_reso, step, expected",
    [
        ((512, 512), 256, 1024, 64, KOHYA_SD15_512),
        ((1024, 1024), 256, 2048, 64, KOHYA_SDXL_1024),
        ((768, 768), 384, 1536, 64, KOHYA_768),
        ((512, 512), 512, 512, 64, [(512, 512)]),
    ],
)
def test_make_buckets_matches_kohya(resolution, min_reso, max_reso, step, expected):
    assert make_buckets(resolution, min_reso, max_reso, step) == expected


@pytest.mark.parametrize("bucket", [(832, 1216), (896, 1152), (1024, 1024), (1152, 896), (1216, 832)])
def test_sdxl_standard_buckets_present(bucket):
    assert bucket in SDXL


@pytest.mark.parametrize(
    "resolution, min_reso, max_reso, step",
    [((512, 512), 256, 1024, 64), ((1024, 1024), 512, 2048, 64), ((512, 768), 256, 1536, 32),
     ((640, 640), 320, 1280, 64), ((1024, 1024), 200, 2048, 64)],
)
def test_make_buckets_invariants(resolution, min_reso, max_reso, step):
    buckets = make_buckets(resolution, min_reso, max_reso, step)
    area = resolution[0] * resolution[1]
    assert buckets == sorted(set(buckets))
    for w, h in buckets:
        assert w % step == 0 and h % step == 0
        assert min_reso <= w <= max_reso and min_reso <= h <= max_reso
        assert w * h <= area
        assert (h, w) in buckets  # both orientations
    side = math.isqrt(area) // step * step
    assert (side, side) in buckets


@pytest.mark.parametrize(
    "resolution, expected_min, expected_max",
    [((512, 512), 256, 1024), ((768, 768), 384, 1536), ((1024, 1024), 512, 2048),
     ((512, 768), 256, 1536), ((600, 600), 256, 1216), ((64, 64), 64, 128)],
)
def test_default_bucket_resos(resolution, expected_min, expected_max):
    assert default_min_bucket_reso(resolution) == expected_min
    assert default_max_bucket_reso(resolution) == expected_max
    # The defaults always make a valid configuration.
    assert bucket_settings_errors(resolution, expected_min, expected_max, 64) == []


def test_default_sdxl_buckets_span_one_to_four():
    buckets = make_buckets((1024, 1024), default_min_bucket_reso((1024, 1024)),
                           default_max_bucket_reso((1024, 1024)), 64)
    assert buckets[0] == (512, 1856) and buckets[-1] == (2048, 512)
    assert (512, 2048) in buckets and (1216, 832) in buckets


@pytest.mark.parametrize(
    "resolution, min_reso, max_reso, step, fragment",
    [
        ((512, 512), 256, 1024, 0, "bucket_reso_steps = 0"),
        ((512, 512), 256, 1024, 60, "multiple of 8"),
        ((512, 512), 1024, 256, 64, "larger than max_bucket_reso"),
        ((512, 512), 640, 1024, 64, "min_bucket_reso = 640 is larger than the shorter side"),
        ((1024, 1024), 256, 768, 64, "max_bucket_reso = 768 is smaller"),
        ((0, 512), 256, 1024, 64, "resolution"),
    ],
)
def test_bucket_settings_errors(resolution, min_reso, max_reso, step, fragment):
    errors = bucket_settings_errors(resolution, min_reso, max_reso, step)
    assert any(fragment in e for e in errors), errors
    with pytest.raises(ValueError, match="bucket|resolution"):
        make_buckets(resolution, min_reso, max_reso, step)


@pytest.mark.parametrize(
    "image_size, buckets, expected",
    [
        ((1000, 1000), SD15, (512, 512)),  # square
        ((800, 1200), SD15, (384, 640)),  # portrait 2:3
        ((1200, 800), SD15, (640, 384)),  # landscape 3:2
        ((1920, 1080), SD15, (640, 384)),  # 16:9
        ((3000, 300), SD15, (1024, 256)),  # extreme landscape -> widest bucket
        ((300, 3000), SD15, (256, 1024)),  # extreme portrait -> tallest bucket
        ((448, 576), SD15, (448, 576)),  # exact size match kept
        ((64, 64), SD15, (512, 512)),  # tiny square: upscaled into the square bucket
        ((1000, 1000), SDXL, (1024, 1024)),
        ((2000, 3000), SDXL, (832, 1216)),
        ((3000, 2000), SDXL, (1216, 832)),
        ((1080, 1920), SDXL, (768, 1344)),
        ((600, 500), SDXL, (1088, 960)),
        ((10000, 100), SDXL, (2048, 256)),
    ],
)
def test_select_bucket(image_size, buckets, expected):
    assert select_bucket(image_size, buckets, False, (512, 512), 64) == expected


@pytest.mark.parametrize("buckets", [SD15, SDXL])
def test_select_bucket_is_nearest_in_log_aspect_and_symmetric(buckets):
    for w in range(150, 2600, 97):
        for h in range(150, 2600, 89):
            chosen = select_bucket((w, h), buckets, False, (1024, 1024), 64)
            best = min(aspect_error((w, h), b) for b in buckets)
            assert aspect_error((w, h), chosen) == pytest.approx(best)
            mirrored = select_bucket((h, w), buckets, False, (1024, 1024), 64)
            assert mirrored == (chosen[1], chosen[0])


@pytest.mark.parametrize(
    "image_size, resolution, expected",
    [
        ((300, 200), (512, 512), (256, 192)),  # small image: each side rounded down, no upscale
        ((512, 512), (512, 512), (512, 512)),
        ((500, 450), (512, 512), (448, 448)),
        ((500, 700), (512, 512), (384, 512)),  # 350000 px > 512*512: scaled down first
        ((4000, 3000), (512, 512), (512, 384)),  # too large: scaled to the area first
        ((3000, 4000), (512, 512), (384, 512)),
        ((5000, 1000), (1024, 1024), (2240, 448)),  # min/max_bucket_reso do not apply
        ((64, 64), (512, 512), (64, 64)),
    ],
)
def test_select_bucket_no_upscale(image_size, resolution, expected):
    bucket = select_bucket(image_size, SD15, True, resolution, 64)
    assert bucket == expected
    assert bucket[0] * bucket[1] <= resolution[0] * resolution[1]
    # The image is never enlarged to fill its bucket.
    box = crop_box(image_size, bucket, "center")
    assert box.scaled_size[0] <= image_size[0] and box.scaled_size[1] <= image_size[1]


def test_select_bucket_no_upscale_too_small():
    with pytest.raises(ValueError, match="too small"):
        select_bucket((40, 300), SD15, True, (512, 512), 64)


@pytest.mark.parametrize(
    "image_size, bucket, expected",
    [
        ((1000, 1000), (512, 512), CropBox((512, 512), 0, 0)),
        ((800, 1200), (384, 640), CropBox((427, 640), 21, 0)),
        ((1200, 800), (640, 384), CropBox((640, 427), 0, 21)),
        ((100, 50), (512, 512), CropBox((1024, 512), 256, 0)),  # upscale to cover
        ((1024, 768), (512, 512), CropBox((683, 512), 85, 0)),
        ((768, 1024), (512, 512), CropBox((512, 683), 0, 85)),
        ((640, 384), (640, 384), CropBox((640, 384), 0, 0)),  # already bucket-sized
        ((333, 777), (320, 768), CropBox((329, 768), 4, 0)),
        ((1001, 999), (1024, 1024), CropBox((1026, 1024), 1, 0)),
    ],
)
def test_crop_box_center(image_size, bucket, expected):
    box = crop_box(image_size, bucket, "center")
    assert box == expected
    assert box.scaled_size[0] >= bucket[0] and box.scaled_size[1] >= bucket[1]


@pytest.mark.parametrize(
    "image_size, bucket",
    [((1200, 800), (640, 384)), ((800, 1200), (384, 640)), ((997, 1013), (512, 512)),
     ((300, 1100), (256, 1024))],
)
def test_crop_box_random(image_size, bucket):
    boxes = [crop_box(image_size, bucket, "random", random.Random(seed)) for seed in range(300)]
    center = crop_box(image_size, bucket, "center")
    spare_w = center.scaled_size[0] - bucket[0]
    spare_h = center.scaled_size[1] - bucket[1]
    for box in boxes:
        assert box.scaled_size == center.scaled_size
        assert 0 <= box.left <= spare_w and 0 <= box.top <= spare_h
    # Both ends of the range are reachable, and the same seed gives the same crop.
    assert {b.left for b in boxes} >= {0, spare_w} and {b.top for b in boxes} >= {0, spare_h}
    assert crop_box(image_size, bucket, "random", random.Random(7)) == boxes[7]


def test_crop_box_random_pinned():
    assert crop_box((1200, 800), (640, 384), "random", random.Random(0)) == CropBox((640, 427), 0, 26)


@pytest.mark.parametrize("mode, rng", [("centre", None), ("random", None), ("", random.Random(0))])
def test_crop_box_bad_mode(mode, rng):
    with pytest.raises(ValueError):
        crop_box((100, 100), (64, 64), mode, rng)


def test_fixed_size_bucket_cover_and_crop():
    bucket = fixed_size_bucket((512, 512))
    assert bucket == (512, 512)
    # A large landscape image is scaled to cover 512x512 and centre-cropped (no error).
    assert crop_box((4000, 3000), bucket, "center") == CropBox((683, 512), 85, 0)
    # A small one is scaled up to cover.
    assert crop_box((200, 100), bucket, "center") == CropBox((1024, 512), 256, 0)
    with pytest.raises(ValueError):
        fixed_size_bucket((0, 512))


@pytest.mark.parametrize(
    "image_size, bucket, box, flipped, expected",
    [
        ((1200, 800), (640, 384), CropBox((640, 427), 0, 21), False, (800, 1200, 21, 0, 384, 640)),
        ((1024, 768), (512, 512), CropBox((683, 512), 85, 0), False, (768, 1024, 0, 85, 512, 512)),
        ((1024, 768), (512, 512), CropBox((683, 512), 85, 0), True, (768, 1024, 0, 86, 512, 512)),
        ((1024, 768), (512, 512), CropBox((683, 512), 0, 0), True, (768, 1024, 0, 171, 512, 512)),
    ],
)
def test_sdxl_size_conditioning(image_size, bucket, box, flipped, expected):
    assert sdxl_size_conditioning(image_size, bucket, box, flipped) == expected


def test_flip_crop_box_is_an_involution():
    box = CropBox((683, 512), 30, 0)
    assert flip_crop_box(flip_crop_box(box, (512, 512)), (512, 512)) == box
    assert box.crop_top_left == (0, 30)


def test_bucket_histogram():
    assignments = [(512, 512), (384, 640), (512, 512), (640, 384), (512, 512)]
    histogram = bucket_histogram(assignments)
    assert histogram == {(384, 640): 1, (512, 512): 3, (640, 384): 1}
    assert list(histogram) == sorted(histogram)
    assert bucket_histogram([]) == {}
