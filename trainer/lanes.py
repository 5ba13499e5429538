"""The pre-training stream's layout: lanes, and who reads them (pure functions).

An epoch of pre-training is read in ``L`` *lanes*. Lane ``l`` of epoch ``e``
reads, one after another and each from start to end (sequential tar
streaming, never random access), the shards at positions ``l, l + L,
l + 2L, ...`` of the epoch's shard order (a permutation drawn from
``(seed, e)``), through its own shuffle buffer drawn from
``(seed, e, lane key)``. So the samples of a lane, epoch after epoch, are a
function of the seed and the lane alone: not of how many ranks or loader
workers read them. A lane's position (raw samples consumed, corrupt ones
included) is its resume point; the positions of the ``L`` lanes together
are the run's (their sum is the global sample count).

The lanes are fixed when a run starts, one per logical loader worker of its
``W0`` ranks x ``w0`` workers: ``L = W0 * w0``, lane ``l`` keyed
``(l % W0, l // W0)``, which is exactly the (rank, worker) that reads it
then. A run resumed on ``W`` ranks x ``w`` workers (both may differ) gives
logical worker ``j = rank + W * worker`` the lanes ``j, j + W*w, ...``, so
every lane has exactly one reader and continues where it stopped: every
sample of the interrupted epoch is still seen exactly its copies, none twice,
none skipped (docs/design.md, "Resuming on another number of nodes"). A
worker that reads several lanes takes its next sample from the lane with the
fewest samples consumed (the lowest lane on a tie): a rule of the positions
alone, so the resumed run is a function of the seed, the positions and the
layout, like a fresh one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["LaneLayout", "epoch_order", "lane_shards", "reader_lanes", "lane_owner", "check_readers",
           "lane_epoch_start", "lane_sizes"]

_ORDER_SALT = 0x5A  # the shard order's stream (unchanged since the first trainer)


@dataclass(frozen=True)
class LaneLayout:
    """``lanes`` lanes, defined by a start on ``origin_ranks`` ranks (lane
    ``l`` is keyed ``(l % origin_ranks, l // origin_ranks)``)."""

    lanes: int
    origin_ranks: int

    def __post_init__(self) -> None:
        if self.lanes < 1 or self.origin_ranks < 1 or self.lanes % self.origin_ranks:
            raise ValueError(f"a stream of {self.lanes} lane(s) cannot come from {self.origin_ranks} rank(s)")

    @classmethod
    def fresh(cls, ranks: int, workers: int) -> "LaneLayout":
        """One lane per logical worker of a run starting on ``ranks`` x ``workers``."""
        return cls(ranks * max(1, workers), ranks)

    def key(self, lane: int) -> tuple[int, int]:
        """``(rank, worker)`` that read ``lane`` at the run's start: the lane's
        random streams (shuffle, augmentation) are keyed by it."""
        return lane % self.origin_ranks, lane // self.origin_ranks


def epoch_order(shards: int, seed: int, epoch: int) -> np.ndarray:
    """The shard order of ``epoch``: a permutation of ``range(shards)`` drawn from ``(seed, epoch)``."""
    return np.random.default_rng([seed, epoch, _ORDER_SALT]).permutation(shards)


def lane_shards(shards: int, seed: int, epoch: int, lane: int, lanes: int) -> list[int]:
    """Indices of the shards ``lane`` reads in ``epoch``, in reading order."""
    return [int(i) for i in epoch_order(shards, seed, epoch)[lane::lanes]]


def check_readers(layout: LaneLayout, ranks: int, workers: int) -> None:
    """Raise ``ValueError`` unless ``ranks`` x ``workers`` logical workers
    each get at least one of the layout's lanes."""
    readers = ranks * max(1, workers)
    if readers > layout.lanes:
        raise ValueError(f"the stream has {layout.lanes} lane(s) (fixed when the run started); {ranks} rank(s) x "
                         f"{max(1, workers)} loader worker(s) cannot each read one: use at most "
                         f"{max(1, layout.lanes // ranks)} worker(s) per rank"
                         + (f" and at most {layout.lanes} ranks" if ranks > layout.lanes else ""))


def reader_lanes(layout: LaneLayout, rank: int, ranks: int, worker: int, workers: int) -> list[int]:
    """The lanes logical worker ``worker`` of ``rank`` reads, of ``ranks`` x ``workers``."""
    readers = ranks * max(1, workers)
    return list(range(rank + ranks * worker, layout.lanes, readers))


def lane_owner(layout: LaneLayout, lane: int, ranks: int, workers: int) -> int:
    """The rank that reads ``lane`` on ``ranks`` x ``workers``."""
    return (lane % (ranks * max(1, workers))) % ranks


def lane_epoch_start(position: int, epoch_sizes) -> tuple[int, int]:
    """``(epoch, first raw position of that epoch)`` holding lane position
    ``position``, given ``epoch_sizes(e)``: the lane's samples in epoch ``e``
    (from the manifest's counts). Whole epochs before it need not be read."""
    epoch, start = 0, 0
    while True:
        size = epoch_sizes(epoch)
        if size <= 0 or position < start + size:
            return epoch, start
        start += size
        epoch += 1


def lane_sizes(counts: Sequence[int], seed: int, lane: int, lanes: int):
    """``epoch -> samples of lane`` in that epoch, from each shard's sample count."""
    counts = list(counts)

    def size(epoch: int) -> int:
        return sum(counts[i] for i in lane_shards(len(counts), seed, epoch, lane, lanes))

    return size
