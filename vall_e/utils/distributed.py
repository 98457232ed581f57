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


_leader_first_calls = 0


def leader_first(on_leader: Callable[[], Any], on_others: Callable[[], Any], error_type: type = Exception) -> Any:
    """Run ``on_leader`` on global rank 0 while the other ranks wait, then ``on_others`` on them.

    For one-time work such as building a shared index: the others map the result instead of
    redoing it. They wait on the rendezvous store, not in a collective, so a long build (the first
    index of a large corpus) does not hit the process group's timeout. An ``error_type`` raised on
    the leader is raised on every rank with the same message, so all exit alike.
    """
    import datetime

    import torch.distributed as dist

    global _leader_first_calls
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return on_leader()
    _leader_first_calls += 1
    key = f"vall_e/leader_first/{_leader_first_calls}"
    store = dist.distributed_c10d._get_default_store()
    if is_global_leader():
        try:
            result = on_leader()
        except error_type as e:
            store.set(key, "error:" + str(e))
            raise
        except BaseException as e:  # release the others: they must not wait for a crashed leader
            store.set(key, f"crash:rank 0 failed ({type(e).__name__}: {e})")
            raise
        store.set(key, "ok")
        return result
    store.wait([key], datetime.timedelta(days=2))
    status = store.get(key).decode()
    if status.startswith("error:"):
        raise error_type(status[len("error:"):])
    if status.startswith("crash:"):
        raise RuntimeError(status[len("crash:"):])
    return on_others()
