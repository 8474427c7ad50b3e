"""Latent caches: encode each training image once, in memory and optionally on disk.

A disk cache entry is content-addressed: its key is a hash of everything that decides the
latents, so a changed input can never be served a stale latent:

    sha256(format version, sha256 of the image file's bytes, bucket (w, h), crop box
           (scaled size, left, top), flip, alpha_mask, VAE identity, VAE dtype)

The VAE identity (``vae_identity``) hashes the VAE's config (without diffusers' bookkeeping
entries such as `_name_or_path`) and the bytes of its first and last weight tensors, so a
replacement VAE (`vae = ...`, e.g. sdxl-vae-fp16-fix) gets new entries even though its
config is the same. An edited image has new bytes and so a new key: the old file is simply
never read again (delete `*.npz` caches by hand to reclaim the space).

Files: `<image name>.<key[:16]>.npz` beside the image (kohya writes `<image>.npz`), or
`<cache_dir>/<key>.npz` with `cache_dir`. Each holds `latents` (float32), the full `key`
(checked on load) and `alpha_mask` when the subset uses one. Files are written to a temp
name and renamed, so an interrupted run never leaves a torn entry.
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

from library.data import buckets as B

CACHE_VERSION = 1
log = logging.getLogger("tomlora")


def vae_identity(vae) -> str:
    """A short hash that changes when the VAE's config or weights change."""
    h = hashlib.sha256()
    config = {k: v for k, v in dict(vae.config).items() if not str(k).startswith("_")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    state = vae.state_dict()
    names = list(state)
    for name in names[:3] + names[-3:]:
        tensor = state[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(tensor.numpy().tobytes())
    return h.hexdigest()[:16]


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
               vae_id: str, dtype: torch.dtype) -> str:
    parts = [CACHE_VERSION, image_digest, list(bucket), list(box.scaled_size), box.left,
             box.top, bool(flip), bool(alpha_mask), vae_id, str(dtype)]
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
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"key": np.array(key), "latents": latents.float().cpu().numpy()}
    if mask is not None:
        arrays["alpha_mask"] = mask.float().cpu().numpy()
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)


@dataclass
class CacheStats:
    encoded: int = 0       # VAE encodes done now
    from_disk: int = 0     # entries read from valid cache files
    in_memory: int = 0     # already cached in memory (skipped)

    def summary(self) -> str:
        return (f"latent cache: {self.encoded} encoded, {self.from_disk} read from disk, "
                f"{self.in_memory} already in memory")


@torch.no_grad()
def cache_latents(data, encode, *, vae, vae_dtype: torch.dtype, to_disk: bool = False,
                  cache_dir: str | None = None, vae_batch_size: int = 1,
                  progress: bool = True) -> CacheStats:
    """Fill `latent_cache` (and `mask_cache`) of every DataSet of `data` (a DataGroup or a
    DataSet). `encode(pixels (B, 3, H, W)) -> latents (B, 4, H/8, W/8)` runs the VAE.

    Each item is encoded from its centre crop, plus its mirror image when its subset has
    flip_aug. With `to_disk`, valid cache files are read instead of encoding, and new
    latents are written. Items of one VAE call share a bucket (same tensor shape).
    """
    from tqdm.auto import tqdm
    stats = CacheStats()
    vae_id = vae_identity(vae) if to_disk else ""
    digests: dict = {}
    datasets = getattr(data, "datasets", [data])
    for ds in datasets:
        pending: dict = {}  # bucket -> [(idx, flip, box, key, path)]
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
                                     vae_dtype)
                    path = cache_path(item.image, key, cache_dir)
                    entry = read_entry(path, key)
                    if entry is not None:
                        _store(ds, idx, flip, torch.from_numpy(entry["latents"]),
                               entry.get("alpha_mask"))
                        stats.from_disk += 1
                        continue
                pending.setdefault(ds.buckets[idx], []).append((idx, flip, box, key, path))
        total = sum(len(v) for v in pending.values())
        bar = tqdm(total=total, desc="caching latents", disable=not progress or not total)
        for jobs in pending.values():
            for j in range(0, len(jobs), vae_batch_size):
                chunk = jobs[j:j + vae_batch_size]
                loaded = [ds.load(idx, box, flip) for idx, flip, box, _, _ in chunk]
                latents = encode(torch.stack([px for px, _ in loaded]))
                for (idx, flip, _, key, path), lat, (_, mask) in zip(chunk, latents, loaded):
                    _store(ds, idx, flip, lat, mask)
                    if to_disk:
                        write_entry(path, key, lat, mask)
                stats.encoded += len(chunk)
                bar.update(len(chunk))
        bar.close()
    return stats


def _store(ds, idx: int, flip: bool, latents: torch.Tensor, mask) -> None:
    ds.latent_cache[(idx, flip)] = latents.detach().float().cpu()
    if mask is not None:
        ds.mask_cache[(idx, flip)] = torch.as_tensor(mask).float().cpu()
