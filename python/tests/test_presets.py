"""The Python configs mirror the C++ presets: same fields, same defaults (read from the compiled
code), and a spec round trip."""

from __future__ import annotations

import dataclasses
import math

import pytest

import tropd
from tropd import _C, presets


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_defaults_match_cpp(name):
    cls = presets.PRESETS[name]
    cpp = dict(_C.preset_defaults(name))
    py = {cls._renamed.get(f.name, f.name): getattr(cls(), f.name) for f in dataclasses.fields(cls) if not f.name.startswith("_")}
    assert set(py) == set(cpp), (sorted(py), sorted(cpp))
    for key, value in py.items():
        if isinstance(value, str):
            assert value == cpp[key], key
        else:
            assert float(cpp[key]) == pytest.approx(float(value), rel=1e-15) or (math.isinf(value) and float(cpp[key]) == value), key


def test_every_cpp_preset_has_a_config():
    assert sorted(_C.preset_names()) == sorted(presets.PRESETS)


def test_spec_and_info():
    cfg = presets.tropd(k=16, beta=2e-3, form="p", clamp=5.0)
    assert cfg.spec().startswith("tropd;")
    assert "k=16" in cfg.spec() and "beta=0.002" in cfg.spec() and "form=p" in cfg.spec()
    assert cfg.info["needs_topk"] and cfg.info["k"] == 16 and not cfg.info["needs_teacher_logits"]
    assert presets.gkd().info["has_dense"] and presets.eopd().info["needs_teacher_logits"]
    assert presets.gopd().info["needs_ref"] and presets.reopold().info["needs_student_entropy"]
    assert dataclasses.replace(cfg, k=8).info["k"] == 8
    assert presets.reopold_floor_ratio(0.2) == pytest.approx(math.log(0.2) / 0.8)
    assert presets.reopold_floor_logit(0.2) == pytest.approx(math.log(0.25))


@pytest.mark.parametrize(
    "make",
    [
        lambda: presets.tropd(k=0),
        lambda: presets.tropd(form="q"),
        lambda: presets.tropd(clamp=0.0),
        lambda: presets.opd(eps_low=-1.0),
        lambda: presets.opd(dual_clip=0.5),
        lambda: presets.gkd(beta=1.5),
        lambda: presets.entropy_opd(fraction=0.0),
        lambda: presets.reopold(switch_step=-1),
        lambda: presets.opd(aggregation="mean"),
        lambda: presets.opd(aggregation="sum_over_constant", aggregation_constant=0.0),
    ],
)
def test_bad_config_values_are_value_errors(make):
    with pytest.raises(ValueError):
        make()


def test_configs_are_frozen_and_hashable():
    cfg = presets.tropd()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.k = 3
    assert hash(cfg) == hash(presets.tropd()) and cfg == presets.tropd()
    assert tropd.torch.tropd_loss.__name__ == "tropd_loss"
