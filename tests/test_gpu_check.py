"""``scripts/gpu_check.py`` on the CPU: the no-GPU exit, its stage runner (caps, kills, JSON) and its
pure helpers (log parsing, FLOPs/MFU, summaries, command lines the project's CLIs accept)."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch

from conftest import load_script

REPO = Path(__file__).resolve().parents[1]


def load_gpu_check() -> ModuleType:
    """``scripts/gpu_check.py`` as a module."""
    return load_script("gpu_check")


gc = load_gpu_check()


def run_script(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_without_cuda_it_says_so_in_one_line_and_exits_2():
    proc = run_script(env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2
    out = (proc.stdout + proc.stderr).strip()
    assert len(out.splitlines()) == 1 and "CUDA GPU" in out, out
    assert "Traceback" not in out


def test_usage_errors_exit_2():
    proc = run_script("--only", "train,nope", env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and "unknown stage(s) nope" in proc.stderr
    proc = run_script("--device", "cpu", env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and "--quick" in proc.stderr


# ----------------------------------------------------------------------------------------------
# the stage runner


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def test_a_stage_past_its_cap_is_a_timeout_and_the_next_stages_still_run(tmp_path):
    pid_file = tmp_path / "child.pid"
    hang = _py(
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(120)\n"
    )
    partial = _py("import json, sys, time; open(sys.argv[1], 'w').write(json.dumps({'measured': 1.5})); time.sleep(120)")
    partial.append("{result_file}")
    stages = [
        gc.Stage("hang", hang, gc._parse_last_json),
        gc.Stage("partial", partial, gc._parse_internal),
        gc.Stage("fine", _py("import json; print('noise'); print(json.dumps({'x': 1, 'y': [2, 3]}))"), gc._parse_last_json),
        gc.Stage("broken", _py("import sys; print('error: the thing broke', file=sys.stderr); sys.exit(3)"),
                 gc._parse_last_json),
    ]
    caps = {"hang": 2.0, "partial": 2.0, "fine": 60.0, "broken": 60.0}
    lines: list[str] = []
    started = time.time()
    results = gc.run_stages(stages, caps, tmp_path, ["hang", "partial", "fine", "broken", "unselected"], lines.append)

    hung = results["hang"]
    assert hung["status"] == "timeout" and "2 s cap" in hung["error"]
    assert 2.0 <= hung["seconds"] < 2.0 + gc.KILL_GRACE_S + 5
    assert "started" in hung["output_tail"]
    child = int(pid_file.read_text())
    deadline = time.time() + 5
    while _alive(child) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the stage's child process outlived the stage"

    assert results["partial"]["status"] == "timeout" and results["partial"]["numbers"] == {"measured": 1.5}
    assert results["fine"] == {**results["fine"], "status": "ok", "numbers": {"x": 1, "y": [2, 3]}}
    assert "output_tail" not in results["fine"]
    broken = results["broken"]
    assert broken["status"] == "failed" and broken["error"] == "exit status 3"
    assert "the thing broke" in broken["output_tail"]
    assert results["unselected"]["status"] == "skipped"
    assert len(lines) == 8 and lines[1].startswith("[gpu_check] 1/5 hang: timeout")

    report = gc.build_report({"gpu": "test"}, results, started)
    assert report["stages_ok"] == 1 and report["stages_not_ok"] == ["broken", "hang", "partial"]
    text = gc.dumps({**report, "nan": math.nan, "inf": [math.inf]})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))["inf"] == ["inf"]
    assert list(report["stages"]) == ["hang", "partial", "fine", "broken", "unselected"]


def test_a_failing_internal_stage_reports_its_error_and_numbers(tmp_path):
    stage = gc.Stage("train", _py(
        "import json, sys; open(sys.argv[1], 'w').write(json.dumps({'runs': 4, 'error': 'loss did not fall'})); sys.exit(1)"
    ) + ["{result_file}"], gc._parse_internal)
    entry = gc.run_stage(stage, 60.0, tmp_path)
    assert entry["status"] == "failed" and entry["error"] == "loss did not fall" and entry["numbers"] == {"runs": 4}


def test_an_internal_stage_runs_end_to_end_on_the_cpu(tmp_path):
    """The whole path once: main -> stage subprocess -> result file -> the one JSON (sdpa, tiny, CPU)."""
    out = tmp_path / "report.json"
    proc = run_script("--device", "cpu", "--quick", "--only", "sdpa", "--out", str(out), "--logs", str(tmp_path / "logs"),
                      timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())
    assert printed["torch"] == torch.__version__ and printed["date"] and "deepspeed" in printed
    sdpa = printed["stages"]["sdpa"]
    assert sdpa["status"] == "ok", sdpa
    assert sdpa["numbers"]["ar_train_fp32"]["backends"]  # some SDPA back end was seen
    assert {k for k, v in printed["stages"].items() if v["status"] == "skipped"} == set(gc.STAGE_NAMES) - {"sdpa"}
    assert "[gpu_check] 8/10 sdpa: ok" in proc.stderr
    assert json.loads((tmp_path / "logs" / "results" / "sdpa.json").read_text()) == sdpa["numbers"]
    assert (tmp_path / "logs" / "logs" / "sdpa.err").is_file()


def test_copy_logs_keeps_text_logs_only(tmp_path):
    work = tmp_path / "w"
    for rel, size in (("logs/train.out", 10), ("logs/ar-bf16/t0/log.txt", 10), ("ckpts/ar/global_step2/x.pt", 10),
                      ("data/test/test.phn.txt", 10), ("out/big.err", 3 * 2**20)):
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_bytes(b"x" * size)
    assert gc.copy_logs(work, tmp_path / "copy") == 2
    assert sorted(str(p.relative_to(tmp_path / "copy")) for p in (tmp_path / "copy").rglob("*") if p.is_file()) == \
        ["logs/ar-bf16/t0/log.txt", "logs/train.out"]


# ----------------------------------------------------------------------------------------------
# options


def test_stage_timeouts_and_selection():
    assert sum(gc.DEFAULT_TIMEOUTS.values()) < 8 * 60
    assert gc.parse_timeouts(None, gc.DEFAULT_TIMEOUTS) == gc.DEFAULT_TIMEOUTS
    assert set(gc.parse_timeouts("90", gc.DEFAULT_TIMEOUTS).values()) == {90.0}
    caps = gc.parse_timeouts("train=200, qnt=5.5", gc.DEFAULT_TIMEOUTS)
    assert caps["train"] == 200 and caps["qnt"] == 5.5 and caps["mfu"] == gc.DEFAULT_TIMEOUTS["mfu"]
    for bad in ("train=abc", "nope=3", "-1"):
        with pytest.raises(ValueError):
            gc.parse_timeouts(bad, gc.DEFAULT_TIMEOUTS)
    assert gc.parse_only("qnt, train") == ["train", "qnt"]  # run order, not typed order
    assert gc.parse_only(None) == gc.STAGE_NAMES


# ----------------------------------------------------------------------------------------------
# parsing what the commands print


def _real_log_lines(records: list[dict]) -> str:
    """Lines exactly as training writes them: the trainer's ``log_stats`` through the project's log format."""
    from vall_e.utils import helpers, trainer

    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logging.Formatter(helpers._LOG_FORMAT))
    logger = logging.getLogger(trainer.__name__)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logger.info("training from step 0 to max_iter=%d", 10)
        for rec in records:
            trainer.log_stats(rec)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return buf.getvalue()


def test_training_logs_parse_into_a_loss_summary():
    train = [{"split": "train", "step": s, "loss": 7.0 - 0.1 * s, "grad_norm": 2.0 + s, "lr": 1e-4 * s,
              "step_s": 0.5, "frames_per_s": 100.0 + s, "acc": 0.01 * s, "nonfinite_losses": 0.0} for s in range(1, 11)]
    evals = [{"split": "subtrain", "step": 10, "loss": 1.0}]
    text = _real_log_lines(train + evals) + "a plain line {not json}\n"
    records = gc.parse_train_log(text)
    assert [r["step"] for r in records] == list(range(1, 11))
    assert gc.parse_train_log(text, "subtrain") == evals
    s = gc.loss_summary(records)
    assert s["first_loss"] == pytest.approx(6.9) and s["last_loss"] == pytest.approx(6.0)
    assert s["loss_fell"] and s["all_finite"] and s["logged_steps"] == 10 and (s["first_step"], s["last_step"]) == (1, 10)
    assert s["first_grad_norm"] == 3.0 and s["last_grad_norm"] == 12.0 and s["median_frames_per_s"] == 106.0

    rising = [{**r, "loss": 5.0 + 0.1 * r["step"]} for r in train]
    assert not gc.loss_summary(rising)["loss_fell"]
    broken = [{**r, "loss": math.nan if r["step"] == 10 else r["loss"]} for r in train]
    s = gc.loss_summary(gc.parse_train_log(_real_log_lines(broken)))
    assert not s["all_finite"] and not s["loss_fell"]
    assert gc.loss_summary([]) == {"logged_steps": 0, "loss_fell": False, "all_finite": False}

    # a resumed run logs its later steps again: the last record of a step counts
    again = train + [{**train[-1], "loss": 1.0}]
    assert gc.by_step(again)[10]["loss"] == 1.0
    assert gc.logged_loss_diff(train, again, after=5) == pytest.approx(5.0)
    assert gc.logged_loss_diff(train, train, after=10) is None


def test_precision_skipped_steps_and_resume_verdict():
    assert gc.precision_used("x - vall_e.utils.engines - INFO - training precision: bf16") == "bf16"
    assert gc.precision_used("running on cpu: mixed precision is turned off, training in fp32") == "fp32"
    assert gc.precision_used("nothing said") is None
    per_step = gc.TRAIN_WARMUP_MAX_LR / gc.TRAIN_WARMUP_STEPS
    assert gc.skipped_steps(1e-6 + 55 * per_step, 1e-6 + 60 * per_step, per_step) == 5
    assert gc.resume_verdict(0.0, 0.0) and not gc.resume_verdict(1e-7, 0.0)
    assert gc.resume_verdict(0.01, 0.002) and not gc.resume_verdict(0.05, 0.002)


def test_pytest_summaries():
    out = ("..F.s\n=========================== short test summary info ============================\n"
           "FAILED tests/test_gpu.py::test_qnt_cuda_codes_match_cpu - AssertionError: {'codebook1': 0.9}\n"
           "ERROR tests/test_gpu.py::test_x - RuntimeError: boom\n"
           "3 passed, 1 failed, 2 skipped, 120 deselected, 1 error in 41.20s\n")
    s = gc.parse_pytest_summary(out)
    assert (s["passed"], s["failed"], s["skipped"], s["deselected"], s["errors"]) == (3, 1, 2, 120, 1)
    assert s["failures"] == ["tests/test_gpu.py::test_qnt_cuda_codes_match_cpu", "tests/test_gpu.py::test_x"]
    none = gc.parse_pytest_summary("\n151 deselected in 3.10s\n")
    assert none["deselected"] == 151 and none["passed"] == 0 and none["summary_found"]
    assert not gc.parse_pytest_summary("Traceback (most recent call last):\n")["summary_found"]


def test_synthesis_output_and_error_lines():
    out = "/tmp/x/out.wav  2.35 s at 24000 Hz, real-time factor 0.123 (cuda:0, seed 0)\n"
    assert gc.parse_synth_stdout(out) == {"output_s": 2.35, "sample_rate": 24000, "real_time_factor": 0.123,
                                          "device": "cuda:0", "seed": 0}
    assert gc.parse_synth_stdout("nothing") == {}
    assert gc.error_line("note: a\nerror: the text has phones\nmore") == "error: the text has phones"
    assert gc.error_line("x\nRuntimeError: CUDA out of memory\n") == "RuntimeError: CUDA out of memory"
    assert gc.error_line("") == "(no output)"
    assert gc.last_json_object('{"a": 1}\n{"b": 2}\nwarning: x\n{broken\n') == {"b": 2}


def test_sdpa_back_ends_from_profiler_names():
    names = ["aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention",
             "aten::_scaled_dot_product_flash_attention_backward", "void pytorch_flash::flash_fwd_kernel<...>"]
    assert gc.classify_sdpa(names) == ["flash"]
    assert gc.classify_sdpa(["aten::_scaled_dot_product_efficient_attention",
                             "aten::_scaled_dot_product_attention_math"]) == ["efficient", "math"]
    assert gc.classify_sdpa(["aten::_scaled_dot_product_cudnn_attention", "cudnn_generated_fort_native_sdpa_flash"]) == ["cudnn"]
    assert gc.classify_sdpa(["aten::_scaled_dot_product_flash_attention_for_cpu"]) == ["flash"]
    assert gc.classify_sdpa(["aten::mm", "aten::softmax"]) == []
    kernels = gc.attention_kernel_names(["aten::_scaled_dot_product_flash_attention", "fmha_cutlassF_bf16_aligned_64x64",
                                         "ampere_bf16_s16816gemm", "fmha_cutlassF_bf16_aligned_64x64"])
    assert kernels == ["fmha_cutlassF_bf16_aligned_64x64"]


def test_weight_differences():
    x = {"w": torch.zeros(2, 2), "b": torch.ones(3, dtype=torch.bfloat16)}
    y = {"w": torch.tensor([[0.0, -0.25], [0.0, 0.0]]), "b": torch.ones(3, dtype=torch.bfloat16)}
    assert gc.max_abs_diff(x, x) == 0.0 and gc.max_abs_diff(x, y) == 0.25
    assert gc.max_abs_diff(x, {"w": x["w"]}) == math.inf


# ----------------------------------------------------------------------------------------------
# FLOPs and MFU


def test_training_flops_formula_matches_the_model():
    # 6 * N_body * T + 6 * d * classes * scored + 12 * layers * d * T^2, per row
    n_body = 12 * 2 * 4**2
    per_row = 6 * n_body * 10 + 6 * 4 * 5 * 3 + 12 * 2 * 4 * 10**2
    assert gc.training_flops(n_layers=2, d_model=4, n_classes=5, seq_len=10, scored=3, rows=2) == 2 * per_row

    from vall_e.models import get_model

    for preset in ("ar-tiny", "nar-tiny"):
        model = get_model(preset)
        cfg = model.config
        matmul_weights = sum(m.weight.numel() for block in model.blocks
                             for m in (block.attn.qkv, block.attn.proj, block.fc1, block.fc2))
        assert matmul_weights == 12 * cfg.n_layers * cfg.d_model**2, "the FLOP formula's N_body no longer fits the blocks"
        assert model.classifier.weight.numel() == cfg.d_model * model.n_classes


def test_recipe_batches_and_utilization():
    shape = gc.recipe_shape("ar", "paper", gc.MEDIAN_SECONDS)
    assert shape.prompt == 0 and shape.resp == round(4.7 * 75) and shape.text == round(4.7 * 13.5) + 2
    assert shape.seq_len == shape.text + shape.resp + 2
    assert gc.recipe_shape("nar", "paper", 10.0).prompt == 225  # 3 s ...
    assert gc.recipe_shape("nar", "paper", 2.0).prompt == 75  # ... at most half the utterance
    assert gc.recipe_shape("ar", "speaker", 4.0).prompt == 300
    rows = gc.rows_for_budget(shape, 20_000, 32)
    assert rows * shape.seq_len <= 20_000 < (rows + 1) * shape.seq_len  # the padded budget is never exceeded
    assert gc.rows_for_budget(shape, 0, 32) == 32
    for kind in ("ar", "nar"):
        recipe = gc._read_recipe(kind)
        assert recipe["batch_frames"] > 0 and recipe["model"] == kind and recipe["prompt_mode"] in ("paper", "speaker")

    u = gc.utilization(flops_per_step=989.4e12 * 0.5, step_s=1.0, peak_flops=989.4e12)
    assert u == {"achieved_tflops": 494.7, "mfu": 0.5}
    assert gc.utilization(2e12, 0.5, None) == {"achieved_tflops": 4.0, "mfu": None}


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H200", 989.4e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA H100 80GB HBM3", 989.4e12),
    ("NVIDIA H100 PCIe", 756e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12),
    ("NVIDIA A10G", 70e12), ("NVIDIA A10", 125e12), ("Tesla T4", None),
])
def test_peak_flops_by_device_name(name, peak):
    assert gc.peak_bf16_flops(name)[0] == peak


# ----------------------------------------------------------------------------------------------
# the command lines the stages run are ones the project's CLIs accept


def test_training_words_are_config_fields_with_the_intended_values(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the stages run from the repository root (relative yaml= paths)
    from vall_e.config import Config
    from vall_e.utils.engines import precision

    for precision_name in ("bf16", "fp16"):
        spec = gc.RunSpec("ar-x", "ar", precision_name, max_iter=60, save_every=30, stop_at=30)
        words = gc.train_words(spec, tmp_path, "cpu")
        assert words == Config.split_argv(words)[0]  # every word is a config word
        cfg = Config.parse(words)
        assert cfg.max_iter == 30 and cfg.save_ckpt_every == 30 and cfg.warmup_num_steps > 60
        assert cfg.ckpt_dir == tmp_path / "ckpts" / "ar-x" and cfg.data_dirs == [str(tmp_path / "data" / "test")]
        assert cfg.model == "ar-quarter" and cfg.codec_weights == "untrained" and not cfg.tensorboard
        cuda = Config.parse(words)
        cuda.device = "cuda"  # validation would refuse device=cuda on this CPU machine; the choice is what matters
        assert precision(cuda) == precision_name
    assert gc.train_command(gc.RunSpec("n", "nar", "bf16"), tmp_path, "cuda")[1:4] == \
        ["-m", "vall_e.train", "yaml=config/test/nar.yml"]


def test_export_and_synthesis_command_lines_parse(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    from vall_e.__main__ import build_parser
    from vall_e.config import Config
    from vall_e.emb import g2p

    words, rest = Config.split_argv(gc.export_command(gc.RunSpec("ar-bf16", "ar", "bf16"), tmp_path, tmp_path / "ar.pt")[3:])
    assert rest == [str(tmp_path / "ar.pt")]
    assert Config.parse(words + ["device=cpu"]).ckpt_dir == tmp_path / "ckpts" / "ar-bf16"

    argv = gc.synth_command(tmp_path / "ar.pt", tmp_path / "nar.pt", tmp_path / "o.wav", "cuda", max_ar_steps=300)
    words, rest = Config.split_argv(argv[3:])
    assert words == ["codec_weights=untrained"]
    args = build_parser().parse_args(rest)
    assert args.args[0] == gc.SYNTH_TEXT and args.device == "cuda" and args.max_ar_steps == 300

    # the smoke models know only data/test's phones: the sentence must use no other
    known = {p for f in (REPO / "data" / "test").glob("*.phn.txt") for p in f.read_text().split()}
    assert set(g2p.encode(gc.SYNTH_TEXT)) <= known


def test_default_output_name(tmp_path):
    from datetime import datetime

    assert gc.slug("NVIDIA H200") == "nvidia-h200" and gc.slug("  ") == "unknown"
    path = gc.default_out("NVIDIA H100 80GB HBM3", datetime(2026, 1, 2, 3, 4, 5))
    assert path.parent == REPO / "benchmarks" and path.name.startswith("gpu_check-nvidia-h100-80gb-hbm3-2026-01-02")
