"""Target soft-label histograms P_t as Beam composite transforms.

paths -> read bytes (Beam filesystems) -> decode and preprocess exactly as
the generalist expects -> ``RunInference`` with a PyTorch handler whose
loader builds the model from the checkpoint -> ``softmax(logits / T)``
reduced inside each batch to exact integer sums -> summed globally.

:class:`KeyedTargetHistogram` does this for several targets at once: each
image carries its target's key, every image goes through the generalist
once (a batch may hold several targets' images: fixed-shape forward passes
make an image's softmax independent of its neighbours), and the sums are
kept apart by key. :class:`TargetHistogram` is the one-target form.

Unreadable or corrupt images go to a side output: counted, named, skipped.
Target *labels* are never read.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import apache_beam as beam
import numpy as np
import torch
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import PredictionResult, RunInference
from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerTensor
from apache_beam.options.pipeline_options import PipelineOptions

from schemas.targets import read_item_bytes
from trainer.models import build_model, load_generalist
from trainer.transforms import PreprocessSpec, decode_image, eval_transform

from .unreadable import BAD_IMAGES
from .weights import quantize_probabilities, softmax

__all__ = ["BAD_IMAGES", "ProbabilitySums", "softmax_sums_inference", "GeneralistModelHandler",
           "ReadAndPreprocess", "SumProbabilities", "KeyedTargetHistogram", "TargetHistogram", "InferenceOptions",
           "inference_settings"]



@dataclass
class ProbabilitySums:
    """Exact column sums of softmax vectors (two int64/Python-int limbs) and
    the number of images they cover."""

    hi: np.ndarray
    lo: np.ndarray
    count: int


def softmax_sums_inference(batch: Sequence[tuple[Any, torch.Tensor]], model: torch.nn.Module, device: Any,
                           inference_args: Optional[dict] = None, model_id: Optional[str] = None, *,
                           temperature: float, batch_size: int) -> Iterable[PredictionResult]:
    """One result per batch of ``(key, image)``: the batch's exact softmax
    sums per key, as a list of ``(key, ProbabilitySums)``.

    Forward passes have ``batch_size`` images (a short one is padded) so that
    every pass has the same shape: per-image outputs then do not depend on
    how Beam grouped the images (nor on which targets' images share a
    batch), and P_t is identical for any number of workers or targets.
    """
    keys = [key for key, _ in batch]
    sums: dict[Any, list] = {}
    with torch.no_grad():
        for start in range(0, len(batch), batch_size):
            chunk = [image for _, image in batch[start:start + batch_size]]
            real = len(chunk)
            x = torch.stack(chunk)
            if real < batch_size:
                x = torch.cat([x, x.new_zeros((batch_size - real, *x.shape[1:]))])
            probabilities = softmax(model(x.to(device))[:real].float().cpu().numpy(), temperature)
            chunk_keys = keys[start:start + real]
            key_array = np.asarray(chunk_keys)
            for key in dict.fromkeys(chunk_keys):  # the targets in this chunk (few)
                rows = np.flatnonzero(key_array == key)
                hi, lo = quantize_probabilities(probabilities[rows])
                acc = sums.setdefault(key, [0, 0, 0])
                acc[0], acc[1], acc[2] = acc[0] + hi, acc[1] + lo, acc[2] + len(rows)
    found = [(key, ProbabilitySums(hi, lo, count)) for key, (hi, lo, count) in sums.items()]
    return [PredictionResult(example=len(batch), inference=found, model_id=model_id)]


class InferenceOptions(PipelineOptions):
    """Pipeline options for where the generalist runs on the workers
    (:func:`inference_settings` turns them into model handler arguments).

    ``--inference_device``: ``CPU`` (default) or ``GPU`` (workers with CUDA:
    the Dockerfile's CUDA image on Dataflow GPU workers). ``--large_model``:
    one copy of the model per worker VM, shared by its SDK processes
    (RunInference's shared model) instead of one per process; for models
    that do not fit once per process, or one GPU. ``--model_copies N``:
    that many shared copies per VM (e.g. one per GPU; implies
    ``--large_model``). Defaults: a copy per process, as RunInference does.
    """

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--inference_device", type=str.upper, choices=("CPU", "GPU"), default="CPU",
                            help="where the workers run the generalist (default CPU)")
        parser.add_argument("--large_model", action="store_true", default=False,
                            help="share one model per worker VM between its SDK processes")
        parser.add_argument("--model_copies", type=int, default=None,
                            help="shared model copies per worker VM (implies --large_model)")


def inference_settings(options: PipelineOptions) -> dict:
    """``device``, ``large_model`` and ``model_copies`` for a model handler
    (:class:`GeneralistModelHandler`, :class:`TargetHistogram`) from the
    pipeline's :class:`InferenceOptions`. Raises ``ValueError`` for
    ``--model_copies`` below 1."""
    view = options.view_as(InferenceOptions)
    if view.model_copies is not None and view.model_copies < 1:
        raise ValueError(f"--model_copies must be >= 1, got {view.model_copies}")
    return {"device": view.inference_device, "large_model": bool(view.large_model or view.model_copies),
            "model_copies": view.model_copies}


def stage_options(pipeline_args: "Sequence[str] | PipelineOptions") -> PipelineOptions:
    """Beam's options for a stage's run: parsed (:func:`~beam_pipelines.execution.pipeline_options`),
    the inference options checked before any output is touched, and set on
    Beam's filesystems, through which the inputs are listed before the
    pipeline exists (``--s3_endpoint_url``, credentials, GCP project)."""
    from .execution import pipeline_options

    options = pipeline_options(pipeline_args)
    inference_settings(options)
    FileSystems.set_options(options)
    return options


class GeneralistModelHandler(PytorchModelHandlerTensor):
    """PyTorch handler whose loader is :func:`trainer.models.load_generalist`
    (``weights_only=True``): the model is built on the worker from the
    checkpoint path, never captured in a closure. ``device``, ``large_model``
    and ``model_copies`` are RunInference's (see :class:`InferenceOptions`;
    defaults: CPU, a copy per process)."""

    def __init__(self, checkpoint: str, temperature: float = 2.0, batch_size: int = 64,
                 device: str = "CPU", *, large_model: bool = False, model_copies: int | None = None):
        super().__init__(
            state_dict_path=checkpoint, model_class=build_model, device=device,
            inference_fn=functools.partial(softmax_sums_inference, temperature=temperature,
                                           batch_size=batch_size),
            min_batch_size=batch_size, max_batch_size=batch_size, large_model=large_model,
            model_copies=model_copies)
        self._checkpoint = checkpoint

    def load_model(self) -> torch.nn.Module:
        model, _ = load_generalist(self._checkpoint, device=str(self._device))
        # No autograd: with large_model the forward pass runs in the process that
        # holds the shared model, where the caller's torch.no_grad() does not reach,
        # and outputs that require grad cannot be sent back.
        return model.requires_grad_(False)

    def get_num_bytes(self, batch: Sequence) -> int:
        tensors = [t[1] if isinstance(t, tuple) else t for t in batch]
        return sum(t.numel() * t.element_size() for t in tensors)


class ReadAndPreprocess(beam.DoFn):
    """path (or a list of paths) -> CHW float tensor(s); ``(path, reason)`` to
    :data:`BAD_IMAGES` when a file cannot be read or decoded. Keyed: ``(key,
    path)`` (or a list of them) -> ``(key, tensor)``, and ``(key, (path,
    reason))`` to :data:`BAD_IMAGES`."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.read = Metrics.counter("target_histogram", "images_read")
        self.bad = Metrics.counter("target_histogram", "images_unreadable")

    def setup(self):
        self._spec = PreprocessSpec(**self.spec)

    def process(self, element):
        for item in [element] if isinstance(element, (str, tuple)) else element:
            keyed = isinstance(item, tuple)
            key, path = item if keyed else (None, item)
            try:
                data = read_item_bytes(path, opener=FileSystems.open)
                tensor = torch.from_numpy(eval_transform(decode_image(data), self._spec))
            except Exception as e:  # noqa: BLE001 - any unreadable file is counted, not fatal
                self.bad.inc()
                bad = (path, f"{type(e).__name__}: {e}"[:300])
                yield beam.pvalue.TaggedOutput(BAD_IMAGES, (key, bad) if keyed else bad)
                continue
            self.read.inc()
            yield (key, tensor) if keyed else tensor


class SumProbabilities(beam.CombineFn):
    """Exact global sum of :class:`ProbabilitySums` (Python-int limbs)."""

    def create_accumulator(self):
        return None

    def add_input(self, acc, element: ProbabilitySums):
        return self.merge_accumulators([acc, element])

    def merge_accumulators(self, accumulators):
        hi = lo = None
        count = 0
        for acc in accumulators:
            if acc is None:
                continue
            h, l = acc.hi.astype(object), acc.lo.astype(object)
            hi = h if hi is None else hi + h
            lo = l if lo is None else lo + l
            count += acc.count
        return None if hi is None else ProbabilitySums(hi, lo, count)

    def extract_output(self, acc):
        return acc


class KeyedTargetHistogram(beam.PTransform):
    """PCollection of ``(key, image path)`` -> ``{"sums": (key,
    ProbabilitySums) per key with a readable image, "bad": (key, (path,
    reason))}``: every image through the generalist once, whatever its key.

    ``spec`` is the checkpoint's preprocessing (a :class:`PreprocessSpec` dict);
    ``device``, ``large_model`` and ``model_copies`` go to the model handler
    (:func:`inference_settings` reads them from pipeline options).
    """

    def __init__(self, checkpoint: str, spec: dict, temperature: float = 2.0, batch_size: int = 64,
                 device: str = "CPU", *, large_model: bool = False, model_copies: int | None = None):
        super().__init__()
        self.checkpoint = checkpoint
        self.spec = dict(spec)
        self.temperature = temperature
        self.batch_size = batch_size
        self.device = device
        self.large_model = large_model
        self.model_copies = model_copies

    def expand(self, items):
        # Chunks of paths, not single paths, cross the fusion break that spreads
        # the work over workers: per-element shuffle overhead is paid per chunk.
        decoded = (items
                   | "ChunkPaths" >> beam.BatchElements(min_batch_size=self.batch_size,
                                                        max_batch_size=self.batch_size)
                   | "SpreadChunks" >> beam.Reshuffle()
                   | "ReadAndPreprocess" >> beam.ParDo(ReadAndPreprocess(self.spec)).with_outputs(
                       BAD_IMAGES, main="images"))
        handler = GeneralistModelHandler(self.checkpoint, self.temperature, self.batch_size, self.device,
                                         large_model=self.large_model, model_copies=self.model_copies)
        sums = (decoded.images
                | "RunInference" >> RunInference(handler)
                | "BatchSums" >> beam.FlatMap(lambda r: r.inference)
                | "SumBatches" >> beam.CombinePerKey(SumProbabilities()))
        return {"sums": sums, "bad": decoded[BAD_IMAGES]}


class TargetHistogram(beam.PTransform):
    """PCollection of image paths -> ``{"sums": ProbabilitySums (one element;
    ``None`` where no image was readable), "bad": PCollection of (path, reason)}``:
    :class:`KeyedTargetHistogram` of one target (same arguments)."""

    def __init__(self, checkpoint: str, spec: dict, temperature: float = 2.0, batch_size: int = 64,
                 device: str = "CPU", *, large_model: bool = False, model_copies: int | None = None):
        super().__init__()
        self.keyed = KeyedTargetHistogram(checkpoint, spec, temperature, batch_size, device,
                                          large_model=large_model, model_copies=model_copies)

    def expand(self, paths):
        out = paths | "Keyed" >> beam.Map(lambda path: (0, path)) | "Histogram" >> self.keyed
        sums = out["sums"] | "Sums" >> beam.Values() | "One" >> beam.CombineGlobally(SumProbabilities())
        return {"sums": sums, "bad": out["bad"] | "Bad" >> beam.Values()}
