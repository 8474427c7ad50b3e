"""Pre-flight checks of the data, and the plan printed before training."""
from __future__ import annotations

from library.data.buckets import bucket_histogram
from library.data.images import ImageError, load_image
from library.data.sources import Item, Scan


def check_images(items: list[Item], skip_bad: bool) -> tuple[list[Item], list[str]]:
    """Decode every image once. Returns (usable items, fatal problems); with `skip_bad` the
    bad images are dropped with a warning instead of being fatal."""
    good, bad = [], []
    seen: dict = {}
    for it in items:
        if it.image not in seen:
            try:
                load_image(it.image)
                seen[it.image] = None
            except ImageError as e:
                seen[it.image] = str(e)
        if seen[it.image] is None:
            good.append(it)
        else:
            bad.append(seen[it.image])
    bad = list(dict.fromkeys(bad))
    if bad and skip_bad:
        import logging
        for b in bad:
            logging.getLogger("tomlora").warning(f"skipped (skip_bad_images): {b}")
        return good, []
    if bad:
        bad.append("fix or remove these images, or set skip_bad_images = true to train "
                   "without them")
    return good, bad


def describe_plan(scan: Scan, dataset, steps_per_epoch: int, total_steps: int,
                  accum: int) -> str:
    lines = ["Data plan:"]
    for f in scan.folders:
        kind = "reg  " if f.is_reg else "train"
        lines.append(f"  {kind} {f.folder!r}: {f.images} images x {f.repeats} repeats, "
                     f"{f.captions} with captions")
    reg = sum(i.repeats for i in dataset.items if i.is_reg)
    lines.append(f"  samples per epoch: {len(dataset)}" + (f" (of which {reg} regularization, "
                                                          "balanced)" if reg else ""))
    hist = bucket_histogram(b for b, n in zip(dataset.buckets, dataset.repeats)
                            for _ in range(n))
    lines.append("  buckets: " + ", ".join(f"{w}x{h}: {n}" for (w, h), n in hist.items()))
    lines.append(f"  batches per epoch: {dataset.steps_per_epoch()} "
                 f"(batch size {dataset.o.batch_size}); optimizer steps per epoch: "
                 f"{steps_per_epoch} (gradient accumulation {accum})")
    epochs = -(-total_steps // max(steps_per_epoch, 1))
    lines.append(f"  total: {total_steps} steps = {epochs} epoch(s)")
    return "\n".join(lines)
