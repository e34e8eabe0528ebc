"""Speed options that change how a step runs but not what it computes: partial activation checkpointing
and the CPU thread count."""

import os

import pytest
import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from fvl.config import ConfigError, load
from fvl.models import build_model
from fvl.train.run import cpu_threads


def checkpointed(model) -> list[bool]:
    return [
        m.gradient_checkpointing for m in model.llm.modules() if isinstance(m, GradientCheckpointingLayer)
    ]


def test_keep_activations_exempts_the_last_layers_and_keeps_the_gradients():
    on = ["model.llm.gradient_checkpointing=true"]
    torch.manual_seed(0)
    full = build_model(load("tiny", on).model).train()
    partial = build_model(load("tiny", [*on, "model.llm.keep_activations=1"]).model).train()
    partial.load_state_dict(full.state_dict())
    assert checkpointed(full) == [True] * 4 and checkpointed(partial) == [True] * 3 + [False]
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    for model in (full, partial):
        model(batch).loss.backward()
    for (name, a), b in zip(full.named_parameters(), partial.parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, msg=name)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [(["model.llm.keep_activations=-1"], "keep_activations"), (["trainer.cpu_threads=-2"], "cpu_threads")],
)
def test_speed_option_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load("tiny", overrides)


def test_keep_activations_beyond_the_layers_is_an_error():
    cfg = load("tiny", ["model.llm.gradient_checkpointing=true", "model.llm.keep_activations=5"])
    with pytest.raises(ValueError, match="4 decoder layers"):
        build_model(cfg.model)


def test_cpu_threads_applies_for_the_run_and_is_restored():
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    exp = load("tiny", ["trainer.accelerator=cpu", "trainer.cpu_threads=-1", "data.num_workers=1"])
    with cpu_threads(exp):
        assert torch.get_num_threads() == max(1, cores - 1)
    assert torch.get_num_threads() == before
    with cpu_threads(load("tiny", ["trainer.accelerator=cpu", "trainer.cpu_threads=0"])):
        assert torch.get_num_threads() == before  # 0: torch's default, untouched
