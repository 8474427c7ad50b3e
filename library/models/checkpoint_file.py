"""Reading single-file checkpoints (A1111/civitai LDM layout) and telling what they hold.

Only the key names and shapes are needed to tell SD1.5 from SDXL (and to name what else a
file is), so `.safetensors` headers are read without loading tensors. `.ckpt` files are
Python pickles: they load only with `allow_pickle = true`, and then with
`torch.load(weights_only=True)`, which refuses anything but tensors and plain containers.
"""
from __future__ import annotations

from pathlib import Path

import torch

from library.models.errors import ModelLoadError

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CHECKPOINT_SUFFIXES = SAFE_SUFFIXES + PICKLE_SUFFIXES

UNET_PREFIX = "model.diffusion_model."


def is_checkpoint_file(path: Path) -> bool:
    return path.suffix.lower() in CHECKPOINT_SUFFIXES


def check_pickle_allowed(path: Path, allow_pickle: bool, key: str) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise ModelLoadError(
            f"{key}: {path} is a pickle checkpoint ({path.suffix}), which can run code when "
            "loaded. Prefer a .safetensors version of the model; if you trust this file, set "
            "allow_pickle = true ([model]) and it is read with torch.load(weights_only=True).")


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    # Lightning / LDM checkpoints nest the weights under "state_dict".
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    import pickle
    try:
        try:  # zip-format checkpoints memory-map: reading keys costs no RAM
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (pre-zip) format cannot be mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelLoadError(
            f"{path}: torch.load(weights_only=True) refused it because it holds Python "
            f"objects besides tensors ({str(e).splitlines()[0]}). Convert it to .safetensors "
            "with a tool you trust, or use the model's .safetensors release.") from None
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot be read as a torch checkpoint ({e})") from None
    return _unwrap(obj, path)


def read_shapes(path: Path, allow_pickle: bool = False, key: str = "checkpoint"
                ) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of a checkpoint, without loading `.safetensors` tensors."""
    check_pickle_allowed(path, allow_pickle, key)
    if path.suffix.lower() in SAFE_SUFFIXES:
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:
            raise ModelLoadError(
                f"{key}: {path} is not a readable .safetensors file ({e}); a truncated "
                "download or an HTML error page saved under that name looks like this") \
                from None
    return {k: tuple(v.shape) for k, v in _torch_load(path).items()}


def read_state_dict(path: Path, allow_pickle: bool = False, key: str = "checkpoint"
                    ) -> dict[str, torch.Tensor]:
    check_pickle_allowed(path, allow_pickle, key)
    if path.suffix.lower() in SAFE_SUFFIXES:
        from safetensors.torch import load_file
        read_shapes(path, allow_pickle, key)  # a clear error for a damaged file
        return load_file(str(path))
    return _torch_load(path)


# ---- what is in the file ----------------------------------------------------------------
def _has(keys, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _contains(keys, part: str) -> bool:
    return any(part in k for k in keys)


def describe_other(keys) -> str:
    """A short name for a checkpoint that is not SD1.5/SDXL, for the error message."""
    if _contains(keys, "joint_blocks."):
        return "a Stable Diffusion 3 (MMDiT) checkpoint"
    if _contains(keys, "double_blocks.") and _contains(keys, "single_blocks."):
        return "a Flux checkpoint"
    if _contains(keys, "lora_down") or _contains(keys, ".lora_A.") or \
            _has(keys, "lora_unet_") or _has(keys, "lora_te"):
        return "a LoRA file, not a base model"
    if _has(keys, "encoder.down.") or _has(keys, "encoder.down_blocks."):
        return "a VAE on its own (set it as `vae`, not as the base model)"
    if _has(keys, "down_blocks.") and _has(keys, "mid_block."):
        return ("a diffusers-format UNet weights file (point pretrained_model_name_or_path at "
                "the whole diffusers folder instead)")
    if _contains(keys, "text_model.encoder.") or _contains(keys, "resblocks."):
        return "a text encoder on its own"
    sample = ", ".join(sorted(keys)[:3]) or "no tensors"
    return f"an unknown layout (first keys: {sample})"


def family_of_checkpoint(shapes: dict[str, tuple[int, ...]], path: Path) -> str:
    """"sd15" or "sdxl" from an LDM single file's keys; a clear error for anything else."""
    keys = shapes.keys()
    stem = f"pretrained_model_name_or_path: {path}"
    if not _has(keys, UNET_PREFIX + "input_blocks."):
        raise ModelLoadError(f"{stem}: found {describe_other(keys)}; tomlora trains LoRAs for "
                             "SD1.5 and SDXL checkpoints only")
    in_ch = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight", (0, 4))[1]
    if in_ch != 4:
        raise ModelLoadError(
            f"{stem}: its UNet takes {in_ch} input channels (an inpainting or instruct-pix2pix "
            "model); tomlora trains LoRAs on 4-channel text-to-image SD1.5/SDXL models")
    if _has(keys, "conditioner.embedders.1."):
        return "sdxl"
    if _has(keys, "conditioner.embedders.0.model."):
        raise ModelLoadError(f"{stem}: found an SDXL refiner (OpenCLIP encoder only); train "
                             "LoRAs on the SDXL base model")
    if _has(keys, "cond_stage_model.model."):
        raise ModelLoadError(
            f"{stem}: found a Stable Diffusion 2.x checkpoint (OpenCLIP ViT-H text encoder, "
            "1024-dim context); tomlora supports SD1.x and SDXL only")
    if _has(keys, "cond_stage_model.transformer."):
        return "sd15"
    raise ModelLoadError(f"{stem}: has UNet weights but no text encoder (a UNet-only file?); "
                         "use a full SD1.5/SDXL checkpoint")
