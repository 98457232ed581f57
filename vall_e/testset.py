"""What the evaluation protocol evaluates: the test list and the prompt of every utterance.

A test list is a UTF-8 TSV file with the header ``id audio text speaker seconds``
(:func:`write_list` / :func:`read_list`), made from a LibriSpeech subset or a corpus in this
project's layout (:func:`build_list`), filtered by duration and sorted by speaker, then id.
:func:`plan_prompts` picks each utterance's prompt for a mode (``cross``, ``continual``,
``reference``) from a string-seeded generator, so the choice does not depend on list order or
process. Scoring and running the rows: :mod:`vall_e.evaluate`.
"""

from __future__ import annotations

import csv
import io
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence

if TYPE_CHECKING:
    from torch import Tensor

LIST_COLUMNS = ("id", "audio", "text", "speaker", "seconds")


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
    from .emb.codec import AudioError, load_audio

    try:
        wav, sr = load_audio(path, start if start > 0 else None, end)
    except AudioError as e:
        raise EvalError(str(e)) from None
    return wav.mean(0), sr
