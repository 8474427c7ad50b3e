"""The [training] section of the schema (library/config/schema.py): steps, precision, speed,
noise, timesteps, loss, validation, EMA and preservation keys. Kept in its own file for size;
`schema.TrainingConfig` is the same class."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from library.config.fields import opt
from library.train.speed import COMPILE_MODES
from library.train.timesteps import TIMESTEP_SAMPLINGS


@dataclass(frozen=True)
class TrainingConfig:
    max_train_steps: Optional[int] = opt(None, "Optimizer steps to train (default 1600 when "
                                         "max_train_epochs is unset).", minimum=1)
    max_train_epochs: Optional[int] = opt(None, "Epochs to train; overrides max_train_steps.",
                                          aliases=("num_train_epochs",), minimum=1)
    initial_epoch: Optional[int] = opt(None, "Start at this epoch (1 = the first): the run "
                                       "counts steps from (N - 1) x steps per epoch, as "
                                       "initial_step does.", minimum=1)
    initial_step: Optional[int] = opt(None, "Start at this optimizer step (0 = the first; "
                                      "overrides initial_epoch and a resumed state's step): "
                                      "steps are counted, logged and named from N, and the "
                                      "run ends at max_train_steps. The data starts at the "
                                      "beginning of the epoch step N falls in (or, with "
                                      "skip_until_initial_step, right after step N). The lr "
                                      "schedule starts at its beginning unless resuming.",
                                      minimum=0)
    skip_until_initial_step: bool = opt(False, "With initial_step / initial_epoch: draw and "
                                        "skip the batches of the steps before it, so the run "
                                        "trains on the batches an uninterrupted run would.")
    mixed_precision: str = opt("no", "Compute precision: no (fp32), fp16 or bf16. On a "
                               "machine without CUDA, fp16/bf16 fall back to fp32 with a "
                               "warning.", choices=("no", "fp16", "bf16"))
    full_bf16: bool = opt(False, "Train the LoRA weights and their gradients in bf16 too, "
                          "not fp32 master weights (saves memory, needs mixed_precision = "
                          "bf16).")
    full_fp16: bool = opt(False, "Train the LoRA weights and their gradients in fp16 too, "
                          "not fp32 master weights (saves memory, needs mixed_precision = "
                          "fp16).")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save "
                                       "memory.")
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step.", minimum=1)
    compile: bool = opt(False, "Regional torch.compile of the UNet's transformer and ResNet "
                        "blocks, LoRA included (docs/TRAINING.md, Speed). Costs compile time "
                        "at the first step of each bucket shape.", aliases=("torch_compile",))
    compile_mode: str = opt("default", "torch.compile mode of `compile`; reduce-overhead also "
                            "records CUDA graphs.", choices=COMPILE_MODES)
    channels_last: bool = opt(False, "Keep the UNet in channels_last (NHWC) memory format.")
    pin_memory: bool = opt(False, "Send each batch to the GPU from page-locked host "
                           "memory with non-blocking copies, so the host does not wait for "
                           "the GPU (CUDA; measured without gain at SD1.5 batch 1, "
                           "docs/BENCHMARKS.md).")
    batch_qkv_lora: bool = opt(True, "One matmul for the LoRA down projections of each "
                               "attention layer's q, k and v, which read the same input; the "
                               "same result, 3 % faster on a GPU (docs/TRAINING.md, Speed).")
    cuda_graphs: Optional[bool] = opt(None, "Replay the UNet's training forward and backward "
                                      "from CUDA graphs, one per batch shape (CUDA only; "
                                      "docs/TRAINING.md, Speed). Unset: on where the run "
                                      "allows it; the log's `speed:` line says why not.")
    cuda_graph_shapes: int = opt(8, "At most this many batch shapes (bucket x batch size) are "
                                 "captured as CUDA graphs, the most frequent first; the other "
                                 "shapes run eagerly.", minimum=1)
    seed: Optional[int] = opt(None, "Random seed; unset picks one and records it.")
    noise_offset: float = opt(0.0, "Offset noise strength: a per-channel constant of this "
                              "scale is added to the noise (0 disables; ~0.05-0.1 typical).",
                              minimum=0.0)
    noise_offset_random_strength: bool = opt(False, "Draw the offset strength uniformly in "
                                             "[0, noise_offset] each step.")
    adaptive_noise_scale: Optional[float] = opt(None, "Add this times |mean of each latent "
                                                "channel| to noise_offset (needs "
                                                "noise_offset).")
    multires_noise_iterations: int = opt(0, "Pyramid (multi-resolution) noise levels (0 "
                                         "disables; 6-10 typical).", minimum=0)
    multires_noise_discount: float = opt(0.3, "Weight decay per pyramid-noise level.",
                                         minimum=0.0)
    ip_noise_gamma: float = opt(0.0, "Input-perturbation noise strength (0 disables; ~0.1 "
                                "typical).", minimum=0.0)
    ip_noise_gamma_random_strength: bool = opt(False, "Draw the input-perturbation "
                                               "strength uniformly in [0, ip_noise_gamma].")
    min_timestep: Optional[int] = opt(None, "Smallest training timestep (default 0).",
                                      minimum=0)
    max_timestep: Optional[int] = opt(None, "Training timesteps are below this (default "
                                      "1000, the scheduler's num_train_timesteps).", minimum=1)
    timestep_sampling: str = opt(
        "uniform", "Distribution of the training timesteps within [min_timestep, "
        "max_timestep): uniform, logit_normal (SD3), mode (SD3), sigmoid, shift "
        "(sd-scripts' FLUX options) or cosmap (SD3); docs/TRAINING.md.",
        choices=TIMESTEP_SAMPLINGS)
    logit_mean: float = opt(0.0, "Mean of the normal draw of `logit_normal` sampling.")
    logit_std: float = opt(1.0, "Standard deviation of the normal draw of `logit_normal` "
                           "sampling.", minimum=0.0, exclusive_min=True)
    mode_scale: float = opt(1.29, "Heavy-tail scale of `mode` sampling (SD3 paper; 0 is "
                            "uniform).")
    sigmoid_scale: float = opt(1.0, "Scale of the normal draw of `sigmoid` and `shift` "
                               "sampling (larger spreads the timesteps towards both ends).",
                               minimum=0.0, exclusive_min=True)
    discrete_flow_shift: float = opt(3.0, "Shift s of `shift` sampling: above 1 favours "
                                     "noisier timesteps, below 1 cleaner ones.", minimum=0.0,
                                     exclusive_min=True)
    min_snr_gamma: Optional[float] = opt(None, "Min-SNR loss weighting gamma (5 is "
                                         "typical).", aliases=("snr_gamma",), minimum=0.0,
                                         exclusive_min=True)
    scale_v_pred_loss_like_noise_pred: bool = opt(False, "Weight the v-prediction loss by "
                                                  "SNR/(SNR+1) (needs v_parameterization).")
    debiased_estimation_loss: bool = opt(False, "Weight the loss by 1/sqrt(SNR) (debiased "
                                         "estimation).")
    zero_terminal_snr: bool = opt(False, "Rescale the noise schedule so the last timestep "
                                  "is pure noise (meant for v_parameterization).")
    loss_type: str = opt("l2", "Loss function.", choices=("l2", "l1", "huber", "smooth_l1"))
    huber_schedule: str = opt("snr", "Timestep schedule of the huber / smooth_l1 threshold.",
                              choices=("constant", "exponential", "snr"))
    huber_c: float = opt(0.1, "Huber threshold (its value at the noisiest timestep for the "
                         "exponential and snr schedules).", minimum=0.0, exclusive_min=True)
    huber_scale: float = opt(1.0, "Scale of the constant and exponential huber thresholds.",
                             minimum=0.0, exclusive_min=True)
    dry_run: bool = opt(False, "Check the config and data, print the plan, train nothing.")
    skip_nan_steps: bool = opt(False, "Skip a batch whose loss is NaN/inf (with a warning) "
                               "instead of stopping the run.")
    validation_split: float = opt(0.0, "Fraction of the training images (not reg images) "
                                  "held out for the validation loss (0 = none).", minimum=0.0)
    validation_seed: Optional[int] = opt(None, "Seed of the validation_split draw "
                                         "(default: the training seed).")
    validation_data_dir: Optional[str] = opt(None, "Folder of validation images (same layouts "
                                             "as train_data_dir).")
    validate_every_n_steps: Optional[int] = opt(None, "Compute loss/validation every N steps.",
                                                minimum=1)
    validate_every_n_epochs: Optional[int] = opt(None, "Compute loss/validation every N "
                                                 "epochs.", minimum=1)
    ema_decay: Optional[float] = opt(
        None, "Keep an exponential moving average of the LoRA weights with this decay (e.g. "
        "0.99; warm-up min(decay, (1+k)/(10+k)) at step k); samples, the validation loss and "
        "the saved LoRA files use the average (docs/TRAINING.md). Unset = off.",
        minimum=0.0, exclusive_min=True)
    ema_cpu: bool = opt(False, "Keep the EMA of `ema_decay` in CPU memory instead of on the "
                        "GPU (slower steps, less GPU memory).")
    preservation_weight: float = opt(
        0.0, "Output preservation without regularization images (ai-toolkit's "
        "diff_output_preservation_multiplier, OneTrainer's prior prediction): each step also "
        "pulls the LoRA's prediction on the class prompt towards the base model's, with this "
        "loss weight (docs/TRAINING.md). 0 = off.", minimum=0.0)
    preservation_trigger: Optional[str] = opt(
        None, "The trigger word that `preservation_weight` replaces by `preservation_class` in "
        "each caption (default: the first word of the training folder's name after `N_`).")
    preservation_class: Optional[str] = opt(
        None, "What replaces the trigger word in the preservation prompt (ai-toolkit's "
        "diff_output_preservation_class; default: the rest of the folder name; \"\" removes "
        "the trigger).")
    preservation_prompt: Optional[str] = opt(
        None, "One fixed preservation prompt for every sample, instead of the captions with "
        "the trigger replaced.")
