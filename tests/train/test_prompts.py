"""Sample prompt files (library/train/prompts.py) and the sampler registry (samplers.py)."""
from __future__ import annotations

import json

import pytest

from library.train import samplers
from library.train.prompts import PromptSpec, a1111_parameters, load_prompts, parse_line

DEFAULTS = dict(width=512, height=512)

# line -> the fields it sets
LINES = [
    ("a cat", {"prompt": "a cat"}),
    ("a cat --w 640 --h 768", {"prompt": "a cat", "width": 640, "height": 768}),
    ("a cat --n lowres, blurry hands --d 7", {"prompt": "a cat",
                                               "negative_prompt": "lowres, blurry hands",
                                               "seed": 7}),
    ("a cat --l 4.5 --s 12 --ss euler_a", {"prompt": "a cat", "scale": 4.5, "steps": 12,
                                            "sampler": "euler_a"}),
    ("a cat --ss K_EULER_A", {"prompt": "a cat", "sampler": "euler_a"}),
    ("a cat --ss dpmsolver++", {"prompt": "a cat", "sampler": "dpm++_2m"}),
    ("a cat --W 100", {"prompt": "a cat", "width": 96}),  # rounded down to /8, as kohya
    ("a cat --n", {"prompt": "a cat", "negative_prompt": ""}),
    ("a well-drawn cat, a--b", {"prompt": "a well-drawn cat, a--b"}),
    ("a cat --n ugly --no-style", {"prompt": "a cat", "negative_prompt": "ugly --no-style"}),
]


@pytest.mark.parametrize("line,expected", LINES)
def test_parse_line(line, expected):
    assert parse_line(line) == expected


BAD_LINES = [
    ("a cat --x 3", "--x: unknown option"),
    ("a cat --w wide", "--w 'wide': expected an integer from 8 to 4096"),
    ("a cat --h 4", "--h '4': expected an integer from 8 to 4096"),
    ("a cat --s 0", "--s '0': expected an integer from 1 to 1000"),
    ("a cat --l -1", "--l '-1': expected a number >= 0"),
    ("a cat --d 1.5", "--d '1.5': expected an integer >= 0"),
    ("a cat --s", "--s: needs a value"),
    ("a cat --ss warp", "unknown sampler 'warp'; expected one of: ddim,"),
]


@pytest.mark.parametrize("line,message", BAD_LINES)
def test_txt_errors_name_file_line_and_option(tmp_path, line, message):
    f = tmp_path / "p.txt"
    f.write_text(f"# header\n\nfine prompt\n{line}\n")
    with pytest.raises(ValueError) as e:
        load_prompts(f, **DEFAULTS)
    assert str(e.value).startswith(f"{f}:4: ")
    assert message in str(e.value)


def test_txt_file_defaults_and_seeds(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# comment\n\n  first --d 5\n   # indented comment\nsecond --w 64 --ss heun\n"
                 "third\n")
    specs = load_prompts(f, width=1024, height=1024, sampler="DDIM", base_seed=100)
    assert specs == [
        PromptSpec("first", "", 1024, 1024, 5, 7.5, 30, "ddim"),
        PromptSpec("second", "", 64, 1024, 101, 7.5, 30, "heun"),
        PromptSpec("third", "", 1024, 1024, 102, 7.5, 30, "ddim"),
    ]
    assert load_prompts(f, **DEFAULTS)[1].seed is None  # no base seed: left to the caller


def test_empty_prompt_and_empty_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("ok\n--w 64\n")
    with pytest.raises(ValueError, match=r"p.txt:2: empty prompt"):
        load_prompts(f, **DEFAULTS)
    f.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no prompts found"):
        load_prompts(f, **DEFAULTS)


TOMLS = {
    "array of tables": """
[[prompt]]
prompt = "a dog"
negative_prompt = "blurry"
width = 768
seed = 3

[[prompt]]
prompt = "a cat"
sample_steps = 12
sample_sampler = "k_euler"
scale = 5
""",
    "list": """
prompt = [
  {prompt = "a dog", negative_prompt = "blurry", width = 768, seed = 3},
  "a cat --s 12 --ss k_euler --l 5",
]
""",
    "kohya subset": """
[prompt]
scale = 5
sample_steps = 12

[[prompt.subset]]
prompt = "a dog"
negative_prompt = "blurry"
width = 768
seed = 3
sample_steps = 30
scale = 7.5

[[prompt.subset]]
prompt = "a cat"
sample_sampler = "euler"
""",
}
EXPECTED = [PromptSpec("a dog", "blurry", 768, 512, 3, 7.5, 30, "ddim"),
            PromptSpec("a cat", "", 512, 512, 11, 5.0, 12, "euler")]


@pytest.mark.parametrize("layout", sorted(TOMLS))
def test_toml_layouts(tmp_path, layout):
    f = tmp_path / "p.toml"
    f.write_text(TOMLS[layout])
    assert load_prompts(f, **DEFAULTS, base_seed=10) == EXPECTED


def test_json_objects_and_strings(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps([
        {"prompt": "a dog", "negative_prompt": "blurry", "width": 768, "seed": 3},
        "a cat --s 12 --ss k_euler --l 5"]))
    assert load_prompts(f, **DEFAULTS, base_seed=10) == EXPECTED


@pytest.mark.parametrize("suffix,text,message", [
    (".toml", '[[prompt]]\nprompt = "a"\n[[prompt]]\nprompt = "b"\nwidht = 64\n',
     "p.toml: prompt 2: widht: unknown key; valid keys: prompt,"),
    (".toml", '[[prompt]]\nprompt = "a"\nwidth = "big"\n',
     "p.toml: prompt 1: width = 'big': expected an integer from 8 to 4096"),
    (".toml", '[[prompt]\n', "p.toml: not valid TOML"),
    (".json", '[{"prompt": "a", "seed": -1}]', "p.json: prompt 1: seed = -1: expected an "
     "integer >= 0"),
    (".json", '[{"prompt": "a", "sample_steps": true}]', "sample_steps = True: expected"),
    (".json", '[3]', "p.json: prompt 1: expected a table/object or a string, got int"),
    (".json", '{"prompts": []}', "expected a `prompt` list"),
    (".json", '[{"prompt": "a",]', "p.json: not valid JSON"),
])
def test_table_errors(tmp_path, suffix, text, message):
    f = tmp_path / f"p{suffix}"
    f.write_text(text)
    with pytest.raises(ValueError) as e:
        load_prompts(f, **DEFAULTS)
    assert message in str(e.value)


def test_a1111_parameters():
    spec = PromptSpec("a cat", "blurry", 64, 128, 5, 7.5, 20, "dpm++_2m_karras")
    assert a1111_parameters(spec, "tiny-sd15", {"LoRA": "t"}) == (
        "a cat\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, "
        "Seed: 5, Size: 64x128, Model: tiny-sd15, LoRA: t")
    assert a1111_parameters(PromptSpec("a", seed=1)).startswith("a\nSteps: 30, Sampler: DDIM")


# ---- sampler registry ----------------------------------------------------------------------
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                    "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
                    "steps_offset": 1, "timestep_spacing": "leading", "clip_sample": False}


@pytest.mark.parametrize("name", samplers.SAMPLER_NAMES)
def test_every_sampler_builds(name):
    import importlib.util

    import diffusers
    needs = samplers.SAMPLERS[samplers.ALIASES.get(name, name)].needs
    if needs and importlib.util.find_spec(needs) is None:
        with pytest.raises(ValueError, match=f"needs the {needs} package"):
            samplers.canonical(name)
        return
    sched = samplers.make_scheduler(name.upper(), SCHEDULER_CONFIG)
    spec = samplers.SAMPLERS[samplers.canonical(name)]
    assert type(sched) is getattr(diffusers, spec.scheduler)
    for k, v in spec.kwargs.items():
        assert sched.config[k] == v
    assert sched.config.beta_schedule == "scaled_linear"
    sched.set_timesteps(4)


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(ValueError) as e:
        samplers.canonical("dpm++ 2m")
    assert "dpm++_2m_karras" in str(e.value) and "k_euler_a" in str(e.value)


def test_schema_accepts_registry_names():
    from library.config.schema import SampleConfig
    from dataclasses import fields
    choices = {f.name: f.metadata["choices"] for f in fields(SampleConfig)}["sample_sampler"]
    assert set(choices) == set(samplers.SAMPLER_NAMES)
