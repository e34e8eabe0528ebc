"""The LightningModule that runs a stage. What a stage trains is data (``cfg.stage.trainable``), so one
module runs every shipped stage; a stage whose step differs (e.g. another loss) registers its own subclass
in ``STAGE_MODULES`` and names it in ``stage.module``.
"""

from __future__ import annotations

import logging
import time

import lightning as L
import torch

from fvl.config import ExperimentConfig
from fvl.data.reader import STREAM_SKIP_REASONS
from fvl.models import build_model, load_model_weights, set_trainable
from fvl.models.flops import FlopCounter, peak_tflops
from fvl.train.adapters import apply_lora
from fvl.train.optim import build_optimizer, build_scheduler
from fvl.train.strategy import ModelParallelStrategy, is_sharded, local, shard_model
from fvl.util.registry import Registry

log = logging.getLogger(__name__)


# What a batch holds for the model (the rest - ids, counts - is for logging).
MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "labels",
    "pixel_values",
    "image_features",
    "position_ids",
    "num_placeholders",
)


class FVLModule(L.LightningModule):
    """The model of ``cfg.model`` with the stage's trainable set, its optimisation and its step logging."""

    def __init__(self, cfg: ExperimentConfig, init_weights: str | None = None) -> None:
        super().__init__()
        self.cfg = cfg
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
        self._window = {"samples": 0, "tokens": 0, "flops": 0.0}
        self._flops: FlopCounter | None = None  # set at the start of training (the trainable set is final)
        self._peak_tflops: float | None = None
        # The optimizer step being accumulated: its supervised tokens over all ranks (token-weighted loss),
        # the loss parts of its micro batches so far, and the finished step's loss (``train/loss``).
        self._step_items: torch.Tensor | None = None
        self._step_parts: list[torch.Tensor] = []
        self.step_loss: torch.Tensor | None = None
        self._warned_unweighted = False
        self._stop_at_step_end = False
        self.nonfinite_skipped = 0

    # ---- steps ---------------------------------------------------------------------------------------------
    def _model_inputs(self, batch: dict) -> dict:
        return {k: v for k, v in batch.items() if k in MODEL_INPUTS}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        # Counts arrive as Python numbers computed on the loader's side: no host sync per step.
        for reason, count in batch.get("skipped", {}).items():
            self._skipped[STREAM_SKIP_REASONS.index(reason)] += count
        inputs = self._model_inputs(batch)
        weighted = self._token_weighted(batch)
        if weighted:
            if batch_idx % self.trainer.accumulate_grad_batches == 0 or self._step_items is None:
                # the step's supervised tokens on every rank: one all-reduce of a number per step
                self._step_items = self._over_ranks(float(batch["step_supervised"]), "sum")
            inputs["num_items_in_batch"] = self._step_items
        loss = self.model(inputs).loss
        if not self._finite_everywhere(loss):
            skipped = self._skip_nonfinite(batch_idx)
            self._end_of_step(batch_idx)
            return skipped
        n = batch["input_ids"].shape[0]
        self._window["samples"] += n
        self._window["tokens"] += (
            batch["num_tokens"] if "num_tokens" in batch else int(batch["attention_mask"].sum())
        )
        if self._flops is not None:
            self._window["flops"] += self._flops.batch(batch)
        self._step_parts.append(loss.detach())
        self._end_of_step(batch_idx)
        if "padding_fraction" in batch:
            self.log("train/padding_fraction", float(batch["padding_fraction"]), rank_zero_only=True)
        if weighted:
            # Lightning divides by the accumulation and DDP / FSDP average over ranks: undo both, so the step's
            # gradient is the sum over all its tokens divided by their count
            return loss * (self.trainer.accumulate_grad_batches * self.trainer.world_size)
        return loss

    def _token_weighted(self, batch: dict) -> bool:
        if self.cfg.train.loss_normalization != "step_tokens":
            return False
        if "step_supervised" not in batch:
            if not self._warned_unweighted:
                log.warning(
                    "train.loss_normalization=step_tokens: this loader does not count each step's supervised "
                    "tokens (step_supervised); each micro batch's own mean is used instead"
                )
                self._warned_unweighted = True
            return False
        return True

    def _over_ranks(self, value: torch.Tensor | float, op: str) -> torch.Tensor:
        """``value`` reduced over every rank (``sum``, ``mean``, ``min``); itself on one process."""
        value = torch.as_tensor(value, dtype=torch.float32, device=self.device)
        return self.trainer.strategy.reduce(value, reduce_op=op) if self.trainer.world_size > 1 else value

    def _end_of_step(self, batch_idx: int) -> None:
        """At the step's last micro batch: ``step_loss``, the step's loss over all ranks (token-weighted: the
        sum of the parts; per micro batch: their mean), logged as ``train/loss``."""
        if not self._at_step_end(batch_idx):
            return
        parts = torch.stack(self._step_parts) if self._step_parts else torch.zeros(1, device=self.device)
        # token-weighted, each part is (its tokens' loss sum) / (the step's tokens on all ranks): add them all;
        # per micro batch, average the micro batches' means
        weighted = self._step_items is not None
        value = self._over_ranks(parts.sum(), "sum") if weighted else self._over_ranks(parts.mean(), "mean")
        self.step_loss = value.detach().float()
        self.log("train/loss", self.step_loss, prog_bar=True, rank_zero_only=True)
        self._step_parts = []
        self._step_items = None

    def _finite_everywhere(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every rank (ranks must agree, or DDP waits forever for a backward
        that one rank skipped): one host sync, plus one small collective with several ranks."""
        return bool(self._over_ranks(torch.isfinite(loss.detach()).float(), "min"))

    def _skip_nonfinite(self, batch_idx: int) -> None:
        self.nonfinite_skipped += 1
        where = f"step {self.trainer.global_step}, micro batch {batch_idx}"
        if self.cfg.train.nonfinite_loss == "stop":
            raise FloatingPointError(
                f"non-finite loss at {where} (train.nonfinite_loss=stop): lower train.lr, check the data, or "
                "set train.nonfinite_loss=skip; resume=last continues from the last checkpoint"
            )
        log.warning("non-finite loss at %s: micro batch skipped (%d so far)", where, self.nonfinite_skipped)
        self.log("train/nonfinite_skipped", float(self.nonfinite_skipped), rank_zero_only=True)
        return None  # Lightning runs no backward for it: the weights never see it

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def on_train_start(self) -> None:
        try:  # every rank: counting the tower's FLOPs runs it once (a collective under FSDP)
            self._flops = FlopCounter.of(self.model, cached_features=bool(self.cfg.data.feature_cache))
            self._peak_tflops = peak_tflops(self.device)
        except Exception as e:  # noqa: BLE001 - a metric must never stop training
            log.warning("train/mfu and train/tflops_per_s are off: counting the model's FLOPs failed: %s", e)
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
        if self.nonfinite_skipped:
            metrics["train/nonfinite_skipped"] = float(self.nonfinite_skipped)
        if self.trainer.is_global_zero and self.logger is not None:
            self.logger.log_metrics(metrics, step=self.trainer.global_step)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Every rank builds the checkpoint, so the sum is a matching collective; a resume continues the totals.
        self.sum_skipped()
        checkpoint["fvl_skipped"] = dict(self.skipped)
        checkpoint["fvl_nonfinite_skipped"] = self.nonfinite_skipped

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped = dict(checkpoint.get("fvl_skipped", {}))
        self.nonfinite_skipped = int(checkpoint.get("fvl_nonfinite_skipped", 0))
        self._restored_skips = "fvl_skipped" in checkpoint

    def _at_step_end(self, batch_idx: int) -> bool:
        """Whether micro batch ``batch_idx`` ends an optimizer step (the epoch's last one ends its step too)."""
        return (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0 or (
            batch_idx + 1 >= self.trainer.num_training_batches
        )

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # A stop asked for inside an accumulation (a time limit, a callback setting ``should_stop``; the
        # callbacks' hooks run before this one) waits for the step's end: a checkpoint then never holds half
        # a step, whose accumulated gradient it could not keep, and a resume repeats the uninterrupted run.
        if not self._at_step_end(batch_idx):
            if self.trainer.should_stop:
                self.trainer.should_stop, self._stop_at_step_end = False, True
            return
        if self._stop_at_step_end:
            self.trainer.should_stop, self._stop_at_step_end = True, False
        # Throughput per optimizer step, over the whole world (samples / tokens per second).
        now = time.perf_counter()
        if self._last_time is not None:
            dt = now - self._last_time
            world = self.trainer.world_size
            self.log("train/samples_per_s", self._window["samples"] * world / dt, rank_zero_only=True)
            self.log("train/tokens_per_s", self._window["tokens"] * world / dt, rank_zero_only=True)
            if self._flops is not None:  # model FLOPs (fvl.models.flops): MFU where the card's peak is known
                tflops = self._window["flops"] * world / dt / 1e12
                self.log("train/tflops_per_s", tflops, rank_zero_only=True)
                if self._peak_tflops:
                    self.log("train/mfu", tflops / (self._peak_tflops * world), rank_zero_only=True)
        self._last_time = now
        self._window = {"samples": 0, "tokens": 0, "flops": 0.0}
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
        self._grad_norm = None
        grads = [local(p.grad) for p in self.model.parameters() if p.grad is not None]
        squares = [g.detach().float().pow(2).sum() for g in grads]
        if not squares:
            return
        total = torch.stack(squares).sum()
        if is_sharded(self.trainer.strategy):
            total = self.trainer.strategy.reduce(total, reduce_op="sum")
        self._grad_norm = total.sqrt()
        self.log("train/grad_norm", self._grad_norm)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clip by the global norm that ``on_before_optimizer_step`` just computed (a device tensor: no second
        pass over the gradients, no sync), as ``torch.nn.utils.clip_grad_norm_`` would. Lightning's own
        clipping refuses fused optimizers (``train.optimizer=adamw_fused``) even under bf16, where there is
        no loss scaling for them to undo."""
        norm = getattr(self, "_grad_norm", None)
        if norm is None and not any(p.grad is not None for p in self.model.parameters()):
            return None  # nothing to clip: a skipped (non-finite) micro batch left no gradients
        if not gradient_clip_val or norm is None or gradient_clip_algorithm not in (None, "norm"):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        coef = torch.clamp(gradient_clip_val / (norm + 1e-6), max=1.0)
        grads = [local(p.grad) for p in self.model.parameters() if p.grad is not None]
        torch._foreach_mul_(grads, coef.to(grads[0].device))
        self._grad_norm = None

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.model(self._model_inputs(batch)).loss
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=True)
        return loss

    def configure_model(self) -> None:
        """Under ``trainer.strategy=fsdp`` (Lightning's ModelParallelStrategy), shard the model with FSDP2."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, ModelParallelStrategy) and not getattr(self, "_sharded", False):
            gather = self.cfg.trainer.fsdp_gather_dtype
            if gather == "bfloat16" and not str(self.trainer.precision).startswith("bf16"):
                raise ValueError(
                    f"trainer.fsdp_gather_dtype=bfloat16 needs bf16-mixed precision; this run resolved "
                    f"trainer.precision to {self.trainer.precision} (set trainer.precision=bf16-mixed)"
                )
            shard_model(
                self.model, self.device_mesh["data_parallel"], gather, self.cfg.trainer.fsdp_cpu_offload
            )
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


def build_module(cfg: ExperimentConfig, init_weights: str | None = None) -> FVLModule:
    """The stage's module (``stage.module``) for ``cfg``, initialised from ``init_weights`` when given."""
    return STAGE_MODULES.build(cfg.stage.module, cfg, init_weights)
