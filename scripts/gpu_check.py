#!/usr/bin/env python3
"""One command, one JSON: does the project work on this CUDA GPU, and how fast is it?

    python scripts/gpu_check.py [--out FILE] [--stage-timeout S | name=S,...] [--only stage,...] [--logs DIR]

Without a CUDA GPU it prints one line and exits 2. Otherwise it runs the stages below, each in its
own subprocess (its own process group) under its own time cap, so a hang or a crash in one stage
still leaves the others' numbers. It prints one JSON object on stdout (also written to ``--out``,
default ``benchmarks/gpu_check-<gpu>-<date>.json``) with the GPU, the torch/CUDA/DeepSpeed versions,
the date and, per stage, ``status`` (ok | failed | timeout | skipped), ``seconds`` and ``numbers``
(with the tail of the output when it did not end well). A progress line per stage goes to stderr.
Exit status: 0 when every selected stage is ok, 1 otherwise, 2 without a GPU or on a usage error.

Stages (default caps in seconds; they sum to 475 s, under 8 minutes):

- ``deepspeed_ops`` (20): which Adam training uses and whether DeepSpeed's FusedAdam op is prebuilt,
  with ``nvcc``/``ninja``. Should training need that op unbuilt, it is JIT-built here (needs
  ``nvcc``) so the training stages do not pay for the build, or the stage fails saying why.
- ``pytest`` (140): ``pytest -m gpu -q tests`` (tests/test_gpu.py and every other gpu-marked test):
  counts of passed/failed/skipped and the failed test ids.
- ``train`` (50): the quarter AR and NAR of ``config/test/{ar,nar}.yml`` on a copy of data/test, in
  bf16 and in fp16, with the real DeepSpeed engine (four runs at once); the precision each run
  reported, first/last loss from the JSON log lines, whether it fell, gradient norms (fp16 over bf16),
  fp16 steps skipped for overflow.
- ``resume`` (75): AR and NAR in bf16: an uninterrupted run, an identical rerun, and a run stopped
  by ``max_iter`` at half way then resumed to the end; final weights compared (max abs diff, read
  through ``vall_e.export.read_checkpoint``, weights-only) and the logged losses after the resume.
  The rerun measures how reproducible training is on this GPU at all, the yardstick for the resume.
- ``synth`` (35): ``python -m vall_e.export`` of the bf16 AR and NAR, then the synthesis CLI on CUDA
  with data/test/test.wav as the reference; seconds, output duration, real-time factor.
- ``benchmark`` (45): ``scripts/benchmark.py --device cuda --preset full``, all its keys.
- ``mfu`` (30): training tokens/s of the full presets at the LibriTTS recipes' batch budgets, with
  FLOPs and MFU (see ``FLOPS_FORMULA`` and :func:`training_flops`).
- ``sdpa`` (25): which ``scaled_dot_product_attention`` back end the full AR and NAR get, training
  (forward + backward) and AR decoding, in bf16 and fp32, from ``torch.profiler``.
- ``qnt`` (35): ``scripts/bench_qnt.py --device cuda --compare-cpu``: audio seconds encoded per
  second and agreement of CUDA codes with CPU float64 codes (its keys are kept as they come).
- ``syncs`` (20): host syncs (``torch.cuda.set_sync_debug_mode("warn")`` warnings) per training step
  of the quarter AR and NAR (forward + backward + fused AdamW, bf16 autocast) and per token of a
  cached AR decode, with the source lines that sync most.

All training here uses a learning rate that rises linearly over the whole run
(``warmup_num_steps`` above ``max_iter``): the schedule then does not depend on ``max_iter``, so a
run stopped at half way by ``max_iter`` and resumed has exactly the schedule of an uninterrupted
one. Audio from these models is not speech: data/test's codes come from the untrained codec.

``--device cpu --quick`` runs every stage on the CPU with tiny sizes. The numbers mean nothing; it
exists to check this script itself on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]

# Stage names in the order they run, with their default caps (seconds). Sum: 475 s.
DEFAULT_TIMEOUTS: dict[str, float] = {
    "deepspeed_ops": 20,
    "pytest": 140,
    "train": 50,
    "resume": 75,  # two launches in a row: the half runs, then their continuations
    "synth": 35,
    "benchmark": 45,
    "mfu": 30,
    "sdpa": 25,
    "qnt": 35,
    "syncs": 20,
}
STAGE_NAMES = list(DEFAULT_TIMEOUTS)

TAIL_CHARS = 3000  # of a stage's output kept in the JSON when it did not end well
KILL_GRACE_S = 3.0  # SIGTERM, then SIGKILL this much later (a training run saves on SIGTERM)

# Training runs of the train/resume/synth stages.
TRAIN_STEPS = 60
TRAIN_LOG_EVERY = 5
# lr rises linearly from warmup_min_lr over warmup_num_steps: at step 60 it is 1.2e-3, about the
# smoke recipe's peak (1e-3). warmup_num_steps > max_iter keeps the schedule independent of max_iter.
TRAIN_WARMUP_STEPS = 1000
TRAIN_WARMUP_MAX_LR = 0.02
EVAL_AR_STEPS = 40  # the end-of-run evaluation's AR generation length (the recipe's 300 is slow to no purpose here)
# Words of data/test's two transcripts only: the smoke models know no other phones.
SYNTH_TEXT = "The old map stopped at noon."

# LibriTTS-like utterance shapes for the MFU stage (the same statistics as scripts/bench_data.py).
MEDIAN_SECONDS = 4.7
LONG_SECONDS = 20.0
PHONES_PER_SECOND = 13.5
FRAMES_PER_SECOND = 75

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' spec sheets, matched against the device
# name in this order (the more specific names first). Unknown GPUs get FLOPs without an MFU.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H200 NVL", 835e12),
    ("H200", 989.4e12),
    ("GH200", 989.4e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989.4e12),  # SXM ("H100 80GB HBM3")
    ("H800", 989.4e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
]


class StageError(RuntimeError):
    """A stage that ran but found the thing it checks broken; the message says what."""


# ==============================================================================================
# helpers (pure, tested on CPU)


def slug(text: str) -> str:
    """``"NVIDIA H200"`` -> ``"nvidia-h200"``: lowercase, runs of other characters become one dash."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def parse_timeouts(text: Optional[str], defaults: dict[str, float]) -> dict[str, float]:
    """``--stage-timeout``: ``"90"`` caps every stage at 90 s; ``"train=90,qnt=60"`` changes those two.

    Raises:
        ValueError: an unknown stage name or a value that is not a positive number.
    """
    caps = dict(defaults)
    if not text:
        return caps
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, value = part.rpartition("=")
        try:
            seconds = float(value)
        except ValueError:
            raise ValueError(f"--stage-timeout {text!r}: {value!r} is not a number of seconds") from None
        if not seconds > 0:
            raise ValueError(f"--stage-timeout {text!r}: caps must be positive")
        if not sep:
            caps = {k: seconds for k in caps}
        elif name in caps:
            caps[name] = seconds
        else:
            raise ValueError(f"--stage-timeout: unknown stage {name!r}; stages are {', '.join(defaults)}")
    return caps


def parse_only(text: Optional[str]) -> list[str]:
    """``--only train,qnt`` -> those stages in run order; None -> all of them."""
    if not text:
        return list(STAGE_NAMES)
    wanted = [w.strip() for w in text.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in STAGE_NAMES]
    if unknown:
        raise ValueError(f"--only: unknown stage(s) {', '.join(unknown)}; stages are {', '.join(STAGE_NAMES)}")
    return [name for name in STAGE_NAMES if name in wanted]


def tail(text: str, n: int = TAIL_CHARS) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def error_line(output: str, limit: int = 300) -> str:
    """The line of a command's output that best says why it failed: its last ``error:`` line (the
    project's CLIs print one), else the last line naming an Error, else the last line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    if not lines:
        return "(no output)"
    pick = next((ln for ln in reversed(lines) if ln.lower().startswith("error")), None) \
        or next((ln for ln in reversed(lines) if "Error" in ln), None) or lines[-1]
    return pick if len(pick) <= limit else pick[: limit - 3] + "..."


def last_json_object(text: str) -> Optional[dict[str, Any]]:
    """The last line of ``text`` that is a JSON object (scripts print their result last)."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None


def parse_train_log(text: str, split: str = "train") -> list[dict[str, Any]]:
    """The stats objects of one ``split`` from a training log (``<prefix> - {json}`` lines), in order."""
    records = []
    for line in text.splitlines():
        start = line.find("{")
        if start < 0 or not line.rstrip().endswith("}"):
            continue
        try:
            rec = json.loads(line[start:])
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("split") == split and "step" in rec:
            records.append(rec)
    return records


def by_step(records: Sequence[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """``{step: record}``; a step logged twice (a resumed run repeating steps) keeps its last record."""
    return {int(r["step"]): r for r in records}


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def loss_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """First/last loss of a run's logged train steps, whether it fell, and a few training health numbers.

    ``loss_fell``: the mean of the last quarter of the logged losses (at least one) is below the
    mean of the first quarter; with one utterance per batch single losses are noisy.
    """
    steps = by_step(records)
    if not steps:
        return {"logged_steps": 0, "loss_fell": False, "all_finite": False}
    ordered = [steps[s] for s in sorted(steps)]
    losses = [r.get("loss") for r in ordered]
    finite = [x for x in losses if _finite(x)]
    k = max(1, len(losses) // 4)
    head, rear = losses[:k], losses[-k:]
    out: dict[str, Any] = {
        "logged_steps": len(ordered),
        "first_step": int(ordered[0]["step"]),
        "last_step": int(ordered[-1]["step"]),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "min_loss": min(finite) if finite else None,
        "all_finite": len(finite) == len(losses),
    }
    if all(_finite(x) for x in head + rear) and len(losses) >= 2:
        out["loss_fell"] = statistics.fmean(rear) < statistics.fmean(head)
    else:
        out["loss_fell"] = False
    for key in ("grad_norm", "acc"):
        values = [r[key] for r in ordered if _finite(r.get(key))]
        if values:
            out[f"first_{key}"], out[f"last_{key}"] = values[0], values[-1]
    for key in ("step_s", "frames_per_s"):
        values = [r[key] for r in ordered[1:] if _finite(r.get(key))]  # step 1 includes warm-up
        if values:
            out[f"median_{key}"] = statistics.median(values)
    out["nonfinite_losses"] = max((r.get("nonfinite_losses", 0) or 0) for r in ordered)
    return out


def skipped_steps(lr_fp16: float, lr_bf16: float, lr_per_step: float) -> int:
    """Optimizer steps an fp16 run skipped (loss-scale overflows), from the learning rates both runs logged
    at the same step: DeepSpeed does not advance the schedule on a skipped step, and bf16 never skips.
    (DeepSpeed reports the overflows only at INFO, below its default WARNING level, so its output has none.)"""
    return int(round((lr_bf16 - lr_fp16) / lr_per_step))


def precision_used(output: str) -> Optional[str]:
    """The precision a training run reported it trains in (``bf16``/``fp16``/``fp32``), if it said."""
    m = re.search(r"training precision: (\w+)", output)
    if m:
        return m.group(1)
    return "fp32" if "mixed precision is turned off" in output else None


def parse_pytest_summary(output: str) -> dict[str, Any]:
    """Counts from pytest's last summary line (``3 passed, 1 failed, 2 skipped in 4.1s``) and the
    ``FAILED``/``ERROR`` test ids of its short summary."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "deselected": 0, "xfailed": 0, "xpassed": 0}
    summary = None
    for line in reversed(output.splitlines()):
        if re.search(r"\b(passed|failed|skipped|error|errors|deselected|no tests ran)\b", line) and re.search(
            r"\bin [\d.]+s\b", line
        ):
            summary = line
            break
    if summary is not None:
        for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", summary):
            counts["errors" if word.startswith("error") else word] += int(n)
    failures = [m.group(2) for m in re.finditer(r"^(FAILED|ERROR) (\S+)", output, re.M)]
    return {**counts, "failures": failures, "summary_found": summary is not None}


def parse_synth_stdout(stdout: str) -> dict[str, Any]:
    """The synthesis CLI's result line: ``out.wav  2.35 s at 24000 Hz, real-time factor 0.123 (cuda, seed 0)``."""
    m = re.search(r"([\d.]+) s at (\d+) Hz, real-time factor ([\d.]+) \(([^,]+), seed (-?\d+)\)", stdout)
    if not m:
        return {}
    return {"output_s": float(m.group(1)), "sample_rate": int(m.group(2)), "real_time_factor": float(m.group(3)),
            "device": m.group(4), "seed": int(m.group(5))}


def classify_sdpa(op_names: Sequence[str]) -> list[str]:
    """The SDPA back ends named by profiler events: ``flash``, ``efficient``, ``cudnn``, ``math``.

    Read from the aten dispatch ops (``aten::_scaled_dot_product_flash_attention`` and their
    backward ops, CPU's ``..._flash_attention_for_cpu`` included), which name the back end whatever the
    kernel library calls its kernels. The math fallback has no kernel of its own: its op is
    ``aten::_scaled_dot_product_attention_math``.
    """
    kinds = set()
    for name in op_names:
        if "_scaled_dot_product_cudnn_attention" in name:
            kinds.add("cudnn")
        elif "_scaled_dot_product_flash_attention" in name or "_flash_attention_forward" in name:
            kinds.add("flash")
        elif "_scaled_dot_product_efficient_attention" in name or "_efficient_attention_forward" in name:
            kinds.add("efficient")
        elif "_scaled_dot_product_attention_math" in name:
            kinds.add("math")
        elif "_scaled_dot_product_fused_attention_overrideable" in name:
            kinds.add("overrideable")
    return sorted(kinds)


_ATTENTION_KERNEL = re.compile(r"flash|fmha|attention|sdpa|attn", re.I)


def attention_kernel_names(names: Sequence[str], limit: int = 8) -> list[str]:
    """Device kernel names that look like attention kernels (shortened), for the record."""
    out = []
    for name in names:
        if name.startswith("aten::") or not _ATTENTION_KERNEL.search(name):
            continue
        short = name if len(name) <= 160 else name[:157] + "..."
        if short not in out:
            out.append(short)
    return out[:limit]


def peak_bf16_flops(device_name: str) -> tuple[Optional[float], Optional[str]]:
    """(dense bf16 peak FLOP/s, table entry) for a CUDA device name, or (None, None) when unknown."""
    for key, flops in PEAK_BF16_FLOPS:
        if re.search(rf"(^|[^A-Za-z0-9]){re.escape(key)}($|[^A-Za-z0-9])", device_name, re.I):
            return flops, key
    return None, None


FLOPS_FORMULA = (
    "per sequence of T positions (text with <s></s>, 2 separators, prompt, response): "
    "6 * N_body * T + 6 * d_model * n_classes * T_scored + 12 * n_layers * d_model * T^2; "
    "N_body = 12 * n_layers * d_model^2 (qkv, proj, fc1, fc2 weights), T_scored = positions the "
    "classifier sees (AR: response + stop, NAR: response). The 6N-per-token and 12*L*d*T attention "
    "terms are the PaLM appendix B estimate (forward + backward, full attention counted even where causal); "
    "embedding lookups, norms and the optimizer are not counted."
)


def training_flops(n_layers: int, d_model: int, n_classes: int, seq_len: int, scored: int, rows: int = 1) -> float:
    """Model FLOPs of one training step (forward + backward) over ``rows`` sequences: see FLOPS_FORMULA."""
    n_body = 12 * n_layers * d_model**2
    per_seq = 6 * n_body * seq_len + 6 * d_model * n_classes * scored + 12 * n_layers * d_model * seq_len**2
    return float(per_seq * rows)


def utilization(flops_per_step: float, step_s: float, peak_flops: Optional[float]) -> dict[str, Optional[float]]:
    """Achieved TFLOP/s and MFU (achieved FLOP/s over the peak; None without a known peak)."""
    achieved = flops_per_step / step_s
    return {"achieved_tflops": round(achieved / 1e12, 3), "mfu": round(achieved / peak_flops, 4) if peak_flops else None}


@dataclasses.dataclass
class Shape:
    """One training sequence: phones (with <s></s>), prompt frames and response frames."""

    text: int
    prompt: int
    resp: int

    @property
    def seq_len(self) -> int:
        return self.text + 1 + self.prompt + 1 + self.resp


def recipe_shape(kind: str, prompt_mode: str, seconds: float) -> Shape:
    """The sequence of a ``seconds``-long utterance as the recipe's data pipeline builds it.

    ``paper``: the AR has no prompt, the NAR's prompt is a 3 s segment of the utterance (at most
    half of it: the data pipeline's own rule); ``speaker``: one other utterance of the same length.
    """
    frames = round(seconds * FRAMES_PER_SECOND)
    text = round(seconds * PHONES_PER_SECOND) + 2
    if prompt_mode == "paper":
        from vall_e.data import SEGMENT_FRAMES
        from vall_e.sampler import segment_frames_of

        prompt = 0 if kind == "ar" else int(segment_frames_of(frames, SEGMENT_FRAMES))
    else:
        prompt = frames
    return Shape(text=text, prompt=prompt, resp=frames)


def rows_for_budget(shape: Shape, batch_frames: int, batch_size: int) -> int:
    """Rows of a batch: ``batch_frames`` bounds rows x longest sequence when set, else ``batch_size``."""
    if batch_frames > 0:
        return max(1, batch_frames // shape.seq_len)
    return max(1, batch_size)


def max_abs_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest absolute difference between two state dicts of the same keys (inf if the keys differ)."""
    if a.keys() != b.keys():
        return math.inf
    worst = 0.0
    for k in a:
        x, y = a[k].float(), b[k].float()
        if x.shape != y.shape:
            return math.inf
        if x.numel():
            worst = max(worst, float((x - y).abs().max()))
    return worst


def build_report(env: dict[str, Any], stages: dict[str, dict[str, Any]], started: float) -> dict[str, Any]:
    """The one JSON object: environment, per-stage results, totals."""
    statuses = [s["status"] for s in stages.values()]
    return {
        **env,
        "total_seconds": round(time.time() - started, 1),
        "stages_ok": sum(s == "ok" for s in statuses),
        "stages_not_ok": sorted(n for n, s in stages.items() if s["status"] in ("failed", "timeout")),
        "stages": stages,
    }


# ==============================================================================================
# running commands under a cap


@dataclasses.dataclass
class Finished:
    """How a command ended: exit status (None when killed at its cap), seconds, its output."""

    returncode: Optional[int]
    seconds: float
    timed_out: bool
    stdout: str
    stderr: str


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the command's whole process group (its children too), SIGKILL after a grace period."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            # the leader is gone; its children may not be: the SIGKILL round still reaches them
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_capped(argv: Sequence[str], timeout: float, log_stem: Path, env: Optional[dict[str, str]] = None,
               cwd: Path = REPO) -> Finished:
    """Run ``argv`` in a new process group; at ``timeout`` seconds the group is killed.

    stdout and stderr go to ``<log_stem>.out`` / ``.err`` (files, not pipes: nothing can block, and
    whatever a killed command printed is still there).
    """
    log_stem.parent.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_stem.with_suffix(".out"), log_stem.with_suffix(".err")
    t0 = time.time()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(list(argv), cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True)
        timed_out = False
        try:
            proc.wait(max(timeout, 0.01))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
        else:
            _kill_group_leftovers(proc)
    return Finished(None if timed_out else proc.returncode, time.time() - t0, timed_out,
                    out_path.read_text(errors="replace"), err_path.read_text(errors="replace"))


def _kill_group_leftovers(proc: subprocess.Popen) -> None:
    """A command that exited may leave children behind (e.g. dataloader workers): end them."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def subprocess_env(threads: Optional[int] = None, distributed_free: bool = False) -> dict[str, str]:
    """The environment for the project's commands: this checkout first on the path, unbuffered,
    never a network download (offline g2p), and optionally a thread count and no launcher variables
    (runs started side by side must each pick their own rendezvous port)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("VALL_E_NLTK_DOWNLOAD", "0")
    if threads is not None and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(threads)
    if distributed_free:
        for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
            env.pop(key, None)
    return env


def run_concurrently(commands: dict[str, list[str]], log_dir: Path, env: dict[str, str],
                     timeout: float = 3600.0) -> dict[str, Finished]:
    """Start every command at once (same process group as the caller), wait for all; ``{name: Finished}``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = {}
    t0 = time.time()
    files = {}
    for name, argv in commands.items():
        out = open(log_dir / f"{name}.out", "wb")
        err = open(log_dir / f"{name}.err", "wb")
        files[name] = (out, err)
        procs[name] = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
    done: dict[str, Finished] = {}
    ended: dict[str, float] = {}
    while len(ended) < len(procs):
        for name, proc in procs.items():
            if name not in ended and proc.poll() is not None:
                ended[name] = time.time() - t0
        if len(ended) < len(procs):
            if time.time() - t0 > timeout:
                for name, proc in procs.items():
                    if name not in ended:
                        proc.kill()
                        proc.wait()
                break
            time.sleep(0.1)
    for name, proc in procs.items():
        for f in files[name]:
            f.close()
        done[name] = Finished(proc.returncode if name in ended else None, ended.get(name, time.time() - t0),
                              name not in ended, (log_dir / f"{name}.out").read_text(errors="replace"),
                              (log_dir / f"{name}.err").read_text(errors="replace"))
    return done


# ==============================================================================================
# training runs (the train, resume and synth stages; tests/test_gpu.py uses them too)


@dataclasses.dataclass
class RunSpec:
    """One ``python -m vall_e.train`` run of a smoke recipe; checkpoints in ``<workdir>/ckpts/<name>``."""

    name: str
    kind: str  # "ar" | "nar": config/test/<kind>.yml
    precision: str  # "bf16" | "fp16"
    max_iter: int = TRAIN_STEPS
    save_every: int = TRAIN_STEPS // 2
    log_every: int = TRAIN_LOG_EVERY
    eval_ar_steps: int = EVAL_AR_STEPS
    stop_at: Optional[int] = None  # this launch ends here (max_iter=stop_at): a run to be resumed later


def precision_words(precision: str) -> list[str]:
    """Config words that train in ``precision`` (``bf16`` | ``fp16``) on any CUDA GPU.

    ``use_fp16=true`` means "half precision" and picks bf16 on GPUs that have it; ``half_precision=fp16``
    (where the config has that field) makes it fp16 there too.
    """
    if precision == "bf16":
        return ["use_bf16=true"]
    if precision != "fp16":
        raise ValueError(f"precision {precision!r}: use bf16 or fp16")
    from vall_e.config import Config

    return ["use_fp16=true", "use_bf16=false"] + (["half_precision=fp16"] if "half_precision" in Config.field_names() else [])


def prepare_data(workdir: Path) -> Path:
    """A copy of data/test in ``workdir`` (training writes the corpus index next to the data)."""
    dest = workdir / "data" / "test"
    if not dest.exists():
        shutil.copytree(REPO / "data" / "test", dest, ignore=shutil.ignore_patterns(".vall_e"))
    return dest


def train_words(spec: RunSpec, workdir: Path, device: str) -> list[str]:
    """The config words of one launch of ``spec``.

    A launch with ``stop_at`` ends there through ``max_iter``; the learning rate does not depend on
    ``max_iter`` (it is still rising: ``warmup_num_steps`` > ``max_iter``), so a run stopped half way
    and launched again without ``stop_at`` trains exactly as an uninterrupted one.
    """
    return [
        f"yaml=config/test/{spec.kind}.yml",
        f"device={device}",
        f"name={spec.name}",
        f"ckpt_root={workdir / 'ckpts'}",
        f"log_root={workdir / 'logs'}",
        f"data_dirs=[{workdir / 'data' / 'test'}]",
        *precision_words(spec.precision),
        f"max_iter={spec.stop_at if spec.stop_at is not None else spec.max_iter}",
        f"save_ckpt_every={spec.save_every}",
        "eval_every=1000000",
        f"log_every={spec.log_every}",
        f"warmup_num_steps={TRAIN_WARMUP_STEPS}",
        f"warmup_max_lr={TRAIN_WARMUP_MAX_LR}",
        f"max_val_ar_steps={spec.eval_ar_steps}",
        "keep_last_ckpts=0",
        "tensorboard=false",
    ]


def train_command(spec: RunSpec, workdir: Path, device: str) -> list[str]:
    return [sys.executable, "-m", "vall_e.train", *train_words(spec, workdir, device)]


def run_records(workdir: Path, name: str) -> list[dict[str, Any]]:
    """Every logged train record of run ``name`` (all of its starts, oldest first)."""
    records: list[dict[str, Any]] = []
    for log in sorted((workdir / "logs" / name).glob("*/log.txt")):
        records += parse_train_log(log.read_text(errors="replace"))
    return records


def run_finished(workdir: Path, spec: RunSpec) -> bool:
    """Whether ``spec`` already ran to its end in ``workdir`` (an earlier stage trained it)."""
    ckpt = workdir / "ckpts" / spec.name
    steps = by_step(run_records(workdir, spec.name))
    return (ckpt / f"global_step{spec.max_iter}").is_dir() and spec.max_iter in steps


def train_runs(specs: Sequence[RunSpec], workdir: Path, device: str, log_dir: Path,
               timeout: float = 3600.0) -> dict[str, Finished]:
    """Train ``specs`` side by side (each its own process), ``{name: Finished}``."""
    if not specs:
        return {}
    prepare_data(workdir)
    env = subprocess_env(threads=max(1, (os.cpu_count() or 2) // len(specs)), distributed_free=True)
    commands = {s.name: train_command(s, workdir, device) for s in specs}
    return run_concurrently(commands, log_dir, env, timeout)


def run_summary(workdir: Path, spec: RunSpec, finished: Optional[Finished]) -> dict[str, Any]:
    """Loss summary of a run plus how its process ended."""
    out = {"kind": spec.kind, "precision": spec.precision, **loss_summary(run_records(workdir, spec.name))}
    if finished is not None:
        out["precision_used"] = precision_used(finished.stderr + finished.stdout)
        out["returncode"] = finished.returncode
        out["process_s"] = round(finished.seconds, 1)
        if finished.returncode != 0:
            out["output_tail"] = tail(finished.stderr + finished.stdout, 1500)
    return out


def checkpoint_state(workdir: Path, name: str, step: int) -> dict[str, Any]:
    """The float32 weights of run ``name`` at ``step``, through the project's weights-only reader."""
    from vall_e.export import read_checkpoint

    return read_checkpoint(workdir / "ckpts" / name, f"global_step{step}")["state_dict"]


def logged_loss_diff(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], after: int = 0) -> Optional[float]:
    """Largest |loss difference| over the steps (> ``after``) logged by both runs."""
    sa, sb = by_step(a), by_step(b)
    common = [s for s in sa if s in sb and s > after and _finite(sa[s].get("loss")) and _finite(sb[s].get("loss"))]
    if not common:
        return None
    return max(abs(sa[s]["loss"] - sb[s]["loss"]) for s in common)


def resume_verdict(diff_resume: float, diff_rerun: float) -> bool:
    """Whether a resumed run matches the uninterrupted one as well as this GPU reproduces a run at all.

    Bitwise equal reruns demand a bitwise equal resume; otherwise (non-deterministic kernels, e.g.
    attention backward) the resume may differ by up to 10x what an identical rerun differs by.
    """
    if diff_rerun == 0.0:
        return diff_resume == 0.0
    return diff_resume <= 10.0 * diff_rerun


# ==============================================================================================
# stages that run inside this script (``--stage NAME``, in a subprocess of the orchestrator)


class StageContext:
    """What a stage function gets: where to work, the device, and ``record`` for its numbers.

    Numbers are written to the result file at every ``record``, so a stage killed at its cap still
    reports what it measured before.
    """

    def __init__(self, workdir: Path, device: str, quick: bool, result_file: Path):
        self.workdir, self.device, self.quick, self.result_file = workdir, device, quick, result_file
        self.numbers: dict[str, Any] = {}

    def record(self, **numbers: Any) -> None:
        self.numbers.update(numbers)
        tmp = self.result_file.with_name(self.result_file.name + ".tmp")
        tmp.write_text(dumps(self.numbers))
        os.replace(tmp, self.result_file)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()


def _json_default(x: Any) -> Any:
    return str(x) if isinstance(x, Path) else repr(x)


def clean_json(x: Any) -> Any:
    """``x`` with non-finite floats as strings (``"inf"``, ``"nan"``): strict JSON has no Infinity/NaN."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): clean_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean_json(v) for v in x]
    return x


def dumps(x: Any, **kw: Any) -> str:
    """Strict JSON of ``x`` (see :func:`clean_json`)."""
    return json.dumps(clean_json(x), default=_json_default, allow_nan=False, **kw)


def stage_deepspeed_ops(ctx: StageContext) -> None:
    """Is DeepSpeed's FusedAdam usable? Build it now (JIT, needs nvcc) when training needs it and it is not prebuilt."""
    import torch.utils.cpp_extension as cpp

    home_nvcc = Path(cpp.CUDA_HOME) / "bin" / "nvcc" if cpp.CUDA_HOME else None
    nvcc = shutil.which("nvcc") or (str(home_nvcc) if home_nvcc is not None and home_nvcc.exists() else None)
    ctx.record(nvcc=nvcc, cuda_home=cpp.CUDA_HOME, ninja=bool(cpp.is_ninja_available()))
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    ctx.record(deepspeed_accelerator=get_accelerator()._name, fused_adam_prebuilt=bool(installed_ops.get("fused_adam")))
    try:
        from vall_e.config import Config
        from vall_e.utils.engines import deepspeed_config

        params = deepspeed_config(Config.parse([f"device={ctx.device}", "use_bf16=true"]))["optimizer"]["params"]
        uses_fused = not params.get("torch_adam", False)
    except Exception as e:  # the project's internals moved: assume the DeepSpeed default (FusedAdam)
        ctx.record(optimizer_probe_error=f"{type(e).__name__}: {e}")
        uses_fused = True
    ctx.record(training_uses_fused_adam=uses_fused)
    if not uses_fused or ctx.numbers["fused_adam_prebuilt"] or not ctx.cuda:
        ctx.record(fused_adam_jit_build_s=None)
        return
    if ctx.numbers["nvcc"] is None or not ctx.numbers["ninja"]:
        raise StageError("training on CUDA uses DeepSpeed's FusedAdam, which this DeepSpeed wheel does not ship "
                         "built, and it cannot be JIT-built here (needs nvcc for torch's CUDA and ninja): "
                         "training stages will fail at deepspeed.initialize")
    from deepspeed.ops.op_builder import FusedAdamBuilder

    t0 = time.time()
    FusedAdamBuilder().load(verbose=False)
    ctx.record(fused_adam_jit_build_s=round(time.time() - t0, 1))


def _train_specs(ctx: StageContext) -> list[RunSpec]:
    n = 6 if ctx.quick else TRAIN_STEPS
    steps = dict(max_iter=n, save_every=n // 2, log_every=1 if ctx.quick else TRAIN_LOG_EVERY,
                 eval_ar_steps=5 if ctx.quick else EVAL_AR_STEPS)
    return [RunSpec(f"{kind}-{prec}", kind, prec, **steps) for prec in ("bf16", "fp16") for kind in ("ar", "nar")]


def stage_train(ctx: StageContext) -> None:
    """The quarter AR and NAR, bf16 and fp16, side by side; loss first/last and whether it fell."""
    specs = _train_specs(ctx)
    todo = [s for s in specs if not run_finished(ctx.workdir, s)]
    finished = train_runs(todo, ctx.workdir, ctx.device, ctx.workdir / "out" / "train")
    runs = {s.name: run_summary(ctx.workdir, s, finished.get(s.name)) for s in specs}
    ctx.record(steps=specs[0].max_iter, runs=runs,
               lr_schedule=f"linear from warmup_min_lr to {TRAIN_WARMUP_MAX_LR} over {TRAIN_WARMUP_STEPS} steps")
    n = specs[0].max_iter
    for kind in ("ar", "nar"):  # fp16 against bf16: skipped steps, and the logged gradient norms' ratio
        last = {p: by_step(run_records(ctx.workdir, f"{kind}-{p}")).get(n, {}) for p in ("bf16", "fp16")}
        if _finite(last["bf16"].get("lr")) and _finite(last["fp16"].get("lr")):
            runs[f"{kind}-fp16"]["fp16_skipped_steps"] = skipped_steps(
                last["fp16"]["lr"], last["bf16"]["lr"], TRAIN_WARMUP_MAX_LR / TRAIN_WARMUP_STEPS)
        if _finite(last["bf16"].get("grad_norm")) and _finite(last["fp16"].get("grad_norm")) and last["bf16"]["grad_norm"]:
            runs[f"{kind}-fp16"]["grad_norm_ratio_to_bf16"] = last["fp16"]["grad_norm"] / last["bf16"]["grad_norm"]
    ctx.record(runs=runs)
    bad = [n for n, r in runs.items() if r.get("returncode", 0) != 0 or not r["all_finite"] or not r["loss_fell"]
           or (ctx.cuda and r.get("precision_used") not in (None, r["precision"]))]
    if bad:
        raise StageError(f"runs that failed, logged a non-finite loss, whose loss did not fall or that trained in "
                         f"another precision than asked: {', '.join(bad)}")


def stage_resume(ctx: StageContext) -> None:
    """Uninterrupted vs rerun vs stopped-half-way-and-resumed, AR and NAR in bf16."""
    base = {s.name: s for s in _train_specs(ctx) if s.precision == "bf16"}
    n = next(iter(base.values())).max_iter
    half = n // 2
    first: list[RunSpec] = []  # side by side: the uninterrupted runs (unless the train stage made them), reruns, halves
    for name, spec in base.items():
        if not run_finished(ctx.workdir, spec):
            first.append(spec)
        first.append(dataclasses.replace(spec, name=f"{name}-rerun"))
        first.append(dataclasses.replace(spec, name=f"{name}-resume", stop_at=half))
        for run in (f"{name}-rerun", f"{name}-resume"):  # a reused --workdir: these must start from scratch
            shutil.rmtree(ctx.workdir / "ckpts" / run, ignore_errors=True)
            shutil.rmtree(ctx.workdir / "logs" / run, ignore_errors=True)
    out_dir = ctx.workdir / "out" / "resume"
    ended = train_runs(first, ctx.workdir, ctx.device, out_dir / "first")
    ctx.record(steps=n, resumed_at=half, first_launch_returncodes={k: v.returncode for k, v in ended.items()})
    again = [dataclasses.replace(spec, name=f"{name}-resume") for name, spec in base.items()
             if ended.get(f"{name}-resume") is not None and ended[f"{name}-resume"].returncode == 0]
    continued = train_runs(again, ctx.workdir, ctx.device, out_dir / "continued")
    results: dict[str, Any] = {}
    failures = []
    for name in base:
        r: dict[str, Any] = {}
        launches = {k: v for k, v in ended.items() if k in (name, f"{name}-rerun", f"{name}-resume")}
        if f"{name}-resume" in continued:
            launches[f"{name}-resume (continued)"] = continued[f"{name}-resume"]
        r["returncodes"] = {k: v.returncode for k, v in launches.items()}
        cont = continued.get(f"{name}-resume")
        r["resumed_from_checkpoint"] = cont is not None and f"at step {half}" in cont.stderr + cont.stdout
        broken = [v for k, v in launches.items() if v.returncode != 0]
        if broken or cont is None:
            r["output_tail"] = tail("\n".join(v.stderr + v.stdout for v in broken), 1500)
            results[name] = r
            failures.append(name)
            ctx.record(models=results)
            continue
        a, a2, b = (checkpoint_state(ctx.workdir, x, n) for x in (name, f"{name}-rerun", f"{name}-resume"))
        r["weights_max_abs_diff_resume"] = max_abs_diff(a, b)
        r["weights_max_abs_diff_rerun"] = max_abs_diff(a, a2)
        ra, ra2, rb = (run_records(ctx.workdir, x) for x in (name, f"{name}-rerun", f"{name}-resume"))
        r["loss_max_abs_diff_after_resume"] = logged_loss_diff(ra, rb, after=half)
        r["loss_max_abs_diff_rerun"] = logged_loss_diff(ra, ra2)
        r["final_loss"] = {k: by_step(v).get(n, {}).get("loss") for k, v in
                           (("uninterrupted", ra), ("rerun", ra2), ("resumed", rb))}
        r["rerun_bitwise_equal"] = r["weights_max_abs_diff_rerun"] == 0.0
        r["resume_bitwise_equal"] = r["weights_max_abs_diff_resume"] == 0.0
        r["resume_ok"] = r["resumed_from_checkpoint"] and resume_verdict(
            r["weights_max_abs_diff_resume"], r["weights_max_abs_diff_rerun"])
        if not r["resume_ok"]:
            failures.append(name)
        results[name] = r
        ctx.record(models=results)
    if failures:
        raise StageError(f"save/resume does not match the uninterrupted run (or a run failed): {', '.join(failures)}")


def export_command(spec: RunSpec, workdir: Path, out: Path) -> list[str]:
    """``python -m vall_e.export`` of run ``spec``'s latest checkpoint to ``out``."""
    return [sys.executable, "-m", "vall_e.export", str(out), f"yaml=config/test/{spec.kind}.yml",
            f"ckpt_root={workdir / 'ckpts'}", f"name={spec.name}"]


def synth_command(ar: Path, nar: Path, out_wav: Path, device: str, max_ar_steps: int = 300) -> list[str]:
    """The synthesis CLI on ``device``: SYNTH_TEXT in the voice of data/test/test.wav (untrained codec)."""
    return [sys.executable, "-m", "vall_e", SYNTH_TEXT, str(REPO / "data" / "test" / "test.wav"), str(out_wav),
            "--ar-ckpt", str(ar), "--nar-ckpt", str(nar), "--device", device, "--seed", "0",
            "--max-ar-steps", str(max_ar_steps), "codec_weights=untrained"]


def stage_synth(ctx: StageContext) -> None:
    """Export the bf16 AR and NAR with the CLI, then synthesize one sentence on the device with the CLI."""
    specs = [s for s in _train_specs(ctx) if s.precision == "bf16"]
    todo = [s for s in specs if not run_finished(ctx.workdir, s)]
    if todo:
        ended = train_runs(todo, ctx.workdir, ctx.device, ctx.workdir / "out" / "synth_train")
        ctx.record(trained_here={k: v.returncode for k, v in ended.items()})
    zoo = ctx.workdir / "zoo"
    exports = {s.kind: export_command(s, ctx.workdir, zoo / f"{s.kind}.pt") for s in specs}
    ended = run_concurrently(exports, ctx.workdir / "out" / "export", subprocess_env())
    ctx.record(export_s={k: round(v.seconds, 1) for k, v in ended.items()},
               export_returncodes={k: v.returncode for k, v in ended.items()})
    bad = {k: v for k, v in ended.items() if v.returncode != 0}
    if bad:
        raise StageError("export failed: " + " | ".join(f"{k}: {error_line(v.stderr + v.stdout)}" for k, v in bad.items()))
    out_wav = ctx.workdir / "synth" / "out.wav"
    argv = synth_command(zoo / "ar.pt", zoo / "nar.pt", out_wav, ctx.device, max_ar_steps=50 if ctx.quick else 300)
    done = run_concurrently({"synth": argv}, ctx.workdir / "out" / "synth", subprocess_env())["synth"]
    parsed = parse_synth_stdout(done.stdout)
    if "reached --max-ar-steps" in done.stderr:
        parsed["cut_by"] = "max_ar_steps"
    elif "length guard fired" in done.stderr:
        parsed["cut_by"] = "length_guard"
    ctx.record(synth_process_s=round(done.seconds, 1), synth_returncode=done.returncode, **parsed,
               note="codec_weights=untrained: the audio is not speech")
    if done.returncode != 0 or not out_wav.is_file():
        raise StageError(f"synthesis failed: {error_line(done.stderr + done.stdout)}")
    import soundfile as sf

    info = sf.info(str(out_wav))
    ctx.record(wav_seconds=round(info.frames / info.samplerate, 3), wav_sample_rate=info.samplerate)
    if parsed.get("device") is not None and not parsed["device"].startswith(ctx.device.split(":")[0]):
        raise StageError(f"synthesis ran on {parsed['device']}, not {ctx.device}")


def random_batch(shapes: Sequence[Shape], device: str, seed: int = 0) -> tuple[list, list, list]:
    """Random (text, prompt, response) lists of these shapes on ``device``; phone ids 1..99."""
    import torch

    g = torch.Generator().manual_seed(seed)
    text = [torch.randint(1, 100, (s.text,), generator=g).to(device) for s in shapes]
    proms = [torch.randint(0, 1024, (s.prompt, 8), generator=g).to(device) for s in shapes]
    resps = [torch.randint(0, 1024, (s.resp, 8), generator=g).to(device) for s in shapes]
    return text, proms, resps


def _read_recipe(kind: str) -> dict[str, Any]:
    """batch_frames / batch_size / prompt_mode / model of config/LibriTTS/<kind>.yml (class defaults filled in)."""
    import yaml

    from vall_e.config import Config

    defaults = {f.name: f.default for f in dataclasses.fields(Config) if f.default is not dataclasses.MISSING}
    loaded = yaml.safe_load((REPO / "config" / "LibriTTS" / f"{kind}.yml").read_text()) or {}
    keys = ("batch_frames", "batch_size", "prompt_mode", "model")
    return {k: loaded.get(k, defaults.get(k)) for k in keys}


def stage_mfu(ctx: StageContext) -> None:
    """Training steps of the full presets at the recipes' budgets, bf16 autocast + fused AdamW: tokens/s and MFU."""
    import torch

    from vall_e.models import get_model

    name = torch.cuda.get_device_name() if ctx.cuda else "cpu"
    peak, peak_key = peak_bf16_flops(name) if ctx.cuda else (None, None)
    ctx.record(formula=FLOPS_FORMULA, device_name=name, peak_flops=peak,
               peak_source=f"{peak_key}: dense bf16 spec-sheet peak" if peak_key else "unknown GPU: FLOP/s only",
               precision="bf16 autocast, fp32 weights, torch AdamW(fused=True)" if ctx.cuda else "fp32 (CPU dry run)")
    warmup, timed = (1, 2) if ctx.quick else (2, 6)
    for kind in ("ar", "nar"):
        recipe = _read_recipe(kind)
        preset = f"{kind}-tiny" if ctx.quick else recipe["model"]
        budget = 2000 if ctx.quick else int(recipe["batch_frames"] or 0)
        torch.manual_seed(0)
        model = get_model(preset, arch=recipe.get("arch", "enhuiz")).to(ctx.device).train()
        cfg = model.config
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=ctx.cuda)
        results: dict[str, Any] = {"preset": preset, "batch_frames": budget, "batch_size": recipe["batch_size"],
                                   "prompt_mode": recipe["prompt_mode"], "arch": cfg.arch}
        for label, seconds in (("median", MEDIAN_SECONDS), ("long", LONG_SECONDS)):
            seconds = 1.0 if ctx.quick else seconds
            shape = recipe_shape(kind, recipe["prompt_mode"], seconds)
            rows = rows_for_budget(shape, budget, int(recipe["batch_size"]))
            text, proms, resps = random_batch([shape] * rows, ctx.device)

            def step() -> None:
                opt.zero_grad(set_to_none=True)
                with torch.autocast(ctx.device.split(":")[0], dtype=torch.bfloat16, enabled=ctx.cuda):
                    loss = model(text, proms, resps).loss
                loss.backward()
                opt.step()

            if ctx.cuda:
                torch.cuda.reset_peak_memory_stats()
            for _ in range(warmup):
                step()
            ctx.sync()
            t0 = time.perf_counter()
            for _ in range(timed):
                step()
            ctx.sync()
            step_s = (time.perf_counter() - t0) / timed
            scored = shape.resp + (1 if kind == "ar" else 0)
            flops = training_flops(cfg.n_layers, cfg.d_model, model.n_classes, shape.seq_len, scored, rows)
            results[label] = {
                "utterance_s": seconds, "rows": rows, "seq_len": shape.seq_len, "prompt_frames": shape.prompt,
                "resp_frames": shape.resp, "tokens_per_step": rows * shape.seq_len, "step_s": round(step_s, 5),
                "tokens_per_s": round(rows * shape.seq_len / step_s, 1),
                "resp_frames_per_s": round(rows * shape.resp / step_s, 1),
                "flops_per_step": flops, **utilization(flops, step_s, peak),
                "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if ctx.cuda else None,
            }
            ctx.record(**{kind: results})
        del model, opt
        if ctx.cuda:
            torch.cuda.empty_cache()


def profile_sdpa(fn: Callable[[], None], device: str) -> dict[str, Any]:
    """Run ``fn`` under ``torch.profiler`` and name the SDPA back ends and attention kernels it used."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    events = prof.key_averages()
    names = [e.key for e in events]
    kernels = [e.key for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    return {"backends": classify_sdpa(names), "ops": sorted({n for n in names if "scaled_dot_product" in n}),
            "kernels": attention_kernel_names(kernels)}


def sdpa_report(preset_suffix: str, device: str, quick: bool = False) -> dict[str, Any]:
    """SDPA back ends of AR/NAR training (forward + backward, padded batch) and AR decoding, bf16 and fp32.

    bf16 casts the weights, as DeepSpeed's bf16 mode does; ``nar_equal_lengths`` is a batch without
    padding (no attention mask), for comparison with the padded one.
    """
    import torch

    from vall_e.models import get_model

    out: dict[str, Any] = {}
    lengths = [Shape(20, 30, 40), Shape(30, 50, 60), Shape(25, 40, 80)] if quick else \
        [Shape(65, 225, 353), Shape(50, 225, 250), Shape(80, 225, 420)]
    # the paper core's AR trains with a prefix-LM mask (a different SDPA kernel than is_causal)
    models = (("ar", "enhuiz", "ar"), ("ar", "paper", "ar_paper"), ("nar", "enhuiz", "nar"))
    for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        for kind, arch, label in models:
            torch.manual_seed(0)
            model = get_model(f"{kind}{preset_suffix}", arch=arch).to(device=device, dtype=dtype).train()
            cases = {f"{label}_train": lengths}
            if kind == "nar":
                cases["nar_train_equal_lengths"] = [lengths[0]] * 3
            for case, shapes in cases.items():
                batch = random_batch(shapes, device)

                def train_step() -> None:
                    model.zero_grad(set_to_none=True)
                    model(*batch).loss.backward()

                train_step()  # warm-up: kernel selection and allocations outside the profile
                out[f"{case}_{dtype_name}"] = profile_sdpa(train_step, device)
            if label == "ar":
                text, proms, _ = random_batch(lengths[:1], device)
                model.eval()

                def decode() -> None:
                    model.generate(text, proms, max_steps=8, temperature=0.0, ignore_stop=True)

                decode()
                out[f"ar_decode_{dtype_name}"] = profile_sdpa(decode, device)
            del model
    return out


def stage_sdpa(ctx: StageContext) -> None:
    """Which SDPA kernel the full AR and NAR get (the quick dry run uses the tiny presets)."""
    ctx.record(preset="tiny" if ctx.quick else "full (1024 dim, 16 heads: head dim 64)")
    ctx.record(**sdpa_report("-tiny" if ctx.quick else "", ctx.device, ctx.quick))


def count_syncs(fn: Callable[[], Any], repo: Path = REPO, top: int = 10) -> tuple[int, list[tuple[str, int]]]:
    """Host syncs ``fn`` makes, by ``torch.cuda.set_sync_debug_mode("warn")``: (count, most frequent source lines).

    Each synchronizing CUDA call (``.item()``, a blocking copy, ``nonzero``, a boolean-mask gather...)
    raises one warning attributed to the Python line that made it.
    """
    import warnings
    from collections import Counter

    import torch

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    where: Counter[str] = Counter()
    for w in syncs:
        path = Path(w.filename)
        try:
            path = path.resolve().relative_to(repo)
        except ValueError:
            pass
        where[f"{path}:{w.lineno}"] += 1
    return len(syncs), where.most_common(top)


def stage_syncs(ctx: StageContext) -> None:
    """Host syncs per training step (quarter AR/NAR) and per decoded token (quarter AR, KV cache)."""
    if not ctx.cuda:
        ctx.record(note="sync debug mode needs CUDA: nothing measured on the CPU")
        return
    import torch

    from vall_e.models import get_model

    steps, tokens = 3, 64
    shapes = [Shape(40, 120, 150), Shape(55, 150, 200), Shape(30, 100, 120), Shape(60, 200, 260)]
    ctx.record(scope="model forward + backward + torch AdamW(fused=True) under bf16 autocast, inputs already on "
                     "the GPU; the trainer's own per-step reads and DeepSpeed's optimizer are not included",
               train_batch=len(shapes), steps_counted=steps, decode_tokens=tokens)
    for kind in ("ar", "nar"):
        torch.manual_seed(0)
        model = get_model(f"{kind}-quarter").cuda().train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        batch = random_batch(shapes, "cuda")

        def train_steps(n: int) -> None:
            for _ in range(n):
                opt.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(*batch).loss
                loss.backward()
                opt.step()

        train_steps(2)  # warm-up: optimizer state, cuBLAS handles
        n, where = count_syncs(lambda: train_steps(steps))
        ctx.record(**{f"{kind}_train_syncs_per_step": n / steps, f"{kind}_train_sync_sources": where})
        if kind == "ar":
            model.eval()
            text, proms, _ = random_batch(shapes[:1], "cuda")
            text4, proms4, _ = random_batch(shapes, "cuda")
            g = torch.Generator("cuda").manual_seed(0)
            runs = {
                "greedy_b1": lambda: model.generate(text, proms, max_steps=tokens, temperature=0.0, ignore_stop=True),
                "sampled_b1": lambda: model.generate(text, proms, max_steps=tokens, temperature=1.0, generator=g,
                                                     ignore_stop=True),
                "greedy_b4": lambda: model.generate(text4, proms4, max_steps=tokens, temperature=0.0, ignore_stop=True),
            }
            for label, fn in runs.items():
                fn()  # warm-up
                n, where = count_syncs(fn)
                ctx.record(**{f"ar_decode_{label}_syncs_per_token": n / tokens, f"ar_decode_{label}_sync_sources": where})
        del model, opt
        torch.cuda.empty_cache()


INTERNAL_STAGES: dict[str, Callable[[StageContext], None]] = {
    "deepspeed_ops": stage_deepspeed_ops,
    "train": stage_train,
    "resume": stage_resume,
    "synth": stage_synth,
    "mfu": stage_mfu,
    "sdpa": stage_sdpa,
    "syncs": stage_syncs,
}


def run_internal_stage(name: str, workdir: Path, device: str, quick: bool, result_file: Path) -> int:
    """``--stage NAME``: run one stage function here; its numbers go to ``result_file``. Exit 1 on failure."""
    ctx = StageContext(workdir, device, quick, result_file)
    ctx.record()
    try:
        INTERNAL_STAGES[name](ctx)
    except StageError as e:
        ctx.record(error=str(e))
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


# ==============================================================================================
# the orchestrator


@dataclasses.dataclass
class Stage:
    """A stage the orchestrator runs: a command, and how to read its numbers.

    ``parse(finished, result_file)`` returns the numbers (it may raise ``StageError`` to mark the
    stage failed).
    """

    name: str
    command: list[str]
    parse: Callable[[Finished, Path], dict[str, Any]]
    env: Optional[dict[str, str]] = None


def _parse_internal(finished: Finished, result_file: Path) -> dict[str, Any]:
    try:
        return json.loads(result_file.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _parse_last_json(finished: Finished, result_file: Path) -> dict[str, Any]:
    found = last_json_object(finished.stdout)
    if found is None and finished.returncode == 0:
        raise StageError("the command printed no JSON object")
    return found or {}


def _parse_pytest(finished: Finished, result_file: Path) -> dict[str, Any]:
    numbers = parse_pytest_summary(finished.stdout + "\n" + finished.stderr)
    if finished.returncode not in (0, None) and not numbers["failed"] and not numbers["errors"]:
        # e.g. exit 5 (nothing collected) or a collection crash
        numbers["note"] = f"pytest exited {finished.returncode}"
    return numbers


def run_stage(stage: Stage, cap: float, work: Path) -> dict[str, Any]:
    """Run one stage under ``cap`` seconds; its result entry for the JSON."""
    result_file = work / "results" / f"{stage.name}.json"
    result_file.parent.mkdir(parents=True, exist_ok=True)
    command = [w.replace("{result_file}", str(result_file)) for w in stage.command]
    t0 = time.time()
    finished = run_capped(command, cap, work / "logs" / stage.name, env=stage.env)
    seconds = time.time() - t0
    entry: dict[str, Any] = {"status": "ok", "seconds": round(seconds, 1), "cap_s": cap,
                             "command": " ".join(_shorten(w) for w in command)}
    error = None
    try:
        numbers = stage.parse(finished, result_file)
    except StageError as e:
        numbers, error = _parse_internal(finished, result_file), str(e)
    entry["numbers"] = numbers
    if finished.timed_out:
        entry["status"] = "timeout"
        entry["error"] = f"killed at its {cap:g} s cap"
    elif finished.returncode != 0 or error is not None:
        entry["status"] = "failed"
        entry["error"] = error or numbers.pop("error", None) or f"exit status {finished.returncode}"
    numbers.pop("error", None)
    if entry["status"] != "ok":
        entry["output_tail"] = tail(finished.stderr.rstrip() + "\n--- stdout ---\n" + finished.stdout.rstrip())
    return entry


def _shorten(word: str) -> str:
    return word.replace(str(REPO) + os.sep, "").replace(sys.executable, "python")


def build_stages(names: Sequence[str], workdir: Path, device: str, quick: bool) -> list[Stage]:
    """The Stage objects for ``names`` (in run order)."""
    py, me = sys.executable, str(Path(__file__).resolve())
    env = subprocess_env()
    stages = []
    for name in names:
        if name in INTERNAL_STAGES:
            cmd = [py, me, "--stage", name, "--workdir", str(workdir), "--device", device,
                   "--result-file", "{result_file}"] + (["--quick"] if quick else [])
            stages.append(Stage(name, cmd, _parse_internal, env=env))
        elif name == "pytest":
            cmd = [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"]
            stages.append(Stage(name, cmd, _parse_pytest, env=env))
        elif name == "benchmark":
            cmd = [py, "scripts/benchmark.py", "--device", device]
            cmd += ["--preset", "tiny", "--quick"] if quick else ["--preset", "full"]
            stages.append(Stage(name, cmd, _parse_last_json, env=env))
        elif name == "qnt":
            cmd = [py, "scripts/bench_qnt.py", "--device", device, "--compare-cpu", "--skip-memory",
                   "--codec-weights", "untrained", "--workdir", str(workdir / "qnt"),
                   "--seconds", "5" if quick else "60"]
            stages.append(Stage(name, cmd, _parse_last_json, env=env))
        else:  # pragma: no cover - STAGE_NAMES and this function are kept in step
            raise ValueError(name)
    return stages


def run_stages(stages: Sequence[Stage], caps: dict[str, float], work: Path, all_names: Sequence[str] = (),
               progress: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
               ) -> dict[str, dict[str, Any]]:
    """Run ``stages`` one after the other; names in ``all_names`` that are not among them are ``skipped``."""
    results: dict[str, dict[str, Any]] = {}
    selected = {s.name for s in stages}
    order = list(all_names) or [s.name for s in stages]
    by_name = {s.name: s for s in stages}
    for i, name in enumerate(order, 1):
        if name not in selected:
            results[name] = {"status": "skipped", "seconds": 0.0, "numbers": {}, "reason": "not selected by --only"}
            continue
        progress(f"[gpu_check] {i}/{len(order)} {name}: running (cap {caps[name]:g} s)")
        results[name] = run_stage(by_name[name], caps[name], work)
        r = results[name]
        progress(f"[gpu_check] {i}/{len(order)} {name}: {r['status']} in {r['seconds']:.1f} s"
                 + (f" ({error_line(str(r.get('error')), 200)})" if r["status"] != "ok" else ""))
    return results


def environment(device: str) -> dict[str, Any]:
    """GPU, versions, date, commit: the header of the report."""
    import platform
    from importlib import metadata

    import torch

    env: dict[str, Any] = {"date": datetime.now().astimezone().isoformat(timespec="seconds")}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_count=torch.cuda.device_count(), gpu_memory_gb=round(props.total_memory / 2**30, 1),
                   compute_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), bf16_supported=torch.cuda.is_bf16_supported())
    else:
        env.update(gpu=None, device=f"{device} (a dry run of this script: the numbers mean nothing)")
    env["torch"] = torch.__version__
    for dist in ("deepspeed", "torchaudio", "encodec"):
        try:
            env[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            env[dist] = None
    env["python"] = platform.python_version()
    env["cpu_count"] = os.cpu_count()
    env["driver"] = _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    env["git_commit"] = _command_output(["git", "rev-parse", "--short", "HEAD"])
    env["git_dirty"] = bool(_command_output(["git", "status", "--porcelain", "--untracked-files=no"]))
    return env


def _command_output(argv: list[str]) -> Optional[str]:
    try:
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip().splitlines()[0] if proc.returncode == 0 and proc.stdout.strip() else None


def copy_logs(workdir: Path, dest: Path, max_bytes: int = 2 * 2**20) -> int:
    """Copy the text logs of a run (stage output, training ``log.txt``, per-run output) from ``workdir`` to
    ``dest``, keeping their relative paths; files over ``max_bytes`` are skipped. Returns how many were copied."""
    n = 0
    for path in sorted(workdir.rglob("*")):
        if path.is_file() and path.suffix in (".out", ".err", ".txt", ".json") and path.stat().st_size <= max_bytes \
                and "data" not in path.relative_to(workdir).parts[:1]:
            target = dest / path.relative_to(workdir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            n += 1
    return n


def default_out(gpu_name: str, when: datetime) -> Path:
    """``benchmarks/gpu_check-<gpu slug>-<date>.json``; a second run that day adds the time."""
    path = REPO / "benchmarks" / f"gpu_check-{slug(gpu_name)}-{when:%Y-%m-%d}.json"
    return path if not path.exists() else path.with_name(f"{path.stem}-{when:%H%M%S}.json")


def cuda_problem() -> Optional[str]:
    """None when torch sees a CUDA GPU, else the one line to print."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torch

            ok = torch.cuda.is_available()
    except Exception as e:  # a broken install: say so in one line too
        return f"gpu_check needs torch with CUDA, and torch cannot be used here ({type(e).__name__}: {e})"
    if ok:
        return None
    return ("gpu_check needs a CUDA GPU and torch sees none here (no GPU, no driver, CUDA_VISIBLE_DEVICES "
            "hides it, or a CPU-only torch); run it on a GPU machine")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python scripts/gpu_check.py", description=__doc__.split("\n\n")[0],
                                epilog=f"stages: {', '.join(STAGE_NAMES)}")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here (default benchmarks/gpu_check-<gpu>-<date>.json)")
    p.add_argument("--stage-timeout", default=None, metavar="S | NAME=S,...",
                   help="cap every stage at S seconds, or only the named ones (defaults: "
                        + ", ".join(f"{k}={v:g}" for k, v in DEFAULT_TIMEOUTS.items()) + ")")
    p.add_argument("--only", default=None, metavar="STAGE,...", help="run only these stages (the others are 'skipped')")
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep runs, checkpoints and logs here (default: a temporary folder, removed); "
                        "training runs already finished in it are reused")
    p.add_argument("--logs", type=Path, default=None,
                   help="copy every stage's output and the training logs (text only) into this folder")
    p.add_argument("--device", default="cuda", help="cuda (default); cpu only to dry-run this script with --quick")
    p.add_argument("--quick", action="store_true", help="tiny sizes everywhere (a dry run of the script; numbers mean nothing)")
    p.add_argument("--stage", choices=sorted(INTERNAL_STAGES), default=None, help=argparse.SUPPRESS)
    p.add_argument("--result-file", type=Path, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.stage is not None:  # one stage, inside the orchestrator's subprocess
        if args.workdir is None or args.result_file is None:
            parser.error("--stage needs --workdir and --result-file")
        sys.path.insert(0, str(REPO))
        return run_internal_stage(args.stage, args.workdir, args.device, args.quick, args.result_file)
    try:
        names = parse_only(args.only)
        caps = parse_timeouts(args.stage_timeout, DEFAULT_TIMEOUTS)
    except ValueError as e:
        parser.error(str(e))
    if args.device.startswith("cuda"):
        problem = cuda_problem()
        if problem is not None:
            print(problem, file=sys.stderr)
            return 2
    elif not args.quick:
        parser.error("--device cpu is a dry run of the script: add --quick")

    started = time.time()
    env = environment(args.device)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    workdir.mkdir(parents=True, exist_ok=True)
    env.update(workdir=str(workdir) if args.workdir else None, stage_caps_s=caps,
               selected=names, quick=args.quick)
    try:
        stages = build_stages(names, workdir, args.device, args.quick)
        results = run_stages(stages, caps, workdir, STAGE_NAMES)
    finally:
        if args.logs is not None:
            print(f"[gpu_check] copied {copy_logs(workdir, args.logs)} log file(s) to {args.logs}", file=sys.stderr)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report = build_report(env, results, started)
    out = args.out or default_out(env.get("gpu") or args.device, datetime.now())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dumps(report, indent=1) + "\n")
    print(dumps(report))
    print(f"[gpu_check] wrote {out}; {report['stages_ok']} stage(s) ok, not ok: {report['stages_not_ok'] or 'none'}",
          file=sys.stderr)
    return 0 if not report["stages_not_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
