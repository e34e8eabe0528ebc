"""Our Florence-2 features against transformers' own full Florence-2 forward, and the sharing of DaViT."""

import pytest
import torch
from transformers import AutoTokenizer, Florence2ForConditionalGeneration

from fvl.assets.florence2_arch import TASK_PROMPTS, expand_prompt, random_init_config
from fvl.assets.tiny_tokenizers import tiny_tokenizer_dirs
from fvl.config.model import PromptConfig, plain_dict
from fvl.models.vision import build_vision_tower
from tests.fixtures import tiny_cfg


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    """A full random-init Florence-2 (decoder included) saved as a local pretrained folder with tokenizer."""
    cfg = tiny_cfg().vision
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dirs()[1])
    torch.manual_seed(1)
    full = Florence2ForConditionalGeneration(random_init_config(plain_dict(cfg.arch), tok)).eval()
    out = tmp_path_factory.mktemp("florence2")
    full.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def pretrained_tower(path, **changes):
    cfg = tiny_cfg("vision.init=pretrained", f"vision.path={path}").vision
    for k, v in changes.items():
        setattr(cfg, k, v)
    return build_vision_tower(cfg)[0].eval()


def reference_encoder_output(full, tok, pixel_values, prompt_text):
    """transformers' own path: image placeholders + <s> prompt </s> through Florence2ForConditionalGeneration."""
    n_img = full.model.get_image_features(pixel_values).pooler_output.shape[1]
    ids = [full.config.image_token_id] * n_img + [
        tok.bos_token_id,
        *tok(prompt_text, add_special_tokens=False).input_ids,
        tok.eos_token_id,
    ]
    input_ids = torch.tensor([ids] * pixel_values.shape[0])
    out = full(input_ids=input_ids, pixel_values=pixel_values)
    return out.encoder_last_hidden_state[:, :n_img]


@pytest.mark.parametrize("keep_pooled", [False, True])
def test_features_equal_transformers_full_forward(reference_dir, keep_pooled):
    tower = pretrained_tower(reference_dir, keep_pooled_token=keep_pooled)
    full = Florence2ForConditionalGeneration.from_pretrained(reference_dir).eval()
    tok = AutoTokenizer.from_pretrained(reference_dir)
    torch.manual_seed(0)
    px = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ours = tower.features(px)
        start = 0 if keep_pooled else 1
        image_tokens = full.model.get_image_features(px).pooler_output
        torch.testing.assert_close(ours["davit"], image_tokens[:, start:], rtol=1e-5, atol=1e-5)
        assert ours["davit"].shape == (3, 16 + keep_pooled, 64)
        for p in tower.prompt_names:
            text = TASK_PROMPTS[
                {"caption": "<DETAILED_CAPTION>", "ocr": "<OCR>", "grounding": "<DENSE_REGION_CAPTION>"}[p]
            ]
            ref = reference_encoder_output(full, tok, px, text)[:, start:]
            assert ours[p].shape == ref.shape == (3, 16 + keep_pooled, 64)
            torch.testing.assert_close(ours[p], ref, rtol=1e-5, atol=1e-5)
    # prompts of different lengths were batched with padding: the point of the comparison
    assert not bool(tower.prompt_mask.all())


def test_davit_runs_once_and_the_decoder_never(reference_dir):
    tower = pretrained_tower(reference_dir)
    calls = {"davit": 0, "encoder": 0}
    tower.davit.register_forward_hook(lambda *a: calls.__setitem__("davit", calls["davit"] + 1))
    tower.encoder.register_forward_hook(lambda *a: calls.__setitem__("encoder", calls["encoder"] + 1))
    with torch.no_grad():
        feats = tower.features(torch.randn(2, 3, 64, 64))
    assert list(feats) == ["davit", "caption", "ocr", "grounding"]
    assert calls == {"davit": 1, "encoder": 1}  # all prompts in one encoder batch
    assert not any("decoder" in n for n, _ in tower.named_parameters())


def test_subset_is_computed_alone_and_matches_the_full_set(reference_dir):
    tower = pretrained_tower(reference_dir)
    px = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full = tower.features(px)
        only_ocr = tower.features(px, ["ocr"])
        only_davit = tower.features(px, ["davit"])
    assert list(only_ocr) == ["ocr"] and list(only_davit) == ["davit"]
    torch.testing.assert_close(only_ocr["ocr"], full["ocr"], rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="unknown vision feature"):
        tower.features(px, ["depth"])


def test_prompts_free_text_and_task_tokens():
    assert expand_prompt("<OCR>") == "What is the text in the image?"
    assert expand_prompt("What colour is it?") == "What colour is it?"
    with pytest.raises(ValueError, match="unknown Florence-2 task token"):
        expand_prompt("<NOT_A_TASK>")
    cfg = tiny_cfg().vision
    cfg.prompts = [PromptConfig("mine", "What colour is the shape?"), PromptConfig("od", "<OD>")]
    tower, _ = build_vision_tower(cfg)
    assert tower.feature_names == ["davit", "mine", "od"]
    assert tower.prompt_texts == [
        "What colour is the shape?",
        "Locate the objects with category name in the image.",
    ]


def test_token_count_follows_resolution():
    cfg = tiny_cfg("vision.image_size=128").vision
    tower, _ = build_vision_tower(cfg)
    assert tower.num_tokens == 64
    assert tower.features(torch.randn(1, 3, 128, 128))["caption"].shape == (1, 64, 64)
    # the paper's 576 tokens at 768 px with Florence-2's default strides (no weights needed for the arithmetic)
    from transformers import Florence2VisionConfig

    from fvl.assets.florence2_arch import davit_tokens

    assert davit_tokens(Florence2VisionConfig(), 768) == 576
