"""Streaming: exactly-once reading across workers and ranks, resampled epochs, held-out validation shards, the
DataModule feeding the model (prepared by a processor built without the model), and the synthetic generator."""

import collections

import pytest
import torch
from torch.utils.data import DataLoader

from fvl.data.config import DataConfig
from fvl.data.datamodule import FVLDataModule, hold_out, shard_set
from fvl.data.pipeline import heldout_dataset, make_dataset
from fvl.data.recipes import load_recipe
from fvl.data.shards import build
from fvl.data.synthetic import CHANCE, KINDS, SPLITS, generate
from fvl.models import build_processor
from tests.fixtures import tiny_cfg


@pytest.fixture(scope="module")
def processor():
    """The tiny preset's processor, built from its config alone (no model)."""
    return build_processor(tiny_cfg(), "square")


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """Two synthetic sources of 7 and 4 shards (uneven on purpose: 7 is not a multiple of 2 ranks x 2 workers)."""
    root = tmp_path_factory.mktemp("stream")
    (root / "r.yaml").write_text(
        "sources:\n"
        "  - {name: qa, format: synthetic, num_samples: 70, task: qa, weight: 3}\n"
        "  - {name: cap, format: synthetic, num_samples: 33, task: caption}\n"
        "shards: {samples_per_shard: 10}\n"
    )
    out = root / "shards"
    return out, build(load_recipe(root / "r.yaml"), out, workers=2)


def read_ids(dataset, workers):
    ids = []
    for batch in DataLoader(dataset, batch_size=None, num_workers=workers):
        ids += batch["ids"]
        assert batch["input_ids"].shape[0] == len(batch["ids"])
    return ids


@pytest.mark.slow
@pytest.mark.parametrize("world_size, workers", [(1, 2), (2, 2), (2, 0)])
def test_every_sample_exactly_once_per_epoch(processor, shard_dir, world_size, workers):
    folder, manifest = shard_dir
    shards = shard_set(folder, manifest)
    cfg = DataConfig(batch_size=8, resampled=False, num_workers=workers, shuffle_buffer=16)
    ids = []
    for rank in range(world_size):
        ids += read_ids(
            make_dataset(cfg, shards, processor.with_resize_mode("pad"), rank, world_size), workers
        )
    counts = collections.Counter(ids)
    assert len(counts) == 103 and set(counts.values()) == {1}


def test_resampled_epochs_have_equal_length_on_every_rank(processor, shard_dir):
    folder, manifest = shard_dir
    shards = shard_set(folder, manifest)
    assert shards.weights == {"qa": 3.0, "cap": 1.0} and shards.samples == {"qa": 70, "cap": 33}
    cfg = DataConfig(batch_size=4, resampled=True, epoch_samples=40, num_workers=1)
    lengths = []
    for rank in range(2):
        ds = make_dataset(cfg, shards, processor, rank, 2)
        batches = list(DataLoader(ds, batch_size=None, num_workers=1))
        lengths.append(len(batches))
        assert all(b["input_ids"].shape[0] == 4 for b in batches)
    assert lengths == [5, 5]  # 40 samples / 2 ranks / batch 4


def test_mixing_follows_the_weights(processor, shard_dir):
    folder, manifest = shard_dir
    cfg = DataConfig(batch_size=10, resampled=True, epoch_samples=400, num_workers=1)
    ds = make_dataset(cfg, shard_set(folder, manifest), processor)
    ids = [i for b in DataLoader(ds, batch_size=None) for i in b["ids"]]
    qa = sum(i.startswith("qa-") for i in ids)
    assert len(ids) == 400 and 0.6 < qa / len(ids) < 0.9  # 3:1 expected 0.75


def test_datamodule_batch_feeds_the_model(tiny_model, tmp_path):
    cfg = DataConfig(
        recipe="synthetic",
        shards=str(tmp_path / "s"),
        batch_size=4,
        num_workers=0,
        val_samples=8,
        epoch_samples=16,
    )
    recipe_small = tmp_path / "small.yaml"
    recipe_small.write_text(
        "sources:\n  - {name: synthetic_qa, format: synthetic, num_samples: 20, task: qa}\nshards: {samples_per_shard: 10}\n"
    )
    cfg.recipe = str(recipe_small)
    dm = FVLDataModule(cfg, build_processor(tiny_cfg(), "pad"), val_task="qa")
    dm.prepare_data()  # builds the missing shards
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, 64, 64)
    assert int(batch["skipped"]) == 0
    out = tiny_model(batch)
    assert torch.isfinite(out.loss)
    val = next(iter(dm.val_dataloader()))
    assert torch.isfinite(tiny_model(val).loss)
    # supervision is the answer: a single word plus the end token
    labels = batch["labels"][0][batch["labels"][0] != -100]
    assert tiny_model.tokenizer.decode(labels).endswith("<|end|>")
    # a real recipe's validation: its last shard held out of training
    cfg.val_split, cfg.resampled, cfg.shuffle_buffer = "heldout", False, 0
    held = FVLDataModule(cfg, build_processor(tiny_cfg(), "pad"), val_task="qa")
    held.setup("fit")
    val_ids = [i for b in held.val_dataloader() for i in b["ids"]]
    train_ids = [i for b in held.train_dataloader() for i in b["ids"]]
    assert len(val_ids) == 8 and len(train_ids) == 10 and not set(val_ids) & set(train_ids)


def test_shards_of_an_older_synthetic_generator_are_rebuilt(tmp_path):
    import json

    from fvl.data.datamodule import ensure_shards

    recipe = tmp_path / "r.yaml"
    recipe.write_text("sources:\n  - {name: s, format: synthetic, num_samples: 4, task: qa}\n")
    cfg = DataConfig(recipe=str(recipe), shards=str(tmp_path / "shards"))
    ensure_shards(cfg)
    manifest_path = tmp_path / "shards" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["sources"]["s"]["generator_version"] = 0  # as if built by an older generator
    manifest_path.write_text(json.dumps(manifest))
    assert ensure_shards(cfg)["sources"]["s"]["generator_version"] != 0


def test_processor_skips_and_counts_bad_samples(processor):
    from fvl.data.pipeline import process_and_batch

    good = generate(0)
    import io
    import json

    buf = io.BytesIO()
    good.image.save(buf, format="PNG")
    ok = {
        "__key__": "a",
        "json": json.dumps(
            {"id": "a", "conversations": good.conversations("qa"), "image_keys": ["png"]}
        ).encode(),
        "png": buf.getvalue(),
    }
    truncated = dict(ok, __key__="b", png=buf.getvalue()[:50])
    no_answer = dict(
        ok,
        __key__="c",
        json=json.dumps(
            {"id": "c", "conversations": good.conversations("qa")[:1], "image_keys": ["png"]}
        ).encode(),
    )
    batches = list(process_and_batch(processor, 2, drop_last=False)([ok, truncated, no_answer, ok]))
    assert [b["ids"] for b in batches] == [["a", "a"]]  # ids are the shard keys
    assert int(batches[0]["skipped"]) == 2


def test_heldout_validation_shards_leave_training_and_split_evenly_over_ranks(processor, shard_dir):
    folder, manifest = shard_dir
    train, held, available = hold_out(shard_set(folder, manifest), per_source=1)
    assert len(held) == 2 and {s: len(u) for s, u in train.urls.items()} == {"qa": 6, "cap": 3}
    assert not set(held) & {u for urls in train.urls.values() for u in urls}
    assert available == 103 - train.total > 0
    cfg = DataConfig(batch_size=8, resampled=False, num_workers=0, shuffle_buffer=0)
    train_ids = set(read_ids(make_dataset(cfg, train, processor), 0))
    per_rank = min(12, available) // 2
    val = [read_ids(heldout_dataset(held, processor, 4, per_rank, rank, 2), 0) for rank in range(2)]
    assert [len(v) for v in val] == [per_rank, per_rank] and not set(val[0]) & set(val[1])
    assert not (set(val[0]) | set(val[1])) & train_ids
    with pytest.raises(ValueError, match="val_shards"):
        hold_out(shard_set(folder, manifest), per_source=4)  # cap has only 4 shards


def test_synthetic_is_deterministic_and_splits_disjoint():
    a, b = generate(5, "train", seed=1), generate(5, "train", seed=1)
    assert a.image.tobytes() == b.image.tobytes() and (a.question, a.answer, a.caption) == (
        b.question,
        b.answer,
        b.caption,
    )
    ids = {s: {generate(i, s).id for i in range(200)} for s in SPLITS}
    assert (
        not (ids["train"] & ids["val"])
        and not (ids["train"] & ids["test"])
        and not (ids["val"] & ids["test"])
    )
    same = sum(
        generate(i, "train").image.tobytes() == generate(i, "test").image.tobytes() for i in range(200)
    )
    assert same < 10  # different seeds draw different images (rare coincidences allowed)
    kinds = collections.Counter(generate(i, "test").kind for i in range(700))
    assert set(kinds) == set(KINDS) and min(kinds.values()) > 60
    pope = [generate(i, "train", kinds=("pope",)).answer for i in range(400)]
    assert 0.4 < pope.count("yes") / 400 < 0.6
    assert set(CHANCE) == set(KINDS)


def test_synthetic_answers_match_the_pictures():
    """Spot checks that the drawn content is what the answer says."""
    for i in range(50):
        s = generate(i, kinds=("colour",))
        from fvl.data.synthetic import COLOURS

        pixels = set(s.image.getdata())
        assert COLOURS[s.answer] in pixels
        assert not any(COLOURS[c] in pixels for c in COLOURS if c != s.answer)
    with pytest.raises(ValueError, match="split"):
        generate(0, "dev")
