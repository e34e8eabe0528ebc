"""Each public benchmark is read, prompted and scored as lmms-eval 0.3.0 does it: prompts pinned to the
text its ``doc_to_text`` gives, per-sample scores to its ``process_results``, aggregations (POPE,
MMBench CircularEval, SEED image/video, ChartQA splits) to its aggregation functions; images joined (GQA),
decoded lazily, required; test splits written as submission files; per-benchmark generation lengths."""

import io
import json
import math
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fvl.eval.benchmarks import BENCHMARKS, EvalSample, load_parquet, resolve_benchmark, score, spec
from fvl.eval.benchmarks.mmbench import can_infer
from fvl.eval.evaluate import evaluate, write_submission

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."


def png(color=(255, 0, 0)):
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), color).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def write(path, rows, row_group_size=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


class Oracle:
    """A stand-in model with scripted answers; records what it was asked."""

    def __init__(self, answers):
        self.answers, self.calls = answers, []

    def eval(self):
        return self

    def generate(self, images, prompts, max_new_tokens=16):
        self.calls.append({"n": len(prompts), "max_new_tokens": max_new_tokens, "images": images})
        return [self.answers(p) for p in prompts]


def sample(name, row):
    """The sample a one-row parquet file of ``row`` gives (with a red image)."""
    return load_parquet(name, write(_tmp / f"{name}.parquet", [{"image": png(), **row}])).samples[0]


@pytest.fixture(autouse=True)
def _tmpdir(tmp_path):
    global _tmp
    _tmp = tmp_path


# ---- prompts: the exact text lmms-eval 0.3.0's doc_to_text gives (llava: the "default" kwargs) -------------


def test_prompts_are_lmms_evals():
    assert (
        sample(
            "textvqa", {"question_id": 1, "question": "what does the NYC sign say?", "answers": ["a"] * 10}
        ).prompt
        == "What does the nyc sign say?" + SHORT
    )  # fmt: skip  (str.capitalize)
    assert sample("vqav2", {"question_id": 1, "question": "what is it?", "answers": ["a"] * 10}).prompt == (
        "what is it?" + SHORT
    )
    assert sample("vizwiz", {"question_id": "VizWiz_val_1", "question": "what is THIS?", "answers": ["a"]}
                  ).prompt == ("What is this?\nWhen the provided information is insufficient, respond with "
                               "'Unanswerable'." + SHORT)  # fmt: skip
    assert sample("pope", {"question_id": 1, "question": " Is there a dog in the image? ", "answer": "yes"}
                  ).prompt == "Is there a dog in the image?" + SHORT  # fmt: skip
    assert sample("chartqa", {"question": "What is X?", "answer": "3", "type": "human_test"}).prompt == (
        "What is X?\nAnswer the question with a single word."
    )
    for name in ("docvqa", "infovqa"):
        assert sample(name, {"questionId": 5, "question": "What date?", "answers": ["x"]}).prompt == (
            "What date?" + SHORT
        )
    mmb = {"index": 3, "question": "What is shown?", "hint": "Look closely.", "A": "cat", "B": "dog",
           "C": "bird", "D": "nan", "answer": "B", "category": "c", "L2-category": "l", "source": "s", "split": "dev"}  # fmt: skip
    assert sample("mmbench", mmb).prompt == (
        "Look closely. What is shown? There are several options:\nA. cat\nB. dog\nC. bird\n" + LETTER
    )
    assert sample("mmbench", {**mmb, "hint": None}).prompt == (
        "What is shown? There are several options:\nA. cat\nB. dog\nC. bird\n" + LETTER
    )
    assert sample("mmbench", {**mmb, "hint": float("nan"), "D": None}).prompt.startswith(
        "What is shown? There"
    )
    seed = {"question_id": "1", "question": "Which?", "choice_a": "p", "choice_b": "q", "choice_c": "r",
            "choice_d": "s", "answer": "B", "data_type": "image"}  # fmt: skip
    assert sample("seed", seed).prompt == "Which?\nA. p\nB. q\nC. r\nD. s" + LETTER
    assert sample("ai2d", {"question": "Which part?", "options": ["x", "y"], "answer": "1"}).prompt == (
        "Which part?\nA. x\nB. y" + LETTER
    )
    sqa = {"question": "Which?", "choices": ["x", "y", "z"], "answer": 2, "hint": "A hint."}
    assert sample("scienceqa_img", sqa).prompt == "Context: A hint.\nWhich?\nA. x\nB. y\nC. z" + LETTER
    assert sample("scienceqa_img", {**sqa, "hint": ""}).prompt == "Which?\nA. x\nB. y\nC. z" + LETTER
    # a null hint: lmms-eval 0.3.0 formats the None itself into the prompt (followed on purpose, README)
    assert sample("scienceqa_img", {**sqa, "hint": None}).prompt == "NoneWhich?\nA. x\nB. y\nC. z" + LETTER


def test_gqa_joins_its_images_and_prompts_like_lmms_eval(tmp_path):
    write(tmp_path / "gqa/testdev_balanced_images/testdev-00000-of-00001.parquet",
          [{"id": "n1", "image": png((0, 255, 0))}, {"id": "n2", "image": png((0, 0, 255))}])  # fmt: skip
    write(tmp_path / "gqa/testdev_balanced_instructions/testdev-00000-of-00001.parquet", [
        {"id": "q1", "imageId": "n2", "question": "What colour?", "answer": "blue"},
        {"id": "q2", "imageId": "n1", "question": "Is it green?", "answer": "yes"},
    ])  # fmt: skip
    bench = load_parquet("gqa", tmp_path / "gqa")
    assert [s.id for s in bench.samples] == ["q1", "q2"]
    assert bench.samples[0].prompt == "What colour?" + SHORT
    assert bench.samples[0].load_images()[0].getpixel((0, 0)) == (0, 0, 255)  # the joined image, not another
    assert bench.samples[1].load_images()[0].getpixel((0, 0)) == (0, 255, 0)
    # a question whose image is not in the image table: refused at load, naming it
    write(tmp_path / "gqa/testdev_balanced_instructions/testdev-00000-of-00001.parquet",
          [{"id": "q9", "imageId": "n404", "question": "Q?", "answer": "a"}])  # fmt: skip
    with pytest.raises(ValueError, match="1 of 1 questions have no image .*q9"):
        load_parquet("gqa", tmp_path / "gqa")
    with pytest.raises(FileNotFoundError, match="testdev_balanced_images"):
        load_parquet("gqa", tmp_path / "gqa" / "testdev_balanced_instructions")


def test_a_benchmark_row_without_an_image_fails_at_load(tmp_path):
    rows = [{"question_id": 1, "image": png(), "question": "q", "answers": ["a"]},
            {"question_id": 2, "image": None, "question": "q", "answers": ["a"]}]  # fmt: skip
    with pytest.raises(ValueError, match="textvqa: 1 of 2 questions have no image .*ids 2"):
        load_parquet("textvqa", write(tmp_path / "t.parquet", rows))
    no_column = write(tmp_path / "n.parquet", [{"question_id": 1, "question": "q", "answers": ["a"]}])
    with pytest.raises(ValueError, match="no 'image' column"):
        load_parquet("textvqa", no_column)


# ---- per-sample scores: lmms-eval's process_results ------------------------------------------------------


def test_scores_follow_each_benchmarks_rules():
    mmb = sample("mmbench", {"index": 1, "question": "Q?", "hint": None, "A": "a cat", "B": "a dog",
                             "C": "a bird", "D": None, "answer": "B", "category": "c"})  # fmt: skip
    for answer, expected in [("B", 1), ("I think B", 1), ("(B)", 1), ("B.", 1), ("The answer is B.", 1),
                             ("a dog", 1), ("The answer is A", 0), ("b", 0), ("C or D", 0), ("A", 0)]:  # fmt: skip
        assert score("mmbench", mmb, answer) == expected, answer
    assert can_infer("The answer is A", {"A": "x", "B": "y"}) is None  # "A" among 4 words: an article
    assert can_infer("It is A", {"A": "x"}) == "A"

    seed = sample("seed", {"question": "Q", "choice_a": "p", "choice_b": "q", "choice_c": "r", "choice_d": "s",
                           "answer": "B", "data_type": "image"})  # fmt: skip
    for answer, expected in [
        ("B", 1),
        ("b", 1),
        ("B. q", 1),
        ("Bicycle", 1),
        ("(B)", 0),
        ("The answer is B", 0),
    ]:
        assert score("seed", seed, answer) == expected, answer

    ai2d = sample("ai2d", {"question": "Q?", "options": ["x", "y"], "answer": "1"})
    for answer, expected in [("B", 1), ("B.", 1), ("b", 1), ("(B)", 1), ("B. y", 1), ("y", 0),
                             ("The answer is B.", 0), ("B y", 0)]:  # fmt: skip
        assert score("ai2d", ai2d, answer) == expected, answer  # the option's text does not count

    sqa = sample("scienceqa_img", {"question": "Q?", "choices": ["x", "y"], "answer": 1, "hint": ""})
    for answer, expected in [("B", 1), ("b", 1), (" B\n", 1), ("B.", 0), ("(B)", 0), ("y", 0)]:
        assert score("scienceqa_img", sqa, answer) == expected, answer

    pope = sample("pope", {"question_id": 1, "question": "Is there a dog?", "answer": "Yes"})
    for answer, expected in [
        ("yes", 1),
        ("Yes", 1),
        (" YES ", 1),
        ("Yes.", 0),
        ("Yes, there is.", 0),
        ("no", 0),
    ]:
        assert score("pope", pope, answer) == expected, answer
    assert score("pope", pope, "Yes, there is.", pope_parser="llava") == 1

    gqa = EvalSample("q", "Q", ["blue"])
    for answer, expected in [("blue", 1), ("Blue.", 1), ("bl-ue", 1), ("blue sky", 0), ("the blue", 0)]:
        assert score("gqa", gqa, answer) == expected, answer


def test_vizwiz_normalises_every_reference_as_textvqa_does():
    # all ten references identical but not normalised: VQAv2's rule compares them raw, VizWiz normalises
    refs = ["Two"] * 10
    viz, v2 = EvalSample("v", "Q", refs), EvalSample("v", "Q", refs)
    assert score("vizwiz", viz, "two") == 1.0 and score("textvqa", viz, "two") == 1.0
    assert score("vqav2", v2, "two") == 0.0  # "two" -> "2" against the raw "Two"
    assert score(
        "vizwiz", EvalSample("v", "Q", ["unanswerable"] * 3 + ["dog"] * 7), "Unanswerable"
    ) == pytest.approx(0.9)


def test_chartqa_relaxed_and_docvqa_anls():
    chart = EvalSample("c", "Q", ["100"])
    assert score("chartqa", chart, "104") == 1.0 and score("chartqa", chart, "106") == 0.0
    doc = EvalSample("d", "Q", ["1 may 2020"])
    assert score("docvqa", doc, "1 may 2021") == pytest.approx(0.9)


# ---- aggregations ----------------------------------------------------------------------------------------


def test_mmbench_circular_eval_counts_a_question_only_if_every_copy_is_right(tmp_path):
    rows = []
    for base, answers in ((1, "ABCD"), (2, "BCDA")):  # two questions, each with 3 rotated copies
        for k, ans in enumerate(answers):
            rows.append({"index": base + k * 1_000_000, "image": png(), "question": f"Q{base}", "hint": None,
                         "A": "w", "B": "x", "C": "y", "D": "z", "answer": ans, "category": f"cat{base}"})  # fmt: skip
    bench = load_parquet("mmbench", write(tmp_path / "mmb.parquet", rows))
    truth = {int(s.fields["index"]): s.references[0] for s in bench.samples}
    wrong_once = {2_000_002}  # one copy of question 2 answered wrong
    answers = iter(
        ("none" if i in wrong_once else truth[i]) for i in (int(s.fields["index"]) for s in bench.samples)
    )
    result = evaluate(Oracle(lambda p: next(answers)), bench, progress=False)
    assert result.aggregate["score"] == 0.5  # question 1 right in all copies, question 2 not
    assert result.aggregate["row_accuracy"] == pytest.approx(7 / 8)  # what averaging rows would say
    assert result.groups["cat1"]["score"] == 1.0 and result.groups["cat2"]["score"] == 0.0


def test_pope_aggregates_as_lmms_eval_with_the_parser_recorded(tmp_path):
    rows = [{"question_id": i, "image": png(), "question": f"Is there a {o}?", "answer": a, "category": "random"}
            for i, (o, a) in enumerate([("dog", "yes"), ("cat", "no"), ("car", "yes"), ("cup", "no")])]  # fmt: skip
    bench = load_parquet("pope", write(tmp_path / "pope.parquet", rows))
    answers = {"dog": "yes", "cat": "Yes, there is.", "car": "no", "cup": "no"}
    model = Oracle(lambda p: next(v for k, v in answers.items() if k in p))
    r = evaluate(model, bench, progress=False)
    # lmms-eval: "Yes, there is." is neither yes nor no: wrong, and outside precision / recall
    assert r.aggregate == {
        "accuracy": 0.5,
        "precision": 1.0,
        "recall": 0.5,
        "f1": pytest.approx(2 / 3),
        "yes_ratio": 0.5,
    }  # fmt: skip  (yes_ratio: of the ground truth)
    assert r.settings["pope_parser"] == "lmms-eval" and model.calls[0]["max_new_tokens"] == 128
    llava = evaluate(model, bench, progress=False, protocol={"pope_parser": "llava"})
    assert llava.aggregate["accuracy"] == 0.5 and llava.aggregate["precision"] == 0.5
    assert llava.aggregate["yes_ratio"] == 0.5 and llava.settings["pope_parser"] == "llava"
    with pytest.raises(ValueError, match="pope_parser"):
        evaluate(model, bench, progress=False, protocol={"pope_parser": "other"})


def test_seed_reports_image_and_video_apart_and_chartqa_its_splits(tmp_path):
    rows = [{"question_id": str(i), "image": [png()] * (1 if t == "image" else 3), "question": "Q",
             "choice_a": "p", "choice_b": "q", "choice_c": "r", "choice_d": "s", "answer": "A", "data_type": t}
            for i, t in enumerate(["image", "image", "video", "video"])]  # fmt: skip
    bench = load_parquet("seed", write(tmp_path / "seed.parquet", rows))
    assert [len(s.image_refs) for s in bench.samples] == [1, 1, 3, 3]  # video questions carry their frames
    answers = iter(["A", "B", "A", "A"])
    model = Oracle(lambda p: next(answers))
    model.tokenizer = SimpleNamespace(image_token="<image>")
    asked = []
    generate = model.generate
    model.generate = lambda images, prompts, **kw: asked.extend(prompts) or generate(images, prompts, **kw)
    r = evaluate(model, bench, progress=False)
    assert r.aggregate == {"score": 0.5, "seed_image": 0.5, "seed_video": 1.0, "seed_all": 0.75}
    # placeholders as lmms-eval's llava writes them: one line, space-separated, for several images
    assert (
        asked[0] == bench.samples[0].prompt
        and asked[2] == "<image> <image> <image>\n" + bench.samples[2].prompt
    )
    chart = load_parquet("chartqa", write(tmp_path / "c.parquet", [
        {"image": png(), "question": "Q", "answer": "10", "type": "human_test"},
        {"image": png(), "question": "Q", "answer": "20", "type": "augmented_test"}]))  # fmt: skip
    r = evaluate(Oracle(lambda p: "10"), chart, progress=False)
    assert r.aggregate == {"relaxed_overall": 0.5, "relaxed_human_split": 1.0, "relaxed_augmented_split": 0.0}


# ---- generation lengths, lazy images, splits, submissions, batch agreement ------------------------------


def test_each_benchmark_generates_its_own_length_unless_overridden(tmp_path):
    expected = {"textvqa": 1024, "vizwiz": 1024, "mmbench": 1024, "seed": 1024, "vqav2": 16, "gqa": 16,
                "chartqa": 16, "ai2d": 16, "scienceqa_img": 16, "docvqa": 32, "infovqa": 32, "pope": 128}  # fmt: skip
    assert {name: spec(name).max_new_tokens for name in BENCHMARKS} == expected
    bench = load_parquet("docvqa", write(tmp_path / "d.parquet", [
        {"questionId": 1, "image": png(), "question": "Q", "answers": ["a"]}]))  # fmt: skip
    model = Oracle(lambda p: "a")
    assert evaluate(model, bench, progress=False).settings["max_new_tokens"] == 32
    evaluate(model, bench, max_new_tokens=7, progress=False)
    assert [c["max_new_tokens"] for c in model.calls] == [32, 7]


def test_images_are_decoded_batch_by_batch(tmp_path, monkeypatch):
    from fvl.eval.benchmarks import parquet

    rows = [{"question_id": i, "image": png(), "question": "q", "answers": ["a"]} for i in range(10)]
    rows[7]["image"] = {"bytes": b"not an image", "path": None}
    path = write(tmp_path / "t.parquet", rows, row_group_size=3)
    decoded = []
    real = parquet.decode_image
    monkeypatch.setattr(parquet, "decode_image", lambda v: decoded.append(1) or real(v))
    bench = load_parquet("textvqa", path)  # an undecodable image is only found when its batch comes
    assert decoded == []
    model = Oracle(lambda p: "a")
    with pytest.raises(ValueError, match="sample 7: cannot decode its image"):
        evaluate(model, bench, batch_size=4, progress=False)
    assert len(decoded) == 8 and [c["n"] for c in model.calls] == [4]  # batch 1 answered, batch 2 failed


def test_a_dataset_folder_gives_only_the_specs_split(tmp_path):
    for split, n in (("train", 3), ("validation", 2), ("test", 4)):
        write(tmp_path / f"textvqa/data/{split}-00000-of-00001.parquet",
              [{"question_id": i, "image": png(), "question": "q", "answers": ["a"] * 10 if split != "test" else None}
               for i in range(n)])  # fmt: skip
    assert len(resolve_benchmark(f"textvqa={tmp_path / 'textvqa'}").samples) == 2
    test = resolve_benchmark(f"textvqa:test={tmp_path / 'textvqa'}")
    assert len(test.samples) == 4 and not test.labelled
    assert len(resolve_benchmark(f"textvqa={tmp_path / 'textvqa'}", limit=1).samples) == 1
    with pytest.raises(FileNotFoundError, match="no 'dev' files .*test, train, validation"):
        resolve_benchmark(f"textvqa:dev={tmp_path / 'textvqa'}")


@pytest.mark.parametrize(
    ("name", "row", "filename", "entry"),
    [
        ("vqav2", {"question_id": 5, "question": "q", "answers": None}, "vqav2-test-submission.json",
         {"question_id": 5, "answer": "2"}),
        ("textvqa", {"question_id": 5, "question": "q", "answers": None}, "textvqa-test-submission.json",
         {"question_id": 5, "answer": "2"}),
        ("vizwiz", {"question_id": "VizWiz_test_00000005", "question": "q", "answers": []},
         "vizwiz_vqa-test-submission.json", {"image": "VizWiz_test_00000005.jpg", "answer": "2"}),
        ("docvqa", {"questionId": 5, "question": "q", "answers": None}, "docvqa_test_for_submission.json",
         {"questionId": 5, "answer": "Two."}),
        ("infovqa", {"questionId": 5, "question": "q", "answers": None}, "infovqa_test_for_submission.json",
         {"questionId": 5, "answer": "Two."}),
    ],
)  # fmt: skip
def test_test_splits_write_the_servers_submission_files(tmp_path, name, row, filename, entry):
    bench = load_parquet(name, write(tmp_path / "t.parquet", [{"image": png(), **row}]))
    assert not bench.labelled
    result = evaluate(Oracle(lambda p: " Two. "), bench, progress=False)
    assert result.aggregate == {} and len(result.submission) == 1
    path = write_submission(bench, result, tmp_path / "submissions")
    assert path.name == filename and json.loads(path.read_text()) == [entry]


def test_mmbench_test_split_writes_the_xlsx_the_server_takes(tmp_path):
    import pandas as pd

    rows = [{"index": i, "image": png(), "question": "Q?", "hint": None, "A": "x", "B": "y", "C": None,
             "D": None, "answer": None, "category": "c", "L2-category": "l", "source": "s", "split": "test"}
            for i in range(2)]  # fmt: skip
    bench = load_parquet("mmbench", write(tmp_path / "m.parquet", rows))
    result = evaluate(Oracle(lambda p: "B"), bench, progress=False)
    frame = pd.read_excel(write_submission(bench, result, tmp_path / "sub"))
    assert list(frame["index"]) == [0, 1] and list(frame["prediction"]) == ["B", "B"]
    assert {"question", "A", "B", "category", "L2-category"} <= set(frame.columns)


def test_mixed_labelled_and_unlabelled_rows_are_refused(tmp_path):
    rows = [{"question_id": 1, "image": png(), "question": "q", "answers": ["a"]},
            {"question_id": 2, "image": png(), "question": "q", "answers": None}]  # fmt: skip
    with pytest.raises(ValueError, match="some rows have answers and some have none"):
        load_parquet("textvqa", write(tmp_path / "t.parquet", rows))


def test_batch_agreement_reports_answers_that_change_with_the_batch(tmp_path):
    rows = [{"question_id": i, "image": png(), "question": f"q{i}", "answers": ["a"] * 10} for i in range(6)]
    bench = load_parquet("vqav2", write(tmp_path / "v.parquet", rows))

    class BatchSensitive(Oracle):  # answers q3 differently when it is not alone (as batched bf16 can)
        def generate(self, images, prompts, max_new_tokens=16):
            return ["b" if p.startswith("q3") and len(prompts) > 1 else "a" for p in prompts]

    r = evaluate(BatchSensitive(None), bench, batch_size=4, agreement=5, progress=False)
    assert r.agreement["samples"] == 5 and r.agreement["agreement"] == pytest.approx(0.8)
    assert r.agreement["differences"] == [{"id": "3", "batched": "b", "alone": "a"}]
    assert r.to_json()["batch_agreement"]["agreement"] == pytest.approx(0.8)
    assert not math.isnan(r.aggregate["score"])


# ---- against lmms-eval 0.3.0's own outputs ---------------------------------------------------------------

CASES = json.loads((__import__("pathlib").Path(__file__).parent / "lmms_eval_0_3_0_cases.json").read_text())


def test_matching_and_scores_equal_lmms_evals_outputs():
    """600 generated answers each, scored by lmms-eval 0.3.0's own functions when the file was made."""
    for answer, choices, expected in CASES["can_infer"]:
        assert can_infer(answer, choices) == expected, answer
    for prediction, references, expected in CASES["vizwiz"]:
        assert score("vizwiz", EvalSample("v", "q", references), prediction) == pytest.approx(
            expected, abs=1e-12
        )
    for prediction, expected in CASES["scienceqa_img"]:
        assert score("scienceqa_img", EvalSample("s", "q", ["B"]), prediction) == expected, prediction


def test_pinned_prompts_are_the_ones_lmms_eval_gave():
    prompts = CASES["prompts"]
    assert prompts["textvqa_prompt"] == "What does the nyc sign say?" + SHORT
    assert prompts["vizwiz_prompt"] == (
        "What is this?\nWhen the provided information is insufficient, respond with 'Unanswerable'." + SHORT
    )
    assert prompts["pope_prompt"] == "Is there a dog in the image?" + SHORT
    assert prompts["mmbench_prompt"] == (
        "Look closely. What is shown? There are several options:\nA. cat\nB. dog\nC. bird\n" + LETTER
    )
    assert prompts["seed_prompt"] == "Which?\nA. p\nB. q\nC. r\nD. s" + LETTER
    assert prompts["ai2d_prompt"] == "Which part?\nA. x\nB. y" + LETTER
    assert prompts["sqa_prompt"] == "Context: A hint.\nWhich?\nA. x\nB. y\nC. z" + LETTER


def test_an_answer_an_xlsx_cannot_store_is_cleaned_and_counted_not_a_crash(tmp_path, caplog):
    import pandas as pd

    rows = [{"index": i, "image": png(), "question": "Q?", "hint": None, "A": "x", "B": "y", "C": None,
             "D": None, "answer": None, "category": "c", "L2-category": "l", "source": "s", "split": "test"}
            for i in range(3)]  # fmt: skip
    bench = load_parquet("mmbench", write(tmp_path / "m.parquet", rows))
    result = evaluate(Oracle(lambda p: "B\x15"), bench, progress=False)
    with caplog.at_level("WARNING"):
        path = write_submission(bench, result, tmp_path / "sub")
    assert list(pd.read_excel(path)["prediction"]) == ["B", "B", "B"]
    assert "3 cell(s) held characters an xlsx cannot store" in caplog.text
    assert [p.name for p in (tmp_path / "sub").iterdir()] == [path.name]  # no temporary file left


def test_a_writer_that_fails_leaves_no_half_written_submission(tmp_path, monkeypatch):
    rows = [{"index": 0, "image": png(), "question": "Q?", "hint": None, "A": "x", "B": "y", "C": None,
             "D": None, "answer": None, "category": "c", "L2-category": "l", "source": "s", "split": "test"}]  # fmt: skip
    bench = load_parquet("mmbench", write(tmp_path / "m.parquet", rows))
    result = evaluate(Oracle(lambda p: "B"), bench, progress=False)

    def half(predictions, path):
        path.write_bytes(b"PK\x03\x04 half")
        raise OSError("disk full")

    import dataclasses

    submission = dataclasses.replace(bench.spec.submission, write=half)
    monkeypatch.setattr(bench, "spec", dataclasses.replace(bench.spec, submission=submission))
    with pytest.raises(OSError, match="disk full"):
        write_submission(bench, result, tmp_path / "sub")
    assert list((tmp_path / "sub").iterdir()) == []


def test_another_split_of_a_benchmark_keeps_its_own_name_task_and_split(tmp_path):
    val = [{"question_id": i, "image": png(), "question": "q", "answers": ["a"] * 10} for i in range(2)]
    test = [{"question_id": i, "image": png(), "question": "q", "answers": None} for i in range(2)]
    write(tmp_path / "vqav2" / "data" / "validation-00000-of-00001.parquet", val)
    write(tmp_path / "vqav2" / "data" / "test-00000-of-00001.parquet", test)
    from fvl.eval.benchmarks import resolve_benchmark

    scored = resolve_benchmark(f"vqav2={tmp_path / 'vqav2'}")
    submitted = resolve_benchmark(f"vqav2:test={tmp_path / 'vqav2'}")
    assert (scored.result_name, scored.task, scored.split) == ("vqav2", "vqav2_val", "validation")
    assert (submitted.result_name, submitted.task, submitted.split) == ("vqav2_test", "vqav2_test", "test")
    settings = evaluate(Oracle(lambda p: "a"), submitted, progress=False).to_json()["settings"]
    assert settings["lmms_eval_task"] == "vqav2_test" and settings["split"] == "test"


@pytest.mark.parametrize(
    "name, folder, split",
    [("mmbench", "en", "dev"), ("docvqa", "DocVQA", "validation"), ("infovqa", "InfographicVQA", "validation"),
     ("scienceqa_img", "ScienceQA-IMG", "test")],
)  # fmt: skip
def test_a_dataset_folder_laid_out_as_the_hub_has_it_is_found(tmp_path, name, folder, split):
    rows = {
        "mmbench": {"index": 0, "image": png(), "question": "Q?", "hint": None, "A": "x", "B": "y", "C": None,
                    "D": None, "answer": "A", "category": "c", "L2-category": "l", "source": "s", "split": "dev"},
        "docvqa": {"questionId": 0, "image": png(), "question": "q", "answers": ["a"]},
        "infovqa": {"questionId": 0, "image": png(), "question": "q", "answers": ["a"]},
        "scienceqa_img": {"image": png(), "question": "q", "choices": ["x", "y"], "answer": 0, "hint": ""},
    }[name]  # fmt: skip
    write(tmp_path / "hub" / folder / f"{split}-00000-of-00001.parquet", [rows])
    assert len(load_parquet(name, tmp_path / "hub").samples) == 1
    with pytest.raises(FileNotFoundError, match=f"nor in its {folder}/ folder"):
        load_parquet(name, tmp_path / "empty" if (tmp_path / "empty").mkdir() is None else None)
