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
from vall_e.utils import helpers
from vall_e.corpus import DataError, content_digest, open_index

REPO = Path(__file__).resolve().parents[1]
HOSTS = ["node0", "node1", "node1"]

# ----------------------------------------------------------------------------------------------
# content identity


def test_digest_ignores_copies_and_symbol_order_but_not_content(tmp_path, prepared_corpus):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(prepared_corpus, a, ignore=shutil.ignore_patterns(".vall_e"))
    shutil.copytree(prepared_corpus, b, ignore=shutil.ignore_patterns(".vall_e"))
    for q in b.rglob("*"):  # a copy made later: other mtimes
        os.utime(q, (time.time() + 100, time.time() + 100))
    ia, ib = open_index(a, progress=False), open_index(b, progress=False)
    assert ia.build_id != ib.build_id and ia.digest == ib.digest and len(ia.digest) == 32

    arrays = {k: np.asarray(getattr(ia, k)) for k in corpus._DIGEST_ARRAYS}
    symbols = list(ia.symbols)
    assert content_digest(ia.meta["dirs"], symbols, arrays) == ia.digest, "stored digest = recomputed digest"
    # the same phones under another numbering (an index that met the symbols in another order)
    flipped = dict(arrays, phones=(len(symbols) - 1 - arrays["phones"]).astype(np.uint16))
    assert content_digest(ia.meta["dirs"], symbols[::-1], flipped) == ia.digest
    shorter = dict(arrays, n_frames=arrays["n_frames"].copy())
    shorter["n_frames"][3] -= 1
    assert content_digest(ia.meta["dirs"], symbols, shorter) != ia.digest


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
    base = {"pid": os.getpid(), "host": socket.gethostname(), "boot": helpers.boot_id(),
            "pid_start": helpers.process_start(os.getpid()), "started": time.time() - 60, "token": "t"}
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
        lock.write_text(_owner(pid_start=(helpers.process_start(os.getpid()) or 0) + 12345))
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


# ----------------------------------------------------------------------------------------------
# many ranks on fake nodes

_SCRIPT = """
import json, os, sys
import torch.distributed as dist
import vall_e.corpus as corpus
from vall_e.config import Config
from vall_e.data import DataError, load_data

plan = json.loads(sys.argv[1])
dist.init_process_group("gloo")
rank = dist.get_rank()
os.environ["VALL_E_HOST_ID"] = plan["hosts"][rank]
builds = []
real_build = corpus._build
def counted(root, home, *args, **kwargs):
    builds.append(os.path.abspath(home))
    return real_build(root, home, *args, **kwargs)
corpus._build = counted
real_probe = corpus.leave_probe
for sc in plan["scenarios"]:
    builds.clear()
    corpus.leave_probe = (lambda home: None) if sc.get("no_probe") else real_probe  # as in a read-only folder
    os.chdir(sc["cwd"][rank])
    words = [f"data_dirs=[{','.join(sc['dirs'])}]", "spkr_name_getter=lambda p: p.parts[-3]", "min_phones=1",
             "max_phones=100000", "device=cpu", "nj=0"]
    if sc.get("index_root"):
        words.append(f"index_root={sc['index_root']}")
    try:
        bundle = load_data(Config.parse(words), progress=False)
        out = {"ok": True, "gens": [os.path.abspath(x.gen) for x in bundle.corpus.indexes], "train": len(bundle.train)}
    except DataError as e:
        out = {"ok": False, "error": str(e)}
    with open(os.path.join(plan["out"], f"rank{rank}.jsonl"), "a") as f:
        f.write(json.dumps({"scenario": sc["name"], "rank": rank, "builds": list(builds), **out}) + "\\n")
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def fake_nodes(tmp_path_factory, prepared_corpus) -> tuple[Path, dict[tuple[str, int], dict]]:
    """One 3-rank launch through every scenario; returns the work folder and each (scenario, rank)'s result.

    Every rank gets the same config, as in a real job. A node's local disk is its own working folder
    (``n0`` for node0, ``n1``... for node1), so a relative ``data_dirs`` or ``index_root`` names a
    different folder on each node, as the same absolute path does on real nodes.
    """
    work = tmp_path_factory.mktemp("nodes")

    def copy(dest: str) -> Path:
        out = work / dest
        shutil.copytree(prepared_corpus, out, ignore=shutil.ignore_patterns(".vall_e"))
        return out

    shared = copy("shared")
    for dest in ("n0/data/corpus", "n0/data/extra", "n1/data/corpus", "n1_other/data/corpus", "n1_broken/data/corpus"):
        copy(dest)
    sorted((work / "n1_other" / "data" / "corpus").rglob("*.qnt.pt"))[-1].unlink()  # node1's copy lacks an utterance
    q = sorted((work / "n1_broken" / "data" / "corpus").rglob("*.qnt.pt"))[0]
    shutil.copy(q, q.with_name(q.name.split(".")[0] + ".take2.qnt.pt"))  # node1's copy cannot be indexed
    nodes = lambda n1: [str(work / "n0"), str(work / n1), str(work / n1)]  # noqa: E731  per rank
    scenarios = [
        {"name": "shared", "dirs": [str(shared)], "cwd": nodes("n1")},
        {"name": "local_index", "dirs": [str(shared)], "index_root": "idx", "cwd": nodes("n1")},
        {"name": "copies", "dirs": ["data/corpus"], "cwd": nodes("n1")},
        {"name": "different", "dirs": ["data/corpus"], "cwd": nodes("n1_other")},
        {"name": "broken", "dirs": ["data/corpus"], "cwd": nodes("n1_broken")},
        {"name": "missing_folder", "dirs": ["data/corpus", "data/extra"], "cwd": nodes("n1")},
        {"name": "after_failures", "dirs": ["data/corpus"], "cwd": nodes("n1")},
        {"name": "no_probe_shared", "dirs": [str(shared)], "cwd": nodes("n1"), "no_probe": True},
        {"name": "no_probe_copies", "dirs": ["data/corpus"], "cwd": nodes("n1"), "no_probe": True,
         "index_root": "fresh"},
    ]
    script = work / "ranks.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3", str(script),
         json.dumps({"hosts": HOSTS, "scenarios": scenarios, "out": str(work)})],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = {}
    for rank in range(len(HOSTS)):
        for line in (work / f"rank{rank}.jsonl").read_text().splitlines():
            r = json.loads(line)
            results[(r["scenario"], r["rank"])] = r
    assert len(results) == 3 * len(scenarios), proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, results


def _all(results, scenario):
    return [results[(scenario, r)] for r in range(3)]


def test_a_shared_corpus_is_built_once_and_mapped_by_every_node(fake_nodes):
    work, results = fake_nodes
    ranks = _all(results, "shared")
    assert all(r["ok"] for r in ranks), ranks
    assert [len(r["builds"]) for r in ranks] == [1, 0, 0]
    assert {r["gens"][0] for r in ranks} == {str(work / "shared" / ".vall_e" / "g000001")}
    assert not list((work / "shared" / ".vall_e").glob(corpus.PROBE_PREFIX + "*")), "probes are removed"


def test_a_node_local_index_root_is_built_once_per_node(fake_nodes):
    work, results = fake_nodes
    ranks = _all(results, "local_index")
    assert all(r["ok"] for r in ranks), ranks
    assert len(ranks[0]["builds"]) == 1 and len(ranks[1]["builds"]) + len(ranks[2]["builds"]) == 1
    assert ranks[0]["gens"][0].startswith(str(work / "n0" / "idx"))
    assert ranks[1]["gens"] == ranks[2]["gens"] and ranks[1]["gens"][0].startswith(str(work / "n1" / "idx"))


def test_identical_node_local_copies_are_built_once_each_and_agree(fake_nodes):
    work, results = fake_nodes
    ranks = _all(results, "copies")
    assert all(r["ok"] for r in ranks), ranks
    assert len(ranks[0]["builds"]) == 1 and len(ranks[1]["builds"]) + len(ranks[2]["builds"]) == 1
    assert ranks[0]["gens"] == [str(work / "n0" / "data" / "corpus" / ".vall_e" / "g000001")]
    assert ranks[1]["gens"] == ranks[2]["gens"] == [str(work / "n1" / "data" / "corpus" / ".vall_e" / "g000001")]
    assert len({r["train"] for r in ranks}) == 1


def test_different_node_local_copies_stop_every_rank_naming_both(fake_nodes):
    work, results = fake_nodes
    ranks = _all(results, "different")
    assert not any(r["ok"] for r in ranks)
    message = ranks[0]["error"]
    assert all(r["error"] == message for r in ranks), "every rank stops with the same message"
    assert "do not train on the same corpus" in message
    gen = Path("data", "corpus", ".vall_e", "g000001")
    assert f"rank 0 on host 'node0' maps {work / 'n0' / gen} (8 utterances" in message
    assert f"ranks 1, 2 on host 'node1' map {work / 'n1_other' / gen} (7 utterances" in message


def test_a_failing_node_stops_every_rank_with_its_error(fake_nodes):
    _, results = fake_nodes
    ranks = _all(results, "broken")
    assert not any(r["ok"] for r in ranks)
    assert all("take2.qnt.pt" in r["error"] and "rename or remove one" in r["error"] for r in ranks)


def test_a_folder_missing_on_one_node_is_named(fake_nodes):
    _, results = fake_nodes
    ranks = _all(results, "missing_folder")
    assert not any(r["ok"] for r in ranks)
    assert all("every node needs every folder of data_dirs" in r["error"] for r in ranks)
    assert all("'data/extra'" in r["error"] for r in ranks)


def test_ranks_open_again_after_failures(fake_nodes):
    _, results = fake_nodes
    ranks = _all(results, "after_failures")
    assert all(r["ok"] for r in ranks) and not any(r["builds"] for r in ranks), "fresh indexes are reused"


def test_without_probes_ranks_compare_generations(fake_nodes):
    """Where rank 0 cannot leave a probe (a read-only index folder), the others compare its generation
    and build id with theirs once it is done: the same -> mapped; another (node-local) -> built."""
    work, results = fake_nodes
    shared = _all(results, "no_probe_shared")
    assert all(r["ok"] for r in shared) and not any(r["builds"] for r in shared)
    assert {r["gens"][0] for r in shared} == {str(work / "shared" / ".vall_e" / "g000001")}
    copies = _all(results, "no_probe_copies")
    assert all(r["ok"] for r in copies), copies
    assert len(copies[0]["builds"]) == 1 and len(copies[1]["builds"]) + len(copies[2]["builds"]) == 1
    assert copies[1]["gens"] == copies[2]["gens"] and copies[1]["gens"][0].startswith(str(work / "n1" / "fresh"))
