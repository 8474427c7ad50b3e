"""Speed toggles of the training step (docs/TRAINING.md "Speed", docs/BENCHMARKS.md).

- `compile = true`: regional torch.compile. Each transformer block (BasicTransformerBlock,
  which holds the attention and feed-forward layers and their LoRA modules) and each ResNet
  block of the UNet is compiled on its own, after the LoRA attaches, so the LoRA's extra
  matmuls, casts and scale are traced into the block's graph and fused with it. Blocks of the
  same class and shapes share one compiled graph (the LoRA modules' weights are graph inputs,
  not constants), so SDXL's 70 transformer blocks compile a handful of graphs, not 70.
  A new input shape (another bucket) compiles once more; the recompile limit is raised so
  that every bucket of a run is compiled rather than silently falling back to eager.
- `compile_mode`: torch.compile's mode. "reduce-overhead" also records CUDA graphs of the
  compiled blocks (one replay instead of dozens of kernel launches per block).
- `batch_qkv_lora = true`: the LoRA down projections of an attention layer's q, k and v
  (which read the same input) run as one matmul (networks.lora.SharedInputDown).
- `channels_last = true`: the UNet's weights and activations in NHWC layout, which cuDNN's
  bf16/fp16 convolutions prefer.
- `cuda_graphs = true`: the UNet's training forward and backward are captured once per input
  shape (torch.cuda.make_graphed_callables) and replayed: one launch instead of thousands of
  kernel launches, which is what bounds an eager LoRA step at small batches (the GPU idles
  most of the step; docs/BENCHMARKS.md). Noise, timesteps, the loss, the optimizer and the
  text encoders stay eager. Unset, it is on where the run allows it (library/train/fast_path.py
  decides and logs why). The captured shapes share one memory pool: each step replays one
  shape's forward and then its backward, so the activations of the largest shape are held
  once, plus each shape's static inputs, outputs and LoRA-gradient buffers. At most
  `cuda_graph_shapes` shapes are captured (the most frequent ones); the others run eagerly.
  Not with module_dropout (a per-step host decision); gradient checkpointing runs inside the
  graphs with its recompute in the captured backward (`checkpoint_inside_graphs`); CUDA only.

Sampling and validation run the same modules eagerly (`eager()`): they use other shapes and
no gradients, and compiling for them would cost more than it saves.
"""
from __future__ import annotations

import contextlib
import functools

import torch

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
# Enough for every bucket shape of a run (SDXL's ResNet blocks alone have ~16 shapes).
RECOMPILE_LIMIT = 256


def compiled_block_types() -> tuple[type, ...]:
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    return (BasicTransformerBlock, ResnetBlock2D)


def compile_blocks(unet: torch.nn.Module, mode: str = "default") -> str:
    """Compile each transformer and ResNet block of `unet` in place (nn.Module.compile);
    returns a line for the log. Call after the LoRA network attaches."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {mode!r}")
    import torch._dynamo
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch 2.x
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), RECOMPILE_LIMIT))
    kinds = compiled_block_types()
    counts = {k.__name__: 0 for k in kinds}
    for module in unet.modules():
        if isinstance(module, kinds):
            module.compile(mode=None if mode == "default" else mode, dynamic=False)
            counts[type(module).__name__] += 1
    if not any(counts.values()):
        raise ValueError("compile = true: the UNet has no transformer or ResNet blocks to "
                         "compile")
    return "torch.compile (" + mode + ") of " + ", ".join(
        f"{n} {k}" for k, n in counts.items()) + "; the first steps of each shape compile"


def batch_qkv_lora(unet: torch.nn.Module, network) -> str:
    """`batch_qkv_lora = true`: in every attention layer of `unet` whose projections all
    carry a LoRA, one down-projection matmul for the LoRAs of q, k and v (self-attention) or
    k and v (cross-attention: q reads the image tokens, k and v the text), via
    LoRANetwork.share_input. Not with module_dropout: a module that skips its LoRA would
    leave its slice, and the input with it, held until the next call. Returns a line for the
    log."""
    from diffusers.models.attention_processor import Attention
    by_base = {id(m.base): m for m in network}
    counts = {"self": 0, "cross": 0}
    for attn in unet.modules():
        if not isinstance(attn, Attention):
            continue
        kind = "cross" if attn.is_cross_attention else "self"
        names = ("to_k", "to_v") if kind == "cross" else ("to_q", "to_k", "to_v")
        members = [by_base.get(id(getattr(attn, n, None))) for n in names]
        if all(m is not None and m._shared is None and not m.module_dropout
               and m.spec.algo == "lora" and not m.spec.dora
               and isinstance(m.lora_down, torch.nn.Linear) for m in members):
            network.share_input(members)
            counts[kind] += 1
    if network.algos != {"lora"} or any(m.spec.dora for m in network):
        return ("batch_qkv_lora: skipped (it batches plain LoRA down projections; this "
                f"network is {'/'.join(sorted(network.algos))}"
                f"{' with DoRA' if any(m.spec.dora for m in network) else ''})")
    return (f"batched LoRA down projections: q/k/v of {counts['self']} self-attention and "
            f"k/v of {counts['cross']} cross-attention layers")


def to_channels_last(unet: torch.nn.Module) -> str:
    unet.to(memory_format=torch.channels_last)
    return "UNet in channels_last memory format"


def eager():
    """Run compiled modules eagerly inside this context (sampling, validation)."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "set_stance"):
        return compiler.set_stance("force_eager")
    return contextlib.nullcontext()


def step_begin(training_cfg) -> None:
    """Call at the start of every training step: with CUDA graphs (compile_mode =
    "reduce-overhead") it tells torch that the previous step's graph outputs are no longer
    read, so their memory can be reused."""
    if training_cfg.compile and training_cfg.compile_mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()


def run_eagerly(fn):
    """Decorator: `fn` runs inside `eager()`."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with eager():
            return fn(*args, **kwargs)
    return wrapper


CUDA_GRAPH_SHAPES = 4


class _UNetForward(torch.nn.Module):
    """UNet forward with positional tensor inputs only, owning the LoRA network, so that the
    graphed callable's parameters are the LoRA weights (the UNet's own are frozen)."""

    def __init__(self, unet, network, added_keys: tuple[str, ...]):
        super().__init__()
        self.unet, self.network, self.added_keys = unet, network, added_keys

    def forward(self, sample, timestep, encoder_hidden_states, *added):
        kwargs = {"added_cond_kwargs": dict(zip(self.added_keys, added))} if added else {}
        return self.unet(sample, timestep, encoder_hidden_states, **kwargs).sample


class GraphedUNet:
    """Drop-in for `unet` in library.train.step.diffusion_loss (see the module docstring).
    Anything it cannot replay (no grad, CPU tensors, a shape beyond the cap or outside
    `shapes`) runs eagerly.

    `shapes`: the (batch, latent height, latent width) shapes to capture (None: the first
    `max_shapes` seen). `accumulates` (gradient_accumulation_steps > 1): the graph's backward
    returns its static gradient buffers, and autograd keeps such a tensor as the parameter's
    .grad when .grad is None; the next replay would then overwrite the accumulated sum. So
    the LoRA gradients are created (zeros) before the first micro-step of each optimizer
    step, and autograd adds into them instead."""

    def __init__(self, unet, network, max_shapes: int = CUDA_GRAPH_SHAPES,
                 shapes: frozenset | None = None, accumulates: bool = False):
        self.unet, self.network, self.max_shapes = unet, network, max_shapes
        self.shapes, self.accumulates = shapes, accumulates
        self.graphs: dict[tuple, object] = {}
        self.captures = 0
        self.pool = None  # one memory pool for every captured shape
        self.params = [p for p in network.parameters() if p.requires_grad]

    def _capture_kwargs(self) -> dict:
        import inspect
        if "pool" not in inspect.signature(torch.cuda.make_graphed_callables).parameters:
            return {}
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        return {"pool": self.pool}

    def __getattr__(self, name):  # config, dtype, device ... of the wrapped UNet
        return getattr(self.unet, name)

    def __call__(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None):
        added = tuple(sorted((added_cond_kwargs or {}).items()))
        keys = tuple(k for k, _ in added)
        args = (sample, timestep, encoder_hidden_states, *(v for _, v in added))
        if not torch.is_grad_enabled() or not sample.is_cuda or not self.network.training:
            return self.unet(sample, timestep, encoder_hidden_states,
                             added_cond_kwargs=added_cond_kwargs)
        on = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda")
        key = (keys, on, dtype) + tuple((a.shape, a.dtype, a.requires_grad) for a in args)
        # autocast inside CUDA graphs needs its weight-cast cache off (torch's rule)
        with torch.autocast("cuda", dtype=dtype, enabled=on, cache_enabled=False):
            fn = self.graphs.get(key)
            if fn is None:
                wanted = self.shapes is None or (sample.shape[0], *sample.shape[2:]) in \
                    self.shapes
                if len(self.graphs) >= self.max_shapes or not wanted:
                    return self.unet(sample, timestep, encoder_hidden_states,
                                     added_cond_kwargs=added_cond_kwargs)
                # Captured on detached copies: the warm-up backward passes must not reach
                # into the autograd graph the real inputs came from (the text encoders).
                sample_args = tuple(a.detach().clone().requires_grad_(a.requires_grad)
                                    for a in args)
                fn = torch.cuda.make_graphed_callables(
                    _UNetForward(self.unet, self.network, keys), sample_args,
                    allow_unused_input=True, **self._capture_kwargs())
                self.graphs[key] = fn
                self.captures += 1
            if self.accumulates and self.params and self.params[0].grad is None:
                for p in self.params:  # see the class docstring
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
            out = fn(*args)
        return _Output(out)


class _Output:
    def __init__(self, sample):
        self.sample = sample


def cuda_graph_problems(training_cfg, network) -> list[str]:
    """Why `cuda_graphs = true` cannot be used with these settings (empty: it can)."""
    problems = []
    if any(m.module_dropout for m in network):
        problems.append("module_dropout decides on the host at every step")
    if training_cfg.gradient_checkpointing and any(m.dropout or m.rank_dropout
                                                   for m in network):
        problems.append("gradient_checkpointing with network_dropout / rank_dropout: inside "
                        "the graphs the recomputed forward would draw other dropout masks")
    return problems


def _checkpoint_without_rng_state(module, *args):
    # torch's checkpoint saves and restores the CUDA RNG state around the recompute, which
    # a CUDA graph capture forbids. The UNet draws no random numbers in its forward (no
    # dropout; LoRA dropout with checkpointing keeps the graphs off), so there is nothing
    # to restore and the recompute is the same computation.
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False,
                                             preserve_rng_state=False)


def checkpoint_inside_graphs(unet) -> None:
    """gradient_checkpointing under CUDA graphs: non-reentrant checkpoints without RNG state,
    so that the recompute is captured in the graph's backward."""
    unet.enable_gradient_checkpointing(gradient_checkpointing_func=_checkpoint_without_rng_state)


def training_unet(unet, network, training_cfg, device) -> tuple[object, str | None]:
    """The UNet the training step calls: a GraphedUNet with `cuda_graphs = true` where it
    can run, else `unet`; plus a line for the log (None: nothing to say)."""
    if not training_cfg.cuda_graphs:
        return unet, None
    if torch.device(device).type != "cuda":
        return unet, "cuda_graphs = true needs a CUDA GPU; the UNet runs eagerly on CPU"
    problems = cuda_graph_problems(training_cfg, network)
    if problems:
        return unet, "cuda_graphs = true is off for this run: " + "; ".join(problems)
    if training_cfg.gradient_checkpointing:
        checkpoint_inside_graphs(unet)
    return GraphedUNet(unet, network), (f"CUDA graphs of the UNet's forward and backward "
                                        f"(up to {CUDA_GRAPH_SHAPES} shapes)")


def configure_speed(unet: torch.nn.Module, training_cfg, network) -> list[str]:
    """Apply `batch_qkv_lora`, `channels_last` and `compile` from [training] (after the
    LoRA `network` attaches); returns lines for the log."""
    done = []
    if training_cfg.batch_qkv_lora:
        done.append(batch_qkv_lora(unet, network))
    if training_cfg.channels_last:
        done.append(to_channels_last(unet))
    if training_cfg.compile:
        done.append(compile_blocks(unet, training_cfg.compile_mode))
    return done
