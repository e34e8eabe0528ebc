"""Sweep files: optional grid values join an axis only when a launch asks for them."""

import pytest

from fvl.config import ConfigError
from fvl.sweep.runner import grid_points, load_sweep
from tests.fixtures import EXPERIMENTS


def test_the_fusion_sweep_adds_its_optional_variant_only_when_asked():
    sweep = EXPERIMENTS / "sweeps" / "fusion.yaml"
    plain, extended = grid_points(load_sweep(sweep)), grid_points(load_sweep(sweep, with_optional=True))
    assert len(plain) == 24 and len(extended) == 27
    assert {labels["fusion"] for labels, _, _ in extended} - {labels["fusion"] for labels, _, _ in plain} == {
        "florence2_siglip"
    }


def test_optional_values_must_extend_an_axis_and_exist(tmp_path):
    stage = EXPERIMENTS / "pretrain.yaml"
    bad_axis = tmp_path / "a.yaml"
    bad_axis.write_text(f"sweep: s\nstages: [{stage}]\ngrid:\n  seed: [0]\noptional:\n  fusion: [x.yaml]\n")
    with pytest.raises(ConfigError, match="optional.fusion extends no axis"):
        load_sweep(bad_axis)
    missing = tmp_path / "b.yaml"
    missing.write_text(f"sweep: s\nstages: [{stage}]\ngrid:\n  seed: [0]\noptional:\n  seed: [nope.yaml]\n")
    with pytest.raises(ConfigError, match="nope.yaml not found"):
        load_sweep(missing)
