"""Helpers of the data tests: real image files written with Pillow into tmp_path."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from library.config.schema import DatasetConfig


def write_image(path: Path, size=(64, 64), color=(200, 30, 30), mode="RGB",
                caption: str | None = None, caption_ext: str = ".txt") -> Path:
    """An image file (format from the suffix) and, with `caption`, its caption file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fill = color if mode != "RGBA" else tuple(color) + (255,)
    Image.new(mode, size, fill).save(path)
    if caption is not None:
        path.with_suffix(caption_ext).write_text(caption + "\n", encoding="utf-8")
    return path


def write_folder(folder: Path, count: int, size=(64, 64), caption: str | None = "a photo",
                 ext: str = ".png", caption_ext: str = ".txt", start: int = 0) -> list[Path]:
    return [write_image(folder / f"{i:03d}{ext}", size, (10 * i % 256, 80, 160),
                        caption=caption, caption_ext=caption_ext)
            for i in range(start, start + count)]


def dataset_config(**kw) -> DatasetConfig:
    """A [dataset] section as the loader would build it; paths as strings."""
    return DatasetConfig(**{k: (str(v) if isinstance(v, Path) else v) for k, v in kw.items()})


@pytest.fixture
def cwd(tmp_path, monkeypatch) -> Path:
    """Run the test inside tmp_path (kohya paths are relative to the working directory)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
