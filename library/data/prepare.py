"""From the config to a checked, planned DataGroup: the data half of DESIGN.md §3.2.

    prepare_data: scan the sources (train_data_dir + reg_data_dir, or each kohya
                  [[datasets]] entry) -> the doctor decodes and size-checks every image
    build_group:  hold out validation images -> kohya's reg balancing (on the images that
                  train) -> buckets and one DataSet per dataset -> a DataGroup

Nothing here loads a model or writes a file, so `--dry_run` can run all of it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from library.data.dataset import DataGroup, DataSet
from library.data.dataset_config import dataset_option_errors, read_dataset_config, \
    read_inline_subsets
from library.data.doctor import check_items
from library.data.masks import attach_masks, mask_size_problems
from library.data.options import DataOptions, SubsetOptions
from library.data.sources import Item, Scan, balance_reg, require_training_images, scan_sources, \
    scan_subset


@dataclass
class Checked:
    """One dataset after the doctor: its options, scan report and usable items (reg not
    balanced yet) with their sizes."""
    options: DataOptions
    scan: Scan
    items: list[Item]
    sizes: list[tuple[int, int]]


@dataclass
class PreparedData:
    datasets: list[Checked] = field(default_factory=list)
    source: str = ""                                    # where the datasets came from
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)   # fatal: exit 2

    @property
    def labels(self) -> list[str]:
        n = len(self.datasets)
        return [f"dataset {k + 1}" if n > 1 else "dataset" for k in range(n)]

    @property
    def scans(self) -> list[Scan]:
        return [c.scan for c in self.datasets]

    @property
    def items(self) -> list[Item]:
        return [i for c in self.datasets for i in c.items]


def dataset_seed(seed, k: int):
    """Dataset 0 keeps the run's seed (a one-dataset run shuffles as before); others get
    their own stream."""
    return seed if k == 0 else f"{seed}/{k}"


def scan_datasets(d, resolution, cli_keys=()) -> tuple[list[tuple[DataOptions, Scan]], str,
                                                      list[str]]:
    """[(options, scan)] per dataset, the source description and the reader's warnings.

    Raises ConfigError (from the dataset_config reader) for a bad dataset TOML.
    """
    if d.dataset_config or d.subsets:
        specs, warnings = read_dataset_config(d.dataset_config, d, cli_keys, resolution) \
            if d.dataset_config else \
            read_inline_subsets(d.subsets, "config", d, cli_keys, resolution)
        out = []
        for spec in specs:
            scan = Scan()
            mask_dirs = {}
            for sub in spec.subsets:
                start = len(scan.items)
                scan_subset(sub.image_dir, num_repeats=sub.num_repeats, is_reg=sub.is_reg,
                            class_tokens=sub.class_tokens,
                            caption_extension=sub.caption_extension,
                            metadata_file=sub.metadata_file, opts=sub.opts, scan=scan,
                            label=f"{spec.label} {sub.label}",
                            caption_column=d.caption_column, image_column=d.image_column)
                mask_dirs.update({id(it): sub.conditioning_data_dir
                                  for it in scan.items[start:]})
            if any(mask_dirs.values()):
                with_masks(scan, lambda it: mask_dirs.get(id(it)), spec.label)
            require_training_images(scan, f"{spec.label}: no training images found in its "
                                    "subsets")
            out.append((spec.options, scan))
        source = f"dataset_config {d.dataset_config}" if d.dataset_config else \
            f"{len(d.subsets)} [[subsets]] of the config"
        return out, source, warnings
    options = DataOptions.from_config(d, resolution)
    opts = SubsetOptions.from_config(d)
    if d.in_json:  # kohya's fine-tuning method: captions from the JSON, images in the dir
        scan = Scan()
        meta = Path(d.in_json)
        if not meta.is_file():
            scan.problems.append(f"in_json: file {d.in_json!r} not found")
        else:
            scan_subset(Path(d.train_data_dir) if d.train_data_dir else None,
                        num_repeats=d.dataset_repeats, is_reg=False, class_tokens=None,
                        caption_extension=d.caption_extension, metadata_file=meta, opts=opts,
                        scan=scan, label=f"in_json {d.in_json}")
            require_training_images(scan, f"in_json: no training images found in {d.in_json}")
        if d.reg_data_dir:  # kohya's fine-tuning datasets have no regularization images
            scan.warnings.append("reg_data_dir is ignored with in_json (kohya's fine-tuning "
                                 "method has no regularization images)")
        source = f"in_json {d.in_json}" + (f", images in {d.train_data_dir}"
                                           if d.train_data_dir else "")
    else:
        scan = scan_sources(d.train_data_dir, d.reg_data_dir,
                            caption_extension=d.caption_extension,
                            caption_column=d.caption_column, image_column=d.image_column,
                            opts=opts)
        source = f"train_data_dir {d.train_data_dir}" + (
            f", reg_data_dir {d.reg_data_dir}" if d.reg_data_dir else "")
    for e in dataset_option_errors(options):
        scan.problems.append(f"[dataset] {e}")
    if d.masked_loss and d.conditioning_data_dir:
        root = Path(d.conditioning_data_dir)
        if not root.is_dir():
            scan.problems.append(f"conditioning_data_dir: folder {d.conditioning_data_dir!r} "
                                 "not found")
        else:
            with_masks(scan, lambda it: mask_folder(root, it), "conditioning_data_dir")
    elif d.masked_loss and not d.alpha_mask:
        scan.problems.append("masked_loss = true but no masks: set conditioning_data_dir (a "
                             "folder of mask images named like the training images) or "
                             "alpha_mask = true")
    elif d.conditioning_data_dir:
        scan.warnings.append("conditioning_data_dir is used only with masked_loss = true; "
                             "it is ignored")
    return [(options, scan)], source, []


def mask_folder(root: Path, item: Item) -> Path:
    """Where a train_data_dir image's mask is: the same-named subfolder of
    conditioning_data_dir when it exists (kohya's N_name folders), else the folder itself."""
    sub = root / Path(item.image).parent.name
    return sub if sub.is_dir() else root


def with_masks(scan: Scan, folder_of, label: str) -> None:
    """Set each training item's mask image (library/data/masks.py); problems and warnings
    go to the scan."""
    scan.items, problems, warnings = attach_masks(scan.items, folder_of, label)
    scan.problems += problems
    scan.warnings += warnings


def prepare_data(d, resolution: tuple[int, int], cli_keys=()) -> PreparedData:
    """Scan and check the data of the [dataset] section `d` (no seed needed, nothing built).

    `resolution` is the resolved main resolution (config or the family's native size).
    Problems are collected, not raised (except a bad dataset TOML, as ConfigError), so the
    caller can list them all.
    """
    found, source, warnings = scan_datasets(d, tuple(resolution), cli_keys)
    out = PreparedData(source=source, warnings=list(warnings))
    for options, scan in found:
        out.warnings += scan.warnings
        out.problems += scan.problems  # the images are still checked: report all at once
        items, sizes, bad, skipped = check_items(scan.items, options, d.skip_bad_images,
                                                 check_size=not dataset_option_errors(options))
        out.problems += bad
        out.warnings += skipped
        sized = mask_size_problems(items, sizes)
        out.problems += sized
        if scan.problems or bad or sized:
            continue
        if not any(not i.is_reg for i in items):
            out.problems.append(f"{source}: no usable training images left (every one was "
                                "skipped as bad); fix or replace the images listed above")
            continue
        out.datasets.append(Checked(options, scan, items, sizes))
    if getattr(d, "weighted_captions", False):
        out.warnings += weighted_caption_warnings(out.items)
    if (d.cache_latents or d.cache_latents_to_disk) and any(
            i.opts.random_crop for i in out.items):
        out.warnings.append("random_crop is ignored with cache_latents: each latent is "
                            "encoded once, from the centre crop (turn caching off to crop "
                            "at random)")
    return out


def build_group(data: PreparedData, seed, *, world: int = 1, hold_out=None
                ) -> tuple[DataGroup, list[Item]]:
    """(the DataGroup, held-out items) of checked data.

    `hold_out(items, options) -> (kept, held_out)` takes validation images out of each
    dataset (`options`: its DataOptions, with a dataset TOML's validation_split) before
    kohya's reg balancing (so reg matches the images that really train). With `world`
    processes a global batch is `world` times the per-process batch size (each process
    trains its shard of it).
    """
    built, held = [], []
    for k, c in enumerate(data.datasets):
        items = c.items
        if hold_out is not None:
            items, out = hold_out(items, c.options)
            held += out
        size_of = {it.image: s for it, s in zip(c.items, c.sizes)}
        items = balance_reg(items)
        options = replace(c.options, batch_size=c.options.batch_size * world)
        built.append(DataSet(items, options, dataset_seed(seed, k),
                             [size_of[it.image] for it in items]))
    return DataGroup(built, seed), held


def validation_set(items: list[Item], options: DataOptions, seed) -> DataSet:
    """A DataSet of held-out images without augmentation: centre crop, no flip, captions
    as written (no shuffle, dropout or warmup), batch size 1 (validation_loss scores them
    one at a time)."""
    plain = [replace(i, repeats=1, opts=replace(
        i.opts, shuffle_caption=False, caption_dropout_rate=0.0,
        caption_dropout_every_n_epochs=0, caption_tag_dropout_rate=0.0, token_warmup_step=0,
        flip_aug=False, random_crop=False)) for i in items]
    return DataSet(plain, replace(options, batch_size=1), seed)


def weighted_caption_warnings(items: list[Item]) -> list[str]:
    """weighted_captions with shuffle_caption or tag dropout: a caption separator inside
    ( ) or [ ] splits a bracket from its partner when tags move or drop, and the weights go
    wrong. sd-scripts allows the combination and documents "no commas inside brackets";
    we name the captions that break that rule."""
    from library.models.prompt_weights import has_comma_in_brackets
    bad = [it for it in items
           if (it.opts.shuffle_caption or it.opts.caption_tag_dropout_rate > 0)
           and has_comma_in_brackets(it.caption, it.opts.caption_separator.strip() or ",")]
    if not bad:
        return []
    names = ", ".join(str(it.image) for it in bad[:3]) + (", ..." if len(bad) > 3 else "")
    return [f"weighted_captions with shuffle_caption / caption_tag_dropout_rate: {len(bad)} "
            f"caption(s) have a separator inside ( ) or [ ], so shuffling splits their "
            f"brackets and the weights go wrong ({names}); keep each weighted group "
            "between two separators, e.g. \"(red hair:1.2), smile\""]
