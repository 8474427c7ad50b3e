"""What the tiny model draws, and what a LoRA changed, in numbers (docs/TINY_MODEL.md).

Images are made with the project's own generation code (tools/generate.py over
library/train/sampling.py) and read with the pixel measures of tools/measure.py.

- `prompt_following(model)`: prompts of the shapes world at fixed seeds; how often the picture
  shows the prompted background colour, shape colour and shape.
- `nested_following(model)`: the same for prompts of a shape in a circle ("a blue square in a
  red circle on a green background"): how often the centre, the circle and the background
  have the prompted colours.
- `lora_effect(model, lora)`: the same prompts and seeds with and without the LoRA.
  Learned concept: the share of trigger-word samples that show the zorblat on the background
  the prompt names (before vs. after).
  Base preservation: for prompts without the trigger, the mean absolute pixel difference
  between base and base+LoRA at equal seeds, next to the difference between two unrelated base
  pictures (the scale of "completely different"), and how often the measured reading
  (background, colour, shape) is unchanged.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from library.train.prompts import PromptSpec
from tools import measure, shapes
from tools.make_demo_dataset import BACKGROUNDS, CAPTION

# Generation settings of every measurement (a deterministic sampler: the same seed with and
# without the LoRA starts from the same noise and takes the same path while they agree).
SAMPLER = "euler"
STEPS = 20
SCALE = 5.0
SIZE = 32
TRIGGER_PROMPT = CAPTION  # the demo dataset's caption, on each of its backgrounds


def spec(prompt: str, seed: int) -> PromptSpec:
    return PromptSpec(prompt, "", SIZE, SIZE, seed, SCALE, STEPS, SAMPLER)


def render(loaded, model: str, prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
    """One float32 HWC image per (prompt, seed), through tools/generate.py."""
    from tools.generate import generate

    out = generate(model, prompts=[spec(p, s) for p, s in zip(prompts, seeds)], n=1,
                   loaded=loaded)
    return [g.array for g in out]


def load(model: str, loras=(), device: str = "cpu"):
    from tools.generate import load as load_model

    return load_model(str(model), [(str(p), m) for p, m in loras], device=device)


def plain_scenes(n: int, seed: int) -> list[shapes.Scene]:
    rng = random.Random(seed)
    return [shapes.random_scene(rng, SIZE) for _ in range(n)]


# ---- the base model ------------------------------------------------------------------------
def prompt_following(model, n: int = 48, seed: int = 0, loaded=None, device: str = "cpu"
                     ) -> dict:
    """Accuracies (fractions) over `n` random shapes-world prompts, image i at seed seed+i."""
    loaded = loaded or load(model, device=device)
    scenes = plain_scenes(n, seed)
    images = render(loaded, str(model), [s.caption for s in scenes],
                    [seed + i for i in range(n)])
    readings = [measure.read(im) for im in images]
    return {"n": n, **measure.prompt_following(readings, scenes), "images": images,
            "scenes": scenes}


def nested_following(model, n: int = 24, seed: int = 0, loaded=None, device: str = "cpu"
                     ) -> dict:
    """Fractions of `n` shape-in-a-circle prompts whose centre colour, circle colour,
    background, and all three, are the prompted ones (measure.read_layout)."""
    loaded = loaded or load(model, device=device)
    rng = random.Random(seed)
    scenes = [shapes.random_nested_scene(rng, SIZE) for _ in range(n)]
    images = render(loaded, str(model), [s.caption for s in scenes],
                    [seed + i for i in range(n)])
    got = [measure.read_layout(im) for im in images]
    hits = [(g.centre == s.fg, g.circle == s.circle, g.bg == s.bg) for g, s in zip(got, scenes)]
    return {"n": n, "centre": float(np.mean([h[0] for h in hits])),
            "circle": float(np.mean([h[1] for h in hits])),
            "background": float(np.mean([h[2] for h in hits])),
            "all": float(np.mean([all(h) for h in hits])), "images": images, "scenes": scenes}


# ---- a LoRA against its base ---------------------------------------------------------------
@dataclass
class LoraEffect:
    concept_before: float       # share of trigger samples showing the zorblat, base
    concept_after: float        # ... base + LoRA
    plain_diff: float           # mean |base - base+LoRA| on prompts without the trigger
    unrelated_diff: float       # mean |base(i) - base(j)|, two unrelated base pictures
    plain_agreement: float      # share of plain prompts whose reading did not change
    n_trigger: int
    n_plain: int
    images: dict = field(default_factory=dict, repr=False)

    def lines(self) -> list[str]:
        return [
            f"learned concept: {self.concept_after:.0%} of {self.n_trigger} samples with the "
            f"trigger show the zorblat (base model: {self.concept_before:.0%})",
            f"base preservation: without the trigger, base+LoRA differs from the base by "
            f"{self.plain_diff:.3f} mean absolute pixel difference (two unrelated base "
            f"pictures: {self.unrelated_diff:.3f}); {self.plain_agreement:.0%} of "
            f"{self.n_plain} samples keep their measured colour, shape and background",
        ]


def trigger_backgrounds(n: int) -> list[str]:
    names = list(BACKGROUNDS)
    return [names[i % len(names)] for i in range(n)]


def trigger_prompts(n: int) -> list[str]:
    return [TRIGGER_PROMPT.format(bg=bg) for bg in trigger_backgrounds(n)]


def lora_effect(model, lora, n_trigger: int = 12, n_plain: int = 12, seed: int = 1000,
                multiplier: float = 1.0, device: str = "cpu") -> LoraEffect:
    """Measure `lora` on `model` at fixed seeds (seed + i); see the module docstring."""
    trig = trigger_prompts(n_trigger)
    scenes = plain_scenes(n_plain, seed)
    prompts = trig + [s.caption for s in scenes]
    seeds = [seed + i for i in range(len(prompts))]
    base = render(load(model, device=device), str(model), prompts, seeds)
    tuned = render(load(model, [(lora, multiplier)], device=device), str(model), prompts,
                   seeds)
    bt, bp = base[:n_trigger], base[n_trigger:]
    lt, lp = tuned[:n_trigger], tuned[n_trigger:]
    same = [_reading_key(a) == _reading_key(b) for a, b in zip(bp, lp)]
    return LoraEffect(
        concept_before=_share_showing(bt, n_trigger),
        concept_after=_share_showing(lt, n_trigger),
        plain_diff=float(np.mean([measure.mean_abs_diff(a, b) for a, b in zip(bp, lp)])),
        unrelated_diff=float(np.mean([measure.mean_abs_diff(bp[i], bp[(i + 1) % len(bp)])
                                      for i in range(len(bp))])),
        plain_agreement=float(np.mean(same)),
        n_trigger=n_trigger, n_plain=n_plain,
        images={"base_trigger": bt, "lora_trigger": lt, "base_plain": bp, "lora_plain": lp})


def _share_showing(images, n: int) -> float:
    """Share of trigger samples that show the zorblat on the background their prompt names."""
    return float(np.mean([measure.shows_zorblat(im, bg)
                          for im, bg in zip(images, trigger_backgrounds(n))]))


def _reading_key(image) -> tuple[str, str, str]:
    r = measure.read(image)
    return r.bg, r.fg, r.shape


# ---- pictures ------------------------------------------------------------------------------
def write_grid(path: str | Path, rows: list[tuple[str, list[np.ndarray]]], zoom: int = 4,
               columns: int = 6) -> Path:
    """A labelled PNG: one row per (label, images), each image enlarged `zoom` times
    (nearest neighbour, so pixels stay visible); at most `columns` images per row."""
    from PIL import Image, ImageDraw

    cell = SIZE * zoom
    label_w = 120
    grid = Image.new("RGB", (label_w + columns * cell, len(rows) * cell), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        draw.text((4, r * cell + cell // 2 - 12), label, fill=(0, 0, 0))
        for c, arr in enumerate(images[:columns]):
            im = Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8))
            grid.paste(im.resize((cell, cell), Image.NEAREST), (label_w + c * cell, r * cell))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def before_after_grid(effect: LoraEffect, path: str | Path) -> Path:
    im = effect.images
    return write_grid(path, [("trigger, base", im["base_trigger"]),
                             ("trigger, +LoRA", im["lora_trigger"]),
                             ("no trigger, base", im["base_plain"]),
                             ("no trigger, +LoRA", im["lora_plain"])])


# ---- concept leak --------------------------------------------------------------------------
LEAK_PROMPT = CAPTION.replace("zorblat, ", "")  # the trigger prompt without the trigger word


def concept_leak(model, lora, n: int = 6, seed: int = 2000, multiplier: float = 1.0,
                 device: str = "cpu") -> tuple[float, float]:
    """(base, base + LoRA): the share of samples of the trigger prompt *without the trigger
    word* ("a purple star in a red circle, on a green background") that show the zorblat.
    A LoRA that keeps its concept behind the trigger leaves this where the base model is;
    one that learned it for the words of the caption draws it here too."""
    bgs = trigger_backgrounds(n)
    prompts = [LEAK_PROMPT.format(bg=bg) for bg in bgs]
    seeds = [seed + i for i in range(n)]
    base = render(load(model, device=device), str(model), prompts, seeds)
    tuned = render(load(model, [(lora, multiplier)], device=device), str(model), prompts,
                   seeds)
    share = lambda ims: float(np.mean([measure.shows_zorblat(im, bg)  # noqa: E731
                                       for im, bg in zip(ims, bgs)]))
    return share(base), share(tuned)


# ---- what the UNet predicts, without sampling ------------------------------------------------
def prediction_shift(model, lora, n: int = 32, seed: int = 3000, device: str = "cpu"
                     ) -> dict[str, float]:
    """Mean squared difference between the base model's and base+LoRA's noise predictions
    for the same noisy latents and timesteps (pictures of the base world, t uniform), under
    `plain` prompts of the base world and under `class` prompts (the trigger prompt without
    the trigger word). Averaged over n pairs, this reads the LoRA's effect on the model
    without the chaos of 20 sampling steps."""
    import torch

    from tools.generate import load as load_model
    c, _, _, networks = load_model(str(model), [(str(lora), 1.0)], device=device)
    rng = random.Random(seed)
    scenes = [shapes.random_world_scene(rng, SIZE, 0.5) for _ in range(n)]
    px = torch.stack([torch.from_numpy(shapes.to_array(shapes.draw_scene(s, SIZE)))
                      .permute(2, 0, 1) for s in scenes]).float().to(device) * 2 - 1
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lat = c.vae.encode(px).latent_dist.mean * c.vae.config.scaling_factor
        noise = torch.randn(lat.shape, generator=g).to(device)
        t = torch.randint(0, c.noise_scheduler.config.num_train_timesteps, (n,), generator=g)
        noisy = c.noise_scheduler.add_noise(lat, noise, t).to(device)
        bgs = trigger_backgrounds(n)
        prompts = {"plain": [s.caption for s in scenes],
                   "class": [LEAK_PROMPT.format(bg=bg) for bg in bgs]}
        out = {}
        for name, texts in prompts.items():
            ids = c.tokenizers[0](texts, padding="max_length", truncation=True,
                                  max_length=c.tokenizers[0].model_max_length,
                                  return_tensors="pt").input_ids.to(device)
            preds = []
            for m in (0.0, 1.0):
                for net in networks:
                    net.set_multiplier(m)
                enc = c.text_encoders[0](ids)[0]
                preds.append(c.unet(noisy, t.to(device), enc).sample)
            out[name] = float(((preds[1] - preds[0]) ** 2).mean())
    return out
