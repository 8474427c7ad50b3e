"""Sampler names -> diffusers schedulers (a closed registry, DESIGN.md §5).

Names are kohya's `sample_sampler` values plus the A1111-style names people search for
(`dpm++_2m_karras`). A scheduler is always built with `from_config(<pipeline scheduler
config>)`, so the model's own noise schedule (betas, prediction type, timestep spacing) is kept
and only the solver changes. Importing this module does not import diffusers.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class SamplerSpec:
    scheduler: str                      # diffusers scheduler class name
    label: str                          # A1111-style name written into the PNG parameters
    kwargs: dict = field(default_factory=dict)  # from_config overrides
    needs: str = ""                     # extra package the scheduler imports


SAMPLERS: dict[str, SamplerSpec] = {
    "ddim": SamplerSpec("DDIMScheduler", "DDIM"),
    "ddpm": SamplerSpec("DDPMScheduler", "DDPM"),
    "pndm": SamplerSpec("PNDMScheduler", "PLMS"),
    "lms": SamplerSpec("LMSDiscreteScheduler", "LMS", needs="scipy"),
    "lms_karras": SamplerSpec("LMSDiscreteScheduler", "LMS Karras",
                              {"use_karras_sigmas": True}, needs="scipy"),
    "euler": SamplerSpec("EulerDiscreteScheduler", "Euler"),
    "euler_a": SamplerSpec("EulerAncestralDiscreteScheduler", "Euler a"),
    "heun": SamplerSpec("HeunDiscreteScheduler", "Heun"),
    "dpm_2": SamplerSpec("KDPM2DiscreteScheduler", "DPM2"),
    "dpm_2_a": SamplerSpec("KDPM2AncestralDiscreteScheduler", "DPM2 a"),
    "dpmsolver": SamplerSpec("DPMSolverMultistepScheduler", "DPM Solver",
                             {"algorithm_type": "dpmsolver",
                              "final_sigmas_type": "sigma_min"}),
    "dpm++_2m": SamplerSpec("DPMSolverMultistepScheduler", "DPM++ 2M",
                            {"algorithm_type": "dpmsolver++"}),
    "dpm++_2m_karras": SamplerSpec("DPMSolverMultistepScheduler", "DPM++ 2M Karras",
                                   {"algorithm_type": "dpmsolver++",
                                    "use_karras_sigmas": True}),
    "dpm++_2m_sde": SamplerSpec("DPMSolverMultistepScheduler", "DPM++ 2M SDE",
                                {"algorithm_type": "sde-dpmsolver++"}),
    "dpm++_2m_sde_karras": SamplerSpec("DPMSolverMultistepScheduler", "DPM++ 2M SDE Karras",
                                       {"algorithm_type": "sde-dpmsolver++",
                                        "use_karras_sigmas": True}),
    "dpmsingle": SamplerSpec("DPMSolverSinglestepScheduler", "DPM single"),
    "unipc": SamplerSpec("UniPCMultistepScheduler", "UniPC"),
}

# kohya's spellings (sd-scripts train_util.get_my_scheduler) and a few common ones.
ALIASES: dict[str, str] = {
    "k_euler": "euler", "k_euler_a": "euler_a", "k_lms": "lms", "k_dpm_2": "dpm_2",
    "k_dpm_2_a": "dpm_2_a", "dpmsolver++": "dpm++_2m", "plms": "pndm",
    "dpm++2m": "dpm++_2m", "dpm++2m_karras": "dpm++_2m_karras",
}

# Every accepted name, for the schema's `choices` and error messages.
SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLERS) + tuple(ALIASES)


def canonical(name: str) -> str:
    """The registry name for `name` (case-insensitive, aliases resolved); ValueError lists the
    valid names, or names the package a sampler needs when it is not installed."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of: "
                         + ", ".join(SAMPLER_NAMES))
    needs = SAMPLERS[key].needs
    if needs and importlib.util.find_spec(needs) is None:
        raise ValueError(f"sampler {name!r} needs the {needs} package (pip install {needs}), "
                         "or choose another sampler")
    return key


def label(name: str) -> str:
    """A1111-style display name, e.g. `dpm++_2m_karras` -> `DPM++ 2M Karras`."""
    key = str(name).strip().lower()
    return SAMPLERS[ALIASES.get(key, key)].label


def make_scheduler(name: str, config: Mapping[str, Any]):
    """A fresh diffusers scheduler of sampler `name` over the noise schedule in `config`
    (usually `pipeline.scheduler.config`)."""
    import diffusers

    spec = SAMPLERS[canonical(name)]
    cls = getattr(diffusers, spec.scheduler)
    return cls.from_config(dict(config), **spec.kwargs)
