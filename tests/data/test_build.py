"""Recipes, shard building (bad inputs counted), parts and merge, interruption and resume."""

import io
import json
import tarfile

import pytest
import webdataset as wds
from PIL import Image

from fvl.data import shards as shards_mod
from fvl.data.recipes import RecipeError, load_recipe
from fvl.data.shards import build, merge
from fvl.data.synthetic import GENERATOR_VERSION
from tests.fixtures import BAD_CAPTIONS, BAD_LLAVA, GOOD_CAPTIONS, GOOD_LLAVA, write_sources


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory):
    return write_sources(tmp_path_factory.mktemp("src"))


@pytest.fixture(scope="module")
def whole(recipe_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    return out, build(load_recipe(recipe_path), out, workers=2)


def read_back(folder, manifest):
    samples = {}
    for sh in manifest["shards"]:
        for s in wds.WebDataset(str(folder / sh["path"]), shardshuffle=False):
            meta = json.loads(s["json"])
            samples[meta["id"]] = (s, meta)
    return samples


def test_every_bad_input_is_counted_by_reason_and_every_good_one_kept(whole, recipe_path):
    out, manifest = whole
    assert manifest["sources"]["llava"]["skipped"] == BAD_LLAVA
    assert manifest["sources"]["llava"]["written"] == len(GOOD_LLAVA)
    assert manifest["sources"]["captions"]["skipped"] == BAD_CAPTIONS
    assert manifest["sources"]["captions"]["written"] == GOOD_CAPTIONS
    assert manifest["sources"]["synth"] == {
        "written": 30,
        "skipped": {},
        "weight": 1.0,
        "format": "synthetic",
        "generator_version": GENERATOR_VERSION,
    }
    samples = read_back(out, manifest)
    assert set(GOOD_LLAVA) <= set(samples) and {"c0", "c1", "c2"} <= set(samples)
    assert (
        sum(sh["samples"] for sh in manifest["shards"])
        == len(samples)
        == len(GOOD_LLAVA) + GOOD_CAPTIONS + 30
    )
    # an RGB JPEG passes through byte for byte; every other mode is converted to an RGB PNG
    assert samples["rgb_jpg"][0]["jpg"] == (recipe_path.parent / "images" / "rgb.jpg").read_bytes()
    for sid in ["gray_png", "rgba_png", "palette_png", "cmyk_jpg", "i16_png"]:
        raw, meta = samples[sid]
        assert meta["image_keys"] == ["png"]
        assert Image.open(io.BytesIO(raw["png"])).mode == "RGB"
    assert samples["text_only"][1]["image_keys"] == [] and "jpg" not in samples["text_only"][0]
    assert samples["two_images"][1]["image_keys"] == ["img0.jpg", "img1.png"]
    assert samples["c0"][1]["conversations"][1]["value"] == "caption 0"
    # manifest shape and integrity
    for sh in manifest["shards"]:
        assert set(sh) >= {"path", "samples", "bytes", "sha256"}
        assert (out / sh["path"]).stat().st_size == sh["bytes"]
        with tarfile.open(out / sh["path"]) as tf:  # complete, readable tars
            assert all(m.mtime == 0 for m in tf.getmembers())
    assert not list(out.glob(".tmp-*"))


def test_parts_merge_to_the_whole_build(recipe_path, whole, tmp_path):
    _, manifest = whole
    recipe = load_recipe(recipe_path)
    build(recipe, tmp_path, part="1/2")
    with pytest.raises(ValueError, match=r"parts \[1\] present"):
        merge(tmp_path)
    build(recipe, tmp_path, part="0/2", workers=2)
    merged = merge(tmp_path)
    assert merged["sources"] == manifest["sources"]
    assert merged["shards"] == manifest["shards"]  # same names, sizes and sha256


def test_interrupted_build_resumes_to_the_same_manifest(recipe_path, whole, tmp_path, monkeypatch):
    _, manifest = whole
    recipe = load_recipe(recipe_path)
    real = shards_mod.encode_item
    calls = {"n": 0}

    def dying(source, item, index, max_images=0):
        calls["n"] += 1
        if calls["n"] == 25:
            raise KeyboardInterrupt("killed mid-task")
        return real(source, item, index, max_images)

    monkeypatch.setattr(shards_mod, "encode_item", dying)
    with pytest.raises(KeyboardInterrupt):
        build(recipe, tmp_path)
    monkeypatch.setattr(shards_mod, "encode_item", real)
    done = sorted(tmp_path.glob("*.done.json"))
    assert done and len(done) < len(manifest["shards"])  # it really stopped halfway
    assert not (tmp_path / "manifest.json").exists()
    # a task whose tars were renamed but whose record never landed is redone, not trusted
    record = next(d for d in done if json.loads(d.read_text())["shards"])
    victim = json.loads(record.read_text())
    record.unlink()
    (tmp_path / victim["shards"][0]["path"]).write_bytes(b"truncated")
    resumed = build(recipe, tmp_path)
    assert resumed["sources"] == manifest["sources"] and resumed["shards"] == manifest["shards"]
    assert not list(tmp_path.glob(".tmp-*"))


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "text, match",
    [
        (
            "sources:\n  - {name: a, format: synthetic, num_samples: 3, colour: red}\n",
            r"sources\[0\]\.colour",
        ),
        ("sources: []\nextra: 1\n", "extra"),
        ("sources: []\n", "'sources' is empty"),
        ("sources:\n  - {name: a, format: csv, annotations: x}\n", r"sources\[0\] \(a\)\.format='csv'"),
        (
            "sources:\n  - {name: a, format: llava_json, annotations: nope.json}\n",
            r"sources\[0\] \(a\)\.annotations: file not found",
        ),
        ("sources:\n  - {name: a, format: llava_json}\n", "annotations is required"),
        (
            "sources:\n  - {name: a, format: synthetic, num_samples: 3, weight: 0}\n",
            r"\.weight=0\.0: must be a positive",
        ),
        ("sources:\n  - {name: a, format: synthetic, num_samples: 3, weight: -1}\n", "weight"),
        (
            "sources:\n  - {name: a, format: synthetic, num_samples: 3, weight: heavy}\n",
            r"sources\[0\]\.weight",
        ),
        ("sources:\n  - {name: a, format: synthetic, num_samples: 0}\n", "num_samples must be positive"),
        (
            "sources:\n  - {name: a, format: synthetic, num_samples: 3}\n  - {name: a, format: synthetic, num_samples: 3}\n",
            "duplicate source names",
        ),
        ("sources:\n  - {name: a/b, format: synthetic, num_samples: 3}\n", "name: use letters"),
    ],
)
def test_recipe_errors_name_the_recipe_and_key(tmp_path, text, match):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError, match=match) as err:
        load_recipe(path)
    assert str(path) in str(err.value)


def test_missing_image_root_is_an_error(tmp_path):
    (tmp_path / "a.json").write_text("[]")
    path = write(
        tmp_path, "sources:\n  - {name: a, format: llava_json, annotations: a.json, image_root: imgs}\n"
    )
    with pytest.raises(RecipeError, match=r"image_root: folder not found"):
        load_recipe(path)


@pytest.mark.parametrize(
    "name", ["synthetic", "florence_vl_pretrain", "florence_vl_sft", "llava15_pretrain", "llava15_sft"]
)
def test_shipped_recipes_load(name):
    recipe = load_recipe(name, check_files=(name == "synthetic"))
    assert recipe.sources


def test_part_syntax():
    with pytest.raises(ValueError, match="need 0 <= K < N"):
        shards_mod.parse_part("2/2")
    with pytest.raises(ValueError, match="expected K/N"):
        shards_mod.parse_part("half")


def test_cli_build_parts_and_merge(recipe_path, whole, tmp_path):
    from fvl.cli import main

    for k in (0, 1):
        assert (
            main(["shards", "build", str(recipe_path), "--out", str(tmp_path), "--part", f"{k}/2", "--quiet"])
            == 0
        )
    assert main(["shards", "merge", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "manifest.json").read_text())["shards"] == whole[1]["shards"]


def test_samples_that_can_never_fit_are_counted_not_written(recipe_path, tmp_path):
    recipe = load_recipe(recipe_path)
    recipe.shards.max_images = 1  # e.g. a model whose max_length holds one image
    manifest = build(recipe, tmp_path / "one", workers=1)
    llava = manifest["sources"]["llava"]
    assert llava["skipped"] == {**BAD_LLAVA, "too_many_images": 1} and llava["written"] == len(GOOD_LLAVA) - 1
    assert "two_images" not in read_back(tmp_path / "one", manifest) and manifest["max_images"] == 1


def test_training_derives_the_image_limit_from_the_model():
    from fvl.config import load
    from fvl.models import build_processor

    processor = build_processor(
        load("florence_vl_3b", ["model.vision.init=random", "model.llm.init=random"]).model
    )
    assert processor.max_images == (2048 - 64) // 576 == 3  # a fourth image can never fit
