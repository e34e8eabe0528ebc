"""Checkpoints of a run: Lightning's full state (``.ckpt``: weights, optimizer, schedule, step) for exact
resumption, written atomically, plus the model alone as safetensors beside each (``.safetensors``: what
finetune, eval and export read; no pickle). Also: finding the checkpoint a config points at."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _atomic_save
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from fvl.models.checkpoint import save_checkpoint

RUN_INFO = "run.json"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to a temporary file in the same folder and renames it: a crash never leaves a truncated
    checkpoint under the final name. Loads with ``weights_only=True`` (no arbitrary pickles)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            _atomic_save(checkpoint, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


class FVLCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint that also writes the model as safetensors next to each ``.ckpt``."""

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if trainer.is_global_zero and not _sharded(trainer):
            save_checkpoint(
                trainer.lightning_module.model,
                Path(filepath).with_suffix(".safetensors"),
                extra_metadata={"global_step": str(trainer.global_step)},
            )
        trainer.strategy.barrier()

    def _remove_checkpoint(self, trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        sibling = Path(filepath).with_suffix(".safetensors")
        if trainer.is_global_zero and sibling.exists():
            sibling.unlink()


def _sharded(trainer) -> bool:
    name = type(trainer.strategy).__name__.lower()
    return "fsdp" in name or "deepspeed" in name


def write_run_info(run_dir: Path, info: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".run.", dir=run_dir)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f, indent=1, sort_keys=True)
    os.replace(tmp, run_dir / RUN_INFO)


def find_runs(
    output_dir: str | Path, stage: str | None = None, name: str | None = None
) -> list[tuple[Path, dict]]:
    """Run folders under ``output_dir`` (newest first), filtered by stage and experiment name."""
    runs = []
    for info_path in Path(output_dir).glob(f"*/{RUN_INFO}"):
        info = json.loads(info_path.read_text())
        if (stage is None or info.get("stage") == stage) and (name is None or info.get("name") == name):
            runs.append((info_path.parent, info))
    return sorted(runs, key=lambda r: r[1].get("started", ""), reverse=True)


def model_weights_of_run(run_dir: Path) -> Path:
    """The run's best model weights, else its last (safetensors; the full ``.ckpt`` of a sharded run)."""
    for name in ("best.safetensors", "last.safetensors", "best.ckpt", "last.ckpt"):
        p = run_dir / "checkpoints" / name
        if p.exists():
            return p
    raise FileNotFoundError(f"{run_dir}: no best/last checkpoint (did the run finish a step?)")


def resolve_init(init_from: str, output_dir: str, tracking_uri: str | None = None) -> tuple[Path, str]:
    """``(weights path, source run id or '')`` for ``init_from``: a path, ``latest`` or ``mlflow:RUN_ID``
    (looked up in ``tracking_uri``)."""
    if init_from == "latest":
        runs = find_runs(output_dir, stage="pretrain")
        if not runs:
            raise FileNotFoundError(
                f"init_from=latest: no pretrain run under {output_dir}/ - run `make pretrain` first"
            )
        run_dir, info = runs[0]
        return model_weights_of_run(run_dir), info.get("mlflow_run_id", "")
    if init_from.startswith("mlflow:"):
        from mlflow.tracking import MlflowClient

        run_id = init_from.split(":", 1)[1]
        run = MlflowClient(tracking_uri).get_run(run_id)
        path = run.data.tags.get("checkpoint_path")
        if not path:
            raise FileNotFoundError(f"init_from={init_from}: the run has no checkpoint_path tag")
        return Path(path), run_id
    path = Path(init_from)
    if not path.exists():
        raise FileNotFoundError(f"init_from={init_from}: no such file")
    if path.suffix == ".ckpt" and path.with_suffix(".safetensors").exists():
        path = path.with_suffix(".safetensors")
    run_id = ""
    info = path.parent.parent / RUN_INFO
    if info.exists():
        run_id = json.loads(info.read_text()).get("mlflow_run_id", "")
    return path, run_id


def load_model_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Model weights from a safetensors file (strict) or a Lightning ``.ckpt`` (``weights_only``)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_model

        load_model(model, str(path), strict=True)
        return
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict(
        {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}, strict=True
    )


def resolve_resume(resume: str, output_dir: str, name: str, stage: str) -> tuple[Path, dict]:
    """The ``.ckpt`` to resume and the run info of its run (``last``: the newest run of name and stage)."""
    if resume == "last":
        runs = find_runs(output_dir, stage=stage, name=name)
        for run_dir, info in runs:
            ckpt = run_dir / "checkpoints" / "last.ckpt"
            if ckpt.exists():
                return ckpt, info
        raise FileNotFoundError(
            f"resume=last: no last.ckpt of a {stage} run named {name!r} under {output_dir}/"
        )
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"resume={resume}: no such checkpoint")
    info_path = path.parent.parent / RUN_INFO
    return path, json.loads(info_path.read_text()) if info_path.exists() else {}


def resolve_checkpoint(spec: str, output_dir: str | Path = "runs") -> Path:
    """Model weights for inference: a file, a run folder, or ``latest`` (the newest finetune run, else the
    newest pretrain run, under ``output_dir``)."""
    if spec == "latest":
        for stage in ("finetune", "pretrain"):
            runs = find_runs(output_dir, stage=stage)
            if runs:
                return model_weights_of_run(runs[0][0])
        raise FileNotFoundError(
            f"no runs under {output_dir}/: train one first (make pretrain, make finetune)"
        )
    path = Path(spec)
    if path.is_dir():
        return model_weights_of_run(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {spec} not found")
    if path.suffix == ".ckpt" and path.with_suffix(".safetensors").exists():
        return path.with_suffix(".safetensors")
    return path


def load_for_inference(path: Path):
    """The model of a checkpoint: safetensors carry their config; a ``.ckpt`` uses its run's config.yaml."""
    from fvl.models import build_model, load_checkpoint

    if path.suffix == ".safetensors":
        return load_checkpoint(path).eval()
    from omegaconf import OmegaConf

    cfg_path = path.parent.parent / "config.yaml"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{path}: a .ckpt needs its run's config.yaml at {cfg_path}")
    model = build_model(OmegaConf.load(cfg_path).model)
    load_model_weights(model, path)
    return model.eval()
