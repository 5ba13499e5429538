"""Data for the trainer: WebDataset shards for pre-training, target datasets
for fine-tuning and evaluation.

Pre-training stream (:class:`ShardStream`) is a deterministic function of
(shards, seed, rank, world size, worker, number of workers):

* epoch ``e`` permutes the shard list with ``(seed, e)``; rank ``r`` takes
  every ``world``-th shard from position ``r`` and loader worker ``w`` every
  ``num_workers``-th of those, so ranks and workers read disjoint shards;
* samples are read with WebDataset's tar iterators, shuffled in a buffer
  driven by ``(seed, e, r, w)`` *before* decoding, then decoded with PIL and
  augmented with an RNG seeded by the sample's position in the stream
  (``transforms.train_sample``: the crop box is drawn first, so a JPEG can
  decode at a reduced scale where the box allows, ``decode_scaling``);
* the stream is endless (epoch after epoch), so the DataLoader's round-robin
  over workers never goes out of step, and a resumed run skips exactly the
  samples already consumed (without decoding them): no sample is skipped or
  repeated across a restart.

Nothing is unpickled: samples are image bytes and JSON.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from schemas import Manifest
from schemas import io as sio
from schemas.shard_format import image_member
from schemas.stage_output import require_complete
from schemas.targets import list_target, read_item_bytes

from .transforms import DEFAULT_DECODE_SCALING, HashRNG, PreprocessSpec, decode_image, eval_transform, train_sample

__all__ = ["shard_urls", "missing_shards", "require_shards", "shard_samples", "ShardStream", "TargetDataset",
           "LoaderState", "soft_targets", "collate",
           "default_num_workers", "local_ranks", "MAX_CONSECUTIVE_CORRUPT"]

#: Default bound on corrupt samples in a row before :class:`ShardStream` gives up.
MAX_CONSECUTIVE_CORRUPT = 1000
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")
#: Reads of one shard (the first and the retries after an ``OSError``) before
#: :func:`shard_samples` gives up.
SHARD_READ_ATTEMPTS = 5
#: Seconds before the first retry of a shard read; doubled before each next
#: one (1 + 2 + 4 + 8 = 15 s at most for one shard with the defaults).
SHARD_RETRY_SECONDS = 1.0


def shard_urls(spec: str) -> list[str]:
    """Shard list from a ``manifest.json`` path (checked to be complete) or a
    brace pattern such as ``out/shard-{000000..000099}.tar``."""
    if spec.endswith(".json"):
        base = spec.rsplit("/", 1)[0] if "/" in spec else "."
        require_complete(base, "write_shards")
        manifest = Manifest.from_json(sio.read_bytes(spec).decode(), spec)
        return [sio.join(base, s.name) for s in manifest.shards]
    m = _BRACE.search(spec)
    if not m:
        return [spec]
    lo, hi = m.group(1), m.group(2)
    width = len(lo)
    return [spec[:m.start()] + f"{i:0{width}d}" + spec[m.end():] for i in range(int(lo), int(hi) + 1)]


def missing_shards(urls: Sequence[str]) -> list[str]:
    """The ``urls`` that are not there as files, in order: one listing per
    directory (not a request per shard: 8,000 shards on an object store are
    a few list calls); a directory that cannot be listed holds none."""
    by_parent: dict[str, list[str]] = {}
    for url in urls:
        by_parent.setdefault(url.rsplit("/", 1)[0] if "/" in url else ".", []).append(url)
    present: set[str] = set()
    for parent, members in by_parent.items():
        fs, p = sio.filesystem(members[0])
        directory = p.rsplit("/", 1)[0] if "/" in p else "."
        try:
            listed = fs.ls(directory, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            continue
        names = {e["name"].rstrip("/").rsplit("/", 1)[-1] for e in listed if e.get("type") == "file"}
        present.update(u for u in members if u.rsplit("/", 1)[-1] in names)
    return [u for u in urls if u not in present]


def require_shards(urls: Sequence[str], source: str) -> None:
    """Raise ``FileNotFoundError`` in one line naming the first of ``urls``
    (the shards ``source``, a manifest or pattern, names) that is missing
    and how many are: before step 1, not hours in from a loader worker."""
    missing = missing_shards(urls)
    if missing:
        more = f" ({len(missing)} of {len(urls)} shards are missing)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"shard {missing[0]} named by {source} is missing{more}; every node must see the "
                                "shards (an object store, or a directory mounted at the same path everywhere)")


def shard_samples(url: str, attempts: int = SHARD_READ_ATTEMPTS, backoff: float = SHARD_RETRY_SECONDS,
                  sleep=time.sleep) -> Iterator[dict]:
    """The WebDataset samples of shard ``url``, in order. A read that fails
    with an ``OSError`` (a dropped connection, a throttled object store, a
    file briefly missing) is retried from where it stopped: the shard is
    opened again and the samples already yielded are passed over
    undecoded. At most ``attempts`` reads (default
    :data:`SHARD_READ_ATTEMPTS`), waiting ``backoff`` seconds, then twice
    that, and so on, before each retry; then an ``OSError`` naming the shard
    and the last error. Other errors (a damaged tar) are not retried."""
    from webdataset import tariterators as T

    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    done = 0
    for attempt in range(attempts):
        seen = 0
        try:
            fs, p = sio.filesystem(url)
            with fs.open(p, "rb") as fh:
                for sample in T.group_by_keys(T.tar_file_expander([{"url": url, "stream": fh}])):
                    seen += 1
                    if seen > done:
                        done = seen
                        yield sample
            return
        except OSError as e:
            if attempt + 1 == attempts:
                raise OSError(f"shard {url} could not be read ({attempts} attempts, the last after {done} "
                              f"samples): {type(e).__name__}: {e}") from e
            sleep(backoff * 2 ** attempt)


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


@dataclass
class LoaderState:
    """Where a rank's pre-training stream stands, for exact resumption.

    ``positions[w]`` is the next raw sample (decoded or corrupt) of logical
    worker ``w``'s stream; ``batches`` the batches consumed in all. A resumed
    loader starts its round-robin at logical worker ``batches % workers``.
    """

    workers: int = 1
    batches: int = 0
    positions: list[int] | None = None
    corrupt: int = 0

    def __post_init__(self) -> None:
        if self.positions is None:
            self.positions = [0] * max(1, self.workers)

    def update(self, worker: int, next_position: int, corrupt: int) -> None:
        self.batches += 1
        self.positions[worker] = next_position
        self.corrupt += corrupt

    def to_dict(self) -> dict:
        return {"workers": self.workers, "batches": self.batches, "positions": list(self.positions),
                "corrupt": self.corrupt}


class ShardStream(IterableDataset):
    """Endless, deterministic, resumable stream of WebDataset samples.

    Yields ``(image tensor, label ids, logical worker, next raw position,
    corrupt samples skipped just before)``. ``state`` says where each logical
    worker's stream resumes; loader worker ``i`` serves logical worker
    ``(i + state.batches) % num_workers`` so that a resumed DataLoader continues
    the round-robin exactly where the interrupted one stopped.

    A sample that cannot be decoded (no image member, bad image bytes, bad
    JSON, no labels) is counted and skipped. ``max_consecutive_corrupt``
    (samples; default :data:`MAX_CONSECUTIVE_CORRUPT` = 1000, at least 1)
    bounds how many corrupt samples in a row one worker skips: reaching it
    raises ``ValueError`` naming the shard(s) those samples came from, since
    an endless stream whose samples are all bad would otherwise never yield
    and the run would hang. Samples skipped undecoded on resume do not count.

    ``decode_scaling`` (``transforms.DECODE_SCALINGS``; default
    ``transforms.DEFAULT_DECODE_SCALING``) chooses how training samples are
    decoded (:func:`transforms.train_sample`); evaluation samples are always
    decoded whole. ``normalise=False`` yields uint8 images, to be normalised
    where they are used (``transforms.normalise_batch``, e.g. on the GPU):
    the same values, a quarter of the bytes through shared memory.
    """

    def __init__(self, urls: Sequence[str], spec: PreprocessSpec, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle_buffer: int = 1000, state: LoaderState | None = None,
                 train: bool = True, max_consecutive_corrupt: int = MAX_CONSECUTIVE_CORRUPT,
                 decode_scaling: str = DEFAULT_DECODE_SCALING, normalise: bool = True):
        super().__init__()
        if isinstance(max_consecutive_corrupt, bool) or not isinstance(max_consecutive_corrupt, int) \
                or max_consecutive_corrupt < 1:
            raise ValueError(f"max_consecutive_corrupt must be an integer >= 1, got {max_consecutive_corrupt!r}")
        self.max_consecutive_corrupt = max_consecutive_corrupt
        self.urls = list(urls)
        self.spec = spec
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.state = state or LoaderState()
        self.train = train
        self.decode_scaling = decode_scaling
        self.normalise = normalise

    # -- which shards --------------------------------------------------------------
    def shards_for(self, epoch: int, worker: int, num_workers: int) -> list[str]:
        order = np.random.default_rng([self.seed, epoch, 0x5A]).permutation(len(self.urls))
        mine = [self.urls[i] for i in order][self.rank::self.world_size]
        return mine[worker::num_workers]

    def check_split(self, num_workers: int) -> None:
        need = self.world_size * max(1, num_workers)
        if len(self.urls) < need:
            raise ValueError(f"{len(self.urls)} shards cannot give each of {self.world_size} rank(s) x "
                             f"{max(1, num_workers)} loader worker(s) its own shards; write smaller shards "
                             "(--samples-per-shard) or use fewer workers")

    # -- raw samples (bytes), shuffled before decoding ------------------------------------
    def raw_samples(self, worker: int, num_workers: int) -> Iterator[dict]:
        """Endless sample dicts for one logical worker, shuffled by a buffer
        (each shard read by :func:`shard_samples`: retried after read errors)."""
        epoch = 0
        while True:
            shards = self.shards_for(epoch, worker, num_workers)
            if not shards:
                raise ValueError(f"rank {self.rank} worker {worker} has no shards")
            rng = np.random.default_rng([self.seed, epoch, self.rank, worker, 0xB0F])
            buffer: list[dict] = []

            def stream(shards=shards):
                for url in shards:
                    yield from shard_samples(url)

            for sample in stream():
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(sample)
                    continue
                j = int(rng.integers(len(buffer)))
                buffer[j], sample = sample, buffer[j]
                yield sample
            while buffer:
                j = int(rng.integers(len(buffer)))
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                yield buffer.pop()
            epoch += 1

    def __iter__(self):
        info = get_worker_info()
        loader_worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        if num_workers != self.state.workers:
            raise ValueError(f"the stream was saved with {self.state.workers} loader workers; resume with "
                             f"the same number (got {num_workers})")
        worker = (loader_worker + self.state.batches) % num_workers
        skip = self.state.positions[worker]
        corrupt = 0  # corrupt samples since the last one yielded, i.e. in a row
        bad_shards: dict[str, int] = {}  # where those came from, in first-seen order
        for position, sample in enumerate(self.raw_samples(worker, num_workers)):
            if position < skip:
                continue  # already consumed before a restart: skipped undecoded
            rng = HashRNG(self.seed, self.rank, worker, position, 0xA06)
            try:
                image_key = image_member(sample)
                meta = json.loads(sample["json"])
                if self.train:
                    x = train_sample(sample[image_key], self.spec, rng, self.decode_scaling, self.normalise)
                else:
                    x = eval_transform(decode_image(sample[image_key]), self.spec, self.normalise)
                labels = [int(l) for l in meta["labels"]]
            except Exception:  # noqa: BLE001 - a corrupt sample is counted and skipped
                corrupt += 1
                url = str(sample.get("__url__", "?"))
                bad_shards[url] = bad_shards.get(url, 0) + 1
                if corrupt >= self.max_consecutive_corrupt:
                    raise ValueError(self._too_corrupt(corrupt, bad_shards, worker)) from None
                continue
            yield torch.from_numpy(x), labels, worker, position + 1, corrupt
            corrupt = 0
            bad_shards.clear()

    def _too_corrupt(self, count: int, bad_shards: dict[str, int], worker: int) -> str:
        shown = [f"{url} ({n})" for url, n in list(bad_shards.items())[:5]]
        if len(bad_shards) > 5:
            shown.append(f"and {len(bad_shards) - 5} more shard(s)")
        return (f"{count} consecutive samples could not be decoded (rank {self.rank}, loader worker {worker}; "
                f"limit --max-consecutive-corrupt {self.max_consecutive_corrupt}), from shard(s): "
                f"{', '.join(shown)}; the shards are damaged or not image shards")


def collate(batch):
    """Stack images; keep label lists; the batch's worker, next position and
    corrupt samples skipped (a batch always comes from one worker). In a
    loader worker the images are stacked straight into shared memory
    (``default_collate``), so the batch reaches the training process without
    another copy."""
    xs, labels, workers, positions, corrupt = zip(*batch)
    return torch.utils.data.default_collate(xs), list(labels), workers[0], max(positions), sum(corrupt)


class TargetDataset(Dataset):
    """A target split in its real layout: ``(image tensor, class index)``.

    Training items are augmented with an RNG seeded by ``(seed, epoch, index)``
    (set ``epoch`` between passes), so runs are reproducible, and decoded as
    ``decode_scaling`` says (:func:`transforms.train_sample`).
    """

    def __init__(self, root: str, layout: str, split: str, spec: PreprocessSpec | None, train: bool,
                 seed: int = 0, decode_scaling: str = DEFAULT_DECODE_SCALING):
        self.split = list_target(root, layout, split)
        self.spec = spec
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.decode_scaling = decode_scaling

    @property
    def classes(self) -> list[str]:
        return self.split.classes

    def __len__(self) -> int:
        return len(self.split.items)

    def __getitem__(self, i: int):
        path, label = self.split.items[i]
        data = read_item_bytes(path)
        if self.train:
            x = train_sample(data, self.spec, HashRNG(self.seed, self.epoch, i, 0x7A), self.decode_scaling)
        else:
            x = eval_transform(decode_image(data), self.spec)
        return torch.from_numpy(x), label
