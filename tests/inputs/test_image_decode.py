"""Images are decoded once, at the size needed, to uint8; the model normalises them as the float pipeline did.

``old_float_transform`` is the transform as it was before uint8 (pad the full image, resize, normalise in
float32): the references the new path is held to."""

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, JpegImagePlugin

from fvl.bench.images import photo_like
from fvl.inputs.collate import Sample, collate
from fvl.inputs.transform import MAX_IMAGE_PIXELS, ImageError, ImageTransform, to_rgb

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FILL = (124, 116, 104)  # MEAN in 0..255


def transform(size=64, mode="pad"):
    return ImageTransform(size, MEAN, STD, mode)


def encode(image, fmt="PNG", **kw):
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def old_float_transform(image, size, mean=MEAN, std=STD, mode="pad"):
    """The float pipeline before uint8: RGB, pad the full-size image to square, bicubic resize, normalise."""
    image = to_rgb(image)
    if mode == "pad" and image.width != image.height:
        side = max(image.size)
        canvas = Image.new("RGB", (side, side), tuple(int(round(255 * m)) for m in mean))
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = canvas
    image = image.resize((size, size), Image.Resampling.BICUBIC)
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (arr - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def odd_images():
    """Encoded images of every mode the loader meets, 60x40 (not square, so pad mode pads)."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    palette = rgb.convert("P")
    palette.info["transparency"] = 0
    return {
        "rgb_jpeg": encode(rgb, "JPEG", quality=90),
        "gray_png": encode(rgb.convert("L")),
        "cmyk_jpeg": encode(rgb.convert("CMYK"), "JPEG"),
        "rgba_png": encode(rgb.convert("RGBA")),
        "palette_transparent_png": encode(palette),
        "i16_png": encode(Image.fromarray(rng.integers(0, 65535, (40, 60)).astype(np.uint16))),
    }


# ---- shapes, modes, geometry ----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["square", "pad"])
@pytest.mark.parametrize("kind", list(odd_images()))
def test_decode_gives_uint8_square_for_every_mode(kind, mode):
    data = odd_images()[kind]
    t = transform(32, mode)
    out = t.decode(data, kind)
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32) and out.is_contiguous()
    # an image already open gets the same geometry (no DCT scaling for these small files: the same pixels)
    torch.testing.assert_close(t(Image.open(io.BytesIO(data))), out, rtol=0, atol=0)
    if mode == "pad":  # 60x40 -> 32x21 centred: the top and bottom rows are the fill colour
        assert out[:, 0].T.tolist() == [list(FILL)] * 32 and out[:, -1].T.tolist() == [list(FILL)] * 32


def test_odd_modes_become_the_right_colours():
    t = transform(16, "square")
    transparent = Image.new("RGBA", (20, 20), (255, 0, 0, 0))  # onto white
    assert t.decode(encode(transparent)).unique().tolist() == [255]
    i16 = Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16))  # by its depth: 40000 / 257
    assert t.decode(encode(i16)).unique().tolist() == [156]
    cmyk_red = Image.new("RGB", (20, 20), (255, 0, 0)).convert("CMYK")
    red = t.decode(encode(cmyk_red, "JPEG", quality=95)).float().mean(dim=(1, 2))
    assert red[0] > 240 and red[1] < 15 and red[2] < 15


@pytest.mark.parametrize("level", [0, 1000, 32896, 65535])
def test_a_16_bit_greyscale_png_is_scaled_by_its_depth_not_its_maximum(level):
    """A dark 16-bit picture stays dark (1000 of 65535 is grey level 4, not white)."""
    png = io.BytesIO()
    Image.fromarray(np.full((8, 8), level, dtype=np.uint16)).save(png, "PNG")
    decoded = Image.open(io.BytesIO(png.getvalue()))
    assert decoded.mode.startswith("I")
    assert set(np.asarray(to_rgb(decoded)).ravel().tolist()) == {round(level / 257)}


def test_pad_centres_the_image_on_the_mean_colour():
    wide = Image.new("RGB", (200, 100), (255, 0, 0))
    out = transform(64, "pad").decode(encode(wide))
    assert out.shape == (3, 64, 64)
    assert all(out[:, r].T.tolist() == [list(FILL)] * 64 for r in (0, 15, 48, 63))  # 16 rows above, 16 below
    assert (out[:, 20:44] == torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1)).all()
    tall = transform(64, "pad")(wide.transpose(Image.Transpose.ROTATE_90))  # the same, sideways
    assert (tall[:, :, 20:44] == torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1)).all()
    assert tall[:, :, 0].T.tolist() == [list(FILL)] * 64
    square = transform(64, "square").decode(encode(wide))
    assert (square == torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1)).all()


@pytest.mark.parametrize("mode", ["square", "pad"])
def test_uint8_normalised_equals_the_old_float_transform(mode):
    """Same geometry as pad-then-resize, same normalisation: equal (well within the one grey level asked for,
    1/255/std), but for the two rows either side of a pad seam, where the old bicubic resize blended the
    image into the fill colour and the new one, resizing the image alone, does not."""
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 128, 3), dtype=np.uint8))
    t = transform(64, mode)
    new = t.normalize(t(image))
    old = old_float_transform(image, 64, mode=mode)
    assert new.dtype == torch.float32 and new.shape == old.shape
    rows = list(range(64)) if mode == "square" else [*range(0, 14), *range(18, 46), *range(50, 64)]
    torch.testing.assert_close(new[:, rows], old[:, rows], rtol=0, atol=1e-6)
    assert t.normalize(old) is old  # already normalised floats pass through


def test_normalize_on_its_device_and_refuses_other_integers():
    t = transform(8)
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 2, 1).expand(3, 2, 1)
    out = t.normalize(x)
    expected = (torch.tensor([0.0, 1.0]).view(1, 2, 1) - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(
        STD
    ).view(3, 1, 1)
    torch.testing.assert_close(out, expected)
    assert out.device == x.device and t.normalize(x[None]).shape == (1, 3, 2, 1)  # batches too
    with pytest.raises(TypeError, match="int32"):
        t.normalize(x.to(torch.int32))


# ---- decoding once, at the size needed -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def photo_jpeg():
    return encode(photo_like(2250, 1500, seed=3), "JPEG", quality=90)


def spy_draft(monkeypatch):
    calls = []
    real = JpegImagePlugin.JpegImageFile.draft

    def draft(self, mode, size):
        result = real(self, mode, size)
        calls.append((size, result, self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", draft)
    return calls


def test_jpeg_is_decoded_at_the_smallest_dct_scale_that_covers_the_target(photo_jpeg, monkeypatch):
    calls = spy_draft(monkeypatch)
    assert transform(768, "pad").decode(photo_jpeg).shape == (3, 768, 768)
    # pad: 768x512 is the target; 1/2 scale (1125x750) covers it, 1/4 (563x375) would not
    assert calls == [((768, 512), ("RGB", (0, 0, 1125.0, 750.0)), (1125, 750))]
    calls.clear()
    transform(768, "square").decode(photo_jpeg)  # 768 rows are needed from 1500: no scaling possible
    assert calls == [((768, 768), ("RGB", (0, 0, 2250.0, 1500.0)), (2250, 1500))]
    calls.clear()
    transform(256, "square").decode(photo_jpeg)
    assert calls[0][2] == (563, 375)  # 1/4: 375 rows >= 256, 1/8 would give 188
    calls.clear()
    transform(768)(Image.open(io.BytesIO(photo_jpeg)))  # an image the caller opened is left at full size
    assert calls == []
    frames = [photo_like(1200, 800, seed=s) for s in (1, 2)]
    mpo = encode(frames[0], "MPO", save_all=True, append_images=frames[1:], quality=90)  # a phone photo
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    transform(384, "pad").decode(mpo)
    assert calls == [((384, 256), ("RGB", (0, 0, 600.0, 400.0)), (600, 400))]


@pytest.mark.parametrize("mode", ["square", "pad"])
def test_decode_is_close_to_the_full_resolution_path(photo_jpeg, mode):
    t = transform(768, mode)
    reference = old_float_transform(Image.open(io.BytesIO(photo_jpeg)), 768, mode=mode)
    decoded = t.normalize(t.decode(photo_jpeg))
    grey_levels = ((decoded - reference) * torch.tensor(STD).view(3, 1, 1) * 255).abs()
    assert grey_levels.mean() < 3.0


def test_pickled_transform_decodes_the_same(photo_jpeg):
    import pickle

    t = transform(128, "pad")
    again = pickle.loads(pickle.dumps(t))
    assert again == t
    torch.testing.assert_close(again.decode(photo_jpeg), t.decode(photo_jpeg), rtol=0, atol=0)
    with pytest.raises(AttributeError):
        t.size = 3  # frozen


# ---- bad bytes -----------------------------------------------------------------------------------------------
def reason(data, size=64):
    with pytest.raises(ImageError) as info:
        transform(size).decode(data, "sample7")
    assert isinstance(info.value, ValueError) and "sample7" in str(info.value)
    return info.value.reason


def test_bad_bytes_raise_image_error_with_a_reason(photo_jpeg):
    assert reason(photo_jpeg[: len(photo_jpeg) // 2]) == "unreadable_image"  # truncated JPEG
    assert reason(photo_jpeg[:300]) == "unreadable_image"  # truncated inside the header
    corrupt = photo_jpeg[:2000] + bytes(len(photo_jpeg) - 2000)
    assert reason(corrupt) == "unreadable_image"
    assert reason(b"\x89PNG\r\n\x1a\n" + b"junk" * 20) == "unreadable_image"  # a PNG signature, then junk
    assert reason(b"not an image at all") == "unreadable_image"
    assert reason(b"") == "empty_image"
    with pytest.raises(ImageError) as info:
        transform()(Image.new("RGB", (0, 0)))
    assert info.value.reason == "empty_image"
    with pytest.raises(ImageError) as info:  # an image opened lazily by the caller, its data cut short
        transform()(Image.open(io.BytesIO(photo_jpeg[: len(photo_jpeg) // 2])))
    assert info.value.reason == "unreadable_image"
    with pytest.raises(ValueError, match="expected one of"):
        ImageError("no_such_reason")


def test_a_truncated_jpeg_fails_whatever_the_global_flag_says(photo_jpeg, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some other library might set it
    assert reason(photo_jpeg[: len(photo_jpeg) // 2], 768) == "unreadable_image"
    assert transform(768).decode(photo_jpeg).shape == (3, 768, 768)  # a whole file still decodes
    # (lmms-eval sets the flag when imported) an image the caller opened lazily fails too
    with pytest.raises(ImageError, match="truncated"):
        transform(768)(Image.open(io.BytesIO(photo_jpeg[: len(photo_jpeg) // 2])))
    assert transform(768)(Image.open(io.BytesIO(photo_jpeg))).shape == (3, 768, 768)


def test_bombs_are_refused_from_the_header_before_decoding(monkeypatch):
    bomb = encode(Image.new("1", (12000, 9000)))  # 108M pixels > 89.5M, a tiny file
    huge = encode(Image.new("1", (20000, 9000)))  # 180M: PIL itself refuses at open (above twice its limit)

    def no_decoding(self):
        raise AssertionError("decoded pixels of a decompression bomb")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert reason(bomb) == reason(huge) == "decompression_bomb"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # a global switched off elsewhere changes nothing
    assert reason(bomb) == "decompression_bomb"
    assert 12000 * 9000 > MAX_IMAGE_PIXELS == 89_478_485


# ---- processor and model -------------------------------------------------------------------------------------
def test_processor_takes_bytes_and_images_and_yields_uint8(tiny_model):
    processor = tiny_model.processor
    data = odd_images()["rgb_jpeg"]
    conv = [{"from": "human", "value": "<image>\n<image>\nSame?"}, {"from": "gpt", "value": "yes"}]
    sample = processor(conv, [data, Image.open(io.BytesIO(data))], "s1")
    assert [im.dtype for im in sample.images] == [torch.uint8, torch.uint8]
    torch.testing.assert_close(sample.images[0], processor.transform.decode(data), rtol=0, atol=0)
    with pytest.raises(ImageError, match="s1") as info:
        processor(conv, [data[:100], data], "s1")
    assert info.value.reason == "unreadable_image"


def test_model_forward_on_uint8_equals_forward_on_normalised_floats(tiny_model):
    m = tiny_model
    t = m.processor.transform
    size = m.vision.image_size
    uint8 = [torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
             for i in range(2)]  # fmt: skip
    conv = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    tok = m.template.tokenize(conv, m.tokenizer, m.num_image_tokens)
    as_uint8 = collate([Sample(tok.input_ids, tok.labels, [im]) for im in uint8], m.tokenizer.pad_token_id)
    as_float = collate([Sample(tok.input_ids, tok.labels, [t.normalize(im)]) for im in uint8], m.tokenizer.pad_token_id)  # fmt: skip
    assert as_uint8["pixel_values"].dtype == torch.uint8 and as_float["pixel_values"].dtype == torch.float32
    with torch.no_grad():
        a, b = m(as_uint8), m(as_float)
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
        torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
        # and the uint8 batch is not read as raw 0..255 floats
        assert not torch.allclose(m.encode_images(as_uint8["pixel_values"].float()), m.encode_images(as_uint8["pixel_values"]))  # fmt: skip
    with pytest.raises(TypeError, match="normalise uint8"):  # the tower alone wants floats
        m.vision.features(as_uint8["pixel_values"])


def test_generate_and_eval_run_on_images_bytes_and_tensors(tiny_model, monkeypatch):
    from fvl.eval.benchmarks import synthetic
    from fvl.eval.evaluate import evaluate

    m = tiny_model
    seen = []  # what reaches the tower: the normalised pixels of each generate call
    features = m.vision.features
    monkeypatch.setattr(m.vision, "features", lambda px, names=None: seen.append(px) or features(px, names))
    bench = synthetic(4, image_size=48)  # 48 px images, resized to the tower's 64
    images = [s.load_images()[0] for s in bench.samples]
    prompts = [s.prompt for s in bench.samples]
    pad = m.processor.transform.with_mode("pad")
    floats = [pad.normalize(pad(im)) for im in images]
    expected = m.generate(floats, prompts, max_new_tokens=3)  # the float path, as before
    inputs = {
        "pil": images,  # PIL -> uint8 -> normalised on the device
        "bytes": [encode(im) for im in images],
        "mixed": [pad(images[0]), floats[1], images[2], encode(images[3])],
    }
    for name, batch in inputs.items():
        assert m.generate(batch, prompts, max_new_tokens=3) == expected, name
        torch.testing.assert_close(seen[-1], seen[0], rtol=0, atol=0, msg=name)
    assert m.preprocess([]).dtype == torch.uint8
    result = evaluate(m, bench, batch_size=2, max_new_tokens=3, progress=False)
    assert [r["prediction"] for r in result.records] == expected
    torch.testing.assert_close(torch.cat(seen[-2:]), seen[0], rtol=0, atol=0)
