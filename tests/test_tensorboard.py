"""TensorBoard monitoring: event files mirror the JSON log, carry eval audio and settings;
``tensorboard=false`` writes none; W&B goes through DeepSpeed's monitor; a missing package is not fatal."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from test_train import REPO, stats, write_cfg
from vall_e.config import Config
from vall_e.utils import monitor

# A stand-in for the wandb package: DeepSpeed's WandbMonitor calls init() and log(); we record both.
FAKE_WANDB = '''
import json, os
def _write(kind, **kw):
    with open(os.environ["FAKE_WANDB_OUT"], "a") as f:
        f.write(json.dumps({"call": kind, **kw}) + "\\n")
def init(project=None, group=None, entity=None, **kw):
    _write("init", project=project, group=group)
def log(data, step=None, commit=None):
    _write("log", data=data, step=step)
'''


def _start(cfg_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vall_e.train", f"yaml={cfg_path}"], cwd=REPO, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    return out


def _events(log_root: Path) -> list[Path]:
    return sorted(log_root.rglob("events.out.tfevents.*"))


@pytest.fixture(scope="module")
def runs(prepared_corpus, tmp_path_factory):
    """Two short ar-tiny runs, side by side: ``on`` (TensorBoard, evaluations of 3 utterances in 2 batches
    at steps 2 and 4) and ``off``
    (tensorboard=false, wandb=true with a fake wandb package). Each keeps its own corpus index."""
    root = tmp_path_factory.mktemp("tensorboard")
    common = dict(max_iter=4, log_every=2, eval_every=2, save_ckpt_every=1000, max_num_val=3, max_val_ar_steps=5,
                  eval_batch_size=2)
    on = write_cfg(root / "on", "ar", prepared_corpus, index_root=str(root / "on" / "index"), **common)
    off = write_cfg(root / "off", "ar", prepared_corpus, index_root=str(root / "off" / "index"), tensorboard=False,
                    wandb=True, wandb_project="vall-e-test", **{**common, "max_iter": 2})
    fake = root / "fake_wandb"
    fake.mkdir()
    (fake / "wandb.py").write_text(FAKE_WANDB)
    wandb_out = root / "wandb_calls.jsonl"
    env_off = {"PYTHONPATH": os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]),
               "FAKE_WANDB_OUT": str(wandb_out)}
    procs = [_start(on), _start(off, env_off)]
    outs = [_finish(p) for p in procs]
    return {"on": root / "on", "off": root / "off", "wandb": wandb_out, "out_on": outs[0], "out_off": outs[1]}


def _accumulator(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(folder), size_guidance={"scalars": 0, "audio": 0, "tensors": 0})
    ea.Reload()
    return ea


def test_event_files_mirror_the_json_log(runs):
    logs = runs["on"] / "logs"
    events = _events(logs)
    assert len(events) == 1, events
    run_dir = events[0].parent
    assert (run_dir / "log.txt").is_file(), "the events belong in the run's log folder, next to log.txt"
    ea = _accumulator(run_dir)
    scalars = set(ea.Tags()["scalars"])

    train = stats(logs)
    assert [r["step"] for r in train] == [1, 2, 4]
    for key in ("loss", "lr", "grad_norm", "pad_fraction", "frames_per_s", "acc"):
        assert f"train/{key}" in scalars, key
    for record in train:
        for key, value in record.items():
            if key in ("split", "step"):
                continue
            points = {e.step: e.value for e in ea.Scalars(f"train/{key}")}
            assert points[record["step"]] == pytest.approx(value, rel=1e-6, abs=1e-12), (key, record["step"])
    assert [e.step for e in ea.Scalars("train/loss")] == [1, 2, 4]

    # the fixture corpus is too small for a val split (a speaker needs 20 utterances): subtrain only
    evaluated = [split for split in ("subtrain", "val") if stats(logs, split)]
    assert "subtrain" in evaluated
    assert {t.split("/")[0] for t in scalars} == {"train", *evaluated}
    for split in evaluated:
        records = stats(logs, split)
        assert [r["step"] for r in records] == [2, 4]
        for key in ("loss", "acc", "gen_match", "gen_match_greedy"):
            points = ea.Scalars(f"{split}/{key}")
            assert [p.step for p in points] == [2, 4]
            for point, record in zip(points, records):
                assert point.value == pytest.approx(record[key], rel=1e-6, abs=1e-12), (split, key, point.step)


def test_event_files_hold_eval_audio_and_settings(runs):
    (run_dir,) = {p.parent for p in _events(runs["on"] / "logs")}
    ea = _accumulator(run_dir)
    audio = ea.Tags()["audio"]
    evaluated = [split for split in ("subtrain", "val") if stats(runs["on"] / "logs", split)]
    assert {t.split("/")[0] for t in audio} == set(evaluated)
    for split in evaluated:
        on_disk = sorted(p.name for p in (run_dir / "eval" / "step4" / split).glob("*.hyp.wav"))
        assert len(on_disk) == 3, on_disk  # every evaluated utterance is on disk; TensorBoard keeps a few
        hyps = [t for t in audio if t.startswith(f"{split}/audio/") and t.endswith("/hyp")]
        assert len(hyps) == monitor.AUDIO_PER_SPLIT == 2, audio
        for tag in hyps:
            uid = tag.split("/")[2]
            assert [e.step for e in ea.Audio(tag)] == [2, 4]  # the same utterances at every evaluation
            assert [e.step for e in ea.Audio(f"{split}/audio/{uid}/ref")] == [2]  # the reference once
            for event in ea.Audio(tag):
                assert event.sample_rate == 24000
                got, sr = sf.read(io.BytesIO(event.encoded_audio_string), dtype="float32")
                want, _ = sf.read(run_dir / "eval" / f"step{event.step}" / split / f"{uid}.hyp.wav", dtype="float32")
                assert sr == 24000 and got.shape == want.shape
                assert abs(got - want).max() <= 2 / 32768, "the TensorBoard clip is not the evaluation's wav"

    text = {t for t in ea.Tags()["tensors"]}
    assert "config/text_summary" in text and "eval/audio_note/text_summary" in text
    config_text = ea.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "model: ar-tiny" in config_text and "tensorboard: true" in config_text
    hparams = ea.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in hparams and "_hparams_/session_start_info" in hparams
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["model"].string_value == "ar-tiny"
    assert start.hparams["lr"].number_value == pytest.approx(1e-3)
    assert start.hparams["batch_size"].number_value == 2
    assert start.hparams["precision"].string_value == "fp32"  # the trainer passes the engine's precision
    if "prompt_mode" in Config.field_names():
        assert start.hparams["prompt_mode"].string_value == "speaker"


def test_tensorboard_false_writes_no_events_and_wandb_gets_the_stats(runs):
    logs = runs["off"] / "logs"
    assert stats(logs), "the JSON log is written whatever the monitors"
    assert _events(logs) == [] and _events(runs["off"] / "ckpts") == []
    calls = [json.loads(line) for line in runs["wandb"].read_text().splitlines()]
    assert calls[0] == {"call": "init", "project": "vall-e-test", "group": "ar"}
    logged = {k: (c["step"], v) for c in calls if c["call"] == "log" for k, v in c["data"].items()}
    (last,) = [r for r in stats(logs) if r["step"] == 2]
    assert logged["train/step"][1] == 2
    assert logged["train/loss"][1] == pytest.approx(last["loss"])
    assert "Train/Samples/lr" in logged  # DeepSpeed's own events go to the same W&B run
    assert "subtrain/gen_match" in logged


def test_missing_tensorboard_warns_once_and_training_goes_on(tmp_path, monkeypatch, caplog):
    cfg = Config(log_root=str(tmp_path / "logs"), device="cpu", name="x")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    monkeypatch.setattr(monitor, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="vall_e.utils.monitor"):
        assert monitor.open_monitor(cfg) is None
        assert monitor.open_monitor(cfg) is None
    assert sum("TensorBoard cannot be imported" in r.getMessage() for r in caplog.records) == 1
    assert monitor.active() is None and _events(tmp_path) == []


def test_wandb_section_only_when_asked_and_installed(monkeypatch, caplog):
    import importlib.util

    from vall_e.utils.engines import deepspeed_config

    cfg = Config(device="cpu", name="mine/ar")
    assert "wandb" not in deepspeed_config(cfg)
    cfg.wandb = True
    monkeypatch.setattr(monitor, "_warned", set())
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else object())
    with caplog.at_level(logging.WARNING, logger="vall_e.utils.monitor"):
        assert "wandb" not in deepspeed_config(cfg)
    assert any("wandb package is not installed" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert deepspeed_config(cfg)["wandb"] == {"enabled": True, "project": "vall-e", "group": "mine/ar"}


def test_sigterm_leaves_complete_event_files(tmp_path, prepared_corpus):
    """A preempted run (SIGTERM: save, exit 0) has every logged step in its events, up to the last one."""
    import signal
    import time

    cfg = write_cfg(tmp_path, "ar", prepared_corpus, index_root=str(tmp_path / "index"), max_iter=10_000, log_every=1,
                    save_ckpt_every=10_000, eval_every=10_000)
    proc = _start(cfg)
    logs = tmp_path / "logs"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(stats(logs)) < 3:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out = _finish(proc)
    assert "SIGTERM" in out
    steps = [r["step"] for r in stats(logs)]
    assert 3 <= steps[-1] < 10_000
    (events,) = _events(logs)
    ea = _accumulator(events.parent)
    assert [e.step for e in ea.Scalars("train/loss")] == steps


def test_monitor_does_not_import_engines():
    """The dependency runs one way: engines builds the DeepSpeed config with the monitor's W&B section,
    and the monitor is told the precision instead of importing engines (no import circle)."""
    import ast

    tree = ast.parse(Path(monitor.__file__).read_text(encoding="utf-8"))
    imported = [alias.name if isinstance(node, ast.Import) else f"{node.module or ''}.{alias.name}"
                for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names]
    assert not [name for name in imported if "engines" in name], imported
