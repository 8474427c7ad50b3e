"""The pre-flight checks (library/data/doctor.py): every bad input gets its message."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from library.data.doctor import check_items, too_small
from library.data.options import DataOptions
from library.data.prepare import build_group, prepare_data
from library.data.sources import Item
from tests.data.conftest import dataset_config, write_folder, write_image

FIX = "re-export or replace the file, or remove it (skip_bad_images = true skips such files)"
LAST = "fix or remove these images, or set skip_bad_images = true to train without them"


def _item(path) -> Item:
    return Item(path, "c", 1, False, "f", True)


def _truncated_png(path, size=(64, 64)):
    buf = io.BytesIO()
    Image.effect_noise(size, 50).convert("RGB").save(buf, "PNG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


@pytest.mark.parametrize("make, reason", [
    (lambda p: p.write_bytes(b""), "the file is empty (0 bytes)"),
    (lambda p: p.write_text("not really a png"),
     "not a recognised image format (corrupt, or not really an image)"),
    (_truncated_png, "the file is truncated or damaged"),
])
def test_unusable_images_are_fatal_with_their_reason(tmp_path, make, reason):
    good = write_image(tmp_path / "good.png")
    bad = tmp_path / "bad.png"
    make(bad)
    o = DataOptions((64, 64), 1)
    items, sizes, problems, warnings = check_items([_item(good), _item(bad)], o, False)
    assert [i.image for i in items] == [good] and sizes == [(64, 64)] and warnings == []
    assert len(problems) == 2 and problems[1] == LAST
    assert problems[0].startswith(f"{bad}: {reason}") and problems[0].endswith(FIX)


def test_skip_bad_images_skips_with_a_warning(tmp_path):
    good = write_image(tmp_path / "good.png")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    items, _, problems, warnings = check_items([_item(good), _item(empty)],
                                               DataOptions((64, 64), 1), True)
    assert [i.image for i in items] == [good] and problems == []
    assert warnings == [f"skipped (skip_bad_images): {empty}: the file is empty (0 bytes); "
                        f"{FIX}"]


@pytest.mark.parametrize("options, size, message", [
    # buckets, upscaling allowed: the shorter side must reach min_bucket_reso
    (DataOptions((512, 512), 1, enable_bucket=True), (200, 900),
     "200x900 is below the smallest bucket: its shorter side is under min_bucket_reso = 256, "
     "so every bucket would upscale it; use a larger image, or lower min_bucket_reso"),
    (DataOptions((512, 512), 1, enable_bucket=True), (256, 900), None),
    (DataOptions((512, 512), 1, enable_bucket=True, min_bucket_reso=128), (200, 900), None),
    # buckets without upscaling: a side must reach bucket_reso_steps
    (DataOptions((512, 512), 1, enable_bucket=True, bucket_no_upscale=True), (40, 300),
     "40x300 is too small: with bucket_no_upscale a side must be at least bucket_reso_steps "
     "= 64 pixels"),
    (DataOptions((512, 512), 1, enable_bucket=True, bucket_no_upscale=True), (64, 100), None),
    # no buckets: only with bucket_no_upscale, below the resolution
    (DataOptions((512, 512), 1), (100, 100), None),
    (DataOptions((512, 512), 1, bucket_no_upscale=True), (600, 500),
     "600x500 is smaller than resolution 512x512 and bucket_no_upscale forbids upscaling; use "
     "a larger image, a lower resolution, or enable_bucket"),
])
def test_too_small(options, size, message):
    assert too_small(size, options) == message


def test_too_small_image_stops_prepare_data(tmp_path):
    root = tmp_path / "train"
    write_folder(root / "3_sks", 2, size=(512, 512))
    tiny = write_image(root / "3_sks" / "tiny.png", size=(100, 120))
    d = dataset_config(train_data_dir=root, enable_bucket=True)
    data = prepare_data(d, (512, 512))
    assert data.problems == [
        f"{tiny}: 100x120 is below the smallest bucket: its shorter side is under "
        "min_bucket_reso = 256, so every bucket would upscale it; use a larger image, or lower "
        "min_bucket_reso", LAST]
    skipped = prepare_data(dataset_config(train_data_dir=root, enable_bucket=True,
                                          skip_bad_images=True), (512, 512))
    assert skipped.problems == [] and len(skipped.items) == 2
    assert any(str(tiny) in w for w in skipped.warnings)


def test_every_problem_is_listed_at_once(tmp_path):
    root = tmp_path / "train"
    write_folder(root / "2_a", 1)
    (root / "2_a" / "zero.png").write_bytes(b"")
    _truncated_png(root / "2_a" / "half.png")
    (tmp_path / "reg").mkdir()
    (tmp_path / "reg" / "metadata.csv").write_text("file_name,caption\nnope.png,x\n")
    data = prepare_data(dataset_config(train_data_dir=root, reg_data_dir=tmp_path / "reg"),
                        (64, 64))
    text = "\n".join(data.problems)
    assert "nope.png not found" in text
    assert "zero.png: the file is empty" in text and "half.png: the file is truncated" in text
    assert data.problems[-1] == LAST


def test_all_skipped_leaves_no_training_images(tmp_path):
    root = tmp_path / "train"
    (root / "2_a").mkdir(parents=True)
    (root / "2_a" / "zero.png").write_bytes(b"")
    data = prepare_data(dataset_config(train_data_dir=root, skip_bad_images=True), (64, 64))
    assert data.problems == [f"train_data_dir {root}: no usable training images left (every "
                             "one was skipped as bad); fix or replace the images listed above"]


def test_bad_bucket_settings_are_reported(tmp_path):
    write_folder(tmp_path / "1_a", 1)
    data = prepare_data(dataset_config(train_data_dir=tmp_path, enable_bucket=True,
                                       min_bucket_reso=640), (512, 512))
    assert data.problems == ["[dataset] min_bucket_reso = 640 is larger than the shorter side "
                             "of resolution (512, 512); lower it to at most 512"]


def test_reg_balance_happens_after_skipping(tmp_path):
    root = tmp_path / "train"
    write_folder(root / "4_a", 2)
    (root / "4_a" / "zero.png").write_bytes(b"")  # would be a third training image
    write_folder(tmp_path / "reg" / "1_cls", 3)
    data = prepare_data(dataset_config(train_data_dir=root, reg_data_dir=tmp_path / "reg",
                                       skip_bad_images=True), (64, 64))
    group, held = build_group(data, 0)
    assert held == []
    assert [i.repeats for i in group.items if i.is_reg] == [3, 3, 2]  # 8 = 2 images x 4
