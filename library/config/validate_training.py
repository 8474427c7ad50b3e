"""Cross-key checks of the optimizer, schedule, noise, loss and precision keys
(docs/TRAINING.md).

Run by `validate` after typing, so a bad optimizer argument, a missing optional package or a
contradictory noise setting stops the run with exit 2 before any model loads.
"""
from __future__ import annotations

from library.config.loader import Layers, locate
from library.config.schema import Config
from library.train.optimizers import install_hint, optimizer_problems, resolve, \
    uses_relative_step

# SD1.5 and SDXL noise schedules have 1000 training timesteps.
NUM_TRAIN_TIMESTEPS = 1000


def check_training_keys(cfg: Config, layers: Layers, ok, *, check_env: bool = True) -> None:
    """`check_env=False` skips what depends on this machine (installed packages)."""
    p, w = layers.problems, layers.warnings
    o, tr = cfg.optimizer, cfg.training
    if ok("optimizer_type", "optimizer_args"):
        hint = install_hint(resolve(o.optimizer_type))
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
    if o.lr_scheduler == "cosine_with_min_lr" and o.lr_scheduler_min_lr_ratio is None:
        p.append(f"{locate(layers, 'lr_scheduler')}: cosine_with_min_lr needs "
                 "lr_scheduler_min_lr_ratio (the final lr as a fraction, e.g. 0.1)")
    if (o.lr_scheduler_min_lr_ratio or 0) > 1:
        p.append(f"{locate(layers, 'lr_scheduler_min_lr_ratio')}: "
                 f"{o.lr_scheduler_min_lr_ratio} is above 1; use a fraction like 0.1")
    check_timesteps(cfg, layers, ok)
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
