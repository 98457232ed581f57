"""The codec: EnCodec 24 kHz at 6 kbps (8 codebooks of 1024, 75 frames/s), audio <-> codes.

The one home of the EnCodec details: loading the weights (pretrained, a local file, or the offline
``untrained`` stand-in), reading audio, encoding and decoding. The batch job over corpus folders
and segment manifests (``python -m vall_e.emb.qnt``) is :mod:`vall_e.emb.qnt`, which re-exports
these names for older imports.

Library: :func:`encode`, :func:`encode_from_file`, :func:`encode_batch`, :func:`decode`,
:func:`decode_to_file`, :func:`load_codec`, :func:`load_audio`, :func:`to_codec_input`,
:func:`write_wav`.

Memory: the encoder's conv stack runs over 5 s chunks (:func:`_encode_padded`), so activation
memory grows with the chunk, not the file.

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

import contextlib
import logging
import math
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from ..utils.errors import torch_load_reason
from ..utils.helpers import atomic_path

if TYPE_CHECKING:
    import torch
    from encodec import EncodecModel

logger = logging.getLogger(__name__)

SAMPLE_RATE = 24_000
HOP_LENGTH = 320  # samples per frame: 24000 / 320 = 75 frames/s
FRAME_RATE = SAMPLE_RATE // HOP_LENGTH
BANDWIDTH = 6.0  # kbps -> 8 codebooks
N_CODEBOOKS = 8
CODEBOOK_SIZE = 1024
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
