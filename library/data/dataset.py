"""The training set: items -> buckets -> a deterministic epoch plan -> batches of tensors.

An epoch is kohya's: every item `repeats` times (regularization already balanced by
`sources.balance_reg`). Samples are grouped by bucket, shuffled per (seed, epoch), cut into
batches of the dataset's batch size (a bucket's last batch may be smaller, batches never mix
buckets) and the batch order is shuffled. The plan is a pure function of (items, seed,
epoch), so a resumed run sees exactly the batches the uninterrupted run would have seen.

A ``DataGroup`` holds one ``DataSet`` per dataset (the main config's one, or one per kohya
`[[datasets]]` entry, each with its own resolution, batch size and buckets); its epoch is
the datasets' batches together, shuffled, so a batch never mixes datasets. Item indices of
a group are global: dataset k's items follow dataset k-1's.
"""
from __future__ import annotations

import random
import zlib

import cv2
import numpy as np
import torch
from PIL import Image

from library.data import buckets as B
from library.data.captions import process_caption
from library.data.images import image_size, load_image_with_alpha, resize_and_crop_array, \
    to_tensor
from library.data.masks import load_mask
from library.data.options import DataOptions, SubsetOptions  # noqa: F401  (re-export)
from library.data.sources import Item

LATENT_SCALE = 8  # the VAE downsamples by 8: a bucket of w x h pixels is w/8 x h/8 latents


def bucket_table(o: DataOptions) -> list[tuple[int, int]]:
    lo = o.min_bucket_reso or B.default_min_bucket_reso(o.resolution, o.bucket_reso_steps)
    hi = o.max_bucket_reso or B.default_max_bucket_reso(o.resolution, o.bucket_reso_steps)
    return B.make_buckets(o.resolution, lo, hi, o.bucket_reso_steps)


def assign_buckets(sizes: list[tuple[int, int]], o: DataOptions) -> list[tuple[int, int]]:
    """The bucket (w, h) of each image size (w, h)."""
    if not o.enable_bucket:
        return [B.fixed_size_bucket(o.resolution)] * len(sizes)
    table = bucket_table(o)
    return [B.select_bucket(s, table, o.bucket_no_upscale, o.resolution, o.bucket_reso_steps)
            for s in sizes]


def epoch_batches(item_buckets: list[tuple[int, int]], repeats: list[int], batch_size: int,
                  seed, epoch: int) -> list[list[int]]:
    """Batches of item indices for one epoch (pure, deterministic)."""
    rng = random.Random(f"{seed}:{epoch}")
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for idx, (bucket, n) in enumerate(zip(item_buckets, repeats)):
        by_bucket.setdefault(bucket, []).extend([idx] * n)
    batches = []
    for bucket in sorted(by_bucket):
        samples = by_bucket[bucket]
        rng.shuffle(samples)
        batches += [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    rng.shuffle(batches)
    return batches


def steps_per_epoch(item_buckets, repeats, batch_size: int) -> int:
    """Batches per epoch: per bucket, ceil(samples / batch size)."""
    counts: dict = {}
    for b, n in zip(item_buckets, repeats):
        counts[b] = counts.get(b, 0) + n
    return sum(-(-c // batch_size) for c in counts.values())


def latent_mask(alpha: np.ndarray | None, box: B.CropBox, bucket, flip: bool) -> torch.Tensor:
    """The loss mask of one sample at latent resolution, (1, h/8, w/8) in [0, 1].

    The alpha channel gets the image's own resize, crop and flip, then is area-averaged
    down by 8, so a latent pixel is weighted by the share of opaque pixels it covers.
    Without alpha the mask is all ones (everything trains).
    """
    w, h = bucket[0] // LATENT_SCALE, bucket[1] // LATENT_SCALE
    if alpha is None:
        return torch.ones(1, h, w)
    cropped = resize_and_crop_array(alpha, box.scaled_size, box.left, box.top, bucket)
    small = cv2.resize(cropped, (w, h), interpolation=cv2.INTER_AREA)
    if flip:
        small = small[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(small, dtype=np.float32))[None]


class DataSet:
    def __init__(self, items: list[Item], options: DataOptions, seed,
                 sizes: list[tuple[int, int]] | None = None):
        self.items = items
        self.o = options
        self.seed = seed
        self.sizes = sizes if sizes is not None else [image_size(i.image) for i in items]
        self.buckets = assign_buckets(self.sizes, options)
        self.repeats = [i.repeats for i in items]
        self.uses_mask = any(i.opts.alpha_mask or i.mask is not None for i in items)
        # (item index, flipped) -> latents / loss mask, filled by library.data.cache
        self.latent_cache: dict[tuple[int, bool], torch.Tensor] = {}
        self.mask_cache: dict[tuple[int, bool], torch.Tensor] = {}

    def __len__(self) -> int:
        return sum(self.repeats)

    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.buckets, self.repeats, self.o.batch_size)

    def batches(self, epoch: int) -> list[list[int]]:
        return epoch_batches(self.buckets, self.repeats, self.o.batch_size, self.seed, epoch)

    def _rng(self, idx: int, epoch: int, slot: int) -> random.Random:
        return random.Random(f"{self.seed}:{epoch}:{idx}:{slot}")

    def geometry(self, idx: int, rng: random.Random | None):
        """(crop box, flip) of one sample; centre crop and no flip without an rng."""
        opts = self.items[idx].opts
        mode = "random" if (opts.random_crop and rng is not None) else "center"
        box = B.crop_box(self.sizes[idx], self.buckets[idx], mode, rng)
        flip = bool(opts.flip_aug and rng is not None and rng.random() < 0.5)
        return box, flip

    def load(self, idx: int, box, flip: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(pixels (3, H, W) in [-1, 1], loss mask at latent size or None) of one sample."""
        item, bucket = self.items[idx], self.buckets[idx]
        rgb, alpha = load_image_with_alpha(item.image)
        array = resize_and_crop_array(np.asarray(rgb), box.scaled_size, box.left, box.top,
                                      bucket)
        pixels = to_tensor(Image.fromarray(array), flip)
        mask = None
        if item.mask is not None:  # a mask image wins over the alpha channel, as in kohya
            mask = latent_mask(load_mask(item.mask), box, bucket, flip)
        elif self.uses_mask:
            mask = latent_mask(alpha if item.opts.alpha_mask else None, box, bucket, flip)
        return pixels, mask

    def pixels(self, idx: int, box, flip: bool) -> torch.Tensor:
        return self.load(idx, box, flip)[0]

    def caption(self, idx: int, epoch: int, slot: int, step: int = 0,
                total_steps: int = 0) -> str:
        o = self.items[idx].opts
        return process_caption(
            self.items[idx].caption, rng=self._rng(idx, epoch, slot + 1_000_000),
            shuffle=o.shuffle_caption, keep_tokens=o.keep_tokens, separator=o.caption_separator,
            keep_tokens_separator=o.keep_tokens_separator,
            secondary_separator=o.secondary_separator,
            prefix=o.caption_prefix, suffix=o.caption_suffix,
            dropout_rate=o.caption_dropout_rate,
            dropout_every_n_epochs=o.caption_dropout_every_n_epochs, epoch=epoch + 1,
            tag_dropout_rate=o.caption_tag_dropout_rate,
            token_warmup_min=o.token_warmup_min, token_warmup_step=o.token_warmup_step,
            step=step, max_train_steps=total_steps, wildcard=o.enable_wildcard)

    def sample(self, idx: int, epoch: int, slot: int, step: int = 0,
               total_steps: int = 0) -> dict:
        """Everything the step needs for one sample; `slot` is its position in the epoch."""
        cached = (idx, False) in self.latent_cache
        rng = self._rng(idx, epoch, slot)
        if cached:  # encoded once from the centre crop; only the flip varies
            box = B.crop_box(self.sizes[idx], self.buckets[idx], "center")
            flip = bool(self.items[idx].opts.flip_aug and rng.random() < 0.5)
        else:
            box, flip = self.geometry(idx, rng)
        sdxl = B.sdxl_size_conditioning(self.sizes[idx], self.buckets[idx], box, flip)
        item = self.items[idx]
        out = {
            "caption": self.caption(idx, epoch, slot, step, total_steps),
            "original_size": torch.tensor(sdxl[0:2]),
            "crop_top_left": torch.tensor(sdxl[2:4]),
            "target_size": torch.tensor(sdxl[4:6]),
            "loss_weight": torch.tensor(self.o.prior_loss_weight if item.is_reg else 1.0),
            # seeds this sample's noise and timestep, so they depend on (seed, epoch, slot)
            # only: the same with any batch split across processes, and after a resume
            "sample_seed": torch.tensor(zlib.crc32(f"{self.seed}:{epoch}:{slot}".encode())),
        }
        if cached:
            out["latents"] = self.latent_cache[(idx, flip)]
            mask = self.mask_cache.get((idx, flip))
        else:
            out["pixels"], mask = self.load(idx, box, flip)
        if self.uses_mask:
            out["alpha_mask"] = mask if mask is not None else \
                latent_mask(None, box, self.buckets[idx], flip)
        return out

    def collate(self, batch_indices: list[int], epoch: int, first_slot: int, step: int = 0,
                total_steps: int = 0) -> dict:
        samples = [self.sample(i, epoch, first_slot + k, step, total_steps)
                   for k, i in enumerate(batch_indices)]
        out = {"captions": [s["caption"] for s in samples]}
        for key in samples[0]:
            if key != "caption":
                out[key] = torch.stack([s[key] for s in samples])
        if self.o.network_multiplier != 1.0:  # a dataset TOML's network_multiplier
            out["network_multiplier"] = self.o.network_multiplier
        return out


class DataGroup:
    """Several DataSets trained together; global item indices, batches never mix them."""

    def __init__(self, datasets: list[DataSet], seed):
        self.datasets = datasets
        self.seed = seed
        self.offsets = []
        n = 0
        for ds in datasets:
            self.offsets.append(n)
            n += len(ds.items)
        self.items = [i for ds in datasets for i in ds.items]
        self.buckets = [b for ds in datasets for b in ds.buckets]
        self.repeats = [r for ds in datasets for r in ds.repeats]
        self.o = datasets[0].o

    def __len__(self) -> int:
        return sum(len(ds) for ds in self.datasets)

    def steps_per_epoch(self) -> int:
        return sum(ds.steps_per_epoch() for ds in self.datasets)

    def batches(self, epoch: int) -> list[list[int]]:
        if len(self.datasets) == 1:
            return self.datasets[0].batches(epoch)
        out = [[i + off for i in b] for ds, off in zip(self.datasets, self.offsets)
               for b in ds.batches(epoch)]
        random.Random(f"{self.seed}:{epoch}:datasets").shuffle(out)
        return out

    def locate(self, index: int) -> tuple[int, int]:
        """(dataset number, index inside it) of a global item index."""
        k = max(j for j, off in enumerate(self.offsets) if off <= index)
        return k, index - self.offsets[k]

    def collate(self, batch_indices: list[int], epoch: int, first_slot: int, step: int = 0,
                total_steps: int = 0) -> dict:
        k, _ = self.locate(batch_indices[0])
        local = [i - self.offsets[k] for i in batch_indices]
        return self.datasets[k].collate(local, epoch, first_slot, step, total_steps)
