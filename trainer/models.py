"""Model registry and the generalist checkpoint (schemas.checkpoint).

``small``: a 4-block CNN that trains in seconds on CPU (tests, the demo).
``resnet50`` and ``inception_v3``: torchvision's, when torchvision is
installed (``pip install .[vision]``), randomly initialised as the paper's
pre-training starts from scratch.

:func:`load_generalist` is the one loader the Beam pipeline and the trainer
share; it reads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import pickle
import re
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from schemas import io as sio
from schemas.checkpoint import (FINETUNED_FORMAT, GENERALIST_FORMAT, GENERALIST_FORMAT_VERSION,
                                validate_finetuned, validate_generalist, vocabulary_fingerprint)

from .transforms import PreprocessSpec, decode_image, eval_transform

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_INPUT_SIZE",
    "SmallCNN",
    "build_model",
    "classifier_head",
    "replace_head",
    "save_generalist",
    "read_generalist",
    "load_generalist",
    "preprocess_spec",
    "checkpoint_fingerprint",
    "save_finetuned",
    "load_finetuned",
    "load_weights",
    "feature_pool",
    "embedding_dim",
    "embed",
]


class SmallCNN(nn.Module):
    """Conv-BN-ReLU blocks (32, 64, 128, 256 channels, stride 2 after the
    first), global average pooling, linear head ``fc``. ~0.4M parameters."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        chans = [3, width, width * 2, width * 4, width * 8]
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, stride=1 if i == 0 else 2, padding=1,
                                 bias=False),
                       nn.BatchNorm2d(chans[i + 1]), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(chans[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _resnet50(num_classes: int) -> nn.Module:
    import torchvision

    return torchvision.models.resnet50(weights=None, num_classes=num_classes)


def _inception_v3(num_classes: int) -> nn.Module:
    import torchvision

    return torchvision.models.inception_v3(weights=None, num_classes=num_classes, aux_logits=False,
                                           init_weights=True)


ARCHITECTURES: dict[str, Callable[[int], nn.Module]] = {
    "small": SmallCNN,
    "resnet50": _resnet50,
    "inception_v3": _inception_v3,
}
#: Input side in pixels each architecture expects by default.
DEFAULT_INPUT_SIZE = {"small": 32, "resnet50": 224, "inception_v3": 299}


def build_model(architecture: str, num_classes: int) -> nn.Module:
    """A randomly initialised model of the registry."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; known: {sorted(ARCHITECTURES)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    try:
        return ARCHITECTURES[architecture](num_classes)
    except ImportError as e:
        raise ValueError(f"architecture {architecture!r} needs torchvision: pip install "
                         "'adaptive-transfer[vision]'") from e


def classifier_head(model: nn.Module) -> nn.Linear:
    """The final linear layer (``fc`` in every registered architecture)."""
    head = getattr(model, "fc", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__} has no linear 'fc' head")
    return head


def replace_head(model: nn.Module, num_classes: int, generator: torch.Generator | None = None) -> nn.Module:
    """Swap in a new, randomly initialised ``fc`` for ``num_classes`` (fine-tuning)."""
    old = classifier_head(model)
    new = nn.Linear(old.in_features, num_classes)
    bound = 1.0 / np.sqrt(old.in_features)
    with torch.no_grad():
        new.weight.uniform_(-bound, bound, generator=generator)
        new.bias.uniform_(-bound, bound, generator=generator)
    model.fc = new
    return model


def save_generalist(path: str, model: nn.Module, architecture: str, label_ids, spec: PreprocessSpec,
                    vocabulary: pa.Table | str, extra: dict[str, Any] | None = None) -> None:
    """Write the generalist checkpoint (atomically) for ``model``."""
    if isinstance(vocabulary, str):
        vocabulary = sio.read_parquet(vocabulary)
    label_ids = [int(i) for i in label_ids]
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    ckpt = {
        "format": GENERALIST_FORMAT,
        "format_version": GENERALIST_FORMAT_VERSION,
        "architecture": architecture,
        "num_classes": len(label_ids),
        "label_ids": label_ids,
        "input_size": int(spec.input_size),
        "resize": int(spec.resize),
        "mean": [float(m) for m in spec.mean],
        "std": [float(s) for s in spec.std],
        "vocabulary_fingerprint": vocabulary_fingerprint(vocabulary),
        "state_dict": state,
        "extra": dict(extra or {}),
    }
    validate_generalist(ckpt, path, vocabulary)
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    sio.write_bytes_atomic(path, buf.getvalue())


_GLOBAL = re.compile(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL) ([\w.]+)")


def _load_weights_only(path: str, what: str) -> Any:
    """``torch.load(weights_only=True)`` of a file on any filesystem; a file
    that is not a checkpoint is a ``ValueError`` naming it, in one line. A
    pickle that would run code (or build any object but tensors and plain
    containers) is refused, naming what it asks for, and never loaded
    otherwise (torch's hint to pass ``weights_only=False`` is not repeated)."""
    try:
        data = sio.read_bytes(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such {what} checkpoint") from None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = _GLOBAL.search(str(e))
        asks = f" ({found.group(1)})" if found else ""
        raise ValueError(f"{path}: refused as a {what} checkpoint: it holds Python objects other than tensors"
                         f"{asks}, which could run code when loaded; only weights are read "
                         "(torch.load weights_only=True)") from None
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for bad files
        first = " ".join(str(e).split("\n")[0].split())
        raise ValueError(f"{path}: cannot read {what} checkpoint: {type(e).__name__}: {first}") from None


def load_weights(model: nn.Module, state_dict: dict, path: str, architecture: str) -> None:
    """``model.load_state_dict(state_dict)``; weights that do not fit (another
    architecture, another number of classes) are a ``ValueError`` in one
    line naming ``path`` and the first mismatch of each kind."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError:
        raise ValueError(f"{path}: its weights do not fit architecture {architecture!r}: "
                         f"{_mismatches(model.state_dict(), state_dict)}") from None


def _mismatches(own: dict, given: dict) -> str:
    shapes = [f"{k} is {tuple(given[k].shape)}, the model's {tuple(v.shape)}" for k, v in own.items()
              if k in given and hasattr(given[k], "shape") and tuple(given[k].shape) != tuple(v.shape)]
    missing = [k for k in own if k not in given]
    unexpected = [k for k in given if k not in own]
    parts = [f"{len(shapes)} tensor(s) of another shape (first: {shapes[0]})" if shapes else "",
             f"{len(missing)} missing (first: {missing[0]})" if missing else "",
             f"{len(unexpected)} not in the model (first: {unexpected[0]})" if unexpected else ""]
    return "; ".join(p for p in parts if p) or "tensors of another kind"


def read_generalist(path: str, vocabulary: pa.Table | str | None = None) -> dict[str, Any]:
    """Load and validate the checkpoint dict (``weights_only=True``)."""
    if isinstance(vocabulary, str):
        vocabulary = sio.read_parquet(vocabulary)
    ckpt = _load_weights_only(path, "generalist")
    validate_generalist(ckpt, path, vocabulary)
    return ckpt


def preprocess_spec(ckpt: dict[str, Any]) -> PreprocessSpec:
    return PreprocessSpec(input_size=ckpt["input_size"], resize=ckpt["resize"], mean=ckpt["mean"],
                          std=ckpt["std"])


def load_generalist(path: str, vocabulary: pa.Table | str | None = None, device: str = "cpu"
                    ) -> tuple[nn.Module, Callable[[bytes], torch.Tensor]]:
    """``(model in eval mode, preprocess)``: ``preprocess(image_bytes)`` gives the
    CHW float tensor the model expects. With ``vocabulary``, a checkpoint
    trained on another label space is a clear error."""
    ckpt = read_generalist(path, vocabulary)
    model = build_model(ckpt["architecture"], ckpt["num_classes"])
    load_weights(model, ckpt["state_dict"], path, ckpt["architecture"])
    model.to(device).eval()
    spec = preprocess_spec(ckpt)

    def preprocess(data: bytes) -> torch.Tensor:
        return torch.from_numpy(eval_transform(decode_image(data), spec))

    return model, preprocess


def checkpoint_fingerprint(path: str) -> str:
    """sha256 of the checkpoint file (the 'model fingerprint' in summaries)."""
    return sio.file_sha256(path)


def save_finetuned(path: str, model: nn.Module, architecture: str, classes: list[str], spec: PreprocessSpec,
                   extra: dict[str, Any] | None = None) -> None:
    """Write a fine-tuned model (target classes, preprocessing, weights), atomically."""
    ckpt = {
        "format": FINETUNED_FORMAT, "format_version": GENERALIST_FORMAT_VERSION,
        "architecture": architecture, "classes": list(classes),
        "input_size": int(spec.input_size), "resize": int(spec.resize),
        "mean": [float(m) for m in spec.mean], "std": [float(s) for s in spec.std],
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "extra": dict(extra or {}),
    }
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    sio.write_bytes_atomic(path, buf.getvalue())


def load_finetuned(path: str, classes: list[str] | None = None, device: str = "cpu"
                   ) -> tuple[nn.Module, PreprocessSpec, dict[str, Any]]:
    """``(model in eval mode, preprocessing, checkpoint dict)`` (``weights_only=True``)."""
    ckpt = _load_weights_only(path, "fine-tuned")
    validate_finetuned(ckpt, path, classes)
    model = build_model(ckpt["architecture"], len(ckpt["classes"]))
    load_weights(model, ckpt["state_dict"], path, ckpt["architecture"])
    model.to(device).eval()
    return model, preprocess_spec(ckpt), ckpt


def feature_pool(model: nn.Module) -> nn.AdaptiveAvgPool2d:
    """The global average pool that turns the last feature map into the
    penultimate layer (the last ``AdaptiveAvgPool2d``: ``features[-2]`` of
    ``small``, ``avgpool`` of ResNet-50 and Inception-v3)."""
    pools = [m for m in model.modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    if not pools:
        raise ValueError(f"{type(model).__name__} has no global average pool before its head")
    return pools[-1]


def embedding_dim(model: nn.Module, grid: int = 1) -> int:
    """Length of :func:`embed`'s vectors: channels of the last feature map
    (the head's input features) times ``grid`` squared."""
    return classifier_head(model).in_features * grid * grid


def embed(model: nn.Module, x: torch.Tensor, grid: int = 1) -> torch.Tensor:
    """Image embeddings (N, C * grid * grid), float32, of a model in eval mode,
    for near-duplicate search: the last feature map (the input of
    :func:`feature_pool`) average-pooled over a ``grid`` x ``grid`` grid of
    cells and flattened channel first (``grid=1``: the penultimate layer),
    then power-normalised (signed square root: damps the few large
    activations that dominate an average, as in image retrieval) and
    L2-normalised. Call under ``torch.no_grad()``."""
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    captured: list[torch.Tensor] = []
    hook = feature_pool(model).register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        model(x)
    finally:
        hook.remove()
    pooled = nn.functional.adaptive_avg_pool2d(captured[0].float(), grid).flatten(1)
    return nn.functional.normalize(pooled.sign() * pooled.abs().sqrt(), dim=1)
