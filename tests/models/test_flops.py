"""The model-FLOP count that MFU divides by (``fvl.models.flops``), against torch's own count of a real
forward and backward of the tiny model, in each stage's trainable set."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fvl.inputs.collate import Sample, collate
from fvl.models import build_model, set_trainable
from fvl.models.flops import PEAK_BF16_TFLOPS, FlopCounter, peak_tflops
from tests.fixtures import stage_trainable, tiny_cfg
from tests.models.test_trainable import one_batch


def unpadded_batch(model, rows: int = 2):
    """Rows of one sample each, all of one length: no padding, so torch's count and ours see the same work."""
    conv = [
        {"from": "human", "value": "<image>\nWhat colour is the big shape in the middle of the picture?"},
        {"from": "gpt", "value": "red and blue and green " * 8},
    ]
    t = model.template.tokenize(conv, model.tokenizer, model.num_image_tokens, num_images=1)
    size = model.vision.image_size
    image = torch.randint(0, 255, (3, size, size), dtype=torch.uint8)
    return collate([Sample(t.input_ids, t.labels, [image])] * rows, model.tokenizer.pad_token_id)


@pytest.mark.parametrize("stage", ["pretrain", "finetune", "align"])
def test_the_count_equals_torchs_count_of_a_forward_and_backward(stage):
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    set_trainable(model, stage_trainable(stage))
    model.train()
    batch = unpadded_batch(model)
    counter = FlopCounter.of(model)
    with FlopCounterMode(display=False) as torch_counter:
        model(batch).loss.backward()
    theirs = torch_counter.get_total_flops()
    # torch's CPU attention kernel is not among the ops its counter knows: compare the rest
    rows = batch["attention_mask"].sum(dim=1).double()
    attention = counter.attention_per_token_squared * float((rows**2).sum())
    assert counter.batch(batch) - attention == pytest.approx(theirs, rel=0.03)


def test_the_loaders_plain_numbers_give_the_masks_count():
    model = build_model(tiny_cfg())
    batch = unpadded_batch(model, rows=3)
    counter = FlopCounter.of(model)
    tokens = batch["attention_mask"].sum(dim=1)
    sent = {**batch, "num_tokens": int(tokens.sum()), "tokens_squared": int((tokens**2).sum())}
    assert counter.batch(sent) == counter.batch(batch)


def test_a_frozen_llm_behind_a_trainable_projector_costs_its_input_gradient():
    model = build_model(tiny_cfg())
    set_trainable(model, ["projector"])
    behind = FlopCounter.of(model).llm_per_token
    set_trainable(model, [])
    alone = FlopCounter.of(model).llm_per_token
    assert behind == pytest.approx(2 * alone)  # 4 N against 2 N


def test_cached_features_count_no_tower():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    set_trainable(model, stage_trainable("finetune"))
    batch = one_batch(model)
    counter = FlopCounter.of(model)
    with torch.no_grad():
        cached = {**batch, "image_features": model.fuse_images(batch["pixel_values"])}
    del cached["pixel_values"]
    images = batch["pixel_values"].shape[0]
    assert counter.batch(batch) - counter.batch(cached) == pytest.approx(images * counter.features_per_image)


def test_peaks_are_known_only_for_cuda_cards():
    assert peak_tflops("cpu") is None
    assert dict(PEAK_BF16_TFLOPS)["H100"] == 989.0
