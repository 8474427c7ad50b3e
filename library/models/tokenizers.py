"""CLIP tokenizers for single-file checkpoints, found on disk only.

A single `.safetensors` checkpoint has no tokenizer inside, and the real 49408-token CLIP
vocabulary cannot ship with tomlora. SD1.5 and SDXL all use the same CLIP BPE vocabulary
(SDXL's second tokenizer differs only in padding with "!"), so any SD tokenizer on disk works.
Searched in order: `tokenizer_dir`, the `model_config_dir` (or bundled config) folder, and
the local Hugging Face cache for a few well-known repos.
"""
from __future__ import annotations

from pathlib import Path

from library.models.errors import ModelLoadError
from library.models.hub import cached_snapshot

# Repos whose cached snapshot holds an SD tokenizer (tokenizer/ subfolders or a bare one).
KNOWN_REPOS = (
    "stabilityai/stable-diffusion-xl-base-1.0",
    "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "runwayml/stable-diffusion-v1-5",
    "openai/clip-vit-large-patch14",
)
CLIP_MAX_LENGTH = 77
SDXL_PAD_2 = "!"  # SDXL's OpenCLIP tokenizer pads with "!" (id 0), not with EOS


def is_tokenizer_folder(p: Path) -> bool:
    return ((p / "vocab.json").is_file() and (p / "merges.txt").is_file()) or \
        (p / "tokenizer.json").is_file()


def tokenizer_folders(folder: Path) -> tuple[Path, Path | None] | None:
    """(tokenizer, tokenizer_2 or None) in a diffusers model folder or a tokenizer folder."""
    if is_tokenizer_folder(folder / "tokenizer"):
        second = folder / "tokenizer_2"
        return folder / "tokenizer", second if is_tokenizer_folder(second) else None
    if is_tokenizer_folder(folder):
        return folder, None
    return None


def _cached_known() -> tuple[tuple[Path, Path | None], str] | None:
    for repo in KNOWN_REPOS:
        snap = cached_snapshot(repo)
        found = tokenizer_folders(snap) if snap is not None else None
        if found:
            return found, f"Hugging Face cache ({repo})"
    return None


def find_tokenizer_folders(count: int, *, tokenizer_dir: str | None, config_dir: Path,
                           checkpoint: Path) -> tuple[Path, Path | None]:
    """Where the tokenizers of a single-file checkpoint come from; a clear error if nowhere."""
    if tokenizer_dir:
        found = tokenizer_folders(Path(tokenizer_dir).expanduser())
        if found is None:
            raise ModelLoadError(
                f"tokenizer_dir: {tokenizer_dir} has no CLIP tokenizer (vocab.json + merges.txt "
                "or tokenizer.json, directly or in a tokenizer/ subfolder)")
        return found
    found = tokenizer_folders(config_dir)
    if found:
        return found
    cached = _cached_known()
    if cached:
        return cached[0]
    which = "an SDXL" if count == 2 else "an SD1.5"
    raise ModelLoadError(
        f"pretrained_model_name_or_path: {checkpoint} is a single-file checkpoint, which holds "
        "no tokenizer, and none was found on this machine. Set tokenizer_dir to the tokenizer "
        f"folder of any diffusers SD model (e.g. the `tokenizer` folder of {which} model), or "
        "download one once with `huggingface-cli download openai/clip-vit-large-patch14 "
        "--include \"*.json\" \"*.txt\"` (tomlora then finds it in the Hugging Face cache).")


def load_tokenizers(count: int, folders: tuple[Path, Path | None]) -> list:
    """`count` CLIPTokenizers; SDXL's second pads with "!" when only one folder is given."""
    from transformers import CLIPTokenizer
    first, second = folders
    toks = [CLIPTokenizer.from_pretrained(first, model_max_length=CLIP_MAX_LENGTH)]
    if count == 2:
        toks.append(CLIPTokenizer.from_pretrained(second, model_max_length=CLIP_MAX_LENGTH)
                    if second else CLIPTokenizer.from_pretrained(
                        first, model_max_length=CLIP_MAX_LENGTH, pad_token=SDXL_PAD_2))
    return toks


def check_vocab(tokenizers: list, text_encoders: list, source: str) -> None:
    """A tokenizer with ids beyond the encoder's embedding table fails deep in a forward
    pass; say which pair does not fit instead."""
    for i, (tok, te) in enumerate(zip(tokenizers, text_encoders), 1):
        if len(tok) > te.config.vocab_size:
            raise ModelLoadError(
                f"{source}: tokenizer {i} has {len(tok)} tokens but text encoder {i} knows "
                f"{te.config.vocab_size}; use the tokenizer that belongs to this model "
                "(tokenizer_dir / model_config_dir)")
