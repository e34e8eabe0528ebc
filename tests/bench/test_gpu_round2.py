"""The prepared GPU script of issue 28: every variant is a valid configuration of its preset, and a variant
that fails records its error without stopping the others (checked on the tiny preset, in-process parts)."""

import pytest

from fvl.bench.gpu_round2 import VARIANTS, main
from fvl.config import load


@pytest.mark.parametrize(("label", "overrides", "options"), VARIANTS, ids=[v[0] for v in VARIANTS])
def test_every_variant_is_a_valid_configuration(label, overrides, options):
    preset = options.get("preset", "florence_vl_3b_finetune")
    cfg = load(preset, ["model.vision.init=random", "model.llm.init=random", *overrides])
    assert cfg.trainer.max_steps > 0, label


def test_unknown_labels_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        main(["--tiny", "--out", str(tmp_path), "--only", "nope"])
