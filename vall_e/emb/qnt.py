"""Audio <-> EnCodec codes: the 24 kHz EnCodec model at 6 kbps (8 codebooks of 1024, 75 frames/s).

Library: :func:`encode`, :func:`encode_from_file`, :func:`encode_batch`, :func:`decode`,
:func:`decode_to_file`, :func:`load_codec`, :func:`quantize` / :func:`quantize_folder`,
:func:`read_manifest`, :func:`save_codes`.

CLI::

    python -m vall_e.emb.qnt <folder> [--suffix .wav] [key=value ...] [help=true]
    python -m vall_e.emb.qnt <segments.jsonl> <out_folder>
    torchrun --nproc_per_node 8 -m vall_e.emb.qnt <folder> device=cuda

A folder run writes ``<id>.qnt.pt`` = ``torch.save`` of an int16 tensor ``(1, 8, T)`` beside
every ``.wav``/``.flac`` file (suffixes matched ignoring case). Readers accept any integer dtype
(older files are int64). A manifest run writes ``<out>/<speaker>/<id>.qnt.pt`` and
``<id>.normalized.txt`` per line, reading only the segment's samples.

Sharding: under a launcher (RANK, WORLD_SIZE, LOCAL_RANK in the environment) each rank encodes
a deterministic, duration-balanced shard (device=cuda picks ``cuda:<LOCAL_RANK>``); the
per-rank summaries are merged on rank 0 through a gloo group when the launcher provides a
rendezvous (MASTER_ADDR/PORT), else each rank reports its shard.

Memory: the encoder's conv stack runs over 5 s chunks (:func:`_encode_padded`), and no
file or segment longer than ``--max-seconds`` (120 s) is loaded; longer recordings need a
segment manifest. On CUDA a forward pass takes as much padded audio as half the free GPU memory
allows (:func:`encode_plan`), and the loader pins its buffers so host-to-device copies overlap.

Reproducibility: the encoder runs in float64 by default on every device, inside
:func:`exact_encoder_math` (no TF32 in cuBLAS/cuDNN/oneDNN, deterministic cuDNN, no autotuning).

- CPU, float64: codes depend on the audio alone. Measured (tests): batched (zero-padded, any
  companions) equals one file per pass, chunked equals one whole pass, two ranks write the bytes
  one process writes, and data/test's codes come back in a fresh process.
- CUDA, float64: expected to equal CPU float64 codes and to be batch-invariant, but NOT measured
  yet (no GPU was available; the ``gpu``-marked tests in tests/test_qnt.py check both). The GPU
  sums in another order, so activations differ from the CPU's in the last bits (about 1e-16
  relative); a code flips only where two codewords are that close to tied.
- float32 (either device) and bfloat16 (CUDA), chosen with ``dtype=``: not reproducible bit for
  bit. Kernels picked per shape, device or library round differently, near-tied codebook choices
  flip, and one flip at level 1 changes all 8 codes of its frame. Measured on CPU: float32 and
  float64 codes differ in 1 frame of 9135 (122 s of espeak-ng speech, untrained codec).
- Bit-identical activations are never promised across machines, BLAS builds or CUDA versions;
  the claims above are about codes.

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
import contextlib
import logging
import math
import os
import re
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from ..utils.distributed import gather_to_rank0, init_gloo_for_summary
from ..utils.errors import entry_point, torch_load_reason
from ..utils.outputs import refuse_inputs, writable_file, writable_folder
from ..utils.helpers import (
    atomic_path,
    atomic_write_bytes,
    balanced_shards,
    dist_env,
    find_files_nocase,
    setup_logging,
    sibling,
    utterance_id,
)
from ..utils.paths import inside, name_problem
from .g2p import TEXT_SUFFIX  # transcripts written beside manifest segments, read by g2p

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
                f"codec_weights={key!r} cannot be read as a torch state dict ({torch_load_reason(e)}); give an "
                "EnCodec 24 kHz checkpoint of plain tensors, or codec_weights=pretrained|untrained"
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


def load_audio(
    path: str | Path, start: float | None = None, end: float | None = None
) -> tuple["torch.Tensor", int]:
    """Read audio as float32 ``(channels, n)`` plus its sample rate; :class:`AudioError` names a bad file.

    With ``start``/``end`` (seconds) only samples ``[round(start * sr), round(end * sr))`` are
    read: soundfile seeks there, so cutting 10 s out of an hour reads 10 s. A segment that runs
    past the end of the recording (by more than 10 ms) is an error.
    """
    import soundfile as sf
    import torch

    path = Path(path)
    # libsndfile says "System error." for these; name what is wrong instead
    if not path.exists():
        raise AudioError(f"{path}: audio file not found" + ("" if path.is_absolute() else f" (looked in {path.resolve().parent})"))
    if path.is_dir():
        raise AudioError(f"{path}: is a folder, not an audio file")
    if path.is_file() and path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    try:
        with sf.SoundFile(str(path)) as f:
            sr, total = int(f.samplerate), int(f.frames)
            first, last = 0, total
            if start is not None or end is not None:
                first = round((start or 0.0) * sr)
                last = total if end is None else round(end * sr)
                if last > total + sr // 100:
                    raise AudioError(
                        f"{path}: the segment ends at {end:.2f} s but the recording is {total / sr:.2f} s long"
                    )
                last = min(last, total)
                if first > 0:
                    f.seek(first)
            data = f.read(frames=max(0, last - first), dtype="float32", always_2d=True)  # (n, channels)
    except AudioError:
        raise
    except Exception as e:  # libsndfile raises several types for missing, empty and corrupt files
        raise AudioError(f"{path}: cannot read audio ({str(e).strip() or type(e).__name__})") from e
    if data.shape[0] == 0:
        raise AudioError(f"{path}: no audio (0 samples)" + ("" if start is None else " in the segment"))
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


# The SEANet conv stack before the encoder's LSTM has a receptive field of 798 samples: a frame's
# own 320 plus 478 of past audio, under 2 frames (measured: 2 and 32 frames of left context give
# the same output to 4e-13, and the same codes). Long signals go
# through it in chunks with this much left context, so activation memory stays bounded by the
# chunk, not the file; the LSTM and the quantizer then run on the whole (small) 75 Hz sequence.
CHUNK_CONTEXT_FRAMES = 8
CHUNK_SECONDS = 5.0  # float64 activations cost about 60 MB per second of audio per batch row


# The fp32 precision switches of torch's per-backend API (torch >= 2.9) that the encoder's
# kernels read: cuBLAS matmul (the codebook search), cuDNN conv and RNN (the SEANet stack and its
# LSTM), and their oneDNN counterparts on CPU.
_FP32_KNOBS = ("cuda.matmul", "cudnn.conv", "cudnn.rnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn")
_exact_lock = threading.Lock()
_exact_depth = 0  # encodes inside exact_encoder_math now, over all threads
_exact_saved: dict[str, Any] | None = None  # the flags to restore when the last one leaves


def _knob(name: str) -> Any:
    import torch

    obj: Any = torch.backends
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _math_flags() -> dict[str, Any]:
    """The switches :func:`exact_encoder_math` sets, as they are now (enough to restore them exactly).

    torch keeps the legacy switches (``set_float32_matmul_precision``, ``cudnn.allow_tf32``) as
    state apart from the per-backend ``fp32_precision`` knobs, and their getters raise once a
    program has set the two APIs to disagree. A legacy switch that cannot be read is left out,
    so it is neither changed nor restored.
    """
    import torch

    cudnn = torch.backends.cudnn
    flags: dict[str, Any] = {"cudnn.deterministic": cudnn.deterministic, "cudnn.benchmark": cudnn.benchmark}
    for name in _FP32_KNOBS:
        try:
            flags[name] = _knob(name).fp32_precision
        except AttributeError:  # a torch without the per-backend API
            pass
    for name, read in (("matmul_precision", torch.get_float32_matmul_precision),
                       ("cudnn.allow_tf32", lambda: cudnn.allow_tf32)):
        try:
            flags[name] = read()
        except RuntimeError:
            pass
    return flags


def _set_math_flags(flags: dict[str, Any]) -> None:
    """Set what :func:`_math_flags` returned (or a part of it)."""
    import torch

    cudnn = torch.backends.cudnn
    # legacy switches first: their setters also write per-backend knobs, which are set after
    if "matmul_precision" in flags:
        torch.set_float32_matmul_precision(flags["matmul_precision"])
    if "cudnn.allow_tf32" in flags:
        cudnn.allow_tf32 = flags["cudnn.allow_tf32"]
    for name in _FP32_KNOBS:
        if name in flags:
            _knob(name).fp32_precision = flags[name]
    cudnn.deterministic = flags["cudnn.deterministic"]
    cudnn.benchmark = flags["cudnn.benchmark"]


def _exact_flags(current: dict[str, Any]) -> dict[str, Any]:
    """IEEE float32 everywhere, deterministic cuDNN without autotuning, for the switches in ``current``."""
    exact = {"cudnn.deterministic": True, "cudnn.benchmark": False, "matmul_precision": "highest",
             "cudnn.allow_tf32": False, **{name: "ieee" for name in _FP32_KNOBS}}
    return {name: exact[name] for name in current}


@contextlib.contextmanager
def exact_encoder_math() -> Iterator[None]:
    """Within it, torch computes as exactly as it can; the previous settings come back after.

    TF32 (and oneDNN's reduced float32 modes) off for matmul, convolution and RNN, cuDNN
    deterministic and not autotuning (``benchmark`` would pick kernels by timing, so the kernel,
    and its rounding, could change between runs). TF32 only touches float32 math: with the
    float64 default it keeps a ``dtype=float32`` run as close to float64 as float32 gets, and
    turns off what a training process may have turned on (synthesis can run inside one).

    The switches are process-wide, not per thread: while any thread encodes, other threads run
    without TF32 too (slower, never wrong). Nested and concurrent use are counted, so the
    switches are restored when the last encode leaves, to what they were when the first came.
    A switch changed by other code during an encode is overwritten then.
    """
    global _exact_depth, _exact_saved
    with _exact_lock:
        if _exact_depth == 0:
            saved = _math_flags()
            try:
                _set_math_flags(_exact_flags(saved))
            except Exception:
                _set_math_flags(saved)
                raise
            _exact_saved = saved
        _exact_depth += 1
    try:
        yield
    finally:
        with _exact_lock:
            _exact_depth -= 1
            if _exact_depth == 0 and _exact_saved is not None:
                saved, _exact_saved = _exact_saved, None
                _set_math_flags(saved)


def _encoder_dtype(device: str, dtype: Any = None) -> "torch.dtype":
    """The encoder's precision: ``dtype`` when given (a ``torch.dtype`` or its name), else float64.

    float64 on every device, CUDA included, because the codes are training targets and speech
    prompts: a corpus encoded on 64 GPUs in batches of any composition, its one-file re-encode on
    a CPU and the reference encoding at synthesis should all give the same codes, and only float64
    keeps rounding (about 1e-16) far below the gaps between codewords (float32 flips about one
    frame in ten thousand on CPU, and which ones can depend on the kernels a batch shape picks). The cost:
    the encoder needs about 2.4 GFLOP per audio second, which FP64 units on data-centre GPUs
    (A100/H100/H200: 10-67 TFLOPS) carry easily, and encoding is one pass over a corpus.
    Consumer GPUs run FP64 at 1/32-1/64 of their float32 rate; there ``dtype=float32`` (or
    ``bfloat16``) buys speed at the cost above.
    """
    import torch

    if dtype is not None:
        return getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return torch.float64


def _encode_padded(
    model: "EncodecModel", x: "torch.Tensor", chunk_frames: int, bf16: bool = False
) -> "torch.Tensor":
    """Codes ``(b, 8, T)`` of ``x`` ``(b, 1, n)``: what ``model.encode`` gives (24 kHz: no
    normalization, one frame), with the conv stack run over chunks of ``chunk_frames`` frames.

    Chunk boundaries sit on frame boundaries (multiples of 320 samples), so every strided conv
    sees whole frames and needs no end padding inside the signal; the last chunk ends where the
    signal ends and gets the same end padding as a whole pass. ``bf16``: the encoder runs under
    CUDA bfloat16 autocast; the nearest-codebook search stays in float32 (bf16 distances would tie).
    """
    import torch

    layers = model.encoder.model
    split = next(i for i, m in enumerate(layers) if type(m).__name__ == "SLSTM")
    n = x.shape[-1]
    total = num_frames(n)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    if total <= chunk_frames + CHUNK_CONTEXT_FRAMES:
        with autocast:
            emb = model.encoder(x)
    else:
        convs, rest = layers[:split], layers[split:]
        parts = []
        for f0 in range(0, total, chunk_frames):
            f1 = min(total, f0 + chunk_frames)
            c0 = max(0, f0 - CHUNK_CONTEXT_FRAMES)
            with autocast:
                y = convs(x[..., c0 * HOP_LENGTH : min(n, f1 * HOP_LENGTH)])  # (b, 512, f1 - c0)
            parts.append(y[..., f0 - c0 :])
        with autocast:
            emb = rest(torch.cat(parts, -1))
    emb = emb.to(model.quantizer.vq.layers[0]._codebook.embed.dtype)  # a no-op except after autocast
    codes = model.quantizer.encode(emb, model.frame_rate, model.bandwidth)  # (8, b, T)
    return codes.transpose(0, 1)


def encode_batch(
    wavs: Sequence["torch.Tensor"],
    device: str = "cpu",
    codec_weights: str = "pretrained",
    dtype: Any = None,
    chunk_seconds: float = CHUNK_SECONDS,
) -> list["torch.Tensor"]:
    """Codes for several mono 24 kHz signals ``(n_i,)`` in one forward pass.

    Returns one int64 CPU tensor ``(1, 8, ceil(n_i / 320))`` per input. Signals are zero-padded
    at the end to whole frames and a common length; the 24 kHz model is causal, so each signal's
    own frames are the same as when it is encoded alone (the last frame included: see below).
    ``dtype``: the encoder's precision, float64 by default on every device (why, and what
    float32 or ``"bfloat16"`` cost in reproducibility: :func:`_encoder_dtype` and the module's
    Reproducibility notes). The pass runs inside :func:`exact_encoder_math`. Memory is bounded by
    ``chunk_seconds`` of audio per row (see :func:`_encode_padded`).

    Every encode goes through here: corpus runs, :func:`encode`, :func:`encode_from_file` and
    the reference encoding at synthesis.
    """
    import torch

    if not wavs:
        return []
    lengths = [int(w.shape[-1]) for w in wavs]
    if min(lengths) == 0:
        raise AudioError("cannot encode an empty signal")
    dtype, bf16 = _weights_dtype(device, dtype)
    model = load_codec(codec_weights, device, dtype=dtype)
    dev = next(model.parameters()).device
    # Zero-padded to whole frames, alone or in a batch. Otherwise a signal's last partial frame
    # would see EnCodec's reflect end-padding when encoded alone but the zeros of a longer
    # neighbour when batched (measured: the last frame's codes differed). With whole frames the
    # causal model never pads on the right, so each row's codes are the same in any batch.
    # The batch is built on the encoder's device: from pinned memory (the corpus loader pins on
    # CUDA) the row copies are asynchronous, and float32 -> float64 is exact on any device.
    batch = torch.zeros(len(wavs), 1, num_frames(max(lengths)) * HOP_LENGTH, dtype=dtype, device=dev)
    for i, w in enumerate(wavs):
        batch[i, 0, : lengths[i]] = w.to(dev, non_blocking=True)
    chunk_frames = max(1, int(chunk_seconds * FRAME_RATE))
    with torch.inference_mode(), exact_encoder_math():
        codes = _encode_padded(model, batch, chunk_frames, bf16)
    codes = codes.cpu().long()  # (b, 8, T)
    return [codes[i : i + 1, :, : num_frames(n)].clone() for i, n in enumerate(lengths)]


def _weights_dtype(device: str, dtype: Any = None) -> tuple["torch.dtype", bool]:
    """The codec copy's dtype for encoding with ``dtype`` on ``device``, and whether bf16 autocast is on."""
    import torch

    dtype = _encoder_dtype(device, dtype)
    if dtype != torch.bfloat16:
        return dtype, False
    if not str(device).startswith("cuda"):
        raise ValueError("dtype=bfloat16 is for CUDA; on CPU use float64 (default) or float32")
    return torch.float32, True  # float32 weights under bf16 autocast: see _encode_padded


def encode(
    wav: "torch.Tensor", sr: int, device: str = "cpu", codec_weights: str = "pretrained", dtype: Any = None
) -> "torch.Tensor":
    """Codes of one signal: ``wav`` ``(n,)`` or ``(channels, n)`` at ``sr`` -> int64 ``(1, 8, T)`` on CPU.

    ``T = ceil(n24 / 320)`` where ``n24`` is the length after resampling to 24 kHz. ``dtype``: as
    in :func:`encode_batch`.
    """
    return encode_batch([to_codec_input(wav, sr)], device, codec_weights, dtype)[0]


def encode_from_file(
    path: str | Path, device: str = "cpu", codec_weights: str = "pretrained", dtype: Any = None
) -> "torch.Tensor":
    """Codes of an audio file: int64 ``(1, 8, T)`` on CPU; :class:`AudioError` names a bad file."""
    wav, sr = load_audio(path)
    return encode(wav, sr, device, codec_weights, dtype)


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
    codes = _as_codes(codes)
    if codes.shape[0] != 1:
        raise ValueError(f"decode_to_file writes one utterance; got a batch of {codes.shape[0]}")
    wav, sr = decode(codes, device, codec_weights)
    write_wav(wav, sr, path, format=_sf_format(path))


def write_wav(wav: "torch.Tensor", sample_rate: int, path: str | Path, format: str = "WAV") -> None:
    """Write float mono audio ``(n,)`` or ``(1, n)`` as 16-bit PCM, atomically (clipped to [-1, 1])."""
    import soundfile as sf

    with atomic_path(path) as tmp:
        sf.write(str(tmp), wav.reshape(-1).clamp(-1, 1).numpy(), sample_rate, subtype="PCM_16", format=format)


def _sf_format(path: str | Path) -> str:
    ext = Path(path).suffix.lower().lstrip(".")
    return {"wav": "WAV", "flac": "FLAC", "ogg": "OGG"}.get(ext, "WAV")


# --------------------------------------------------------------------------------------------
# corpora: folders and segment manifests, sharded over ranks

AUDIO_SUFFIXES = (".wav", ".flac")
MAX_WHOLE_SECONDS = 120.0  # longer files are refused without a segment manifest (memory bound)


class WriteError(OSError):
    """Writing an output failed (disk full, read-only, permission ...); the message is plain words."""


@dataclass
class Item:
    """One utterance to encode: a whole audio file, or a segment of a recording (manifest)."""

    audio: Path
    out: Path  # <id>.qnt.pt
    seconds: float  # for balancing shards and batches (0 when unknown)
    start: float | None = None  # segment bounds in seconds (manifests)
    end: float | None = None
    text: str | None = None  # manifests: written to <id>.normalized.txt beside the codes
    origin: str = ""  # how errors name it: the file, or "manifest line N (id)"

    def name(self) -> str:
        return self.origin or str(self.audio)


@dataclass
class Summary:
    """Outcome of a run (merged over ranks on rank 0); ``failed`` pairs each input with the reason.

    ``stopped`` is set when a write error ended the run early (finished outputs are kept).
    """

    written: int = 0
    skipped: int = 0
    seconds_of_audio: float = 0.0
    failed: list[tuple[str, str]] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    found: int = 0
    ranks: int = 1
    wall_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed and not self.stopped

    def merge(self, other: "Summary") -> None:
        self.written += other.written
        self.skipped += other.skipped
        self.seconds_of_audio += other.seconds_of_audio
        self.failed += other.failed
        self.stopped += other.stopped
        self.wall_seconds = max(self.wall_seconds, other.wall_seconds)

    def report(self) -> str:
        over = f" over {self.ranks} ranks" if self.ranks > 1 else ""
        lines = [
            f"qnt: {self.written} written ({self.seconds_of_audio / 3600:.3f} h of audio){over}, "
            f"{self.skipped} already done, {len(self.failed)} failed"
        ]
        lines += [f"  FAILED {path}: {reason}" for path, reason in self.failed]
        for reason in self.stopped:
            lines.append(f"  STOPPED EARLY: {reason}")
        if self.stopped:
            lines.append(
                "  Finished files are intact and no partial file was left. Fix the problem (free space, "
                "permissions) and rerun the same command: done files are skipped."
            )
        return "\n".join(lines)


def _plain_os_error(e: OSError, path: Path) -> str:
    """``no space left on device while writing X`` rather than a traceback."""
    import errno as errno_mod

    words = os.strerror(e.errno).lower() if e.errno else str(e)
    if e.errno in (errno_mod.ENOSPC, errno_mod.EDQUOT):
        words = "no space left on device" + (" (disk quota)" if e.errno == errno_mod.EDQUOT else "")
    return f"{words} while writing {path}"


def save_codes(codes: "torch.Tensor", path: str | Path) -> None:
    """Write codes ``(1, 8, T)`` as int16 (0..1023 fits; a quarter of int64's size), atomically.

    Serialized in memory first: ``torch.save`` to a path embeds the (temporary) file name in the
    archive, so equal codes would give different bytes, and a full disk surfaces as torch's
    "unexpected pos" instead of ENOSPC. Raises :class:`WriteError` in plain words.
    """
    import io

    import torch

    codes = torch.as_tensor(codes)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= CODEBOOK_SIZE):
        raise ValueError(f"codes out of range [0, {CODEBOOK_SIZE}) for {path}")
    buf = io.BytesIO()
    torch.save(codes.to(torch.int16).contiguous(), buf)
    try:
        atomic_write_bytes(buf.getvalue(), path)
    except OSError as e:
        raise WriteError(e.errno, _plain_os_error(e, Path(path))) from e


def _write_text(text: str, path: Path) -> None:
    try:
        atomic_write_bytes(text.encode("utf-8"), path)
    except OSError as e:
        raise WriteError(e.errno, _plain_os_error(e, path)) from e


def find_audio(folder: str | Path, suffixes: Sequence[str] = AUDIO_SUFFIXES) -> list[Path]:
    """Audio files under ``folder`` (recursive), suffixes matched ignoring case (``.WAV`` too); sorted."""
    return find_files_nocase(folder, tuple(suffixes))


def plan_folder(
    folder: str | Path, suffixes: Sequence[str] = AUDIO_SUFFIXES, max_seconds: float = MAX_WHOLE_SECONDS
) -> tuple[list[Item], list[tuple[str, str]], int]:
    """Every audio file under ``folder`` as an :class:`Item`; returns ``(items, failed, found)``.

    Inputs that map to one utterance id in one folder (``spk.take.1.wav`` and ``spk.take.2.wav``
    are both ``spk``; ``x.wav`` and ``x.flac``) are all failed with a message naming every one:
    nothing is written for that id. Unreadable files get ``seconds = 0`` and fail when loaded, on
    the rank that owns them. Files over ``max_seconds`` fail with what to do instead.
    """
    import soundfile as sf

    files = find_audio(folder, suffixes)
    groups: dict[tuple[Path, str], list[Path]] = {}
    for path in files:
        groups.setdefault((path.parent, utterance_id(path)), []).append(path)
    items: list[Item] = []
    failed: list[tuple[str, str]] = []
    for (parent, uid), paths in groups.items():
        if len(paths) > 1:
            names = " and ".join(p.name for p in paths)
            for path in paths:
                failed.append((str(path), (
                    f"id collision: {names} (in {parent}) all map to the id {uid!r} (the name before the "
                    f"first dot) and would write one {uid}{QNT_SUFFIX}; rename them so each id is unique"
                    + ("" if len({p.suffix.lower() for p in paths}) == 1 else
                       ", or pick one format with --suffix (e.g. --suffix .wav)")
                )))
            continue
        path = paths[0]
        seconds = 0.0
        try:
            info = sf.info(str(path))
            seconds = info.frames / info.samplerate
        except Exception:
            pass  # reported when loaded: the owning rank names the file and the reason
        if seconds > max_seconds:
            failed.append((str(path), (
                f"{seconds:.0f} s of audio is over the {max_seconds:.0f} s limit for loading a whole file "
                "(--max-seconds): cut it into utterances, or use a segment manifest "
                "(python -m vall_e.emb.qnt segments.jsonl out/)"
            )))
            continue
        items.append(Item(path, sibling(path, QNT_SUFFIX), seconds))
    return sorted(items, key=lambda it: str(it.out)), failed, len(files)


def read_manifest(
    manifest: str | Path, out_folder: str | Path, max_seconds: float = MAX_WHOLE_SECONDS
) -> tuple[list[Item], list[tuple[str, str]], int]:
    """Items of a segment manifest (JSON lines, see DESIGN.md); returns ``(items, failed, lines)``.

    Each line: ``{"id", "audio", "start", "end", "text", "speaker"}``; relative ``audio`` paths
    are taken from the manifest's folder. Outputs: ``<out>/<speaker>/<id>.qnt.pt`` and
    ``<id>.normalized.txt``. Bad lines are failed with their line number (a line that is not UTF-8,
    not JSON, lacks a field, or has a field of the wrong type: ``text`` and ``audio`` are strings,
    ``id`` and ``speaker`` strings or integers, ``start`` and ``end`` finite numbers); two lines
    with one ``<speaker>/<id>`` are both failed, naming both.

    Raises:
        ValueError: the file cannot be read as a whole (not gzip though named ``.gz``, truncated
            gzip); the message names the file.
    """
    import gzip
    import json
    import zlib

    manifest = Path(manifest)
    plan = _ManifestPlan(manifest, Path(out_folder), max_seconds)
    n = 0
    try:
        f = gzip.open(manifest, "rb") if manifest.name.lower().endswith(".gz") else open(manifest, "rb")
        with f:
            for n, raw in enumerate(f, 1):  # bytes: one undecodable line fails alone, with its number
                if not raw.strip():
                    continue
                where = f"{manifest}:{n}"
                try:
                    fields = _segment_fields(json.loads(raw.decode("utf-8")))
                except UnicodeDecodeError:
                    plan.failed.append((where, "not UTF-8 text; save the manifest as UTF-8"))
                    continue
                except _FieldError as e:
                    plan.failed.append((where, f"{e}; {_LINE_FORM}"))
                    continue
                except ValueError as e:  # json.JSONDecodeError
                    plan.failed.append((where, f"not JSON ({e}); {_LINE_FORM}"))
                    continue
                plan.add(n, where, *fields)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(f"{manifest}: cannot read it as gzip ({e}); a *.gz manifest must be gzip-compressed "
                         "and complete: download or compress it again") from None
    return list(plan.items.values()), plan.failed, n


_LINE_FORM = 'each line is {"id": str, "audio": path, "start": s, "end": s, "text": str, "speaker": str}'


class _FieldError(ValueError):
    """A manifest line with a missing field or a field of the wrong type."""


def _segment_fields(row: Any) -> tuple[str, str, str, float, float, str]:
    """``(id, speaker, audio, start, end, text)`` of one parsed manifest line, types checked.

    ``text`` and ``audio`` must be strings (``str(None)`` would open a file named ``None`` and
    write the transcript ``None``); ``id`` and ``speaker`` strings or integers (speaker ``100``);
    ``start`` and ``end`` finite numbers of seconds (numeric strings are accepted).
    """
    if not isinstance(row, dict):
        raise _FieldError(f"the line is {_json_type(row)}, not an object")
    missing = [k for k in ("id", "audio", "start", "end", "text", "speaker") if k not in row]
    if missing:
        raise _FieldError(f"missing field(s) {', '.join(missing)}")
    for key in ("id", "speaker"):
        if isinstance(row[key], bool) or not isinstance(row[key], (str, int)):
            raise _FieldError(f"{key} must be a string, got {_json_type(row[key])}")
    for key in ("audio", "text"):
        if not isinstance(row[key], str):
            raise _FieldError(f"{key} must be a string, got {_json_type(row[key])}")
    times = []
    for key in ("start", "end"):
        value = row[key]
        try:
            seconds = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else math.nan
        except ValueError:
            seconds = math.nan
        if not math.isfinite(seconds):
            raise _FieldError(f"{key} must be a finite number of seconds, got {value!r}")
        times.append(seconds)
    return str(row["id"]), str(row["speaker"]), row["audio"], times[0], times[1], row["text"]


def _json_type(value: Any) -> str:
    """JSON's name for the type of a parsed value (``null``, ``a number``, ``an array`` ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__)


@dataclass
class _ManifestPlan:
    """The items of a manifest being read, by output path (insertion order is manifest order)."""

    manifest: Path
    out_folder: Path
    max_seconds: float
    items: dict[Path, Item] = field(default_factory=dict)
    failed: list[tuple[str, str]] = field(default_factory=list)
    line_of: dict[Path, int] = field(default_factory=dict)  # output -> the first line that names it
    collided: set[Path] = field(default_factory=set)

    def add(self, n: int, where: str, uid: str, spk: str, audio: str, start: float, end: float, text: str) -> None:
        """Plan one type-checked line, or fail it (and the line it collides with)."""
        problem = _segment_problem(uid, spk, start, end, self.max_seconds)
        if problem:
            self.failed.append((where, problem))
            return
        out = inside(self.out_folder, self.out_folder / spk / f"{uid}{QNT_SUFFIX}")
        if out in self.line_of:  # both lines fail: which one is right is unknown
            reason = (f"id collision: lines {self.line_of[out]} and {n} of {self.manifest} both write {out}; "
                      "give each segment a unique id per speaker")
            self.failed.append((where, reason))
            if out not in self.collided:
                self.collided.add(out)
                self.failed.append((f"{self.manifest}:{self.line_of[out]}", reason))
                del self.items[out]
            return
        path = Path(audio).expanduser()
        if not path.is_absolute():
            path = self.manifest.parent / path
        self.line_of[out] = n
        self.items[out] = Item(path, out, end - start, start, end, text, f"{where} ({uid})")


def _segment_problem(uid: str, speaker: str, start: float, end: float, max_seconds: float) -> str | None:
    """What is wrong with a manifest line's names and times, or None."""
    for what, value in (("id", uid), ("speaker", speaker)):
        problem = name_problem(value)  # the project's one rule for names that become paths
        if problem:
            return f"{what} {value!r} cannot be a file name: it {problem}"
    if "." in uid:
        return f"id {uid!r} contains a dot: an utterance id is the name before the first dot; replace the dots"
    if not 0 <= start < end:
        return f"start={start} end={end}: need 0 <= start < end (seconds)"
    if end - start > max_seconds:
        return (f"segment of {end - start:.0f} s is over the {max_seconds:.0f} s limit (--max-seconds); "
                "cut it into shorter segments")
    return None


class _AudioSet:
    """Map-style dataset for a DataLoader: item i -> ``(i, mono 24 kHz float32 (n,) or None, error or None)``.

    Decoding and resampling run in DataLoader workers, so the encoder is not kept waiting on audio.
    """

    def __init__(self, items: list[Item]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, Any, str | None]:
        item = self.items[i]
        try:
            wav, sr = load_audio(item.audio, item.start, item.end)
            return i, to_codec_input(wav, sr), None
        except AudioError as e:  # a folder's item is named by its audio path already; a segment's is not
            return i, None, str(e).removeprefix(f"{item.audio}: ") if not item.origin else str(e)
        except Exception as e:  # e.g. a resampler error: report, never kill the run
            return i, None, f"cannot load audio ({type(e).__name__}: {e})"


def _worker_init(_: int) -> None:
    import torch

    torch.set_num_threads(1)  # workers decode and resample; the encoder owns the cores


def _identity(batch: list[Any]) -> list[Any]:
    return batch


def _batches(items: list[tuple[Any, float]], batch_seconds: float) -> list[list[tuple[Any, float]]]:
    """Group (key, seconds) by length, longest first; a batch's padded size stays within budget."""
    items = sorted(items, key=lambda x: -x[1])
    out: list[list[tuple[Any, float]]] = []
    for item in items:
        # the first (longest) file of a batch sets its padded length
        if out and (len(out[-1]) + 1) * out[-1][0][1] <= batch_seconds:
            out[-1].append(item)
        else:
            out.append([item])
    return out


def shard(items: list[Item], rank: int, world_size: int) -> list[Item]:
    """This rank's items: a deterministic split balanced by audio seconds (see
    :func:`~vall_e.utils.helpers.balanced_shards`). It is computed from the inputs alone, never
    from which outputs exist, so ranks that start at different times still agree."""
    if world_size == 1:
        return list(items)
    return [items[i] for i in balanced_shards([it.seconds for it in items], world_size)[rank]]


# Sizing CUDA batches. Peak activation memory of a forward pass is about rows x min(longest
# row, CHUNK_SECONDS) x these bytes (measured on CPU in float64: 45 MB per row-second; the rest is
# headroom for cuDNN workspaces and the codebook search's (frames, 1024) distances, about 2 MB
# per audio second), which padded seconds (rows x longest row) bound from above.
ACTIVATION_BYTES_PER_SECOND = {8: 60e6, 4: 30e6, 2: 30e6}  # by element size; bf16 keeps float32 weights
CUDA_MEMORY_FRACTION = 0.5  # of the memory free once the codec is loaded: the rest is allocator slack
CUDA_BATCH_SECONDS = (30.0, 1200.0)  # bounds; the top one caps the loader's pinned prefetch
CUDA_BATCH_SECONDS_UNKNOWN = 120.0  # when free memory cannot be read
CUDA_WORKERS = 4


@dataclass(frozen=True)
class EncodePlan:
    """How a corpus run feeds the encoder: padded audio per forward pass, loader workers, pinning."""

    batch_seconds: float  # 0: one file per pass
    workers: int  # DataLoader worker processes reading and resampling audio
    pin_memory: bool  # page-locked loader buffers, for asynchronous host-to-device copies


def encode_plan(
    device: str,
    dtype: Any = None,
    free_bytes: int | None = None,
    batch_seconds: float | None = None,
    workers: int | None = None,
) -> EncodePlan:
    """The :class:`EncodePlan` for ``device``; ``batch_seconds``/``workers`` given are kept.

    CPU: one file per pass (batching measured no faster), no workers (the encoder uses the
    cores), no pinning. CUDA: ``free_bytes`` (GPU memory free with the codec loaded) x
    :data:`CUDA_MEMORY_FRACTION` / :data:`ACTIVATION_BYTES_PER_SECOND` of the encoder's dtype,
    clamped to :data:`CUDA_BATCH_SECONDS` (about 1140 s of padded audio per pass on a 141 GB
    H200 in float64, 650 s on an 80 GB card, 190 s on 24 GB; 120 s when ``free_bytes`` is None),
    4 workers, pinned memory. A pass that still runs out of memory falls back to one file at a time.
    """
    import torch

    if not str(device).startswith("cuda"):
        return EncodePlan(0.0 if batch_seconds is None else batch_seconds, workers or 0, False)
    if batch_seconds is None:
        if free_bytes is None:
            batch_seconds = CUDA_BATCH_SECONDS_UNKNOWN
        else:
            weights, _ = _weights_dtype(device, dtype)
            per_second = ACTIVATION_BYTES_PER_SECOND[torch.empty((), dtype=weights).element_size()]
            lo, hi = CUDA_BATCH_SECONDS
            batch_seconds = float(min(hi, max(lo, free_bytes * CUDA_MEMORY_FRACTION / per_second)))
    return EncodePlan(batch_seconds, CUDA_WORKERS if workers is None else workers, True)


def _free_device_bytes(device: str) -> int | None:
    """Memory a CUDA ``device`` can still give this process, in bytes; None for other devices.

    The driver's free memory plus what torch's caching allocator holds unused (a process that
    encoded or trained before keeps its freed blocks reserved).
    """
    import torch

    if not str(device).startswith("cuda"):
        return None
    dev = torch.device(device)
    free, _total = torch.cuda.mem_get_info(dev)
    return int(free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev))


def encode_items(
    items: list[Item],
    device: str = "cpu",
    codec_weights: str = "pretrained",
    batch_seconds: float | None = None,
    dtype: Any = None,
    workers: int | None = None,
    progress: bool = True,
) -> Summary:
    """Encode ``items`` (skipping those whose outputs exist) and write their files; one rank's work.

    Unreadable audio is failed and the rest go on. A write error (disk full, read-only folder,
    permission) stops the run with :attr:`Summary.stopped` set; finished outputs stay intact.
    ``batch_seconds`` caps padded audio per forward pass and ``workers`` sets the DataLoader
    worker processes that read and resample audio; the defaults come from :func:`encode_plan`
    (CPU: one file per pass, no workers; CUDA: sized from free GPU memory, 4 workers, pinned memory).
    """
    import torch
    from tqdm import tqdm

    summary = Summary()
    todo: list[Item] = []
    for item in items:
        if item.out.exists() and (item.text is None or item.out.with_name(
                utterance_id(item.out) + TEXT_SUFFIX).exists()):
            summary.skipped += 1
        else:
            todo.append(item)
    if not todo:
        return summary
    # the encoder's copy of the codec: fails early (e.g. offline pretrained), before the bar, and
    # is on the GPU when its free memory is measured
    load_codec(codec_weights, device, dtype=_weights_dtype(device, dtype)[0])
    plan = encode_plan(device, dtype, _free_device_bytes(device), batch_seconds, workers)
    logger.info("qnt on %s: %s, up to %.0f s of padded audio per pass, %d loader workers%s", device,
                str(_encoder_dtype(device, dtype)).removeprefix("torch."), plan.batch_seconds, plan.workers,
                ", pinned memory" if plan.pin_memory else "")
    batches = [[i for i, _ in b] for b in _batches([(i, it.seconds) for i, it in enumerate(todo)], plan.batch_seconds)]
    loader = torch.utils.data.DataLoader(
        _AudioSet(todo), batch_sampler=batches, collate_fn=_identity, num_workers=plan.workers,
        worker_init_fn=_worker_init if plan.workers else None,
        # spawned, not forked: this process may run gloo threads, and a fork of those can hang
        multiprocessing_context="spawn" if plan.workers else None,
        pin_memory=plan.pin_memory,
    )
    bar = tqdm(total=len(todo), desc="qnt", unit="file", disable=not progress, dynamic_ncols=True)
    try:
        for batch in loader:
            ok = []
            for i, wav, error in batch:
                if error is not None:
                    summary.failed.append((todo[i].name(), error))
                else:
                    ok.append((i, wav))
            try:
                codes: list[Any] = encode_batch([w for _, w in ok], device, codec_weights, dtype)
            except RuntimeError:  # e.g. out of memory for the batch: fall back to one file at a time
                codes = []
                for i, wav in ok:
                    try:
                        codes.append(encode_batch([wav], device, codec_weights, dtype)[0])
                    except RuntimeError as e:
                        codes.append(None)
                        summary.failed.append((todo[i].name(), f"encoding failed: {str(e).splitlines()[0]}"))
            for (i, wav), c in zip(ok, codes):
                if c is None:
                    continue
                item = todo[i]
                if item.text is not None:  # text first: the codes file marks the utterance done
                    _write_text(item.text.strip() + "\n", item.out.with_name(utterance_id(item.out) + TEXT_SUFFIX))
                save_codes(c, item.out)
                summary.written += 1
                summary.seconds_of_audio += len(wav) / SAMPLE_RATE
            bar.update(len(batch))
            bar.set_postfix(audio_h=f"{summary.seconds_of_audio / 3600:.3f}")
    except WriteError as e:
        summary.stopped.append(e.strerror or str(e))
    finally:
        bar.close()
    return summary


def quantize(
    source: str | Path,
    out_folder: str | Path | None = None,
    suffix: str | Sequence[str] | None = None,
    device: str = "cpu",
    codec_weights: str = "pretrained",
    batch_seconds: float | None = None,
    progress: bool = True,
    max_seconds: float = MAX_WHOLE_SECONDS,
    dtype: Any = None,
    workers: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> Summary:
    """Encode a corpus folder (codes beside each audio file) or a segment manifest (into ``out_folder``).

    ``rank``/``world_size`` default to the launcher's environment (RANK, WORLD_SIZE): each rank
    encodes its own duration-balanced shard. The returned summary is this rank's; :func:`main`
    merges them on rank 0. Input-level problems (collisions, bad manifest lines, over-long
    files) are reported by rank 0 only, so each appears once.
    """
    start = time.time()
    env_rank, env_world, _ = dist_env()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist (give a corpus folder, one audio file, or a manifest)")
    if is_manifest(source):
        if out_folder is None:
            raise ValueError(f"{source} is a segment manifest: give the output folder too")
        items, failed, found = read_manifest(source, out_folder, max_seconds)
    else:
        suffixes = AUDIO_SUFFIXES if suffix is None else ((suffix,) if isinstance(suffix, str) else tuple(suffix))
        items, failed, found = plan_folder(source, suffixes, max_seconds)
    summary = encode_items(shard(items, rank, world_size), device, codec_weights, batch_seconds, dtype,
                           workers, progress=progress and rank == 0)
    if rank == 0:
        summary.failed = failed + summary.failed
    summary.found = found
    summary.wall_seconds = time.time() - start
    return summary


def quantize_folder(
    folder: str | Path,
    suffix: str | Sequence[str] | None = None,
    device: str = "cpu",
    codec_weights: str = "pretrained",
    batch_seconds: float | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> Summary:
    """Write ``<id>.qnt.pt`` (int16 ``(1, 8, T)``) beside every audio file under ``folder``.

    ``suffix`` defaults to ``.wav`` and ``.flac``, any case. Files already done are skipped;
    unreadable or empty files are recorded in the summary and skipped while the rest go on;
    outputs are written atomically. See :func:`quantize` for the other options.
    """
    return quantize(folder, None, suffix, device, codec_weights, batch_seconds, progress, **kwargs)


def is_manifest(path: str | Path) -> bool:
    """A segment manifest is a file named ``*.jsonl`` or ``*.jsonl.gz``."""
    path = Path(path)
    return path.is_file() and path.name.lower().endswith((".jsonl", ".jsonl.gz"))


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (1 when any input failed, 2 on a setup error or when a
    write error stopped the run). Under torchrun every rank runs this; rank 0 prints the merged summary."""
    import json

    import torch

    from ..config import Config

    argv = list(sys.argv[1:] if argv is None else argv)
    # every identifier=value word is config (a typo gets "did you mean"), the rest is argparse's
    words = [w for w in argv if _CONFIG_WORD.match(w)]
    rest = [w for w in argv if not _CONFIG_WORD.match(w)]
    cfg = Config.from_cli(words)
    parser = argparse.ArgumentParser(
        prog="python -m vall_e.emb.qnt",
        description="Write <id>.qnt.pt (EnCodec 24 kHz codes, int16 (1, 8, T)) beside every audio file, "
        "or for every line of a segment manifest. Under torchrun each rank encodes its own shard.",
        epilog="Config overrides such as codec_weights=untrained device=cpu are accepted; "
        "help=true lists them. Example: torchrun --nproc_per_node 8 -m vall_e.emb.qnt data/LibriTTS device=cuda",
    )
    parser.add_argument("source", type=Path, help="corpus folder (searched recursively), or segments.jsonl[.gz]")
    parser.add_argument("out", type=Path, nargs="?", help="output folder (segment manifests only)")
    parser.add_argument("--suffix", action="append", default=None,
                        help="audio suffix, any case; repeatable (default: .wav and .flac)")
    parser.add_argument(
        "--batch-seconds", type=float, default=None,
        help="padded audio seconds per forward pass (default: one file per pass on CPU; on CUDA "
        "sized from free GPU memory, 30..1200)",
    )
    parser.add_argument("--max-seconds", type=float, default=MAX_WHOLE_SECONDS,
                        help=f"longest file or segment loaded whole (default {MAX_WHOLE_SECONDS:.0f}); "
                        "longer recordings need a segment manifest")
    parser.add_argument("--dtype", choices=["float64", "float32", "bfloat16"], default=None,
                        help="encoder precision (default float64 on every device: codes independent of batching "
                        "and device; float32/bfloat16 are faster on consumer GPUs but not reproducible)")
    parser.add_argument("--workers", type=int, default=None,
                        help="audio loading worker processes (default 0 on CPU, 4 on CUDA)")
    parser.add_argument("--summary-json", type=Path, default=None, help="also write the merged summary as JSON")
    args = parser.parse_args(rest)
    setup_logging()
    if not args.source.exists():
        print(f"error: {args.source} does not exist", file=sys.stderr)
        return 2
    manifest = is_manifest(args.source)
    if manifest and args.out is None:
        print(f"error: {args.source} is a segment manifest; give the output folder too: "
              f"python -m vall_e.emb.qnt {args.source} data/out", file=sys.stderr)
        return 2
    if not manifest and args.out is not None:
        print(f"error: an output folder is only for segment manifests (*.jsonl); codes of a folder "
              f"are written beside its audio files. Got {args.source} {args.out}", file=sys.stderr)
        return 2
    # outputs are checked before the codec loads: a read-only or misnamed target costs a second
    if manifest:
        refuse_inputs(args.out, [("manifest", args.source)], "output folder")
        writable_folder(args.out, "output folder")
    if args.summary_json is not None:
        refuse_inputs(args.summary_json, [("manifest" if manifest else "corpus", args.source)], "--summary-json")
        writable_file(args.summary_json, "--summary-json")
    try:
        rank, world, local_rank = dist_env()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = cfg.device
    if device == "cuda" and world > 1 and torch.cuda.is_available():  # one GPU per rank, on every node
        if local_rank >= torch.cuda.device_count():
            print(f"error: LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPU(s); "
                  "start at most one rank per GPU (--nproc_per_node)", file=sys.stderr)
            return 2
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    merged = init_gloo_for_summary(world)
    try:
        summary = quantize(args.source, args.out, args.suffix, device, cfg.codec_weights, args.batch_seconds,
                           max_seconds=args.max_seconds, dtype=args.dtype, workers=args.workers)
        setup_error = None
    except (CodecUnavailableError, ValueError, OSError) as e:
        summary, setup_error = Summary(), f"rank {rank}: {e}" if world > 1 else str(e)
    gathered = gather_to_rank0((summary, setup_error), world if merged else 1)
    if merged:
        import torch.distributed as dist

        dist.destroy_process_group()
    if gathered is None:  # other ranks: rank 0 reports for everyone
        return _status(summary) if setup_error is None else 2
    errors = [err for _, err in gathered if err]
    total = Summary(ranks=len(gathered), found=gathered[0][0].found)
    for s, _ in gathered:
        total.merge(s)
    if errors:
        for err in dict.fromkeys(errors):
            print(f"error: {err}", file=sys.stderr)
        return 2
    if total.found == 0:
        what = "lines in the manifest" if manifest else (
            f"audio files ({', '.join('*' + x for x in (args.suffix or AUDIO_SUFFIXES))}, any case)")
        print(f"error: no {what} under {args.source}. Check the path"
              + ("" if manifest else ", or pass --suffix for another format (e.g. --suffix .ogg)"), file=sys.stderr)
        return 2
    if world > 1 and not merged:
        print(f"(rank {rank} of {world}: this shard only; start ranks with torchrun to get one merged summary)")
    print(total.report() + f"\n({total.wall_seconds:.1f} s)")
    if args.summary_json is not None:
        atomic_write_bytes(json.dumps({
            "written": total.written, "skipped": total.skipped, "failed": total.failed,
            "stopped": total.stopped, "found": total.found, "ranks": total.ranks,
            "seconds_of_audio": total.seconds_of_audio, "wall_seconds": total.wall_seconds,
            "per_rank_written": [s.written for s, _ in gathered],
        }, indent=1).encode(), args.summary_json)
    return _status(total)


def _status(summary: Summary) -> int:
    """0: all done; 1: some inputs failed (the rest are written); 2: a write error stopped the run,
    which a rerun would repeat until the disk is fixed (``scripts/run.sh`` does not restart 2)."""
    return 2 if summary.stopped else (0 if summary.ok else 1)


if __name__ == "__main__":
    raise SystemExit(main())
