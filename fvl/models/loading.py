"""Models for inference from whatever a user points at: a checkpoint file, a run folder or ``latest``."""

from __future__ import annotations

from pathlib import Path

import torch

from fvl.models.checkpoint import load_checkpoint, load_state_strict, model_config
from fvl.models.florence_vl import FlorenceVL
from fvl.runs.folder import RunDir
from fvl.runs.weights import find_weights


def read_sharded_model_state(folder: str | Path) -> dict[str, torch.Tensor]:
    """The model's weights in a sharded Lightning checkpoint (the folder torch's distributed checkpoint writes
    for an FSDP run), gathered whole on this one process; the optimizer's state is left unread."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict = {}
    # torch's own dcp_to_torch_save reads a checkpoint on one process this way; the planner's key filter
    # leaves the optimizer state (twice the weights again) on disk
    _load_state_dict(
        state, storage_reader=FileSystemReader(str(folder)), planner=_EmptyStateDictLoadPlanner(keys={"state_dict"}),
        no_dist=True,
    )  # fmt: skip
    weights = state.get("state_dict")
    if not weights:
        raise FileNotFoundError(f"{folder}: no model state in this sharded checkpoint")
    return {k[len("model.") :]: v for k, v in weights.items() if k.startswith("model.")}


def load_model_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Model weights from a safetensors file (strict), a Lightning ``.ckpt`` (``weights_only``) or a sharded
    ``.ckpt`` folder (an FSDP run's)."""
    path = Path(path)
    if path.is_dir():
        load_state_strict(model, read_sharded_model_state(path))
        return
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        load_state_strict(model, load_file(str(path)))
        return
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    load_state_strict(model, {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")})


def load_weights_file(path: str | Path) -> FlorenceVL:
    """The model of a weights file, in eval mode. Safetensors carry their config; a ``.ckpt`` (a sharded
    run's) is rebuilt from its run's ``config.yaml``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_checkpoint(path).eval()
    run = RunDir.of(path)
    if run is None:
        raise FileNotFoundError(f"{path}: a .ckpt needs its run folder's config.yaml")
    model = FlorenceVL(model_config(run.config().model))
    load_model_weights(model, path)
    return model.eval()


def load_for_inference(spec: str | Path, output_dir: str | Path = "runs") -> FlorenceVL:
    """The model of ``spec`` (a weights file, a run folder, ``latest`` or ``mlflow:RUN_ID``: where it points
    is ``fvl.runs.weights.find_weights``'s to decide), in eval mode."""
    return load_weights_file(find_weights(spec, output_dir).path)
