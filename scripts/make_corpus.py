#!/usr/bin/env python3
"""Make a small LibriTTS-shaped speech corpus with espeak-ng, for tests and demos.

    python scripts/make_corpus.py data/espeak --speakers 4 --utts 10 [--seed 0] [--max-words 8]

Layout (LibriTTS's): ``<out>/<speaker>/<chapter>/<speaker>_<chapter>_<n>.wav`` plus the
transcript ``<speaker>_<chapter>_<n>.normalized.txt``. Each speaker is one espeak-ng voice and
variant (``en-us+m3``, ``en-gb+f2`` ...) with its own speed and pitch; sentences come from the
built-in :data:`SENTENCES`, drawn per speaker from ``--seed``. Audio is espeak-ng's native
22.05 kHz mono 16-bit wav, so the tokenizer's resampling path is exercised. The speaker is the
grandparent folder, i.e. ``spkr_name_getter="lambda p: p.parts[-3]"`` as for LibriTTS.

    python scripts/make_corpus.py data/espeak --speakers 8 --utts 150 --generated

``--generated``: each speaker says its own sentences from :func:`generated_sentences` (a grammar over
word lists written for this project: thousands of distinct sentences of about 20..60 phones), for
corpora that need more text than the built-in sentences.

Importable: ``make_corpus(out_dir, n_speakers, n_utts, ...)`` (the tests use it),
``make_voices(out_dir, texts, first_speaker)`` (given sentences per speaker) and
``generated_sentences(n_train, n_unseen)`` (``scripts/bench_learning.py`` uses them).
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

# Written for this project. Varied length, punctuation and sentence type. Short and medium ones
# give 20-41 phones, inside the default min_phones..max_phones (10..50); long ones 45-65.
SENTENCES: tuple[str, ...] = (
    # short: at most six words
    "The kettle whistled in the kitchen.",
    "Bring your umbrella, it might rain.",
    "Where did you leave the map?",
    "The old clock stopped at noon.",
    "Our train leaves from platform nine.",
    "Please close the window behind you.",
    "Nobody expected the storm so early.",
    "The children painted the fence blue.",
    "Can you hear the distant thunder?",
    "Hot soup tastes better in winter.",
    "My neighbor grows enormous pumpkins.",
    # medium: seven to nine words
    "A quiet river runs past the mill.",
    "Seven green bottles stood on the wall.",
    "Fresh bread smells wonderful in the early morning.",
    "She planted tulips along the garden path.",
    "The market opens before sunrise on Saturdays.",
    "We counted forty ducks on the frozen pond.",
    "His brother repairs bicycles in a small shop.",
    "Turn left at the bakery, then walk north.",
    "The library will be closed until next month.",
    "A curious fox watched us from the forest.",
    "Would you rather travel by boat or plane?",
    "Lightning struck the tall oak behind the church.",
    "Thick fog rolled in and hid the lighthouse.",
    "Why do cats always sit on warm laptops?",
    "Stop right there, the paint is still wet!",
    # long: ten words or more
    "After dinner, they played cards by the fireplace for hours.",
    "The recipe calls for three eggs, a cup of milk and some flour.",
    "My grandmother kept every letter she ever received in a wooden box.",
    "The museum displays ancient coins, maps and tools from many countries.",
    "When the music started, everyone in the hall stood up and danced.",
    "The pilot announced that we would land twenty minutes ahead of schedule.",
    "Snow covered the mountains, but the valley below stayed green and warm.",
    "He wrote the address on a scrap of paper and promptly lost it.",
    "Several volunteers cleaned the beach and collected bags of plastic.",
    "The astronomer pointed her telescope toward a faint and distant galaxy.",
    "If the bridge is closed again, we will have to take the ferry.",
    "The baker sold out of cinnamon rolls long before the lunch crowd arrived.",
    "Nobody could explain why the lights in the old theater kept flickering.",
    "Although the path was steep and rocky, the hikers reached the summit before noon.",
    "Is it true that the moon looks larger when it is close to the horizon?",
    "Quickly, gather the blankets and lanterns before the rain reaches the camp!",
)

# One espeak-ng voice+variant per speaker (all ship with espeak-ng; no mbrola voices needed).
VOICES: tuple[str, ...] = (
    "en-us+m3", "en-gb+f2", "en-us+f4", "en-gb-scotland+m1", "en-029+f3", "en-us+m7",
    "en-gb-x-rp+f1", "en-us-nyc+m5", "en-gb+m2", "en-us+f5", "en-gb-x-gbclan+m4", "en-us+m6",
)


def sentences(max_words: int | None = None) -> list[str]:
    """The built-in sentences, optionally only those with at most ``max_words`` words."""
    return [s for s in SENTENCES if max_words is None or len(s.split()) <= max_words]


# --------------------------------------------------------------------------------------------
# generated sentences: many distinct ones, for benchmarks that need more text than SENTENCES holds

# Word lists written for this project. A sentence is a subject, a verb phrase and optional parts
# (place, time, a second clause) in one of a few forms (statement, question, exclamation, fronted
# time); the combinations number in the millions, so thousands of distinct sentences are cheap.
_DETERMINERS = ("the", "a", "my", "our", "your", "his", "her", "their", "that")
_PEOPLE = (
    "sailor", "teacher", "farmer", "baker", "pilot", "doctor", "painter", "student", "neighbor", "cousin",
    "gardener", "fisherman", "musician", "writer", "nurse", "driver", "captain", "tailor", "miner", "dancer",
    "carpenter", "grocer", "porter", "shepherd", "singer", "soldier", "jeweler", "plumber", "butcher", "clerk",
    "dog", "cat", "horse", "goat", "parrot", "rabbit", "fox", "owl", "donkey", "monkey",
)
_PERSON_ADJECTIVES = (
    "old", "young", "quiet", "busy", "tired", "clever", "tall", "gentle", "brave", "angry", "cheerful",
    "careful", "lonely", "friendly", "curious", "patient", "nervous", "proud", "sleepy", "hungry", "clumsy",
    "polite", "stubborn", "modest",
)
# (past tense, base form)
_VERBS = (
    ("painted", "paint"), ("carried", "carry"), ("repaired", "repair"), ("opened", "open"), ("found", "find"),
    ("lost", "lose"), ("washed", "wash"), ("sold", "sell"), ("bought", "buy"), ("borrowed", "borrow"),
    ("cleaned", "clean"), ("dropped", "drop"), ("lifted", "lift"), ("pushed", "push"), ("pulled", "pull"),
    ("watched", "watch"), ("followed", "follow"), ("counted", "count"), ("wrapped", "wrap"), ("packed", "pack"),
    ("hid", "hide"), ("fixed", "fix"), ("built", "build"), ("moved", "move"), ("filled", "fill"),
    ("emptied", "empty"), ("noticed", "notice"), ("dragged", "drag"), ("polished", "polish"), ("returned", "return"),
    ("stole", "steal"), ("kept", "keep"), ("threw", "throw"), ("caught", "catch"), ("shook", "shake"),
    ("locked", "lock"), ("measured", "measure"), ("tied", "tie"), ("weighed", "weigh"), ("guarded", "guard"),
)
_THING_ADJECTIVES = (
    "small", "heavy", "broken", "wooden", "empty", "shiny", "green", "red", "yellow", "narrow", "dusty",
    "ancient", "enormous", "tiny", "striped", "rusty", "golden", "purple", "crooked", "spotted", "silver",
    "fragile", "muddy", "brand new",
)
_THINGS = (
    "boat", "basket", "window", "ladder", "bucket", "letter", "bicycle", "lantern", "blanket", "kettle",
    "wagon", "box", "chair", "table", "hammer", "umbrella", "bottle", "book", "map", "coin", "drum", "fence",
    "gate", "rope", "candle", "bell", "mirror", "suitcase", "violin", "teapot", "pillow", "saddle", "barrel",
    "envelope", "compass", "helmet", "carpet", "shovel", "clock", "jar",
)
_PLACES = (
    "near the harbor", "behind the station", "under the bridge", "beside the river", "at the market",
    "in the garden", "inside the barn", "across the street", "on the hill", "by the old mill",
    "next to the church", "outside the bakery", "in the village", "along the shore", "at the crossroads",
    "in the attic", "behind the school", "near the fountain", "on the roof", "in the cellar",
    "at the end of the lane", "by the lighthouse", "in the forest", "on the platform",
)
_TIMES = (
    "last winter", "before sunrise", "every morning", "after lunch", "on Sunday", "late at night",
    "in the spring", "yesterday afternoon", "before the storm", "during the festival", "at dawn",
    "after the concert", "on Tuesday evening", "in the summer", "twice a week", "long ago",
    "before breakfast", "at midnight",
)
_CLAUSES = (
    "and then went home", "but nobody noticed", "because the wind was strong", "while the children slept",
    "so everyone could rest", "although it was raining", "and everyone laughed", "before the guests arrived",
    "when the bell rang", "until the sun went down", "as the train left", "and nobody said a word",
    "because the road was closed", "while the kettle boiled", "but the door stayed shut",
    "and the dog barked twice", "after the rain stopped", "since the shop was closed",
)
_EXCLAIMS = ("Look", "Listen", "Quick", "Imagine that", "Oh no", "Well")
_QUESTIONS = ("Did", "Why did", "When did", "Where did", "How did")
# rough phones per letter of English text (g2p_en, measured on these lists), for the length filter
_PHONES_PER_LETTER = 0.81
GENERATED_MIN_PHONES, GENERATED_MAX_PHONES = 20, 60  # estimated; the real count comes from g2p


def estimate_phones(sentence: str) -> int:
    """A rough phone count of ``sentence`` as :func:`vall_e.emb.g2p.encode` would give it (no g2p needed):
    letters x 0.81, plus one ``_`` per word gap and per punctuation mark."""
    words = re.findall(r"[A-Za-z']+", sentence)
    letters = sum(len(w) for w in words)
    marks = len(re.findall(r"[.,!?]", sentence))
    return round(letters * _PHONES_PER_LETTER) + max(0, len(words) - 1) + marks


def _generate_one(rng: random.Random) -> str:
    """One sentence of the grammar above, drawn from ``rng``."""

    def subject() -> str:
        det = rng.choice(_DETERMINERS)
        adj = rng.choice(_PERSON_ADJECTIVES) + " " if rng.random() < 0.6 else ""
        noun = rng.choice(_PEOPLE)
        if det == "a" and (adj or noun)[:1] in "aeiou":
            det = "an"
        return f"{det} {adj}{noun}"

    def thing() -> str:
        det = rng.choice(("the", "a", "his", "her", "their", "one", "that"))
        adj = rng.choice(_THING_ADJECTIVES) + " " if rng.random() < 0.6 else ""
        noun = rng.choice(_THINGS)
        if det == "a" and (adj or noun)[:1] in "aeiou":
            det = "an"
        return f"{det} {adj}{noun}"

    past, base = rng.choice(_VERBS)
    place = " " + rng.choice(_PLACES) if rng.random() < 0.5 else ""
    time = " " + rng.choice(_TIMES) if rng.random() < 0.4 else ""
    form = rng.random()
    if form < 0.5:
        clause = ", " + rng.choice(_CLAUSES) if rng.random() < 0.35 else ""
        text = f"{subject()} {past} {thing()}{place}{time}{clause}."
    elif form < 0.7:
        text = f"{rng.choice(_QUESTIONS)} {subject()} {base} {thing()}{place}{time}?"
    elif form < 0.85:
        text = f"{rng.choice(_EXCLAIMS)}, {subject()} {past} {thing()}{place}!"
    else:
        fronted = rng.choice(_TIMES)
        text = f"{fronted}, {subject()} {past} {thing()}{place}."
    return text[0].upper() + text[1:]


def _is_unseen(sentence: str) -> bool:
    """The fixed eighth of all generated sentences kept for evaluation (a hash of the text, so the
    choice does not depend on how many sentences are asked for)."""
    import hashlib

    return hashlib.sha1(sentence.encode("utf-8")).digest()[0] % 8 == 0


def generated_sentences(n_train: int, n_unseen: int = 0, seed: int = 0) -> tuple[list[str], list[str]]:
    """``n_train`` training and ``n_unseen`` evaluation sentences, all distinct; the two lists never share one.

    Deterministic in ``seed``, and each list is a prefix of the same list asked for longer: a larger
    corpus adds sentences without changing the ones it had, and the unseen sentences do not depend
    on ``n_train``. Sentences have about 20..60 phones (:func:`estimate_phones`; the filter is an
    estimate, so a few land just outside), in several forms: statements, questions, exclamations,
    with optional places, times and second clauses.
    """
    if n_train < 0 or n_unseen < 0:
        raise ValueError("n_train and n_unseen must not be negative")
    rng = random.Random(f"vall_e-generated-{seed}")
    seen: set[str] = set()
    train: list[str] = []
    unseen: list[str] = []
    draws, limit = 0, 200 * (n_train + n_unseen) + 1000  # far beyond need: the grammar has millions of sentences
    while len(train) < n_train or len(unseen) < n_unseen:
        draws += 1
        if draws > limit:  # pragma: no cover - only if the word lists shrank to a handful
            raise RuntimeError(f"the sentence grammar ran out of distinct sentences after {len(seen)}")
        text = _generate_one(rng)
        if text in seen or not GENERATED_MIN_PHONES <= estimate_phones(text) <= GENERATED_MAX_PHONES:
            continue
        seen.add(text)
        if _is_unseen(text):
            if len(unseen) < n_unseen:
                unseen.append(text)
        elif len(train) < n_train:
            train.append(text)
    return train, unseen


def _espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        hint = "apt-get install -y espeak-ng (macOS: brew install espeak-ng)"
        raise RuntimeError(f"espeak-ng is not installed: {hint}")
    return exe


def _synthesize(exe: str, text: str, voice: str, speed: int, pitch: int, wav: Path) -> None:
    from vall_e.utils.helpers import atomic_path, atomic_write_text

    with atomic_path(wav) as tmp:
        cmd = [exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(tmp), "--", text]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or tmp.stat().st_size == 0:
            raise RuntimeError(f"espeak-ng failed for {wav} ({' '.join(cmd)}): {done.stderr.strip()}")
    atomic_write_text(text + "\n", wav.with_name(wav.name.split(".", 1)[0] + ".normalized.txt"))


def make_corpus(
    out_dir: str | Path,
    n_speakers: int = 4,
    n_utts: int = 10,
    seed: int = 0,
    max_words: int | None = None,
    jobs: int = 4,
) -> list[Path]:
    """Synthesize ``n_speakers`` x ``n_utts`` utterances under ``out_dir``; return the wav paths.

    Speaker ``i`` (0-based) is folder ``str(101 + i)`` with chapter ``str(1000 + i)`` and voice
    ``VOICES[i % len(VOICES)]``. Each speaker draws ``n_utts`` distinct sentences (repeating only
    when the pool is smaller). Deterministic for a given seed and espeak-ng version.
    """
    if n_speakers < 1 or n_utts < 1:
        raise ValueError("n_speakers and n_utts must be at least 1")
    pool = sentences(max_words)
    if not pool:
        raise ValueError(f"no built-in sentence has at most {max_words} words")
    exe = _espeak()
    rng = random.Random(seed)
    out_dir = Path(out_dir)
    jobs_list = []
    for i in range(n_speakers):
        speaker, chapter = str(101 + i), str(1000 + i)
        voice = VOICES[i % len(VOICES)]
        speed, pitch = rng.randint(140, 185), rng.randint(30, 70)
        picks = [s for _ in range(-(-n_utts // len(pool))) for s in rng.sample(pool, len(pool))][:n_utts]
        for n, text in enumerate(picks, start=1):
            wav = out_dir / speaker / chapter / f"{speaker}_{chapter}_{n:06d}.wav"
            jobs_list.append((exe, text, voice, speed, pitch, wav))
    return _run_jobs(jobs_list, jobs)


def _run_jobs(jobs_list: list[tuple[str, str, str, int, int, Path]], jobs: int) -> list[Path]:
    """Run espeak-ng for every ``(exe, text, voice, speed, pitch, wav)``, ``jobs`` at a time; the wav paths."""
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool_exec:
        list(pool_exec.map(lambda job: _synthesize(*job), jobs_list))
    return [job[-1] for job in jobs_list]


def make_voices(
    out_dir: str | Path,
    texts: Sequence[Sequence[str]],
    first_speaker: int = 0,
    seed: int = 0,
    jobs: int = 4,
) -> list[Path]:
    """Synthesize ``texts[i]`` (in order) in the voice of speaker ``first_speaker + i``; return the wav paths.

    Speaker ``s`` is folder ``str(101 + s)`` with chapter ``str(1000 + s)`` and voice
    ``VOICES[s % len(VOICES)]``, as in :func:`make_corpus`; its speed and pitch depend on ``seed`` and
    ``s`` only, so a speaker sounds the same whichever call makes it. Two calls with disjoint
    speaker ranges make disjoint voices (e.g. training voices 0..7 and held-out voices 8..9; at most
    ``len(VOICES)`` distinct ones).
    """
    if first_speaker < 0:
        raise ValueError("first_speaker must not be negative")
    exe = _espeak()
    out_dir = Path(out_dir)
    jobs_list = []
    for i, lines in enumerate(texts):
        s = first_speaker + i
        speaker, chapter = str(101 + s), str(1000 + s)
        rng = random.Random(f"vall_e-voice-{seed}-{s}")
        speed, pitch = rng.randint(140, 185), rng.randint(30, 70)
        for n, text in enumerate(lines, start=1):
            wav = out_dir / speaker / chapter / f"{speaker}_{chapter}_{n:06d}.wav"
            jobs_list.append((exe, text, VOICES[s % len(VOICES)], speed, pitch, wav))
    return _run_jobs(jobs_list, jobs)


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser."""
    parser = argparse.ArgumentParser(description="Make a LibriTTS-shaped espeak-ng corpus.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--speakers", type=int, default=4, help="number of speakers (voices)")
    parser.add_argument("--utts", type=int, default=10, help="utterances per speaker")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-words", type=int, default=None, help="use only sentences this short (words)")
    parser.add_argument("--jobs", type=int, default=4, help="parallel espeak-ng processes")
    parser.add_argument("--generated", action="store_true",
                        help="each speaker says its own generated sentences (generated_sentences) instead of "
                        "drawing from the built-in ones: any number of distinct sentences")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.generated:
        if args.max_words is not None:
            parser.error("--max-words applies to the built-in sentences only, not with --generated")
        pool, _ = generated_sentences(args.speakers * args.utts, seed=args.seed)
        texts = [pool[i * args.utts : (i + 1) * args.utts] for i in range(args.speakers)]
        wavs = make_voices(args.out_dir, texts, seed=args.seed, jobs=args.jobs)
    else:
        wavs = make_corpus(args.out_dir, args.speakers, args.utts, args.seed, args.max_words, args.jobs)
    print(f"wrote {len(wavs)} utterances of {args.speakers} speakers under {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
    raise SystemExit(main())
