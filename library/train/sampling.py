"""Sample images during training (docs/SAMPLING.md).

`Sampler.maybe_sample(step, epoch, ...)` is called by the loop after every optimizer step,
after every epoch and once before training; it decides from the `[sample]` config whether
images are due, renders them with a diffusers pipeline over the training components, writes
PNGs (A1111 `parameters` text chunk) to `<output_dir>/sample/` and a grid to TensorBoard.

The LoRA is applied exactly as it would be saved: its weights are rounded to
`save_precision` for the duration of sampling, at multiplier 1.0 and in eval mode. Sampling
never changes the training run: RNG states (torch CPU/CUDA, python, numpy), module modes and the
exact fp32 LoRA weights are restored afterwards, and the pipeline draws its noise from its own
`torch.Generator`s.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from library.durable import tmp_path
from library.train import samplers
from library.train.speed import eager
from library.train.prompts import DEFAULT_SCALE, DEFAULT_STEPS, PromptSpec, \
    a1111_parameters, load_prompts

log = logging.getLogger("tomlora")


# ---- prompts from the config ---------------------------------------------------------------
def sample_prompts(cfg, native_resolution: int, seed: int) -> list[PromptSpec]:
    """The prompts of `sample_prompts` (empty without a file); ValueError on a bad file."""
    s = cfg.sample
    if s.sample_prompts or s.validation_prompt:
        samplers.canonical(s.sample_sampler)  # a sampler whose package is missing fails here
    if not s.sample_prompts:
        return []
    return load_prompts(s.sample_prompts, width=native_resolution, height=native_resolution,
                        sampler=s.sample_sampler, base_seed=seed)


def validation_prompts(cfg, native_resolution: int, seed: int) -> list[PromptSpec]:
    """diffusers-script flags: `validation_prompt` x `num_validation_images`, seeds
    seed..seed+N-1."""
    s = cfg.sample
    if not s.validation_prompt:
        return []
    return [PromptSpec(s.validation_prompt, "", native_resolution, native_resolution, seed + i,
                       DEFAULT_SCALE, DEFAULT_STEPS, samplers.canonical(s.sample_sampler))
            for i in range(s.num_validation_images)]


# ---- rendering (shared with tools/generate.py) ---------------------------------------------
def encoding_options(cfg) -> dict:
    """How the run encodes captions, for prompts: the same clip_skip, chunking and
    weighting as training."""
    return dict(clip_skip=cfg.model.clip_skip, max_token_length=cfg.model.max_token_length,
                weighted=cfg.dataset.weighted_captions)


def make_pipeline(c):
    """A diffusers pipeline over loaded components and the base scheduler config for
    `samplers.make_scheduler`. The pipeline gets its own scheduler copy: pipeline constructors
    may rewrite the scheduler config, and the training noise scheduler must stay untouched.
    `clip_sample` is off, as in the released SD1.5/SDXL scheduler configs (DDPMScheduler's
    class default is on, and the SD pipeline would switch it off with a warning)."""
    config = c.noise_scheduler.config
    sched = type(c.noise_scheduler).from_config(
        config, **({"clip_sample": False} if "clip_sample" in config else {}))
    pipe = c.family.pipeline(dataclasses.replace(c, noise_scheduler=sched))
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(pipe.scheduler.config)


@torch.no_grad()
def prompt_embeds(c, spec: PromptSpec, *, clip_skip: int = 1, max_token_length: int = 75,
                  weighted: bool = False) -> dict:
    """The pipeline's embedding arguments for one prompt and its negative prompt, encoded by
    the family's own `encode_prompts` exactly as training encodes captions (clip_skip,
    max_token_length chunks, weighted captions). The pipelines' own prompt encoding is never
    used: it does not know kohya's clip_skip, chunking or weighting."""
    def encode(text: str) -> dict:
        return c.family.encode_prompts(c, [text], clip_skip, max_token_length, weighted)
    negative = spec.negative_prompt or ""
    return c.family.pipeline_inputs(encode(spec.prompt), encode(negative), not negative)


@torch.no_grad()
def render(pipe, base_config: dict, spec: PromptSpec, seeds: list[int], c, *,
           clip_skip: int = 1, max_token_length: int = 75, weighted: bool = False
           ) -> np.ndarray:
    """Images of one prompt, one per seed: float32 [B, H, W, 3] in [0, 1]. `c` are the
    components `pipe` was made from (their family encodes the prompts). Noise comes from a
    CPU generator per image, so a seed gives the same image on every device and batch size."""
    pipe.scheduler = samplers.make_scheduler(spec.sampler, base_config)
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    kwargs = dict(num_inference_steps=spec.steps, guidance_scale=spec.scale,
                  width=spec.width, height=spec.height, num_images_per_prompt=len(gens),
                  generator=gens if len(gens) > 1 else gens[0], output_type="latent",
                  **prompt_embeds(c, spec, clip_skip=clip_skip,
                                  max_token_length=max_token_length, weighted=weighted))
    latents = pipe(**kwargs).images
    # Decode here, in the VAE's own dtype: the UNet may run in fp16/bf16 while the VAE is
    # kept in fp32 (no_half_vae, SDXL), which the pipelines do not all handle.
    vae = pipe.vae
    latents = latents.to(vae.device, vae.dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std",
                                                                     None)
    if mean is not None and std is not None:
        view = (1, len(mean), 1, 1)
        mean = torch.tensor(mean).view(view).to(latents)
        std = torch.tensor(std).view(view).to(latents)
        latents = latents * std / vae.config.scaling_factor + mean
    else:
        latents = latents / vae.config.scaling_factor
    image = vae.decode(latents, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="np").astype(np.float32)


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """As diffusers' numpy_to_pil: round(x * 255)."""
    return (arr * 255).round().clip(0, 255).astype(np.uint8)


def save_png(arr: np.ndarray, path: Path, parameters: str) -> Path:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text("parameters", parameters)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)  # removed by the next run if a kill strikes here
    Image.fromarray(arr if arr.dtype == np.uint8 else to_uint8(arr)).save(
        tmp, format="PNG", pnginfo=info)
    tmp.replace(path)
    return path


def grid(images: list[np.ndarray]) -> np.ndarray:
    """uint8 HWC images of any sizes -> one uint8 HWC grid (near-square, black padding)."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    h = max(a.shape[0] for a in images)
    w = max(a.shape[1] for a in images)
    out = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i, a in enumerate(images):
        r, c = divmod(i, cols)
        out[r * h:r * h + a.shape[0], c * w:c * w + a.shape[1]] = a
    return out


# ---- state that sampling must not disturb --------------------------------------------------
@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    py, npy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


@contextlib.contextmanager
def eval_modes(roots: list) -> Iterator[None]:
    modes = [(m, m.training) for root in roots for m in root.modules()]
    for root in roots:
        root.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def lora_as_saved(network, dtype: torch.dtype) -> Iterator[None]:
    """The network with its weights rounded as `save_lora` writes them (kohya_state_dict in
    `dtype`, read back), at multiplier 1.0; the exact training weights come back afterwards."""
    tensors = list(network.parameters()) + list(network.buffers())
    backup = [t.detach().clone() for t in tensors]
    attrs = [(m, m.multiplier, m.scale) for m in network]
    try:
        network.load_kohya_state_dict(network.kohya_state_dict(dtype), "sampling")
        network.set_multiplier(1.0)
        yield
    finally:
        with torch.no_grad():
            for t, b in zip(tensors, backup):
                t.copy_(b)
        for m, multiplier, scale in attrs:
            m.multiplier, m.scale = multiplier, scale


# ---- the sampler the training loop calls ---------------------------------------------------
def due(s, step: int, epoch: int, *, epoch_end: bool = False, first: bool = False
        ) -> tuple[bool, bool]:
    """(prompt file due, validation prompt due) for the `[sample]` config `s`. kohya's rules
    for the prompt file: sample_at_first at step 0, then every N epochs at epoch ends or,
    when no epoch interval is set, every N steps. The diffusers scripts' rule for
    validation_prompt: at the end of every validation_epochs-th epoch (default every epoch)."""
    if first:
        return bool(s.sample_at_first), bool(s.sample_at_first)
    if epoch_end:
        every = s.sample_every_n_epochs
        return bool(every) and epoch % every == 0, epoch % (s.validation_epochs or 1) == 0
    every = s.sample_every_n_steps
    return not s.sample_every_n_epochs and bool(every) and step % every == 0, False


class Sampler:
    def __init__(self, components, family, network, cfg, output_dir, tracker, device,
                 weight_dtype, seed: int, prompts: list[PromptSpec] | None = None, ema=None):
        from library.train.saving import SAVE_DTYPES
        self.c, self.family, self.network, self.cfg = components, family, network, cfg
        self.dir = Path(output_dir) / "sample"
        self.tracker, self.device, self.weight_dtype = tracker, device, weight_dtype
        native = family.native_resolution
        self.prompts = sample_prompts(cfg, native, seed) if prompts is None else prompts
        self.validation = validation_prompts(cfg, native, seed)
        self.save_dtype = SAVE_DTYPES[cfg.saving.save_precision]
        self.ema = ema  # with ema_decay, samples show the EMA of the weights, as saved
        self._pipe = None
        s = cfg.sample
        from accelerate import PartialState
        self.enabled = PartialState().is_main_process
        scheduled = s.sample_every_n_steps or s.sample_every_n_epochs or s.sample_at_first
        if scheduled and not self.prompts and not self.validation:
            log.warning("sampling is scheduled but there are no prompts: set sample_prompts "
                        "(or validation_prompt); no samples will be written")
        elif self.prompts and not scheduled:
            log.warning("sample_prompts is set but no sample_every_n_steps, "
                        "sample_every_n_epochs or sample_at_first: no samples will be written")

    def due(self, step: int, epoch: int, *, epoch_end: bool = False, first: bool = False
            ) -> list[tuple[int, PromptSpec]]:
        """(index, prompt) pairs to render now; the index is fixed per prompt (file prompts
        first, then validation images), so file names line up across a run."""
        use_file, use_val = due(self.cfg.sample, step, epoch, epoch_end=epoch_end, first=first)
        indexed = list(enumerate(self.prompts + self.validation))
        n = len(self.prompts)
        return [(i, p) for i, p in indexed if (use_file if i < n else use_val)]

    def maybe_sample(self, step: int, epoch: int, *, epoch_end: bool = False,
                     first: bool = False) -> list[Path]:
        todo = self.due(step, epoch, epoch_end=epoch_end, first=first)
        if not todo or not self.enabled:
            return []
        c = self.c
        roots = [self.network, c.unet, c.vae, *c.text_encoders]
        paths, images = [], []
        averaged = self.ema.applied() if self.ema is not None else contextlib.nullcontext()
        with preserved_rng(), eval_modes(roots), averaged, \
                lora_as_saved(self.network, self.save_dtype), eager():  # compiled blocks (compile = true) run eagerly here
            if self._pipe is None:
                self._pipe = make_pipeline(c)
            pipe, base_config = self._pipe
            for index, spec in todo:
                arr = to_uint8(render(pipe, base_config, spec, [spec.seed], c,
                                      **encoding_options(self.cfg))[0])
                name = self.cfg.saving.output_name
                path = self.dir / f"{name}_s{step:06d}_e{epoch:03d}_{index:02d}.png"
                text = a1111_parameters(spec, Path(c.model_path).name,
                                        {"LoRA": name, "LoRA step": step})
                paths.append(save_png(arr, path, text))
                images.append(arr)
        self.tracker.image("samples", grid(images), step)
        log.info(f"{len(paths)} sample image(s) at step {step}: {self.dir}")
        return paths
