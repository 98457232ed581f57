"""Small helpers shared across the project: atomic writes, logging setup, device moves, seeding."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

_LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    An interrupted or failed write leaves ``path`` untouched (the old file or nothing), never a
    truncated file. The temporary name keeps the suffix so format-sniffing writers still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` that never leaves a partial file behind."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_write_text(text: str, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def setup_logging(log_dir: str | Path | None = None, level: int = logging.INFO) -> None:
    """Log to the console and, when ``log_dir`` is given, to ``log_dir/log.txt``."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(log_dir) / "log.txt", encoding="utf-8"))
    logging.basicConfig(level=level, format=_LOG_FORMAT, handlers=handlers, force=True)


def to_device(x: Any, device: Any) -> Any:
    """Move tensors inside nested lists/tuples/dicts to ``device``."""
    import torch

    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    return x


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def find_files(root: str | Path, suffix: str) -> list[Path]:
    """Every file under ``root`` whose name ends with ``suffix`` (hidden temp files excluded), sorted."""
    root = Path(root)
    if root.is_file():
        return [root] if root.name.endswith(suffix) else []
    return sorted(p for p in root.rglob(f"*{suffix}") if p.is_file() and not p.name.startswith("."))


def utterance_id(path: str | Path) -> str:
    """The name before the first dot: ``a/b/x.qnt.pt`` -> ``x``."""
    return Path(path).name.split(".", 1)[0]


def sibling(path: str | Path, suffix: str) -> Path:
    """``a/b/x.wav`` + ``.qnt.pt`` -> ``a/b/x.qnt.pt`` (files of one utterance share the id)."""
    path = Path(path)
    return path.with_name(utterance_id(path) + suffix)


# --------------------------------------------------------------------------------------------
# batch tools (tokenizers): byte writes, case-insensitive search, shards over ranks


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename.

    Unlike writers that stream into a file object (``torch.save`` reports a full disk as
    "unexpected pos"), a plain ``write`` raises ``OSError`` with the real errno (ENOSPC, EROFS,
    EACCES), so callers can say what went wrong. No truncated file is ever left at ``path``.
    """
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def find_files_nocase(root: str | Path, suffixes: tuple[str, ...] | list[str]) -> list[Path]:
    """Files under ``root`` whose names end with one of ``suffixes``, ignoring case; sorted.

    ``x.WAV`` matches ``.wav``. Hidden files (atomic-write temporaries) are skipped. ``os.walk``
    rather than ``rglob``: one pass over a tree of hundreds of thousands of files.
    """
    root = Path(root)
    ends = tuple(s.lower() for s in suffixes)
    if root.is_file():
        return [root] if root.name.lower().endswith(ends) else []
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath) / n for n in filenames if n.lower().endswith(ends) and not n.startswith(".")]
    return sorted(found)


def dist_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the launcher's environment (torchrun, deepspeed,
    or set by hand); ``(0, 1, 0)`` when unset. torch.distributed need not be initialized."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world} are inconsistent; expected 0 <= RANK < WORLD_SIZE")
    return rank, world, local


def balanced_shards(weights: list[float], n_shards: int) -> list[list[int]]:
    """Split item indices into ``n_shards`` lists of nearly equal total weight, deterministically.

    Greedy longest-processing-time: items by weight descending (ties by index) each go to the
    lightest shard so far (ties to the lowest shard). Every index lands in exactly one shard; each
    shard is returned in ascending index order. The result depends only on ``weights``, so every
    rank computes the same split without talking to the others.
    """
    import heapq

    heap = [(0.0, s) for s in range(n_shards)]
    shards: list[list[int]] = [[] for _ in range(n_shards)]
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        load, s = heapq.heappop(heap)
        shards[s].append(i)
        heapq.heappush(heap, (load + max(0.0, float(weights[i])), s))
    return [sorted(s) for s in shards]


def pin_malloc_thresholds(mmap_threshold: int = 1 << 20) -> bool:
    """Stop glibc's heap from growing with variable tensor shapes; True when applied (Linux, glibc).

    glibc serves blocks above ``M_MMAP_THRESHOLD`` with their own ``mmap`` (returned to the system on
    free), but after freeing such a block it *raises* the threshold (up to 32 MB) so later tensors of
    that size come from the heap, where blocks of ever-changing sizes (every batch has other shapes)
    fragment it and resident memory creeps up over a long run without any leak (quarter AR on CPU:
    +1.3 GB per 100 steps; flat with this, see scripts/bench_memory.py). Setting the threshold
    explicitly turns that adjustment off, and an explicit trim threshold lets the heap shrink. The
    cost is a fresh ``mmap`` (page faults) for every block above the threshold.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, mmap_threshold)) and bool(libc.mallopt(m_trim_threshold, 4 * mmap_threshold))
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False


def release_free_memory() -> None:
    """Give memory the allocator holds but no longer uses back to the system (glibc ``malloc_trim``)."""
    import ctypes
    import ctypes.util
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def allow_tf32(on: bool) -> None:
    """TF32 for fp32 matmuls and cuDNN convolutions on CUDA (Ampere+): ~8x the fp32 tensor throughput at
    10-bit mantissa products. Code whose exactness is the point (EnCodec encoding) turns it off locally."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def boot_id() -> str:
    """This boot of the host ("" where unknown): a lock held before a reboot is stale."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot), None where /proc cannot tell: tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2 :].split()[19])  # field 22; the name in (...) may hold spaces
    except (OSError, ValueError, IndexError):
        return None


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
