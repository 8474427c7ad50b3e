"""Captions longer than CLIP's 77 tokens, by 75-token chunks (kohya's `max_token_length`).

A caption is tokenized to `max_token_length + 2` tokens, cut into chunks of 75, each chunk
framed as `BOS <75 tokens> EOS/PAD` (77, CLIP's window) and encoded on its own. The hidden
states are put back together as `BOS state of chunk 1, the 75 inner states of every chunk,
last state of the last chunk`: 77, 152 or 227 positions. With 75 this is exactly the plain
77-token encoding. SDXL's pooled embedding comes from the first chunk.
"""
from __future__ import annotations

import torch

CHUNK = 75
ALLOWED = (75, 150, 225)


def chunk_count(max_token_length: int) -> int:
    if max_token_length not in ALLOWED:
        raise ValueError(f"max_token_length must be one of {ALLOWED}, got {max_token_length}")
    return max_token_length // CHUNK


def tokenize_chunks(tokenizer, captions: list[str], max_token_length: int = 75
                    ) -> torch.Tensor:
    """Token ids [batch, chunks, 77]."""
    n = chunk_count(max_token_length)
    window = tokenizer.model_max_length - 2
    ids = tokenizer(captions, padding="max_length", max_length=window * n + 2,
                    truncation=True, return_tensors="pt").input_ids
    return split_chunks(tokenizer, ids, n)


def tokenize_weighted_chunks(tokenizer, captions: list[str], max_token_length: int = 75
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """`weighted_captions`: (token ids, weights), each [batch, chunks, 77]; the attention
    brackets are parsed out of the text (library/models/prompt_weights.py). The weights of a
    chunk's frame (BOS, last) are 1."""
    from library.models.prompt_weights import weighted_ids
    n = chunk_count(max_token_length)
    window = tokenizer.model_max_length - 2
    ids, weights = weighted_ids(tokenizer, captions, window * n + 2)
    if n == 1:
        return ids[:, None], weights[:, None]
    ones = torch.ones_like(weights[:, :1])
    chunks = [torch.cat([ones, weights[:, 1 + k * window: 1 + (k + 1) * window], ones], dim=1)
              for k in range(n)]
    return split_chunks(tokenizer, ids, n), torch.stack(chunks, dim=1)


def split_chunks(tokenizer, ids: torch.Tensor, n: int) -> torch.Tensor:
    """[batch, n * 75 + 2] framed ids -> [batch, n, 77] (see the module docstring)."""
    if n == 1:
        return ids[:, None]
    window = tokenizer.model_max_length - 2
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    bos, last = ids[:, :1], ids[:, -1:]
    chunks = []
    for k in range(n):
        chunk = torch.cat([bos, ids[:, 1 + k * window: 1 + (k + 1) * window], last], dim=1)
        if pad != eos:
            # With a pad token other than EOS (SDXL's second tokenizer) a chunk that ends
            # mid-caption must still end in EOS, which the pooled output is read from; and an
            # empty chunk (BOS PAD PAD ...) becomes BOS EOS PAD ..., as CLIP saw in training.
            cut = (chunk[:, -2] != eos) & (chunk[:, -2] != pad)
            chunk[cut, -1] = eos
            chunk[chunk[:, 1] == pad, 1] = eos
        chunks.append(chunk)
    return torch.stack(chunks, dim=1)


def chunk_ids(tokenizer, captions: list[str], max_token_length: int, weighted: bool
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ids [batch, chunks, 77], weights of the same shape or None without weighting)."""
    if weighted:
        return tokenize_weighted_chunks(tokenizer, captions, max_token_length)
    return tokenize_chunks(tokenizer, captions, max_token_length), None


def weigh(merged: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Merged hidden states [batch, L, D] times the chunk weights [batch, n, 77] merged the
    same way (no-op without weights)."""
    if weights is None:
        return merged
    from library.models.prompt_weights import apply_weights
    n = weights.shape[1]
    flat = weights.reshape(-1, weights.shape[-1], 1)
    return apply_weights(merged, merge_chunks(flat, n)[..., 0])


def merge_chunks(hidden: torch.Tensor, n: int) -> torch.Tensor:
    """[batch * n, 77, D] -> [batch, n * 75 + 2, D] (see the module docstring)."""
    if n == 1:
        return hidden
    b = hidden.shape[0] // n
    h = hidden.reshape(b, n, hidden.shape[1], hidden.shape[2])
    inner = h[:, :, 1:-1].reshape(b, -1, hidden.shape[2])
    return torch.cat([h[:, 0, :1], inner, h[:, -1, -1:]], dim=1)


def first_chunk(pooled: torch.Tensor, n: int) -> torch.Tensor:
    """[batch * n, D] -> [batch, D]: each caption's first chunk."""
    return pooled.reshape(-1, n, pooled.shape[-1])[:, 0]


def truncation_note(tokenizer, captions, max_token_length: int) -> str | None:
    """One line for the log when captions are longer than `max_token_length` tokens (they are
    cut to it in training), saying how many and what to raise; None when none are."""
    texts = sorted({c for c in captions if c})
    if not texts:
        return None
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False,
                                             truncation=False, verbose=False).input_ids]
    long = [n for n in lengths if n > max_token_length]
    if not long:
        return None
    fix = (f"set max_token_length = {next(a for a in ALLOWED if a >= min(max(long), 225))} "
           "(75, 150 or 225) to keep more" if max_token_length < ALLOWED[-1] else
           "225 is the most CLIP captions can use here; shorten them")
    return (f"{len(long)} of {len(texts)} distinct captions are longer than max_token_length "
            f"= {max_token_length} tokens and are cut to it (the longest has {max(long)} "
            f"tokens); {fix}")
