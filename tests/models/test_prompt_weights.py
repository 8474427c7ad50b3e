"""weighted_captions (library/models/prompt_weights.py): A1111 attention parsing as
sd-scripts defines it, and the weighting of the text-encoder states (SD1.5 and SDXL)."""
from __future__ import annotations

import pytest
import torch

from library.data.text_cache import text_key
from library.models.prompt_weights import has_comma_in_brackets, parse_weights
from library.models.text_encoding import tokenize_chunks, tokenize_weighted_chunks

P = 1.1
PARSE = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", P), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", P)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", P)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.3 * P * P), (" ", P), ("on", 1.0), (" a ", P),
      ("hill", 0.5 * P), (", sun, ", P), ("sky", P ** 4), (".", P)]),
    ("[low] ((high))", [("low", 1 / P), (" ", 1.0), ("high", P * P)]),
    ("(red hair:1.2), smile", [("red hair", 1.2), (", smile", 1.0)]),
    ("(word: 1.2)", [("word: 1.2", P)]),   # no spaces before a weight, as in sd-scripts
    ("a) b] c:d", [("a) b] c:d", 1.0)]),           # stray closers and colons are text
    ("", [("", 1.0)]),
]


@pytest.mark.parametrize("text, expected", PARSE)
def test_parse_weights(text, expected):
    got = parse_weights(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


@pytest.mark.parametrize("text, expected", [
    ("(red, hair:1.2), smile", True), ("(red hair:1.2), smile", False),
    (r"\(a, b\)", False), ("[a, b]", True)])
def test_comma_in_brackets(text, expected):
    assert has_comma_in_brackets(text) is expected


@pytest.fixture(scope="module")
def comps(tiny_sd15_dir, tiny_sdxl_dir):
    from library.models.loading import load_components
    return {"sd15": load_components(str(tiny_sd15_dir)),
            "sdxl": load_components(str(tiny_sdxl_dir))}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_weighted_tokens_are_the_plain_tokens(family, comps):
    for tok in comps[family].tokenizers:
        ids, weights = tokenize_weighted_chunks(tok, ["a (red:1.5) [star]", "a red star"], 150)
        plain = tokenize_chunks(tok, ["a red star", "a red star"], 150)
        assert torch.equal(ids, plain)
        assert weights[0, 0, :5].tolist() == pytest.approx([1.0, 1.0, 1.5, 1 / P, 1.0])
        assert (weights[1] == 1).all() and (weights[0, 1] == 1).all()


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("max_len", [75, 150])
def test_weighted_states_differ_exactly_where_the_weight_is_not_1(family, max_len, comps):
    c = comps[family]
    words = " ".join(["a"] * 80) if max_len == 150 else "a"
    # "red" sits at merged position 2, and (150 tokens) "blue" at position 82 (chunk 2)
    caption = "a (red:1.5) " + words[2:] + (" (blue:0.5)" if max_len == 150 else "")
    plain_caption = caption.replace("(red:1.5)", "red").replace(" (blue:0.5)", " blue")
    with torch.no_grad():
        w = c.family.encode_prompts(c, [caption], 2, max_len, weighted=True)
        p = c.family.encode_prompts(c, [plain_caption], 2, max_len)
        same = c.family.encode_prompts(c, [plain_caption], 2, max_len, weighted=True)
    hw, hp = w["encoder_hidden_states"][0], p["encoder_hidden_states"][0]
    assert torch.equal(same["encoder_hidden_states"], p["encoder_hidden_states"])
    scaled = {2: 1.5, 82: 0.5} if max_len == 150 else {2: 1.5}
    for pos, factor in scaled.items():
        assert torch.allclose(hw[pos], hp[pos] * factor)
    rest = [i for i in range(hw.shape[0]) if i not in scaled]
    assert torch.equal(hw[rest], hp[rest])
    if family == "sdxl":  # the pooled embedding is not weighted
        assert torch.equal(w["pooled"], p["pooled"])


def test_text_cache_key_knows_weighting():
    args = ("a (red:1.2) star", "sd15", 1, 75, "te", torch.float32)
    assert text_key(*args) != text_key(*args, weighted=True)
    assert text_key(*args) == text_key(*args, weighted=False)
