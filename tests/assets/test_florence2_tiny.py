"""Stage 0: the tiny Florence-2 trained on its own tasks (targets with location tokens, training on
transformers' native model, the saved folder loaded through ``model.vision.path``, ``builtin:`` paths)."""

import json
import shutil

import pytest
import torch
from transformers import AutoTokenizer, Florence2ForConditionalGeneration

from fvl.assets.builtin import BUILTINS, resolve
from fvl.assets.florence2_tiny.build import build, prompt_spread, tokenizer_with_locations
from fvl.assets.florence2_tiny.config import Florence2TinyConfig
from fvl.assets.florence2_tiny.tasks import dequantize, iou, parse_regions, quantize, region_text, targets
from fvl.models.vision import build_vision_tower
from fvl.synthetic import generate
from tests.fixtures import tiny_cfg

QUICK = Florence2TinyConfig(steps=40, batch_size=16, lr=3e-3, samples=120, eval_samples=14)


def test_location_tokens_round_trip_within_a_bin():
    box = (3.0, 17.5, 40.2, 63.9)
    bins = quantize(box, 64)
    assert bins == [46, 273, 628, 998]
    assert all(abs(a - b) <= 64 / 1000 for a, b in zip(dequantize(bins, 64), box, strict=True))
    text = region_text([("red circle", box), ("text", (0, 0, 64, 64))], 64)
    assert text == "red circle<loc_46><loc_273><loc_628><loc_998>text<loc_0><loc_0><loc_999><loc_999>"
    parsed = parse_regions(text + "junk<loc_1>", 64)  # a malformed tail is dropped
    assert [label for label, _ in parsed] == ["red circle", "text"]
    assert iou(parsed[0][1], box) > 0.99
    assert (
        iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3) and iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0
    )


def test_task_targets_describe_what_is_drawn():
    seen = set()
    for i in range(60):
        s = generate(i, "train")
        t = targets(s, 64)
        seen.add(s.kind)
        assert t["<DETAILED_CAPTION>"] == s.caption
        assert t["<OCR>"] == {"ocr": s.answer, "chart": "A B C"}.get(s.kind, "")
        regions = parse_regions(t["<DENSE_REGION_CAPTION>"], 64)
        assert len(regions) == len(s.regions) >= 1
        pixels = torch.tensor(list(s.image.getdata())).reshape(64, 64, 3)
        for (label, box), (_, parsed) in zip(s.regions, regions, strict=True):
            x0, y0, x1, y1 = box
            inside = pixels[y0 : y1 + 1, x0 : x1 + 1]
            assert (inside != 255).any(), (s.kind, label)  # something is drawn inside each box
            assert iou(box, parsed) > 0.9
    assert seen == {"colour", "shape", "count", "position", "ocr", "chart", "pope"}


@pytest.fixture(scope="module")
def quick_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("f2tiny")
    return out, build(QUICK, out, progress=False)


def test_stage0_trains_on_its_tasks_and_saves_a_native_folder(quick_build):
    out, metrics = quick_build
    assert metrics["train_loss_last"] < 0.8 * metrics["train_loss_first"]
    assert {
        "caption_loss",
        "caption_colour_right",
        "ocr_exact_match",
        "box_mean_iou",
        "region_found_at_iou_0.5",
    } <= set(metrics)
    assert metrics["caption_pictures"] > 0
    assert metrics["prompt_spread"] > 0
    same = torch.ones(2, 3, 4)
    assert prompt_spread([same, same]) == 0 and prompt_spread([same, 2 * same]) == pytest.approx(2 / 3)
    assert metrics["ocr_questions"] > 0 and metrics["regions"] >= 14
    saved = json.loads((out / "fvl_build.json").read_text())
    assert saved["config"]["steps"] == 40 and saved["metrics"] == metrics
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("<loc_999>") != tok.unk_token_id
    assert tok.decode(tok("red<loc_5>", add_special_tokens=False).input_ids) == "red<loc_5>"
    assert len(tok) == len(tokenizer_with_locations())


def test_the_tiny_preset_reads_it_through_model_vision_path(quick_build):
    out, _ = quick_build
    cfg = tiny_cfg("vision.init=pretrained", f"vision.path={out}").vision
    tower = build_vision_tower(cfg)[0].eval()
    full = Florence2ForConditionalGeneration.from_pretrained(out).eval()
    px = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = tower.features(px)
        reference = full.model.get_image_features(px).pooler_output[:, 1:]
    torch.testing.assert_close(ours["davit"], reference, rtol=1e-5, atol=1e-5)
    assert (ours["caption"] - ours["ocr"]).abs().max() > 0  # each prompt is its own feature


def test_encode_is_florence2s_own_and_the_decoder_reads_the_image_tokens_alone(quick_build):
    from fvl.assets.florence2_tiny.build import TaskBatches, decoder_mask, encode, frozen_davit_states
    from fvl.inputs.transform import IMAGENET_MEAN, IMAGENET_STD, ImageTransform

    out, _ = quick_build
    model = Florence2ForConditionalGeneration.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    data = TaskBatches(tok, ImageTransform(64, IMAGENET_MEAN, IMAGENET_STD), 6, "val", 64)
    batch = data.batch(
        [(i, t) for i, t in enumerate(["<OCR>", "<DETAILED_CAPTION>"] * 3)], model.config.image_token_id, 17
    )
    with torch.no_grad():
        ours = encode(model, batch).last_hidden_state
        theirs = model(**batch).encoder_last_hidden_state
        # training with DaViT frozen runs it once per picture (frozen_davit_states): the same encoder states
        cached = {**batch, "davit_states": frozen_davit_states(model, data)[[0, 1, 2, 3, 4, 5]]}
        from_cache = encode(model, cached).last_hidden_state
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(from_cache, ours)
    image_only = decoder_mask(model, batch, "image")
    assert image_only[:, :17].all() and image_only[:, 17:].sum() == 0  # prompts hidden from the decoder
    assert torch.equal(decoder_mask(model, batch, "all"), batch["attention_mask"])


def test_builtin_paths_build_once_into_the_cache(tmp_path, monkeypatch, quick_build):
    monkeypatch.setenv("FVL_CACHE", str(tmp_path / "cache"))
    built = []
    source, _ = quick_build

    def make(out):  # a copy of the module's quick build stands in for a real build
        built.append(out)
        shutil.copytree(source, out, dirs_exist_ok=True)

    monkeypatch.setitem(BUILTINS._entries, "test-quick", lambda: ({"v": 1}, make))
    first = resolve("builtin:test-quick")
    assert resolve("builtin:test-quick") == first and len(built) == 1  # the second call finds the folder
    assert (tmp_path / "cache").is_dir() and first.startswith(str(tmp_path / "cache" / "test-quick-"))
    assert resolve("/some/dir") == "/some/dir" and resolve(None) is None
    with pytest.raises(KeyError, match="florence2-tiny"):
        resolve("builtin:no-such-model")
    tower = build_vision_tower(tiny_cfg("vision.init=pretrained", "vision.path=builtin:test-quick").vision)[0]
    assert tower.num_tokens == 16 and len(built) == 1


def test_cli_builds_into_a_folder_and_refuses_custom_settings_without_one(tmp_path, capsys):
    from fvl.cli import main

    out = tmp_path / "f2"
    cmd = ["florence2-tiny", "--steps", "4", "--batch-size", "8", "--samples", "40", "--eval-samples", "7",
           "--quiet"]  # fmt: skip
    assert main([*cmd, "--out", str(out)]) == 0
    assert (out / "config.json").exists() and "box_mean_iou" in capsys.readouterr().out
    assert main([*cmd, "--out", str(out)]) == 0 and "holds a build already" in capsys.readouterr().out
    assert main(cmd) != 0 and "need --out" in capsys.readouterr().err


def test_davit_stays_at_its_initialisation_unless_given_a_learning_rate(quick_build):
    from fvl.assets.florence2_arch import random_init_config
    from fvl.assets.florence2_tiny.build import param_groups
    from fvl.assets.florence2_tiny.config import tiny_arch

    out, _ = quick_build
    torch.manual_seed(QUICK.seed)  # what build() does before creating the model
    init = Florence2ForConditionalGeneration(random_init_config(tiny_arch(), tokenizer_with_locations()))
    saved = Florence2ForConditionalGeneration.from_pretrained(out)
    for (name, a), b in zip(
        init.model.vision_tower.state_dict().items(),
        saved.model.vision_tower.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b), name  # frozen (davit_lr=0, the default)
    assert not torch.equal(  # while the rest trained
        init.model.multi_modal_projector.image_projection.weight,
        saved.model.multi_modal_projector.image_projection.weight,
    )
    groups = param_groups(init, Florence2TinyConfig(davit_lr=1e-4))
    assert [g["peak_lr"] for g in groups] == [1e-3, 1e-4]
    assert len(groups[1]["params"]) == len(list(init.model.vision_tower.parameters()))
    with pytest.raises(ValueError, match="davit_lr"):
        Florence2TinyConfig(davit_lr=-1)
