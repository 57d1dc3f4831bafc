"""torch.distributed set-up for ``torchrun`` launches (a single process without them)."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Optional

from runkit.devices import resolve_device
from runkit.errors import UserError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a (possibly single-process) ``torchrun`` launch."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# How long a collective (the final barrier above all) waits for the slowest rank before the job is killed: torch's
# default (10 minutes for NCCL) ends a certification whose ranks finish hours apart; the CLIs' --dist_timeout.
DEFAULT_DIST_TIMEOUT_MINUTES = 24 * 60.0
_HOST_GROUP: dict = {}  # the gloo group of :func:`any_rank` beside an NCCL default group, and the collectives' timeout


def init_distributed(device: Optional[str] = None, timeout_minutes: float = DEFAULT_DIST_TIMEOUT_MINUTES
                     ) -> DistInfo:
    """Initialise torch.distributed from ``torchrun``'s environment (RANK, WORLD_SIZE, LOCAL_RANK).

    NCCL on CUDA (one GPU per local rank, :func:`local_cuda_index`), gloo on CPU. Without those variables: a single
    process.

    Args:
        device: ``--device`` (``cuda:N`` under torchrun: the first of the node's GPUs, see :func:`local_cuda_index`).
        timeout_minutes: how long a collective waits for the other ranks (``--dist_timeout``).
    """
    import torch
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda" and (world_size > 1 or dev.index is None):
        dev = torch.device("cuda", local_cuda_index(dev.index, device))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        _HOST_GROUP["timeout"] = datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", timeout=_HOST_GROUP["timeout"])
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def local_cuda_index(first: Optional[int], flag_value: Optional[str] = None,
                     environ: Mapping[str, str] = os.environ) -> int:
    """The GPU of this process: ``first + LOCAL_RANK`` (``--device cuda`` = ``cuda:0``), so that under torchrun
    ``--device cuda:N`` gives the node's ranks the GPUs N, N+1, ..., N+LOCAL_WORLD_SIZE-1 (NCCL refuses two ranks on
    one GPU; ``CUDA_VISIBLE_DEVICES`` is the other way to choose them).

    Args:
        first: N of ``cuda:N`` (None: 0).
        flag_value: the ``--device`` value, named in the error.
        environ: where LOCAL_RANK and LOCAL_WORLD_SIZE are read.

    Raises:
        UserError: the node's ranks need more GPUs from N on than it has.
    """
    import torch

    first = first or 0
    local_rank = int(environ.get("LOCAL_RANK", "0"))
    local_world = int(environ.get("LOCAL_WORLD_SIZE", str(local_rank + 1)))
    count = torch.cuda.device_count()
    if first + max(local_world, local_rank + 1) > count:
        raise UserError(f"--device {flag_value or 'cuda'}: under torchrun local rank r uses cuda:{first}+r, but "
                        f"{local_world} local ranks from cuda:{first} need {first + local_world} GPUs and this node "
                        f"has {count}; use --device cuda (cuda:0 on), fewer processes (--nproc_per_node) or "
                        "CUDA_VISIBLE_DEVICES")
    return first + local_rank


def barrier() -> None:
    """``dist.barrier()`` when distributed, else nothing."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (a collective: every rank calls it at the same point; without
    torch.distributed, ``flag``). It runs on the CPU (gloo; beside an NCCL default group, over a gloo group created at
    the first call), so the host never waits for the device's queue: cheap enough for every optimizer step.

    Args:
        flag: this rank's value.
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    group = None
    if dist.get_backend() != "gloo":
        if "group" not in _HOST_GROUP:
            timeout = _HOST_GROUP.get("timeout", datetime.timedelta(minutes=DEFAULT_DIST_TIMEOUT_MINUTES))
            _HOST_GROUP["group"] = dist.new_group(backend="gloo", timeout=timeout)
        group = _HOST_GROUP["group"]
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value[0])


def cleanup_distributed() -> None:
    """Destroy the process groups if they were created."""
    import torch.distributed as dist

    _HOST_GROUP.pop("group", None)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
