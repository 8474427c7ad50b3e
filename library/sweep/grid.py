"""`sweep_grid.png`: one row per run, its last sampling step's images in prompt order.

Every run samples the same prompts with the same seeds (the prompt file and seed come from the
base config unless swept), so the columns compare like with like. Sample names are
`<output_name>_s<step>_e<epoch>_<index>.png` (library/train/sampling.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SAMPLE = re.compile(r"_s(\d{6,})_e(\d{3,})_(\d{2,})\.png$")
PAD = 4


def last_samples(sample_dir: Path, output_name: str) -> tuple[int, list[Path]] | None:
    """(step, images of the last sampling step, by prompt index); None without samples."""
    found: dict[int, dict[int, Path]] = {}
    if not sample_dir.is_dir():
        return None
    for p in sorted(sample_dir.glob("*.png")):
        m = SAMPLE.search(p.name)
        if m and p.name[:m.start()] == output_name:
            # Sorted by name, so an epoch-end sample of the same step (higher epoch number)
            # replaces the step's one: it is the later image.
            found.setdefault(int(m.group(1)), {})[int(m.group(3))] = p
    if not found:
        return None
    step = max(found)
    return step, [found[step][i] for i in sorted(found[step])]


@dataclass(frozen=True)
class Layout:
    label_w: int
    cell_w: int
    cell_h: int
    cols: int
    rows: int

    @property
    def row_h(self) -> int:
        return max(self.cell_h, 12) + PAD

    def cell(self, row: int, col: int) -> tuple[int, int]:
        """Top-left corner of an image in the grid."""
        return self.label_w + col * (self.cell_w + PAD), PAD + row * self.row_h

    @property
    def size(self) -> tuple[int, int]:
        return self.label_w + self.cols * (self.cell_w + PAD), self.rows * self.row_h + PAD


def _font():
    from PIL import ImageFont
    return ImageFont.load_default()


def drawable(label: str, font) -> str:
    """Pillow's bitmap fallback font only encodes latin-1; FreeType draws anything."""
    try:
        font.getbbox(label)
        return label
    except UnicodeEncodeError:
        return label.encode("latin-1", "replace").decode("latin-1")


def layout(labels: list[str], sizes: list[list[tuple[int, int]]]) -> Layout:
    font = _font()
    label_w = max(font.getbbox(drawable(lbl, font))[2] for lbl in labels) + 2 * PAD
    flat = [s for row in sizes for s in row]
    return Layout(label_w, max(w for w, _ in flat), max(h for _, h in flat),
                  max(len(row) for row in sizes), len(labels))


def make_grid(rows: list[tuple[str, list[Path]]], path: Path) -> Path | None:
    """Labelled rows of images -> one PNG (written atomically); None when no row has any."""
    from PIL import Image, ImageDraw
    loaded = [(label, [Image.open(p).convert("RGB") for p in imgs]) for label, imgs in rows
              if imgs]
    if not loaded:
        return None
    lay = layout([lbl for lbl, _ in loaded], [[im.size for im in ims] for _, ims in loaded])
    out = Image.new("RGB", lay.size, (255, 255, 255))
    draw, font = ImageDraw.Draw(out), _font()
    for r, (label, ims) in enumerate(loaded):
        x, y = lay.cell(r, 0)
        text = drawable(label, font)
        top, bottom = font.getbbox(text)[1::2]
        draw.text((PAD, y + (lay.cell_h - top - bottom) // 2), text, fill=(0, 0, 0), font=font)
        for c, im in enumerate(ims):
            out.paste(im, lay.cell(r, c))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    out.save(tmp, format="PNG")
    tmp.replace(path)
    return path
