"""Shared fixtures: a fresh espeak-ng corpus, and a copy of it tokenized by the real tools.

Both fixtures are session-scoped and shared by every test: treat them as read-only (copy them
with ``shutil.copytree`` before changing anything). Training on a corpus writes its index into
``<corpus>/.vall_e/``: skip hidden folders when listing speakers.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]

# Tests never reach for the network: NLTK resources that are absent stay absent (the offline
# path), whatever machine runs them. Subprocesses inherit this.
os.environ.setdefault("VALL_E_NLTK_DOWNLOAD", "0")
# One intra-op thread per process (set OMP_NUM_THREADS to override). The test models are tiny, and
# on a small machine shared with other jobs, torch's spinning OpenMP threads made the suite about
# 3x slower than one thread (measured: qnt tests 95 s -> 27 s on 2 busy cores). Subprocesses
# inherit the variable; this process is already past torch's start-up read of it, hence set_num_threads.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as a module (scripts/ is not a package); one instance per process."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def load_make_corpus() -> ModuleType:
    """``scripts/make_corpus.py`` as a module."""
    return load_script("make_corpus")


@pytest.fixture(scope="session")
def espeak_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh LibriTTS-shaped corpus: 2 speakers x 4 short utterances (``<spk>/<chapter>/<id>.wav``
    + ``.normalized.txt``), espeak-ng audio at 22.05 kHz. Speaker = ``p.parts[-3]``."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is required by the tests: apt-get install -y espeak-ng")
    out = tmp_path_factory.mktemp("espeak_corpus")
    load_make_corpus().make_corpus(out, n_speakers=2, n_utts=4, seed=0, max_words=6)
    return out


@pytest.fixture(scope="session")
def prepared_corpus(espeak_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of :func:`espeak_corpus` with ``<id>.phn.txt`` (g2p) and ``<id>.qnt.pt`` (EnCodec
    codes ``(1, 8, T)`` from ``codec_weights=untrained``), written by the CLIs' library functions."""
    from vall_e.emb import g2p, qnt

    out = tmp_path_factory.mktemp("prepared") / "corpus"
    shutil.copytree(espeak_corpus, out)
    summary = g2p.phonemize_folder(out, progress=False)
    assert summary.ok and summary.written == 8, summary.report()
    summary = qnt.quantize_folder(out, codec_weights="untrained", device="cpu", progress=False)
    assert summary.ok and summary.written == 8, summary.report()
    return out


def train_tiny_models(corpus: Path, root: Path) -> dict[str, Path]:
    """Train ar-tiny and nar-tiny on ``corpus`` once per session (both at once); returns {kind: yaml path}.

    The first caller trains, later callers find ``root/done``.
    """
    cfgs = {}
    for kind in ("ar", "nar"):
        cfg = {
            "model": f"{kind}-tiny",
            "data_dirs": [str(corpus)],
            "spkr_name_getter": "lambda p: p.parts[-3]",
            "min_phones": 1,
            "max_phones": 400,
            "batch_size": 2,
            "eval_batch_size": 8,
            "max_num_val": 1,
            "max_val_ar_steps": 5,  # the end-of-run evaluation stays short
            "max_iter": 30,
            "warmup_num_steps": 5,
            "warmup_max_lr": 1e-3,
            "save_ckpt_every": 10_000,
            "eval_every": 10_000,
            "log_every": 10,
            "nj": 0,
            "device": "cpu",
            "codec_weights": "untrained",
            "ckpt_root": str(root / "ckpts"),
            "log_root": str(root / "logs"),
        }
        path = root / "config" / f"{kind}.yml"
        if not (root / "done").exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(cfg))
        cfgs[kind] = path
    if (root / "done").exists():
        return cfgs
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    procs = {}
    for kind, path in cfgs.items():
        procs[kind] = subprocess.Popen(
            [sys.executable, "-m", "vall_e.train", f"yaml={path}"], cwd=REPO, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
    for kind, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"training {kind} failed:\n{out[-4000:]}"
    (root / "done").touch()
    return cfgs


@pytest.fixture(scope="session")
def tiny_runs(prepared_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ar-tiny and nar-tiny trained 30 steps on :func:`prepared_corpus`: {kind: yaml path}."""
    return train_tiny_models(prepared_corpus, tmp_path_factory.getbasetemp() / "tiny_models")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: they gain nothing from threads, and on a shared
    CPU a busy second core stalls them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def mount_tmpfs(tmp_path: Path, options: str) -> "Iterator[Path]":
    """Yield a fresh tmpfs mounted with ``options`` under ``tmp_path`` (root only), unmounted afterwards;
    skips the test where mounting is not allowed. Use with ``yield from`` inside a fixture."""
    import uuid

    mnt = tmp_path / f"mnt-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
