"""Training on a real DeepSpeed engine (CPU, gloo): steps, checkpoints, resume, commands, multi-process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from vall_e.config import Config
from vall_e.data import DataError, load_codes, load_data

REPO = Path(__file__).resolve().parents[1]


def write_cfg(tmp_path: Path, name: str, corpus: Path, **fields) -> Path:
    """A test recipe under ``tmp_path/config/<name>.yml``; outputs stay inside ``tmp_path``."""
    cfg = {
        "data_dirs": [str(corpus)],
        "spkr_name_getter": "lambda p: p.parts[-3]",
        "min_phones": 1,
        "max_phones": 400,
        "model": "ar-tiny",
        "batch_size": 2,
        "eval_batch_size": 4,
        "max_num_val": 2,
        "max_val_ar_steps": 20,
        "max_iter": 6,
        "save_ckpt_every": 3,
        "eval_every": 1000,
        "log_every": 1,
        "warmup_num_steps": 2,
        "warmup_max_lr": 1e-3,
        "nj": 0,
        "device": "cpu",
        "codec_weights": "untrained",
        "ckpt_root": str(tmp_path / "ckpts"),
        "log_root": str(tmp_path / "logs"),
    }
    cfg.update(fields)
    path = tmp_path / "config" / f"{name}.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_train(cfg_path: Path, *extra: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "vall_e.train", f"yaml={cfg_path}", *extra],
        cwd=REPO,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def stats(log_root: Path, split: str = "train") -> list[dict]:
    records = []
    for log in sorted(log_root.rglob("log.txt")):
        for line in log.read_text().splitlines():
            if "{" in line:
                try:
                    rec = json.loads(line[line.index("{"):])
                except json.JSONDecodeError:
                    continue
                if rec.get("split") == split:
                    records.append(rec)
    return records


def model_states(ckpt_dir: Path, step: int) -> dict:
    return torch.load(ckpt_dir / f"global_step{step}" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)


def assert_same_tree(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"tensors differ at {where}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("model", ["ar-tiny", "nar-tiny"])
def test_trains_saves_and_evaluates(tmp_path, prepared_corpus, model):
    cfg_path = write_cfg(tmp_path, model, prepared_corpus, model=model, max_iter=8, eval_every=8, nj=1)
    proc = run_train(cfg_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ckpt_dir = tmp_path / "ckpts" / model
    assert (ckpt_dir / "latest").read_text().strip() == "global_step8"
    assert (ckpt_dir / "global_step3").is_dir() and (ckpt_dir / "global_step6").is_dir()
    assert json.loads((ckpt_dir / "phone_map.json").read_text())["<s>"] == 1
    train = stats(tmp_path / "logs")
    assert [r["step"] for r in train] == list(range(1, 9))
    for key in ("loss", "acc", "acc10", "lr", "grad_norm", "frames_per_s", "elapsed_s", "pad_fraction", "bad_examples"):
        assert key in train[-1], key
    assert train[-1]["loss"] < train[0]["loss"], "loss did not fall"
    evals = stats(tmp_path / "logs", "subtrain")
    assert evals and evals[-1]["step"] == 8 and 0.0 <= evals[-1]["gen_match"] <= 1.0
    if model.startswith("ar"):
        assert 0.0 <= evals[-1]["gen_match_greedy"] <= 1.0
    wavs = list((tmp_path / "logs").rglob("*.hyp.wav"))
    assert wavs, "evaluation wrote no audio"
    saved = model_states(ckpt_dir, 8)
    assert saved["vall_e"]["step"] == 8 and saved["vall_e"]["hparams"]["preset"] == model


def test_killed_run_resumes_with_identical_state(tmp_path, prepared_corpus):
    common = dict(max_iter=20, save_ckpt_every=3, eval_every=1000)
    ref_cfg = write_cfg(tmp_path / "a", "ar", prepared_corpus, **common)
    assert run_train(ref_cfg).returncode == 0

    cfg_path = write_cfg(tmp_path / "b", "ar", prepared_corpus, **common)
    latest = tmp_path / "b" / "ckpts" / "ar" / "latest"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vall_e.train", f"yaml={cfg_path}"],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while not latest.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int(latest.read_text().strip().removeprefix("global_step"))
    assert killed_at < 20, "the run finished before it could be killed"

    resumed = run_train(cfg_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"at step {killed_at}" in resumed.stderr
    first = [r["step"] for r in stats(tmp_path / "b" / "logs") if r["step"] > killed_at]
    assert first[0] == killed_at + 1

    a, b = model_states(tmp_path / "a" / "ckpts" / "ar", 20), model_states(tmp_path / "b" / "ckpts" / "ar", 20)
    assert_same_tree(a["module"], b["module"], "module")
    assert_same_tree(a["optimizer"], b["optimizer"], "optimizer")
    assert a["lr_scheduler"] == b["lr_scheduler"]


def test_quit_on_stdin_saves_and_exits_zero(tmp_path, prepared_corpus):
    cfg_path = write_cfg(tmp_path, "ar", prepared_corpus, max_iter=10_000)
    proc = run_train(cfg_path, stdin="quit\n")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "quit requested" in proc.stderr
    tag = (tmp_path / "ckpts" / "ar" / "latest").read_text().strip()
    step = int(tag.removeprefix("global_step"))
    assert 1 <= step < 10_000


LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vall_e.train"],
    "deepspeed": ["-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29531", "--module", "vall_e.train"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_processes_keep_ranks_identical(tmp_path, prepared_corpus, launcher):
    corpus = tmp_path / "corpus"  # a copy without an index: the two ranks must share one build
    shutil.copytree(prepared_corpus, corpus, ignore=shutil.ignore_patterns(".vall_e"))
    cfg_path = write_cfg(tmp_path, "ar", corpus, max_iter=4, save_ckpt_every=2)
    # NCCL's rule, enforced on gloo: a CPU tensor in any of our collectives fails here as on 2 GPUs
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "VALL_E_STRICT_COMM": "1"}

    def launch(*words: str) -> str:
        proc = subprocess.run(
            [sys.executable, *LAUNCHERS[launcher], f"yaml={cfg_path}", *words],
            cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=400, env=env,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc.stdout + proc.stderr

    logged = launch()
    assert logged.count("weights of all 2 ranks are identical") == 2  # steps 2 and 4
    assert "DIFFERENT" not in logged
    assert [r["step"] for r in stats(tmp_path / "logs")] == [1, 2, 3, 4]
    assert logged.count("indexed ") == 1
    assert sorted(p.name for p in (corpus / ".vall_e").iterdir() if p.name.startswith("g")) == ["g000001"]
    if launcher == "torchrun":  # resume through the checkpoint agreement, still strict
        logged = launch("max_iter=5")
        assert "resumed from" in logged and [r["step"] for r in stats(tmp_path / "logs")][-1] == 5


def _train_and_corrupt(tmp_path: Path, corpus: Path, victims: list[Path], **fields) -> tuple[int, str, list[dict]]:
    """Start training, overwrite ``victims`` with garbage once it has logged step 2, wait for it to end."""
    cfg_path = write_cfg(tmp_path, "ar", corpus, log_every=1, save_ckpt_every=10_000, pack_codes=False, **fields)
    proc = subprocess.Popen([sys.executable, "-m", "vall_e.train", f"yaml={cfg_path}"], cwd=REPO, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not any(r["step"] >= 2 for r in stats(tmp_path / "logs")):
        time.sleep(0.05)
    for v in victims:
        v.write_bytes(b"garbage: not a tensor")
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err, stats(tmp_path / "logs")


def test_corrupt_codes_mid_run_are_skipped_and_named_once(tmp_path, prepared_corpus):
    corpus = tmp_path / "corpus"
    shutil.copytree(prepared_corpus, corpus, ignore=shutil.ignore_patterns(".vall_e"))
    victim = sorted(corpus.rglob("*.qnt.pt"))[0]
    code, err, train = _train_and_corrupt(tmp_path, corpus, [victim], max_iter=120, max_bad_fraction=1.0)
    assert code == 0, err[-3000:]
    assert err.count(f"skipping an unreadable example: {victim}") == 1
    assert train[-1]["step"] == 120 and train[-1]["bad_examples"] > 0
    assert train[0]["bad_examples"] == 0


def test_too_many_bad_examples_stop_with_the_list(tmp_path, prepared_corpus):
    corpus = tmp_path / "corpus"
    shutil.copytree(prepared_corpus, corpus, ignore=shutil.ignore_patterns(".vall_e"))
    victims = sorted(corpus.rglob("*.qnt.pt"))[:2]
    code, err, train = _train_and_corrupt(tmp_path, corpus, victims, max_iter=10_000)
    assert code == 2, err[-3000:]
    assert "more than max_bad_fraction=0.01" in err and "python -m vall_e.emb.qnt" in err
    assert all(str(v) in err for v in victims)
    assert train[-1]["step"] < 10_000


def test_nothing_to_train_on_explains_every_rule(tmp_path, prepared_corpus):
    cfg_path = write_cfg(tmp_path, "ar", prepared_corpus, min_phones=1000, max_phones=2000)
    proc = run_train(cfg_path)
    assert proc.returncode == 2
    assert "no utterance is left to train on" in proc.stderr
    assert "fewer than min_phones=1000" in proc.stderr and str(prepared_corpus) in proc.stderr

    cfg = Config.parse([f"data_dirs=[{tmp_path / 'missing'}]", "device=cpu"])
    with pytest.raises(DataError, match="does not exist"):
        load_data(cfg)

    cfg = Config.parse([f"data_dirs=[{prepared_corpus}]", "device=cpu", "spkr_name_getter=lambda p: p.parts[-1]",
                        "min_phones=1", "max_phones=400"])
    with pytest.raises(DataError, match="fewer than 2 utterances"):
        load_data(cfg)


def test_malformed_codes_are_named(tmp_path):
    bad = tmp_path / "x.qnt.pt"
    torch.save(torch.zeros(3, 7, dtype=torch.long), bad)
    with pytest.raises(DataError, match=r"x\.qnt\.pt.*\(1, 8, T\)"):
        load_codes(bad)
    bad.write_bytes(b"not a tensor")
    with pytest.raises(DataError, match=r"x\.qnt\.pt.*cannot be loaded"):
        load_codes(bad)


def test_plot_writes_png(tmp_path):
    log_dir = tmp_path / "logs" / "run" / "t0"
    log_dir.mkdir(parents=True)
    lines = [f'2026 - INFO - {{"split": "train", "step": {i}, "loss": {5 - i * 0.1}}}' for i in range(1, 20)]
    lines += ['2026 - INFO - {"split": "val", "step": 10, "loss": 4.0}', "plain log line"]
    (log_dir / "log.txt").write_text("\n".join(lines))
    out = tmp_path / "loss.png"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "plot.py"), "loss", "--log-dir", str(tmp_path / "logs"),
                           "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
