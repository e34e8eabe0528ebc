"""The composed model: placeholder merge with its count check, mixed batches, loss, generation with the KV cache."""

import pytest
import torch

from fvl.inputs.collate import Sample, collate
from fvl.models import ImageTokenMismatch, build_model
from fvl.text.templates import IGNORE_INDEX
from tests.fixtures import TINY_LLAMA, tiny_cfg


def sample(model, question, answer, images):
    conv = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    t = model.template.tokenize(conv, model.tokenizer, model.num_image_tokens, num_images=len(images))
    return Sample(t.input_ids, t.labels, images)


def test_encode_images_shape(tiny_model):
    out = tiny_model.encode_images(torch.randn(3, 3, 64, 64))
    assert out.shape == (3, tiny_model.num_image_tokens, tiny_model.hidden_size) == (3, 16, 128)


def test_features_api(tiny_model):
    feats = tiny_model.vision.features(torch.randn(2, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        n: (2, 16, 64) for n in ["davit", "caption", "ocr", "grounding"]
    }


def test_mixed_batch_several_images_and_text_only(tiny_model):
    m = tiny_model
    img = [torch.randn(3, 64, 64) for _ in range(3)]
    samples = [
        sample(m, "<image>\nWhat colour?", "red", img[:1]),
        sample(m, "Tell me a word.", "cat", []),  # text-only
        sample(m, "<image>\n<image>\nSame shape?", "no", img[1:]),
    ]
    batch = collate(samples, m.tokenizer.pad_token_id)
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    out = m(batch)
    assert torch.isfinite(out.loss)
    # the images land exactly where the placeholders are, in order
    embeds = m.embed(batch["input_ids"], batch["pixel_values"])
    feats = m.encode_images(batch["pixel_values"])
    rows, cols = torch.nonzero(batch["input_ids"] == m.image_token_id, as_tuple=True)
    torch.testing.assert_close(embeds[rows, cols], feats.reshape(-1, feats.shape[-1]))
    # a text-only batch needs no pixel values at all
    text_only = collate([samples[1]], m.tokenizer.pad_token_id)
    assert "pixel_values" not in text_only and torch.isfinite(m(text_only).loss)


def test_loss_is_over_supervised_tokens_only(tiny_model):
    m = tiny_model
    batch = collate(
        [sample(m, "<image>\nWhat colour?", "red", [torch.randn(3, 64, 64)])], m.tokenizer.pad_token_id
    )
    logits = m(batch).logits
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(logits[:, :-1][keep], labels[keep])
    torch.testing.assert_close(m(batch).loss, manual)


def test_placeholder_count_mismatch_is_a_clear_error(tiny_model):
    m = tiny_model
    batch = collate(
        [sample(m, "<image>\nWhat colour?", "red", [torch.randn(3, 64, 64)])], m.tokenizer.pad_token_id
    )
    with pytest.raises(ImageTokenMismatch, match="16 image placeholder tokens in the batch but 2 image"):
        m.embed(batch["input_ids"], torch.randn(2, 3, 64, 64))
    with pytest.raises(ImageTokenMismatch, match="but 0 image"):
        m.embed(batch["input_ids"], None)
    broken = batch["input_ids"].clone()
    broken[0, torch.nonzero(broken[0] == m.image_token_id)[0]] = 5  # one placeholder lost
    with pytest.raises(ImageTokenMismatch, match="15 image placeholder"):
        m.embed(broken, batch["pixel_values"])


def test_a_host_side_placeholder_count_spares_the_device_sync(tiny_model, monkeypatch):
    m = tiny_model
    batch = collate(
        [sample(m, "<image>\nWhat colour?", "red", [torch.randn(3, 64, 64)])], m.tokenizer.pad_token_id
    )
    with pytest.raises(ImageTokenMismatch, match="15 image placeholder"):
        m.embed(
            batch["input_ids"], batch["pixel_values"], placeholders=15
        )  # the given count is what is checked

    def no_sync(*args):
        raise AssertionError("a device-to-host read in the training forward")

    expected = m.embed(batch["input_ids"], batch["pixel_values"])
    monkeypatch.setattr(torch.Tensor, "__int__", no_sync)
    monkeypatch.setattr(torch.Tensor, "item", no_sync)
    monkeypatch.setattr(torch.Tensor, "__bool__", no_sync)
    got = m.embed(batch["input_ids"], batch["pixel_values"], placeholders=16)
    monkeypatch.undo()
    torch.testing.assert_close(got, expected)


def greedy_without_cache(model, image, prompt, steps):
    """Reference decoding: the full sequence re-run every step, no KV cache."""
    ids = model.template.prompt(prompt, model.tokenizer, model.num_image_tokens).input_ids
    ids = torch.tensor([ids])
    out = []
    for _ in range(steps):
        embeds = model.embed(ids, image[None])
        nxt = model.llm(inputs_embeds=embeds).logits[0, -1].argmax().item()
        if nxt in model.template.stop_token_ids(model.tokenizer):
            break
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return model.tokenizer.decode(out, skip_special_tokens=True).strip()


@pytest.mark.parametrize("llm", ["phi3", "llama"])
def test_generate_with_cache_matches_uncached_greedy_and_batching(llm):
    cfg = tiny_cfg() if llm == "phi3" else tiny_cfg("text.template=llama3", llm_arch=dict(TINY_LLAMA))
    torch.manual_seed(3)
    m = build_model(cfg).eval()
    assert m.llm.config.model_type == llm
    images = [torch.randn(3, 64, 64) for _ in range(3)]
    prompts = ["<image>\nWhat colour is the shape?", "What is the text in the image?", "<image>\nHow many?"]
    batched = m.generate(images, prompts, max_new_tokens=6)
    single = [m.generate([im], [p], max_new_tokens=6)[0] for im, p in zip(images, prompts, strict=True)]
    reference = [
        greedy_without_cache(m, im, p if "<image>" in p else "<image>\n" + p, 6)
        for im, p in zip(images, prompts, strict=True)
    ]
    assert batched == single == reference
    assert any(r for r in reference)  # something was generated


def test_generate_text_only_and_multi_image(tiny_model):
    out = tiny_model.generate(
        [None, [torch.randn(3, 64, 64), torch.randn(3, 64, 64)]], ["Hi", "Compare"], max_new_tokens=3
    )
    assert len(out) == 2 and all(isinstance(o, str) for o in out)


def test_generate_from_pil(tiny_model):
    from PIL import Image

    image = Image.new("RGBA", (80, 40), (255, 0, 0, 128))
    assert len(tiny_model.generate([image], ["What colour?"], max_new_tokens=2)) == 1
