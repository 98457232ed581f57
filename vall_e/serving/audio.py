"""Waveforms -> response bytes (``wav``, ``pcm``, ``flac``), the pause between sentences, ``speed``.

All formats carry the same 16-bit samples at 24 kHz mono (``pcm`` is exactly OpenAI's: raw signed
16-bit little-endian at 24 kHz), so a client gets the same audio whichever it asks for.

Streaming: ``pcm`` needs no header; ``wav`` streams with a header whose two size fields are
``0xFFFFFFFF`` ("unknown length", which libsndfile, ffmpeg and browsers read to the end of the
stream) when the total is not known yet. ``flac`` is always sent whole: its STREAMINFO header
holds the total length and an MD5 of the audio, which are only known at the end.
"""

from __future__ import annotations

import io
import math
import struct
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from torch import Tensor

SAMPLE_RATE = 24_000
FORMATS = ("wav", "pcm", "flac")
MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac"}
STREAMABLE = ("wav", "pcm")
UNKNOWN_SIZE = 0xFFFFFFFF


def to_pcm16(wav: "Tensor") -> bytes:
    """Float audio ``(n,)`` or ``(1, n)`` in [-1, 1] -> signed 16-bit little-endian bytes (clipped)."""
    import numpy as np

    samples = wav.reshape(-1).clamp(-1, 1).mul(32767).round().numpy().astype("<i2")
    return np.ascontiguousarray(samples).tobytes()


def silence(seconds: float) -> bytes:
    """``seconds`` of 16-bit silence at 24 kHz."""
    return b"\x00\x00" * max(0, round(seconds * SAMPLE_RATE))


def wav_header(n_bytes: Optional[int]) -> bytes:
    """The 44-byte header of a 16-bit mono 24 kHz WAV holding ``n_bytes`` of samples (None: unknown, streaming)."""
    data = UNKNOWN_SIZE if n_bytes is None else n_bytes
    riff = UNKNOWN_SIZE if n_bytes is None else 36 + n_bytes
    fmt = struct.pack("<IHHIIHH", 16, 1, 1, SAMPLE_RATE, SAMPLE_RATE * 2, 2, 16)
    return b"RIFF" + struct.pack("<I", riff) + b"WAVE" + b"fmt " + fmt + b"data" + struct.pack("<I", data)


def whole(pcm: bytes, fmt: str) -> bytes:
    """A complete file of 16-bit samples ``pcm`` in ``fmt`` (one of :data:`FORMATS`)."""
    if fmt == "pcm":
        return pcm
    if fmt == "wav":
        return wav_header(len(pcm)) + pcm
    if fmt == "flac":
        import numpy as np
        import soundfile as sf

        out = io.BytesIO()
        sf.write(out, np.frombuffer(pcm, dtype="<i2"), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        return out.getvalue()
    raise ValueError(f"unknown format {fmt!r}; supported: {', '.join(FORMATS)}")


def time_stretch(wav: "Tensor", speed: float) -> "Tensor":
    """Play ``wav`` ``(n,)`` ``speed`` times faster, keeping its pitch (phase vocoder): ``(round(n / speed),)``.

    VALL-E has no duration control of its own (the AR decides when to stop), so OpenAI's ``speed``
    is applied to the finished audio. 1.0 returns ``wav`` untouched.
    """
    import torch
    import torchaudio.functional as AF

    if speed == 1.0 or wav.numel() == 0:
        return wav
    n_fft, hop = 1024, 256
    window = torch.hann_window(n_fft)
    x = wav.reshape(-1).float()
    pad = max(0, n_fft - len(x))  # stft needs at least one window
    spec = torch.stft(torch.nn.functional.pad(x, (0, pad)), n_fft, hop, window=window, return_complex=True)
    advance = torch.linspace(0, math.pi * hop, n_fft // 2 + 1)[:, None]
    stretched = AF.phase_vocoder(spec, speed, advance)
    length = max(1, round(len(x) / speed))
    return torch.istft(stretched, n_fft, hop, window=window, length=length)
