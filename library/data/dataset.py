"""The training set: items -> buckets -> a deterministic epoch plan -> batches of tensors.

An epoch is kohya's: every item `repeats` times (regularization already balanced by
`sources.balance_reg`). Samples are grouped by bucket, shuffled per (seed, epoch), cut into
batches of `train_batch_size` (a bucket's last batch may be smaller, batches never mix
buckets) and the batch order is shuffled. The plan is a pure function of (items, seed, epoch),
so a resumed run sees exactly the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from library.data import buckets as B
from library.data.captions import process_caption
from library.data.images import image_size, load_image, resize_and_crop, to_tensor
from library.data.sources import Item


@dataclass(frozen=True)
class DataOptions:
    """The dataset keys a DataSet needs, lifted from the config once."""
    resolution: tuple[int, int]
    batch_size: int
    enable_bucket: bool = False
    min_bucket_reso: int | None = None
    max_bucket_reso: int | None = None
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    random_crop: bool = False
    flip_aug: bool = False
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_separator: str = ","
    caption_prefix: str = ""
    caption_suffix: str = ""
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0
    prior_loss_weight: float = 1.0

    @classmethod
    def from_config(cls, d, resolution: tuple[int, int]) -> "DataOptions":
        names = [f for f in cls.__dataclass_fields__ if f not in ("resolution", "batch_size")]
        return cls(resolution=resolution, batch_size=d.train_batch_size,
                   **{n: getattr(d, n) for n in names})


def assign_buckets(sizes: list[tuple[int, int]], o: DataOptions) -> list[tuple[int, int]]:
    """The bucket (w, h) of each image size (w, h)."""
    if not o.enable_bucket:
        return [B.fixed_size_bucket(o.resolution)] * len(sizes)
    lo = o.min_bucket_reso or B.default_min_bucket_reso(o.resolution, o.bucket_reso_steps)
    hi = o.max_bucket_reso or B.default_max_bucket_reso(o.resolution, o.bucket_reso_steps)
    table = B.make_buckets(o.resolution, lo, hi, o.bucket_reso_steps)
    return [B.select_bucket(s, table, o.bucket_no_upscale, o.resolution, o.bucket_reso_steps)
            for s in sizes]


def epoch_batches(item_buckets: list[tuple[int, int]], repeats: list[int], batch_size: int,
                  seed: int, epoch: int) -> list[list[int]]:
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
    counts: dict = {}
    for b, n in zip(item_buckets, repeats):
        counts[b] = counts.get(b, 0) + n
    return sum(-(-c // batch_size) for c in counts.values())


class DataSet:
    def __init__(self, items: list[Item], options: DataOptions, seed: int):
        self.items = items
        self.o = options
        self.seed = seed
        self.sizes = [image_size(i.image) for i in items]
        self.buckets = assign_buckets(self.sizes, options)
        self.repeats = [i.repeats for i in items]
        self.latent_cache: dict[tuple[int, bool], torch.Tensor] = {}

    def __len__(self) -> int:
        return sum(self.repeats)

    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.buckets, self.repeats, self.o.batch_size)

    def batches(self, epoch: int) -> list[list[int]]:
        return epoch_batches(self.buckets, self.repeats, self.o.batch_size, self.seed, epoch)

    def _rng(self, idx: int, epoch: int, slot: int) -> random.Random:
        return random.Random(f"{self.seed}:{epoch}:{idx}:{slot}")

    def geometry(self, idx: int, rng: random.Random | None):
        """(crop box, flip) of one sample; deterministic centre crop without random_crop."""
        bucket = self.buckets[idx]
        mode = "random" if (self.o.random_crop and rng is not None) else "center"
        box = B.crop_box(self.sizes[idx], bucket, mode, rng)
        flip = bool(self.o.flip_aug and rng is not None and rng.random() < 0.5)
        return box, flip

    def pixels(self, idx: int, box, flip: bool) -> torch.Tensor:
        img = load_image(self.items[idx].image)
        img = resize_and_crop(img, box.scaled_size, box.left, box.top, self.buckets[idx])
        return to_tensor(img, flip)

    def caption(self, idx: int, epoch: int, slot: int) -> str:
        o = self.o
        return process_caption(
            self.items[idx].caption, rng=self._rng(idx, epoch, slot + 1_000_000),
            shuffle=o.shuffle_caption, keep_tokens=o.keep_tokens, separator=o.caption_separator,
            prefix=o.caption_prefix, suffix=o.caption_suffix,
            dropout_rate=o.caption_dropout_rate, epoch=epoch + 1,
            tag_dropout_rate=o.caption_tag_dropout_rate)

    def sample(self, idx: int, epoch: int, slot: int) -> dict:
        """Everything the step needs for one sample; `slot` is its position in the epoch."""
        cached = bool(self.latent_cache)
        rng = None if cached else self._rng(idx, epoch, slot)
        box, flip = self.geometry(idx, rng)
        if cached:
            flip = bool(self.o.flip_aug and self._rng(idx, epoch, slot).random() < 0.5)
        sdxl = B.sdxl_size_conditioning(self.sizes[idx], self.buckets[idx], box, flip)
        item = self.items[idx]
        out = {
            "caption": self.caption(idx, epoch, slot),
            "original_size": torch.tensor(sdxl[0:2]),
            "crop_top_left": torch.tensor(sdxl[2:4]),
            "target_size": torch.tensor(sdxl[4:6]),
            "loss_weight": torch.tensor(self.o.prior_loss_weight if item.is_reg else 1.0),
        }
        if cached:
            out["latents"] = self.latent_cache[(idx, flip)]
        else:
            out["pixels"] = self.pixels(idx, box, flip)
        return out

    def collate(self, batch_indices: list[int], epoch: int, first_slot: int) -> dict:
        samples = [self.sample(i, epoch, first_slot + k) for k, i in enumerate(batch_indices)]
        out = {"captions": [s["caption"] for s in samples]}
        for key in samples[0]:
            if key != "caption":
                out[key] = torch.stack([s[key] for s in samples])
        return out

    @torch.no_grad()
    def cache_latents(self, encode, vae_batch_size: int = 1, progress=None) -> None:
        """Encode every item once (centre crop, and its mirror when flip_aug is on)."""
        keys = [(i, f) for i in range(len(self.items))
                for f in ((False, True) if self.o.flip_aug else (False,))]
        by_bucket: dict = {}
        for k in keys:
            by_bucket.setdefault(self.buckets[k[0]], []).append(k)
        for group in by_bucket.values():
            for j in range(0, len(group), vae_batch_size):
                chunk = group[j:j + vae_batch_size]
                px = torch.stack([self.pixels(i, self.geometry(i, None)[0], f) for i, f in chunk])
                for k, lat in zip(chunk, encode(px)):
                    self.latent_cache[k] = lat.cpu()
                if progress:
                    progress(len(chunk))
