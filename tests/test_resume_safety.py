"""Training state you can trust: checkpoints that are whole or absent, safe resume, fallback, signals,
the run lock, run names.

One short training run (``base_run``, module-scoped) makes checkpoints at steps 2, 4 and 6; each test
copies its folder and damages the copy the way a user, a crash or an attacker would.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from test_train import REPO, run_train, stats, write_cfg
from vall_e.config import Config
from vall_e.utils import engines
from vall_e.utils.config import ConfigError

FIELDS = dict(max_iter=6, save_ckpt_every=2, eval_every=1000, log_every=1, max_num_val=0)  # no evaluation: faster


@pytest.fixture(scope="module")
def base_run(prepared_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished ar-tiny run's checkpoint folder: global_step2, 4 and 6, latest = global_step6."""
    root = tmp_path_factory.mktemp("base_run")
    proc = run_train(write_cfg(root, "ar", prepared_corpus, **FIELDS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "ckpts" / "ar"


def _copy_run(base_run: Path, tmp_path: Path, corpus: Path, **fields) -> tuple[Path, Path]:
    """A config under ``tmp_path`` whose checkpoint folder starts as a copy of ``base_run``."""
    cfg_path = write_cfg(tmp_path, "ar", corpus, **{**FIELDS, **fields})
    ckpt = tmp_path / "ckpts" / "ar"
    shutil.copytree(base_run, ckpt)
    return cfg_path, ckpt


def _digest(folder: Path) -> str:
    return hashlib.sha256((folder / "mp_rank_00_model_states.pt").read_bytes()).hexdigest()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _user_error(proc: subprocess.CompletedProcess) -> str:
    """Exit 2 with a message and no traceback; returns stderr."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr


# -- data loss: no silent restart -------------------------------------------------------------------


def test_missing_latest_resumes_the_newest_checkpoint(base_run, tmp_path, prepared_corpus):
    cfg_path, ckpt = _copy_run(base_run, tmp_path, prepared_corpus, max_iter=8)
    before = {t: _digest(ckpt / t) for t in ("global_step2", "global_step4", "global_step6")}
    (ckpt / "latest").unlink()
    proc = run_train(cfg_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "latest is missing or empty" in proc.stderr and "at step 6" in proc.stderr
    assert [r["step"] for r in stats(tmp_path / "logs")] == [7, 8]
    assert {t: _digest(ckpt / t) for t in before} == before, "an existing checkpoint was overwritten"
    assert (ckpt / "latest").read_text().strip() == "global_step8"

    (ckpt / "latest").write_text("\n")  # empty: the same
    proc = run_train(cfg_path, "max_iter=8")
    assert proc.returncode == 0 and "nothing to do" in proc.stderr, proc.stderr[-3000:]


def test_latest_naming_a_missing_tag(base_run, tmp_path, prepared_corpus):
    cfg_path, ckpt = _copy_run(base_run, tmp_path, prepared_corpus, max_iter=7)
    (ckpt / "latest").write_text("global_step99\n")
    proc = run_train(cfg_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'global_step99', which does not exist" in proc.stderr and "at step 6" in proc.stderr

    # latest names a checkpoint, but every folder is gone: the user decides, nothing starts from 0
    for t in engines.checkpoint_tags(ckpt):
        shutil.rmtree(ckpt / t)
    err = _user_error(run_train(cfg_path))
    assert "holds no global_step* folder" in err and "delete" in err


# -- fallback ---------------------------------------------------------------------------------------


def test_truncated_newest_checkpoint_falls_back_and_is_never_overwritten(base_run, tmp_path, prepared_corpus):
    cfg_path, ckpt = _copy_run(base_run, tmp_path, prepared_corpus, max_iter=7)
    _truncate(ckpt / "global_step6" / "mp_rank_00_model_states.pt")
    broken = (ckpt / "global_step6" / "mp_rank_00_model_states.pt").read_bytes()
    proc = run_train(cfg_path, "save_ckpt_every=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipping checkpoint {ckpt / 'global_step6'}" in proc.stderr and "truncated or corrupt" in proc.stderr
    assert "at step 4" in proc.stderr
    # step 6 was reached again: the damaged folder was moved aside, not overwritten
    aside = sorted(ckpt.glob("global_step6.replaced-*"))
    assert len(aside) == 1 and (aside[0] / "mp_rank_00_model_states.pt").read_bytes() == broken
    assert (ckpt / "latest").read_text().strip() == "global_step7"


def test_no_usable_checkpoint_refuses_to_start_over(base_run, tmp_path, prepared_corpus):
    cfg_path, ckpt = _copy_run(base_run, tmp_path, prepared_corpus)
    for t in ("global_step2", "global_step4", "global_step6"):
        _truncate(ckpt / t / "mp_rank_00_model_states.pt")
    err = _user_error(run_train(cfg_path))
    assert "none can be used" in err and "global_step2" in err and "global_step6" in err
    assert engines.checkpoint_tags(ckpt) == ["global_step6", "global_step4", "global_step2"]  # untouched


class _Payload:
    """Unpickling this runs ``touch <marker>``: what a planted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_planted_pickle_is_not_executed_on_resume(base_run, tmp_path, prepared_corpus):
    cfg_path, ckpt = _copy_run(base_run, tmp_path, prepared_corpus, max_iter=7)
    marker = tmp_path / "pwned"
    states = ckpt / "global_step6" / "mp_rank_00_model_states.pt"
    real = torch.load(states, map_location="cpu", weights_only=True)
    torch.save({**real, "payload": _Payload(marker)}, states)
    torch.load(states, weights_only=False)  # the payload is live: full unpickling runs it
    assert marker.exists()
    marker.unlink()

    proc = run_train(cfg_path)
    assert not marker.exists(), "resume unpickled the planted payload"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"checkpoint {ckpt / 'global_step6'} cannot be loaded" in proc.stderr and "at step 4" in proc.stderr


def test_a_refused_pickle_in_init_from_says_what_training_can_do(base_run, tmp_path, prepared_corpus):
    source = tmp_path / "source"
    shutil.copytree(base_run, source)
    marker = tmp_path / "pwned"
    states = source / "global_step6" / "mp_rank_00_model_states.pt"
    torch.save({**torch.load(states, map_location="cpu", weights_only=True), "payload": _Payload(marker)}, states)
    for tag in ("global_step2", "global_step4"):
        shutil.rmtree(source / tag)
    cfg_path = write_cfg(tmp_path, "ar", prepared_corpus, **FIELDS)
    err = _user_error(run_train(cfg_path, f"init_from={source}"))
    assert not marker.exists()
    assert "which a safe (weights-only) load refuses" in err and "python -m vall_e.export" in err
    assert "rerun with --trust-checkpoint" not in err and "weights_only=False" not in err


class _FullDisk:
    """A stand-in engine whose save writes half a file, then fails like a full disk."""

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert not save_latest
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True)
        (folder / "mp_rank_00_model_states.pt").write_bytes(b"PK\x03\x04 half")
        raise OSError(errno.ENOSPC, "No space left on device")


def test_interrupted_save_leaves_no_checkpoint(base_run, tmp_path, prepared_corpus):
    ckpt = tmp_path / "ckpts" / "ar"
    shutil.copytree(base_run, ckpt)
    with pytest.raises(engines.CheckpointError, match="no space left on the device.*global_step6\\) is intact"):
        engines.save_checkpoint(_FullDisk(), ckpt, 8, {}, meta={})
    assert not list(ckpt.glob(".partial-*"))
    assert engines.checkpoint_tags(ckpt) == ["global_step6", "global_step4", "global_step2"]
    assert (ckpt / "latest").read_text().strip() == "global_step6"
    assert engines.resume_candidates(ckpt)[0] == "global_step6"

    # what a kill leaves: the partial folder, and an old-style half folder without model states
    (ckpt / "global_step10").mkdir()
    (ckpt / "global_step10" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    (ckpt / "latest").write_text("global_step10")
    assert engines.resume_candidates(ckpt)[0] == "global_step6"
    engines.remove_partial_saves(ckpt)
    assert not list(ckpt.glob(".partial-*"))


def test_keep_last_ckpts_prunes_only_after_a_complete_save(tmp_path, prepared_corpus):
    cfg_path = write_cfg(tmp_path, "ar", prepared_corpus, max_iter=5, save_ckpt_every=1, keep_last_ckpts=2, max_num_val=0)
    proc = run_train(cfg_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert engines.checkpoint_tags(tmp_path / "ckpts" / "ar") == ["global_step5", "global_step4"]
    assert json.loads((tmp_path / "ckpts" / "ar" / "global_step5" / "vall_e.json").read_text())["step"] == 5


# -- architecture ---------------------------------------------------------------------------------


def test_resuming_with_another_preset_names_the_fields(base_run, tmp_path, prepared_corpus):
    cfg_path, _ = _copy_run(base_run, tmp_path, prepared_corpus, model="nar-tiny", max_iter=8)
    err = _user_error(run_train(cfg_path))
    assert "trained with model='ar-tiny', this run asks for model='nar-tiny'" in err
    assert "fields differ" in err and "preset: 'ar-tiny' -> 'nar-tiny'" in err


# -- signals ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig,nj", [("SIGTERM", 0), ("SIGINT", 1)])
def test_signal_saves_exits_zero_and_resumes_there(tmp_path, prepared_corpus, sig, nj):
    """SIGTERM to the process (a scheduler's preemption); SIGINT to the whole process group with a loader
    worker in it (Ctrl-C in a terminal): the worker must not die, the main process saves."""
    cfg_path = write_cfg(tmp_path, "ar", prepared_corpus, max_iter=100_000, save_ckpt_every=100_000, log_every=1, nj=nj)
    proc = subprocess.Popen([sys.executable, "-m", "vall_e.train", f"yaml={cfg_path}"], cwd=REPO, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not any(r["step"] >= 3 for r in stats(tmp_path / "logs")):
        time.sleep(0.05)
    if sig == "SIGTERM":
        # meanwhile a second run of the same config is refused: the folder is locked by the first
        second = _user_error(run_train(cfg_path))
        assert f"in use by another training run (pid {proc.pid} on host {socket.gethostname()}" in second
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert err.count(f"{sig} received") == 1 and f"{sig}: checkpoint saved at step" in err
    step = int((tmp_path / "ckpts" / "ar" / "latest").read_text().strip().removeprefix("global_step"))
    assert step >= 3 and max(r["step"] for r in stats(tmp_path / "logs")) == step
    assert not (tmp_path / "ckpts" / "ar" / ".lock").exists()

    resumed = run_train(cfg_path, f"max_iter={step + 1}", "max_num_val=0")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {step}" in resumed.stderr


def _pids_with_env(marker: str, rank: int) -> list[int]:
    """Processes whose environment holds ``VALL_E_TEST=<marker>`` and ``RANK=<rank>``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"VALL_E_TEST={marker}".encode() in env and f"RANK={rank}".encode() in env:
            found.append(int(entry.name))
    return found


def test_sigterm_to_one_rank_stops_all_ranks_after_a_save(tmp_path, prepared_corpus):
    cfg_path = write_cfg(tmp_path, "ar", prepared_corpus, max_iter=100_000, save_ckpt_every=100_000, log_every=1)
    marker = str(tmp_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "VALL_E_TEST": marker,
           "VALL_E_STRICT_COMM": "1"}  # the signal's all-reduce must be one NCCL accepts
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "vall_e.train", f"yaml={cfg_path}"], cwd=REPO, text=True, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not any(r["step"] >= 2 for r in stats(tmp_path / "logs")):
        time.sleep(0.05)
    rank1 = _pids_with_env(marker, 1)
    assert len(rank1) == 1, rank1
    os.kill(rank1[0], signal.SIGTERM)  # only rank 1 is told: rank 0 must still save with it, then both exit
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    assert "a signal on another rank: checkpoint saved at step" in err
    step = int((tmp_path / "ckpts" / "ar" / "latest").read_text().strip().removeprefix("global_step"))
    assert step >= 2 and "weights of all 2 ranks are identical" in err


def test_second_signal_exits_at_once(monkeypatch):
    from vall_e.utils.trainer import Trainer

    trainer = Trainer.__new__(Trainer)  # only the signal logic is exercised
    trainer.stop_signal = None
    killed = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: killed.append((pid, sig)))
    monkeypatch.setattr(signal, "signal", lambda sig, handler: None)
    trainer._on_signal(signal.SIGTERM, None)
    assert trainer.stop_signal == "SIGTERM" and not killed
    trainer._on_signal(signal.SIGINT, None)
    assert killed == [(os.getpid(), signal.SIGINT)]


# -- the run lock -----------------------------------------------------------------------------------


def test_a_locked_folder_is_refused_and_a_stale_lock_taken_over(base_run, tmp_path, prepared_corpus):
    cfg_path, ckpt = _copy_run(base_run, tmp_path, prepared_corpus, max_iter=7)
    host = socket.gethostname()
    (ckpt / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": host, "start": None, "since": "now"}))
    err = _user_error(run_train(cfg_path))
    assert f"in use by another training run (pid {os.getpid()} on host {host}" in err
    assert engines.latest_tag(ckpt) == "global_step6"

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (ckpt / ".lock").write_text(json.dumps({"pid": gone.pid, "host": host, "start": None, "since": "then"}))
    proc = run_train(cfg_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "taking over the lock" in proc.stderr and "at step 6" in proc.stderr
    assert not (ckpt / ".lock").exists()


def test_run_lock_in_process(tmp_path):
    first, second = engines.RunLock(tmp_path), engines.RunLock(tmp_path)
    first.acquire()
    with pytest.raises(engines.CheckpointError, match=f"pid {os.getpid()} on host"):
        second.acquire()
    first.release()
    second.acquire()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    second.release()
    assert not (tmp_path / ".lock").exists()


# -- run names --------------------------------------------------------------------------------------


def test_run_names_do_not_collide_or_escape(tmp_path):
    def name(yaml_path: str, *words: str) -> Config:
        cfg = Config.parse(["device=cpu", *words])
        cfg.yaml_path = yaml_path
        return cfg

    a, b = name("/a/ar.yml"), name("/b/ar.yml")
    assert a.cfg_name != b.cfg_name and a.cfg_name.startswith("ar-") and b.cfg_name.startswith("ar-")
    root = Path("ckpts").resolve()
    for path in ("config/../../../tmp/x.yml", "../up/run.yml", "/abs/x.yml", "config/../x.yml", "a/../../x.yml"):
        cfg = name(path)
        assert ".." not in Path(cfg.cfg_name).parts, path
        assert cfg.ckpt_dir.resolve().is_relative_to(root), (path, cfg.ckpt_dir)
    assert name("config/LibriTTS/ar.yml").cfg_name == "LibriTTS/ar"
    assert name("/x/config/LibriTTS/ar.yml", "name=mine/ar").cfg_name == "mine/ar"
    for bad in ("../x", "/abs", "a/../../b"):
        with pytest.raises(ConfigError, match="name="):
            Config.parse(["device=cpu", f"name={bad}"])


# -- scripts/run.sh ---------------------------------------------------------------------------------


@pytest.mark.parametrize("code,runs", [(0, 1), (2, 1), (3, 3), ("kill", 3)])
def test_run_sh_restarts_only_crashes(tmp_path, code, runs):
    body = "kill -9 $$" if code == "kill" else f"exit {code}"
    proc = subprocess.run([str(REPO / "scripts" / "run.sh"), "sh", "-c", f"echo x >> {tmp_path / 'n'}; {body}"],
                          env={**os.environ, "MAX_RESTARTS": "2", "RESTART_DELAY": "0"}, capture_output=True, text=True,
                          timeout=60)
    assert (tmp_path / "n").read_text().count("x") == runs, proc.stderr
    assert proc.returncode == (137 if code == "kill" else code)


# -- init_from ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["export", "checkpoint"])
def test_init_from_starts_a_new_run_from_the_weights(base_run, tmp_path, prepared_corpus, source):
    from vall_e.export import export

    if source == "export":
        init = tmp_path / "zoo" / "ar.pt"
        export(init, base_run)
    else:
        init = base_run
    frozen = dict(max_iter=1, warmup_min_lr=0.0, warmup_max_lr=0.0)  # lr 0: the saved weights are the loaded ones
    cfg_path = write_cfg(tmp_path, "ft", prepared_corpus, **{**FIELDS, **frozen}, init_from=str(init))
    proc = run_train(cfg_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "initialized the weights from" in proc.stderr and "starting a new run at step 0" in proc.stderr
    assert [r["step"] for r in stats(tmp_path / "logs")] == [1]
    new = torch.load(tmp_path / "ckpts" / "ft" / "global_step1" / "mp_rank_00_model_states.pt", weights_only=True)
    old = torch.load(base_run / "global_step6" / "mp_rank_00_model_states.pt", weights_only=True)
    assert new["module"].keys() == old["module"].keys()
    assert all(torch.equal(new["module"][k], old["module"][k]) for k in old["module"])
    assert new["vall_e"]["phone_map"] == old["vall_e"]["phone_map"]

    if source == "checkpoint":  # a restart resumes the new run's own checkpoint, not init_from again
        again = run_train(cfg_path, "max_iter=2")
        assert again.returncode == 0 and "init_from=" in again.stderr and "is ignored" in again.stderr
        assert "at step 1" in again.stderr


def test_init_from_another_preset_is_refused(base_run, tmp_path, prepared_corpus):
    cfg_path = write_cfg(tmp_path, "ft", prepared_corpus, **FIELDS, model="nar-tiny", init_from=str(base_run))
    err = _user_error(run_train(cfg_path))
    assert "holds a 'ar-tiny' model but this run builds model='nar-tiny'" in err and "kind: 'ar' -> 'nar'" in err


def test_phone_maps_merge_keeping_the_source_ids():
    from vall_e.train import _merge_phone_maps

    source = {"<s>": 1, "</s>": 2, "a": 3, "b": 4}
    data = {"<s>": 1, "</s>": 2, "b": 3, "c": 4, "_": 5}
    assert _merge_phone_maps(source, data) == {"<s>": 1, "</s>": 2, "a": 3, "b": 4, "_": 5, "c": 6}


# -- the corpus index: a damaged file is named and rebuilt -----------------------------------------


@pytest.mark.parametrize("victim", ["meta.json", "key.npy"])
def test_a_corrupt_corpus_index_names_its_file_and_is_rebuilt(tmp_path, prepared_corpus, caplog, victim):
    from vall_e import corpus

    root = tmp_path / "corpus"
    shutil.copytree(prepared_corpus, root)
    first = corpus.open_index(root, progress=False)
    expected = first.codes(0)
    (first.gen / victim).write_bytes(b"{garbage")
    with caplog.at_level("WARNING", logger="vall_e.corpus"):
        index = corpus.open_index(root, progress=False)
    assert f"{first.gen / victim}:" in caplog.text and "rebuilding it" in caplog.text
    assert index.gen != first.gen and len(index) == len(first)
    assert np.array_equal(index.codes(0), expected)


# -- the loss guard -----------------------------------------------------------------------------------

_NAN_RUN = """
import sys
import vall_e.train as train
from vall_e.config import Config

bad = {int(s) for s in sys.argv[2].split(",")}  # forward calls (1-based) whose loss becomes NaN
calls = [0]
build = train._build_model

def patched(cfg):
    model = build(cfg)
    forward = model.forward

    def nan_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        if model.training:
            calls[0] += 1
            if calls[0] in bad or (-1 in bad and calls[0] >= min(bad - {-1})):
                out.loss = out.loss * float("nan")
        return out

    model.forward = nan_forward
    return model

train._build_model = patched
raise SystemExit(train.train(Config.parse([f"yaml={sys.argv[1]}", *sys.argv[3:]])))
"""


def _nan_run(cfg_path: Path, bad: str, *words: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _NAN_RUN, str(cfg_path), bad, *words], cwd=REPO, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_nonfinite_losses_are_skipped_and_counted(tmp_path, prepared_corpus):
    cfg_path = write_cfg(tmp_path, "ar", prepared_corpus, max_iter=6, save_ckpt_every=1, eval_every=1000, log_every=1,
                         max_num_val=0)
    proc = _nan_run(cfg_path, "3,4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    train = stats(tmp_path / "logs")
    assert [r["nonfinite_losses"] for r in train] == [0, 0, 1, 2, 2, 2]
    assert all(r["loss"] == r["loss"] for r in train if r["step"] not in (3, 4))  # finite where trained
    ckpt = tmp_path / "ckpts" / "ar"
    w = {s: torch.load(ckpt / f"global_step{s}" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
         for s in (2, 4, 5)}
    assert all(torch.equal(w[2][k], w[4][k]) for k in w[2]), "a NaN step moved the weights"
    assert not all(torch.equal(w[4][k], w[5][k]) for k in w[4]), "training did not go on after the NaN steps"
    assert all(torch.isfinite(t).all() for t in w[5].values() if t.is_floating_point())


def test_a_nonfinite_micro_batch_skips_its_whole_step(tmp_path, prepared_corpus):
    """With accumulation, one NaN micro-batch poisons the summed gradients: that step leaves the weights alone."""
    cfg_path = write_cfg(tmp_path, "ar", prepared_corpus, max_iter=3, save_ckpt_every=1, eval_every=1000, log_every=1,
                         max_num_val=0, gradient_accumulation_steps=2)
    proc = _nan_run(cfg_path, "3")  # the first micro-batch of step 2
    assert proc.returncode == 0, proc.stderr[-3000:]
    train = stats(tmp_path / "logs")
    assert [r["nonfinite_losses"] for r in train] == [0, 1, 1]
    assert all(r["loss"] == r["loss"] for r in train), "the loss is averaged over the finite micro-batches"
    ckpt = tmp_path / "ckpts" / "ar"
    w = {s: torch.load(ckpt / f"global_step{s}" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
         for s in (1, 2, 3)}
    assert all(torch.equal(w[1][k], w[2][k]) for k in w[1]), "the step with a NaN micro-batch moved the weights"
    assert not all(torch.equal(w[2][k], w[3][k]) for k in w[2])
    assert all(torch.isfinite(t).all() for t in w[3].values() if t.is_floating_point())


def test_nonfinite_losses_in_a_row_save_and_stop(tmp_path, prepared_corpus):
    cfg_path = write_cfg(tmp_path, "ar", prepared_corpus, max_iter=1000, save_ckpt_every=1000, eval_every=1000,
                         log_every=1, max_nonfinite_steps=3)
    proc = _nan_run(cfg_path, "-1,3")  # NaN from the third step on
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "3 steps in a row had a non-finite loss (NaN or inf), up to step 5" in proc.stderr
    assert (tmp_path / "ckpts" / "ar" / "latest").read_text().strip() == "global_step5"


def test_resume_candidates_follow_latest_only_inside_the_folder(base_run, tmp_path):
    ckpt = tmp_path / "ckpts" / "ar"
    shutil.copytree(base_run, ckpt)
    (ckpt / "latest").write_text("../../somewhere")
    assert engines.resume_candidates(ckpt) == ["global_step6", "global_step4", "global_step2"]
    shutil.copytree(ckpt / "global_step2", ckpt / "best")  # a hand-made tag is honoured
    (ckpt / "latest").write_text("best")
    assert engines.resume_candidates(ckpt)[0] == "best"
    (ckpt / "latest").write_text("global_step4")  # rolled back by hand: newer ones are not used
    assert engines.resume_candidates(ckpt) == ["global_step4", "global_step2"]
