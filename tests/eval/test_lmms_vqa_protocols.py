"""VQA accuracy under each lmms-eval release's scoring (``protocol``), against the outputs of the releases' own
``vqav2_process_results`` / ``textvqa_process_results`` recorded in lmms_eval_vqa_protocol_cases.json, and
the protocol's way through the benchmarks, ``EvalConfig`` and ``evaluate``'s recorded settings."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fvl.config.eval import VQA_PROTOCOLS, EvalConfig
from fvl.eval.benchmarks import load_parquet, score
from fvl.eval.evaluate import evaluate
from fvl.eval.metrics import VQAAccuracy, vqa_score

CASES = json.loads((Path(__file__).parent / "lmms_eval_vqa_protocol_cases.json").read_text())
# each protocol and the releases whose own functions it reproduces
RELEASES = {
    "lmms-eval-0.3.0": ["0.2.4", "0.3.0"],
    "lmms-eval-0.3.5": ["0.3.5", "0.4.0"],
    "lmms-eval-0.5.0": ["0.5.0", "0.6.1", "0.7.3"],
}


def test_the_cases_come_from_every_release_named():
    assert "lmms_eval-<version>-py3-none-any.whl" in CASES["source"]
    assert sorted(CASES["sha256"]) == sorted(v for vs in RELEASES.values() for v in vs)
    assert set(RELEASES) == set(VQA_PROTOCOLS)


@pytest.mark.parametrize("protocol", list(RELEASES))
def test_each_protocol_gives_its_releases_scores(protocol):
    for case in CASES["cases"]:
        for mode in ("vqav2", "textvqa"):
            got = vqa_score(case["prediction"], case["references"], mode, protocol)
            for release in RELEASES[protocol]:
                assert got == case[mode][release], (mode, release, case["prediction"], case["references"][:2])


def test_the_protocols_differ_on_the_recorded_cases():
    differ = [c for c in CASES["cases"] if len({v for v in c["vqav2"].values()}) > 1]
    assert len(differ) >= 40
    for releases in RELEASES.values():  # releases of one protocol agree everywhere
        assert all(len({c["vqav2"][r] for r in releases}) == 1 for c in CASES["cases"])
    # TextVQA's scoring is the same in every release
    assert all(len(set(c["textvqa"].values())) == 1 for c in CASES["cases"])


@pytest.mark.parametrize(
    ("prediction", "references", "expected"),
    [
        ("two", ["Two"] * 10, (0.0, 0.0, 1.0)),  # 0.5.0 normalises agreeing references too
        ("Yes", ["yes"] * 10, (1.0, 0.0, 1.0)),  # 0.3.5 compares the raw prediction
        ("yes,", ["yes"] * 10, (1.0, 0.0, 1.0)),
        ("Two", ["Two"] * 10, (0.0, 1.0, 1.0)),  # 0.3.0 compares its normalised "2" with the raw "Two"
        ("it's red", ["red"] * 5 + ["it's red"] * 5, (0.0, 1.0, 1.0)),  # 0.3.0 splits off "'s" first
        ("Two", ["Two"] * 9 + ["2"], (1.0, 1.0, 1.0)),  # references that differ: normalised in all
    ],
)
def test_where_the_protocols_part(prediction, references, expected):
    assert tuple(vqa_score(prediction, references, "vqav2", p) for p in RELEASES) == expected
    case = next(c for c in CASES["cases"] if c["prediction"] == prediction and c["references"] == references)
    assert tuple(case["vqav2"][r[0]] for r in RELEASES.values()) == expected  # as the releases scored them


def test_metric_takes_the_protocol_and_current_is_the_latest():
    metric = VQAAccuracy(protocol="current")
    assert metric.protocol == "lmms-eval-0.5.0"
    metric.update(["two", "Yes"], [["Two"] * 10, ["yes"] * 10])
    assert float(metric.compute()) == 1.0
    paper = VQAAccuracy()
    paper.update(["two", "Yes"], [["Two"] * 10, ["yes"] * 10])
    assert float(paper.compute()) == 0.5
    with pytest.raises(ValueError, match="unknown VQA protocol 'lmms-eval-0.4'.*lmms-eval-0.3.0"):
        VQAAccuracy(protocol="lmms-eval-0.4")
    with pytest.raises(ValueError, match="unknown VQA protocol"):
        vqa_score("a", ["a"], "textvqa", "0.5")


def png() -> dict:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


class Scripted:
    """A stand-in model that answers "two" to everything."""

    def eval(self):
        return self

    def generate(self, images, prompts, max_new_tokens=16):
        return ["two"] * len(prompts)


def test_protocol_reaches_vqav2_scores_and_the_recorded_settings(tmp_path):
    rows = [
        {"image": png(), "question_id": i, "question": "how many?", "answers": ["Two"] * 10} for i in range(2)
    ]
    path = tmp_path / "vqav2.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    bench = load_parquet("vqav2", path)
    assert score("vqav2", bench.samples[0], " two ") == 0.0
    assert score("vqav2", bench.samples[0], " two ", vqa_protocol="lmms-eval-0.5.0") == 1.0
    with pytest.raises(ValueError, match="vqa_protocol must be one of"):
        score("vqav2", bench.samples[0], "two", vqa_protocol="lmms-eval-9")
    for cfg, expected in ((EvalConfig(), 0.0), (EvalConfig(vqa_protocol="current"), 1.0)):
        result = evaluate(Scripted(), bench, progress=False, protocol=cfg.protocol())
        assert result.aggregate["score"] == expected
        assert result.settings["vqa_protocol"] == cfg.vqa_protocol
    assert EvalConfig(vqa_protocol="current").vqa_protocol == "lmms-eval-0.5.0"
    with pytest.raises(ValueError, match="unknown VQA protocol"):
        EvalConfig(vqa_protocol="latest")
    # TextVQA's scoring did not change, so the option is not TextVQA's (nor recorded for it)
    text = load_parquet("textvqa", path)
    assert (
        "vqa_protocol"
        not in evaluate(Scripted(), text, progress=False, protocol=EvalConfig().protocol()).settings
    )
