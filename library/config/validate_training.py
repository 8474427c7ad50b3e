"""Cross-key checks of the optimizer, schedule, noise, loss and precision keys
(docs/TRAINING.md).

Run by `validate` after typing, so a bad optimizer argument, a missing optional package or a
contradictory noise setting stops the run with exit 2 before any model loads.
"""
from __future__ import annotations

from dataclasses import replace

from library.config.loader import Layers, locate
from library.config.schema import Config
from library.train.optimizers import OPTIMIZER_NAMES, install_hint, optimizer_problems, \
    resolve, uses_relative_step
from library.train.schedulers import scheduler_problems

# SD1.5 and SDXL noise schedules have 1000 training timesteps.
NUM_TRAIN_TIMESTEPS = 1000


def canonical_optimizer(cfg: Config) -> Config:
    """optimizer_type in its registry spelling (`adamw8bit` -> `AdamW8bit`); a class path is
    kept as written (it is case-sensitive)."""
    spelling = {n.lower(): n for n in OPTIMIZER_NAMES}.get(cfg.optimizer.optimizer_type.lower())
    if spelling is None or spelling == cfg.optimizer.optimizer_type:
        return cfg
    return replace(cfg, optimizer=replace(cfg.optimizer, optimizer_type=spelling))


def check_training_keys(cfg: Config, layers: Layers, ok, *, check_env: bool = True) -> None:
    """`check_env=False` skips what depends on this machine (installed packages)."""
    p, w = layers.problems, layers.warnings
    o, tr = cfg.optimizer, cfg.training
    try:  # a registry name, or a class path imported here (sd-scripts' "any optimizer")
        spec = resolve(o.optimizer_type) if ok("optimizer_type") else None
    except ValueError as e:
        spec = None
        if check_env or "is unknown" in str(e):  # an import depends on this machine
            p.append(f"{locate(layers, 'optimizer_type')}: "
                     f"{str(e).removeprefix('optimizer_type ')}")
            layers.failed.add("optimizer_type")
    if spec is not None and ok("optimizer_args"):
        hint = install_hint(spec)
        if hint and check_env:
            p.append(f"{locate(layers, 'optimizer_type')}: {hint}")
        arg_problems = [m for m in optimizer_problems(o.optimizer_type, o.optimizer_args)
                        if m != hint]
        for msg in arg_problems:
            p.append(f"{locate(layers, 'optimizer_args')}: "
                     f"{msg.removeprefix('optimizer_args: ')}")
        relative = not arg_problems and uses_relative_step(o.optimizer_type,
                                                           o.optimizer_args)
        if o.lr_scheduler == "adafactor" and not relative and not arg_problems \
                and ok("lr_scheduler"):
            p.append(f"{locate(layers, 'lr_scheduler')}: the adafactor schedule needs "
                     "optimizer_type = \"Adafactor\" with relative_step (its default); "
                     "choose another lr_scheduler")
    if ok("lr_scheduler", "lr_scheduler_type", "lr_scheduler_args"):
        for key, msg in scheduler_problems(o):
            if check_env or key != "lr_scheduler_type":  # an import depends on this machine
                p.append(f"{locate(layers, key)}: {msg}")
    if o.lr_scheduler == "cosine_with_min_lr" and o.lr_scheduler_min_lr_ratio is None:
        p.append(f"{locate(layers, 'lr_scheduler')}: cosine_with_min_lr needs "
                 "lr_scheduler_min_lr_ratio (the final lr as a fraction, e.g. 0.1)")
    if (o.lr_scheduler_min_lr_ratio or 0) > 1:
        p.append(f"{locate(layers, 'lr_scheduler_min_lr_ratio')}: "
                 f"{o.lr_scheduler_min_lr_ratio} is above 1; use a fraction like 0.1")
    check_timesteps(cfg, layers, ok)
    check_quality_keys(cfg, layers, ok)
    check_precision(cfg, layers, ok)
    check_attention(cfg, layers, ok)
    if tr.adaptive_noise_scale is not None and not tr.noise_offset and ok("noise_offset"):
        p.append(f"{locate(layers, 'adaptive_noise_scale')}: needs noise_offset; set "
                 "noise_offset (e.g. 0.05) or remove adaptive_noise_scale")
    v = cfg.model.v_parameterization
    if tr.scale_v_pred_loss_like_noise_pred and not v and ok("v_parameterization"):
        p.append(f"{locate(layers, 'scale_v_pred_loss_like_noise_pred')}: only applies to "
                 "v-prediction; set v_parameterization = true or remove it")
    if tr.zero_terminal_snr and not v:
        w.append(f"{locate(layers, 'zero_terminal_snr')}: without v_parameterization the "
                 "last timestep has no signal left to predict from; the paper pairs it with "
                 "v-prediction")


def check_timesteps(cfg: Config, layers: Layers, ok) -> None:
    p, tr = layers.problems, cfg.training
    lo, hi, n = tr.min_timestep, tr.max_timestep, NUM_TRAIN_TIMESTEPS
    if lo is not None and lo > n - 1 and ok("min_timestep"):
        p.append(f"{locate(layers, 'min_timestep')}: {lo} is beyond the last timestep "
                 f"({n - 1})")
    if hi is not None and hi > n and ok("max_timestep"):
        p.append(f"{locate(layers, 'max_timestep')}: {hi} is above {n} (timesteps are "
                 f"0..{n - 1}; max_timestep is exclusive)")
    if lo is not None and hi is not None and lo > hi and ok("min_timestep", "max_timestep"):
        p.append(f"{locate(layers, 'min_timestep')}: {lo} is above max_timestep {hi}")


def check_quality_keys(cfg: Config, layers: Layers, ok) -> None:
    """ema_decay and preservation_weight (docs/TRAINING.md)."""
    p, w, tr = layers.problems, layers.warnings, cfg.training
    if tr.ema_decay is not None and tr.ema_decay >= 1 and ok("ema_decay"):
        p.append(f"{locate(layers, 'ema_decay')}: {tr.ema_decay} is not below 1; use a decay "
                 "like 0.99 (unset turns the EMA off)")
    if tr.ema_cpu and not tr.ema_decay:
        w.append(f"{locate(layers, 'ema_cpu')}: has no effect without ema_decay")
    if tr.preservation_weight and tr.cuda_graphs and ok("preservation_weight", "cuda_graphs"):
        p.append(f"{locate(layers, 'preservation_weight')}: does not work with cuda_graphs = "
                 "true (the base prediction runs the UNet a second time with the LoRA off, "
                 "outside the captured graph); set one of them off")
    pres_keys = [k for k in ("preservation_trigger", "preservation_class",
                             "preservation_prompt") if getattr(tr, k) is not None]
    if pres_keys and not tr.preservation_weight:
        w.append(f"{locate(layers, pres_keys[0])}: has no effect while preservation_weight "
                 "is 0")


def check_precision(cfg: Config, layers: Layers, ok) -> None:
    """full_bf16 / full_fp16 keep the LoRA weights in the mixed_precision dtype."""
    p, tr = layers.problems, cfg.training
    if tr.full_bf16 and tr.full_fp16 and ok("full_bf16", "full_fp16"):
        p.append(f"{locate(layers, 'full_fp16')}: contradicts full_bf16 = true; set at most "
                 "one of them")
        return
    for key, want in (("full_bf16", "bf16"), ("full_fp16", "fp16")):
        if getattr(tr, key) and tr.mixed_precision != want and ok(key, "mixed_precision"):
            p.append(f"{locate(layers, key)}: needs mixed_precision = \"{want}\" (it is "
                     f"\"{tr.mixed_precision}\"); set mixed_precision = \"{want}\" or remove "
                     f"{key}")


def check_attention(cfg: Config, layers: Layers, ok) -> None:
    """sdpa_backend picks a kernel of PyTorch SDPA, so it needs SDPA to be the attention."""
    m = cfg.model
    if m.sdpa_backend in ("auto", "torch") or not ok("sdpa_backend"):
        return
    other = "xformers = true" if m.xformers else "sdpa = false" if not m.sdpa else None
    if other:
        layers.problems.append(
            f"{locate(layers, 'sdpa_backend')}: \"{m.sdpa_backend}\" chooses a PyTorch SDPA "
            f"kernel, but {other} means SDPA is not used; remove one of the two")
