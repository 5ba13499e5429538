"""Loader throughput at real image sizes: the trainer's loader against a plain
PIL loop and other JPEG decoders, on ImageNet-like JPEGs, with and without
``write_shards --max-side``.

::

    .venv/bin/python -m benchmarks.loader_bench [--images 2000] [--sizes 224,299] [--workers 1,2]
        [--max-side 512] [--quality 90] [--work /tmp/loader-bench] [--gpu]

Data (generated once into ``--work``, then reused): JPEGs sized like
ImageNet's (most 500x375, 375x500, 500x333 or 500x500, some smaller, 4 %
from 1024x768 to 2048x1536; 2 % grayscale), quality 85/90/95, content with
a natural image's 1/f spectrum, edges and sensor noise, so that a 500x375
image is about 100 KB as in ImageNet (flat colours would be a few KB and
decode several times faster). ``write_shards`` writes them twice: as they
are, and with ``--max-side``.

Per shard set and training input size (224: ResNet-50, 299: Inception-v3),
one process each unless said, the same images, in one run:

* ``plain PIL loop``: tarfile, PIL decode, RandomResizedCrop, flip,
  normalise with numpy broadcasting (the textbook loop; the baseline);
* ``same, trainer transform``: the loop with ``trainer.transforms.train_sample``
  (decode whole): the trainer's per-image work without the loader around it;
* ``PIL draft``: the loop with ``train_sample(decode_scaling="draft")``;
* ``simplejpeg`` / ``PyTurboJPEG`` (when installed; PyTurboJPEG needs the
  system's libturbojpeg): scale-on-decode at the same power-of-two factor
  as draft, and for simplejpeg also any factor M/8 (the smallest that keeps
  the crop at least the input size);
* ``loader``: ``trainer.data.ShardStream`` through a DataLoader with N
  workers (tar streaming, each shard checked against its manifest entry as
  it streams, shuffle buffer, decode, augmentation, batching into shared
  memory), whole and with draft decoding; ``loader 1w draft, unchecked``:
  the same without the manifest check (sha256 of every byte read, sample
  count), so that the check's cost is the difference.

Reported: images per CPU-second of one worker process (per worker: what a
worker does with a core of its own; a loop is one worker) and of every
process, the training process that receives the batches included (per
core), ratios to the plain loop (side by side, one run), wall-clock images/s
per worker (only meaningful on otherwise idle cores), per-image decode ms and shard bytes per
image, how far draft decoding moves the pixels, where (by the stored image's
longer side) draft decoding gains most, and how many loader workers one GPU
needs at the measured ResNet-50 (2,127 img/s, 224) and Inception-v3 (1,169
img/s, 299) rates of ``benchmarks/gpu_resnet50.py`` on one H100.

``--gpu`` adds, where CUDA is available, ``torchvision.io.decode_jpeg`` on the
GPU and ``trainer.pretrain`` (ResNet-50 and Inception-v3, bf16) fed from
these shards, against those synthetic-input figures; without CUDA it says so
and skips. Asserts nothing.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import tarfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageDraw

from schemas.arrow import INDEX_SCHEMA_INLINE
from adaptive_transfer.synthetic import make_vocabulary
from trainer.data import LoaderConfig, LoaderState, ShardStream, ShardList, collate, read_shard_list, shard_urls
from trainer.transforms import HashRNG, PreprocessSpec, crop_box, draft_factor, normalise_batch, train_sample

#: (width, height), share of the images: ImageNet-like, some large.
SIZE_MIX = (((500, 375), 0.40), ((375, 500), 0.12), ((500, 333), 0.16), ((333, 500), 0.06),
            ((500, 500), 0.08), ((400, 300), 0.07), ((300, 225), 0.07),
            ((1024, 768), 0.02), ((1600, 1200), 0.015), ((2048, 1536), 0.005))
#: The large-photo set (``--large-images``): crops much smaller than the stored image.
LARGE_MIX = (((1600, 1200), 0.35), ((1200, 1600), 0.10), ((2048, 1536), 0.30), ((3264, 2448), 0.15),
             ((2448, 3264), 0.10))
QUALITIES = (85, 90, 90, 95)
GRAYSCALE = 0.02
#: Training rates one H100 reached on synthetic inputs (benchmarks/README.md).
GPU_RATES = {224: ("ResNet-50", 2127), 299: ("Inception-v3", 1169)}
BATCH = 64


# -- data ------------------------------------------------------------------------------------

def _field(width: int, height: int, rng: np.random.Generator, alpha: float) -> np.ndarray:
    """Gaussian noise with a 1/f**alpha amplitude spectrum, unit variance."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    amplitude = f ** -alpha
    amplitude[0, 0] = 0.0
    spectrum = amplitude * (rng.standard_normal(amplitude.shape) + 1j * rng.standard_normal(amplitude.shape))
    field = np.fft.irfft2(spectrum, s=(height, width))
    return field / (field.std() + 1e-9)


def realistic_image(width: int, height: int, rng: np.random.Generator, gray: bool = False) -> Image.Image:
    """A photo-like image: luminance and chroma fields with natural images'
    1/f spectrum, a few sharp outlines, sensor noise. Large images are drawn
    at half size and enlarged (optics blur them: fewer bits per pixel)."""
    large = max(width, height) > 800
    w, h = (width // 2, height // 2) if large else (width, height)
    alpha = rng.uniform(1.1, 1.35)
    y, cb, cr = (_field(w, h, rng, alpha) * s for s in (1.0, 0.35, 0.35))
    rgb = np.stack([y + 1.4 * cr, y - 0.34 * cb - 0.71 * cr, y + 1.77 * cb], -1)
    pixels = np.clip(128 + 45 * rgb + rng.normal(0, rng.uniform(2, 5), rgb.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(w // 10, w // 2)), y0 + int(rng.integers(h // 10, h // 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x1, y1), outline=colour, width=int(rng.integers(1, 4)))
    if large:
        img = img.resize((width, height), Image.BICUBIC)
        noise = rng.normal(0, 1.5, (height, width, 3))
        img = Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8))
    return img.convert("L") if gray else img


def make_source(work: str, images: int, mix=SIZE_MIX, seed: int = 0) -> tuple[str, str, str]:
    """An inline index of ``images`` realistic JPEGs sized by ``mix`` (keys
    ``img-000000``..., one leaf label each), its vocabulary and a selection of
    one copy each, in ``work``."""
    index = os.path.join(work, "index.parquet")
    labels = os.path.join(work, "labels.parquet")
    selection = os.path.join(work, "selection.parquet")
    if os.path.exists(selection):
        return index, labels, selection
    os.makedirs(os.path.dirname(index), exist_ok=True)
    vocab = make_vocabulary()
    parent = dict(zip(vocab.column("label_id").to_pylist(), vocab.column("parent_id").to_pylist()))
    leaves = [i for i, p in parent.items() if p is not None and parent[p] is not None]
    rng = np.random.default_rng(seed)
    sizes, shares = zip(*mix)
    choice = rng.choice(len(sizes), size=images, p=np.asarray(shares) / sum(shares))
    keys, label_lists, blobs = [], [], []
    start = time.perf_counter()
    for i, c in enumerate(choice.tolist()):
        img = realistic_image(*sizes[c], rng, gray=rng.random() < GRAYSCALE)
        out = io.BytesIO()
        img.save(out, "JPEG", quality=int(rng.choice(QUALITIES)))
        keys.append(f"img-{i:06d}")
        label_lists.append([int(rng.choice(leaves))])
        blobs.append(out.getvalue())
        if (i + 1) % 500 == 0:
            print(f"  generated {i + 1}/{images} images ({time.perf_counter() - start:.0f} s)", flush=True)
    table = pa.table({"key": keys, "labels": pa.array(label_lists, pa.list_(pa.int32())),
                      "image": pa.array(blobs, pa.binary())}).cast(INDEX_SCHEMA_INLINE)
    pq.write_table(table, index, row_group_size=256)
    pq.write_table(vocab, labels)
    pq.write_table(pa.table({"key": keys, "copies": pa.array(np.ones(images, np.int32)),
                             "weight": np.ones(images)}), selection)
    return index, labels, selection


def write_shard_sets(work: str, index: str, selection: str, images: int, max_side: int,
                     quality: int | None, shards: int = 16) -> dict[str, str]:
    """``{"as stored": manifest, "max-side N": manifest}`` written by
    write_shards into ``work`` (reused when there)."""
    from spark_jobs import write_shards as W
    from spark_jobs.session import get_session

    per_shard = math.ceil(images / shards)
    sets = {"as stored": (os.path.join(work, "shards-source"), None),
            f"max-side {max_side}": (os.path.join(work, f"shards-max{max_side}-q{quality}"), max_side)}
    spark = None
    for name, (out, side) in sets.items():
        if os.path.exists(os.path.join(out, "_SUCCESS")):
            continue
        spark = spark or get_session("loader-bench", "local[2]")
        start = time.perf_counter()
        W.run(spark, W.ShardJob(selection=selection, index=index, output=out, samples_per_shard=per_shard,
                                max_side=side, quality=quality if side else None))
        print(f"  write_shards {name}: {time.perf_counter() - start:.1f} s", flush=True)
    if spark is not None:
        spark.stop()
    return {name: os.path.join(out, "manifest.json") for name, (out, _) in sets.items()}


def read_images(urls) -> list[bytes]:
    out = []
    for url in urls:
        with tarfile.open(url) as tar:
            out += [tar.extractfile(m).read() for m in tar if not m.name.endswith(".json")]
    return out


# -- the decoders ------------------------------------------------------------------------------

def textbook(data: bytes, spec: PreprocessSpec, rng) -> np.ndarray:
    """The plain PIL way: decode, crop box, resize, flip, normalise by broadcasting."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    box = crop_box(*img.size, rng)
    img = img.resize((spec.input_size, spec.input_size), Image.BILINEAR, box=box)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _scaled(box, width: int, height: int, pixels: np.ndarray) -> tuple[float, ...]:
    """A source-pixel box in the pixels of an image decoded at some scale."""
    sx, sy = width / pixels.shape[1], height / pixels.shape[0]
    return box[0] / sx, box[1] / sy, box[2] / sx, box[3] / sy


def _finish(pixels: np.ndarray, box, spec: PreprocessSpec, rng) -> np.ndarray:
    """An RGB HWC uint8 array decoded at some scale -> the trainer's resize, flip, normalise."""
    from trainer.transforms import _crop_resize_flip, _normalise

    return _normalise(_crop_resize_flip(Image.fromarray(pixels), box, spec, rng), spec)


def simplejpeg_decoder(any_factor: bool):
    import simplejpeg

    def decode(data: bytes, spec: PreprocessSpec, rng) -> np.ndarray:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        box = crop_box(width, height, rng)
        bw, bh = box[2] - box[0], box[3] - box[1]
        if any_factor:  # the smallest of libjpeg-turbo's M/8 scales keeping the crop >= the input size
            need_w = math.ceil(width * spec.input_size / bw) if bw > spec.input_size else width
            need_h = math.ceil(height * spec.input_size / bh) if bh > spec.input_size else height
            pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=need_w, min_height=need_h)
        else:
            d = draft_factor(bw, bh, spec.input_size)
            pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=math.ceil(width / d),
                                            min_height=math.ceil(height / d), min_factor=d)
        return _finish(pixels, _scaled(box, width, height, pixels), spec, rng)

    return decode


def turbojpeg_decoder():
    from turbojpeg import TJPF_RGB, TurboJPEG

    jpeg = TurboJPEG()

    def decode(data: bytes, spec: PreprocessSpec, rng) -> np.ndarray:
        width, height = jpeg.decode_header(data)[:2]
        box = crop_box(width, height, rng)
        d = draft_factor(box[2] - box[0], box[3] - box[1], spec.input_size)
        pixels = jpeg.decode(data, pixel_format=TJPF_RGB, scaling_factor=(1, d))
        return _finish(pixels, _scaled(box, width, height, pixels), spec, rng)

    return decode


def decoders() -> dict:
    """Name -> (function, note). Missing optional decoders are left out with a note."""
    found = {"plain PIL loop": (textbook, "baseline"),
             "same, trainer transform": (lambda d, s, r: train_sample(d, s, r, "none"), "table normalise"),
             "PIL draft": (lambda d, s, r: train_sample(d, s, r, "draft"), "1/2,1/4,1/8")}
    try:
        found["simplejpeg 2^-k"] = (simplejpeg_decoder(False), "same factors as draft")
        found["simplejpeg M/8"] = (simplejpeg_decoder(True), "any libjpeg-turbo factor")
    except ImportError:
        print("  simplejpeg not installed (pip install simplejpeg): left out")
    try:
        found["PyTurboJPEG 2^-k"] = (turbojpeg_decoder(), "same factors as draft")
    except Exception as e:  # noqa: BLE001 - ImportError, or the library missing
        print(f"  PyTurboJPEG left out: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
    return found


# -- measurements ------------------------------------------------------------------------------

def plain_loop(urls, fn, spec: PreprocessSpec) -> dict:
    """One process: tarfile, then ``fn`` on every image; wall and CPU time,
    and each image's seconds (the stored image's longer side with it)."""
    per_image = []
    n = 0
    wall, cpu = time.perf_counter(), time.process_time()
    for url in urls:
        with tarfile.open(url) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    continue
                data = tar.extractfile(m).read()
                t = time.perf_counter()
                fn(data, spec, HashRNG(0, n))
                per_image.append(time.perf_counter() - t)
                n += 1
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"images": n, "per_s": n / wall, "per_cpu_s": n / cpu, "per_worker_cpu_s": n / cpu,
            "per_image_s": per_image}


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loader_rate(shards: ShardList, spec: PreprocessSpec, workers: int, decode_scaling: str, images: int,
                normalise_here: bool = False, checked: bool = True) -> dict:
    """ShardStream through a DataLoader as trainer.pretrain runs it (uint8
    batches, normalised where the model runs: on a GPU, not by the CPU; with
    ``normalise_here`` by this process, as CPU training does; each shard
    checked against its manifest entry unless not ``checked``): one epoch's
    images after the first batch; CPU time of the workers and of this (the
    training) process."""
    config = LoaderConfig(shards.urls, spec, seed=0, shuffle_buffer=1000, decode_scaling=decode_scaling,
                          normalise=False, expected=shards.expected if checked else None)
    stream = ShardStream(config, state=LoaderState(workers=workers))
    loader = torch.utils.data.DataLoader(stream, batch_size=BATCH, num_workers=workers, collate_fn=collate,
                                         prefetch_factor=2)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    pids = [w.pid for w in it._workers]  # noqa: SLF001 - a benchmark's look at its own workers
    worker_cpu = [_cpu_seconds(p) for p in pids]
    wall, main_cpu = time.perf_counter(), time.process_time()
    n = 0
    while n < images - BATCH:
        batch = next(it)
        if normalise_here:
            normalise_batch(batch[0], spec)
        n += len(batch[1])
    wall, main_cpu = time.perf_counter() - wall, time.process_time() - main_cpu
    worker_cpu = sum(_cpu_seconds(p) - c for p, c in zip(pids, worker_cpu))
    del it, loader
    return {"images": n, "per_s": n / wall, "per_worker": n / wall / workers,
            "per_cpu_s": n / (worker_cpu + main_cpu), "per_worker_cpu_s": n / worker_cpu,
            "main_cpu_share": main_cpu / (worker_cpu + main_cpu)}


def pixel_effect(datas: list[bytes], spec: PreprocessSpec) -> dict:
    """Draft against whole decoding, same draws: mean |difference| and PSNR in
    8-bit units over the images draft decodes at a reduced scale."""
    std = np.asarray(spec.std, np.float32)[:, None, None] * 255
    diffs, scaled = [], 0
    for i, data in enumerate(datas):
        whole = train_sample(data, spec, HashRNG(1, i), "none")
        draft = train_sample(data, spec, HashRNG(1, i), "draft")
        if np.array_equal(whole, draft):
            continue
        scaled += 1
        diffs.append((whole - draft) * std)
    if not diffs:
        return {"scaled": 0, "images": len(datas)}
    d = np.stack(diffs)
    mse = float(np.mean(d ** 2))
    return {"scaled": scaled, "images": len(datas), "mean_abs": float(np.mean(np.abs(d))),
            "psnr_db": 10 * math.log10(255 ** 2 / mse), "p99_abs": float(np.percentile(np.abs(d), 99))}


def decode_ms(datas: list[bytes]) -> float:
    """Mean ms to decode one image whole to RGB with PIL (one process)."""
    start = time.process_time()
    for data in datas:
        img = Image.open(io.BytesIO(data))
        img.load()
        if img.mode != "RGB":
            img.convert("RGB")
    return (time.process_time() - start) / len(datas) * 1e3


def by_stored_side(datas: list[bytes], base: list[float], other: list[float]) -> list[tuple[str, int, float]]:
    """(class of the stored longer side, images, base time / other time)."""
    sides = np.asarray([max(Image.open(io.BytesIO(d)).size) for d in datas])
    out = []
    for lo, hi in ((0, 600), (600, 1100), (1100, 1700), (1700, 10 ** 6)):
        pick = (sides > lo) & (sides <= hi)
        if pick.any():
            label = f"<= {hi}" if lo == 0 else (f"> {lo}" if hi == 10 ** 6 else f"{lo + 1}-{hi}")
            ratio = float(np.sum(np.asarray(base)[pick]) / np.sum(np.asarray(other)[pick]))
            out.append((label, int(pick.sum()), ratio))
    return out


# -- GPU (optional) ------------------------------------------------------------------------------

def write_tars(index: str, out: str, shards: int, max_side: int | None, quality: int | None) -> list[str]:
    """Shards of ``index`` written directly (``schemas.shard_format.write_tar``,
    one copy each, ``reencode_image`` for ``max_side``): the images
    ``write_shards`` would store, for machines without Spark (the GPU part)."""
    from schemas.shard_format import image_extension, sample_json, sample_key, write_tar
    from spark_jobs.reencode import REENCODE_QUALITY, reencode_image

    table = pq.read_table(index)
    keys, labels, images = (table.column(c).to_pylist() for c in ("key", "labels", "image"))
    if max_side:
        images = [reencode_image(d, max_side, quality or REENCODE_QUALITY) or d for d in images]
    os.makedirs(out, exist_ok=True)
    per = math.ceil(len(keys) / shards)
    urls = []
    for i in range(shards):
        url = os.path.join(out, f"shard-{i:06d}.tar")
        with open(url, "wb") as fh:
            write_tar(fh, [(sample_key(k, 0), image_extension(d), d, sample_json(k, 0, lab, 1.0))
                           for k, lab, d in zip(keys[i * per:(i + 1) * per], labels[i * per:(i + 1) * per],
                                                images[i * per:(i + 1) * per])])
        urls.append(url)
    return urls


def _train_rate(arch: str, size: int, batches, steps: int, warmup: int = 30) -> float:
    """Images/s of SGD steps of ``arch`` (bf16 autocast, fp32 weights, as the
    trainer's DeepSpeed config) on the GPU, fed by ``batches()`` (uint8 or
    float, normalised on the device)."""
    import torch.nn.functional as F

    from trainer.models import build_model

    model = build_model(arch, 1000).cuda().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    spec = PreprocessSpec(size)
    it = batches()
    for step in range(warmup + steps):
        if step == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        x, y = next(it)
        x = x.cuda(non_blocking=True)
        x = normalise_batch(x, spec) if x.dtype == torch.uint8 else x
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y.cuda(non_blocking=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    rate = steps * x.shape[0] / (time.perf_counter() - start)
    it.close()  # a loader's workers stop here
    return rate


def gpu_part(shard_sets: dict[str, list[str]], steps: int, batch: int = 256) -> dict:
    """Where CUDA is available: torchvision.io.decode_jpeg on the GPU; the
    loader's images/s with 1, 4, 8 and the default workers on this machine's
    cores; and SGD steps of ResNet-50 (224) and Inception-v3 (299), bf16, fed
    by the loader (default workers, pinned memory, uint8 normalised on the
    device) against the same steps on synthetic inputs already on the device
    (``benchmarks/gpu_resnet50.py``'s measure). Skipped without CUDA."""
    if not torch.cuda.is_available():
        print("\nGPU part skipped: no CUDA device here (torch.cuda.is_available() is False)", flush=True)
        return {"skipped": "no CUDA"}
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        print("\nGPU part skipped: torchvision is not installed (pip install '.[vision]')", flush=True)
        return {"skipped": "no torchvision"}
    from trainer.data import default_num_workers

    torch.backends.cudnn.benchmark = True
    out: dict = {"device": torch.cuda.get_device_name(), "cores": len(os.sched_getaffinity(0))}
    default = default_num_workers(cap=min(len(u) for u in shard_sets.values()))
    print(f"\n== GPU: {out['device']}, {out['cores']} cores, default loader workers {default}", flush=True)
    for name, urls in shard_sets.items():
        datas = read_images(urls)
        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        decode_jpeg(tensors[:batch], device="cuda", mode=ImageReadMode.RGB)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(0, len(tensors), batch):
            decode_jpeg(tensors[i:i + batch], device="cuda", mode=ImageReadMode.RGB)
        torch.cuda.synchronize()
        out[f"{name}: nvjpeg images/s"] = rate = len(tensors) / (time.perf_counter() - start)
        print(f"  {name}: torchvision.io.decode_jpeg on the GPU, batch {batch}: {rate:,.0f} images/s", flush=True)
        for size in (224, 299):
            spec = PreprocessSpec(size)
            for workers in sorted({1, 4, 8, default}):
                if workers > len(urls):
                    continue
                stream = ShardStream(LoaderConfig(urls, spec, seed=0, shuffle_buffer=500, normalise=False),
                                     state=LoaderState(workers=workers))
                it = iter(torch.utils.data.DataLoader(stream, batch_size=BATCH, num_workers=workers,
                                                      collate_fn=collate, prefetch_factor=2))
                for _ in range(2 * workers):  # all workers start at once: past the batches made meanwhile
                    next(it)
                start, n = time.perf_counter(), 0
                for _ in range(6 * workers):
                    n += len(next(it)[1])
                rate = n / (time.perf_counter() - start)
                del it
                out[f"{name}: loader {size} {workers}w images/s"] = rate
                print(f"  {name}: loader at {size}, {workers:2d} workers: {rate:7,.0f} images/s "
                      f"({rate / workers:,.0f} per worker)", flush=True)
    for size, (model, measured) in GPU_RATES.items():
        arch = "resnet50" if size == 224 else "inception_v3"

        def synthetic():
            x = torch.randn(batch, 3, size, size, device="cuda")
            y = torch.randint(0, 1000, (batch,), device="cuda")
            while True:
                yield x, y

        rate = _train_rate(arch, size, synthetic, steps)
        out[f"{arch} synthetic images/s"] = rate
        print(f"  {model} ({size}), synthetic inputs: {rate:,.0f} images/s (DeepSpeed on an H100 measured "
              f"{measured:,})", flush=True)
        for name, urls in shard_sets.items():
            spec = PreprocessSpec(size)

            def from_shards(urls=urls, spec=spec):
                stream = ShardStream(LoaderConfig(urls, spec, seed=0, shuffle_buffer=500, normalise=False),
                                     state=LoaderState(workers=default))
                loader = torch.utils.data.DataLoader(stream, batch_size=batch, num_workers=default,
                                                     collate_fn=collate, pin_memory=True, prefetch_factor=4)
                for x, labels, *_ in loader:
                    yield x, torch.tensor([lab[0] % 1000 for lab in labels])

            fed = _train_rate(arch, size, from_shards, steps)
            out[f"{arch} {name} images/s"] = fed
            print(f"  {model} ({size}) fed from the shards ({name}, {default} workers): {fed:,.0f} images/s = "
                  f"{fed / rate:.2f}x synthetic", flush=True)
    return out


# -- the run -------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000, help="ImageNet-like images")
    ap.add_argument("--large-images", type=int, default=150, help="large photos (1600x1200 to 3264x2448); 0: none")
    ap.add_argument("--sizes", default="224,299")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--max-side", type=int, default=512)
    ap.add_argument("--quality", type=int, default=None, help="write_shards --quality (default its own)")
    ap.add_argument("--work", default="/tmp/loader-bench")
    ap.add_argument("--skip", default="", help="comma-separated decoder names to leave out")
    ap.add_argument("--gpu", action="store_true", help="also the GPU part (skipped without CUDA)")
    ap.add_argument("--gpu-steps", type=int, default=30, help="timed training steps of the GPU part (batch 256)")
    ap.add_argument("--gpu-only", action="store_true",
                    help="only the GPU part, on ImageNet-like shards written without Spark (a GPU machine "
                         "without Java or Spark); needs torch, torchvision, webdataset, Pillow, pyarrow")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.gpu_only:
        work = os.path.join(args.work, "ImageNet-like")
        index, _, _ = make_source(work, args.images, SIZE_MIX)
        sets = {"as stored": write_tars(index, os.path.join(work, "tars"), 16, None, None),
                f"max-side {args.max_side}": write_tars(index, os.path.join(work, f"tars-max{args.max_side}"), 16,
                                                        args.max_side, args.quality)}
        for name, urls in sets.items():
            size = sum(os.path.getsize(u) for u in urls)
            count = pq.ParquetFile(index).metadata.num_rows
            print(f"  {name}: {size / 2**20:.1f} MiB of shards, {size / count / 1024:.1f} KB per image")
        results = {"gpu": gpu_part(sets, args.gpu_steps)}
        os.makedirs(args.work, exist_ok=True)
        with open(os.path.join(args.work, "results-gpu.json"), "w") as fh:
            json.dump(results, fh, indent=1)
        return 0
    manifests = {}
    for name, count, mix in (("ImageNet-like", args.images, SIZE_MIX), ("large", args.large_images, LARGE_MIX)):
        if count:
            work = os.path.join(args.work, name)
            index, labels, selection = make_source(work, count, mix)
            for set_name, path in write_shard_sets(work, index, selection, count, args.max_side,
                                                   args.quality).items():
                manifests[f"{name}, {set_name}"] = path
    found = {k: v for k, v in decoders().items() if k not in args.skip.split(",")}
    workers = [int(w) for w in args.workers.split(",")]
    results: dict = {"cores": len(os.sched_getaffinity(0)), "sets": {}}
    for set_name, manifest in manifests.items():
        shards = read_shard_list(manifest)
        urls = list(shards.urls)
        datas = read_images(urls)
        m = json.load(open(manifest))
        facts = {"images": len(datas), "image_kb": sum(map(len, datas)) / len(datas) / 1024,
                 "shard_bytes": sum(s["bytes"] for s in m["shards"]), "decode_ms": decode_ms(datas),
                 "reencoded": (m["extra"].get("reencoded") or {}).get("images", 0)}
        print(f"\n== {set_name}: {len(datas)} images, {facts['image_kb']:.1f} KB/image, shards "
              f"{facts['shard_bytes'] / 2**20:.1f} MiB, whole decode {facts['decode_ms']:.2f} ms/image "
              f"(CPU), re-encoded {facts['reencoded']}", flush=True)
        results["sets"][set_name] = {"facts": facts, "sizes": {}}
        for size in (int(s) for s in args.sizes.split(",")):
            spec = PreprocessSpec(size)
            rows: dict = {}
            for name, (fn, _) in found.items():
                rows[name] = plain_loop(urls, fn, spec)
            for mode in ("none", "draft"):
                for w in workers:
                    rows[f"loader {w}w {'draft' if mode == 'draft' else 'whole'}"] = loader_rate(
                        shards, spec, w, mode, len(datas))
            rows["loader 1w draft, unchecked"] = loader_rate(shards, spec, 1, "draft", len(datas), checked=False)
            rows["loader 1w draft, CPU normalise"] = loader_rate(shards, spec, 1, "draft", len(datas), True)
            base = rows["plain PIL loop"]
            print(f"\n  input {size}: images per CPU-second of one worker process (per worker: a loop is one "
                  "worker) and of all processes, the training process's included (per core); ratios to the "
                  "plain PIL loop; wall-clock images/s per worker (distorted where the cores are shared)",
                  flush=True)
            print(f"  {'':31s} {'per worker':>10s} {'per core':>9s} {'x loop/worker':>14s} {'x loop/core':>12s} "
                  f"{'wall/worker':>12s}")
            for name, r in rows.items():
                print(f"  {name:31s} {r['per_worker_cpu_s']:10.0f} {r['per_cpu_s']:9.0f} "
                      f"{r['per_worker_cpu_s'] / base['per_cpu_s']:14.2f} {r['per_cpu_s'] / base['per_cpu_s']:12.2f} "
                      f"{r.get('per_worker', r['per_s']):12.0f}", flush=True)
            gains = by_stored_side(datas, rows["plain PIL loop"]["per_image_s"], rows["PIL draft"]["per_image_s"])
            print("  draft against the plain loop by stored longer side: "
                  + "; ".join(f"{label} px ({n} images) {g:.2f}x" for label, n, g in gains))
            effect = pixel_effect(datas[:400], spec)
            if effect["scaled"]:
                print(f"  draft decoded {effect['scaled']} of {effect['images']} images at a reduced scale; their "
                      f"inputs differ from a whole decode by {effect['mean_abs']:.2f} mean |diff| (99th percentile "
                      f"{effect['p99_abs']:.1f}) in 8-bit levels, PSNR {effect['psnr_db']:.1f} dB")
            else:
                print(f"  draft decoded none of {effect['images']} images at a reduced scale (crops too large)")
            model, rate = GPU_RATES.get(size, (None, None))
            if model:
                print(f"  loader workers (CPU cores) one GPU needs for {model} at {rate:,} img/s:")
                for name in [k for k in rows if k.startswith("loader")]:
                    r = rows[name]
                    print(f"    {name:31s} {math.ceil(rate / r['per_worker_cpu_s']):3d} workers "
                          f"({rate / r['per_cpu_s']:.1f} cores with the training process's share, "
                          f"{100 * r['main_cpu_share']:.0f} % of the CPU)")
            for r in rows.values():
                r.pop("per_image_s", None)
            results["sets"][set_name]["sizes"][size] = {"rows": rows, "draft_by_side": gains, "pixels": effect}
    if args.gpu:
        results["gpu"] = gpu_part({name: shard_urls(m) for name, m in manifests.items()
                                   if name.startswith("ImageNet-like")}, args.gpu_steps)
    path = os.path.join(args.work, "results.json")
    with open(path, "w") as fh:
        json.dump(results, fh, indent=1)
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
