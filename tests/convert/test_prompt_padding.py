"""``model.vision.prompt_padding``: ``masked`` (fvl's default) vs ``unmasked`` (the authors' Florence-VL: the
padded prompt ids fed without an attention mask)."""

from __future__ import annotations

import pytest
import torch

from fvl.config import ConfigError
from fvl.models.vision import build_vision_tower
from tests.fixtures import tiny_cfg


def towers(*overrides: str):
    """The same random tower twice: prompt padding masked, then unmasked."""
    out = []
    for padding in ("masked", "unmasked"):
        torch.manual_seed(0)
        cfg = tiny_cfg(*overrides, f"vision.prompt_padding={padding}").vision
        out.append(build_vision_tower(cfg)[0].eval())
    return out


def test_unmasked_attends_to_the_pads_of_shorter_prompts():
    masked, unmasked = towers()
    # the tiny tokenizer: caption and grounding 15 ids with <s> </s>, ocr 11: ocr is padded with 4 <pad>s
    assert masked.prompt_padded == [False, True, False] and masked.prompt_ids.shape == (3, 15)
    torch.manual_seed(1)
    px = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = masked.features(px), unmasked.features(px)
        for name in ("davit", "caption", "grounding"):  # nothing padded: the same
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
        assert (a["ocr"] - b["ocr"]).abs().max() > 1e-3  # the pads change what the image tokens attend to

        # unmasked is the encoder on [image tokens, <s> ocr </s> <pad> x4] with no mask at all
        image = unmasked.image_tokens(px)
        text = unmasked.encoder.embed_tokens(unmasked.prompt_ids[1:2]).expand(2, -1, -1)
        assert unmasked.prompt_ids[1, -4:].tolist() == [unmasked.tokenizer.pad_token_id] * 4
        ref = unmasked.encoder(inputs_embeds=torch.cat([image, text], dim=1)).last_hidden_state
        torch.testing.assert_close(b["ocr"], ref[:, 1 : image.shape[1]])
        # and masked is the ocr prompt alone, unpadded
        alone = masked.encoder(inputs_embeds=torch.cat([image, text[:, :11]], dim=1)).last_hidden_state
        torch.testing.assert_close(a["ocr"], alone[:, 1 : image.shape[1]])


def test_prompts_of_one_length_give_the_same_features_either_way():
    masked, unmasked = towers("vision.prompts=[{name: caption, text: '<DETAILED_CAPTION>'}]")
    assert masked.prompt_padded == [False]
    px = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(masked.features(px), unmasked.features(px), rtol=0, atol=0)


def test_an_unknown_padding_mode_is_refused():
    with pytest.raises(
        ConfigError, match=r"model.vision.prompt_padding='both': expected one of masked, unmasked"
    ):
        tiny_cfg("vision.prompt_padding=both")
