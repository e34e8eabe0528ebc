"""Where a training step's time goes, logged as peers log it: ``time/data_wait_ms`` (waiting for the next
batch), ``time/vision_ms`` (the tower and the fusion; absent when a feature cache stands in for them),
``time/forward_backward_ms`` (all of
forward and backward, the image path included) and ``time/optimizer_ms``, per optimizer step, averaged over
each logging interval.

On a GPU the marks are CUDA events, read once per interval (one sync per interval, none per step); on a
CPU they are clock readings.
"""

from __future__ import annotations

import time
from collections import defaultdict

import lightning as L
import torch


class _Clock:
    """Marks that can be differenced later: CUDA events on a GPU, perf_counter readings otherwise."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start, end) -> float:
        if not self.cuda:
            return (end - start) * 1000.0
        end.synchronize()
        return start.elapsed_time(end)


class StepTimes(L.Callback):
    """Logs the step-time breakdown (see the module docstring) every ``trainer.log_every_n_steps`` steps."""

    def __init__(self) -> None:
        self.clock: _Clock | None = None
        self.pending: list[tuple[str, object, object]] = []
        self.marks: dict[str, object] = {}
        self._vision_hooks: list = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.clock = _Clock(pl_module.device.type == "cuda")
        model = getattr(pl_module, "model", None)
        if model is not None and hasattr(model, "fuse_images"):
            self._wrap_vision(model)

    def _wrap_vision(self, model) -> None:
        # fuse_images is the tower and the fusion (what a feature cache skips); wrapping the bound method keeps
        # the model's code free of timing concerns.
        original = model.fuse_images

        def timed(pixel_values):
            start = self.clock.mark()
            out = original(pixel_values)
            if model.training:
                self.pending.append(("vision", start, self.clock.mark()))
            return out

        model.fuse_images = timed
        self._vision_hooks.append((model, original))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for model, original in self._vision_hooks:
            model.fuse_images = original
        self._vision_hooks.clear()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = self.clock.mark()
        if "batch_end" in self.marks:
            self.pending.append(("data_wait", self.marks.pop("batch_end"), now))
        self.marks.setdefault("step_start", now)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        now = self.clock.mark()
        self.pending.append(("forward_backward", self.marks.pop("step_start", now), now))
        self.marks["optimizer_start"] = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = self.clock.mark()
        self.marks["batch_end"] = now
        if "optimizer_start" not in self.marks:
            return  # an accumulating micro batch: the step goes on
        self.pending.append(("optimizer", self.marks.pop("optimizer_start"), now))
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            self._log(trainer, pl_module)

    def _log(self, trainer, pl_module) -> None:
        totals: dict[str, float] = defaultdict(float)
        for name, start, end in self.pending:
            totals[name] += self.clock.ms(start, end)
        steps = max(1, sum(1 for name, _, _ in self.pending if name == "optimizer"))
        self.pending.clear()
        for name, ms in totals.items():
            pl_module.log(f"time/{name}_ms", ms / steps, rank_zero_only=True)
