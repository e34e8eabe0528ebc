"""The strict key mapping behind every import: one error listing every leftover, missing, misshapen,
doubly filled and inconsistently tied key."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fvl.convert.keys import KeyMappingError, Rule, convert, grow_rows, tie_groups


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(4, 2)
        self.head = nn.Linear(2, 4, bias=False)
        self.head.weight = self.embed.weight
        self.norm = nn.LayerNorm(2)


RULES = [
    Rule(r"tok\.(weight)", r"embed.\1"),
    Rule(r"out\.weight", "head.weight"),
    Rule(r"ln\.(weight|bias)", r"norm.\1"),
    Rule(r"bias_of_head", None, why="no such bias in the target"),
]


def test_a_complete_source_fills_every_target_key_and_ties():
    target = Tied().state_dict()
    assert tie_groups(target) == [["embed.weight", "head.weight"]]
    source = {"tok.weight": torch.randn(4, 2), "ln.weight": torch.ones(2), "ln.bias": torch.zeros(2),
              "bias_of_head": torch.zeros(4)}  # fmt: skip
    out, report = convert(source, RULES, target, "test")
    assert out["head.weight"] is out["embed.weight"] is source["tok.weight"]
    assert report.tied == {"head.weight": "embed.weight"} and report.dropped == {"bias_of_head": RULES[3].why}
    assert set(out) == set(target)


def test_every_problem_is_listed_in_one_error():
    target = Tied().state_dict()
    source = {
        "tok.weight": torch.randn(4, 2),
        "out.weight": torch.randn(4, 2),  # tied to tok.weight in the target, but different
        "ln.weight": torch.ones(3),  # wrong shape
        "extra.weight": torch.ones(1),  # no rule
    }  # ln.bias absent
    with pytest.raises(KeyMappingError) as e:
        convert(source, [*RULES, Rule(r"x", "norm.weight")], target, "test")
    message = str(e.value)
    assert message.startswith("test: ")
    assert "(leftover) (1): extra.weight" in message
    assert "(missing) (2): norm.bias, norm.weight" in message
    assert "shapes that differ (1): ln.weight (3,) -> norm.weight (2,)" in message
    assert "tied target keys with different sources (1): embed.weight vs head.weight" in message


def test_two_sources_for_one_target_and_keys_the_target_lacks():
    target = {"a": torch.zeros(1)}
    with pytest.raises(KeyMappingError, match=r"filled twice \(1\): a <- x and y.*") as e:
        convert({"x": torch.ones(1), "y": torch.ones(1), "z": torch.ones(1)},
                [Rule("[xy]", "a"), Rule("z", "b")], target, "t")  # fmt: skip
    assert "rules giving keys the target lacks (1): z -> b" in str(e.value)


def test_kept_keys_and_rules_that_drop_need_a_reason():
    out, report = convert({}, [], {"buf": torch.arange(3)}, "t", keep={"buf": "a constant"})
    assert out["buf"].tolist() == [0, 1, 2] and report.kept == {"buf": "a constant"}
    with pytest.raises(ValueError, match="say why"):
        Rule("x", None)


def test_grown_tables_fill_new_rows_with_the_mean():
    table = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    grown = grow_rows(table, torch.empty(4, 2))
    assert grown.tolist() == [[1, 2], [3, 6], [2, 4], [2, 4]]
    assert grow_rows(table, torch.empty(2, 2)) is table
