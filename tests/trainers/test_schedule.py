"""The learning-rate schedule (finegrain.trainers.loop.make_scheduler) is transformers' ``get_scheduler`` as TRL's
trainers build it: rates by hand, against ``get_scheduler``, against TRL's ``DPOConfig`` + ``create_scheduler``,
and across a save / load of its state (what a resumed run does). docs/run-directory.md, "Learning-rate schedule".
"""

from __future__ import annotations

import io
import math
import types

import pytest
import torch

from finegrain.config import TrainConfig
from finegrain.trainers import loop

LR, T = 0.1, 10


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))], lr=LR)


def _rates(make, steps: int = T) -> list[float]:
    """The rate each optimizer step uses (read before the step), for ``steps`` steps; both parameter groups agree."""
    opt = _optimizer()
    sched = make(opt)
    out = []
    for _ in range(steps):
        assert len({g["lr"] for g in opt.param_groups}) == 1
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def _ours(**options):
    cfg = TrainConfig(learning_rate=LR, max_steps=T, **options)
    return lambda opt: loop.make_scheduler(cfg, opt, T)


def test_linear_with_warmup_by_hand():
    """lr_t = lr * t / W for t < W, then lr * (T - t) / (T - W): 0, 1/3, 2/3, 1, 6/7, ..., 1/7 (times lr)."""
    expected = [LR * t / 3 for t in range(3)] + [LR * (T - t) / (T - 3) for t in range(3, T)]
    assert expected[:5] == pytest.approx([0.0, 0.1 / 3, 0.2 / 3, 0.1, 0.6 / 7], abs=1e-15)
    got = _rates(_ours(lr_scheduler_type="linear", warmup_steps=3))
    assert got == pytest.approx(expected, abs=1e-12)
    cosine = [LR * t / 3 for t in range(3)] + [LR * (1 + math.cos(math.pi * (t - 3) / (T - 3))) / 2 for t in range(3, T)]
    assert _rates(_ours(lr_scheduler_type="cosine", warmup_steps=3)) == pytest.approx(cosine, abs=1e-12)
    assert _rates(_ours(lr_scheduler_type="constant", warmup_steps=3)) == pytest.approx([0.0, LR / 3, 2 * LR / 3] + [LR] * 7)
    # the ratio is rounded up, as transformers does: ceil(0.25 * 10) = 3 warm-up steps
    assert _rates(_ours(lr_scheduler_type="linear", warmup_ratio=0.25)) == pytest.approx(expected, abs=1e-12)
    # no warm-up: full rate at the first step, 0 after the last
    opt = _optimizer()
    sched = _ours(lr_scheduler_type="linear")(opt)
    for _ in range(T):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    assert _rates(_ours(lr_scheduler_type="linear")) == pytest.approx([LR * (T - t) / T for t in range(T)])


CASES = [("linear", {"warmup_steps": 3}), ("cosine", {"warmup_steps": 2}), ("constant", {"warmup_steps": 4}),
         ("linear", {"warmup_ratio": 0.25}), ("cosine", {"warmup_ratio": 0.1}), ("linear", {}), ("cosine", {}),
         ("constant", {})]


@pytest.mark.parametrize(("kind", "warmup"), CASES)
def test_equal_to_transformers_get_scheduler(kind, warmup):
    from transformers import get_scheduler

    name = "constant_with_warmup" if kind == "constant" else kind
    steps = warmup.get("warmup_steps") or math.ceil(warmup.get("warmup_ratio", 0.0) * T)
    theirs = _rates(lambda opt: get_scheduler(name, opt, num_warmup_steps=steps, num_training_steps=T))
    assert _rates(_ours(lr_scheduler_type=kind, **warmup)) == theirs  # exactly: the same functions


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")  # DPOConfig's own default
def test_equal_to_trl_dpo_trainer(tmp_path):
    """TRL's DPOTrainer builds its schedule with transformers' ``Trainer.create_scheduler`` from its ``DPOConfig``
    (``warmup_steps`` there is a step count, or a ratio when below 1)."""
    trl = pytest.importorskip("trl")

    for kind, warmup in CASES:
        args = trl.DPOConfig(output_dir=str(tmp_path), learning_rate=LR, report_to=[], bf16=False, use_cpu=True,
                             lr_scheduler_type="constant_with_warmup" if kind == "constant" else kind,
                             warmup_steps=warmup.get("warmup_steps") or warmup.get("warmup_ratio", 0))
        trainer = types.SimpleNamespace(lr_scheduler=None, args=args)  # create_scheduler reads only these
        theirs = _rates(lambda opt, a=args, tr=trainer: trl.DPOTrainer.create_scheduler(tr, T, opt))
        assert _rates(_ours(lr_scheduler_type=kind, **warmup)) == theirs, (kind, warmup)


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_state_saved_and_loaded_resumes_the_same_rates(kind):
    """As a checkpoint does: state_dict through torch.save / torch.load(weights_only=True), into a fresh scheduler."""
    make = _ours(lr_scheduler_type=kind, warmup_steps=3)
    straight = _rates(make)
    opt = _optimizer()
    sched = make(opt)
    first = []
    for _ in range(5):
        first.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    buf = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, buf)
    buf.seek(0)
    blob = torch.load(buf, map_location="cpu", weights_only=True)
    opt2 = _optimizer()
    sched2 = make(opt2)
    opt2.load_state_dict(blob["optimizer"])
    sched2.load_state_dict(blob["scheduler"])
    rest = []
    for _ in range(T - 5):
        rest.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert first + rest == straight


def test_warmup_options_are_checked():
    from finegrain.errors import ConfigError

    with pytest.raises(ConfigError, match="option 'warmup_steps' must be >= 0, got -1"):
        TrainConfig(warmup_steps=-1)
    with pytest.raises(ConfigError, match="warmup_ratio must be in"):
        TrainConfig(warmup_ratio=1.0)
