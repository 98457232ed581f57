"""Metric backends for ``python -m vall_e.evaluate``: speech recognition (WER) and speaker similarity (SIM).

Backends are chosen by name and loaded lazily (nothing is imported or downloaded before
:func:`load_asr` / :func:`load_speaker` runs):

ASR (``--asr``), each returns the recognized words of a waveform:

- ``hubert`` (default): torchaudio's ``HUBERT_ASR_LARGE`` pipeline, HuBERT-Large fine-tuned on
  LibriSpeech 960 h, greedy CTC without a language model: the paper's ASR (VALL-E, arXiv 2301.02111
  section 5.1). Its weights download on first use into the torch hub cache.
- ``pocketsphinx``: CMU PocketSphinx with the English acoustic model, dictionary and trigram LM that
  ship inside its wheel. Offline. A weak recognizer (WER 0.8-0.9 on espeak-ng voices): its numbers
  only compare systems with each other, never with the paper.
- ``pocketsphinx-vocab``: PocketSphinx restricted to a word loop over the test transcripts' own
  vocabulary (a JSGF grammar; the general LM is not used). A CLOSED-VOCABULARY option that makes the
  offline recognizer usable for relative comparisons on small test sets; never a default and never
  comparable with the paper or with open-vocabulary WER.

Speaker embedders (``--speaker``), each returns an L2-normalized embedding; SIM is their dot product:

- ``wavlm`` (default): ``microsoft/wavlm-base-plus-sv`` (WavLM Base+ with an x-vector head, fine-tuned
  for speaker verification on VoxCeleb) through HuggingFace ``transformers``. The paper used
  WavLM-Large + ECAPA-TDNN from the UniSpeech repository (``wavlm_large_finetune.pth``), which no
  ordinary package client installs; this is the closest model that one does. Its weights download on
  first use into the HuggingFace cache.
- ``resemblyzer``: the GE2E d-vector encoder that ships inside the ``resemblyzer`` wheel. Offline.
  Measured on espeak-ng voices: same voice ~0.86, different voices ~0.67.

WER uses :func:`normalize_text` on both sides (documented there) and jiwer's word alignment.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:
    from torch import Tensor

ASR_BACKENDS = ("hubert", "pocketsphinx", "pocketsphinx-vocab")
SPEAKER_BACKENDS = ("wavlm", "resemblyzer")
DEFAULT_ASR = "hubert"
DEFAULT_SPEAKER = "wavlm"
# Backends whose numbers can be set beside the paper's (same or closest model, open vocabulary).
PAPER_ASR = {"hubert"}
PAPER_SPEAKER = {"wavlm"}
NORMALIZER_VERSION = "en-1"  # bump when normalize_text changes: cached WERs then no longer match
WAVLM_SV_MODEL = "microsoft/wavlm-base-plus-sv"


class BackendUnavailableError(RuntimeError):
    """A metric backend cannot be loaded here; the message says what to install or download, or which offline backend to use."""


# --------------------------------------------------------------------------------------------
# text normalization and WER

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**9, "billion"), (10**6, "million"), (1000, "thousand"), (100, "hundred"))
_ORDINAL_SUFFIX = re.compile(r"^(\d+)(st|nd|rd|th)$")
_ORDINALS = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth", "nine": "ninth",
             "twelve": "twelfth"}


def number_to_words(n: int) -> str:
    """``1984`` -> ``"one thousand nine hundred eighty four"`` (cardinal, no "and", no hyphens)."""
    if n < 0:
        return "minus " + number_to_words(-n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    for value, name in _SCALES:
        if n >= value:
            head, rest = divmod(n, value)
            return f"{number_to_words(head)} {name}" + ("" if rest == 0 else " " + number_to_words(rest))
    raise AssertionError(n)  # pragma: no cover


def _ordinal(words: str) -> str:
    *head, last = words.split()
    if last in _ORDINALS:
        last = _ORDINALS[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return " ".join([*head, last])


def normalize_text(text: str) -> str:
    """The English normalizer applied to reference and hypothesis before WER.

    In order: Unicode NFKC; lowercase; curly quotes to ``'``; ``&`` -> ``and``, ``%`` -> ``percent``;
    digits to words (``42`` -> ``forty two``, ``3rd`` -> ``third``, ``1,000`` -> ``one thousand``,
    ``2.5`` -> ``two point five``, ``1920s`` -> ``one thousand nine hundred twenties``: years are read as
    cardinals); hyphens, dashes and slashes split words; every other character
    that is not a letter, a digit or a word-internal apostrophe is dropped; whitespace collapses.
    LibriSpeech's own transcripts (upper case, no punctuation) pass through as lower case. No
    spelling variants are merged (``colour`` != ``color``).
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("`", "'")
    text = text.replace("&", " and ").replace("%", " percent ")
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 1,000 -> 1000
    text = re.sub(r"(\d)\.(\d)", r"\1 point \2", text)
    text = re.sub(r"[-\u2010-\u2015/]", " ", text)

    def words_for(m: re.Match) -> str:
        token = m.group(0)
        o = _ORDINAL_SUFFIX.match(token)
        if o:
            return " " + _ordinal(number_to_words(int(o.group(1)))) + " "
        digits = re.match(r"\d+", token).group(0)  # type: ignore[union-attr]
        if digits.startswith("0") and len(digits) > 1:  # "007": digit by digit
            spoken = " ".join(_ONES[int(d)] for d in digits)
        else:
            spoken = number_to_words(int(digits))
        if token[len(digits):] == "s":  # "1920s": the plural of the last word
            spoken = spoken[:-1] + "ies" if spoken.endswith("y") else spoken + "s"
        return f" {spoken} "

    text = re.sub(r"\d+(?:st|nd|rd|th|s)?\b|\d+", words_for, text)
    text = re.sub(r"[^\w\s']|_", " ", text)
    text = re.sub(r"(?<![a-z0-9])'|'(?![a-z0-9])", " ", text)  # quotes, not apostrophes inside words
    return " ".join(text.split())


@dataclass
class WordErrors:
    """Word alignment counts of one hypothesis against its reference (both normalized)."""

    ref_words: int
    substitutions: int
    deletions: int
    insertions: int

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def wer(self) -> float:
        """Errors / reference words (can exceed 1); an empty reference counts each inserted word."""
        return self.errors / self.ref_words if self.ref_words else float(self.insertions)


def word_errors(reference: str, hypothesis: str) -> WordErrors:
    """Align ``hypothesis`` with ``reference`` after :func:`normalize_text` (jiwer's Levenshtein alignment)."""
    ref, hyp = normalize_text(reference), normalize_text(hypothesis)
    n_ref = len(ref.split())
    if n_ref == 0:
        return WordErrors(0, 0, 0, len(hyp.split()))
    if not hyp:
        return WordErrors(n_ref, 0, n_ref, 0)
    import jiwer

    out = jiwer.process_words(ref, hyp)
    return WordErrors(n_ref, out.substitutions, out.deletions, out.insertions)


def corpus_wer(pairs: Sequence[WordErrors]) -> float:
    """All errors / all reference words of a set (how WER over a test set is reported)."""
    ref = sum(p.ref_words for p in pairs)
    return sum(p.errors for p in pairs) / ref if ref else 0.0


# --------------------------------------------------------------------------------------------
# backends


def _mono(wav: "Tensor", sr: int, target_sr: int) -> "Tensor":
    """float32 ``(n,)`` at ``target_sr`` from ``(n,)`` or ``(channels, n)`` at ``sr``."""
    import torch
    import torchaudio.functional as AF

    wav = torch.as_tensor(wav).float()
    if wav.dim() == 2:
        wav = wav.mean(0)
    if sr != target_sr:
        wav = AF.resample(wav, sr, target_sr)
    return wav.contiguous()


class ASR:
    """A speech recognizer: ``transcribe(wav (n,) or (c, n), sr) -> text``."""

    name: str = ""
    comparable: bool = False  # the paper's model (or documented equivalent), open vocabulary

    def transcribe(self, wav: "Tensor", sr: int) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


class HubertASR(ASR):
    """torchaudio ``HUBERT_ASR_LARGE``: 16 kHz, greedy CTC over its letter vocabulary, no LM."""

    name = "hubert"
    comparable = True

    def __init__(self, device: str = "cpu"):
        import torch
        import torchaudio

        bundle = torchaudio.pipelines.HUBERT_ASR_LARGE
        try:
            self.model = bundle.get_model().to(device).eval()
        except Exception as e:
            import os

            import torch.hub

            name = os.path.basename(getattr(bundle, "_path", "hubert_fairseq_large_ll60k_asr_ls960.pth"))
            raise BackendUnavailableError(
                f"--asr hubert: cannot load torchaudio's HUBERT_ASR_LARGE weights ({type(e).__name__}: {e}).\n"
                f"They download on first use from https://download.pytorch.org/torchaudio/models/{name} (about 1.2 GB) "
                f"into {os.path.join(torch.hub.get_dir(), 'checkpoints', name)} (the folder follows $TORCH_HOME). "
                "On a machine without internet, copy that file there from one that has it, or use the offline "
                "backend --asr pocketsphinx (its numbers are not comparable with the paper's)."
            ) from None
        self.labels = bundle.get_labels()  # ('-', '|', 'E', 'T', ...): blank, word separator, letters
        self.sample_rate = int(bundle.sample_rate)
        self.device = device
        self._torch = torch

    def transcribe(self, wav: "Tensor", sr: int) -> str:
        x = _mono(wav, sr, self.sample_rate)
        if x.numel() < self.sample_rate // 10:
            return ""
        with self._torch.inference_mode():
            emissions, _ = self.model(x[None].to(self.device))  # (1, frames, labels)
        ids = emissions[0].argmax(-1).tolist()
        out, prev = [], None
        for i in ids:
            if i != prev and i != 0:  # collapse repeats, drop blanks
                out.append(self.labels[i])
            prev = i
        return "".join(out).replace("|", " ").strip().lower()


class PocketSphinxASR(ASR):
    """PocketSphinx 5 with the wheel's US English model; 16 kHz int16 input.

    With ``vocabulary`` the search is a JSGF word loop over those words only (closed vocabulary).
    """

    name = "pocketsphinx"

    def __init__(self, vocabulary: Optional[Sequence[str]] = None):
        try:
            from pocketsphinx import Config, Decoder
        except ImportError:
            raise BackendUnavailableError(
                "--asr pocketsphinx needs the pocketsphinx package: pip install 'pocketsphinx>=5' "
                "(or bash scripts/setup.sh, which installs the pinned requirements)"
            ) from None
        config = Config(loglevel="FATAL")
        config["samprate"] = 16000
        self.decoder = Decoder(config)
        self.sample_rate = 16000
        self.vocabulary: list[str] = []
        if vocabulary is not None:
            self.name = "pocketsphinx-vocab"
            known = [w for w in sorted(set(vocabulary)) if self.decoder.lookup_word(w) is not None]
            if not known:
                raise BackendUnavailableError("--asr pocketsphinx-vocab: none of the test transcripts' words are in "
                                              "PocketSphinx's dictionary")
            self.vocabulary = known
            words = " | ".join(known)
            self.decoder.add_jsgf_string("vocab", f"#JSGF V1.0;\ngrammar vocab;\npublic <s> = ( {words} )* ;\n")
            self.decoder.activate_search("vocab")

    def describe(self) -> str:
        if self.vocabulary:
            return f"pocketsphinx-vocab (CLOSED vocabulary of the {len(self.vocabulary)} test words; not paper-comparable)"
        return "pocketsphinx (wheel's en-us model and LM; not paper-comparable)"

    def transcribe(self, wav: "Tensor", sr: int) -> str:
        import numpy as np

        x = _mono(wav, sr, self.sample_rate).numpy()
        if x.size < self.sample_rate // 10:
            return ""
        pcm = (np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16).tobytes()
        self.decoder.start_utt()
        self.decoder.process_raw(pcm, full_utt=True)
        self.decoder.end_utt()
        hyp = self.decoder.hyp()
        if hyp is None:
            return ""
        # drop fillers and alternate-pronunciation marks: "<sil>", "[noise]", "word(2)"
        words = [re.sub(r"\(\d+\)$", "", w) for w in hyp.hypstr.split()]
        return " ".join(w for w in words if not (w.startswith("<") or w.startswith("[")))


class SpeakerEmbedder:
    """A speaker embedder: ``embed(wav (n,) or (c, n), sr) -> (d,)`` float32, L2-normalized."""

    name: str = ""
    comparable: bool = False

    def embed(self, wav: "Tensor", sr: int) -> "Tensor":  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


class WavLMSpeaker(SpeakerEmbedder):
    """``microsoft/wavlm-base-plus-sv`` x-vectors (HuggingFace transformers), 16 kHz."""

    name = "wavlm"
    comparable = True

    def __init__(self, device: str = "cpu", model_id: str = WAVLM_SV_MODEL):
        self.model_id = model_id
        try:
            from transformers import AutoFeatureExtractor, WavLMForXVector
        except ImportError:
            raise BackendUnavailableError(
                "--speaker wavlm needs HuggingFace transformers: pip install transformers (its first use downloads "
                f"{model_id}); or use the offline backend --speaker resemblyzer (not comparable with the paper)"
            ) from None
        def load(**kw: bool) -> None:
            self.extractor = AutoFeatureExtractor.from_pretrained(model_id, **kw)
            self.model = WavLMForXVector.from_pretrained(model_id, **kw).to(device).eval()

        try:
            try:
                load(local_files_only=True)  # a cached or local copy: no network round trips
            except Exception:
                load()  # the first use downloads it
        except Exception as e:
            raise BackendUnavailableError(
                f"--speaker wavlm: cannot load {model_id} ({type(e).__name__}: {str(e).splitlines()[0][:200]}).\n"
                "It downloads on first use into the HuggingFace cache ($HF_HOME, default ~/.cache/huggingface). "
                "Without internet, copy that cache from a machine that ran "
                f"`python -c \"from transformers import WavLMForXVector; WavLMForXVector.from_pretrained('{model_id}')\"` "
                "and set HF_HUB_OFFLINE=1, or use the offline backend --speaker resemblyzer (not comparable with the paper)."
            ) from None
        self.device = device
        self.sample_rate = 16000

    def describe(self) -> str:
        return "wavlm" if self.model_id == WAVLM_SV_MODEL else f"wavlm:{self.model_id}"

    def embed(self, wav: "Tensor", sr: int) -> "Tensor":
        import torch

        x = _mono(wav, sr, self.sample_rate)
        inputs = self.extractor(x.numpy(), sampling_rate=self.sample_rate, return_tensors="pt")
        with torch.inference_mode():
            emb = self.model(**{k: v.to(self.device) for k, v in inputs.items()}).embeddings[0].float().cpu()
        return torch.nn.functional.normalize(emb, dim=-1)


class ResemblyzerSpeaker(SpeakerEmbedder):
    """Resemblyzer's ``VoiceEncoder`` (256-d, weights in the wheel); its own 16 kHz preprocessing
    (volume normalization, long silences trimmed by WebRTC VAD)."""

    name = "resemblyzer"

    def __init__(self, device: str = "cpu"):
        import warnings

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # scipy.ndimage.morphology deprecation inside resemblyzer
                from resemblyzer import VoiceEncoder, preprocess_wav
        except ImportError as e:
            raise BackendUnavailableError(
                f"--speaker resemblyzer cannot be imported ({e}). Install it with bash scripts/setup.sh, or by hand: "
                "pip install webrtcvad-wheels librosa scipy && pip install --no-deps resemblyzer==0.1.4 "
                "(resemblyzer's declared webrtcvad dependency is a 2017 source package that needs a C compiler and "
                "pkg_resources, which setuptools >= 81 no longer has; webrtcvad-wheels provides the same module)"
            ) from None
        self.encoder = VoiceEncoder(device="cpu" if not str(device).startswith("cuda") else device, verbose=False)
        self._preprocess = preprocess_wav
        self.sample_rate = 16000

    def embed(self, wav: "Tensor", sr: int) -> "Tensor":
        import torch

        x = _mono(wav, sr, self.sample_rate).numpy()
        y = self._preprocess(x, source_sr=None)  # already 16 kHz: volume normalization and VAD trimming only
        if len(y) < self.sample_rate // 4:  # (nearly) no speech found: embed the raw signal instead
            y = x
        if len(y) < 1600:
            y = __import__("numpy").pad(y, (0, 1600 - len(y)))
        emb = torch.from_numpy(self.encoder.embed_utterance(y)).float()
        return torch.nn.functional.normalize(emb, dim=-1)


def load_asr(name: str, device: str = "cpu", vocabulary: Optional[Sequence[str]] = None) -> ASR:
    """The ASR backend ``name`` (see the module docstring); ``vocabulary`` is for ``pocketsphinx-vocab``."""
    if name == "hubert":
        return HubertASR(device)
    if name == "pocketsphinx":
        return PocketSphinxASR()
    if name == "pocketsphinx-vocab":
        if vocabulary is None:
            raise ValueError("pocketsphinx-vocab needs the test vocabulary")
        return PocketSphinxASR(vocabulary)
    raise BackendUnavailableError(f"--asr {name!r} is not a backend; choose one of {', '.join(ASR_BACKENDS)}")


def load_speaker(name: str, device: str = "cpu") -> SpeakerEmbedder:
    """The speaker-embedding backend ``name`` (see the module docstring).

    ``wavlm:<model>`` loads another WavLM x-vector model: a HuggingFace id or a local folder (a copy of
    ``microsoft/wavlm-base-plus-sv`` on a machine without internet).
    """
    base, _, arg = name.partition(":")
    if base == "wavlm":
        return WavLMSpeaker(device, model_id=arg or WAVLM_SV_MODEL)
    if base == "resemblyzer" and not arg:
        return ResemblyzerSpeaker(device)
    raise BackendUnavailableError(f"--speaker {name!r} is not a backend; choose one of {', '.join(SPEAKER_BACKENDS)} "
                                  "(or wavlm:<HuggingFace id or local folder>)")


def cosine(a: "Tensor", b: "Tensor") -> float:
    """Cosine similarity of two embeddings ``(d,)``."""
    import torch

    return float(torch.nn.functional.cosine_similarity(a.float()[None], b.float()[None])[0])


def vocabulary_of(texts: Sequence[str]) -> list[str]:
    """Sorted normalized words of ``texts`` (the closed vocabulary of ``pocketsphinx-vocab``)."""
    return sorted({w for t in texts for w in normalize_text(t).split()})

