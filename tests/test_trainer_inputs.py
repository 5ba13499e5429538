"""What the trainer reads, checked (issue 25): shards against their manifest
as they stream, images decoded as they are meant to be seen (16-bit
greyscale, CMYK, palette, EXIF orientation), model files that are not
weights or do not fit refused in one line, and a DeepSpeed op build left
locked by a killed run said in one line instead of a silent hang."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import run_module
from tests.trainer_data import write_labels, write_shard_dir
from trainer import data as D
from trainer import ops
from trainer.models import SmallCNN, load_finetuned, save_finetuned
from trainer.transforms import (HashRNG, PreprocessSpec, decode_for_crop, decode_image, train_sample,
                                train_transform)


def _error_lines(proc):
    return [line for line in proc.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]


# -- shards checked against the manifest as they stream --------------------------------------------

@pytest.fixture
def shard_dir(tmp_path):
    manifest = write_shard_dir(tmp_path / "shards", [12, 12, 12, 12])
    return manifest, D.read_shard_list(manifest)


def _damage(path, how):
    data = bytearray(open(path, "rb").read())
    if how == "bit rot":
        data[len(data) // 3] ^= 0x10  # inside a member's bytes: the tar still reads
    elif how == "truncated":
        data = data[: 512 * 6]  # at a member boundary: fewer samples, no tar error
    elif how == "cut mid-member":
        data = data[: len(data) // 2 + 100]
    elif how == "replaced":
        data = bytearray(open(path.replace("000001", "000002"), "rb").read())
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("how", ["bit rot", "truncated", "cut mid-member", "replaced"])
def test_a_shard_that_differs_from_its_manifest_fails_naming_it(shard_dir, how):
    manifest, shards = shard_dir
    url, expect = shards.urls[1], shards.expected[1]
    assert len(list(D.shard_samples(url, expect=expect))) == 12  # sound: passes
    _damage(url, how)
    with pytest.raises(ValueError, match=rf"^shard {url} does not match its manifest: ") as e:
        list(D.shard_samples(url, expect=expect))
    assert "\n" not in str(e.value)
    assert ("sha256" in str(e.value)) or ("samples" in str(e.value)) or ("not a whole tar" in str(e.value))


def test_the_check_hashes_while_reading_no_second_read(shard_dir, monkeypatch):
    manifest, shards = shard_dir
    url, expect = shards.urls[0], shards.expected[0]
    read = []

    class Counting:
        def open(self, path, mode="rb"):
            fh = open(path, mode)
            real = fh.read

            def counted(n=-1):
                data = real(n)
                read.append(len(data))
                return data
            fh.read = counted
            return fh

    monkeypatch.setattr(D.sio, "filesystem", lambda u: (Counting(), u))
    assert len(list(D.shard_samples(url, expect=expect))) == 12
    assert sum(read) == os.path.getsize(url) == expect.bytes  # every byte read once


def test_pretrain_on_a_damaged_shard_exits_1_naming_it(tmp_path, shard_dir):
    manifest, shards = shard_dir
    _damage(shards.urls[2], "bit rot")
    proc = run_module("trainer.pretrain", "--shards", manifest, "--labels", write_labels(tmp_path / "l.parquet"),
                      "--arch", "small", "--steps", "20", "--batch-size", "8", "--input-size", "16",
                      "--num-workers", "1", "--output", str(tmp_path / "out"), check=False, timeout=600)
    errors = _error_lines(proc)
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith(f"pretrain: error: shard {shards.urls[2]} does not match its manifest: sha256 ")
    assert not (tmp_path / "out" / "generalist.pt").exists()


# -- decoding ----------------------------------------------------------------------------------

def _encoded(img: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_greyscale_is_scaled_not_clipped_to_white(fmt):
    ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    data = _encoded(Image.fromarray(ramp), fmt)
    rgb = np.asarray(decode_image(data))
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
    expected = np.round(ramp / 257.0).astype(np.uint8)
    assert np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 1], expected)
    assert (rgb == 255).mean() < 0.01 and abs(rgb.mean() - 127.5) < 1
    # the training path decodes the same way
    img, _ = decode_for_crop(data, 16, HashRNG(1))
    assert np.array_equal(np.asarray(img), rgb)


def test_cmyk_palette_grey_and_alpha_decode_to_their_colours():
    red = (200, 30, 40)
    base = Image.new("RGB", (40, 30), red)
    cmyk = np.asarray(decode_image(_encoded(base.convert("CMYK"), "JPEG", quality=95)))
    assert cmyk.shape == (30, 40, 3) and np.abs(cmyk.reshape(-1, 3).mean(0) - red).max() <= 12
    for img in (base.convert("P"), base.convert("RGBA"), base.convert("L"), base.convert("LA")):
        rgb = np.asarray(decode_image(_encoded(img, "PNG")))  # lossless: exactly what the palette or grey holds
        assert np.array_equal(rgb, np.asarray(img.convert("RGB"))), img.mode
    assert np.abs(np.asarray(decode_image(_encoded(base.convert("P"), "PNG"))).reshape(-1, 3).mean(0)
                  - red).max() < 3


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_is_applied_and_the_crop_is_drawn_upright(orientation):
    # A 60x40 picture, left half dark, stored as a camera would for each orientation.
    upright = np.zeros((40, 60, 3), np.uint8)
    upright[:, 30:] = 220
    stored = {1: upright, 3: np.rot90(upright, 2), 6: np.rot90(upright, 1), 8: np.rot90(upright, 3)}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encoded(Image.fromarray(np.ascontiguousarray(stored)), "JPEG", quality=95, exif=exif.tobytes())
    img = decode_image(data)
    assert img.size == (60, 40)
    arr = np.asarray(img).astype(int)
    assert arr[:, :25].mean() < 30 and arr[:, 35:].mean() > 190
    spec = PreprocessSpec(16)
    for seed in range(5):
        assert np.array_equal(train_sample(data, spec, HashRNG(seed), "none"),
                              train_transform(img, spec, HashRNG(seed)))
        drafted, box = decode_for_crop(data, 16, HashRNG(seed), "draft")
        w, h = drafted.size
        assert (w, h) in [(60, 40), (30, 20)] and 0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h


# -- model files ---------------------------------------------------------------------------------

class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-a-checkpoint",))


@pytest.fixture
def target(tmp_path_factory):
    from adaptive_transfer.synthetic import TargetSpec, generate_target
    return generate_target(str(tmp_path_factory.mktemp("target")),
                           TargetSpec(layout="imagefolder", branch="animal", num_classes=3, train_per_class=4,
                                      test_per_class=2))


def test_a_pickle_with_code_is_refused_in_one_line(tmp_path, target):
    evil = tmp_path / "run" / "model.pt"
    evil.parent.mkdir()
    torch.save({"format": "adaptive-transfer/finetuned", "weights": _Evil()}, str(evil))
    for module, flags in [("trainer.finetune", ["--init", str(evil), "--steps", "1", "--batch-size", "2"]),
                          ("trainer.evaluate", ["--checkpoint", str(evil)])]:
        proc = run_module(module, "--target-layout", "imagefolder", "--target-root", target.root, *flags,
                          "--output", str(tmp_path / module), check=False, timeout=600)
        errors = _error_lines(proc)
        assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
        assert f"{evil}: refused as a " in errors[0] and "(posix.system)" in errors[0]
        assert "weights_only=False" not in proc.stderr and "Traceback" not in proc.stderr
        assert not (tmp_path / module).exists()
    assert not any(p.name == "pwned-by-a-checkpoint" for p in tmp_path.rglob("*"))
    assert not os.path.exists(os.path.join(os.path.dirname(os.path.dirname(__file__)), "pwned-by-a-checkpoint"))


def test_a_checkpoint_of_the_wrong_shape_is_one_line(tmp_path, target):
    wrong = tmp_path / "model.pt"
    model = SmallCNN(5)  # weights for 5 classes ...
    save_finetuned(str(wrong), model, "small", target.classes, PreprocessSpec(32))  # ... named as the target's 3
    with pytest.raises(ValueError) as e:
        load_finetuned(str(wrong))
    assert str(e.value) == (f"{wrong}: its weights do not fit architecture 'small': 2 tensor(s) of another shape "
                            "(first: fc.weight is (5, 256), the model's (3, 256))")
    proc = run_module("trainer.evaluate", "--target-layout", "imagefolder", "--target-root", target.root,
                      "--checkpoint", str(wrong), "--output", str(tmp_path / "ev"), check=False, timeout=600)
    errors = _error_lines(proc)
    assert proc.returncode == 1 and errors == [f"evaluate: error: {e.value}"], proc.stderr[-3000:]


# -- DeepSpeed's op build lock ---------------------------------------------------------------------

def test_a_build_lock_nobody_holds_is_named_and_a_held_one_is_a_build_under_way(tmp_path):
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.write_text("")
    assert ops.build_locks(str(tmp_path)) == [str(lock)] and ops.lock_holders(str(lock)) == []
    with pytest.raises(ops.StaleBuildLock, match=rf"^{lock} is left by a DeepSpeed op build that was killed"):
        ops.check_build_locks(str(tmp_path), grace=0.2)
    fd = os.open(str(lock), os.O_RDONLY)  # what torch's builder holds for the whole build
    try:
        assert ops.lock_holders(str(lock)) == [os.getpid()]
        said = []
        ops.check_build_locks(str(tmp_path), log=said.append, grace=0.2)
        assert said == [f"[ops] deepspeed_shm_comm is being built by process {os.getpid()} (lock {lock}); "
                        "waiting for it"]
    finally:
        os.close(fd)
    os.remove(lock)  # a load that released it: nothing to say
    said = []
    ops.check_build_locks(str(tmp_path), log=said.append, grace=0.2)
    assert said == []
    assert ops.extensions_root({"TORCH_EXTENSIONS_DIR": str(tmp_path)}) == str(tmp_path)


def test_a_lock_another_rank_takes_for_a_moment_is_no_stale_lock(tmp_path):
    # torch takes the lock for every load of a built op (all ranks start at once), and between closing and
    # removing it nobody holds it: seen in that instant it would look stale.
    import threading

    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.write_text("")

    def release_soon():
        threading.Event().wait(0.3)
        os.remove(lock)

    threading.Thread(target=release_soon).start()
    said = []
    # The check returns as soon as the lock goes: a long grace costs nothing, and a
    # busy machine that runs the releasing thread late cannot fail the test.
    ops.check_build_locks(str(tmp_path), log=said.append, grace=120)
    assert said == [] and not lock.exists()


def test_pretrain_with_a_stale_build_lock_exits_1_in_one_line(tmp_path):
    # Before: every run waited on the lock forever (the timeout here would fail the test).
    root = tmp_path / "extensions"
    (root / "deepspeed_shm_comm").mkdir(parents=True)
    (root / "deepspeed_shm_comm" / "lock").write_text("")  # left by a build that was killed
    manifest = write_shard_dir(tmp_path / "shards", [4, 4])
    proc = run_module("trainer.pretrain", "--shards", manifest, "--labels", write_labels(tmp_path / "l.parquet"),
                      "--steps", "2", "--batch-size", "2", "--output", str(tmp_path / "out"), check=False,
                      timeout=300, env={"TORCH_EXTENSIONS_DIR": str(root)})
    errors = _error_lines(proc)
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith(f"pretrain: error: {root / 'deepspeed_shm_comm' / 'lock'} is left by a DeepSpeed "
                                "op build that was killed")
    assert not (tmp_path / "out").exists()
