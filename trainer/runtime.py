"""DeepSpeed runtime shared by pretrain, finetune and evaluate.

* :func:`setup_distributed`: works as plain ``python`` (one process: the
  rendezvous variables are filled in) and under ``deepspeed`` /
  ``torchrun`` (which set them); gloo on CPU, NCCL on GPU.
* :class:`SafeCheckpointEngine`: DeepSpeed's torch engine, but every load
  uses ``torch.load(weights_only=True)``.
* :func:`save_checkpoint` / :func:`resume_tag`: a checkpoint counts only
  when its ``COMPLETE`` marker (written after every rank finished saving,
  listing the files and their sizes) matches the files on disk; ``latest``
  is not trusted on its own. :func:`agree_resume_tag`: rank 0 chooses the
  tag, every rank resumes from it or all fail, saying which rank cannot.
* Nodes that share no disk (``node_local``): each node's local rank 0 saves
  and marks its node's copy (DeepSpeed's ``checkpoint.use_node_local_storage``);
  :func:`check_output_sharing` refuses a directory that is not what the run
  says it is (shared, or one per node).
* :func:`start_output` / :func:`building`: the output protocol, rank-aware,
  with the one reuse rule (a finished result is reused only when its
  fingerprint matches).
* :func:`check_build_locks` first: a DeepSpeed op build that was killed is
  one line, not a silent hang (:mod:`trainer.ops`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from schemas import io as sio
from schemas.stage_output import StageOutput

from .ops import StaleBuildLock, check_build_locks

__all__ = ["DistInfo", "setup_distributed", "initialize", "SafeCheckpointEngine", "save_checkpoint",
           "resume_tag", "agree_resume_tag", "check_output_sharing", "run_on_node_leaders", "load_checkpoint",
           "average_buffers", "all_gather_longs", "barrier", "speed_settings",
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
    """Initialise torch.distributed through DeepSpeed (idempotent). On CPU,
    a DeepSpeed op build left locked by a killed run is said in one line
    (:func:`trainer.ops.check_build_locks`) rather than waited on forever."""
    import deepspeed

    if not dist.is_initialized() and not torch.cuda.is_available():
        check_build_locks()

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


def speed_settings(engine, channels_last: bool = False, compile: bool = False) -> None:
    """GPU speed settings, after ``initialize`` (DeepSpeed broadcasts the
    parameters as contiguous bytes there): the model's weights in the
    channels-last memory format (cuDNN's faster convolutions; feed it
    channels-last inputs), and ``torch.compile`` of the model (in place: its
    ``state_dict`` keeps its names). Neither changes what is computed."""
    if channels_last:
        engine.module.to(memory_format=torch.channels_last)
    if compile:
        engine.module.compile()


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:09d}"


def _writes_markers(node_local: bool) -> bool:
    """Whether this rank marks and prunes the checkpoints it sees: rank 0, or
    with ``node_local`` each node's local rank 0 (DeepSpeed's writer there)."""
    if node_local:
        return int(os.environ.get("LOCAL_RANK", 0)) == 0
    return not dist.is_initialized() or dist.get_rank() == 0


def save_checkpoint(engine, directory: str, step: int, client_state: dict, keep: int | None = None,
                    node_local: bool = False) -> str:
    """DeepSpeed save of ``step``; then, once every rank is done, the marker.
    With ``keep``, older complete checkpoints beyond the newest ``keep`` are
    removed. ``node_local``: ``directory`` is each node's own (DeepSpeed's
    ``checkpoint.use_node_local_storage``); each node's local rank 0 marks
    and prunes its node's copy."""
    tag = tag_for(step)
    engine.save_checkpoint(directory, tag=tag, client_state=client_state)
    barrier()
    if _writes_markers(node_local):
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


def _ranks(flags: list[list[int]], wanted: int) -> list[int]:
    return [r for r, f in enumerate(flags) if f[0] == wanted]


def agree_resume_tag(directory: str, device: torch.device | None = None) -> str | None:
    """The checkpoint every rank resumes from: rank 0's :func:`resume_tag`,
    broadcast as its step (an integer tensor: nothing pickled). Every rank
    then checks that it can read that tag complete in its own ``directory``
    (a node that lost or never saw it: a disk not shared, a save cut off
    there); if one cannot, every rank raises ``ValueError`` naming the ranks,
    rather than resuming at different steps (and hanging at the first
    collective that disagrees). ``None``: rank 0 has no complete checkpoint."""
    step = -1
    if not dist.is_initialized() or dist.get_rank() == 0:
        tag = resume_tag(directory)
        step = int(tag[len(TAG_PREFIX):]) if tag else -1
    if dist.is_initialized() and dist.get_world_size() > 1:
        answer = torch.tensor([step], dtype=torch.long, device=device)
        dist.broadcast(answer, src=0)
        step = int(answer.item())
    if step < 0:
        return None
    tag = tag_for(step)
    readable = _is_complete(os.path.join(directory, tag))
    if not readable:
        print(f"[resume] rank {dist.get_rank() if dist.is_initialized() else 0} on {socket.gethostname()}: "
              f"{os.path.join(directory, tag)} is missing or incomplete", file=sys.stderr, flush=True)
    missing = _ranks(all_gather_longs([int(readable)]), 0)
    if missing:
        raise ValueError(f"rank 0 resumes from checkpoint {tag}, which rank(s) {missing} cannot read complete "
                         f"in their {directory} (each says where it looked): give every node the same "
                         "checkpoints (a shared --output, or with --node-local-checkpoints each node's own "
                         "copy, kept since the run that wrote it)")
    return tag


def check_output_sharing(path: str, node_local: bool, device: torch.device | None = None) -> None:
    """Check that ``path`` (an existing output directory) is what the run
    takes it to be: seen by every rank (``node_local`` False: one shared
    directory), or each node's own (``node_local``: on one shared directory
    the nodes would write the same checkpoint files at once). Rank 0 writes a
    probe file named by a random number it broadcasts; every rank looks for
    it. Raises ``ValueError`` on every rank where the directory is not so."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    nonce = torch.tensor([int.from_bytes(os.urandom(7), "big") if dist.get_rank() == 0 else 0], dtype=torch.long,
                         device=device)  # not torch's generator: the run's random stream stays as it was
    dist.broadcast(nonce, src=0)
    probe = os.path.join(path, f".probe-{int(nonce.item()):x}")
    if dist.get_rank() == 0:
        sio.write_bytes_atomic(probe, socket.gethostname(), durable=False)
    barrier()
    facts = all_gather_longs([int(os.path.exists(probe)), int(os.environ.get("LOCAL_RANK", 0))])
    barrier()
    if dist.get_rank() == 0:
        os.remove(probe)
    blind = _ranks(facts, 0)
    leaders = sum(1 for f in facts if f[1] == 0)
    if blind and not node_local:
        raise ValueError(f"--output {path} is not shared: rank(s) {blind} do not see what rank 0 writes there, "
                         "so they could not resume from its checkpoints: give a directory every node mounts "
                         "at the same path, or --node-local-checkpoints (each node keeps its own copy)")
    if node_local and not blind and leaders > 1:
        raise ValueError(f"--node-local-checkpoints, but every node sees the same --output {path}: the nodes "
                         "would write the same checkpoint files at once; drop the flag (one shared copy)")


def run_on_node_leaders(action, device: torch.device | None = None) -> None:
    """Run ``action()`` on each node's local rank 0 but global rank 0 (which
    has done it already: e.g. preparing its node's own output directory).
    An exception there is raised there; every other rank then raises a
    ``ValueError`` pointing at it, so no rank goes on alone."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    error = None
    if dist.get_rank() != 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0:
        try:
            action()
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the other ranks know
            error = e
    failed = _ranks(all_gather_longs([int(error is not None)]), 1)
    if error is not None:
        raise error
    if failed:
        raise ValueError(f"rank(s) {failed} could not prepare their node's output directory; their errors say why")


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
    """Gather a fixed-length list of ints from every rank (tensors, no pickling;
    on the current GPU where the backend is NCCL, which has no CPU tensors)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [values]
    nccl = dist.get_backend() == "nccl"
    t = torch.tensor(values, dtype=torch.long, device=torch.cuda.current_device() if nccl else "cpu")
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]


def write_json_main(path: str, data: dict) -> None:
    """Rank 0 writes ``data`` to ``path`` (atomically); every rank then waits."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        sio.write_bytes_atomic(path, sio.json_text(data, indent=2) + "\n")
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


def start_output(path: str, stage: str, overwrite: bool, info: DistInfo, fingerprint: dict | None = None
                 ) -> tuple[StageOutput, str | None, dict | None]:
    """The output protocol (``schemas.stage_output``) for a run that writes
    its results at the end (finetune, evaluate), once its inputs are read:
    ``(output, work, None)`` where rank 0 builds in ``work`` (``None`` on the
    other ranks; see :func:`building`); ``(output, None, metrics)`` where a
    finished result made from ``fingerprint`` is there (nothing to do: said
    in one line). A finished result made from another fingerprint is refused,
    naming what differs, unless ``overwrite``; the marker of the new one
    records ``fingerprint``. Rank 0 decides (:func:`decide_on_rank0`)."""
    if not sio.is_local(path):
        raise ValueError(f"--output {path}: give a local or shared POSIX directory, not a URL")
    output = StageOutput(path, stage)
    work: list[str] = []

    def decide() -> int:
        if output.check(overwrite, fingerprint):
            print(output.skip_line(), file=sys.stderr)
            return SKIP
        work.append(output.begin(fingerprint))
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
    except (ValueError, OSError, StaleBuildLock) as e:  # bad input, a shard that could not be read (retried), a lock
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
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        if dist.is_initialized():
            # Gloo's threads, left running at interpreter exit, can abort the process
            # ("terminate called without an active exception"): exit status 1, not -6.
            dist.destroy_process_group()
        return 1
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"{prog}: {describe(result, args)}")
    return 0
