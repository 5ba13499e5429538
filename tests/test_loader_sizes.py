"""Loading real-size images: the crop box drawn before decoding, reduced-size
(draft) JPEG decoding that never leaves the crop fewer pixels than its
output, table normalisation and uint8 batches equal to the plain formula,
the default number of loader workers, and the re-encoding behind
``write_shards --max-side``. No timings are asserted here; the benchmark is
``benchmarks/loader_bench.py``."""

from __future__ import annotations

import io
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from schemas.shard_format import sample_json, sample_key, write_tar
from spark_jobs.reencode import fit_within, reencode_image
from trainer.data import LoaderConfig, LoaderState, ShardStream, collate, default_num_workers, local_ranks
from trainer.transforms import (HashRNG, PreprocessSpec, crop_box, decode_for_crop, draft_factor, normalise_batch,
                                train_sample)


def jpeg(width: int, height: int, seed: int = 0, mode: str = "RGB", fmt: str = "JPEG", **save) -> bytes:
    """A smooth random picture (so that scaled decodes resemble whole ones)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, height // 16), max(1, width // 16), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    out = io.BytesIO()
    img.convert(mode).save(out, fmt, **({"quality": 90} if fmt == "JPEG" else {}), **save)
    return out.getvalue()


# -- the crop box and the draft scale: pure functions --------------------------------------------

@pytest.mark.parametrize("width,height", [(500, 375), (375, 500), (2048, 1536), (40, 30), (7, 300), (1, 1)])
def test_crop_box_is_inside_with_the_asked_area_and_aspect(width, height):
    for seed in range(200):
        left, top, right, bottom = crop_box(width, height, HashRNG(seed))
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        cw, ch = right - left, bottom - top
        square = min(width, height)
        if (cw, ch) == (square, square) and (left, top) == ((width - square) // 2, (height - square) // 2):
            continue  # the centred square of the fallback
        # Rounding moves each side by at most half a pixel.
        assert 0.08 * width * height - (cw + ch) <= cw * ch <= width * height
        assert (3 / 4) * (ch - 0.5) - 0.5 <= cw <= (4 / 3) * (ch + 0.5) + 0.5


def _draft_oracle(box_width: int, box_height: int, output: int) -> int:
    """Largest power of two up to 8 that keeps both box sides >= output: from logarithms."""
    smaller = min(box_width, box_height)
    if smaller < 2 * output:
        return 1
    return 2 ** min(3, int(math.floor(math.log2(Fraction(smaller, output)))))


@pytest.mark.parametrize("output", [1, 7, 32, 224, 299])
def test_draft_factor_is_the_largest_that_keeps_the_crop_at_output_size(output):
    sides = sorted({1, 2, 3, output - 1, output, output + 1, 2 * output - 1, 2 * output, 2 * output + 1,
                    4 * output - 1, 4 * output, 8 * output - 1, 8 * output, 8 * output + 1, 17 * output, 5000} - {0})
    for bw in sides:
        for bh in sides:
            d = draft_factor(bw, bh, output)
            assert d == _draft_oracle(bw, bh, output), (bw, bh, output)
            assert d in (1, 2, 4, 8)
            assert d == 1 or (bw / d >= output and bh / d >= output)  # never fewer pixels than the output


@pytest.mark.parametrize("width,height", [(500, 375), (1601, 1199), (2048, 1536), (999, 333), (64, 4000), (513, 257)])
@pytest.mark.parametrize("output", [32, 100, 224])
def test_draft_decoding_never_leaves_the_crop_smaller_than_the_output(width, height, output):
    data = jpeg(width, height)
    scaled = 0
    for seed in range(12):
        whole_img, whole_box = decode_for_crop(data, output, HashRNG(seed), "none")
        img, box = decode_for_crop(data, output, HashRNG(seed), "draft")
        assert whole_img.size == (width, height)
        # libjpeg's scaled size: ceil(side / d), d a power of two up to 8.
        (d,) = [k for k in (1, 2, 4, 8) if img.size == (math.ceil(width / k), math.ceil(height / k))]
        if d != 1:
            scaled += 1
            assert box == tuple(v / d for v in whole_box)
        assert (box[2] - box[0]) >= output or (whole_box[2] - whole_box[0]) < output
        assert (box[3] - box[1]) >= output or (whole_box[3] - whole_box[1]) < output
        assert 0 <= box[0] < box[2] <= img.size[0] and 0 <= box[1] < box[3] <= img.size[1]
        assert d == draft_factor(whole_box[2] - whole_box[0], whole_box[3] - whole_box[1], output)
    if min(width, height) >= 8 * output:
        assert scaled > 0  # the draft path is taken where the crops allow it


def test_draft_is_the_same_picture_and_none_is_the_plain_path():
    spec = PreprocessSpec(64)
    data = jpeg(1600, 1200, seed=3)
    mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
    differed = 0
    for seed in range(20):
        whole = train_sample(data, spec, HashRNG(seed), "none")
        draft = train_sample(data, spec, HashRNG(seed), "draft")
        # The plain path, written out: decode, the same box, resize, flip, the formula.
        rng = HashRNG(seed)
        img = Image.open(io.BytesIO(data)).convert("RGB")
        box = crop_box(1600, 1200, rng)
        img = img.resize((64, 64), Image.BILINEAR, box=box)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        plain = ((np.asarray(img, np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)
        assert np.array_equal(whole, plain)
        levels = (whole - draft) * std[:, None, None] * 255
        psnr = 10 * np.log10(255 ** 2 / max(1e-12, float(np.mean(levels ** 2))))
        assert psnr > 30, (seed, psnr)
        differed += not np.array_equal(whole, draft)
    assert differed > 0  # a crop of at most 1600x1200 for 64 pixels decodes reduced


@pytest.mark.parametrize("mode,fmt", [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"),
                                      ("P", "PNG")])
def test_uint8_batches_normalised_equal_the_float_path(mode, fmt):
    spec = PreprocessSpec(48)
    data = jpeg(700, 500, seed=1, mode=mode, fmt=fmt)
    for scaling in ("none", "draft"):
        floats = torch.stack([torch.from_numpy(train_sample(data, spec, HashRNG(i), scaling)) for i in range(4)])
        u8 = torch.stack([torch.from_numpy(train_sample(data, spec, HashRNG(i), scaling, normalise=False))
                          for i in range(4)])
        assert u8.dtype == torch.uint8 and u8.shape == (4, 3, 48, 48)
        assert torch.equal(normalise_batch(u8, spec), floats)
        plain = (u8.numpy().astype(np.float32) / 255.0 - np.asarray(spec.mean, np.float32)[:, None, None]) \
            / np.asarray(spec.std, np.float32)[:, None, None]
        assert np.array_equal(floats.numpy(), plain)


def test_unknown_decode_scaling_is_refused():
    with pytest.raises(ValueError, match="decode_scaling must be one of"):
        train_sample(jpeg(40, 30), PreprocessSpec(8), HashRNG(0), "simd")


def _tar(path, images: list[bytes]) -> str:
    with open(path, "wb") as fh:
        write_tar(fh, [(sample_key(f"k{i}", 0), "jpg", image, sample_json(f"k{i}", 0, [1], 1.0))
                       for i, image in enumerate(images)])
    return str(path)


def test_stream_with_draft_decoding_is_deterministic_and_uint8_matches(tmp_path):
    urls = [_tar(tmp_path / f"s-{i:06d}.tar", [jpeg(1200, 900, seed=10 * i + j) for j in range(6)]) for i in range(2)]
    spec = PreprocessSpec(64)

    def batches(normalise, scaling="draft"):
        stream = ShardStream(LoaderConfig(urls, spec, seed=5, shuffle_buffer=4, decode_scaling=scaling,
                                          normalise=normalise), state=LoaderState(workers=2))
        loader = torch.utils.data.DataLoader(stream, batch_size=3, num_workers=2, collate_fn=collate)
        out = []
        for b in loader:
            out.append(b)
            if len(out) == 6:
                return out

    a, b, u8, whole = batches(True), batches(True), batches(False), batches(True, "none")
    for x, y, z, w in zip(a, b, u8, whole):
        assert torch.equal(x[0], y[0]) and x[1:] == y[1:]
        assert z[0].dtype == torch.uint8 and torch.equal(normalise_batch(z[0], spec), x[0]) and z[1:] == x[1:]
        assert w[1:] == x[1:]  # the same samples in the same order; other pixels
    assert any(not torch.equal(x[0], w[0]) for x, w in zip(a, whole))


# -- loader workers per rank ---------------------------------------------------------------------

@pytest.mark.parametrize("cores,ranks,cap,expected", [
    (2, 1, None, 1), (1, 1, None, 1), (16, 8, None, 1), (128, 8, None, 15), (96, 8, None, 11),
    (16, 1, None, 15), (16, 1, 4, 4), (3, 8, None, 1), (64, 2, 100, 31), (64, 2, 0, 1)])
def test_default_num_workers(cores, ranks, cap, expected):
    assert default_num_workers(cores=cores, ranks=ranks, cap=cap) == expected


@pytest.mark.parametrize("env,expected", [
    ({}, 1), ({"LOCAL_SIZE": "4"}, 4), ({"LOCAL_WORLD_SIZE": "8", "LOCAL_SIZE": "4"}, 8),
    ({"LOCAL_WORLD_SIZE": "", "LOCAL_SIZE": "2"}, 2), ({"LOCAL_WORLD_SIZE": "0"}, 1), ({"LOCAL_SIZE": "x"}, 1)])
def test_local_ranks_from_the_launcher(env, expected, monkeypatch):
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert local_ranks() == expected
    cores = len(__import__("os").sched_getaffinity(0))
    assert default_num_workers() == max(1, cores // expected - 1)


# -- re-encoding for write_shards --max-side -----------------------------------------------------

@pytest.mark.parametrize("width,height", [(500, 375), (375, 500), (513, 1), (1, 513), (2048, 1536), (512, 512),
                                          (1025, 3), (3, 3), (4000, 2999), (1000, 1001)])
@pytest.mark.parametrize("max_side", [1, 64, 512])
def test_fit_within(width, height, max_side):
    w, h = fit_within(width, height, max_side)
    longer = max(width, height)
    if longer <= max_side:
        assert (w, h) == (width, height)
        return
    half_up = lambda v: max(1, math.floor(Fraction(v * max_side, longer) + Fraction(1, 2)))  # noqa: E731
    assert (w, h) == (half_up(width), half_up(height))
    assert max(w, h) == max_side and min(w, h) >= 1


@pytest.mark.parametrize("mode,fmt", [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"),
                                      ("P", "GIF")])
def test_reencode_image(mode, fmt):
    big = jpeg(900, 600, seed=2, mode=mode, fmt=fmt)
    assert reencode_image(jpeg(300, 200, mode=mode, fmt=fmt), 300) is None  # fits: kept as it is
    out = reencode_image(big, 300, quality=80)
    assert out == reencode_image(big, 300, quality=80)  # deterministic
    assert out != reencode_image(big, 300, quality=95)
    img = Image.open(io.BytesIO(out))
    assert img.format == "JPEG" and img.size == (300, 200) and img.mode == ("L" if mode == "L" else "RGB")
    assert not {"exif", "icc_profile", "dpi", "comment", "progressive"} & set(img.info)
    # The same picture, smaller.
    reference = Image.open(io.BytesIO(big)).convert("RGB").resize((300, 200), Image.BILINEAR)
    diff = np.asarray(img.convert("RGB"), np.float32) - np.asarray(reference, np.float32)
    assert 10 * np.log10(255 ** 2 / np.mean(diff ** 2)) > 25


def test_reencode_refuses_what_it_cannot_decode():
    big = jpeg(900, 600)
    with pytest.raises(OSError):
        reencode_image(big[: len(big) // 2], 300)  # truncated: the header says 900x600
    with pytest.raises(Exception, match="^cannot identify image file$"):  # the same words every time
        reencode_image(b"\xff\xd8\xff not a jpeg at all", 300)
