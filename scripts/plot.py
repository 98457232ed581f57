#!/usr/bin/env python3
"""Plot logged training/evaluation stats per step as PNG.

    python scripts/plot.py loss --log-dir logs                 # every run under logs/
    python scripts/plot.py loss acc --log-dir logs/test/ar --out loss.png

Reads every ``log.txt`` under ``--log-dir``; each line holding a JSON object with ``step`` is one
record (the trainer logs stats this way). One line per (run, split) is drawn for each stat; the
split (``train``, ``subtrain``, ``val``) comes from the record's ``split`` key.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path


def read_records(log_file: Path) -> list[dict]:
    records = []
    for line in log_file.read_text(encoding="utf-8", errors="replace").splitlines():
        start = line.find("{")
        if start < 0:
            continue
        try:
            obj = json.loads(line[start:])
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and "step" in obj:
            records.append(obj)
    return records


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stats", nargs="+", help="stat names, e.g. loss acc lr grad_norm frames_per_s gen_match")
    parser.add_argument("--log-dir", type=Path, default=Path("logs"), help="folder searched for log.txt files")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default <log-dir>/<stats>.png)")
    parser.add_argument("--split", action="append", help="only these splits (repeatable)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = sorted(args.log_dir.rglob("log.txt")) if args.log_dir.is_dir() else []
    if not logs:
        print(f"error: no log.txt under {args.log_dir}", file=sys.stderr)
        return 2
    fig, axes = plt.subplots(len(args.stats), 1, figsize=(8, 3.2 * len(args.stats)), squeeze=False)
    drawn = 0
    for log_file in logs:
        run = log_file.parent.relative_to(args.log_dir).as_posix() if log_file.parent != args.log_dir else "."
        series: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
        for rec in read_records(log_file):
            split = str(rec.get("split", "train"))
            if args.split and split not in args.split:
                continue
            for stat in args.stats:
                value = rec.get(stat)
                if isinstance(value, (int, float)):
                    series[(stat, split)].append((int(rec["step"]), float(value)))
        for (stat, split), points in sorted(series.items()):
            points.sort()
            ax = axes[args.stats.index(stat)][0]
            style = "-" if split == "train" else "o-"
            ax.plot([p[0] for p in points], [p[1] for p in points], style, label=f"{run} {split}", markersize=3)
            drawn += 1
    if drawn == 0:
        print(f"error: none of {args.stats} was found in {len(logs)} log file(s) under {args.log_dir}", file=sys.stderr)
        return 2
    for ax, stat in zip(axes[:, 0], args.stats):
        ax.set_ylabel(stat)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = args.out or args.log_dir / f"{'-'.join(args.stats)}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
