#!/usr/bin/env python3
"""qnt throughput and memory, printed as one JSON object.

    python scripts/bench_qnt.py [--seconds 120] [--device cpu|cuda] [--codec-weights untrained]
                                [--workdir DIR] [--batch-seconds 0 30] [--dtype float32]

Fabricates (or reuses, in ``--workdir``) a folder of espeak-ng speech files whose durations
follow LibriTTS's shape (lognormal, median 4.7 s, sigma 0.6, clipped to 1..35 s) until
``--seconds`` of audio, then encodes it with ``quantize_folder`` once per ``--batch-seconds``
value and reports ``audio_s_per_wall_s`` (audio seconds encoded per wall second, codec already
loaded; reading, resampling and writing included) and, for each later run, the fraction of codes
equal to the first run's (``code_agreement_with_first_run``: batched vs one file per pass, or
float32/bf16 on CUDA vs the first setting). It also encodes one 35 s file (LibriTTS's
longest utterance) in a fresh process and reports its peak resident memory: ``peak_rss_mb_35s``
for the whole process (torch, the codec and its float64 copy included) and
``encode_peak_rss_mb_35s`` for the encoding alone (the kernel's peak counter is reset after the
codec is loaded).

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
start = time.time()
codes = qnt.encode_from_file(path, device=device, codec_weights=weights)
encode_peak = status("VmHWM")
print(json.dumps({"seconds": time.time() - start, "frames": codes.shape[-1], "rss_after_load_mb": loaded,
                  "encode_peak_mb": encode_peak if reset else None, "peak_mb": max(load_peak, encode_peak)}))
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
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120.0, help="audio to encode (default 120)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--codec-weights", default="untrained")
    parser.add_argument("--dtype", default=None, help="encoder dtype (default: float64 on CPU, float32 on CUDA)")
    parser.add_argument("--batch-seconds", type=float, nargs="+", default=[0.0, 30.0])
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="keep fabricated audio here (default: a temp dir)")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()

    import torch

    from vall_e.emb import qnt

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_qnt_"))
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = fabricate(workdir, args.seconds)
    t0 = time.time()
    qnt.load_codec(args.codec_weights, args.device)
    qnt.encode_batch([torch.zeros(320)], args.device, args.codec_weights, args.dtype)  # the encoder's copy too
    result: dict = {
        "device": args.device,
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
    for batch_seconds in args.batch_seconds:
        for p in corpus.rglob("*.qnt.pt"):
            p.unlink()
        t0 = time.time()
        summary = qnt.quantize_folder(corpus, device=args.device, codec_weights=args.codec_weights,
                                      batch_seconds=batch_seconds, progress=False, dtype=args.dtype,
                                      workers=args.workers)
        wall = time.time() - t0
        assert summary.ok, summary.report()
        result["audio_s"] = round(summary.seconds_of_audio, 1)
        result["files"] = summary.written
        run = {"batch_seconds": batch_seconds, "wall_s": round(wall, 2),
               "audio_s_per_wall_s": round(summary.seconds_of_audio / wall, 2)}
        codes = {p: torch.load(p, weights_only=True) for p in sorted(corpus.rglob("*.qnt.pt"))}
        if reference is None:
            reference = codes
        else:  # agreement of this run's codes with the first run's (e.g. batched vs one file per pass)
            same = sum(int((codes[p] == reference[p]).sum()) for p in codes)
            run["code_agreement_with_first_run"] = round(same / sum(c.numel() for c in codes.values()), 6)
        result["runs"].append(run)
    result["audio_s_per_wall_s"] = max(r["audio_s_per_wall_s"] for r in result["runs"])
    if not args.skip_memory:
        result.update(peak_memory_35s(workdir, args.device, args.codec_weights))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
