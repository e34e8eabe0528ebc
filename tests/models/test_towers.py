"""Towers beside Florence-2 (``model.vision.towers``): names, one decode per image resized per tower, grids
brought to one, freezing per tower, FSDP units, the feature cache's identity, export and checkpoints."""

import pytest
import torch

from fvl.config import load
from fvl.models import build_model, set_trainable
from fvl.models.vision.towers import align_grid, canonical, split_name, tower_input
from tests.fixtures import stage_trainable
from tests.models.test_trainable import one_batch

WITH_SIGLIP = ["model.fusion.features=[davit,caption,siglip.layer_-2]"]


def two_tower_cfg(*overrides: str):
    """The tiny preset with the tiny SigLIP it offers fused beside Florence-2's DaViT and caption features."""
    return load("tiny", [*WITH_SIGLIP, *overrides]).model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(two_tower_cfg())


def test_names_have_one_spelling():
    cfg = two_tower_cfg().vision
    assert split_name(cfg, "siglip.layer_-2") == ("siglip", "layer_-2")
    assert split_name(cfg, "florence2.davit") == ("florence2", "davit") == split_name(cfg, "davit")
    assert canonical(cfg, "florence2.ocr") == "ocr" and canonical(cfg, "siglip.layer_-2") == "siglip.layer_-2"
    qualified = build_model(two_tower_cfg("model.fusion.features=[florence2.davit,siglip.layer_-2]"))
    assert qualified.fusion.names == ["davit", "siglip.layer_-2"]


def test_a_tower_is_built_only_when_the_fusion_names_one_of_its_features(model):
    assert list(model.towers) == ["siglip"]
    plain = build_model(load("tiny").model)  # the preset offers the SigLIP; its fusion does not use it
    assert len(plain.towers) == 0 and not any(k.startswith("towers.") for k in plain.state_dict())
    assert plain.processor.transform.size == 64


def test_the_grid_rule_and_the_fused_shapes(model):
    # tiny Florence-2: 64 px -> a 4 x 4 grid; tiny SigLIP: 56 px in 8 px patches -> 7 x 7, pooled to 4 x 4
    assert model.vision.num_tokens == 16 and model.towers["siglip"].num_tokens == 49
    assert model.fusion.dims == {"davit": 64, "caption": 64, "siglip.layer_-2": 32}
    assert model.num_image_tokens == 16 and model.fusion.output_dim == 160
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    features = model.tower_features(pixels, model.fusion.names)
    assert {k: tuple(v.shape) for k, v in features.items()} == {
        "davit": (2, 16, 64), "caption": (2, 16, 64), "siglip.layer_-2": (2, 16, 32)}  # fmt: skip
    assert model.fuse_images(pixels).shape == (2, 16, 160)


def test_area_resampling_is_the_mean_of_each_cell_and_bilinear_interpolates():
    grid = torch.arange(36, dtype=torch.float32).reshape(1, 36, 1)  # a 6 x 6 grid, row-major
    pooled = align_grid(grid, 9, "area")  # 3 x 3: each target cell is a 2 x 2 block
    g = grid.reshape(6, 6)
    expected = torch.stack([g[i : i + 2, j : j + 2].mean() for i in (0, 2, 4) for j in (0, 2, 4)])
    assert torch.equal(pooled.flatten(), expected)
    up = align_grid(torch.ones(2, 9, 5), 16, "bilinear")
    assert up.shape == (2, 16, 5) and torch.allclose(up, torch.ones_like(up))
    assert align_grid(grid, 36) is grid
    with pytest.raises(ValueError, match="no square grid"):
        align_grid(torch.zeros(1, 577, 4), 576)  # a pooled token on top of 24 x 24


def test_each_tower_gets_its_own_resolution_and_normalisation(model):
    siglip = model.towers["siglip"]
    pixels = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    own = tower_input(pixels, model.processor.transform, siglip.transform())
    assert own.shape == (1, 3, 56, 56)
    # SigLIP's statistics (mean = std = 0.5): 0..255 becomes -1..1
    assert own.min() >= -1.0 - 1e-6 and own.max() <= 1.0 + 1e-6
    flat = torch.full((1, 3, 64, 64), 255, dtype=torch.uint8)
    assert torch.allclose(
        tower_input(flat, model.processor.transform, siglip.transform()), torch.ones(1, 3, 56, 56)
    )
    # the main tower at the decode size sees exactly the single-tower input
    main = tower_input(pixels, model.processor.transform, model.vision.transform())
    assert torch.equal(main, model.processor.transform.normalize(pixels))
    # normalised float pixels (the main tower's statistics) reach SigLIP as the same picture
    from_float = tower_input(
        model.processor.transform.normalize(pixels), model.processor.transform, siglip.transform()
    )
    assert torch.allclose(from_float, own, atol=1e-5)


def test_freezing_per_tower_and_gradients(model):
    counts = set_trainable(model, ["vision.siglip", "projector"])
    assert counts["vision.florence2"]["trainable"] == 0 and counts["vision.siglip"]["trainable"] > 0
    assert counts["vision"]["trainable"] == counts["vision.siglip"]["trainable"]
    assert counts["vision.siglip"]["unused"] > 0  # its last layer, post-layernorm and head: after layer -2
    model.train()
    assert model.vision.training is False and model.towers["siglip"].training is True
    model(one_batch(model)).loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("towers.siglip.") for n in trained) and not any(
        n.startswith("vision.") for n in trained
    )
    with pytest.raises(ValueError, match="unknown components"):
        set_trainable(model, ["vision.clip"])
    set_trainable(model, stage_trainable("pretrain"))  # ``vision``: every tower
    assert all(p.requires_grad for n, p in model.towers.named_parameters() if "encoder.layers.0." in n)
    from fvl.config.train import TrainConfig
    from fvl.train.optim import parameter_groups

    groups = parameter_groups(model, TrainConfig(lr=1e-3, vision_lr=2e-6))
    tower_params = {id(p) for p in model.towers.parameters() if p.requires_grad}
    assert all(g["lr"] == 2e-6 for g in groups if tower_params & {id(p) for p in g["params"]})  # vision_lr
    model.zero_grad()


def test_a_stage_naming_a_tower_the_model_lacks_is_a_config_error():
    with pytest.raises(Exception, match="towers \\['clip'\\]"):
        load("tiny", ["stage.trainable=[vision.clip,projector]"])
    load("tiny", [*WITH_SIGLIP, "stage.trainable=[vision.siglip,projector]"])


def test_fsdp_units_and_flops_cover_both_towers(model):
    from fvl.models.flops import FlopCounter

    names = {c.__name__ for c in model.fsdp_wrap_classes()}
    assert {"Florence2VisionBlock", "SiglipEncoderLayer", "Phi3DecoderLayer"} <= names
    set_trainable(model, stage_trainable("finetune"))
    single = build_model(load("tiny", ["model.fusion.features=[davit,caption]"]).model)
    set_trainable(single, stage_trainable("finetune"))
    assert FlopCounter.of(model).features_per_image > FlopCounter.of(single).features_per_image


def test_the_feature_cache_identity_sees_the_second_tower(model):
    from fvl.data.feature_cache.store import identity_of

    single = build_model(load("tiny").model)
    one, two = identity_of(single, "square"), identity_of(model, "square")
    assert "towers" not in one  # an older cache of a single tower still matches
    assert two["towers"]["siglip"]["image_size"] == 56 and two["features"][-1] == "siglip.layer_-2"
    assert one["weights_sha256"] != two["weights_sha256"]


def test_checkpoint_and_export_round_trip(model, tmp_path):
    from fvl.convert.export import export, load_exported
    from fvl.models import load_checkpoint, save_checkpoint

    model.eval()
    batch = one_batch(model)
    with torch.no_grad():
        expected = model(batch).logits
    save_checkpoint(model, tmp_path / "w.safetensors")
    again = load_checkpoint(tmp_path / "w.safetensors")
    folder = export(model, tmp_path / "export")
    assert (folder / "vision_siglip" / "preprocessor_config.json").exists()
    exported = load_exported(folder).eval()
    from transformers import SiglipVisionModel

    SiglipVisionModel.from_pretrained(folder / "vision_siglip")  # plain transformers loads it
    with torch.no_grad():
        assert torch.allclose(again.eval()(batch).logits, expected, atol=1e-5)
        assert torch.allclose(exported(batch).logits, expected, atol=1e-5)


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_vit_towers_leave_only_what_follows_the_layer_read_unused(tower):
    """transformers 5 keeps a ViT's embeddings and encoder on the vision model itself (no ``vision_model``):
    the embeddings and the layers before the one read are used, the rest is not."""
    from tests.fixtures import tower_cfg

    m = build_model(tower_cfg(tower, "fusion.features=[layer_-2]"))
    unused = m.vision.unused_parameters(["layer_-2"])
    names = [n for n, _ in m.vision.named_parameters()]
    assert not any(n.startswith("model.embeddings") for n in unused)
    assert any(".layers.2." in n for n in unused) and not any(".layers.1." in n for n in unused)
    assert {n for n in names if ".layers.0." in n}.isdisjoint(unused)
    assert len(m.vision.wrap_classes()) == 1


@pytest.mark.parametrize(("fusion", "tokens", "width"), [("token_concat", 48, 64), ("avg_pool", 16, 64)])
def test_token_concat_and_average_pooling_take_the_second_tower_too(fusion, tokens, width):
    model = build_model(two_tower_cfg(f"model.fusion.name={fusion}"))
    assert (model.num_image_tokens, model.fusion.output_dim) == (tokens, width)
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    assert model.fuse_images(pixels).shape == (2, tokens, width)
    counts = set_trainable(model, stage_trainable("finetune"))
    assert counts["fusion"]["trainable"] == 32 * 64 + 64  # SigLIP's 32 channels mapped to 64, learned
    assert not model.features_frozen()  # a fusion that learns: no feature cache for it


def test_the_real_presets_siglip_so400m_on_the_meta_device(tmp_path):
    """The 3B finetune experiment composed with fusion/florence2_siglip.yaml, at real size (random init, the
    meta device): SigLIP-so400m's 27 x 27 grid pooled to 24 x 24, 1152 channels beside Florence-2's
    4 x 1024, float32 trainables."""
    from tests.fixtures import EXPERIMENTS

    composed = tmp_path / "exp.yaml"
    parts = [EXPERIMENTS / "florence_vl_3b_finetune.yaml", EXPERIMENTS / "fusion" / "florence2_siglip.yaml"]
    composed.write_text(f"include: [{', '.join(str(p) for p in parts)}]\n")
    cfg = load(
        composed,
        ["model.vision.init=random", "model.llm.init=random", "model.vision.towers.siglip.init=random"],
    )
    with torch.device("meta"):
        model = build_model(cfg.model)
    counts = set_trainable(model, cfg.stage.trainable)
    siglip = model.towers["siglip"]
    assert siglip.num_tokens == 729 and model.num_image_tokens == 576 and model.fusion.output_dim == 5248
    assert model.processor.transform.size == 768 and siglip.image_size == 384
    assert abs(sum(p.numel() for p in siglip.parameters()) - 428.2e6) / 428.2e6 < 0.01
    assert counts["vision.siglip"]["trainable"] == 0 and counts["vision.siglip"]["frozen"] > 0  # stage 2
    assert "SiglipEncoderLayer" in {c.__name__ for c in model.fsdp_wrap_classes()}
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_pca_and_the_alignment_analysis_see_every_tower(model):
    from PIL import Image

    from fvl.config.eval import AlignConfig
    from fvl.eval.align.pairs import encode_pairs
    from fvl.eval.pca import pca_panels

    panels = pca_panels(model, Image.new("RGB", (80, 60), "red"))
    assert set(panels) == {"davit", "caption", "ocr", "grounding", "siglip.layer_-2"}
    grids = {name: panel[0].shape[:2] for name, panel in panels.items()}
    assert grids["davit"] == (4, 4) and grids["siglip.layer_-2"] == (7, 7)  # each on its own tower's grid
    pairs = encode_pairs(model, AlignConfig(samples=16, batch_size=8, steps=1, seeds=1))
    assert pairs.vision["siglip.layer_-2"].shape[1:] == (16, 32)  # on the main tower's grid, as fused
