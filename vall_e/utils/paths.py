"""One rule for names that come from data: ids, speakers and voice names that become part of a path.

A manifest line, a test list or an upload names things; the project turns those names into files
(``<out>/<speaker>/<id>.qnt.pt``, ``<out>/prompts/<id>.wav``, ``<voices>/<name>.wav``). A name is
usable as one path component only if it cannot reach outside its folder or hide in it:

- not empty, not ``.`` or ``..``, no leading dot (hidden files are skipped by every folder scan,
  so a ``.x`` output would be written and then never found);
- no ``/`` or ``\\`` (so no absolute path and no ``a/../..``), no NUL or other control character
  (they end C strings and break log lines);
- at most :data:`MAX_NAME_BYTES` bytes of UTF-8 with room for the longest suffix the project
  appends (``.normalized.txt``), so the file system does not refuse it half way through a run.

:func:`safe_name` checks one name; :func:`inside` checks a joined path against its root, as a
second line of defence for code that builds paths from several parts.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

MAX_NAME_BYTES = 255 - len(".normalized.txt")  # NAME_MAX on Linux and macOS, less our longest suffix
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class UnsafeNameError(ValueError):
    """A name from data that cannot be used as a file name; the message names it and where it came from."""


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot be one path component, in words, or None when it can."""
    if not isinstance(name, str):
        return f"must be a string, got {type(name).__name__}"
    if not name:
        return "is empty"
    if name in (".", ".."):
        return "is a relative folder name"
    if "/" in name or "\\" in name:
        return "contains a path separator ('/' or '\\')"
    if _CONTROL.search(name):
        return "contains a control character (NUL, newline, tab ...)"
    if name.startswith("."):
        return "starts with a dot (hidden files are skipped when folders are read)"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes"
    return None


def safe_name(name: object, what: str = "name", where: str = "") -> str:
    """``name`` unchanged when it is usable as one path component (see the module docstring).

    Args:
        name: the value read from data.
        what: what it is, for the message (``"id"``, ``"speaker"``, ``"voice"``).
        where: where it was read, e.g. ``"list.tsv:12"``.
    Raises:
        UnsafeNameError: with ``where``, ``what`` and the reason.
    """
    problem = name_problem(name)
    if problem is not None:
        prefix = f"{where}: " if where else ""
        raise UnsafeNameError(f"{prefix}{what} {name!r} cannot be a file name: it {problem}")
    return name  # type: ignore[return-value]


def inside(root: str | Path, path: str | Path) -> Path:
    """``path`` (unchanged) after checking that it lies inside ``root``.

    The check is lexical (``..`` and absolute parts are resolved, symbolic links are not): a link
    that the user placed inside an output folder, e.g. to put wavs on another disk, is the user's
    choice, while a name from data can only escape through ``..`` or an absolute path.

    Raises:
        UnsafeNameError: when ``path`` leaves ``root``.
    """
    base = os.path.normpath(os.path.abspath(root))
    full = os.path.normpath(os.path.abspath(path))
    if full != base and not full.startswith(base.rstrip(os.sep) + os.sep):
        raise UnsafeNameError(f"{path} lies outside {root}; refusing to write there")
    return Path(path)
