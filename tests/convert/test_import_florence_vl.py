"""``fvl import florence-vl``: the authors' LLaVA-fork checkpoint -> an fvl checkpoint whose features and
logits equal a reference written from their code: Florence-2 on the image with their three padded prompt
rows and no attention mask, ``cat(image_features, encoder_last_hidden_state)`` into ``DualMLPProjector``,
the projected tokens spliced into the LLM's input embeddings at the image position."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from fvl.assets.florence2_arch import TASK_PROMPTS
from fvl.cli import main
from fvl.convert import KeyMappingError, export, import_florence_vl
from fvl.convert.florence_vl import TASK_IDS, prompt_note
from fvl.models import load_checkpoint
from fvl.models.checkpoint import read_metadata
from tests.convert.layouts import dual_mlp, florence_tokenizer, native_florence2, tiny_phi3, write_florence_vl

THEIR_TASKS = ("<DETAILED_CAPTION>", "<OCR>", "<DENSE_REGION_CAPTION>")  # florence_encoder.py's order


@pytest.fixture(scope="module")
def parts():
    florence, llm = native_florence2(seed=4), tiny_phi3()
    return florence, llm, dual_mlp(4 * florence.config.vision_config.projection_dim, llm.config.hidden_size)


def their_features(florence, px):
    """florence_encoder.py: the three prompts as <s> text </s> rows right-padded with <pad> to the longest,
    through Florence-2 with the image and no attention mask; the image features and each prompt's encoder
    output at the image positions (the pooled token first dropped, as fvl reads Florence-VL's 576)."""
    tok = florence_tokenizer(True)
    rows = [[0, *tok(TASK_PROMPTS[t], add_special_tokens=False).input_ids, 2] for t in THEIR_TASKS]
    width = max(len(r) for r in rows)
    task_ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    assert (task_ids == tok.pad_token_id).any()  # a prompt is padded: the case that differs from masked
    image = florence.model.get_image_features(px).pooler_output  # [B, 1 + N, D]
    batch, n = image.shape[:2]
    text = florence.get_input_embeddings()(task_ids)
    embeds = torch.cat([image.repeat_interleave(3, dim=0), text.repeat(batch, 1, 1)], dim=1)
    hidden = florence.model.language_model.encoder(inputs_embeds=embeds).last_hidden_state
    hidden = hidden[:, 1:n].reshape(batch, 3, n - 1, -1)
    return [image[:, 1:], *hidden.unbind(1)]


def their_projector(weights, x):
    """DualMLPProjector.encoder_mlp: Linear, then (GELU, Linear) per further layer."""
    x = F.linear(x, weights["encoder_mlp.0.weight"], weights["encoder_mlp.0.bias"])
    for i in (1, 2):
        x = F.linear(F.gelu(x), weights[f"encoder_mlp.{i}.1.weight"], weights[f"encoder_mlp.{i}.1.bias"])
    return x


def their_logits(llm, image_embeds, before, after):
    """prepare_inputs_labels_for_multimodal: text pieces embedded, the image's tokens spliced between."""
    embed = llm.get_input_embeddings()
    embeds = torch.cat([embed(torch.tensor(before)), image_embeds[0], embed(torch.tensor(after))])
    return llm(inputs_embeds=embeds[None]).logits


@pytest.mark.parametrize("vision_in_main", [False, True], ids=["vision_tower-folder", "main-state-dict"])
def test_imported_model_computes_their_features_and_logits(parts, tmp_path, capsys, vision_in_main):
    florence, llm, projector = parts
    src, out = tmp_path / "florence-phi-sft", tmp_path / "imported"
    written = write_florence_vl(src, florence, llm, projector, vision_in_main)
    if vision_in_main:
        result = import_florence_vl(src, out)
        assert result.preset == "florence_vl_3b"
    else:  # the command, end to end
        assert main(["import", "florence-vl", str(src), str(out)]) == 0
        printed = capsys.readouterr().out
        assert "as preset florence_vl_3b" in printed and str(out / "model.safetensors") in printed

    notes = json.loads((out / "fvl_import.json").read_text())["notes"]
    assert (
        "fvl's prompt ids differ from their hard-coded task ids (expected only with another tokenizer)"
        in notes
    )
    cfg = read_metadata(out / "model.safetensors")["fvl_config"]
    for line in ("prompt_padding: unmasked", "name: mlp3x_gelu", "template: phi3", "model_type: phi3"):
        assert line in cfg
    model = load_checkpoint(out / "model.safetensors").eval()
    assert model.cfg.fusion.features == ["davit", "caption", "ocr", "grounding"]

    # every source tensor used (or dropped, with its reason) once; every tensor of the model filled once
    record = json.loads((out / "fvl_import.json").read_text())
    source = set(written["main"]) | {f"vision_tower/{k}" for k in written["vision_tower"]}
    if not vision_in_main:
        source = {k for k in source if not k.startswith("model.vision_tower.")}
    assert set(record["used"]) | set(record["dropped"]) == source
    assert not set(record["used"]) & set(record["dropped"])
    filled = [*record["used"].values(), *record["tied"], *record["kept"]]
    assert len(filled) == len(set(filled)) and set(filled) == set(model.state_dict())
    assert record["used"]["model.mm_projector.encoder_mlp.2.1.weight"] == "projector.4.weight"
    prefix = "model.vision_tower.vision_tower." if vision_in_main else "vision_tower/"
    decoder = [k for k in record["dropped"] if k.startswith(prefix) and ".decoder." in k]
    assert decoder and all("never runs it" in record["dropped"][k] for k in decoder)
    if vision_in_main:  # their loader loads the main state dict last: vision_tower/ is a copy of it
        copies = {k: why for k, why in record["dropped"].items() if k.startswith("vision_tower/")}
        assert copies and set(copies.values()) == {"a copy of the main state dict's vision tower"}

    torch.manual_seed(5)
    px = torch.randn(1, 3, 64, 64)
    tok = AutoTokenizer.from_pretrained(out / "llm_tokenizer")
    before, after = tok("<|user|>\n").input_ids, tok("What colour is the shape?<|end|>").input_ids
    with torch.no_grad():
        theirs = their_features(florence, px)
        ours = model.vision.features(px)
        for name, ref in zip(["davit", "caption", "ocr", "grounding"], theirs, strict=True):
            torch.testing.assert_close(ours[name], ref, msg=name)
        image_embeds = their_projector(projector, torch.cat(theirs, dim=-1))
        torch.testing.assert_close(model.encode_images(px), image_embeds)
        ref = their_logits(llm, image_embeds, before, after)
        n = model.num_image_tokens
        ids = torch.tensor([before + [model.image_token_id] * n + after])
        logits = model.llm(inputs_embeds=model.embed(ids, px)).logits
    vocab = llm.config.vocab_size
    torch.testing.assert_close(logits[..., :vocab], ref)
    # the image placeholder fvl adds is a new row: the mean of the others, so it never stands out
    head = model.llm.lm_head.weight
    assert head.shape[0] == vocab + 1 and torch.equal(head[vocab], llm.lm_head.weight.mean(0))
    if not vision_in_main:  # what fvl chat and fvl export do with it
        assert len(model.generate([px[0]], ["What colour is the shape?"], max_new_tokens=2)) == 1
        export(model, tmp_path / "exported")
        assert (tmp_path / "exported" / "vision" / "config.json").is_file()


def test_their_settings_that_fvl_cannot_reproduce_and_unknown_layouts_fail(parts, tmp_path):
    florence, llm, projector = parts
    src = tmp_path / "src"
    write_florence_vl(src, florence, llm, projector, vision_in_main=False)

    def variant(name: str, **config) -> str:
        folder = tmp_path / name
        shutil.copytree(src, folder)
        data = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**data, **config}))
        return str(folder)

    with pytest.raises(ValueError, match="mm_projector_type='linear'"):
        import_florence_vl(variant("linear", mm_projector_type="linear"), tmp_path / "o1")
    with pytest.raises(ValueError, match="mm_use_im_start_end=true"):
        import_florence_vl(variant("start_end", mm_use_im_start_end=True), tmp_path / "o2")
    with pytest.raises(ValueError, match="model_type 'llama'.*not a Florence-VL checkpoint"):
        import_florence_vl(variant("plain", model_type="llama"), tmp_path / "o3")
    no_tower = variant("no_tower")
    shutil.rmtree(f"{no_tower}/vision_tower")
    with pytest.raises(FileNotFoundError, match="pass --vision-tower DIR"):
        import_florence_vl(no_tower, tmp_path / "o4")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_leftover_and_missing_keys_are_one_error_listing_them(parts, tmp_path):
    florence, llm, projector = parts
    src = tmp_path / "src"
    write_florence_vl(src, florence, llm, projector, vision_in_main=False)
    weights = load_file(str(src / "model.safetensors"))
    weights["model.image_newline"] = torch.zeros(
        llm.config.hidden_size
    )  # spatial-unpad merging's, not flat's
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, str(src / "model.safetensors"))
    with pytest.raises(KeyMappingError) as e:
        import_florence_vl(src, tmp_path / "out")
    assert "(leftover) (1): model.image_newline" in str(e.value)
    assert "(missing) (1): llm.model.layers.1.mlp.down_proj.weight" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_their_task_ids_are_fvls_prompt_rows_under_florence2s_tokenizer():
    """Their hard-coded rows are fvl's layout (<s> text </s>, <pad> to the longest) of the paper's prompts:
    a stand-in tokenizer giving the BART ids of each text yields exactly ``TASK_IDS``."""
    ids = {TASK_PROMPTS[t]: row[1 : row.index(2)] for t, row in zip(THEIR_TASKS, TASK_IDS, strict=True)}

    class Bart:
        bos_token_id, eos_token_id, pad_token_id = 0, 2, 1

        def __call__(self, text, add_special_tokens):
            return SimpleNamespace(input_ids=ids[text])

    assert prompt_note(Bart()) == "fvl's prompt ids equal their hard-coded task ids"
    ids[TASK_PROMPTS["<OCR>"]] = ids[TASK_PROMPTS["<OCR>"]][:-1]
    assert "differ" in prompt_note(Bart())
