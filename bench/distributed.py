"""Multi-process training and evaluation on one or several machines, via torchrun.

``torchrun --nproc_per_node N -m bench.cli train ...`` starts N copies of the command
with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set;
``setup`` turns them into a process group (NCCL on GPU, gloo on CPU) and gives each
process its device (``cuda:LOCAL_RANK``). Without those variables (or with
``WORLD_SIZE=1``) every helper here is a no-op and the code runs as one process.

Besides the default group (used by DistributedDataParallel), a gloo group with a long
timeout carries the small CPU-side exchanges (confusion matrices, per-image FLOPs,
Python objects) and the waits: other ranks wait there while rank 0 alone times
throughput or writes files, which may take longer than NCCL's default timeout.
"""
from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

WAIT_TIMEOUT = datetime.timedelta(hours=12)
_wait_group = None


def env_world_size() -> int:
    """Processes the launcher (torchrun, or a multi-task submitit job) asked for."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def setup(device: str = "cpu") -> str:
    """Joins the process group torchrun describes (once), returns this process's device.

    Under torchrun, ``cuda`` (or any ``cuda:N``) becomes ``cuda:LOCAL_RANK``: one GPU per
    process. Alone, ``device`` comes back unchanged.
    """
    global _wait_group
    if env_world_size() <= 1:
        return device
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{local_rank()}"
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl" if cuda else "gloo")
    if _wait_group is None:
        _wait_group = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    return device


def cleanup() -> None:
    global _wait_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _wait_group = None


def is_distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    """Every process waits here until all arrive (no-op alone)."""
    if is_distributed():
        dist.barrier(group=_wait_group)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sums a CPU tensor over processes, in place; returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=_wait_group)
    return tensor


def all_gather_object(obj: Any) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every process; [obj] alone."""
    if not is_distributed():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj, group=_wait_group)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every process, so all of them take the same decision."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_wait_group)
    return box[0]


def shard(n: int) -> range:
    """This process's items of 0..n-1, strided (rank, rank + W, ...): every item once,
    none repeated (unlike DistributedSampler, which pads by repeating items)."""
    return range(rank(), n, world_size())
