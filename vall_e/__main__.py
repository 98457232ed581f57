"""Synthesis CLI: ``python -m vall_e "<text>" ref.wav out.wav --ar-ckpt zoo/ar.pt --nar-ckpt zoo/nar.pt``.

Batch mode, one wav per line (named by line number, e.g. ``out/0003.wav``):

    python -m vall_e --batch lines.txt ref.wav out/ --ar-ckpt ... --nar-ckpt ...   # one text per line
    python -m vall_e --batch lines.tsv out/ --ar-ckpt ... --nar-ckpt ...           # text<TAB>ref[<TAB>ref text]

Config words such as ``codec_weights=untrained`` are accepted (``help=true`` lists them); a text
containing ``=`` is still a text. The work is done by :mod:`vall_e.inference`.

Before any synthesis: an output that is also an input (the reference, a model file, the batch
file) is refused, the output folder must be writable, and in batch mode every bad line (columns,
empty text, missing or unusable reference, unknown phones) is reported at once. Existing outputs
are replaced atomically, with a note that names them. Exit status 2 for all of these.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from .inference import add_sampling_arguments, sampling_options
from .utils.errors import entry_point

USAGE_EXAMPLES = """examples:
  python -m vall_e "Hello there." ref.wav out.wav --ar-ckpt zoo/ar.pt --nar-ckpt zoo/nar.pt
  python -m vall_e "And then?" ref.wav out.wav --ref-text "transcript of ref.wav" --ar-ckpt ... --nar-ckpt ...
  python -m vall_e "Hello there." ref.wav out.wav --ras --top-p 0.8 --ar-ckpt ... --nar-ckpt ...   (VALL-E 2 repetition-aware sampling)
  python -m vall_e --batch lines.txt ref.wav out/ --ar-ckpt ... --nar-ckpt ...
  python -m vall_e --batch lines.tsv out/ --ar-ckpt ... --nar-ckpt ...   (text<TAB>ref.wav[<TAB>ref transcript])

decoding safeguards: the stop token survives --top-k/--top-p; each output is cut at the AR's largest
frames-per-phone ratio of its training set x the text's phones (--frames-per-phone overrides, 0 = off)
and at --max-ar-steps, with a note when that happens.

config words: codec_weights=pretrained|untrained|<path> (default pretrained), help=true lists all fields.

model facts: --help with --ar-ckpt (and --nar-ckpt) also says what the model files record, e.g. the AR's
grouping (group_size G, VALL-E 2 grouped code modeling: G frames per AR step; prompts and prefixes are
cut to whole groups) and its prompt_mode; synthesis follows them.
"""


def model_facts(ar_ckpt: Path | None, nar_ckpt: Path | None) -> str:
    """What exported model files record that decides how synthesis runs, one line per file (for ``--help``)."""
    from .export import InferenceFileError, read_inference_file

    lines = ["model facts (from the files given):"]
    for flag, path in (("--ar-ckpt", ar_ckpt), ("--nar-ckpt", nar_ckpt)):
        if path is None:
            continue
        try:
            data = read_inference_file(path)
        except InferenceFileError as e:
            lines.append(f"  {flag} {path}: cannot be read ({e})")
            continue
        hp = data.get("hparams") or {}
        facts = [str(data.get("preset") or data.get("kind")), f"arch {hp.get('arch', 'enhuiz')}"]
        if data.get("kind") == "ar":
            g = int(hp.get("group_size", 1))
            facts.append(f"group_size {g} (VALL-E 2 grouped code modeling: {g} frames per AR step, prompts and "
                         f"prefixes cut to whole groups)" if g > 1 else "group_size 1 (plain VALL-E: one frame per AR step)")
        facts.append(f"prompt_mode {data.get('prompt_mode', 'speaker')}")
        if data.get("kind") == "ar" and data.get("max_frames_per_phone"):
            facts.append(f"length guard {float(data['max_frames_per_phone']):.1f} frames per phone")
        facts.append(f"trained {int(data.get('step', 0))} steps")
        lines.append(f"  {flag} {path}: " + ", ".join(facts))
    return "\n".join(lines)


class UsageError(ValueError):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vall_e",
        description="Zero-shot TTS with VALL-E: speak TEXT in the voice of a short reference recording.",
        epilog=USAGE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("args", nargs="*", metavar="TEXT REF OUT",
                   help="text, reference audio (any rate, mono or stereo) and output wav; with --batch see below")
    p.add_argument("--ar-ckpt", required=True, type=Path, help="exported AR model (python -m vall_e.export)")
    p.add_argument("--nar-ckpt", required=True, type=Path, help="exported NAR model")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available, else cpu)")
    add_sampling_arguments(p)
    p.add_argument("--seed", type=int, default=None, help="random seed: the same seed gives the same wav (default: random, printed)")
    p.add_argument("--prompt-seconds", type=float, default=None,
                   help="use the first N seconds of the reference as the prompt (default 3.0; 0 = all of it)")
    p.add_argument("--ref-text", default=None,
                   help="transcript of the reference: continuation mode (the output continues the reference)")
    p.add_argument("--batch", type=Path, default=None, metavar="FILE",
                   help="FILE.txt: one text per line (args: REF OUTDIR); FILE.tsv: text<TAB>ref[<TAB>ref text] (args: OUTDIR)")
    p.add_argument("--batch-size", type=int, default=8, help="requests per forward pass in batch mode (default 8)")
    return p


def read_batch_file(
    path: Path, shared_ref: Path | None, shared_ref_text: str | None
) -> tuple[list[tuple[int, "object"]], list[tuple[int, str]]]:
    """``(line number, Request)`` for every usable line of a ``.txt`` (shared reference) or ``.tsv`` file,
    and ``(line number, "path:n: problem")`` for every line that is not (all of them, not the first)."""
    from .inference import Request

    if not path.is_file():
        raise UsageError(f"--batch {path}: no such file")
    if shared_ref is not None and not shared_ref.is_file():
        raise UsageError(f"reference audio {shared_ref} " + ("is a folder" if shared_ref.is_dir() else "not found"))
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise UsageError(f"--batch {path}: cannot read it ({e.strerror or e})") from None
    tsv = path.suffix.lower() == ".tsv"
    out, bad = [], []
    for n, raw in enumerate(lines, start=1):
        where = f"{path}:{n}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            bad.append((n, f"{where}: not UTF-8 text; save the file as UTF-8"))
            continue
        if not line.strip():
            continue
        if not tsv:
            out.append((n, Request(line.strip(), shared_ref, shared_ref_text, label=where)))
            continue
        cols = line.rstrip("\r\n").split("\t")
        if len(cols) not in (2, 3) or not cols[1].strip():
            bad.append((n, f"{where}: expected text<TAB>reference audio[<TAB>reference transcript], got "
                           f"{len(cols)} column(s)" + ("" if len(cols) < 2 or cols[1].strip() else " (an empty reference)")))
            continue
        if not cols[0].strip():
            bad.append((n, f"{where}: the text (first column) is empty"))
            continue
        ref = Path(cols[1].strip())
        if not ref.is_absolute() and not ref.exists() and (path.parent / ref).exists():
            ref = path.parent / ref  # paths may be relative to the working directory or to the TSV
        if not ref.is_file():
            bad.append((n, f"{where}: reference audio {ref} " + ("is a folder" if ref.is_dir() else
                           f"not found (looked in the working folder and in {path.parent})")))
            continue
        ref_text = cols[2].strip() if len(cols) == 3 and cols[2].strip() else shared_ref_text
        out.append((n, Request(cols[0].strip(), ref, ref_text, label=where)))
    if not out and not bad:
        raise UsageError(f"--batch {path}: no lines to synthesize")
    return out, bad


def _bad_lines_error(path: Path, bad: list[tuple[int, str]]) -> UsageError:
    """One error listing every bad line of a batch file, in line order."""
    lines = "\n".join(f"  {msg}" for _, msg in sorted(bad))
    return UsageError(f"{len(bad)} line(s) of {path} cannot be synthesized; fix them and rerun (nothing was "
                      f"synthesized):\n{lines}")


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    from .config import Config

    argv = list(sys.argv[1:] if argv is None else argv)
    words, rest = Config.split_argv(argv)
    cfg = Config.from_cli(words)  # handles help=true; codec_weights=... and device=... come from here
    parser = build_parser()
    if any(w in ("-h", "--help") for w in rest):
        files = argparse.ArgumentParser(add_help=False)
        files.add_argument("--ar-ckpt", type=Path)
        files.add_argument("--nar-ckpt", type=Path)
        given, _ = files.parse_known_args(rest)
        if given.ar_ckpt is not None or given.nar_ckpt is not None:
            parser.epilog = f"{parser.epilog}\n{model_facts(given.ar_ckpt, given.nar_ckpt)}\n"
    args = parser.parse_args(rest)
    device = args.device if args.device is not None else (cfg.device if any(w.startswith("device=") for w in words) else None)
    seed = args.seed if args.seed is not None else (cfg.seed if any(w.startswith("seed=") for w in words) else None)
    try:
        return _run(args, cfg.codec_weights, device, seed)
    except UsageError as e:
        parser.print_usage(sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, codec_weights: str, device: str | None, seed: int | None) -> int:
    from .utils.helpers import setup_logging
    from .utils.outputs import refuse_inputs, writable_file, writable_folder

    setup_logging(level=logging.WARNING)
    pos = list(args.args)
    models = [("AR model (--ar-ckpt)", args.ar_ckpt), ("NAR model (--nar-ckpt)", args.nar_ckpt)]
    bad: list[tuple[int, str]] = []
    if args.batch is None:
        if len(pos) != 3:
            raise UsageError(f'expected "TEXT" REF.wav OUT.wav, got {len(pos)} argument(s): {pos}')
        text, ref, out = pos[0], Path(pos[1]), Path(pos[2])
        if out.is_dir():
            raise UsageError(f"{out} is a folder; give the output wav's file name (or use --batch for many lines)")
        refuse_inputs(out, [("reference audio", ref), *models], "output")
        writable_file(out, "output")  # before the models load and anything is synthesized
        jobs = None
    else:
        tsv = args.batch.suffix.lower() == ".tsv"
        want = 1 if tsv else 2
        if len(pos) != want:
            shape = "--batch FILE.tsv OUTDIR" if tsv else "--batch FILE.txt REF.wav OUTDIR"
            raise UsageError(f"{shape} expected, got {len(pos)} positional argument(s): {pos}")
        out = Path(pos[-1])
        if out.exists() and not out.is_dir():
            raise UsageError(f"{out} exists and is not a folder; batch mode writes one wav per line into a folder")
        jobs, bad = read_batch_file(args.batch, None if tsv else Path(pos[0]), args.ref_text)
        if bad and not jobs:
            raise _bad_lines_error(args.batch, bad)
        width = max(4, len(str(max(n for n, _ in jobs + bad))))
        inputs = [("--batch file", args.batch), *models] + [(f"reference of {r.label}", r.ref_wav) for _, r in jobs]
        refuse_inputs([out / f"{n:0{width}d}.wav" for n, _ in jobs], inputs, "output")
        writable_folder(out, "output folder")
    if args.ref_text is not None and args.prompt_seconds is not None:
        print("note: with --ref-text the whole reference is the AR's prompt (its transcript must match all of it); "
              "--prompt-seconds then only crops the prompt of a prompt_mode=paper NAR", file=sys.stderr)
    prompt_seconds = 3.0 if args.prompt_seconds is None else args.prompt_seconds

    from .emb import g2p
    from .emb.qnt import AudioError, CodecUnavailableError, load_codec, write_wav
    from .export import InferenceFileError
    from .inference import Request, SynthesisError, Synthesizer
    from .utils.outputs import note_replacing

    if codec_weights == "untrained":
        print("note: codec_weights=untrained: the codec has random weights, so the output is NOT speech "
              "(it only proves the pipeline runs); use codec_weights=pretrained or a weights file for real audio",
              file=sys.stderr)
    options = dict(sampling_options(args), seed=seed, prompt_seconds=prompt_seconds)
    try:
        synth = Synthesizer(args.ar_ckpt, args.nar_ckpt, device=device, codec_weights=codec_weights)
        # one-time loads before the clock starts, so the real-time factor measures synthesis alone
        load_codec(codec_weights, synth.device)
        g2p.encode("")
        if jobs is not None:
            # every bad line at once, before any synthesis (references are encoded here and cached)
            bad += [(jobs[i][0], str(e)) for i, e in synth.check_requests([r for _, r in jobs], prompt_seconds)]
            if bad:
                raise _bad_lines_error(args.batch, bad)
        t0 = time.perf_counter()
        if jobs is None:
            results = synth.synthesize_batch([Request(text, ref, args.ref_text)], **options)
            names = [out]
        else:
            results = synth.synthesize_batch([r for _, r in jobs], batch_size=args.batch_size, **options)
            names = [out / f"{n:0{width}d}.wav" for n, _ in jobs]
        elapsed = time.perf_counter() - t0
    except (SynthesisError, InferenceFileError, AudioError, CodecUnavailableError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    status, total, written, cut, guarded = 0, 0.0, 0, 0, 0
    replaced: list[Path] = []
    for res, path in zip(results, names):
        if res.wav.shape[-1] == 0:
            print(f"error: no audio for {path}: the AR stopped at once; try another --seed or a higher --ar-temp",
                  file=sys.stderr)
            status = 1
            continue
        if path.is_file():
            if jobs is None:
                note_replacing(path)
            replaced.append(path)
        write_wav(res.wav, res.sample_rate, path)
        total += res.seconds
        written += 1
        cut += res.cut == "max_ar_steps"
        guarded += res.cut == "length_guard"
        if jobs is not None:
            print(f"{path}  {res.seconds:.2f} s" + (f"  (cut by {res.cut} at {res.max_frames} frames)" if res.cut else ""))
    if replaced and jobs is not None:
        shown = ", ".join(p.name for p in replaced[:5]) + (" ..." if len(replaced) > 5 else "")
        print(f"note: replaced {len(replaced)} existing wav(s) in {out} ({shown})", file=sys.stderr)
    if cut:
        print(f"note: {cut} output(s) reached --max-ar-steps {args.max_ar_steps} before the AR's stop token and are cut "
              "there; raise --max-ar-steps if the speech is incomplete", file=sys.stderr)
    if guarded:
        limit = "--frames-per-phone" if args.frames_per_phone is not None else "the AR's max frames per phone (from its training set)"
        print(f"note: the length guard fired on {guarded} output(s): the AR did not stop within {limit} x the text's "
              "phones, so they are cut there (a model that does not stop usually loops or babbles; try another --seed, "
              "--ras with a --top-p below 1, or raise --frames-per-phone)", file=sys.stderr)
    if written:
        rtf = f"real-time factor {elapsed / total:.3f} ({synth.device}, seed {results[0].seed})"
        if jobs is None:
            print(f"{names[0]}  {total:.2f} s at {results[0].sample_rate} Hz, {rtf}")
        else:
            print(f"{written} wav(s) in {out}: {total:.2f} s of audio, {rtf}")
    return status

if __name__ == "__main__":
    raise SystemExit(main())
