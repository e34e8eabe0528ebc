"""``fvl import florence2``: Microsoft's remote-code layout -> transformers' native Florence-2, checked
against the native model the remote folder was written from (weights, outputs, fvl's features)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, Florence2ForConditionalGeneration

from fvl.assets.florence2_arch import davit_tokens
from fvl.cli import main
from fvl.convert import KeyMappingError, import_florence2
from fvl.convert.florence2 import PROCESSOR_TOKENS
from fvl.models.vision import build_vision_tower
from tests.convert.layouts import FLORENCE_VOCAB, native_florence2, write_remote_florence2
from tests.fixtures import tiny_cfg

VOCAB_TABLES = (
    "model.language_model.shared.weight",
    "model.language_model.encoder.embed_tokens.weight",
    "model.language_model.decoder.embed_tokens.weight",
    "lm_head.weight",
)


@pytest.fixture(scope="module")
def original():
    return native_florence2()


def assert_every_key_accounted(report, source: dict, target: dict) -> None:
    """Each source tensor used or dropped exactly once; each target tensor filled exactly once."""
    assert set(report.used) | set(report.dropped) == set(source)
    assert not set(report.used) & set(report.dropped)
    filled = list(report.used.values()) + list(report.tied) + list(report.kept)
    assert len(filled) == len(set(filled)) and set(filled) == set(target)


def test_remote_layout_becomes_native_with_equal_weights_and_outputs(original, tmp_path):
    src, out = tmp_path / "Florence-2-tiny", tmp_path / "native"
    source = write_remote_florence2(original, src, "bin")
    result = import_florence2(src, out)

    assert result.layout == "remote" and result.vocab == (FLORENCE_VOCAB, 1600)  # 1537 tokens -> x64
    assert_every_key_accounted(result.report, source, original.state_dict())
    assert result.report.dropped == {
        "language_model.final_logits_bias": "a zero output bias the native model lacks"
    }
    assert "text_config.num_beams" in result.ignored and "vision_config.enable_checkpoint" in result.ignored
    assert not list(out.glob("*.py"))  # no remote code carried over, nothing points at any
    for name in ("config.json", "preprocessor_config.json"):
        assert "auto_map" not in json.loads((out / name).read_text())

    imported = Florence2ForConditionalGeneration.from_pretrained(out).eval()
    mine = imported.state_dict()
    for key, value in original.state_dict().items():
        if key in VOCAB_TABLES:  # grown: the original rows, then their mean in each new row
            torch.testing.assert_close(mine[key][:FLORENCE_VOCAB], value, rtol=0, atol=0)
            torch.testing.assert_close(
                mine[key][FLORENCE_VOCAB:], value.mean(0).expand(64, -1), rtol=0, atol=0
            )
        else:
            torch.testing.assert_close(mine[key], value, rtol=0, atol=0, msg=key)

    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 512 + len(PROCESSOR_TOKENS) + 1  # the processor's tokens, then <image>
    assert tok.convert_tokens_to_ids(["<od>", "<loc_0>", "<and>"]) == [512, 516, 1535]  # the processor's ids
    assert (
        imported.config.image_token_id == tok.image_token_id == tok.convert_tokens_to_ids("<image>") == 1536
    )

    torch.manual_seed(0)
    px = torch.randn(2, 3, 64, 64)
    prompt = [0, *tok("What is the text in the image?", add_special_tokens=False).input_ids, 2]
    decoder = torch.tensor([[2, 0, 5, 9]] * 2)
    with torch.no_grad():
        n = davit_tokens(original.config.vision_config, 64) + 1  # + the pooled token
        ref = original(torch.tensor([[original.config.image_token_id] * n + prompt] * 2), px,
                       decoder_input_ids=decoder)  # fmt: skip
        got = imported(torch.tensor([[imported.config.image_token_id] * n + prompt] * 2), px,
                       decoder_input_ids=decoder)  # fmt: skip
    torch.testing.assert_close(got.encoder_last_hidden_state, ref.encoder_last_hidden_state)
    torch.testing.assert_close(got.logits[..., :FLORENCE_VOCAB], ref.logits)

    # plain transformers runs it: AutoProcessor (the native Florence2Processor) expands <image>, generate
    processor = AutoProcessor.from_pretrained(out)
    inputs = processor(text="<OCR>", images=Image.new("RGB", (64, 64)), return_tensors="pt")
    assert inputs["input_ids"][0].tolist().count(imported.config.image_token_id) == n
    assert imported.generate(**inputs, max_new_tokens=2).shape == (1, 2)

    # fvl loads the folder (model.vision.path) and computes the original's features
    original.save_pretrained(tmp_path / "original")
    AutoTokenizer.from_pretrained(out).save_pretrained(tmp_path / "original")
    towers = [
        build_vision_tower(tiny_cfg("vision.init=pretrained", f"vision.path={p}").vision)[0].eval()
        for p in (out, tmp_path / "original")
    ]
    with torch.no_grad():
        feats = [t.features(px) for t in towers]
    for name in ("davit", "caption", "ocr", "grounding"):
        torch.testing.assert_close(feats[0][name], feats[1][name], rtol=0, atol=0)


def test_a_save_of_named_parameters_in_safetensors_imports_too(original, tmp_path):
    """Florence-VL's vision_tower/ layout: no buffers, the tied tables once (``shared``), as safetensors here."""
    src, out = tmp_path / "src", tmp_path / "out"
    source = write_remote_florence2(original, src, "safetensors", parameters_only=True, processor_tokens=True)
    assert "visual_temporal_embed.pos_idx_to_embed" not in source
    result = import_florence2(src, out)
    assert_every_key_accounted(result.report, source, original.state_dict())
    assert set(result.report.tied) == set(VOCAB_TABLES[1:])
    assert list(result.report.kept) == ["model.multi_modal_projector.visual_temporal_embed.pos_idx_to_embed"]
    assert result.added_tokens == 1 and result.vocab == (FLORENCE_VOCAB, 1600)
    imported = Florence2ForConditionalGeneration.from_pretrained(out)
    key = (
        "model.multi_modal_projector.visual_temporal_embed.pos_idx_to_embed"  # the native constant: the same
    )
    torch.testing.assert_close(imported.state_dict()[key], original.state_dict()[key])


def test_native_layout_is_copied_through_by_the_command(original, tmp_path, capsys):
    src = tmp_path / "florence-community"
    original.save_pretrained(src)
    (src / "stray.py").write_text("raise RuntimeError\n")
    assert main(["import", "florence2", str(src), str(tmp_path / "out")]) == 0
    assert "native Florence-2 layout already" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.safetensors").is_file() and not (tmp_path / "out" / "stray.py").exists()


def test_leftover_and_missing_keys_are_one_error_listing_them(original, tmp_path):
    src = tmp_path / "src"
    weights = write_remote_florence2(original, src, "bin")
    weights["vision_tower.head.weight"] = torch.zeros(
        3, 64
    )  # DaViT's classifier, deleted by the remote model
    del weights["vision_tower.blocks.1.0.channel_block.ffn.fn.net.fc2.bias"]
    torch.save(weights, src / "pytorch_model.bin")
    with pytest.raises(KeyMappingError) as e:
        import_florence2(src, tmp_path / "out")
    message = str(e.value)
    assert "leftover) (1): vision_tower.head.weight" in message
    assert "missing) (1): model.vision_tower.blocks.1.0.channel_block.ffn.fc2.bias" in message
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_a_nonzero_output_bias_is_refused(original, tmp_path):
    src = tmp_path / "src"
    weights = write_remote_florence2(original, src, "bin")
    weights["language_model.final_logits_bias"][0, 3] = 1.0
    torch.save(weights, src / "pytorch_model.bin")
    with pytest.raises(ValueError, match="final_logits_bias is not zero"):
        import_florence2(src, tmp_path / "out")


def test_unknown_layouts_fail_clearly(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert', not a Florence-2 checkpoint"):
        import_florence2(tmp_path / "bert", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        import_florence2(tmp_path / "empty", tmp_path / "out")
    assert main(["import", "florence2", str(tmp_path / "bert"), str(tmp_path / "out")]) == 2
