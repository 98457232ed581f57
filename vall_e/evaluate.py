"""The paper's evaluation protocol: WER and speaker similarity (SIM) of ground truth, codec and model.

    python -m vall_e.evaluate <test list | corpus folder> --out DIR [--ar-ckpt A --nar-ckpt N]
        [--asr NAME] [--speaker NAME] [--min-seconds 4 --max-seconds 10] [--runs 3] [codec_weights=...]
    python -m vall_e.evaluate <LibriSpeech test-clean folder | corpus folder> --make-list LIST.tsv

Protocol (VALL-E, arXiv 2301.02111, sections 5.1-5.2; VALL-E 2, arXiv 2406.05370, section 4.1):

- Test set: utterances of ``--min-seconds``..``--max-seconds`` (4-10 s, both ends included), in the
  order of the list: sorted by speaker, then id (see :func:`vall_e.testset.build_list`).
- ``--mode cross`` (default, the paper's "VALL-E"): the prompt is a ``--prompt-seconds`` (3 s) crop of
  another utterance of the same speaker, both drawn with ``--seed`` (:func:`vall_e.testset.plan_prompts`).
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

Where things are: the test list and prompt choice are :mod:`vall_e.testset`; WER/SIM of one audio
and a row's summary are :mod:`vall_e.scoring`; this module runs the rows (with the cache), writes
the outputs and is the command line.
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
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from .inference import add_sampling_arguments, sampling_options
from .scoring import PAPER_ROWS, Scorer, aggregate, codec_round_trip, markdown_table, score
from .testset import (  # re-exported: scripts and tests import the test-list functions from here too
    LIST_COLUMNS,
    EvalError,
    Prompt,
    Utterance,
    build_list,
    load_wav,
    plan_prompts,
    read_list,
    select,
    write_list,
)
from .utils.errors import entry_point
from .utils.outputs import note_replacing, refuse_inputs, writable_file, writable_folder
from .utils.paths import inside

if TYPE_CHECKING:
    from .inference import Synthesizer

__all__ = ["EvalError", "LIST_COLUMNS", "PAPER_ROWS", "Prompt", "Scorer", "Utterance", "aggregate", "build_list",
           "build_parser", "codec_round_trip", "load_test_set", "load_wav", "main", "markdown_table", "plan_prompts",
           "read_list", "score", "select", "write_list"]

ROWS = ("ground_truth", "codec", "model")
MODES = ("cross", "continual", "reference")
CACHE_VERSION = 1

logger = logging.getLogger("vall_e.evaluate")  # not __name__: stable under python -m


def load_test_set(source: Path, args: argparse.Namespace, spkr_name_getter: str) -> list[Utterance]:
    """The utterances to evaluate: a list file (filtered by duration too) or a folder."""
    if source.is_file():
        return select(read_list(source), args.min_seconds, args.max_seconds, args.max_utterances, args.seed, str(source))
    if source.is_dir():
        return build_list(source, args.min_seconds, args.max_seconds, spkr_name_getter, args.max_utterances, args.seed)
    raise EvalError(f"{source}: no such test list or folder")


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
    from .emb.codec import write_wav
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

    from .emb.codec import HOP_LENGTH, write_wav
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

    from .emb import codec
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
            codec.write_wav(wav, sr, dest)

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
    except (SynthesisError, InferenceFileError, codec.AudioError, codec.CodecUnavailableError, BackendUnavailableError) as e:
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
