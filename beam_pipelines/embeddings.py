"""Image embeddings through Beam ``RunInference``, and the stored source embeddings.

An embedding is :func:`trainer.models.embed` of the generalist: its last
feature map average-pooled over a ``grid`` x ``grid`` grid (``grid=1``: the
penultimate layer itself), square-rooted and L2-normalised, kept as float16
(2 bytes a dimension).

* Source: the index's Parquet files are split into row groups (the unit of
  parallelism, as for the label counts); each row group is read in Arrow
  batches of ``batch_size`` rows (``key`` and ``image``, or ``uri`` fetched
  under the allowed prefixes of schemas.uri_policy), decoded and
  preprocessed as the generalist expects into one tensor per batch, and
  ``RunInference`` embeds each batch in one forward pass. A worker holds one
  row group's encoded images (pyarrow reads a row group's column chunk) and
  one batch of tensors, never more, whatever the size of the index.
* Target: the images of the named splits, in chunks of ``batch_size``
  paths, the same way; the embeddings are gathered into one
  :class:`TargetEmbeddings` (a side input: at most ~100k rows).
* The store (``--embeddings DIR``, stage ``source_embeddings``): Parquet
  files of ``key``, ``file``, ``row`` (the example's row in its index file)
  and ``embedding`` (fixed-size binary, float16 little-endian), plus
  ``embeddings.json`` with the fingerprint of what made them (model, index
  listing, grid, allowed uri prefixes). Read back in row groups, batch by batch.

Images that cannot be read or decoded go to the :data:`BAD_IMAGES` side
output as ``(key or path, reason)``: counted and named, never fatal here.
"""

from __future__ import annotations

import functools
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, PredictionResult, RunInference
from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerTensor

from schemas import io as sio
from schemas.stage_output import StageOutput, fingerprint_of
from schemas.targets import read_item_bytes
from trainer.models import build_model, embed
from trainer.transforms import PreprocessSpec, decode_image, eval_transform

from .label_counts import split_row_groups
from .target_histogram import GeneralistModelHandler
from .unreadable import BAD_IMAGES

__all__ = ["BAD_IMAGES", "STORE_STAGE", "STORE_META", "STORE_FORMAT_VERSION", "EmbeddedRows", "concat_rows",
           "TargetEmbeddings",
           "embedding_inference", "EmbeddingModelHandler", "ReadSourceImages", "ReadTargetImages",
           "CollectTarget", "EmbedSource", "EmbedTarget", "store_schema", "rows_table", "table_rows",
           "WriteStore", "ReadStore", "open_store"]

#: Stage name of the ``--embeddings`` store (its ``_STAGE`` marker).
STORE_STAGE = "source_embeddings"
#: The store's description and fingerprint (JSON), written before its ``_SUCCESS``.
STORE_META = "embeddings.json"
STORE_FORMAT_VERSION = 1
#: Rows of a stored Parquet row group are about this many bytes (default 32 MiB).
STORE_ROW_GROUP_BYTES = 32 << 20


@dataclass
class EmbeddedRows:
    """Embeddings of a batch of source examples: ``keys``, the index ``files``
    and ``rows`` (row within that file) they come from, and ``vectors``
    (n, D) float16, L2-normalised before rounding."""

    keys: list[str]
    files: list[str]
    rows: np.ndarray
    vectors: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)


def concat_rows(chunks: Sequence[EmbeddedRows]) -> EmbeddedRows:
    """Several batches of embedded rows as one."""
    if len(chunks) == 1:
        return chunks[0]
    return EmbeddedRows([k for c in chunks for k in c.keys], [f for c in chunks for f in c.files],
                        np.concatenate([c.rows for c in chunks]), np.concatenate([c.vectors for c in chunks]))


@dataclass
class TargetEmbeddings:
    """Every readable target image: ``paths``, ``splits`` and ``vectors``
    (m, D) float16, ordered as the images were listed (split by split).
    ``token`` names this collection across copies (a side input may be
    decoded anew for each element), so a worker prepares it once."""

    paths: list[str] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float16))
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __len__(self) -> int:
        return len(self.paths)


def embedding_inference(batch: Sequence[torch.Tensor], model: torch.nn.Module, device: Any,
                        inference_args: Optional[dict] = None, model_id: Optional[str] = None, *,
                        batch_size: int, grid: int) -> Iterable[PredictionResult]:
    """One result per element of ``batch``, each a (n, C, H, W) tensor of
    preprocessed images: their :func:`trainer.models.embed` vectors, float16.

    Forward passes always have ``batch_size`` images (a short batch is padded
    with zeros), so an image's embedding does not depend on how many images
    it was read with."""
    results = []
    with torch.no_grad():
        for images in batch:
            parts = []
            for start in range(0, images.shape[0], batch_size):
                x = images[start:start + batch_size]
                real = x.shape[0]
                if real < batch_size:
                    x = torch.cat([x, x.new_zeros((batch_size - real, *x.shape[1:]))])
                parts.append(embed(model, x.to(device), grid)[:real].cpu().numpy().astype(np.float16))
            results.append(PredictionResult(example=images.shape[0], inference=np.concatenate(parts),
                                            model_id=model_id))
    return results


class EmbeddingModelHandler(GeneralistModelHandler):
    """The generalist's handler (loaded on the worker from the checkpoint,
    ``weights_only=True``) with :func:`embedding_inference`. Each element is
    already a batch of images, so RunInference passes them one at a time."""

    def __init__(self, checkpoint: str, grid: int = 2, batch_size: int = 64, device: str = "CPU"):
        PytorchModelHandlerTensor.__init__(
            self, state_dict_path=checkpoint, model_class=build_model, device=device,
            inference_fn=functools.partial(embedding_inference, batch_size=batch_size, grid=grid),
            min_batch_size=1, max_batch_size=1)
        self._checkpoint = checkpoint


def _preprocess(data: bytes, spec: PreprocessSpec) -> torch.Tensor:
    return torch.from_numpy(eval_transform(decode_image(data), spec))


def _reason(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"[:300]


class ReadSourceImages(beam.DoFn):
    """:class:`~beam_pipelines.label_counts.RowGroup` of the index ->
    ``((file, rows, keys), images)`` per Arrow batch of ``batch_size`` rows;
    ``(key, reason)`` to :data:`BAD_IMAGES` for an image that cannot be read,
    fetched (a uri outside ``uri_prefixes``) or decoded."""

    def __init__(self, spec: dict, column: str, batch_size: int, uri_prefixes: Sequence[str] = ()):
        self.spec = dict(spec)
        self.column = column
        self.batch_size = batch_size
        self.uri_prefixes = tuple(uri_prefixes)
        self.read = Metrics.counter("near_duplicates", "source_images_read")
        self.bad = Metrics.counter("near_duplicates", "source_images_unreadable")

    def setup(self):
        self._spec = PreprocessSpec(**self.spec)

    def _images(self, batch: pa.RecordBatch) -> list:
        """Each row's encoded bytes, or why there are none (a str)."""
        values = batch.column(1).to_pylist()
        if self.column == "image":
            return [v if v is not None else "no image bytes" for v in values]
        from schemas.uri_policy import check_uris, read_target

        out: list = []
        for uri, verdict in zip(values, check_uris(self.uri_prefixes, values)):
            if verdict.reason is not None:
                out.append(verdict.reason)
                continue
            try:
                out.append(read_target(verdict.target, self.uri_prefixes))
            except Exception as e:  # noqa: BLE001 - a missing image is counted, not fatal
                out.append(f"unreadable uri {uri!r}: {_reason(e)}"[:300])
        return out

    def process(self, rg):
        with FileSystems.open(rg.path) as fh:
            batches = pq.ParquetFile(fh).iter_batches(batch_size=self.batch_size, row_groups=[rg.index],
                                                      columns=["key", self.column], use_threads=False)
            first = rg.first_row
            for batch in batches:
                keys = batch.column(0).to_pylist()
                tensors, rows, good = [], [], []
                for i, (key, data) in enumerate(zip(keys, self._images(batch))):
                    try:
                        if isinstance(data, str):
                            raise ValueError(data)
                        tensors.append(_preprocess(data, self._spec))
                    except Exception as e:  # noqa: BLE001 - any unreadable image is counted, not fatal
                        self.bad.inc()
                        reason = str(e) if isinstance(data, str) else _reason(e)
                        yield beam.pvalue.TaggedOutput(BAD_IMAGES, (key, reason))
                        continue
                    rows.append(first + i)
                    good.append(key)
                first += batch.num_rows
                if tensors:
                    self.read.inc(len(tensors))
                    yield (rg.path, np.asarray(rows, np.int64), good), torch.stack(tensors)


class ReadTargetImages(beam.DoFn):
    """A list of ``(position, split, path)`` -> ``((positions, splits, paths),
    images)``; ``(path, reason)`` to :data:`BAD_IMAGES` when a file cannot be
    read or decoded."""

    def __init__(self, spec: dict):
        self.spec = dict(spec)
        self.read = Metrics.counter("near_duplicates", "target_images_read")
        self.bad = Metrics.counter("near_duplicates", "target_images_unreadable")

    def setup(self):
        self._spec = PreprocessSpec(**self.spec)

    def process(self, items):
        tensors, good = [], []
        for position, split, path in items:
            try:
                tensors.append(_preprocess(read_item_bytes(path, opener=FileSystems.open), self._spec))
            except Exception as e:  # noqa: BLE001 - any unreadable file is counted, not fatal
                self.bad.inc()
                yield beam.pvalue.TaggedOutput(BAD_IMAGES, (path, _reason(e)))
                continue
            good.append((position, split, path))
        if tensors:
            self.read.inc(len(tensors))
            yield tuple(zip(*good)), torch.stack(tensors)


class CollectTarget(beam.CombineFn):
    """Embedded target chunks ``((positions, splits, paths), vectors)`` -> one
    :class:`TargetEmbeddings` in listing order (by position), whatever the
    order in which Beam embedded them."""

    def create_accumulator(self):
        return []

    def add_input(self, acc, element):
        acc.append(element)
        return acc

    def merge_accumulators(self, accumulators):
        return [chunk for acc in accumulators for chunk in acc]

    def extract_output(self, acc):
        if not acc:
            return TargetEmbeddings()
        positions = np.concatenate([np.asarray(meta[0], np.int64) for meta, _ in acc])
        splits = [s for meta, _ in acc for s in meta[1]]
        paths = [p for meta, _ in acc for p in meta[2]]
        order = np.argsort(positions, kind="stable")
        vectors = np.concatenate([v for _, v in acc])[order]
        return TargetEmbeddings([paths[i] for i in order], [splits[i] for i in order], vectors)


def _keyed_handler(checkpoint: str, grid: int, batch_size: int, device: str) -> KeyedModelHandler:
    return KeyedModelHandler(EmbeddingModelHandler(checkpoint, grid, batch_size, device))


class EmbedSource(beam.PTransform):
    """PCollection of index Parquet paths -> ``{"embeddings": EmbeddedRows,
    "bad": (key, reason)}``. ``column``: ``image`` or ``uri`` (then only
    under ``uri_prefixes``); ``spec``: the checkpoint's preprocessing."""

    def __init__(self, checkpoint: str, spec: dict, column: str, grid: int = 2, batch_size: int = 64,
                 uri_prefixes: Sequence[str] = (), device: str = "CPU"):
        super().__init__()
        self.checkpoint, self.spec, self.column = checkpoint, dict(spec), column
        self.grid, self.batch_size, self.uri_prefixes, self.device = grid, batch_size, tuple(uri_prefixes), device

    def expand(self, files):
        images = (files
                  | "SplitRowGroups" >> beam.FlatMap(split_row_groups)
                  | "SpreadRowGroups" >> beam.Reshuffle()
                  | "ReadSourceImages" >> beam.ParDo(ReadSourceImages(
                      self.spec, self.column, self.batch_size, self.uri_prefixes)).with_outputs(
                      BAD_IMAGES, main="images"))
        embedded = (images.images
                    | "EmbedSourceImages" >> RunInference(_keyed_handler(self.checkpoint, self.grid,
                                                                         self.batch_size, self.device))
                    | "ToEmbeddedRows" >> beam.MapTuple(
                        lambda meta, result: EmbeddedRows(meta[2], [meta[0]] * len(meta[2]), meta[1],
                                                          result.inference)))
        return {"embeddings": embedded, "bad": images[BAD_IMAGES]}


class EmbedTarget(beam.PTransform):
    """PCollection of ``(position, split, path)`` -> ``{"target": one
    TargetEmbeddings (in position order), "bad": (path, reason)}``."""

    def __init__(self, checkpoint: str, spec: dict, grid: int = 2, batch_size: int = 64, device: str = "CPU"):
        super().__init__()
        self.checkpoint, self.spec = checkpoint, dict(spec)
        self.grid, self.batch_size, self.device = grid, batch_size, device

    def expand(self, items):
        images = (items
                  | "ChunkTargetPaths" >> beam.BatchElements(min_batch_size=self.batch_size,
                                                             max_batch_size=self.batch_size)
                  | "SpreadTargetChunks" >> beam.Reshuffle()
                  | "ReadTargetImages" >> beam.ParDo(ReadTargetImages(self.spec)).with_outputs(
                      BAD_IMAGES, main="images"))
        target = (images.images
                  | "EmbedTargetImages" >> RunInference(_keyed_handler(self.checkpoint, self.grid,
                                                                       self.batch_size, self.device))
                  | "TargetVectors" >> beam.MapTuple(lambda meta, result: (meta, result.inference))
                  | "CollectTarget" >> beam.CombineGlobally(CollectTarget()))
        return {"target": target, "bad": images[BAD_IMAGES]}


# -- the store ----------------------------------------------------------------------------

def store_schema(dim: int) -> pa.Schema:
    """Schema of the stored embeddings (``dim`` float16 values per row)."""
    return pa.schema([pa.field("key", pa.string(), nullable=False), pa.field("file", pa.string(), nullable=False),
                      pa.field("row", pa.int64(), nullable=False),
                      pa.field("embedding", pa.binary(2 * dim), nullable=False)])


def rows_table(chunks: Sequence[EmbeddedRows], dim: int) -> pa.Table:
    """Embedded rows as a table of :func:`store_schema`."""
    rows = concat_rows(chunks)
    data = pa.py_buffer(np.ascontiguousarray(rows.vectors.astype("<f2", copy=False)).tobytes())
    embedding = pa.FixedSizeBinaryArray.from_buffers(pa.binary(2 * dim), len(rows), [None, data])
    return pa.Table.from_arrays([pa.array(rows.keys, pa.string()), pa.array(rows.files, pa.string()),
                                 pa.array(rows.rows, pa.int64()), embedding], schema=store_schema(dim))


def table_rows(batch: pa.RecordBatch | pa.Table, dim: int) -> EmbeddedRows:
    """A batch of :func:`store_schema` rows back as :class:`EmbeddedRows`."""
    column = batch.column("embedding")
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.type != pa.binary(2 * dim):
        raise ValueError(f"stored embeddings are {column.type}, expected {pa.binary(2 * dim)} ({dim} float16)")
    flat = np.frombuffer(column.buffers()[1], dtype="<f2")[column.offset * dim:(column.offset + len(column)) * dim]
    return EmbeddedRows(batch.column("key").to_pylist(), batch.column("file").to_pylist(),
                        np.asarray(batch.column("row").to_numpy(), np.int64),
                        flat.reshape(len(column), dim).astype(np.float16))


class WriteStore(beam.PTransform):
    """EmbeddedRows -> Parquet files ``<prefix>-SSSSS-of-NNNNN.parquet`` of
    :func:`store_schema` (row groups of about :data:`STORE_ROW_GROUP_BYTES`);
    the output is the PCollection of the files written."""

    def __init__(self, prefix: str, dim: int, batch_size: int):
        super().__init__()
        self.prefix, self.dim = prefix, dim
        self.chunks = max(1, STORE_ROW_GROUP_BYTES // max(1, batch_size * (2 * dim + 64)))

    def expand(self, embedded):
        dim = self.dim
        return (embedded
                | "GroupForRowGroups" >> beam.BatchElements(min_batch_size=self.chunks, max_batch_size=self.chunks)
                | "ToTable" >> beam.Map(lambda chunks: rows_table(chunks, dim))
                | "WriteParquet" >> beam.io.WriteToParquetBatched(self.prefix, store_schema(dim), codec="snappy",
                                                                  file_name_suffix=".parquet"))


class _ReadStoreRowGroup(beam.DoFn):
    def __init__(self, dim: int, batch_size: int):
        self.dim, self.batch_size = dim, batch_size
        self.read = Metrics.counter("near_duplicates", "stored_embeddings_read")

    def process(self, rg):
        with FileSystems.open(rg.path) as fh:
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=self.batch_size, row_groups=[rg.index],
                                                         use_threads=False):
                self.read.inc(batch.num_rows)
                yield table_rows(batch, self.dim)


class ReadStore(beam.PTransform):
    """PCollection of the store's Parquet paths -> EmbeddedRows, ``batch_size``
    rows at a time, row group by row group."""

    def __init__(self, dim: int, batch_size: int):
        super().__init__()
        self.dim, self.batch_size = dim, batch_size

    def expand(self, files):
        return (files
                | "SplitStoreRowGroups" >> beam.FlatMap(split_row_groups)
                | "SpreadStoreRowGroups" >> beam.Reshuffle()
                | "ReadStoreRowGroup" >> beam.ParDo(_ReadStoreRowGroup(self.dim, self.batch_size)))


def _recorded_fingerprint(store: StageOutput) -> dict:
    """The fingerprint a finished store was made from: kept in its marker (the
    output protocol's), or, for a store written before the marker held it, in
    its ``embeddings.json``."""
    recorded = fingerprint_of(store.path)
    if recorded is not None:
        return recorded["settings"]
    return json.loads(sio.read_bytes(sio.join(store.path, STORE_META))).get("fingerprint", {})


def open_store(path: str, fingerprint: dict[str, Any]) -> tuple[StageOutput, dict[str, Any] | None]:
    """The store at ``path`` and its description when it is complete (``None``:
    it is to be written, with ``fingerprint`` in its marker; raises
    ``ValueError`` where it may not be). A complete store made from other
    inputs (another model, index, grid or uri prefixes) is refused with a
    message that names the difference. The fingerprint leaves the code out
    (:data:`STORE_FORMAT_VERSION` stands for it): a store costs a forward pass
    per source image, and embeddings made by the same model, grid and format
    are the same whatever else changed."""
    store = StageOutput(path, STORE_STAGE)
    if not store.is_complete():
        store.check()  # refuses a directory that is not the store's own
        return store, None
    stored = _recorded_fingerprint(store)
    wanted = json.loads(json.dumps(fingerprint, sort_keys=True))
    if not store.matches(fingerprint) and stored != wanted:
        differ = [k for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)]
        shown = "; ".join(f"{k}: stored {_short(stored.get(k))}, this run {_short(wanted.get(k))}"
                          for k in differ)
        what = "another model" if "model" in differ else "other inputs"
        raise ValueError(f"--embeddings {path} holds source embeddings made with {what} ({shown}); embeddings "
                         "of different models or inputs cannot be compared: give a new --embeddings directory "
                         "(one per source and model) or delete this one")
    return store, json.loads(sio.read_bytes(sio.join(path, STORE_META)))


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text[:16] + "..." if len(text) > 19 else text
