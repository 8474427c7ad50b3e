"""Pre-flight checks of the data, and the plan printed before training (`--dry_run` stops
after it).

Fatal findings (every one listed, then exit 2 before any model loads):
* an image that cannot be used: missing, empty (0 bytes), not an image, truncated or
  damaged (every image is fully decoded once, so a bad file fails here, not at step 900);
* an image too small for the settings (``too_small``):
  - with buckets, upscaling allowed: its shorter side is below `min_bucket_reso`, the
    smallest side any bucket has, so every bucket would have to enlarge it;
  - with buckets and `bucket_no_upscale`: a side below `bucket_reso_steps` (no bucket can
    be cut from it without upscaling);
  - without buckets and with `bucket_no_upscale`: smaller than `resolution` in width or
    height (the diffusers-style resize to cover `resolution` would have to upscale it).
  Without buckets and without `bucket_no_upscale`, images are scaled up as the diffusers
  scripts do, and no size is too small;
* no training images at all (reported by the scanners).
`skip_bad_images = true` turns the image findings into warnings and trains without them.
"""
from __future__ import annotations

from library.data import buckets as B
from library.data.images import ImageError, load_image
from library.data.options import DataOptions
from library.data.sources import Item


def too_small(size: tuple[int, int], o: DataOptions) -> str | None:
    """Why an image of `size` (w, h) cannot train under `o`, or None (see module doc)."""
    w, h = size
    if o.enable_bucket and o.bucket_no_upscale:
        if min(w, h) < o.bucket_reso_steps:
            return (f"{w}x{h} is too small: with bucket_no_upscale a side must be at least "
                    f"bucket_reso_steps = {o.bucket_reso_steps} pixels")
    elif o.enable_bucket:
        lo = o.min_bucket_reso or B.default_min_bucket_reso(o.resolution, o.bucket_reso_steps)
        if min(w, h) < lo:
            return (f"{w}x{h} is below the smallest bucket: its shorter side is under "
                    f"min_bucket_reso = {lo}, so every bucket would upscale it; use a larger "
                    "image, or lower min_bucket_reso")
    elif o.bucket_no_upscale and (w < o.resolution[0] or h < o.resolution[1]):
        return (f"{w}x{h} is smaller than resolution {o.resolution[0]}x{o.resolution[1]} and "
                "bucket_no_upscale forbids upscaling; use a larger image, a lower resolution, "
                "or enable_bucket")
    return None


def check_items(items: list[Item], o: DataOptions, skip_bad: bool, check_size: bool = True
                ) -> tuple[list[Item], list[tuple[int, int]], list[str], list[str]]:
    """Decode every image once and check its size (unless `check_size` is off, as when the
    bucket settings themselves are wrong and sizes cannot be judged).

    Returns (usable items, their sizes (w, h) after EXIF rotation, fatal problems,
    warnings). With `skip_bad` the bad images are dropped with a warning instead.
    """
    verdict: dict = {}  # image path -> size or the problem
    for it in items:
        if it.image in verdict:
            continue
        try:
            with load_image(it.image) as img:
                size = img.size
        except ImageError as e:
            verdict[it.image] = str(e)
            continue
        reason = too_small(size, o) if check_size else None
        verdict[it.image] = f"{it.image}: {reason}" if reason else size
    good = [it for it in items if isinstance(verdict[it.image], tuple)]
    sizes = [verdict[it.image] for it in good]
    bad = list(dict.fromkeys(v for v in verdict.values() if isinstance(v, str)))
    if not bad:
        return good, sizes, [], []
    if skip_bad:
        return good, sizes, [], [f"skipped (skip_bad_images): {b}" for b in bad]
    return good, sizes, bad + ["fix or remove these images, or set skip_bad_images = true "
                               "to train without them"], []


def check_images(items: list[Item], skip_bad: bool, o: DataOptions | None = None
                 ) -> tuple[list[Item], list[str]]:
    """(usable items, fatal problems): ``check_items`` without sizes; without options only
    decoding is checked (no size is too small)."""
    o = o or DataOptions(resolution=(8, 8), batch_size=1)
    good, _, problems, skipped = check_items(items, o, skip_bad)
    import logging
    for w in skipped:
        logging.getLogger("tomlora").warning(w)
    return good, problems


def describe_plan(data, group, steps_per_epoch: int, total_steps: int, accum: int) -> str:
    """The doctor's report: folders, repeats, reg balance, buckets, batches and steps.

    `data` is a ``prepare.PreparedData``, `group` the DataGroup built from it.
    """
    lines = [f"Data plan ({data.source}):"]
    for label, scan, ds in zip(data.labels, data.scans, group.datasets):
        o = ds.o
        geometry = f"resolution {o.resolution[0]}x{o.resolution[1]}, batch size {o.batch_size}"
        if o.enable_bucket:
            lo = o.min_bucket_reso or B.default_min_bucket_reso(o.resolution,
                                                                o.bucket_reso_steps)
            hi = o.max_bucket_reso or B.default_max_bucket_reso(o.resolution,
                                                                o.bucket_reso_steps)
            geometry += (f", buckets {lo}..{hi} step {o.bucket_reso_steps}"
                         + (", no upscale" if o.bucket_no_upscale else ""))
        else:
            geometry += ", no buckets (resize to cover, then crop)"
        lines.append(f"  {label}: {geometry}")
        lines += _folder_lines(scan, ds)
        train = sum(i.repeats for i in ds.items if not i.is_reg)
        reg = sum(i.repeats for i in ds.items if i.is_reg)
        balance = (f" ({reg} regularization, balanced to the {train} training samples, "
                   f"weight {o.prior_loss_weight:g})" if reg else "")
        lines.append(f"    samples per epoch: {len(ds)}{balance}")
        hist = B.bucket_histogram(b for b, n in zip(ds.buckets, ds.repeats) for _ in range(n))
        per_bucket = {b: -(-n // o.batch_size) for b, n in hist.items()}
        lines.append("    buckets (samples -> batches): " + ", ".join(
            f"{w}x{h}: {n} -> {per_bucket[(w, h)]}" for (w, h), n in hist.items()))
        lines.append(f"    batches per epoch: {ds.steps_per_epoch()}")
    batches = group.steps_per_epoch()
    lines.append(f"  optimizer steps per epoch: ceil({batches} batches / gradient "
                 f"accumulation {accum}) = {steps_per_epoch}")
    epochs = -(-total_steps // max(steps_per_epoch, 1))
    lines.append(f"  total: {total_steps} steps = {epochs} epoch(s)")
    return "\n".join(lines)


def _folder_lines(scan, ds) -> list[str]:
    lines = []
    width = max((len(f.folder) for f in scan.folders), default=0)
    for f in scan.folders:
        used = [i for i in ds.items if i.source == f.source and i.is_reg == f.is_reg]
        samples = sum(i.repeats for i in used)
        kind = "reg  " if f.is_reg else "train"
        line = (f"    {kind} {f.folder:<{width}}  {f.images:>4} images x {f.repeats:>3} repeats"
                f" = {f.images * f.repeats} samples, {f.captions} with captions")
        if f.is_reg and samples != f.images * f.repeats:
            line += f"; balanced to {samples} samples"
        if len(used) < f.images:  # skipped as bad, or reg images past the balance
            line += f"; {f.images - len(used)} images unused"
        lines.append(line)
    return lines
