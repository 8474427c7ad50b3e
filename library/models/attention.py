"""Attention kernels and storage precision of the frozen UNet.

- SDPA (torch scaled_dot_product_attention) by default: as fast as xformers on torch 2 and
  needs nothing extra.
- `xformers = true`: xformers' memory-efficient attention, when the package is installed
  (requirements-gpu.txt); checked before any model loads. It is CUDA-only: on a CPU run it
  falls back to SDPA with a warning, as `mixed_precision` falls back to fp32.
- `fp8_base = true`: the UNet's Linear/Conv2d weights are stored as float8_e4m3fn and upcast
  per layer to the training dtype (bf16 under `mixed_precision = "bf16"`) in each forward;
  norms, biases, conv_in and conv_out stay in the training dtype. At rest the UNet weights
  take half the memory of bf16 (as kohya's fp8_base; the upcast copies live only while
  autograd needs them). CUDA-only; on CPU it is skipped with a warning. It must run before
  the LoRA attaches: LoRA then wraps the upcasting forward.
"""
from __future__ import annotations

import importlib.util
import logging

import torch
import torch.nn.functional as F
from torch import nn

from library.models.errors import ModelLoadError

log = logging.getLogger("tomlora")
FP8 = torch.float8_e4m3fn


def check_xformers(model_cfg) -> None:
    """Pre-flight: `xformers = true` needs the package."""
    if model_cfg.xformers and importlib.util.find_spec("xformers") is None:
        raise ModelLoadError(
            "xformers: set to true, but the xformers package is not installed. Install it "
            "on the CUDA machine with `pip install -r requirements-gpu.txt` (or `pip install "
            "xformers` built for your torch version), or remove the key: PyTorch SDPA, the "
            "default, is about as fast on torch 2.")


# Kept in the training dtype: the first and last layers are small and precision-critical,
# and diffusers reads `unet.dtype` from the first parameter (conv_in.weight).
FP8_KEEP = ("conv_in", "conv_out")


def _upcasting_forward(module: nn.Module, compute_dtype: torch.dtype):
    """forward() that upcasts the stored weight into a temporary tensor. (diffusers'
    layerwise casting instead re-casts the parameter in place after the forward, which
    breaks backward: autograd then finds the float8 tensor it saved.)"""
    def forward(x, *args, **kwargs):
        w = module.weight.to(compute_dtype)
        b = module.bias.to(compute_dtype) if module.bias is not None else None
        if isinstance(module, nn.Linear):
            return F.linear(x, w, b)
        return module._conv_forward(x, w, b)
    return forward


def store_fp8(unet, compute_dtype: torch.dtype) -> int:
    """Frozen UNet Linear/Conv2d weights stored in float8_e4m3fn, computed in
    `compute_dtype`; returns how many layers. Must run before the LoRA attaches (it then
    wraps this forward)."""
    n = 0
    for name, module in unet.named_modules():
        if type(module) in (nn.Linear, nn.Conv2d) and name not in FP8_KEEP:
            module.weight.requires_grad_(False)
            module.weight.data = module.weight.data.to(FP8)
            module.forward = _upcasting_forward(module, compute_dtype)
            n += 1
    return n


def configure_attention_and_storage(c, model_cfg, device, weight_dtype: torch.dtype
                                    ) -> list[str]:
    """Apply `xformers` / `sdpa` / `fp8_base` to the loaded UNet (on `device` already).
    Returns what was set up, for the log."""
    on_gpu = torch.device(device).type == "cuda"
    done = []
    use_xformers = model_cfg.xformers
    if use_xformers:
        check_xformers(model_cfg)
        if on_gpu:
            c.unet.enable_xformers_memory_efficient_attention()
            done.append("xformers attention")
        else:
            log.warning("xformers = true needs a CUDA GPU; using PyTorch SDPA on CPU")
            use_xformers = False
    if not use_xformers and model_cfg.sdpa:
        from diffusers.models.attention_processor import AttnProcessor2_0
        c.unet.set_attn_processor(AttnProcessor2_0())
        done.append("SDPA attention")
    if model_cfg.fp8_base:
        if on_gpu:
            n = store_fp8(c.unet, weight_dtype)
            done.append(f"UNet weights of {n} layers in float8_e4m3fn, computed in "
                        f"{weight_dtype}")
        else:
            log.warning("fp8_base = true needs a CUDA GPU; the UNet keeps its "
                        f"{weight_dtype} weights on CPU")
    return done
