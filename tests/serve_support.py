"""What the serving tests share: tiny exported models, a voices folder, a real server on a free port.

The models are the session's tiny trained pair (``tiny_runs`` in conftest.py), exported here; the
codec is ``untrained`` (offline), so the audio is not speech: the tests check the service, not quality.
"""

from __future__ import annotations

import io
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import soundfile as sf
import yaml

STEPS = 12  # AR frames per sentence in most requests: the tiny models rarely stop by themselves


def export_zoo(tiny_runs: dict[str, Path], out: Path) -> dict[str, Path]:
    """``ar.pt`` / ``nar.pt`` exported from the tiny training runs."""
    from vall_e.export import export

    for kind, cfg in tiny_runs.items():
        ckpt_dir = Path(yaml.safe_load(cfg.read_text())["ckpt_root"]) / kind
        export(out / f"{kind}.pt", ckpt_dir)
    return {"ar": out / "ar.pt", "nar": out / "nar.pt"}


def utterances(corpus: Path) -> list[tuple[Path, str]]:
    """(wav, transcript) of every corpus utterance, sorted (speaker 101 first)."""
    wavs = sorted(corpus.rglob("*.wav"))
    return [(w, w.with_name(w.name.split(".")[0] + ".normalized.txt").read_text().strip()) for w in wavs]


def make_voices(corpus: Path, out: Path) -> Path:
    """A voices folder: ``alice`` (speaker 101) and ``bob`` (speaker 102), each a recording and its transcript."""
    utts = utterances(corpus)
    out.mkdir(parents=True, exist_ok=True)
    for name, (wav, text) in (("alice", utts[0]), ("bob", utts[-1])):
        shutil.copy(wav, out / f"{name}.wav")
        (out / f"{name}.txt").write_text(text + "\n")
    return out


@dataclass
class Server:
    url: str
    service: Any
    running: Any
    voices: Path


def start_server(zoo: dict[str, Path], voices: Path, **settings: Any) -> Server:
    """The app on 127.0.0.1:<free port> in a thread, with the tiny models (in this process, so tests can
    look at the service's counters and hold its batcher)."""
    from vall_e.serve import load_service, serve_in_thread
    from vall_e.serving.app import Settings, create_app

    options = dict(max_ar_steps=60, batch_window_s=0.05)
    options.update(settings)
    service = load_service(zoo["ar"], zoo["nar"], Settings(voices_dir=voices, **options), device="cpu",
                           codec_weights="untrained")
    running = serve_in_thread(create_app(service))
    return Server(running.url, service, running, voices)


def wav_samples(data: bytes) -> tuple[Any, int]:
    """int16 samples and rate of a WAV/FLAC body."""
    samples, sr = sf.read(io.BytesIO(data), dtype="int16")
    return samples, sr
