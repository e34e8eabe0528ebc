"""``fvl.bench.features``: the feature benchmark's two ways compute the same features (at the tiny size; no
timing is asserted), and its published sizes are the presets'."""

import pytest

from fvl.assets.florence2_arch import FLORENCE2_ARCHS
from fvl.bench.features import bench_archs, bench_features, summary
from fvl.config import load
from fvl.config.model import plain_dict


def test_tiny_run_reports_both_ways_and_they_agree():
    result = bench_features("tiny", batch=2, image_size=64, repeats=1)
    assert {"fvl_ms", "reference_ms", "speedup", "arch", "device", "dtype", "compile"} <= set(result)
    assert result["fvl_ms"] > 0 and result["reference_ms"] > 0
    assert result["speedup"] == pytest.approx(result["reference_ms"] / result["fvl_ms"])
    assert (result["arch"], result["device"], result["dtype"], result["compile"]) == (
        "tiny",
        "cpu",
        "float32",
        False,
    )
    # generate(max_new_tokens=1) per prompt gives fvl's prompt features: the yardstick measures the same work
    assert result["max_abs_diff"] < 1e-4
    assert "Florence-2-tiny" in summary(result)


def test_large_arch_is_the_3b_preset_and_names_are_checked():
    assert FLORENCE2_ARCHS["large"] == plain_dict(load("florence_vl_3b").model.vision.arch)
    assert {"base", "large", "tiny"} <= set(bench_archs())
    with pytest.raises(ValueError, match="arch='huge'"):
        bench_features("huge")
