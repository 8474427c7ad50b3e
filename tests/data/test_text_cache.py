"""Text-encoder output caches (library/data/text_cache.py) with the real tiny text encoders:
one file per caption, reuse, invalidation, torn files, atomic writes, the static captions."""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import replace

import pytest
import torch

from library.data import cache as latent_cache
from library.data.cache import module_identity, vae_identity
from library.data.prepare import build_group, prepare_data
from library.data.text_cache import TE_CACHE_FOLDER, cache_text_encoder_outputs, \
    static_captions, text_cache_folder, text_encoder_identity
from library.models.loading import load_components
from library.train.conditioning import TextConditioner
from tests.data.conftest import dataset_config, write_folder

CAPTIONS = ["a red cat", "a blue dog, sitting", "a red cat", ""]  # 3 distinct


@pytest.fixture(scope="module")
def models(tiny_sd15_dir, tiny_sdxl_dir):
    return {"sd15": load_components(str(tiny_sd15_dir)),
            "sdxl": load_components(str(tiny_sdxl_dir))}


class Counting(TextConditioner):
    """The real conditioner; `encoded` lists every caption that went through the encoders."""

    def __init__(self, c, clip_skip=1, max_token_length=75):
        super().__init__(c, c.family, clip_skip, train_text_encoder=False, keep_cache=True,
                         max_token_length=max_token_length)
        self.encoded: list[str] = []

    def encode(self, captions):
        self.encoded += captions
        return super().encode(captions)


def fill(c, folder, captions=CAPTIONS, **kw):
    cond = Counting(c, **kw)
    stats = cache_text_encoder_outputs(cond, captions, to_disk=True, folder=folder,
                                       batch_size=2, progress=False)
    return cond, stats


def files(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_one_file_per_caption_and_reuse(tmp_path, models, family):
    c = models[family]
    first, stats = fill(c, tmp_path)
    assert (stats.encoded, stats.from_disk) == (3, 0)
    assert sorted(first.encoded) == sorted(set(CAPTIONS))
    names = files(tmp_path)  # no .tmp left behind
    assert len(names) == 3 and all(n.startswith("te_") and n.endswith(".npz") and
                                   len(n) == len("te_.npz") + 64 for n in names)

    second, stats = fill(c, tmp_path)
    assert (stats.encoded, stats.from_disk, second.encoded) == (0, 3, [])
    assert stats.summary() == "text-encoder cache: 0 encoded, 3 read from disk, 0 already " \
                              "in memory"
    assert files(tmp_path) == names
    expected = {"encoder_hidden_states"} | ({"pooled"} if family == "sdxl" else set())
    for text in set(CAPTIONS):
        a, b = first.cache[text], second.cache[text]
        assert set(a) == set(b) == expected
        for k in a:
            assert b[k].dtype == a[k].dtype and b[k].device == a[k].device
            assert torch.equal(a[k], b[k]), (text, k)
    # served from the cache, the batch conditioning equals encoding without any cache (up to
    # float noise: the encoders saw other batches)
    plain = TextConditioner(c, c.family, 1, False, keep_cache=False)(CAPTIONS)
    served = second(CAPTIONS)
    assert second.encoded == [] and served.keys() == plain.keys()
    for k in plain:
        torch.testing.assert_close(served[k], plain[k])


def test_a_caption_not_cached_is_still_encoded(tmp_path, models):
    cond, _ = fill(models["sd15"], tmp_path)
    cond(["a red cat", "something new"])
    assert cond.encoded[-1:] == ["something new"]


def test_what_changes_the_key(tmp_path, models):
    c = models["sd15"]
    fill(c, tmp_path)
    assert len(files(tmp_path)) == 3

    _, stats = fill(c, tmp_path, captions=["a red cat", "a red cat!"])  # one new caption
    assert (stats.encoded, stats.from_disk) == (1, 1)
    _, stats = fill(c, tmp_path, clip_skip=2)
    assert (stats.encoded, stats.from_disk) == (3, 0)
    _, stats = fill(c, tmp_path, max_token_length=150)
    assert (stats.encoded, stats.from_disk) == (3, 0)

    # a change in a middle layer only (as a LoRA merged into the text encoder makes)
    te = copy.deepcopy(c.text_encoders[0])
    fc1 = next(m for n, m in te.named_modules() if n.endswith("layers.0.mlp.fc1"))
    with torch.no_grad():
        fc1.weight.add_(0.01)
    changed = replace(c, text_encoders=[te])
    assert module_identity(te) == module_identity(c.text_encoders[0])  # the VAE's selection
    assert text_encoder_identity(changed) != text_encoder_identity(c)
    _, stats = fill(changed, tmp_path)
    assert (stats.encoded, stats.from_disk) == (3, 0)
    assert len(files(tmp_path)) == 3 + 1 + 3 + 3 + 3

    # the dtype of the outputs
    half = replace(c, text_encoders=[copy.deepcopy(c.text_encoders[0]).to(torch.bfloat16)])
    cond, stats = fill(half, tmp_path)
    assert (stats.encoded, stats.from_disk) == (3, 0)
    assert cond.cache["a red cat"]["encoder_hidden_states"].dtype == torch.bfloat16
    cond, stats = fill(half, tmp_path)
    assert stats.from_disk == 3
    assert cond.cache["a red cat"]["encoder_hidden_states"].dtype == torch.bfloat16


def test_torn_and_foreign_files_are_rewritten(tmp_path, models):
    c = models["sd15"]
    fill(c, tmp_path)
    a, b, d = sorted(tmp_path.iterdir())
    a.write_bytes(a.read_bytes()[:100])       # torn
    b.write_bytes(d.read_bytes())             # another caption's entry (its key differs)
    _, stats = fill(c, tmp_path)
    assert (stats.encoded, stats.from_disk) == (2, 1)
    _, stats = fill(c, tmp_path)  # rewritten: all valid again
    assert (stats.encoded, stats.from_disk) == (0, 3)


def test_an_interrupted_write_leaves_no_file(tmp_path, models, monkeypatch):
    def crash(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(latent_cache.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        fill(models["sd15"], tmp_path)
    monkeypatch.undo()
    assert files(tmp_path) == []  # neither a torn entry nor a .tmp file
    _, stats = fill(models["sd15"], tmp_path)
    assert stats.encoded == 3 and not any(n.endswith(".tmp") for n in files(tmp_path))


def test_memory_only_writes_nothing(tmp_path, models):
    cond = Counting(models["sd15"])
    stats = cache_text_encoder_outputs(cond, CAPTIONS, folder=tmp_path, progress=False)
    assert (stats.encoded, stats.from_disk) == (3, 0) and files(tmp_path) == []
    stats = cache_text_encoder_outputs(cond, CAPTIONS, folder=tmp_path, progress=False)
    assert (stats.encoded, stats.in_memory) == (0, 3)


def test_vae_identity_is_unchanged(models):
    """module_identity(vae) keeps the latent caches' keys: the hash as it was written before
    the text-encoder cache generalised it."""
    vae = models["sd15"].vae
    h = hashlib.sha256()
    config = {k: v for k, v in dict(vae.config).items() if not str(k).startswith("_")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    state = vae.state_dict()
    names = list(state)
    for name in names[:3] + names[-3:]:
        h.update(name.encode())
        h.update(state[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    assert vae_identity(vae) == module_identity(vae) == h.hexdigest()[:16]


def _group(root, **kw):
    data = prepare_data(dataset_config(train_data_dir=root, **kw), (64, 64))
    assert data.problems == []
    return build_group(data, seed=0)[0]


def test_static_captions_are_what_training_sees(tmp_path):
    write_folder(tmp_path / "train" / "2_sks", 2, caption="red, cat")
    write_folder(tmp_path / "train" / "1_dog", 1, caption=None)  # class tokens
    write_folder(tmp_path / "train" / "1_dog", 1, caption="dog, grass", start=1)
    group = _group(tmp_path / "train", caption_prefix="photo of", caption_suffix="hd")
    captions = static_captions(group)
    assert captions == ["photo of dog hd", "photo of dog, grass hd", "photo of red, cat hd"]
    for ds in group.datasets:
        seen = {ds.caption(i, epoch, slot) for i in range(len(ds.items))
                for epoch in range(2) for slot in range(3)}
        assert seen <= set(captions)

    group = _group(tmp_path / "train", caption_dropout_every_n_epochs=2)
    assert "" in static_captions(group, None)
    assert static_captions(_group(tmp_path / "train", shuffle_caption=True)) == []


def test_cache_folder(tmp_path):
    write_folder(tmp_path / "train" / "2_sks", 1)
    group = _group(tmp_path / "train")
    assert text_cache_folder(dataset_config(train_data_dir=tmp_path / "train"),
                             group.items) == tmp_path / "train" / TE_CACHE_FOLDER
    assert text_cache_folder(dataset_config(train_data_dir=tmp_path / "train",
                                            cache_dir=tmp_path / "c"), group.items) == \
        tmp_path / "c"
    assert text_cache_folder(dataset_config(dataset_config="d.toml"), group.items) == \
        tmp_path / "train" / "2_sks" / TE_CACHE_FOLDER
    # the scan never reads the cache folder as a subset
    (tmp_path / "train" / TE_CACHE_FOLDER).mkdir()
    assert len(_group(tmp_path / "train").items) == 1
