"""Sample prompts are encoded by the family code that encodes training captions (kohya's
clip_skip, max_token_length chunks, weighted captions) and handed to the pipeline as
embeddings; a clip_skip 2 run samples (the pipelines' own clip_skip crashed under
transformers 5)."""
from __future__ import annotations

import pytest
import torch

from library.models.loading import load_components
from library.train.conditioning import TextConditioner
from library.train.prompts import PromptSpec
from library.train.sampling import make_pipeline, prompt_embeds, render
from tests.test_train_e2e import train
from tools.generate import main as generate_main

LONG = ", ".join(f"tag{i}" for i in range(60))  # ~120 tokens: needs max_token_length 150


@pytest.fixture(scope="module")
def comps(tiny_sd15_dir, tiny_sdxl_dir):
    return {"sd15": load_components(str(tiny_sd15_dir)),
            "sdxl": load_components(str(tiny_sdxl_dir))}


def spec(prompt: str, negative: str = "") -> PromptSpec:
    return PromptSpec(prompt, negative, 64, 64, 3, 7.5, 2, "euler_a")


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("clip_skip", [1, 2])
def test_embeds_equal_training_conditioning_and_render(family, clip_skip, comps):
    c = comps[family]
    cond = TextConditioner(c, c.family, clip_skip, train_text_encoder=False, keep_cache=False)
    got = prompt_embeds(c, spec("a red star", "blurry"), clip_skip=clip_skip)
    pos, neg = cond(["a red star"]), cond(["blurry"])
    assert torch.equal(got["prompt_embeds"], pos["encoder_hidden_states"])
    assert torch.equal(got["negative_prompt_embeds"], neg["encoder_hidden_states"])
    if family == "sdxl":
        assert torch.equal(got["pooled_prompt_embeds"], pos["pooled"])
        assert torch.equal(got["negative_pooled_prompt_embeds"], neg["pooled"])
    other = prompt_embeds(c, spec("a red star", "blurry"), clip_skip=3 - clip_skip)
    assert not torch.equal(other["prompt_embeds"], got["prompt_embeds"])
    if clip_skip == 2:  # the case the pipelines' own clip_skip crashed on
        pipe, base = make_pipeline(c)
        images = render(pipe, base, spec("a red star", "blurry"), [3, 4], c, clip_skip=2)
        assert images.shape == (2, 64, 64, 3) and images.dtype.name == "float32"


def test_sdxl_empty_negative_is_zeros_sd15_encodes_it(comps):
    """As the pipelines do by default: SDXL zeros an empty negative prompt
    (force_zeros_for_empty_prompt), SD1.5 encodes "" (here with the run's clip_skip too)."""
    xl = prompt_embeds(comps["sdxl"], spec("a star"), clip_skip=2)
    assert not xl["negative_prompt_embeds"].any() and not xl["negative_pooled_prompt_embeds"].any()
    c = comps["sd15"]
    sd = prompt_embeds(c, spec("a star"), clip_skip=2)
    assert torch.equal(sd["negative_prompt_embeds"],
                       c.family.encode_prompts(c, [""], 2)["encoder_hidden_states"])


@pytest.mark.parametrize("family, width", [("sd15", 32), ("sdxl", 64)])
def test_long_prompt_samples_with_150_tokens(family, width, comps):
    c = comps[family]
    got = prompt_embeds(c, spec(LONG, "blurry"), clip_skip=2, max_token_length=150)
    assert got["prompt_embeds"].shape == (1, 152, width)
    assert got["negative_prompt_embeds"].shape == (1, 152, width)
    pipe, base = make_pipeline(c)
    images = render(pipe, base, spec(LONG), [0], c, clip_skip=2, max_token_length=150)
    assert images.shape == (1, 64, 64, 3)


def test_weighted_prompt_embeds(comps):
    c = comps["sd15"]
    plain = prompt_embeds(c, spec("a red star"))["prompt_embeds"]
    weighted = prompt_embeds(c, spec("a (red:1.5) star"), weighted=True)["prompt_embeds"]
    # tokens: BOS a red star EOS ...: only "red" (position 2) is scaled
    assert torch.allclose(weighted[0, 2], plain[0, 2] * 1.5)
    others = [i for i in range(77) if i != 2]
    assert torch.equal(weighted[0, others], plain[0, others])


def test_training_with_clip_skip_2_writes_samples(tmp_path, tiny_sd15_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a purple star --n blurry --w 64 --h 64 --s 2\n{LONG} --w 64 --h 64 "
                       "--s 2\n")
    rc, out = train(tmp_path, tiny_sd15_dir, "--clip_skip", "2", "--max_token_length", "150",
                    "--sample_every_n_steps", "2", "--sample_prompts", str(prompts), steps=2)
    assert rc == 0
    assert sorted(p.name for p in (out / "sample").glob("*.png")) == [
        "t_s000002_e001_00.png", "t_s000002_e001_01.png"]


def test_generate_cli_clip_skip_2(tiny_sdxl_dir, tmp_path):
    rc = generate_main(["--model", str(tiny_sdxl_dir), "--prompt", "a (red:1.2) star",
                        "--clip_skip", "2", "--weighted_captions", "--max_token_length", "150",
                        "--steps", "2", "--width", "64", "--height", "64", "--device", "cpu",
                        "--out", str(tmp_path / "gen")])
    assert rc == 0
    assert [p.name for p in (tmp_path / "gen").glob("*.png")] == ["00000-0.png"]
