"""An optimizer step is that of one big batch (``train.loss_normalization=step_tokens``): its loss and
gradient are the mean over every supervised token of all its micro batches on all ranks, whatever the micro
batch, the accumulation and the world size. The old rule (each micro batch's own mean, LLaVA's) is kept as
``micro_batch`` and differs exactly where micro batches hold different numbers of supervised tokens."""

import json
import subprocess
import sys

import lightning as L
import pytest
import torch
from mlflow.tracking import MlflowClient

from fvl.config import load
from fvl.train.run import train
from tests.fixtures import EXPERIMENTS, run_setting


class StepGrads(L.Callback):
    """The first optimizer step's gradients (before clipping) and its logged loss."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.grads:
            self.grads = {
                n: p.grad.detach().clone()
                for n, p in pl_module.model.named_parameters()
                if p.grad is not None
            }


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("lossnorm")
    uri, common = run_setting(root, captions=16, qa=48, per_shard=16)
    base = [
        *common, "init_from=", "trainer.max_steps=1",
        "train.global_batch_size=8", "train.log_every_n_steps=1", "train.warmup_ratio=0", "trainer.accelerator=cpu",
        "data.sources=[synthetic_caption,synthetic_qa]",  # captions and one-word answers: unequal micro batches
    ]  # fmt: skip
    return root, uri, base


def step(setting, name: str, *extra: str, callbacks=()):
    root, _, base = setting
    grads = StepGrads()
    torch.manual_seed(0)
    cfg = load(EXPERIMENTS / "finetune.yaml", [*base, f"output_dir={root / name}", f"name={name}", *extra])
    result = train(cfg, callbacks=[grads, *callbacks])
    return result, grads.grads


def assert_same_step(a, b):
    (ra, ga), (rb, gb) = a, b
    assert ra.first_loss == pytest.approx(rb.first_loss, rel=1e-6, abs=1e-6)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.integration
def test_micro_batches_and_accumulation_give_the_step_of_one_big_batch(setting):
    big = step(setting, "big", "data.batch_size=8")
    accumulated = step(setting, "acc", "data.batch_size=2")
    assert_same_step(big, accumulated)
    # the run's summary is that step's loss, not the loss divided by the accumulation
    assert json.loads((accumulated[0].run_dir / "run.json").read_text())["first_loss"] == pytest.approx(
        big[0].first_loss, rel=1e-6
    )
    # the old rule weighs each micro batch alike: with unequal supervised tokens, another gradient
    llava = step(setting, "llava", "data.batch_size=2", "train.loss_normalization=micro_batch")
    difference = sum((llava[1][n] - big[1][n]).norm() ** 2 for n in big[1]) ** 0.5
    assert difference / sum(g.norm() ** 2 for g in big[1].values()) ** 0.5 > 0.01


@pytest.mark.e2e
def test_two_ranks_with_accumulation_give_the_step_of_one_big_batch(setting):
    root, uri, base = setting
    big, _ = step(setting, "big2", "data.batch_size=8")
    cmd = [
        sys.executable, "-m", "fvl.cli", "train", str(EXPERIMENTS / "finetune.yaml"), *base, "name=ranks",
        f"output_dir={root / 'ranks'}", "data.batch_size=2", "trainer.devices=2", "trainer.strategy=ddp",
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    client = MlflowClient(uri)
    ranks = json.loads(next((root / "ranks").glob("ranks-*/run.json")).read_text())

    def first(run_id: str, metric: str) -> float:
        return client.get_metric_history(run_id, metric)[0].value

    for metric in ("train/loss", "train/grad_norm"):
        assert first(ranks["mlflow_run_id"], metric) == pytest.approx(
            first(big.mlflow_run_id, metric), rel=1e-5
        )
    # and the gradient itself: AdamW's first step moves every weight by about lr x its gradient's sign
    # (1e-3), so a gradient element whose sign differed would move its weight 2e-3 apart. (An element whose
    # gradient is near AdamW's eps turns float noise into ~1e-5: the tolerance sits well between the two.)
    from safetensors.torch import load_file

    theirs = load_file(str(big.checkpoint))
    ours = load_file(str(next((root / "ranks").glob("ranks-*/checkpoints/last.safetensors"))))
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-4, msg=key)


class StopInsideAStep(L.Callback):
    """Asks the run to stop after micro batch ``at`` of the run (inside an accumulation), as a time limit or a
    user's callback may."""

    def __init__(self, at: int) -> None:
        self.at, self.seen = at, 0

    def on_train_batch_end(self, trainer, *args) -> None:
        self.seen += 1
        if self.seen == self.at:
            trainer.should_stop = True


@pytest.mark.integration
def test_a_stop_inside_an_accumulation_waits_for_the_step_and_the_resume_equals_the_whole_run(setting):
    from safetensors.torch import load_file

    common = [
        "data.batch_size=2",
        "trainer.max_steps=4",
        "train.checkpoint_every_n_steps=0",
    ]  # the stop's own
    whole, _ = step(setting, "whole", *common)
    stopped, _ = step(setting, "stopped", *common, callbacks=[StopInsideAStep(at=6)])  # step 2, micro batch 2
    assert stopped.steps == 2  # the step it was inside finished
    resumed, _ = step(setting, "stopped", *common, "resume=last")
    assert resumed.run_dir == stopped.run_dir and resumed.steps == 4
    ours, theirs = load_file(resumed.checkpoint), load_file(whole.checkpoint)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)
