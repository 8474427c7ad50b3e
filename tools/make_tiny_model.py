"""Build tiny, randomly initialised SD1.5- and SDXL-shaped diffusers pipelines offline.

The random models draw nothing (`--pretrain` makes one that does), but they keep the block
layout of the real architectures (layers per block, down/up block types, >= 2 transformer blocks
somewhere, conv vs. linear proj_in/proj_out, SDXL's text_time embedding), so LoRA key mapping,
loading, training and inference code run through the same paths as with real checkpoints.
See DESIGN.md section 6 and LORA_FORMAT.md ("Tiny models that still exercise the real mappings").

Usage:
    python tools/make_tiny_model.py --family sd15 --out models/tiny-sd15 [--seed 0] [--force]
    python tools/make_tiny_model.py --family sd15 --pretrain --out models/tiny-sd15-pretrained
    python tools/make_tiny_model.py --family sdxl --out models/tiny-sdxl \
        --single_file models/tiny-sdxl.safetensors   # also as one A1111/LDM checkpoint

`--pretrain` trains the SD1.5-shaped model on procedurally drawn coloured shapes so it really
draws (tools/pretrain_tiny.py, docs/TINY_MODEL.md); the committed default model of `make demo`
is made this way.

Library use:
    from tools.make_tiny_model import build_tiny_model
    path = build_tiny_model("sdxl", "models/tiny-sdxl", seed=0)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: `tools.` and `library.` import from the repo
    sys.path.insert(0, str(ROOT))

FAMILIES = ("sd15", "sdxl")

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MAX_LENGTH = 77

# Words that become single tokens (with their BPE merges). The rest of English text falls back
# to one token per byte-level character, so arbitrary prompts always tokenize.
WORDS = (
    "a an the of on in with and or to at by for from is it this that my your its"
    " photo photograph picture image drawing painting portrait illustration render art"
    " person people man woman girl boy child face hair eyes hand cat dog bird horse robot"
    " car house tree flower sky sea water mountain city street room table chair"
    " red green blue yellow white black purple orange pink brown gray grey gold silver"
    " circle square triangle star heart shape line dot pattern"
    " background foreground light dark bright colorful simple small big large tiny"
    " high low quality best detailed sharp blurry masterpiece style anime realistic"
    " mysubject zorblat sks ohwx token trigger subject object"
    " standing sitting smiling looking wearing holding"
).split()

# Noise schedule of the real SD1.5 / SDXL repos (both use the same training betas).
SCHEDULER_COMMON = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------
def _byte_alphabet() -> list[str]:
    """Return the 256 printable characters that byte-level BPE uses for bytes 0..255.

    Bytes that are already visible characters keep their own code point; every other byte
    (control characters, space, a few Latin-1 gaps) is shifted to code points 256, 257, ...
    in increasing byte order. This is the convention GPT-2 and CLIP tokenizers share.
    """
    visible = set(range(ord("!"), ord("~") + 1))
    visible |= set(range(ord("\u00a1"), ord("\u00ac") + 1))
    visible |= set(range(ord("\u00ae"), ord("\u00ff") + 1))
    alphabet = []
    shifted = 0
    for byte in range(256):
        if byte in visible:
            alphabet.append(chr(byte))
        else:
            alphabet.append(chr(256 + shifted))
            shifted += 1
    return alphabet


def _apply_bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Greedy BPE: repeatedly merge the lowest-ranked adjacent pair (all its occurrences)."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = {(symbols[i], symbols[i + 1]) for i in range(len(symbols) - 1)}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def make_vocab_and_merges(words=WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Build a CLIP-style vocabulary: bytes, bytes + '</w>', merged tokens, then BOS/EOS.

    Merges are generated word by word: while a word does not yet come out as one token under
    the merges so far, the first two pieces of its current segmentation are merged. Appending a
    merge of higher rank never changes how earlier words tokenize (BPE always picks a lower
    ranked pair while one is present), so every word ends up as exactly one token.
    """
    alphabet = _byte_alphabet()
    tokens = list(alphabet) + [c + "</w>" for c in alphabet]
    known = set(tokens)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(w.lower() for w in words):  # dedupe, keep order
        chars = [alphabet[b] for b in word.encode("utf-8")]
        if len(chars) < 2:
            continue  # single characters already exist as "x</w>"
        chars[-1] += "</w>"
        while True:
            pieces = _apply_bpe(chars, ranks)
            if len(pieces) == 1:
                break
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            if pair[0] + pair[1] not in known:
                known.add(pair[0] + pair[1])
                tokens.append(pair[0] + pair[1])
    tokens += [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def write_tokenizer(folder: Path, pad_token: str = EOS) -> None:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json."""
    vocab, merges = make_vocab_and_merges()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(folder / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **special,
    }
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "special_tokens_map.json", special)


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


# ---------------------------------------------------------------------------------------------
# Model components
# ---------------------------------------------------------------------------------------------
def _text_encoder(vocab: dict[str, int], num_layers: int, act: str, pad_id: int,
                  with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act=act,
        projection_dim=32,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],  # real id: pooling picks the first EOS position
        pad_token_id=pad_id,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def _vae(scaling_factor: float, force_upcast: bool):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    ).eval()


def _unet_sd15():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        norm_num_groups=8,
        attention_head_dim=4,
        cross_attention_dim=32,
        use_linear_projection=False,
    ).eval()


def _unet_sdxl():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 2, 4),
        cross_attention_dim=64,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
        norm_num_groups=8,
    ).eval()


def _build_pipeline(family: str, tokenizer_dir: Path):
    """Instantiate the in-memory pipeline; the caller seeds torch beforehand."""
    from diffusers import (EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline)
    from transformers import CLIPTokenizer

    vocab, _ = make_vocab_and_merges()
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    if family == "sd15":
        return StableDiffusionPipeline(
            vae=_vae(0.18215, force_upcast=False),
            text_encoder=_text_encoder(vocab, 2, "quick_gelu", vocab[EOS], False),
            tokenizer=tokenizer,
            unet=_unet_sd15(),
            scheduler=PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False,
                                    **SCHEDULER_COMMON),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    # SDXL: encoder 1 has 3 layers and encoder 2 has 2, so code that mixes them up breaks.
    text_encoder = _text_encoder(vocab, 3, "quick_gelu", vocab[EOS], False)
    text_encoder_2 = _text_encoder(vocab, 2, "gelu", vocab["!"], True)
    return StableDiffusionXLPipeline(
        vae=_vae(0.13025, force_upcast=True),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=_unet_sdxl(),
        scheduler=EulerDiscreteScheduler(interpolation_type="linear",
                                         timestep_spacing="leading", **SCHEDULER_COMMON),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _write_pipeline(family: str, folder: Path, seed: int, pretrain: bool = False,
                    settings=None, device: str = "cpu", vae_from=None) -> None:
    import torch

    write_tokenizer(folder / "tokenizer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if pretrain:
            from tools.pretrain_tiny import pretrained_pipeline
            pipe = pretrained_pipeline(folder / "tokenizer", seed, settings, device, vae_from)
            # fp16 halves the folder (it is committed); loading with torch_dtype=float32
            # upcasts exactly, and the trainer always passes a torch_dtype.
            pipe.unet.to(torch.float16)
        else:
            pipe = _build_pipeline(family, folder / "tokenizer")
    # save_pretrained writes model_index.json and every model folder as safetensors; the
    # tokenizer folders are then replaced by the hand-written files, which load in both
    # transformers 4 and 5 and are byte-for-byte reproducible.
    pipe.save_pretrained(folder, safe_serialization=True)
    names = ["tokenizer"] + (["tokenizer_2"] if family == "sdxl" else [])
    for name in names:
        shutil.rmtree(folder / name, ignore_errors=True)
        write_tokenizer(folder / name, pad_token="!" if name == "tokenizer_2" else EOS)
    for name in ["text_encoder"] + (["text_encoder_2"] if family == "sdxl" else []):
        _prefix_text_model_keys(folder / name / "model.safetensors")


def _prefix_text_model_keys(path: Path) -> None:
    """Store CLIP text encoder weights as `text_model.*`, the layout of real SD repos.

    transformers 5 flattened CLIPTextModel (no `text_model` submodule) and saves a freshly
    built one without the prefix; transformers 4 could not load such a file, while
    transformers 5 strips the prefix on load. CLIPTextModelWithProjection keeps the prefix.
    """
    from safetensors.torch import load_file, save_file

    state = load_file(path)
    if all(k.startswith("text_model.") or k == "text_projection.weight" for k in state):
        return
    state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
    save_file(state, path, metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def build_tiny_model(family: str, out_dir: str | Path, seed: int = 0, *,
                     force: bool = False, pretrain: bool = False, pretrain_settings=None,
                     device: str = "cpu", vae_from=None) -> Path:
    """Write a tiny diffusers pipeline of `family` ("sd15" or "sdxl") to `out_dir`.

    `pretrain` (sd15 only) trains it on the shapes world first (tools/pretrain_tiny.py,
    docs/TINY_MODEL.md), so it draws "a red circle on a blue background" at 32x32;
    `pretrain_settings` (a `PretrainSettings`) shortens it for tests and `device` ("cuda")
    speeds up experiments; `vae_from` (a pretrained tiny model folder, which may be
    `out_dir` itself) keeps that model's VAE and pretrains only the UNet and text encoder.

    The folder is built in a temporary sibling directory and renamed into place, so readers
    never see a half-written model. An existing non-empty `out_dir` is an error unless
    `force` is true. Returns the resolved output path.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if pretrain and family != "sd15":
        raise ValueError("--pretrain builds an SD1.5-architecture model only (--family sd15)")
    if vae_from is not None:
        if not pretrain:
            raise ValueError("--vae_from only goes with --pretrain")
        if not (Path(vae_from) / "vae" / "config.json").is_file():
            raise ValueError(f"--vae_from {vae_from}: no vae/config.json there; give a model "
                             "folder written by make_tiny_model.py --pretrain")
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} is not empty (use force=True / --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_pipeline(family, tmp, seed, pretrain, pretrain_settings, device, vae_from)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_single_file(model_dir: str | Path, path: str | Path) -> Path:
    """The diffusers folder `model_dir` as one A1111/LDM-layout `.safetensors` checkpoint.
    Load it back with `model_config_dir = model_dir` (its configs and tokenizers)."""
    from library.models.export import save_single_file
    from library.models.loading import load_components
    return save_single_file(load_components(str(model_dir)), path)


def folder_size(path: str | Path) -> int:
    """Total size in bytes of all files below `path`."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=FAMILIES, required=True)
    parser.add_argument("--out", required=True, help="output folder (diffusers layout)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--pretrain", action="store_true",
                        help="train it on the shapes world so it draws (sd15 only, CPU, "
                             "minutes; docs/TINY_MODEL.md)")
    parser.add_argument("--vae_from", help="with --pretrain: keep the VAE of this pretrained "
                        "tiny model folder (it may be --out) and pretrain only the UNet and "
                        "text encoder; the VAE stage is the slower half")
    parser.add_argument("--single_file", help="also write the model as one LDM-layout "
                        ".safetensors checkpoint here (load it with model_config_dir = --out)")
    args = parser.parse_args(argv)
    try:
        out = build_tiny_model(args.family, args.out, seed=args.seed, force=args.force,
                               pretrain=args.pretrain, vae_from=args.vae_from)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    kind = "pretrained" if args.pretrain else "random"
    print(f"wrote {kind} tiny {args.family} pipeline (seed {args.seed}) to {out}")
    for p in sorted(out.rglob("*")):
        if p.is_file():
            print(f"  {p.relative_to(out)}  {p.stat().st_size:,} bytes")
    print(f"total {folder_size(out) / 1e6:.2f} MB")
    if args.single_file:
        print(f"wrote single-file checkpoint {write_single_file(out, args.single_file)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
