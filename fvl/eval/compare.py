"""Statistics for comparing fusion variants honestly (the ``compare_fusion`` notebook uses them).

A variant is compared with a baseline (``dbfusion``) run for run: for each training seed, its per-question
scores on the synthetic test split minus the baseline's on the same questions (paired by question id). The
confidence intervals come from a two-level bootstrap: the seeds are resampled, and within each resampled
seed its questions (per group), so that they hold both the training-seed spread and the evaluation's
sampling noise. Skills differ in chance level (1/33 for ocr, 1/2 for pope), so rankings and overall
differences weigh each skill by what can be gained over chance: ``(score - chance) / (1 - chance)``.

``Records`` are the ``samples`` of an evaluation's JSON (``eval/<benchmark>.json``, ``fvl.eval.evaluate``):
``{"id", "group", "prompt", "prediction", "references", "score"}``.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

Records = Sequence[Mapping[str, Any]]
# Per seed, per group: the paired per-question differences (variant - baseline).
Differences = Mapping[Hashable, Mapping[str, np.ndarray]]
OVERALL = "normalised"  # the key of the chance-normalised mean over skills


@dataclass(frozen=True)
class Interval:
    """An estimate with its bootstrap confidence interval."""

    estimate: float
    low: float
    high: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


def launch_time(sweep_id: str) -> str:
    """The UTC time in a launch id (``fvl.sweep.new_sweep_id``: ``<sweep>-<time>-<hex>``); empty for
    an id of another form."""
    parts = sweep_id.rsplit("-", 2)
    return parts[1] if len(parts) == 3 and parts[1].endswith("Z") else ""


def newest_launch(launches: Mapping[str, Any]) -> str:
    """The newest of ``launches`` (launch id -> the latest start of its runs): by the time in the id, since
    a rerun's launch holds runs it reused from before; then by that start (two launches in one second)."""
    if not launches:
        raise ValueError("no sweep launch (runs tagged sweep_id) to choose from")
    return max(launches, key=lambda i: (launch_time(i), launches[i]))


def download_samples(client: Any, run_id: str, artifact: str = "eval/synthetic.json") -> list[dict[str, Any]]:
    """The per-question records an evaluation logged on MLflow run ``run_id`` (``client``: an
    ``MlflowClient``)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, artifact, tmp)
        return list(json.loads(Path(path).read_text())["samples"])


def paired_differences(variant: Records, baseline: Records) -> dict[str, np.ndarray]:
    """Per group, ``variant``'s score minus ``baseline``'s on each question both answered (paired by id,
    in the baseline's order)."""
    scores = {r["id"]: float(r["score"]) for r in variant}
    out: dict[str, list[float]] = {}
    for r in baseline:
        if r["id"] in scores:
            out.setdefault(str(r["group"]), []).append(scores[r["id"]] - float(r["score"]))
    if not out:
        raise ValueError("no question in common: were both runs evaluated on the same benchmark?")
    return {group: np.asarray(d, dtype=float) for group, d in out.items()}


def seed_differences(
    variant: Mapping[Hashable, Records], baseline: Mapping[Hashable, Records]
) -> dict[Hashable, dict[str, np.ndarray]]:
    """``paired_differences`` for each seed both were trained with (a seed only one has is left out: its
    difference would mix the variant with the seed)."""
    return {s: paired_differences(variant[s], baseline[s]) for s in variant if s in baseline}


def _statistic(per_seed_means: Mapping[str, np.ndarray], chance: Mapping[str, float] | None) -> dict:
    """Mean over seeds per group (last axis: seeds), and the chance-normalised mean over the skills that
    have a chance level."""
    out = {group: m.mean(axis=-1) for group, m in per_seed_means.items()}
    if chance:
        skills = [g for g in out if g in chance]
        if skills:
            out[OVERALL] = np.mean([out[g] / (1 - chance[g]) for g in skills], axis=0)
    return out


def mean_difference(diffs: Differences, chance: Mapping[str, float] | None = None) -> dict[str, float]:
    """Per group, the mean over seeds of each seed's mean difference; with ``chance``, also ``normalised``:
    the mean over skills of the difference in ``(score - chance) / (1 - chance)``."""
    groups = _common_groups(diffs)
    means = {g: np.array([diffs[s][g].mean() for s in diffs]) for g in groups}
    return {k: float(v) for k, v in _statistic(means, chance).items()}


def bootstrap_ci(
    diffs: Differences,
    chance: Mapping[str, float] | None = None,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Interval]:
    """Percentile intervals of ``mean_difference`` under resampling of the seeds and, within each drawn
    seed, of its questions per group (a fixed RNG: the same data give the same intervals)."""
    groups = _common_groups(diffs)
    seeds = list(diffs)
    rng = np.random.default_rng(seed)
    # Which seed fills each of the len(seeds) slots of each replicate.
    drawn = rng.integers(0, len(seeds), size=(n_boot, len(seeds)))
    means = {}
    for g in groups:
        # Every slot resamples its seed's questions afresh, even when a seed is drawn twice.
        m = np.empty((n_boot, len(seeds)))
        for i, s in enumerate(seeds):
            slots = drawn == i
            d = diffs[s][g]
            picks = rng.integers(0, len(d), size=(int(slots.sum()), len(d)))
            m[slots] = d[picks].mean(axis=1)
        means[g] = m
    replicates = _statistic(means, chance)
    estimate = mean_difference(diffs, chance)
    tail = (1 - level) / 2 * 100
    return {
        k: Interval(estimate[k], *(float(q) for q in np.percentile(v, [tail, 100 - tail])))
        for k, v in replicates.items()
    }


def _common_groups(diffs: Differences) -> list[str]:
    """The groups every seed has questions of (a group some seed lacks cannot be averaged over seeds)."""
    if not diffs:
        raise ValueError("no seed in common between the variant and the baseline")
    sets = [{g for g, d in per.items() if len(d)} for per in diffs.values()]
    common = set.intersection(*sets)
    return [g for g in diffs[next(iter(diffs))] if g in common]


def normalised_score(scores: Mapping[str, float], chance: Mapping[str, float]) -> float:
    """The mean over skills of ``(score - chance) / (1 - chance)``: 0 at chance, 1 when all is right
    (groups without a chance level, such as an overall ``score``, are ignored)."""
    skills = [g for g in scores if g in chance]
    if not skills:
        raise ValueError(f"no skill with a chance level among {sorted(scores)}")
    return float(np.mean([(scores[g] - chance[g]) / (1 - chance[g]) for g in skills]))


def ranking(
    scores: Mapping[str, Sequence[Mapping[str, float]]], chance: Mapping[str, float]
) -> list[tuple[str, float]]:
    """Variants by their mean over runs (seeds) of ``normalised_score``, best first."""
    means = {v: float(np.mean([normalised_score(r, chance) for r in runs])) for v, runs in scores.items()}
    return sorted(means.items(), key=lambda kv: kv[1], reverse=True)


# ---- the paper's findings, tested on a sweep ----------------------------------------------------------------
@dataclass(frozen=True)
class Claim:
    """One of the paper's findings as a paired comparison: ``variant`` minus ``baseline`` on ``skill``
    (``OVERALL``: the chance-normalised mean over skills) should be ``> 0`` (``expect="higher"``), ``< 0``
    (``"lower"``) or not below 0 (``"not_lower"``: "at least as good")."""

    text: str
    variant: str
    baseline: str
    skill: str
    expect: str


# The paper's fusion findings (Florence-VL, Tables 1 and 4-6) in the sweep's variant names.
PAPER_CLAIMS = (
    Claim("DBFusion is at least as good as token concat", "dbfusion", "token_concat", OVERALL, "not_lower"),
    Claim("DBFusion is above average pooling", "dbfusion", "avg_pool", OVERALL, "higher"),
    Claim("token concat is above average pooling", "token_concat", "avg_pool", OVERALL, "higher"),
    Claim("removing the OCR feature hurts OCR", "minus_ocr", "dbfusion", "ocr", "lower"),
    Claim(
        "removing the grounding feature hurts position", "minus_grounding", "dbfusion", "position", "lower"
    ),
)


@dataclass(frozen=True)
class Finding:
    claim: Claim
    interval: Interval | None  # variant - baseline, 95 % (None: the sweep lacks a variant or the skill)
    seeds: int
    verdict: str  # reproduced | not resolved | contradicted | not measured
    # for a claim on one skill: the baseline's own score on it, and the skill's chance level. An ablation
    # can only hurt a skill the baseline has learned: when this interval is not above chance, there is
    # nothing to remove, and a "not resolved" says nothing about the feature.
    baseline_score: Interval | None = None
    chance: float | None = None

    @property
    def sentence(self) -> str:
        c, i = self.claim, self.interval
        what = "the chance-normalised mean over skills" if c.skill == OVERALL else f"{c.skill}"
        if i is None:
            return f"{c.text}: not measured (the sweep has no {c.variant} or {c.baseline} scores on {what})."
        diff = f"{c.variant} - {c.baseline} on {what} = {i.estimate:+.3f}, 95 % interval [{i.low:+.3f}, {i.high:+.3f}] over {self.seeds} seeds"
        meaning = {
            "reproduced": "reproduced at this scale",
            "not resolved": "not resolved at this scale: the interval holds 0",
            "contradicted": "contradicted at this scale",
        }[self.verdict]
        if c.expect == "not_lower" and self.verdict == "reproduced" and i.low <= 0:
            meaning = "reproduced at this scale (no loss resolved; the interval holds 0)"
        if i.low == i.high == 0:  # not a small effect: no effect can show
            meaning = (
                f"not resolved at this scale: both variants give the same answer to every {what} question in "
                "every seed (the skill is not learned at this budget)"
            )
        unlearned = ""
        if self.baseline_score is not None and self.chance is not None:
            b = self.baseline_score
            if b.low <= self.chance:
                unlearned = (
                    f"; {c.baseline} itself scores {b.estimate:.2f} [{b.low:.2f}, {b.high:.2f}] on {what}, "
                    f"not above chance ({self.chance:.2f}): the skill is not learned at this budget, so the "
                    "ablation has nothing to remove"
                )
        return f"{c.text}: {meaning} ({diff}){unlearned}."


def verdict(interval: Interval, expect: str) -> str:
    """What an interval of ``variant - baseline`` says of a claim: ``higher`` holds when the whole interval
    is above 0, ``lower`` when it is below, ``not_lower`` unless it is below; ``contradicted`` when the
    interval lies wholly on the other side; ``not resolved`` otherwise."""
    if expect == "higher":
        return "reproduced" if interval.low > 0 else "contradicted" if interval.high < 0 else "not resolved"
    if expect == "lower":
        return "reproduced" if interval.high < 0 else "contradicted" if interval.low > 0 else "not resolved"
    if expect == "not_lower":
        return "contradicted" if interval.high < 0 else "reproduced"
    raise ValueError(f"expect={expect!r}: higher, lower or not_lower")


def paper_findings(
    records: Mapping[str, Mapping[Hashable, Records]],
    chance: Mapping[str, float],
    claims: Sequence[Claim] = PAPER_CLAIMS,
    n_boot: int = 2000,
) -> list[Finding]:
    """Each claim tested on a sweep's evaluations: ``records[variant][seed]`` are a run's per-question
    records. The interval is ``bootstrap_ci``'s (seeds and questions resampled, paired by seed and
    question)."""
    out = []
    baseline_scores: dict[str, dict[str, Interval]] = {}  # per baseline, shared by its claims
    for claim in claims:
        mine, theirs = records.get(claim.variant, {}), records.get(claim.baseline, {})
        diffs = seed_differences(mine, theirs) if mine and theirs else {}
        intervals = bootstrap_ci(diffs, chance, n_boot=n_boot) if diffs else {}
        interval = intervals.get(claim.skill)
        baseline = None
        if theirs and claim.skill in chance:
            if claim.baseline not in baseline_scores:
                baseline_scores[claim.baseline] = score_intervals(theirs, n_boot)
            baseline = baseline_scores[claim.baseline].get(claim.skill)
        out.append(
            Finding(
                claim,
                interval,
                len(diffs),
                verdict(interval, claim.expect) if interval else "not measured",
                baseline,
                chance.get(claim.skill),
            )  # fmt: skip
        )
    return out


def score_intervals(per_seed: Mapping[Hashable, Records], n_boot: int = 2000) -> dict[str, Interval]:
    """Per group, a variant's mean score over its seeds (``per_seed[seed]``: a run's per-question records)
    with the 95 % bootstrap interval that resamples the seeds and, within each, the questions."""
    scores: dict[Hashable, dict[str, np.ndarray]] = {}
    for seed, records in per_seed.items():
        groups: dict[str, list[float]] = {}
        for r in records:
            groups.setdefault(str(r["group"]), []).append(float(r["score"]))
        scores[seed] = {g: np.asarray(v, dtype=float) for g, v in groups.items()}
    return bootstrap_ci(scores, n_boot=n_boot) if scores else {}
