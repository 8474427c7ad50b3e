"""TensorBoard logging and the running loss average shown in the progress bar."""
from __future__ import annotations

import datetime as dt
from collections import deque
from pathlib import Path


class LossAverage:
    """Mean of the last `window` step losses (kohya shows the mean over one epoch)."""

    def __init__(self, window: int):
        self.values: deque[float] = deque(maxlen=max(1, window))

    def add(self, v: float) -> float:
        self.values.append(v)
        return self.mean

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values) if self.values else float("nan")


def run_dir(logging_dir: str, output_name: str, prefix: str | None, name: str | None) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(logging_dir) / (name or f"{prefix or ''}{output_name}_{stamp}")


def wandb_run_name(configured: str | None, directory: Path) -> str:
    """The wandb run's name: `wandb_run_name` when set (sd-scripts), else the TensorBoard run
    folder's name, so both loggers name a run alike."""
    return configured or directory.name


class Tracker:
    """TensorBoard (and optionally Weights & Biases) on the main process; a no-op elsewhere.

    `log_with`: "tensorboard", "wandb" or "all". wandb is an optional package; the config
    check asks for it before training starts. `wandb_key` (wandb_api_key) logs in first, as
    sd-scripts does; without it wandb uses the key of `wandb login` or WANDB_API_KEY."""

    def __init__(self, directory: Path | None, config_text: str = "", log_with: str =
                 "tensorboard", project: str = "tomlora", config: dict | None = None, *,
                 wandb_name: str | None = None, wandb_key: str | None = None):
        self.writer = None
        self.wandb = None
        self.directory = directory
        if directory is None:
            return
        directory.mkdir(parents=True, exist_ok=True)
        if log_with in ("tensorboard", "all"):
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(directory))
            if config_text:
                self.writer.add_text("config", "```\n" + config_text + "\n```", 0)
        if log_with in ("wandb", "all"):
            import wandb
            if wandb_key:
                wandb.login(key=wandb_key)
            self.wandb = wandb.init(project=project, name=wandb_run_name(wandb_name, directory),
                                    dir=str(directory), config=config or {})

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(dict(values), step=step)

    def image(self, tag: str, array_hwc_uint8, step: int) -> None:
        """One uint8 HWC image (e.g. a grid of samples) under `tag`."""
        if self.writer:
            self.writer.add_image(tag, array_hwc_uint8, step, dataformats="HWC")
        if self.wandb:
            import wandb
            self.wandb.log({tag: wandb.Image(array_hwc_uint8)}, step=step)

    def close(self) -> None:
        if self.writer:
            self.writer.flush()
            self.writer.close()
        if self.wandb:
            self.wandb.finish()


def lr_scalars(optimizer) -> dict[str, float]:
    """lr/unet, lr/textencoder (lr/textencoder2 for SDXL's second encoder) and, for
    adaptive optimizers (Prodigy, D-Adaptation), lr/d*lr."""
    names = {"lora_unet": "lr/unet", "lora_te": "lr/textencoder", "lora_te1": "lr/textencoder",
             "lora_te2": "lr/textencoder2"}
    out = {}
    for g in optimizer.param_groups:
        name = names.get(str(g.get("name", "")).split("/")[0], f"lr/{g.get('name', 'group')}")
        out.setdefault(name, g["lr"])
        if "d" in g:
            out.setdefault(name.replace("lr/", "lr/d*lr/"), g["d"] * g["lr"])
    return out


def step_scalars(grad_norm, images_done: int, elapsed: float) -> dict[str, float]:
    import torch
    out = {"perf/images_per_s": images_done / elapsed if elapsed > 0 else 0.0}
    if grad_norm is not None:
        out["grad_norm"] = float(grad_norm)
    if torch.cuda.is_available():
        out["perf/peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out
