#!/usr/bin/env python3
"""Libriheavy (lhotse cut manifests of LibriLight) -> this project's segment manifest.

    python scripts/libriheavy_to_segments.py libriheavy_cuts_small.jsonl.gz data/libriheavy/small.jsonl \\
        --audio-root /data [--text cased|upper] [--min-seconds 1] [--max-seconds 30]
    python -m vall_e.emb.qnt data/libriheavy/small.jsonl data/libriheavy/small   # codes + transcripts
    python -m vall_e.emb.g2p data/libriheavy/small                               # phones

Input: Libriheavy's ``libriheavy_cuts_<subset>.jsonl.gz`` (read with plain gzip/json, no lhotse
needed): one MonoCut per line with ``start``/``duration`` in the recording, one supervision
(``speaker``, ``custom.texts = [cased text with punctuation, upper-case normalized text]``, or a
plain ``text``) and the recording's ``sources[0].source``. Libriheavy hard-codes audio paths as
``download/librilight/<subset>/<speaker>/<book>/<file>.flac``; ``--audio-root`` is the folder
those relative paths start from (default: the current folder), and the output holds absolute
paths.

Output: one JSON line per usable cut, ``{"id", "audio", "start", "end", "text", "speaker"}``
(DESIGN.md). The id is the cut id without its ``<subset>/<speaker>/`` prefix, with ``/`` and
``.`` replaced by ``_`` (so ``sea_fairies_0812_librivox_64kb_mp3_01_baum_sea_fairies_64kb_0``):
chapter file names repeat across one reader's books, so the book stays in the id. Segment times
are the supervision's, clipped to its cut. Malformed lines are skipped and counted (the first
few are named, with their line numbers). The output is written to a temporary file and renamed
only when at least one cut was usable: a failed run (no usable cut, a damaged input, a full disk)
leaves an existing output as it was, and replacing one is said in one line.

Exit status: 0 done; 2 nothing usable or a file problem (named, with what to do).
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from pathlib import Path
from typing import Any, BinaryIO, Iterator

REPO = Path(__file__).resolve().parents[1]
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


def segment_id(cut_id: str) -> str:
    """``small/100/book/file_0`` -> ``book_file_0``: unique per speaker, no dots or slashes."""
    parts = cut_id.split("/")
    if len(parts) >= 4:
        parts = parts[2:]
    return _UNSAFE.sub("_", "_".join(parts)).strip("_") or "cut"


def convert_cut(cut: dict[str, Any], audio_root: Path, text: str = "cased") -> dict[str, Any]:
    """One lhotse cut (a dict) -> one segment line; ``ValueError`` says what is missing.

    ``text``: ``cased`` (the book's text with casing and punctuation, ``custom.texts[0]``) or
    ``upper`` (``custom.texts[1]``); a supervision's plain ``text`` is used when ``custom.texts``
    is absent.
    """
    try:
        sups = cut["supervisions"]
        if len(sups) != 1:
            raise ValueError(f"expected one supervision, found {len(sups)}")
        sup = sups[0]
        texts = (sup.get("custom") or {}).get("texts")
        words = texts[0 if text == "cased" else 1] if texts else sup.get("text")
        if not words or not str(words).strip():
            raise ValueError("no text")
        source = cut["recording"]["sources"][0]["source"]
        cut_start, cut_duration = float(cut["start"]), float(cut["duration"])
        start = cut_start + max(0.0, float(sup.get("start", 0.0)))
        end = min(cut_start + cut_duration, start + float(sup.get("duration", cut_duration)))
        speaker = str(sup.get("speaker") or cut["id"].split("/")[1])
    except (KeyError, IndexError, TypeError, AttributeError) as e:
        raise ValueError(f"not a Libriheavy cut ({type(e).__name__}: {e})") from None
    if end <= start:
        raise ValueError(f"empty segment ({start}..{end} s)")
    audio = Path(source)
    if not audio.is_absolute():
        audio = (audio_root / audio).resolve()
    return {
        "id": segment_id(str(cut["id"])),
        "audio": str(audio),
        "start": round(start, 4),
        "end": round(end, 4),
        "text": " ".join(str(words).split()),
        "speaker": _UNSAFE.sub("_", speaker),
    }


class CutsError(ValueError):
    """The cuts file cannot be converted (damaged, or without one usable cut); the message says why.

    ``stats``: the counts so far, when the file was read to its end.
    """

    def __init__(self, message: str, stats: dict[str, Any] | None = None):
        super().__init__(message)
        self.stats = stats


def _open(path: Path) -> BinaryIO:
    """The cuts file as bytes (decoded per line, so one bad line is counted, not fatal)."""
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def convert(
    cuts: Path, out: Path, audio_root: Path, text: str = "cased", min_seconds: float = 0.0,
    max_seconds: float = float("inf"),
) -> dict[str, Any]:
    """Convert a cuts file into a segment manifest at ``out``; returns the counts.

    ``out`` is replaced (atomically) only when at least one cut is usable.

    Raises:
        CutsError: no usable cut (``stats`` attribute: the counts), or a damaged gzip file.
    """
    import zlib

    sys.path.insert(0, str(REPO))
    from tqdm import tqdm

    from vall_e.utils.helpers import atomic_path

    stats: dict[str, Any] = {"written": 0, "too_short": 0, "too_long": 0, "bad": 0, "bad_examples": []}

    def rows() -> Iterator[str]:
        with _open(cuts) as f:
            for n, raw in enumerate(tqdm(f, desc="cuts", unit="cut", disable=not sys.stderr.isatty()), 1):
                if not raw.strip():
                    continue
                try:
                    row = convert_cut(json.loads(raw.decode("utf-8")), audio_root, text)
                except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors too
                    stats["bad"] += 1
                    if len(stats["bad_examples"]) < 5:
                        why = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else str(e)
                        stats["bad_examples"].append(f"{cuts}:{n}: {why}")
                    continue
                seconds = row["end"] - row["start"]
                if seconds < min_seconds:
                    stats["too_short"] += 1
                elif seconds > max_seconds:
                    stats["too_long"] += 1
                else:
                    stats["written"] += 1
                    yield json.dumps(row, ensure_ascii=False) + "\n"

    try:
        with atomic_path(out) as tmp:
            try:
                with open(tmp, "w", encoding="utf-8") as f:
                    f.writelines(rows())
            except OSError as e:
                if e.filename is not None or isinstance(e, gzip.BadGzipFile):
                    raise
                raise OSError(e.errno, e.strerror, str(out)) from None  # a write error: name the output, not the temp
            if stats["written"] == 0:  # leaves the temporary file to be removed and `out` untouched
                raise CutsError(f"no usable cuts in {cuts}" + (
                    f" ({stats['bad']} malformed line(s), e.g. {stats['bad_examples'][0]})" if stats["bad"] else
                    f" ({stats['too_short']} under --min-seconds, {stats['too_long']} over --max-seconds)"
                    if stats["too_short"] + stats["too_long"] else "") + f"; {out} was not written", stats)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise CutsError(f"{cuts}: cannot read it as gzip ({e}); download the file again (a *.gz name needs "
                        "gzip content; rename an uncompressed file to *.jsonl)") from None
    return stats


def main(argv: list[str] | None = None) -> int:
    """Command line (exit status as in the module docstring), under the project's error policy."""
    sys.path.insert(0, str(REPO))
    from vall_e.utils.errors import entry_point

    return entry_point(_main)(argv)


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cuts", type=Path, help="libriheavy_cuts_<subset>.jsonl.gz (or .jsonl)")
    parser.add_argument("out", type=Path, help="segment manifest to write (.jsonl)")
    parser.add_argument("--audio-root", type=Path, default=Path("."),
                        help="folder holding download/librilight/... (default: the current folder)")
    parser.add_argument("--text", choices=["cased", "upper"], default="cased",
                        help="cased: book text with punctuation (like LibriTTS's normalized text, default); "
                        "upper: upper-case normalized text")
    parser.add_argument("--min-seconds", type=float, default=0.0)
    parser.add_argument("--max-seconds", type=float, default=float("inf"))
    return parser


def _main(argv: list[str] | None) -> int:
    from vall_e.utils.outputs import describe_file, refuse_inputs, writable_file

    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.cuts.is_file():
        print(f"error: {args.cuts} does not exist; download Libriheavy's manifests first "
              "(see https://github.com/k2-fsa/libriheavy)", file=sys.stderr)
        return 2
    if not args.out.name.endswith(".jsonl"):
        print(f"error: {args.out}: name the output *.jsonl (qnt recognizes manifests by that suffix)", file=sys.stderr)
        return 2
    refuse_inputs(args.out, [("cuts file", args.cuts)], "output")
    writable_file(args.out, "output")  # before reading a multi-gigabyte input
    previous = describe_file(args.out) if args.out.is_file() else None
    try:
        stats = convert(args.cuts, args.out, args.audio_root, args.text, args.min_seconds, args.max_seconds)
    except CutsError as e:
        if e.stats is not None:
            print(json.dumps(e.stats, indent=1))
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(stats, indent=1))
    if previous is not None:
        print(f"note: replaced {args.out} ({previous}) with {stats['written']} segments", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
