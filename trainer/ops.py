"""DeepSpeed's compiled op on CPU: built once, and never waited on forever.

On a CPU-only machine DeepSpeed JIT-builds its shared-memory collective op
(``deepspeed_shm_comm``) the first time a trainer runs (about 100 s), in
torch's extension cache (``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions/py<ver>_<accelerator>/``). torch guards the build
with a ``lock`` file that holds no owner: a run killed during the build
leaves it, and every later run waits on it in silence, forever.

:func:`check_build_locks` runs before DeepSpeed starts: a lock that goes away
within a moment is another rank loading the op (torch takes the lock for
every load, built or not); one that some process of this host holds open is
a build under way (said in one line, then waited for, as torch does); one
that stays and that no process holds is left by a killed build, and the run
stops with one line naming it and what to do (the lock is not removed here:
a build in another PID namespace sharing the cache cannot be seen). ``python -m trainer.ops build`` builds the op ahead (the install
step), so that no training run builds it.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable

__all__ = ["StaleBuildLock", "extensions_root", "build_locks", "lock_holders", "check_build_locks", "build", "main"]


class StaleBuildLock(RuntimeError):
    """A build lock that no process holds (a build that was killed)."""


def extensions_root(environ=None) -> str:
    """Where torch builds extensions for this Python and accelerator (as
    ``torch.utils.cpp_extension._get_build_directory`` chooses, without
    creating anything)."""
    import torch

    environ = os.environ if environ is None else environ
    if environ.get("TORCH_EXTENSIONS_DIR"):
        return environ["TORCH_EXTENSIONS_DIR"]
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return os.path.join(get_default_build_root(), f"{python}_{accelerator}")


def build_locks(root: str) -> list[str]:
    """The ``lock`` files of extension builds under ``root`` (one level down)."""
    if not os.path.isdir(root):
        return []
    found = (os.path.join(root, name, "lock") for name in sorted(os.listdir(root)))
    return [path for path in found if os.path.isfile(path)]


def lock_holders(path: str, proc: str = "/proc") -> list[int]:
    """Processes of this host that hold ``path`` open (torch's builder keeps
    its lock open for the whole build); their open files are read from
    ``/proc`` (the processes we may not inspect are not counted)."""
    target = os.path.realpath(path)
    holders = []
    for pid in (p for p in _listdir(proc) if p.isdigit()):
        fd_dir = os.path.join(proc, pid, "fd")
        for fd in _listdir(fd_dir):
            try:
                if os.readlink(os.path.join(fd_dir, fd)) == target:
                    holders.append(int(pid))
                    break
            except OSError:
                continue
    return holders


def _listdir(path: str) -> Iterable[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


#: Seconds a lock may stay before it is judged: torch holds it briefly for every
#: load of a built op, and between closing it and removing it no process holds it.
LOCK_GRACE_SECONDS = 2.0


def _lock_state(lock: str, grace: float, poll: float = 0.05) -> int | None:
    """After at most ``grace`` seconds: ``None`` where ``lock`` went away, the
    pid of a process holding it, or 0 where it stayed and nobody holds it."""
    deadline = time.monotonic() + grace
    while True:
        if not os.path.exists(lock):
            return None
        if time.monotonic() >= deadline:
            holders = lock_holders(lock)
            return holders[0] if holders else 0
        time.sleep(poll)


def check_build_locks(root: str | None = None, log=None, grace: float = LOCK_GRACE_SECONDS) -> None:
    """Raise :class:`StaleBuildLock` in one line for a build lock under ``root``
    (default :func:`extensions_root`) that stays ``grace`` seconds with no
    process holding it; say in one line (``log``, default standard error)
    which process builds where one holds it."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    for lock in build_locks(root or extensions_root()):
        holder = _lock_state(lock, grace)
        if holder is None:
            continue
        if holder:
            log(f"[ops] {os.path.basename(os.path.dirname(lock))} is being built by process {holder} "
                f"(lock {lock}); waiting for it")
            continue
        raise StaleBuildLock(f"{lock} is left by a DeepSpeed op build that was killed (no process holds it), and "
                           f"every run would wait on it forever: remove it (rm {lock}), then run "
                           "`python -m trainer.ops build` once, or let the next run build the op")


def build() -> str:
    """Build DeepSpeed's CPU collective op into torch's extension cache now
    (nothing to build where a GPU is: NCCL there). Returns what was done."""
    check_build_locks()
    import torch

    if torch.cuda.is_available():
        return "a GPU is here: DeepSpeed uses NCCL, no CPU op to build"
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not builder.is_compatible():
        return "DeepSpeed has no shared-memory op for this machine; nothing to build"
    builder.load()
    return f"built {builder.absolute_name()} in {extensions_root()}"


def main(argv=None) -> int:
    from schemas.cli import ArgumentParser

    p = ArgumentParser(prog="python -m trainer.ops", description=__doc__)
    p.add_argument("action", choices=["build", "check"], help="build the op now, or check the build locks")
    args = p.parse_args(argv)
    try:
        print(build() if args.action == "build" else (check_build_locks() or "no stale build lock"))
    except RuntimeError as e:
        print(f"trainer.ops: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
