"""The voices folder: ``<name>.wav`` (the reference recording) + ``<name>.txt`` (its transcript).

A voice's name comes from clients (``voice`` in a speech request, ``name`` in an upload) and
becomes a file name, so it is checked before any path is built: one plain file name, never a
path. Uploads arrive as bytes and are decoded in memory; no client-supplied path is ever opened.
An accepted upload is stored as 24 kHz mono 16-bit WAV, whatever it came as.
"""

from __future__ import annotations

import io
import re
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# A voice name: letters, digits, space, "_", "-", "." (not first), at most 64 characters.
_NAME = re.compile(r"[^\W_][\w .\-]{0,63}")
SILENCE_PEAK = 10 ** (-60 / 20)  # -60 dBFS: quieter than any usable recording


class VoiceError(ValueError):
    """A voice that cannot be used or added; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def safe_name(name: object, folder: Path) -> str:
    """``name`` when it is a plain voice name whose files stay inside ``folder``; else :class:`VoiceError`.

    The project's rule for names that become paths (:func:`vall_e.utils.paths.safe_name`), and on top
    of it a narrower one for voices, whose names also travel in URLs, JSON and the page: letters,
    digits, spaces, ``_ - .`` (not first or last), 1..64 characters, no ``..``.
    """
    from ..utils.paths import UnsafeNameError, inside
    from ..utils.paths import safe_name as path_component

    if not isinstance(name, str) or not name:
        raise VoiceError("a voice name is required (letters, digits, space, '_', '-', '.')")
    shown = name if len(name) <= 80 else name[:80] + "..."
    rule = "use 1-64 letters, digits, spaces, '_', '-' or '.', starting with a letter or digit"
    try:
        path_component(name, what="voice name")
    except UnsafeNameError as e:
        raise VoiceError(f"{e}; {rule}") from None
    if (unicodedata.normalize("NFC", name) != name or not _NAME.fullmatch(name) or ".." in name
            or name.endswith((" ", "."))):
        raise VoiceError(f"invalid voice name {shown!r}: {rule}")
    try:
        for suffix in (".wav", ".txt"):
            inside(folder, Path(folder) / f"{name}{suffix}")
    except UnsafeNameError:
        raise VoiceError(f"invalid voice name {shown!r}: it would leave the voices folder") from None
    return name


@dataclass(frozen=True)
class Voice:
    """One voice. ``stamp`` (modification time, size) changes when its recording is replaced, so
    codes cached under the old stamp are not reused."""

    name: str
    path: Path
    transcript: Optional[str]
    seconds: float
    stamp: tuple[int, int]

    def load(self) -> tuple["object", int]:
        """The recording: float32 ``(channels, n)`` and its sample rate."""
        from ..emb.qnt import load_audio

        return load_audio(self.path)

    def summary(self) -> dict:
        return {"name": self.name, "transcript": self.transcript, "seconds": round(self.seconds, 3)}


class VoiceStore:
    """The voices of one folder: listing, lookup and checked uploads.

    Args:
        folder: where ``<name>.wav`` and ``<name>.txt`` live (created if missing).
        max_seconds / min_seconds: accepted recording lengths for uploads.
        max_voices: uploads are refused once the folder holds this many voices (disk is finite).
    """

    def __init__(self, folder: str | Path, max_seconds: float = 30.0, min_seconds: float = 0.5, max_voices: int = 1000):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_seconds = max_seconds
        self.min_seconds = min_seconds
        self.max_voices = max_voices
        self._lock = threading.Lock()
        self._info: dict[str, Voice] = {}  # name -> Voice, refreshed when a file's stamp changes

    # lookup ------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Names of the voices in the folder (a ``.wav`` with a valid name), sorted."""
        out = []
        for path in self.folder.glob("*.wav"):
            try:
                out.append(safe_name(path.stem, self.folder))
            except VoiceError:
                continue  # a file the operator named in a way clients could not ask for
        return sorted(out)

    def get(self, name: object) -> Voice:
        """The voice ``name``: :class:`VoiceError` 400 for an invalid name, 404 for an unknown one."""
        name = safe_name(name, self.folder)
        path = self.folder / f"{name}.wav"
        try:
            st = path.stat()
        except OSError:
            known = self.names()
            listed = ", ".join(known[:20]) + (" ..." if len(known) > 20 else "") if known else "none yet"
            raise VoiceError(f"unknown voice {name!r}; voices here: {listed} (GET /v1/voices). "
                             "Add one with POST /v1/voices (audio file, transcript, name).", status=404) from None
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            cached = self._info.get(name)
        if cached is not None and cached.stamp == stamp:
            return cached
        voice = self._read(name, path, stamp)
        with self._lock:
            self._info[name] = voice
        return voice

    def _read(self, name: str, path: Path, stamp: tuple[int, int]) -> Voice:
        import soundfile as sf

        try:
            info = sf.info(str(path))
            seconds = info.frames / info.samplerate
        except Exception:
            seconds = 0.0  # unreadable: said when it is used (the server log gets the reason)
        text_path = path.with_suffix(".txt")
        transcript = None
        if text_path.is_file():
            transcript = " ".join(text_path.read_text(encoding="utf-8", errors="replace").split()) or None
        return Voice(name, path, transcript, seconds, stamp)

    def list(self) -> list[Voice]:
        out = []
        for name in self.names():
            try:
                out.append(self.get(name))
            except VoiceError:
                continue  # removed while listing
        return out

    # uploads -----------------------------------------------------------------------------------

    def check_new_name(self, name: object) -> str:
        """A valid name that no voice has yet (409 otherwise), with room for one more voice."""
        name = safe_name(name, self.folder)
        if (self.folder / f"{name}.wav").exists():
            raise VoiceError(f"a voice named {name!r} exists already; choose another name", status=409)
        if len(self.names()) >= self.max_voices:
            raise VoiceError(f"the voices folder holds the most voices this server accepts ({self.max_voices}, "
                             "--max-voices); remove some first")
        return name

    def decode_upload(self, data: bytes) -> "object":
        """Bytes of an audio file -> mono float32 ``(n,)`` at 24 kHz; :class:`VoiceError` names what is wrong."""
        import soundfile as sf
        import torch

        from ..emb.qnt import to_codec_input

        if not data:
            raise VoiceError("the uploaded file is empty")
        try:
            samples, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)  # (n, channels)
        except Exception:
            raise VoiceError("the uploaded file is not audio this server can read; send WAV, FLAC or OGG") from None
        if samples.shape[0] == 0:
            raise VoiceError("the uploaded audio has no samples")
        seconds = samples.shape[0] / sr
        if seconds > self.max_seconds:
            raise VoiceError(f"the uploaded audio is {seconds:.1f} s long; voices may be at most {self.max_seconds:g} s "
                             "(a few seconds of clean speech is what the model uses)")
        if seconds < self.min_seconds:
            raise VoiceError(f"the uploaded audio is {seconds:.2f} s long; voices need at least {self.min_seconds:g} s")
        mono = to_codec_input(torch.from_numpy(samples.T.copy()), int(sr))
        if not torch.isfinite(mono).all():
            raise VoiceError("the uploaded audio holds invalid (NaN or infinite) samples")
        if float(mono.abs().max()) < SILENCE_PEAK:
            raise VoiceError("the uploaded audio is silent (its peak is below -60 dBFS); record some speech")
        return mono

    def save(self, name: str, mono: "object", transcript: Optional[str]) -> Voice:
        """Write ``<name>.txt`` then ``<name>.wav`` (atomically; the voice exists once its wav does)."""
        from ..emb.qnt import SAMPLE_RATE, write_wav
        from ..utils.helpers import atomic_write_text

        text_path = self.folder / f"{name}.txt"
        if transcript:
            atomic_write_text(transcript + "\n", text_path)
        elif text_path.exists():
            text_path.unlink()  # a transcript left from an older voice of that name would be wrong
        write_wav(mono, SAMPLE_RATE, self.folder / f"{name}.wav")
        return self.get(name)

    def remove(self, name: str) -> None:
        """Delete a voice's files (used to undo an upload that failed a later check)."""
        for suffix in (".wav", ".txt"):
            (self.folder / f"{name}{suffix}").unlink(missing_ok=True)
        with self._lock:
            self._info.pop(name, None)
