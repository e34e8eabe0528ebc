"""Benchmark scores while a run trains (``eval.during_training``): the callback that answers the benchmarks
with the current weights every N optimizer steps and logs ``eval/<benchmark>/<metric>`` at that step.

It runs ``fvl eval``'s own code (``fvl.eval.evaluate``: ``predict`` then ``score``), so a score at step N is
the score ``fvl eval`` would give a checkpoint of step N with the same questions. Where the weights are:

- one device, DDP: every rank holds the whole model; the questions are split over the ranks (every
  ``world``-th one), each rank answers its share with its own copy, and rank 0 scores the gathered answers.
- FSDP: no rank holds the whole model. Every rank takes part in gathering the full weights (a collective,
  as for ``best.safetensors``); rank 0 loads them into an answering copy (built at the first evaluation,
  kept for the next: one more model on rank 0's device) and answers every question while the others wait.

A resumed run evaluates no step twice: the steps evaluated are in the checkpoint (this callback's state)
and in the run's MLflow record (``eval/during_training/seconds``, logged at each evaluated step), which also
covers an evaluation made after the checkpoint a resume starts from. The benchmarks are read at the start
of the run, so a wrong path fails before the first step; a benchmark that fails while answering is logged
and skipped, never the run's end.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from fvl.config import ExperimentConfig
from fvl.eval.benchmarks import Benchmark, resolve_benchmark
from fvl.eval.evaluate import eval_settings, metrics_of, predict, score
from fvl.runs.folder import RunDir
from fvl.train.strategy import is_sharded
from fvl.util.files import write_text_atomic

log = logging.getLogger(__name__)

SECONDS_KEY = "eval/during_training/seconds"


class EvalDuringTraining(L.Callback):
    """See the module docstring. ``run``: the run folder, whose ``eval/during_training/step-N/`` receives
    each evaluation's JSON (the same files ``fvl eval`` writes)."""

    def __init__(self, cfg: ExperimentConfig, run: RunDir) -> None:
        self.cfg = cfg
        self.every = cfg.eval.during_training.every_n_steps
        self.run = run
        self.evaluated: set[int] = set()
        self.benchmarks: list[Benchmark] = []
        self._answering: torch.nn.Module | None = None  # FSDP: rank 0's whole copy

    # ---- state: the steps evaluated travel with the checkpoint --------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"evaluated": sorted(self.evaluated)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.evaluated |= set(state_dict.get("evaluated", []))

    # ---- hooks ------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dt = self.cfg.eval.during_training
        samples = dt.limit or self.cfg.eval.samples
        self.benchmarks = [resolve_benchmark(spec, samples, dt.limit) for spec in dt.bench()]
        logged = _steps_logged(trainer.logger) if trainer.is_global_zero else []
        self.evaluated |= set(trainer.strategy.broadcast(logged, src=0))
        log.info(
            "benchmarks every %d steps: %s",
            self.every,
            ", ".join(f"{b.result_name} ({len(b.samples)})" for b in self.benchmarks),
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Batches after a step but before the next one (accumulation) see the same global_step: it is then
        # in ``evaluated`` already.
        step = trainer.global_step
        if step == 0 or step % self.every or step in self.evaluated:
            return
        self.evaluated.add(step)
        self.evaluate(trainer, pl_module, step)

    # ---- one evaluation --------------------------------------------------------------------------------------
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> dict[str, float]:
        """Answer and score every benchmark with the current weights; rank 0 logs and returns the metrics."""
        began = time.perf_counter()
        sharded = is_sharded(trainer.strategy)
        model = self._answering_model(trainer, pl_module) if sharded else pl_module.model
        rank, world = trainer.global_rank, trainer.world_size
        metrics: dict[str, float] = {}
        headline: list[str] = []
        was_training = pl_module.model.training
        try:
            for bench in self.benchmarks:
                result = self._one(trainer, model, bench, rank, 1 if sharded else world, step)
                if result is not None:
                    metrics |= metrics_of(result)
                    headline += [f"{result.benchmark} {k} {v:.3f}" for k, v in result.aggregate.items()]
        finally:
            pl_module.model.train(was_training)
        seconds = time.perf_counter() - began
        if trainer.is_global_zero and trainer.logger is not None:
            trainer.logger.log_metrics({**metrics, SECONDS_KEY: seconds}, step=step)
        if trainer.is_global_zero:
            log.info("step %d: %s (%.1f s)", step, ", ".join(headline) or "no scores", seconds)
        trainer.strategy.barrier()
        return metrics

    def _one(self, trainer, model, bench: Benchmark, rank: int, world: int, step: int):
        tokens = bench.spec.max_new_tokens
        options = bench.spec.protocol(self.cfg.eval.protocol())
        mine = list(range(rank, len(bench.samples), world)) if model is not None else []
        answers: list[str] | str = []
        try:
            if mine:
                with trainer.precision_plugin.forward_context():
                    answers = predict(
                        model, [bench.samples[i] for i in mine], tokens, self.cfg.eval.batch_size
                    )
        except Exception as e:  # noqa: BLE001 - one benchmark's failure must not end the run
            answers = f"{type(e).__name__}: {e}"
        shares = _gather(trainer, (mine, answers))
        if not trainer.is_global_zero:
            return None
        failed = [a for _, a in shares if isinstance(a, str)]
        if failed:
            log.error("step %d: %s failed: %s", step, bench.result_name, failed[0])
            return None
        predictions = [""] * len(bench.samples)
        for indices, share in shares:
            for i, answer in zip(indices, share, strict=True):
                predictions[i] = answer
        settings = eval_settings(bench, tokens, self.cfg.eval.batch_size, options) | {"step": step}
        result = score(bench, predictions, settings, options)
        folder = eval_dir_of(self.run) / f"step-{step}"
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / f"{result.benchmark}.json", json.dumps(result.to_json(), indent=1))
        return result

    def _answering_model(self, trainer: L.Trainer, pl_module: L.LightningModule) -> torch.nn.Module | None:
        """FSDP: the full weights gathered (every rank) into rank 0's answering copy; None elsewhere."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(
            pl_module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if not trainer.is_global_zero:
            return None
        if self._answering is None:
            self._answering = _copy_of(pl_module).to(pl_module.device)
        self._answering.load_state_dict(state, strict=True)
        return self._answering


def _copy_of(pl_module: L.LightningModule) -> torch.nn.Module:
    """An unsharded model of the module's config, adapters included, in its trainable / frozen dtypes."""
    from fvl.models import build_model, set_trainable
    from fvl.train.adapters import apply_lora

    cfg = pl_module.cfg
    model = build_model(cfg.model)
    if cfg.train.lora.enabled:
        apply_lora(model, cfg.train.lora)
    set_trainable(model, cfg.stage.trainable, llm_adapters_only=cfg.train.lora.enabled)
    return model.requires_grad_(False).eval()


def _gather(trainer: L.Trainer, obj: Any) -> list[Any]:
    """Every rank's ``obj`` on every rank (a list in rank order); one rank: ``[obj]``."""
    if trainer.world_size == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * trainer.world_size
    dist.all_gather_object(out, obj)
    return out


def _steps_logged(logger: Any) -> list[int]:
    """Steps at which the run's MLflow record already has an evaluation (a resumed run's earlier life)."""
    run_id = getattr(logger, "run_id", None)
    if not run_id:
        return []
    try:
        return [m.step for m in logger.experiment.get_metric_history(run_id, SECONDS_KEY)]
    except Exception as e:  # noqa: BLE001 - a store that cannot answer: the checkpoint's record remains
        log.warning("could not read the run's earlier evaluations from MLflow: %s", e)
        return []


def eval_dir_of(run: RunDir) -> Path:
    """Where a run's evaluations during training are written, one folder ``step-N`` per evaluation."""
    return run.eval_dir / "during_training"
