"""One error policy for every command-line entry point (``python -m vall_e...`` and ``scripts/*.py``).

- An ``OSError`` that the user's files or disks cause (no space, read-only, permission, a folder
  where a file belongs or the reverse, not found, a link loop, a name too long) becomes one line on
  stderr, ``error: <what>: <path> (<what to do>)``, and exit status 2.
- :class:`~vall_e.utils.outputs.OutputError` and :class:`~vall_e.utils.paths.UnsafeNameError`
  (outputs and names refused by the shared rules) are printed the same way, exit 2.
- Anything else keeps its traceback and exit status 1: it is a bug or a crash, and
  ``scripts/run.sh`` restarts only those. Status 2 means "a restart would fail the same way", so a
  full disk is never retried for hours.

Entry points are wrapped with :func:`entry_point`; each still handles its own errors first (a
message that knows the command's flags beats a generic one).
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from typing import Any, Callable, Optional

# errno -> what the user can do about it
USER_ERRNOS: dict[int, str] = {
    errno.ENOSPC: "free some space or write to another disk, then rerun",
    errno.EDQUOT: "free some space within your quota or write elsewhere, then rerun",
    errno.EROFS: "the file system is read-only: choose a writable location",
    errno.EACCES: "check the permissions, or choose another location",
    errno.EPERM: "check the permissions, or choose another location",
    errno.EISDIR: "a folder is where a file was expected: give a file name",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.ENOENT: "check the path",
    errno.ELOOP: "a symbolic link leads back to itself: fix or remove it",
    errno.ENAMETOOLONG: "use a shorter name",
}


def plain_os_error(e: BaseException) -> Optional[str]:
    """One line for an ``OSError`` a user can cause, or None for any other exception.

    Names the path (the destination of a failed rename) and what to do. Only the exception itself
    counts, not its context: an unrelated bug raised while handling a missing file keeps its traceback.
    """
    if not isinstance(e, OSError) or e.errno not in USER_ERRNOS:
        return None
    words = "no space left on device" if e.errno in (errno.ENOSPC, errno.EDQUOT) else os.strerror(e.errno).lower()
    path = e.filename2 if e.filename2 is not None else e.filename
    if path is None:
        # already-plain messages (e.g. qnt's WriteError) carry the path in their own words
        detail = e.strerror if e.strerror and e.strerror != os.strerror(e.errno) else words
        return f"{detail} ({USER_ERRNOS[e.errno]})"
    return f"{words}: {os.fsdecode(path)} ({USER_ERRNOS[e.errno]})"


def entry_point(main: Callable[..., Optional[int]]) -> Callable[..., int]:
    """Wrap a CLI ``main`` with the policy above; the wrapper returns the exit status.

    ``SystemExit`` (argparse, ``help=true``) passes through unchanged.
    """
    from .outputs import OutputError
    from .paths import UnsafeNameError

    @functools.wraps(main)
    def run(*args: Any, **kwargs: Any) -> int:
        try:
            status = main(*args, **kwargs)
        except (OutputError, UnsafeNameError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except OSError as e:
            message = plain_os_error(e)
            if message is None:
                raise
            print(f"error: {message}", file=sys.stderr)
            return 2
        return 0 if status is None else int(status)

    return run


def torch_load_reason(e: BaseException) -> str:
    """Why a ``torch.load`` failed, in one line, without PyTorch's advice to retry with
    ``weights_only=False`` (that runs code from the file) or to allow-list the blocked class.

    A refused pickle becomes ``"it holds a pickled object of type X, which a safe load refuses"``;
    other errors keep their first line (at most 200 characters).
    """
    import re

    text = str(e)
    if "weights only load failed" in text.lower() or "weights_only" in text:
        blocked = re.findall(r"GLOBAL ([\w.]+)", text)
        what = f"a pickled object of type {blocked[0]}" if blocked else "pickled Python objects"
        return f"it holds {what}, which a safe (weights-only) load refuses"
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return first[:200]
