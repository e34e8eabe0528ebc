"""Real Trainer runs on the tiny preset: both stages lower the loss, MLflow read back, resume, DDP, sweeps."""

import json
import subprocess
import sys

import lightning as L
import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from fvl.config import ConfigError, load
from fvl.sweep.runner import run_sweep
from fvl.train.run import train
from tests.fixtures import EXPERIMENTS, REAL_PRECISION, free_port, synthetic_recipe


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    synthetic_recipe(root / "recipe.yaml", captions=200, qa=200, per_shard=50)
    return {
        "root": root,
        "uri": f"sqlite:///{root / 'mlflow.db'}",
        "overrides": [
            f"data.recipe={root / 'recipe.yaml'}", f"data.shards={root / 'shards'}", f"output_dir={root / 'runs'}",
            f"tracking.uri=sqlite:///{root / 'mlflow.db'}", "data.batch_size=8", "train.global_batch_size=8",
            "data.val_samples=16", "data.num_workers=0", "trainer.progress=false", "train.log_every_n_steps=1",
        ],
    }  # fmt: skip


def cfg_for(env, stage_file, *extra):
    return load(EXPERIMENTS / stage_file, [*env["overrides"], *extra])


@pytest.fixture(scope="module")
def pretrain_run(env):
    return train(
        cfg_for(
            env,
            "pretrain.yaml",
            "trainer.max_steps=40",
            "train.lr=1e-3",
            "train.val_every_n_steps=20",
            "train.checkpoint_every_n_steps=20",
        )
    )


def test_pretrain_lowers_the_loss_and_is_tracked(env, pretrain_run):
    r = pretrain_run
    assert r.steps == 40 and r.last_loss < r.first_loss
    assert r.best_checkpoint.exists() and r.checkpoint.exists()
    client = MlflowClient(env["uri"])
    run = client.get_run(r.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.fusion.name"] == "dbfusion" and run.data.params["stage.name"] == "pretrain"
    assert int(run.data.params["params.vision.trainable"]) > 0  # Florence-2 trains in stage 1
    tags = run.data.tags
    assert tags["stage"] == "pretrain" and tags["model"] == "tiny" and tags["fusion"] == "dbfusion"
    assert tags["recipe"] == "recipe" and len(tags["git_commit"]) >= 7
    assert tags["checkpoint_path"] == str(r.best_checkpoint.resolve())
    history = client.get_metric_history(r.mlflow_run_id, "train/loss")
    assert len(history) >= 30
    for metric in ("train/lr", "train/grad_norm", "train/samples_per_s", "train/tokens_per_s", "val/loss",
                   "train/padding_fraction", "train/skipped_samples", "train/tflops_per_s"):  # fmt: skip
        assert client.get_metric_history(r.mlflow_run_id, metric), metric
    # model FLOPs per second beside samples/s (MFU needs a known card's peak: none on a CPU)
    assert all(m.value > 0 for m in client.get_metric_history(r.mlflow_run_id, "train/tflops_per_s"))
    assert not client.get_metric_history(r.mlflow_run_id, "train/mfu")
    # the step-time breakdown: its parts are positive and the image path lies inside forward + backward
    times = {m: client.get_metric_history(r.mlflow_run_id, f"time/{m}_ms")[-1].value
             for m in ("data_wait", "vision", "forward_backward", "optimizer")}  # fmt: skip
    assert all(v > 0 for v in times.values()) and times["vision"] < times["forward_backward"]
    artifacts = [a.path for a in client.list_artifacts(r.mlflow_run_id)]
    assert "config.yaml" in artifacts
    local = mlflow.artifacts.download_artifacts(
        run_id=r.mlflow_run_id, artifact_path="config.yaml", tracking_uri=env["uri"]
    )
    assert load(local).model.text.template == "plain"


@pytest.mark.integration
def test_finetune_from_pretrain_lowers_the_loss_and_records_its_origin(env, pretrain_run):
    from fvl.runs.weights import Weights, find_weights

    by_run_id = find_weights(f"mlflow:{pretrain_run.mlflow_run_id}", "unused", tracking_uri=env["uri"])
    assert by_run_id == Weights(pretrain_run.best_checkpoint.resolve(), pretrain_run.mlflow_run_id)
    latest = find_weights("latest", str(env["root"] / "runs"), "pretrain")
    assert latest.path == pretrain_run.best_checkpoint
    by_folder = find_weights(str(pretrain_run.run_dir), "unused")
    assert by_folder == Weights(pretrain_run.best_checkpoint, pretrain_run.mlflow_run_id)
    steps = ["trainer.max_steps=30", "train.lr=1e-3", "train.val_every_n_steps=0"]
    r = train(cfg_for(env, "finetune.yaml", *steps, f"init_from=mlflow:{pretrain_run.mlflow_run_id}"))
    assert r.last_loss < r.first_loss
    run = MlflowClient(env["uri"]).get_run(r.mlflow_run_id)
    assert run.data.tags["init_run_id"] == pretrain_run.mlflow_run_id
    assert run.data.tags["stage"] == "finetune" and int(run.data.params["params.vision.trainable"]) == 0
    # the finetune started from the pretrain weights: its LLM embeddings moved only since then
    from safetensors.torch import load_file

    pre = load_file(str(pretrain_run.best_checkpoint))
    post = load_file(str(r.checkpoint))
    assert torch.equal(
        pre["vision.davit.convs.0.conv.weight"], post["vision.davit.convs.0.conv.weight"]
    )  # frozen
    assert not torch.equal(pre["projector.0.weight"], post["projector.0.weight"])


class _StopAt(L.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class _LRs(L.Callback):
    def __init__(self):
        self.by_step = {}

    def on_train_batch_end(self, trainer, *args):
        self.by_step[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


@pytest.mark.integration
def test_resume_continues_at_the_same_step_and_lr(env):
    base = ["trainer.max_steps=8", "train.warmup_ratio=0.25", "data.val_samples=0", "name=resume"]
    straight = _LRs()
    train(cfg_for(env, "pretrain.yaml", *base, "name=straight"), callbacks=[straight])
    first = train(cfg_for(env, "pretrain.yaml", *base), callbacks=[_StopAt(4)])
    assert first.steps == 4
    ckpt = torch.load(first.run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    resumed_lrs = _LRs()
    second = train(cfg_for(env, "pretrain.yaml", *base, "resume=last"), callbacks=[resumed_lrs])
    assert (
        second.steps == 8 and second.run_dir == first.run_dir and second.mlflow_run_id == first.mlflow_run_id
    )
    assert min(resumed_lrs.by_step) == 5  # continued after step 4, not from 0
    for step, lr in resumed_lrs.by_step.items():
        assert lr == pytest.approx(straight.by_step[step])


class _Ids(L.Callback):
    """The sample ids of every training batch, in order."""

    def __init__(self):
        self.ids = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ids.append(list(batch["ids"]))


class _CrashAt(L.Callback):
    """Dies as the batch after step ``step`` starts, as a killed job would (that step's checkpoint exists)."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step >= self.step:
            raise RuntimeError("simulated crash")


@pytest.mark.integration
def test_resume_continues_the_data_stream(env):
    """Stopped mid-epoch, crashed after an epoch boundary, resumed with another worker count: the run reads
    exactly the batches of an uninterrupted run, nothing replayed, nothing skipped."""
    base = [
        "trainer.max_steps=8", "data.val_samples=0", "train.global_batch_size=16",  # 2 batches a step
        "data.weights.synthetic_caption=0.2",  # 40 samples: 5 batches an epoch, so 8 steps span 3 epochs
    ]  # fmt: skip
    straight = _Ids()
    train(cfg_for(env, "pretrain.yaml", *base, "name=stream_straight"), callbacks=[straight])
    assert len(straight.ids) == 14  # 3 steps an epoch: an epoch's odd fifth batch steps alone
    stopped, crashed, resumed = _Ids(), _Ids(), _Ids()
    train(cfg_for(env, "pretrain.yaml", *base, "name=stream"), callbacks=[stopped, _StopAt(2)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(
            cfg_for(env, "pretrain.yaml", *base, "name=stream", "resume=last", "data.num_workers=2",
                    "train.checkpoint_every_n_steps=1"),
            callbacks=[crashed, _CrashAt(5)],
        )  # fmt: skip
    train(cfg_for(env, "pretrain.yaml", *base, "name=stream", "resume=last"), callbacks=[resumed])
    assert [len(p.ids) for p in (stopped, crashed, resumed)] == [4, 5, 5]  # steps 2 and 5 are mid-epoch
    assert stopped.ids + crashed.ids + resumed.ids == straight.ids


def _corrupt_planned_samples(env, per_rank):
    """A copy of the env's shards in which the first batches of each of two ranks hold ``per_rank[r]``
    samples whose bytes are damaged; returns the copy's folder."""
    import shutil

    from fvl.config.data import DataConfig
    from fvl.data.datamodule import ensure_shards
    from fvl.data.plan import EpochBatches, PlanSettings
    from fvl.data.reader import Catalog
    from fvl.data.shardset import shard_set

    cfg = DataConfig(recipe=str(env["root"] / "recipe.yaml"), shards=str(env["root"] / "shards"))
    ensure_shards(cfg)
    folder = env["root"] / "shards_damaged"
    shutil.copytree(env["root"] / "shards", folder)
    shards = shard_set(folder, json.loads((folder / "manifest.json").read_text()), ["synthetic_caption"])
    catalog = Catalog.build(shards.urls, shards.shard_samples)
    for rank, n in enumerate(per_rank):
        settings = PlanSettings(0, {"synthetic_caption": 1.0}, 2, rank, 8)
        first = EpochBatches(catalog.sources, settings, catalog.text_len, catalog.images > 0).batches(0)[0]
        for i in first[:n]:
            path = catalog.paths[catalog.shard[i]]
            with open(path, "r+b") as f:
                f.seek(int(catalog.start[i]))
                f.write(b"\xff" * 512)  # the sample's first header no longer parses
    return folder


@pytest.mark.e2e
def test_two_process_ddp_on_cpu(env):
    damaged = _corrupt_planned_samples(env, per_rank=[1, 2])
    cmd = [
        sys.executable, "-m", "fvl.cli", "train", str(EXPERIMENTS / "pretrain.yaml"), *env["overrides"],
        "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "train.global_batch_size=16",
        "data.val_samples=8", "name=ddp", f"data.shards={damaged}", *REAL_PRECISION,
    ]  # fmt: skip
    res = subprocess.run(
        [*cmd, "trainer.max_steps=3"], capture_output=True, text=True, timeout=600, cwd=env["root"]
    )
    assert res.returncode == 0, res.stderr[-3000:]
    runs = [json.loads(p.read_text()) for p in (env["root"] / "runs").glob("ddp-pretrain-*/run.json")]
    assert len(runs) == 1 and runs[0]["steps"] == 3
    run = MlflowClient(env["uri"]).get_run(runs[0]["mlflow_run_id"])
    assert run.data.tags["grad_accumulation"] == "1"  # 16 = 8 per device x 2 processes
    # damaged samples read by either rank are counted by reason, summed over the ranks, logged
    assert run.data.tags["skipped.corrupt_shard"] == "3"
    assert run.data.metrics["data/skipped/corrupt_shard"] == 3
    from fvl.models import load_checkpoint

    load_checkpoint(
        runs[0]["checkpoint"]
        if runs[0]["checkpoint"].startswith("/")
        else env["root"] / runs[0]["checkpoint"]
    )
    res = subprocess.run([*cmd, "trainer.max_steps=5", "resume=last"], capture_output=True, text=True, timeout=600,
                         cwd=env["root"])  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = [json.loads(p.read_text()) for p in (env["root"] / "runs").glob("ddp-pretrain-*/run.json")]
    assert (
        len(resumed) == 1
        and resumed[0]["steps"] == 5
        and resumed[0]["mlflow_run_id"] == runs[0]["mlflow_run_id"]
    )


@pytest.mark.e2e
def test_two_process_fsdp_on_cpu_finishes_loads_and_resumes(env):
    """FSDP2 over two gloo processes, stage 2 with the real presets' precision (float32 trainable, bf16
    frozen tower, bf16-mixed), fused AdamW and partial activation checkpointing: one run folder, sharded periodic checkpoints, one consolidated safetensors
    that loads strictly, and resume=last continuing the same run."""
    from safetensors import safe_open

    from fvl.models import load_checkpoint

    base = [
        sys.executable, "-m", "fvl.cli", "train", str(EXPERIMENTS / "finetune.yaml"), *env["overrides"], "init_from=",
        "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=fsdp", "data.batch_size=4",
        "train.global_batch_size=8", "data.val_samples=8", "train.checkpoint_every_n_steps=2", "name=fsdp",
        "train.val_every_n_steps=2",  # a best checkpoint at step 2
        *REAL_PRECISION, "train.optimizer=adamw_fused",  # the real presets' optimizer and checkpointing
        "model.llm.gradient_checkpointing=true", "model.llm.keep_activations=1",
    ]  # fmt: skip
    res = subprocess.run(
        [*base, "trainer.max_steps=3"], capture_output=True, text=True, timeout=600, cwd=env["root"]
    )
    assert res.returncode == 0, res.stderr[-3000:]
    runs = list((env["root"] / "runs").glob("fsdp-finetune-*"))
    assert len(runs) == 1
    ckpt = runs[0] / "checkpoints"
    assert (ckpt / "last.ckpt").is_dir()  # sharded: one file per rank, no full gather every N steps
    assert not [p.name for p in ckpt.iterdir() if p.name.startswith(".")]  # committed whole: no temp folder
    load_checkpoint(ckpt / "last.safetensors")  # strict: every key of the model, nothing else
    with safe_open(str(ckpt / "last.safetensors"), "pt") as f:
        assert f.get_tensor("projector.0.weight").dtype == torch.float32  # the master weights
        assert f.get_tensor("vision.davit.convs.0.conv.weight").dtype == torch.bfloat16  # frozen, stored bf16
    # the best weights are gathered whole when they change, and are what the run folder stands for
    assert (ckpt / "best.ckpt").is_dir() and (ckpt / "best.safetensors").exists()
    load_checkpoint(ckpt / "best.safetensors")
    from fvl.runs.weights import find_weights

    assert find_weights(runs[0]).path == ckpt / "best.safetensors"
    # a sharded folder alone (a run that stopped early) consolidates on one process to the same weights,
    # and init_from / fvl eval read the folder itself
    from safetensors.torch import load_file

    from fvl.convert.consolidate import consolidate
    from fvl.models.loading import load_weights_file

    whole = load_file(str(ckpt / "last.safetensors"))
    out = consolidate(ckpt / "last.ckpt", env["root"] / "consolidated.safetensors")
    assert load_file(str(out)).keys() == whole.keys()
    for key, value in load_file(str(out)).items():
        assert torch.equal(value, whole[key]), key
    model = load_weights_file(ckpt / "last.ckpt")  # rebuilt from the run's config, the folder read whole
    assert torch.equal(model.projector[0].weight.detach(), whole["projector.0.weight"])
    res = subprocess.run([*base, "trainer.max_steps=5", "resume=last"], capture_output=True, text=True, timeout=600,
                         cwd=env["root"])  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert list((env["root"] / "runs").glob("fsdp-finetune-*")) == runs
    info = json.loads((runs[0] / "run.json").read_text())
    assert info["steps"] == 5
    assert (
        MlflowClient(env["uri"])
        .get_run(info["mlflow_run_id"])
        .data.tags["resumed_from"]
        .endswith("last.ckpt")
    )


@pytest.mark.integration
def test_sweep_of_two_runs_lands_two_tagged_runs_and_survives_a_failure(env, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    exp = EXPERIMENTS
    sweep.write_text(
        f"sweep: mini\nstages: [{exp / 'pretrain.yaml'}]\noverrides: [trainer.max_steps=2, data.val_samples=0]\n"
        f"grid:\n  fusion: [{exp / 'fusion' / 'avg_pool.yaml'}, {exp / 'fusion' / 'davit_only.yaml'}]\n  train.lr: [1e-3, -1]\n"
    )
    runs = run_sweep(sweep, env["overrides"])
    assert [r.status for r in runs] == [
        "ok",
        "failed",
        "ok",
        "failed",
    ]  # lr=-1 is invalid: reported, not fatal
    client = MlflowClient(env["uri"])
    found = client.search_runs(client.get_experiment_by_name("fvl").experiment_id, "tags.sweep = 'mini'")
    assert sorted(r.data.tags["fusion"] for r in found) == ["avg_pool", "single_layer"]
    assert sorted(r.data.tags["axis_fusion"] for r in found) == ["avg_pool", "davit_only"]
    assert {r.data.tags["axis_train_lr"] for r in found} == {"0.001"}
    assert {r.data.tags["sweep_id"] for r in found} == {runs[0].sweep_id}  # the launch
    assert runs[0].sweep_id.startswith("mini-") and len({r.sweep_id for r in runs}) == 1
    # a rerun (a new launch) skips the finished points (same resolved config but for the launch id), retries
    # the failed ones, and tags the runs it reuses as its own
    again = run_sweep(sweep, env["overrides"])
    assert [r.status for r in again] == ["done before", "failed", "done before", "failed"]
    assert again[0].result.run_dir == runs[0].result.run_dir and again[0].sweep_id != runs[0].sweep_id
    found = client.search_runs(client.get_experiment_by_name("fvl").experiment_id, "tags.sweep = 'mini'")
    assert len(found) == 2 and {r.data.tags["sweep_id"] for r in found} == {again[0].sweep_id}


def test_the_launch_id_is_no_part_of_the_config_a_rerun_compares():
    from fvl.sweep.runner import comparable_config, new_sweep_id

    first, second = new_sweep_id("s"), new_sweep_id("s")
    assert first != second and first.startswith("s-")
    config = "name: x\ntracking:\n  sweep: s\n  tags:\n    axis_seed: '0'\n    sweep_id: {}\n"
    assert comparable_config(config.format(first)) == comparable_config(config.format(second))
    assert "sweep_id" not in comparable_config(config.format(first))
    other = config.replace("'0'", "'1'").format(first)  # any other difference still counts
    assert comparable_config(other) != comparable_config(config.format(first))
    assert comparable_config("name: x\n") == "name: x\n"  # configs from before launch ids


def test_a_failed_evaluation_leaves_the_sweep_s_training_run_ok(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import fvl.sweep.runner as sweep_module

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"sweep: e\nstages: [{EXPERIMENTS / 'pretrain.yaml'}]\neval: {{samples: 10}}\n")

    def evaluate(*args):
        raise RuntimeError("the eval data is gone")

    monkeypatch.setattr(sweep_module, "evaluate_run", evaluate)
    trained = SimpleNamespace(checkpoint=tmp_path / "w.safetensors", run_dir=tmp_path)
    runs = run_sweep(sweep, [f"output_dir={tmp_path / 'runs'}"], train_fn=lambda cfg: trained)
    assert [r.status for r in runs] == ["ok"] and runs[0].result is trained
    assert "evaluation failed" in runs[0].error and "eval data is gone" in runs[0].error


def test_gradient_accumulation_from_global_batch():
    cfg = load("pretrain", ["train.global_batch_size=256", "data.batch_size=8"])
    assert cfg.gradient_accumulation(4) == 8
    cfg.train.global_batch_size = 100
    with pytest.raises(ValueError, match="not a multiple"):
        cfg.gradient_accumulation(4)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["train.global_batch_size=20", "data.batch_size=8"], "global_batch_size=20 is not a multiple"),
        (["model.llm.quantization=nf4"], "model.llm.init=pretrained"),
        (["stage=warmup"], "stage='warmup'"),
        (["train.optimizer=sgd"], "train.optimizer"),
        (["train.lr=fast"], "train.lr"),
        (["trainer.devices=two"], "trainer.devices='two'"),
        (["trainer.precision=bf17"], "trainer.precision"),
        (["train.val_every_n_steps=-1"], "train.val_every_n_steps=-1"),
        (["train.checkpoint_every_n_steps=-5"], "train.checkpoint_every_n_steps"),
        (["train.log_every_n_steps=0"], "train.log_every_n_steps"),
    ],
)
def test_training_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load(EXPERIMENTS / "pretrain.yaml", overrides)


def test_a_strategy_lightning_does_not_know_is_refused_before_a_run_folder(tmp_path):
    from fvl.train.run import train

    cfg = load(EXPERIMENTS / "pretrain.yaml", ["trainer.strategy=fsdpp", f"output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="trainer.strategy='fsdpp'"):
        train(cfg)
    assert not any(tmp_path.iterdir())


def test_fsdp_wraps_the_repeated_layers():
    from fvl.models import build_model
    from fvl.train.strategy import build_strategy

    model = build_model(load("tiny").model)
    names = {c.__name__ for c in model.fsdp_wrap_classes()}
    assert {"Phi3DecoderLayer", "Florence2VisionBlock", "BartEncoderLayer"} <= names
    strategy = build_strategy("fsdp", world_size=2)
    assert type(strategy).__name__ == "FSDPStrategy" and strategy.fsdp_reduce == "micro_batch"
    assert build_strategy("ddp") == "ddp"


@pytest.mark.e2e
def test_torchrun_ranks_write_one_run_folder(env):
    """torchrun starts every rank on its own: rank 0 decides the run folder and the others receive it."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
        "-m", "fvl.cli", "train", str(EXPERIMENTS / "pretrain.yaml"), *env["overrides"], "trainer.accelerator=cpu",
        "trainer.devices=2", "trainer.strategy=ddp", "train.global_batch_size=16", "trainer.max_steps=2",
        "data.val_samples=0", "name=torchrun",
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=env["root"])
    assert res.returncode == 0, res.stderr[-3000:]
    runs = list((env["root"] / "runs").glob("torchrun-pretrain-*"))
    assert len(runs) == 1 and (runs[0] / "checkpoints" / "last.safetensors").exists()


@pytest.mark.integration
def test_a_resume_over_shards_rebuilt_since_is_refused_naming_the_source(tmp_path):
    """The saved data plan holds what each source's shards are: after a source was rebuilt with 20 more
    items, resuming would replay some samples and skip others; it is refused, naming the source."""
    synthetic_recipe(tmp_path / "r.yaml", captions=40, qa=8, per_shard=20)
    base = [
        f"data.recipe={tmp_path / 'r.yaml'}", f"data.shards={tmp_path / 'shards'}", f"output_dir={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", "data.batch_size=4", "train.global_batch_size=4",
        "data.val_samples=0", "data.num_workers=0", "trainer.progress=false", "trainer.max_steps=4",
        "train.checkpoint_every_n_steps=2",
    ]  # fmt: skip
    train(load(EXPERIMENTS / "pretrain.yaml", base), callbacks=[_StopAt(2)])
    synthetic_recipe(tmp_path / "r.yaml", captions=60, qa=8, per_shard=20)  # rebuilt on the next start
    with pytest.raises(ValueError, match=r"shards of synthetic_caption.*'samples': 40.*'samples': 60"):
        train(load(EXPERIMENTS / "pretrain.yaml", [*base, "resume=last"]))
