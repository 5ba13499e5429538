"""DeepSpeed runtime shared by pretrain, finetune and evaluate.

* :func:`setup_distributed`: works as plain ``python`` (one process: the
  rendezvous variables are filled in) and under ``deepspeed`` /
  ``torchrun`` (which set them); gloo on CPU, NCCL on GPU.
* :class:`SafeCheckpointEngine`: DeepSpeed's torch engine, but every load
  uses ``torch.load(weights_only=True)``.
* :func:`save_checkpoint` / :func:`resume_tag`: a checkpoint counts only
  when its ``COMPLETE`` marker (written after every rank finished saving,
  listing the files and their sizes) matches the files on disk; ``latest``
  is not trusted on its own.
* :class:`Progress`: the progress line (step, loss, lr, images/s, ETA).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from schemas import io as sio
from schemas.stage_output import StageOutput

__all__ = ["DistInfo", "setup_distributed", "initialize", "SafeCheckpointEngine", "save_checkpoint",
           "resume_tag", "load_checkpoint", "average_buffers", "all_gather_longs", "Progress", "barrier",
           "write_json_main", "GO", "SKIP", "decide_on_rank0", "start_output", "building", "cli_main"]

TAG_PREFIX = "step"
COMPLETE = "COMPLETE"


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed() -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (idempotent)."""
    import deepspeed

    if "RANK" not in os.environ:  # plain `python -m ...`: a world of one
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})
    gpu = torch.cuda.is_available()
    backend = "nccl" if gpu else "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(minutes=30))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _safe_engine_class():
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        """Loads with ``weights_only=True``: tensors and plain containers only."""

        def load(self, path: str, map_location=None):
            return torch.load(path, map_location=map_location, weights_only=True)

    return SafeCheckpointEngine


def SafeCheckpointEngine(config_params=None):  # noqa: N802 - a factory that reads like the class
    return _safe_engine_class()(config_params)


def initialize(model, optimizer, scheduler, config: dict):
    """``deepspeed.initialize`` with the safe checkpoint engine installed."""
    import deepspeed

    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                           lr_scheduler=scheduler, config=config)
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
    return engine, optimizer, scheduler


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:09d}"


def save_checkpoint(engine, directory: str, step: int, client_state: dict, keep: int | None = None) -> str:
    """DeepSpeed save of ``step``; then, once every rank is done, the marker.
    With ``keep``, older complete checkpoints beyond the newest ``keep`` are removed."""
    tag = tag_for(step)
    engine.save_checkpoint(directory, tag=tag, client_state=client_state)
    barrier()
    if dist.get_rank() == 0:
        folder = os.path.join(directory, tag)
        files = {f: os.path.getsize(os.path.join(folder, f)) for f in sorted(os.listdir(folder)) if f != COMPLETE}
        sio.write_bytes_atomic(os.path.join(folder, COMPLETE), json.dumps({"step": step, "files": files}))
        if keep:
            complete = sorted(t for t in os.listdir(directory)
                              if t.startswith(TAG_PREFIX) and _is_complete(os.path.join(directory, t)))
            for old in complete[:-keep]:
                shutil.rmtree(os.path.join(directory, old), ignore_errors=True)
    barrier()
    return tag


def _is_complete(folder: str) -> bool:
    marker = os.path.join(folder, COMPLETE)
    if not os.path.isfile(marker):
        return False
    try:
        files = json.loads(open(marker).read())["files"]
    except (ValueError, KeyError):
        return False
    return all(os.path.isfile(os.path.join(folder, f)) and os.path.getsize(os.path.join(folder, f)) == size
               for f, size in files.items())


def resume_tag(directory: str) -> str | None:
    """The newest complete checkpoint tag in ``directory`` (or None).

    ``latest`` is only a hint: a tag it names that lacks a matching
    ``COMPLETE`` marker (a save cut off midway) is passed over, with a warning.
    """
    if not os.path.isdir(directory):
        return None
    tags = sorted((t for t in os.listdir(directory) if t.startswith(TAG_PREFIX)), reverse=True)
    latest_file = os.path.join(directory, "latest")
    latest = open(latest_file).read().strip() if os.path.isfile(latest_file) else None
    for tag in tags:
        if _is_complete(os.path.join(directory, tag)):
            if latest and latest != tag:
                print(f"[resume] 'latest' names {latest}, which is not complete; using {tag}", file=sys.stderr)
            return tag
    return None


def load_checkpoint(engine, directory: str, tag: str) -> dict:
    _, client_state = engine.load_checkpoint(directory, tag=tag)
    if client_state is None:
        raise ValueError(f"{directory}/{tag}: DeepSpeed could not load this checkpoint")
    return client_state


def average_buffers(module: torch.nn.Module) -> None:
    """Average floating buffers (BatchNorm running stats) over ranks, so every
    rank saves the same model; integer buffers are taken from rank 0."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for buf in module.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(dist.get_world_size())
        else:
            dist.broadcast(buf, src=0)


def all_gather_longs(values: list[int]) -> list[list[int]]:
    """Gather a fixed-length list of ints from every rank (tensors, no pickling)."""
    t = torch.tensor(values, dtype=torch.long)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [values]
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]


class Progress:
    """One line every ``every`` steps: step, loss, lr, images/s, ETA (rank 0)."""

    def __init__(self, total_steps: int, start_step: int, images_per_step: int, every: int = 10,
                 enabled: bool = True, stream=sys.stdout):
        self.total = total_steps
        self.start = start_step
        self.images = images_per_step
        self.every = max(1, every)
        self.enabled = enabled
        self.stream = stream
        self.t0 = time.perf_counter()

    def update(self, step: int, loss: float, lr: float) -> None:
        done = step + 1
        if not self.enabled or (done % self.every and done != self.total):
            return
        elapsed = time.perf_counter() - self.t0
        rate = (done - self.start) * self.images / max(elapsed, 1e-9)
        remaining = (self.total - done) * self.images / max(rate, 1e-9)
        print(f"step {done}/{self.total}  loss {loss:.4f}  lr {lr:.5f}  {rate:.0f} img/s  "
              f"ETA {datetime.timedelta(seconds=int(remaining))}", file=self.stream, flush=True)


def write_json_main(path: str, data: dict) -> None:
    """Rank 0 writes ``data`` to ``path`` (atomically); every rank then waits."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        sio.write_bytes_atomic(path, json.dumps(data, indent=2) + "\n")
    barrier()


#: :func:`decide_on_rank0` answers: go on (the output is ready), or nothing to do (finished).
GO, SKIP = 0, 1
_FAILED = 2


def decide_on_rank0(decide, device: torch.device | None = None) -> int:
    """Run ``decide()`` (it may change the output directory; returns
    :data:`GO` or :data:`SKIP`) on rank 0 only, and give every rank its
    answer, broadcast as an integer tensor (nothing pickled). An exception on
    rank 0 is raised there after the broadcast; the other ranks then raise a
    ``ValueError`` pointing at it, so no rank waits for a decision it cannot
    see."""
    code, error = _FAILED, None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            code = int(decide())
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the other ranks know
            error = e
    if dist.is_initialized() and dist.get_world_size() > 1:
        answer = torch.tensor([_FAILED if error else code], dtype=torch.long, device=device)
        dist.broadcast(answer, src=0)
        code = int(answer.item())
    if error is not None:
        raise error
    if code == _FAILED:
        raise ValueError("rank 0 could not prepare the output directory; its error says why")
    return code


def start_output(path: str, stage: str, overwrite: bool, info: DistInfo) -> tuple[StageOutput, str | None,
                                                                                 dict | None]:
    """The output protocol (``schemas.stage_output``) for a run that writes
    its results at the end (finetune, evaluate), once its inputs are read:
    ``(output, work, None)`` where rank 0 builds in ``work`` (``None`` on the
    other ranks; see :func:`building`); ``(output, None, metrics)`` where a
    finished result is there (nothing to do: said in one line). Rank 0
    decides (:func:`decide_on_rank0`)."""
    if not sio.is_local(path):
        raise ValueError(f"--output {path}: give a local or shared POSIX directory, not a URL")
    output = StageOutput(path, stage)
    work: list[str] = []

    def decide() -> int:
        if output.check(overwrite):
            print(output.skip_line(), file=sys.stderr)
            return SKIP
        work.append(output.begin())
        return GO

    if decide_on_rank0(decide, info.device) == SKIP:
        metrics = os.path.join(path, "metrics.json")
        return output, None, {**(json.loads(sio.read_bytes(metrics)) if info.is_main else {}), "reused": True}
    return output, (work[0] if work else None), None


@contextlib.contextmanager
def building(output: StageOutput, work: str | None):
    """``with building(output, work):`` the run's work; rank 0 commits what it
    built in ``work`` when the block ends (``_SUCCESS`` last) or removes it
    when the block raises; every rank then waits for the others."""
    try:
        yield
    except BaseException:
        if work is not None:
            output.abort(work)
        raise
    if work is not None:
        output.commit(work)
    barrier()


def cli_main(prog: str, parser, run, describe, argv=None) -> int:
    """Parse, run, report: bad input is a one-line error and exit status 1;
    rank 0 prints ``describe(result, args)`` on success.

    A ``ValueError`` raised inside a DataLoader worker reaches the main
    process re-raised by torch with the worker's whole traceback as its
    message ("Caught ValueError in DataLoader worker process N. Original
    Traceback ..."); the error line then shows only the original message and
    the worker it came from."""
    import re

    args = parser.parse_args(argv)
    try:
        result = run(args)
    except (ValueError, FileNotFoundError) as e:
        message = str(e)
        m = re.match(r"Caught (\w+) (in DataLoader worker process \d+)\.\nOriginal Traceback", message)
        if m:
            # The traceback's own exception line (not indented, "[module.]Type: message") is the last
            # such line; what follows it is the original message.
            lines = message.rstrip("\n").split("\n")
            head = re.compile(rf"^(?:[\w.]+\.)?{re.escape(m.group(1))}: ?")
            for i in range(len(lines) - 1, 0, -1):
                if head.match(lines[i]):
                    original = " ".join([head.sub("", lines[i], count=1), *lines[i + 1:]]).strip()
                    message = f"{original} ({m.group(2)})"
                    break
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"{prog}: {describe(result, args)}")
    return 0
