#!/usr/bin/env python3
"""Learning benchmark on unseen speakers: train the AR and NAR per model core and seed, score them
on held-out voices' unseen sentences; prints one JSON object.

    python scripts/bench_learning.py --workdir DIR            # default size, ~28 min on 2 idle CPU cores (estimated)
    python scripts/bench_learning.py --quick --arch enhuiz    # ~2-minute smoke size

What it does:

1. **Corpus** (espeak-ng, at run time): ``--speakers`` training voices, each saying its own
   ``--sentences`` generated sentences (``scripts/make_corpus.py``: ``generated_sentences``, about
   20..60 phones each), and ``--held-out`` other voices, each saying ``--unseen`` sentences that no
   training voice says. Phones by :func:`vall_e.emb.g2p.phonemize_folder`, codes by
   :func:`vall_e.emb.qnt.quantize_folder` with ``codec_weights=untrained`` in float32 (the codes
   only have to agree with each other here), two processes at a time. A ``--workdir`` that
   already holds the corpus of the same settings reuses it.
2. **Training**: for each ``--arch`` (default ``paper`` and ``enhuiz``), the AR and the NAR, each
   ``--seeds`` times, through the real entry point ``python -m vall_e.train`` with ``key=value``
   words (``prompt_mode=paper``, the preset ``<ar|nar>-<preset>``, a linear warmup over the first
   10% of the steps to ``--lr``, then the trainer's decay to 0 at the last step). ``--jobs`` runs at
   a time, each with one thread (tiny models gain nothing from a second one). ``--group-sizes``
   other than 1 add AR runs with ``group_size=G``. The held-out voices are never in ``data_dirs``.
3. **Evaluation** of each run's exported model (:func:`vall_e.export.export`, loaded with
   :func:`vall_e.inference.load_model`), on the CPU unless ``--device``:

   - ``unseen_loss`` / ``unseen_acc``: teacher-forced mean cross-entropy / top-1 accuracy of the
     model's ``forward`` over every held-out utterance, weighted by target count, with the prompts
     of the training prompt mode (``paper``): the AR's prompt is empty ``(0, 8)``; the NAR's is a
     segment of the utterance itself, as its training draws it (``min(3 s, half the utterance)``
     long, at a start fixed per utterance), left out of the loss through ``prompt_spans``, and the
     NAR is scored on every level 1..7 (``quant_levels`` given; ``unseen_loss_by_level`` lists them);
   - ``seen_loss`` / ``seen_acc``: the same on a fixed subset of training utterances (training
     voices, sentences the run trained on: its seed's train split);
   - ``seen_voice_unseen_text_loss``: the same on the utterances of the training voices that the
     trainer's own split held out of training (about 5%; its ``val`` split);
   - AR only, ``len_error``: continuation as synthesis does it for a ``prompt_mode=paper`` AR
     (:class:`vall_e.inference.Synthesizer` with a reference transcript): the text is the
     reference's phones, ``_`` and the target's phones wrapped ``<s> … </s>`` in the model's phone
     map, the prompt is empty and ``prefix_list`` holds the reference's codebook-1 codes. The
     reference is the next utterance of the same held-out voice. Greedy (``temperature=0``), at
     most 4x the true number of frames; ``len_error`` = mean ``|generated - true| / true`` (a
     model that never stops scores 3.0). ``len_ratio`` is the mean ``generated / true`` (its bias)
     and ``stop_rate`` the share of outputs the model ended itself.

Output keys: ``runs`` (one record per arch, model, seed and AR group size), ``summary``
(``summary.<ar|nar>.<arch>``: the mean over seeds of each metric plus ``unseen_loss_spread``
and ``len_error_spread``, max - min over seeds; AR runs with ``group_size`` G != 1 under
``<arch>+g<G>``), ``settings``, ``corpus``, ``machine``, ``date``, ``wall_s``. Progress goes to stderr.

Timing: runs are timed by their own wall clock (``wall_s``: process start to exit, including the
trainer's start-up, its final evaluation and checkpoint) and by the trainer's ``train_s`` (first to
last step). Two at a time on 2 cores they share memory bandwidth, so ``wall_s`` is not a one-job
figure. ``codec_weights=untrained``: the audio behind the codes is espeak-ng speech, but the codes
come from an untrained codec, so the numbers compare models with each other, not with the paper's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

if TYPE_CHECKING:
    from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
ARCHS = ("paper", "enhuiz")
CORPUS_STAMP = "bench_learning.json"  # marks a corpus this script made (and may reuse or replace)
RUNS_MARK = ".bench_learning"  # marks a runs folder this script made (and may clear)
SPKR_NAME_GETTER = "lambda p: p.parts[-3]"  # <speaker>/<chapter>/<id>: make_corpus's layout
LEN_CAP = 4  # greedy decoding stops at this many times the true length
EVAL_BATCH = 8


class BenchError(Exception):
    """A problem the user can fix (flags, a missing tool, a work folder that is not ours); exit status 2."""


class RunFailed(Exception):
    """A training run exited with an error; the message holds its log's tail and path."""


# ----------------------------------------------------------------------------------------------
# settings


@dataclass
class Settings:
    """Everything that decides what is measured (recorded in the output as ``settings``)."""

    archs: list[str]
    seeds: int
    group_sizes: list[int]
    speakers: int
    held_out: int
    sentences: int
    unseen: int
    steps_ar: int
    steps_nar: int
    preset: str
    lr: float
    batch_size: int
    jobs: int
    device: str
    quick: bool
    prompt_mode: str = "paper"
    codec_weights: str = "untrained"
    corpus_seed: int = 0

    def warmup(self, steps: int) -> int:
        """Linear warmup steps: the first 10% of the run."""
        return max(1, steps // 10)

    def model_name(self, kind: str) -> str:
        """The preset of ``kind`` (``"ar"``/``"nar"``): ``ar-tiny``, ``nar-quarter``, ``ar`` for ``full`` ..."""
        return kind if self.preset == "full" else f"{kind}-{self.preset}"


# the default size and the --quick size; explicit flags override either
# The default measures alignment, not only loss: an ar-tiny needs thousands of steps over >= 1,000 distinct
# sentences before greedy decoding stops near the true length (a quarter AR at 300 steps never stops).
# Estimated ~28 min on the 2-core development machine with nothing else running: CPU time per step at
# batch 6 measured 0.148 s (ar-tiny) and 0.189 s (nar-tiny), ~12 s start-up per run, ~5 min for the corpus
# (qnt of ~4,250 s of audio in two processes): 4 AR runs of ~8 min and 4 NAR runs of ~3.5 min, two at a time.
FULL = dict(speakers=8, held_out=2, sentences=150, unseen=16, steps_ar=3000, steps_nar=1000, batch_size=6)
QUICK = dict(speakers=4, held_out=2, sentences=12, unseen=4, steps_ar=40, steps_nar=40, batch_size=6)


def parse_int_list(text: str, what: str) -> list[int]:
    """``"1,2"`` -> ``[1, 2]``; each a positive integer, no repeats."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchError(f"{what}={text!r}: give positive integers separated by commas, e.g. 1,2") from None
    if not values or any(v < 1 for v in values) or len(set(values)) != len(values):
        raise BenchError(f"{what}={text!r}: give distinct positive integers separated by commas, e.g. 1,2")
    return values


def parse_archs(text: str) -> list[str]:
    """``"paper,enhuiz"`` -> ``["paper", "enhuiz"]``, each one of :data:`ARCHS`."""
    archs = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in archs if a not in ARCHS]
    if not archs or bad or len(set(archs)) != len(archs):
        raise BenchError(f"--arch {text!r}: give {' and/or '.join(ARCHS)}, separated by a comma (e.g. --arch paper,enhuiz)")
    return archs


# ----------------------------------------------------------------------------------------------
# pure helpers (unit-tested)


def length_stats(generated: Sequence[int], true: Sequence[int], caps: Sequence[int]) -> dict[str, float]:
    """Length agreement of greedy continuations with the true utterances.

    Args:
        generated: frames each continuation produced (the stop token not counted).
        true: frames of each true utterance (> 0).
        caps: the most frames each could produce; an output at its cap was cut, not stopped.
    Returns:
        ``len_error`` mean ``|g - t| / t``, ``len_ratio`` mean ``g / t``, ``stop_rate`` share of
        outputs below their cap.
    """
    if not generated or not (len(generated) == len(true) == len(caps)):
        raise ValueError("need one generated length, true length and cap per item, at least one item")
    if any(t <= 0 for t in true):
        raise ValueError("true lengths must be positive")
    n = len(generated)
    return {
        "len_error": sum(abs(g - t) / t for g, t in zip(generated, true)) / n,
        "len_ratio": sum(g / t for g, t in zip(generated, true)) / n,
        "stop_rate": sum(g < c for g, c in zip(generated, caps)) / n,
    }


SUMMARY_METRICS = ("unseen_loss", "unseen_acc", "seen_loss", "seen_acc", "seen_voice_unseen_text_loss",
                   "len_error", "len_ratio", "stop_rate", "final_train_loss", "wall_s", "cpu_s", "train_s")


def summary_key(run: dict[str, Any]) -> str:
    """Where a run goes under ``summary.<model>``: its arch, plus ``+g<G>`` for an AR with group size G != 1."""
    g = run.get("group_size", 1) or 1
    return run["arch"] if g == 1 else f"{run['arch']}+g{g}"


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{model: {key: {metric: mean over seeds, ..., "unseen_loss_spread", "len_error_spread", "seeds"}}}``.

    ``key`` is :func:`summary_key`. A metric missing or None in a run is left out of its mean; a
    metric no run of the group has is left out. ``*_spread`` is max - min over the seeds.
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["model"], summary_key(run)), []).append(run)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (model, key), members in sorted(groups.items()):
        entry: dict[str, Any] = {"seeds": sorted(r["seed"] for r in members)}
        for metric in SUMMARY_METRICS:
            values = [float(r[metric]) for r in members if r.get(metric) is not None]
            if not values:
                continue
            entry[metric] = statistics.fmean(values)
            if metric in ("unseen_loss", "len_error"):
                entry[f"{metric}_spread"] = max(values) - min(values)
        out.setdefault(model, {})[key] = entry
    return out


def run_name(arch: str, kind: str, seed: int, group_size: int = 1) -> str:
    """The run's ``name=`` (its checkpoint and log folder): ``enhuiz/ar/s0``, ``paper/ar-g2/s1`` ..."""
    return f"{arch}/{kind}{'' if group_size == 1 else f'-g{group_size}'}/s{seed}"


def train_words(settings: Settings, arch: str, kind: str, seed: int, group_size: int, data_dir: Path,
                runs_dir: Path) -> list[str]:
    """The ``key=value`` words of one ``python -m vall_e.train`` run."""
    steps = settings.steps_ar if kind == "ar" else settings.steps_nar
    words = [
        f"model={settings.model_name(kind)}",
        f"arch={arch}",
        f"prompt_mode={settings.prompt_mode}",
        f"data_dirs=[{data_dir}]",
        f"spkr_name_getter={SPKR_NAME_GETTER}",
        "min_phones=1",  # keep every utterance: the corpus is already what it should be
        "max_phones=1000",
        f"seed={seed}",
        f"batch_size={settings.batch_size}",
        f"max_iter={steps}",
        f"warmup_num_steps={settings.warmup(steps)}",
        f"warmup_max_lr={settings.lr}",
        f"save_ckpt_every={steps}",
        f"eval_every={steps}",  # the trainer's own evaluation only at the end, kept short:
        "max_num_val=2",
        "max_val_ar_steps=20",
        "eval_batch_size=4",
        f"log_every={max(1, min(50, steps // 10))}",
        "keep_last_ckpts=1",
        "tensorboard=false",
        "nj=0",
        f"device={settings.device}",
        f"codec_weights={settings.codec_weights}",
        f"ckpt_root={runs_dir / 'ckpts'}",
        f"log_root={runs_dir / 'logs'}",
        f"name={run_name(arch, kind, seed, group_size)}",
    ]
    if kind == "ar" and group_size != 1:
        words.append(f"group_size={group_size}")
    return words


def train_log_stats(text: str) -> list[dict[str, Any]]:
    """The ``"split": "train"`` stats objects of a training log (one JSON object per logged line)."""
    out = []
    for line in text.splitlines():
        start = line.find("{")
        if start < 0 or '"split": "train"' not in line:
            continue
        try:
            obj = json.loads(line[start:])
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and obj.get("split") == "train":
            out.append(obj)
    return out


# ----------------------------------------------------------------------------------------------
# corpus


def load_make_corpus() -> ModuleType:
    """``scripts/make_corpus.py`` as a module (scripts/ is not a package)."""
    name = "make_corpus"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / "make_corpus.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def corpus_plan(settings: Settings, train_text: Sequence[str], unseen_text: Sequence[str]) -> dict[str, Any]:
    """What the corpus holds (sizes, and a digest of its sentences); equal plans mean a reusable corpus."""
    import hashlib

    digest = hashlib.sha1("\n".join([*train_text, "", *unseen_text]).encode("utf-8")).hexdigest()
    return {"speakers": settings.speakers, "held_out": settings.held_out, "sentences": settings.sentences,
            "unseen": settings.unseen, "seed": settings.corpus_seed, "codec_weights": settings.codec_weights,
            "qnt_dtype": "float32", "text_sha1": digest, "format": 1}


def _quantize_in_parallel(folders: Sequence[Path], codec_weights: str, procs: int) -> None:
    """:func:`vall_e.emb.qnt.quantize_folder` over each folder, split into ``procs`` processes of one
    thread (the encoder's rank/world_size shards); float32, as only agreement within this corpus matters."""
    code = (
        "import sys, torch\n"
        "torch.set_num_threads(1)\n"
        "from vall_e.emb import qnt\n"
        "rank, world = int(sys.argv[1]), int(sys.argv[2])\n"
        "for folder in sys.argv[4:]:\n"
        "    s = qnt.quantize_folder(folder, codec_weights=sys.argv[3], device='cpu', progress=False,\n"
        "                            dtype='float32', rank=rank, world_size=world)\n"
        "    if not s.ok:\n"
        "        print(s.report(), file=sys.stderr); sys.exit(1)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": _pythonpath()}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    procs_list = [
        subprocess.Popen([sys.executable, "-c", code, str(r), str(procs), codec_weights, *map(str, folders)],
                         cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
        for r in range(procs)
    ]
    with _CHILDREN.lock:
        _CHILDREN.procs.update(procs_list)
    failures = []
    for p in procs_list:
        out, _ = p.communicate()
        with _CHILDREN.lock:
            _CHILDREN.procs.discard(p)
        if p.returncode != 0:
            failures.append(out[-3000:])
    if failures:
        raise RuntimeError("quantizing the corpus failed:\n" + "\n".join(failures))


def make_bench_corpus(root: Path, settings: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    """Make (or reuse) ``root/train`` (training voices) and ``root/heldout`` (held-out voices, unseen
    sentences), with phones and codes; returns the corpus record for the output."""
    mc = load_make_corpus()
    n_train, n_unseen = settings.speakers * settings.sentences, settings.held_out * settings.unseen
    train_text, unseen_text = mc.generated_sentences(n_train, n_unseen, seed=settings.corpus_seed)
    plan = corpus_plan(settings, train_text, unseen_text)
    stamp = root / CORPUS_STAMP
    if stamp.is_file():
        try:
            done = json.loads(stamp.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            done = {}
        if done.get("plan") == plan and done.get("record"):
            log(f"corpus: reusing {root}")
            return {**done["record"], "reused": True}
        log(f"corpus: {root} was made with other settings or not finished; making it again")
        shutil.rmtree(root)
    elif root.exists() and any(root.iterdir()):
        raise BenchError(f"{root} exists and was not made by this script (no {CORPUS_STAMP}); give another --workdir "
                         "or empty that folder")
    root.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"plan": plan, "record": None}), encoding="utf-8")  # ours, not finished yet
    s, u = settings.sentences, settings.unseen
    t0 = time.time()
    log(f"corpus: espeak-ng, {settings.speakers} voices x {s} sentences + {settings.held_out} held-out voices x {u}")
    jobs = max(2, settings.jobs)
    mc.make_voices(root / "train", [train_text[i * s : (i + 1) * s] for i in range(settings.speakers)],
                   first_speaker=0, seed=settings.corpus_seed, jobs=jobs)
    mc.make_voices(root / "heldout", [unseen_text[i * u : (i + 1) * u] for i in range(settings.held_out)],
                   first_speaker=settings.speakers, seed=settings.corpus_seed, jobs=jobs)
    t1 = time.time()
    from vall_e.emb import g2p

    log("corpus: g2p")
    for part in ("train", "heldout"):
        summary = g2p.phonemize_folder(root / part, progress=False)
        if not summary.ok:
            raise RuntimeError(summary.report())
    t2 = time.time()
    log(f"corpus: qnt (codec_weights={settings.codec_weights}, float32, {max(1, settings.jobs)} processes)")
    _quantize_in_parallel([root / "train", root / "heldout"], settings.codec_weights, max(1, settings.jobs))
    t3 = time.time()
    record: dict[str, Any] = {
        "train": _corpus_stats(root / "train"),
        "heldout": _corpus_stats(root / "heldout"),
        "espeak_s": round(t1 - t0, 1),
        "g2p_s": round(t2 - t1, 1),
        "qnt_s": round(t3 - t2, 1),
    }
    stamp.write_text(json.dumps({"plan": plan, "record": record}, indent=1), encoding="utf-8")
    return {**record, "reused": False}


def _corpus_stats(folder: Path) -> dict[str, Any]:
    """Utterances, voices, phones (min/median/max) and frames (median, total seconds) of a corpus part."""
    items = load_items(folder)
    phones = sorted(len(it.phones) for it in items)
    frames = sorted(len(it.codes) for it in items)
    return {
        "utterances": len(items),
        "voices": len({it.speaker for it in items}),
        "phones_min": phones[0], "phones_median": statistics.median(phones), "phones_max": phones[-1],
        "frames_median": statistics.median(frames),
        "audio_s": round(sum(frames) / 75.0, 1),
    }


@dataclass
class Item:
    """One utterance for evaluation: ``codes`` ``(T, 8)`` int64, ``phones`` as in its ``.phn.txt``."""

    uid: str
    speaker: str
    phones: list[str]
    codes: "Tensor"
    path: str = ""


def load_items(folder: Path, paths: Optional[Sequence[Path]] = None) -> list[Item]:
    """The utterances under ``folder`` (or just ``paths``, ``.qnt.pt`` files), sorted by path."""
    from vall_e.data import load_codes
    from vall_e.utils.helpers import sibling, utterance_id

    qnts = sorted(Path(p) for p in paths) if paths is not None else sorted(
        p for p in folder.rglob("*.qnt.pt") if not any(part.startswith(".") for part in p.relative_to(folder).parts))
    items = []
    for q in qnts:
        phones = sibling(q, ".phn.txt").read_text(encoding="utf-8").split()
        items.append(Item(utterance_id(q), q.parts[-3], phones, load_codes(q), str(q)))
    return items


def seen_subset(train_paths: Sequence[str], per_voice: int) -> list[str]:
    """A fixed subset of training utterances: ``per_voice`` of each voice, chosen by a fixed-seed shuffle
    of the voice's sorted paths (``<speaker>/<chapter>/<id>``)."""
    by_voice: dict[str, list[str]] = {}
    for p in sorted(train_paths):
        by_voice.setdefault(Path(p).parts[-3], []).append(p)
    out = []
    for voice in sorted(by_voice):
        paths = by_voice[voice]
        random.Random(f"bench-seen-{voice}").shuffle(paths)
        out += sorted(paths[:per_voice])
    return out


# ----------------------------------------------------------------------------------------------
# evaluation


def _chunks(n: int, size: int) -> list[range]:
    return [range(a, min(a + size, n)) for a in range(0, n, size)]


def _text_ids(items: Sequence[Item], phone_map: dict[str, int]) -> tuple[list[Item], list["Tensor"], int]:
    """Items whose phones the model knows, their ``(t,)`` ids of ``<s> … </s>``, and how many were skipped."""
    from vall_e.ar import whole_groups
    from vall_e.data import DataError, encode_phones

    kept, ids, skipped = [], [], 0
    for it in items:
        try:
            ids.append(encode_phones(it.phones, phone_map))
        except DataError:
            skipped += 1
            continue
        kept.append(it)
    return kept, ids, skipped


def segment_of(uid: str, frames: int) -> tuple[int, int]:
    """The NAR's self-prompt ``(start, length)`` for an utterance: as long as training draws it
    (``min(3 s, half)``), at a start fixed by the utterance id."""
    from vall_e.data import SEGMENT_FRAMES
    from vall_e.sampler import segment_frames_of

    length = int(segment_frames_of(frames, SEGMENT_FRAMES))
    return random.Random(f"bench-segment-{uid}").randrange(frames - length + 1), length


def teacher_forced(model: Any, kind: str, items: Sequence[Item], phone_map: dict[str, int], device: str,
                   by_level: bool = False) -> dict[str, Any]:
    """Mean loss and top-1 accuracy of ``model.forward`` over ``items`` (weighted by target count).

    AR: empty prompts ``(0, 8)``, targets = codebook 1 + stop. NAR: the self-prompt segment
    (:func:`segment_of`) left out of the loss, every level 1..7 (``by_level``: also the loss per level).
    """
    import torch

    kept, ids, skipped = _text_ids(items, phone_map)
    if not kept:
        return {"loss": None, "acc": None, "n": 0, "skipped": skipped}
    loss_sum, acc_sum, count = 0.0, 0.0, 0
    level_sums: dict[int, list[float]] = {}
    with torch.inference_mode():
        for chunk in _chunks(len(kept), EVAL_BATCH):
            text = [ids[i].to(device) for i in chunk]
            resps = [kept[i].codes.to(device) for i in chunk]
            if kind == "ar":
                proms = [r.new_zeros(0, r.shape[1]) for r in resps]
                out = model(text, proms, resps)
                n = sum(len(r) + 1 for r in resps)
                loss_sum += float(out.loss) * n
                acc_sum += float(out.stats["acc"]) * n
                count += n
                continue
            spans = [segment_of(kept[i].uid, len(kept[i].codes)) for i in chunk]
            proms = [r[s : s + n] for r, (s, n) in zip(resps, spans)]
            n = sum(len(r) - length for r, (_, length) in zip(resps, spans))
            for level in range(1, model.config.n_resp_levels):
                levels = torch.full((len(chunk),), level, dtype=torch.long)
                out = model(text, proms, resps, quant_levels=levels, prompt_spans=spans)
                loss_sum += float(out.loss) * n
                acc_sum += float(out.stats["acc"]) * n
                count += n
                sums = level_sums.setdefault(level, [0.0, 0.0])
                sums[0] += float(out.loss) * n
                sums[1] += n
    result: dict[str, Any] = {"loss": loss_sum / count, "acc": acc_sum / count, "n": len(kept), "skipped": skipped}
    if by_level:
        result["by_level"] = [level_sums[lv][0] / level_sums[lv][1] for lv in sorted(level_sums)]
    return result


def continuation_pairs(items: Sequence[Item]) -> list[tuple[Item, Item]]:
    """``(reference, target)`` pairs: each utterance is a target once, its reference the next utterance
    (in path order, cyclically) of the same voice. Voices with one utterance give no pair."""
    by_voice: dict[str, list[Item]] = {}
    for it in items:
        by_voice.setdefault(it.speaker, []).append(it)
    pairs = []
    for voice in sorted(by_voice):
        utts = sorted(by_voice[voice], key=lambda it: it.path)
        if len(utts) < 2:
            continue
        pairs += [(utts[(i + 1) % len(utts)], utts[i]) for i in range(len(utts))]
    return pairs


def continuation_lengths(model: Any, items: Sequence[Item], phone_map: dict[str, int], device: str) -> dict[str, Any]:
    """:func:`length_stats` of greedy continuations (module docstring, ``len_error``) over ``items``' pairs.

    The inputs are built as :class:`vall_e.inference.Synthesizer` builds them for a reference with its
    transcript: the phones of the reference, the separator (when the model knows it) and the
    target, through :func:`vall_e.data.encode_phones`; an empty prompt (a ``prompt_mode=paper`` AR);
    the reference's codebook 1 as ``prefix_list``.
    """
    import torch

    from vall_e.ar import whole_groups
    from vall_e.data import DataError, encode_phones
    from vall_e.inference import SEPARATOR

    sep = [SEPARATOR] if SEPARATOR in phone_map else []
    group_size = getattr(model.config, "group_size", 1)
    texts, prefixes, trues, skipped = [], [], [], 0
    for ref, target in continuation_pairs(items):
        try:
            texts.append(encode_phones(ref.phones + sep + target.phones, phone_map))
        except DataError:
            skipped += 1
            continue
        prefix = ref.codes[:, 0]  # a grouped AR continues from whole groups, as synthesis cuts them
        prefixes.append(prefix[: whole_groups(len(prefix), group_size)])
        trues.append(len(target.codes))
    if not texts:
        return {"len_error": None, "len_ratio": None, "stop_rate": None, "n": 0, "skipped": skipped}
    caps = [LEN_CAP * t for t in trues]
    generated: list[int] = []
    with torch.inference_mode():
        for chunk in _chunks(len(texts), EVAL_BATCH):
            out = model.generate(
                [texts[i].to(device) for i in chunk], [torch.zeros(0, 8, dtype=torch.long, device=device) for _ in chunk],
                max_steps=max(caps[i] for i in chunk), temperature=0.0,
                prefix_list=[prefixes[i].to(device) for i in chunk], max_lens=[caps[i] for i in chunk],
            )
            generated += [len(x) for x in out]
    return {**length_stats(generated, trues, caps), "n": len(texts), "skipped": skipped}


def evaluate_run(model_file: Path, kind: str, sets: dict[str, list[Item]], device: str) -> dict[str, Any]:
    """The metrics of one exported model on the evaluation sets (``unseen``, ``seen``, ``seen_voice_unseen_text``)."""
    from vall_e.inference import load_model

    model, meta = load_model(model_file, kind, device)
    phone_map = meta["phone_map"]
    t0 = time.time()
    unseen = teacher_forced(model, kind, sets["unseen"], phone_map, device, by_level=kind == "nar")
    seen = teacher_forced(model, kind, sets["seen"], phone_map, device)
    val = teacher_forced(model, kind, sets["seen_voice_unseen_text"], phone_map, device)
    rec: dict[str, Any] = {
        "unseen_loss": unseen["loss"], "unseen_acc": unseen["acc"],
        "seen_loss": seen["loss"], "seen_acc": seen["acc"],
        "seen_voice_unseen_text_loss": val["loss"],
        "n_unseen": unseen["n"], "n_seen": seen["n"], "n_seen_voice_unseen_text": val["n"],
        "unseen_skipped_unknown_phones": unseen["skipped"],
    }
    if kind == "nar":
        rec["unseen_loss_by_level"] = unseen.get("by_level")
    else:
        lengths = continuation_lengths(model, sets["unseen"], phone_map, device)
        rec.update({k: lengths[k] for k in ("len_error", "len_ratio", "stop_rate")})
        rec["n_len"] = lengths["n"]
    rec["eval_s"] = round(time.time() - t0, 1)
    rec["prompt_mode"] = meta.get("prompt_mode")
    return rec


# ----------------------------------------------------------------------------------------------
# training runs


class _Children:
    """Processes this script started, so an interrupt ends exactly those."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.procs: set[subprocess.Popen] = set()
        self.stopping = False  # set before terminating: a run ended by us is not evaluated

    def terminate_all(self) -> None:
        self.stopping = True
        with self.lock:
            procs = list(self.procs)
            for p in procs:
                if p.returncode is None:
                    p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


_CHILDREN = _Children()


def _wait_with_cpu(proc: subprocess.Popen) -> tuple[int, Optional[float]]:
    """Wait for one of our children; its exit status and CPU seconds (user + system; None where the
    platform cannot tell). CPU time, unlike wall time, barely changes when other jobs share the cores."""
    if not hasattr(os, "wait4"):
        rc = proc.wait()
        cpu = None
    else:
        _, status, usage = os.wait4(proc.pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        cpu = usage.ru_utime + usage.ru_stime
    with _CHILDREN.lock:
        proc.returncode = rc  # reaped here: Popen must not wait for it again
        _CHILDREN.procs.discard(proc)
    return rc, cpu


def _pythonpath() -> str:
    """This checkout first, so the subprocesses import the same vall_e as this script."""
    rest = os.environ.get("PYTHONPATH", "")
    return str(REPO) + (os.pathsep + rest if rest else "")


@dataclass
class Job:
    """One training run: model core, ``"ar"``/``"nar"``, seed and (AR) group size."""

    arch: str
    kind: str
    seed: int
    group_size: int = 1


def run_job(job: Job, settings: Settings, data_dir: Path, runs_dir: Path,
            eval_sets: Callable[[int], dict[str, list[Item]]]) -> dict[str, Any]:
    """Train one run in a subprocess, export it, evaluate it; returns its record."""
    from vall_e.export import export

    name = run_name(job.arch, job.kind, job.seed, job.group_size)
    words = train_words(settings, job.arch, job.kind, job.seed, job.group_size, data_dir, runs_dir)
    out_file = runs_dir / "out" / (name.replace("/", "_") + ".txt")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": _pythonpath()}
    t0 = time.time()
    with open(out_file, "w", encoding="utf-8") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vall_e.train", *words], cwd=REPO, env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        with _CHILDREN.lock:
            _CHILDREN.procs.add(proc)
        rc, cpu = _wait_with_cpu(proc)
    wall = time.time() - t0
    if _CHILDREN.stopping:  # the trainer saves and exits 0 on SIGTERM: that is not a finished run
        raise RunFailed(f"training {name} was stopped")
    text = out_file.read_text(encoding="utf-8", errors="replace")
    if rc != 0:
        tail = "\n".join(text.splitlines()[-25:])
        raise RunFailed(f"training {name} exited with status {rc}; the end of its output ({out_file}):\n{tail}")
    stats = train_log_stats(text)
    model_file = runs_dir / "export" / (name.replace("/", "_") + ".pt")
    model_file.parent.mkdir(parents=True, exist_ok=True)
    export(model_file, runs_dir / "ckpts" / name)
    steps = settings.steps_ar if job.kind == "ar" else settings.steps_nar
    record: dict[str, Any] = {
        "arch": job.arch, "model": job.kind, "seed": job.seed, "steps": steps,
        "preset": settings.model_name(job.kind),
        "wall_s": round(wall, 1),
        "cpu_s": None if cpu is None else round(cpu, 1),
        "train_s": round(stats[-1]["elapsed_s"], 1) if stats and "elapsed_s" in stats[-1] else None,
        "final_train_loss": stats[-1].get("loss") if stats else None,
    }
    if job.kind == "ar":
        record["group_size"] = job.group_size
    record.update(evaluate_run(model_file, job.kind, eval_sets(job.seed), settings.device))
    return record


def build_jobs(settings: Settings) -> list[Job]:
    """Every run, ARs first (they take longest), in a fixed order."""
    jobs = []
    for kind in ("ar", "nar"):
        for arch in settings.archs:
            sizes = settings.group_sizes if kind == "ar" else [1]
            for g in sizes:
                for seed in range(settings.seeds):
                    jobs.append(Job(arch, kind, seed, g))
    return jobs


def _eval_sets_factory(root: Path, settings: Settings, log: Callable[[str], None]) -> Callable[[int], dict[str, list[Item]]]:
    """Build the corpus index once (before the runs start) and return ``seed -> evaluation sets``.

    The seen and seen-voice-unseen-text sets follow the trainer's own train/val split, which depends
    on the seed: :func:`vall_e.data.load_data` with the runs' settings gives it.
    """
    from vall_e.config import Config
    from vall_e.data import load_data

    unseen = load_items(root / "heldout")
    per_voice = max(1, math.ceil(len(unseen) / max(1, settings.speakers)))
    cache: dict[int, dict[str, list[Item]]] = {}
    lock = threading.Lock()

    def sets(seed: int) -> dict[str, list[Item]]:
        with lock:
            if seed not in cache:
                cfg = Config.from_cli([
                    f"data_dirs=[{root / 'train'}]", f"spkr_name_getter={SPKR_NAME_GETTER}", "min_phones=1",
                    "max_phones=1000", f"seed={seed}", f"model={settings.model_name('ar')}",
                    f"prompt_mode={settings.prompt_mode}", "nj=0", "device=cpu",
                ])
                bundle = load_data(cfg, progress=False)
                train_paths = [str(bundle.corpus.qnt_path(int(r))) for r in bundle.train]
                val_paths = [str(bundle.corpus.qnt_path(int(r))) for r in bundle.val]
                cache[seed] = {
                    "unseen": unseen,
                    "seen": load_items(root / "train", [Path(p) for p in seen_subset(train_paths, per_voice)]),
                    "seen_voice_unseen_text": load_items(root / "train", [Path(p) for p in seen_subset(val_paths, per_voice)]),
                }
            return cache[seed]

    log("index: building the corpus index and the train/val split")
    for seed in range(settings.seeds):
        sets(seed)
    return sets


def run_all(settings: Settings, root: Path, runs_dir: Path, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Train and evaluate every run, ``settings.jobs`` at a time; records in :func:`build_jobs` order."""
    from tqdm import tqdm

    eval_sets = _eval_sets_factory(root, settings, log)
    jobs = build_jobs(settings)
    bar = tqdm(total=len(jobs), desc="runs", file=sys.stderr, dynamic_ncols=True)
    records: dict[int, dict[str, Any]] = {}
    pool = ThreadPoolExecutor(max_workers=settings.jobs)
    futures: dict[Future, int] = {
        pool.submit(run_job, job, settings, root / "train", runs_dir, eval_sets): i for i, job in enumerate(jobs)
    }
    pending = set(futures)
    try:
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in sorted(done, key=futures.__getitem__):
                err = f.exception()
                if err is not None:
                    raise err
                rec = records[futures[f]] = f.result()
                bar.update(1)
                bar.write(_progress_line(rec), file=sys.stderr)
    except BaseException:
        # a failed run or an interrupt: no new runs, the running ones ended (they are our children)
        for f in pending:
            f.cancel()
        _CHILDREN.terminate_all()
        raise
    finally:
        pool.shutdown(wait=True)
        bar.close()
    return [records[i] for i in sorted(records)]


def _progress_line(rec: dict[str, Any]) -> str:
    parts = [f"{rec['model']} {summary_key(rec)} seed {rec['seed']}: {rec['steps']} steps in {rec['wall_s']:.0f} s",
             f"unseen_loss {_fmt(rec.get('unseen_loss'))}", f"seen_loss {_fmt(rec.get('seen_loss'))}"]
    if rec["model"] == "ar":
        parts.append(f"len_error {_fmt(rec.get('len_error'))} (stop_rate {_fmt(rec.get('stop_rate'))})")
    return ", ".join(parts)


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}"


# ----------------------------------------------------------------------------------------------
# the command


def machine_info(device: str) -> dict[str, Any]:
    """CPU model, core count, platform and library versions (no host name)."""
    import torch

    from vall_e.version import __version__

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "vall_e": __version__,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser."""
    p = argparse.ArgumentParser(
        prog="python scripts/bench_learning.py",
        description="Train the AR and NAR per model core and seed on an espeak-ng corpus and score them on "
        "held-out voices' unseen sentences; prints one JSON object.",
    )
    p.add_argument("--arch", default=",".join(ARCHS), help="model cores to compare, comma-separated (default paper,enhuiz)")
    p.add_argument("--seeds", type=int, default=2, help="runs per arch and model, seeds 0..N-1 (default 2)")
    p.add_argument("--group-sizes", default="1", help="AR group sizes G, comma-separated; G != 1 adds AR runs with "
                   "group_size=G (default 1)")
    p.add_argument("--speakers", type=int, help=f"training voices (default {FULL['speakers']}; quick {QUICK['speakers']})")
    p.add_argument("--held-out", type=int, help=f"held-out voices (default {FULL['held_out']})")
    p.add_argument("--sentences", type=int, help=f"sentences per training voice (default {FULL['sentences']}; "
                   f"quick {QUICK['sentences']})")
    p.add_argument("--unseen", type=int, help=f"unseen sentences per held-out voice (default {FULL['unseen']}; "
                   f"quick {QUICK['unseen']})")
    p.add_argument("--steps-ar", type=int, help=f"AR training steps (default {FULL['steps_ar']}; quick {QUICK['steps_ar']})")
    p.add_argument("--steps-nar", type=int, help=f"NAR training steps (default {FULL['steps_nar']}; quick {QUICK['steps_nar']})")
    p.add_argument("--batch-size", type=int, help=f"training batch size (default {FULL['batch_size']}; quick {QUICK['batch_size']})")
    p.add_argument("--preset", default="tiny", help="model size: tiny, quarter, half or full (default tiny)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--jobs", type=int, default=2, help="training runs at a time, one thread each (default 2)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i], for training and evaluation")
    p.add_argument("--workdir", type=Path, help="keep the corpus, checkpoints and logs here (a corpus of the same "
                   "settings is reused); default: a temporary folder, removed at the end")
    p.add_argument("--out", type=Path, help="also write the JSON object to this file")
    p.add_argument("--quick", action="store_true", help="a ~2-minute smoke size for development")
    return p


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    size = dict(QUICK if args.quick else FULL)
    for key in size:
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    from vall_e.base import PRESETS

    if f"ar-{args.preset}" not in PRESETS and not (args.preset == "full" and "ar" in PRESETS):
        raise BenchError(f"--preset {args.preset!r}: use tiny, quarter, half or full")
    settings = Settings(archs=parse_archs(args.arch), seeds=args.seeds,
                        group_sizes=parse_int_list(args.group_sizes, "--group-sizes"), preset=args.preset,
                        lr=args.lr, jobs=args.jobs, device=args.device, quick=args.quick, **size)
    for name in ("seeds", "speakers", "held_out", "sentences", "unseen", "steps_ar", "steps_nar", "batch_size", "jobs"):
        if getattr(settings, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')}={getattr(settings, name)} must be at least 1")
    if settings.unseen < 2:
        raise BenchError("--unseen must be at least 2: each held-out sentence's reference is another one of its voice")
    n_voices = len(load_make_corpus().VOICES)
    if settings.speakers + settings.held_out > n_voices:
        raise BenchError(f"--speakers {settings.speakers} + --held-out {settings.held_out} exceeds the {n_voices} "
                         "distinct espeak-ng voices of scripts/make_corpus.py; use fewer")
    if not settings.lr > 0:
        raise BenchError(f"--lr={settings.lr} must be positive")
    if shutil.which("espeak-ng") is None:
        raise BenchError("espeak-ng is not installed: apt-get install -y espeak-ng (macOS: brew install espeak-ng)")
    return settings, args


def _check_workdir(workdir: Path) -> None:
    """The work folder's path goes into ``data_dirs=[...]`` words, whose list syntax it must not break."""
    bad = sorted(set(",[]'\"") & set(str(workdir.resolve())))
    if bad:
        raise BenchError(f"--workdir {str(workdir)!r}: its path holds {' '.join(bad)}, which the trainer's "
                         "data_dirs=[...] word cannot carry; choose a folder without them")


def _prepare_runs_dir(runs_dir: Path) -> None:
    """An empty ``runs`` folder: runs must start at step 0, never resume an earlier invocation's checkpoints."""
    if runs_dir.exists():
        if not (runs_dir / RUNS_MARK).exists():
            raise BenchError(f"{runs_dir} exists and was not made by this script; give another --workdir")
        shutil.rmtree(runs_dir)
    runs_dir.mkdir(parents=True)
    (runs_dir / RUNS_MARK).touch()


def main(argv: Sequence[str] | None = None) -> int:
    t_start = time.time()
    try:
        settings, args = parse_args(argv)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("VALL_E_NLTK_DOWNLOAD", "0")  # offline g2p unless the user says otherwise
    import torch

    torch.set_num_threads(1)  # evaluation shares the cores with the training runs

    def log(msg: str) -> None:
        print(f"[bench_learning {time.time() - t_start:6.0f}s] {msg}", file=sys.stderr, flush=True)

    temp = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="bench_learning-")) if temp else args.workdir
    ok = False
    try:
        _check_workdir(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        corpus = make_bench_corpus(workdir / "corpus", settings, log)
        runs_dir = workdir / "runs"
        _prepare_runs_dir(runs_dir)
        runs = run_all(settings, workdir / "corpus", runs_dir, log)
        result = {
            "benchmark": "bench_learning",
            "date": datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": machine_info(settings.device),
            "settings": {**asdict(settings), "warmup_ar": settings.warmup(settings.steps_ar),
                         "warmup_nar": settings.warmup(settings.steps_nar),
                         "models": [settings.model_name("ar"), settings.model_name("nar")], "len_cap": LEN_CAP},
            "corpus": corpus,
            "runs": runs,
            "summary": summarize(runs),
            "wall_s": round(time.time() - t_start, 1),
        }
        text = json.dumps(result, indent=1)
        print(text, flush=True)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text + "\n", encoding="utf-8")
        ok = True
        return 0
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _CHILDREN.terminate_all()
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        _CHILDREN.terminate_all()
        if temp and ok:
            shutil.rmtree(workdir, ignore_errors=True)
        elif temp:
            print(f"note: the work folder {workdir} is kept for its logs; remove it when done", file=sys.stderr)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # run from a checkout without install
    from vall_e.utils.errors import entry_point

    raise SystemExit(entry_point(main)())
