#!/usr/bin/env python3
"""Make a small LibriTTS-shaped speech corpus with espeak-ng, for tests and demos.

    python scripts/make_corpus.py data/espeak --speakers 4 --utts 10 [--seed 0] [--max-words 8]

Layout (LibriTTS's): ``<out>/<speaker>/<chapter>/<speaker>_<chapter>_<n>.wav`` plus the
transcript ``<speaker>_<chapter>_<n>.normalized.txt``. Each speaker is one espeak-ng voice and
variant (``en-us+m3``, ``en-gb+f2`` ...) with its own speed and pitch; sentences come from the
built-in :data:`SENTENCES`, drawn per speaker from ``--seed``. Audio is espeak-ng's native
22.05 kHz mono 16-bit wav, so the tokenizer's resampling path is exercised. The speaker is the
grandparent folder, i.e. ``spkr_name_getter="lambda p: p.parts[-3]"`` as for LibriTTS.

Importable: ``make_corpus(out_dir, n_speakers, n_utts, ...)`` (the tests use it).
"""

from __future__ import annotations

import argparse
import random
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
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool_exec:
        list(pool_exec.map(lambda job: _synthesize(*job), jobs_list))
    return [job[-1] for job in jobs_list]


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser."""
    parser = argparse.ArgumentParser(description="Make a LibriTTS-shaped espeak-ng corpus.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--speakers", type=int, default=4, help="number of speakers (voices)")
    parser.add_argument("--utts", type=int, default=10, help="utterances per speaker")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-words", type=int, default=None, help="use only sentences this short (words)")
    parser.add_argument("--jobs", type=int, default=4, help="parallel espeak-ng processes")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    wavs = make_corpus(args.out_dir, args.speakers, args.utts, args.seed, args.max_words, args.jobs)
    print(f"wrote {len(wavs)} utterances of {args.speakers} speakers under {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
    raise SystemExit(main())
