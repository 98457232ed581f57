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
few are named); the output is written atomically, so a rerun starts clean.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from pathlib import Path
from typing import Any, Iterator, TextIO

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


def _open(path: Path) -> TextIO:
    return gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path, encoding="utf-8")


def convert(
    cuts: Path, out: Path, audio_root: Path, text: str = "cased", min_seconds: float = 0.0,
    max_seconds: float = float("inf"),
) -> dict[str, Any]:
    """Convert a cuts file into a segment manifest at ``out`` (atomically); returns the counts."""
    sys.path.insert(0, str(REPO))
    from tqdm import tqdm

    from vall_e.utils.helpers import atomic_path

    stats: dict[str, Any] = {"written": 0, "too_short": 0, "too_long": 0, "bad": 0, "bad_examples": []}

    def rows() -> Iterator[str]:
        with _open(cuts) as f:
            for n, line in enumerate(tqdm(f, desc="cuts", unit="cut", disable=not sys.stderr.isatty()), 1):
                if not line.strip():
                    continue
                try:
                    row = convert_cut(json.loads(line), audio_root, text)
                except ValueError as e:  # json.JSONDecodeError is a ValueError too
                    stats["bad"] += 1
                    if len(stats["bad_examples"]) < 5:
                        stats["bad_examples"].append(f"{cuts}:{n}: {e}")
                    continue
                seconds = row["end"] - row["start"]
                if seconds < min_seconds:
                    stats["too_short"] += 1
                elif seconds > max_seconds:
                    stats["too_long"] += 1
                else:
                    stats["written"] += 1
                    yield json.dumps(row, ensure_ascii=False) + "\n"

    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(rows())
    return stats


def main(argv: list[str] | None = None) -> int:
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
    args = parser.parse_args(argv)
    if not args.cuts.is_file():
        print(f"error: {args.cuts} does not exist; download Libriheavy's manifests first "
              "(see https://github.com/k2-fsa/libriheavy)", file=sys.stderr)
        return 2
    if not args.out.name.endswith(".jsonl"):
        print(f"error: {args.out}: name the output *.jsonl (qnt recognizes manifests by that suffix)", file=sys.stderr)
        return 2
    try:
        stats = convert(args.cuts, args.out, args.audio_root, args.text, args.min_seconds, args.max_seconds)
    except (OSError, EOFError) as e:  # a truncated .gz, a full disk
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(stats, indent=1))
    if stats["written"] == 0:
        print(f"error: no usable cuts in {args.cuts}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
