"""Every parameter marked trainable receives a non-zero gradient and every frozen one none, per shipped stage
(its declared ``stage.trainable``) and tower."""

import pytest
import torch

from fvl.inputs.collate import Sample, collate
from fvl.models import build_model, set_trainable
from fvl.util import resources
from tests.fixtures import stage_trainable, tiny_cfg, tower_cfg

STAGES = resources.names("experiments", "stages")
EVERYTHING = stage_trainable("pretrain")


def one_batch(model):
    size = model.processor.transform.size  # the shared decode's (the largest tower's) size
    samples = []
    for q, a, n in [
        ("<image>\nWhat colour?", "red", 1),
        ("<image>\n<image>\nSame?", "no", 2),
        ("Say hi.", "hi", 0),
    ]:
        conv = [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        t = model.template.tokenize(conv, model.tokenizer, model.num_image_tokens, num_images=n)
        samples.append(Sample(t.input_ids, t.labels, [torch.randn(3, size, size) for _ in range(n)]))
    return collate(samples, model.tokenizer.pad_token_id)


@pytest.mark.parametrize("tower", ["florence2", "clip", "siglip"])
@pytest.mark.parametrize("stage", STAGES)
def test_gradients_reach_exactly_the_trainable_set(tower, stage):
    torch.manual_seed(0)
    model = build_model(tower_cfg(tower))
    trainable = stage_trainable(stage)
    counts = set_trainable(model, trainable, label=stage)
    model.train()
    model(one_batch(model)).loss.backward()
    no_grad, zero_grad, leaked = [], [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            if p.grad is None:
                no_grad.append(name)
            elif not bool(p.grad.abs().sum() > 0):
                zero_grad.append(name)
        elif p.grad is not None:
            leaked.append(name)
    assert not no_grad and not zero_grad and not leaked, (no_grad, zero_grad, leaked)
    trains_vision = "vision" in trainable
    assert (counts["vision"]["trainable"] > 0) == trains_vision
    assert counts["projector"]["trainable"] > 0
    assert (counts["llm"]["trainable"] > 0) == ("llm" in trainable)
    # a frozen tower runs in eval mode (no dropout / drop-path); a trained one in train mode
    assert model.vision.training == trains_vision


def test_pretrain_trains_florence2_for_real():
    """The original's defect: a no_grad around the tower. Here a pretrain step changes Florence-2's weights."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    set_trainable(model, EVERYTHING)
    before = {n: p.detach().clone() for n, p in model.vision.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(one_batch(model)).loss.backward()
    opt.step()
    changed = [n for n, p in model.vision.named_parameters() if not torch.equal(before[n], p)]
    assert len(changed) == len(before)


def test_unused_parameters_are_reported_and_frozen():
    model = build_model(tiny_cfg("fusion.name=single_layer", "fusion.features=[davit]"))
    counts = set_trainable(model, EVERYTHING)
    encoder = sum(p.numel() for p in model.vision.encoder.parameters())
    assert counts["vision"]["unused"] == encoder > 0
    assert not any(p.requires_grad for p in model.vision.encoder.parameters())
    clip = build_model(tower_cfg("clip", "fusion.features=[layer_-2]"))
    counts = set_trainable(clip, EVERYTHING)
    assert counts["vision"]["unused"] > 0  # the last layer and post_layernorm do not reach layer -2


def test_the_shipped_stages_declare_the_papers_recipe():
    assert set(STAGES) >= {"pretrain", "finetune", "align"}
    assert set(stage_trainable("pretrain")) == {"vision", "fusion", "projector", "llm"}  # Florence-2 trains
    assert set(stage_trainable("finetune")) == {"fusion", "projector", "llm"}
    assert set(stage_trainable("align")) == {"fusion", "projector"}


def test_unknown_component():
    with pytest.raises(ValueError, match="unknown components"):
        set_trainable(build_model(tiny_cfg()), ["vision", "decoder"])
