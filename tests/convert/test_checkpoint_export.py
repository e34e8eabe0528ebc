"""Safetensors checkpoints and the export folder, loaded back by fvl and by plain transformers."""

import subprocess
import sys

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionModel,
    Florence2ForConditionalGeneration,
)

from fvl.convert import export, load_exported
from fvl.inputs.collate import Sample, collate
from fvl.models import build_model, load_checkpoint, save_checkpoint
from fvl.models.checkpoint import read_metadata
from tests.fixtures import tiny_cfg, tower_cfg


def batch_for(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    conv = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    t = model.template.tokenize(conv, model.tokenizer, model.num_image_tokens)
    size = model.vision.image_size
    return collate(
        [Sample(t.input_ids, t.labels, [torch.randn(3, size, size, generator=g)])] * 2,
        model.tokenizer.pad_token_id,
    )


@pytest.fixture(scope="module")
def trained_model():
    """A tiny model whose weights moved away from init (so a round trip that re-inits would show)."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(batch_for(model)).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_checkpoint_round_trip_identical_outputs(trained_model, tmp_path):
    path = save_checkpoint(trained_model, tmp_path / "model.safetensors")
    meta = read_metadata(path)
    assert meta["fvl_format"] == "1" and "florence2" in meta["fvl_config"]
    keys = set(__import__("safetensors").safe_open(str(path), "pt").keys())
    assert any(k.startswith("vision.davit.") for k in keys) and any(k.startswith("llm.") for k in keys)
    assert {"projector.0.weight", "projector.2.weight"} <= keys
    loaded = load_checkpoint(path).eval()
    batch = batch_for(trained_model, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch).logits, trained_model(batch).logits, rtol=0, atol=0)
    assert not list(tmp_path.glob(".*"))  # no temp file left behind


def test_export_loads_with_plain_transformers_and_back_into_fvl(trained_model, tmp_path):
    out = export(trained_model, tmp_path / "export")
    batch = batch_for(trained_model, seed=2)
    # the LLM, with its tokenizer (image token included), by plain transformers
    llm = AutoModelForCausalLM.from_pretrained(out / "llm").eval()
    tok = AutoTokenizer.from_pretrained(out / "llm")
    assert tok.convert_tokens_to_ids("<image>") == trained_model.image_token_id
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(llm(ids).logits, trained_model.llm(ids).logits)
    # Florence-2 by plain transformers: the same image tokens and encoder outputs
    flo = Florence2ForConditionalGeneration.from_pretrained(out / "vision").eval()
    px = batch["pixel_values"]
    with torch.no_grad():
        ours = trained_model.vision.features(px)
        torch.testing.assert_close(flo.model.get_image_features(px).pooler_output[:, 1:], ours["davit"])
        torch.testing.assert_close(
            flo.model.multi_modal_projector.image_proj_norm.weight,
            trained_model.vision.image_projection.image_proj_norm.weight,
        )
    # the whole model back into fvl: identical outputs
    again = load_exported(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(batch).logits, trained_model(batch).logits)
    assert again.generate([px[0]], ["What colour?"], max_new_tokens=4) == trained_model.generate(
        [px[0]], ["What colour?"], max_new_tokens=4
    )


def test_export_clip_tower(tmp_path):
    model = build_model(tower_cfg("clip")).eval()
    out = export(model, tmp_path / "clip")
    clip = CLIPVisionModel.from_pretrained(out / "vision").eval()
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            clip(px, output_hidden_states=True).hidden_states[-2][:, 1:],
            model.vision.features(px)["layer_-2"],
        )
        batch = batch_for(model)
        torch.testing.assert_close(load_exported(out).eval()(batch).logits, model(batch).logits)


@pytest.mark.e2e
def test_cli_export(trained_model, tmp_path):
    ckpt = save_checkpoint(trained_model, tmp_path / "m.safetensors")
    res = subprocess.run(
        [sys.executable, "-m", "fvl.cli", "export", str(ckpt), str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out" / "llm" / "config.json").exists() and (
        tmp_path / "out" / "projector.safetensors"
    ).exists()


def test_load_checkpoint_rejects_foreign_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not an fvl checkpoint"):
        load_checkpoint(tmp_path / "x.safetensors")
