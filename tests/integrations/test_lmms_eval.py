"""lmms-eval's ``--model fvl`` (``fvl.integrations.lmms_eval``), run through lmms-eval's own evaluator on a local
parquet copy of a VQAv2-style task scored by lmms-eval's own ``vqav2_process_results``: lmms-eval finds the
model, answers equal ``fvl eval``'s for the same questions, and the scores equal fvl's VQAv2 scoring under
the protocol of the installed release."""

from __future__ import annotations

import importlib
import importlib.metadata
import io
import textwrap

import pytest
import torch
from PIL import Image

from fvl.integrations.lmms_eval import CLASS_PATH, MODEL_NAME
from fvl.integrations.lmms_eval.requests import continuation_loss, cut_at_stops
from tests.fixtures import tiny_cfg

lmms_eval = pytest.importorskip(
    "lmms_eval", reason="lmms-eval is not installed (pip install 'fvl[lmms-eval]')"
)

SAMPLES = 20
BATCH = 10
TOKENS = 8  # VQAv2's is 16; 8 halves the test's generation time
COLOURS = ["red", "green", "blue", "yellow", "white"]
CHOICES = COLOURS[:3]  # the multiple-choice task's options, asked of its first CHOICE_DOCS questions
CHOICE_DOCS = 4
RGB = {
    "red": (220, 30, 30),
    "green": (30, 200, 30),
    "blue": (30, 30, 220),
    "yellow": (230, 220, 20),
    "white": (250,) * 3,
}


def version_protocol() -> str:
    """The fvl VQA protocol that reproduces the installed lmms-eval's VQAv2 scoring."""
    from packaging.version import Version

    release = Version(importlib.metadata.version("lmms-eval"))
    if release < Version("0.3.5"):
        return "lmms-eval-0.3.0"
    return "lmms-eval-0.3.5" if release < Version("0.5") else "lmms-eval-0.5.0"


def png(colour: str, i: int) -> bytes:
    image = Image.new("RGB", (24 + i % 3 * 8, 24), RGB[colour])  # some non-square, so pad mode matters
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_parquet(path, rows):
    """VQAv2's layout, written by ``datasets`` so that lmms-eval reads ``image`` as an Image."""
    import datasets

    features = datasets.Features(
        {
            "question_id": datasets.Value("int64"),
            "question": datasets.Value("string"),
            "answers": [{"answer": datasets.Value("string"), "answer_id": datasets.Value("int64")}],
            "image": datasets.Image(),
        }
    )
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    return path


def write_task(folder, parquet):
    """Two tasks on the local parquet file, read offline: one runs lmms-eval's own vqav2 functions
    (generation), the other asks the square's colour as a multiple choice (log-likelihoods)."""
    folder.mkdir()

    def head(task: str) -> str:  # both tasks read the same local parquet file, offline
        lines = [f"task: {task}", "dataset_path: parquet", "dataset_kwargs:", "  data_files:",
                 f"    validation: {parquet}", f"  cache_dir: {folder / 'hf_datasets'}", "test_split: validation"]  # fmt: skip
        return "\n        ".join(lines)

    (folder / "utils.py").write_text(
        "from lmms_eval.tasks.vqav2.utils import vqav2_doc_to_text, vqav2_doc_to_visual, vqav2_process_results_val\n"
        f"def colour(doc):\n    return doc['question_id'] % {len(CHOICES)}\n"
        f"def first_docs(dataset):\n    return dataset.select(range({CHOICE_DOCS}))\n"
    )
    (folder / "fvl_local_colour_choice.yaml").write_text(
        textwrap.dedent(f"""\
        {head("fvl_local_colour_choice")}
        process_docs: !function utils.first_docs
        output_type: multiple_choice
        doc_to_visual: !function utils.vqav2_doc_to_visual
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: {CHOICES}
        doc_to_target: !function utils.colour
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """)
    )
    (folder / "fvl_local_vqav2.yaml").write_text(
        textwrap.dedent(f"""\
        {head("fvl_local_vqav2")}
        output_type: generate_until
        doc_to_visual: !function utils.vqav2_doc_to_visual
        doc_to_text: !function utils.vqav2_doc_to_text
        doc_to_target: "answer"
        generation_kwargs:
          max_new_tokens: {TOKENS}
        process_results: !function utils.vqav2_process_results_val
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        lmms_eval_specific_kwargs:
          default:
            pre_prompt: ""
            post_prompt: "\\nAnswer the question using a single word or phrase."
        """)
    )


def run_lmms_eval(tmp_path, ckpt) -> dict:
    """lmms-eval's ``simple_evaluate`` (what its CLI runs) with ``--model fvl``, found the way the CLI finds
    it (the entry point, no LMMS_EVAL_PLUGINS), in this process: the CLI's own start-up (imports, indexing
    every built-in task) would take most of a minute. Global random states are restored afterwards."""
    import random

    import numpy as np
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        return simple_evaluate(
            model="fvl",
            model_args=f"checkpoint={ckpt},dtype=float32",
            tasks=["fvl_local_vqav2", "fvl_local_colour_choice"],
            batch_size=BATCH,
            device="cpu",
            log_samples=True,
            task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False),
            verbosity="WARNING",
        )
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])


def test_lmms_eval_scores_an_fvl_checkpoint_as_fvl_eval_does(tmp_path):
    from fvl.eval.benchmarks import load_parquet
    from fvl.eval.evaluate import evaluate
    from fvl.eval.metrics import vqa_score
    from fvl.models import build_model, save_checkpoint

    torch.manual_seed(0)
    model = build_model(tiny_cfg()).eval()
    ckpt = save_checkpoint(model, tmp_path / "tiny.safetensors")
    questions = [
        {
            "question_id": i,
            "question": f"What colour is square {i}?",
            "image": {"bytes": png(c, i), "path": None},
        }
        for i, c in ((i, COLOURS[i % len(COLOURS)]) for i in range(SAMPLES))
    ]
    # fvl eval's answers first, so that the references can make the scores differ from 0 on some questions
    # (a random-init model says nothing sensible): its own answer, in capitals, from 4 of 10 annotators
    rows = [
        {**q, "answers": [{"answer": "x", "answer_id": 1}, {"answer": "y", "answer_id": 2}]}
        for q in questions
    ]
    draft = write_parquet(tmp_path / "draft.parquet", rows)
    fvl_answers = [
        r["prediction"]
        for r in evaluate(model, load_parquet("vqav2", draft), BATCH, TOKENS, progress=False).records
    ]
    assert len(set(fvl_answers)) > 1
    rows = []
    for q, answer in zip(questions, fvl_answers, strict=True):
        colour = COLOURS[q["question_id"] % len(COLOURS)]
        refs = [answer.upper()] * 4 + [colour] * 6 if q["question_id"] % 2 else [colour] * 10
        rows.append({**q, "answers": [{"answer": a, "answer_id": j} for j, a in enumerate(refs)]})
    write_task(tmp_path / "tasks", write_parquet(tmp_path / "vqav2_local.parquet", rows))

    results = run_lmms_eval(tmp_path, ckpt)
    task = results["results"]["fvl_local_vqav2"]
    samples = sorted(results["samples"]["fvl_local_vqav2"], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(SAMPLES))
    assert task["exact_match,none"] == pytest.approx(sum(s["exact_match"] for s in samples) / SAMPLES)
    # the answers are fvl eval's (lmms-eval's default until ["\n\n"] cuts nothing fvl would keep)
    answers = [s["filtered_resps"][0] for s in samples]
    assert answers == [cut_at_stops(a, ["\n\n"]) for a in fvl_answers]
    # and lmms-eval's own VQAv2 scoring of them is fvl's under the installed release's protocol
    protocol = version_protocol()
    references = [[x["answer"] for x in r["answers"]] for r in rows]
    expected = [
        vqa_score(a, refs, "vqav2", protocol) for a, refs in zip(fvl_answers, references, strict=True)
    ]
    assert [s["exact_match"] for s in samples] == expected
    assert sum(x > 0 for x in expected) >= SAMPLES // 4  # the test scores something
    # the multiple choice (first CHOICE_DOCS questions): lmms-eval picked the colour whose continuation has
    # the smallest loss the adapter reported, and those losses are fvl's own for the same prompt and image
    choice = sorted(results["samples"]["fvl_local_colour_choice"], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in choice] == list(range(CHOICE_DOCS))
    for s, q in zip(choice, questions, strict=False):
        image = Image.open(io.BytesIO(q["image"]["bytes"])).convert("RGB")
        expected = [continuation_loss(model, [image], q["question"], f" {c}") for c in CHOICES]
        got = [r[0] if isinstance(r, list) and len(r) == 1 else r for r in s["filtered_resps"]]
        assert [(float(g[0]), bool(g[1])) for g in got] == [pytest.approx(e) for e in expected]
        best = min(range(len(CHOICES)), key=lambda i: expected[i][0])
        assert s["acc"] == float(best == q["question_id"] % len(CHOICES))
    assert results["results"]["fvl_local_colour_choice"]["acc,none"] == pytest.approx(
        sum(s["acc"] for s in choice) / CHOICE_DOCS
    )


def test_registration_mechanisms_name_the_same_class(monkeypatch):
    """lmms-eval's own registries, fresh: its entry-point loader (>= 0.6) and its LMMS_EVAL_PLUGINS reader
    (every release; from 0.6 a function of lmms_eval.models) both resolve ``fvl`` to ``CLASS_PATH``."""
    from lmms_eval import models
    from lmms_eval.api.model import lmms
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from fvl.integrations.lmms_eval.models.fvl import FVL

    assert f"{FVL.__module__}.{FVL.__name__}" == CLASS_PATH and issubclass(FVL, lmms) and FVL.is_simple
    by_entry_point = ModelRegistryV2()
    by_entry_point.load_entrypoint_manifests()
    assert by_entry_point.get_model_class(MODEL_NAME) is FVL
    by_plugin = ModelRegistryV2()
    monkeypatch.setenv("LMMS_EVAL_PLUGINS", "fvl.integrations.lmms_eval")
    monkeypatch.setattr(models, "AVAILABLE_SIMPLE_MODELS", dict(models.AVAILABLE_SIMPLE_MODELS))
    with pytest.warns(DeprecationWarning, match="LMMS_EVAL_PLUGINS is deprecated"):
        models._merge_legacy_plugin_models(by_plugin)
    assert by_plugin.get_model_class(MODEL_NAME) is FVL


def test_model_args_are_checked(tmp_path):
    from fvl.integrations.lmms_eval.models.fvl import FVL

    with pytest.raises(ValueError, match="checkpoint=PATH"):
        FVL()
    with pytest.raises(ValueError, match=r"unknown model_args \['pretrained'\]"):
        FVL(checkpoint="x", pretrained="y")
    with pytest.raises(ValueError, match="--batch_size 'auto'"):
        FVL(checkpoint="x", batch_size="auto")
    with pytest.raises(ValueError, match="dtype must be"):
        FVL(checkpoint="x", dtype="fp16")
    with pytest.raises(FileNotFoundError):
        FVL(checkpoint=str(tmp_path / "missing.safetensors"))
