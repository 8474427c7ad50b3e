"""`cache_text_encoder_outputs` (and `_to_disk`): with frozen text encoders and static captions
the run's losses equal the uncached run's, and each distinct caption goes through the text
encoder once; a second disk-cached run encodes nothing."""
from __future__ import annotations

from pathlib import Path

import pytest

import train_network
from library.train.conditioning import TextConditioner
from tests.test_train_e2e import read_scalars
from tools.make_demo_dataset import make_dataset


class _CountingFamily:
    """The real family, with every caption sent to encode_prompts recorded."""

    def __init__(self, family, seen: list[str]):
        self._family, self._seen = family, seen

    def __getattr__(self, name):
        return getattr(self._family, name)

    def encode_prompts(self, components, captions, *args, **kwargs):
        self._seen.extend(captions)
        return self._family.encode_prompts(components, captions, *args, **kwargs)


def run(root: Path, model: Path, data: Path, monkeypatch, *extra: str) -> list[str]:
    """Train 4 steps (one epoch: 4 images x 2 repeats / batch 2); return the captions the text
    encoder saw, in order."""
    seen: list[str] = []

    class Counting(TextConditioner):
        def __init__(self, components, family, *args, **kwargs):
            super().__init__(components, _CountingFamily(family, seen), *args, **kwargs)

    monkeypatch.setattr(train_network, "TextConditioner", Counting)
    assert train_network.main([
        "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
        "--resolution", "64", "--train_batch_size", "2", "--network_dim", "4",
        "--learning_rate", "1e-3", "--seed", "7", "--save_precision", "float",
        "--max_train_steps", "4", "--network_train_unet_only",
        "--output_dir", str(root / "out"), "--output_name", "t",
        "--logging_dir", str(root / "logs"), *extra]) == 0
    return seen


def losses(root: Path) -> list[float]:
    return read_scalars(root / "logs")["loss/current"]


@pytest.fixture(scope="module")
def plain_runs(tmp_path_factory):
    """family -> (captions seen, losses) of the uncached run, trained once per module."""
    done: dict = {}

    def plain(family: str, model: Path, data: Path):
        if family not in done:
            root = tmp_path_factory.mktemp(f"plain-{family}")
            with pytest.MonkeyPatch.context() as mp:
                # unset, the frozen text encoders' outputs would be cached (the default)
                done[family] = (run(root, model, data, mp, "--cache_text_encoder_outputs",
                                    "false"), losses(root))
        return done[family]
    return plain


def dataset(root: Path) -> tuple[Path, set[str]]:
    data = root / "data"
    make_dataset(data, count=4, size=64, seed=3, repeats=2)  # 4 distinct captions
    captions = {p.read_text().strip() for p in data.glob("*/*.txt")}
    assert len(captions) == 4
    return data, captions


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_cached_text_encoder_outputs_give_the_same_losses(tmp_path, request, monkeypatch,
                                                          family, plain_runs):
    model = request.getfixturevalue(f"tiny_{family}_dir")
    data, captions = dataset(tmp_path)
    plain, plain_losses = plain_runs(family, model, data)
    cached = run(tmp_path / "cached", model, data, monkeypatch,
                 "--cache_text_encoder_outputs")

    # Without the cache every step encodes its batch (8 captions over 4 steps); with it each
    # distinct caption is encoded exactly once for the whole run.
    assert len(plain) == 8 and set(plain) == captions
    assert sorted(cached) == sorted(captions)
    b = losses(tmp_path / "cached")
    assert len(plain_losses) == len(b) == 4
    assert b == pytest.approx(plain_losses, abs=1e-6)
    assert not (data / ".tomlora_te_cache").exists()  # memory only


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_disk_cached_text_encoder_outputs_are_reused(tmp_path, request, monkeypatch, family,
                                                     plain_runs):
    model = request.getfixturevalue(f"tiny_{family}_dir")
    data, captions = dataset(tmp_path)
    _, plain_losses = plain_runs(family, model, data)

    first = run(tmp_path / "first", model, data, monkeypatch,
                "--cache_text_encoder_outputs_to_disk")  # implies the memory cache
    files = sorted((data / ".tomlora_te_cache").iterdir())
    assert sorted(first) == sorted(captions)
    assert len(files) == 4 and all(f.name.startswith("te_") and f.suffix == ".npz"
                                   for f in files)
    second = run(tmp_path / "second", model, data, monkeypatch,
                 "--cache_text_encoder_outputs_to_disk")
    assert second == []  # every caption read from disk
    assert sorted((data / ".tomlora_te_cache").iterdir()) == files
    for name in ("first", "second"):
        assert losses(tmp_path / name) == pytest.approx(plain_losses, abs=1e-6), name
