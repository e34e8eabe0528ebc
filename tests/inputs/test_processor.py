"""The processor is built from the model config alone and equals the model's own, for every tower and fusion."""

import pytest
import torch

from fvl.config import load
from fvl.models import build_model, build_processor
from tests.fixtures import tower_cfg


@pytest.mark.parametrize("tower", ["florence2", "clip", "siglip"])
@pytest.mark.parametrize("fusion", ["dbfusion", "token_concat", "avg_pool"])
def test_build_processor_equals_the_models(tower, fusion):
    cfg = tower_cfg(tower, f"fusion.name={fusion}")
    static = build_processor(cfg, "square")
    model = build_model(cfg)
    assert static.image_tokens == model.num_image_tokens == model.processor.image_tokens
    assert static.transform == model.processor.transform.with_mode("square")
    assert static.template.name == model.template.name
    assert static.tokenizer.get_vocab() == model.tokenizer.get_vocab()
    assert static.tokenizer.image_token_id == model.image_token_id
    # what the processor makes feeds the model
    sample = static([{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}],
                    [__import__("PIL.Image").Image.new("RGB", (40, 30), (255, 0, 0))])  # fmt: skip
    batch = {
        "input_ids": torch.tensor([sample.input_ids]),
        "attention_mask": torch.ones(1, len(sample.input_ids), dtype=torch.long),
        "labels": torch.tensor([sample.labels]),
        "pixel_values": torch.stack(sample.images),
    }
    assert torch.isfinite(model(batch).loss)


@pytest.mark.parametrize("fusion, tokens", [("dbfusion", 576), ("token_concat", 1728), ("avg_pool", 576)])
def test_real_size_processor_without_building_the_model(fusion, tokens):
    """The 3B preset's processor from its config: no 4B-parameter model is built to learn its token count."""
    overrides = ["model.vision.init=random", "model.llm.init=random", f"model.fusion.name={fusion}"]
    if fusion == "token_concat":
        overrides.append("model.fusion.features=[caption,ocr,grounding]")
    processor = build_processor(load("florence_vl_3b", overrides).model)
    assert processor.image_tokens == tokens and processor.transform.size == 768
    assert processor.transform.mode == "pad"


def test_tokenised_conversations_are_remembered_without_sharing_their_lists(monkeypatch):
    import dataclasses

    import fvl.inputs.processor as processor_module

    proc = build_processor(load("tiny").model)
    calls = []
    real = type(proc.template).tokenize
    monkeypatch.setattr(type(proc.template), "tokenize", lambda *a, **k: calls.append(1) or real(*a, **k))
    conv = [{"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "red"}]
    feat = [torch.zeros(proc.image_tokens, 8)]
    first = proc.with_images(conv, feat)
    first.input_ids.append(-1)
    first.labels[0] = 12345  # a caller changing its sample must not change the next one
    again = proc.with_images([dict(t) for t in conv], feat)
    assert len(calls) == 1  # the same text: tokenised once
    fresh = real(proc.template, conv, proc.tokenizer, proc.image_tokens, proc.max_length, num_images=1)
    assert again.input_ids == fresh.input_ids and again.labels == fresh.labels
    other = proc.with_images([conv[0], {"from": "gpt", "value": "blue"}], feat)
    assert len(calls) == 2 and other.labels != again.labels
    # a processor made from this one with other settings does not inherit what this one remembered
    assert dataclasses.replace(proc, max_length=8)._tokenized == {}
    # bounded: a full memory starts again
    monkeypatch.setattr(processor_module, "TOKENIZED_KEPT", 2)
    proc.with_images([conv[0], {"from": "gpt", "value": "green"}], feat)
    assert len(proc._tokenized) == 1 and len(calls) == 3
