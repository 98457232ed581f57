"""Process-group helpers that work with or without a launcher.

``torchrun`` and the ``deepspeed`` launcher set ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; without
them we are the single process of a world of one.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def global_rank() -> int:
    return int(os.environ.get("RANK", 0))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def is_global_leader() -> bool:
    return global_rank() == 0


def is_local_leader() -> bool:
    return local_rank() == 0


def global_leader_only(fn: F) -> F:
    """Run ``fn`` on global rank 0 only; other ranks get ``None``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs) if is_global_leader() else None

    return wrapper  # type: ignore[return-value]


def local_leader_only(fn: F) -> F:
    """Run ``fn`` on local rank 0 (one process per machine) only."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs) if is_local_leader() else None

    return wrapper  # type: ignore[return-value]


def init_distributed(device: str) -> None:
    """Start the process group DeepSpeed uses: NCCL on CUDA, gloo on CPU.

    Single-process runs still get a group of one (DeepSpeed engines need it); the rendezvous
    defaults to a free local port in that case.
    """
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(_free_port())
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "gloo":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # keep DeepSpeed off a GPU the user did not ask for
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
