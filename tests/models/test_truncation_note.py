"""Captions longer than max_token_length are cut by CLIP: the run says so once, with how
many and what to raise (library/models/text_encoding.truncation_note)."""
from __future__ import annotations

from transformers import CLIPTokenizer

from library.models.text_encoding import truncation_note


def test_long_captions_are_counted_once_with_the_fix(tiny_sd15_dir):
    tok = CLIPTokenizer.from_pretrained(tiny_sd15_dir, subfolder="tokenizer")
    short, long = "a toy", " ".join(["toy"] * 3000)
    assert truncation_note(tok, [short, short, ""], 75) is None
    note = truncation_note(tok, [short, long, long, " ".join(["toy"] * 100)], 75)
    n = len(tok(long, add_special_tokens=False).input_ids)
    assert note == (f"2 of 3 distinct captions are longer than max_token_length = 75 tokens "
                    f"and are cut to it (the longest has {n} tokens); set max_token_length = "
                    "225 (75, 150 or 225) to keep more")
    assert "set max_token_length = 150" in truncation_note(tok, [" ".join(["toy"] * 50)], 75)
    assert "225 is the most" in truncation_note(tok, [long], 225)
