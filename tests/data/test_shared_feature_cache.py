"""One feature cache for a whole fusion sweep: a cache of every tower feature side by side (``fvl features build
--all-features``) gives each parameter-free fusion variant the features its own tower + fusion compute; what it
cannot serve is refused; the sweep's first stage reads it when its tower comes from a folder; builds of one
cache by runs side by side are serialised."""

from __future__ import annotations

import json

import pytest
import torch

from fvl.config import load
from fvl.data.datamodule import build_datamodule
from fvl.data.feature_cache.build import build_features, cache_for_stage
from fvl.data.feature_cache.store import MANIFEST, FeatureCacheError, FeatureSelection, identity_of
from fvl.models import build_model, set_trainable
from tests.fixtures import cache_setting

FINETUNE = ["fusion", "projector", "llm"]
VARIANTS = {  # the shipped sweep's grid, as fusion overrides
    "dbfusion": [],
    "token_concat": ["model.fusion.name=token_concat"],
    "avg_pool": ["model.fusion.name=avg_pool"],
    "davit_only": ["model.fusion.features=[davit]"],
    "minus_ocr": ["model.fusion.features=[davit,caption,grounding]"],
    "single_layer": ["model.fusion.name=single_layer", "model.fusion.features=[grounding]"],
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    base, model, checkpoint = cache_setting(root, captions=16, qa=24, per_shard=8)
    build_features(
        checkpoint, root / "shards", root / "all", ["synthetic_qa"], dtype="float32", num_workers=0,
        all_features=True,
    )  # fmt: skip
    return {"root": root, "base": base, "model": model}


def variant(env, overrides):
    """A finetune model of one variant with the fixture's tower (its projector is its own)."""
    model = build_model(load("finetune", [*env["base"], *overrides]).model)
    model.vision.load_state_dict(env["model"].vision.state_dict())
    set_trainable(model, FINETUNE)
    return model


def first_batch(env, model, cache=None):
    extra = [f"data.feature_cache={cache}"] if cache else []
    dm = build_datamodule(
        load("finetune", [*env["base"], *extra]),
        processor=model.processor,
        feature_identity=identity_of(model, "pad") if cache else None,
        fusion=model.fusion,
    )
    dm.setup()
    return next(iter(dm.train_dataloader()))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_a_side_by_side_cache_gives_each_variant_its_own_fused_features(env, name):
    model = variant(env, VARIANTS[name])
    plain = first_batch(env, model)
    cached = first_batch(env, model, env["root"] / "all")
    assert cached["ids"] == plain["ids"] and "pixel_values" not in cached
    with torch.no_grad():
        expected = model.fuse_images(plain["pixel_values"])
    assert cached["image_features"].shape == expected.shape
    assert expected.shape[1:] == (model.num_image_tokens, model.fusion.output_dim)
    torch.testing.assert_close(cached["image_features"], expected, rtol=1e-5, atol=1e-6)


def test_the_manifest_names_every_feature_and_its_width(env):
    identity = json.loads((env["root"] / "all" / MANIFEST).read_text())["identity"]
    assert identity["fusion"] == "dbfusion"
    assert identity["features"] == ["davit", "caption", "ocr", "grounding"]
    assert identity["feature_dims"] == {n: 64 for n in identity["features"]} and identity["dim"] == 256


def test_what_a_cache_cannot_serve_is_refused(env, tmp_path):
    # a cache of averaged features holds no feature separately: another fusion cannot be computed from it
    avg = variant(env, VARIANTS["avg_pool"])
    build_features(None, env["root"] / "shards", tmp_path / "avg", ["synthetic_qa"], num_workers=0, model=avg)
    with pytest.raises(FeatureCacheError, match="fusion"):
        first_batch(env, variant(env, []), tmp_path / "avg")
    # a channel concat of two features cannot serve a feature it lacks
    two = variant(env, ["model.fusion.features=[davit,caption]"])
    build_features(None, env["root"] / "shards", tmp_path / "two", ["synthetic_qa"], num_workers=0, model=two)
    with pytest.raises(FeatureCacheError, match="features"):
        first_batch(env, variant(env, ["model.fusion.features=[davit,ocr]"]), tmp_path / "two")
    # ... but serves a subset of its features under any parameter-free fusion
    subset = variant(env, ["model.fusion.name=avg_pool", "model.fusion.features=[caption,davit]"])
    assert first_batch(env, subset, tmp_path / "two")["image_features"].shape[1:] == (16, 64)
    # another tower's weights are still refused
    other = variant(env, VARIANTS["token_concat"])
    with torch.no_grad():
        next(other.vision.parameters()).add_(1e-3)
    with pytest.raises(FeatureCacheError, match="weights_sha256"):
        first_batch(env, other, env["root"] / "all")
    # a fusion with parameters is never computed in the loader
    learned = variant(env, VARIANTS["avg_pool"])
    learned.fusion.scale = torch.nn.Parameter(torch.ones(1))
    built = json.loads((env["root"] / "all" / MANIFEST).read_text())["identity"]
    assert FeatureSelection.between(built, identity_of(learned, "pad"), learned.fusion) is None


def test_a_first_stage_reads_the_shared_cache_when_its_tower_comes_from_a_folder(env, tmp_path):
    """The sweep's path: ``cache_for_stage`` without a checkpoint builds the cache of the model the config
    builds (tower from ``model.vision.path``), the next variant finds it complete, and a random-init tower
    (which the seed changes) gets none. (Runs side by side, each in its process, take turns through a file
    lock: the parallel sweep test covers that.)"""
    tower = tmp_path / "tower"
    env["model"].vision.save_pretrained(tower)
    common = [*env["base"], f"output_dir={tmp_path / 'runs'}", "model.vision.init=pretrained",
              f"model.vision.path={tower}", "stage.trainable=[fusion,projector,llm]", "trainer.max_steps=1"]  # fmt: skip
    folder = tmp_path / "caches"
    first = cache_for_stage(load("pretrain", common), None, folder, shared=True)
    stamp = (first / MANIFEST).stat().st_mtime_ns
    again = cache_for_stage(load("pretrain", [*common, *VARIANTS["avg_pool"]]), None, folder, shared=True)
    assert first is not None and again == first  # one cache for both variants
    assert (first / MANIFEST).stat().st_mtime_ns == stamp  # found complete: not rebuilt, not rewritten
    assert [p.name for p in folder.iterdir() if p.is_dir()] == [first.name]
    found = {"dbfusion": first}
    manifest = json.loads((found["dbfusion"] / MANIFEST).read_text())
    assert manifest["identity"]["resize_mode"] == "square" and len(manifest["shards"]) == 2  # the captions
    # a random-init first stage: no cache (each seed draws another tower)
    assert cache_for_stage(load("pretrain", [*env["base"], "stage.trainable=[fusion,projector,llm]"]),
                           None, folder, shared=True) is None  # fmt: skip
