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


def test_the_kernel_check_compares_each_kernel_with_the_eager_layers(monkeypatch):
    """The check's own arithmetic on a CPU, liger's patch stood in for by one that changes nothing (then
    every difference is 0) and by one that scales the RMSNorm weights (then the logits differ)."""
    from fvl.bench import gpu_round2
    from fvl.models import kernels

    monkeypatch.setattr(kernels, "apply_kernels", lambda model, names: list(names))
    same = gpu_round2.kernel_equivalence("phi3", device="cpu")
    assert set(same) == {"rms_norm", "swiglu", "rope"}
    assert all(v["logits_rel_diff"] == 0 and v["grads_max_rel_diff"] == 0 for v in same.values())

    def scale_norms(model, names):
        if "rms_norm" in names:
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.data.mul_(1.5)
        return list(names)

    monkeypatch.setattr(kernels, "apply_kernels", scale_norms)
    changed = gpu_round2.kernel_equivalence("llama", device="cpu")
    assert changed["rms_norm"]["logits_rel_diff"] > 1e-3 and changed["swiglu"]["logits_rel_diff"] == 0


def test_the_evaluation_cost_runs_fvl_eval_s_predict():
    from fvl.bench.gpu_round2 import eval_cost

    r = eval_cost(tiny=True, questions=8, batch_size=4)
    assert r["questions"] == 8 and r["max_new_tokens"] == 16 and r["seconds_per_100"] > 0
