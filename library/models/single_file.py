"""SD1.5 / SDXL components from one A1111/civitai (LDM layout) checkpoint, fully offline.

The weights come from the file; the architecture from diffusers config files: those bundled
in `configs/models/<family>/` (the real SD1.5 and SDXL base configs), or `model_config_dir`
for fine-tunes of other shapes and for the tiny test models. Key conversion is diffusers' own
(`diffusers.loaders.single_file_utils`); loading is strict (library/models/strict.py).
"""
from __future__ import annotations

from pathlib import Path

import torch

from library.models.checkpoint_file import read_state_dict
from library.models.errors import ModelLoadError
from library.models.strict import cast, load_strict
from library.models.tokenizers import check_vocab, find_tokenizer_folders, load_tokenizers

BUNDLED_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "models"
SD15_TE_PREFIX = "cond_stage_model.transformer."
SDXL_TE1_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TE2_PREFIX = "conditioner.embedders.1.model."


def text_encoder_names(family: str) -> list[str]:
    return ["text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])


def config_dir_for(family: str, model_config_dir: str | None) -> Path:
    """The folder of configs describing a single file; every needed config must exist."""
    folder = Path(model_config_dir).expanduser() if model_config_dir else \
        BUNDLED_CONFIGS / family
    key = "model_config_dir" if model_config_dir else "bundled configs"
    needed = ["unet/config.json", "vae/config.json", "scheduler/scheduler_config.json"] + \
        [f"{n}/config.json" for n in text_encoder_names(family)]
    missing = [n for n in needed if not (folder / n).is_file()]
    if missing:
        raise ModelLoadError(
            f"{key}: {folder} lacks {', '.join(missing)}; model_config_dir must be a "
            f"diffusers-layout {family} folder (config files and tokenizers; weights are not "
            "needed)")
    return folder


def _clip_state(state: dict, prefix: str, flat: bool) -> dict:
    """CLIP-L weights stored as transformers keys under an LDM prefix."""
    out = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    out.pop("text_model.embeddings.position_ids", None)  # a buffer, not a weight
    if flat:  # transformers 5 CLIPTextModel has no `text_model` submodule
        out = {k.removeprefix("text_model."): v for k, v in out.items()}
    return out


def _text_encoders(state: dict, family: str, config_dir: Path, source: str) -> list:
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    with init_empty_weights():  # shells on the meta device; load_strict fills them
        te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder"))
    prefix = SD15_TE_PREFIX if family == "sd15" else SDXL_TE1_PREFIX
    te1_state = _clip_state(state, prefix, flat=not hasattr(te1, "text_model"))
    tes = [load_strict(lambda: te1, te1_state, what="text encoder", source=source,
                       config_dir=config_dir / "text_encoder")]
    if family == "sdxl":
        with init_empty_weights():
            te2 = CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(config_dir / "text_encoder_2"))
        # OpenCLIP names (resblocks, fused in_proj) -> transformers names, by diffusers.
        te2_state = convert_open_clip_checkpoint(te2, state, prefix=SDXL_TE2_PREFIX)
        te2_state.pop("text_model.embeddings.position_ids", None)
        tes.append(load_strict(lambda: te2, te2_state, what="text encoder 2", source=source,
                               config_dir=config_dir / "text_encoder_2"))
    return tes


def load_single_file(path: Path, family: str, *, model_config_dir: str | None = None,
                     tokenizer_dir: str | None = None, allow_pickle: bool = False,
                     weight_dtype: torch.dtype = torch.float32, with_vae: bool = True) -> dict:
    """{"unet", "vae" (fp32, or None), "text_encoders", "tokenizers", "noise_scheduler",
    "config_dir"} of a single-file checkpoint."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from library.models.vae import vae_from_state
    config_dir = config_dir_for(family, model_config_dir)
    n_te = len(text_encoder_names(family))
    # Tokenizers first: a missing tokenizer should fail before gigabytes are read.
    tok_folders = find_tokenizer_folders(n_te, tokenizer_dir=tokenizer_dir,
                                         config_dir=config_dir, checkpoint=path)
    source = f"pretrained_model_name_or_path: {path}"
    state = read_state_dict(path, allow_pickle, key="pretrained_model_name_or_path")
    unet_cfg = UNet2DConditionModel.load_config(config_dir / "unet")
    unet = load_strict(lambda: UNet2DConditionModel.from_config(unet_cfg),
                       convert_ldm_unet_checkpoint(state, unet_cfg), what="UNet",
                       source=source, config_dir=config_dir / "unet")
    unet = cast(unet, weight_dtype)
    vae = None
    if with_vae:
        vae = vae_from_state(state, AutoencoderKL.load_config(config_dir / "vae"), source,
                             config_dir / "vae")
    tes = [cast(te, weight_dtype) for te in _text_encoders(state, family, config_dir, source)]
    del state
    toks = load_tokenizers(n_te, tok_folders)
    check_vocab(toks, tes, source)
    scheduler = DDPMScheduler.from_pretrained(config_dir, subfolder="scheduler")
    return {"unet": unet, "vae": vae, "text_encoders": tes, "tokenizers": toks,
            "noise_scheduler": scheduler, "config_dir": config_dir}
