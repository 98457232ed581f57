"""Corpus indexes on many nodes: one build per filesystem, agreed content, and locks without flock.

The multi-rank tests start 3 gloo ranks with ``torch.distributed.run`` on this machine and give them
fake host ids (``VALL_E_HOST_ID``): rank 0 is ``node0``, ranks 1 and 2 are ``node1``. A "node-local
copy" is a folder only the ranks of one fake host are pointed at.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from vall_e import corpus
from vall_e.corpus import DataError, open_index

REPO = Path(__file__).resolve().parents[1]
HOSTS = ["node0", "node1", "node1"]

# ----------------------------------------------------------------------------------------------
# the build lock where flock does not work


@pytest.fixture
def no_flock(monkeypatch):
    """flock fails as on Lustre without ``-o flock`` / NFS without a lock manager."""
    import fcntl

    def refuse(*args, **kwargs):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    monkeypatch.setattr(corpus, "_logged_mechanisms", set())
    monkeypatch.setattr(corpus, "_LOCK_POLL_S", 0.02)


def _owner(**fields) -> str:
    base = {"pid": os.getpid(), "host": socket.gethostname(), "boot": corpus._boot_id(),
            "pid_start": corpus._pid_start(os.getpid()), "started": time.time() - 60, "token": "t"}
    return json.dumps({**base, **fields})


def test_without_flock_the_index_builds_under_a_lock_file_said_once(tmp_path, prepared_corpus, no_flock, caplog):
    root = tmp_path / "corpus"
    shutil.copytree(prepared_corpus, root, ignore=shutil.ignore_patterns(".vall_e"))
    with caplog.at_level("INFO", logger="vall_e.corpus"):
        first = open_index(root, progress=False)
        again = open_index(root, rebuild=True, progress=False)
    assert len(first) == 8 and again.gen.name == "g000002"
    assert caplog.text.count("flock does not work") == 1 and corpus.OWNER_FILE in caplog.text
    assert not (corpus.index_home(root) / corpus.OWNER_FILE).exists(), "the lock file goes with its holder"


def test_without_flock_a_second_builder_waits_then_takes_its_turn(tmp_path, no_flock):
    home = tmp_path / "home"
    held, release = threading.Event(), threading.Event()
    order = []

    def first():
        with corpus._build_lock(home):
            held.set()
            release.wait(10)
            order.append("first out")

    def second():
        with corpus._build_lock(home):
            order.append("second in")

    a = threading.Thread(target=first)
    a.start()
    assert held.wait(10)
    owner = json.loads((home / corpus.OWNER_FILE).read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    b = threading.Thread(target=second)
    b.start()
    time.sleep(0.3)
    assert order == [], "the second builder must wait while the first holds the lock"
    with pytest.raises(DataError, match=r"being built by pid \d+ on host .* gave up after"):
        with corpus._build_lock(home, timeout=0.1):  # a bounded wait refuses instead
            pass
    release.set()
    a.join(10)
    b.join(10)
    assert order == ["first out", "second in"]
    assert not (home / corpus.OWNER_FILE).exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("why", ["dead pid", "reused pid", "rebooted", "unfinished file"])
def test_without_flock_a_stale_lock_of_this_host_is_taken_over(tmp_path, no_flock, caplog, monkeypatch, why):
    home = tmp_path / "home"
    home.mkdir()
    lock = home / corpus.OWNER_FILE
    if why == "dead pid":
        lock.write_text(_owner(pid=_dead_pid()))
    elif why == "reused pid":  # our own pid, but it started at another time: it named another process
        lock.write_text(_owner(pid_start=(corpus._pid_start(os.getpid()) or 0) + 12345))
    elif why == "rebooted":
        lock.write_text(_owner(boot="an-earlier-boot"))
    else:  # a holder that died between creating and writing the file
        lock.write_text("")
        old = time.time() - 2 * corpus._GARBLED_STALE_S
        os.utime(lock, (old, old))
    with caplog.at_level("WARNING", logger="vall_e.corpus"):
        with corpus._build_lock(home, timeout=5):
            assert json.loads(lock.read_text())["token"] != "t"
    assert "removed the stale index build lock" in caplog.text
    assert not lock.exists() and not list(home.glob("*.stale-*"))


def test_without_flock_another_hosts_lock_is_left_alone_and_named(tmp_path, no_flock, caplog):
    home = tmp_path / "home"
    home.mkdir()
    lock = home / corpus.OWNER_FILE
    lock.write_text(_owner(host="gpu-node-17", pid=_dead_pid()))  # dead here says nothing about there
    with caplog.at_level("WARNING", logger="vall_e.corpus"), pytest.raises(DataError) as e:
        with corpus._build_lock(home, timeout=0.2):
            pass
    for text in (str(e.value), caplog.text):
        assert "'gpu-node-17'" in text and f"delete {lock} by hand" in text
    assert lock.exists()
