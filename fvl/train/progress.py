"""Lightning's Rich progress bar, labelled for step-based runs: "Epoch 1/-2" (Lightning's label when only
``max_steps`` bounds a run) becomes "epoch 1 · step budget 600"."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        description = f"epoch {current_epoch} · step budget {self.trainer.max_steps}"
        width = len(self.validation_description)
        return f"{description:{width}}" if width > len(description) else description
