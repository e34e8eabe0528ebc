"""The capabilities beyond the paper in one whole run, under the real presets' settings on CPU stand-ins: a
Qwen3-architecture LLM (qk-norm, tied embeddings, the qwen3 template on a Qwen-form tokenizer) with a SigLIP
tower fused beside Florence-2, on two gloo ranks with gradient accumulation, bf16 storage and float32 masters:
stage 1 under DDP and stage 2 under FSDP (gradients reduced once per step), each scoring the synthetic benchmark while it trains (split over
the ranks under DDP, from the gathered weights under FSDP); then ``fvl eval`` and ``fvl export``."""

import json
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from tests.fixtures import EXPERIMENTS, REAL_PRECISION, run_setting


def _experiment(root, stage: str):
    path = root / f"qwen3_siglip_{stage}.yaml"
    parts = [EXPERIMENTS / f"{stage}.yaml", EXPERIMENTS / "models" / "tiny_qwen3.yaml",
             EXPERIMENTS / "fusion" / "florence2_siglip.yaml"]  # fmt: skip
    path.write_text(f"include: [{', '.join(str(p) for p in parts)}]\nname: qs\n")
    return path


def _fvl(root, *args):
    res = subprocess.run([sys.executable, "-m", "fvl", *map(str, args)], capture_output=True, text=True,
                         timeout=600, cwd=root)  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    return res


@pytest.mark.e2e
def test_qwen3_with_siglip_beside_florence2_on_two_ranks_scores_while_training_and_exports(
    tmp_path, monkeypatch
):
    root = tmp_path
    uri, shared = run_setting(root, captions=120, qa=120, per_shard=40)
    common = [
        *shared, f"output_dir={root / 'runs'}", "data.batch_size=4",
        "train.global_batch_size=16",  # 2 ranks x 4 x 2 micro batches
        "trainer.accelerator=cpu",
        "trainer.devices=2", "train.checkpoint_every_n_steps=0", "eval.during_training.every_n_steps=2",
        "eval.during_training.limit=8", *REAL_PRECISION,
    ]  # fmt: skip
    _fvl(root, "train", _experiment(root, "pretrain"), *common, "trainer.strategy=ddp", "trainer.max_steps=2")
    _fvl(root, "train", _experiment(root, "finetune"), *common, "trainer.strategy=fsdp", "trainer.max_steps=2",
         "init_from=latest", "train.optimizer=adamw_fused", "trainer.fsdp_reduce=step")  # fmt: skip

    client = MlflowClient(uri)
    runs = {p.name.split("-")[1]: p for p in (root / "runs").glob("qs-*") if (p / "run.json").exists()}
    assert set(runs) == {"pretrain", "finetune"}
    info = {stage: json.loads((path / "run.json").read_text()) for stage, path in runs.items()}
    for stage, steps in (("pretrain", [2]), ("finetune", [2])):
        run_id = info[stage]["mlflow_run_id"]
        assert [m.step for m in client.get_metric_history(run_id, "eval/synthetic/score")] == steps, stage
        assert client.get_run(run_id).data.tags["grad_accumulation"] == "2"
        scored = json.loads(
            (runs[stage] / "eval" / "during_training" / f"step-{steps[-1]}" / "synthetic.json").read_text()
        )
        assert len(scored["samples"]) == 8  # every question answered once, whichever rank answered it
    params = client.get_run(info["finetune"]["mlflow_run_id"]).data.params
    assert int(params["params.vision.siglip.frozen"]) > 0 and int(params["params.llm.trainable"]) > 0

    from safetensors import safe_open

    weights = runs["finetune"] / "checkpoints" / "last.safetensors"
    with safe_open(str(weights), "pt") as f:
        keys = set(f.keys())
    assert (
        any(k.startswith("towers.siglip.") for k in keys)
        and "llm.model.layers.0.self_attn.q_norm.weight" in keys
    )

    # the CLI's own entry point, in this process (a fresh interpreter per command would add only start-up)
    from fvl.cli import main

    monkeypatch.chdir(root)  # where a command without a tracking store of its own looks (as the runs did)
    assert main(["eval", str(runs["finetune"]), "--samples", "7", "--runs", str(root / "runs")]) == 0
    assert (runs["finetune"] / "eval" / "synthetic.json").exists()
    assert main(["export", str(weights), str(root / "export")]) == 0
    from transformers import AutoConfig, AutoTokenizer

    llm = AutoConfig.from_pretrained(root / "export" / "llm")
    assert llm.model_type == "qwen3" and llm.tie_word_embeddings
    tok = AutoTokenizer.from_pretrained(root / "export" / "llm")
    assert tok.bos_token is None and tok.eos_token == "<|im_end|>"
    assert (root / "export" / "vision_siglip" / "config.json").exists()
    from fvl.convert.export import load_exported

    model = load_exported(root / "export")
    assert model.cfg.text.template == "qwen3" and list(model.towers) == ["siglip"]
    from PIL import Image

    answer = model.generate(
        [Image.new("RGB", (40, 30), "red")], ["What colour is the shape?"], max_new_tokens=4
    )
    assert isinstance(answer[0], str)
