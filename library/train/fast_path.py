"""Fast by default (docs/TRAINING.md, Speed): the speed options a run uses when it sets none.

On CUDA a run that leaves `cuda_graphs` unset and `sdpa_backend = "auto"` gets the fastest
path that trains the same LoRA as the eager step (docs/BENCHMARKS.md, the loss-curve guard):

- CUDA graphs of the UNet's forward and backward, one per batch shape (bucket x batch size),
  the `cuda_graph_shapes` most frequent shapes of the dataset (8 unless set; the others run
  eagerly). Not where the graphs would change what is computed: module_dropout (decided on
  the host each step), checkpointing together with LoRA dropout (the recompute would draw
  other masks). fp8_base, xformers and compile_mode = "reduce-overhead" (its own CUDA graphs)
  are not verified under graphs: unset, they keep the graphs off; `cuda_graphs = true` tries.
- cuDNN's fused attention first on compute capability 9.0 and newer (library/models/attention.py).
- batched q/k/v LoRA down projections (`batch_qkv_lora`, already the default everywhere).

`compile` stays off unless set: it costs 70-90 s of compiling at the start of an SDXL run,
which only long runs at large batches win back.

`plan_speed` is a pure function of the config, the dataset's batch shapes and the device,
so the decision is tested without a GPU; `fast_path` applies it and logs one `speed:` line
with what was chosen and why. Every choice is turned off by its key: `cuda_graphs = false`,
`sdpa_backend = "torch"`, `batch_qkv_lora = false`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from library.train.distributed import shard

log = logging.getLogger("tomlora")
LATENT_SCALE = 8


@dataclass(frozen=True)
class Device:
    """What the plan needs to know of the device: its type and CUDA compute capability."""
    type: str
    capability: tuple[int, int] | None = None

    @classmethod
    def of(cls, device) -> "Device":
        dev = torch.device(device)
        cap = torch.cuda.get_device_capability(dev) if dev.type == "cuda" else None
        return cls(dev.type, cap)


@dataclass(frozen=True)
class SpeedPlan:
    cuda_graphs: bool
    graph_shapes: frozenset        # (batch, latent height, latent width) to capture
    sdpa_backend: str              # resolved: "torch", "cudnn", ... or "" (no SDPA)
    checkpoint_in_graphs: bool
    line: str
    warning: str | None = None     # an explicit `cuda_graphs = true` that cannot be honoured


def batch_shapes(dataset, rank: int = 0, world: int = 1) -> dict[tuple[int, int, int], int]:
    """{(batch, latent height, latent width): batches per epoch} of this process's shards.
    Every epoch has the same shapes (the per-bucket counts do not change)."""
    counts: dict[tuple[int, int, int], int] = {}
    for batch in dataset.batches(0):
        local = shard(batch, rank, world)
        if not local:
            continue
        w, h = dataset.buckets[local[0]]
        key = (len(local), h // LATENT_SCALE, w // LATENT_SCALE)
        counts[key] = counts.get(key, 0) + 1
    return counts


def _shape_text(shape: tuple[int, int, int]) -> str:
    b, h, w = shape
    return f"{w * LATENT_SCALE}x{h * LATENT_SCALE} b{b}"


def graph_problems(training, model, dropouts: dict, explicit: bool,
                   run: tuple[str, ...] = (), unverified: tuple[str, ...] = ()) -> list[str]:
    """Why CUDA graphs are not used for this run (empty: they are). `dropouts`: the LoRA's
    dropout, rank_dropout and module_dropout; `run`: reasons of the run itself (see
    `run_graph_problems`); `unverified`: parts of the run not checked under graphs, which
    an explicit `cuda_graphs = true` still takes."""
    problems = list(run)
    if dropouts.get("module_dropout"):
        problems.append("module_dropout decides on the host at every step")
    if training.gradient_checkpointing and (dropouts.get("dropout") or
                                            dropouts.get("rank_dropout")):
        problems.append("gradient_checkpointing with network_dropout / rank_dropout (the "
                        "recompute inside the graphs would draw other dropout masks)")
    if not explicit:  # combinations the loss guard has not checked under graphs
        problems.extend(unverified)
        # Their short GPU equality tests passed, the 50-step loss-curve guard has not run
        # (docs/BENCHMARKS.md): chosen only by an explicit cuda_graphs = true until it has.
        if training.gradient_checkpointing:
            problems.append("gradient_checkpointing inside the graphs has not passed the GPU loss guard yet")
        if training.gradient_accumulation_steps > 1:
            problems.append("gradient accumulation under the graphs has not passed the GPU loss guard yet")
        if model.fp8_base:
            problems.append("fp8_base is not verified under CUDA graphs")
        if model.xformers:
            problems.append("xformers is not verified under CUDA graphs")
        if training.compile and training.compile_mode == "reduce-overhead":
            problems.append('compile_mode = "reduce-overhead" records CUDA graphs of its own')
    return problems


def run_graph_problems(training, network, dataset) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(reasons the graphs cannot serve this run, parts of it not verified under graphs):
    a graph replays the multiplier and the batch it was captured with, so a per-dataset
    network_multiplier or the preservation loss's second prompt batch cannot run in it."""
    hard, soft = [], []
    if getattr(training, "preservation_weight", 0):
        hard.append("preservation_weight runs a second, differently conditioned forward")
    sets = getattr(dataset, "datasets", [dataset])
    if any(getattr(getattr(s, "o", None), "network_multiplier", 1.0) != 1.0 for s in sets):
        hard.append("a dataset's network_multiplier changes the LoRA multiplier per batch")
    algos = sorted({m.spec.algo + ("+DoRA" if m.spec.dora else "")
                    for m in network if getattr(m, "spec", None) is not None} - {"lora"})
    if algos:
        soft.append(f"{', '.join(algos)} is not verified under CUDA graphs")
    return tuple(hard), tuple(soft)


def plan_speed(training, model, dropouts: dict, shapes: dict[tuple[int, int, int], int],
               device: Device, run: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
               ) -> SpeedPlan:
    """The speed options of this run and one line saying what was chosen and why."""
    parts, warning = [], None
    want = training.cuda_graphs  # None: unset, decide here
    graphs, chosen = False, frozenset()
    if want is False:
        parts.append("CUDA graphs off (cuda_graphs = false)")
    elif device.type != "cuda":
        parts.append("CUDA graphs off (no CUDA GPU)")
        if want:
            warning = "cuda_graphs = true needs a CUDA GPU; the UNet runs eagerly on CPU"
    elif (problems := graph_problems(training, model, dropouts, explicit=bool(want),
                                     run=run[0], unverified=run[1])):
        parts.append("CUDA graphs off: " + "; ".join(problems))
        if want:
            warning = "cuda_graphs = true is off for this run: " + "; ".join(problems)
    else:
        graphs = True
        order = sorted(shapes, key=lambda s: (-shapes[s], s))
        cap = training.cuda_graph_shapes
        chosen = frozenset(order[:cap])
        listed = ", ".join(_shape_text(s) for s in order[:cap])
        if len(order) <= cap:
            what = (f"CUDA graphs of the UNet for {len(order)} batch shape"
                    f"{'s' * (len(order) != 1)} ({listed})")
        else:
            total = sum(shapes.values())
            share = 100 * sum(shapes[s] for s in chosen) / total
            what = (f"CUDA graphs of the UNet for the {cap} most frequent of {len(order)} "
                    f"batch shapes ({listed}: {share:.0f} % of the steps; cuda_graph_shapes "
                    f"= {cap}), the other {len(order) - cap} run eagerly")
        if training.gradient_checkpointing:
            what += ", gradient checkpointing recomputed inside them"
        parts.append(what + ("" if want else " (cuda_graphs unset)"))
    backend = ""
    if model.xformers:
        parts.append("xformers attention")
    elif model.sdpa:
        backend = model.sdpa_backend
        if device.type == "cuda" and backend == "auto":
            new = device.capability is not None and device.capability >= (9, 0)
            backend = "cudnn" if new else "torch"
            parts.append("SDPA: cuDNN attention first (compute capability "
                         f"{device.capability[0]}.{device.capability[1]})" if new else
                         "SDPA: torch's kernel order (cuDNN first needs compute capability 9.0)")
        elif device.type == "cuda":
            parts.append(f'SDPA: sdpa_backend = "{backend}"')
        else:
            parts.append("SDPA (CPU kernel)")
    if training.batch_qkv_lora and not dropouts.get("module_dropout"):
        parts.append("q/k/v LoRA downs batched")
    elif training.batch_qkv_lora:
        parts.append("q/k/v LoRA downs not batched (module_dropout)")
    else:
        parts.append("q/k/v LoRA downs not batched (batch_qkv_lora = false)")
    if training.compile:
        parts.append(f"compile on ({training.compile_mode})")
    elif device.type == "cuda":
        parts.append("compile off (costs 70-90 s at the start; compile = true for long runs "
                     "at large batches)")
    line = "speed: " + "; ".join(parts)
    if device.type == "cuda":
        line += ('. Off switches: cuda_graphs = false, sdpa_backend = "torch", '
                 "batch_qkv_lora = false")
    return SpeedPlan(graphs, chosen, backend, graphs and training.gradient_checkpointing,
                     line, warning)


def fast_path(unet, network, cfg, dataset, device, rank: int = 0, world: int = 1):
    """Apply the speed options to the attached LoRA `network` and its `unet` and log the
    `speed:` line; returns the UNet the training step calls (a GraphedUNet or `unet`)."""
    from library.train.speed import GraphedUNet, checkpoint_inside_graphs, configure_speed
    dropouts = {k: max((getattr(m, k) for m in network), default=0.0)
                for k in ("dropout", "rank_dropout", "module_dropout")}
    plan = plan_speed(cfg.training, cfg.model, dropouts, batch_shapes(dataset, rank, world),
                      Device.of(device), run_graph_problems(cfg.training, network, dataset))
    for note in configure_speed(unet, cfg.training, network):
        log.info(note)
    if plan.warning:
        log.warning(plan.warning)
    log.info(plan.line)
    if not plan.cuda_graphs:
        return unet
    if plan.checkpoint_in_graphs:
        checkpoint_inside_graphs(unet)
    return GraphedUNet(unet, network, max_shapes=len(plan.graph_shapes),
                       shapes=plan.graph_shapes,
                       accumulates=cfg.training.gradient_accumulation_steps > 1)
