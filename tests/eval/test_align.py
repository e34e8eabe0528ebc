"""fvl align: the held-out metrics on fixed tensors, the train / held-out split, why the projection is an MLP,
seeds, real caption files and the CLI."""

import csv
import json
import math

import pytest
import torch
from PIL import Image
from torch import nn

from fvl.config.eval import AlignConfig
from fvl.config.model import FusionConfig
from fvl.eval.align import (
    PairFeatures,
    alignment_analysis,
    contrastive_loss,
    derangement,
    encode_pairs,
    format_table,
    heldout_loss,
    matched_vs_shuffled,
    parse_variant,
    pooled,
    projection,
    read_captions,
    retrieval_top1,
    split_pairs,
    write_results,
)
from fvl.models.fusion import build_fusion

AVG = parse_variant("avg=avg_pool:a+b")
CONCAT = parse_variant("concat=token_concat:a+b")
CHANNELS = parse_variant("channels=dbfusion:a+b")


def unit(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.normalize(x, dim=-1)


# ---- metrics on fixed tensors ----------------------------------------------------------------------------------


def test_contrastive_loss_of_a_2x2_case_by_hand():
    eye = torch.eye(2)
    # logits [[2, 0], [0, 2]] at temperature 0.5: each row's loss is -log(e^2 / (e^2 + e^0)) = log(1 + e^-2)
    assert contrastive_loss(eye, eye, 0.5).item() == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-6)
    # captions swapped: each row's own logit is 0 and the other 2
    assert contrastive_loss(eye, eye.flip(0), 0.5).item() == pytest.approx(
        math.log(1 + math.exp(2)), abs=1e-6
    )


def test_aligned_vectors_score_perfectly_and_opposite_ones_never():
    text = unit(torch.randn(12, 16, generator=torch.Generator().manual_seed(0)))
    mismatch = derangement(12, torch.Generator().manual_seed(1))
    assert retrieval_top1(text, text, batch_size=4) == 1.0
    assert matched_vs_shuffled(text, text, mismatch) == 1.0
    assert matched_vs_shuffled(-text, text, mismatch) == 0.0
    assert heldout_loss(text, text, 0.01, batch_size=4) < 1e-3


def test_identical_vision_vectors_score_chance():
    text = unit(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)))
    same = unit(torch.ones(8, 16))
    # Every row of the logits is the same vector s, so the loss is logsumexp(s) - mean(s) >= log(batch):
    # exactly log(batch) when s is constant (the vision vector orthogonal to every caption, or one caption
    # for all), more otherwise: an image embedding that ignores the image cannot beat chance.
    orthogonal = torch.zeros(8, 17)
    orthogonal[:, 0] = 1
    padded = torch.cat([torch.zeros(8, 1), text], 1)
    assert heldout_loss(orthogonal, padded, 0.07, batch_size=4) == pytest.approx(math.log(4), abs=1e-6)
    assert heldout_loss(text, same, 0.07, batch_size=4) == pytest.approx(math.log(4), abs=1e-6)
    assert heldout_loss(same, text, 0.07, batch_size=4) > math.log(4)
    # one image per batch wins (the one whose caption lies nearest the shared vector): 1 / batch_size
    assert retrieval_top1(same, text, batch_size=4) == pytest.approx(1 / 4)
    # a caption that appears twice ties with itself: half a point, not a win
    assert matched_vs_shuffled(same, same, derangement(8, torch.Generator())) == 0.5


def test_heldout_loss_averages_full_batches_and_leaves_the_remainder_out():
    g = torch.Generator().manual_seed(0)
    vision, text = unit(torch.randn(10, 8, generator=g)), unit(torch.randn(10, 8, generator=g))
    by_hand = (
        contrastive_loss(vision[:4], text[:4], 0.1) + contrastive_loss(vision[4:8], text[4:8], 0.1)
    ) / 2
    assert heldout_loss(vision, text, 0.1, batch_size=4) == pytest.approx(by_hand.item(), abs=1e-6)
    with pytest.raises(ValueError, match="fewer than one batch"):
        retrieval_top1(vision[:3], text[:3], batch_size=4)


def test_derangement_and_split():
    for seed in range(5):
        d = derangement(7, torch.Generator().manual_seed(seed))
        assert sorted(d.tolist()) == list(range(7)) and all(d[i] != i for i in range(7))
    train, held = split_pairs(100, 0.25, 8, torch.Generator().manual_seed(0))
    assert len(held) == 24 and len(train) == 76  # 25 rounded to whole batches
    assert sorted(torch.cat([train, held]).tolist()) == list(range(100))
    other = split_pairs(100, 0.25, 8, torch.Generator().manual_seed(1))[1]
    assert set(held.tolist()) != set(other.tolist())
    assert len(split_pairs(16, 0.9, 8, torch.Generator())[1]) == 8  # a training batch is always kept
    with pytest.raises(ValueError, match="2 x batch_size = 16"):
        split_pairs(15, 0.25, 8, torch.Generator())


# ---- why the projection is an MLP ------------------------------------------------------------------------------


def _fused(variant, feats):
    fusion = build_fusion(FusionConfig(variant.fusion, variant.features), {"a": 8, "b": 8}, 4)
    return fusion(feats)


def test_a_linear_projection_cannot_tell_token_concat_from_avg_pool():
    """mean_tokens(P(x)) = P(mean_tokens(x)) for a linear P, so the mean over 2N concatenated tokens equals
    the mean over N averaged ones: the reason the analysis projects with Linear -> GELU -> Linear."""
    g = torch.Generator().manual_seed(0)
    feats = {"a": torch.randn(3, 4, 8, generator=g), "b": torch.randn(3, 4, 8, generator=g) * 3}
    torch.manual_seed(0)
    linear, mlp = nn.Linear(8, 16), projection(8, 32, 16)
    assert torch.allclose(
        pooled(linear, _fused(AVG, feats)), pooled(linear, _fused(CONCAT, feats)), atol=1e-6
    )
    assert not torch.allclose(pooled(mlp, _fused(AVG, feats)), pooled(mlp, _fused(CONCAT, feats)), atol=1e-3)


def _pairs(n=96, tokens=4, seed=0):
    """Two features of different statistics and captions that depend on them nonlinearly."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, tokens, 8, generator=g), torch.randn(n, tokens, 8, generator=g) * 2
    mix = torch.randn(16, 16, generator=g)
    text = unit(
        torch.cat([a.relu().mean(1), b.abs().mean(1)], -1) @ mix + 0.1 * torch.randn(n, 16, generator=g)
    )
    return PairFeatures({"a": a, "b": b}, text)


def test_token_concat_and_avg_pool_differ_on_heldout_pairs(tmp_path):
    cfg = AlignConfig(steps=15, batch_size=8, samples=96, seeds=2, hidden=32, lr=1e-2)
    result = alignment_analysis(None, [AVG, CONCAT, CHANNELS], cfg, features=_pairs())
    assert result.pairs == 96 and result.heldout_pairs == 24 and len(result.runs) == 6
    avg, concat, channels = (result.of(v) for v in ("avg", "concat", "channels"))
    assert all(abs(x.heldout_loss - y.heldout_loss) > 1e-4 for x, y in zip(avg, concat, strict=True))
    # the same widths in: the same parameters; channel concatenation doubles the first layer's inputs
    assert avg[0].trainable_params == concat[0].trainable_params == (8 * 32 + 32) + (32 * 16 + 16)
    assert channels[0].trainable_params == (16 * 32 + 32) + (32 * 16 + 16)
    for r in result.runs:
        assert 0 <= r.retrieval_top1 <= 1 and 0 <= r.matched_vs_shuffled <= 1 and len(r.train_loss) == 15
    # seeds change the split, the init and the order: the two seeds of a variant score differently
    assert avg[0].heldout_loss != avg[1].heldout_loss
    table = {row["variant"]: row for row in result.table()}
    assert table["avg"]["seeds"] == 2 and table["avg"]["heldout_loss_std"] > 0
    assert table["avg"]["heldout_loss_mean"] == pytest.approx((avg[0].heldout_loss + avg[1].heldout_loss) / 2)

    files = write_results(result, tmp_path)
    assert len(files.curves.read_text().splitlines()) == 1 + 6 * 15
    summary = list(csv.DictReader(files.summary.open()))
    assert len(summary) == 6 and set(summary[0]) == {
        "variant", "seed", "heldout_loss", "retrieval_top1", "matched_vs_shuffled", "trainable_params"
    }  # fmt: skip
    assert [r["variant"] for r in csv.DictReader(files.table.open())] == ["avg", "concat", "channels"]
    assert files.plot.stat().st_size > 1000
    text = format_table(result)
    assert "held-out loss" in text and f"{math.log(8):.3f}" in text and "0.125" in text  # chance levels


def test_the_same_seed_repeats_and_leaves_the_global_rng_alone():
    cfg = AlignConfig(steps=5, batch_size=8, samples=96, seeds=1, hidden=16)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = alignment_analysis(None, [AVG], cfg, features=_pairs())
    assert torch.rand(1) == before
    second = alignment_analysis(None, [AVG], cfg, features=_pairs())
    assert first.runs == second.runs


# ---- on a model: synthetic pairs, caption files, the CLI -------------------------------------------------------


def test_synthetic_pairs_do_not_depend_on_the_run_seed(tiny_model):
    a = encode_pairs(tiny_model, AlignConfig(samples=16, batch_size=4, seed=0))
    b = encode_pairs(tiny_model, AlignConfig(samples=16, batch_size=4, seed=7))
    assert len(a) == 16 and torch.equal(a.text, b.text) and torch.equal(a.vision["davit"], b.vision["davit"])
    cfg = AlignConfig(steps=3, batch_size=4, samples=16, seeds=2, hidden=8)
    result = alignment_analysis(tiny_model, [parse_variant("davit=single_layer:davit")], cfg, a)
    assert [r.seed for r in result.runs] == [0, 1] and result.heldout_pairs == 4


def _caption_file(root, lines, good=6):
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(good):
        Image.new("RGB", (40, 30), (40 * i, 255 - 40 * i, 0)).save(images / f"{i}.png")
    (images / "truncated.png").write_bytes((images / "0.png").read_bytes()[:40])
    path = root / "captions.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def test_caption_file_skips_and_counts_bad_pairs(tmp_path, tiny_model):
    good = [{"image": f"images/{i}.png", "caption": f"a picture number {i}"} for i in range(6)]
    bad = [
        {"image": "images/truncated.png", "caption": "broken"},
        {"image": "images/missing.png", "caption": "gone"},
        {"image": "images/1.png", "caption": "  "},
    ]
    path = _caption_file(tmp_path, good[:3] + bad + good[3:])
    feats = encode_pairs(tiny_model, AlignConfig(captions=str(path), batch_size=2, samples=100))
    assert len(feats) == 6
    assert feats.skipped == {"empty_caption": 1, "missing_image": 1, "unreadable_image": 1}
    # samples caps the pairs used: the first usable ones
    assert len(encode_pairs(tiny_model, AlignConfig(captions=str(path), batch_size=2, samples=4))) == 4
    with pytest.raises(ValueError, match=r"6 usable caption pairs .* 2 x batch_size = 8"):
        encode_pairs(tiny_model, AlignConfig(captions=str(path), batch_size=4, samples=100))


@pytest.mark.parametrize("image", ["/etc/passwd", "images/../../secret.png", "images/0.png\x00.txt"])
def test_caption_file_refuses_paths_outside_its_folder(tmp_path, image):
    path = _caption_file(
        tmp_path, [{"image": "images/0.png", "caption": "ok"}, {"image": image, "caption": "no"}]
    )
    with pytest.raises(ValueError, match=r"captions.jsonl:2: image path .* must be relative"):
        read_captions(path)


def test_caption_file_format_errors_name_the_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"image": "a.png", "caption": "x"}\n\nnot json\n')
    with pytest.raises(ValueError, match=r"c.jsonl:3: not a JSON object"):
        read_captions(path)
    path.write_text('{"caption": "x"}\n')
    with pytest.raises(ValueError, match=r"c.jsonl:1: expected"):
        read_captions(path)


def test_variant_labels_must_differ():
    with pytest.raises(ValueError, match="labels must differ"):
        alignment_analysis(None, [AVG, AVG], AlignConfig(batch_size=8, samples=96), features=_pairs())


def test_config_validation():
    for bad in (dict(heldout=0.0), dict(heldout=1.0), dict(seeds=0), dict(hidden=0), dict(samples=100, batch_size=64),
                dict(captions=" ")):  # fmt: skip
        with pytest.raises(ValueError, match="align"):
            AlignConfig(**bad)


def test_cli_align_prints_the_heldout_summary(tmp_path, monkeypatch, capsys):
    from fvl.cli import main
    from fvl.cli.eval import AnalysisTarget

    monkeypatch.setattr(AnalysisTarget, "log", lambda self, kind, files: "RUN")  # no MLflow store here
    good = [{"image": f"images/{i}.png", "caption": f"picture {i}"} for i in range(6)]
    path = _caption_file(tmp_path, [*good, {"image": "images/truncated.png", "caption": "x"}])
    out = tmp_path / "out"
    args = ["align", "--steps", "3", "--batch-size", "2", "--samples", "6", "--seeds", "2", "--hidden", "8",
            "--heldout", "0.3", "--captions", str(path), "--out", str(out),
            "--variant", "all=dbfusion:davit+caption+ocr+grounding", "--variant", "davit=single_layer:davit"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "6 caption pairs, 2 held out, 2 seed(s)" in printed
    assert "unreadable_image" not in printed  # samples=6: the broken last line is never read
    assert "held-out loss" in printed and "MLflow run RUN" in printed
    assert len(list(csv.DictReader((out / "align_summary.csv").open()))) == 4
    bad = _caption_file(tmp_path / "bad", [{"image": "/abs.png", "caption": "x"}])
    assert main([*args, "--captions", str(bad)]) == 2  # the last --captions wins
    assert "captions.jsonl:1: image path" in capsys.readouterr().err
