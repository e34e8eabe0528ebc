"""The feature cache: built from a checkpoint, it gives the same loss as running the tower, it is refused when
it belongs to another model or other shards, it carries skips, it resumes, and a real training run reads it
without touching the tower."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from mlflow.tracking import MlflowClient

from fvl.cli import main
from fvl.config import load
from fvl.data.datamodule import build_datamodule
from fvl.data.feature_cache.build import build_features
from fvl.data.feature_cache.store import MANIFEST, FeatureCacheError, decode_entry, encode_entry, identity_of
from fvl.inputs.transform import ImageError
from fvl.models import build_model, load_checkpoint, set_trainable
from fvl.sweep.runner import run_sweep
from fvl.train.module import MODEL_INPUTS
from fvl.train.run import train
from tests.fixtures import EXPERIMENTS, cache_setting

FINETUNE = ["fusion", "projector", "llm"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    base, _, checkpoint = cache_setting(root, captions=32, qa=48, per_shard=16)
    fp32 = build_features(
        checkpoint, root / "shards", root / "fp32", ["synthetic_qa"], dtype="float32", num_workers=0
    )
    return {"root": root, "base": base, "checkpoint": checkpoint, "fp32": fp32}


def finetune_model(env):
    model = load_checkpoint(env["checkpoint"]).train()
    set_trainable(model, FINETUNE)
    return model


def first_batches(env, model, cache=None, identity=True):
    extra = [f"data.feature_cache={cache}"] if cache else []
    dm = build_datamodule(
        load("finetune", [*env["base"], *extra]),
        processor=model.processor,
        feature_identity=identity_of(model, "pad") if cache and identity else None,
    )
    dm.setup()
    return next(iter(dm.train_dataloader()))


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = model({k: v for k, v in batch.items() if k in MODEL_INPUTS}).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def test_the_cache_gives_the_tower_s_loss_and_gradients(env):
    model = finetune_model(env)
    plain = first_batches(env, model)
    cached = first_batches(env, model, env["root"] / "fp32")
    assert cached["ids"] == plain["ids"] and "pixel_values" not in cached
    assert cached["image_features"].shape == (len(plain["pixel_values"]), 16, 256)
    loss, grads = loss_and_grads(model, plain)
    loss_c, grads_c = loss_and_grads(model, cached)
    # float32 features: the same numbers the tower computes, so the same loss and gradients
    torch.testing.assert_close(loss_c, loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == grads_c.keys() and any(n.startswith("projector.") for n in grads)
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-4, atol=1e-6)
    # bfloat16 features (the default) round each value to 8 significant bits: the loss moves by well
    # under a percent
    build_features(
        env["checkpoint"], env["root"] / "shards", env["root"] / "bf16", ["synthetic_qa"], num_workers=0
    )
    loss_b, _ = loss_and_grads(model, first_batches(env, model, env["root"] / "bf16"))
    assert abs(loss_b - loss) / loss < 5e-3


def test_a_text_only_batch_from_the_cache_never_runs_the_tower(env):
    model = finetune_model(env)
    model.vision.features = lambda *a, **k: pytest.fail("the tower ran")  # type: ignore[method-assign]
    ids = torch.tensor([[1, 5, 6, 7]])
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids),
             "image_features": torch.empty(0, 16, 256)}  # fmt: skip
    loss = model(batch).loss
    loss.backward()
    grad = model.projector[0].weight.grad
    assert grad is not None and not grad.any()  # in the graph, with zero gradient


def test_a_cache_of_another_model_stage_or_shards_is_refused(env, tmp_path):
    model = finetune_model(env)
    cache = env["root"] / "fp32"
    # another checkpoint: one tower weight differs
    other = finetune_model(env)
    with torch.no_grad():
        next(other.vision.parameters()).add_(1e-3)
    with pytest.raises(FeatureCacheError, match="another checkpoint.*weights_sha256"):
        first_batches(env, other, cache)
    # another feature set
    fewer = build_model(load("finetune", [*env["base"], "model.fusion.features=[davit,caption]"]).model)
    fewer.vision.load_state_dict(model.vision.state_dict())
    with pytest.raises(FeatureCacheError, match="features"):
        first_batches(env, fewer, cache)
    # the same weights with the prompts fed another way (prompt ids are buffers the weights' hash misses)
    unmasked = build_model(load("finetune", [*env["base"], "model.vision.prompt_padding=unmasked"]).model)
    unmasked.load_state_dict(model.state_dict())
    with pytest.raises(FeatureCacheError, match="prompt_padding"):
        first_batches(env, unmasked, cache)
    # another resize mode (the align stage squares images)
    dm = build_datamodule(
        load("finetune", [*env["base"], f"data.feature_cache={cache}", "stage.resize_mode=square"]),
        processor=model.processor,
        feature_identity=identity_of(model, "square"),
    )
    with pytest.raises(FeatureCacheError, match="resize_mode"):
        dm.setup()
    # shards rebuilt since: their sha256 no longer matches the cache's record
    shards = tmp_path / "shards"
    shutil.copytree(env["root"] / "shards", shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["shards"][-1]["sha256"] = "0" * 64
    (shards / "manifest.json").write_text(json.dumps(manifest))
    dm = build_datamodule(
        load("finetune", [*env["base"], f"data.shards={shards}", f"data.feature_cache={cache}"]),
        processor=model.processor,
        feature_identity=identity_of(model, "pad"),
    )
    with pytest.raises(FeatureCacheError, match="rebuilt since"):
        dm.setup()
    # sources the cache does not cover
    with pytest.raises(FeatureCacheError, match="no features for"):
        build_datamodule(
            load(
                "finetune", [*env["base"], f"data.feature_cache={cache}", "data.sources=[synthetic_caption]"]
            ),
            processor=model.processor,
        ).setup()
    # no cache there at all
    with pytest.raises(FileNotFoundError, match="fvl features build"):
        first_batches(env, model, tmp_path / "nothing")
    # a stage that trains the tower cannot use a cache
    cfg = load(EXPERIMENTS / "pretrain.yaml", [*env["base"], f"data.feature_cache={cache}",
                                              f"output_dir={tmp_path / 'runs'}"])  # fmt: skip
    with pytest.raises(ValueError, match="trains.*vision"):
        train(cfg)


def test_a_sample_the_build_could_not_decode_is_skipped_with_its_reason(env, tmp_path, monkeypatch):
    from fvl.inputs.processor import Processor

    original = Processor.image
    bad = "synthetic_qa-000000003"

    def image(self, im, where=""):
        if where.endswith(bad):
            raise ImageError("unreadable_image", f"{where}: broken on purpose")
        return original(self, im, where)

    monkeypatch.setattr(Processor, "image", image)
    out = tmp_path / "cache"
    manifest = build_features(env["checkpoint"], env["root"] / "shards", out, ["synthetic_qa"], num_workers=0)
    assert manifest["skipped"] == {"unreadable_image": 1}
    monkeypatch.setattr(Processor, "image", original)
    model = finetune_model(env)
    dm = build_datamodule(
        load("finetune", [*env["base"], f"data.feature_cache={out}"]), processor=model.processor
    )
    dm.setup()
    reader = dm.train_dataloader().dataset
    catalog_ids = list(range(len(reader)))
    batch = reader[catalog_ids]
    assert batch["skipped"] == {"unreadable_image": 1}
    assert len(batch["ids"]) == len(catalog_ids) - 1 and not any(i.endswith(bad) for i in batch["ids"])


def test_the_build_resumes_and_never_overwrites_another_model_s_cache(env, tmp_path):
    out = tmp_path / "cache"
    build_features(
        env["checkpoint"], env["root"] / "shards", out, ["synthetic_qa"], dtype="float32", num_workers=0
    )
    tars = sorted(out.glob("*.tar"))
    before = {p.name: p.read_bytes() for p in tars}
    stamps = {p.name: p.stat().st_mtime_ns for p in tars}
    # a build stopped after its first shards: the last one and its record are gone
    tars[-1].unlink()
    (out / f"{tars[-1].name}.done.json").unlink()
    build_features(
        env["checkpoint"], env["root"] / "shards", out, ["synthetic_qa"], dtype="float32", num_workers=0
    )
    assert {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))} == before  # byte-identical
    assert all(tars[i].stat().st_mtime_ns == stamps[tars[i].name] for i in range(len(tars) - 1))  # not redone
    assert json.loads((out / MANIFEST).read_text())["shards"] == env["fp32"]["shards"]
    # another model into the same folder is refused, and the cache stays
    other = finetune_model(env)
    with torch.no_grad():
        next(other.vision.parameters()).add_(1e-3)
    with pytest.raises(FeatureCacheError, match="another model"):
        build_features(None, env["root"] / "shards", out, ["synthetic_qa"], dtype="float32", model=other)
    assert {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))} == before


def test_entries_round_trip_and_damage_is_reported():
    features = torch.randn(2, 3, 4).to(torch.bfloat16)
    raw = {"__key__": "k", **encode_entry(features)}
    back = decode_entry(raw)
    assert len(back) == 2 and torch.equal(torch.stack(back), features)
    assert decode_entry({"__key__": "k", **encode_entry(torch.empty(0, 3, 4))}) == []
    with pytest.raises(FeatureCacheError, match="feature bytes"):
        decode_entry({**raw, "bin": raw["bin"][:-2]})


def test_cli_builds_a_cache_and_reports_errors_in_one_line(env, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["features", "build", str(env["checkpoint"]), "--shards", str(env["root"] / "shards"), "--out",
            str(out), "--sources", "synthetic_qa", "--workers", "2", "--quiet"]  # fmt: skip
    assert main(args) == 0
    assert "data.feature_cache=" in capsys.readouterr().out
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["identity"]["dtype"] == "bfloat16" and len(manifest["shards"]) == 3
    assert main(["features", "build", str(env["checkpoint"]), "--shards", str(tmp_path / "none"), "--out",
                 str(out)]) == 2  # fmt: skip
    assert "error" in capsys.readouterr().err


@pytest.mark.integration
def test_training_reads_the_cache_and_sweeps_build_it_on_their_own(env, tmp_path):
    """A real finetune run (2 loader workers) with the cache: it trains, logs samples/s, and the tower never
    runs for its batches (the benchmark scores it logs while training run it on their test images); then a sweep builds and uses a cache for its finetune stage by itself (the tiny preset's random
    tower trains in pretrain: no cache there, one for finetune, of all four features side by side)."""
    import lightning as L

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = [*env["base"], f"output_dir={tmp_path / 'runs'}", f"tracking.uri={uri}", "trainer.progress=false",
              "train.log_every_n_steps=1", "data.num_workers=2"]  # fmt: skip

    from fvl.train.eval_during_training import EvalDuringTraining

    class NoTower(L.Callback):
        """The tower never runs for training batches; only the benchmark scores while training (test
        images, no cache) run it."""

        def on_fit_start(self, trainer, module):
            tower, own = module.model.vision, module.model.vision.features
            tower.features = lambda *a, **k: pytest.fail("the tower ran")
            scorer = next(c for c in trainer.callbacks if isinstance(c, EvalDuringTraining))
            evaluate = scorer.evaluate

            def evaluate_with_the_tower(*args, **kwargs):
                tower.features = own
                try:
                    return evaluate(*args, **kwargs)
                finally:
                    tower.features = lambda *a, **k: pytest.fail("the tower ran")

            scorer.evaluate = evaluate_with_the_tower

    cfg = load(EXPERIMENTS / "finetune.yaml", [*common, "trainer.max_steps=12", "train.lr=1e-3",
                                               f"init_from={env['checkpoint']}", f"data.feature_cache={env['root'] / 'fp32'}",
                                               "eval.during_training.every_n_steps=6", "eval.during_training.limit=7"])  # fmt: skip
    result = train(cfg, callbacks=[NoTower()])
    assert result.steps == 12 and result.last_loss < result.first_loss
    client = MlflowClient(uri)
    scores = client.get_metric_history(result.mlflow_run_id, "eval/synthetic/score")
    assert [m.step for m in scores] == [6, 12]
    assert client.get_metric_history(result.mlflow_run_id, "train/samples_per_s")
    assert client.get_run(result.mlflow_run_id).data.params["data.feature_cache"] == str(env["root"] / "fp32")

    sweep = tmp_path / "sweep.yaml"  # the finetune stage reads 8 x 6 = 48 samples, one pass: the cache pays
    sweep.write_text(
        f"sweep: cached\nstages: [{EXPERIMENTS / 'pretrain.yaml'}, {EXPERIMENTS / 'finetune.yaml'}]\n"
        "overrides: [trainer.max_steps=6, train.val_every_n_steps=0]\n"
    )
    runs = run_sweep(sweep, common)
    assert [r.status for r in runs] == ["ok", "ok"], [r.error for r in runs]
    caches = [p for p in (tmp_path / "runs" / "feature_cache").iterdir() if p.is_dir()]
    assert len(caches) == 1 and (caches[0] / MANIFEST).is_file()
    finetune = client.get_run(runs[1].result.mlflow_run_id)
    assert finetune.data.params["data.feature_cache"] == str(caches[0])
    built = json.loads((caches[0] / MANIFEST).read_text())
    assert os.path.basename(built["checkpoint"]).endswith(".safetensors")
    assert built["identity"]["features"] == ["davit", "caption", "ocr", "grounding"]


def test_a_cache_of_two_towers_holds_both_and_gives_their_loss(env, tmp_path):
    """A Florence-2 + SigLIP model's cache: every tower's features, fused, with the towers' own loss; also
    side by side (``--all-features``: each tower's every feature), which the same model reads by subset."""
    from fvl.models import save_checkpoint

    torch.manual_seed(0)
    cfg = load("finetune", [*env["base"], "model.fusion.features=[davit,caption,siglip.layer_-2]"])
    model = build_model(cfg.model).train()
    set_trainable(model, FINETUNE)
    checkpoint = save_checkpoint(model, tmp_path / "two.safetensors")
    for out, every in ((tmp_path / "fused", False), (tmp_path / "all", True)):
        build_features(checkpoint, env["root"] / "shards", out, ["synthetic_qa"], dtype="float32", num_workers=0,
                       all_features=every)  # fmt: skip
        built = json.loads((out / MANIFEST).read_text())["identity"]
        assert "siglip.layer_-2" in built["features"] and built["towers"]["siglip"]["image_size"] == 56
        plain = first_batches(env, model)
        dm = build_datamodule(
            load("finetune", [*env["base"], f"data.feature_cache={out}"]),
            processor=model.processor,
            feature_identity=identity_of(model, "pad"),
            fusion=model.fusion,
        )  # fmt: skip - what a run passes: a subset is fused as read
        dm.setup()
        cached = next(iter(dm.train_dataloader()))
        assert cached["image_features"].shape[-1] == 160  # 64 + 64 + 32: the model's own fusion
        torch.testing.assert_close(loss_and_grads(model, cached)[0], loss_and_grads(model, plain)[0],
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
    assert json.loads((tmp_path / "all" / MANIFEST).read_text())["identity"]["features"] == [
        "davit", "caption", "ocr", "grounding", "siglip.layer_-2"]  # fmt: skip
