"""Learning-rate schedules: the curves tabulated at steps 0, end of warmup, middle and end,
and the torch scheduler follows the same table."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from library.config.schema import OptimizerConfig
from library.train.schedulers import SCHEDULES, effective_schedule, lr_factor, scheduler_problems, \
    make_scheduler, scheduler_from_config, warmup_steps

TOTAL, WARM = 100, 10
# name, kwargs, factor at steps 0, 5 (mid-warmup), 10 (warmup done), 55 (middle of decay),
# 100 (end). With warmup 10 the decay runs over 90 steps, so 55 is its midpoint.
TABLE = [
    ("constant", {}, [0.0, 0.5, 1.0, 1.0, 1.0]),                # warmup, then constant
    ("constant_with_warmup", {}, [0.0, 0.5, 1.0, 1.0, 1.0]),
    ("linear", {}, [0.0, 0.5, 1.0, 0.5, 0.0]),
    ("cosine", {}, [0.0, 0.5, 1.0, 0.5, 0.0]),
    # two cycles: 55 is the start of the second cycle, back at 1
    ("cosine_with_restarts", {"num_cycles": 2}, [0.0, 0.5, 1.0, 1.0, 0.0]),
    ("polynomial", {"power": 2.0}, [0.0, 0.5, 1.0, 0.25, 0.0]),
    ("cosine_with_min_lr", {"min_lr_ratio": 0.1}, [0.0, 0.5, 1.0, 0.55, 0.1]),
]
STEPS = [0, 5, 10, 55, 100]


@pytest.mark.parametrize("name, kw, expected", TABLE, ids=[t[0] for t in TABLE])
def test_curve_table(name, kw, expected):
    got = [lr_factor(name, s, total=TOTAL, warmup=WARM, **kw) for s in STEPS]
    assert got == pytest.approx(expected, abs=1e-9)


def test_every_closed_form_schedule_is_tabulated():
    assert {t[0] for t in TABLE} == set(SCHEDULES) - {"adafactor"}


def test_no_warmup_starts_at_full_rate_and_quarter_points():
    assert lr_factor("constant", 0, total=TOTAL) == 1.0
    assert lr_factor("cosine", 25, total=TOTAL) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor("cosine_with_restarts", 25, total=TOTAL, num_cycles=2) == \
        pytest.approx(0.5)
    assert lr_factor("polynomial", 50, total=TOTAL, power=1.0) == pytest.approx(0.5)


@pytest.mark.parametrize("value, expected", [(0, 0), (10, 10), (0.1, 10), (0.25, 25),
                                             (0.055, 5)])
def test_warmup_as_steps_or_fraction(value, expected):
    assert warmup_steps(value, TOTAL) == expected   # fractions round down, as in kohya


@pytest.mark.parametrize("name, kw, expected", TABLE, ids=[t[0] for t in TABLE])
def test_torch_scheduler_follows_the_table(name, kw, expected):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 2e-4}], lr=2e-4)
    sched = make_scheduler(name, opt, total_steps=TOTAL, warmup=WARM, **kw)
    seen = {}
    for step in range(TOTAL + 1):
        seen[step] = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    assert [seen[s] / 2e-4 for s in STEPS] == pytest.approx(expected, abs=1e-9)


def test_per_group_rates_keep_their_ratio():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 1e-4}, {"params": [b], "lr": 5e-5}], lr=1e-4)
    sched = make_scheduler("linear", opt, total_steps=10, warmup=0)
    for _ in range(5):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-5, 2.5e-5])


def test_config_schedule_with_fraction_warmup():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1e-3)
    cfg = OptimizerConfig(lr_scheduler="cosine_with_min_lr", lr_warmup_steps=0.1,
                          lr_scheduler_min_lr_ratio=0.2, learning_rate=1e-3)
    sched = scheduler_from_config(cfg, opt, total_steps=50)
    lrs = []
    for _ in range(50):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(1e-3)
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-4)   # step 50: min_lr_ratio


def test_schedule_free_runs_constant():
    cfg = OptimizerConfig(optimizer_type="AdamWScheduleFree", lr_scheduler="cosine",
                          lr_warmup_steps=10)
    name, notes = effective_schedule(cfg)
    assert name == "constant" and "warmup_steps" in notes[0]


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="valid: constant"):
        lr_factor("exponential", 0, total=10)


def _curve(sched_or_none, opt, steps):
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched_or_none.step()
    return lrs


@pytest.mark.parametrize("name, args, diffusers_kwargs", [
    ("cosine", {"num_cycles": 1.5}, {"num_cycles": 1.5}),     # one wave and a half
    ("cosine", {}, {}),                                        # diffusers' default 0.5
    ("polynomial", {"lr_end": 2e-4}, {"lr_end": 2e-4, "power": 2.0}),
])
def test_lr_scheduler_args_follow_diffusers(name, args, diffusers_kwargs):
    """sd-scripts passes lr_scheduler_args to diffusers' schedule functions: the same curve,
    step by step, from diffusers itself."""
    from diffusers.optimization import get_cosine_schedule_with_warmup, \
        get_polynomial_decay_schedule_with_warmup
    functions = {"cosine": get_cosine_schedule_with_warmup,
                 "polynomial": get_polynomial_decay_schedule_with_warmup}
    def opt():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    cfg = OptimizerConfig(lr_scheduler=name, lr_warmup_steps=5, learning_rate=1e-3,
                          lr_scheduler_power=2.0, lr_scheduler_args=args)
    ours_opt = opt()
    ours = _curve(scheduler_from_config(cfg, ours_opt, total_steps=40), ours_opt, 45)
    ref_opt = opt()
    ref = functions[name](ref_opt, num_warmup_steps=5, num_training_steps=40,
                          **diffusers_kwargs)
    assert ours == pytest.approx(_curve(ref, ref_opt, 45), abs=1e-12)
    if args:  # and the argument changed the curve
        plain_opt = opt()
        plain = _curve(scheduler_from_config(replace(cfg, lr_scheduler_args={}), plain_opt,
                                             total_steps=40), plain_opt, 45)
        assert ours != pytest.approx(plain, abs=1e-9)


def test_lr_scheduler_type_builds_the_named_class():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1e-3)
    cfg = OptimizerConfig(lr_scheduler="cosine",
                          lr_scheduler_type="torch.optim.lr_scheduler.StepLR",
                          lr_scheduler_args={"step_size": 2, "gamma": "0.1"})  # kohya: strings
    sched = scheduler_from_config(cfg, opt, total_steps=10)
    assert type(sched).__name__ == "StepLR"
    assert _curve(sched, opt, 5) == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4, 1e-5])


@pytest.mark.parametrize("kw, problems", [
    ({"lr_scheduler": "cosine", "lr_scheduler_args": {"num_cycles": 1.5}}, []),
    ({"lr_scheduler": "polynomial", "lr_scheduler_args": {"lr_end": 1e-7}}, []),
    ({"lr_scheduler": "cosine", "lr_scheduler_args": {"last_epoch": 3}},
     [("lr_scheduler_args", "'last_epoch' is not an argument of the cosine schedule; "
                            "resume restores the schedule")]),
    ({"lr_scheduler": "polynomial", "lr_scheduler_args": {"lr_end": 1e-3}},
     [("lr_scheduler_args", "lr_end = 0.001 must be below learning_rate (0.0001)")]),
    ({"lr_scheduler": "cosine", "lr_scheduler_args": {"num_cycles": "many"}},
     [("lr_scheduler_args", "num_cycles = 'many': expected a number >= 0")]),
    ({"lr_scheduler": "adafactor", "lr_scheduler_args": {"x": 1}}, []),  # ignored, as kohya
    ({"lr_scheduler_type": "CosineAnnealingLR", "lr_scheduler_args": {"T_max": "100"}}, []),
])
def test_scheduler_problems(kw, problems):
    assert scheduler_problems(OptimizerConfig(**kw)) == problems
