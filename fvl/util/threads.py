"""torch's intra-op thread count on a CPU, set for a while and restored: DataLoader workers and torch's
threads contend for the same cores on small machines (``trainer.cpu_threads``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def beside_workers(workers: int) -> int:
    """Threads that leave a core to each of ``workers`` DataLoader workers (at least one)."""
    return max(1, cores() - workers)


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` inside the block (0: unchanged), the previous count after it."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
