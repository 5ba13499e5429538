"""Small helpers shared by tests (not fixtures): reference weights, spark runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas import WEIGHTS_SCHEMA, with_metadata
from schemas import io as sio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference_weights(index_path: str, labels_path: str, p_target: np.ndarray | None = None,
                      seed: int = 0) -> pa.Table:
    """weights table computed with plain numpy: w = p_target / p_source."""
    index = sio.read_parquet(index_path, columns=["labels"])
    vocab = pq.read_table(labels_path)
    V = vocab.num_rows
    flat = index.column("labels").combine_chunks().flatten().to_numpy()
    counts = np.bincount(flat, minlength=V)
    if p_target is None:
        p_target = np.random.default_rng(seed).dirichlet(np.ones(V))
    p_source = counts / index.num_rows
    weight = np.where(counts > 0, p_target / np.where(counts > 0, p_source, 1.0), 0.0)
    table = pa.table({"label_id": pa.array(np.arange(V), pa.int32()),
                      "count": pa.array(counts, pa.int64()), "p_source": p_source,
                      "p_target": np.asarray(p_target, float), "weight": weight}, schema=WEIGHTS_SCHEMA)
    return with_metadata(table, {"target": "test", "temperature": 2.0})


def write_weights(path: str, table: pa.Table) -> str:
    pq.write_table(table, path)
    return path


def run_module(module: str, *args: str, env: dict | None = None, check: bool = True,
               timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` in a fresh interpreter, from the repo root."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def free_port() -> int:
    """A free TCP port on loopback."""
    return free_ports(1)[0]


def free_ports(n: int) -> list:
    """``n`` distinct free TCP ports on loopback (all held open while chosen,
    so that no two are the same)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def random_generalist(path: str, labels_path: str) -> str:
    """A randomly initialised (seed 0) small generalist over the vocabulary
    at ``labels_path``, saved at ``path``."""
    import torch

    from trainer.models import build_model, save_generalist
    from trainer.transforms import PreprocessSpec

    vocab = sio.read_parquet(labels_path)
    torch.manual_seed(0)
    save_generalist(path, build_model("small", vocab.num_rows), "small", vocab.column("label_id").to_pylist(),
                    PreprocessSpec(32), vocab)
    return path
