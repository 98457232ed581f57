"""The paper's evaluation protocol: WER and speaker similarity (SIM) of ground truth, codec and model.

    python -m vall_e.evaluate <test list | corpus folder> --out DIR [--ar-ckpt A --nar-ckpt N]
        [--asr NAME] [--speaker NAME] [--min-seconds 4 --max-seconds 10] [--runs 3] [codec_weights=...]
    python -m vall_e.evaluate <LibriSpeech test-clean folder | corpus folder> --make-list LIST.tsv

Protocol (VALL-E, arXiv 2301.02111, sections 5.1-5.2; VALL-E 2, arXiv 2406.05370, section 4.1):

- Test set: utterances of ``--min-seconds``..``--max-seconds`` (4-10 s, both ends included), in the
  order of the list: sorted by speaker, then id (see :func:`build_list`).
- ``--mode cross`` (default, the paper's "VALL-E"): the prompt is a ``--prompt-seconds`` (3 s) crop of
  another utterance of the same speaker, both drawn with ``--seed`` (:func:`plan_prompts`).
  ``--mode continual`` ("VALL-E-continual"): the prompt is the utterance's own first 3 s; the model
  continues it. ``--mode reference`` (VALL-E 2's "reference utterance as prompt"): in each speaker's
  sorted list, utterance i is prompted by the whole utterance i-1, the first by the last.
- Rows: ``ground_truth`` (the real recording), ``codec`` (its EnCodec round trip with
  ``codec_weights``: the codec's ceiling), ``model`` (synthesized; only with both model files).
- WER: the ASR's transcript against the list's transcript, both normalized
  (:func:`vall_e.metrics.normalize_text`), errors / reference words over the whole set.
- SIM: cosine between speaker embeddings of the row's audio and of the ORIGINAL prompt audio
  (VALL-E 2's choice; ``--sim-against codec`` compares with the prompt's codec round trip instead).
  In continual mode the row's audio after the prompt is compared with the prompt (the prompt itself
  is left out of the comparison), and the WER is taken on prompt + continuation against the full
  transcript.
- ``--runs N``: the model row is synthesized N times (seeds differ per run) and its WER and SIM are
  the means over runs, as in the paper (3 runs). Ground truth and codec are deterministic: one run.
- ``--best-of N`` (VALL-E 2): N samples per utterance and run; the one with the lowest WER is kept,
  ties broken by the higher SIM. It selects with the evaluation's own ASR and speaker models, so it is
  an optimistic (oracle-ranked) number; say so when reporting it.

Outputs in ``DIR``: ``results.json`` (one object per row with ``wer`` and ``sim``, plus ``settings``,
``backends``, ``test_set``), ``results.md`` (a table), ``utterances.csv`` (one line per row, run and
utterance), ``prompts/`` (the prompt audio), ``wavs/codec/`` and ``wavs/model/run<k>/`` (to listen),
and ``items.jsonl``, the resumable cache: every scored (row, run, utterance) is appended as soon as
it is done, with a fingerprint of everything that decides its result (test item, prompt, backends,
model files, sampling options, codec). Rerunning the same command skips what is done; a changed
setting recomputes the affected items instead of reusing stale ones.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence

from .inference import add_sampling_arguments, sampling_options
from .utils.errors import entry_point
from .utils.outputs import note_replacing, refuse_inputs, writable_file, writable_folder
from .utils.paths import inside

if TYPE_CHECKING:
    from torch import Tensor

    from .inference import Synthesizer
    from .metrics import ASR, SpeakerEmbedder

ROWS = ("ground_truth", "codec", "model")
MODES = ("cross", "continual", "reference")
LIST_COLUMNS = ("id", "audio", "text", "speaker", "seconds")
CACHE_VERSION = 1
PAPER_ROWS = {  # arXiv 2301.02111 Table 2 (LibriSpeech test-clean 4-10 s): WER %, SIM
    "ground_truth": (2.2, 0.754),
    "model": (5.9, 0.580),
    "model (continual)": (3.8, 0.508),
}

logger = logging.getLogger("vall_e.evaluate")  # not __name__: stable under python -m


class EvalError(ValueError):
    """A user mistake or an unusable input; the message says what was wrong and how to fix it."""


# --------------------------------------------------------------------------------------------
# the test list


@dataclass(frozen=True)
class Utterance:
    """One test item: ``audio`` (absolute path), its transcript, speaker and duration in seconds."""

    id: str
    audio: Path
    text: str
    speaker: str
    seconds: float


def audio_seconds(path: Path) -> float:
    """Duration of an audio file from its header (no decoding), in seconds rounded to 1 ms (as the list
    stores it, so a folder and its list give the same test set and prompts)."""
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except Exception as e:
        raise EvalError(f"{path}: cannot read audio ({str(e).strip() or type(e).__name__})") from None
    return round(info.frames / info.samplerate, 3)


def _sorted(utts: Iterable[Utterance]) -> list[Utterance]:
    """The list order: speaker, then utterance id (plain string order)."""
    return sorted(utts, key=lambda u: (u.speaker, u.id))


def _check_unique(utts: Sequence[Utterance], where: str) -> None:
    seen: dict[str, Utterance] = {}
    for u in utts:
        if u.id in seen:
            raise EvalError(f"{where}: utterance id {u.id!r} occurs twice ({seen[u.id].audio} and {u.audio}); "
                            "ids must be unique in a test set")
        seen[u.id] = u


def list_from_librispeech(folder: Path) -> list[Utterance]:
    """Every utterance of a LibriSpeech subset folder (``<spk>/<chapter>/<spk>-<chapter>.trans.txt``
    with ``<id>.flac`` beside it); the speaker is the id's first field."""
    out = []
    for trans in sorted(folder.rglob("*.trans.txt")):
        for n, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            uid, _, text = line.strip().partition(" ")
            uid = _checked_id(uid, f"{trans}:{n}")  # it names the audio file beside it and the output wavs
            audio = next((trans.parent / (uid + s) for s in (".flac", ".wav") if (trans.parent / (uid + s)).is_file()), None)
            if audio is None or not text.strip():
                raise EvalError(f"{trans}:{n}: {'no transcript' if audio else f'no audio file {uid}.flac beside it'}; "
                                "is the LibriSpeech folder complete?")
            out.append(Utterance(uid, audio.resolve(), text.strip(), uid.split("-")[0], audio_seconds(audio)))
    return out


def list_from_corpus(folder: Path, spkr_name_getter: str) -> list[Utterance]:
    """Every ``<id>.wav``/``.flac`` with an ``<id>.normalized.txt`` beside it (this project's layout);
    the speaker comes from ``spkr_name_getter`` (``lambda p: p.parts[<int>]``) on the audio path."""
    from .config import parse_spkr_name_getter
    from .emb.qnt import AUDIO_SUFFIXES, TEXT_SUFFIX
    from .utils.helpers import find_files_nocase, sibling

    getter = parse_spkr_name_getter(spkr_name_getter)
    out = []
    for audio in find_files_nocase(folder, AUDIO_SUFFIXES):
        text_path = sibling(audio, TEXT_SUFFIX)
        if not text_path.is_file():
            continue  # audio without a transcript is not a test item
        text = text_path.read_text(encoding="utf-8").strip()
        if not text:
            continue
        try:
            speaker = getter(audio)
        except ValueError as e:
            raise EvalError(f"{e}; pass spkr_name_getter='lambda p: p.parts[<int>]' that names the speaker folder") from None
        uid = _checked_id(audio.name.split(".", 1)[0], str(audio))
        out.append(Utterance(uid, audio.resolve(), text, speaker, audio_seconds(audio)))
    return out


def _checked_id(uid: str, where: str) -> str:
    """``uid`` when it can name an output file (``<out>/prompts/<id>.wav``), else an :class:`EvalError`."""
    from .utils.paths import UnsafeNameError, safe_name

    try:
        return safe_name(uid, "id", where)
    except UnsafeNameError as e:
        raise EvalError(f"{e}; an id names the output wavs (<out>/prompts/<id>.wav), so use plain names "
                        "such as 1089-134686-0000") from None


# the list's seconds pick prompt windows; a value off by more than this from the audio is a wrong list
SECONDS_TOLERANCE = 0.1


def is_librispeech(folder: Path) -> bool:
    return next(folder.rglob("*.trans.txt"), None) is not None


def build_list(
    source: Path, min_seconds: float = 4.0, max_seconds: float = 10.0, spkr_name_getter: str = "lambda p: p.parts[-2]",
    max_utterances: int = 0, seed: int = 0,
) -> list[Utterance]:
    """The test list of a folder: LibriSpeech (any ``*.trans.txt`` inside) or this project's layout.

    Keeps ``min_seconds <= seconds <= max_seconds`` (``max_seconds`` 0 = no upper bound), sorts by
    speaker then id. ``max_utterances`` > 0 keeps a subset: ``random.Random(seed).sample`` of the
    sorted list, sorted again (the same seed and list give the same subset everywhere).
    """
    if not source.is_dir():
        raise EvalError(f"{source}: no such folder")
    utts = list_from_librispeech(source) if is_librispeech(source) else list_from_corpus(source, spkr_name_getter)
    if not utts:
        raise EvalError(f"{source}: no utterances found (expected LibriSpeech <spk>/<chapter>/*.trans.txt with .flac "
                        "files, or <id>.wav/.flac with <id>.normalized.txt beside each)")
    _check_unique(utts, str(source))
    return select(utts, min_seconds, max_seconds, max_utterances, seed, str(source))


def select(utts: Sequence[Utterance], min_seconds: float, max_seconds: float, max_utterances: int = 0, seed: int = 0,
           where: str = "") -> list[Utterance]:
    """The duration filter, the optional seeded subset and the list order (see :func:`build_list`)."""
    keep = [u for u in utts if u.seconds >= min_seconds - 1e-9 and (max_seconds <= 0 or u.seconds <= max_seconds + 1e-9)]
    if not keep:
        lo, hi = (min((u.seconds for u in utts), default=0), max((u.seconds for u in utts), default=0))
        raise EvalError(f"{where}: none of the {len(utts)} utterances ({lo:.1f}-{hi:.1f} s) lies within "
                        f"--min-seconds {min_seconds} and --max-seconds {max_seconds}; widen the range")
    keep = _sorted(keep)
    if 0 < max_utterances < len(keep):
        keep = _sorted(random.Random(seed).sample(keep, max_utterances))
    return keep


def write_list(utts: Sequence[Utterance], path: Path) -> None:
    """Write the list as TSV with a header (:data:`LIST_COLUMNS`); audio paths relative to the list's
    folder when they lie under it, else absolute; seconds with 3 decimals."""
    from .utils.helpers import atomic_write_text

    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    w.writerow(LIST_COLUMNS)
    base = path.resolve().parent
    for u in utts:
        try:
            audio = u.audio.relative_to(base).as_posix()
        except ValueError:
            audio = str(u.audio)
        w.writerow([u.id, audio, u.text, u.speaker, f"{u.seconds:.3f}"])
    atomic_write_text(buf.getvalue(), path)


def read_list(path: Path) -> list[Utterance]:
    """Read a TSV test list (see :func:`write_list`); relative audio paths are taken from the list's folder."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"{path}: cannot read the test list as UTF-8 text ({e})") from None
    rows = list(csv.reader(io.StringIO(text), delimiter="\t"))
    if not rows or tuple(c.strip() for c in rows[0]) != LIST_COLUMNS:
        raise EvalError(f"{path}: a test list is a TSV file whose first line is the header "
                        f"{chr(9).join(LIST_COLUMNS)!r} (make one with --make-list)")
    out = []
    for n, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        if len(row) != len(LIST_COLUMNS):
            raise EvalError(f"{path}:{n}: expected {len(LIST_COLUMNS)} tab-separated columns "
                            f"({', '.join(LIST_COLUMNS)}), got {len(row)}")
        uid, audio, text, speaker, seconds = (c.strip() for c in row)
        if not uid or not text or not speaker:
            raise EvalError(f"{path}:{n}: id, text and speaker must not be empty")
        uid = _checked_id(uid, f"{path}:{n}")
        audio_path = Path(audio) if Path(audio).is_absolute() else path.resolve().parent / audio
        if not audio_path.is_file():
            raise EvalError(f"{path}:{n}: audio file {audio_path} not found")
        try:
            secs = float(seconds)
        except ValueError:
            raise EvalError(f"{path}:{n}: seconds {seconds!r} is not a number") from None
        if not math.isfinite(secs) or secs <= 0:
            raise EvalError(f"{path}:{n}: seconds {seconds!r} must be a positive number (the audio's duration)")
        try:
            actual = audio_seconds(audio_path)  # a header read: the prompt windows must lie inside the audio
        except EvalError as e:
            raise EvalError(f"{path}:{n}: {e}") from None
        if abs(actual - secs) > SECONDS_TOLERANCE:
            raise EvalError(f"{path}:{n}: seconds {seconds} but {audio_path.name} is {actual:.3f} s long; correct the "
                            "column, or remake the list with --make-list")
        out.append(Utterance(uid, audio_path.resolve(), text, speaker, secs))
    if not out:
        raise EvalError(f"{path}: the test list has no utterances")
    _check_unique(out, str(path))
    return out


def load_test_set(source: Path, args: argparse.Namespace, spkr_name_getter: str) -> list[Utterance]:
    """The utterances to evaluate: a list file (filtered by duration too) or a folder."""
    if source.is_file():
        return select(read_list(source), args.min_seconds, args.max_seconds, args.max_utterances, args.seed, str(source))
    if source.is_dir():
        return build_list(source, args.min_seconds, args.max_seconds, spkr_name_getter, args.max_utterances, args.seed)
    raise EvalError(f"{source}: no such test list or folder")


# --------------------------------------------------------------------------------------------
# prompts


@dataclass(frozen=True)
class Prompt:
    """The prompt of one test item: ``source`` utterance's audio from ``start`` to ``end`` seconds
    (``end`` None = to its end); ``text`` is the source's full transcript."""

    source: str
    audio: Path
    start: float
    end: Optional[float]
    text: str

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.end is None


def _rng(seed: int, *key: Any) -> random.Random:
    """A generator seeded by ``seed`` and ``key`` (a string seed: the same in every process)."""
    return random.Random(":".join(str(k) for k in (seed, *key)))


def plan_prompts(utts: Sequence[Utterance], mode: str, seed: int, prompt_seconds: float) -> dict[str, Prompt]:
    """The prompt of every utterance that can have one in ``mode`` (others are left out and reported).

    - cross: another utterance of the same speaker, drawn with ``random.Random("<seed>:<id>")``, and a
      ``prompt_seconds`` window of it starting uniformly in ``[0, its seconds - prompt_seconds]``
      (rounded to 10 ms; the whole utterance when shorter). Speakers with one utterance have none.
    - continual: the utterance's own first ``prompt_seconds`` (it must be longer than that).
    - reference: the whole previous utterance of the speaker in list order; the first takes the last.
    """
    by_spk: dict[str, list[Utterance]] = {}
    for u in _sorted(utts):
        by_spk.setdefault(u.speaker, []).append(u)
    plan: dict[str, Prompt] = {}
    for spk_utts in by_spk.values():
        for i, u in enumerate(spk_utts):
            if mode == "continual":
                if u.seconds > prompt_seconds + 0.5:
                    plan[u.id] = Prompt(u.id, u.audio, 0.0, prompt_seconds, u.text)
                continue
            others = [o for o in spk_utts if o.id != u.id]
            if not others:
                continue
            if mode == "reference":
                src = spk_utts[i - 1]  # i = 0 takes the last
                plan[u.id] = Prompt(src.id, src.audio, 0.0, None, src.text)
            else:
                rng = _rng(seed, u.id)
                src = rng.choice(others)
                room = src.seconds - prompt_seconds
                if room <= 0:
                    plan[u.id] = Prompt(src.id, src.audio, 0.0, None, src.text)
                else:
                    start = round(rng.uniform(0.0, room), 2)
                    plan[u.id] = Prompt(src.id, src.audio, start, round(start + prompt_seconds, 2), src.text)
    return plan


def load_wav(path: Path, start: float = 0.0, end: Optional[float] = None) -> tuple["Tensor", int]:
    """Mono float32 ``(n,)`` and its sample rate, from ``start`` to ``end`` seconds."""
    from .emb import qnt

    try:
        wav, sr = qnt.load_audio(path, start if start > 0 else None, end)
    except qnt.AudioError as e:
        raise EvalError(str(e)) from None
    return wav.mean(0), sr


# --------------------------------------------------------------------------------------------
# the resumable cache


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


def file_fingerprint(path: Path) -> str:
    """sha1 of a file's content (model files: a re-export with the same name is noticed)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


class ItemCache:
    """``DIR/items.jsonl``: one JSON object per scored (row, run, utterance), appended as it is done.

    A record is reused only when its ``hash`` equals the fingerprint of the current settings for that
    item; later lines win over earlier ones; a torn last line (interrupted write) is ignored.
    """

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[tuple[str, int, str], dict[str, Any]] = {}
        damaged = 0
        if path.is_file():
            # bytes, line by line: a damaged line (torn write, another tool's edit) is recomputed, not fatal
            for raw in path.read_bytes().splitlines():
                try:
                    rec = json.loads(raw.decode("utf-8"))
                    self.records[(rec["row"], int(rec["run"]), rec["id"])] = rec
                except (ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError
                    damaged += bool(raw.strip())
        if damaged:
            logger.warning("%s: %d damaged line(s) ignored; their items are computed again", path, damaged)
        self._stale: set[tuple[str, int, str]] = set()  # records found with other settings (recomputed)

    @property
    def stale(self) -> int:
        return len(self._stale)

    def get(self, row: str, run: int, uid: str, digest: str, out_dir: Path) -> Optional[dict[str, Any]]:
        rec = self.records.get((row, run, uid))
        if rec is None:
            return None
        if rec.get("hash") != digest or any(not (out_dir / p).is_file() for p in rec.get("files", [])):
            self._stale.add((row, run, uid))
            return None
        return rec

    def put(self, records: Sequence[dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, sort_keys=True) + "\n")
                self.records[(rec["row"], int(rec["run"]), rec["id"])] = rec
            f.flush()
            os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------
# scoring


@dataclass
class Scorer:
    """The ASR and the speaker embedder, with the prompt embeddings cached for this invocation."""

    asr: "ASR"
    speaker: "SpeakerEmbedder"
    sim_against: str = "original"
    codec_weights: str = "pretrained"
    device: str = "cpu"
    calls: dict[str, int] = field(default_factory=lambda: {"asr": 0, "speaker": 0, "synthesis": 0})
    _prompt_emb: dict[tuple, "Tensor"] = field(default_factory=dict)

    def transcribe(self, wav: "Tensor", sr: int) -> str:
        self.calls["asr"] += 1
        return self.asr.transcribe(wav, sr)

    def embed(self, wav: "Tensor", sr: int) -> "Tensor":
        self.calls["speaker"] += 1
        return self.speaker.embed(wav, sr)

    def prompt_embedding(self, p: Prompt) -> "Tensor":
        key = (str(p.audio), p.start, p.end)
        if key not in self._prompt_emb:
            wav, sr = load_wav(p.audio, p.start, p.end)
            if self.sim_against == "codec":
                wav, sr = codec_round_trip(wav, sr, self.codec_weights, self.device)
            self._prompt_emb[key] = self.embed(wav, sr)
        return self._prompt_emb[key]

    def sim(self, wav: "Tensor", sr: int, prompt: Prompt) -> float:
        from .metrics import cosine

        return cosine(self.embed(wav, sr), self.prompt_embedding(prompt))


def codec_round_trip(wav: "Tensor", sr: int, codec_weights: str, device: str) -> tuple["Tensor", int]:
    """EnCodec encode + decode at 6 kbps: mono ``(n,)`` at ``sr`` -> ``(n24,)`` at 24 kHz."""
    from .emb import qnt

    codes = qnt.encode(wav, sr, device=device, codec_weights=codec_weights)  # (1, 8, T)
    out, out_sr = qnt.decode(codes, device=device, codec_weights=codec_weights)  # (1, T * 320)
    n24 = math.ceil(wav.shape[-1] * qnt.SAMPLE_RATE / sr)
    return out[0, :n24], out_sr


def score(scorer: Scorer, u: Utterance, prompt: Prompt, wav: "Tensor", sr: int, mode: str,
          prompt_seconds: float) -> dict[str, Any]:
    """WER fields and SIM of one audio ``(n,)`` at ``sr`` for utterance ``u`` with ``prompt``.

    In continual mode the SIM is taken on the audio after the first ``prompt_seconds``.
    """
    from .metrics import word_errors

    hyp = scorer.transcribe(wav, sr)
    e = word_errors(u.text, hyp)
    part = wav[int(round(prompt_seconds * sr)):] if mode == "continual" else wav
    sim = scorer.sim(part, sr, prompt) if part.numel() >= sr // 10 else float("nan")
    return {"hyp": hyp, "ref_words": e.ref_words, "sub": e.substitutions, "del": e.deletions, "ins": e.insertions,
            "wer": e.wer, "sim": sim, "seconds": round(wav.shape[-1] / sr, 3)}


# --------------------------------------------------------------------------------------------
# the rows


@dataclass
class Context:
    """Everything one evaluation needs: the test set, prompts, settings, scorer and cache."""

    utts: list[Utterance]
    plan: dict[str, Prompt]
    args: argparse.Namespace
    out: Path
    scorer: Scorer
    cache: ItemCache
    codec_weights: str
    device: str
    common: dict[str, Any]
    progress: bool = True

    @property
    def items(self) -> list[Utterance]:
        return [u for u in self.utts if u.id in self.plan]

    def digest(self, row_settings: dict[str, Any], u: Utterance, prompt: Prompt, run: int) -> str:
        return _digest({"v": CACHE_VERSION, "row": row_settings, "common": self.common, "run": run,
                        "utt": [u.id, str(u.audio), _stat(u.audio), u.text],
                        "prompt": [prompt.source, str(prompt.audio), _stat(prompt.audio), prompt.start, prompt.end]})


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="utt", disable=not enabled, dynamic_ncols=True, leave=True)


def _foils(utts: Sequence[Utterance], plan: dict[str, Prompt]) -> dict[str, tuple[str, Optional[Prompt]]]:
    """For each item: a transcript of another utterance (next in list order) and the prompt of an
    utterance of another speaker (the same position in the next speaker's items), for chance levels."""
    items = [u for u in utts if u.id in plan]
    by_spk: dict[str, list[Utterance]] = {}
    for u in items:
        by_spk.setdefault(u.speaker, []).append(u)
    speakers = sorted(by_spk)
    out: dict[str, tuple[str, Optional[Prompt]]] = {}
    for i, u in enumerate(items):
        text = items[(i + 1) % len(items)].text if len(items) > 1 else ""
        foil_prompt = None
        if len(speakers) > 1:
            s = speakers[(speakers.index(u.speaker) + 1) % len(speakers)]
            j = by_spk[u.speaker].index(u)
            foil_prompt = plan[by_spk[s][j % len(by_spk[s])].id]
        out[u.id] = (text, foil_prompt)
    return out


def run_reference_rows(ctx: Context, rows: Sequence[str]) -> None:
    """Score ``ground_truth`` and/or ``codec`` (deterministic: run 0 only)."""
    from .emb.qnt import write_wav
    from .metrics import cosine, word_errors

    foils = _foils(ctx.utts, ctx.plan)
    for row in rows:
        settings = {"row": row, "codec_weights": ctx.codec_weights if row == "codec" else None}
        todo = []
        for u in ctx.items:
            d = ctx.digest(settings, u, ctx.plan[u.id], 0)
            if ctx.cache.get(row, 0, u.id, d, ctx.out) is None:
                todo.append((u, d))
        bar = _bar(len(ctx.items), row, ctx.progress)
        bar.update(len(ctx.items) - len(todo))
        for u, d in todo:
            prompt = ctx.plan[u.id]
            wav, sr = load_wav(u.audio)
            files = []
            if row == "codec":
                wav, sr = codec_round_trip(wav, sr, ctx.codec_weights, ctx.device)
                rel = Path("wavs") / "codec" / f"{u.id}.wav"
                write_wav(wav, sr, inside(ctx.out, ctx.out / rel))
                files.append(rel.as_posix())
            rec = {"row": row, "run": 0, "id": u.id, "hash": d, "files": files, "prompt": prompt.source,
                   "wav": files[0] if files else str(u.audio), **score(ctx.scorer, u, prompt, wav, sr, ctx.args.mode,
                                                                      ctx.args.prompt_seconds)}
            if row == "ground_truth":  # chance levels of the backends on this test set
                foil_text, foil_prompt = foils[u.id]
                fe = word_errors(foil_text, rec["hyp"])
                rec["foil_errors"], rec["foil_ref_words"] = fe.errors, fe.ref_words
                if foil_prompt is not None:
                    part = wav[int(round(ctx.args.prompt_seconds * sr)):] if ctx.args.mode == "continual" else wav
                    rec["sim_other_speaker"] = cosine(ctx.scorer.embed(part, sr), ctx.scorer.prompt_embedding(foil_prompt))
            ctx.cache.put([rec])
            bar.update(1)
        bar.close()


def _chunk_seed(seed: int, run: int, sample: int, chunk: int) -> int:
    return int(hashlib.sha1(f"{seed}:{run}:{sample}:{chunk}".encode()).hexdigest()[:8], 16) % (2**31)


def model_settings(ctx: Context, synth: "Synthesizer", fingerprints: dict[str, str]) -> dict[str, Any]:
    a = ctx.args
    return {"row": "model", "codec_weights": ctx.codec_weights, "models": fingerprints,
            "needs_ref_text": bool(getattr(synth, "needs_ref_text", False)), "best_of": a.best_of,
            "batch_size": a.batch_size,
            "sampling": sampling_options(a)}


def request_for(u: Utterance, prompt: Prompt, mode: str, needs_ref_text: bool) -> tuple[Any, Prompt]:
    """The synthesis request of one item and the prompt the model actually gets (SIM is taken against it).

    A model trained with ``prompt_mode=paper`` (``needs_ref_text``) continues its prompt: in cross and
    reference modes it gets the WHOLE prompt utterance with its transcript instead of a 3 s crop.
    """
    from .inference import Request

    if mode == "continual":
        return Request(u.text, u.audio, label=u.id, continual=True), prompt
    if needs_ref_text:
        whole = Prompt(prompt.source, prompt.audio, 0.0, None, prompt.text)
        return Request(u.text, prompt.audio, ref_text=prompt.text, label=u.id), whole
    if prompt.whole:
        return Request(u.text, prompt.audio, label=u.id), prompt
    wav, sr = load_wav(prompt.audio, prompt.start, prompt.end)
    return Request(u.text, (wav, sr), label=u.id), prompt


def run_model_row(ctx: Context, synth: "Synthesizer", fingerprints: dict[str, str]) -> None:
    """Synthesize, save and score the model row: ``--runs`` runs x ``--best-of`` samples per item.

    Work goes in fixed chunks of ``--batch-size`` items of the list (the seed of a chunk depends on
    seed, run, sample and chunk only), so an interrupted evaluation resumes with the same audio.
    """
    import torch

    from .emb.qnt import HOP_LENGTH, write_wav
    from .metrics import word_errors

    a = ctx.args
    settings = model_settings(ctx, synth, fingerprints)
    needs_ref_text = settings["needs_ref_text"]
    items = ctx.items
    chunks = [items[i : i + a.batch_size] for i in range(0, len(items), a.batch_size)]
    # reference mode: the whole previous utterance is the prompt. A paper-mode model continues it (the
    # AR reads all of it with its transcript) while its NAR keeps the 3 s prompt it was trained with.
    prompt_seconds = None if a.mode == "reference" and not needs_ref_text else a.prompt_seconds
    for run in range(a.runs):
        bar = _bar(len(items), f"model run {run + 1}/{a.runs}", ctx.progress)
        for c, chunk in enumerate(chunks):
            digests = {u.id: ctx.digest(settings, u, ctx.plan[u.id], run) for u in chunk}
            if all([ctx.cache.get("model", run, u.id, digests[u.id], ctx.out) is not None for u in chunk]):
                bar.update(len(chunk))
                continue
            reqs, used = zip(*(request_for(u, ctx.plan[u.id], a.mode, needs_ref_text) for u in chunk))
            samples: list[list[dict[str, Any]]] = [[] for _ in chunk]
            for s in range(a.best_of):
                outs = synth.synthesize_batch(
                    list(reqs), seed=_chunk_seed(a.seed, run, s, c), prompt_seconds=prompt_seconds,
                    batch_size=a.batch_size, **sampling_options(a),
                )
                ctx.scorer.calls["synthesis"] += len(outs)
                for k, (u, out) in enumerate(zip(chunk, outs)):
                    wav, sr = out.wav.reshape(-1), out.sample_rate
                    # continual: the output continues the prompt's whole groups of a grouped AR (225 frames
                    # of a 3 s prompt -> 224 at group_size 2), so the prompt audio put before it ends there
                    seconds = min(a.prompt_seconds, out.prefix_frames * HOP_LENGTH / out.sample_rate)
                    if a.mode == "continual":  # listen to and transcribe prompt + continuation
                        pw, psr = load_wav(u.audio, 0.0, seconds)
                        if psr != sr:
                            import torchaudio.functional as AF

                            pw = AF.resample(pw, psr, sr)
                        wav = torch.cat([pw, wav])
                    name = f"{u.id}.wav" if a.best_of == 1 else f"{u.id}.s{s}.wav"
                    rel = Path("wavs") / "model" / f"run{run}" / name
                    write_wav(wav, sr, inside(ctx.out, ctx.out / rel))
                    if wav.numel() == 0:  # the AR stopped at once: every word is deleted, no voice
                        n = word_errors(u.text, "").ref_words
                        m = {"hyp": "", "ref_words": n, "sub": 0, "del": n, "ins": 0, "wer": 1.0 if n else 0.0,
                             "sim": float("nan"), "seconds": 0.0}
                    else:
                        m = score(ctx.scorer, u, used[k], wav, sr, a.mode, seconds)
                    m.update(sample=s, seed=out.seed, stopped=out.stopped, cut=out.cut, file=rel.as_posix())
                    samples[k].append(m)
            recs = []
            for u, ss, p in zip(chunk, samples, used):
                best = min(ss, key=lambda m: (m["wer"], -(m["sim"] if not math.isnan(m["sim"]) else -2.0)))
                rec = {"row": "model", "run": run, "id": u.id, "hash": digests[u.id], "prompt": p.source,
                       "files": [m["file"] for m in ss], "wav": best["file"],
                       **{k: v for k, v in best.items() if k != "file"}}
                if a.best_of > 1:
                    rec["samples"] = [{k: m[k] for k in ("sample", "wer", "sim", "file")} for m in ss]
                recs.append(rec)
            ctx.cache.put(recs)
            bar.update(len(chunk))
        bar.close()


# --------------------------------------------------------------------------------------------
# results


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def _std(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if len(xs) < 2:
        return 0.0
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def aggregate(records: Sequence[dict[str, Any]], runs: int) -> dict[str, Any]:
    """One row's summary: corpus WER and mean SIM per run, their means over runs (the reported numbers)."""
    per_run: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        per_run.setdefault(int(r["run"]), []).append(r)
    wers, sims = [], []
    for run in sorted(per_run):
        rs = per_run[run]
        ref = sum(r["ref_words"] for r in rs)
        wers.append(sum(r["sub"] + r["del"] + r["ins"] for r in rs) / ref if ref else float("nan"))
        sims.append(_mean([r["sim"] for r in rs]))
    out: dict[str, Any] = {
        "wer": _mean(wers), "sim": _mean(sims), "runs": len(per_run), "wer_runs": wers, "sim_runs": sims,
        "wer_std": _std(wers), "sim_std": _std(sims), "wer_mean_utterance": _mean([r["wer"] for r in records]),
        "utterances": len(per_run.get(0, [])),
    }
    if any("stopped" in r for r in records):
        out["not_stopped"] = sum(1 for r in records if r.get("stopped") is False)
        out["seconds_generated"] = round(sum(r["seconds"] for r in records), 2)
    if any("foil_errors" in r for r in records):
        ref = sum(r["foil_ref_words"] for r in records)
        out["wer_shuffled_text"] = sum(r["foil_errors"] for r in records) / ref if ref else float("nan")
    if any("sim_other_speaker" in r for r in records):
        out["sim_other_speaker"] = _mean([r.get("sim_other_speaker", float("nan")) for r in records])
    return out


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else round(obj, 6)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_outputs(ctx: Context, rows: Sequence[str], backends: dict[str, Any], settings: dict[str, Any],
                  digests: dict[tuple[str, int, str], str]) -> dict[str, Any]:
    """``results.json``, ``results.md`` and ``utterances.csv`` from the (current) cache records."""
    from .utils.helpers import atomic_write_text

    items = ctx.items
    results: dict[str, Any] = {}
    all_recs: list[dict[str, Any]] = []
    for row in rows:
        recs = [ctx.cache.records[k] for k in sorted(digests) if k[0] == row and k in ctx.cache.records
                and ctx.cache.records[k]["hash"] == digests[k]]
        all_recs += recs
        results[row] = aggregate(recs, ctx.args.runs if row == "model" else 1)
    skipped = [u.id for u in ctx.utts if u.id not in ctx.plan]
    results["settings"] = settings
    results["backends"] = backends
    results["test_set"] = {"source": str(ctx.args.source), "utterances": len(items), "speakers": len({u.speaker for u in items}),
                           "hours": round(sum(u.seconds for u in items) / 3600, 4), "skipped_without_prompt": skipped}
    results = _json_safe(results)
    atomic_write_text(json.dumps(results, indent=2) + "\n", ctx.out / "results.json")
    atomic_write_text(markdown_table(results, rows), ctx.out / "results.md")

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = ["row", "run", "id", "speaker", "prompt", "wer", "errors", "ref_words", "sim", "seconds", "stopped",
            "cut", "wav", "reference", "hypothesis"]
    w.writerow(cols)
    by_id = {u.id: u for u in items}
    from .metrics import normalize_text

    for r in all_recs:
        u = by_id[r["id"]]
        w.writerow([r["row"], r["run"], r["id"], u.speaker, r.get("prompt", ""), f"{r['wer']:.4f}",
                    r["sub"] + r["del"] + r["ins"], r["ref_words"],
                    "" if r["sim"] is None or math.isnan(r["sim"]) else f"{r['sim']:.4f}", r["seconds"],
                    r.get("stopped", ""), r.get("cut") or "", r["wav"], normalize_text(u.text), normalize_text(r["hyp"])])
    atomic_write_text(buf.getvalue(), ctx.out / "utterances.csv")
    return results


def markdown_table(results: dict[str, Any], rows: Sequence[str]) -> str:
    """The paper-style table: WER in percent, SIM as a cosine; mean over runs (± std when runs > 1)."""
    b, s = results["backends"], results["settings"]
    lines = [
        f"# VALL-E evaluation ({s['mode']} mode)",
        "",
        f"- ASR: {b['asr']}; speaker model: {b['speaker']}; SIM against the {s['sim_against']} prompt audio",
        f"- test set: {results['test_set']['utterances']} utterances, {results['test_set']['speakers']} speakers, "
        f"{results['test_set']['hours']:.2f} h ({s['min_seconds']}-{s['max_seconds']} s)",
        f"- comparable with the paper's numbers: {'yes' if b['comparable_with_paper'] else 'NO (offline or substitute backends: compare rows with each other only)'}",
        "",
        "| row | WER (%) | SIM | utterances | runs |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        r = results[row]
        wer = "n/a" if r["wer"] is None else f"{100 * r['wer']:.1f}"
        sim = "n/a" if r["sim"] is None else f"{r['sim']:.3f}"
        if r["runs"] > 1:
            wer += f" ± {100 * (r['wer_std'] or 0):.1f}"
            sim += f" ± {(r['sim_std'] or 0):.3f}"
        name = row + (f" (best of {s['best_of']})" if row == "model" and s["best_of"] > 1 else "")
        lines.append(f"| {name} | {wer} | {sim} | {r['utterances']} | {r['runs']} |")
    gt = results.get("ground_truth")
    if gt and (gt.get("wer_shuffled_text") is not None or gt.get("sim_other_speaker") is not None):
        lines += ["", "Chance levels on this test set (ground-truth audio): "
                  + "; ".join(x for x in (
                      f"WER against shuffled transcripts {100 * gt['wer_shuffled_text']:.1f} %"
                      if gt.get("wer_shuffled_text") is not None else "",
                      f"SIM against another speaker's prompt {gt['sim_other_speaker']:.3f}"
                      if gt.get("sim_other_speaker") is not None else "") if x)]
    lines += ["", "Paper (arXiv 2301.02111, Table 2; HuBERT-Large ASR, WavLM-TDNN SIM): ground truth 2.2 / 0.754, "
              "VALL-E 5.9 / 0.580, VALL-E continual 3.8 / 0.508.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# command line

EXAMPLES = """examples:
  python -m vall_e.evaluate data/LibriSpeech/test-clean --make-list lists/test-clean-4-10s.tsv
  python -m vall_e.evaluate lists/test-clean-4-10s.tsv --out eval/base --ar-ckpt zoo/ar.pt --nar-ckpt zoo/nar.pt
  python -m vall_e.evaluate lists/test-clean-4-10s.tsv --out eval/offline --asr pocketsphinx --speaker resemblyzer
  python -m vall_e.evaluate data/my_corpus --out eval/mine --mode continual --runs 1 spkr_name_getter='lambda p: p.parts[-3]'

backends: --asr hubert (default; the paper's HuBERT-Large CTC) | pocketsphinx (offline) | pocketsphinx-vocab
(offline, CLOSED vocabulary of the test transcripts: not comparable with any open-vocabulary WER);
--speaker wavlm (default; microsoft/wavlm-base-plus-sv) | resemblyzer (offline).
config words: codec_weights=pretrained|untrained|<path>, device=..., spkr_name_getter=... (folders in our layout).
"""


def build_parser() -> argparse.ArgumentParser:
    from .metrics import ASR_BACKENDS, DEFAULT_ASR, DEFAULT_SPEAKER, SPEAKER_BACKENDS

    p = argparse.ArgumentParser(
        prog="python -m vall_e.evaluate",
        description="The VALL-E evaluation protocol: WER and speaker similarity of ground truth, codec round trip "
                    "and model on a test list (e.g. LibriSpeech test-clean, 4-10 s).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", type=Path, help="a test list (.tsv, see --make-list) or a corpus folder")
    p.add_argument("--out", type=Path, default=None, help="output folder (results, wavs, resumable cache)")
    p.add_argument("--make-list", type=Path, default=None, metavar="LIST.tsv",
                   help="write the test list of SOURCE (a folder) with the duration filter and exit")
    p.add_argument("--ar-ckpt", type=Path, default=None, help="exported AR model (python -m vall_e.export)")
    p.add_argument("--nar-ckpt", type=Path, default=None, help="exported NAR model")
    p.add_argument("--asr", default=DEFAULT_ASR, choices=ASR_BACKENDS, help=f"ASR backend (default {DEFAULT_ASR})")
    p.add_argument("--speaker", default=DEFAULT_SPEAKER, metavar="{" + ",".join(SPEAKER_BACKENDS) + "}",
                   help=f"speaker-embedding backend (default {DEFAULT_SPEAKER}; wavlm:<id or folder> for another "
                        "WavLM x-vector model, e.g. a local copy)")
    p.add_argument("--min-seconds", type=float, default=4.0, help="shortest test utterance (default 4)")
    p.add_argument("--max-seconds", type=float, default=10.0, help="longest test utterance (default 10; 0 = no limit)")
    p.add_argument("--max-utterances", type=int, default=0, help="a seeded subset of this many utterances (0 = all)")
    p.add_argument("--mode", default="cross", choices=MODES,
                   help="cross (another utterance's 3 s crop), continual (own first 3 s), reference (VALL-E 2 ordering)")
    p.add_argument("--runs", type=int, default=3, help="model runs to average (default 3, as in the paper)")
    p.add_argument("--best-of", type=int, default=1, help="samples per utterance, the best by WER then SIM is kept (VALL-E 2: 5)")
    p.add_argument("--rows", default=",".join(ROWS), help="rows to evaluate, comma-separated (default all; model needs the models)")
    p.add_argument("--sim-against", default="original", choices=("original", "codec"),
                   help="SIM against the original prompt audio (VALL-E 2, default) or its codec round trip")
    p.add_argument("--prompt-seconds", type=float, default=3.0, help="prompt length in cross and continual modes (default 3)")
    p.add_argument("--seed", type=int, default=None, help="seed of prompt choice, subsets and sampling (default 0)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=8, help="synthesis requests per forward pass (default 8)")
    add_sampling_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


@entry_point
def main(argv: Optional[Sequence[str]] = None) -> int:
    from .config import Config

    argv = list(sys.argv[1:] if argv is None else argv)
    words, rest = Config.split_argv(argv)
    cfg = Config.from_cli(words)  # help=true, codec_weights=..., device=..., seed=..., spkr_name_getter=...
    parser = build_parser()
    args = parser.parse_args(rest)
    if args.device is None and any(w.startswith("device=") for w in words):
        args.device = cfg.device
    if args.seed is None:
        args.seed = cfg.seed if any(w.startswith("seed=") for w in words) else 0
    try:
        return _run(args, cfg.codec_weights, cfg.spkr_name_getter)
    except EvalError as e:
        parser.print_usage(sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        return 2


def _check_args(args: argparse.Namespace) -> list[str]:
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad or not rows:
        raise EvalError(f"--rows {args.rows!r}: use a comma-separated subset of {', '.join(ROWS)}")
    if (args.ar_ckpt is None) != (args.nar_ckpt is None):
        raise EvalError("give both --ar-ckpt and --nar-ckpt for the model row, or neither (ground truth and codec only)")
    if args.ar_ckpt is None:
        rows = [r for r in rows if r != "model"]
    elif "model" in rows:
        for flag, path in (("--ar-ckpt", args.ar_ckpt), ("--nar-ckpt", args.nar_ckpt)):
            if not path.is_file():
                raise EvalError(f"{flag} {path}: no such file (export one with python -m vall_e.export)")
    if not rows:
        raise EvalError("nothing to evaluate: --rows model needs --ar-ckpt and --nar-ckpt")
    for name, low in (("runs", 1), ("best_of", 1), ("batch_size", 1), ("max_ar_steps", 1)):
        if getattr(args, name) < low:
            raise EvalError(f"--{name.replace('_', '-')} must be at least {low}")
    if args.min_seconds < 0 or args.max_seconds < 0 or (0 < args.max_seconds < args.min_seconds):
        raise EvalError(f"--min-seconds {args.min_seconds} / --max-seconds {args.max_seconds}: need 0 <= min <= max "
                        "(max 0 = no limit)")
    if args.prompt_seconds <= 0:
        raise EvalError("--prompt-seconds must be positive")
    return rows


def _run(args: argparse.Namespace, codec_weights: str, spkr_name_getter: str) -> int:
    from .utils.helpers import setup_logging

    setup_logging(level=logging.WARNING)
    if args.make_list is not None:
        if not args.source.is_dir():
            raise EvalError(f"--make-list needs a folder (LibriSpeech test-clean or a corpus), got {args.source}")
        refuse_inputs(args.make_list, [("source", args.source)], "--make-list")
        writable_file(args.make_list, "--make-list")
        utts = build_list(args.source, args.min_seconds, args.max_seconds, spkr_name_getter, args.max_utterances,
                          args.seed or 0)
        if args.make_list.is_file():
            note_replacing(args.make_list)
        write_list(utts, args.make_list)
        hours = sum(u.seconds for u in utts) / 3600
        print(f"{args.make_list}: {len(utts)} utterances of {len({u.speaker for u in utts})} speakers, {hours:.2f} h "
              f"({args.min_seconds}-{args.max_seconds} s)")
        return 0
    if args.out is None:
        raise EvalError("--out DIR is required (results, wavs and the resumable cache go there)")
    rows = _check_args(args)
    refuse_inputs(args.out, [("test list", args.source)], "--out")
    writable_folder(args.out, "--out")  # before the backends load and anything is scored
    t0 = time.perf_counter()
    utts = load_test_set(args.source, args, spkr_name_getter)
    plan = plan_prompts(utts, args.mode, args.seed, args.prompt_seconds)
    if not plan:
        raise EvalError(f"no utterance has a prompt in --mode {args.mode} (cross and reference need two utterances of "
                        "a speaker; continual needs utterances longer than --prompt-seconds)")

    from .emb import qnt
    from .export import InferenceFileError
    from .inference import SynthesisError, resolve_device
    from .metrics import PAPER_ASR, PAPER_SPEAKER, BackendUnavailableError, load_asr, load_speaker, vocabulary_of

    try:
        device = resolve_device(args.device)
    except SynthesisError as e:
        raise EvalError(str(e)) from None
    if codec_weights == "untrained" and ("codec" in rows or "model" in rows or args.sim_against == "codec"):
        print("note: codec_weights=untrained: the codec has random weights, so the codec and model rows are NOT "
              "speech; their WER and SIM only show that the pipeline runs", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        vocab = vocabulary_of([u.text for u in utts]) if args.asr == "pocketsphinx-vocab" else None
        asr = load_asr(args.asr, device, vocab)
        speaker = load_speaker(args.speaker, device)
    except BackendUnavailableError as e:
        raise EvalError(str(e)) from None
    if args.asr == "pocketsphinx-vocab":
        print("note: --asr pocketsphinx-vocab recognizes only the test transcripts' own words (closed vocabulary): "
              "its WER is for comparing rows here, never with the paper or open-vocabulary WER", file=sys.stderr)
    comparable = args.asr in PAPER_ASR and args.speaker.partition(":")[0] in PAPER_SPEAKER
    backends = {"asr": asr.describe(), "speaker": speaker.describe(), "comparable_with_paper": comparable,
                "normalizer": __import__("vall_e.metrics", fromlist=["x"]).NORMALIZER_VERSION}
    scorer = Scorer(asr, speaker, args.sim_against, codec_weights, device)
    common = {"mode": args.mode, "seed": args.seed, "prompt_seconds": args.prompt_seconds, "sim_against": args.sim_against,
              "asr": asr.describe(), "speaker": speaker.describe(), "normalizer": backends["normalizer"],
              "sim_codec": codec_weights if args.sim_against == "codec" else None}
    ctx = Context(utts, plan, args, args.out, scorer, ItemCache(args.out / "items.jsonl"), codec_weights, device,
                  common, progress=not args.no_progress)

    # the prompts, to listen to
    for u in ctx.items:
        p = plan[u.id]
        dest = inside(args.out, args.out / "prompts" / f"{u.id}.wav")
        if not dest.is_file():
            wav, sr = load_wav(p.audio, p.start, p.end)
            qnt.write_wav(wav, sr, dest)

    settings = {"mode": args.mode, "runs": args.runs, "best_of": args.best_of, "seed": args.seed,
                "prompt_seconds": args.prompt_seconds, "sim_against": args.sim_against, "min_seconds": args.min_seconds,
                "max_seconds": args.max_seconds, "codec_weights": codec_weights, "device": device, "rows": rows,
                "ar_ckpt": str(args.ar_ckpt) if args.ar_ckpt else None,
                "nar_ckpt": str(args.nar_ckpt) if args.nar_ckpt else None}
    digests: dict[tuple[str, int, str], str] = {}
    try:
        ref_rows = [r for r in rows if r != "model"]
        run_reference_rows(ctx, ref_rows)
        for row in ref_rows:
            s = {"row": row, "codec_weights": codec_weights if row == "codec" else None}
            for u in ctx.items:
                digests[(row, 0, u.id)] = ctx.digest(s, u, plan[u.id], 0)
        if "model" in rows:
            from .inference import Synthesizer

            fingerprints = {"ar": file_fingerprint(args.ar_ckpt), "nar": file_fingerprint(args.nar_ckpt)}
            synth = Synthesizer(args.ar_ckpt, args.nar_ckpt, device=device, codec_weights=codec_weights)
            needs_ref_text = bool(getattr(synth, "needs_ref_text", False))
            if needs_ref_text and args.mode != "continual":
                print("note: the AR was trained with prompt_mode=paper: each prompt is a WHOLE utterance of the speaker "
                      "with its transcript (continuation), not a 3 s crop; SIM is taken against that utterance",
                      file=sys.stderr)
            settings["sampling"] = model_settings(ctx, synth, fingerprints)["sampling"]
            settings["needs_ref_text"] = needs_ref_text
            settings["group_size"] = synth.group_size  # VALL-E 2 grouped code modeling of the AR (1: plain VALL-E)
            run_model_row(ctx, synth, fingerprints)
            ms = model_settings(ctx, synth, fingerprints)
            for run in range(args.runs):
                for u in ctx.items:
                    digests[("model", run, u.id)] = ctx.digest(ms, u, plan[u.id], run)
    except (SynthesisError, InferenceFileError, qnt.AudioError, qnt.CodecUnavailableError, BackendUnavailableError) as e:
        raise EvalError(str(e)) from None

    results = write_outputs(ctx, rows, backends, settings, digests)
    elapsed = time.perf_counter() - t0
    print((args.out / "results.md").read_text(encoding="utf-8"))
    calls = scorer.calls
    print(f"{args.out}: results.json, results.md, utterances.csv; {len(ctx.items)} utterances in {elapsed:.1f} s "
          f"(new work: {calls['synthesis']} syntheses, {calls['asr']} transcriptions, {calls['speaker']} embeddings"
          + (f"; {ctx.cache.stale} cached item(s) from other settings recomputed" if ctx.cache.stale else "") + ")")
    if len(ctx.items) < len(utts):
        print(f"note: {len(utts) - len(ctx.items)} utterance(s) have no prompt in --mode {args.mode} and are left out "
              "(listed in results.json test_set.skipped_without_prompt)", file=sys.stderr)
    del results
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
