"""Hostile input on the training side: bad data must not stall, crash with a traceback or be retried for
hours by ``scripts/run.sh``; a full disk at save time is a message; config mistakes are plain.

The rule every test asserts: exit 2 (a user's problem, never restarted), no traceback, and nothing
that was already written is lost.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_train import REPO, run_train, stats, write_cfg
from vall_e.config import Config
from vall_e.utils.config import ConfigError


def _user_error(proc: subprocess.CompletedProcess | tuple[int, str]) -> str:
    code, err = (proc.returncode, proc.stderr) if isinstance(proc, subprocess.CompletedProcess) else proc
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return err


# -- config ---------------------------------------------------------------------------------------


def test_empty_data_dirs_and_empty_yaml_say_what_to_set(tmp_path, prepared_corpus):
    cfg_path = write_cfg(tmp_path, "ar", prepared_corpus, data_dirs=[])
    err = _user_error(run_train(cfg_path))
    assert "data_dirs is empty" in err and "data_dirs: [" in err
    empty = tmp_path / "empty.yml"
    empty.write_text("")
    err = _user_error(run_train(empty, "device=cpu"))
    assert "data_dirs is empty" in err


def test_a_string_for_a_list_field_is_a_one_item_list(tmp_path):
    (tmp_path / "c.yml").write_text("data_dirs: data/test\n")
    assert Config.parse([f"yaml={tmp_path / 'c.yml'}", "device=cpu"]).data_dirs == ["data/test"]
    assert Config.parse(["data_dirs=/abs/corpus", "device=cpu"]).data_dirs == ["/abs/corpus"]
    (tmp_path / "c.yml").write_text("data_dirs: 3\n")
    with pytest.raises(ConfigError, match=r"'data_dirs'.*must be a list such as \[a, b\]"):
        Config.parse([f"yaml={tmp_path / 'c.yml'}", "device=cpu"])


# -- bad data cannot stall training -----------------------------------------------------------------

# Runs vall_e.train with the trainer's patience changed: argv = yaml, MAX_EMPTY_DRAWS, words...
_RUN = """
import sys
import vall_e.train as train
from vall_e.config import Config
from vall_e.utils import trainer
trainer.MAX_EMPTY_DRAWS = int(sys.argv[2])
raise SystemExit(train.train(Config.parse([f"yaml={sys.argv[1]}", *sys.argv[3:]])))
"""


def _start(cfg_path: Path, patience: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _RUN, str(cfg_path), str(patience)], cwd=REPO, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})


def _wait_for_step(proc: subprocess.Popen, logs: Path, step: int) -> None:
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not any(r["step"] >= step for r in stats(logs)):
        time.sleep(0.05)


def _all_codes_unreadable_mid_run(tmp_path: Path, corpus: Path, patience: int) -> tuple[subprocess.Popen, list[Path]]:
    """Training with pack_codes=false, every .qnt.pt overwritten with garbage once step 2 is logged."""
    shutil.copytree(corpus, tmp_path / "corpus", ignore=shutil.ignore_patterns(".vall_e"))
    victims = sorted((tmp_path / "corpus").rglob("*.qnt.pt"))
    # max_bad_fraction=1: only the "no readable example for too long" rule can stop it
    cfg_path = write_cfg(tmp_path, "ar", tmp_path / "corpus", pack_codes=False, max_iter=100_000, log_every=1,
                         save_ckpt_every=100_000, max_bad_fraction=1.0, max_num_val=0)
    proc = _start(cfg_path, patience)
    _wait_for_step(proc, tmp_path / "logs", 2)
    for v in victims:
        v.write_bytes(b"garbage: not a tensor")
    return proc, victims


def test_a_stream_of_only_bad_files_stops_with_their_list(tmp_path, prepared_corpus):
    proc, victims = _all_codes_unreadable_mid_run(tmp_path, prepared_corpus, patience=50)
    _, err = proc.communicate(timeout=300)
    err = _user_error((proc.returncode, err))
    assert "50 batches in a row held no readable example" in err
    assert any(str(v) in err for v in victims) and "python -m vall_e.emb.qnt" in err


def test_a_signal_is_honoured_while_no_batch_can_be_drawn(tmp_path, prepared_corpus):
    proc, _ = _all_codes_unreadable_mid_run(tmp_path, prepared_corpus, patience=10**9)
    time.sleep(3)  # drawing bad batches by now, forever without the signal
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM received while drawing batches: checkpoint saved" in err
    assert (tmp_path / "ckpts" / "ar" / "latest").read_text().startswith("global_step")


# -- a full disk at checkpoint time -----------------------------------------------------------------


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_full_disk_at_save_is_a_message_and_keeps_the_last_checkpoint(tmp_path, prepared_corpus):
    """A real full file system (a small tmpfs) where the mount is allowed, else torch's own error, injected."""
    disk = tmp_path / "disk"
    mounted = _tmpfs(disk, "24m")
    try:
        fields = dict(max_iter=8, save_ckpt_every=2, log_every=1, max_num_val=0, ckpt_root=str(disk))
        if mounted:
            filler = disk / "filler"
            cfg_path = write_cfg(tmp_path, "ar", prepared_corpus, **{**fields, "max_iter": 2})
            assert run_train(cfg_path).returncode == 0  # one checkpoint fits; measure it, then leave room for ~1.5
            used = sum(f.stat().st_size for f in (disk / "ar").rglob("*") if f.is_file())
            free = shutil.disk_usage(disk).free
            filler.write_bytes(b"\0" * max(0, free - used // 2))
            cfg_path = write_cfg(tmp_path, "ar", prepared_corpus, **fields)
            proc = run_train(cfg_path)
        else:
            cfg_path = write_cfg(tmp_path, "ar", prepared_corpus, **fields)
            assert run_train(cfg_path, "max_iter=2").returncode == 0
            script = (
                "import sys, vall_e.train as train\n"
                "from vall_e.config import Config\n"
                "from vall_e.utils import engines\n"
                "build = engines.build_engine\n"
                "def failing(cfg, model):\n"
                "    engine = build(cfg, model)\n"
                "    def save(*a, **k):\n"
                "        raise RuntimeError('[enforce fail at inline_container.cc:664] . unexpected pos 832 vs 760')\n"
                "    engine.save_checkpoint = save\n"
                "    return engine\n"
                "engines.build_engine = failing\n"
                "raise SystemExit(train.train(Config.parse([f'yaml={sys.argv[1]}'])))\n"
            )
            proc = subprocess.run([sys.executable, "-c", script, str(cfg_path)], cwd=REPO, capture_output=True,
                                  text=True, timeout=300, stdin=subprocess.DEVNULL)
        err = _user_error(proc)
        assert "cannot write checkpoint global_step4" in err
        assert "the previous checkpoint" in err and "global_step2) is intact" in err
        assert (disk / "ar" / "latest").read_text().strip() == "global_step2"
        assert not list((disk / "ar").glob(".partial-*")), "the failed save must not stay behind"
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], capture_output=True)


# -- bad codes, damaged shards, loops in the tree ---------------------------------------------------


def test_out_of_range_codes_loops_and_a_damaged_shard_do_not_break_training(tmp_path, prepared_corpus):
    import torch

    from vall_e.corpus import read_codes_file

    corpus = tmp_path / "corpus"
    shutil.copytree(prepared_corpus, corpus, ignore=shutil.ignore_patterns(".vall_e"))
    victim = sorted(corpus.rglob("*.qnt.pt"))[0]
    codes = torch.load(victim, weights_only=True)
    codes[0, 3, 5] = 5000  # a code the embeddings do not have: used to crash training in embedding_bag
    torch.save(codes, victim)
    with pytest.raises(ValueError, match="holds the code 5000, outside 0..1023"):
        read_codes_file(victim)
    speaker = victim.parent
    (speaker / "loop").symlink_to("..", target_is_directory=True)  # a folder that contains itself
    (speaker / "self.qnt.pt").symlink_to("self.qnt.pt")  # a file link that loops

    cfg_path = write_cfg(tmp_path, "ar", corpus, max_iter=2, log_every=1, max_num_val=0)
    proc = run_train(cfg_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{victim}: holds the code 5000" in proc.stderr
    assert "a loop" in proc.stderr and "self" in proc.stderr

    shards = sorted((corpus / ".vall_e" / "shards").glob("*.bin"))
    assert shards
    data = shards[0].read_bytes()
    shards[0].write_bytes(data[: len(data) // 3])  # truncated, as a full disk or a killed copy leaves it
    proc = run_train(cfg_path, "max_iter=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "are damaged" in proc.stderr and "rebuilding the index" in proc.stderr
    assert "Traceback" not in proc.stderr
