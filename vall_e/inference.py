"""Zero-shot synthesis from exported models: the Python API behind ``python -m vall_e``.

One call::

    import vall_e
    wav, sr = vall_e.synthesize("Hello there.", "ref.wav", "zoo/ar.pt", "zoo/nar.pt")  # wav: (1, n)

Many calls with the models loaded once::

    from vall_e.inference import Synthesizer, Request
    synth = Synthesizer("zoo/ar.pt", "zoo/nar.pt", device="cpu", codec_weights="pretrained")
    out = synth.synthesize("Hello there.", "ref.wav", seed=0)            # -> Synthesis
    outs = synth.synthesize_batch([Request("One.", "a.wav"), Request("Two.", "b.wav")], seed=0)

How a request becomes audio (Wang et al. 2023):

1. text -> phones with the training g2p (:func:`vall_e.emb.g2p.encode`), wrapped ``<s> … </s>`` and
   mapped through each model's own phone map (phones a model never saw are an error that names
   them and the words they came from);
2. the reference -> mono 24 kHz (any rate, any channel count) -> its first ``prompt_seconds``
   -> EnCodec codes ``(t, 8)``: the acoustic prompt;
3. the AR samples codebook 1 until its stop token (KV cache, one batch for many requests);
4. the NAR fills codebooks 2..8, one greedy-ish pass per level;
5. the EnCodec decoder turns the ``(t, 8)`` codes into a 24 kHz waveform.

Continuation mode (``ref_text`` = the transcript of the reference): this is the paper's standard
VALL-E inference, where the enrolled recording's transcript precedes the target text and its codes
are the AR's prefix. (The paper's VALL-E-continual is a different setting: the first 3 s of the
*same* utterance as the prompt, continued.) The reference's phones precede the target's in the text, the whole reference is the prompt, and
the AR continues from the reference's own codebook-1 codes (``prefix_list``). The NAR fills the
levels of the generated frames while the reference's frames keep their true codes at every
level; the decoder runs over reference + new frames (the codec is causal, so the joint is
smooth) and only the new part is returned. ``prompt_seconds`` does not apply there: the
transcript must match the audio.

Prompt modes (recorded in each exported model as ``prompt_mode``; synthesis follows them):

- ``speaker`` (the reference's): the AR and NAR read the reference's codes in their prompt slot;
  no transcript of the reference is needed.
- ``paper`` (Wang et al. 2023, section 4): the AR was trained as a plain language model over one
  utterance's phones and codebook 1, so it needs the reference's transcript (``ref_text``): the
  reference's phones precede the target's and its codes are the AR's prefix, with an empty prompt
  slot. The paper-mode NAR reads at most ``prompt_seconds`` of the reference as its prompt (it was
  trained on 3 s segments). :attr:`Synthesizer.needs_ref_text` tells which kind of AR is loaded.
- ``Request(continual=True)``: the paper's VALL-E-continual, for either mode: the reference is the
  first ``prompt_seconds`` of the utterance whose whole transcript is the text; it is continued.

Decoding safeguards (on the AR):

- the stop token is never filtered out by ``top_k``/``top_p``;
- the length guard: each output is cut at ``frames_per_phone`` x the target's phone count (default:
  the largest frames/phones ratio of the model's training set, recorded at export), and at
  ``max_ar_steps``; :attr:`Synthesis.cut` says which limit ended an output that the model did not stop;
- ``ras=True``: repetition-aware sampling (VALL-E 2, arXiv 2406.05370, section 3.3; off by default):
  a code drawn by the nucleus/top-k rule whose share of the last ``ras_window`` (paper: 10) codes
  exceeds ``ras_threshold`` (paper: 0.1) is redrawn from the plain temperature distribution. It
  only changes anything together with a filter (``top_p < 1`` as in the paper, ``top_k``, or greedy).

Reference checks (:meth:`Synthesizer.encode_reference`), on the part of the reference that becomes
the prompt:

- shorter than :data:`MIN_REFERENCE_SECONDS` (0.5 s): an error. Under 40 EnCodec frames carry too
  little of a voice for the output to resemble it, and a user would rather hear that at once than
  listen to a stranger's voice.
- longer than :data:`MAX_REFERENCE_SECONDS` (30 s; reached only when the whole reference is the
  prompt: ``prompt_seconds`` 0/None or a ``ref_text``): an error. Training utterances are at most
  about 35 s including the target, so such a prompt is out of what the models learned, and the AR's
  cost grows with the square of its length (a 10-minute prompt ran for minutes on CPU before this
  check). The fix is one flag (``--prompt-seconds 3``) or a cropped file.
- silent (peak under :data:`SILENT_PEAK`, -60 dBFS): an error; there is no voice to imitate.
- a WAV whose header promises more audio than the file holds (an interrupted copy): a warning.
  What is there is valid audio, and it may well be enough.

Only the prompt's part of a file is decoded, so a long recording with the default 3 s prompt costs
3 s of decoding.

Grouped ARs (``group_size`` G > 1 in the AR file, VALL-E 2's grouped code modeling): the AR reads and
writes G frames per step, so every prompt and prefix is cut to whole groups, its last ``t % G`` frames
(under 40 ms at G <= 4) dropped, for both models: the 3 s ``prompt_seconds`` crop (225 frames) becomes
224 frames at G = 2 or 4, a continuation prefix the same. :attr:`Synthesis.prefix_frames` says how
many frames of the reference an output continues. Limits (``max_ar_steps``, the length guard) count
frames whatever G is.

Reproducibility: the same requests, options and ``seed`` give identical audio (one
``torch.Generator`` per batch, seeded ``seed + batch index``) on the same device and software.
"""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

if TYPE_CHECKING:
    import argparse

    import torch
    from torch import Tensor

    from .base import Base

# VALL-E 2's repetition-aware sampling defaults (window K, threshold t_r); the same values as vall_e.base's
RAS_WINDOW = 10
RAS_THRESHOLD = 0.1
DEFAULT_PROMPT_SECONDS = 3.0  # the paper's 3 s enrolled recording
MIN_REFERENCE_SECONDS = 0.5  # shorter prompts carry too little of a voice (see the module docstring)
MAX_REFERENCE_SECONDS = 30.0  # longer prompts are beyond the training utterances and cost quadratically
SILENT_PEAK = 1e-3  # -60 dBFS: a prompt whose loudest sample is below this holds no voice

logger = logging.getLogger(__name__)
SEPARATOR = "_"  # g2p's word separator; joins the reference's and the target's phones

RefAudio = Union[str, Path, "tuple[Tensor, int]"]  # a file, or (waveform (n,) / (channels, n), sample rate)


class SynthesisError(ValueError):
    """A request that cannot be synthesized (empty text, unknown phones, bad options); says what to fix."""


class BatchRequestError(SynthesisError):
    """Several requests of one batch cannot be synthesized; nothing was generated.

    Attributes:
        errors: ``(request index, error)`` for every bad request, in request order.
    """

    def __init__(self, errors: "list[tuple[int, Exception]]", total: int):
        lines = "\n".join(f"  {e}" for _, e in errors)
        super().__init__(f"{len(errors)} of {total} requests cannot be synthesized (nothing was generated):\n{lines}")
        self.errors = errors


class UnknownPhonesError(SynthesisError):
    """The text has phones a model never saw in training.

    Attributes:
        phones: the unknown phones, sorted.
        words: for each unknown phone, the words of the text it came from.
    """

    def __init__(self, message: str, phones: list[str], words: dict[str, list[str]]):
        super().__init__(message)
        self.phones = phones
        self.words = words


@dataclass
class Request:
    """One line of work: ``text`` in the voice of ``ref_wav``.

    ``ref_text`` (the reference's transcript) turns on continuation mode. ``continual=True`` is the
    paper's VALL-E-continual setting: ``ref_wav`` is the beginning of the utterance that ``text``
    transcribes in full; its first ``prompt_seconds`` are the prompt and the AR's prefix, and only the
    continuation is returned (no ``ref_text``).
    """

    text: str
    ref_wav: RefAudio
    ref_text: Optional[str] = None
    label: Optional[str] = None  # names the request in error messages, e.g. "lines.txt:3"
    continual: bool = False


@dataclass
class Synthesis:
    """One result.

    Attributes:
        wav: float32 ``(1, n)`` on CPU at ``sample_rate`` (only the new part in continuation mode);
            ``n == 0`` when the AR stopped at once.
        sample_rate: 24000.
        codes: ``(t, 8)`` the generated codes (without the reference's in continuation mode).
        seed: the seed of the call (given or drawn); the same requests and options with it give the same audio.
        stopped: False when the AR did not emit its stop token: the audio is cut (see ``cut``).
        phones: the phones the models read, without ``<s>``/``</s>``.
        cut: why an output that did not stop was cut: ``"length_guard"`` (``frames_per_phone`` x the
            target's phones) or ``"max_ar_steps"``; None when the AR stopped by itself.
        max_frames: the frame limit this output had (the smaller of the length guard and ``max_ar_steps``).
        prefix_frames: frames of the reference this output continues (continuation modes; 0 otherwise),
            whole groups of a grouped AR: the audio before ``wav`` is the reference's first
            ``prefix_frames / 75`` seconds.
    """

    wav: "Tensor"
    sample_rate: int
    codes: "Tensor"
    seed: int
    stopped: bool
    phones: list[str] = field(default_factory=list)
    cut: Optional[str] = None
    max_frames: int = 0
    prefix_frames: int = 0

    @property
    def seconds(self) -> float:
        return self.wav.shape[-1] / self.sample_rate


# --------------------------------------------------------------------------------------------
# models


def resolve_device(device: Optional[str]) -> str:
    """``None`` -> ``"cuda"`` when available, else ``"cpu"``; a CUDA request without CUDA is an error."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise SynthesisError(f"device={device!r} but CUDA is not available here; use --device cpu")
    return str(device)


def load_model(path: str | Path, kind: Optional[str] = None, device: str = "cpu") -> tuple["Base", dict[str, Any]]:
    """Load an exported model file (``python -m vall_e.export``) in eval mode on ``device``.

    Args:
        path: the inference file.
        kind: ``"ar"`` or ``"nar"`` to insist on one (a swapped pair of files is a clear error).
        device: where the model goes.
    Returns:
        (model, metadata without the weights).
    Raises:
        vall_e.export.InferenceFileError: missing, corrupt, wrong kind, or weights that do not fit.
    """
    from .models import build_model
    from .export import InferenceFileError, read_inference_file

    data = read_inference_file(path)
    if kind is not None and data["kind"] != kind:
        flag = "--ar-ckpt" if kind == "ar" else "--nar-ckpt"
        raise InferenceFileError(
            f"{path} holds the {str(data['kind']).upper()} model, but the {kind.upper()} model is needed here "
            f"({flag}); are the AR and NAR files swapped?"
        )
    try:
        model = build_model(data["hparams"])
        model.load_state_dict(data["state_dict"], strict=True)
    except Exception as e:
        raise InferenceFileError(f"{path}: the weights do not fit the saved hparams ({e}); re-export it") from None
    model.to(device).eval().requires_grad_(False)
    if str(device).startswith("cuda"):
        from .utils.helpers import allow_tf32

        allow_tf32(True)  # fp32 synthesis on a GPU: TF32 tensor cores (EnCodec encoding turns it off for itself)
    meta = {k: v for k, v in data.items() if k != "state_dict"}
    return model, meta


# --------------------------------------------------------------------------------------------
# the synthesizer


def _inference_mode():
    """``torch.inference_mode()`` as a decorator, importing torch only when the method runs."""

    def wrap(fn):
        import functools

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            import torch

            with torch.inference_mode():
                return fn(*args, **kwargs)

        return inner

    return wrap


class Synthesizer:
    """The AR, the NAR and the codec settings, loaded once; synthesizes one request or batches.

    Args:
        ar_ckpt: exported AR file.
        nar_ckpt: exported NAR file.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...; None = cuda when available, else cpu. The
            codec runs on the same device.
        codec_weights: ``pretrained`` | ``untrained`` | a path to EnCodec weights (as in the Config).
    """

    def __init__(
        self,
        ar_ckpt: str | Path,
        nar_ckpt: str | Path,
        device: Optional[str] = None,
        codec_weights: str = "pretrained",
    ):
        self.device = resolve_device(device)
        self.codec_weights = codec_weights
        self.ar, self.ar_meta = load_model(ar_ckpt, "ar", self.device)
        self.nar, self.nar_meta = load_model(nar_ckpt, "nar", self.device)
        self._ref_cache: dict[tuple, "Tensor"] = {}
        for name, meta in (("AR", self.ar_meta), ("NAR", self.nar_meta)):
            if meta.get("prompt_mode", "speaker") not in ("speaker", "paper"):
                from .export import InferenceFileError

                raise InferenceFileError(f"the {name} file has an unknown prompt_mode {meta['prompt_mode']!r}; "
                                         "a newer vall_e wrote it: upgrade")

    @property
    def needs_ref_text(self) -> bool:
        """True when the AR was trained with ``prompt_mode=paper``: it continues the reference's own codes
        after the reference's transcript, so requests need ``ref_text`` (or ``continual=True``)."""
        return self.ar_meta.get("prompt_mode", "speaker") == "paper"

    @property
    def group_size(self) -> int:
        """Frames per AR step of the loaded AR (VALL-E 2 grouped code modeling; 1 = plain VALL-E). Prompts
        and prefixes are cut to whole groups of it."""
        return self.ar.group_size

    def whole_groups(self, codes: "Tensor") -> "Tensor":
        """The first frames of ``codes`` ``(t, 8)`` that make whole groups of the AR: ``t - t % group_size``."""
        from .ar import whole_groups

        return codes[: whole_groups(len(codes), self.group_size)]

    # text ----------------------------------------------------------------------------------

    def phonemize(self, text: str, what: str = "text") -> list[str]:
        """Phones of ``text`` (g2p, ``_`` between words), checked against both models' phone maps.

        Raises:
            SynthesisError: empty text, or text without any pronounceable word.
            UnknownPhonesError: phones a model never saw; names them and their words.
        """
        from .emb import g2p

        if not isinstance(text, str) or not text.strip():
            raise SynthesisError(f"the {what} is empty; give the sentence to speak")
        phones = g2p.encode(text)
        if not phones:
            raise SynthesisError(f"the {what} {text.strip()[:80]!r} has no pronounceable words")
        unknown: dict[str, list[str]] = {}  # phone -> models missing it
        for name, meta in (("AR", self.ar_meta), ("NAR", self.nar_meta)):
            for p in phones:
                if p not in meta["phone_map"]:
                    unknown.setdefault(p, [])
                    if name not in unknown[p]:
                        unknown[p].append(name)
        if unknown:
            raise _unknown_phones_error(text, what, unknown, self.ar_meta, self.nar_meta)
        return phones

    def _ids(self, phones: list[str], meta: dict[str, Any]) -> "Tensor":
        """``(t,)`` ids of ``<s> phones </s>`` in one model's phone map (on the model device)."""
        from .data import encode_phones

        return encode_phones(phones, meta["phone_map"]).to(self.device)

    # audio ---------------------------------------------------------------------------------

    def encode_reference(self, ref_wav: RefAudio, prompt_seconds: Optional[float]) -> "Tensor":
        """Prompt codes ``(t, 8)`` (CPU, int64) of the reference's first ``prompt_seconds`` (None/<=0: all of it)."""
        import torch

        from .emb import qnt

        seconds = prompt_seconds if prompt_seconds is not None and prompt_seconds > 0 else None
        key = None
        if isinstance(ref_wav, (str, Path)):
            path = Path(ref_wav)
            if path.is_dir():
                raise qnt.AudioError(f"{path}: is a folder; give the reference audio file")
            if not path.is_file():
                raise qnt.AudioError(f"{path}: reference audio not found")
            key = (str(path.resolve()), path.stat().st_mtime_ns, seconds)
            if key in self._ref_cache:
                return self._ref_cache[key]
            total = _audio_seconds(path)
            _check_prompt_length(min(total, seconds) if seconds is not None else total, str(path), seconds)
            # decode only the prompt's part (a long recording with a 3 s prompt costs 3 s of decoding), plus a
            # margin that the resampler's filter reads past the cut, so the codes equal a whole-file load's
            end = seconds + 0.1 if seconds is not None else None
            wav, sr = qnt.load_audio(path, None, end if end is not None and end < total else None)
            name = str(path)
        else:
            if not (isinstance(ref_wav, (tuple, list)) and len(ref_wav) == 2):
                raise SynthesisError("ref_wav must be an audio file path or a (waveform, sample_rate) pair")
            wav, sr = torch.as_tensor(ref_wav[0]), int(ref_wav[1])
            if wav.numel() == 0:
                raise SynthesisError("the reference waveform is empty")
            name = "the reference waveform"
        mono = qnt.to_codec_input(wav, int(sr))  # (n24,): channels averaged, resampled to 24 kHz
        if seconds is not None:
            mono = mono[: max(1, int(round(seconds * qnt.SAMPLE_RATE)))]
        _check_prompt_length(len(mono) / qnt.SAMPLE_RATE, name, seconds)
        if float(mono.abs().max()) < SILENT_PEAK:
            part = f"the first {seconds:g} s of {name}" if seconds is not None else name
            raise SynthesisError(f"{part} is silent (peak under -60 dBFS): there is no voice to imitate; give a "
                                 "recording of the speaker" + (", or trim its leading silence" if seconds else ""))
        codes = qnt.encode_batch([mono], device=self.device, codec_weights=self.codec_weights)[0]  # (1, 8, t)
        codes = codes[0].t().contiguous()  # (t, 8)
        if key is not None:
            self._ref_cache[key] = codes
        return codes

    # synthesis -----------------------------------------------------------------------------

    def synthesize(
        self,
        text: str,
        ref_wav: RefAudio,
        ref_text: Optional[str] = None,
        continual: bool = False,
        **options: Any,
    ) -> Synthesis:
        """Speak ``text`` in the voice of ``ref_wav`` (see :class:`Request`); ``options`` as in :meth:`synthesize_batch`."""
        return self.synthesize_batch([Request(text, ref_wav, ref_text, continual=continual)], **options)[0]

    def __call__(self, text: str, ref_wav: RefAudio, ref_text: Optional[str] = None, **options: Any) -> tuple["Tensor", int]:
        """Like :meth:`synthesize` but returns ``(wav (1, n), sample_rate)``."""
        out = self.synthesize(text, ref_wav, ref_text, **options)
        return out.wav, out.sample_rate

    def synthesize_batch(
        self,
        requests: Sequence[Request],
        *,
        ar_temp: float = 1.0,
        nar_temp: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        max_ar_steps: int = 1000,
        seed: Optional[int] = None,
        prompt_seconds: Optional[float] = DEFAULT_PROMPT_SECONDS,
        batch_size: int = 8,
        ras: bool = False,
        ras_window: int = RAS_WINDOW,
        ras_threshold: float = RAS_THRESHOLD,
        frames_per_phone: Optional[float] = None,
    ) -> list[Synthesis]:
        """Synthesize many requests, ``batch_size`` at a time (one KV-cached AR pass per batch).

        Args:
            requests: what to say and in which voice; results come back in this order.
            ar_temp: AR sampling temperature (0 = greedy; greedy AR decoding tends to loop).
            nar_temp: NAR temperature; 0 (greedy) or small, as in the paper.
            top_k: keep the k most likely codes in AR sampling (0 = off).
            top_p: nucleus mass for AR sampling (1 = off).
            max_ar_steps: most frames the AR generates per request (75 per second of audio).
            seed: None draws one (reported in each :class:`Synthesis`).
            prompt_seconds: crop each reference to its first seconds (None or <= 0: keep it all);
                ignored in continuation mode.
            batch_size: requests per forward pass.
            ras: repetition-aware sampling in the AR (VALL-E 2, section 3.3; off by default). It acts
                on draws of the filtered rule, so use it with ``top_p < 1`` (the paper's nucleus
                sampling), ``top_k`` or ``ar_temp=0``.
            ras_window: RAS history window K in frames (paper: 10).
            ras_threshold: RAS repetition ratio above which a draw is redone from the plain
                distribution (paper: 0.1).
            frames_per_phone: the length guard: at most ``ceil(frames_per_phone x phones of the
                text)`` AR frames per output. None uses the AR export's ``max_frames_per_phone`` (the
                largest ratio of its training set; no guard for older exports without it); 0 turns
                the guard off (``max_ar_steps`` still applies).
        Raises:
            SynthesisError: a request that cannot be done; checked for all requests before any
                generation starts. ``AudioError`` / ``CodecUnavailableError`` from :mod:`vall_e.emb.qnt`
                for unreadable references or unavailable codec weights.
        """
        import torch

        if not requests:
            return []
        _check_options(ar_temp, nar_temp, top_k, top_p, max_ar_steps, batch_size)
        if ras_window < 1 or not 0 <= ras_threshold <= 1:
            raise SynthesisError(f"ras_window must be >= 1 and ras_threshold within [0, 1]; got {ras_window}, {ras_threshold}")
        if frames_per_phone is None:
            frames_per_phone = self.ar_meta.get("max_frames_per_phone") or 0.0
        if frames_per_phone < 0:
            raise SynthesisError(f"frames_per_phone must be >= 0 (0 = no length guard); got {frames_per_phone}")
        sampling = dict(ar_temp=ar_temp, nar_temp=nar_temp, top_k=top_k, top_p=top_p, max_ar_steps=max_ar_steps,
                        ras=ras, ras_window=ras_window, ras_threshold=ras_threshold,
                        frames_per_phone=float(frames_per_phone))
        if seed is None:
            seed = secrets.randbelow(2**31)
        prepared = self._prepare_all(requests, prompt_seconds)
        # longest first: batches of similar length waste less compute on padding
        order = sorted(range(len(prepared)), key=lambda i: -(len(prepared[i]["ar_text"]) + len(prepared[i]["ar_prompt"])
                                                              + len(prepared[i]["prefix"])))
        results: list[Optional[Synthesis]] = [None] * len(prepared)
        for b, start in enumerate(range(0, len(order), batch_size)):
            idx = order[start : start + batch_size]
            gen = torch.Generator(device=self.device).manual_seed(seed + b)
            outs = self._generate([prepared[i] for i in idx], gen, **sampling)
            for i, out in zip(idx, outs):
                out.seed = seed
                results[i] = out
        return [r for r in results if r is not None]

    def check_requests(
        self, requests: Sequence[Request], prompt_seconds: Optional[float] = DEFAULT_PROMPT_SECONDS
    ) -> list[tuple[int, Exception]]:
        """``(index, error)`` for every request that cannot be synthesized, in order; nothing is generated.

        Checks what :meth:`synthesize_batch` would refuse (text, phones, reference audio). References
        are encoded on the way and cached, so a following :meth:`synthesize_batch` reuses the codes.
        """
        from .emb.qnt import AudioError

        errors: list[tuple[int, Exception]] = []
        for i, r in enumerate(requests):
            try:
                self._prepare(r, prompt_seconds, i, len(requests))
            except (SynthesisError, AudioError) as e:
                errors.append((i, e))
        return errors

    def _prepare_all(self, requests: Sequence[Request], prompt_seconds: Optional[float]) -> list[dict[str, Any]]:
        """Every request prepared, or one error naming every bad request (one bad request: its own error)."""
        from .emb.qnt import AudioError

        prepared, errors = [], []
        for i, r in enumerate(requests):
            try:
                prepared.append(self._prepare(r, prompt_seconds, i, len(requests)))
            except (SynthesisError, AudioError) as e:
                errors.append((i, e))
        if len(errors) == 1:
            raise errors[0][1]
        if errors:
            raise BatchRequestError(errors, len(requests))
        return prepared

    def _prepare(self, req: Request, prompt_seconds: Optional[float], i: int, n: int) -> dict[str, Any]:
        from .emb.qnt import AudioError

        where = f"{req.label}: " if req.label else (f"request {i + 1}: " if n > 1 else "")
        try:
            phones = self.phonemize(req.text)
            if req.continual:
                if req.ref_text is not None:
                    raise SynthesisError("continual=True takes no ref_text: the text is the whole utterance's "
                                         "transcript, and the reference is its beginning")
                text_phones = phones
                prompt = self.whole_groups(self.encode_reference(req.ref_wav, prompt_seconds))
                prefix = prompt
            elif req.ref_text is not None:
                ref_phones = self.phonemize(req.ref_text, what="reference transcript (ref_text)")
                sep = [SEPARATOR] if all(SEPARATOR in m["phone_map"] for m in (self.ar_meta, self.nar_meta)) else []
                text_phones = ref_phones + sep + phones
                prompt = self.encode_reference(req.ref_wav, None)  # the transcript covers the whole reference
                prompt = self.whole_groups(prompt)  # a grouped AR continues after whole groups
                prefix = prompt
            elif self.needs_ref_text:
                raise SynthesisError(
                    "this AR was trained with prompt_mode=paper: it reads the reference's transcript before the "
                    "text and continues the reference's own codes, so give the transcript of the reference audio "
                    "(--ref-text \"...\" on the command line, ref_text=... in Python; a 3rd column in a --batch .tsv). "
                    "Models trained with prompt_mode=speaker need no transcript."
                )
            else:
                text_phones = phones
                prompt = self.whole_groups(self.encode_reference(req.ref_wav, prompt_seconds))
                prefix = prompt[:0]
        except (SynthesisError, AudioError) as e:
            if not where:
                raise
            raise type(e)(where + str(e), *_extra_args(e)) from None
        # each model sees the prompt it was trained with: none for a paper-mode AR (the reference is
        # its prefix), at most prompt_seconds for a paper-mode NAR (trained on 3 s segments)
        ar_prompt = prompt[:0] if self.needs_ref_text else prompt
        nar_prompt = prompt
        if self.nar_meta.get("prompt_mode", "speaker") == "paper" and prompt_seconds is not None and prompt_seconds > 0:
            from .emb.qnt import SAMPLE_RATE, HOP_LENGTH

            nar_prompt = prompt[: max(1, round(prompt_seconds * SAMPLE_RATE / HOP_LENGTH))]
        return {
            "phones": text_phones,
            # what the length guard scales with; continual: the prefix already covers part of the text
            "n_target_phones": len(phones),
            "guard_offset": len(prefix) if req.continual else 0,
            "ar_text": self._ids(text_phones, self.ar_meta),
            "nar_text": self._ids(text_phones, self.nar_meta),
            "ar_prompt": ar_prompt.to(self.device),
            "prompt": nar_prompt.to(self.device),
            "prefix": prefix.to(self.device),  # (t_pre, 8) known response frames (continuation)
        }

    @_inference_mode()
    def _generate(
        self, batch: list[dict[str, Any]], gen: "torch.Generator | Sequence[torch.Generator]", *,
        ar_temp: float | Sequence[float], nar_temp: float | Sequence[float], top_k: int | Sequence[int],
        top_p: float | Sequence[float], max_ar_steps: int | Sequence[int], ras: bool | Sequence[bool], ras_window: int,
        ras_threshold: float | Sequence[float], frames_per_phone: float | Sequence[float],
    ) -> list[Synthesis]:
        """Generate prepared requests (:meth:`_prepare`) as one batch: AR, NAR, codec.

        ``gen`` and every option but ``ras_window`` may be a list, one per request; with one
        generator per request, a request's audio does not depend on the rest of the batch (see
        :meth:`vall_e.ar.AR.generate`). Frames-per-phone values are resolved (no None).
        """
        import math

        import torch

        from .base import per_sample

        n = len(batch)
        steps = per_sample(max_ar_steps, n, "max_ar_steps")
        proms = [p["prompt"] for p in batch]
        prefixes = [p["prefix"] for p in batch]
        # the length guard: frames per phone of the target text (the reference part is the prefix)
        guards = [
            max(1, math.ceil(fpp * p["n_target_phones"]) - p["guard_offset"]) if fpp > 0 else None
            for p, fpp in zip(batch, per_sample(frames_per_phone, n, "frames_per_phone"))
        ]
        limits = [m if g is None else min(g, m) for g, m in zip(guards, steps)]
        # one step past each limit: a model that emits its stop token exactly there stopped by itself
        new = self.ar.generate(
            [p["ar_text"] for p in batch], [p["ar_prompt"] for p in batch], max_steps=max(steps) + 1,
            temperature=ar_temp, top_k=top_k, top_p=top_p, generator=gen, prefix_list=[pre[:, 0] for pre in prefixes],
            ras=ras, ras_window=ras_window, ras_threshold=ras_threshold, max_lens=[m + 1 for m in limits],
        )  # b x (t_new,) codebook 1, prefix excluded
        hit = [len(x) > m for x, m in zip(new, limits)]  # the AR was stopped at its limit, not by its stop token
        new = [x[:m] for x, m in zip(new, limits)]
        n_levels = self.nar.config.n_resp_levels
        full: list[Optional[Tensor]] = [None] * n
        live = [i for i in range(n) if len(prefixes[i]) + len(new[i]) > 0]
        if live:
            texts = [batch[i]["nar_text"] for i in live]
            lproms = [proms[i] for i in live]
            lpre = [prefixes[i] for i in live]
            nar_gen, nar_t = gen, nar_temp
            if isinstance(gen, (list, tuple)) or isinstance(nar_temp, (list, tuple)):  # the live requests' own
                gens, temps = per_sample(gen, n, "generator"), per_sample(nar_temp, n, "nar_temp")
                nar_gen, nar_t = [gens[i] for i in live], [temps[i] for i in live]
            resps = [torch.cat([lpre[j][:, 0], new[i]])[:, None] for j, i in enumerate(live)]  # (t, 1)
            if all(len(p) == 0 for p in lpre):
                resps = self.nar.generate(texts, lproms, resps, temperature=nar_t, generator=nar_gen, max_levels=n_levels)
            else:
                # one level at a time so the reference frames keep their true codes as the context of every level
                for level in range(1, n_levels):
                    resps = self.nar.generate(texts, lproms, resps, temperature=nar_t, generator=nar_gen,
                                              max_levels=level + 1)
                    resps = [torch.cat([p[:, : level + 1], r[len(p):]]) for p, r in zip(lpre, resps)]
            for j, i in enumerate(live):
                full[i] = resps[j]
        return [self.finish(full[i], len(prefixes[i]), hit[i], guards[i], steps[i], -1, p["phones"], limits[i])
                for i, p in enumerate(batch)]

    def finish(self, codes: Optional["Tensor"], t_pre: int, hit: bool, guard: Optional[int], max_ar_steps: int,
               seed: int, phones: Sequence[str], max_frames: Optional[int]) -> Synthesis:
        """One sample's :class:`Synthesis` from its generated codes ``(t_pre + t, 8)`` (None: nothing generated).

        Only the frames after the ``t_pre`` prefix frames (continuation mode) are returned and decoded.
        ``hit``: the AR reached its limit, which was the length guard when ``guard`` is below ``max_ar_steps``.
        """
        import torch

        from .emb import qnt

        if codes is None:
            codes = torch.zeros(0, self.nar.config.n_resp_levels, dtype=torch.long, device=self.device)
        gen_codes = codes[t_pre:].cpu()
        if len(gen_codes) == 0:
            wav = torch.zeros(1, 0)
        else:
            wav, _ = qnt.decode(codes.cpu(), device=self.device, codec_weights=self.codec_weights)  # (1, n)
            wav = wav[:, t_pre * qnt.HOP_LENGTH :].contiguous()  # continuation: only the new part
        cut = None
        if hit:
            cut = "length_guard" if guard is not None and guard < max_ar_steps else "max_ar_steps"
        return Synthesis(wav=wav, sample_rate=qnt.SAMPLE_RATE, codes=gen_codes, seed=seed, stopped=cut is None,
                         phones=list(phones), cut=cut, max_frames=max_frames, prefix_frames=t_pre)


def _check_options(ar_temp: float, nar_temp: float, top_k: int, top_p: float, max_ar_steps: int, batch_size: int) -> None:
    if ar_temp < 0 or nar_temp < 0:
        raise SynthesisError(f"temperatures must be >= 0 (0 = greedy); got ar_temp={ar_temp}, nar_temp={nar_temp}")
    if top_k < 0:
        raise SynthesisError(f"top_k must be >= 0 (0 = off); got {top_k}")
    if not 0 < top_p <= 1:
        raise SynthesisError(f"top_p must be within (0, 1] (1 = off); got {top_p}")
    if max_ar_steps < 1:
        raise SynthesisError(f"max_ar_steps must be at least 1; got {max_ar_steps}")
    if batch_size < 1:
        raise SynthesisError(f"batch_size must be at least 1; got {batch_size}")


def _audio_seconds(path: Path) -> float:
    """Duration from the header (no decoding); warns when a WAV holds less than its header promises."""
    import soundfile as sf

    from .emb.qnt import AudioError

    try:
        info = sf.info(str(path))
    except Exception as e:
        raise AudioError(f"{path}: cannot read audio ({str(e).strip() or type(e).__name__})") from None
    # libsndfile notes "data : <header size> (should be <bytes present>)" for a cut-off WAV
    m = re.search(r"data\s*:\s*(\d+)\s*\(should be (\d+)\)", info.extra_info or "")
    if m and int(m.group(1)) not in (0, 0xFFFFFFFF, 0x7FFFFFFF) and int(m.group(1)) > int(m.group(2)):
        promised = info.duration * int(m.group(1)) / max(1, int(m.group(2)))
        logger.warning("%s looks truncated: its header promises %.2f s but the file holds %.2f s; the prompt "
                       "uses what is there (copy the file again if it was cut off)", path, promised, info.duration)
    return float(info.duration)


def _check_prompt_length(seconds: float, name: str, prompt_seconds: Optional[float]) -> None:
    """Refuse prompts shorter than MIN_REFERENCE_SECONDS or longer than MAX_REFERENCE_SECONDS (why: module doc)."""
    if seconds < MIN_REFERENCE_SECONDS:
        raise SynthesisError(f"{name} is {seconds:.2f} s long; a reference needs at least {MIN_REFERENCE_SECONDS} s "
                             "of the speaker (3 s as in the paper is best): give a longer recording")
    if seconds > MAX_REFERENCE_SECONDS:
        raise SynthesisError(
            f"{name} is {seconds:.0f} s long and all of it would be the prompt (prompt_seconds 0, or a reference "
            f"transcript); prompts over {MAX_REFERENCE_SECONDS:.0f} s are beyond what the models trained on and cost "
            "quadratic time: use its first seconds (--prompt-seconds 3 on the command line, prompt_seconds=3 in "
            "Python), or crop the recording (and its transcript)")


def _extra_args(e: SynthesisError) -> tuple:
    return (e.phones, e.words) if isinstance(e, UnknownPhonesError) else ()


def _unknown_phones_error(
    text: str, what: str, unknown: dict[str, list[str]], ar_meta: dict[str, Any], nar_meta: dict[str, Any]
) -> UnknownPhonesError:
    """Name each unknown phone, the words it came from and which model lacks it."""
    from .emb import g2p

    words: dict[str, list[str]] = {p: [] for p in unknown}
    for token in re.findall(r"\S+", text):
        word = token.strip(".,;:!?\"'()[]{}") or token
        try:
            word_phones = set(g2p.encode(token))
        except Exception:  # pragma: no cover - g2p already handled the whole text
            continue
        for p in unknown:
            if p in word_phones and word not in words[p]:
                words[p].append(word)
    parts = []
    for p in sorted(unknown):
        src = ", ".join(repr(w) for w in words[p]) if words[p] else "the text's punctuation or context"
        models = " and ".join(unknown[p])
        parts.append(f"{p} (from {src}; unknown to the {models})")
    n_ar, n_nar = len(ar_meta["phone_map"]), len(nar_meta["phone_map"])
    msg = (
        f"the {what} has phones the model never saw in training: {'; '.join(parts)}. "
        f"The models know only the phones of their training set ({n_ar} AR / {n_nar} NAR symbols). "
        "Rephrase without those words, or train on a corpus that covers them."
    )
    return UnknownPhonesError(msg, sorted(unknown), words)


# --------------------------------------------------------------------------------------------
# command-line sampling options (the synthesis CLI and vall_e.evaluate)


def add_sampling_arguments(p: "argparse.ArgumentParser") -> None:
    """Add the AR/NAR sampling options of :meth:`Synthesizer.synthesize_batch` to a parser."""
    p.add_argument("--ar-temp", type=float, default=1.0, help="AR sampling temperature (default 1.0)")
    p.add_argument("--nar-temp", type=float, default=0.0, help="NAR temperature, 0 = greedy (default 0.0)")
    p.add_argument("--top-k", type=int, default=0, help="AR top-k sampling, 0 = off (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="AR nucleus sampling mass, 1 = off (default)")
    p.add_argument("--max-ar-steps", type=int, default=1000, help="most AR frames per output, 75 per second (default 1000)")
    p.add_argument("--ras", action="store_true",
                   help="repetition-aware sampling (VALL-E 2): a code that fills more than --ras-threshold of the last "
                        "--ras-window codes is redrawn without the top-k/top-p filter; use with --top-p < 1 (default off)")
    p.add_argument("--ras-window", type=int, default=RAS_WINDOW, help="RAS history window K in frames (default 10, the paper's)")
    p.add_argument("--ras-threshold", type=float, default=RAS_THRESHOLD,
                   help="RAS repetition ratio threshold (default 0.1, the paper's)")
    p.add_argument("--frames-per-phone", type=float, default=None,
                   help="length guard: at most this many AR frames per phone of the text (default: the largest ratio "
                        "of the AR's training set, stored at export; 0 = off)")


def sampling_options(args: "argparse.Namespace") -> dict[str, Any]:
    """The :func:`add_sampling_arguments` values as keyword arguments of :meth:`Synthesizer.synthesize_batch`."""
    return dict(ar_temp=args.ar_temp, nar_temp=args.nar_temp, top_k=args.top_k, top_p=args.top_p,
                max_ar_steps=args.max_ar_steps, ras=args.ras, ras_window=args.ras_window,
                ras_threshold=args.ras_threshold, frames_per_phone=args.frames_per_phone)


# --------------------------------------------------------------------------------------------
# the one-call API

_cached: dict[tuple, Synthesizer] = {}


def get_synthesizer(
    ar_ckpt: str | Path, nar_ckpt: str | Path, device: Optional[str] = None, codec_weights: str = "pretrained"
) -> Synthesizer:
    """A :class:`Synthesizer` for these files, reused while the files are unchanged (one kept)."""

    def stamp(p: str | Path) -> tuple[str, int]:
        p = Path(p)
        return str(p.resolve()), p.stat().st_mtime_ns if p.is_file() else -1

    key = (stamp(ar_ckpt), stamp(nar_ckpt), resolve_device(device), codec_weights)
    if key not in _cached:
        _cached.clear()  # one set of models at a time: they may be large
        _cached[key] = Synthesizer(ar_ckpt, nar_ckpt, device, codec_weights)
    return _cached[key]


def synthesize(
    text: str,
    ref_wav: RefAudio,
    ar_ckpt: str | Path,
    nar_ckpt: str | Path,
    *,
    ref_text: Optional[str] = None,
    device: Optional[str] = None,
    codec_weights: str = "pretrained",
    ar_temp: float = 1.0,
    nar_temp: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    max_ar_steps: int = 1000,
    seed: Optional[int] = None,
    prompt_seconds: Optional[float] = DEFAULT_PROMPT_SECONDS,
    ras: bool = False,
    ras_window: int = RAS_WINDOW,
    ras_threshold: float = RAS_THRESHOLD,
    frames_per_phone: Optional[float] = None,
) -> tuple["Tensor", int]:
    """Speak ``text`` in the voice of ``ref_wav``; returns ``(wav (1, n) float32 CPU, 24000)``.

    ``ref_wav`` is an audio file (any rate, mono or stereo) or a ``(waveform, sample_rate)`` pair.
    ``ref_text`` (the reference's transcript) turns on continuation mode. The models stay loaded
    between calls with the same files. Other arguments: see :meth:`Synthesizer.synthesize_batch`.
    With ``codec_weights="untrained"`` the audio is not speech.
    """
    synth = get_synthesizer(ar_ckpt, nar_ckpt, device, codec_weights)
    out = synth.synthesize(
        text, ref_wav, ref_text, ar_temp=ar_temp, nar_temp=nar_temp, top_k=top_k, top_p=top_p,
        max_ar_steps=max_ar_steps, seed=seed, prompt_seconds=prompt_seconds,
        ras=ras, ras_window=ras_window, ras_threshold=ras_threshold, frames_per_phone=frames_per_phone,
    )
    return out.wav, out.sample_rate
