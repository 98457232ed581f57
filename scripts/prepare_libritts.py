#!/usr/bin/env python3
"""Download, check and unpack LibriTTS subsets, then tokenize them (qnt codes and g2p phones).

    python scripts/prepare_libritts.py --subsets dev-clean train-clean-100 [--root data/LibriTTS]
        [--downloads data/downloads] [--mirror https://www.openslr.org/resources/60]
        [--nproc 8] [--g2p-workers 4] [--skip-qnt] [--skip-g2p] [key=value ...]

Every step resumes where it stopped, so rerunning the same command after an interruption (or a
full disk) finishes the job:

1. **Download** ``<mirror>/<subset>.tar.gz`` into ``--downloads`` as ``<subset>.tar.gz.part``,
   continuing an interrupted file with an HTTP Range request. Complete when its size equals the
   server's Content-Length; then renamed to ``<subset>.tar.gz``. ``--md5 <subset>=<hex>`` (or a
   ``<subset>.tar.gz.md5`` file beside it) is checked when given.
2. **Unpack** into ``<root>/<subset>/<speaker>/<chapter>/`` (the archive's ``LibriTTS/`` prefix
   dropped) through ``<root>/.<subset>.partial``, renamed when complete: a half-unpacked subset
   is never mistaken for a finished one. Reading the gzip stream to its end checks its CRC, so a
   corrupt archive is found here; it is removed and the message says to rerun. Archive members
   that would land outside the folder (absolute paths, ``..``, links) are refused.
3. **Tokenize**: ``python -m vall_e.emb.qnt <root>/<subset>`` (under ``torchrun --nproc_per_node
   N`` with ``--nproc N``) and ``python -m vall_e.emb.g2p <root>/<subset> --workers M``.
   ``key=value`` words (``codec_weights=...``, ``device=cuda``) are passed to qnt.

``--mirror`` may be a local folder or ``file://`` URL holding the archives (offline machines,
tests). LibriTTS speakers are the grandparent folder: train with
``spkr_name_getter="lambda p: p.parts[-3]"``.

The recipes (``config/LibriTTS/*.yml``) train on ``data/LibriTTS/`` and take their zero-shot val
split from ``data/LibriTTS/dev-clean/`` (``val_dirs``: 40 speakers no training subset has; the
folder is kept out of training although it lies inside ``data_dirs``). ``dev-clean`` is the
default subset, so a plain run prepares it; with another ``--root`` the script prints the
``data_dirs=``/``val_dirs=`` words to train on it. The test subsets share speakers with the
evaluation's LibriSpeech test-clean: prepare them under another ``--root`` (the script warns).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO

REPO = Path(__file__).resolve().parents[1]
MIRROR = "https://www.openslr.org/resources/60"
SUBSETS = ("dev-clean", "dev-other", "test-clean", "test-other", "train-clean-100", "train-clean-360",
           "train-other-500")
CHUNK = 1 << 20


class PrepError(RuntimeError):
    """A step failed; the message says what happened and what to do."""


def _local_path(url: str) -> Path | None:
    if url.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(url).path))
    if "://" not in url:
        return Path(url)
    return None


def _open_at(url: str, offset: int) -> tuple[int, int, BinaryIO]:
    """``(total_size, start_offset, stream)``: the stream starts at ``offset`` when the source
    supports it (files; HTTP servers answering 206), else at 0."""
    local = _local_path(url)
    if local is not None:
        if not local.is_file():
            raise PrepError(f"{local} does not exist (check --mirror)")
        f = open(local, "rb")
        f.seek(offset)
        return local.stat().st_size, offset, f
    req = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    resp = urllib.request.urlopen(req, timeout=60)
    if offset and resp.status == 206:
        total = int(resp.headers.get("Content-Range", "*/0").rsplit("/", 1)[-1])
        return total, offset, resp
    return int(resp.headers.get("Content-Length") or 0), 0, resp


def download(url: str, dest: Path, progress: bool = True) -> Path:
    """Download ``url`` to ``dest``, resuming ``dest.part``; the size must match the source's."""
    from tqdm import tqdm

    if dest.is_file():
        return dest
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    try:
        total, start, stream = _open_at(url, have)
    except PrepError:
        raise
    except OSError as e:
        raise PrepError(f"cannot download {url} ({e}); check the network or pass --mirror with a local copy, "
                        "then rerun (downloads resume)") from None
    if total and have > total:  # not a prefix of this file: start again
        part.unlink()
        stream.close()
        return download(url, dest, progress)
    if have == total and total:
        stream.close()
    else:
        mode = "ab" if start == have and have else "wb"
        bar = tqdm(total=total or None, initial=start, unit="B", unit_scale=True, desc=dest.name,
                   disable=not progress)
        try:
            with stream, open(part, mode) as out:
                while chunk := stream.read(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
        except OSError as e:
            raise PrepError(f"download of {url} stopped ({os.strerror(e.errno).lower() if e.errno else e}); "
                            f"{part} keeps what arrived: rerun to resume") from None
        finally:
            bar.close()
    size = part.stat().st_size
    if total and size != total:
        raise PrepError(f"{part} has {size} bytes but the source has {total}: rerun to resume the download")
    os.replace(part, dest)
    return dest


def check_md5(path: Path, expected: str | None) -> None:
    """Compare with ``expected`` or a ``<file>.md5`` beside it; a mismatch removes the file."""
    md5_file = path.with_name(path.name + ".md5")
    if expected is None and md5_file.is_file():
        expected = md5_file.read_text().split()[0]
    if not expected:
        return
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    if h.hexdigest() != expected.lower():
        path.unlink()
        raise PrepError(f"{path}: md5 {h.hexdigest()} is not the expected {expected}; the file was removed, "
                        "rerun to download it again")


def _member_path(m: tarfile.TarInfo, subset: str) -> Path | None:
    """Where member ``m`` goes inside the subset folder (``LibriTTS/<subset>/`` or ``<subset>/``
    dropped), None when it is outside the subset; refuses members that could escape the folder."""
    parts = Path(m.name).parts
    if m.name.startswith("/") or ".." in parts or m.issym() or m.islnk() or m.isdev():
        raise PrepError(f"unsafe archive member {m.name!r}: refusing to unpack")
    if subset not in parts or not (m.isfile() or m.isdir()):
        return None
    rel = parts[parts.index(subset) + 1 :]
    return Path(*rel) if rel else None


def unpack(archive: Path, root: Path, subset: str) -> Path:
    """Unpack ``archive`` into ``root/subset`` (through a ``.partial`` folder) in one streaming
    pass; done once. Reading the gzip stream to its end checks its CRC."""
    import zlib

    target = root / subset
    if target.is_dir():
        return target
    partial = root / f".{subset}.partial"
    if partial.exists():
        shutil.rmtree(partial)  # an interrupted unpack: start that subset again
    partial.mkdir(parents=True)
    found = 0
    try:
        # gzip (not tarfile's own gz reader, which skips the check) verifies the CRC at the end
        with gzip.open(archive, "rb") as gz, tarfile.open(fileobj=gz, mode="r|") as tar:  # one pass
            for m in tar:
                rel = _member_path(m, subset)
                if rel is None:
                    continue
                dest = partial / rel
                if m.isdir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                assert src is not None
                with src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK)
                found += 1
            while gz.read(CHUNK):  # the tar ends before the gzip stream does: read on to its CRC
                pass
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        shutil.rmtree(partial, ignore_errors=True)
        if type(e) is OSError or (isinstance(e, OSError) and e.errno):  # the disk, not the archive
            raise PrepError(f"unpacking {archive} stopped: {os.strerror(e.errno).lower() if e.errno else e}; "
                            "fix it and rerun") from None
        archive.unlink(missing_ok=True)
        raise PrepError(f"{archive} is corrupt or truncated ({e}); it was removed: rerun to download it again") from None
    except PrepError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if not found:
        shutil.rmtree(partial, ignore_errors=True)
        raise PrepError(f"{archive} has no files under {subset}/: is it the right archive?")
    os.replace(partial, target)
    return target


def run_tokenizers(folder: Path, nproc: int, g2p_workers: int, overrides: list[str], skip_qnt: bool,
                   skip_g2p: bool) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    steps = []
    if not skip_g2p:
        steps.append([sys.executable, "-m", "vall_e.emb.g2p", str(folder), "--workers", str(g2p_workers)])
    if not skip_qnt:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        steps.append([*(launcher if nproc > 1 else [sys.executable]), "-m", "vall_e.emb.qnt", str(folder), *overrides])
    for cmd in steps:
        print("+ " + " ".join(cmd), flush=True)
        code = subprocess.call(cmd, env=env)
        if code != 0:
            raise PrepError(f"{' '.join(cmd[-3:])} exited with {code} (its summary is above); fix what it names "
                            "and rerun: finished files are skipped")


def main(argv: list[str] | None = None) -> int:
    """Command line, under the project's error policy (a file problem a user can fix: one line, exit 2)."""
    sys.path.insert(0, str(REPO))
    from vall_e.utils.errors import entry_point

    return entry_point(_main)(argv)


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (key=value words, for qnt, are split off before it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subsets", nargs="+", default=["dev-clean"], help=f"any of {', '.join(SUBSETS)}")
    parser.add_argument("--root", type=Path, default=Path("data/LibriTTS"))
    parser.add_argument("--downloads", type=Path, default=Path("data/downloads"))
    parser.add_argument("--mirror", default=MIRROR, help="base URL, file:// URL or folder holding <subset>.tar.gz")
    parser.add_argument("--md5", action="append", default=[], metavar="SUBSET=HEX")
    parser.add_argument("--nproc", type=int, default=1, help="qnt ranks (torchrun); one per GPU with device=cuda")
    parser.add_argument("--g2p-workers", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--skip-qnt", action="store_true")
    parser.add_argument("--skip-g2p", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def split_words(argv: list[str]) -> tuple[list[str], list[str]]:
    """(config words for the tokenizers, the rest for the parser). A config word is ``key=value`` with a
    Config field as key; any other word with ``=`` (such as the value of ``--md5 train-clean-100=<hex>``)
    is the parser's."""
    from vall_e.config import Config

    fields = set(Config.field_names())
    overrides = [w for w in argv if "=" in w and not w.startswith("-") and w.split("=", 1)[0] in fields]
    return overrides, [w for w in argv if w not in overrides]


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, rest = split_words(argv)
    parser = build_parser()
    args = parser.parse_args(rest)
    unknown = [s for s in args.subsets if s not in SUBSETS]
    if unknown:
        print(f"error: unknown subset(s) {', '.join(unknown)}; choose from {', '.join(SUBSETS)}", file=sys.stderr)
        return 2
    md5 = dict(item.split("=", 1) for item in args.md5 if "=" in item)
    from vall_e.utils.outputs import writable_folder

    writable_folder(args.root, "--root")  # before a download of gigabytes
    writable_folder(args.downloads, "--downloads")
    try:
        for subset in args.subsets:
            archive = args.downloads / f"{subset}.tar.gz"
            if not (args.root / subset).is_dir():
                download(f"{args.mirror.rstrip('/')}/{subset}.tar.gz", archive, progress=not args.no_progress)
                check_md5(archive, md5.get(subset))
                print(f"unpacking {archive} -> {args.root / subset}", flush=True)
                unpack(archive, args.root, subset)
            run_tokenizers(args.root / subset, args.nproc, args.g2p_workers, overrides, args.skip_qnt, args.skip_g2p)
    except PrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"done: {', '.join(args.subsets)} in {args.root}")
    for line in recipe_notes(args.root):
        print(line)
    return 0


RECIPE_ROOT = Path("data/LibriTTS")  # the recipes' data_dirs; their val_dirs is its dev-clean
VAL_SUBSET = "dev-clean"


def recipe_notes(root: Path) -> list[str]:
    """What a user of ``config/LibriTTS/*.yml`` needs to know about the subsets now in ``root``."""
    notes = []
    here = [s for s in SUBSETS if (root / s).is_dir()]
    if not (root / VAL_SUBSET).is_dir():
        notes.append(f"note: the LibriTTS recipes take their zero-shot val split from {root / VAL_SUBSET} (val_dirs), "
                     f"which is not prepared yet: add --subsets {VAL_SUBSET}")
    if os.path.normpath(root) != os.path.normpath(RECIPE_ROOT):
        notes.append(f"note: the LibriTTS recipes read {RECIPE_ROOT}/; for this root train with "
                     f"data_dirs=[{root}] val_dirs=[{root / VAL_SUBSET}]")
    tests = [s for s in here if s.startswith("test-")]
    if tests:
        notes.append(f"warning: {', '.join(tests)} in {root} would be trained on with data_dirs=[{root}] (their speakers "
                     "are the evaluation's LibriSpeech test-clean speakers); keep them under another --root")
    return notes


if __name__ == "__main__":
    raise SystemExit(main())
