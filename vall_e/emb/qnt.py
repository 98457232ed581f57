"""The batch job that turns a corpus into EnCodec codes: ``python -m vall_e.emb.qnt``.

The codec itself (weights, audio reading, encode, decode, reproducibility) is
:mod:`vall_e.emb.codec`; its names are re-exported here, so ``from vall_e.emb import qnt`` and
``qnt.encode(...)`` keep working. This module plans the work (folders, segment manifests), shards
it over ranks, feeds the encoder in batches and writes the files.

Library: :func:`quantize` / :func:`quantize_folder`, :func:`encode_items`, :func:`read_manifest`,
:func:`plan_folder`, :func:`shard`, :func:`encode_plan`, :func:`save_codes`.

CLI::

    python -m vall_e.emb.qnt <folder> [--suffix .wav] [key=value ...] [help=true]
    python -m vall_e.emb.qnt <segments.jsonl> <out_folder>
    torchrun --nproc_per_node 8 -m vall_e.emb.qnt <folder> device=cuda

A folder run writes ``<id>.qnt.pt`` = ``torch.save`` of an int16 tensor ``(1, 8, T)`` beside
every ``.wav``/``.flac`` file (suffixes matched ignoring case). Readers accept any integer dtype
(older files are int64). A manifest run writes ``<out>/<speaker>/<id>.qnt.pt`` and
``<id>.normalized.txt`` per line, reading only the segment's samples.

Sharding: under a launcher (RANK, WORLD_SIZE, LOCAL_RANK in the environment) each rank encodes
a deterministic, duration-balanced shard (device=cuda picks ``cuda:<LOCAL_RANK>``); the
per-rank summaries are merged on rank 0 through a gloo group when the launcher provides a
rendezvous (MASTER_ADDR/PORT), else each rank reports its shard.

Memory: no file or segment longer than ``--max-seconds`` (120 s) is loaded; longer recordings
need a segment manifest. On CUDA a forward pass takes as much padded audio as half the free GPU
memory allows (:func:`encode_plan`), and the loader pins its buffers so host-to-device copies
overlap. Codes are the codec's (:func:`vall_e.emb.codec.encode_batch`): float64 by default, the
same in any batch and on any number of ranks.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..utils.distributed import gather_to_rank0, init_gloo_for_summary
from ..utils.errors import entry_point
from ..utils.outputs import refuse_inputs, writable_file, writable_folder
from ..utils.helpers import (
    atomic_write_bytes,
    balanced_shards,
    dist_env,
    find_files_nocase,
    setup_logging,
    sibling,
    utterance_id,
)
from ..utils.paths import inside, name_problem
from .codec import (  # the codec's names, re-exported: callers and tests import them from here too
    BANDWIDTH,
    CHUNK_CONTEXT_FRAMES,
    CHUNK_SECONDS,
    CODEBOOK_SIZE,
    FRAME_RATE,
    HOP_LENGTH,
    N_CODEBOOKS,
    PRETRAINED_CHECKPOINT,
    PRETRAINED_URL,
    SAMPLE_RATE,
    UNTRAINED_SEED,
    AudioError,
    CodecUnavailableError,
    _encoder_dtype,
    _weights_dtype,
    decode,
    decode_to_file,
    encode,
    encode_batch,
    encode_from_file,
    exact_encoder_math,
    load_audio,
    load_codec,
    num_frames,
    to_codec_input,
    write_wav,
)
from .g2p import TEXT_SUFFIX  # transcripts written beside manifest segments, read by g2p

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("vall_e.emb.qnt")  # not __name__: stable under python -m
_CONFIG_WORD = re.compile(r"^[A-Za-z_][\w.]*=")

QNT_SUFFIX = ".qnt.pt"

__all__ = [  # the batch job, then the codec's names it re-exports (vall_e.emb.codec is their home)
    "AUDIO_SUFFIXES", "MAX_WHOLE_SECONDS", "QNT_SUFFIX", "TEXT_SUFFIX", "EncodePlan", "Item", "Summary",
    "WriteError", "build_parser", "encode_items", "encode_plan", "find_audio", "is_manifest", "main", "plan_folder",
    "quantize", "quantize_folder", "read_manifest", "save_codes", "shard",
    "BANDWIDTH", "CHUNK_CONTEXT_FRAMES", "CHUNK_SECONDS", "CODEBOOK_SIZE", "FRAME_RATE", "HOP_LENGTH",
    "N_CODEBOOKS", "PRETRAINED_CHECKPOINT", "PRETRAINED_URL", "SAMPLE_RATE", "UNTRAINED_SEED", "AudioError",
    "CodecUnavailableError", "decode", "decode_to_file", "encode", "encode_batch", "encode_from_file",
    "exact_encoder_math", "load_audio", "load_codec", "num_frames", "to_codec_input", "write_wav",
]


# --------------------------------------------------------------------------------------------
# corpora: folders and segment manifests, sharded over ranks

AUDIO_SUFFIXES = (".wav", ".flac")
MAX_WHOLE_SECONDS = 120.0  # longer files are refused without a segment manifest (memory bound)


class WriteError(OSError):
    """Writing an output failed (disk full, read-only, permission ...); the message is plain words."""


@dataclass
class Item:
    """One utterance to encode: a whole audio file, or a segment of a recording (manifest)."""

    audio: Path
    out: Path  # <id>.qnt.pt
    seconds: float  # for balancing shards and batches (0 when unknown)
    start: float | None = None  # segment bounds in seconds (manifests)
    end: float | None = None
    text: str | None = None  # manifests: written to <id>.normalized.txt beside the codes
    origin: str = ""  # how errors name it: the file, or "manifest line N (id)"

    def name(self) -> str:
        return self.origin or str(self.audio)


@dataclass
class Summary:
    """Outcome of a run (merged over ranks on rank 0); ``failed`` pairs each input with the reason.

    ``stopped`` is set when a write error ended the run early (finished outputs are kept).
    """

    written: int = 0
    skipped: int = 0
    seconds_of_audio: float = 0.0
    failed: list[tuple[str, str]] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    found: int = 0
    ranks: int = 1
    wall_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed and not self.stopped

    def merge(self, other: "Summary") -> None:
        self.written += other.written
        self.skipped += other.skipped
        self.seconds_of_audio += other.seconds_of_audio
        self.failed += other.failed
        self.stopped += other.stopped
        self.wall_seconds = max(self.wall_seconds, other.wall_seconds)

    def report(self) -> str:
        over = f" over {self.ranks} ranks" if self.ranks > 1 else ""
        lines = [
            f"qnt: {self.written} written ({self.seconds_of_audio / 3600:.3f} h of audio){over}, "
            f"{self.skipped} already done, {len(self.failed)} failed"
        ]
        lines += [f"  FAILED {path}: {reason}" for path, reason in self.failed]
        for reason in self.stopped:
            lines.append(f"  STOPPED EARLY: {reason}")
        if self.stopped:
            lines.append(
                "  Finished files are intact and no partial file was left. Fix the problem (free space, "
                "permissions) and rerun the same command: done files are skipped."
            )
        return "\n".join(lines)


def _plain_os_error(e: OSError, path: Path) -> str:
    """``no space left on device while writing X`` rather than a traceback."""
    import errno as errno_mod

    words = os.strerror(e.errno).lower() if e.errno else str(e)
    if e.errno in (errno_mod.ENOSPC, errno_mod.EDQUOT):
        words = "no space left on device" + (" (disk quota)" if e.errno == errno_mod.EDQUOT else "")
    return f"{words} while writing {path}"


def save_codes(codes: "torch.Tensor", path: str | Path) -> None:
    """Write codes ``(1, 8, T)`` as int16 (0..1023 fits; a quarter of int64's size), atomically.

    Serialized in memory first: ``torch.save`` to a path embeds the (temporary) file name in the
    archive, so equal codes would give different bytes, and a full disk surfaces as torch's
    "unexpected pos" instead of ENOSPC. Raises :class:`WriteError` in plain words.
    """
    import io

    import torch

    codes = torch.as_tensor(codes)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= CODEBOOK_SIZE):
        raise ValueError(f"codes out of range [0, {CODEBOOK_SIZE}) for {path}")
    buf = io.BytesIO()
    torch.save(codes.to(torch.int16).contiguous(), buf)
    try:
        atomic_write_bytes(buf.getvalue(), path)
    except OSError as e:
        raise WriteError(e.errno, _plain_os_error(e, Path(path))) from e


def _write_text(text: str, path: Path) -> None:
    try:
        atomic_write_bytes(text.encode("utf-8"), path)
    except OSError as e:
        raise WriteError(e.errno, _plain_os_error(e, path)) from e


def find_audio(folder: str | Path, suffixes: Sequence[str] = AUDIO_SUFFIXES) -> list[Path]:
    """Audio files under ``folder`` (recursive), suffixes matched ignoring case (``.WAV`` too); sorted."""
    return find_files_nocase(folder, tuple(suffixes))


def plan_folder(
    folder: str | Path, suffixes: Sequence[str] = AUDIO_SUFFIXES, max_seconds: float = MAX_WHOLE_SECONDS
) -> tuple[list[Item], list[tuple[str, str]], int]:
    """Every audio file under ``folder`` as an :class:`Item`; returns ``(items, failed, found)``.

    Inputs that map to one utterance id in one folder (``spk.take.1.wav`` and ``spk.take.2.wav``
    are both ``spk``; ``x.wav`` and ``x.flac``) are all failed with a message naming every one:
    nothing is written for that id. Unreadable files get ``seconds = 0`` and fail when loaded, on
    the rank that owns them. Files over ``max_seconds`` fail with what to do instead.
    """
    import soundfile as sf

    files = find_audio(folder, suffixes)
    groups: dict[tuple[Path, str], list[Path]] = {}
    for path in files:
        groups.setdefault((path.parent, utterance_id(path)), []).append(path)
    items: list[Item] = []
    failed: list[tuple[str, str]] = []
    for (parent, uid), paths in groups.items():
        if len(paths) > 1:
            names = " and ".join(p.name for p in paths)
            for path in paths:
                failed.append((str(path), (
                    f"id collision: {names} (in {parent}) all map to the id {uid!r} (the name before the "
                    f"first dot) and would write one {uid}{QNT_SUFFIX}; rename them so each id is unique"
                    + ("" if len({p.suffix.lower() for p in paths}) == 1 else
                       ", or pick one format with --suffix (e.g. --suffix .wav)")
                )))
            continue
        path = paths[0]
        seconds = 0.0
        try:
            info = sf.info(str(path))
            seconds = info.frames / info.samplerate
        except Exception:
            pass  # reported when loaded: the owning rank names the file and the reason
        if seconds > max_seconds:
            failed.append((str(path), (
                f"{seconds:.0f} s of audio is over the {max_seconds:.0f} s limit for loading a whole file "
                "(--max-seconds): cut it into utterances, or use a segment manifest "
                "(python -m vall_e.emb.qnt segments.jsonl out/)"
            )))
            continue
        items.append(Item(path, sibling(path, QNT_SUFFIX), seconds))
    return sorted(items, key=lambda it: str(it.out)), failed, len(files)


def read_manifest(
    manifest: str | Path, out_folder: str | Path, max_seconds: float = MAX_WHOLE_SECONDS
) -> tuple[list[Item], list[tuple[str, str]], int]:
    """Items of a segment manifest (JSON lines, see DESIGN.md); returns ``(items, failed, lines)``.

    Each line: ``{"id", "audio", "start", "end", "text", "speaker"}``; relative ``audio`` paths
    are taken from the manifest's folder. Outputs: ``<out>/<speaker>/<id>.qnt.pt`` and
    ``<id>.normalized.txt``. Bad lines are failed with their line number (a line that is not UTF-8,
    not JSON, lacks a field, or has a field of the wrong type: ``text`` and ``audio`` are strings,
    ``id`` and ``speaker`` strings or integers, ``start`` and ``end`` finite numbers); two lines
    with one ``<speaker>/<id>`` are both failed, naming both.

    Raises:
        ValueError: the file cannot be read as a whole (not gzip though named ``.gz``, truncated
            gzip); the message names the file.
    """
    import gzip
    import json
    import zlib

    manifest = Path(manifest)
    plan = _ManifestPlan(manifest, Path(out_folder), max_seconds)
    n = 0
    try:
        f = gzip.open(manifest, "rb") if manifest.name.lower().endswith(".gz") else open(manifest, "rb")
        with f:
            for n, raw in enumerate(f, 1):  # bytes: one undecodable line fails alone, with its number
                if not raw.strip():
                    continue
                where = f"{manifest}:{n}"
                try:
                    fields = _segment_fields(json.loads(raw.decode("utf-8")))
                except UnicodeDecodeError:
                    plan.failed.append((where, "not UTF-8 text; save the manifest as UTF-8"))
                    continue
                except _FieldError as e:
                    plan.failed.append((where, f"{e}; {_LINE_FORM}"))
                    continue
                except ValueError as e:  # json.JSONDecodeError
                    plan.failed.append((where, f"not JSON ({e}); {_LINE_FORM}"))
                    continue
                plan.add(n, where, *fields)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(f"{manifest}: cannot read it as gzip ({e}); a *.gz manifest must be gzip-compressed "
                         "and complete: download or compress it again") from None
    return list(plan.items.values()), plan.failed, n


_LINE_FORM = 'each line is {"id": str, "audio": path, "start": s, "end": s, "text": str, "speaker": str}'


class _FieldError(ValueError):
    """A manifest line with a missing field or a field of the wrong type."""


def _segment_fields(row: Any) -> tuple[str, str, str, float, float, str]:
    """``(id, speaker, audio, start, end, text)`` of one parsed manifest line, types checked.

    ``text`` and ``audio`` must be strings (``str(None)`` would open a file named ``None`` and
    write the transcript ``None``); ``id`` and ``speaker`` strings or integers (speaker ``100``);
    ``start`` and ``end`` finite numbers of seconds (numeric strings are accepted).
    """
    if not isinstance(row, dict):
        raise _FieldError(f"the line is {_json_type(row)}, not an object")
    missing = [k for k in ("id", "audio", "start", "end", "text", "speaker") if k not in row]
    if missing:
        raise _FieldError(f"missing field(s) {', '.join(missing)}")
    for key in ("id", "speaker"):
        if isinstance(row[key], bool) or not isinstance(row[key], (str, int)):
            raise _FieldError(f"{key} must be a string, got {_json_type(row[key])}")
    for key in ("audio", "text"):
        if not isinstance(row[key], str):
            raise _FieldError(f"{key} must be a string, got {_json_type(row[key])}")
    times = []
    for key in ("start", "end"):
        value = row[key]
        try:
            seconds = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else math.nan
        except ValueError:
            seconds = math.nan
        if not math.isfinite(seconds):
            raise _FieldError(f"{key} must be a finite number of seconds, got {value!r}")
        times.append(seconds)
    return str(row["id"]), str(row["speaker"]), row["audio"], times[0], times[1], row["text"]


def _json_type(value: Any) -> str:
    """JSON's name for the type of a parsed value (``null``, ``a number``, ``an array`` ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__)


@dataclass
class _ManifestPlan:
    """The items of a manifest being read, by output path (insertion order is manifest order)."""

    manifest: Path
    out_folder: Path
    max_seconds: float
    items: dict[Path, Item] = field(default_factory=dict)
    failed: list[tuple[str, str]] = field(default_factory=list)
    line_of: dict[Path, int] = field(default_factory=dict)  # output -> the first line that names it
    collided: set[Path] = field(default_factory=set)

    def add(self, n: int, where: str, uid: str, spk: str, audio: str, start: float, end: float, text: str) -> None:
        """Plan one type-checked line, or fail it (and the line it collides with)."""
        problem = _segment_problem(uid, spk, start, end, self.max_seconds)
        if problem:
            self.failed.append((where, problem))
            return
        out = inside(self.out_folder, self.out_folder / spk / f"{uid}{QNT_SUFFIX}")
        if out in self.line_of:  # both lines fail: which one is right is unknown
            reason = (f"id collision: lines {self.line_of[out]} and {n} of {self.manifest} both write {out}; "
                      "give each segment a unique id per speaker")
            self.failed.append((where, reason))
            if out not in self.collided:
                self.collided.add(out)
                self.failed.append((f"{self.manifest}:{self.line_of[out]}", reason))
                del self.items[out]
            return
        path = Path(audio).expanduser()
        if not path.is_absolute():
            path = self.manifest.parent / path
        self.line_of[out] = n
        self.items[out] = Item(path, out, end - start, start, end, text, f"{where} ({uid})")


def _segment_problem(uid: str, speaker: str, start: float, end: float, max_seconds: float) -> str | None:
    """What is wrong with a manifest line's names and times, or None."""
    for what, value in (("id", uid), ("speaker", speaker)):
        problem = name_problem(value)  # the project's one rule for names that become paths
        if problem:
            return f"{what} {value!r} cannot be a file name: it {problem}"
    if "." in uid:
        return f"id {uid!r} contains a dot: an utterance id is the name before the first dot; replace the dots"
    if not 0 <= start < end:
        return f"start={start} end={end}: need 0 <= start < end (seconds)"
    if end - start > max_seconds:
        return (f"segment of {end - start:.0f} s is over the {max_seconds:.0f} s limit (--max-seconds); "
                "cut it into shorter segments")
    return None


class _AudioSet:
    """Map-style dataset for a DataLoader: item i -> ``(i, mono 24 kHz float32 (n,) or None, error or None)``.

    Decoding and resampling run in DataLoader workers, so the encoder is not kept waiting on audio.
    """

    def __init__(self, items: list[Item]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, Any, str | None]:
        item = self.items[i]
        try:
            wav, sr = load_audio(item.audio, item.start, item.end)
            return i, to_codec_input(wav, sr), None
        except AudioError as e:  # a folder's item is named by its audio path already; a segment's is not
            return i, None, str(e).removeprefix(f"{item.audio}: ") if not item.origin else str(e)
        except Exception as e:  # e.g. a resampler error: report, never kill the run
            return i, None, f"cannot load audio ({type(e).__name__}: {e})"


def _worker_init(_: int) -> None:
    import torch

    torch.set_num_threads(1)  # workers decode and resample; the encoder owns the cores


def _identity(batch: list[Any]) -> list[Any]:
    return batch


def _batches(items: list[tuple[Any, float]], batch_seconds: float) -> list[list[tuple[Any, float]]]:
    """Group (key, seconds) by length, longest first; a batch's padded size stays within budget."""
    items = sorted(items, key=lambda x: -x[1])
    out: list[list[tuple[Any, float]]] = []
    for item in items:
        # the first (longest) file of a batch sets its padded length
        if out and (len(out[-1]) + 1) * out[-1][0][1] <= batch_seconds:
            out[-1].append(item)
        else:
            out.append([item])
    return out


def shard(items: list[Item], rank: int, world_size: int) -> list[Item]:
    """This rank's items: a deterministic split balanced by audio seconds (see
    :func:`~vall_e.utils.helpers.balanced_shards`). It is computed from the inputs alone, never
    from which outputs exist, so ranks that start at different times still agree."""
    if world_size == 1:
        return list(items)
    return [items[i] for i in balanced_shards([it.seconds for it in items], world_size)[rank]]


# Sizing CUDA batches. Peak activation memory of a forward pass is about rows x min(longest
# row, CHUNK_SECONDS) x these bytes (measured on CPU in float64: 45 MB per row-second; the rest is
# headroom for cuDNN workspaces and the codebook search's (frames, 1024) distances, about 2 MB
# per audio second), which padded seconds (rows x longest row) bound from above.
ACTIVATION_BYTES_PER_SECOND = {8: 60e6, 4: 30e6, 2: 30e6}  # by element size; bf16 keeps float32 weights
CUDA_MEMORY_FRACTION = 0.5  # of the memory free once the codec is loaded: the rest is allocator slack
CUDA_BATCH_SECONDS = (30.0, 1200.0)  # bounds; the top one caps the loader's pinned prefetch
CUDA_BATCH_SECONDS_UNKNOWN = 120.0  # when free memory cannot be read
CUDA_WORKERS = 4


@dataclass(frozen=True)
class EncodePlan:
    """How a corpus run feeds the encoder: padded audio per forward pass, loader workers, pinning."""

    batch_seconds: float  # 0: one file per pass
    workers: int  # DataLoader worker processes reading and resampling audio
    pin_memory: bool  # page-locked loader buffers, for asynchronous host-to-device copies


def encode_plan(
    device: str,
    dtype: Any = None,
    free_bytes: int | None = None,
    batch_seconds: float | None = None,
    workers: int | None = None,
) -> EncodePlan:
    """The :class:`EncodePlan` for ``device``; ``batch_seconds``/``workers`` given are kept.

    CPU: one file per pass (batching measured no faster), no workers (the encoder uses the
    cores), no pinning. CUDA: ``free_bytes`` (GPU memory free with the codec loaded) x
    :data:`CUDA_MEMORY_FRACTION` / :data:`ACTIVATION_BYTES_PER_SECOND` of the encoder's dtype,
    clamped to :data:`CUDA_BATCH_SECONDS` (about 1140 s of padded audio per pass on a 141 GB
    H200 in float64, 650 s on an 80 GB card, 190 s on 24 GB; 120 s when ``free_bytes`` is None),
    4 workers, pinned memory. A pass that still runs out of memory falls back to one file at a time.
    """
    import torch

    if not str(device).startswith("cuda"):
        return EncodePlan(0.0 if batch_seconds is None else batch_seconds, workers or 0, False)
    if batch_seconds is None:
        if free_bytes is None:
            batch_seconds = CUDA_BATCH_SECONDS_UNKNOWN
        else:
            weights, _ = _weights_dtype(device, dtype)
            per_second = ACTIVATION_BYTES_PER_SECOND[torch.empty((), dtype=weights).element_size()]
            lo, hi = CUDA_BATCH_SECONDS
            batch_seconds = float(min(hi, max(lo, free_bytes * CUDA_MEMORY_FRACTION / per_second)))
    return EncodePlan(batch_seconds, CUDA_WORKERS if workers is None else workers, True)


def _free_device_bytes(device: str) -> int | None:
    """Memory a CUDA ``device`` can still give this process, in bytes; None for other devices.

    The driver's free memory plus what torch's caching allocator holds unused (a process that
    encoded or trained before keeps its freed blocks reserved).
    """
    import torch

    if not str(device).startswith("cuda"):
        return None
    dev = torch.device(device)
    free, _total = torch.cuda.mem_get_info(dev)
    return int(free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev))


def encode_items(
    items: list[Item],
    device: str = "cpu",
    codec_weights: str = "pretrained",
    batch_seconds: float | None = None,
    dtype: Any = None,
    workers: int | None = None,
    progress: bool = True,
) -> Summary:
    """Encode ``items`` (skipping those whose outputs exist) and write their files; one rank's work.

    Unreadable audio is failed and the rest go on. A write error (disk full, read-only folder,
    permission) stops the run with :attr:`Summary.stopped` set; finished outputs stay intact.
    ``batch_seconds`` caps padded audio per forward pass and ``workers`` sets the DataLoader
    worker processes that read and resample audio; the defaults come from :func:`encode_plan`
    (CPU: one file per pass, no workers; CUDA: sized from free GPU memory, 4 workers, pinned memory).
    """
    import torch
    from tqdm import tqdm

    summary = Summary()
    todo: list[Item] = []
    for item in items:
        if item.out.exists() and (item.text is None or item.out.with_name(
                utterance_id(item.out) + TEXT_SUFFIX).exists()):
            summary.skipped += 1
        else:
            todo.append(item)
    if not todo:
        return summary
    # the encoder's copy of the codec: fails early (e.g. offline pretrained), before the bar, and
    # is on the GPU when its free memory is measured
    load_codec(codec_weights, device, dtype=_weights_dtype(device, dtype)[0])
    plan = encode_plan(device, dtype, _free_device_bytes(device), batch_seconds, workers)
    logger.info("qnt on %s: %s, up to %.0f s of padded audio per pass, %d loader workers%s", device,
                str(_encoder_dtype(device, dtype)).removeprefix("torch."), plan.batch_seconds, plan.workers,
                ", pinned memory" if plan.pin_memory else "")
    batches = [[i for i, _ in b] for b in _batches([(i, it.seconds) for i, it in enumerate(todo)], plan.batch_seconds)]
    loader = torch.utils.data.DataLoader(
        _AudioSet(todo), batch_sampler=batches, collate_fn=_identity, num_workers=plan.workers,
        worker_init_fn=_worker_init if plan.workers else None,
        # spawned, not forked: this process may run gloo threads, and a fork of those can hang
        multiprocessing_context="spawn" if plan.workers else None,
        pin_memory=plan.pin_memory,
    )
    bar = tqdm(total=len(todo), desc="qnt", unit="file", disable=not progress, dynamic_ncols=True)
    try:
        for batch in loader:
            ok = []
            for i, wav, error in batch:
                if error is not None:
                    summary.failed.append((todo[i].name(), error))
                else:
                    ok.append((i, wav))
            try:
                codes: list[Any] = encode_batch([w for _, w in ok], device, codec_weights, dtype)
            except RuntimeError:  # e.g. out of memory for the batch: fall back to one file at a time
                codes = []
                for i, wav in ok:
                    try:
                        codes.append(encode_batch([wav], device, codec_weights, dtype)[0])
                    except RuntimeError as e:
                        codes.append(None)
                        summary.failed.append((todo[i].name(), f"encoding failed: {str(e).splitlines()[0]}"))
            for (i, wav), c in zip(ok, codes):
                if c is None:
                    continue
                item = todo[i]
                if item.text is not None:  # text first: the codes file marks the utterance done
                    _write_text(item.text.strip() + "\n", item.out.with_name(utterance_id(item.out) + TEXT_SUFFIX))
                save_codes(c, item.out)
                summary.written += 1
                summary.seconds_of_audio += len(wav) / SAMPLE_RATE
            bar.update(len(batch))
            bar.set_postfix(audio_h=f"{summary.seconds_of_audio / 3600:.3f}")
    except WriteError as e:
        summary.stopped.append(e.strerror or str(e))
    finally:
        bar.close()
    return summary


def quantize(
    source: str | Path,
    out_folder: str | Path | None = None,
    suffix: str | Sequence[str] | None = None,
    device: str = "cpu",
    codec_weights: str = "pretrained",
    batch_seconds: float | None = None,
    progress: bool = True,
    max_seconds: float = MAX_WHOLE_SECONDS,
    dtype: Any = None,
    workers: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> Summary:
    """Encode a corpus folder (codes beside each audio file) or a segment manifest (into ``out_folder``).

    ``rank``/``world_size`` default to the launcher's environment (RANK, WORLD_SIZE): each rank
    encodes its own duration-balanced shard. The returned summary is this rank's; :func:`main`
    merges them on rank 0. Input-level problems (collisions, bad manifest lines, over-long
    files) are reported by rank 0 only, so each appears once.
    """
    start = time.time()
    env_rank, env_world, _ = dist_env()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist (give a corpus folder, one audio file, or a manifest)")
    if is_manifest(source):
        if out_folder is None:
            raise ValueError(f"{source} is a segment manifest: give the output folder too")
        items, failed, found = read_manifest(source, out_folder, max_seconds)
    else:
        suffixes = AUDIO_SUFFIXES if suffix is None else ((suffix,) if isinstance(suffix, str) else tuple(suffix))
        items, failed, found = plan_folder(source, suffixes, max_seconds)
    summary = encode_items(shard(items, rank, world_size), device, codec_weights, batch_seconds, dtype,
                           workers, progress=progress and rank == 0)
    if rank == 0:
        summary.failed = failed + summary.failed
    summary.found = found
    summary.wall_seconds = time.time() - start
    return summary


def quantize_folder(
    folder: str | Path,
    suffix: str | Sequence[str] | None = None,
    device: str = "cpu",
    codec_weights: str = "pretrained",
    batch_seconds: float | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> Summary:
    """Write ``<id>.qnt.pt`` (int16 ``(1, 8, T)``) beside every audio file under ``folder``.

    ``suffix`` defaults to ``.wav`` and ``.flac``, any case. Files already done are skipped;
    unreadable or empty files are recorded in the summary and skipped while the rest go on;
    outputs are written atomically. See :func:`quantize` for the other options.
    """
    return quantize(folder, None, suffix, device, codec_weights, batch_seconds, progress, **kwargs)


def is_manifest(path: str | Path) -> bool:
    """A segment manifest is a file named ``*.jsonl`` or ``*.jsonl.gz``."""
    path = Path(path)
    return path.is_file() and path.name.lower().endswith((".jsonl", ".jsonl.gz"))


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (config words such as ``device=cuda`` are split off before it)."""
    parser = argparse.ArgumentParser(
        prog="python -m vall_e.emb.qnt",
        description="Write <id>.qnt.pt (EnCodec 24 kHz codes, int16 (1, 8, T)) beside every audio file, "
        "or for every line of a segment manifest. Under torchrun each rank encodes its own shard.",
        epilog="Config overrides such as codec_weights=untrained device=cpu are accepted; "
        "help=true lists them. Example: torchrun --nproc_per_node 8 -m vall_e.emb.qnt data/LibriTTS device=cuda",
    )
    parser.add_argument("source", type=Path, help="corpus folder (searched recursively), or segments.jsonl[.gz]")
    parser.add_argument("out", type=Path, nargs="?", help="output folder (segment manifests only)")
    parser.add_argument("--suffix", action="append", default=None,
                        help="audio suffix, any case; repeatable (default: .wav and .flac)")
    parser.add_argument(
        "--batch-seconds", type=float, default=None,
        help="padded audio seconds per forward pass (default: one file per pass on CPU; on CUDA "
        "sized from free GPU memory, 30..1200)",
    )
    parser.add_argument("--max-seconds", type=float, default=MAX_WHOLE_SECONDS,
                        help=f"longest file or segment loaded whole (default {MAX_WHOLE_SECONDS:.0f}); "
                        "longer recordings need a segment manifest")
    parser.add_argument("--dtype", choices=["float64", "float32", "bfloat16"], default=None,
                        help="encoder precision (default float64 on every device: codes independent of batching "
                        "and device; float32/bfloat16 are faster on consumer GPUs but not reproducible)")
    parser.add_argument("--workers", type=int, default=None,
                        help="audio loading worker processes (default 0 on CPU, 4 on CUDA)")
    parser.add_argument("--summary-json", type=Path, default=None, help="also write the merged summary as JSON")
    return parser


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (1 when any input failed, 2 on a setup error or when a
    write error stopped the run). Under torchrun every rank runs this; rank 0 prints the merged summary."""
    import json

    import torch

    from ..config import Config

    argv = list(sys.argv[1:] if argv is None else argv)
    # every identifier=value word is config (a typo gets "did you mean"), the rest is argparse's
    words = [w for w in argv if _CONFIG_WORD.match(w)]
    rest = [w for w in argv if not _CONFIG_WORD.match(w)]
    cfg = Config.from_cli(words)
    parser = build_parser()
    args = parser.parse_args(rest)
    setup_logging()
    if not args.source.exists():
        print(f"error: {args.source} does not exist", file=sys.stderr)
        return 2
    manifest = is_manifest(args.source)
    if manifest and args.out is None:
        print(f"error: {args.source} is a segment manifest; give the output folder too: "
              f"python -m vall_e.emb.qnt {args.source} data/out", file=sys.stderr)
        return 2
    if not manifest and args.out is not None:
        print(f"error: an output folder is only for segment manifests (*.jsonl); codes of a folder "
              f"are written beside its audio files. Got {args.source} {args.out}", file=sys.stderr)
        return 2
    # outputs are checked before the codec loads: a read-only or misnamed target costs a second
    if manifest:
        refuse_inputs(args.out, [("manifest", args.source)], "output folder")
        writable_folder(args.out, "output folder")
    if args.summary_json is not None:
        refuse_inputs(args.summary_json, [("manifest" if manifest else "corpus", args.source)], "--summary-json")
        writable_file(args.summary_json, "--summary-json")
    try:
        rank, world, local_rank = dist_env()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = cfg.device
    if device == "cuda" and world > 1 and torch.cuda.is_available():  # one GPU per rank, on every node
        if local_rank >= torch.cuda.device_count():
            print(f"error: LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPU(s); "
                  "start at most one rank per GPU (--nproc_per_node)", file=sys.stderr)
            return 2
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    merged = init_gloo_for_summary(world)
    try:
        summary = quantize(args.source, args.out, args.suffix, device, cfg.codec_weights, args.batch_seconds,
                           max_seconds=args.max_seconds, dtype=args.dtype, workers=args.workers)
        setup_error = None
    except (CodecUnavailableError, ValueError, OSError) as e:
        summary, setup_error = Summary(), f"rank {rank}: {e}" if world > 1 else str(e)
    gathered = gather_to_rank0((summary, setup_error), world if merged else 1)
    if merged:
        import torch.distributed as dist

        dist.destroy_process_group()
    if gathered is None:  # other ranks: rank 0 reports for everyone
        return _status(summary) if setup_error is None else 2
    errors = [err for _, err in gathered if err]
    total = Summary(ranks=len(gathered), found=gathered[0][0].found)
    for s, _ in gathered:
        total.merge(s)
    if errors:
        for err in dict.fromkeys(errors):
            print(f"error: {err}", file=sys.stderr)
        return 2
    if total.found == 0:
        what = "lines in the manifest" if manifest else (
            f"audio files ({', '.join('*' + x for x in (args.suffix or AUDIO_SUFFIXES))}, any case)")
        print(f"error: no {what} under {args.source}. Check the path"
              + ("" if manifest else ", or pass --suffix for another format (e.g. --suffix .ogg)"), file=sys.stderr)
        return 2
    if world > 1 and not merged:
        print(f"(rank {rank} of {world}: this shard only; start ranks with torchrun to get one merged summary)")
    print(total.report() + f"\n({total.wall_seconds:.1f} s)")
    if args.summary_json is not None:
        atomic_write_bytes(json.dumps({
            "written": total.written, "skipped": total.skipped, "failed": total.failed,
            "stopped": total.stopped, "found": total.found, "ranks": total.ranks,
            "seconds_of_audio": total.seconds_of_audio, "wall_seconds": total.wall_seconds,
            "per_rank_written": [s.written for s, _ in gathered],
        }, indent=1).encode(), args.summary_json)
    return _status(total)


def _status(summary: Summary) -> int:
    """0: all done; 1: some inputs failed (the rest are written); 2: a write error stopped the run,
    which a rerun would repeat until the disk is fixed (``scripts/run.sh`` does not restart 2)."""
    return 2 if summary.stopped else (0 if summary.ok else 1)


if __name__ == "__main__":
    raise SystemExit(main())
