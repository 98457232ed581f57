"""Benchmark the training data engine on a fabricated LibriTTS-like corpus; prints one JSON object.

    python scripts/bench_data.py --utterances 100000 --workdir /tmp/bench_data

About 25 minutes on 2 CPU cores, most of it the training comparison at the quarter recipe's budget
(64k padded positions per step; ~15 GB of memory in fp32).

The corpus (made once, reused when ``--workdir`` already holds one of that size) has LibriTTS's shape
without its audio: ``<speaker>/<chapter>/<id>.qnt.pt`` (random int16 codes ``(1, 8, T)``) and
``<id>.phn.txt``, with lognormal durations (median 4.7 s, sigma 0.6, clipped to 1..35 s), 13.5
phones per second and about 154 utterances per speaker. Never commit it.

Keys (DESIGN.md, "Training data at scale"):

- ``index_build_s``: first start, building the index from the tree (``nj`` processes);
- ``start_s``: a restart in a fresh process: staleness check, filters, split and sampler, up to the
  first batch of draws (one rank; imports excluded, reported as ``import_s``);
- ``worker_rss_mb``: anonymous (non file-backed) memory a dataloader worker holds after serving
  batches, beyond an idle worker with the same imports. The index and codes are memory-mapped: their
  pages are the kernel's shared page cache, one copy per machine (``worker_file_mb`` shows them);
- ``first_batch_s`` (nj=2), ``examples_per_s`` (nj=2, examples loaded per second);
- ``pad_fraction``, ``max_padded_over_budget``: over the first 2,000 batches of the recipe's budget;
- ``resume_s_1m``: a sampler resumed at batch 1,000,000 producing its first batch;
- ``useful_frames_speedup``: response frames per second of ar-quarter training steps on CPU with the
  bucketed batches over plain random batches of the same padded budget (the recipe's unless
  ``--train-budget``), alternating step by step in one run;
- ``read_packed_ms`` / ``read_file_ms``: reading one example's codes from the packed shards / its file;
- ``recipe_hours_kept``: share of the corpus hours config/LibriTTS/ar.yml's filters keep;
- ``sample_by``: what the draws above are uniform over (``--sample-by``; default the recipe's, i.e.
  ``auto``); ``by_unit`` repeats the sampler-only keys (``pad_fraction``, ``max_padded_over_budget``,
  ``rows_per_batch``, ``resume_s_1m``) for both units, so one run compares them.

The recipe's ``val_dirs`` (LibriTTS dev-clean) is replaced by ``[]``: the fabricated corpus has no
val folder, and its val split is the 5% hold-out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# 70 ARPAbet-like symbols plus the word gap
SYMBOLS = [f"{v}{s}" for v in "AA AE AH AO AW AY EH ER EY IH IY OW OY UH UW".split() for s in "012"] + (
    "B CH D DH F G HH JH K L M N NG P R S SH T TH V W Y Z ZH _".split()
)
UTTS_PER_SPEAKER = 154
UTTS_PER_CHAPTER = 40


def fabricate(root: str | Path, n: int, seed: int = 0, progress: bool = True) -> Path:
    """Write (or reuse) a LibriTTS-shaped corpus of ``n`` fabricated utterances under ``root/corpus``."""
    import torch
    from tqdm import tqdm

    root = Path(root)
    corpus = root / "corpus"
    marker = root / f".fabricated-{n}-{seed}"
    if marker.exists():
        return corpus
    rng = np.random.default_rng(seed)
    seconds = np.clip(rng.lognormal(np.log(4.7), 0.6, n), 1.0, 35.0)
    frames = np.ceil(seconds * 75).astype(np.int64)
    n_phones = np.maximum(1, np.round(seconds * 13.5)).astype(np.int64)
    for i in tqdm(range(n), desc="fabricating utterances", unit="utt", disable=not progress or n < 1000):
        spk, chapter = i // UTTS_PER_SPEAKER, (i % UTTS_PER_SPEAKER) // UTTS_PER_CHAPTER
        d = corpus / f"{spk:05d}" / f"{spk:05d}{chapter:03d}"
        d.mkdir(parents=True, exist_ok=True)
        uid = f"{spk:05d}_{chapter:03d}_{i:07d}"
        codes = torch.from_numpy(rng.integers(0, 1024, (1, 8, frames[i]), dtype=np.int16))
        torch.save(codes, d / f"{uid}.qnt.pt")
        phones = rng.choice(SYMBOLS, n_phones[i])
        (d / f"{uid}.phn.txt").write_text(" ".join(phones))
    marker.touch()
    return corpus


# ----------------------------------------------------------------------------------------------
# measurements


def _smaps(pid: int) -> dict[str, float]:
    """MB of ``Rss`` and ``Anonymous`` memory of a process (``/proc/<pid>/smaps_rollup``)."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB":
            out[parts[0].rstrip(":")] = int(parts[1]) / 1024
    return out


def recipe_config(recipe: str, corpus: Path, **fields):
    from vall_e.config import Config

    words = [f"yaml={recipe}", f"data_dirs=[{corpus}]", "val_dirs=[]", "device=cpu"] + [f"{k}={v}" for k, v in fields.items()]
    return Config.parse(words)


def _start_in_fresh_process(recipe: str, corpus: Path, fields: dict[str, str]) -> dict[str, float]:
    """A restart: a new process checks the index, filters, splits and draws its first batch."""
    code = f"""
import json, sys, time
t0 = time.time()
sys.path.insert(0, {str(REPO / 'scripts')!r})
import torch, bench_data
from vall_e.data import load_data
t1 = time.time()
cfg = bench_data.recipe_config({recipe!r}, bench_data.Path({str(corpus)!r}), nj=0, **{fields!r})
bundle = load_data(cfg, progress=False)
bundle.sampler(rank=0, start_batch=0).batch(0)
print(json.dumps({{"import_s": t1 - t0, "start_s": time.time() - t1}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _worker_memory(bundle, batches: int = 300) -> dict[str, float]:
    """Anonymous memory of a loader worker that served ``batches`` batches, minus an idle one's."""
    from vall_e.data import load_data

    idle_cfg = recipe_config(str(REPO / "config/test/ar.yml"), REPO / "data/test", nj=1)
    idle_cfg.data_dirs = [str(REPO / "data/test")]
    idle = load_data(idle_cfg, progress=False).train_loader(rank=0, start_batch=0)
    it = iter(idle)
    next(it)
    idle_mem = _smaps(it._workers[0].pid)
    del it, idle

    bundle.cfg.nj = 1
    loader = bundle.train_loader(rank=0, start_batch=0)
    it = iter(loader)
    for _ in range(batches):
        next(it)
    busy = _smaps(it._workers[0].pid)
    del it
    return {
        "worker_rss_mb": round(busy["Anonymous"] - idle_mem["Anonymous"], 1),
        "worker_file_mb": round((busy["Rss"] - busy["Anonymous"]) - (idle_mem["Rss"] - idle_mem["Anonymous"]), 1),
    }


def _loader_speed(bundle, batches: int = 100) -> dict[str, float]:
    bundle.cfg.nj = 2
    t0 = time.time()
    loader = bundle.train_loader(rank=0, start_batch=0)
    it = iter(loader)
    next(it)
    first = time.time() - t0
    t1 = time.time()
    n = sum(len(next(it)["text"]) for _ in range(batches))
    return {"first_batch_s": round(first, 2), "examples_per_s": round(n / (time.time() - t1), 1)}


def _padding(bundle, batches: int = 2000, **overrides) -> dict[str, float]:
    sampler = bundle.sampler(rank=0, **overrides)
    budget = bundle.cfg.batch_frames
    positions = padded = 0
    worst = 0.0
    rows = 0
    for k in range(batches):
        batch = sampler.batch(k)
        lens = [int(bundle.own_cost(np.array([d.index]))[0] + bundle.n_frames[list(d.prompts)].sum()
                    + (d.segment[1] if d.segment else 0)) for d in batch]
        positions += sum(lens)
        padded += len(lens) * max(lens)
        rows += len(lens)
        if budget:
            worst = max(worst, len(lens) * max(lens) / budget)
    return {"pad_fraction": round(1 - positions / padded, 4), "max_padded_over_budget": round(worst, 4),
            "rows_per_batch": round(rows / batches, 1)}


def _read_costs(bundle, n: int = 300) -> dict[str, float]:
    """Milliseconds to read one example's codes from the packed shards and from its ``.qnt.pt``.

    Each way reads the same examples twice and times the second pass, so both run from a warm page
    cache (a cold cache measures the disk, not the format).
    """
    from vall_e.data import load_codes

    rng = np.random.default_rng(0)
    rows = rng.choice(bundle.train, n, replace=False).tolist()
    corpus = bundle.corpus

    def packed() -> None:
        for r in rows:
            k, i = corpus.locate(r)
            corpus.indexes[k].codes(i)

    def files() -> None:
        for r in rows:
            load_codes(corpus.qnt_path(r))

    out = {}
    for name, read in (("read_packed_ms", packed), ("read_file_ms", files)):
        read()
        t0 = time.time()
        read()
        out[name] = round((time.time() - t0) / n * 1e3, 3)
    return out


def _training_speedup(bundle, budget: int, steps: int) -> dict[str, float]:
    """Response frames per second of ar-quarter training steps on CPU: bucketed vs plain random batches.

    Both use the same padded budget. Steps alternate between the two (after one warm-up step each), so
    anything else running on the machine slows both alike.
    """
    import torch
    from tqdm import tqdm

    from vall_e.data import collate
    from vall_e.models import get_model

    torch.manual_seed(0)
    model = get_model("ar-quarter", n_text_tokens=len(bundle.phone_map) + 1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ds = bundle.dataset()
    modes = {"bucketed": bundle.cfg.bucket_batches or 64, "random": 0}
    samplers = {name: bundle.sampler(rank=0, batch_frames=budget, bucket_batches=bb) for name, bb in modes.items()}
    frames = dict.fromkeys(modes, 0)
    seconds = dict.fromkeys(modes, 0.0)
    for k in tqdm(range(steps + 1), desc=f"training ar-quarter at batch_frames={budget}", unit="step pair"):
        for name, sampler in samplers.items():
            batch = collate([ds[d] for d in sampler.batch(k)])
            t0 = time.time()
            model(batch["text"], batch["proms"], batch["resps"]).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if k:  # the first step of each warms up allocators and kernels
                seconds[name] += time.time() - t0
                frames[name] += sum(len(r) for r in batch["resps"])
    out = {f"{name}_frames_per_s": round(frames[name] / seconds[name], 1) for name in modes}
    out["train_budget"] = budget
    out["useful_frames_speedup"] = round(out["bucketed_frames_per_s"] / out["random_frames_per_s"], 3)
    return out


def activation_kb_per_token(preset: str, tokens: int = 1500) -> float:
    """Activation memory autograd keeps per sequence position for ``preset`` (kB, half precision).

    Measured on CPU with saved-tensor hooks (fp32 sizes halved): a device-independent basis for
    sizing ``batch_frames`` to a GPU's memory.
    """
    import torch

    from vall_e.models import get_model

    model = get_model(preset, n_text_tokens=100).train()
    params = {p.data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in params and t.data_ptr() not in seen:  # weights and repeats are not activations
            seen.add(t.data_ptr())
            saved.append(t.numel() * (t.element_size() // 2 if t.is_floating_point() else t.element_size()))
        return t

    text = [torch.randint(1, 90, (100,))]
    proms = [torch.randint(0, 1024, (tokens // 3, 8))]
    resps = [torch.randint(0, 1024, (tokens - 100 - tokens // 3 - 2, 8))]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(text, proms, resps).loss.backward()
    return round(sum(saved) / tokens / 1024, 1)


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--utterances", type=int, default=100_000)
    parser.add_argument("--workdir", default="/tmp/vall_e_bench_data")
    parser.add_argument("--recipe", default=str(REPO / "config/LibriTTS/ar-quarter.yml"),
                        help="filters and batch budget (default: the quarter AR's, whose training the speedup measures)")
    parser.add_argument("--nj", type=int, default=2, help="processes building the index")
    parser.add_argument("--train-budget", type=int, default=0, help="batch_frames of the CPU training comparison (0: the recipe's)")
    parser.add_argument("--train-steps", type=int, default=4, help="measured steps per batching mode")
    parser.add_argument("--prompt-mode", choices=("speaker", "paper"), default=None,
                        help="override the recipe's prompt_mode (the LibriTTS recipes use paper)")
    parser.add_argument("--sample-by", choices=("utterance", "speaker", "auto"), default=None,
                        help="override the recipe's sample_by (what a draw is uniform over; auto follows arch)")
    parser.add_argument("--skip-build", action="store_true", help="reuse an existing index (index_build_s = null)")
    parser.add_argument("--activations", action="store_true", help="also measure activation kB per token (quarter, full)")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()

    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from vall_e.corpus import index_home
    from vall_e.data import load_data

    corpus = fabricate(args.workdir, args.utterances)
    mode = {"prompt_mode": args.prompt_mode} if args.prompt_mode else {}
    if args.sample_by:
        mode["sample_by"] = args.sample_by
    result: dict[str, object] = {"utterances": args.utterances, "recipe": os.path.relpath(args.recipe, REPO)}
    if args.skip_build and index_home(corpus).exists():
        result["index_build_s"] = None
    else:
        import shutil

        shutil.rmtree(index_home(corpus), ignore_errors=True)
        t0 = time.time()
        load_data(recipe_config(args.recipe, corpus, nj=args.nj, **mode))
        result["index_build_s"] = round(time.time() - t0, 2)
    result.update({k: round(v, 3) for k, v in _start_in_fresh_process(args.recipe, corpus, mode).items()})

    bundle = load_data(recipe_config(args.recipe, corpus, nj=0, **mode), progress=False)
    result["prompt_mode"] = bundle.cfg.prompt_mode
    result["sample_by"] = bundle.cfg.sampling_unit
    kept = np.concatenate([bundle.train, bundle.val])
    result["recipe_hours_kept"] = round(float(bundle.n_frames[kept].sum() / bundle.n_frames.sum()), 4)
    result["recipe_utterances_kept"] = round((len(bundle.train) + len(bundle.val)) / len(bundle.corpus), 4)
    result["batch_frames"] = bundle.cfg.batch_frames
    result.update(_padding(bundle))
    t0 = time.time()
    next(iter(bundle.sampler(rank=0, start_batch=1_000_000)))
    result["resume_s_1m"] = round(time.time() - t0, 3)
    result["by_unit"] = {}
    for unit in ("speaker", "utterance"):
        row = _padding(bundle, unit=unit)
        t0 = time.time()
        next(iter(bundle.sampler(rank=0, start_batch=1_000_000, unit=unit)))
        row["resume_s_1m"] = round(time.time() - t0, 3)
        result["by_unit"][unit] = row
    result.update(_read_costs(bundle))
    result.update(_loader_speed(bundle))
    result.update(_worker_memory(bundle))
    result.update(_training_speedup(bundle, args.train_budget or bundle.cfg.batch_frames, args.train_steps))
    if args.activations:
        result["activation_kb_per_token"] = {p: activation_kb_per_token(p) for p in ("ar-quarter", "ar")}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
