"""fp8 storage of the frozen UNet (`fp8_base = true`).

`store_fp8` stores the UNet's Linear/Conv2d weights as float8_e4m3fn (1 byte a weight, half of
bf16) and replaces each layer's forward; norms, biases, conv_in and conv_out stay in the
training dtype. Each forward upcasts the fp8 weight to the compute dtype in a temporary tensor
and computes the layer in that dtype, as before.

What autograd keeps for the backward is the point. The base is frozen, so the backward of a
base layer only needs the gradient with respect to its input: grad_out @ W (Linear), or the
transposed convolution of grad_out with W (Conv2d). Run through plain F.linear / F.conv2d,
autograd would save the *upcast* weight for that until the backward reaches the layer (and
F.conv2d the layer's input too), so the bf16 copies of all layers would be alive at the peak,
beside the fp8 ones. The layers here run through `FP8Linear` / `FP8Conv2d`, custom autograd
functions that save only the fp8 weight (a tensor that exists anyway: no extra memory) and the
input's shape, and upcast the weight again in the backward. The cost is one more fp8->bf16
cast per layer in the backward.

- Gradients: with respect to the input only. The weight and bias must stay frozen
  (store_fp8 sets requires_grad False on both; a layer whose weight or bias requires a
  gradient is an error at its forward).
- Dtypes: the weight is upcast to `compute_dtype`; under torch.autocast the matmul or
  convolution in the forward is cast by autocast exactly as F.linear / F.conv2d would be (an
  fp32 input under bf16 autocast is computed in bf16). The backward computes in the dtype of
  the incoming gradient (the output's dtype) and returns the input gradient in the input's
  dtype, as autograd does for the autocast cast.
- Gradient checkpointing (torch.utils.checkpoint), CUDA graph capture and torch.compile: the
  functions have no host syncs or data-dependent Python; dynamo traces them (forward and
  backward) into the compiled blocks.
- A Conv2d with a padding_mode other than 'zeros' or a string padding ('same') keeps the
  plain upcasting forward (`_upcasting_forward`), which autograd differentiates itself.

It must run before the LoRA attaches: LoRA (networks/lora.py) then wraps this forward.
`store_fp8(..., upcast_in_backward=False)` gives the plain path everywhere (for
comparisons: tests, benchmarks).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn

# Kept in the training dtype: the first and last layers are small and precision-critical,
# and diffusers reads `unet.dtype` from the first parameter (conv_in.weight).
FP8_KEEP = ("conv_in", "conv_out")


class FP8Linear(torch.autograd.Function):
    """y = x @ W.T + b with W stored in fp8; saves only W (fp8) for grad_x = grad_y @ W."""

    @staticmethod
    def forward(ctx, x, weight, bias, compute_dtype):
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        ctx.save_for_backward(weight)
        ctx.x_dtype = x.dtype
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        # (..., out) @ (out, in) -> (..., in), for any leading dims
        grad_x = grad_out.matmul(weight.to(grad_out.dtype))
        return grad_x.to(ctx.x_dtype), None, None, None


class FP8Conv2d(torch.autograd.Function):
    """Conv2d with W stored in fp8 (zero padding); saves only W (fp8) and the input's shape
    for grad_x (torch.nn.grad.conv2d_input, no input needed)."""

    @staticmethod
    def forward(ctx, x, weight, bias, compute_dtype, stride, padding, dilation, groups):
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        ctx.save_for_backward(weight)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.conv = (stride, padding, dilation, groups)
        return F.conv2d(x, w, b, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        grad_x = torch.nn.grad.conv2d_input(ctx.x_shape, weight.to(grad_out.dtype), grad_out,
                                            stride, padding, dilation, groups)
        return grad_x.to(ctx.x_dtype), None, None, None, None, None, None, None


def _upcasting_forward(module: nn.Module, compute_dtype: torch.dtype):
    """The plain path: forward() that upcasts the stored weight into a temporary tensor and
    lets autograd differentiate F.linear / the convolution (it then saves the upcast weight).
    (diffusers' layerwise casting instead re-casts the parameter in place after the forward,
    which breaks backward: autograd then finds the float8 tensor it saved.)"""
    def forward(x, *args, **kwargs):
        w = module.weight.to(compute_dtype)
        b = module.bias.to(compute_dtype) if module.bias is not None else None
        if isinstance(module, nn.Linear):
            return F.linear(x, w, b)
        return module._conv_forward(x, w, b)
    return forward


def _frozen_check(module: nn.Module) -> None:
    if module.weight.requires_grad or (module.bias is not None and module.bias.requires_grad):
        raise RuntimeError(
            f"fp8_base: a {type(module).__name__} stored in float8 is frozen, but its weight "
            "or bias requires a gradient (the fp8 autograd function computes the input "
            "gradient only)")


def fp8_forward(module: nn.Module, compute_dtype: torch.dtype):
    """forward() of an fp8-stored Linear/Conv2d through FP8Linear / FP8Conv2d (the plain
    upcasting forward for a Conv2d with non-zero padding modes or string padding)."""
    if isinstance(module, nn.Linear):
        def forward(x, *args, **kwargs):
            _frozen_check(module)
            return FP8Linear.apply(x, module.weight, module.bias, compute_dtype)
        return forward
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        return _upcasting_forward(module, compute_dtype)

    def forward(x, *args, **kwargs):  # noqa: F811  (the Conv2d one)
        _frozen_check(module)
        return FP8Conv2d.apply(x, module.weight, module.bias, compute_dtype, module.stride,
                               module.padding, module.dilation, module.groups)
    return forward


def store_fp8(unet, compute_dtype: torch.dtype, upcast_in_backward: bool = True) -> int:
    """Frozen UNet Linear/Conv2d weights stored in float8_e4m3fn, computed in
    `compute_dtype`; returns how many layers. Must run before the LoRA attaches (it then
    wraps this forward). `upcast_in_backward=False`: the plain upcasting forward, whose
    backward keeps the upcast weights (for comparisons)."""
    make = fp8_forward if upcast_in_backward else _upcasting_forward
    n = 0
    for name, module in unet.named_modules():
        if type(module) in (nn.Linear, nn.Conv2d) and name not in FP8_KEEP:
            module.weight.requires_grad_(False)
            if module.bias is not None:
                module.bias.requires_grad_(False)
            module.weight.data = module.weight.data.to(FP8)
            module.forward = make(module, compute_dtype)
            n += 1
    return n
