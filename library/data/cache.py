"""Latent caches: encode each training image once, in memory and optionally on disk.

A disk cache entry is content-addressed: its key is a hash of everything that decides the
latents, so a changed input can never be served a stale latent:

    sha256(format version, sha256 of the image file's bytes, bucket (w, h), crop box
           (scaled size, left, top), flip, alpha_mask, VAE identity, VAE dtype
           [, sha256 of the mask image's bytes with masked_loss])

The VAE identity (``vae_identity``, i.e. ``module_identity``, which the text-encoder cache
shares) hashes the VAE's config (without diffusers' bookkeeping entries such as
`_name_or_path`) and the bytes of its first and last weight tensors, so a replacement VAE
(`vae = ...`, e.g. sdxl-vae-fp16-fix) gets new entries even though its config is the same.
An edited image has new bytes and so a new key: the old file is simply never read again
(delete `*.npz` caches by hand to reclaim the space).

Files: `<image name>.<key[:16]>.npz` beside the image (kohya writes `<image>.npz`), or
`<cache_dir>/<key>.npz` with `cache_dir`. Each holds `latents` (float32), the full `key`
(checked on load) and `alpha_mask` when the subset uses one. Files are written to a temp
name and renamed, so an interrupted run never leaves a torn entry.

The VAE sample noise of each latent comes from its own seed (`latent_seed`: run seed,
dataset, item, flip), so a cached latent does not depend on `vae_batch_size` or on how many
processes share the encoding (`accelerate launch --num_processes N` splits the jobs).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from library.data import buckets as B

CACHE_VERSION = 1
log = logging.getLogger("tomlora")


# transformers' config bookkeeping (like diffusers' `_`-prefixed entries): not the model
_CONFIG_BOOKKEEPING = ("transformers_version", "torch_dtype", "dtype")
SAMPLE = 4096  # values per tensor hashed by module_identity(every_tensor=True)


def module_identity(module, every_tensor: bool = False) -> str:
    """A short hash that changes when a model's config or weights change: its config
    (diffusers or transformers; without bookkeeping such as `_name_or_path`) and the bytes of
    its first and last three weight tensors (the VAE). `every_tensor` hashes instead the
    name, shape and an evenly strided sample (at most `SAMPLE` values) of every tensor, so a
    change confined to the middle layers (a LoRA merged into a text encoder) is seen too."""
    h = hashlib.sha256()
    cfg = module.config
    raw = dict(cfg) if isinstance(cfg, dict) else cfg.to_dict()
    config = {k: v for k, v in raw.items()
              if not str(k).startswith("_") and k not in _CONFIG_BOOKKEEPING}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    state = module.state_dict()
    names = list(state)
    for name in names if every_tensor else names[:3] + names[-3:]:
        tensor = state[name].detach()
        if every_tensor:
            h.update(json.dumps(list(tensor.shape)).encode())
            tensor = tensor.flatten()[::max(1, tensor.numel() // SAMPLE)]
        tensor = tensor.to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(tensor.numpy().tobytes())
    return h.hexdigest()[:16]


def vae_identity(vae) -> str:
    """A short hash that changes when the VAE's config or weights change."""
    return module_identity(vae)


def file_digest(path: Path, memo: dict | None = None) -> str:
    if memo is not None and path in memo:
        return memo[path]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if memo is not None:
        memo[path] = digest
    return digest


def latent_key(image_digest: str, bucket, box: B.CropBox, flip: bool, alpha_mask: bool,
               vae_id: str, dtype: torch.dtype, mask_digest: str | None = None) -> str:
    parts = [CACHE_VERSION, image_digest, list(bucket), list(box.scaled_size), box.left,
             box.top, bool(flip), bool(alpha_mask), vae_id, str(dtype)]
    if mask_digest is not None:  # masked_loss: the mask image's bytes (keys without stay)
        parts.append(["mask", mask_digest])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def cache_path(image: Path, key: str, cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(cache_dir) / f"{key}.npz"
    return image.with_name(f"{image.name}.{key[:16]}.npz")


def read_entry(path: Path, key: str) -> dict | None:
    """The arrays of a valid cache file, or None (missing, torn or another key)."""
    try:
        with np.load(path) as z:
            if str(z["key"]) != key:
                return None
            return {name: z[name] for name in z.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def write_entry(path: Path, key: str, latents: torch.Tensor, mask: torch.Tensor | None):
    arrays = {"latents": latents}
    if mask is not None:
        arrays["alpha_mask"] = mask
    write_arrays(path, key, arrays)


def write_arrays(path: Path, key: str, tensors: dict[str, torch.Tensor]) -> None:
    """One cache file: `key` plus each tensor in float32, written to a temp name and renamed
    (an interrupted run never leaves a torn entry)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"key": np.array(key)}
    arrays.update({name: t.detach().float().cpu().numpy() for name, t in tensors.items()})
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


ROUND = 64  # jobs per process between two exchanges: bounds the latents gathered at once


def latent_seed(seed: int, dataset: int, idx: int, flip: bool) -> int:
    """The seed of the VAE sample noise of one cached latent (dataset, item, flip): the same
    whichever process encodes it and whatever else shares its VAE batch."""
    h = hashlib.sha256(json.dumps(["latent", int(seed), dataset, idx, bool(flip)]).encode())
    return int.from_bytes(h.digest()[:8], "little") & (2**63 - 1)


@dataclass
class CacheStats:
    encoded: int = 0        # VAE encodes done now by this process
    from_disk: int = 0      # entries read from valid cache files
    in_memory: int = 0      # already cached in memory (skipped)
    encoded_total: int = 0  # VAE encodes done now by all processes together
    world: int = 1          # processes that shared the encoding

    def summary(self) -> str:
        encoded = f"{self.encoded} encoded" if self.world == 1 else \
            f"{self.encoded} encoded here ({self.encoded_total} over {self.world} processes)"
        return (f"latent cache: {encoded}, {self.from_disk} read from disk, "
                f"{self.in_memory} already in memory")


@torch.no_grad()
def cache_latents(data, encode, *, vae, vae_dtype: torch.dtype, to_disk: bool = False,
                  cache_dir: str | None = None, vae_batch_size: int = 1,
                  progress: bool = True, seed: int = 0, rank: int = 0,
                  world: int = 1) -> CacheStats:
    """Fill `latent_cache` (and `mask_cache`) of every DataSet of `data` (a DataGroup or a
    DataSet). `encode(pixels (B, 3, H, W), seeds) -> latents (B, 4, H/8, W/8)` runs the VAE;
    `seeds[i]` (from `latent_seed`) seeds the sample noise of image i.

    Each item is encoded from its centre crop, plus its mirror image when its subset has
    flip_aug. With `to_disk`, valid cache files are read instead of encoding, and new
    latents are written. Items of one VAE call share a bucket (same tensor shape).

    With `world` processes (torch.distributed initialised), every process reads the valid
    disk entries itself, then the pending jobs (checked to be the same everywhere) are
    split: job j (in bucket order) is encoded by process j % world, which alone writes its
    file. After every round of at most `ROUND` jobs per process the new latents are
    exchanged (all_gather_object), so each process ends with the full cache; a barrier
    closes the caching. `world` 1 makes no torch.distributed call.
    """
    from tqdm.auto import tqdm
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"cache_latents with world = {world} needs torch.distributed "
                           "initialised (accelerate launch does this)")
    stats = CacheStats(world=world)
    vae_id = vae_identity(vae) if to_disk else ""
    digests: dict = {}
    datasets = getattr(data, "datasets", [data])
    plans = []  # per dataset: {bucket: [(idx, flip, box, key, path)]}
    for ds in datasets:
        pending: dict = {}
        for idx, item in enumerate(ds.items):
            box = B.crop_box(ds.sizes[idx], ds.buckets[idx], "center")
            for flip in ((False, True) if item.opts.flip_aug else (False,)):
                if (idx, flip) in ds.latent_cache:
                    stats.in_memory += 1
                    continue
                key = path = None
                if to_disk:
                    key = latent_key(file_digest(item.image, digests), ds.buckets[idx], box,
                                     flip, item.opts.alpha_mask and ds.uses_mask, vae_id,
                                     vae_dtype, None if item.mask is None else
                                     file_digest(item.mask, digests))
                    path = cache_path(item.image, key, cache_dir)
                    entry = read_entry(path, key)
                    if entry is not None:
                        _store(ds, idx, flip, torch.from_numpy(entry["latents"]),
                               entry.get("alpha_mask"))
                        stats.from_disk += 1
                        continue
                pending.setdefault(ds.buckets[idx], []).append((idx, flip, box, key, path))
        plans.append(pending)
    if world > 1:  # every process has read the disk before any process writes to it
        _check_same_jobs(plans, world)
    total = sum(len(jobs) for pending in plans for jobs in pending.values())
    bar = tqdm(total=total, desc="caching latents", disable=not progress or not total)
    per_round = world * vae_batch_size * max(1, ROUND // vae_batch_size)
    first = 0  # global number of the bucket's first job
    for d_i, (ds, pending) in enumerate(zip(datasets, plans)):
        for jobs in pending.values():
            for r in range(0, len(jobs), per_round):
                mine = [job for j, job in enumerate(jobs[r:r + per_round], first + r)
                        if j % world == rank]
                done = []
                for b in range(0, len(mine), vae_batch_size):
                    chunk = mine[b:b + vae_batch_size]
                    loaded = [ds.load(idx, box, flip) for idx, flip, box, _, _ in chunk]
                    latents = encode(torch.stack([px for px, _ in loaded]),
                                     [latent_seed(seed, d_i, idx, flip)
                                      for idx, flip, _, _, _ in chunk])
                    for (idx, flip, _, key, path), lat, (_, mask) in zip(chunk, latents,
                                                                         loaded):
                        _store(ds, idx, flip, lat, mask)
                        if to_disk:
                            write_entry(path, key, lat, mask)
                        if world > 1:
                            done.append((idx, flip, ds.latent_cache[(idx, flip)],
                                         ds.mask_cache.get((idx, flip))))
                    stats.encoded += len(chunk)
                    if world == 1:
                        bar.update(len(chunk))
                if world > 1:
                    parts: list = [None] * world
                    dist.all_gather_object(parts, done)
                    for other, part in enumerate(parts):
                        for idx, flip, lat, mask in part if other != rank else ():
                            _store(ds, idx, flip, lat, mask)
                    bar.update(sum(len(part) for part in parts))
            first += len(jobs)
    bar.close()
    stats.encoded_total = total  # every pending job was encoded by one of the processes
    if world > 1:  # no process trains before every cache is complete
        dist.barrier()
    return stats


def _check_same_jobs(plans: list[dict], world: int) -> None:
    """Gather (a barrier too) a digest of each process's pending jobs: they split them by
    number, so all must see the same list (a disk entry written meanwhile by another run
    could make them differ)."""
    listing = [[list(bucket), [(idx, flip) for idx, flip, *_ in jobs]]
               for pending in plans for bucket, jobs in pending.items()]
    digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    seen: list = [None] * world
    dist.all_gather_object(seen, digest)
    if len(set(seen)) > 1:
        raise RuntimeError("latent cache: the processes found different cache files to "
                           "encode (was another run writing them?); start again")


def _store(ds, idx: int, flip: bool, latents: torch.Tensor, mask) -> None:
    ds.latent_cache[(idx, flip)] = latents.detach().float().cpu()
    if mask is not None:
        ds.mask_cache[(idx, flip)] = torch.as_tensor(mask).float().cpu()
