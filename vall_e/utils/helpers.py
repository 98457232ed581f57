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
