"""Epoch plans: weights are passes, an epoch is a seeded permutation split evenly over ranks, the order
follows the seed alone, and length grouping keeps the epoch a permutation."""

import collections

import numpy as np
import pytest

from fvl.data.plan import EpochBatches, PlanSettings, Sources, epoch_order, group_by_length, rank_batches

SOURCES = Sources({"small": (0, 40), "large": (40, 400)})


def counts(order):
    return collections.Counter(order.tolist())


def test_equal_weights_are_the_concatenation_every_sample_once():
    order = epoch_order(SOURCES, {"small": 1, "large": 1}, seed=0, epoch=0)
    assert sorted(order.tolist()) == list(range(440))  # not 50/50 by source, as probabilities would give
    assert order.tolist() != list(range(440))  # shuffled


def test_weights_are_passes():
    order = epoch_order(SOURCES, {"small": 2, "large": 0.5}, seed=0, epoch=0)
    c = counts(order)
    assert all(c[i] == 2 for i in range(40))
    large = [i for i in c if i >= 40]
    assert len(large) == 200 and all(c[i] == 1 for i in large)
    # weight 0.5 sees the other half next epoch: every sample once over two epochs
    nxt = [i for i in epoch_order(SOURCES, {"small": 2, "large": 0.5}, 0, 1).tolist() if i >= 40]
    assert sorted(large + nxt) == list(range(40, 440))


def test_order_follows_the_seed_alone():
    a = epoch_order(SOURCES, {"small": 1, "large": 1}, seed=3, epoch=2)
    b = epoch_order(SOURCES, {"large": 1, "small": 1}, seed=3, epoch=2)  # dict order does not matter
    assert a.tolist() == b.tolist()
    assert a.tolist() != epoch_order(SOURCES, {"small": 1, "large": 1}, seed=4, epoch=2).tolist()
    assert a.tolist() != epoch_order(SOURCES, {"small": 1, "large": 1}, seed=3, epoch=3).tolist()


@pytest.mark.parametrize("world, batch", [(1, 7), (2, 8), (3, 5), (4, 64)])
def test_ranks_get_disjoint_equal_shares_that_cover_the_epoch(world, batch):
    order = epoch_order(SOURCES, {"small": 1, "large": 1}, seed=0, epoch=0)
    shares = [rank_batches(order, world, r, batch) for r in range(world)]
    assert len({len(s) for s in shares}) == 1  # same batch count on every rank: no DDP hang
    for step in range(len(shares[0])):
        assert len({len(s[step]) for s in shares}) == 1  # and the same batch sizes
    seen = np.concatenate([b for s in shares for b in s]).tolist()
    assert set(seen) == set(range(440))
    assert len(seen) - 440 < world  # padding repeats fewer samples than there are ranks


def test_length_grouping_sorts_within_windows_and_keeps_the_permutation():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 2000, 440)
    has_image = rng.random(440) < 0.7
    order = epoch_order(SOURCES, {"small": 1, "large": 1}, 0, 0)
    grouped = group_by_length(order, lengths, has_image, step=16, group=32, seed=0, epoch=0)
    assert sorted(grouped.tolist()) == sorted(order.tolist())

    def spread(o):  # mean within-batch spread of lengths
        return np.mean([np.ptp(lengths[o[i : i + 16]]) for i in range(0, 432, 16)])

    assert spread(grouped) < 0.2 * spread(order)
    mixed = sum(len(set(has_image[grouped[i : i + 16]].tolist())) > 1 for i in range(0, 432, 16))
    assert mixed <= 1  # one window: at most one batch straddles the modalities


def settings(**kw):
    base = dict(seed=0, weights={"small": 1, "large": 1}, world=2, rank=0, batch_size=8)
    return PlanSettings(**{**base, **kw})


def test_sampler_starts_at_its_position_and_counts_epochs_itself():
    lengths, has_image = np.zeros(440, int), np.ones(440, bool)
    plan = EpochBatches(SOURCES, settings(), lengths, has_image)
    full = list(plan)
    assert len(full) == len(plan) == 28  # ceil(440 / 16)
    plan.position = (0, 5)
    assert list(plan) == full[5:]
    for _ in range(23):
        plan.advance()
    assert plan.position == (1, 0)  # the last batch of epoch 0 trained: epoch 1 next
    second = list(plan)
    assert len(second) == 28 and second != full
    assert not hasattr(plan, "set_epoch")  # the trainer's epoch number does not move the data
