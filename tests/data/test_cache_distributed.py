"""The latent cache split over 2 real processes (torch.distributed, gloo on CPU): each encodes
its share, writes only those files, and both end with the same cache as one process."""
from __future__ import annotations

import dataclasses
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from library.data import cache
from library.data.prepare import build_group, prepare_data
from library.train.conditioning import LatentEncoder
from tests.data.conftest import dataset_config, write_folder, write_image


def _group(root):
    data = prepare_data(dataset_config(train_data_dir=root, enable_bucket=True,
                                       min_bucket_reso=64, max_bucket_reso=128, flip_aug=True,
                                       alpha_mask=True), (128, 128))
    assert data.problems == []
    return build_group(data, seed=0)[0]


def _run(vae, root, folder, rank=0, world=1, vae_batch_size=2):
    group = _group(root)
    stats = cache.cache_latents(group, LatentEncoder(vae, "cpu", torch.float32, 5).sample_seeded,
                                vae=vae, vae_dtype=torch.float32, to_disk=True,
                                cache_dir=str(folder), vae_batch_size=vae_batch_size,
                                progress=False, seed=5, rank=rank, world=world)
    ds = group.datasets[0]
    return stats, dict(ds.latent_cache), dict(ds.mask_cache)


def _worker(rank, world, port, root, vae_dir, out):
    from diffusers import AutoencoderKL  # already imported by the test (fork)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cache.ROUND = 2  # several exchange rounds per bucket
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    stats, latents, masks = _run(vae, root, out / "cache", rank, world)
    again, _, _ = _run(vae, root, out / "cache", rank, world)  # every process reads the disk
    torch.save({"stats": dataclasses.asdict(stats), "summary": stats.summary(),
                "again": dataclasses.asdict(again), "latents": latents, "masks": masks},
               out / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_share_the_encoding_and_end_with_one_cache(tmp_path, tiny_sd15_dir):
    from diffusers import AutoencoderKL
    root = tmp_path / "train"
    write_folder(root / "1_a", 3, size=(128, 128))
    for i in range(2):  # another bucket, with transparency
        write_image(root / "1_b" / f"{i}.png", (192, 96), (40 * i, 90, 20), mode="RGBA")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children inherit the imported torch and diffusers (spawn re-imports them)
    mp.start_processes(_worker, args=(2, port, root, tiny_sd15_dir / "vae", tmp_path),
                       nprocs=2, start_method="fork")
    vae = AutoencoderKL.from_pretrained(tiny_sd15_dir / "vae").eval()
    ref, latents, masks = _run(vae, root, tmp_path / "one", vae_batch_size=1)
    assert (ref.encoded, ref.encoded_total, len(latents)) == (10, 10, 10)  # 5 images, flipped

    names = sorted(p.name for p in (tmp_path / "one").glob("*.npz"))
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.npz")) == names
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["stats"] == {"encoded": 5, "from_disk": 0, "in_memory": 0,
                                "encoded_total": 10, "world": 2}
        assert got["summary"] == ("latent cache: 5 encoded here (10 over 2 processes), "
                                  "0 read from disk, 0 already in memory")
        assert (got["again"]["encoded"], got["again"]["from_disk"]) == (0, 10)
        assert got["latents"].keys() == latents.keys() and got["masks"].keys() == masks.keys()
        for k in latents:  # per-image noise: the same whoever encoded it, in whatever batch
            torch.testing.assert_close(got["latents"][k], latents[k], atol=1e-6, rtol=0)
            assert torch.equal(got["masks"][k], masks[k])
