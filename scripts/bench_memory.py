"""Does training memory stay flat? Train on mixed lengths and print the main process's RSS as JSON.

    python scripts/bench_memory.py --steps 400 --workdir /tmp/bench_memory

Runs the real trainer (``python -m vall_e.train``, DeepSpeed on CPU) on a fabricated corpus with
LibriTTS-like lengths (scripts/bench_data.py), batch 4, one prompt, ``nj=1``, evaluating every
``--eval-every`` steps, and samples the trainer's resident memory at every logged step. Prints the
RSS after warm-up (``--warmup`` steps), at the end, the growth between the two, and the RSS series.
A weeks-long run must not creep: growth after warm-up should stay near zero.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/vall_e_bench_memory")
    parser.add_argument("--utterances", type=int, default=240)
    parser.add_argument("--model", default="ar-quarter")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=100, help="steps before the reference measurement")
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--max-seconds", type=float, default=12.0, help="longest utterance kept (CPU speed)")
    parser.add_argument("overrides", nargs="*", help="extra key=value config words")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()

    import bench_data

    work = Path(args.workdir)
    corpus = bench_data.fabricate(work, args.utterances, progress=False)
    cfg = {
        "data_dirs": [str(corpus)], "spkr_name_getter": "lambda p: p.parts[-3]", "model": args.model,
        "min_phones": 1, "max_phones": 400, "max_seconds": args.max_seconds, "batch_size": 4, "max_prompts": 1,
        "nj": 1, "max_iter": args.steps, "eval_every": args.eval_every, "save_ckpt_every": 1_000_000,
        "log_every": 10, "max_num_val": 4, "eval_batch_size": 4, "max_val_ar_steps": 100, "device": "cpu",
        "codec_weights": "untrained", "ckpt_root": str(work / "ckpts"), "log_root": str(work / "logs"),
    }
    path = work / "config" / "memory.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    subprocess.run(["rm", "-rf", str(work / "ckpts"), str(work / "logs")], check=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vall_e.train", f"yaml={path}", *args.overrides], cwd=REPO,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    series: dict[int, float] = {}
    assert proc.stderr is not None
    for line in proc.stderr:
        if '"split": "train"' in line:
            step = json.loads(line[line.index("{"):])["step"]
            series[step] = round(rss_mb(proc.pid), 1)
            print(f"step {step}: {series[step]} MB", file=sys.stderr)
    proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"training failed with exit status {proc.returncode}")
    after_warmup = min((s for s in series if s >= args.warmup), default=None)
    end = max(series)
    print(json.dumps({
        "model": args.model, "steps": args.steps, "overrides": args.overrides,
        "rss_mb_after_warmup": series.get(after_warmup), "rss_mb_end": series[end],
        "growth_mb_after_warmup": round(series[end] - series[after_warmup], 1) if after_warmup else None,
        "rss_mb_max": max(series.values()), "series": series,
    }))


if __name__ == "__main__":
    main()
