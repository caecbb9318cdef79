"""All distributed setup in one place.

Works under ``torchrun`` (reads RANK / WORLD_SIZE / LOCAL_RANK), under the seeds' spawn launch
(``--num-gpus N --rigid-launch``), and under plain ``python`` (world size 1, no process group).
nccl on CUDA, gloo on CPU. Collectives here are called by *every* rank, never inside ``if is_main()``.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    """``print`` on rank 0 only; other ranks stay silent. Open tqdm bars are cleared first and redrawn
    after, so a line never glues onto a bar."""
    if is_main():
        from tqdm import tqdm

        with tqdm.external_write_mode():
            print(*args, **kwargs, flush=True)


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def parse_device(device: str | None) -> torch.device:
    """``--device`` as a usable torch device: ``cpu``, ``cuda`` or ``cuda:N`` that exists here; None picks
    CUDA when available. Anything else (a typo, ``mps``, ``cuda:7`` on a 1-GPU machine) is a UserError."""
    from .errors import UserError

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise UserError(f"--device {device!r} is not a device this tool runs on; use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"--device {device} requested but CUDA is not available; use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise UserError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to "
                            f"cuda:{count - 1}")
    return dev


def init(device: str | None = None) -> torch.device:
    """Initialise the process group when launched with several processes; return this rank's device.

    ``device`` is ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; None picks CUDA when available.
    Under several processes each rank uses ``cuda:LOCAL_RANK``.
    """
    dev = parse_device(device)
    if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1 and not is_dist():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            dev = parse_device(f"cuda:{local_rank()}")  # one GPU per local rank: it must exist
            torch.cuda.set_device(dev)
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    elif dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", 0)
    return dev


def set_threads(n: int | None = None) -> int:
    """Set this process's intra-op CPU threads; returns the count in force.

    ``n`` wins. Otherwise torch's default stands (``OMP_NUM_THREADS`` when set, else one per core), except
    that several local processes (spawned ranks) split the cores instead of each taking all of them.
    """
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if n is None and local > 1 and "OMP_NUM_THREADS" not in os.environ:
        n = max(1, (os.cpu_count() or 1) // local)
    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op on one process); returns ``t``."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    if not is_dist():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_entry(local: int, nprocs: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local),
                      LOCAL_RANK=str(local), WORLD_SIZE=str(nprocs), LOCAL_WORLD_SIZE=str(nprocs))
    fn(*args)


def spawn(fn, nprocs: int, args: tuple = ()) -> None:
    """The seeds' ``--num-gpus N --rigid-launch``: N local processes with torchrun's environment."""
    import torch.multiprocessing as mp

    mp.spawn(_spawn_entry, args=(nprocs, free_port(), fn, args), nprocs=nprocs, join=True)
