"""One rule for outputs, shared by every command that writes files for the user.

1. An output that is also one of the command's inputs is refused before any work
   (:func:`refuse_inputs`): ``python -m vall_e "<text>" ref.wav ref.wav`` must not destroy the
   recording it was asked to imitate.
2. Output folders are proven writable before the work starts (:func:`writable_folder`,
   :func:`writable_file`), so a read-only disk or a file in the way costs a second, not a whole run.
3. Outputs are written through a temporary file and a rename (``vall_e.utils.helpers.atomic_path``):
   a failed run never truncates an existing output. Replacing an existing one is said in one line
   (:func:`note_replacing`).

Errors are :class:`OutputError` with the path and what to do; the entry points' error policy
(:mod:`vall_e.utils.errors`) turns them into exit status 2.
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence, TextIO


class OutputError(ValueError):
    """An output that cannot or must not be written; the message names the path and what to do."""


def _identities(path: Path) -> list[tuple]:
    """Keys under which ``path`` is one file: its absolute path with links resolved, and (device,
    inode) when it exists (hard links, bind mounts)."""
    keys: list[tuple] = [("path", os.path.realpath(path))]
    try:
        st = os.stat(path)
        keys.append(("inode", st.st_dev, st.st_ino))
    except OSError:
        pass
    return keys


def refuse_inputs(
    outputs: str | Path | Sequence[str | Path], inputs: Iterable[tuple[str, Optional[str | Path]]], flag: str = "output"
) -> None:
    """Refuse any of ``outputs`` that is one of ``inputs`` (``(role, path)`` pairs; None paths skipped).

    One pass over each list (a batch of 10,000 lines against its 10,000 references is 20,000 stats).

    Raises:
        OutputError: naming the output, the input it would destroy, and what to do.
    """
    outs = [outputs] if isinstance(outputs, (str, Path)) else list(outputs)
    roles: dict[tuple, str] = {}
    for role, path in inputs:
        if path is not None:
            for key in _identities(Path(path)):
                roles.setdefault(key, role)
    for out in outs:
        for key in _identities(Path(out)):
            if key in roles:
                raise OutputError(f"the {flag} {out} is also the {roles[key]}: writing it would destroy that input; "
                                  "give the output another name")


def _plain(e: OSError) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on device"
    return os.strerror(e.errno).lower() if e.errno else str(e)


def writable_folder(folder: str | Path, flag: str = "output folder") -> Path:
    """Prove that files can be created in ``folder`` (or, when it does not exist yet, in its nearest
    existing parent, where it will be created); returns it.

    Nothing is left behind: a missing folder is not created here, so a command that fails later
    leaves no empty folder. The probe is a real file creation (then removed), not ``os.access``,
    which says yes to root on a read-only mount.

    Raises:
        OutputError: the path or a parent is a file, or the folder is read-only, not permitted or full.
    """
    return _writable(Path(folder), f"{flag} {folder}")


def writable_file(path: str | Path, flag: str = "output") -> Path:
    """Check that file ``path`` can be written: not a folder, and its folder writable (see :func:`writable_folder`)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a folder; give a file name inside it, e.g. {path / 'out'}")
    _writable(path.parent, f"{flag} {path}: its folder {path.parent}")
    return path


def _writable(folder: Path, what: str) -> Path:
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{what} is a file, not a folder; give a folder (it is created when missing)")
    existing = folder
    while not existing.exists():  # the nearest existing parent is where the folder will be created
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{what}: a part of that path ({existing}) is a file, not a folder; choose another location")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".vall_e-write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        where = "" if existing == folder else f" (checked in {existing}, where it would be created)"
        raise OutputError(f"{what} is not writable{where}: {_plain(e)}; choose a writable location, "
                          "or fix its permissions") from None
    return folder


def describe_file(path: str | Path) -> str:
    """A short description of an existing file for a 'replacing' note: size and age, and the
    duration of audio files."""
    path = Path(path)
    st = path.stat()
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(st.st_mtime))
    what = f"{st.st_size} bytes, written {when}"
    if path.suffix.lower() in (".wav", ".flac"):
        try:
            import soundfile as sf

            what = f"{sf.info(str(path)).duration:.2f} s of audio, written {when}"
        except Exception:  # not readable as audio: the size says enough
            pass
    return what


def note_replacing(path: str | Path, what: Optional[str] = None, stream: TextIO | None = None) -> None:
    """Say, in one line on stderr, that an existing output is being replaced and what it held."""
    print(f"note: replacing {path} ({what or describe_file(path)})", file=stream or sys.stderr)
