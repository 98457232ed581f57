"""Process-group helpers that work with or without a launcher, and the project's one home for collectives.

``torchrun`` and the ``deepspeed`` launcher set ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; without
them we are the single process of a world of one.

Every collective the project itself makes (DeepSpeed makes its own) goes through the functions
below: :func:`all_reduce`, :func:`all_gather_object`, :func:`broadcast_object`, :func:`gather_object`.
They put tensors on the backend's communication device (:func:`comm_device`: ``cuda:<current>`` for
NCCL, which refuses CPU tensors with "No backend type associated with device type cpu"; the CPU
for gloo) and bring results back to where the caller's tensor lives. Object collectives name that
device too: NCCL moves their pickled bytes through it.

**Strict communication device** (``VALL_E_STRICT_COMM=1``, for tests). The gloo backend accepts any
CPU tensor, so NCCL's rule cannot bite on a CPU-only machine by itself. In strict mode every
``torch.distributed`` collective called from ``vall_e`` code is checked: a tensor collective must get
tensors that :func:`to_comm_device` placed (each carries a mark), and object collectives must come
from this module (which names the device). Anything else is refused with NCCL's error, so a CPU
tensor handed to a collective fails the CPU tests as it would fail the first multi-GPU run.
DeepSpeed's own collectives are left alone.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any, Callable, TypeVar

if TYPE_CHECKING:
    import torch

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
    launched = "MASTER_ADDR" in os.environ
    if not launched:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(_free_port())
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "gloo":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # keep DeepSpeed off a GPU the user did not ask for
    if backend == "nccl":
        # a launcher gives each rank its GPU (LOCAL_RANK); a single process honours device=cuda:<N>
        index = torch.device(device).index
        if launched and index is not None and index != local_rank():
            import logging

            logging.getLogger(__name__).warning("device=%s is ignored under a launcher: rank %d uses cuda:%d (LOCAL_RANK)",
                                                device, global_rank(), local_rank())
        torch.cuda.set_device(local_rank() if launched or index is None else index)
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    if strict():
        install_strict_guard()


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# collectives: the one place that knows which device each backend communicates through

STRICT_ENV = "VALL_E_STRICT_COMM"
_COMM_MARK = "_vall_e_on_comm_device"  # set on tensors placed by to_comm_device (strict mode checks it)
_TENSOR_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce", "reduce_scatter",
                       "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter")
_OBJECT_COLLECTIVES = ("broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list")


def active() -> bool:
    """Whether a process group of more than one rank exists (collectives are no-ops otherwise)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def comm_device() -> "torch.device":
    """The device a collective's tensors must be on: ``cuda:<current device>`` for NCCL, else the CPU."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_comm_device(t: "torch.Tensor") -> "torch.Tensor":
    """A copy of ``t`` on :func:`comm_device` (a copy: collectives write their result in place)."""
    out = t.to(comm_device(), copy=True)
    if strict():
        setattr(out, _COMM_MARK, True)
    return out


_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def all_reduce(t: "torch.Tensor", op: str = "sum") -> "torch.Tensor":
    """``t`` reduced over all ranks (``op``: sum, max or min), on ``t``'s device; ``t`` itself without a group.

    No host sync: with NCCL and a CUDA ``t`` the reduction is queued on the device like any kernel.
    """
    import torch.distributed as dist

    if not active():
        return t
    c = to_comm_device(t)
    dist.all_reduce(c, op=getattr(dist.ReduceOp, _OPS[op]))
    return c.to(t.device)


def all_gather_object(obj: Any) -> list[Any]:
    """``obj`` (picklable) from every rank, in rank order; ``[obj]`` without a group."""
    import torch.distributed as dist

    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    _object_collective("all_gather_object", out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself without a group)."""
    if not active():
        return obj
    box = [obj]
    _object_collective("broadcast_object_list", box, src=src)
    return box[0]


def gather_object(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` as a list on rank 0, ``None`` on the others; ``[obj]`` without a group."""
    import torch.distributed as dist

    if not active():
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    _object_collective("gather_object", obj, out, dst=0)
    return out


def _object_collective(name: str, *args: Any, **kwargs: Any) -> None:
    """Call ``torch.distributed.<name>`` with the communication device settled.

    NCCL moves the pickled bytes through ``torch.cuda.current_device()``: :func:`init_distributed` sets
    it to ``LOCAL_RANK`` before the group exists (otherwise every rank would use GPU 0), and
    ``broadcast_object_list``, the one that takes a device, is told explicitly.
    """
    import torch.distributed as dist

    if name == "broadcast_object_list" and dist.get_backend() == "nccl":
        kwargs["device"] = comm_device()
    with _allowed():
        getattr(dist, name)(*args, **kwargs)


def gather_to_rank0(obj: Any, world_size: int) -> list[Any] | None:
    """Every rank's ``obj`` (a picklable value) as a list on rank 0, None on other ranks.

    Uses the initialized torch.distributed group. Without one (``world_size`` 1, or ranks started
    by hand without a launcher's rendezvous) it returns ``[obj]``: that rank reports its shard only.
    """
    if world_size == 1:
        return [obj]
    return gather_object(obj)


def init_gloo_for_summary(world_size: int, days: float = 7.0) -> bool:
    """Join a CPU (gloo) group when a launcher started ``world_size`` > 1 ranks; True when joined.

    Used only to merge per-rank summaries at the end, so its collective timeout is long: ranks
    may finish their shards hours apart. Needs the launcher's MASTER_ADDR/MASTER_PORT; without
    them (ranks started by hand) it returns False and each rank reports its own shard.
    """
    import datetime

    import torch.distributed as dist

    if world_size == 1 or not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    if not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        return False
    dist.init_process_group("gloo", timeout=datetime.timedelta(days=days))
    return True


# ----------------------------------------------------------------------------------------------
# strict mode: NCCL's device rule, enforced on gloo


def strict() -> bool:
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


_guard_state = {"installed": False, "allowed": 0}


class _allowed:
    """Inside: object collectives called by this module pass the strict check."""

    def __enter__(self) -> None:
        _guard_state["allowed"] += 1

    def __exit__(self, *exc: Any) -> None:
        _guard_state["allowed"] -= 1


class StrictCommError(RuntimeError):
    """A collective that NCCL would refuse, caught on gloo (strict communication device mode)."""


def install_strict_guard() -> None:
    """Wrap ``torch.distributed``'s collectives with NCCL's device rule for calls from ``vall_e`` code.

    Idempotent. Calls from other packages (DeepSpeed, torch itself) pass unchecked.
    """
    import sys

    import torch
    import torch.distributed as dist

    if _guard_state["installed"]:
        return
    _guard_state["installed"] = True

    def caller() -> str | None:
        """``module:function (file:line)`` of the frame that called the wrapped collective, when it is vall_e code."""
        frame = sys._getframe(2)
        module = frame.f_globals.get("__name__", "")
        if not (module == "vall_e" or module.startswith("vall_e.")) or module == __name__:
            return None
        return f"{module}.{frame.f_code.co_name} ({frame.f_code.co_filename}:{frame.f_lineno})"

    def wrap_tensor(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def checked(*args: Any, **kwargs: Any) -> Any:
            where = caller()
            if where is not None:
                tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
                tensors += [t for a in (*args, *kwargs.values()) if isinstance(a, (list, tuple))
                            for t in a if isinstance(t, torch.Tensor)]
                for t in tensors:
                    if not getattr(t, _COMM_MARK, False):
                        raise StrictCommError(
                            f"No backend type associated with device type {t.device.type} (strict communication "
                            f"device: {where} passes a tensor to torch.distributed.{name} that was not placed on the "
                            "backend's device; NCCL needs it on cuda:<LOCAL_RANK>. Reduce through "
                            "vall_e.utils.distributed instead)")
            return fn(*args, **kwargs)

        return checked

    def wrap_object(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def checked(*args: Any, **kwargs: Any) -> Any:
            where = caller()
            if where is not None and not _guard_state["allowed"]:
                raise StrictCommError(
                    f"strict communication device: {where} calls torch.distributed.{name} directly; under NCCL its "
                    "pickled bytes travel through the current CUDA device, which this call does not name. Use "
                    "vall_e.utils.distributed's object collectives")
            return fn(*args, **kwargs)

        return checked

    for name in _TENSOR_COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, wrap_tensor(name, getattr(dist, name)))
    for name in _OBJECT_COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, wrap_object(name, getattr(dist, name)))


# ----------------------------------------------------------------------------------------------
# rendezvous-store helpers: hand-offs between ranks that may take hours (an index build on one
# node while the others wait) go through the launcher's key-value store, never through a collective,
# so they cannot run into the process group's timeout; and a failing rank publishes its error
# instead of leaving the others waiting inside a collective.

HOST_ID_ENV = "VALL_E_HOST_ID"
_STORE_WAIT = 2 * 24 * 3600.0  # seconds: longer than any index build
_store_scopes: dict[str, int] = {}


def host_id() -> str:
    """The name of this machine: ranks with one host id share its local disks.

    ``VALL_E_HOST_ID`` overrides the hostname; it is for tests only, to make ranks on one machine
    behave as if each lived on its own node.
    """
    import socket

    return os.environ.get(HOST_ID_ENV) or socket.gethostname()


def store_scope(name: str) -> str:
    """A fresh key prefix for one hand-off, the same on every rank (``vall_e/<name>/<n>``, ``n`` counting calls).

    Every rank must call it the same number of times, in the same order, as with collectives.
    """
    _store_scopes[name] = _store_scopes.get(name, 0) + 1
    return f"vall_e/{name}/{_store_scopes[name]}"


def _store() -> Any:
    import torch.distributed as dist

    return dist.distributed_c10d._get_default_store()


def store_set(key: str, value: Any) -> None:
    """Publish a JSON-serializable ``value`` under ``key``."""
    import json

    _store().set(key, json.dumps(value))


def store_get(key: str, timeout_s: float = _STORE_WAIT) -> Any:
    """The value published under ``key``, waiting for it up to ``timeout_s`` seconds."""
    return store_get_many([key], timeout_s)[0]


def store_get_many(keys: list[str], timeout_s: float = _STORE_WAIT) -> list[Any]:
    """The values published under ``keys`` (in order) once all exist; one round trip when the store allows."""
    import datetime
    import json

    store = _store()
    if not keys:
        return []
    store.wait(keys, datetime.timedelta(seconds=timeout_s))
    try:
        raw = store.multi_get(keys)
    except (RuntimeError, NotImplementedError):  # a store without the extended API
        raw = [store.get(k) for k in keys]
    return [json.loads(bytes(r).decode()) for r in raw]


def store_elect(key: str) -> bool:
    """True for exactly one of the ranks calling this with ``key`` (the first to arrive)."""
    return int(_store().add(key, 1)) == 1
