"""tools/measure.py reads the generator's own pictures exactly (tools/shapes.py)."""
from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from tools import measure, shapes
from tools.make_demo_dataset import make_dataset


def scenes(n: int, seed: int) -> list[shapes.Scene]:
    rng = random.Random(seed)
    return [shapes.random_scene(rng, 32) for _ in range(n)]


def test_every_reading_is_exact_on_ground_truth():
    cases = scenes(120, seed=7)
    readings = [measure.read(shapes.draw_scene(s, 32)) for s in cases]
    assert measure.prompt_following(readings, cases) == {
        "background": 1.0, "colour": 1.0, "shape": 1.0, "all": 1.0}
    assert min(r.iou for r in readings) > 0.8


@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_each_shape_at_every_palette_pair(shape):
    for fg in shapes.PALETTE:
        for bg in shapes.PALETTE:
            if fg == bg:
                continue
            r = measure.read(shapes.draw_scene(shapes.Scene(shape, fg, bg, 15.0, 17.0, 9.0), 32))
            assert (r.bg, r.fg, r.shape) == (bg, fg, shape)


def test_wrong_answers_are_counted():
    s = shapes.Scene("circle", "red", "blue", 16, 16, 10)
    other = shapes.Scene("square", "yellow", "blue", 16, 16, 10)
    summary = measure.prompt_following([measure.read(shapes.draw_scene(other, 32))], [s])
    assert summary == {"background": 1.0, "colour": 0.0, "shape": 0.0, "all": 0.0}


def test_plain_picture_has_no_shape():
    img = Image.new("RGB", (32, 32), shapes.PALETTE["green"])
    r = measure.read(img)
    assert (r.bg, r.fg, r.shape) == ("green", "none", "none")


def test_zorblat_detector(tmp_path):
    folder = make_dataset(tmp_path, count=12, size=32, seed=3)
    images = sorted(folder.glob("*.png"))
    assert len(images) == 12
    assert all(measure.shows_zorblat(Image.open(p)) for p in images)
    # none of the base world's pictures, and neither half of the concept alone
    assert not any(measure.shows_zorblat(shapes.draw_scene(s, 32)) for s in scenes(60, 1))
    star_only = shapes.Canvas(32, shapes.PALETTE["white"])
    star_only.shape("star", 16, 16, 10, shapes.PURPLE)
    assert not measure.shows_zorblat(star_only.image())
    ring_only = shapes.Canvas(32, shapes.PALETTE["white"])
    ring_only.ring(16, 16, 12, 2.5, shapes.ORANGE)
    assert not measure.shows_zorblat(ring_only.image())


def test_mean_abs_diff_units():
    black = np.zeros((32, 32, 3), dtype=np.uint8)
    white = np.full((32, 32, 3), 255, dtype=np.uint8)
    assert measure.mean_abs_diff(black, white) == pytest.approx(1.0)
    assert measure.mean_abs_diff(black, black) == 0.0
    assert measure.mean_abs_diff(Image.fromarray(white), white / 255.0) == pytest.approx(0.0)


def test_captions_use_the_tokenizer_words():
    from tools.make_tiny_model import WORDS
    words = set(WORDS)
    for s in scenes(30, 2):
        assert set(s.caption.split()) <= words
