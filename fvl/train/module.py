"""The LightningModule that runs a stage. What a stage trains is data (``cfg.stage.trainable``), so one
module runs every shipped stage; a stage whose step differs (e.g. another loss) registers its own subclass
in ``STAGE_MODULES`` and names it in ``stage.module``.
"""

from __future__ import annotations

import logging
import time

import lightning as L
import torch
from omegaconf import DictConfig

from fvl.config import ExperimentConfig, as_experiment
from fvl.data.reader import STREAM_SKIP_REASONS
from fvl.models import build_model, load_model_weights, set_trainable
from fvl.registry import Registry
from fvl.train.adapters import apply_lora
from fvl.train.optim import build_optimizer, build_scheduler
from fvl.train.strategy import is_sharded, local, shard_model

log = logging.getLogger(__name__)


class FVLModule(L.LightningModule):
    """The model of ``cfg.model`` with the stage's trainable set, its optimisation and its step logging."""

    def __init__(self, cfg: ExperimentConfig | DictConfig, init_weights: str | None = None) -> None:
        super().__init__()
        self.cfg = cfg = as_experiment(cfg)
        self.model = build_model(cfg.model)
        if init_weights:
            load_model_weights(self.model, init_weights)
            log.info("initialised from %s", init_weights)
        if cfg.train.lora.enabled:
            apply_lora(self.model, cfg.train.lora)
        self.trainable_counts = set_trainable(
            self.model, cfg.stage.trainable, llm_adapters_only=cfg.train.lora.enabled, label=cfg.stage.name
        )
        # Samples the data skipped, by reason: this rank's since the last sum, and the sum over ranks so far.
        self._skipped = torch.zeros(len(STREAM_SKIP_REASONS), dtype=torch.float64)
        self.skipped: dict[str, int] = {}
        self._restored_skips = False
        self._last_time: float | None = None
        self._window = {"samples": 0, "tokens": 0}

    # ---- steps ---------------------------------------------------------------------------------------------
    def _model_inputs(self, batch: dict) -> dict:
        return {
            k: v
            for k, v in batch.items()
            if k
            in ("input_ids", "attention_mask", "labels", "pixel_values", "position_ids", "num_placeholders")
        }

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # Counts arrive as Python numbers computed on the loader's side: no host sync per step.
        for reason, count in batch.get("skipped", {}).items():
            self._skipped[STREAM_SKIP_REASONS.index(reason)] += count
        loss = self.model(self._model_inputs(batch)).loss
        n = batch["input_ids"].shape[0]
        self._window["samples"] += n
        self._window["tokens"] += (
            batch["num_tokens"] if "num_tokens" in batch else int(batch["attention_mask"].sum())
        )
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        if "padding_fraction" in batch:
            self.log("train/padding_fraction", float(batch["padding_fraction"]), rank_zero_only=True)
        return loss

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def on_train_start(self) -> None:
        # Samples a damaged shard lost are found by every rank alike at setup: count them once (and not
        # again when a resumed run restored the totals).
        dm = getattr(self.trainer, "datamodule", None)
        if self.trainer.is_global_zero and dm is not None and not self._restored_skips:
            for reason, count in getattr(dm, "setup_skips", {}).items():
                self._skipped[STREAM_SKIP_REASONS.index(reason)] += count

    def sum_skipped(self) -> dict[str, float]:
        """Add every rank's skip counts into ``skipped`` (one small collective: every rank calls it at the
        same step) and return the metrics to log: ``data/skipped/<reason>`` and ``train/skipped_samples``."""
        counts = self._skipped.to(self.device, torch.float32)
        if self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        self._skipped.zero_()
        for reason, count in zip(STREAM_SKIP_REASONS, counts.tolist(), strict=True):
            if count:
                self.skipped[reason] = self.skipped.get(reason, 0) + int(round(count))
        metrics = {f"data/skipped/{r}": float(c) for r, c in self.skipped.items()}
        metrics["train/skipped_samples"] = float(self.skipped_total)
        return metrics

    def on_train_end(self) -> None:
        metrics = self.sum_skipped()  # self.log is closed here: write through the logger
        if self.trainer.is_global_zero and self.logger is not None:
            self.logger.log_metrics(metrics, step=self.trainer.global_step)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Every rank builds the checkpoint, so the sum is a matching collective; a resume continues the totals.
        self.sum_skipped()
        checkpoint["fvl_skipped"] = dict(self.skipped)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped = dict(checkpoint.get("fvl_skipped", {}))
        self._restored_skips = "fvl_skipped" in checkpoint

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Throughput per optimizer step, over the whole world (samples / tokens per second).
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches:
            return
        now = time.perf_counter()
        if self._last_time is not None:
            dt = now - self._last_time
            world = self.trainer.world_size
            self.log("train/samples_per_s", self._window["samples"] * world / dt, rank_zero_only=True)
            self.log("train/tokens_per_s", self._window["tokens"] * world / dt, rank_zero_only=True)
        self._last_time = now
        self._window = {"samples": 0, "tokens": 0}
        # Every parameter group's LR (stage 1's vision LR differs); train/lr is the projector + LLM group's.
        groups = self.trainer.optimizers[0].param_groups
        for group in groups:
            self.log(f"train/lr/{group.get('name', 'group')}", group["lr"], rank_zero_only=True)
        main = next((g for g in groups if not str(g.get("name", "")).startswith("vision")), groups[0])
        self.log("train/lr", main["lr"], rank_zero_only=True)
        if self.trainer.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            for key, value in self.sum_skipped().items():
                self.log(key, value, rank_zero_only=True)

    def on_before_optimizer_step(self, optimizer) -> None:
        # The total gradient norm as one device tensor (no sync per parameter). Sharded strategies (FSDP,
        # DeepSpeed 3) hold a slice of each gradient per rank: their squared sums add up over ranks.
        grads = [local(p.grad) for p in self.model.parameters() if p.grad is not None]
        squares = [g.detach().float().pow(2).sum() for g in grads]
        if not squares:
            return
        total = torch.stack(squares).sum()
        if is_sharded(self.trainer.strategy):
            total = self.trainer.strategy.reduce(total, reduce_op="sum")
        self.log("train/grad_norm", total.sqrt())

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.model(self._model_inputs(batch)).loss
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=True)
        return loss

    def configure_model(self) -> None:
        """Under ``trainer.strategy=fsdp`` (Lightning's ModelParallelStrategy), shard the model with FSDP2."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if type(strategy).__name__ == "ModelParallelStrategy" and not getattr(self, "_sharded", False):
            shard_model(self.model, self.device_mesh["data_parallel"])
            self._sharded = True

    # ---- optimisation --------------------------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = build_optimizer(self.model, self.cfg.train)
        scheduler = build_scheduler(optimizer, self.cfg.train, self.cfg.trainer.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.train(mode)  # keeps frozen components in eval mode
        return self


STAGE_MODULES: Registry[FVLModule] = Registry("stage module")
STAGE_MODULES.register("default")(FVLModule)


def build_module(cfg: ExperimentConfig | DictConfig, init_weights: str | None = None) -> FVLModule:
    """The stage's module (``stage.module``) for ``cfg``, initialised from ``init_weights`` when given."""
    cfg = as_experiment(cfg)
    return STAGE_MODULES.build(cfg.stage.module, cfg, init_weights)
