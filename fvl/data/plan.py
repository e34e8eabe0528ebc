"""What each rank reads in each epoch: a seeded permutation of the samples, with every source's weight taken
as passes, cut into global steps and split evenly over ranks; and the batch sampler that replays it, from
any batch on, after a resume.

An epoch is deterministic in ``(seed, epoch, weights, sample counts, world size, batch size)`` and nothing
else (no pid, no clock, no worker count), so two runs with the same settings read the same samples in the
same order, and a resumed run reads exactly what the interrupted one had not read yet.

Weights are passes: a source of ``n`` samples with weight ``w`` contributes ``floor(w)`` copies of all its
samples plus ``round(frac(w) * n)`` more per epoch. The fractional part walks through a fixed per-source
permutation, a window per epoch, so weight 0.5 shows every sample once over two epochs.

Global step ``j`` of an epoch is the slice ``[j*W*B, (j+1)*W*B)`` of the order (``W`` ranks, batch ``B``);
rank ``r`` takes ``[r*B, (r+1)*B)`` of it. The last step is shared evenly (the order is first padded by
wrapping to a multiple of ``W``), so every rank has the same number of batches and DDP never waits on a
rank whose data ran out.

With length grouping (LLaVA's modality-length grouping) the order is cut into windows of ``group`` global
steps; each window is sorted by (has image, estimated length) and its steps are shuffled, so a batch holds
samples of similar length and the same modality while the epoch stays a seeded permutation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
from torch.utils.data import Sampler


@dataclass(frozen=True)
class Sources:
    """The samples of each source as a contiguous range of global sample ids, in a fixed order."""

    ranges: dict[str, tuple[int, int]]  # name -> (first id, count)

    @property
    def total(self) -> int:
        return sum(n for _, n in self.ranges.values())


def _name_seed(name: str) -> int:
    return int.from_bytes(name.encode("utf-8")[:16].ljust(16, b"\0"), "little") % (2**63)


def epoch_order(sources: Sources, weights: Mapping[str, float], seed: int, epoch: int) -> np.ndarray:
    """The epoch's global sample ids, weights taken as passes, in a seeded random order."""
    picks = []
    for name, (first, n) in sorted(sources.ranges.items()):
        w = float(weights.get(name, 1.0))
        if n == 0 or w <= 0:
            continue
        whole, frac = int(math.floor(w)), w - math.floor(w)
        picks += [np.arange(first, first + n, dtype=np.int64)] * whole
        k = int(round(frac * n))
        if k:
            fixed = np.random.default_rng([seed, _name_seed(name)]).permutation(n)
            window = (np.arange(k) + epoch * k) % n
            picks.append(first + fixed[window])
    if not picks:
        return np.zeros(0, dtype=np.int64)
    order = np.concatenate(picks)
    return order[np.random.default_rng([seed, epoch]).permutation(len(order))]


def group_by_length(
    order: np.ndarray,
    lengths: np.ndarray,
    has_image: np.ndarray,
    step: int,
    group: int,
    seed: int,
    epoch: int,
) -> np.ndarray:
    """``order`` regrouped so that each run of ``step`` ids holds samples of similar length and one modality
    where possible: windows of ``group`` steps are sorted by (has image, length), then their steps shuffled."""
    rng = np.random.default_rng([seed, epoch, 1])
    out = []
    window = step * group
    for at in range(0, len(order), window):
        ids = order[at : at + window]
        ids = ids[np.lexsort((-lengths[ids], ~has_image[ids]))]
        steps = [ids[i : i + step] for i in range(0, len(ids), step)]
        full = [s for s in steps if len(s) == step]
        rng.shuffle(full)  # the short tail step of the epoch stays last
        out += full + [s for s in steps if len(s) != step]
    return np.concatenate(out) if out else order


def rank_batches(order: np.ndarray, world: int, rank: int, batch_size: int) -> list[np.ndarray]:
    """This rank's batches of an epoch's order (see the module docstring): the same count on every rank."""
    if len(order) == 0:
        return []
    if len(order) % world:
        order = np.concatenate([order, np.resize(order, world - len(order) % world)])
    step = world * batch_size
    batches = []
    for at in range(0, len(order), step):
        chunk = order[at : at + step]
        share = len(chunk) // world
        batches.append(chunk[rank * share : (rank + 1) * share])
    return batches


@dataclass
class PlanSettings:
    """What fixes an epoch's plan besides the epoch number; saved with a checkpoint so a resume that would
    read other data is refused instead of silently skipping the wrong samples."""

    seed: int
    weights: dict[str, float]
    world: int
    rank: int
    batch_size: int
    group: int = 0  # > 0: length grouping over windows of this many global steps
    # source -> what its shards are (sample count, a digest of their files' sha256): a resume over shards
    # rebuilt since (another count, other samples) would replay some samples and skip others
    data: dict[str, dict] = field(default_factory=dict)

    def key(self) -> dict:
        return {
            "seed": self.seed,
            "weights": dict(sorted(self.weights.items())),
            "world": self.world,
            "batch_size": self.batch_size,
            "group": self.group,
            **{f"shards of {name}": identity for name, identity in sorted(self.data.items())},
        }


class EpochBatches(Sampler[list[int]]):
    """Yields this rank's batches (lists of global sample ids) from ``position`` to the end of its epoch.

    ``position`` (data epoch, batch) is the next batch to train; the training loop moves it with
    ``advance()`` as each batch enters a step, so it counts batches trained, not batches prefetched by
    workers. The plan counts its epochs itself rather than following the trainer's epoch number: a run that
    stopped mid-epoch (``max_steps``, a stop signal) and resumes continues the same data epoch even where
    the trainer has moved on to its next.
    """

    def __init__(
        self, sources: Sources, settings: PlanSettings, lengths: np.ndarray, has_image: np.ndarray
    ) -> None:
        self.sources = sources
        self.settings = settings
        self.lengths = lengths
        self.has_image = has_image
        self.position = (0, 0)
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def batches(self, epoch: int) -> list[np.ndarray]:
        if self._cache is None or self._cache[0] != epoch:
            s = self.settings
            order = epoch_order(self.sources, s.weights, s.seed, epoch)
            if s.group > 0:
                order = group_by_length(
                    order, self.lengths, self.has_image, s.world * s.batch_size, s.group, s.seed, epoch
                )
            self._cache = (epoch, rank_batches(order, s.world, s.rank, s.batch_size))
        return self._cache[1]

    def advance(self) -> None:
        """One more batch trained: the next one, or the first of the next epoch."""
        epoch, batch = self.position
        self.position = (epoch + 1, 0) if batch + 1 >= len(self.batches(epoch)) else (epoch, batch + 1)

    def __len__(self) -> int:
        """Batches in a whole epoch (the same in every epoch)."""
        return len(self.batches(self.position[0]))

    def __iter__(self) -> Iterator[list[int]]:
        epoch, start = self.position
        for b in self.batches(epoch)[start:]:
            yield b.tolist()
