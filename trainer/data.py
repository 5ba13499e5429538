"""Data for the trainer: WebDataset shards for pre-training, target datasets
for fine-tuning and evaluation.

Pre-training stream (:class:`ShardStream`) is a deterministic function of
the shards, the seed, the lanes (:mod:`trainer.lanes`: fixed when a run
starts, one per loader worker of its ranks) and where each lane stands:

* epoch ``e`` permutes the shard list with ``(seed, e)``; lane ``l`` of
  ``L`` reads every ``L``-th shard from position ``l``, each from start to
  end, checked against the manifest as it streams (:mod:`trainer.shards`);
  each (rank, loader worker) reads lanes of its own, so ranks and workers
  read disjoint shards;
* a lane's samples are shuffled in a buffer driven by ``(seed, e, lane)``
  *before* decoding, then decoded with PIL and augmented with an RNG seeded
  by the sample's position in its lane (``transforms.train_sample``: the
  crop box is drawn first, so a JPEG can decode at a reduced scale where the
  box allows, ``decode_scaling``);
* the stream is endless (epoch after epoch), so the DataLoader's round-robin
  over workers never goes out of step, and a resumed run skips exactly the
  samples already consumed (without decoding them; whole epochs without
  reading them, where the manifest gives the shards' sample counts): no
  sample is skipped or repeated across a restart, on the same number of
  ranks or another (:mod:`trainer.lanes`).

Nothing is unpickled: samples are image bytes and JSON.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from schemas import ShardInfo
from schemas import io as sio  # noqa: F401 - trainer.data.sio: the filesystem the shard reads go through
from schemas.fingerprint import digest
from schemas.shard_format import image_member
from schemas.targets import list_target, read_item_bytes

from .lanes import LaneLayout, check_readers, lane_epoch_start, lane_shards, lane_sizes, reader_lanes
from .shards import (ShardList, missing_shards, read_shard_list, require_shards, shard_samples,  # noqa: F401
                     shard_urls)
from .transforms import DEFAULT_DECODE_SCALING, HashRNG, PreprocessSpec, decode_image, eval_transform, train_sample

__all__ = ["shard_urls", "read_shard_list", "ShardList", "missing_shards", "require_shards", "shard_samples",
           "LoaderConfig", "ShardStream", "StreamSample", "Batch", "TargetDataset", "LoaderState", "soft_targets",
           "collate", "default_num_workers", "local_ranks", "MAX_CONSECUTIVE_CORRUPT"]

#: Default bound on corrupt samples in a row before :class:`ShardStream` gives up.
MAX_CONSECUTIVE_CORRUPT = 1000
_SHUFFLE_SALT, _AUGMENT_SALT = 0xB0F, 0xA06


def local_ranks(environ=None) -> int:
    """Ranks on this node, as the launcher says: ``LOCAL_WORLD_SIZE``
    (torchrun), else ``LOCAL_SIZE`` (the deepspeed launcher, also its MPI
    runners), else 1 (a plain ``python -m``)."""
    environ = os.environ if environ is None else environ
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        value = environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def default_num_workers(cores: int | None = None, ranks: int | None = None, cap: int | None = None) -> int:
    """Loader worker processes per rank when ``--num-workers`` is not given:
    the cores this process may run on (``os.sched_getaffinity``: a cgroup or
    ``taskset`` limit counts) shared evenly by the node's :func:`local_ranks`,
    less one for the rank's own process (the training loop, receiving the
    batches); at least 1, at most ``cap`` (pretrain: the shards each rank's
    workers can split). A 16-core node with 8 GPUs gives 1 worker per rank,
    a 128-core one 15. When a launcher pins each rank to cores of its own
    (``deepspeed --bind_cores_to_rank``) the affinity is already the rank's
    share: pass ``--num-workers`` there."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ranks = local_ranks() if ranks is None else ranks
    workers = max(1, cores // max(1, ranks) - 1)
    return max(1, min(workers, cap)) if cap is not None else workers


def soft_targets(label_lists: Sequence[Sequence[int]], index_of: dict[int, int], num_classes: int) -> torch.Tensor:
    """The paper's multi-label targets: a multi-hot vector normalised to sum 1."""
    out = torch.zeros(len(label_lists), num_classes)
    for i, labels in enumerate(label_lists):
        idx = [index_of[l] for l in labels if l in index_of]
        if idx:
            out[i, idx] = 1.0 / len(idx)
    return out


@dataclass(frozen=True)
class LoaderConfig:
    """What the pre-training stream reads and how (everything but who reads it).

    ``urls``: the shards; ``expected``: their manifest entries, aligned with
    ``urls`` (each shard's bytes checked as it streams; ``None``: unchecked).
    ``shuffle_buffer``: samples (at least 1). ``max_consecutive_corrupt``
    (samples; default :data:`MAX_CONSECUTIVE_CORRUPT` = 1000, at least 1)
    bounds how many undecodable samples in a row one worker skips.
    ``decode_scaling``: ``transforms.DECODE_SCALINGS`` (training samples;
    evaluation samples are decoded whole). ``normalise=False``: uint8
    images, normalised where they are used (``transforms.normalise_batch``,
    e.g. on the GPU): the same values, a quarter of the bytes.
    """

    urls: Sequence[str]
    spec: PreprocessSpec
    seed: int = 0
    shuffle_buffer: int = 1000
    train: bool = True
    max_consecutive_corrupt: int = MAX_CONSECUTIVE_CORRUPT
    decode_scaling: str = DEFAULT_DECODE_SCALING
    normalise: bool = True
    expected: Sequence[ShardInfo] | None = None

    def __post_init__(self) -> None:
        limit = self.max_consecutive_corrupt
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"max_consecutive_corrupt must be an integer >= 1, got {limit!r}")
        object.__setattr__(self, "urls", tuple(self.urls))
        object.__setattr__(self, "shuffle_buffer", max(1, int(self.shuffle_buffer)))
        if self.expected is not None:
            object.__setattr__(self, "expected", tuple(self.expected))
            if len(self.expected) != len(self.urls):
                raise ValueError(f"{len(self.expected)} manifest entries for {len(self.urls)} shards")

    @classmethod
    def for_shards(cls, shards: ShardList, spec: PreprocessSpec, **options) -> "LoaderConfig":
        """The config reading ``shards``, checked against their manifest where there is one."""
        return cls(shards.urls, spec, expected=shards.expected, **options)


@dataclass
class LoaderState:
    """Where a rank's pre-training stream stands, for exact resumption.

    ``positions[l]`` is the next raw sample (decoded or corrupt) of lane
    ``l``; ``batches`` the batches this rank consumed since its current
    layout (ranks x ``workers``) began: a resumed loader starts its
    round-robin at logical worker ``batches % workers``. ``lanes`` and
    ``origin_ranks``: the lanes (:class:`trainer.lanes.LaneLayout`; ``None``:
    one per logical worker of the stream that first reads this state).
    """

    workers: int = 1
    batches: int = 0
    positions: list[int] | None = None
    corrupt: int = 0
    lanes: int | None = None
    origin_ranks: int | None = None

    def bind(self, world_size: int) -> LaneLayout:
        """The lanes, fixed on first use (a fresh state: one per logical worker)."""
        if self.lanes is None:
            layout = LaneLayout.fresh(world_size, self.workers)
            self.lanes, self.origin_ranks = layout.lanes, layout.origin_ranks
        layout = LaneLayout(self.lanes, self.origin_ranks)
        if self.positions is None:
            self.positions = [0] * layout.lanes
        if len(self.positions) != layout.lanes:
            raise ValueError(f"{len(self.positions)} lane positions for a stream of {layout.lanes} lanes")
        return layout

    def update(self, batch: "Batch") -> None:
        """Count ``batch`` consumed."""
        self.batches += 1
        for lane, position in batch.positions.items():
            self.positions[lane] = position
        self.corrupt += batch.corrupt

    def to_dict(self) -> dict:
        return {"workers": self.workers, "batches": self.batches, "positions": list(self.positions or []),
                "corrupt": self.corrupt, "lanes": self.lanes, "origin_ranks": self.origin_ranks}


class StreamSample(NamedTuple):
    """One decoded training sample: its image, label ids, lane, the lane's
    next raw position, corrupt samples skipped just before it (in its
    worker's order), its key, its lane's epoch, and where each lane of its
    worker stands after it (``(lane, next raw position)`` pairs)."""

    image: torch.Tensor
    labels: list[int]
    lane: int
    next_position: int
    corrupt: int
    key: str
    epoch: int
    positions: tuple[tuple[int, int], ...]


class Batch(NamedTuple):
    """A batch of one loader worker: images, label lists, ``positions`` (lane
    -> next raw position after the batch), corrupt samples skipped, and the
    samples' keys and epochs."""

    images: torch.Tensor
    labels: list[list[int]]
    positions: dict[int, int]
    corrupt: int
    keys: list[str]
    epochs: list[int]


def collate(samples: Sequence[StreamSample]) -> Batch:
    """Stack images; keep label lists; where the batch leaves each of its
    worker's lanes (a batch always comes from one worker). In a loader
    worker the images are stacked straight into shared memory
    (``default_collate``), so the batch reaches the training process without
    another copy."""
    positions: dict[int, int] = {}
    for s in samples:
        positions.update(s.positions)  # in the worker's order: the last is where each lane stands
    return Batch(torch.utils.data.default_collate([s.image for s in samples]), [s.labels for s in samples],
                 positions, sum(s.corrupt for s in samples), [s.key for s in samples], [s.epoch for s in samples])


class ShardStream(IterableDataset):
    """Endless, deterministic, resumable stream of WebDataset samples
    (:class:`StreamSample`) for rank ``rank`` of ``world_size``.

    ``state`` says where each lane resumes; loader worker ``i`` serves
    logical worker ``(i + state.batches) % num_workers``, which reads its
    lanes (:func:`trainer.lanes.reader_lanes`), so that a resumed DataLoader
    continues the round-robin exactly where the interrupted one stopped.

    A sample that cannot be decoded (no image member, bad image bytes, bad
    JSON, no labels) is counted and skipped; ``config.max_consecutive_corrupt``
    in a row raise ``ValueError`` naming the shard(s) they came from (an
    endless stream of bad samples would otherwise never yield: a hang).
    Samples skipped undecoded on resume do not count.
    """

    def __init__(self, config: LoaderConfig, rank: int = 0, world_size: int = 1, state: LoaderState | None = None):
        super().__init__()
        self.config, self.rank, self.world_size = config, rank, world_size
        self.state = state or LoaderState()
        self.layout = self.state.bind(world_size)

    # -- which shards --------------------------------------------------------------
    def shards_for(self, epoch: int, worker: int, num_workers: int) -> list[str]:
        """The shards logical worker ``worker`` of ``num_workers`` reads in ``epoch``."""
        lanes = reader_lanes(self.layout, self.rank, self.world_size, worker, num_workers)
        n, urls = len(self.config.urls), self.config.urls
        return [urls[i] for lane in lanes for i in lane_shards(n, self.config.seed, epoch, lane, self.layout.lanes)]

    def check_split(self, num_workers: int) -> None:
        """Refuse a split that leaves a (rank, worker) without shards or lanes of its own."""
        need = self.world_size * max(1, num_workers)
        if len(self.config.urls) < need:
            raise ValueError(f"{len(self.config.urls)} shards cannot give each of {self.world_size} rank(s) x "
                             f"{max(1, num_workers)} loader worker(s) its own shards; write smaller shards "
                             "(--samples-per-shard) or use fewer workers")
        check_readers(self.layout, self.world_size, num_workers)

    # -- raw samples (bytes) of one lane, shuffled before decoding -------------------------
    def _lane_epoch(self, lane: int, epoch: int) -> Iterator[dict]:
        """Lane ``lane``'s sample dicts of ``epoch``, shuffled by a buffer."""
        c = self.config
        shards = lane_shards(len(c.urls), c.seed, epoch, lane, self.layout.lanes)
        if not shards:
            raise ValueError(f"lane {lane} (rank {self.rank}) has no shards")
        rng = np.random.default_rng([c.seed, epoch, *self.layout.key(lane), _SHUFFLE_SALT])
        buffer: list[dict] = []
        for i in shards:
            for sample in shard_samples(c.urls[i], expect=c.expected[i] if c.expected else None):
                if len(buffer) < c.shuffle_buffer:
                    buffer.append(sample)
                    continue
                j = int(rng.integers(len(buffer)))
                buffer[j], sample = sample, buffer[j]
                yield sample
        while buffer:
            j = int(rng.integers(len(buffer)))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            yield buffer.pop()

    def _lane_raw(self, lane: int, skip: int) -> Iterator[tuple[int, int, dict]]:
        """``(raw position, epoch, sample)`` of ``lane`` from position ``skip``
        on: whole epochs before it are not read where the manifest gives
        the shards' sample counts; the rest is passed over undecoded."""
        epoch, position = 0, 0
        counts = [s.samples for s in self.config.expected] if self.config.expected else None
        if counts and skip:
            epoch, position = lane_epoch_start(skip, lane_sizes(counts, self.config.seed, lane, self.layout.lanes))
        while True:
            for sample in self._lane_epoch(lane, epoch):
                if position >= skip:
                    yield position, epoch, sample
                position += 1
            epoch += 1

    # -- decoded samples -------------------------------------------------------------------
    def _decode(self, lane: int, position: int, sample: dict):
        """``(image array, label ids)`` of a raw sample, ``None`` when it cannot be decoded."""
        c = self.config
        rng = HashRNG(c.seed, *self.layout.key(lane), position, _AUGMENT_SALT)
        try:
            image = sample[image_member(sample)]
            meta = json.loads(sample["json"])
            if c.train:
                x = train_sample(image, c.spec, rng, c.decode_scaling, c.normalise)
            else:
                x = eval_transform(decode_image(image), c.spec, c.normalise)
            return x, [int(l) for l in meta["labels"]]
        except Exception:  # noqa: BLE001 - a corrupt sample is counted and skipped
            return None

    def __iter__(self):
        info = get_worker_info()
        loader_worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        if num_workers != self.state.workers:
            raise ValueError(f"the stream was saved with {self.state.workers} loader workers; resume with "
                             f"the same number (got {num_workers})")
        worker = (loader_worker + self.state.batches) % num_workers
        lanes = reader_lanes(self.layout, self.rank, self.world_size, worker, num_workers)
        if not lanes:
            raise ValueError(f"rank {self.rank} worker {worker} has no shards")
        return self._worker_samples(worker, lanes)

    def _worker_samples(self, worker: int, lanes: list[int]) -> Iterator[StreamSample]:
        """Decoded samples of one worker's ``lanes``, each next from the lane
        with the fewest samples consumed (the lowest on a tie)."""
        positions = {lane: self.state.positions[lane] for lane in lanes}
        raw = {lane: self._lane_raw(lane, positions[lane]) for lane in lanes}
        corrupt = 0  # corrupt samples since the last one yielded, i.e. in a row
        bad_shards: dict[str, int] = {}  # where those came from, in first-seen order
        while True:
            lane = min(lanes, key=lambda l: (positions[l], l))
            position, epoch, sample = next(raw[lane])
            positions[lane] = position + 1
            decoded = self._decode(lane, position, sample)
            if decoded is None:
                corrupt += 1
                url = str(sample.get("__url__", "?"))
                bad_shards[url] = bad_shards.get(url, 0) + 1
                if corrupt >= self.config.max_consecutive_corrupt:
                    raise ValueError(self._too_corrupt(corrupt, bad_shards, worker))
                continue
            x, labels = decoded
            yield StreamSample(torch.from_numpy(x), labels, lane, position + 1, corrupt, str(sample.get("__key__")),
                               epoch, tuple(positions.items()))
            corrupt = 0
            bad_shards.clear()

    def _too_corrupt(self, count: int, bad_shards: dict[str, int], worker: int) -> str:
        shown = [f"{url} ({n})" for url, n in list(bad_shards.items())[:5]]
        if len(bad_shards) > 5:
            shown.append(f"and {len(bad_shards) - 5} more shard(s)")
        return (f"{count} consecutive samples could not be decoded (rank {self.rank}, loader worker {worker}; "
                f"limit --max-consecutive-corrupt {self.config.max_consecutive_corrupt}), from shard(s): "
                f"{', '.join(shown)}; the shards are damaged or not image shards")


@dataclass
class TargetDataset(Dataset):
    """A target split in its real layout: ``(image tensor, class index)``.

    Training items are augmented with an RNG seeded by ``(seed, epoch, index)``
    (set ``epoch`` between passes), so runs are reproducible, and decoded as
    ``decode_scaling`` says (:func:`transforms.train_sample`).
    ``normalise=False``: uint8 CHW images, to be normalised where they are
    used (``transforms.normalise_batch`` with :attr:`spec`, e.g. on the GPU):
    the same values as the float32 ones, a quarter of the bytes.
    """

    root: str
    layout: str
    split_name: str
    spec: PreprocessSpec | None
    train: bool
    seed: int = 0
    decode_scaling: str = DEFAULT_DECODE_SCALING
    normalise: bool = True
    epoch: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.split = list_target(self.root, self.layout, self.split_name)

    @property
    def classes(self) -> list[str]:
        return self.split.classes

    def __len__(self) -> int:
        return len(self.split.items)

    def listing_digest(self) -> str:
        """Digest of the split's listing: its layout, classes and items (paths
        relative to the target's root, class indices); not the root, nor
        the images' bytes."""
        root = self.root.rstrip("/") + "/"
        items = [[p[len(root):] if p.startswith(root) else p, int(c)] for p, c in self.split.items]
        return digest({"layout": self.layout, "split": self.split_name, "classes": self.classes, "items": items})

    def __getitem__(self, i: int):
        path, label = self.split.items[i]
        data = read_item_bytes(path)
        if self.train:
            x = train_sample(data, self.spec, HashRNG(self.seed, self.epoch, i, 0x7A), self.decode_scaling,
                             self.normalise)
        else:
            x = eval_transform(decode_image(data), self.spec, self.normalise)
        return torch.from_numpy(x), label
