"""The data options, split the way kohya's dataset config splits them.

* ``SubsetOptions`` belong to a group of images (a `N_name` folder, a metadata file, a
  `[[datasets.subsets]]` entry): caption processing and augmentation. Every ``Item`` carries
  the options of its subset, so one dataset can mix subsets with different captions rules.
* ``DataOptions`` belong to a dataset (the main config's one, or each `[[datasets]]` entry):
  resolution, batch size and buckets. Batches never mix datasets, because each dataset has
  its own bucket geometry.

Both are built from the ``[dataset]`` section of the config by ``from_config``; the kohya
dataset TOML (``dataset_config.py``) builds them per subset / per dataset instead.
"""
from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class SubsetOptions:
    """Per-subset caption and augmentation options (kohya's subset keys)."""
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_separator: str = ","
    keep_tokens_separator: str = ""
    secondary_separator: str = ""
    caption_prefix: str = ""
    caption_suffix: str = ""
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0
    enable_wildcard: bool = False
    flip_aug: bool = False
    random_crop: bool = False
    alpha_mask: bool = False

    @classmethod
    def from_config(cls, d) -> "SubsetOptions":
        """From a ``DatasetConfig`` (or any object with the same attribute names).

        `center_crop = false` means a random crop, as in the diffusers scripts (their
        `--center_crop` flag chooses CenterCrop over RandomCrop).
        """
        values = {f.name: getattr(d, f.name) for f in fields(cls)}
        values["random_crop"] = d.random_crop or not getattr(d, "center_crop", True)
        return cls(**values)


@dataclass(frozen=True)
class DataOptions:
    """Per-dataset geometry and batching: what decides buckets and batches."""
    resolution: tuple[int, int]
    batch_size: int
    enable_bucket: bool = False
    min_bucket_reso: int | None = None
    max_bucket_reso: int | None = None
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    prior_loss_weight: float = 1.0
    # kohya dataset-config keys of a [[datasets]] entry (None: the main config's value)
    network_multiplier: float = 1.0        # LoRA multiplier of this dataset's batches
    validation_split: float | None = None  # fraction of its training images held out
    validation_seed: int | None = None     # seed of that draw

    @classmethod
    def from_config(cls, d, resolution: tuple[int, int]) -> "DataOptions":
        names = [f.name for f in fields(cls) if f.name not in (
            "resolution", "batch_size", "network_multiplier", "validation_split",
            "validation_seed")]
        return cls(resolution=tuple(resolution), batch_size=d.train_batch_size,
                   **{n: getattr(d, n) for n in names})
