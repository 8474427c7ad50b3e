"""Text conditioning per family: max_token_length chunks (kohya semantics), clip_skip and
SDXL's pooled embedding and size/crop time ids."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from library.models.text_encoding import merge_chunks, tokenize_chunks

LONG = " ".join(["a"] * 80)  # 80 single-token words: one chunk is not enough


@pytest.fixture(scope="module")
def toks(folder_components):
    return folder_components["sdxl"].tokenizers  # [pad = EOS, pad = "!"]


def test_chunk_framing_pad_is_eos(toks):
    t = toks[0]
    bos, eos, a = t.bos_token_id, t.eos_token_id, t.convert_tokens_to_ids("a</w>")
    ids = tokenize_chunks(t, [LONG], 150)[0]
    assert ids.tolist() == [[bos] + [a] * 75 + [eos],
                            [bos] + [a] * 5 + [eos] * 71]


def test_chunk_framing_pad_is_not_eos(toks):
    # SDXL's second tokenizer pads with "!": a chunk cut mid-caption still ends in EOS,
    # and an empty chunk starts BOS EOS (kohya's rules)
    t = toks[1]
    bos, eos, pad, a = t.bos_token_id, t.eos_token_id, t.pad_token_id, \
        t.convert_tokens_to_ids("a</w>")
    assert pad != eos
    ids = tokenize_chunks(t, [LONG, "a"], 225)
    assert ids.shape == (2, 3, 77)
    assert ids[0].tolist() == [[bos] + [a] * 75 + [eos],
                               [bos] + [a] * 5 + [eos] + [pad] * 70,
                               [bos, eos] + [pad] * 75]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_75_tokens_is_the_plain_encoding(family, folder_components):
    c = folder_components[family]
    captions = ["a photo of a cat", LONG]
    with torch.no_grad():
        got = c.family.encode_prompts(c, captions, max_token_length=75)
        states = []
        for te, tok in zip(c.text_encoders, c.tokenizers):
            ids = tok(captions, padding="max_length", max_length=77, truncation=True,
                      return_tensors="pt").input_ids
            out = te(ids, output_hidden_states=True)
            states.append(out.last_hidden_state if family == "sd15" else out.hidden_states[-2])
    assert torch.equal(got["encoder_hidden_states"], torch.cat(states, dim=-1))
    if family == "sdxl":
        assert torch.equal(got["pooled"], out.text_embeds)


@pytest.mark.parametrize("family, width", [("sd15", 32), ("sdxl", 64)])
@pytest.mark.parametrize("max_len, seq", [(75, 77), (150, 152), (225, 227)])
def test_shapes(family, width, max_len, seq, folder_components):
    c = folder_components[family]
    with torch.no_grad():
        got = c.family.encode_prompts(c, ["red", LONG], max_token_length=max_len, clip_skip=2)
    assert got["encoder_hidden_states"].shape == (2, seq, width)
    if family == "sdxl":
        assert got["pooled"].shape == (2, 32)
    # the UNet takes any number of context tokens
    batch = {"original_size": [[64, 64]] * 2, "crop_top_left": [[0, 0]] * 2,
             "target_size": [[64, 64]] * 2}
    with torch.no_grad():
        out = c.unet(torch.zeros(2, 4, 8, 8), 5, got["encoder_hidden_states"],
                     **c.family.unet_inputs(got, batch)).sample
    assert out.shape == (2, 4, 8, 8)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_long_captions_use_their_tail_and_short_ones_keep_their_head(family,
                                                                    folder_components):
    c = folder_components[family]
    tail = LONG + " blue"
    with torch.no_grad():
        e75 = c.family.encode_prompts(c, ["red cat", LONG, tail], max_token_length=75)
        e150 = c.family.encode_prompts(c, ["red cat", LONG, tail], max_token_length=150)
    h75, h150 = e75["encoder_hidden_states"], e150["encoder_hidden_states"]
    # the first chunk of a 150-token encoding is the 77-token encoding minus its last state
    # (close, not equal: a batch of 6 rows instead of 3 may take other matmul kernels)
    assert torch.allclose(h150[:, :76], h75[:, :76], atol=1e-5, rtol=1e-5)
    assert torch.equal(h75[1], h75[2])          # 75 tokens cannot see "blue" at 81
    assert not torch.equal(h150[1], h150[2])    # 150 can
    if family == "sdxl":
        assert torch.allclose(e150["pooled"], e75["pooled"], atol=1e-5, rtol=1e-5)


def test_merge_chunks_order():
    h = torch.arange(2 * 77, dtype=torch.float32).reshape(2, 77, 1)  # one caption, 2 chunks
    merged = merge_chunks(h, 2)[0, :, 0].tolist()
    assert merged == [0.0] + list(range(1, 76)) + list(range(78, 153)) + [153.0]


def test_sdxl_time_ids_for_a_known_crop(folder_components, tmp_path):
    """A 300x200 image trained at 64x64 without buckets: scaled to 96x64, centre crop at
    left 16 -> time ids (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
    from library.data.dataset import DataOptions, DataSet
    from library.data.sources import Item
    img = tmp_path / "wide.png"
    Image.new("RGB", (300, 200), (200, 30, 30)).save(img)
    item = Item(image=img, caption="red", repeats=1, is_reg=False, folder="1_red",
                caption_found=True)
    ds = DataSet([item], DataOptions(resolution=(64, 64), batch_size=1), seed=0)
    batch = ds.collate([0], 0, 0)
    c = folder_components["sdxl"]
    with torch.no_grad():
        cond = c.family.encode_prompts(c, batch["captions"])
    kwargs = c.family.unet_inputs(cond, batch)["added_cond_kwargs"]
    assert kwargs["time_ids"].tolist() == [[200.0, 300.0, 0.0, 16.0, 64.0, 64.0]]
    assert kwargs["time_ids"].dtype == cond["pooled"].dtype
    assert torch.equal(kwargs["text_embeds"], cond["pooled"])
