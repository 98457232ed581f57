#!/usr/bin/env python3
"""Download and unpack a LibriSpeech subset, then write its evaluation list (4-10 s by default).

    python scripts/prepare_librispeech.py [--subset test-clean] [--root data/LibriSpeech]
        [--downloads data/downloads] [--mirror https://www.openslr.org/resources/12]
        [--list lists/test-clean-4-10s.tsv] [--min-seconds 4 --max-seconds 10]

Download (resumable, size-checked; ``--md5 HEX`` or a ``<subset>.tar.gz.md5`` beside it is checked)
and unpack (through a ``.partial`` folder, CRC-checked) are the LibriTTS preparation's own
(``scripts/prepare_libritts.py``). The list is :func:`vall_e.evaluate.build_list` +
:func:`vall_e.evaluate.write_list`, the same as ``python -m vall_e.evaluate <folder> --make-list``.
``--mirror`` may be a local folder or ``file://`` URL holding ``<subset>.tar.gz``. Then:

    python -m vall_e.evaluate lists/test-clean-4-10s.tsv --out eval/mine --ar-ckpt zoo/ar.pt --nar-ckpt zoo/nar.pt
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
MIRROR = "https://www.openslr.org/resources/12"
SUBSETS = ("dev-clean", "dev-other", "test-clean", "test-other")


def _libritts() -> ModuleType:
    spec = importlib.util.spec_from_file_location("prepare_libritts", REPO / "scripts" / "prepare_libritts.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    """Command line, under the project's error policy (a file problem a user can fix: one line, exit 2)."""
    sys.path.insert(0, str(REPO))
    from vall_e.utils.errors import entry_point

    return entry_point(_main)(argv)


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subset", default="test-clean", choices=SUBSETS)
    parser.add_argument("--root", type=Path, default=Path("data/LibriSpeech"))
    parser.add_argument("--downloads", type=Path, default=Path("data/downloads"))
    parser.add_argument("--mirror", default=MIRROR, help="base URL, file:// URL or folder holding <subset>.tar.gz")
    parser.add_argument("--md5", default=None, metavar="HEX")
    parser.add_argument("--list", type=Path, default=None, help="default: lists/<subset>-<min>-<max>s.tsv")
    parser.add_argument("--min-seconds", type=float, default=4.0)
    parser.add_argument("--max-seconds", type=float, default=10.0)
    parser.add_argument("--no-progress", action="store_true")
    return parser


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    prep = _libritts()
    from vall_e.evaluate import EvalError, build_list, write_list
    from vall_e.utils.outputs import writable_file, writable_folder

    out = args.list or Path("lists") / f"{args.subset}-{args.min_seconds:g}-{args.max_seconds:g}s.tsv"
    folder = args.root / args.subset
    if not folder.is_dir():  # before a download of hundreds of megabytes
        writable_folder(args.root, "--root")
        writable_folder(args.downloads, "--downloads")
    writable_file(out, "--list")
    try:
        if not folder.is_dir():
            archive = args.downloads / f"{args.subset}.tar.gz"
            prep.download(f"{args.mirror.rstrip('/')}/{args.subset}.tar.gz", archive, progress=not args.no_progress)
            prep.check_md5(archive, args.md5)
            print(f"unpacking {archive} -> {folder}", flush=True)
            prep.unpack(archive, args.root, args.subset)
        utts = build_list(folder, args.min_seconds, args.max_seconds)
    except (prep.PrepError, EvalError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_list(utts, out)
    hours = sum(u.seconds for u in utts) / 3600
    print(f"{out}: {len(utts)} utterances of {len({u.speaker for u in utts})} speakers, {hours:.2f} h")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
