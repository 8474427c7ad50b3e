"""Latent caches (library/data/cache.py) with the real tiny VAE: reuse, invalidation, files."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from library.data.cache import cache_latents, latent_seed, vae_identity
from library.data.prepare import build_group, prepare_data
from library.train.conditioning import LatentEncoder
from tests.data.conftest import dataset_config, write_folder


@pytest.fixture(scope="module")
def vae(tiny_sd15_dir):
    from diffusers import AutoencoderKL
    return AutoencoderKL.from_pretrained(tiny_sd15_dir / "vae").eval()


class Encoder:
    """The VAE's encode, counted: how many images really went through the VAE."""

    def __init__(self, vae):
        self.vae, self.images, self.calls = vae, 0, 0

    def __call__(self, px, seeds):
        assert len(seeds) == len(px)
        self.calls += 1
        self.images += len(px)
        with torch.no_grad():
            return self.vae.encode(px).latent_dist.mean * self.vae.config.scaling_factor


def _group(root, resolution=(64, 64), **kw):
    data = prepare_data(dataset_config(train_data_dir=root, **kw), resolution)
    assert data.problems == []
    return build_group(data, seed=0)[0]


def _run(vae, group, **kw):
    enc = Encoder(vae)
    stats = cache_latents(group, enc, vae=vae, vae_dtype=torch.float32, progress=False, **kw)
    return enc, stats


def _npz(root):
    return sorted(p.name for p in root.rglob("*.npz"))


def test_disk_cache_reuse_and_invalidation(tmp_path, vae):
    root = tmp_path / "train"
    images = write_folder(root / "2_sks", 3)
    enc, stats = _run(vae, _group(root), to_disk=True, vae_batch_size=2)
    assert (enc.images, enc.calls, stats.from_disk) == (3, 2, 0)  # batches of 2 + 1
    first = _npz(root)
    assert len(first) == 3 and all(n.startswith(f"{i:03d}.png.") for i, n in
                                   enumerate(first))

    # An unchanged run reads every latent back and never calls the VAE.
    group = _group(root)
    enc, stats = _run(vae, group, to_disk=True)
    assert (enc.calls, stats.from_disk, stats.encoded) == (0, 3, 0)
    ref = _group(root)
    _run(vae, ref, to_disk=False)
    assert torch.allclose(group.datasets[0].latent_cache[(0, False)],
                          ref.datasets[0].latent_cache[(0, False)], atol=1e-5)

    # Editing one image re-encodes exactly that image, under a new key.
    img = Image.open(images[1]).convert("RGB")
    img.putpixel((5, 5), (0, 255, 0))
    img.save(images[1])
    enc, stats = _run(vae, _group(root), to_disk=True)
    assert (enc.images, stats.from_disk) == (1, 2)
    now = _npz(root)
    assert len(now) == 4 and set(first) < set(now)
    assert [n for n in now if n not in first][0].startswith("001.png.")

    # A changed setting (flip_aug) adds only the mirrored entries.
    enc, stats = _run(vae, _group(root, flip_aug=True), to_disk=True)
    assert (enc.images, stats.from_disk) == (3, 3)


def test_another_vae_or_dtype_or_crop_gets_new_entries(tmp_path, vae):
    root = tmp_path / "train"
    write_folder(root / "1_a", 2, size=(96, 64))
    _run(vae, _group(root), to_disk=True)
    enc, _ = _run(vae, _group(root), to_disk=True)
    assert enc.images == 0
    other = type(vae).from_config(vae.config)
    other.load_state_dict({k: v + 0.01 for k, v in vae.state_dict().items()})
    assert vae_identity(other) != vae_identity(vae)
    enc, _ = _run(other.eval(), _group(root), to_disk=True)
    assert enc.images == 2
    group = _group(root)
    enc = Encoder(vae)
    cache_latents(group, enc, vae=vae, vae_dtype=torch.float16, to_disk=True, progress=False)
    assert enc.images == 2  # dtype is part of the key
    enc, _ = _run(vae, _group(root, resolution=(96, 64)), to_disk=True)
    assert enc.images == 2  # another bucket and crop
    enc, _ = _run(vae, _group(root, enable_bucket=True, min_bucket_reso=64,
                              max_bucket_reso=128), to_disk=True)
    assert enc.images == 0  # buckets on, but the same 64x64 bucket and centre crop


def test_cache_dir_and_memory_only(tmp_path, vae):
    root = tmp_path / "train"
    write_folder(root / "1_a", 2)
    cache = tmp_path / "cache"
    enc, _ = _run(vae, _group(root), to_disk=True, cache_dir=str(cache))
    assert enc.images == 2 and _npz(root) == [] and len(_npz(cache)) == 2
    assert all(len(n) == len("0" * 64 + ".npz") for n in _npz(cache))
    group = _group(root)
    enc, stats = _run(vae, group, to_disk=False)
    assert enc.images == 2 and _npz(root) == [] and len(group.datasets[0].latent_cache) == 2
    enc, stats = _run(vae, group, to_disk=False)
    assert enc.images == 0 and stats.in_memory == 2


def test_a_torn_cache_file_is_re_encoded(tmp_path, vae):
    root = tmp_path / "train"
    write_folder(root / "1_a", 1)
    _run(vae, _group(root), to_disk=True)
    (npz,) = root.rglob("*.npz")
    npz.write_bytes(npz.read_bytes()[:40])
    enc, stats = _run(vae, _group(root), to_disk=True)
    assert enc.images == 1 and stats.from_disk == 0


def test_cached_samples_carry_latents_and_masks(tmp_path, vae):
    import numpy as np
    root = tmp_path / "train" / "1_a"
    root.mkdir(parents=True)
    rgba = np.full((64, 64, 4), 120, np.uint8)
    rgba[:, :32, 3] = 0
    Image.fromarray(rgba, "RGBA").save(root / "x.png")
    group = _group(root.parent, alpha_mask=True)
    _run(vae, group, to_disk=True)
    batch = group.collate([0], 0, 0)
    assert "pixels" not in batch and tuple(batch["latents"].shape) == (1, 4, 8, 8)
    assert batch["alpha_mask"][0, 0, :, :4].sum() == 0
    again = _group(root.parent, alpha_mask=True)
    enc, _ = _run(vae, again, to_disk=True)
    assert enc.images == 0
    assert torch.equal(again.collate([0], 0, 0)["alpha_mask"], batch["alpha_mask"])


def _sampled(vae, group, seed=5, **kw):
    enc = LatentEncoder(vae, "cpu", torch.float32, seed)
    before = enc.gen.get_state()
    stats = cache_latents(group, enc.sample_seeded, vae=vae, vae_dtype=torch.float32,
                          progress=False, seed=seed, **kw)
    assert torch.equal(enc.gen.get_state(), before)  # the per-step generator is untouched
    return stats, {k: v for ds in group.datasets for k, v in ds.latent_cache.items()}


def test_sampled_latents_do_not_depend_on_vae_batch_size(tmp_path, vae):
    root = tmp_path / "train"
    write_folder(root / "1_a", 4)
    stats, one = _sampled(vae, _group(root, flip_aug=True), vae_batch_size=1)
    assert (stats.encoded, stats.encoded_total, stats.world) == (8, 8, 1)
    assert stats.summary() == "latent cache: 8 encoded, 0 read from disk, 0 already in memory"
    _, three = _sampled(vae, _group(root, flip_aug=True), vae_batch_size=3)
    assert one.keys() == three.keys() and len(one) == 8
    for k in one:
        # the same noise; batched convolutions may round the last bits differently
        torch.testing.assert_close(one[k], three[k], atol=1e-6, rtol=0)
    # a sample, not the mean: each (item, flip) has its own noise, and the run seed matters
    _, other = _sampled(vae, _group(root, flip_aug=True), seed=6)
    assert not torch.allclose(one[(0, False)], other[(0, False)])
    assert len({latent_seed(5, 0, i, f) for i in range(4) for f in (False, True)}) == 8
