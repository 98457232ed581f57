"""The corpus index: every utterance of a folder tree in a few memory-mapped arrays, plus packed codes.

The folder tree (``<id>.qnt.pt`` + ``<id>.phn.txt``, DESIGN.md) stays the source of truth. For
training at LibriLight scale we derive, once per corpus folder, an index in the shape of
Megatron-LM's indexed datasets: a few flat numpy arrays (no Python object per utterance) and the
codes of every utterance packed into a few large int16 files, all read through memory maps::

    <data_dir>/.vall_e/                  (or <index_root>/<data_dir as a name>/)
        CURRENT                          name of the live generation, e.g. "g000003"
        g000003/meta.json                symbols, folders (+ mtimes), shards, bad files
        g000003/<array>.npy              one row per utterance (see ``_ARRAYS``)
        shards/codes-g000003-000.bin     int16 codes, frame-major: utterance i is rows
                                         code_off[i] .. code_off[i] + n_frames[i] of (n, 8)
        build.lock                       one builder at a time (flock)
        build.lock.owner                 ... or, where flock does not work, this file (see below)

Every rank and every dataloader worker maps the same files: the page cache holds one copy per
machine, and a worker's private memory does not grow with the corpus. Nothing is pickled but paths.

The index refreshes itself: each start compares the tree with it (``index_check``: ``files`` stats
every file, ``dirs`` only the folders, enough for tools that write by rename as ours do, ``off``
trusts it). Changed or new utterances are read again and appended to a new shard; unchanged ones
keep their packed codes. Force a full rebuild by deleting the ``.vall_e`` folder (or
``index_rebuild=true``).

**Many nodes: what must be shared.** Checkpoints: ``ckpt_root`` must be one folder every rank sees
(every rank writes its part of a checkpoint into one folder that rank 0 then renames, and every
rank loads from it at resume). The index: either on a
filesystem every node shares (the corpus, or ``index_root``), or node-local copies of the corpus
that are identical (same files, same relative paths, e.g. ``rsync -a`` from one source; mtimes may
differ). :func:`open_indexes` builds once per filesystem: rank 0 builds (or checks) its index;
on a node that does not see rank 0's index folder (found with a probe file rank 0 leaves there),
one elected rank per host builds that node's copy at the same time; all other ranks map, unchecked,
the generation built for them. Then every rank's content digest (utterance ids, folders, statuses,
frame counts, phones: :func:`content_digest`, stored in ``meta.json`` at build time) is compared,
and copies that differ stop every rank with one error naming both sides. All hand-offs go through
the launcher's rendezvous store, never a collective, so a long build cannot hit the NCCL timeout.
Build the indexes ahead (``python -m vall_e.corpus`` on each node, or once on a shared filesystem)
to keep the first start short.

**Locks without flock.** Builders of one index take turns through ``flock``. On filesystems where
it fails (Lustre mounted without ``-o flock``, NFS without a lock manager: ENOSYS, EOPNOTSUPP,
ENOLCK, EINVAL) they use ``build.lock.owner`` instead, created with ``O_CREAT|O_EXCL`` and naming
its holder's host, pid and start time; which mechanism is used is logged once, at INFO. A lock whose
holder is gone from this host (dead or reused pid, or a reboot) is taken over. A lock held by
another host cannot be checked from here: builders wait, saying every 10 minutes who holds it and
that it must be deleted by hand if that process is gone. All hosts building into one folder must
see the same mechanism (mount the filesystem with the same options everywhere).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
import zlib
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

from .utils.helpers import atomic_write_text, boot_id, process_alive, process_start

_logger = logging.getLogger(__name__)

# 3: a per-utterance max_code column (num_tokens checked at load); 2: codes checked against 1024 at
# build time; 1: any int16. An index of another version is rebuilt at the next start.
INDEX_VERSION = 3
CODEBOOK_SIZE = 1024  # EnCodec 24 kHz: every code of every level is below this (num_tokens' default)
CODE_STORE_MAX = np.iinfo(np.int16).max  # the largest code the packed int16 shards can hold
N_CODEBOOKS = 8
QNT_SUFFIX, PHN_SUFFIX = ".qnt.pt", ".phn.txt"
INDEX_DIR = ".vall_e"

# row status
OK, NO_PHONES, BAD_CODES, BAD_PHONES = 0, 1, 2, 3

# name -> dtype of the per-utterance arrays (``*_off`` arrays have n + 1 entries)
_ARRAYS = {
    "dir": np.int32,  # index into meta["dirs"]
    "name_off": np.int64,  # utterance ids, as utf-8 bytes in ``names``
    "names": np.uint8,
    "key": np.uint32,  # crc32 of the relative path: a stable per-utterance random key (splits)
    "status": np.int8,
    "qnt_stat": np.int64,  # (n, 2): size, mtime_ns
    "phn_stat": np.int64,  # (n, 2): size, mtime_ns (0, 0 when missing)
    "n_frames": np.int32,
    "phone_off": np.int64,  # phone ids (into meta["symbols"]) in ``phones``
    "phones": np.uint16,
    "shard": np.int32,  # -1: not packed
    "code_off": np.int64,  # first frame in the shard
    "max_code": np.int16,  # largest code of any level (-1 when not OK): num_tokens is checked at load
}

_BLOCK_FILES = 4000  # utterances per packing task (one shard file each when run in parallel)
_PARALLEL_MIN = 2000  # fewer new utterances than this are read in-process


class DataError(RuntimeError):
    """A data problem a user must fix; the message names the file or the rule and what to run."""


class Record(NamedTuple):
    """One utterance found by the walk: where it is and what its files look like on disk."""

    dir: int
    name: str
    qnt_stat: tuple[int, int]
    phn_stat: tuple[int, int]


# ----------------------------------------------------------------------------------------------
# locations


def index_home(data_dir: str | Path, index_root: str = "") -> Path:
    """Where the index of ``data_dir`` lives: inside it, or under ``index_root`` for read-only corpora."""
    data_dir = Path(data_dir)
    if not index_root:
        return data_dir / INDEX_DIR
    name = str(data_dir.resolve()).strip("/").replace("/", "__") or "root"
    return Path(index_root) / name


def current_generation(home: Path) -> Path | None:
    """The live generation folder, or None when no complete index exists."""
    try:
        name = (home / "CURRENT").read_text().strip()
    except OSError:
        return None
    gen = home / name
    return gen if name and (gen / "meta.json").exists() else None


# ----------------------------------------------------------------------------------------------
# the build lock: flock where the filesystem supports it, else an O_CREAT|O_EXCL lock file

LOCK_FILE = "build.lock"  # flock'ed (the file itself means nothing)
OWNER_FILE = "build.lock.owner"  # the fallback: exists while a builder holds it; says who
# flock's errors on filesystems that do not support it: Lustre without ``-o flock`` (ENOSYS), NFS
# without a lock manager (ENOLCK), FUSE and some object-store mounts (EOPNOTSUPP, EINVAL)
_FLOCK_UNSUPPORTED = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL}
_FLOCK_BUSY = {errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES}
_LOCK_POLL_S = 0.5
_LOCK_NAG_S = 600.0  # repeat the "waiting for another host" warning this often
_GARBLED_STALE_S = 60.0  # an owner file nobody finished writing is abandoned after this long
_logged_mechanisms: set[str] = set()


def _log_mechanism(kind: str, message: str, *args: Any) -> None:
    """Say once per process which lock mechanism index builds use."""
    if kind not in _logged_mechanisms:
        _logged_mechanisms.add(kind)
        _logger.info(message, *args)


@contextlib.contextmanager
def _build_lock(home: Path, timeout: float | None = None) -> Iterator[None]:
    """Hold the index build lock of ``home``: concurrent builders of one index take turns.

    An exclusive ``flock`` on ``home/build.lock`` where the filesystem supports it (released by the
    kernel when its holder dies, on any host). Where ``flock`` fails as unsupported, an
    ``O_CREAT|O_EXCL`` lock file ``home/build.lock.owner`` naming its holder (see
    :func:`_owner_file_lock`). ``timeout``: seconds to wait before a :class:`DataError` (None: forever).
    """
    import fcntl

    home.mkdir(parents=True, exist_ok=True)
    with open(home / LOCK_FILE, "a+") as f:
        if _flock(f, home, timeout):
            _log_mechanism("flock", "index builds take turns through flock on %s", home / LOCK_FILE)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
            return
    with _owner_file_lock(home / OWNER_FILE, timeout):
        yield


def _flock(f: Any, home: Path, timeout: float | None) -> bool:
    """Take an exclusive flock on ``f``: True once held, False when the filesystem does not support flock."""
    import fcntl

    deadline = None if timeout is None else time.monotonic() + timeout
    waiting = False
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno in _FLOCK_UNSUPPORTED:
                _log_mechanism(
                    "file", "flock does not work in %s (%s): index builds take turns through the lock file %s "
                    "(O_CREAT|O_EXCL)", home, e.strerror or e, home / OWNER_FILE,
                )
                return False
            if e.errno not in _FLOCK_BUSY:
                raise
        if not waiting:
            _logger.info("waiting for another process building the index in %s", home)
            waiting = True
        if deadline is None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX)  # the kernel wakes us when the holder lets go
                return True
            except OSError as e:
                if e.errno in _FLOCK_UNSUPPORTED:
                    return False
                raise
        if time.monotonic() >= deadline:
            raise DataError(f"another process has been building the index in {home} for over {timeout:.0f} s")
        time.sleep(_LOCK_POLL_S)


def _owner_gone(owner: dict[str, Any]) -> bool:
    """Whether the process named in a lock file is known to be gone (only decidable on its own host)."""
    import socket

    if owner.get("host") != socket.gethostname():
        return False
    if owner.get("boot") and boot_id() and owner["boot"] != boot_id():
        return True  # the host rebooted since
    pid = owner.get("pid")
    if not isinstance(pid, int) or not process_alive(pid):
        return True
    start = owner.get("pid_start")
    return start is not None and process_start(pid) not in (None, start)  # the pid now names another process


def _describe_owner(path: Path, owner: dict[str, Any] | None) -> str:
    if not owner:
        return f"an unfinished lock file {path}"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return f"pid {owner.get('pid')} on host {owner.get('host')!r} (since {since}; lock file {path})"


def _read_owner(path: Path) -> tuple[str, dict[str, Any] | None] | None:
    """The lock file's text and its parsed owner (None when unparsable); None when there is no lock file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        owner = json.loads(text)
    except ValueError:
        owner = None
    return text, owner if isinstance(owner, dict) else None


def _remove_if_unchanged(path: Path, text: str) -> bool:
    """Remove the lock file ``path`` if it still holds ``text``: a file another process created since is put back.

    The rename is atomic, so of several processes removing one stale lock only one gets it.
    """
    grave = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(path, grave)
    except FileNotFoundError:
        return False
    try:
        if grave.read_text(encoding="utf-8") == text:
            return True
        # a new holder's file: put it back (link does not overwrite if yet another one appeared)
        with contextlib.suppress(FileExistsError):
            os.link(grave, path)
        return False
    finally:
        grave.unlink(missing_ok=True)


@contextlib.contextmanager
def _owner_file_lock(path: Path, timeout: float | None = None) -> Iterator[None]:
    """Hold the lock file ``path``, created with ``O_CREAT|O_EXCL`` (atomic on local disks, NFSv3+ and Lustre).

    It holds the owner's pid, host, boot id and start time. A waiter takes over a lock whose owner
    is gone: same host, and the pid is dead, reused, or from before a reboot. A lock held by another
    host cannot be checked from here: we wait, and say every 10 minutes which process holds it and
    that it must be deleted by hand if that process is gone. ``timeout`` (seconds) turns the wait
    into a :class:`DataError`.
    """
    import socket

    pid = os.getpid()
    mine = json.dumps({"pid": pid, "host": socket.gethostname(), "boot": boot_id(), "pid_start": process_start(pid),
                       "started": time.time(), "token": uuid.uuid4().hex})
    deadline = None if timeout is None else time.monotonic() + timeout
    nagged: float | None = None
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            held = _read_owner(path)
            if held is None:
                continue  # released just now
            text, owner = held
            if owner is None:
                with contextlib.suppress(OSError):
                    if time.time() - path.stat().st_mtime > _GARBLED_STALE_S:  # its writer died mid-write
                        owner = {}
            if owner is not None and (owner == {} or _owner_gone(owner)):
                if _remove_if_unchanged(path, text):
                    _logger.warning("removed the stale index build lock of %s: that process is gone",
                                    _describe_owner(path, owner or None))
                continue
            here = owner is not None and owner.get("host") == socket.gethostname()
            remedy = "" if here else (
                f"; flock does not work on this filesystem and a lock held by another host cannot be checked "
                f"from here: if that process is gone, delete {path} by hand"
            )
            if deadline is not None and time.monotonic() >= deadline:
                raise DataError(
                    f"the index in {path.parent} is being built by {_describe_owner(path, owner)}; gave up after "
                    f"{timeout:.0f} s{remedy}"
                )
            if nagged is None or time.monotonic() - nagged >= _LOCK_NAG_S:
                log = _logger.info if here else _logger.warning
                log("waiting for %s, which is building the index in %s%s", _describe_owner(path, owner), path.parent,
                    remedy)
                nagged = time.monotonic()
            time.sleep(_LOCK_POLL_S)
            continue
        try:
            os.write(fd, mine.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        break
    try:
        yield
    finally:
        held = _read_owner(path)
        if held is not None and held[0] == mine:
            path.unlink(missing_ok=True)
        else:
            _logger.warning("the index build lock %s was taken from this process while it held it", path)


# ----------------------------------------------------------------------------------------------
# walking the tree


def _stat(entry: os.DirEntry) -> tuple[int, int]:
    st = entry.stat()
    return (st.st_size, st.st_mtime_ns)


def _is_dir(entry: os.DirEntry, parent: Path) -> bool:
    """Whether ``entry`` is a folder to walk into: not a symlink that loops back to one of its ancestors."""
    try:
        if not entry.is_dir():
            return False
        if not entry.is_symlink():
            return True
        target = Path(entry.path).resolve(strict=True)
    except (OSError, RuntimeError) as e:  # a broken link, or one that resolves through a loop (ELOOP)
        _logger.warning("skipping %s: %s", entry.path, getattr(e, "strerror", None) or e)
        return False
    here = parent.resolve()
    if target == here or target in here.parents:
        _logger.warning("skipping %s: a symlink to %s, which contains it (a loop)", entry.path, target)
        return False
    return True


def _scan_dir(path: Path) -> tuple[int, list[str], list[tuple[str, tuple[int, int], tuple[int, int]]]] | None:
    """One folder: its mtime, its visible subfolders and its utterances ``(id, qnt stat, phn stat)``."""
    try:
        with os.scandir(path) as it:
            entries = list(it)
        mtime = path.stat().st_mtime_ns
    except OSError as e:
        _logger.warning("cannot list %s (%s): skipped", path, e.strerror or e)
        return None
    phn: dict[str, os.DirEntry] = {}
    qnt: dict[str, os.DirEntry] = {}
    subdirs = []
    for e in entries:
        name = e.name
        if name[0] == ".":
            continue
        if name.endswith(QNT_SUFFIX):
            uid = name.split(".", 1)[0]
            if uid in qnt:
                a, b = sorted([qnt[uid].name, name])
                raise DataError(
                    f"{path / a} and {path / b} are both utterance {uid!r} "
                    "(the id is the name before the first dot): rename or remove one"
                )
            qnt[uid] = e
        elif name.endswith(PHN_SUFFIX):
            phn[name.split(".", 1)[0]] = e
        elif _is_dir(e, path):
            subdirs.append(name)
    utts = []
    for uid in sorted(qnt):
        p = phn.get(uid)
        try:
            utts.append((uid, _stat(qnt[uid]), _stat(p) if p is not None else (0, 0)))
        except OSError as e:  # e.g. a symlink that loops or points nowhere
            _logger.warning("skipping utterance %s in %s: %s", uid, path, e.strerror or e)
    return mtime, sorted(subdirs), utts


def walk(root: Path, threads: int = 8) -> tuple[list[str], list[int], list[Record]]:
    """Every ``<id>.qnt.pt`` under ``root`` (hidden files and folders skipped), sorted by folder, id.

    Returns the folders (relative, ``""`` for ``root``), their mtimes and one :class:`Record` per
    utterance. Folders are listed and their files stat-ed on ``threads`` threads: the system calls
    overlap, which is what matters on a network filesystem where each one is a round trip (on a
    local disk with a warm cache one thread is ~20% faster: 2.4 s vs 3.0 s for 150k utterances on
    2 cores). Two code files with one id in one folder raise an error naming both.
    """
    from concurrent.futures import ThreadPoolExecutor

    scanned: dict[str, tuple] = {}
    with ThreadPoolExecutor(threads) as pool:
        pending = {"": pool.submit(_scan_dir, root)}
        while pending:
            rel, future = pending.popitem()
            result = future.result()
            if result is None:
                continue
            scanned[rel] = result
            for name in result[1]:
                sub = f"{rel}/{name}" if rel else name
                pending[sub] = pool.submit(_scan_dir, root / sub)
    dirs: list[str] = []
    dir_mtimes: list[int] = []
    records: list[Record] = []
    stack = [""] if "" in scanned else []
    while stack:  # depth first, sorted: the order the index rows are in
        rel = stack.pop()
        mtime, subdirs, utts = scanned[rel]
        d = len(dirs)
        dirs.append(rel)
        dir_mtimes.append(mtime)
        records.extend(Record(d, uid, q, p) for uid, q, p in utts)
        stack.extend(f"{rel}/{n}" if rel else n for n in reversed(subdirs) if (f"{rel}/{n}" if rel else n) in scanned)
    return dirs, dir_mtimes, records


# ----------------------------------------------------------------------------------------------
# reading one utterance (build time)


def read_codes_file(path: str | Path, num_tokens: int | None = CODEBOOK_SIZE) -> np.ndarray:
    """``<id>.qnt.pt`` -> ``(T, 8)`` int16 codes; raises ``ValueError`` saying what is wrong.

    Every code must lie in ``0..num_tokens - 1``; ``num_tokens=None`` checks only that it can be
    stored as int16 (``0..32767``): the index build, which records each utterance's largest code so
    that ``num_tokens`` is applied at load and changing it needs no rebuild.
    """
    import torch

    try:
        codes = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot be loaded as a tensor ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(codes, torch.Tensor) or codes.dim() != 3 or codes.shape[:2] != (1, N_CODEBOOKS):
        shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise ValueError(f"expected EnCodec codes shaped (1, {N_CODEBOOKS}, T), found {shape}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool or codes.shape[-1] == 0:
        raise ValueError(f"codes must be a non-empty integer tensor, found {codes.dtype} with shape {tuple(codes.shape)}")
    lo, hi = int(codes.min()), int(codes.max())
    if num_tokens is None:
        if lo < 0 or hi > CODE_STORE_MAX:
            bad = lo if lo < 0 else hi
            raise ValueError(f"holds the code {bad}, outside 0..{CODE_STORE_MAX} (codes are stored as int16; "
                             f"EnCodec's are 0..{CODEBOOK_SIZE - 1}); it was not written by python -m vall_e.emb.qnt: "
                             "re-encode its audio")
    elif lo < 0 or hi >= num_tokens:
        raise ValueError(out_of_range_message(lo if lo < 0 else hi, num_tokens))
    return codes[0].t().to(torch.int16).numpy()


def out_of_range_message(code: int, num_tokens: int) -> str:
    """What is wrong with a file holding ``code`` outside ``0..num_tokens - 1`` (follows its path)."""
    hint = "" if num_tokens != CODEBOOK_SIZE else " (EnCodec's codebook)"
    return (f"holds the code {code}, outside 0..{num_tokens - 1}{hint}, num_tokens={num_tokens}; it was not "
            "written by python -m vall_e.emb.qnt with this codec: re-encode its audio (or set num_tokens to the "
            "codec's codebook size)")


def _pack_block(task: tuple[str, list[tuple[str, str]], str | None]) -> list[tuple]:
    """Read a block of utterances; append their codes to one shard file (written atomically).

    ``task`` is ``(root, [(rel qnt path, rel phn path or ""), ...], shard path or None)``. Returns,
    per utterance, ``(status, n_frames, code_off, phones list, message, max_code)``.
    """
    root, items, shard_path = task
    out = []
    offset = 0
    sink = None
    tmp = None
    if shard_path is not None:
        tmp = shard_path + ".tmp"
        sink = open(tmp, "wb")
    try:
        for qnt_rel, phn_rel in items:
            if not phn_rel:
                out.append((NO_PHONES, 0, -1, [], "", -1))
                continue
            try:
                phones = Path(root, phn_rel).read_text(encoding="utf-8").split()
            except (OSError, UnicodeDecodeError) as e:
                out.append((BAD_PHONES, 0, -1, [], f"{Path(root, phn_rel)}: cannot be read ({e})", -1))
                continue
            try:
                codes = read_codes_file(Path(root, qnt_rel), num_tokens=None)  # num_tokens applies at load
            except (ValueError, OSError) as e:
                out.append((BAD_CODES, 0, -1, [], f"{Path(root, qnt_rel)}: {e}", -1))
                continue
            top = int(codes.max())
            if sink is not None:
                sink.write(np.ascontiguousarray(codes).tobytes())
                out.append((OK, len(codes), offset, phones, "", top))
                offset += len(codes)
            else:
                out.append((OK, len(codes), -1, phones, "", top))
        if sink is not None:
            sink.flush()
            os.fsync(sink.fileno())
            sink.close()
            sink = None
            os.replace(tmp, shard_path)
    finally:
        if sink is not None:
            sink.close()
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return out


# ----------------------------------------------------------------------------------------------
# the index


class CorpusIndex:
    """One corpus folder's index, memory-mapped read-only.

    Attributes are numpy arrays named as in ``_ARRAYS`` plus ``meta`` (symbols, dirs, shards).
    Pickling keeps only the paths, so dataloader workers re-map the files instead of copying them.
    """

    def __init__(self, root: str | Path, gen: Path):
        self.root = Path(root)
        self.gen = Path(gen)
        path = self.gen / "meta.json"
        try:  # a damaged file names itself (the caller rebuilds the index)
            self.meta: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
            for name in _ARRAYS:
                path = self.gen / f"{name}.npy"
                setattr(self, name, np.load(path, mmap_mode="r"))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        self._shards: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "gen": self.gen}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"], state["gen"])

    def __len__(self) -> int:
        return len(self.status)

    @property
    def symbols(self) -> list[str]:
        return self.meta["symbols"]

    @property
    def packed(self) -> bool:
        return bool(self.meta["packed"])

    @property
    def build_id(self) -> str:
        """Names the build that wrote this generation: unique per build (a copied folder keeps it)."""
        return str(self.meta.get("build_id") or f"created:{self.meta.get('created')}")

    @property
    def digest(self) -> str:
        """What this index holds (:func:`content_digest`): stored at build time, computed for older indexes."""
        if "digest" not in self.meta:
            arrays = {k: getattr(self, k) for k in _DIGEST_ARRAYS}
            self.meta["digest"] = content_digest(self.meta["dirs"], self.symbols, arrays)
        return self.meta["digest"]

    def name(self, i: int) -> str:
        return bytes(self.names[self.name_off[i] : self.name_off[i + 1]]).decode("utf-8")

    def qnt_path(self, i: int) -> Path:
        """Path of utterance ``i``'s ``.qnt.pt`` (as the tree holds it, under ``root``)."""
        d = self.meta["dirs"][self.dir[i]]
        return (self.root / d if d else self.root) / (self.name(i) + QNT_SUFFIX)

    def phone_ids(self, i: int) -> np.ndarray:
        """``(t,)`` ids into :attr:`symbols`."""
        return np.asarray(self.phones[self.phone_off[i] : self.phone_off[i + 1]])

    def damaged_shards(self) -> list[str]:
        """Shards whose size is not what the index expects (truncated, replaced, missing): one stat each."""
        out = []
        for name, frames in self.meta.get("shards", []):
            path = self.gen.parent / "shards" / name
            size = path.stat().st_size if path.exists() else -1
            if size != frames * N_CODEBOOKS * 2:
                out.append(f"{path} holds {max(size, 0)} bytes, not {frames * N_CODEBOOKS * 2}")
        return out

    def _shard(self, s: int) -> np.ndarray:
        arr = self._shards.get(s)
        if arr is None:
            name, frames = self.meta["shards"][s]
            path = self.gen.parent / "shards" / name
            size = path.stat().st_size if path.exists() else -1
            if size != frames * N_CODEBOOKS * 2:
                raise DataError(
                    f"packed codes {path} hold {max(size, 0)} bytes, the index expects {frames * N_CODEBOOKS * 2}: "
                    "the index was damaged while training ran; rerun the same command: the index is checked and "
                    "rebuilt at start, and training resumes from the last checkpoint"
                )
            arr = np.memmap(path, dtype=np.int16, mode="r", shape=(frames, N_CODEBOOKS))
            self._shards[s] = arr
        return arr

    def codes(self, i: int) -> np.ndarray:
        """``(T, 8)`` int16 codes of utterance ``i``: from the packed shard, else from its file (as stored:
        ``num_tokens`` is the caller's check, see :attr:`max_code`)."""
        s = int(self.shard[i])
        if s < 0:
            return read_codes_file(self.qnt_path(i), num_tokens=None)
        off, n = int(self.code_off[i]), int(self.n_frames[i])
        return np.array(self._shard(s)[off : off + n])


_DIGEST_ARRAYS = ("dir", "name_off", "names", "status", "n_frames", "phone_off", "phones")
_DIGEST_CHUNK = 1 << 20  # elements hashed at a time: bounded memory at any corpus size


def content_digest(dirs: Sequence[str], symbols: Sequence[str], arrays: dict[str, np.ndarray]) -> str:
    """The identity of what an index holds, as training sees it: a hash of every row's folder, id,
    status, frame count and phones, in row order.

    Phones are hashed as strings (a crc32 per symbol), so two builds of one tree agree whatever the
    order they met the symbols in; stats and mtimes are left out, so node-local copies of a tree
    agree too. Codes are not read (that would be a pass over the whole corpus); their frame counts
    stand in. About 0.9 s per million utterances of ~60 phones (measured on 2 busy cores), once per build.
    """
    h = hashlib.sha256()
    h.update(json.dumps({"dirs": list(dirs), "sizes": [len(arrays[k]) for k in _DIGEST_ARRAYS]}).encode("utf-8"))
    lut = np.array([zlib.crc32(s.encode("utf-8")) for s in symbols] or [0], dtype="<u4")
    for name in _DIGEST_ARRAYS:
        x = arrays[name]
        for a in range(0, len(x), _DIGEST_CHUNK):
            chunk = np.asarray(x[a : a + _DIGEST_CHUNK])
            chunk = lut.take(chunk) if name == "phones" else chunk.astype(np.dtype(_ARRAYS[name]).newbyteorder("<"))
            h.update(np.ascontiguousarray(chunk).tobytes())
    return h.hexdigest()[:32]


_said_version: set[str] = set()


def _load_current(root: Path, home: Path) -> CorpusIndex | None:
    gen = current_generation(home)
    if gen is None:
        return None
    try:  # an index of another version may lack arrays this one reads: look at its version first
        version = json.loads((gen / "meta.json").read_text(encoding="utf-8")).get("version")
    except (OSError, ValueError, AttributeError):
        version = None  # unreadable: CorpusIndex below names the problem
    if version is not None and version != INDEX_VERSION:
        if str(gen) not in _said_version:  # open_index looks twice (before and under the build lock)
            _said_version.add(str(gen))
            _logger.info("the corpus index %s has version %s, this program writes %d: rebuilding it once", gen,
                         version, INDEX_VERSION)
        return None
    try:
        index = CorpusIndex(root, gen)
    except (OSError, ValueError, KeyError) as e:
        _logger.warning("the corpus index %s cannot be read (%s): rebuilding it", gen, e)
        return None
    if index.meta.get("version") != INDEX_VERSION:
        return None
    damaged = index.damaged_shards()
    if damaged:
        _logger.warning("the packed codes of %s are damaged (%s): rebuilding the index", gen, "; ".join(damaged))
        return None
    return index


def _dirs_unchanged(root: Path, index: CorpusIndex) -> bool:
    for rel, mtime in zip(index.meta["dirs"], index.meta["dir_mtimes"]):
        try:
            if (root / rel if rel else root).stat().st_mtime_ns != mtime:
                return False
        except OSError:
            return False
    return True


def _names(records: Sequence[Record]) -> tuple[np.ndarray, np.ndarray]:
    """Utterance ids as one utf-8 blob ``(bytes,)`` and offsets ``(n + 1,)``."""
    encoded = [r.name.encode("utf-8") for r in records]
    off = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(b) for b in encoded], out=off[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), off


def _matches(index: CorpusIndex, dirs: list[str], records: list[Record]) -> bool:
    """Whether the walk found exactly the files (names, sizes, mtimes) the index was built from."""
    if len(records) != len(index) or dirs != index.meta["dirs"]:
        return False
    if not records:
        return True
    if not np.array_equal(np.fromiter((r.dir for r in records), np.int32, len(records)), index.dir):
        return False
    stats = np.array([r.qnt_stat + r.phn_stat for r in records], dtype=np.int64)
    if not (np.array_equal(stats[:, :2], index.qnt_stat) and np.array_equal(stats[:, 2:], index.phn_stat)):
        return False
    names, off = _names(records)
    return np.array_equal(off, index.name_off) and np.array_equal(names, index.names)


def open_index(
    data_dir: str | Path,
    index_root: str = "",
    check: str = "files",
    pack: bool = True,
    rebuild: bool = False,
    nj: int = 0,
    progress: bool = True,
) -> CorpusIndex:
    """The fresh index of ``data_dir``: reused when the tree is unchanged, else refreshed (under a lock).

    Args:
        data_dir: corpus folder.
        index_root: keep the index there instead of inside ``data_dir``.
        check: ``files`` (stat every file), ``dirs`` (folder mtimes only) or ``off``.
        pack: pack the codes into int16 shards (else training opens each ``.qnt.pt``).
        rebuild: ignore any existing index.
        nj: processes reading new files (0 = this one).
        progress: show a tqdm bar while reading files.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"folder {str(root)!r} does not exist (relative paths are taken from {Path.cwd()})")
    home = index_home(root, index_root)
    if check not in ("files", "dirs", "off"):
        raise ValueError(f"index_check={check!r}: use files, dirs or off")
    if not rebuild:
        index = _load_current(root, home)
        if index is not None and (index.packed or not pack):
            if check == "off" or (check == "dirs" and _dirs_unchanged(root, index)):
                return index
    try:
        lock = _build_lock(home)
        lock.__enter__()
    except OSError as e:
        raise DataError(
            f"cannot write the index into {home} ({e.strerror or e}); set index_root=<a writable folder>"
        ) from None
    try:
        old = None if rebuild else _load_current(root, home)
        if old is not None and not (old.packed or not pack):
            old = None  # packing switched on: read everything again
        t0 = time.time()
        dirs, dir_mtimes, records = walk(root)
        if old is not None and _matches(old, dirs, records):
            # e.g. a temp file came and went: refresh cheaply; an index from before digests gains one
            if old.meta["dir_mtimes"] != dir_mtimes or "digest" not in old.meta:
                old.meta["dir_mtimes"] = dir_mtimes
                old.meta["digest"] = old.digest
                atomic_write_text(json.dumps(old.meta), old.gen / "meta.json")
            return old
        live = current_generation(home)
        number = int(live.name[1:]) + 1 if live is not None and live.name[1:].isdigit() else 1
        index = _build(root, home, f"g{number:06d}", old, dirs, dir_mtimes, records, pack, nj, progress)
        _logger.info("indexed %s: %d utterances in %.1fs (%s)", root, len(index), time.time() - t0, index.gen)
        return index
    finally:
        lock.__exit__(None, None, None)


def _build(
    root: Path,
    home: Path,
    gen_name: str,
    old: CorpusIndex | None,
    dirs: list[str],
    dir_mtimes: list[int],
    records: list[Record],
    pack: bool,
    nj: int,
    progress: bool,
) -> CorpusIndex:
    """Write a new generation: rows of ``old`` whose files are unchanged are reused, the rest read."""
    n = len(records)
    symbols: list[str] = list(old.symbols) if old is not None else []
    shards: list[list] = [list(s) for s in old.meta["shards"]] if old is not None else []
    bad: dict[str, str] = {}

    # reuse: (dir path, id) -> old row with identical stats
    reuse = np.full(n, -1, dtype=np.int64)
    if old is not None:
        old_rows = {}
        for i in range(len(old)):
            old_rows[(old.meta["dirs"][old.dir[i]], old.name(i))] = i
        for k, r in enumerate(records):
            i = old_rows.get((dirs[r.dir], r.name))
            if i is not None and tuple(old.qnt_stat[i]) == r.qnt_stat and tuple(old.phn_stat[i]) == r.phn_stat:
                reuse[k] = i
                msg = old.meta["bad"].get(str(Path(dirs[r.dir], r.name)))
                if msg:
                    bad[str(Path(dirs[r.dir], r.name))] = msg

    todo = np.flatnonzero(reuse < 0)
    status = np.zeros(n, np.int8)
    n_frames = np.zeros(n, np.int32)
    shard = np.full(n, -1, np.int32)
    code_off = np.full(n, -1, np.int64)
    max_code = np.full(n, -1, np.int16)
    phone_lists: dict[int, np.ndarray] = {}
    if old is not None:
        keep = np.flatnonzero(reuse >= 0)
        src = reuse[keep]
        status[keep] = old.status[src]
        n_frames[keep] = old.n_frames[src]
        shard[keep] = old.shard[src]
        code_off[keep] = old.code_off[src]
        max_code[keep] = old.max_code[src]

    if len(todo):
        (home / "shards").mkdir(parents=True, exist_ok=True)
        tasks = []
        for b, start in enumerate(range(0, len(todo), _BLOCK_FILES)):
            rows = todo[start : start + _BLOCK_FILES]
            items = []
            for k in rows:
                r = records[k]
                base = f"{dirs[r.dir]}/{r.name}" if dirs[r.dir] else r.name
                items.append((base + QNT_SUFFIX, base + PHN_SUFFIX if r.phn_stat != (0, 0) else ""))
            shard_name = f"codes-{gen_name}-{b:03d}.bin"
            tasks.append((rows, shard_name, (str(root), items, str(home / "shards" / shard_name) if pack else None)))
        results = _run_tasks([t[2] for t in tasks], nj if len(todo) >= _PARALLEL_MIN else 0, progress, len(todo))
        sym_id = {s: i for i, s in enumerate(symbols)}
        for (rows, shard_name, _), result in zip(tasks, results):
            s = -1
            if pack:
                frames = sum(res[1] for res in result if res[0] == OK)
                s = len(shards)
                shards.append([shard_name, int(frames)])
            for k, (st, nf, off, phones, msg, top) in zip(rows, result):
                status[k] = st
                if st == OK:
                    n_frames[k] = nf
                    max_code[k] = top
                    shard[k], code_off[k] = (s, off) if pack else (-1, -1)
                    ids = []
                    for p in phones:
                        if p not in sym_id:
                            sym_id[p] = len(symbols)
                            symbols.append(p)
                        ids.append(sym_id[p])
                    phone_lists[k] = np.asarray(ids, dtype=np.uint16)
                elif msg:
                    r = records[k]
                    bad[str(Path(dirs[r.dir], r.name))] = msg
        if len(symbols) > 65535:
            raise DataError(f"{root}: more than 65535 distinct phone symbols; are the .phn.txt files phones?")
    for path, msg in sorted(bad.items())[:20]:
        _logger.warning("skipped %s", msg)
    if len(bad) > 20:
        _logger.warning("... and %d more unreadable utterances (listed in the index's meta.json)", len(bad) - 20)

    # phones: reused rows copy their slices from the old flat array
    n_phones = np.zeros(n, np.int64)
    for k, ids in phone_lists.items():
        n_phones[k] = len(ids)
    if old is not None:
        keep = np.flatnonzero(reuse >= 0)
        src = reuse[keep]
        n_phones[keep] = old.phone_off[src + 1] - old.phone_off[src]
    phone_off = np.zeros(n + 1, np.int64)
    np.cumsum(n_phones, out=phone_off[1:])
    phones = np.empty(int(phone_off[-1]), np.uint16)
    if old is not None:
        keep = np.flatnonzero(reuse >= 0)
        for k, i in zip(keep.tolist(), reuse[keep].tolist()):
            phones[phone_off[k] : phone_off[k + 1]] = old.phones[old.phone_off[i] : old.phone_off[i + 1]]
    for k, ids in phone_lists.items():
        phones[phone_off[k] : phone_off[k + 1]] = ids

    names, name_off = _names(records)
    arrays = {
        "dir": np.fromiter((r.dir for r in records), np.int32, n),
        "name_off": name_off,
        "names": names,
        "key": np.fromiter((zlib.crc32(f"{dirs[r.dir]}/{r.name}".encode()) for r in records), np.uint32, n),
        "status": status,
        "qnt_stat": np.array([r.qnt_stat for r in records], dtype=np.int64).reshape(n, 2),
        "phn_stat": np.array([r.phn_stat for r in records], dtype=np.int64).reshape(n, 2),
        "n_frames": n_frames,
        "phone_off": phone_off,
        "phones": phones,
        "shard": shard,
        "code_off": code_off,
        "max_code": max_code,
    }
    # drop shards no row points at any more; keep the shard numbering stable by renumbering
    used = sorted(set(shard[shard >= 0].tolist()))
    renumber = np.full(len(shards) + 1, -1, np.int32)
    renumber[used] = np.arange(len(used), dtype=np.int32)
    arrays["shard"] = np.where(shard >= 0, renumber[shard], -1).astype(np.int32)
    live_shards = [shards[s] for s in used]

    meta = {
        "version": INDEX_VERSION,
        "root": str(root),
        "created": time.time(),
        "packed": pack,
        "symbols": symbols,
        "dirs": dirs,
        "dir_mtimes": dir_mtimes,
        "shards": live_shards,
        "bad": bad,
        "build_id": uuid.uuid4().hex,
        "digest": content_digest(dirs, symbols, arrays),
    }
    gen = home / gen_name
    tmp = home / (gen_name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, arr in arrays.items():
        np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr, dtype=_ARRAYS[name]))
    atomic_write_text(json.dumps(meta), tmp / "meta.json")
    previous = current_generation(home)
    shutil.rmtree(gen, ignore_errors=True)
    os.replace(tmp, gen)
    atomic_write_text(gen_name + "\n", home / "CURRENT")
    _collect_garbage(home, keep={gen_name, previous.name if previous is not None else ""})
    return CorpusIndex(root, gen)


def _collect_garbage(home: Path, keep: set[str]) -> None:
    """Remove generations other than ``keep`` (the new one and the one before, which a running job
    may still map) and shards none of them uses, plus leftovers of interrupted builds."""
    used: set[str] = set()
    for name in keep:
        if name and (home / name / "meta.json").exists():
            try:
                used |= {s[0] for s in json.loads((home / name / "meta.json").read_text())["shards"]}
            except (OSError, ValueError, KeyError, TypeError):  # a damaged generation (already reported): nothing to keep
                pass
    for p in home.iterdir():
        if p.is_dir() and p.name.startswith("g") and p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)
    for p in home.glob(PROBE_PREFIX + "*"):  # left by starts that crashed before removing them
        with contextlib.suppress(OSError):
            if time.time() - p.stat().st_mtime > _PROBE_MAX_AGE_S:
                p.unlink()
    shard_dir = home / "shards"
    if shard_dir.is_dir():
        for p in shard_dir.iterdir():
            if p.name not in used:
                p.unlink(missing_ok=True)


def _run_tasks(tasks: Sequence[tuple], nj: int, progress: bool, n_files: int) -> list[list[tuple]]:
    """Run :func:`_pack_block` over ``tasks``, in ``nj`` spawned processes when ``nj > 1``."""
    from tqdm import tqdm

    bar = tqdm(total=n_files, desc="indexing utterances", unit="utt", disable=not progress or n_files < 500)
    results: list[list[tuple]] = []
    try:
        if nj > 1 and len(tasks) > 1:
            import multiprocessing as mp

            # spawn: the caller may run gloo/DeepSpeed threads, which a fork could catch holding a lock
            pool = mp.get_context("spawn").Pool(min(nj, len(tasks)))
            try:
                for res in pool.imap(_pack_block, tasks):
                    results.append(res)
                    bar.update(len(res))
                pool.close()  # let the workers exit on their own (terminating them aborts torch's threads)
            except BaseException:
                pool.terminate()
                raise
            finally:
                pool.join()
        else:
            for task in tasks:
                res = _pack_block(task)
                results.append(res)
                bar.update(len(res))
    finally:
        bar.close()
    return results


# ----------------------------------------------------------------------------------------------
# many ranks, many nodes: one build per filesystem, one agreed corpus

PROBE_PREFIX = "probe-"  # rank 0's marks: a rank that sees one shares rank 0's filesystem there
_PROBE_MAX_AGE_S = 24 * 3600.0  # marks left by a crashed start are swept by a later build


def leave_probe(home: Path) -> str | None:
    """Write a uniquely named empty file into ``home``; returns its token (None when ``home`` is read-only)."""
    token = uuid.uuid4().hex
    try:
        home.mkdir(parents=True, exist_ok=True)
        (home / f"{PROBE_PREFIX}{token}").touch(exist_ok=False)
    except OSError:
        return None
    return token


def sees_probe(home: Path, token: str | None) -> bool:
    return token is not None and (home / f"{PROBE_PREFIX}{token}").exists()


def remove_probe(home: Path, token: str | None) -> None:
    if token is not None:
        with contextlib.suppress(OSError):
            (home / f"{PROBE_PREFIX}{token}").unlink()


def map_generation(root: str | Path, home: Path, gen_name: str, build_id: str, built_by: str) -> CorpusIndex:
    """Map generation ``gen_name`` of ``home`` without any check, verifying it is the build ``built_by`` made.

    For ranks that waited while another rank built the index on their filesystem.
    """
    gen = home / gen_name
    here = f"rank {_rank()} on host {_host()!r}"
    if not (gen / "meta.json").exists():
        raise DataError(
            f"{built_by} built the index of {root} as {gen}, but {here} does not find it there; is {home} a "
            "shared folder that this node sees late or not at all? Put the index on one shared filesystem, or give "
            "every node its own copy (index_root on a node-local disk)"
        )
    try:
        index = CorpusIndex(root, gen)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{here} cannot read the index {gen} that {built_by} built: {e}") from None
    if index.build_id != build_id:
        raise DataError(
            f"{here} finds another build of {gen} than the one {built_by} made (another job rebuilt the index "
            "in between?); restart when no other job is building it"
        )
    return index


def _rank() -> int:
    from .utils import distributed

    return distributed.global_rank()


def _host() -> str:
    from .utils import distributed

    return distributed.host_id()


def _identity(index: CorpusIndex) -> dict[str, Any]:
    """What a rank tells the others about an index it mapped (for the agreement check and its message)."""
    return {"root": os.path.abspath(index.root), "gen": os.path.abspath(index.gen), "build": index.build_id,
            "digest": index.digest, "n": len(index), "rank": _rank(), "host": _host()}


def _failure(e: BaseException) -> dict[str, str]:
    """An exception as published to the other ranks: data problems stay DataErrors there."""
    if isinstance(e, DataError):
        return {"error": str(e), "kind": "data"}
    return {"error": f"rank {_rank()} on host {_host()!r} failed: {type(e).__name__}: {e}", "kind": "crash"}


def _raise_published(value: dict[str, Any]) -> None:
    if "error" in value:
        raise (DataError if value.get("kind") == "data" else RuntimeError)(value["error"])


def _ranks_text(ranks: list[int]) -> str:
    shown = ", ".join(map(str, ranks[:8])) + (f" and {len(ranks) - 8} more" if len(ranks) > 8 else "")
    return f"rank {shown}" if len(ranks) == 1 else f"ranks {shown}"


def agree(identities: list[list[dict[str, Any]] | dict[str, Any]]) -> str | None:
    """``None`` when every rank mapped the same content for every folder, else what differs (or failed).

    ``identities[r]`` is rank ``r``'s list of :func:`_identity` per folder, or its published failure.
    Ranks that map one generation on one host are named together, so the message stays short on a
    large job.
    """
    failed = list(dict.fromkeys(x["error"] for x in identities if isinstance(x, dict)))  # distinct, in rank order
    if failed:
        more = f"\n... and {len(failed) - 4} more ranks failed" if len(failed) > 4 else ""
        return "\n".join(failed[:4]) + more
    ref = identities[0]
    lines = []
    for k, first in enumerate(ref):
        groups: dict[tuple, list[int]] = {}
        for rank, mine in enumerate(identities[1:], start=1):
            x = mine[k]
            if x["build"] != first["build"] and x["digest"] != first["digest"]:
                groups.setdefault((x["host"], x["gen"], x["n"], x["digest"]), []).append(rank)
        for (host, gen, n, digest), ranks in groups.items():
            lines.append(
                f"folder {first['root']}: rank 0 on host {first['host']!r} maps {first['gen']} ({first['n']} utterances, "
                f"content {first['digest'][:12]}), but {_ranks_text(ranks)} on host {host!r} "
                f"map{'s' if len(ranks) == 1 else ''} {gen} ({n} utterances, content {digest[:12]})"
            )
    if not lines:
        return None
    more = f"\n  ... and {len(lines) - 8} more" if len(lines) > 8 else ""
    return (
        "the ranks do not train on the same corpus:\n  " + "\n  ".join(lines[:8]) + more + "\n"
        "Node-local copies of a corpus must be identical (copy one tree to every node, e.g. rsync -a from one "
        "source), or put the corpus (or index_root) on a filesystem every node shares."
    )


def open_indexes(
    data_dirs: Sequence[str | Path],
    index_root: str = "",
    check: str = "files",
    pack: bool = True,
    rebuild: bool = False,
    nj: int = 0,
    progress: bool = True,
) -> list[CorpusIndex]:
    """:func:`open_index` for every folder, on every rank of a launched job; one build per filesystem.

    Without a process group this is :func:`open_index` per folder. Under a launcher:

    1. Rank 0 leaves a probe file in each index folder and publishes the names in the rendezvous
       store. Every rank looks for them: a rank that sees a probe shares rank 0's filesystem there.
    2. Rank 0 checks (``check``) and builds as needed. In parallel, on every host with folders it
       does not share, one elected rank does the same with that host's copy. (A folder rank 0 could
       not write a probe into is compared by generation and build id once rank 0 is done.)
    3. Every other rank maps, without checks, the generation built for its filesystem.
    4. Every rank publishes what it mapped (content digest, generation, utterances, host); rank 0
       compares and publishes the verdict. Differing copies, or any rank's failure, stop every rank
       with one :class:`DataError` naming both sides.

    All waits are on the store with a two-day timeout, never in a collective: a long build cannot
    hit the process group's timeout, and a failed rank publishes its error instead of vanishing.
    """
    from .utils import distributed

    def build(folders: Sequence[int]) -> dict[int, CorpusIndex]:
        return {k: open_index(data_dirs[k], index_root, check, pack, rebuild, nj, progress) for k in folders}

    if not distributed.active():
        return list(build(range(len(data_dirs))).values())
    scope = distributed.store_scope("corpus")
    homes = [index_home(d, index_root) for d in data_dirs]
    if distributed.global_rank() == 0:
        return _open_on_rank0(scope, data_dirs, homes, build)
    rank_key = f"{scope}/rank/{distributed.global_rank()}"
    try:
        indexes = _open_elsewhere(scope, data_dirs, homes, build)
        mine = [_identity(x) for x in indexes]
    except BaseException as e:
        distributed.store_set(rank_key, _failure(e))
        raise  # at once: waiting for the verdict could mean waiting for rank 0's whole build
    distributed.store_set(rank_key, mine)
    _raise_published(distributed.store_get(f"{scope}/verdict"))
    return indexes


def _open_on_rank0(scope: str, data_dirs: Sequence[str | Path], homes: list[Path], build: Any) -> list[CorpusIndex]:
    """Rank 0's part of :func:`open_indexes`: probes, its build, then the verdict over every rank's identities."""
    from .utils import distributed

    tokens: list[str | None] = []
    try:
        try:
            tokens = [leave_probe(h) for h in homes]
        finally:  # the others wait for this key first: publish it whatever happens
            tokens += [None] * (len(homes) - len(tokens))
            distributed.store_set(f"{scope}/probes", {"dirs": [str(d) for d in data_dirs], "tokens": tokens,
                                                      "host": distributed.host_id()})
        try:
            indexes = list(build(range(len(homes))).values())
        except BaseException as e:
            distributed.store_set(f"{scope}/leader", _failure(e))
            raise
        distributed.store_set(f"{scope}/leader", [[x.gen.name, x.build_id] for x in indexes])
        mine = [_identity(x) for x in indexes]
        others = distributed.store_get_many([f"{scope}/rank/{r}" for r in range(1, distributed.world_size())])
        verdict = agree([mine, *others])
    except BaseException as e:  # nobody may be left waiting for the verdict
        distributed.store_set(f"{scope}/verdict", _failure(e))
        raise
    finally:  # every rank has looked for them (or gave up)
        for home, token in zip(homes, tokens):
            remove_probe(home, token)
    distributed.store_set(f"{scope}/verdict", {} if verdict is None else {"error": verdict, "kind": "data"})
    if verdict is not None:
        raise DataError(verdict)
    return indexes


def _open_elsewhere(scope: str, data_dirs: Sequence[str | Path], homes: list[Path], build: Any) -> list[CorpusIndex]:
    """Steps 1-3 of :func:`open_indexes` on a rank other than 0: what to map, and who builds it on this host."""
    from .utils import distributed

    probes = distributed.store_get(f"{scope}/probes")
    mine = [str(d) for d in data_dirs]
    if probes["dirs"] != mine:
        raise DataError(
            f"rank 0 on host {probes.get('host', '?')!r} opens the data folders {probes['dirs']}, but rank "
            f"{distributed.global_rank()} on host {distributed.host_id()!r} finds {mine}: every node needs every "
            "folder of data_dirs and val_dirs (a folder missing on a node is skipped there: the nodes would train on different data)"
        )
    tokens = probes["tokens"]
    folders = range(len(homes))
    local = [k for k in folders if tokens[k] is not None and not sees_probe(homes[k], tokens[k])]
    unknown = [k for k in folders if tokens[k] is None]
    leader: list[list[str]] | None = None

    def wait_leader() -> list[list[str]]:
        value = distributed.store_get(f"{scope}/leader")
        if isinstance(value, dict):
            _raise_published(value)
        return value

    def differs(k: int, built_by_rank0: list[list[str]]) -> bool:
        """For a folder rank 0 left no probe in: whether this host sees another generation than rank 0 built."""
        gen = current_generation(homes[k])
        if gen is None or gen.name != built_by_rank0[k][0]:
            return True
        try:
            return CorpusIndex(data_dirs[k], gen).build_id != built_by_rank0[k][1]
        except (OSError, ValueError, KeyError):
            return True

    indexes: dict[int, CorpusIndex] = {}
    built: dict[str, list[str]] = {}
    if local or unknown:
        host = distributed.host_id()
        key = f"{scope}/host/{host}"
        if distributed.store_elect(key + "/builder"):
            try:
                if unknown:
                    leader = wait_leader()
                    local += [k for k in unknown if differs(k, leader)]
                if local:
                    names = ", ".join(str(data_dirs[k]) for k in sorted(local))
                    _logger.info("rank %d checks and builds the index of %s for host %r (rank 0's is not on this "
                                 "filesystem)", distributed.global_rank(), names, host)
                indexes = build(sorted(local))
            except BaseException as e:
                distributed.store_set(key, _failure(e))
                raise
            built = {str(k): [x.gen.name, x.build_id] for k, x in indexes.items()}
            distributed.store_set(key, built)
        else:
            value = distributed.store_get(key)
            _raise_published(value)
            built = value
    leader = leader or wait_leader()
    by = f"the elected builder of host {distributed.host_id()!r}"
    for k in folders:
        if k in indexes:
            continue
        if str(k) in built:
            indexes[k] = map_generation(data_dirs[k], homes[k], *built[str(k)], built_by=by)
        else:
            indexes[k] = map_generation(data_dirs[k], homes[k], *leader[k], built_by="rank 0")
    return [indexes[k] for k in folders]


# ----------------------------------------------------------------------------------------------
# CLI: build or refresh indexes ahead of training (e.g. on a login node, with many processes)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vall_e.corpus [folder ...] [yaml=...] [key=value ...]``: build/refresh, then summarize.

    Folders default to the config's ``data_dirs``; ``nj``, ``index_root``, ``index_check``,
    ``index_rebuild`` and ``pack_codes`` apply as in training.
    """
    import argparse
    import sys

    from .config import Config
    from .utils.helpers import setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    words, rest = Config.split_argv(argv)
    cfg = Config.from_cli(words)
    parser = argparse.ArgumentParser(
        prog="python -m vall_e.corpus",
        description="Build or refresh the training index (and packed codes) of corpus folders.",
        epilog="Config words: yaml=<training config> (its data_dirs), nj=N processes, index_rebuild=true, "
        "index_root=..., pack_codes=false; help=true lists every field.",
    )
    parser.add_argument("folders", nargs="*", help="corpus folders (default: data_dirs of the config)")
    args = parser.parse_args(rest)
    folders = args.folders or list(cfg.data_dirs)
    if not folders:
        print("error: name a corpus folder, or a yaml= whose data_dirs lists them", file=sys.stderr)
        return 2
    setup_logging()
    status = 0
    for folder in folders:
        try:
            index = open_index(folder, cfg.index_root, cfg.index_check, cfg.pack_codes, cfg.index_rebuild, cfg.nj)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            status = 2
            continue
        counts = np.bincount(np.asarray(index.status), minlength=4)
        hours = float(np.asarray(index.n_frames, dtype=np.int64).sum()) / 75 / 3600
        print(
            f"{folder}: {len(index)} utterances, {hours:.1f} h, {len(index.symbols)} phone symbols; "
            f"{counts[NO_PHONES]} without phones, {counts[BAD_CODES] + counts[BAD_PHONES]} unreadable; "
            f"index {index.gen} ({'packed' if index.packed else 'not packed'})"
        )
    return status


if __name__ == "__main__":
    from .utils.errors import entry_point

    raise SystemExit(entry_point(main)())
