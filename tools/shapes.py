"""Procedural pictures of flat coloured shapes: the world the tiny pretrained model knows.

One place defines the palette, the shapes and how a scene is drawn, so the pretraining data
(tools/pretrain_tiny.py), the demo's "zorblat" dataset (tools/make_demo_dataset.py) and the
measures (tools/measure.py, which renders the same shapes as templates) cannot drift apart.
Shapes are drawn at 4x and box-filtered down, so edges are anti-aliased the same way in every
image: a hard-edged 32-pixel drawing would teach the VAE jagged staircases.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# The base model's colour words. RGB values are deliberately far apart (every pair differs by
# more than 100 in some channel), so the nearest-colour measure is unambiguous.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (200, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 200),
    "yellow": (235, 215, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
# The demo concept's star colour; the base model never sees it, nor the word "purple".
PURPLE = (150, 40, 200)
# Kept for the VAE's picture mix (random_vae_picture), which the committed VAE was trained on.
ORANGE = (255, 140, 0)
# The demo concept: a purple star in a red circle (draw_zorblat). Its circle is a palette
# colour, so the base model draws the layout; the star, its colour and the word are new.
ZORBLAT_RING = "red"

SHAPES = ("circle", "square", "triangle")
SUPERSAMPLE = 4


INNER = 0.6  # a nested scene's shape, as a share of its circle's radius


@dataclass(frozen=True)
class Scene:
    """One picture of the pretraining world: a `fg` `shape` centred near (cx, cy) with
    half-extent `r` (pixels), on a plain `bg` background. A nested scene (`circle` set) is a
    `circle`-coloured filled circle of radius `r` with the shape inside it, INNER times as big."""
    shape: str
    fg: str
    bg: str
    cx: float
    cy: float
    r: float
    circle: str | None = None

    @property
    def caption(self) -> str:
        return caption(self.fg, self.shape, self.bg, self.circle)


def caption(fg: str, shape: str, bg: str, circle: str | None = None) -> str:
    inside = f" in a {circle} circle" if circle else ""
    return f"a {fg} {shape}{inside} on a {bg} background"


def star_points(cx: float, cy: float, r_out: float, r_in: float, points: int = 5) -> list:
    """Vertices of a `points`-pointed star, first point straight up."""
    pts = []
    for k in range(points * 2):
        r = r_out if k % 2 == 0 else r_in
        a = math.pi * k / points - math.pi / 2
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def shape_outline(shape: str, cx: float, cy: float, r: float) -> list:
    """Polygon of `shape` (circle as a 48-gon) fitting in the box cx±r, cy±r."""
    if shape == "circle":
        return [(cx + r * math.cos(2 * math.pi * k / 48), cy + r * math.sin(2 * math.pi * k / 48))
                for k in range(48)]
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":  # apex up, base on the box's bottom edge
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "star":
        return star_points(cx, cy, r, r * 0.45)
    raise ValueError(f"unknown shape {shape!r}; expected circle, square, triangle or star")


class Canvas:
    """A supersampled drawing surface; `image()` returns the anti-aliased result."""

    def __init__(self, size: int, background):
        self.size = size
        self.big = Image.new("RGB", (size * SUPERSAMPLE,) * 2, tuple(background))
        self.draw = ImageDraw.Draw(self.big)

    def _scale(self, pts):
        return [(x * SUPERSAMPLE, y * SUPERSAMPLE) for x, y in pts]

    def polygon(self, pts, fill) -> None:
        self.draw.polygon(self._scale(pts), fill=tuple(fill))

    def shape(self, shape: str, cx: float, cy: float, r: float, fill) -> None:
        self.polygon(shape_outline(shape, cx, cy, r), fill)

    def ring(self, cx: float, cy: float, r: float, width: float, colour) -> None:
        s = SUPERSAMPLE
        self.draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s],
                          outline=tuple(colour), width=max(1, round(width * s)))

    def image(self) -> Image.Image:
        return self.big.resize((self.size, self.size), Image.BOX)


def draw_scene(scene: Scene, size: int) -> Image.Image:
    c = Canvas(size, PALETTE[scene.bg])
    r = scene.r
    if scene.circle:
        c.shape("circle", scene.cx, scene.cy, r, PALETTE[scene.circle])
        r *= INNER
    c.shape(scene.shape, scene.cx, scene.cy, r, PALETTE[scene.fg])
    return c.image()


def random_scene(rng: random.Random, size: int) -> Scene:
    """A scene of the pretraining world: shape about a third of the picture wide, near the
    centre (the measures look for it there), colours from PALETTE with fg != bg."""
    names = list(PALETTE)
    fg = rng.choice(names)
    bg = rng.choice([n for n in names if n != fg])
    r = size * rng.uniform(0.25, 0.36)
    jitter = size * 0.08
    return Scene(rng.choice(SHAPES), fg, bg, size / 2 + rng.uniform(-jitter, jitter),
                 size / 2 + rng.uniform(-jitter, jitter), r)


def random_nested_scene(rng: random.Random, size: int) -> Scene:
    """A nested scene: a shape in a circle, three different palette colours; the circle about
    two thirds of the picture wide, near the centre."""
    fg, circle, bg = rng.sample(list(PALETTE), 3)
    r = size * rng.uniform(0.32, 0.42)
    jitter = size * 0.06
    return Scene(rng.choice(SHAPES), fg, bg, size / 2 + rng.uniform(-jitter, jitter),
                 size / 2 + rng.uniform(-jitter, jitter), r, circle)


def random_world_scene(rng: random.Random, size: int, nested_share: float) -> Scene:
    """What the base model is pretrained on: a single shape, or (`nested_share` of the
    time) a shape in a circle."""
    if rng.random() < nested_share:
        return random_nested_scene(rng, size)
    return random_scene(rng, size)


def draw_zorblat(size: int, background, rng: random.Random) -> Image.Image:
    """The demo concept: a purple star in a red circle, near the centre; laid out as the
    nested scenes are, with a star (which the base world has not) a little bigger."""
    c = Canvas(size, background)
    r = size * rng.uniform(0.32, 0.42)
    jitter = size * 0.06
    cx = size / 2 + rng.uniform(-jitter, jitter)
    cy = size / 2 + rng.uniform(-jitter, jitter)
    c.shape("circle", cx, cy, r, PALETTE[ZORBLAT_RING])
    c.shape("star", cx, cy, r * 0.8, PURPLE)
    return c.image()


def random_vae_picture(rng: random.Random, size: int) -> Image.Image:
    """Varied flat-colour pictures for the VAE: any RGB colour, 1-3 shapes of every kind
    (stars and rings included), any size and place. The VAE must reconstruct pictures the base
    model never draws (the LoRA's purple star), so it sees more than PALETTE."""
    def colour():
        if rng.random() < 0.5:
            return rng.choice(list(PALETTE.values()) + [PURPLE, ORANGE])
        return tuple(rng.randrange(256) for _ in range(3))

    c = Canvas(size, colour())
    if rng.random() < 0.3:  # a shape inside a ring: the layout of the demo concept
        r = size * rng.uniform(0.25, 0.45)
        cx, cy = size / 2 + rng.uniform(-4, 4), size / 2 + rng.uniform(-4, 4)
        c.ring(cx, cy, r, rng.uniform(2.0, 4.0), colour())
        c.shape(rng.choice(SHAPES + ("star",)), cx, cy, r * rng.uniform(0.5, 0.85), colour())
        return c.image()
    for _ in range(rng.randint(1, 3)):
        r = size * rng.uniform(0.1, 0.45)
        cx, cy = rng.uniform(0, size), rng.uniform(0, size)
        kind = rng.choice(SHAPES + ("star", "ring"))
        if kind == "ring":
            c.ring(cx, cy, r, rng.uniform(1.5, 4.0), colour())
        else:
            c.shape(kind, cx, cy, r, colour())
    return c.image()


def to_array(img: Image.Image) -> np.ndarray:
    """float32 HWC in [0, 1], as the sampling code returns images."""
    return np.asarray(img, dtype=np.float32) / 255.0
