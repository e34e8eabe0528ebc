"""Token counts and shapes for every fusion variant and feature subset; the projector's structure."""

import itertools

import pytest
import torch
from torch import nn

from fvl.config.model import FusionConfig, ProjectorConfig
from fvl.models import build_model
from fvl.models.fusion import FUSIONS, build_fusion
from fvl.models.projector import build_projector
from tests.fixtures import tiny_cfg

ALL = ["davit", "caption", "ocr", "grounding"]
SUBSETS = [list(s) for r in (1, 2, 3, 4) for s in itertools.combinations(ALL, r)]
N, D = 16, 64  # tiny preset: 16 tokens of width 64 per feature


def expected(name, k):
    return {"dbfusion": (N, k * D), "token_concat": (k * N, D), "avg_pool": (N, D), "single_layer": (N, D)}[
        name
    ]


CASES = [(n, s) for n in sorted(FUSIONS) for s in SUBSETS if n != "single_layer" or len(s) == 1]


@pytest.mark.parametrize("name, subset", CASES, ids=[f"{n}-{'+'.join(s)}" for n, s in CASES])
def test_fusion_shapes_for_every_variant_and_subset(name, subset):
    feats = {n: torch.randn(2, N, D) + i for i, n in enumerate(ALL)}
    fusion = build_fusion(FusionConfig(name, subset), {n: D for n in ALL}, N)
    out = fusion(feats)
    tokens, dim = expected(name, len(subset))
    assert out.shape == (2, tokens, dim) and (fusion.output_tokens, fusion.output_dim) == (tokens, dim)
    # the values are the named features, not others, in the configured order
    if name == "dbfusion":
        torch.testing.assert_close(out[..., :D], feats[subset[0]])
        torch.testing.assert_close(out[..., -D:], feats[subset[-1]])
    elif name == "token_concat":
        torch.testing.assert_close(out[:, :N], feats[subset[0]])
    elif name == "avg_pool":
        torch.testing.assert_close(out, torch.stack([feats[n] for n in subset]).mean(0))


@pytest.mark.parametrize(
    "name, features, llm_tokens, proj_in",
    [
        ("dbfusion", ALL, 16, 4 * D),
        ("dbfusion", ["davit", "ocr", "grounding"], 16, 3 * D),  # the paper's "-caption"
        ("token_concat", ALL, 64, D),
        ("avg_pool", ALL, 16, D),
        ("single_layer", ["davit"], 16, D),
    ],
)
def test_composed_model_token_counts(name, features, llm_tokens, proj_in):
    model = build_model(tiny_cfg(f"fusion.name={name}", f"fusion.features=[{','.join(features)}]"))
    assert model.num_image_tokens == llm_tokens
    assert model.projector[0].in_features == proj_in
    out = model.encode_images(torch.randn(3, 3, 64, 64))
    assert out.shape == (3, llm_tokens, model.hidden_size)


def test_fusion_errors():
    with pytest.raises(ValueError, match="exactly one feature"):
        FUSIONS.build("single_layer", ["a", "b"], {"a": 1, "b": 1}, N)
    with pytest.raises(KeyError, match="fusion needs features"):
        FUSIONS.build("dbfusion", ["a"], {"a": 8}, N)({"b": torch.zeros(1, N, 8)})
    with pytest.raises(KeyError, match="unknown fusion"):
        FUSIONS.get("cross_attention")


def test_mlp3x_gelu_is_the_papers_projector():
    proj = build_projector(ProjectorConfig("mlp3x_gelu"), 4096, 3072)
    kinds = [type(m) for m in proj]
    assert kinds == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert [(m.in_features, m.out_features) for m in proj if isinstance(m, nn.Linear)] == [
        (4096, 3072),
        (3072, 3072),
        (3072, 3072),
    ]
    assert build_projector(ProjectorConfig("mlp2x_gelu", hidden_dim=128), 256, 64)[0].out_features == 128
    lin = build_projector(ProjectorConfig("linear"), 256, 64)
    assert isinstance(lin, nn.Linear) and lin.weight.shape == (64, 256)


@pytest.mark.parametrize("name", ["avg_pool", "token_concat"])
def test_features_of_other_widths_get_a_learned_map_to_the_widest_and_one_width_none(name):
    fusion = FUSIONS.build(name, ["a", "tower.b"], {"a": 16, "tower.b": 8}, N)
    assert fusion.output_dim == 16 and list(fusion.adapters) == ["tower__b"]
    assert (fusion.adapters["tower__b"].in_features, fusion.adapters["tower__b"].out_features) == (8, 16)
    a, b = torch.randn(2, N, 16), torch.randn(2, N, 8)
    out = fusion({"a": a, "tower.b": b})
    mapped = fusion.adapters["tower__b"](b)
    expected = (a + mapped) / 2 if name == "avg_pool" else torch.cat([a, mapped], dim=1)
    torch.testing.assert_close(out, expected)
    plain = FUSIONS.build(name, ["a", "b"], {"a": 16, "b": 16}, N)
    assert not list(plain.parameters()) and not plain.state_dict()  # parameter-free, as the paper's
