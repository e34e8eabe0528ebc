"""``fvl export``'s vision folder carries its preprocessing: transformers' ``AutoProcessor`` /
``AutoImageProcessor`` load there and give the pixel values fvl's own transform gives; and the README's
inference snippet runs on an exported folder."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, Florence2ForConditionalGeneration

from fvl.convert import export, load_exported
from fvl.models import build_model
from tests.fixtures import tower_cfg


def picture(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


# up to 4x the tower's size per side: one-step resizing in both (fvl shrinks larger images in two steps)
PICTURES = [
    (47, 30, "RGB"),
    (64, 64, "RGB"),
    (200, 120, "RGB"),
    (90, 250, "RGB"),
    (60, 50, "L"),
    (50, 61, "RGBA"),
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(tower_cfg("florence2")).eval()
    return model, export(model, tmp_path_factory.mktemp("export") / "out")


def fvl_pixels(model, image: Image.Image) -> torch.Tensor:
    transform = model.vision.transform("square")
    return transform.normalize(transform(image)[None])


def test_florence2_autoprocessor_matches_fvl_and_feeds_transformers_florence2(exported):
    model, out = exported
    processor = AutoProcessor.from_pretrained(out / "vision")
    assert type(processor).__name__ == "Florence2Processor"
    image_processor = AutoImageProcessor.from_pretrained(out / "vision")
    for i, (w, h, mode) in enumerate(PICTURES):
        image = picture(w, h, mode, seed=i)
        inputs = processor(text="<OCR>", images=image, return_tensors="pt")
        torch.testing.assert_close(inputs["pixel_values"], fvl_pixels(model, image), rtol=0, atol=0)
        torch.testing.assert_close(
            torch.as_tensor(image_processor(image, return_tensors="pt")["pixel_values"]),
            inputs["pixel_values"],
        )
    # one placeholder per image token transformers' Florence-2 makes (DaViT's + the pooled one), and the
    # processor's inputs run its model: the image features are fvl's davit feature (pooled token first)
    image_token_id = processor.tokenizer.image_token_id
    assert int((inputs["input_ids"] == image_token_id).sum()) == model.vision.num_tokens + 1
    florence = Florence2ForConditionalGeneration.from_pretrained(out / "vision").eval()
    assert florence.config.image_token_id == image_token_id
    with torch.no_grad():
        florence(**inputs, decoder_input_ids=torch.tensor([[2]]))
        features = florence.model.get_image_features(inputs["pixel_values"]).pooler_output
        torch.testing.assert_close(features[:, 1:], model.vision.features(inputs["pixel_values"])["davit"])


def test_large_images_differ_only_by_fvls_two_step_shrink(exported):
    model, out = exported
    image_processor = AutoImageProcessor.from_pretrained(out / "vision")
    image = picture(
        640, 480
    )  # 10x the tower's 64 px: fvl reduces by a box filter first, transformers does not
    diff = torch.as_tensor(image_processor(image, return_tensors="pt")["pixel_values"]) - fvl_pixels(
        model, image
    )
    assert 0 < float(diff.abs().mean()) < 0.02 * 2.2  # under 2 % of the normalised range on average


def test_export_folder_still_loads_into_fvl_with_the_same_preprocessing(exported):
    model, out = exported
    config = json.loads((out / "vision" / "preprocessor_config.json").read_text())
    assert config["image_mean"] == list(model.vision.image_mean) and config["size"]["height"] == 64
    again = load_exported(out).eval()  # its answers equal the original's: the README snippet's test
    assert again.processor.transform == model.processor.transform
    assert again.processor.tokenizer.image_token_id == model.image_token_id


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_vit_towers_export_their_image_processor(tower, tmp_path):
    torch.manual_seed(0)
    model = build_model(tower_cfg(tower)).eval()
    out = export(model, tmp_path / tower)
    name = {"clip": "CLIPImageProcessorPil", "siglip": "SiglipImageProcessorPil"}[tower]
    for loader in (AutoImageProcessor, AutoProcessor):
        processor = loader.from_pretrained(out / "vision")
        assert type(processor).__name__ == name
        for w, h, mode in [(47, 30, "RGB"), (100, 60, "L")]:
            image = picture(w, h, mode)
            pixels = torch.as_tensor(processor(image, return_tensors="pt")["pixel_values"])
            torch.testing.assert_close(pixels, fvl_pixels(model, image), rtol=0, atol=0)


def test_readme_inference_snippet_runs_on_an_exported_folder(exported, tmp_path, monkeypatch):
    model, out = exported
    monkeypatch.chdir(tmp_path)
    shutil.copytree(out, tmp_path / "exported")
    picture(48, 40, seed=1).save("photo.jpg")
    picture(30, 50, seed=2).save("chart.png")

    # --- mirrors the README's "Inference from an exported folder" snippet (keep the two in sync) ---
    import torch
    from PIL import Image

    from fvl.convert import load_exported

    model = load_exported("exported").eval()  # the folder `fvl export CKPT exported` wrote
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    images = [Image.open("photo.jpg"), Image.open("chart.png")]  # PIL images (any mode) or encoded bytes
    questions = ["What is in the picture?", "What is the highest bar's value?"]
    answers = model.generate(images, questions, max_new_tokens=16)  # greedy, batched, chat template applied
    print(answers)
    # --- end of the README snippet ---

    original = exported[0]
    assert answers == original.generate(
        [Image.open("photo.jpg"), Image.open("chart.png")], questions, max_new_tokens=16
    )
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
