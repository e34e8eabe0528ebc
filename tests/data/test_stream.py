"""Reading shards by plan: every sample once per epoch over ranks and workers, weights read at training time,
bad samples and damaged tars counted by reason, held-out validation, shards checked against the recipe, and
the DataModule feeding the model without building it."""

import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds

from fvl.config import load, with_stage
from fvl.config.data import DataConfig
from fvl.data.datamodule import FVLDataModule, build_datamodule, ensure_shards
from fvl.data.plan import EpochBatches, PlanSettings
from fvl.data.reader import Catalog, PlannedLoader, ShardReader
from fvl.data.recipes import load_recipe
from fvl.data.shards import build
from fvl.data.shardset import hold_out, shard_set
from fvl.data.tarindex import write_index
from fvl.models import build_processor
from fvl.synthetic import generate
from tests.fixtures import synthetic_recipe, tiny_cfg


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
        "  - {name: cap, format: synthetic, num_samples: 33, task: caption, seed: 1}\n"
        "shards: {samples_per_shard: 10}\n"
    )
    out = root / "shards"
    return root, out, build(load_recipe(root / "r.yaml"), out, workers=2)


def fake_trainer(rank, world):
    return SimpleNamespace(global_rank=rank, world_size=world)


def epoch_ids(dm, epoch=0):
    loader = dm.train_dataloader()
    loader.plan.position = (epoch, 0)
    ids = []
    for batch in loader:
        assert batch["input_ids"].shape[0] == len(batch["ids"]) == batch["pixel_values"].shape[0]
        ids.append(list(batch["ids"]))
    return ids


def module_for(root, out, processor, rank=0, world=1, **data):
    data = {"batch_size": 8, "val_samples": 0, **data}
    cfg = DataConfig(recipe=str(root / "r.yaml"), shards=str(out), **data)
    dm = FVLDataModule(cfg, processor, seed=0)
    dm.trainer = fake_trainer(rank, world)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_sample_once_per_epoch_whatever_the_workers(processor, shard_dir, world):
    root, out, _ = shard_dir
    weights = {"qa": 1, "cap": 1}  # the recipe says qa: 3; read at training time, overridden here
    per_rank = {}
    for workers in (0, 2):
        per_rank[workers] = [
            epoch_ids(module_for(root, out, processor, r, world, num_workers=workers, weights=weights))
            for r in range(world)
        ]
    assert per_rank[0] == per_rank[2]  # workers change speed, never what is read
    shares = per_rank[0]
    assert len({len(s) for s in shares}) == 1  # the same batch count on every rank: no DDP hang
    seen = [i for s in shares for b in s for i in b]
    assert len(set(seen)) == 103 and len(seen) - 103 < world  # all once; padding repeats < world


def test_recipe_weights_are_passes_read_at_training_time(processor, shard_dir):
    root, out, _ = shard_dir
    ids = [i for b in epoch_ids(module_for(root, out, processor)) for i in b]
    counts = np.unique(ids, return_counts=True)[1]
    assert len(ids) == 3 * 70 + 33 and sorted(set(counts.tolist())) == [1, 3]
    half = module_for(root, out, processor, weights={"qa": 0.5})  # an override, no rebuild
    assert sum(len(b) for b in epoch_ids(half)) == 35 + 33
    with pytest.raises(ValueError, match="not sources of recipe"):
        module_for(root, out, processor, weights={"nope": 1})


def test_epoch_order_follows_the_seed(processor, shard_dir):
    root, out, _ = shard_dir
    a, b = epoch_ids(module_for(root, out, processor)), epoch_ids(module_for(root, out, processor))
    assert a == b
    assert epoch_ids(module_for(root, out, processor), epoch=1) != a


def test_synthetic_validation_does_not_follow_the_run_seed(processor, shard_dir):
    """Runs of different seeds are validated on the same samples: the recipe's seed, not the run's."""
    root, out, _ = shard_dir
    cfg = DataConfig(recipe=str(root / "r.yaml"), shards=str(out), batch_size=4, val_samples=6)
    batches = []
    for seed in (0, 7):
        dm = FVLDataModule(cfg, processor, val_task="caption", seed=seed)
        batches.append(list(dm.val_dataloader()))
    assert len(batches[0]) == 2
    for a, b in zip(*batches, strict=True):
        assert a["ids"] == b["ids"] and a["ids"][0].startswith("synthetic-1-val-")  # cap's seed: 1
        assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels", "pixel_values"))


def test_heldout_validation_leaves_training_and_splits_evenly_over_ranks(processor, shard_dir):
    root, out, manifest = shard_dir
    train, held = hold_out(shard_set(out, manifest), per_source=1)
    assert {s: len(u) for s, u in train.urls.items()} == {"qa": 6, "cap": 3}
    assert not {u for v in held.urls.values() for u in v} & {u for v in train.urls.values() for u in v}
    with pytest.raises(ValueError, match="val_shards"):
        hold_out(shard_set(out, manifest), per_source=4)  # cap has only 4 shards
    val, trained = [], set()
    for rank in range(2):
        dm = module_for(root, out, processor, rank, 2, val_split="heldout", val_samples=12, weights={"qa": 1})
        val.append([i for b in dm.val_dataloader() for i in b["ids"]])
        trained |= {i for b in epoch_ids(dm) for i in b}
    assert [len(v) for v in val] == [6, 6] and not set(val[0]) & set(val[1])
    assert not (set(val[0]) | set(val[1])) & trained


def _tar_of(path, samples):
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)
    write_index(path)


def _sample(key, conversations, image_bytes, sid=None):
    meta = {"id": sid or key, "conversations": conversations, "image_keys": ["png"]}
    return {"__key__": key, "json": json.dumps(meta).encode(), "png": image_bytes}


def test_bad_samples_and_damaged_tars_are_counted_by_reason(processor, tmp_path):
    good = generate(0)
    buf = io.BytesIO()
    good.image.save(buf, format="PNG")
    png, conv = buf.getvalue(), good.conversations("qa")
    samples = [
        _sample("a", conv, png, sid="ann-a"),
        _sample("b", conv, png[:60]),  # truncated image
        _sample("c", conv[:1], png),  # no answer
        {"__key__": "d", "json": b"{not json"},
        _sample("e", conv, png),
    ]
    _tar_of(tmp_path / "ok.tar", samples)
    _tar_of(tmp_path / "cut.tar", [_sample(f"x{i}", conv, png) for i in range(6)])
    data = (tmp_path / "cut.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])  # truncated after the index was written
    catalog = Catalog.build(
        {"s": [str(tmp_path / "ok.tar")], "t": [str(tmp_path / "cut.tar")]},
        {str(tmp_path / "ok.tar"): 5, str(tmp_path / "cut.tar"): 6},
    )
    assert catalog.missing["t"] > 0 and len(catalog) == 5 + 6 - catalog.missing["t"]
    reader = ShardReader(catalog, processor)
    batch = reader[list(range(5))]
    assert batch["ids"] == ["ann-a", "e"]  # the annotation's id where there is one
    assert batch["skipped"] == {"unreadable_image": 1, "bad_roles": 1, "bad_json": 1}
    assert batch["pixel_values"].dtype == torch.uint8
    # a batch of only bad samples is refilled from the next good one, and counted
    refilled = reader[[1, 2, 3]]
    assert refilled["ids"] == ["e"] and refilled["skipped"]["refilled_batch"] == 1
    # bytes damaged after indexing: a counted skip, not a crash
    ok = (tmp_path / "ok.tar").read_bytes()
    at = int(catalog.start[4])
    (tmp_path / "ok.tar").write_bytes(ok[:at] + b"\xff" * 512 + ok[at + 512 :])
    assert ShardReader(catalog, processor)[[0, 4]]["skipped"] == {"corrupt_shard": 1}


def test_datamodule_from_a_config_feeds_the_model(tiny_model, tmp_path):
    synthetic_recipe(tmp_path / "r.yaml", captions=12, qa=20, per_shard=10)
    cfg = load(
        "tiny",
        [f"data.recipe={tmp_path / 'r.yaml'}", f"data.shards={tmp_path / 's'}", "data.batch_size=4",
         "data.num_workers=0", "data.val_samples=8"],
    )  # fmt: skip
    dm = build_datamodule(
        with_stage(cfg, "finetune")
    )  # no model built; the missing shards are built on setup
    dm.setup("fit")
    assert dm.processor.transform.mode == "pad" and dm.val_task == "qa"
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, 64, 64) and batch["pixel_values"].dtype == torch.uint8
    assert batch["skipped"] == {} and len(batch["ids"]) == 4
    assert torch.isfinite(tiny_model(batch).loss)
    assert torch.isfinite(tiny_model(next(iter(dm.val_dataloader()))).loss)
    labels = batch["labels"][0][batch["labels"][0] != -100]
    assert tiny_model.tokenizer.decode(labels).endswith("<|end|>")  # supervision is the answer
    # the config's own stage keeps its overrides (here: reading both sources)
    own = build_datamodule(cfg)
    assert own.processor.transform.mode == "square" and own.cfg.sources == []


def test_length_grouping_lowers_padding(processor, shard_dir):
    root, out, _ = shard_dir

    def padding(**kw):
        dm = module_for(root, out, processor, weights={"qa": 1}, **kw)
        return np.mean([b["padding_fraction"] for b in dm.train_dataloader()])

    assert padding(group_by_length=True) < 0.6 * padding()


def test_shards_of_another_recipe_are_refused(processor, shard_dir, tmp_path):
    root, out, _ = shard_dir
    (tmp_path / "mine.yaml").write_text("sources:\n  - {name: qa, format: synthetic, num_samples: 5}\n")
    cfg = DataConfig(recipe=str(tmp_path / "mine.yaml"), shards=str(out))
    with pytest.raises(ValueError, match=r"recipe 'r'.*data.recipe is 'mine'"):
        FVLDataModule(cfg, processor).setup("fit")
    with pytest.raises(ValueError, match=r"recipe 'r'.*data.recipe is 'mine'"):
        ensure_shards(cfg)


def test_a_missing_real_recipe_is_refused_under_several_ranks(tmp_path):
    from tests.fixtures import write_sources

    recipe = write_sources(tmp_path / "src")
    cfg = DataConfig(recipe=str(recipe), shards=str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match=r"fvl shards build .* --out .*none"):
        ensure_shards(cfg, world_size=2)
    assert not (tmp_path / "none").exists()


def test_resume_position_is_saved_and_restored(processor, shard_dir):
    root, out, _ = shard_dir
    dm = module_for(root, out, processor, weights={"qa": 1})
    full = epoch_ids(dm)
    loader = dm.train_dataloader()
    for _ in range(5):
        loader.trained()  # what the DataModule reports as each batch enters a training step
    state = loader.state_dict()
    assert (state["epoch"], state["batch"]) == (0, 5)
    fresh = module_for(root, out, processor, weights={"qa": 1}).train_dataloader()
    fresh.load_state_dict(state)
    assert [b["ids"] for b in fresh] == full[5:]
    other = module_for(root, out, processor, weights={"qa": 2}).train_dataloader()
    with pytest.raises(ValueError, match="data plan changed.*weights"):
        other.load_state_dict(state)


def test_planned_loader_is_what_lightning_checks_for_resumable_data(processor, shard_dir):
    from lightning.fabric.utilities.types import _Stateful

    root, out, _ = shard_dir
    loader = module_for(root, out, processor).train_dataloader()
    assert isinstance(loader, PlannedLoader) and isinstance(loader, _Stateful)
    assert isinstance(loader.plan, EpochBatches) and isinstance(loader.plan.settings, PlanSettings)


def test_packing_through_the_datamodule(processor, shard_dir):
    root, out, _ = shard_dir
    plain = module_for(root, out, processor, weights={"qa": 1})
    packed = module_for(root, out, processor, weights={"qa": 1}, packing=True)
    a, b = next(iter(plain.train_dataloader())), next(iter(packed.train_dataloader()))
    assert sorted(a["ids"]) == sorted(b["ids"])  # the same planned samples
    assert b["input_ids"].shape[0] < a["input_ids"].shape[0] and "position_ids" in b
    assert b["padding_fraction"] < a["padding_fraction"]
