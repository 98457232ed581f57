"""CUDA checks, run with ``pytest -m gpu`` on a GPU machine; skipped without CUDA.

Training, resume, export and synthesis go through the real CLIs (``python -m vall_e.train`` with a
DeepSpeed engine on NCCL, ``vall_e.export``, ``python -m vall_e``) on data/test with the smoke
recipes, using the run helpers of ``scripts/gpu_check.py``. The trainings are shared: one
module fixture starts them all side by side (the quarter AR and NAR in bf16 and fp16, a rerun and
a half run of the bf16 AR), so each test stays well under a minute on an H200.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

from conftest import load_script

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

STEPS = 30  # training steps per run; the half run stops at STEPS // 2 and is resumed
TRAIN_TIMEOUT_S = 240


def load_gpu_check() -> ModuleType:
    """``scripts/gpu_check.py`` as a module."""
    return load_script("gpu_check")


@pytest.fixture(scope="module")
def gc() -> ModuleType:
    return load_gpu_check()


@pytest.fixture(scope="module")
def runs(gc, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Every training this module checks, trained once: {name: Finished} of each launch."""
    work = tmp_path_factory.mktemp("gpu_runs")
    common = dict(max_iter=STEPS, save_every=STEPS // 2, log_every=1, eval_ar_steps=20)
    specs = {f"{k}-{p}": gc.RunSpec(f"{k}-{p}", k, p, **common) for p in ("bf16", "fp16") for k in ("ar", "nar")}
    specs["ar-bf16-rerun"] = gc.RunSpec("ar-bf16-rerun", "ar", "bf16", **common)
    half = gc.RunSpec("ar-bf16-resume", "ar", "bf16", stop_at=STEPS // 2, **common)
    first = gc.train_runs([*specs.values(), half], work, "cuda", work / "out" / "first", timeout=TRAIN_TIMEOUT_S)
    continued = {}
    if first["ar-bf16-resume"].returncode == 0:
        rest = gc.RunSpec("ar-bf16-resume", "ar", "bf16", **common)
        continued = gc.train_runs([rest], work, "cuda", work / "out" / "continued", timeout=TRAIN_TIMEOUT_S)
    return SimpleNamespace(work=work, specs=specs, first=first, continued=continued)


def assert_ran(finished, what: str) -> None:
    assert finished is not None and finished.returncode == 0, (
        f"{what} failed (exit {None if finished is None else finished.returncode}):\n"
        f"{'' if finished is None else (finished.stderr + finished.stdout)[-4000:]}"
    )


@pytest.mark.parametrize("name", ["ar-bf16", "nar-bf16", "ar-fp16", "nar-fp16"])
def test_training_loss_is_finite_and_falls(gc, runs, name):
    assert_ran(runs.first[name], f"training {name}")
    summary = gc.loss_summary(gc.run_records(runs.work, name))
    assert summary["last_step"] == STEPS and summary["logged_steps"] == STEPS, summary
    assert summary["all_finite"], summary
    assert summary["loss_fell"], summary
    out = runs.first[name].stderr + runs.first[name].stdout
    assert gc.precision_used(out) == name.split("-")[1], "DeepSpeed did not train in the precision asked for"


def test_save_and_resume_match_the_uninterrupted_run(gc, runs):
    for name in ("ar-bf16", "ar-bf16-rerun", "ar-bf16-resume"):
        assert_ran(runs.first[name], f"training {name}")
    cont = runs.continued.get("ar-bf16-resume")
    assert_ran(cont, "resuming ar-bf16-resume")
    assert f"at step {STEPS // 2}" in cont.stderr + cont.stdout, "the second launch did not resume from the checkpoint"
    a, rerun, resumed = (gc.checkpoint_state(runs.work, n, STEPS) for n in ("ar-bf16", "ar-bf16-rerun", "ar-bf16-resume"))
    diff_resume, diff_rerun = gc.max_abs_diff(a, resumed), gc.max_abs_diff(a, rerun)
    assert gc.resume_verdict(diff_resume, diff_rerun), (
        f"resumed weights differ from the uninterrupted run's by {diff_resume:g}, an identical rerun by {diff_rerun:g}"
    )
    records = {n: gc.run_records(runs.work, n) for n in ("ar-bf16", "ar-bf16-rerun", "ar-bf16-resume")}
    loss_resume = gc.logged_loss_diff(records["ar-bf16"], records["ar-bf16-resume"], after=STEPS // 2)
    loss_rerun = gc.logged_loss_diff(records["ar-bf16"], records["ar-bf16-rerun"])
    assert loss_resume is not None and loss_rerun is not None
    assert gc.resume_verdict(loss_resume, loss_rerun), (loss_resume, loss_rerun)


def test_export_and_synthesis_on_cuda(gc, runs, tmp_path):
    for name in ("ar-bf16", "nar-bf16"):
        assert_ran(runs.first[name], f"training {name}")
    zoo = tmp_path / "zoo"
    exports = {k: gc.export_command(runs.specs[f"{k}-bf16"], runs.work, zoo / f"{k}.pt") for k in ("ar", "nar")}
    done = gc.run_concurrently(exports, tmp_path / "out", gc.subprocess_env(), timeout=120)
    for kind, finished in done.items():
        assert_ran(finished, f"export of the {kind}")
    wav = tmp_path / "out.wav"
    argv = gc.synth_command(zoo / "ar.pt", zoo / "nar.pt", wav, "cuda", max_ar_steps=200)
    synth = gc.run_concurrently({"synth": argv}, tmp_path / "out", gc.subprocess_env(), timeout=120)["synth"]
    assert_ran(synth, "synthesis")
    parsed = gc.parse_synth_stdout(synth.stdout)
    assert parsed.get("device", "").startswith("cuda"), synth.stdout
    assert parsed["sample_rate"] == 24_000 and parsed["output_s"] > 0

    import soundfile as sf

    info = sf.info(str(wav))
    assert info.samplerate == 24_000 and info.frames > 0
    data, _ = sf.read(str(wav), dtype="float32")
    assert bool(torch.isfinite(torch.from_numpy(data)).all())


@pytest.fixture
def full_fp32_matmuls():
    """fp32 means fp32 here (no TF32), whatever the process default is; restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# Logit gaps (top-1 minus top-2) below which two correct implementations may pick different codes:
# rounding of the dtype through 12 layers (bf16 keeps 8 bits of mantissa).
GAP_TOLERANCE = {"bf16": 0.125, "fp32": 1e-3}


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_cached_greedy_decoding_equals_uncached(gc, dtype, full_fp32_matmuls):
    """The KV-cached decoder computes what recomputing the whole sequence computes, on CUDA.

    Greedy codes must agree wherever the choice is clear: compared with teacher-forced logits of the
    cached codes (one uncached forward), and with uncached generation up to its first divergence,
    which may only happen at a near tie. A padded batch of two covers the cache's padding masks.
    """
    from vall_e.models import get_model

    torch.manual_seed(0)
    model = get_model("ar-quarter").cuda().to({"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]).eval()
    text, proms, _ = gc.random_batch([gc.Shape(30, 150, 0), gc.Shape(45, 90, 0)], "cuda", seed=1)
    steps, tol = 48, GAP_TOLERANCE[dtype]
    cached = model.generate(text, proms, max_steps=steps, temperature=0.0, ignore_stop=True)
    uncached = model.generate(text, proms, max_steps=steps, temperature=0.0, ignore_stop=True, use_cache=False)
    with torch.inference_mode():
        forced = model.logits(text, proms, cached)
    clear_positions = 0
    for i, (c, u, logits) in enumerate(zip(cached, uncached, forced)):
        assert len(c) == len(u) == steps
        top = logits[:steps, : model.stop_token].float().topk(2, dim=-1)  # row k predicts code k; stop was masked
        gap = top.values[:, 0] - top.values[:, 1]
        clear = gap > tol
        clear_positions += int(clear.sum())
        wrong = clear & (top.indices[:, 0] != c)
        assert not bool(wrong.any()), f"sample {i}: cached codes disagree with recomputed logits at {wrong.nonzero().flatten().tolist()}"
        differ = (c != u).nonzero().flatten()
        if len(differ):
            k = int(differ[0])
            assert float(gap[k]) <= tol, f"sample {i}: cached and uncached decoding part at step {k}, gap {float(gap[k]):.4f}"
    assert clear_positions >= steps // 4, "too few clear choices to check anything"


def test_sdpa_is_not_math_for_bf16_ar_training(gc):
    """bf16 AR training (weights cast, as DeepSpeed's bf16 mode does) gets a fused attention kernel."""
    from vall_e.models import get_model

    torch.manual_seed(0)
    model = get_model("ar-quarter").cuda().to(torch.bfloat16).train()
    batch = gc.random_batch([gc.Shape(40, 120, 150), gc.Shape(55, 150, 200), gc.Shape(30, 100, 120)], "cuda")

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(*batch).loss.backward()

    step()
    found = gc.profile_sdpa(step, "cuda")
    assert found["backends"] and "math" not in found["backends"], found
