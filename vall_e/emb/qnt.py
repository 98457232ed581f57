"""Audio <-> EnCodec codes: the 24 kHz EnCodec model at 6 kbps (8 codebooks of 1024, 75 frames/s).

Library: :func:`encode`, :func:`encode_from_file`, :func:`encode_batch`, :func:`decode`,
:func:`decode_to_file`, :func:`load_codec`, :func:`quantize_folder`.
CLI: ``python -m vall_e.emb.qnt <folder> [--suffix .wav] [key=value ...] [help=true]`` writes
``<id>.qnt.pt`` = ``torch.save`` of an int64 tensor ``(1, 8, T)`` beside every audio file.

Audio policy: any format soundfile reads (wav, flac ...), any sample rate (resampled to 24 kHz
with ``torchaudio.functional.resample``), mono or multi-channel (channels are AVERAGED to mono:
the 24 kHz model is mono, and averaging keeps both sides of a stereo recording).
``T = ceil(samples_at_24k / 320)``.

``codec_weights`` (a Config field) picks the weights:

- ``pretrained``: the official checkpoint through torch.hub (downloaded once into the torch hub
  cache). Offline, the error says where to put the file.
- ``<path>``: a local EnCodec 24 kHz state dict, e.g. that same checkpoint file.
- ``untrained``: the same architecture with fixed-seed random weights, so every code path runs
  offline and in tests. Its codes carry no trained meaning and audio decoded from them is NOT
  speech. A naively built untrained EnCodec maps everything to code 0 (its codebooks start as
  zeros awaiting k-means init, and a random encoder's output is a near-constant vector), so
  :func:`_build_untrained` standardizes the encoder output and fits each residual codebook to a
  fixed synthetic speech-like signal: codes are diverse and depend on the input.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..utils.helpers import atomic_path, atomic_torch_save, find_files, setup_logging, sibling

if TYPE_CHECKING:
    import torch
    from encodec import EncodecModel

logger = logging.getLogger("vall_e.emb.qnt")  # not __name__: stable under python -m
_CONFIG_WORD = re.compile(r"^[A-Za-z_][\w.]*=")

SAMPLE_RATE = 24_000
HOP_LENGTH = 320  # samples per frame: 24000 / 320 = 75 frames/s
FRAME_RATE = SAMPLE_RATE // HOP_LENGTH
BANDWIDTH = 6.0  # kbps -> 8 codebooks
N_CODEBOOKS = 8
CODEBOOK_SIZE = 1024
QNT_SUFFIX = ".qnt.pt"
PRETRAINED_CHECKPOINT = "encodec_24khz-d7cc33bc.th"
PRETRAINED_URL = "https://dl.fbaipublicfiles.com/encodec/v0/" + PRETRAINED_CHECKPOINT
UNTRAINED_SEED = 0

_lock = threading.Lock()
_codecs: dict[tuple[str, str, Any], "EncodecModel"] = {}
_warned_untrained_decode = False


class CodecUnavailableError(RuntimeError):
    """The requested codec weights cannot be loaded; the message says how to proceed."""


class AudioError(ValueError):
    """An audio file that cannot be used (unreadable, empty, no samples); names the file."""


def num_frames(num_samples_24k: int) -> int:
    """Codec frames for that many 24 kHz samples: ``ceil(n / 320)``."""
    return -(-int(num_samples_24k) // HOP_LENGTH)


# --------------------------------------------------------------------------------------------
# loading the codec


def load_codec(codec_weights: str = "pretrained", device: str = "cpu", dtype: Any = None) -> "EncodecModel":
    """The EnCodec 24 kHz model at 6 kbps in eval mode on ``device``, cached per (weights, device, dtype).

    ``codec_weights``: ``pretrained`` | ``untrained`` | a path to an EnCodec state dict.
    ``dtype`` defaults to float32 (decoding); encoding uses a float64 copy (see :func:`encode_batch`).
    Raises :class:`CodecUnavailableError` with instructions when the weights cannot be loaded.
    """
    import torch

    key = _weights_key(codec_weights)
    dev = str(torch.device(device))
    dtype = dtype or torch.float32
    with _lock:
        if (key, dev, dtype) not in _codecs:
            if dev.startswith("cuda") and not torch.cuda.is_available():
                raise CodecUnavailableError(f"device={device!r} but CUDA is not available; use device=cpu")
            base = _codecs.get((key, "cpu", torch.float32))
            if base is None:
                base = _codecs[(key, "cpu", torch.float32)] = _build(key)
            if (dev, dtype) != ("cpu", torch.float32):
                model = _new_model(pretrained=False)  # a fresh copy: deepcopy fails on weight_norm
                model.load_state_dict(base.state_dict())
                model.set_target_bandwidth(BANDWIDTH)
                _codecs[(key, dev, dtype)] = model.eval().requires_grad_(False).to(dev, dtype)
        return _codecs[(key, dev, dtype)]


def _weights_key(codec_weights: str) -> str:
    if codec_weights in ("pretrained", "untrained"):
        return codec_weights
    return str(Path(codec_weights).expanduser().resolve())


def _new_model(pretrained: bool) -> "EncodecModel":
    """The architecture (random init, then maybe the official weights); global RNG state is kept."""
    import torch
    from encodec import EncodecModel

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's weight_norm deprecation, once per conv
        return EncodecModel.encodec_model_24khz(pretrained=pretrained)


def _build(key: str) -> "EncodecModel":
    import torch

    if key == "pretrained":
        try:
            model = _new_model(pretrained=True)
        except Exception as e:
            raise CodecUnavailableError(_offline_help(e)) from e
    elif key == "untrained":
        model = _build_untrained()
        logger.info(
            "codec_weights=untrained: EnCodec architecture with fixed-seed random weights; codes carry "
            "no trained meaning and audio decoded from them is not speech"
        )
    else:
        path = Path(key)
        if not path.is_file():
            raise CodecUnavailableError(
                f"codec_weights={key!r}: no such file. Give the path of an EnCodec 24 kHz checkpoint "
                f"(e.g. {PRETRAINED_CHECKPOINT}), or codec_weights=pretrained|untrained"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CodecUnavailableError(
                f"codec_weights={key!r} cannot be read as a torch state dict (weights_only): {e}"
            ) from e
        model = _new_model(pretrained=False)
        try:
            model.load_state_dict(state)
        except Exception as e:
            raise CodecUnavailableError(
                f"codec_weights={key!r} is not an EnCodec 24 kHz state dict ({str(e).splitlines()[0]})"
            ) from e
    model.set_target_bandwidth(BANDWIDTH)
    model.eval().requires_grad_(False)
    return model


def _offline_help(error: BaseException) -> str:
    import torch

    hub = Path(torch.hub.get_dir()) / "checkpoints" / PRETRAINED_CHECKPOINT
    return (
        f"cannot load the pretrained EnCodec 24 kHz weights ({type(error).__name__}: {error}).\n"
        f"They are downloaded on first use from {PRETRAINED_URL}\n"
        f"into the torch hub cache: {hub}\n"
        "To proceed without internet, do one of:\n"
        f"  1. copy {PRETRAINED_CHECKPOINT} from a machine with internet (its ~/.cache/torch/hub/"
        f"checkpoints/) to {hub}\n"
        "     (the folder follows $TORCH_HOME), then rerun with codec_weights=pretrained;\n"
        f"  2. pass codec_weights=/path/to/{PRETRAINED_CHECKPOINT};\n"
        "  3. pass codec_weights=untrained for tests and smoke runs: a fixed-seed random codec whose "
        "codes carry no trained meaning and whose decoded audio is not speech."
    )


def _calibration_audio(seconds: float = 6.0, seed: int = 0) -> "torch.Tensor":
    """A deterministic speech-like signal ``(n,)`` at 24 kHz for fitting untrained codebooks.

    Segments of 40-300 ms at random levels: voiced (harmonics of a gliding 80-300 Hz f0 shaped by
    three formant-like spectral peaks), noise bursts (fricative-like) and near-silence.
    """
    import torch

    g = torch.Generator().manual_seed(seed)

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand((), generator=g).item()

    pieces: list[torch.Tensor] = []
    total = int(seconds * SAMPLE_RATE)
    while sum(len(p) for p in pieces) < total:
        n = int(SAMPLE_RATE * uniform(0.04, 0.3))
        kind = uniform(0, 1)
        if kind < 0.6:
            f0 = torch.linspace(uniform(80, 300), uniform(80, 300), n)
            phase = 2 * math.pi * torch.cumsum(f0, 0) / SAMPLE_RATE
            k = torch.arange(1, 30, dtype=torch.float32)[:, None]
            src = (torch.sin(k * phase) / k).sum(0)
        else:
            src = torch.randn(n, generator=g) * (1.0 if kind < 0.85 else 0.01)
        freqs = torch.fft.rfftfreq(n, 1 / SAMPLE_RATE)
        envelope = torch.full_like(freqs, 0.02)
        for lo, hi in ((250, 900), (900, 2500), (2500, 6000)):
            centre, width = uniform(lo, hi), uniform(80, 280)
            envelope += torch.exp(-0.5 * ((freqs - centre) / width) ** 2)
        x = torch.fft.irfft(torch.fft.rfft(src) * envelope, n=n)
        x = x / x.abs().max().clamp(min=1e-6) * 10 ** uniform(-1.5, -0.2)
        pieces.append(x * torch.hann_window(n, periodic=False) ** 0.3)
    return torch.cat(pieces)[:total]


def _build_untrained(seed: int = UNTRAINED_SEED) -> "EncodecModel":
    """The 24 kHz architecture with fixed-seed random weights and data-fitted codebooks.

    1. Random weights from ``torch.manual_seed(seed)`` (global RNG state is restored after).
    2. The random encoder's output is a near-constant vector with tiny variation, which would
       make nearest-codebook search all ties and rounding noise. Its last conv is rescaled so the
       output is zero-mean, unit-scale on the calibration signal.
    3. Each of the 8 residual codebooks used at 6 kbps gets 1024 vectors drawn (fixed seed) from
       a Gaussian fitted to that level's residuals on :func:`_calibration_audio`, much as EnCodec
       itself initializes codebooks from data (k-means on its first batch). The 24 higher levels
       (never used at 6 kbps) draw from the 8th level's fit, so no codebook is left at zeros.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _new_model(pretrained=False)  # its own fork_rng starts from this seeded state
    model.eval().double()  # calibrated in float64 (like encoding), stored as float32 below
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        x = model.encoder(_calibration_audio(seed=seed).double()[None, None])[0].T  # (450 frames, 128)
        mean, scale = x.mean(0), (x - x.mean(0)).std()
        conv = model.encoder.model[-1].conv.conv  # weight-normed Conv1d(512, 128)
        conv.weight_g.div_(scale)
        conv.bias.sub_(mean).div_(scale)
        x = (x - mean) / scale
        eye = torch.eye(x.shape[1], dtype=x.dtype)
        for level, layer in enumerate(model.quantizer.vq.layers):
            book = layer._codebook
            if level < N_CODEBOOKS:  # levels past 6 kbps reuse the last fit: never used here
                mu = x.mean(0)
                cov = torch.cov(x.T)
                chol = torch.linalg.cholesky(cov + 1e-6 * cov.diagonal().mean() * eye)
            embed = (mu + torch.randn(CODEBOOK_SIZE, x.shape[1], generator=g, dtype=x.dtype) @ chol.T).float()
            book.embed.copy_(embed)
            book.embed_avg.copy_(embed)
            book.inited.fill_(1)
            if level < N_CODEBOOKS - 1:
                x = x - embed.double()[book.quantize(x)]
    return model.float()


# --------------------------------------------------------------------------------------------
# audio


def load_audio(path: str | Path) -> tuple["torch.Tensor", int]:
    """Read audio as float32 ``(channels, n)`` plus its sample rate; :class:`AudioError` names a bad file."""
    import soundfile as sf
    import torch

    path = Path(path)
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)  # (n, channels)
    except Exception as e:  # libsndfile raises several types for missing, empty and corrupt files
        raise AudioError(f"{path}: cannot read audio ({str(e).strip() or type(e).__name__})") from e
    if data.shape[0] == 0:
        raise AudioError(f"{path}: no audio (0 samples)")
    return torch.from_numpy(data.T.copy()), int(sr)


def to_codec_input(wav: "torch.Tensor", sr: int) -> "torch.Tensor":
    """Mono float32 ``(n24,)`` at 24 kHz from ``wav`` ``(n,)`` or ``(channels, n)`` at ``sr``.

    Channels are averaged (the channel policy of this project).
    """
    import torch
    import torchaudio.functional as AF

    wav = torch.as_tensor(wav).float()
    if wav.dim() == 2:
        wav = wav.mean(0)
    elif wav.dim() != 1:
        raise ValueError(f"audio must be shaped (n,) or (channels, n), got {tuple(wav.shape)}")
    if sr != SAMPLE_RATE:
        wav = AF.resample(wav, sr, SAMPLE_RATE)
    return wav.contiguous()


# --------------------------------------------------------------------------------------------
# encode / decode


def encode_batch(
    wavs: Sequence["torch.Tensor"], device: str = "cpu", codec_weights: str = "pretrained"
) -> list["torch.Tensor"]:
    """Codes for several mono 24 kHz signals ``(n_i,)`` in one forward pass.

    Returns one int64 CPU tensor ``(1, 8, ceil(n_i / 320))`` per input. Signals are zero-padded
    at the end to a common length; the 24 kHz model is causal, so each signal's own frames are the
    same as when it is encoded alone. The encoder runs in float64: in float32, kernels chosen per
    batch size (or device) differ in the last bits and flip near-tied nearest-codebook choices, so
    codes would depend on batch composition. In float64 they depend on the audio alone (the cost:
    about 2.5x encoder time on CPU).
    """
    import torch

    if not wavs:
        return []
    lengths = [int(w.shape[-1]) for w in wavs]
    if min(lengths) == 0:
        raise AudioError("cannot encode an empty signal")
    model = load_codec(codec_weights, device, dtype=torch.float64)
    batch = torch.zeros(len(wavs), 1, max(lengths), dtype=torch.float64)
    for i, w in enumerate(wavs):
        batch[i, 0, : lengths[i]] = w
    with torch.inference_mode():
        frames = model.encode(batch.to(next(model.parameters()).device))
    codes = frames[0][0].cpu().long()  # (b, 8, T): one frame list entry, segment=None
    return [codes[i : i + 1, :, : num_frames(n)].clone() for i, n in enumerate(lengths)]


def encode(
    wav: "torch.Tensor", sr: int, device: str = "cpu", codec_weights: str = "pretrained"
) -> "torch.Tensor":
    """Codes of one signal: ``wav`` ``(n,)`` or ``(channels, n)`` at ``sr`` -> int64 ``(1, 8, T)`` on CPU.

    ``T = ceil(n24 / 320)`` where ``n24`` is the length after resampling to 24 kHz.
    """
    return encode_batch([to_codec_input(wav, sr)], device, codec_weights)[0]


def encode_from_file(
    path: str | Path, device: str = "cpu", codec_weights: str = "pretrained"
) -> "torch.Tensor":
    """Codes of an audio file: int64 ``(1, 8, T)`` on CPU; :class:`AudioError` names a bad file."""
    wav, sr = load_audio(path)
    return encode(wav, sr, device, codec_weights)


def _as_codes(codes: Any) -> "torch.Tensor":
    """``(b, q, t)`` stays; ``(t, q)`` (what the models produce) becomes ``(1, q, t)``."""
    import torch

    codes = torch.as_tensor(codes)
    if codes.dim() == 2:
        codes = codes.t()[None]
    if codes.dim() != 3:
        raise ValueError(f"codes must be (b, q, t) or (t, q), got shape {tuple(codes.shape)}")
    if not 1 <= codes.shape[1] <= 32:
        raise ValueError(f"codes have {codes.shape[1]} codebooks (expected 1..8); shape {tuple(codes.shape)}")
    if codes.numel() and (codes.min() < 0 or codes.max() >= CODEBOOK_SIZE):
        raise ValueError(
            f"codes must lie in [0, {CODEBOOK_SIZE}), got [{int(codes.min())}, {int(codes.max())}] "
            "(strip stop tokens before decoding)"
        )
    return codes.long()


def decode(
    codes: "torch.Tensor", device: str = "cpu", codec_weights: str = "pretrained"
) -> tuple["torch.Tensor", int]:
    """Waveform from codes: ``(b, q, t)`` or ``(t, q)`` -> (float32 ``(b, t * 320)`` on CPU, 24000).

    ``b`` is 1 for 2-D input. With ``codec_weights=untrained`` the audio is not speech (warned once).
    """
    import torch

    global _warned_untrained_decode
    codes = _as_codes(codes)
    if codec_weights == "untrained" and not _warned_untrained_decode:
        _warned_untrained_decode = True
        logger.warning("decoding with codec_weights=untrained: the audio is noise-like, NOT speech")
    model = load_codec(codec_weights, device)
    with torch.inference_mode():
        wav = model.decode([(codes.to(next(model.parameters()).device), None)])  # (b, 1, n)
    return wav[:, 0].float().cpu(), SAMPLE_RATE


def decode_to_file(
    codes: "torch.Tensor", path: str | Path, device: str = "cpu", codec_weights: str = "pretrained"
) -> None:
    """Decode one utterance's codes (``(1, q, t)`` or ``(t, q)``) and write 24 kHz 16-bit audio atomically."""
    import soundfile as sf

    codes = _as_codes(codes)
    if codes.shape[0] != 1:
        raise ValueError(f"decode_to_file writes one utterance; got a batch of {codes.shape[0]}")
    wav, sr = decode(codes, device, codec_weights)
    with atomic_path(path) as tmp:
        sf.write(str(tmp), wav[0].clamp(-1, 1).numpy(), sr, subtype="PCM_16", format=_sf_format(path))


def _sf_format(path: str | Path) -> str:
    ext = Path(path).suffix.lower().lstrip(".")
    return {"wav": "WAV", "flac": "FLAC", "ogg": "OGG"}.get(ext, "WAV")


# --------------------------------------------------------------------------------------------
# folders


@dataclass
class Summary:
    """Outcome of a folder run; ``failed`` pairs each file with the reason."""

    written: int = 0
    skipped: int = 0
    seconds_of_audio: float = 0.0
    failed: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def report(self) -> str:
        lines = [
            f"qnt: {self.written} written ({self.seconds_of_audio / 3600:.3f} h of audio), "
            f"{self.skipped} already done, {len(self.failed)} failed"
        ]
        lines += [f"  FAILED {path}: {reason}" for path, reason in self.failed]
        return "\n".join(lines)


def _batches(items: list[tuple[Path, float]], batch_seconds: float) -> list[list[tuple[Path, float]]]:
    """Group (path, seconds) by length, longest first; a batch's padded size stays within budget."""
    items = sorted(items, key=lambda x: -x[1])
    out: list[list[tuple[Path, float]]] = []
    for item in items:
        # the first (longest) file of a batch sets its padded length
        if out and (len(out[-1]) + 1) * out[-1][0][1] <= batch_seconds:
            out[-1].append(item)
        else:
            out.append([item])
    return out


def quantize_folder(
    folder: str | Path,
    suffix: str = ".wav",
    device: str = "cpu",
    codec_weights: str = "pretrained",
    batch_seconds: float | None = None,
    progress: bool = True,
) -> Summary:
    """Write ``<id>.qnt.pt`` (int64 ``(1, 8, T)``) beside every ``*<suffix>`` audio file under ``folder``.

    Files already done are skipped; unreadable or empty files are recorded in the summary and
    skipped while the rest go on; outputs are written atomically. ``batch_seconds`` caps the padded
    audio per forward pass; None picks 0 (one file per pass: batching measured no faster on CPU)
    for CPU and 120 s for CUDA.
    """
    import soundfile as sf
    from tqdm import tqdm

    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder} does not exist (give the corpus folder or one audio file)")
    if batch_seconds is None:
        batch_seconds = 0.0 if str(device).startswith("cpu") else 120.0
    summary = Summary()
    todo: list[tuple[Path, float]] = []
    for path in find_files(folder, suffix):
        if sibling(path, QNT_SUFFIX).exists():
            summary.skipped += 1
            continue
        if path.stat().st_size == 0:
            summary.failed.append((path, "empty file (0 bytes)"))
            continue
        try:
            info = sf.info(str(path))
        except Exception as e:
            summary.failed.append((path, f"cannot read audio ({str(e).strip() or type(e).__name__})"))
            continue
        if info.frames <= 0:
            summary.failed.append((path, "no audio (0 samples)"))
            continue
        todo.append((path, info.frames / info.samplerate))

    if todo:
        load_codec(codec_weights, device)  # fail early (e.g. offline pretrained), before the bar
    bar = tqdm(total=len(todo), desc="qnt", unit="file", disable=not progress, dynamic_ncols=True)
    for batch in _batches(todo, batch_seconds):
        wavs, paths = [], []
        for path, _ in batch:
            try:
                wav, sr = load_audio(path)
            except AudioError as e:
                summary.failed.append((path, str(e).removeprefix(f"{path}: ")))
                bar.update(1)
                continue
            wavs.append(to_codec_input(wav, sr))
            paths.append(path)
        try:
            codes: list[Any] = encode_batch(wavs, device, codec_weights)
        except RuntimeError:  # e.g. out of memory for the batch: fall back to one file at a time
            codes = []
            for path, wav in zip(paths, wavs):
                try:
                    codes.append(encode_batch([wav], device, codec_weights)[0])
                except RuntimeError as e:
                    codes.append(None)
                    summary.failed.append((path, f"encoding failed: {str(e).splitlines()[0]}"))
        for path, wav, c in zip(paths, wavs, codes):
            if c is None:
                continue
            atomic_torch_save(c, sibling(path, QNT_SUFFIX))
            summary.written += 1
            summary.seconds_of_audio += len(wav) / SAMPLE_RATE
        bar.update(len(paths))
        bar.set_postfix(audio_h=f"{summary.seconds_of_audio / 3600:.3f}")
    bar.close()
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (1 when any file failed, 2 on a setup error)."""
    from ..config import Config

    argv = list(sys.argv[1:] if argv is None else argv)
    # every identifier=value word is config (a typo gets "did you mean"), the rest is argparse's
    words = [w for w in argv if _CONFIG_WORD.match(w)]
    rest = [w for w in argv if not _CONFIG_WORD.match(w)]
    cfg = Config.from_cli(words)
    parser = argparse.ArgumentParser(
        prog="python -m vall_e.emb.qnt",
        description="Write <id>.qnt.pt (EnCodec 24 kHz codes, int64 (1, 8, T)) beside every audio file.",
        epilog="Config overrides such as codec_weights=untrained device=cpu are accepted; "
        "help=true lists them.",
    )
    parser.add_argument("folder", type=Path, help="corpus folder (searched recursively)")
    parser.add_argument("--suffix", default=".wav", help="audio suffix, e.g. .wav or .flac (default .wav)")
    parser.add_argument(
        "--batch-seconds", type=float, default=None,
        help="padded audio seconds per forward pass (default: one file per pass on CPU, 120 on CUDA)",
    )
    args = parser.parse_args(rest)
    setup_logging()
    if not args.folder.exists():
        print(f"error: {args.folder} does not exist", file=sys.stderr)
        return 2
    start = time.time()
    try:
        summary = quantize_folder(args.folder, args.suffix, cfg.device, cfg.codec_weights, args.batch_seconds)
    except CodecUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.report() + f"\n({time.time() - start:.1f} s)")
    return 0 if summary.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
