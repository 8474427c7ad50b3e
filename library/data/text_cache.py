"""Text-encoder output caches: each distinct caption encoded once, in memory and optionally
on disk (`cache_text_encoder_outputs`, `cache_text_encoder_outputs_to_disk`).

Valid only with frozen text encoders (the config check enforces it), so the outputs of a
caption never change during the run. Before training, every caption the run can see that does
not change per sample (``static_captions``: training and validation items, plus "" when
caption dropout can produce it) is encoded, `batch_size` captions per text-encoder call; a
caption that turns up later (wildcards, shuffling in a kohya dataset TOML subset) is still
encoded when first seen and kept in memory only.

A disk entry is content-addressed like a latent entry (library/data/cache.py), so a changed
input can never be served stale outputs:

    sha256(format version, caption text, family name, clip_skip, max_token_length,
           text-encoder identity, dtype of the outputs[, "weighted" with weighted_captions])

The text-encoder identity (``text_encoder_identity``) hashes each encoder's
``module_identity`` (its config without bookkeeping entries, and the shape and a strided
sample of every weight tensor, so a LoRA merged into the middle layers changes it) and each
tokenizer's class, vocabulary and special tokens.

Files: `<cache_dir>/te_<key>.npz` with `cache_dir`, else `<train_data_dir>/.tomlora_te_cache/
te_<key>.npz` (with a kohya `dataset_config`: in the first training image's folder). kohya
writes `<image>_te_outputs.npz` beside each image; ours is per caption, and images sharing a
caption share one file. Each holds the full `key` (checked on load) and every tensor of the
family's encoder output (`encoder_hidden_states`; SDXL also `pooled`) in float32; loaded
tensors are cast back to the dtype and device the text encoders produce. Files are written
to a temp name and renamed; a torn or foreign file is re-encoded and rewritten.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from library.data.cache import module_identity, read_entry, write_arrays
from library.data.captions import process_caption

TE_CACHE_VERSION = 1
TE_CACHE_FOLDER = ".tomlora_te_cache"


def tokenizer_identity(tok) -> str:
    """A short hash of a tokenizer's vocabulary, special tokens and length limit."""
    h = hashlib.sha256()
    h.update(json.dumps([type(tok).__name__, tok.model_max_length, str(tok.bos_token),
                         str(tok.eos_token), str(tok.pad_token)]).encode())
    h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    return h.hexdigest()[:16]


def text_encoder_identity(components) -> str:
    """A short hash that changes when any text encoder's config or weights, or any
    tokenizer, change."""
    parts = [module_identity(te, every_tensor=True) for te in components.text_encoders]
    parts += [tokenizer_identity(tok) for tok in components.tokenizers]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def text_key(caption: str, family: str, clip_skip: int, max_token_length: int, te_id: str,
             dtype: torch.dtype, weighted: bool = False) -> str:
    parts = [TE_CACHE_VERSION, caption, family, int(clip_skip), int(max_token_length), te_id,
             str(dtype)]
    if weighted:  # weighted_captions parse the same text differently (unweighted keys stay)
        parts.append("weighted")
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def text_cache_folder(d, items) -> Path:
    """Where the disk entries go: `cache_dir`, else a hidden folder in `train_data_dir` (or,
    with a kohya dataset_config, in the first training image's folder). The source scan
    skips hidden folders, so it is never read as a subset."""
    if d.cache_dir:
        return Path(d.cache_dir)
    if d.train_data_dir and not d.dataset_config:
        return Path(d.train_data_dir) / TE_CACHE_FOLDER
    first = next((i for i in items if not i.is_reg), items[0])
    return Path(first.image).parent / TE_CACHE_FOLDER


def static_caption(item) -> str | None:
    """The caption every sample of `item` gets when caption dropout does not hit, or None when
    it changes per sample (shuffle, tag dropout, token warmup, wildcard choices)."""
    o = item.opts
    text = item.caption
    if o.shuffle_caption or o.caption_tag_dropout_rate > 0 or o.token_warmup_step > 0:
        return None
    if o.enable_wildcard and ("\n" in text or any(
            brace in part for brace in "{}" for part in (text, o.caption_prefix,
                                                         o.caption_suffix))):
        return None
    return process_caption(text, rng=random.Random(0), keep_tokens=o.keep_tokens,
                           separator=o.caption_separator,
                           keep_tokens_separator=o.keep_tokens_separator,
                           secondary_separator=o.secondary_separator,
                           prefix=o.caption_prefix, suffix=o.caption_suffix)


def static_captions(*datas) -> list[str]:
    """The distinct static captions of the items of each DataGroup / DataSet (None skipped),
    in first-seen order; "" too when some item's caption dropout can produce it."""
    out: dict[str, None] = {}
    for data in datas:
        if data is None:
            continue
        for item in data.items:
            text = static_caption(item)
            if text is not None:
                out[text] = None
            if item.opts.caption_dropout_rate > 0 or item.opts.caption_dropout_every_n_epochs:
                out[""] = None
    return list(out)


@dataclass
class TextCacheStats:
    encoded: int = 0     # captions encoded now
    from_disk: int = 0   # entries read from valid cache files
    in_memory: int = 0   # already cached in memory (skipped)

    def summary(self) -> str:
        return (f"text-encoder cache: {self.encoded} encoded, {self.from_disk} read from "
                f"disk, {self.in_memory} already in memory")


@torch.no_grad()
def cache_text_encoder_outputs(conditioning, captions: list[str], *, to_disk: bool = False,
                               folder: Path | None = None, batch_size: int = 1,
                               progress: bool = True) -> TextCacheStats:
    """Fill `conditioning.cache` (a TextConditioner's: caption -> {name: tensor}) with the
    outputs of every caption of `captions`. With `to_disk`, valid files in `folder` are read
    instead of encoding, and new outputs are written there."""
    from tqdm.auto import tqdm
    stats = TextCacheStats()
    c = conditioning.c
    te = c.text_encoders[0]
    dtype, device = te.dtype, te.device
    te_id = text_encoder_identity(c) if to_disk else ""
    pending: list[tuple[str, Path | None, str | None]] = []
    for text in dict.fromkeys(captions):
        if text in conditioning.cache:
            stats.in_memory += 1
            continue
        key = path = None
        if to_disk:
            key = text_key(text, conditioning.family.name, conditioning.clip_skip,
                           conditioning.max_token_length, te_id, dtype,
                           getattr(conditioning, "weighted", False))
            path = Path(folder) / f"te_{key}.npz"
            entry = read_entry(path, key)
            tensors = {k: v for k, v in (entry or {}).items() if k != "key"}
            if tensors:
                conditioning.cache[text] = {k: torch.from_numpy(v).to(device, dtype)
                                            for k, v in tensors.items()}
                stats.from_disk += 1
                continue
        pending.append((text, path, key))
    bar = tqdm(total=len(pending), desc="caching text-encoder outputs",
               disable=not progress or not pending)
    for j in range(0, len(pending), batch_size):
        chunk = pending[j:j + batch_size]
        outputs = conditioning.encode([text for text, _, _ in chunk])
        for (text, path, key), out in zip(chunk, outputs):
            conditioning.cache[text] = out
            if to_disk:
                write_arrays(path, key, out)
        stats.encoded += len(chunk)
        bar.update(len(chunk))
    bar.close()
    return stats
