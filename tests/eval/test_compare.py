"""The comparison statistics on fixed data with known answers."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from fvl.eval.compare import (
    OVERALL,
    bootstrap_ci,
    download_samples,
    launch_time,
    mean_difference,
    newest_launch,
    normalised_score,
    paired_differences,
    ranking,
    seed_differences,
)

CHANCE = {"a": 0.5, "b": 0.25}


def records(scores: dict[str, list[float]], prefix: str = "q") -> list[dict]:
    """Evaluation records: ``scores[group][i]`` is question ``<prefix>-<group>-<i>``'s score."""
    return [
        {"id": f"{prefix}-{g}-{i}", "group": g, "prompt": "?", "prediction": "", "references": [], "score": s}
        for g, values in scores.items()
        for i, s in enumerate(values)
    ]


def half_right(n: int, shift: int = 0) -> list[float]:
    return [float((i + shift) % 2) for i in range(n)]


def test_pairs_by_question_id_whatever_the_order():
    base = records({"a": [1, 0, 1], "b": [0, 0]})
    variant = list(reversed(records({"a": [1, 1, 1], "b": [1, 0]})))
    diffs = paired_differences(variant, base)
    assert diffs["a"].tolist() == [0, 1, 0] and diffs["b"].tolist() == [1, 0]
    extra = variant + records({"a": [1]}, prefix="other")  # a question the baseline lacks: left out
    assert paired_differences(extra, base)["a"].tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="no question in common"):
        paired_differences(records({"a": [1]}, prefix="x"), base)


def test_identical_variants_differ_by_zero_with_an_interval_around_it():
    runs = {s: records({"a": half_right(50, s), "b": half_right(40)}) for s in range(3)}
    diffs = seed_differences(runs, runs)
    assert mean_difference(diffs, CHANCE) == {"a": 0.0, "b": 0.0, OVERALL: 0.0}
    for interval in bootstrap_ci(diffs, CHANCE, n_boot=500).values():
        assert interval.contains(0.0) and interval.estimate == 0.0


def test_a_variant_better_on_every_question_has_an_interval_above_zero():
    base = {s: records({"a": [0.0] * 30, "b": half_right(30)}) for s in range(2)}
    better = {s: records({"a": [1.0] * 30, "b": [1.0] * 30}) for s in range(2)}
    diffs = seed_differences(better, base)
    ci = bootstrap_ci(diffs, CHANCE, n_boot=500)
    assert ci["a"] == pytest.approx(type(ci["a"])(1.0, 1.0, 1.0))
    assert ci["b"].low > 0 and ci["b"].estimate == pytest.approx(0.5)
    # normalised: 1 / (1 - 0.5) for a, 0.5 / (1 - 0.25) for b, averaged
    assert ci[OVERALL].estimate == pytest.approx((2 + 0.5 / 0.75) / 2) and ci[OVERALL].low > 0


def test_interval_width_matches_sampling_noise():
    """p = 0.5 on 100 questions: standard error 0.05, so a 95 % half-width of 1.96 * 0.05 = 9.8 points;
    four seeds of 100 questions halve it (about 5 points). Identical seeds add no seed spread."""
    base = {s: records({"a": [0.0] * 100}) for s in range(4)}
    variant = {s: records({"a": half_right(100)}) for s in range(4)}
    for seeds, expected in ((1, 1.96 * math.sqrt(0.25 / 100)), (4, 1.96 * math.sqrt(0.25 / 400))):
        diffs = seed_differences({s: variant[s] for s in range(seeds)}, base)
        ci = bootstrap_ci(diffs, n_boot=4000)["a"]
        assert ci.estimate == 0.5
        assert (ci.high - ci.low) / 2 == pytest.approx(expected, rel=0.15)
    assert bootstrap_ci(diffs, n_boot=300) == bootstrap_ci(diffs, n_boot=300)  # a fixed RNG


def test_seed_spread_widens_the_interval():
    """Seeds that disagree (one +0.4, one -0.4 on every question) give an interval that spans both."""
    base = {s: records({"a": [0.5] * 50}) for s in range(2)}
    variant = {0: records({"a": [0.9] * 50}), 1: records({"a": [0.1] * 50})}
    ci = bootstrap_ci(seed_differences(variant, base), n_boot=1000)["a"]
    assert ci.estimate == pytest.approx(0.0)
    assert ci.low == pytest.approx(-0.4) and ci.high == pytest.approx(0.4)


def test_only_seeds_both_have_are_paired():
    base = {0: records({"a": [0.0]}), 1: records({"a": [0.0]})}
    variant = {1: records({"a": [1.0]}), 2: records({"a": [1.0]})}
    assert list(seed_differences(variant, base)) == [1]
    with pytest.raises(ValueError, match="no seed in common"):
        mean_difference(seed_differences({3: records({"a": [1.0]})}, base))


def test_ranking_normalises_each_skill_by_its_chance():
    # raw means favour x (0.55 vs 0.45) but x is at chance on both skills; y is above chance on b
    scores = {"x": [{"a": 0.5, "b": 0.25, "score": 0.55}], "y": [{"a": 0.4, "b": 0.5, "score": 0.45}]}
    assert normalised_score(scores["x"][0], CHANCE) == 0.0
    assert normalised_score(scores["y"][0], CHANCE) == pytest.approx(((0.4 - 0.5) / 0.5 + 0.25 / 0.75) / 2)
    assert [v for v, _ in ranking(scores, CHANCE)] == ["y", "x"]
    assert normalised_score({"a": 1.0, "b": 1.0}, CHANCE) == 1.0


def test_download_samples_reads_the_evaluation_json(tmp_path):
    def download(run_id, artifact, dst):
        path = tmp_path / "synthetic.json"
        path.write_text(json.dumps({"benchmark": "synthetic", "samples": records({"a": [1.0]})}))
        assert (run_id, artifact) == ("r1", "eval/synthetic.json")
        return str(path)

    samples = download_samples(SimpleNamespace(download_artifacts=download), "r1")
    assert [s["id"] for s in samples] == ["q-a-0"]
    assert np.isclose(samples[0]["score"], 1.0)


def test_the_newest_launch_goes_by_the_time_in_its_id():
    from fvl.sweep.runner import new_sweep_id

    assert launch_time(new_sweep_id("my-sweep")).endswith("Z") and launch_time("no-time") == ""
    old, new = "my-sweep-20250101T000000Z-aaaaaa", "my-sweep-20250102T000000Z-000000"
    # a rerun's launch reuses runs that started before the older launch's: the id's time decides
    assert newest_launch({old: 200.0, new: 100.0}) == new
    tie = "my-sweep-20250102T000000Z-ffffff"
    assert newest_launch({new: 100.0, tie: 300.0}) == tie  # the same second: the latest start
    with pytest.raises(ValueError, match="no sweep launch"):
        newest_launch({})


def test_the_paper_s_findings_are_judged_by_their_intervals():
    from fvl.eval.compare import PAPER_CLAIMS, Interval, paper_findings, verdict

    chance = {"ocr": 0.1, "position": 0.5, "colour": 0.2}
    rng = np.random.default_rng(0)

    def run(ocr: float, position: float, colour: float) -> list[dict]:
        draw = lambda p: [float(x) for x in rng.random(200) < p]  # noqa: E731
        return records({"ocr": draw(ocr), "position": draw(position), "colour": draw(colour)})

    seeds = (0, 1, 2)
    sweep = {
        "dbfusion": {s: run(0.6, 0.8, 0.9) for s in seeds},
        "token_concat": {s: run(0.6, 0.8, 0.9) for s in seeds},  # the same skill: no difference
        "avg_pool": {s: run(0.2, 0.55, 0.4) for s in seeds},  # clearly worse
        "minus_ocr": {s: run(0.1, 0.8, 0.9) for s in seeds},  # loses OCR only
        # no minus_grounding runs
    }
    found = {f.claim.text: f for f in paper_findings(sweep, chance, n_boot=500)}
    assert [f.claim for f in found.values()] == list(PAPER_CLAIMS)
    same = found["DBFusion is at least as good as token concat"]
    assert same.verdict == "reproduced" and same.interval.contains(0.0) and same.seeds == 3
    assert "no loss resolved" in same.sentence and "[" in same.sentence
    assert found["DBFusion is above average pooling"].verdict == "reproduced"
    assert found["token concat is above average pooling"].interval.low > 0
    ocr = found["removing the OCR feature hurts OCR"]
    assert ocr.verdict == "reproduced" and ocr.interval.high < 0 and "ocr" in ocr.sentence
    assert ocr.baseline_score.contains(0.6) and "not learned" not in ocr.sentence  # dbfusion learned OCR
    missing = found["removing the grounding feature hurts position"]
    assert (
        missing.verdict == "not measured" and missing.interval is None and "not measured" in missing.sentence
    )
    # a skill nobody learned: the same answers everywhere, an interval of exactly 0, said as such
    constant = {v: {s: records({"ocr": [0.0] * 50, "colour": [1.0] * 50}) for s in seeds}
                for v in ("dbfusion", "minus_ocr")}  # fmt: skip
    ocr = next(f for f in paper_findings(constant, chance, n_boot=200) if f.claim.skill == "ocr")
    assert ocr.verdict == "not resolved" and "same answer to every ocr question" in ocr.sentence
    # a baseline at chance on the skill: the sentence says that the ablation had nothing to remove
    at_chance = {v: {s: run(0.1, 0.8, 0.9) for s in seeds} for v in ("dbfusion", "minus_ocr")}
    ocr = next(f for f in paper_findings(at_chance, chance, n_boot=300) if f.claim.skill == "ocr")
    assert ocr.baseline_score.low <= 0.1 and ocr.chance == 0.1
    assert "dbfusion itself scores 0.08 [0.06, 0.10] on ocr, not above chance (0.10)" in ocr.sentence
    assert "nothing to remove" in ocr.sentence
    # the verdict of each kind of claim at each side of 0
    assert verdict(Interval(0.1, 0.05, 0.2), "higher") == "reproduced"
    assert verdict(Interval(0.0, -0.1, 0.1), "higher") == "not resolved"
    assert verdict(Interval(-0.2, -0.3, -0.1), "higher") == "contradicted"
    assert verdict(Interval(0.2, 0.1, 0.3), "lower") == "contradicted"
    assert verdict(Interval(-0.2, -0.3, -0.1), "not_lower") == "contradicted"
    with pytest.raises(ValueError, match="expect"):
        verdict(Interval(0, 0, 0), "bigger")


def test_score_intervals_cover_the_mean_over_seeds():
    from fvl.eval.compare import score_intervals

    per_seed = {0: records({"a": [1, 1, 0, 0]}), 1: records({"a": [1, 1, 1, 1]})}
    ci = score_intervals(per_seed, n_boot=500)["a"]
    assert ci.estimate == pytest.approx(0.75) and ci.low < 0.75 < ci.high and ci.low >= 0 and ci.high <= 1
    assert score_intervals({}) == {}
