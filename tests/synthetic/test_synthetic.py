"""The synthetic generator: deterministic, disjoint splits, answers that match the pictures."""

import collections

import pytest

from fvl.synthetic import CHANCE, KINDS, SPLITS, content_hash, generate, image_hash, split_of


def test_synthetic_is_deterministic_and_splits_disjoint():
    a, b = generate(5, "train", seed=1), generate(5, "train", seed=1)
    assert a.image.tobytes() == b.image.tobytes() and (a.question, a.answer, a.caption) == (
        b.question,
        b.answer,
        b.caption,
    )
    ids = {s: {generate(i, s).id for i in range(200)} for s in SPLITS}
    assert (
        not (ids["train"] & ids["val"])
        and not (ids["train"] & ids["test"])
        and not (ids["val"] & ids["test"])
    )
    same = sum(
        generate(i, "train").image.tobytes() == generate(i, "test").image.tobytes() for i in range(200)
    )
    assert same < 10  # different seeds draw different images (rare coincidences allowed)
    kinds = collections.Counter(generate(i, "test").kind for i in range(700))
    assert set(kinds) == set(KINDS) and min(kinds.values()) > 60
    pope = [generate(i, "train", kinds=("pope",)).answer for i in range(400)]
    assert 0.4 < pope.count("yes") / 400 < 0.6
    assert set(CHANCE) == set(KINDS)


def test_synthetic_answers_match_the_pictures():
    """Spot checks that the drawn content is what the answer says."""
    for i in range(50):
        s = generate(i, kinds=("colour",))
        from fvl.synthetic import COLOURS

        pixels = set(s.image.getdata())
        assert COLOURS[s.answer] in pixels
        assert not any(COLOURS[c] in pixels for c in COLOURS if c != s.answer)
    with pytest.raises(ValueError, match="split"):
        generate(0, "dev")


def test_position_asks_for_the_side_of_the_larger_shape():
    """The answer is read from the picture alone: one shape in each half, the named side holds the larger;
    the question names no object (binding a name to image tokens is what the tiny preset never learned)."""
    answers = collections.Counter()
    for i in range(200):
        s = generate(i, kinds=("position",))
        (_, left), (_, right) = s.regions
        assert left[2] <= 32 <= right[0]  # one shape in each half of the 64 px picture
        larger = "left" if left[2] - left[0] > right[2] - right[0] else "right"
        assert s.answer == larger and s.question == "Is the larger shape on the left or the right?"
        assert f"large {s.regions[0 if larger == 'left' else 1][0]}" in s.caption
        answers[s.answer] += 1
    assert 0.4 < answers["left"] / 200 < 0.6


def test_ocr_words_sit_near_the_centre():
    """Moved by at most 1/16 of the side from the centre, whole inside the picture, the answer drawn."""
    for i in range(100):
        s = generate(i, kinds=("ocr",))
        ((_, (x0, y0, x1, y1)),) = s.regions
        assert min(x0, y0) >= 0 and max(x1, y1) <= 64
        assert abs((x0 + x1) / 2 - 32) <= 6 and abs((y0 + y1) / 2 - 32) <= 6
        assert s.answer == s.text and f'"{s.text}"' in s.caption


def test_held_out_splits_never_hold_a_training_item(monkeypatch):
    """Chart images have only 9^3 values: drawn independently, 73 of 90 test charts were training items.
    The content partition keeps every val and test image out of training, however many are drawn."""
    import fvl.synthetic as synthetic

    draws = []
    real = synthetic._draw
    monkeypatch.setattr(synthetic, "_draw", lambda *a: draws.append(1) or real(*a))
    train = [generate(i, "train") for i in range(5000)]
    # redrawing stays cheap: train is 6/8 of the partition, so about 4/3 draws a sample (1.34 measured)
    assert len(draws) < 1.5 * len(train)
    seen = {content_hash(s) for s in train}
    seen_images = {image_hash(s.image) for s in train}
    for split in ("val", "test"):
        held = [generate(i, split) for i in range(700)]
        assert not {content_hash(s) for s in held} & seen
        assert not {image_hash(s.image) for s in held} & seen_images  # nor the picture, under any question
        assert {split_of(s.image) for s in held} == {split}
        kinds = collections.Counter(s.kind for s in held)
        assert set(kinds) == set(KINDS) and min(kinds.values()) > 60  # still balanced
        charts = collections.Counter(s.answer for s in held if s.kind == "chart")
        assert len(charts) >= 7  # the chart answers still vary
    assert {split_of(s.image) for s in train} == {"train"}
    again = generate(42, "test")
    assert content_hash(again) == content_hash(generate(42, "test"))  # redraws stay deterministic
