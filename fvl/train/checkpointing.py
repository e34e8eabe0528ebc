"""Checkpoints of a run: Lightning's full state (``.ckpt``: weights, optimizer, schedule, step) for exact
resumption, written atomically, plus the model alone as safetensors beside each (``.safetensors``: what
finetune, eval and export read; no pickle). Also: where a run starts (resume, init) - run folders
themselves belong to ``fvl.runs.RunDir``."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.fabric.utilities.cloud_io import _atomic_save
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from fvl.models.checkpoint import save_checkpoint
from fvl.runs.folder import RunDir
from fvl.runs.tracking import tracking_uri
from fvl.runs.weights import find_weights
from fvl.train.strategy import is_sharded
from fvl.util.files import temp_beside

if TYPE_CHECKING:
    from fvl.config import ExperimentConfig

log = logging.getLogger(__name__)


JOURNAL = ".commit.json"  # in a checkpoints folder while a pair of files is being renamed into place
FAULT_SLEEP = "FVL_FAULT_COMMIT_SLEEP"  # seconds to pause between a commit's renames (kill tests only)


def commit(folder: Path, moves: dict[Path, Path]) -> None:
    """Rename finished temp files to their final names as one unit (``moves``: final -> temp, all in
    ``folder``). A journal listing the moves is written (and synced) first, so a crash between two renames is
    completed by ``recover`` on the next start: a ``.ckpt`` and the ``.safetensors`` of the same step are
    never left from different steps."""
    journal = folder / JOURNAL
    tmp = folder / f"{JOURNAL}.tmp"
    with open(tmp, "w") as f:
        json.dump({str(t): str(final) for final, t in moves.items()}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, journal)
    for i, (final, t) in enumerate(moves.items()):
        if i and os.environ.get(FAULT_SLEEP):  # fault injection for the kill tests: a wide window mid-commit
            time.sleep(float(os.environ[FAULT_SLEEP]))
        _move(Path(t), Path(final))
    journal.unlink()
    _remove_trash(folder)


def _move(t: Path, final: Path) -> None:
    """``t`` to ``final``. A file replaces atomically; a folder (a sharded checkpoint) cannot replace a
    folder, so the old one is first renamed aside as trash (removed after the commit, or by ``recover``)."""
    if t.is_dir() and final.exists():
        os.replace(final, final.with_name(f".{final.name}.trash-{os.getpid()}-{time.monotonic_ns()}"))
    os.replace(t, final)


def _remove_trash(folder: Path) -> None:
    for trash in folder.glob(".*.trash-*"):
        shutil.rmtree(trash, ignore_errors=True) if trash.is_dir() else trash.unlink(missing_ok=True)


def recover(folder: Path) -> list[str]:
    """Finish a ``commit`` that a crash interrupted (its temp files were complete before the journal was
    written) and delete the temp files of writes that were killed; returns what was done, for the log."""
    done: list[str] = []
    journal = folder / JOURNAL
    if journal.is_file():
        try:
            moves = json.loads(journal.read_text())
        except ValueError:
            moves = {}  # a journal is written whole before any rename: unreadable means none began
        for t, final in moves.items():
            if Path(t).exists():  # not moved yet (a move happens once: its source is then gone)
                _move(Path(t), Path(final))
                done.append(f"completed the interrupted checkpoint write of {Path(final).name}")
        journal.unlink()
    for leftover in folder.glob(".*"):
        if leftover.name != JOURNAL and _is_temp(leftover.name):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
            done.append(f"removed {leftover.name}, left by a killed write")
    return done


def _is_temp(name: str) -> bool:
    """The names ``tempfile.mkstemp(prefix=f".{final}.")`` gives checkpoint writes (and the journal's)."""
    return any(f"{ext}." in name for ext in (".ckpt", ".safetensors", JOURNAL))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to a temporary file in the same folder and renames it: a crash never leaves a truncated
    checkpoint under the final name. Inside ``deferred()`` the finished temp file is left for the caller to
    ``commit`` with its companion. Loads with ``weights_only=True`` (no arbitrary pickles)."""

    def __init__(self) -> None:
        super().__init__()
        self._deferred: dict[Path, Path] | None = None

    @contextmanager
    def deferred(self):
        """Checkpoints saved inside the block stay in temp files: ``{final path: temp path}``."""
        self._deferred = {}
        try:
            yield self._deferred
        finally:
            self._deferred = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        tmp = str(temp_beside(path))
        try:
            _atomic_save(checkpoint, tmp)
            if self._deferred is not None:
                self._deferred[path] = Path(tmp)
                tmp = None
            else:
                os.replace(tmp, path)
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


def save_pair(
    trainer, model, ckpt_path: Path, metadata: dict[str, str], save=None, gather: bool = False
) -> None:
    """Lightning's full state at ``ckpt_path`` (written by ``save(path)``, default
    ``trainer.save_checkpoint``) and the model as safetensors beside it, replaced as a pair (``commit``)
    where the checkpoint is one file (``AtomicCheckpointIO``). A sharded run's checkpoint is a folder that
    every rank writes its shards into: it is written under a temp name and committed whole (its model
    weights are gathered at the end of the run, and with ``gather`` now: the best weights, whenever they
    change, so ``init_from``, ``fvl eval`` and ``fvl export`` find ``best.safetensors``). Every rank calls it."""
    save = save or (lambda path: trainer.save_checkpoint(path))
    io = trainer.strategy.checkpoint_io
    if is_sharded(trainer.strategy):
        tmp = ckpt_path.with_name(f".{ckpt_path.name}.tmp")
        if trainer.is_global_zero and tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        trainer.strategy.barrier()
        save(tmp)
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            commit(ckpt_path.parent, {ckpt_path: tmp})
        trainer.strategy.barrier()
        if gather:
            save_gathered_weights(trainer, model, ckpt_path.with_suffix(".safetensors"), metadata)
        return
    if not isinstance(io, AtomicCheckpointIO):
        save(ckpt_path)
        return
    with io.deferred() as pending:
        save(ckpt_path)
    if trainer.is_global_zero:
        weights = ckpt_path.with_suffix(".safetensors")
        tmp = save_checkpoint(model, weights, extra_metadata=metadata, commit=False)
        commit(ckpt_path.parent, {ckpt_path: pending[ckpt_path], weights: tmp})
    trainer.strategy.barrier()


def save_gathered_weights(trainer, model, path: Path, metadata: dict[str, str]) -> None:
    """A sharded run's model weights as one safetensors file: every rank takes part in gathering the full
    state (a collective) and rank 0 writes it atomically. (An unsharded run writes its pair with
    ``save_pair``.)"""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainer.is_global_zero:
        save_checkpoint(model, path, extra_metadata=metadata, state_dict=state)
    trainer.strategy.barrier()


class FVLCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint that also writes the model as safetensors next to each ``.ckpt``, the
    two replaced as a pair (``save_pair``)."""

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        # What the run logged so far goes to the store before the checkpoint it belongs to: a crash after
        # this checkpoint then loses no logged step that a resume from it would not redo (bounded wait;
        # none while the store is down).
        logger = trainer.logger
        if trainer.is_global_zero and hasattr(logger, "wait_sent") and not logger.store_down:
            logger.wait_sent(10.0)
        save_pair(
            trainer,
            trainer.lightning_module.model,
            Path(filepath),
            {"global_step": str(trainer.global_step)},
            save=lambda path: super(FVLCheckpoint, self)._save_checkpoint(trainer, str(path)),
            gather=self.monitor is not None,  # the best weights, whole, whenever they change
        )
        self._last_checkpoint_saved = filepath  # a sharded checkpoint was written under a temp name

    def _remove_checkpoint(self, trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        sibling = Path(filepath).with_suffix(".safetensors")
        if trainer.is_global_zero and sibling.exists():
            sibling.unlink()


@dataclass
class Start:
    """Where a run starts: its folder, the ``.ckpt`` it resumes (if any) and the weights it is initialised
    from (if any) with their MLflow run."""

    run: RunDir
    resume_ckpt: Path | None = None
    init_weights: Path | None = None
    init_run_id: str = ""

    @property
    def resumed(self) -> bool:
        return self.resume_ckpt is not None


def resolve_start(cfg: ExperimentConfig) -> Start:
    """The run folder and starting point of ``cfg``: ``resume`` continues a run in its own folder; otherwise
    a new folder, initialised from ``init_from`` when set."""
    if cfg.resume:
        ckpt, run = resolve_resume(cfg.resume, cfg.output_dir, cfg.name, cfg.stage.name)
        refuse_sharded_resume_without_sharding(ckpt, cfg.trainer.strategy)
        return Start(run, resume_ckpt=ckpt)
    start = Start(RunDir.create(cfg.output_dir, cfg.name, cfg.stage.name))
    if cfg.init_from:
        stage = cfg.stage.init_stage if cfg.init_from == "latest" else ""
        found = find_weights(
            cfg.init_from, cfg.output_dir, stage, tracking_uri(cfg.tracking), key="init_from"
        )
        start.init_weights, start.init_run_id = found.path, found.run_id
    elif cfg.stage.init_stage:
        log.warning("stage %r starts from the model's own initialisation (no init_from)", cfg.stage.name)
    return start


def refuse_sharded_resume_without_sharding(ckpt: Path | None, strategy: str) -> None:
    """A sharded checkpoint (an FSDP run's ``.ckpt`` folder) resumes under FSDP only (another world size then
    reshards the model and optimizer, and the data plan's check says what changed); under another strategy
    it is refused with the ways that work."""
    if ckpt is None or not Path(ckpt).is_dir() or strategy == "fsdp":
        return
    ranks = len(list(Path(ckpt).glob("*.distcp")))
    raise ValueError(
        f"resume={ckpt}: a sharded checkpoint (an FSDP run's, {ranks} shard file(s)) resumes with "
        f"trainer.strategy=fsdp, not {strategy!r}; or start a new run from its weights with init_from={ckpt} "
        f"(fvl checkpoints consolidate {ckpt} writes them as one safetensors file)"
    )


def resolve_resume(resume: str, output_dir: str | Path, name: str, stage: str) -> tuple[Path, RunDir]:
    """The ``.ckpt`` to resume and its run (``last``: the newest run of this name and stage that has one)."""
    if resume == "last":
        without: list[RunDir] = []  # newer runs that died before their first checkpoint
        for run in RunDir.find(output_dir, stage=stage, name=name):
            _recover(run)
            if run.ckpt("last").exists():
                if without:
                    log.warning(
                        "resume=last: the newest %s run%s %s ha%s no checkpoint (stopped before its first); "
                        "resuming the older run %s instead (pass resume=PATH to choose)",
                        stage, "s" if len(without) > 1 else "", ", ".join(r.path.name for r in without),
                        "ve" if len(without) > 1 else "s", run.path.name,
                    )  # fmt: skip
                return run.ckpt("last"), run
            without.append(run)
        raise FileNotFoundError(
            f"resume=last: no last.ckpt of a {stage} run named {name!r} under {output_dir}/"
            + (f" ({len(without)} run(s) stopped before their first checkpoint)" if without else "")
        )
    path = Path(resume)
    run = RunDir.of(path)
    if run is not None:
        _recover(run)
    if not path.exists():
        raise FileNotFoundError(f"resume={resume}: no such checkpoint")
    if run is None:
        raise FileNotFoundError(f"resume={resume}: the checkpoint is not inside a run folder")
    return path, run


def _recover(run: RunDir) -> None:
    if run.checkpoints.is_dir():
        for what in recover(run.checkpoints):
            log.warning("%s: %s", run.path.name, what)
