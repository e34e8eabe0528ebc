"""The fuzz set (``tests/fuzz.py``): at least 1,000 broken samples of 23 kinds mixed with 100 good ones go
through the shard builder and the training reader. Every bad one ends in a skip counted by reason, every
good one arrives with its exact conversation (and, for RGB JPEG/PNG, its exact image bytes), and the counts
add up to what went in. The ``heavy`` tier (``make reliability``) runs 10,000."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from fvl.data.reader import Catalog, ShardReader
from fvl.data.recipes import load_recipe
from fvl.data.shards import build
from fvl.data.shardset import shard_set
from fvl.models import build_processor
from tests.fixtures import tiny_cfg
from tests.fuzz import BAD_KINDS, write_fuzz_set

N_GOOD = 100

# What each kind of damage is counted as (the builder's reasons, or the reader's for what only tokenising
# at the model's max_length finds).
REASONS = {
    "truncated_image": "unreadable_image", "corrupt_header": "unreadable_image", "empty_image_file": "empty_image",
    "zero_size_image": "unreadable_image", "bomb_image": "decompression_bomb", "missing_image": "missing_image",
    "dotdot_path": "bad_image_path", "absolute_path": "bad_image_path", "not_json": "bad_json",
    "not_utf8": "bad_json", "not_an_object": "bad_json", "no_conversations": "no_conversations",
    "conversations_not_a_list": "no_conversations", "turn_not_an_object": "no_conversations",
    "value_not_a_string": "empty_turn", "missing_value": "empty_turn", "empty_answer": "empty_turn",
    "placeholder_missing": "placeholder_mismatch", "placeholder_twice": "placeholder_mismatch",
    "placeholder_in_answer": "placeholder_mismatch", "ends_with_user": "bad_roles", "wrong_role": "bad_roles",
    "answer_cut_by_truncation": "no_supervision",
}  # fmt: skip


@pytest.fixture(
    scope="module", params=[1000, pytest.param(10000, marks=pytest.mark.heavy)], ids=lambda n: f"{n}_bad"
)
def fuzzed(request, tmp_path_factory):
    n_bad = request.param
    root = tmp_path_factory.mktemp("fuzz")
    fuzz = write_fuzz_set(root, n_bad, N_GOOD)
    manifest = build(load_recipe(fuzz.recipe), root / "shards", workers=2)
    shards = shard_set(root / "shards", manifest)
    reader = ShardReader(Catalog.build(shards.urls, shards.shard_samples), build_processor(tiny_cfg(), "pad"))
    delivered: list[str] = []
    read_skips: Counter[str] = Counter()
    for start in range(0, len(reader), 64):
        batch = reader[list(range(start, min(start + 64, len(reader))))]
        delivered += batch["ids"]
        read_skips.update({k: v for k, v in batch["skipped"].items() if k != "refilled_batch"})
    fuzz.n_bad = n_bad
    return fuzz, manifest, reader, delivered, read_skips


def test_every_bad_sample_is_a_counted_skip_and_the_counts_add_up(fuzzed):
    fuzz, manifest, _, delivered, read_skips = fuzzed
    assert set(REASONS) == set(BAD_KINDS)
    built = manifest["sources"]["fuzz"]
    expected = Counter(REASONS[kind] for kind in fuzz.bad_kinds.values())
    assert Counter(built["skipped"]) + read_skips == expected
    assert sum(built["skipped"].values()) + sum(read_skips.values()) + len(delivered) == fuzz.n_bad + N_GOOD
    assert built["written"] == N_GOOD + sum(read_skips.values())


def test_every_good_sample_arrives_exactly(fuzzed):
    fuzz, _, reader, delivered, _ = fuzzed
    assert sorted(delivered) == sorted(fuzz.expected_good)  # all of them, once each
    exact = 0
    for i in range(len(reader)):
        raw = reader.raw(i)
        meta = json.loads(raw["json"])
        if meta["id"] not in fuzz.expected_good:
            continue
        assert meta["conversations"] == fuzz.expected_good[meta["id"]]
        if meta["id"] in fuzz.exact_images:  # RGB JPEG / PNG images are stored as they came
            assert [raw[k] for k in meta["image_keys"]] == fuzz.exact_images[meta["id"]]
            exact += 1
    assert exact >= N_GOOD // 5
