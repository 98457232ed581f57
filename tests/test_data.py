"""The data engine: corpus index (build, refresh, packed codes), splits, bucketed sampler, loaders."""

from __future__ import annotations

import importlib.util
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vall_e.config import Config
from vall_e.corpus import current_generation, index_home, open_index
from vall_e.data import DataError, collate, load_codes, load_data, sequence_lengths
from vall_e.sampler import BucketBatchSampler, min_prompt_frames

REPO = Path(__file__).resolve().parents[1]


def _bench() -> object:
    spec = importlib.util.spec_from_file_location("bench_data", REPO / "scripts" / "bench_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fabricated(tmp_path_factory) -> Path:
    """600 fabricated LibriTTS-shaped utterances (random codes, real files), 4 speakers."""
    return _bench().fabricate(tmp_path_factory.mktemp("fab"), 600, progress=False)


def cfg_for(corpus: Path, **fields) -> Config:
    words = [f"data_dirs=[{corpus}]", "spkr_name_getter=lambda p: p.parts[-3]", "min_phones=1", "max_phones=100000",
             "device=cpu", "nj=0"]
    return Config.parse(words + [f"{k}={v}" for k, v in fields.items()])


# ----------------------------------------------------------------------------------------------
# index


def test_index_refreshes_on_add_remove_change_only(tmp_path, prepared_corpus):
    corpus = tmp_path / "corpus"
    shutil.copytree(prepared_corpus, corpus, ignore=shutil.ignore_patterns(".vall_e"))
    home = index_home(corpus)
    first = open_index(corpus, progress=False)
    assert len(first) == 8 and first.gen.name == "g000001" and first.packed
    assert open_index(corpus, progress=False).gen.name == "g000001", "an unchanged tree must not rebuild"

    qnts = sorted(corpus.rglob("*.qnt.pt"))
    # added: a new utterance (another speaker's codes under a new id)
    shutil.copy(qnts[0], qnts[0].with_name("zz_new.qnt.pt"))
    shutil.copy(qnts[0].with_name(qnts[0].name.replace(".qnt.pt", ".phn.txt")), qnts[0].with_name("zz_new.phn.txt"))
    added = open_index(corpus, progress=False)
    assert len(added) == 9 and added.gen.name == "g000002"
    # changed in place (same name, other content): re-read, the packed codes follow the file
    codes = torch.load(qnts[1], weights_only=True)
    with open(qnts[1], "r+b") as f:  # in place, as an editor or a copy without rename would
        f.truncate(0)
        torch.save(codes[:, :, :7].clone(), f)
    changed = open_index(corpus, progress=False)
    assert changed.gen.name == "g000003"
    row = [i for i in range(len(changed)) if changed.qnt_path(i) == qnts[1]][0]
    assert changed.n_frames[row] == 7 and np.array_equal(changed.codes(row), codes[0, :, :7].t().numpy())
    # removed
    qnts[2].unlink()
    removed = open_index(corpus, progress=False)
    assert len(removed) == 8 and qnts[2] not in [removed.qnt_path(i) for i in range(len(removed))]
    # only the live generation and the one before it are kept; no shard is orphaned
    gens = sorted(p.name for p in home.iterdir() if p.name.startswith("g"))
    assert gens == ["g000003", "g000004"]
    live = {s[0] for g in gens for s in __import__("json").loads((home / g / "meta.json").read_text())["shards"]}
    assert {p.name for p in (home / "shards").iterdir()} == live
    # forced rebuild
    assert open_index(corpus, rebuild=True, progress=False).gen.name == "g000005"


def test_packed_codes_equal_the_files_for_any_integer_dtype(tmp_path, prepared_corpus):
    corpus = tmp_path / "corpus"
    shutil.copytree(prepared_corpus, corpus, ignore=shutil.ignore_patterns(".vall_e"))
    qnts = sorted(corpus.rglob("*.qnt.pt"))
    for q, dtype in zip(qnts, [torch.int64, torch.int16, torch.int32, torch.int64]):
        torch.save(torch.load(q, weights_only=True).to(dtype), q)
    index = open_index(corpus, progress=False)
    for i in range(len(index)):
        expect = load_codes(index.qnt_path(i))
        assert expect.dtype == torch.int64 and expect.shape[1] == 8
        packed = torch.from_numpy(index.codes(i).astype(np.int64))
        assert torch.equal(packed, expect) and index.n_frames[i] == len(expect)
    bundle = load_data(cfg_for(corpus))
    ds = bundle.dataset()
    assert len(pickle.dumps(ds)) < 4000, "a dataloader worker must receive paths, not the index"
    again = pickle.loads(pickle.dumps(ds))
    draw = bundle.sampler(0).batch(0)[0]
    a, b = ds[draw], again[draw]
    assert all(torch.equal(a[k], b[k]) for k in ("text", "proms", "resps"))


def test_bad_files_are_skipped_and_named_at_index_time(tmp_path, prepared_corpus, caplog):
    corpus = tmp_path / "corpus"
    shutil.copytree(prepared_corpus, corpus, ignore=shutil.ignore_patterns(".vall_e"))
    qnts = sorted(corpus.rglob("*.qnt.pt"))
    qnts[0].write_bytes(b"not a tensor")
    torch.save(torch.zeros(2, 3, dtype=torch.long), qnts[1])
    qnts[2].with_name(qnts[2].name.replace(".qnt.pt", ".phn.txt")).unlink()
    with caplog.at_level("WARNING"):
        bundle = load_data(cfg_for(corpus))
    assert str(qnts[0].name) in caplog.text and "cannot be loaded" in caplog.text
    assert str(qnts[1].name) in caplog.text and "(1, 8, T)" in caplog.text
    assert bundle.report.unreadable == 2 and bundle.report.no_phones == 1
    # that speaker is left with one utterance (no prompt possible): only the other speaker's 4 remain
    assert bundle.report.lonely_speaker_utts == 1 and len(bundle.train) + len(bundle.val) == 4


def test_collision_of_ids_names_both_files(tmp_path, prepared_corpus):
    corpus = tmp_path / "corpus"
    shutil.copytree(prepared_corpus, corpus, ignore=shutil.ignore_patterns(".vall_e"))
    q = sorted(corpus.rglob("*.qnt.pt"))[0]
    uid = q.name.split(".")[0]
    shutil.copy(q, q.with_name(f"{uid}.take2.qnt.pt"))
    with pytest.raises(DataError, match=rf"{uid}\.qnt\.pt.*{uid}\.take2\.qnt\.pt"):
        load_data(cfg_for(corpus))


def test_filters_and_split_need_no_rebuild_and_split_is_stable(fabricated):
    full = load_data(cfg_for(fabricated))
    gen = current_generation(index_home(fabricated))
    short = load_data(cfg_for(fabricated, max_seconds=6.0, min_phones=20))
    assert current_generation(index_home(fabricated)) == gen
    assert short.report.too_long > 0 and short.report.too_few_phones > 0
    assert (short.n_frames[short.train] <= 6 * 75).all()
    # about 5% of every speaker goes to val; no utterance is in both
    assert not set(full.train.tolist()) & set(full.val.tolist())
    for s in np.unique(full.spk[full.train]):
        n_val, n_train = int((full.spk[full.val] == s).sum()), int((full.spk[full.train] == s).sum())
        assert 0.01 < n_val / (n_val + n_train) < 0.12
    # the split of an utterance depends on its path only: filtering others out keeps it where it was
    val_paths = {str(full.corpus.qnt_path(r)) for r in full.val}
    kept_train = {str(short.corpus.qnt_path(r)) for r in short.train}
    assert not val_paths & kept_train


# ----------------------------------------------------------------------------------------------
# sampler


def _synthetic(n_spk=40, per=30, seed=0):
    rng = np.random.default_rng(seed)
    frames = np.clip(rng.lognormal(np.log(350), 0.6, n_spk * per), 75, 2600).astype(np.int64)
    phones = np.round(frames / 75 * 13.5).astype(np.int64)
    starts = np.arange(0, n_spk * per + 1, per)
    return np.arange(n_spk * per) + 1000, starts, phones + 4 + frames, frames


@pytest.mark.parametrize("bucket_batches", [64, 0])
def test_budget_is_never_exceeded(bucket_batches):
    rows, starts, own, frames = _synthetic()
    budget = 12_000
    cost_of = dict(zip(rows.tolist(), frames.tolist()))
    own_of = dict(zip(rows.tolist(), own.tolist()))
    sampler = BucketBatchSampler(rows, starts, own, frames, batch_size=8, batch_frames=budget,
                                 bucket_batches=bucket_batches, seed=3)
    pads = []
    for k in range(300):
        batch = sampler.batch(k)
        lens = [own_of[d.index] + sum(cost_of[p] for p in d.prompts) for d in batch]
        assert batch and len(lens) * max(lens) <= budget
        pads.append(1 - sum(lens) / (len(lens) * max(lens)))
    if bucket_batches:
        assert np.mean(pads) < 0.05
    else:
        assert np.mean(pads) > 0.15  # the baseline the bucketing is measured against


def test_batches_are_speaker_balanced_with_valid_prompts():
    rows, starts, own, frames = _synthetic(n_spk=2, per=30)
    # speaker 0 has 8 utterances, speaker 1 has 30: still drawn equally often
    rows, starts, own, frames = rows[22:], np.array([0, 8, 38]), own[22:], frames[22:]
    sampler = BucketBatchSampler(rows, starts, own, frames, batch_size=16, seed=1, max_prompts=3)
    draws = [d for k in range(100) for d in sampler.batch(k)]
    small = np.mean([d.index < rows[8] for d in draws])
    assert 0.4 < small < 0.6
    for d in draws:
        group = set(rows[:8].tolist()) if d.index < rows[8] else set(rows[8:].tolist())
        assert d.index not in d.prompts and set(d.prompts) <= group and 1 <= len(d.prompts) <= 3
    n_prompts = np.bincount([len(d.prompts) for d in draws], minlength=4)[1:] / len(draws)
    assert np.allclose(n_prompts, [0.2, 0.16, 0.64], atol=0.05)  # p_additional_prompt = 0.8


def test_resume_at_a_large_batch_equals_drawing_up_to_it():
    rows, starts, own, frames = _synthetic()
    make = lambda **kw: BucketBatchSampler(rows, starts, own, frames, batch_size=4, batch_frames=9000, seed=5, **kw)  # noqa: E731
    it = iter(make(rank=1))
    drawn = [next(it) for _ in range(3000)]
    resumed = iter(make(rank=1, start_batch=2990))
    assert [next(resumed) for _ in range(10)] == drawn[2990:]
    assert drawn[:50] != [next(iter(make(rank=0, start_batch=k))) for k in range(50)], "ranks must differ"
    far = make(rank=1, start_batch=1_000_000)
    assert next(iter(far)) == far.batch(1_000_000)


def test_min_prompt_frames_excludes_the_utterance_itself():
    frames = np.array([5, 9, 7, 3, 3])
    assert min_prompt_frames(np.array([0, 3, 5]), frames).tolist() == [7, 5, 5, 3, 3]


def test_over_long_utterances_are_left_out_and_reported(fabricated, caplog):
    with caplog.at_level("WARNING"):
        bundle = load_data(cfg_for(fabricated, batch_frames=1500))
    assert bundle.report.over_budget > 0 and "cannot fit batch_frames=1500" in caplog.text
    sampler = bundle.sampler(0)
    for k in range(50):
        batch = sampler.batch(k)
        costs = [int(bundle.own_cost(np.array([d.index]))[0] + bundle.n_frames[list(d.prompts)].sum()) for d in batch]
        assert len(costs) * max(costs) <= 1500


def test_loader_workers_leave_ctrl_c_to_the_main_process(fabricated):
    """Ctrl-C reaches the whole process group: a worker must survive it, or the batch it was handing
    over is lost and the main process fails before the save it is about to make."""
    import signal

    bundle = load_data(cfg_for(fabricated, batch_frames=6000, nj=1))
    it = iter(bundle.train_loader(rank=0, start_batch=0))
    first = next(it)
    (worker,) = it._workers
    for sig in (signal.SIGINT, signal.SIGTERM):
        os.kill(worker.pid, sig)
    time.sleep(0.5)
    assert worker.is_alive()
    for _ in range(6):  # past the batches prefetched before the signals
        assert next(it)["resps"]
    assert first["resps"]
    it._shutdown_workers()


def test_loader_batches_match_the_sampler_and_report_lengths(fabricated):
    bundle = load_data(cfg_for(fabricated, batch_frames=6000))
    loader = bundle.train_loader(rank=0, start_batch=7)
    batch = next(iter(loader))
    draws = bundle.sampler(0, 7).batch(7)
    assert batch["path"] == [str(bundle.corpus.qnt_path(d.index)) for d in draws] and batch["bad"] == []
    lens = sequence_lengths(batch)
    assert len(lens) * max(lens) <= 6000
    for d, t, r in zip(draws, batch["text"], batch["resps"]):
        assert len(t) == bundle.n_phones[d.index] + 2 and len(r) == bundle.n_frames[d.index]
    assert collate([{"bad": "x", "error": "x: broken"}])["bad"] == [("x", "x: broken")]


def test_dirs_check_sees_new_files_and_the_cli_builds(tmp_path, prepared_corpus):
    corpus = tmp_path / "corpus"
    shutil.copytree(prepared_corpus, corpus, ignore=shutil.ignore_patterns(".vall_e"))
    proc = subprocess.run([sys.executable, "-m", "vall_e.corpus", str(corpus), "index_check=dirs"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "8 utterances" in proc.stdout and "g000001 (packed)" in proc.stdout
    assert open_index(corpus, check="dirs", progress=False).gen.name == "g000001"
    q = sorted(corpus.rglob("*.qnt.pt"))[0]
    shutil.copy(q, q.with_name("extra.qnt.pt"))  # a new file changes its folder's mtime
    assert open_index(corpus, check="dirs", progress=False).gen.name == "g000002"
    assert open_index(corpus, check="off", progress=False).gen.name == "g000002"
