"""The alignment analysis written out: CSV of curves and per-seed scores, the mean/std table, the plot."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fvl.eval.align.analysis import METRICS, AlignResult

# ---- output ----------------------------------------------------------------------------------------------------


@dataclass
class AlignFiles:
    curves: Path  # align.csv: step, variant, seed, training loss
    summary: Path  # align_summary.csv: one row per variant and seed, held-out scores
    table: Path  # align_table.csv: one row per variant, mean and std over seeds
    plot: Path  # align.png

    def all(self) -> list[Path]:
        return [self.curves, self.summary, self.table, self.plot]


def format_table(result: AlignResult) -> str:
    """The mean +- std table as text, with the chance levels (what the CLI prints)."""
    b = result.batch_size
    lines = [
        f"{result.pairs} caption pairs, {result.heldout_pairs} held out, "
        f"{len(result.runs) // max(1, len(result.variants))} seed(s)"
        + (f"; skipped {result.skipped}" if result.skipped else ""),
        f"{'variant':>16} {'params':>10} {'held-out loss':>15} {'top-1':>15} {'matched>shuffled':>17}"
        f" {'train loss':>15}",
        f"{'(chance)':>16} {'':>10} {math.log(b):>15.3f} {1 / b:>15.3f} {0.5:>17.3f}",
    ]
    for row in result.table():
        cells = [f"{row[f'{m}_mean']:.3f}+-{row[f'{m}_std']:.3f}" for m in (*METRICS, "train_loss")]
        lines.append(
            f"{row['variant']:>16} {row['trainable_params']:>10} {cells[0]:>15} {cells[1]:>15} {cells[2]:>17}"
            f" {cells[3]:>15}"
        )
    return "\n".join(lines)


def write_results(result: AlignResult, out_dir: str | Path, smooth: int = 10) -> AlignFiles:
    """``align.csv``, ``align_summary.csv``, ``align_table.csv`` and ``align.png`` (training curves, and the
    held-out loss per variant with its std over seeds)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = AlignFiles(
        out / "align.csv", out / "align_summary.csv", out / "align_table.csv", out / "align.png"
    )
    with open(files.curves, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "variant", "seed", "loss"])
        for r in result.runs:
            w.writerows([i, r.variant, r.seed, f"{v:.6f}"] for i, v in enumerate(r.train_loss))
    with open(files.summary, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "seed", *METRICS, "trainable_params"])
        for r in result.runs:
            w.writerow([r.variant, r.seed, *(f"{getattr(r, m):.6f}" for m in METRICS), r.trainable_params])
    rows = result.table()
    with open(files.table, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()} for row in rows)
    _plot(result, files.plot, smooth)
    return files


def _smoothed(values: list[float], k: int) -> tuple[list[int], list[float]]:
    """A running mean over ``k`` steps, plotted at each window's last step."""
    k = max(1, min(k, len(values)))
    means = nn.functional.avg_pool1d(torch.tensor(values)[None, None], k, stride=1).flatten()
    return list(range(k - 1, len(values))), means.tolist()


def _plot(result: AlignResult, path: Path, smooth: int) -> None:
    from fvl.util.extras import pyplot

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label, curve in result.mean_curves().items():
        left.plot(*_smoothed(curve, smooth), label=label)
    left.set_xlabel("step")
    left.set_ylabel("training loss (mean over seeds)")
    left.set_title("Training pairs (in-sample)")
    left.legend(fontsize=7)
    rows = result.table()
    right.bar(
        [r["variant"] for r in rows],
        [r["heldout_loss_mean"] for r in rows],
        yerr=[r["heldout_loss_std"] for r in rows],
        capsize=3,
    )
    right.axhline(math.log(result.batch_size), color="grey", linestyle="--", label="chance")
    right.set_ylabel("held-out alignment loss (lower is better)")
    right.set_title(f"Held-out pairs ({result.heldout_pairs}), mean +- std over seeds")
    right.tick_params(axis="x", labelrotation=45, labelsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
