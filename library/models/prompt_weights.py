"""Weighted captions and prompts (`weighted_captions`): A1111's attention syntax.

    (word)        weight x 1.1            [word]        weight / 1.1
    (word:1.3)    weight x 1.3            nesting       multiplies: ((word)) = 1.21
    \\( \\) \\[ \\] \\\\  literal brackets / backslash
    an unclosed bracket applies to the rest of the text; a stray closing one is text

`parse_weights` turns a caption into (text, weight) runs with the brackets removed;
`weighted_ids` tokenizes each run on its own and gives every token its run's weight, framed
as `BOS tokens EOS PAD...` with weight 1 on the frame. The text encoders see the caption
without the brackets; afterwards each token's hidden state is multiplied by its weight
(`apply_weights`). This is how kohya-ss/sd-scripts weights captions today (its tokenize and
text-encoding strategies): no rescaling of the mean afterwards (the older
`get_weighted_text_embeddings` helper rescaled it; the training scripts no longer use it), and
SDXL's pooled embedding is not weighted.
"""
from __future__ import annotations

import re

import torch

ROUND, SQUARE = 1.1, 1 / 1.1

# One lexical unit per match, tried in this order: an escaped character, an explicit-weight
# closer `:1.3)` (no spaces, as in sd-scripts), a bracket, a run of ordinary characters, a
# lone `:` or `\`.
_UNITS = re.compile(r"\\[()\[\]\\]|:([+-]?[\d.]+)\)|[()\[\]]|[^\\()\[\]:]+|[:\\]")


def parse_weights(text: str) -> list[tuple[str, float]]:
    """Caption -> [(text, weight)], adjacent runs of equal weight merged; never empty."""
    runs: list[list] = []
    open_round: list[int] = []   # index into `runs` where each open bracket starts
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for m in _UNITS.finditer(text):
        unit, explicit = m.group(0), m.group(1)
        if unit[0] == "\\":  # an escape; a lone backslash is dropped, as in A1111
            runs.append([unit[1:], 1.0])
        elif unit == "(":
            open_round.append(len(runs))
        elif unit == "[":
            open_square.append(len(runs))
        elif explicit is not None and open_round:
            try:
                factor = float(explicit)
            except ValueError:   # "(a:1.2.3)": not a number, keep it as text
                runs.append([unit, 1.0])
                continue
            scale(open_round.pop(), factor)
        elif unit == ")" and open_round:
            scale(open_round.pop(), ROUND)
        elif unit == "]" and open_square:
            scale(open_square.pop(), SQUARE)
        else:
            runs.append([unit, 1.0])
    for start in open_round:
        scale(start, ROUND)
    for start in open_square:
        scale(start, SQUARE)
    merged: list[list] = []
    for run in runs:
        if merged and merged[-1][1] == run[1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(t, w) for t, w in merged] or [("", 1.0)]


def weighted_ids(tokenizer, captions: list[str], length: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, weights), each [batch, length]: `BOS tokens EOS PAD...`, the tokens cut
    to `length - 2`, weight 1.0 on BOS, EOS and padding."""
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    all_ids, all_weights = [], []
    for caption in captions:
        runs = parse_weights(caption)
        pieces = tokenizer([t for t, _ in runs], add_special_tokens=False).input_ids
        ids = [i for piece in pieces for i in piece][:length - 2]
        weights = [w for piece, (_, w) in zip(pieces, runs) for _ in piece][:length - 2]
        rest = length - 2 - len(ids)
        all_ids.append([bos] + ids + [eos] + [pad] * rest)
        all_weights.append([1.0] + weights + [1.0] * (rest + 1))
    return torch.tensor(all_ids), torch.tensor(all_weights)


def apply_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Hidden states [batch, L, D] times per-token weights [batch, L]."""
    return hidden * weights.to(hidden.device, hidden.dtype).unsqueeze(-1)


def has_comma_in_brackets(text: str, separator: str = ",") -> bool:
    """True when `separator` occurs inside ( ) or [ ]: shuffling or dropping tags then splits
    a bracket from its partner and the weights go wrong (kohya's advice: no commas inside
    brackets)."""
    depth = 0
    escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch in "([":
            depth += 1
        elif ch in ")]":
            depth = max(0, depth - 1)
        elif depth and text.startswith(separator, i):
            return True
    return False
