"""The optimizer registry: every entry steps on the CPU (or names its pip package), kohya's
names resolve in any case, optimizer_args are typed and checked."""
from __future__ import annotations

import importlib
import inspect
import logging
import math

import pytest
import torch

from library.train import optimizers as O
from tests.networks.helpers import one_thread  # noqa: F401  (tiny tensors: one thread)
from library.train.optimizer_args import numbers
from library.train.schedulers import scheduler_from_config
from library.config.schema import OptimizerConfig

# lr per optimizer; adaptive ones take a multiplier near 1.
LR = {name: 1.0 for name, spec in O.OPTIMIZERS.items() if spec.adaptive}
STEPS = 8  # RAdamScheduleFree makes no update in its first steps (rectification warm-up)


def _params():
    # 64 x 128 = 8192 elements: above bitsandbytes' min_8bit_size (4096), so the 8-bit
    # optimizers really keep 8-bit state.
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(64, 128)), torch.nn.Parameter(torch.randn(128))]


def _step(opt, params):
    before = [p.detach().clone() for p in params]
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, 0.5 if i == 0 else -0.5)
    opt.step()
    return [float((p.detach() - b).abs().max()) for p, b in zip(params, before)]


def _lora():
    """One real LoRA module on a Linear, up and down above min_8bit_size (8192, 6144)."""
    from networks.lora import LoRAModule
    torch.manual_seed(0)
    m = LoRAModule("lora_unet_x", torch.nn.Linear(128, 96), rank=64, alpha=64)
    m.attach()
    return m


@pytest.mark.parametrize("name", list(O.OPTIMIZERS))
def test_every_optimizer_trains_a_lora_module(name):
    """A few steps of a real LoRA module fitting a target: every weight moves, every loss is
    finite. Paged optimizers run on the CPU too (bitsandbytes falls back to unpaged state)."""
    spec = O.OPTIMIZERS[name]
    m = _lora()
    params = [m.lora_down.weight, m.lora_up.weight]
    lr = LR.get(name, 1e-3)
    groups = [{"params": params[:1], "lr": lr, "name": "lora_unet"},
              {"params": params[1:], "lr": lr, "name": "lora_te"}]
    hint = O.install_hint(spec)
    if hint:  # requirements.txt installs every optional package; this guards a bare venv
        assert f"pip install {spec.pip}" in hint and spec.name in hint
        with pytest.raises(RuntimeError, match=f"pip install {spec.pip}"):
            O.make_optimizer(name, groups, lr, {})
        pytest.skip(hint)
    opt = O.make_optimizer(name, groups, lr, {})
    before = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(1)
    x, target = torch.randn(16, 128, generator=g), torch.randn(16, 96, generator=g)
    losses = []
    for _ in range(STEPS):
        loss = torch.nn.functional.mse_loss(m.base(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses), f"{name}: {losses}"
    moved = [float((p.detach() - b).abs().max()) for p, b in zip(params, before)]
    assert all(c > 0 for c in moved), f"{name} left a LoRA weight unchanged: {moved}"
    if name.endswith("8bit"):
        assert opt.state[params[0]]["state1"].dtype == torch.uint8, "8-bit state is 32-bit"


def test_missing_optional_packages_give_the_pip_command():
    missing = [s for s in O.OPTIMIZERS.values() if O.install_hint(s)]
    for spec in missing:
        assert O.install_hint(spec).endswith(f"pip install {spec.pip}")
    # the four optional packages map to their pip names
    pips = {s.name: s.pip for s in O.OPTIMIZERS.values()}
    assert (pips["Prodigy"], pips["DAdaptAdam"], pips["AdamWScheduleFree"], pips["CAME"]) == \
        ("prodigyopt", "dadaptation", "schedulefree", "came-pytorch")


@pytest.mark.parametrize("spelling, canonical", [
    ("adamw", "AdamW"), ("adamw8bit", "AdamW8bit"), ("AdamW8bit", "AdamW8bit"),
    ("pagedadamw8bit", "PagedAdamW8bit"), ("LION8BIT", "Lion8bit"), ("lion", "Lion"),
    ("sgdnesterov", "SGDNesterov"), ("AdaFactor", "Adafactor"),
    ("DAdaptation", "DAdaptAdamPreprint"),  # kohya's meaning of the old name
    ("dadaptadam", "DAdaptAdam"), ("prodigy", "Prodigy"),
    ("adamwschedulefree", "AdamWScheduleFree"), ("came", "CAME"),
])
def test_kohya_names_resolve_case_insensitively(spelling, canonical):
    assert O.resolve(spelling).name == canonical


def test_unknown_optimizer_lists_the_valid_names():
    with pytest.raises(ValueError, match="'Adam9' is unknown; expected one of: AdamW, AdamW8bit"):
        O.resolve("Adam9")


@pytest.mark.parametrize("name, args, expected", [
    ("AdamW", {"betas": "0.9,0.99", "weight_decay": "0.01", "amsgrad": "true"},
     {"betas": (0.9, 0.99), "weight_decay": 0.01, "amsgrad": True}),
    ("AdamW8bit", {"betas": [0.8, 0.9], "eps": 1e-6, "min_8bit_size": 16.0},
     {"betas": (0.8, 0.9), "eps": 1e-6, "min_8bit_size": 16}),
    ("CAME", {"betas": "(0.9, 0.999, 0.9999)"}, {"betas": (0.9, 0.999, 0.9999)}),
    ("Adafactor", {"beta1": "none", "relative_step": False},
     {"beta1": None, "relative_step": False}),
    ("SGDNesterov", {}, {"momentum": 0.9}),            # kohya's default momentum
    ("SGDNesterov", {"momentum": 0.5}, {"momentum": 0.5}),
])
def test_optimizer_args_are_typed(name, args, expected):
    assert O.typed_args(name, args) == expected


@pytest.mark.parametrize("name, args, fragments", [
    ("AdamW", {"decouple": True},
     ["optimizer_args: 'decouple' is not an argument of AdamW",
      "accepted: betas, eps, weight_decay, amsgrad, fused, foreach, maximize"]),
    ("Lion8bit", {"beta": [0.9, 0.99]}, ["'beta' is not an argument of Lion8bit",
                                         "(did you mean betas?)"]),
    ("AdamW", {"lr": 1e-3}, ["'lr' is not an argument of AdamW (set learning_rate instead)"]),
    ("AdamW", {"betas": "abc"}, ["optimizer_args: betas for AdamW: expected 2 numbers"]),
    ("AdamW", {"weight_decay": True}, ["weight_decay for AdamW: expected a number"]),
    ("Adafactor", {"relative_step": "maybe"}, ["relative_step for Adafactor: expected true"]),
])
def test_bad_optimizer_args_are_rejected_with_the_accepted_ones(name, args, fragments):
    with pytest.raises(ValueError) as info:
        O.make_optimizer(name, [{"params": _params()}], 1e-3, args)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert O.optimizer_problems(name, args)


def test_typed_args_reach_the_optimizer():
    opt = O.make_optimizer("AdamW8bit", [{"params": _params()}], 1e-3,
                           {"betas": "0.8,0.95", "weight_decay": "0.05"})
    g = opt.param_groups[0]
    assert (g["betas"], g["weight_decay"]) == ((0.8, 0.95), 0.05)
    sgd = O.make_optimizer("SGDNesterov", [{"params": _params()}], 1e-3, {})
    assert (sgd.defaults["nesterov"], sgd.defaults["momentum"]) == (True, 0.9)


# The class behind each registry entry whose name is not the class's own.
CLASSES = {"AdamW": "torch.optim:AdamW", "SGDNesterov": "torch.optim:SGD",
           "SGDNesterov8bit": "bitsandbytes.optim:SGD8bit",
           "Adafactor": "transformers.optimization:Adafactor", "Prodigy": "prodigyopt:Prodigy",
           "DAdaptAdamPreprint": "dadaptation.experimental:DAdaptAdamPreprint",
           "DAdaptAdanIP": "dadaptation.experimental:DAdaptAdanIP", "CAME": "came_pytorch:CAME"}


def test_declared_args_exist_in_the_installed_classes():
    """Catches a typo in the registry: each accepted argument is a real parameter."""
    for spec in O.OPTIMIZERS.values():
        if O.install_hint(spec):
            continue  # a bare venv without the optional package
        default = {"bitsandbytes": "bitsandbytes.optim"}.get(spec.module, spec.module)
        where = CLASSES.get(spec.name, f"{default}:{spec.name}")
        module, cls = where.split(":")
        params = inspect.signature(getattr(importlib.import_module(module), cls)).parameters
        unknown = [a for a in spec.args if a not in params]
        assert unknown == [], f"{spec.name}: {unknown} are not parameters of {where}"


def test_adafactor_relative_step_computes_its_own_lr_with_the_adafactor_schedule(caplog):
    params = _params()
    cfg = OptimizerConfig(optimizer_type="Adafactor", lr_scheduler="cosine",
                          learning_rate=1e-4, unet_lr=1e-4, text_encoder_lr=5e-5)
    opt = O.make_optimizer("Adafactor", [{"params": params[:1], "lr": 1e-4},
                                         {"params": params[1:], "lr": 5e-5}], 1e-4, {})
    assert opt.defaults["lr"] is None and opt.defaults["relative_step"] is True
    with caplog.at_level(logging.WARNING, logger="tomlora"):
        sched = scheduler_from_config(cfg, opt, total_steps=10)
    assert "replaced by the adafactor schedule" in caplog.text
    assert type(sched).__name__ == "AdafactorSchedule"
    assert all(c > 0 for c in _step(opt, params))
    sched.step()
    # the reported lr is the step size Adafactor used: min(1e-2, 1/sqrt(step)) * RMS(param)
    rms = opt.state[params[0]]["RMS"]
    assert float(sched.get_last_lr()[0]) == pytest.approx(1e-2 * float(rms))


def test_adafactor_without_relative_step_uses_learning_rate():
    opt = O.make_optimizer("Adafactor", [{"params": _params()}], 1e-3,
                           {"relative_step": False, "scale_parameter": False})
    assert opt.param_groups[0]["lr"] == 1e-3 and not O.uses_relative_step(
        "Adafactor", {"relative_step": False})
    assert O.uses_relative_step("adafactor", {}) is True   # kohya's default
    assert O.uses_relative_step("Adafactor", {"relative_step": False, "warmup_init": True})


def test_eval_weights_is_a_no_op_for_ordinary_optimizers():
    params = _params()
    opt = O.make_optimizer("AdamW", [{"params": params}], 1e-3, {})
    with O.eval_weights(opt):
        pass
    assert all(c > 0 for c in _step(opt, params))


def test_numbers_converter_rejects_wrong_lengths():
    with pytest.raises(ValueError, match="expected 3 numbers"):
        numbers(3)([0.9, 0.99])


@pytest.mark.parametrize("name, cls", [
    ("torch.optim.RAdam", "torch.optim.radam.RAdam"),       # a class path, as sd-scripts
    ("NAdam", "torch.optim.nadam.NAdam"),                   # a bare name: torch.optim
    ("schedulefree.SGDScheduleFree", "schedulefree.sgd_schedulefree.SGDScheduleFree"),
])
def test_class_paths_build_the_imported_class_with_literal_args(name, cls, caplog):
    spec = O.resolve(name)
    assert f"{spec.cls.__module__}.{spec.cls.__qualname__}" == cls
    m = _lora()
    params = [m.lora_down.weight, m.lora_up.weight]
    args = {"weight_decay": "0.01"} if "ScheduleFree" in name else \
        {"betas": "0.8,0.95", "weight_decay": "0.01"}  # kohya's strings: Python literals
    with caplog.at_level(logging.INFO, logger="tomlora"):
        opt = O.make_optimizer(name, [{"params": params}], 1e-3, args)
    assert f"imported {cls}, called with lr=0.001" in caplog.text
    g = opt.param_groups[0]
    assert g["weight_decay"] == 0.01 and g.get("betas", (0.8, 0.95)) == (0.8, 0.95)
    assert spec.schedule_free == ("ScheduleFree" in name)  # train()/eval() switched as ours
    x = torch.randn(4, 128)
    m.base(x).square().mean().backward()
    before = params[1].detach().clone()
    opt.step()
    assert not torch.equal(before, params[1])


@pytest.mark.parametrize("name, args, fragment", [
    ("torch.optim.RAdam", {"betaz": "0.9"}, "'betaz' is not an argument of "
                                            "torch.optim.radam.RAdam; accepted: betas, eps"),
    ("torch.optim.RAdam", {"lr": 1.0}, "'lr' is set by the trainer, not by optimizer_args"),
    ("no_such_pkg_xyz.Opt", {}, "cannot import module 'no_such_pkg_xyz'"),
    ("torch.optim.Adamm", {}, "module 'torch.optim' has no class 'Adamm'"),
    ("Adamm", {}, "'Adamm' is unknown; expected one of: AdamW"),
])
def test_bad_class_paths_are_config_problems(name, args, fragment):
    problems = O.optimizer_problems(name, args)
    assert len(problems) == 1 and fragment in problems[0], problems
