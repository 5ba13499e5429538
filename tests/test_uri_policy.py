"""schemas.uri_policy and write_shards' --allow-uri-prefix: an index's ``uri``
column is fetched only under the allowed prefixes (default: the index's own
directory tree); anything else is a bad example with the policy's reason."""

from __future__ import annotations

import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas import uri_policy as U
from spark_jobs import write_shards as W
from tests.helpers import run_module

LABELS = pa.list_(pa.int32())


def ident(path):
    return path


# -- the pure policy: a grid of uris against fixed prefixes (no filesystem) ----------------

PREFIXES = ["/d/jft", "s3://bucket", "gs://imgs/train/", "hdfs://nn:8020/data", "http://host:8080/imgs"]

OK, OUT, REFUSED = "ok", U.OUTSIDE, "refused"

GRID = [
    # local paths: component boundaries, normalisation, '..'
    ("/d/jft/a/1.jpg", OK, "/d/jft/a/1.jpg"),
    ("/d/jft/./a//1.jpg", OK, "/d/jft/a/1.jpg"),
    ("//d/jft/1.jpg", OK, "/d/jft/1.jpg"),
    ("/d/jftX/1.jpg", OUT, None),
    ("/d/jf", OUT, None),
    ("/d", OUT, None),
    ("/d/jft/../etc/passwd", REFUSED, "'..'"),
    ("/d/jft/a/..", REFUSED, "'..'"),
    ("/d/jft/%2e%2e/%2E%2E/etc/passwd", REFUSED, "'..'"),
    ("/d/jft/%252e%252e/etc/passwd", REFUSED, "'..'"),   # encoded twice (or more): decoded to a fixed point
    ("/d/jft/%25252e%25252E/x", REFUSED, "'..'"),
    ("http://host:8080/imgs/%252e%252e/admin", REFUSED, "'..'"),
    ("/d/jft/.ssh/id_rsa", OUT, None),                   # hidden components below a prefix
    ("/d/jft/a/.git/config", OUT, None),
    ("s3://bucket/.secrets/x.jpg", OUT, None),
    ("/d/jft/a/x.jpg.bak", OK, "/d/jft/a/x.jpg.bak"),    # a dot inside a name is no hidden component
    ("/d/jft/..%2f..%2fetc/passwd", REFUSED, "'..'"),
    ("/d/jft/a\\..\\b", REFUSED, "'..'"),
    ("/d/jft/..a/1.jpg", OUT, None),  # no parent step ('..' refused), but hidden: see test_a_prefix_that_names...
    ("/etc/passwd", OUT, None),
    ("/dev/zero", OUT, None),
    ("d/jft/1.jpg", REFUSED, "absolute"),
    ("~/1.jpg", REFUSED, "absolute"),
    ("/d/jft/a\x00b.jpg", REFUSED, "control"),
    ("/d/jft/a\nb.jpg", REFUSED, "control"),
    ("/d/jft/a://b.jpg", REFUSED, "scheme"),
    # file: forms are local paths
    ("file:///d/jft/1.jpg", OK, "/d/jft/1.jpg"),
    ("FILE:///d/jft/1.jpg", OK, "/d/jft/1.jpg"),
    ("file://localhost/d/jft/1.jpg", OK, "/d/jft/1.jpg"),
    ("file:/d/jft/1.jpg", OK, "/d/jft/1.jpg"),
    ("local:///d/jft/1.jpg", OK, "/d/jft/1.jpg"),
    ("file:///etc/passwd", OUT, None),
    ("file:/etc/passwd", OUT, None),
    ("file:///d/jft/../../etc/passwd", REFUSED, "'..'"),
    ("file://evil/d/jft/1.jpg", REFUSED, "absolute"),
    ("file:d/jft/1.jpg", REFUSED, "absolute"),
    # object stores: scheme, bucket, aliases
    ("s3://bucket/a/1.jpg", OK, "s3://bucket/a/1.jpg"),
    ("S3://bucket/a.jpg", OK, "s3://bucket/a.jpg"),
    ("s3a://bucket/a.jpg", OK, "s3://bucket/a.jpg"),
    ("s3://bucketX/a.jpg", OUT, None),
    ("s3://other/a.jpg", OUT, None),
    ("gs://bucket/a.jpg", OUT, None),
    ("s3://bucket/../other/a.jpg", REFUSED, "'..'"),
    ("s3://bucket@other/a.jpg", REFUSED, "host or bucket"),
    ("s3://bucket/a/*", REFUSED, "glob"),
    ("s3://bucket/a.zip::http://127.0.0.1:1/x", REFUSED, "chained"),
    ("simplecache::s3://bucket/a.jpg", REFUSED, "chained"),
    ("gs://imgs/train/n1/x.JPEG", OK, "gs://imgs/train/n1/x.JPEG"),
    ("gcs://imgs/train/x.jpg", OK, "gs://imgs/train/x.jpg"),
    ("gs://imgs/trainX/x.jpg", OUT, None),
    ("gs://imgs/x.jpg", OUT, None),
    ("hdfs://nn:8020/data/x.jpg", OK, "hdfs://nn:8020/data/x.jpg"),
    ("hdfs://nn/data/x.jpg", OUT, None),
    ("hdfs://nn:8020/database/x.jpg", OUT, None),
    # http: host and port exactly, no userinfo tricks, no encoded parent steps
    ("http://host:8080/imgs/a.jpg", OK, "http://host:8080/imgs/a.jpg"),
    ("HTTP://host:8080/imgs/a.jpg?v=1", OK, "http://host:8080/imgs/a.jpg?v=1"),
    ("http://host:8080/imgsX/a.jpg", OUT, None),
    ("http://host/imgs/a.jpg", OUT, None),
    ("https://host:8080/imgs/a.jpg", OUT, None),
    ("http://host:8080@127.0.0.1/imgs/a.jpg", REFUSED, "host or bucket"),
    ("http://host:8080/imgs/..%2f..%2fadmin", REFUSED, "'..'"),
    ("http://127.0.0.1:1/x", OUT, None),
    ("data:image/png;base64,AAAA", REFUSED, "data:"),
    ("ftp://host:8080/imgs/a.jpg", OUT, None),
    ("1s3://bucket/a.jpg", REFUSED, "scheme"),
]


@pytest.mark.parametrize("uri,verdict,detail", GRID)
def test_policy_grid(uri, verdict, detail):
    (v,) = U.check_uris(PREFIXES, [uri], resolve=ident)
    if verdict == OK:
        assert v == U.Verdict(detail, None)
    elif verdict == OUT:
        assert v.target is None and v.reason.startswith(U.OUTSIDE) and repr(uri) in v.reason
        assert "/d/jft/, s3://bucket/" in v.reason  # the allowed prefixes are named
    else:
        assert v.target is None and v.reason.startswith(f"uri {uri!r} refused") and detail in v.reason


def test_check_uris_keeps_order_and_handles_missing():
    verdicts = U.check_uris(["/d/jft"], ["/d/jft/a", None, "", "/etc/passwd", "/d/jft/b"], resolve=ident)
    assert [v.target for v in verdicts] == ["/d/jft/a", None, None, None, "/d/jft/b"]
    assert [v.reason for v in verdicts][1:3] == ["no uri", "no uri"]


def test_no_prefixes_allow_nothing():
    (v,) = U.check_uris([], ["/d/jft/a.jpg"], resolve=ident)
    assert v.target is None and v.reason.startswith(U.OUTSIDE) and "allowed: none" in v.reason


@pytest.mark.parametrize("prefixes,uri,ok", [
    (["s3://"], "s3://any-bucket/a.jpg", True),   # a bare scheme: every bucket
    (["s3://"], "gs://any-bucket/a.jpg", False),
    (["/"], "/etc/passwd", True),                  # '/': every local file (explicitly asked for)
    (["file://"], "/etc/passwd", True),
    (["/d/jft/"], "/d/jft", True),                 # the directory itself (reading it fails later)
    (["hdfs:///"], "hdfs:///data/x", True),        # the default namenode only
    (["hdfs:///"], "hdfs://nn/data/x", False),
])
def test_wide_prefixes(prefixes, uri, ok):
    (v,) = U.check_uris(prefixes, [uri], resolve=ident)
    assert (v.reason is None) == ok


@pytest.mark.parametrize("prefix,canonical", [
    ("s3://bucket", "s3://bucket/"),
    ("s3://bucket/", "s3://bucket/"),
    ("s3://bucket/images", "s3://bucket/images/"),
    ("GCS://b/x/", "gs://b/x/"),
    ("s3://", "s3://"),
    ("hdfs:///", "hdfs:///"),
    ("hdfs://nn:8020", "hdfs://nn:8020/"),
    ("/", "/"),
    ("/d/jft", "/d/jft/"),
    ("/d/jft//", "/d/jft/"),
    ("file:///d/jft", "/d/jft/"),
    ("file://", "/"),
    ("http://host:8080", "http://host:8080/"),
])
def test_canonical_prefix(prefix, canonical):
    assert U.canonical_prefix(prefix, resolve=ident) == canonical


def test_relative_prefix_is_from_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert U.canonical_prefix("images") == os.path.realpath(tmp_path) + "/images/"


@pytest.mark.parametrize("prefix", ["", "  ", "/d/../etc", "../x", "s3://b/a::x", "s3://b/*", "s3://b@c/",
                                    "data:x", "file://host/x"])
def test_unusable_prefixes(prefix):
    with pytest.raises(ValueError, match="--allow-uri-prefix"):
        U.canonical_prefix(prefix, resolve=ident)


@pytest.mark.parametrize("index,default", [
    ("/d/jft/index", ("/d/jft/index/",)),                 # a directory index: its own tree, nothing outside
    ("/d/jft/index/", ("/d/jft/index/",)),
    ("/d/jft/index.parquet", ()),                         # a one-file index: none (name the images' root)
    ("/x.parquet", ()),
    ("/d/jft/index/part-0.parquet", ()),
    ("/d/jft/index/*.parquet", ("/d/jft/index/",)),       # a glob: the directory it lists is the index
    ("/d/jft/index/part-[0-3].parquet", ("/d/jft/index/",)),
    ("file:///d/jft/index", ("/d/jft/index/",)),
    ("file:/d/jft/index", ("/d/jft/index/",)),
    ("s3://bucket/jft/index", ("s3://bucket/jft/index/",)),  # object stores: the index's prefix, not the bucket
    ("s3://bucket/index.parquet", ()),
    ("s3a://bucket/x/index", ("s3://bucket/x/index/",)),
    ("gs://bucket/a/b/index/part-*.parquet", ("gs://bucket/a/b/index/",)),
    ("hdfs://nn:8020/d/index", ("hdfs://nn:8020/d/index/",)),
])
def test_default_prefix_is_the_index_own_tree(index, default):
    assert U.default_prefixes(index, resolve=ident) == default


def test_default_prefix_of_a_relative_index(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert U.default_prefixes("data/jft/index") == (os.path.realpath(tmp_path) + "/data/jft/index/",)


def test_a_prefix_that_names_a_hidden_directory_allows_it():
    (v,) = U.check_uris(["/home/u/.cache/images"], ["/home/u/.cache/images/a.jpg"], resolve=ident)
    assert v.target == "/home/u/.cache/images/a.jpg"
    (v,) = U.check_uris(["/home/u/.cache/images"], ["/home/u/.cache/images/.x/a.jpg"], resolve=ident)
    assert v.target is None
    (v,) = U.check_uris(["/d/jft/..a"], ["/d/jft/..a/1.jpg"], resolve=ident)  # a name starting with '..'
    assert v == U.Verdict("/d/jft/..a/1.jpg", None)                              # is no parent step


# -- local resolution: symlinks, and what is read ------------------------------------------

def test_symlinks_are_resolved_on_both_sides(tmp_path):
    root, other = tmp_path / "root", tmp_path / "other"
    (root / "sub").mkdir(parents=True)
    other.mkdir()
    (root / "a.jpg").write_bytes(b"a")
    (other / "b.jpg").write_bytes(b"b")
    (root / "escape.jpg").symlink_to("/etc/passwd")
    (root / "outdir").symlink_to(other)
    (root / "inside.jpg").symlink_to(root / "a.jpg")
    (tmp_path / "alias").symlink_to(root)
    verdicts = U.check_uris([str(root)], [str(root / "a.jpg"), str(root / "escape.jpg"),
                                          str(root / "outdir" / "b.jpg"), str(root / "inside.jpg"),
                                          str(tmp_path / "alias" / "a.jpg")])
    real = os.path.realpath(root)
    assert [v.target for v in verdicts] == [f"{real}/a.jpg", None, None, f"{real}/a.jpg", f"{real}/a.jpg"]
    assert all(v.reason.startswith(U.OUTSIDE) for v in verdicts[1:3])
    # A prefix reached through a link allows what its target holds.
    (v,) = U.check_uris([str(tmp_path / "alias")], [str(root / "a.jpg")])
    assert v.target == f"{real}/a.jpg"


def test_a_directory_swapped_for_a_link_after_the_check_is_not_followed(tmp_path):
    root, secret = tmp_path / "root", tmp_path / "secret"
    (root / "sub").mkdir(parents=True)
    secret.mkdir()
    (root / "sub" / "a.jpg").write_bytes(b"image")
    (secret / "a.jpg").write_bytes(b"secret")
    (v,) = U.check_uris([str(root)], [str(root / "sub" / "a.jpg")])
    assert U.read_target(v.target) == b"image"
    (root / "sub" / "a.jpg").unlink()
    (root / "sub").rmdir()
    (root / "sub").symlink_to(secret)  # the swap, between the check and the read
    with pytest.raises(ValueError, match="sub is not a directory \\(a link is not followed\\)"):
        U.read_target(v.target)
    (root / "file.jpg").symlink_to(secret / "a.jpg")
    with pytest.raises(ValueError, match="a link \\(not followed\\)"):
        U.read_target(os.path.realpath(root) + "/file.jpg")


def test_http_redirects_are_followed_only_into_the_allowed_prefixes():
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            routes = {"/imgs/ok.jpg": (200, b"pixels"), "/imgs/moved.jpg": (302, "/imgs/ok.jpg"),
                      "/imgs/away.jpg": (302, "http://169.254.169.254/latest/meta-data/"),
                      "/imgs/out.jpg": (302, "/admin/secret"), "/admin/secret": (200, b"secret")}
            code, body = routes.get(self.path, (404, b""))
            self.send_response(code)
            if code == 302:
                self.send_header("Location", body)
                body = b""
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        prefixes = (U.canonical_prefix(f"{base}/imgs"),)
        assert U.read_target(f"{base}/imgs/ok.jpg", prefixes) == b"pixels"
        assert U.read_target(f"{base}/imgs/moved.jpg", prefixes) == b"pixels"  # within the prefix: followed
        for path, where in (("/imgs/away.jpg", "169.254.169.254"), ("/imgs/out.jpg", "/admin/secret")):
            with pytest.raises(ValueError, match=f"redirected \\(302\\) to .*{where}.*outside the allowed"):
                U.read_target(f"{base}{path}", prefixes)
        with pytest.raises(ValueError, match="outside the allowed prefixes; not followed"):
            U.read_target(f"{base}/imgs/moved.jpg")  # no prefixes given: no redirect followed
        with pytest.raises(FileNotFoundError):
            U.read_target(f"{base}/imgs/missing.jpg", prefixes)
    finally:
        server.shutdown()


def test_read_target_reads_regular_files_only(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 100)
    assert U.read_target(os.path.realpath(tmp_path / "a.jpg")) == b"\xff\xd8\xff" + bytes(range(256)) * 100
    with pytest.raises(ValueError, match="not a regular file"):
        U.read_target("/dev/zero")  # even where a prefix allows /dev
    os.mkfifo(tmp_path / "fifo")  # no writer: opening must not block
    with pytest.raises(ValueError, match="not a regular file"):
        U.read_target(os.path.realpath(tmp_path / "fifo"))
    with pytest.raises(OSError):
        U.read_target(os.path.realpath(tmp_path / "missing.jpg"))


# -- ShardJob and the command line -------------------------------------------------------

def test_shard_job_prefixes(tmp_path):
    real = os.path.realpath(tmp_path)
    job = W.ShardJob(selection="s", index=str(tmp_path / "jft" / "index"), output="o")
    assert job.allow_uri_prefixes is None and job.uri_prefixes == (f"{real}/jft/index/",)
    job = W.ShardJob(selection="s", index="s3://bucket/jft/index", output="o")
    assert job.uri_prefixes == ("s3://bucket/jft/index/",)
    job = W.ShardJob(selection="s", index="s3://bucket/jft/index", output="o",
                     allow_uri_prefixes=["gs://imgs", "gs://imgs/", str(tmp_path / "train")])
    assert job.uri_prefixes == ("gs://imgs/", f"{real}/train/")  # replaces the default; deduplicated
    assert W.ShardJob(selection="s", index="i", output="o", allow_uri_prefixes="s3://b").uri_prefixes == ("s3://b/",)
    with pytest.raises(ValueError, match="--allow-uri-prefix '/d/../etc'"):
        W.ShardJob(selection="s", index="i", output="o", allow_uri_prefixes=["/d/../etc"])


def test_parser_repeats_allow_uri_prefix():
    args = W.build_parser().parse_args(["--selection", "s", "--index", "i", "--output", "o",
                                        "--allow-uri-prefix", "/a", "--allow-uri-prefix", "s3://b"])
    assert args.allow_uri_prefix == ["/a", "s3://b"]
    assert W.build_parser().parse_args(["--selection", "s", "--index", "i", "--output", "o"]).allow_uri_prefix is None


def _shard_keys(out: str) -> dict[str, int]:
    """source key -> copies in the shards."""
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    found: dict[str, int] = {}
    for shard in manifest["shards"]:
        with tarfile.open(os.path.join(out, shard["name"])) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    key = json.loads(tar.extractfile(member).read())["key"]
                    found[key] = found.get(key, 0) + 1
    return found


@pytest.mark.slow
def test_cli_fetches_only_allowed_uris(tmp_path):
    from adaptive_transfer.synthetic import encode_image

    src, other, sibling = tmp_path / "src", tmp_path / "other", tmp_path / "srcX"
    for d in (src / "index", src / "images", other, sibling):
        d.mkdir(parents=True)

    def image(path, i):
        path.write_bytes(encode_image(np.full((8, 8, 3), 30 * i, np.uint8), "PNG" if i % 2 else "JPEG"))
        return str(path)

    uris = {f"good/{i}": image(src / "images" / f"{i}.img", i) for i in range(5)}
    uris["good/file-form"] = f"file://{src}/images/3.img"
    (src / "images" / ".ssh").mkdir()
    uris["bad/hidden"] = image(src / "images" / ".ssh" / "id.img", 5)
    uris.update({"other/0": image(other / "0.img", 6), "other/1": image(other / "1.img", 7)})
    (src / "images" / "escape.img").symlink_to(other / "0.img")
    uris.update({
        "bad/symlink-out": str(src / "images" / "escape.img"),
        "bad/sibling": image(sibling / "0.img", 8),  # /.../srcX is not under /.../src
        "bad/passwd": "/etc/passwd", "bad/zero": "/dev/zero", "bad/http": "http://127.0.0.1:1/x",
        "bad/dotdot": f"{src}/images/../../other/1.img", "bad/relative": "images/0.img",
    })
    keys = sorted(uris)
    pq.write_table(pa.table({"key": keys, "labels": pa.array([[i % 3] for i in range(len(keys))], LABELS),
                             "uri": [uris[k] for k in keys]}), src / "index" / "part-0.parquet")
    copies = {k: 1 + (i % 2) for i, k in enumerate(keys)}
    pq.write_table(pa.table({"key": keys, "copies": pa.array([copies[k] for k in keys], pa.int32()),
                             "weight": [1.0] * len(keys)}), tmp_path / "selection.parquet")
    common = ["--selection", str(tmp_path / "selection.parquet"), "--index", str(src / "index"),
              "--samples-per-shard", "4", "--max-bad-fraction", "0.9", "--master", "local[2]",
              "--driver-memory", "1g"]

    # Default: the index's own directory tree (src/index/) and nothing outside it: no image is allowed.
    out = str(tmp_path / "default")
    refused = run_module("spark_jobs.write_shards", *common, "--output", out, check=False)
    assert refused.returncode == 1 and not os.path.exists(out)
    assert refused.stderr.splitlines()[-1].startswith(f"write_shards: error: {len(keys)} of {len(keys)} selected")

    # Naming the images' root: its images are fetched, the rest are bad examples with the policy's reason.
    out = str(tmp_path / "named")
    run_module("spark_jobs.write_shards", *common, "--output", out, "--allow-uri-prefix", str(src / "images"))
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    reasons = {b["key"]: b["reason"] for b in manifest["bad_records"]}
    outside = {"other/0", "other/1", "bad/symlink-out", "bad/sibling", "bad/passwd", "bad/zero", "bad/http",
               "bad/hidden"}
    assert set(reasons) == outside | {"bad/dotdot", "bad/relative"}
    real_src = os.path.realpath(src)
    for key in outside:
        assert reasons[key] == (f"{U.OUTSIDE}: {uris[key]!r} (allowed: {real_src}/images/; see "
                                "--allow-uri-prefix)"[:300]), key
    assert "'..' segment" in reasons["bad/dotdot"] and "not an absolute path" in reasons["bad/relative"]
    good = [k for k in keys if k.startswith("good/")]
    assert _shard_keys(out) == {k: copies[k] for k in good}
    assert manifest["unique_examples"] == len(good)

    # Naming the other root (and the index's own, which the option replaces): its images are fetched.
    out = str(tmp_path / "allowed")
    run_module("spark_jobs.write_shards", *common, "--output", out,
               "--allow-uri-prefix", str(other), "--allow-uri-prefix", f"file://{src}/images/")
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert {b["key"] for b in manifest["bad_records"]} == {"bad/sibling", "bad/passwd", "bad/zero", "bad/http",
                                                          "bad/dotdot", "bad/relative", "bad/hidden"}
    assert _shard_keys(out) == {k: copies[k] for k in good + ["other/0", "other/1", "bad/symlink-out"]}
    assert run_module("spark_jobs.verify", out).returncode == 0


def test_uris_on_object_storage_only_in_the_allowed_bucket(spark, tmp_path, s3_server):
    # Spark here has no s3 filesystem for the index itself, so it stays local and
    # the bucket is named (an index on s3://bucket/index would allow only
    # s3://bucket/index/ by default: test_default_prefix_is_the_index_own_tree).
    from adaptive_transfer.synthetic import encode_image

    fs = s3_server
    fs.mkdir("elsewhere")
    keys, uris = [], []
    for i in range(6):
        bucket = "bucket" if i < 4 else "elsewhere"
        fs.pipe(f"{bucket}/images/{i}.img", encode_image(np.full((8, 8, 3), i * 20, np.uint8)))
        keys.append(f"k/{i}")
        uris.append(f"s3://{bucket}/images/{i}.img")
    keys += ["k/bucketX", "k/local"]
    uris += ["s3://bucketX/images/0.img", "/etc/passwd"]
    pq.write_table(pa.table({"key": keys, "labels": pa.array([[1]] * len(keys), LABELS), "uri": uris}),
                   tmp_path / "index.parquet")
    pq.write_table(pa.table({"key": keys, "copies": pa.array([1] * len(keys), pa.int32())}),
                   tmp_path / "selection.parquet")
    job = W.ShardJob(selection=str(tmp_path / "selection.parquet"), index=str(tmp_path / "index.parquet"),
                     output=str(tmp_path / "out"), samples_per_shard=2, max_bad_fraction=0.5,
                     allow_uri_prefixes=["s3://bucket"])
    assert job.uri_prefixes == ("s3://bucket/",)
    m = W.run(spark, job)
    assert {b["key"] for b in m.bad_records} == {"k/4", "k/5", "k/bucketX", "k/local"}
    assert all(b["reason"].startswith(U.OUTSIDE) and "allowed: s3://bucket/;" in b["reason"] for b in m.bad_records)
    assert _shard_keys(str(tmp_path / "out")) == {f"k/{i}": 1 for i in range(4)}
