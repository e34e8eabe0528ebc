"""Weights that train are float32 master weights; frozen ones may be stored in bf16; compute is autocast."""

import pytest
import torch

from fvl.config import load
from fvl.models import build_model, set_trainable
from fvl.util import resources
from tests.fixtures import stage_trainable, tiny_cfg
from tests.models.test_trainable import one_batch

BF16 = ["vision.frozen_dtype=bfloat16", "llm.frozen_dtype=bfloat16"]


@pytest.mark.parametrize("stage", resources.names("experiments", "stages"))
def test_trainable_is_float32_and_frozen_is_its_frozen_dtype(stage):
    model = build_model(tiny_cfg(*BF16))
    trainable = stage_trainable(stage)
    set_trainable(model, trainable)
    for name, p in model.named_parameters():
        component = name.split(".")[0]
        expected = (
            torch.float32 if p.requires_grad or component in ("fusion", "projector") else torch.bfloat16
        )
        assert p.dtype == expected, (stage, name, p.dtype)


def test_a_small_adamw_step_moves_every_trainable_weight():
    """The original defect: AdamW on bf16 weights at lr 1e-5 left most of them unchanged."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(*BF16))
    set_trainable(model, stage_trainable("finetune"))
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(one_batch(model)).loss
    loss.backward()
    opt.step()
    # among the weights that got a gradient (embedding rows of absent tokens get none)
    pairs = [(b[p.grad != 0], p.detach()[p.grad != 0]) for b, p in zip(before, params, strict=True)]
    total = sum(b.numel() for b, _ in pairs)
    assert sum(int((b != a).sum()) for b, a in pairs) / total > 0.99
    # the same step applied to bf16 copies of those weights would have lost most of it
    assert sum(int((b.bfloat16() == a.bfloat16()).sum()) for b, a in pairs) / total > 0.5


@pytest.mark.parametrize("preset", ["florence_vl_3b", "florence_vl_8b"])
@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_real_size_presets_on_the_meta_device_train_in_float32(preset, stage):
    cfg = load(preset, ["model.vision.init=random", "model.llm.init=random", f"stage={stage}"])
    with torch.device("meta"):
        model = build_model(cfg.model)
    counts = set_trainable(model, cfg.stage.trainable)
    dtypes = {(p.requires_grad, name.split(".")[0], p.dtype) for name, p in model.named_parameters()}
    assert all(dtype == torch.float32 for train, _, dtype in dtypes if train)
    assert {dtype for train, c, dtype in dtypes if not train and c in ("vision", "llm")} <= {torch.bfloat16}
    assert counts["llm"]["trainable"] > 3e9
