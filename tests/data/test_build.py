"""Recipes, shard building (bad inputs counted), parts and merge, interruption and resume."""

import io
import json
import logging
import os
import re
import tarfile
import tracemalloc
from collections import Counter

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from fvl.data import shards as shards_mod
from fvl.data import sources as sources_mod
from fvl.data.recipes import RecipeError, SourceConfig, load_recipe
from fvl.data.shards import build, merge
from fvl.data.sources import Skip, encode_item, image_bytes, read_items
from fvl.data.tarindex import load_index
from fvl.synthetic import GENERATOR_VERSION
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
    synth = dict(manifest["sources"]["synth"])  # a copy: the module fixture is shared
    fingerprint = synth.pop("fingerprint")
    assert synth == {
        "written": 30,
        "skipped": {},
        "weight": 1.0,
        "format": "synthetic",
        "generator_version": GENERATOR_VERSION,
    }
    assert fingerprint["generator_version"] == GENERATOR_VERSION and fingerprint["samples_per_shard"] == 4
    assert "weight" not in fingerprint["source"] and fingerprint["source"]["num_samples"] == 30
    llava_print = manifest["sources"]["llava"]["fingerprint"]
    assert llava_print["annotations"]["size"] == (recipe_path.parent / "llava.json").stat().st_size
    assert manifest["recipe_name"] == "recipe" and manifest["recipe"] == str(recipe_path)
    samples = read_back(out, manifest)
    assert set(GOOD_LLAVA) <= set(samples) and {"c0", "c1", "c2"} <= set(samples)
    assert (
        sum(sh["samples"] for sh in manifest["shards"])
        == len(samples)
        == len(GOOD_LLAVA) + GOOD_CAPTIONS + 30
    )
    # an RGB JPEG passes through byte for byte, a CMYK JPEG stays a JPEG; every other mode becomes an RGB PNG
    assert samples["rgb_jpg"][0]["jpg"] == (recipe_path.parent / "images" / "rgb.jpg").read_bytes()
    for sid, ext in [("gray_png", "png"), ("rgba_png", "png"), ("palette_png", "png"), ("cmyk_jpg", "jpg"),
                     ("i16_png", "png")]:  # fmt: skip
        raw, meta = samples[sid]
        assert meta["image_keys"] == [ext]
        assert Image.open(io.BytesIO(raw[ext])).mode == "RGB"
    assert samples["text_only"][1]["image_keys"] == [] and "jpg" not in samples["text_only"][0]
    assert samples["two_images"][1]["image_keys"] == ["img0.jpg", "img1.png"]
    assert samples["c0"][1]["conversations"][1]["value"] == "caption 0"
    # manifest shape and integrity
    for sh in manifest["shards"]:
        assert set(sh) >= {"path", "samples", "bytes", "sha256", "index", "source"}
        assert (out / sh["path"]).stat().st_size == sh["bytes"]
        assert sh["index"] == sh["path"] + ".idx.npy" and len(load_index(out / sh["path"])) == sh["samples"]
        assert (out / sh["index"]).is_file()
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
    # only the unfinished tasks are encoded again
    finished = sum(json.loads(d.read_text())["items"] for d in tmp_path.glob("*.done.json"))
    counted = {"n": 0}

    def counting(*args, **kwargs):
        counted["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(shards_mod, "encode_item", counting)
    resumed = build(recipe, tmp_path)
    total = sum(s["written"] + sum(s["skipped"].values()) for s in manifest["sources"].values())
    assert 0 < counted["n"] == total - finished
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


# ---- images behind symlinks, image formats -----------------------------------------------------------------
def _conv():
    return [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A thing."}]


def test_images_behind_a_symlinked_folder_are_read(tmp_path):
    outside = tmp_path / "datasets" / "coco"  # LLaVA's layout: images/coco -> /datasets/coco
    outside.mkdir(parents=True)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="JPEG")
    for i in range(40):
        (outside / f"{i}.jpg").write_bytes(buf.getvalue())
    (tmp_path / "secret.jpg").write_bytes(buf.getvalue())
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    (root / "images" / "coco").symlink_to(outside, target_is_directory=True)
    items = [{"id": str(i), "image": f"coco/{i}.jpg", "conversations": _conv()} for i in range(40)]
    items += [{"id": "up", "image": "../secret.jpg", "conversations": _conv()},
              {"id": "abs", "image": str(tmp_path / "secret.jpg"), "conversations": _conv()}]  # fmt: skip
    (root / "a.json").write_text(json.dumps(items))
    recipe = write(
        root, "sources:\n  - {name: a, format: llava_json, annotations: a.json, image_root: images}\n"
    )
    manifest = build(load_recipe(recipe), tmp_path / "out")
    assert manifest["sources"]["a"]["written"] == 40
    assert manifest["sources"]["a"]["skipped"] == {"bad_image_path": 2}  # the written path is still checked


def _photo(mode: str) -> Image.Image:
    """A 128 px picture that compresses like a photo: smooth shapes plus sensor noise, in ``mode``."""
    x, y = np.meshgrid(np.linspace(0, 1, 128), np.linspace(0, 1, 128))
    rgb = np.stack([x, y, (x + y) / 2], axis=-1) * 200 + 20
    rgb[40:80, 40:80] = [230, 220, 30]
    rgb += np.random.default_rng(0).normal(0, 6, rgb.shape)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).convert(mode)


@pytest.mark.parametrize("mode", ["CMYK", "L"])
def test_non_rgb_jpegs_stay_jpegs(mode):
    buf = io.BytesIO()
    _photo(mode).save(buf, format="JPEG", quality=95)
    data, ext = image_bytes(buf.getvalue())
    assert ext == "jpg" and Image.open(io.BytesIO(data)).mode == "RGB"
    png = io.BytesIO()
    Image.open(buf).convert("RGB").save(png, format="PNG")
    assert len(data) < len(png.getvalue())
    # RGB PNGs pass through byte for byte; a palette PNG still becomes a lossless RGB PNG
    rgb_png = io.BytesIO()
    _photo("RGB").save(rgb_png, format="PNG")
    assert image_bytes(rgb_png.getvalue()) == (rgb_png.getvalue(), "png")
    palette = io.BytesIO()
    _photo("P").save(palette, format="PNG")
    data, ext = image_bytes(palette.getvalue())
    assert ext == "png" and Image.open(io.BytesIO(data)).mode == "RGB"


# ---- streamed annotations ----------------------------------------------------------------------------------
def test_read_items_streams_a_large_llava_json(tmp_path):
    path = tmp_path / "big.json"
    long = "x" * 2500
    with open(path, "w") as f:  # ~30 MB, written in pieces so that the test itself stays small
        f.write("[")
        for i in range(12_000):
            item = {"id": i, "score": 0.5, "conversations": [{"from": "human", "value": long}]}
            f.write(("," if i else "") + json.dumps(item))
        f.write("]")
    size = path.stat().st_size
    assert size > 30e6
    source = SourceConfig(name="big", format="llava_json", annotations=str(path))
    tracemalloc.start()
    try:
        count, last = 0, None
        for item in read_items(source):
            count, last = count + 1, item
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 12_000 and peak < size / 3
    assert type(last["score"]) is float and last["id"] == 11_999  # plain numbers, not Decimal
    source.max_samples = 3
    assert [x["id"] for x in read_items(source)] == [0, 1, 2]


def test_llava_json_lines_and_bad_annotation_files(tmp_path):
    text_only = [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]
    lines = tmp_path / "a.jsonl"
    lines.write_text(json.dumps({"id": "x", "conversations": text_only}) + "\n\n" + '{"id": \n')
    source = SourceConfig(name="a", format="llava_json", annotations=str(lines))
    good, bad = list(read_items(source))  # the blank line is no item
    assert json.loads(encode_item(source, good, 0)["json"])["id"] == "x"
    with pytest.raises(Skip, match="bad_json"):  # one bad line is one counted skip
        encode_item(source, bad, 1)
    not_a_list = tmp_path / "b.json"
    not_a_list.write_text('  {"id": 1}')
    with pytest.raises(ValueError, match=rf"{not_a_list}: a LLaVA JSON file must hold a list"):
        list(read_items(SourceConfig(name="b", format="llava_json", annotations=str(not_a_list))))
    broken = tmp_path / "c.json"
    broken.write_text('[{"id": 1}, {"id": ')
    with pytest.raises(ValueError, match=rf"{broken}: invalid JSON"):
        list(read_items(SourceConfig(name="c", format="llava_json", annotations=str(broken))))


# ---- rebuilds: fingerprints, stale files, parts ------------------------------------------------------------
def synth_recipe(folder, per_shard, **sizes):
    """A recipe of synthetic sources ``name=num_samples`` (32 px: cheap to draw)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        f"  - {{name: {name}, format: synthetic, num_samples: {n}, image_size: 32}}"
        for name, n in sizes.items()
    ]
    return load_recipe(
        write(folder, "sources:\n" + "\n".join(lines) + f"\nshards: {{samples_per_shard: {per_shard}}}\n")
    )


def on_disk(out):
    """Sample keys per source in every tar of ``out`` (listed or not), and the sidecars and records there."""
    keys = []
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as tf:
            keys += [m.name.split(".")[0] for m in tf.getmembers() if m.name.endswith(".json")]
    return keys, {p.name for p in out.glob("*.idx.npy")}, {p.name for p in out.glob("*.done.json")}


def check_exact(out, manifest, source, n):
    keys, sidecars, _ = on_disk(out)
    assert manifest["sources"][source]["written"] == n == len(keys) == len(set(keys))
    assert sidecars == {sh["index"] for sh in manifest["shards"]}  # no sidecar of an old shard is left


def test_rebuilding_with_another_shard_size_never_duplicates(tmp_path, caplog):
    out = tmp_path / "out"
    build(synth_recipe(tmp_path, 100, s=200), out)
    with caplog.at_level(logging.WARNING, logger="fvl.data.shards"):
        manifest = build(synth_recipe(tmp_path, 37, s=200), out)
    check_exact(out, manifest, "s", 200)
    assert len(on_disk(out)[2]) == 6  # records of the 6 tasks of 37, none left of the 2 tasks of 100
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "samples_per_shard changed" in warned[0]
    # back to larger tasks: the records beyond the new task count and a stray tar there go too
    (out / "s-000009-000.tar").write_bytes(b"left by an interrupted build")
    manifest = build(synth_recipe(tmp_path, 100, s=200), out)
    check_exact(out, manifest, "s", 200)
    assert not (out / "s-000009-000.tar").exists() and len(on_disk(out)[2]) == 2
    # a listed tar that went missing is rebuilt, not trusted
    (out / manifest["shards"][0]["path"]).unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fvl.data.shards"):
        assert build(synth_recipe(tmp_path, 100, s=200), out)["shards"] == manifest["shards"]
    assert "shard files missing" in caplog.text


def test_parts_rebuild_with_another_shard_size_without_removing_each_others_work(tmp_path):
    out = tmp_path / "out"
    build(synth_recipe(tmp_path, 100, s=200), out)
    recipe = synth_recipe(tmp_path, 37, s=200)
    build(recipe, out, part="0/2")
    part0 = {p.name: p.stat().st_mtime_ns for p in out.glob("s-*")}
    build(recipe, out, part="1/2", workers=2)
    assert all((out / name).stat().st_mtime_ns == t for name, t in part0.items())  # part 0's files kept
    check_exact(out, merge(out), "s", 200)
    assert merge(out)["shards"] == build(recipe, tmp_path / "whole")["shards"]


def test_a_source_is_not_confused_with_one_whose_name_extends_it(tmp_path):
    out = tmp_path / "out"
    build(synth_recipe(tmp_path, 4, **{"a": 10, "a-b": 10}), out)
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("a-b-*")}
    manifest = build(synth_recipe(tmp_path, 4, **{"a": 5, "a-b": 10}), out)  # only a changed
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("a-b-*")} == kept
    assert manifest["sources"]["a"]["written"] == 5 and manifest["sources"]["a-b"]["written"] == 10
    assert len(on_disk(out)[0]) == 15


def count_encodes(monkeypatch):
    real, counted = shards_mod.encode_item, Counter()

    def counting(source, *args, **kwargs):
        counted[source.name] += 1
        return real(source, *args, **kwargs)

    monkeypatch.setattr(shards_mod, "encode_item", counting)
    return counted


def test_a_changed_annotation_file_rebuilds_its_source(tmp_path, monkeypatch, caplog):
    recipe_path = write_sources(tmp_path / "src")
    out = tmp_path / "out"
    first = build(load_recipe(recipe_path), out)
    counted = count_encodes(monkeypatch)
    assert build(load_recipe(recipe_path), out) == first and not counted  # nothing changed: nothing redone
    annotations = recipe_path.parent / "llava.json"
    st = annotations.stat()
    os.utime(annotations, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched
    with caplog.at_level(logging.WARNING, logger="fvl.data.shards"):
        assert build(load_recipe(recipe_path), out)["shards"] == first["shards"]
    assert counted == {"llava": len(GOOD_LLAVA) + sum(BAD_LLAVA.values())}  # that source alone, all of it
    assert "llava: " in caplog.text and "annotation file changed" in caplog.text
    items = json.loads(annotations.read_text())
    annotations.write_text(json.dumps([*items, {**items[0], "id": "added"}]))  # edited
    edited = build(load_recipe(recipe_path), out)
    assert edited["sources"]["llava"]["written"] == len(GOOD_LLAVA) + 1
    assert "added" in read_back(out, edited)


def test_each_annotation_file_is_read_once_per_build(recipe_path, tmp_path, monkeypatch):
    from fvl.cli import main

    real_open, opened = open, Counter()

    def counting_open(file, *args, **kwargs):
        opened[str(file)] += 1
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(sources_mod, "open", counting_open, raising=False)
    assert (
        main(["shards", "build", str(recipe_path), "--out", str(tmp_path), "--workers", "2", "--quiet"]) == 0
    )
    folder = recipe_path.parent
    assert opened == {str(folder / "llava.json"): 1, str(folder / "captions.jsonl"): 1}


def test_build_cuts_streamed_items_into_tasks_as_they_come(tmp_path, monkeypatch):
    real_read, real_run, pulled, started = shards_mod.read_items, shards_mod.run_task, Counter(), []

    def reading(source):
        for item in real_read(source):
            pulled["n"] += 1
            yield item

    def running(source, task, items, *args):
        started.append((task.index, pulled["n"]))
        return real_run(source, task, items, *args)

    monkeypatch.setattr(shards_mod, "read_items", reading)
    monkeypatch.setattr(shards_mod, "run_task", running)
    assert build(synth_recipe(tmp_path, 10, s=55), tmp_path / "out")["sources"]["s"]["written"] == 55
    # task k starts once its items (and the one item that shows it is complete) are read, not the whole file
    assert started == [(k, min(55, (k + 1) * 10 + 1)) for k in range(6)]


def test_sidecars_land_before_their_tars_and_the_record_last(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    real_replace, landed = os.replace, []

    def recording(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        if os.path.dirname(os.fspath(dst)) == str(out):
            landed.append(os.path.basename(os.fspath(dst)))

    monkeypatch.setattr(os, "replace", recording)
    recipe = synth_recipe(tmp_path, 10, s=10)
    recipe.shards.max_shard_bytes = 3_000  # several tars in the task
    manifest = build(recipe, out)
    tars = [sh["path"] for sh in manifest["shards"]]
    assert len(tars) > 1
    expected = [name for tar in tars for name in (f"{tar}.idx.npy", tar)] + [
        "s-000000.done.json",
        "manifest.json",
    ]
    assert landed == expected
    record = json.loads((out / "s-000000.done.json").read_text())
    assert [sh["index"] for sh in record["shards"]] == [f"{tar}.idx.npy" for tar in tars]


def test_a_camera_mpo_passes_through_as_jpeg():
    from fvl.data.sources import image_bytes

    buf = io.BytesIO()
    first, second = Image.new("RGB", (64, 48), (200, 30, 30)), Image.new("RGB", (64, 48), (30, 30, 200))
    first.save(buf, format="MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(buf.getvalue())).format == "MPO"
    data, ext = image_bytes(buf.getvalue())
    assert ext == "jpg" and data == buf.getvalue()  # kept byte for byte, not re-encoded as PNG


def test_what_a_build_writes_beside_its_tars_is_as_readable_as_they_are(tmp_path):
    """A shard folder shared between accounts: manifest, done records and tar indexes follow the umask as
    the tars do (mkstemp's temporary files are 0600 whatever the umask)."""
    recipe = write(
        tmp_path,
        "sources:\n  - {name: a, format: synthetic, num_samples: 6}\nshards: {samples_per_shard: 3}\n",
    )
    before = os.umask(0o022)
    try:
        build(load_recipe(recipe), tmp_path / "shards", workers=1)
    finally:
        os.umask(before)
    written = [p for p in (tmp_path / "shards").rglob("*") if p.is_file()]
    for ending in (".tar", ".json", ".tar.idx.npy"):
        assert any(p.name.endswith(ending) for p in written), ending
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in written}
    assert set(modes.values()) == {"0o644"}, modes


@pytest.mark.parametrize(
    "written, inside",
    [
        ("a.jpg", "a.jpg"), ("sub/../sub/a.jpg", "sub/a.jpg"), ("./sub/./a.jpg", "sub/a.jpg"),
        ("sub/../a.jpg", "a.jpg"), ("../a.jpg", None), ("sub/../../a.jpg", None), ("/etc/passwd", None),
        ("..\\\\..\\\\a.jpg", None), ("C:\\\\a.jpg", None), ("sub/..", None), ("", None),
    ],
)  # fmt: skip
def test_image_paths_stay_under_the_root_as_written(tmp_path, written, inside):
    from fvl.data.sources import safe_image_path

    if inside is None:
        with pytest.raises(Skip, match="bad_image_path"):
            safe_image_path(str(tmp_path), written)
    else:
        assert safe_image_path(str(tmp_path), written) == tmp_path / inside


def test_llava_conversations_follow_llavas_own_preprocessing_and_the_manifest_counts_it(tmp_path):
    """LLaVA's train.py moves a lone <image> to the front of its turn and drops a leading non-human turn (the
    authors trained with it); `conversation_rules: as_written` keeps the turns, and skips those samples."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(images / "a.png")
    turns = [
        {"id": "after", "image": "a.png", "conversations": [
            {"from": "human", "value": "What colour is it?\n<image>"}, {"from": "gpt", "value": "Red."}]},
        {"id": "gpt_first", "image": "a.png", "conversations": [
            {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "<image>\nColour?"},
            {"from": "gpt", "value": "Red."}]},
        {"id": "as_is", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "Red."}]},
    ]  # fmt: skip
    (tmp_path / "a.json").write_text(json.dumps(turns))
    results = {}
    for rules in ("llava", "as_written"):
        recipe = write(tmp_path, "sources:\n  - {name: s, format: llava_json, annotations: a.json, image_root: images,"
                                 f" conversation_rules: {rules}}}\n")  # fmt: skip
        results[rules] = build(load_recipe(recipe), tmp_path / f"shards-{rules}", workers=1)["sources"]["s"]
    llava, written = results["llava"], results["as_written"]
    assert llava["written"] == 3 and llava["skipped"] == {}
    assert llava["normalised"] == {"image_moved_to_front": 1, "dropped_leading_turn": 1}
    assert written["written"] == 2 and written["skipped"] == {"bad_roles": 1} and "normalised" not in written
    by_id = {}
    for tar in sorted((tmp_path / "shards-llava").glob("*.tar")):
        for sample in wds.WebDataset(str(tar), shardshuffle=False):
            meta = json.loads(sample["json"])
            by_id[meta["id"]] = meta["conversations"]
    assert by_id["after"][0]["value"] == "<image>\nWhat colour is it?"
    assert [t["from"] for t in by_id["gpt_first"]] == ["human", "gpt"]


def test_shards_built_for_fewer_images_than_the_model_fits_are_refused_not_read_short(tmp_path):
    """Training built the shards for a model of 1 image a sample; a model that fits 2 must not train on them
    without a word: the two-image samples were skipped as too_many_images."""
    from fvl.config.data import DataConfig
    from fvl.data.datamodule import ensure_shards

    recipe = write_sources(tmp_path / "src")
    cfg = DataConfig(recipe=str(recipe), shards=str(tmp_path / "shards"))
    built = ensure_shards(cfg, max_images=1, progress=False)  # no shards yet: built here, as training does
    assert built["sources"]["llava"]["skipped"]["too_many_images"] == 1
    assert ensure_shards(cfg, max_images=1, progress=False)["max_images"] == 1  # the same model: fine
    with pytest.raises(
        ValueError, match=r"at most 1 image.*skipped 1 sample.*fits up to 2 images.*--max-images 2"
    ):
        ensure_shards(cfg, max_images=2, progress=False)


def _grow_captions(root):
    with open(root / "captions.jsonl", "a") as f:
        f.writelines(
            json.dumps({"id": f"new{i}", "image": "rgb.jpg", "caption": "new"}) + "\n" for i in range(20)
        )


@pytest.mark.parametrize(
    "change, named",
    [
        (_grow_captions, "source 'captions': annotation file changed"),
        (lambda root: (root / "recipe.yaml").write_text((root / "recipe.yaml").read_text().replace(
            "  - {name: synth", "  - {name: more, format: synthetic, num_samples: 5}\n  - {name: synth")),
         "source 'more' is in the recipe but not in the shards"),
        (lambda root: (root / "recipe.yaml").write_text((root / "recipe.yaml").read_text().replace(
            "  - {name: synth, format: synthetic, num_samples: 30, task: qa}\n", "")),
         "source 'synth' is in the shards but no longer in the recipe"),
        (lambda root: ((root / "pics").symlink_to(root / "images"), (root / "recipe.yaml").write_text(
            (root / "recipe.yaml").read_text().replace("image_root: images, weight", "image_root: pics, weight"))),
         "source 'llava': image_root changed"),
    ],
)  # fmt: skip
def test_training_refuses_shards_the_recipe_no_longer_describes_naming_each_difference(
    tmp_path, change, named
):
    from fvl.config.data import DataConfig
    from fvl.data.datamodule import ensure_shards

    recipe = write_sources(tmp_path / "src")
    build(load_recipe(recipe), tmp_path / "shards", workers=1)
    cfg = DataConfig(recipe=str(recipe), shards=str(tmp_path / "shards"))
    ensure_shards(cfg, progress=False)  # as built: accepted
    change(tmp_path / "src")
    with pytest.raises(ValueError, match=re.escape(named) + ".*fvl shards build"):
        ensure_shards(cfg, progress=False)


def test_one_recipe_spelled_two_ways_is_one_recipe(tmp_path, monkeypatch):
    from fvl.config.data import DataConfig
    from fvl.data.datamodule import ensure_shards

    recipe = write_sources(tmp_path / "src")
    build(load_recipe(recipe), tmp_path / "shards", workers=1)
    monkeypatch.chdir(tmp_path / "src")
    relative = DataConfig(recipe="recipe.yaml", shards=str(tmp_path / "shards"))
    assert ensure_shards(relative, progress=False)["sources"].keys() == {"llava", "captions", "synth"}
    assert load_recipe("../src/recipe.yaml").sources[0].annotations == str(tmp_path / "src" / "llava.json")


def test_a_same_named_recipe_never_deletes_the_shards_another_recipe_built(tmp_path):
    from fvl.config.data import DataConfig
    from fvl.data.datamodule import ensure_shards

    real = write_sources(tmp_path / "real")
    build(load_recipe(real), tmp_path / "shards", workers=1)
    tars = sorted(p.name for p in (tmp_path / "shards").glob("*.tar"))
    other = tmp_path / "other" / "recipe.yaml"  # the same name, synthetic sources named like the real ones
    other.parent.mkdir()
    other.write_text("sources:\n  - {name: llava, format: synthetic, num_samples: 30}\n")
    with pytest.raises(ValueError, match=r"replace its sources \['llava'\]"):
        ensure_shards(DataConfig(recipe=str(other), shards=str(tmp_path / "shards")), progress=False)
    assert sorted(p.name for p in (tmp_path / "shards").glob("*.tar")) == tars  # nothing deleted


def test_parts_built_from_different_folders_are_parts_of_one_build(recipe_path, whole, tmp_path, monkeypatch):
    """--part 0/2 with the recipe named relative to its folder and --part 1/2 with its absolute path, run from
    elsewhere, are one recipe: neither deletes the other's shards, and they merge to the whole build."""
    _, manifest = whole
    out = tmp_path / "parts"
    monkeypatch.chdir(recipe_path.parent)
    build(load_recipe(recipe_path.name), out, part="0/2")
    monkeypatch.chdir(tmp_path)
    build(load_recipe(str(recipe_path.resolve())), out, part="1/2")
    merged = merge(out)
    assert merged["sources"] == manifest["sources"] and merged["shards"] == manifest["shards"]
