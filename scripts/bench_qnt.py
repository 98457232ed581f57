#!/usr/bin/env python3
"""qnt throughput, memory and agreement with CPU float64 codes, printed as one JSON object.

    python scripts/bench_qnt.py [--seconds 120] [--device cpu|cuda] [--codec-weights untrained]
                                [--workdir DIR] [--batch-seconds 0 auto] [--dtype float32]
                                [--compare-cpu] [--skip-memory]

Fabricates (or reuses, in ``--workdir``) a folder of espeak-ng speech files whose durations
follow LibriTTS's shape (lognormal, median 4.7 s, sigma 0.6, clipped to 1..35 s) until
``--seconds`` of audio, then encodes it with ``quantize_folder`` once per ``--batch-seconds``
value (``auto``: what a corpus run picks, :func:`vall_e.emb.qnt.encode_plan`; the default is
``0 30`` on CPU and ``0 auto`` on CUDA). Each run reports ``audio_s_per_wall_s`` (audio seconds
encoded per wall second, codec already loaded; reading, resampling and writing included), the
``batch_seconds`` it used, ``gpu_peak_mb`` on CUDA, and for each later run the share of codes
equal to the first run's (``code_agreement_with_first_run``).

``--compare-cpu`` also encodes every file on the CPU in float64, one file per pass (the
reference), and adds ``agreement`` to each run: the share of frames whose 8 codes all equal the
reference's. At the top level, ``agreement`` is the lowest over the runs, ``audio_s_per_s`` the
best throughput, and ``cpu_reference_s`` the reference's wall time. On CUDA with the default
dtype, ``agreement`` should be 1.0 (see qnt's Reproducibility notes).

It also encodes one 35 s file (LibriTTS's longest utterance) in a fresh process and reports its
peak resident memory: ``peak_rss_mb_35s`` for the whole process (torch and the codec copies
included) and ``encode_peak_rss_mb_35s`` for the encoding alone (the kernel's peak counter is
reset after the codec is loaded), plus ``gpu_peak_mb_35s`` on CUDA.

Codes from ``untrained`` weights cost the same compute as the pretrained ones: same architecture.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_TEXT = (
    "The quick brown fox jumps over the lazy dog near the quiet river bank, while seven green "
    "bottles stood on the wall and the old clock stopped at noon. "
)

_MEMORY_PROBE = r"""
import json, sys, time, torch
from vall_e.emb import qnt
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return float("nan")
device, weights, path = sys.argv[1:4]
qnt.encode_batch([torch.zeros(320)], device=device, codec_weights=weights)  # loads the codec and its encoder copy
loaded = status("VmRSS")
load_peak = status("VmHWM")  # per address space: fresh after exec (ru_maxrss is not: it inherits the parent's)
try:
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    reset = True
except OSError:
    reset = False
cuda = device.startswith("cuda")
if cuda:
    torch.cuda.reset_peak_memory_stats(device)
start = time.time()
codes = qnt.encode_from_file(path, device=device, codec_weights=weights)
encode_peak = status("VmHWM")
print(json.dumps({"seconds": time.time() - start, "frames": codes.shape[-1], "rss_after_load_mb": loaded,
                  "encode_peak_mb": encode_peak if reset else None, "peak_mb": max(load_peak, encode_peak),
                  "gpu_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None}))
"""


def _speech(workdir: Path) -> tuple["object", int]:
    """A long espeak-ng recording (float32 numpy, rate) to cut files from."""
    import soundfile as sf

    path = workdir / "source.wav"
    if not path.exists():
        if shutil.which("espeak-ng") is None:
            raise SystemExit("error: espeak-ng is needed to fabricate speech: apt-get install -y espeak-ng")
        subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(path), "--", _TEXT * 6], check=True)
    data, sr = sf.read(str(path), dtype="float32")
    return data, sr


def fabricate(workdir: Path, seconds: float, seed: int = 0) -> Path:
    """LibriTTS-like durations cut from espeak speech, until ``seconds`` of audio; reused when present."""
    import numpy as np
    import soundfile as sf

    corpus = workdir / f"corpus_{int(seconds)}s_seed{seed}"
    done = corpus / "done"
    if done.exists():
        return corpus
    data, sr = _speech(workdir)
    rng = np.random.default_rng(seed)
    total, i = 0.0, 0
    while total < seconds:
        d = float(np.clip(rng.lognormal(np.log(4.7), 0.6), 1.0, 35.0))
        n = int(d * sr)
        start = int(rng.integers(0, max(1, len(data) - n)))
        clip = np.resize(data[start:], n)  # tiles when the source is shorter
        spk = corpus / f"spk{i // 20}"
        spk.mkdir(parents=True, exist_ok=True)
        sf.write(str(spk / f"u{i:05d}.wav"), clip, sr, subtype="PCM_16")
        total += d
        i += 1
    done.touch()
    return corpus


def peak_memory_35s(workdir: Path, device: str, weights: str) -> dict:
    """Encode one 35 s file in a fresh process; its peak RSS (whole process and encoding alone)."""
    import numpy as np
    import soundfile as sf

    data, sr = _speech(workdir)
    path = workdir / "long35.wav"
    sf.write(str(path), np.resize(data, 35 * sr), sr, subtype="PCM_16")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = _MEMORY_PROBE  # run with -c: a fresh interpreter, nothing of this process's memory
    proc = subprocess.run(
        [sys.executable, "-c", code, device, weights, str(path)],
        capture_output=True, text=True, env=env, check=True,
    )
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "peak_rss_mb_35s": round(probe["peak_mb"], 1),
        "encode_peak_rss_mb_35s": None if probe["encode_peak_mb"] is None else round(probe["encode_peak_mb"], 1),
        "rss_after_codec_load_mb": round(probe["rss_after_load_mb"], 1),
        "encode_s_35s": round(probe["seconds"], 2),
        **({} if probe["gpu_peak_mb"] is None else {"gpu_peak_mb_35s": round(probe["gpu_peak_mb"], 1)}),
    }


def cpu_reference(corpus: Path, weights: str) -> dict[Path, Any]:
    """CPU float64 codes of every file, one file per pass: what every setting should reproduce."""
    from vall_e.emb import qnt

    return {p: qnt.encode_from_file(p, device="cpu", codec_weights=weights, dtype="float64")
            for p in sorted(corpus.rglob("*.wav"))}


def frame_agreement(codes: dict[Path, Any], reference: dict[Path, Any]) -> float:
    """Share of frames whose 8 codes all equal the reference's (codes keyed by .qnt.pt, reference by .wav)."""
    same = total = 0
    for wav, ref in reference.items():
        got = codes[wav.with_name(wav.name.split(".")[0] + ".qnt.pt")].long()
        assert got.shape == ref.shape, (wav, tuple(got.shape), tuple(ref.shape))
        same += int((got == ref).all(dim=1).sum())
        total += ref.shape[-1]
    return same / total


def _batch_setting(word: str) -> float | None:
    return None if word == "auto" else float(word)


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120.0, help="audio to encode (default 120)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--codec-weights", default="untrained")
    parser.add_argument("--dtype", default=None, help="encoder dtype (default: float64)")
    parser.add_argument("--batch-seconds", type=_batch_setting, nargs="+", default=None,
                        help="padded seconds per pass, or auto (default: 0 30 on CPU, 0 auto on CUDA)")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="keep fabricated audio here (default: a temp dir)")
    parser.add_argument("--compare-cpu", action="store_true",
                        help="report agreement: share of frames whose 8 codes equal CPU float64 one-file codes")
    parser.add_argument("--skip-memory", action="store_true")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()

    import torch

    from vall_e.emb import qnt

    cuda = args.device.startswith("cuda")
    settings = args.batch_seconds or ([0.0, None] if cuda else [0.0, 30.0])
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_qnt_"))
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = fabricate(workdir, args.seconds)
    t0 = time.time()
    qnt.load_codec(args.codec_weights, args.device)
    qnt.encode_batch([torch.zeros(320)], args.device, args.codec_weights, args.dtype)  # the encoder's copy too
    result: dict = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name(torch.device(args.device)) if cuda else None,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "codec_weights": args.codec_weights,
        "dtype": str(qnt._encoder_dtype(args.device, args.dtype)).removeprefix("torch."),
        "codec_load_s": round(time.time() - t0, 2),
        "audio_s": None,
        "files": None,
        "runs": [],
    }
    reference = None
    if args.compare_cpu:
        t0 = time.time()
        reference = cpu_reference(corpus, args.codec_weights)
        result["cpu_reference_s"] = round(time.time() - t0, 2)
    first = None
    for batch_seconds in settings:
        for p in corpus.rglob("*.qnt.pt"):
            p.unlink()
        # what the run will use: encode_plan with the free memory it will see (codec loaded)
        plan = qnt.encode_plan(args.device, args.dtype, qnt._free_device_bytes(args.device), batch_seconds,
                               args.workers)
        if cuda:
            torch.cuda.reset_peak_memory_stats(args.device)
        t0 = time.time()
        summary = qnt.quantize_folder(corpus, device=args.device, codec_weights=args.codec_weights,
                                      batch_seconds=batch_seconds, progress=False, dtype=args.dtype,
                                      workers=args.workers)
        wall = time.time() - t0
        assert summary.ok, summary.report()
        result["audio_s"] = round(summary.seconds_of_audio, 1)
        result["files"] = summary.written
        run = {"batch_seconds": round(plan.batch_seconds, 1), "auto": batch_seconds is None,
               "workers": plan.workers, "pin_memory": plan.pin_memory, "wall_s": round(wall, 2),
               "audio_s_per_wall_s": round(summary.seconds_of_audio / wall, 2)}
        if cuda:
            run["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated(args.device) / 2**20, 1)
        codes = {p: torch.load(p, weights_only=True) for p in sorted(corpus.rglob("*.qnt.pt"))}
        if first is None:
            first = codes
        else:  # agreement of this run's codes with the first run's (e.g. batched vs one file per pass)
            same = sum(int((codes[p] == first[p]).sum()) for p in codes)
            run["code_agreement_with_first_run"] = round(same / sum(c.numel() for c in codes.values()), 6)
        if reference is not None:
            run["agreement"] = round(frame_agreement(codes, reference), 6)
        result["runs"].append(run)
    result["audio_s_per_wall_s"] = max(r["audio_s_per_wall_s"] for r in result["runs"])
    if reference is not None:
        result["agreement"] = min(r["agreement"] for r in result["runs"])
        result["audio_s_per_s"] = result["audio_s_per_wall_s"]
    if not args.skip_memory:
        result.update(peak_memory_35s(workdir, args.device, args.codec_weights))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
