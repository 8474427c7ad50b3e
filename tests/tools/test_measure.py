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
    backgrounds = [p.with_suffix(".txt").read_text().split(" on a ")[1].split()[0]
                   for p in images]
    assert all(measure.shows_zorblat(Image.open(p), bg) for p, bg in zip(images, backgrounds))
    # ... and not on another background than the caption's
    assert not measure.shows_zorblat(Image.open(images[0]), backgrounds[1])
    # none of the base world's pictures, shapes in circles included
    rng = random.Random(1)
    world = [shapes.random_world_scene(rng, 32, 0.5) for _ in range(200)]
    assert sum(s.circle is not None for s in world) > 60
    assert not any(measure.shows_zorblat(shapes.draw_scene(s, 32)) for s in world)
    # neither half of the concept alone, nor a red circle with another centre
    star_only = shapes.Canvas(32, shapes.PALETTE["white"])
    star_only.shape("star", 16, 16, 10, shapes.PURPLE)
    assert not measure.shows_zorblat(star_only.image())
    circle_only = shapes.Canvas(32, shapes.PALETTE["white"])
    circle_only.shape("circle", 16, 16, 12, shapes.PALETTE["red"])
    assert not measure.shows_zorblat(circle_only.image())
    blue_star = shapes.Canvas(32, shapes.PALETTE["white"])
    blue_star.shape("circle", 16, 16, 12, shapes.PALETTE["red"])
    blue_star.shape("star", 16, 16, 9, shapes.PALETTE["blue"])
    assert not measure.shows_zorblat(blue_star.image())


def test_nested_scenes_are_read_exactly():
    rng = random.Random(5)
    cases = [shapes.random_nested_scene(rng, 32) for _ in range(120)]
    for s in cases:
        got = measure.read_layout(shapes.draw_scene(s, 32))
        assert got == measure.Layout(s.fg, s.circle, s.bg), s


def test_plain_picture_has_no_layout():
    img = Image.new("RGB", (32, 32), shapes.PALETTE["blue"])
    assert measure.read_layout(img) == measure.Layout("none", "none", "blue")


def test_mean_abs_diff_units():
    black = np.zeros((32, 32, 3), dtype=np.uint8)
    white = np.full((32, 32, 3), 255, dtype=np.uint8)
    assert measure.mean_abs_diff(black, white) == pytest.approx(1.0)
    assert measure.mean_abs_diff(black, black) == 0.0
    assert measure.mean_abs_diff(Image.fromarray(white), white / 255.0) == pytest.approx(0.0)


def test_captions_use_the_tokenizer_words():
    from tools.make_tiny_model import WORDS
    words = set(WORDS)
    rng = random.Random(2)
    for s in [shapes.random_world_scene(rng, 32, 0.5) for _ in range(60)]:
        assert set(s.caption.split()) <= words
    from tools.make_demo_dataset import CAPTION
    assert set(CAPTION.format(bg="green").replace(",", "").split()) <= words
