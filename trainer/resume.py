"""What a pre-training checkpoint says about its run, and what a resume may change.

A checkpoint records (DeepSpeed client state, integers and strings only):

* ``stream``: the lanes (:mod:`trainer.lanes`), each lane's position, the
  global count of corrupt samples skipped, and the layout it was written on
  (ranks, loader workers per rank, batches since that layout began);
* ``settings``: what determines the result (the shards' digest, the
  vocabulary, the architecture, batch, schedule, seed, decoding, ...),
  :func:`trainer.pretrain.settings`.

A resume may change the number of ranks and of loader workers (every lane
keeps exactly one reader: no sample is repeated or skipped) and nothing that
determines the result: :func:`differences` names each setting that differs.
Checkpoints written before the lanes (a list of per-rank positions) are read
as the lanes they were: one per (rank, worker).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from .data import LoaderState
from .lanes import LaneLayout, check_readers, lane_owner

__all__ = ["SavedStream", "saved_stream", "stream_record", "differences", "layout_change"]


@dataclass(frozen=True)
class SavedStream:
    """The pre-training stream as a checkpoint left it."""

    layout: LaneLayout
    positions: tuple[int, ...]
    corrupt: int
    world_size: int
    workers: int
    batches: int

    def default_workers(self, world_size: int) -> int:
        """Loader workers per rank when the resume names none: the
        checkpoint's, fewer where ``world_size`` ranks would leave a worker
        without a lane."""
        if world_size == self.world_size:
            return self.workers
        return max(1, min(self.workers, self.layout.lanes // max(1, world_size)))

    def state_for(self, rank: int, world_size: int, workers: int) -> LoaderState:
        """Rank ``rank``'s loader state on ``world_size`` x ``workers``: the
        same lanes and positions; the round-robin continues where the layout
        is the same and starts again where it is not; rank 0 carries the
        corrupt samples counted so far. Raises ``ValueError`` where some
        logical worker would have no lane."""
        check_readers(self.layout, world_size, workers)
        same = (world_size, workers) == (self.world_size, self.workers)
        return LoaderState(workers=workers, batches=self.batches if same else 0, positions=list(self.positions),
                           corrupt=self.corrupt if rank == 0 else 0, lanes=self.layout.lanes,
                           origin_ranks=self.layout.origin_ranks)


def saved_stream(client: dict[str, Any]) -> SavedStream:
    """The stream of a checkpoint's client state (either format)."""
    if "stream" in client:
        s = client["stream"]
        return SavedStream(LaneLayout(int(s["lanes"]), int(s["origin_ranks"])), tuple(int(p) for p in s["positions"]),
                           int(s["corrupt"]), int(s["world_size"]), int(s["workers"]), int(s["batches"]))
    per_rank, workers = client["loader"], int(client["loader_workers"])  # one list per rank: [batches, corrupt, ...]
    world = len(per_rank)
    layout = LaneLayout.fresh(world, workers)
    positions = tuple(int(per_rank[lane % world][2 + lane // world]) for lane in range(layout.lanes))
    return SavedStream(layout, positions, sum(int(r[1]) for r in per_rank), world, workers, int(per_rank[0][0]))


def stream_record(gathered: Sequence[Sequence[int]], layout: LaneLayout, workers: int) -> dict[str, Any]:
    """The ``stream`` client state from every rank's ``[batches, corrupt,
    *positions]`` (each rank's own lanes are current there)."""
    world = len(gathered)
    positions = [int(gathered[lane_owner(layout, lane, world, workers)][2 + lane]) for lane in range(layout.lanes)]
    return {"lanes": layout.lanes, "origin_ranks": layout.origin_ranks, "positions": positions,
            "corrupt": sum(int(r[1]) for r in gathered), "world_size": world, "workers": workers,
            "batches": int(gathered[0][0])}


def _short(value: Any) -> str:
    text = str(value)
    return text[:12] if isinstance(value, str) and len(text) == 64 else text  # a digest: its start


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``name old -> new`` for each setting that differs (``code`` aside:
    fixing a bug between a preemption and its resume is allowed)."""
    keys = sorted((set(saved) | set(current)) - {"code"})
    return [f"{k} {_short(saved.get(k))} -> {_short(current.get(k))}" for k in keys if saved.get(k) != current.get(k)]


def layout_change(saved: SavedStream, world_size: int, workers: int, global_batch: int) -> str | None:
    """The one line that says what a resume changes in the layout (``None``: nothing)."""
    if (world_size, workers) == (saved.world_size, saved.workers):
        return None
    per_rank = -(-saved.layout.lanes // world_size)
    return (f"[resume] world size {saved.world_size} -> {world_size}, loader workers per rank {saved.workers} -> "
            f"{workers}, batch per rank {global_batch // saved.world_size} -> {global_batch // world_size} "
            f"(global {global_batch}); the stream's {saved.layout.lanes} lanes continue where they stopped "
            f"(up to {per_rank} per rank)")
