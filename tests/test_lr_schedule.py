"""LR schedules: warmup + cosine (default) and warmup-stable-decay, pinned step by step."""
import math
import re

import pytest

from mmoe.training.config import OptimConfig
from mmoe.training.module import MMoEModule, lr_multiplier


def _curve(cfg: OptimConfig, total: int) -> list[float]:
    fn = lr_multiplier(cfg, total)
    return [fn(s) for s in range(total + 1)]


def test_cosine_warms_up_linearly_then_follows_the_half_cosine_to_the_floor():
    cfg = OptimConfig(warmup_steps=10, min_lr_ratio=0.1)
    c = _curve(cfg, 110)
    assert c[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    for s in (10, 35, 60, 85, 110):
        t = (s - 10) / 100
        assert c[s] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
    assert c[110] == pytest.approx(0.1)


def test_wsd_holds_the_peak_then_decays_linearly_over_the_last_fraction():
    cfg = OptimConfig(warmup_steps=10, min_lr_ratio=0.1, schedule="wsd", decay_fraction=0.2)
    c = _curve(cfg, 100)
    assert c[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert c[10:81] == pytest.approx([1.0] * 71)  # stable until the last 20 steps begin
    assert c[90] == pytest.approx(1.0 - 0.9 * 0.5)
    assert c[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(c[80:], c[81:]))
    # the stable phase keeps more of the peak than the cosine over the same run
    assert sum(c) > sum(_curve(OptimConfig(warmup_steps=10, min_lr_ratio=0.1), 100))


def test_wsd_decay_never_starts_inside_the_warmup():
    c = _curve(OptimConfig(warmup_steps=50, schedule="wsd", decay_fraction=0.9, min_lr_ratio=0.0), 60)
    assert c[49] == pytest.approx(1.0) and c[50] == pytest.approx(1.0)
    assert c[60] == pytest.approx(0.0)


@pytest.mark.parametrize("field,value,msg", [
    ("schedule", "linear", "model.optim.schedule='linear'"),
    ("decay_fraction", 0.0, "model.optim.decay_fraction=0.0"),
    ("decay_fraction", 1.5, "model.optim.decay_fraction=1.5"),
])
def test_bad_schedule_fields_fail_naming_the_field(field, value, msg):
    kwargs = {"schedule": "wsd", field: value}
    with pytest.raises(ValueError, match=re.escape(msg)):
        lr_multiplier(OptimConfig(**kwargs), 100)


def test_module_refuses_a_bad_decay_fraction_at_construction():
    with pytest.raises(ValueError, match=r"model\.optim\.decay_fraction=2\.0"):
        MMoEModule(optim=OptimConfig(schedule="wsd", decay_fraction=2.0))
