"""Model benchmark: AR generation (KV cache vs recompute), NAR inference and training steps.

Prints one JSON object. Shapes are those the reference implementation was timed at, for
comparison: a 3 s prompt (225 frames), 40 phones, batch 1 (and 8), 10 s of audio = 750 frames;
training at batch 4 with 40 phones, 225 prompt frames and 300 response frames (forward + backward
+ Adam step). Generation runs exactly the stated number of steps (``ignore_stop=True``). Weights are
random: speed does not depend on them. Each timing is the best of ``--repeats`` runs (the CPU may be
shared).

It also counts host syncs (operations that make the host wait for the device, see
``vall_e/utils/syncs.py``) in untimed runs: ``*_train_syncs`` per training step (forward and
backward) and ``ar_generate_syncs_150`` for one cached 150-step generation, which asks "all stopped?"
every step on CPU and every 16th on a GPU and reads the lengths once at the end (151 on CPU, 11 on
a GPU).

    python scripts/benchmark.py                      # CPU, 2 threads, quarter preset
    python scripts/benchmark.py --device cuda --preset full
    python scripts/benchmark.py --arch both          # enhuiz and paper cores side by side, same inputs

With ``--arch both`` the output is ``{"enhuiz": {...}, "paper": {...}, "paper_over_enhuiz": {...}}``
(the ratios of the timings); with one arch it is that arch's flat object.

``--group-size G`` builds the AR with VALL-E 2 grouped code modeling (G frames per step) and adds
``ar_ms_per_frame_cached_750``: AR decoding time per frame over 750 frames (375 steps at G = 2), batch
1, sampled, prefill included. Several sizes compare them in one run, on the same inputs::

    python scripts/benchmark.py --group-size 1,2,4      # {"by_group_size": {"1": ..., "2": ..., "4": ...},
                                                         #  "over_group_size_1": {"2": {...}, "4": {...}}, "nar": ...}

There each size's object holds its AR measurements (generation, training, syncs), ``nar`` the NAR's
(which has no grouping) once, and ``over_group_size_1`` every AR timing of a size divided by the
G = 1 one (``ar_ms_per_frame_cached_750`` among them). With several sizes ``ar_ms_per_frame_cached_750``
is timed round-robin, repeat r of every size before repeat r + 1, so a change of load on a shared CPU
falls on every size alike (timed one size after the other, under a load average of 5-6 on 2 cores, the
G = 2 over G = 1 ratio came out 0.94 once and 0.46 round-robin); the other keys are timed size by size.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vall_e.models import get_model  # noqa: E402
from vall_e.utils.syncs import SyncCounter  # noqa: E402

PROMPT_FRAMES, N_PHONES, AUDIO_10S = 225, 40, 750
TRAIN_BATCH, TRAIN_RESP = 4, 300


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, repeats: int, device: torch.device) -> float:
    """Smallest wall time of ``repeats`` calls of ``fn`` (seconds)."""
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def inputs(batch: int, n_resp: int, device: torch.device, seed: int = 0):
    """Random (text, prompt, response) lists: 40 phones, 225 prompt frames, ``n_resp`` response frames."""
    g = torch.Generator().manual_seed(seed)
    text = [torch.randint(1, 256, (N_PHONES,), generator=g).to(device) for _ in range(batch)]
    proms = [torch.randint(0, 1024, (PROMPT_FRAMES, 8), generator=g).to(device) for _ in range(batch)]
    resps = [torch.randint(0, 1024, (n_resp, 8), generator=g).to(device) for _ in range(batch)]
    return text, proms, resps


def ms_per_frame_750(ars: dict, device, repeats: int) -> dict:
    """``ar_ms_per_frame_cached_750`` of every model of ``ars`` (by group size), best of ``repeats``, timed
    round-robin: one decoding of each model per round (batch 1, sampled, 750 frames, prefill included)."""
    text, proms, _ = inputs(1, 0, device)
    best = {g: float("inf") for g in ars}

    def decode(ar) -> None:
        gen = torch.Generator(device).manual_seed(0)
        ar.generate(text, proms, max_steps=AUDIO_10S, ignore_stop=True, temperature=1.0, generator=gen)

    for _ in range(repeats):
        for g, ar in ars.items():
            best[g] = min(best[g], best_time(lambda: decode(ar), 1, device) / AUDIO_10S * 1e3)
    return best


def bench_ar_generation(ar, device, repeats: int, quick: bool) -> dict:
    """ms per generated token with the KV cache (sampling, T=1) and without it (greedy), and whether
    greedy cached and recomputed generation agree on this input. Prefill time is included."""
    out: dict = {}
    text1, proms1, _ = inputs(1, 0, device)

    def gen(text, proms, steps, **kw):
        return ar.generate(text, proms, max_steps=steps, ignore_stop=True, **kw)

    gen(text1, proms1, 20)  # warm-up

    def sampled(text, proms, steps):
        g = torch.Generator(device).manual_seed(0)
        return lambda: gen(text, proms, steps, temperature=1.0, generator=g)

    for steps in (150, AUDIO_10S):
        # steps = frames: a grouped AR runs ceil(steps / G) steps for them, so these are per frame at any G
        out[f"ar_ms_per_token_cached_{steps}"] = best_time(sampled(text1, proms1, steps), repeats, device) / steps * 1e3
    out["ar_ms_per_frame_cached_750"] = out[f"ar_ms_per_token_cached_{AUDIO_10S}"]
    text8, proms8, _ = inputs(8, 0, device, seed=1)
    t8 = best_time(sampled(text8, proms8, AUDIO_10S), max(1, repeats - 1), device)
    out["ar_ms_per_token_cached_750_batch8"] = t8 / (8 * AUDIO_10S) * 1e3  # per generated token
    out["ar_ms_per_step_cached_750_batch8"] = t8 / AUDIO_10S * 1e3

    # Recompute-everything decoding (the reference's way), greedy, and the cache check on the same input.
    steps = 40 if quick else 150
    result = {}

    def uncached():
        result["codes"] = gen(text1, proms1, steps, temperature=0.0, use_cache=False)[0]

    out["ar_ms_per_token_uncached_150"] = best_time(uncached, 1, device) / steps * 1e3
    cached = gen(text1, proms1, steps, temperature=0.0)[0]
    out["greedy_cache_match"] = bool(torch.equal(cached, result["codes"]))
    if quick:
        out["uncached_steps_measured"] = steps
    return out


def bench_nar_inference(nar, device, repeats: int) -> float:
    """Seconds to fill codebooks 2..8 of 10 s of audio (7 greedy passes), batch 1."""
    text, proms, resps = inputs(1, AUDIO_10S, device)
    first = [r[:, 0] for r in resps]
    nar.generate(text, proms, [f[:50] for f in first])  # warm-up
    return best_time(lambda: nar.generate(text, proms, first), repeats, device)


def bench_training(model, device, repeats: int, amp: str = "none") -> float:
    """Seconds per optimizer step at batch 4 (fwd + bwd + Adam), optionally under autocast."""
    text, proms, resps = inputs(TRAIN_BATCH, TRAIN_RESP, device, seed=2)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(text, proms, resps).loss
        loss.backward()
        opt.step()

    step()  # warm-up (allocates optimizer state)
    return best_time(step, repeats, device)


def training_figures(kind: str, model, device: torch.device, repeats: int, amp: str) -> dict:
    """``<kind>_train_step_s`` and ``<kind>_train_frames_per_s`` in fp32, plus the ``_<amp>`` pair when
    ``amp`` is not ``"none"``."""
    out: dict = {}
    for suffix, dtype in [("", "none")] + ([(f"_{amp}", amp)] if amp != "none" else []):
        seconds = bench_training(model, device, repeats, dtype)
        out[f"{kind}_train_step_s{suffix}"] = seconds
        out[f"{kind}_train_frames_per_s{suffix}"] = TRAIN_BATCH * TRAIN_RESP / seconds
    return out


def count_syncs(ar, nar, device: torch.device) -> dict:
    """Host syncs of one training forward + backward of each model and of one cached generation."""
    out: dict = {}
    text, proms, resps = inputs(TRAIN_BATCH, TRAIN_RESP, device, seed=2)
    for kind, model in (("ar", ar), ("nar", nar)):
        model.train()
        with SyncCounter(device) as c:
            model(text, proms, resps).loss.backward()
        model.zero_grad(set_to_none=True)
        out[f"{kind}_train_syncs"] = c.total
    ar.eval()
    text1, proms1, _ = inputs(1, 0, device)
    g = torch.Generator(device).manual_seed(0)
    with SyncCounter(device) as c:  # max_lens keeps the stop check on although the stop token is masked
        ar.generate(text1, proms1, max_steps=150, ignore_stop=True, max_lens=[150], generator=g)
    out["ar_generate_syncs_150"] = c.total
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--preset", default="quarter", help="quarter (default) | half | full | tiny")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--repeats", type=int, default=3, help="timings are the best of this many runs")
    parser.add_argument("--quick", action="store_true", help="one run each and a 40-step uncached measurement")
    parser.add_argument(
        "--amp", default="none", choices=["none", "bf16", "fp16"],
        help="also time training under autocast in this dtype (extra *_<amp> keys; the fixed keys stay fp32)",
    )  # fmt: skip
    parser.add_argument("--arch", default="enhuiz", choices=["enhuiz", "paper", "both"],
                        help="model core (both: each on the same inputs, side by side)")
    parser.add_argument("--group-size", default="1", metavar="G[,G...]",
                        help="AR group size(s), VALL-E 2 grouped code modeling (default 1); several, e.g. 1,2,4, are "
                             "measured in one run with their ratios to the first")
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        sizes = [int(g) for g in args.group_size.split(",")]
    except ValueError:
        parser.error(f"--group-size {args.group_size!r}: give whole numbers separated by commas, e.g. 1,2,4")
    if not sizes or min(sizes) < 1 or len(set(sizes)) != len(sizes):
        parser.error(f"--group-size {args.group_size!r}: give distinct sizes of at least 1, e.g. 1,2,4")

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.arch != "both":
        print(json.dumps(run(args, args.arch, device, sizes)))
        return
    both = {arch: run(args, arch, device, sizes) for arch in ("enhuiz", "paper")}
    if len(sizes) == 1:
        both["paper_over_enhuiz"] = ratios(both["paper"], both["enhuiz"])
    else:
        both["paper_over_enhuiz"] = {str(g): ratios(both["paper"]["by_group_size"][str(g)],
                                                    both["enhuiz"]["by_group_size"][str(g)]) for g in sizes}
    print(json.dumps(both))


def ratios(a: dict, b: dict) -> dict:
    """``a[k] / b[k]`` for every timing (seconds, rates, ms per token or frame) both hold, to 3 decimals."""
    timings = [k for k, v in b.items() if isinstance(v, float) and k in a and (
        k.endswith(("_s", "_s_10s", "_per_s")) or k.startswith(("ar_ms_per_token", "ar_ms_per_frame")))]
    return {k: round(a[k] / b[k], 3) for k in timings}


def run(args: argparse.Namespace, arch: str, device: torch.device, sizes: list[int]) -> dict:
    """Every measurement of one model core: one flat object for one group size; for several, each size's AR
    measurements, the NAR's once, and the ratios of each size's AR timings to the first size's."""
    repeats = 1 if args.quick else args.repeats
    suffix = "" if args.preset in ("full", "") else f"-{args.preset}"
    torch.manual_seed(0)
    nar = get_model(f"nar{suffix}", arch=arch).to(device).eval()
    nar_result: dict = {"nar_infer_s_10s": bench_nar_inference(nar, device, repeats)}
    nar_result.update(training_figures("nar", nar, device, repeats, args.amp))

    by_size: dict[str, dict] = {}
    ars = {}
    for g in sizes:
        torch.manual_seed(0)
        ars[g] = get_model(f"ar{suffix}", arch=arch, group_size=g).to(device).eval()
    for g, ar in ars.items():
        result: dict = {"group_size": g}
        result.update(bench_ar_generation(ar, device, repeats, args.quick))
        result["synth_10s_s"] = result["ar_ms_per_frame_cached_750"] * AUDIO_10S / 1e3 + nar_result["nar_infer_s_10s"]
        result.update(training_figures("ar", ar, device, repeats, args.amp))
        result.update(count_syncs(ar, nar, device))
        if len(sizes) > 1:  # the NAR's syncs are reported once, with the NAR
            nar_result["nar_train_syncs"] = result.pop("nar_train_syncs")
        by_size[str(g)] = result
    if len(sizes) > 1:  # the comparison's key, timed round-robin (see the module docstring)
        for g, ms in ms_per_frame_750(ars, device, repeats).items():
            by_size[str(g)]["ar_ms_per_frame_cached_750"] = ms
            by_size[str(g)]["synth_10s_s"] = ms * AUDIO_10S / 1e3 + nar_result["nar_infer_s_10s"]

    facts: dict = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    if device.type == "cuda":
        facts["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    on_cuda = device.type == "cuda"
    facts["device"] = torch.cuda.get_device_name(device) if on_cuda else f"cpu x{torch.get_num_threads()}"
    facts["preset"] = f"ar{suffix}/nar{suffix}"
    facts["arch"] = arch
    facts["torch"] = torch.__version__
    if len(sizes) == 1:
        return _rounded({**by_size[str(sizes[0])], **nar_result, **facts})
    first = _rounded(by_size[str(sizes[0])])
    rounded = {g: _rounded(r) for g, r in by_size.items()}
    return {
        "by_group_size": rounded,
        f"over_group_size_{sizes[0]}": {g: ratios(r, first) for g, r in rounded.items() if g != str(sizes[0])},
        "nar": _rounded(nar_result),
        **_rounded(facts),
    }


def _rounded(result: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}


if __name__ == "__main__":
    main()
