"""What a training draw is uniform over (``sample_by``), zero-shot ``val_dirs`` splits, and ``num_tokens``
applied at load from the index's per-utterance largest code."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vall_e.config import Config
from vall_e.corpus import BAD_CODES, current_generation, index_home, open_index
from vall_e.data import DataError, load_data, summarize
from vall_e.sampler import BucketBatchSampler, Draw

from test_data import _synthetic  # n_spk speakers of per LibriTTS-like utterances each

# ----------------------------------------------------------------------------------------------
# the sampler


def _unequal(counts=(2, 5, 50, 200), seed=1):
    """Speakers with very unequal numbers of utterances: rows, speaker starts, own costs, frames."""
    rng = np.random.default_rng(seed)
    starts = np.r_[0, np.cumsum(counts)]
    frames = np.clip(rng.lognormal(np.log(350), 0.6, int(starts[-1])), 75, 2600).astype(np.int64)
    return np.arange(int(starts[-1])), starts, frames + 60, frames


def _counts(sampler: BucketBatchSampler, n_rows: int, batches: int) -> np.ndarray:
    return np.bincount([d.index for k in range(batches) for d in sampler.batch(k)], minlength=n_rows)


def _chi_square(counts: np.ndarray) -> float:
    expected = counts.sum() / len(counts)
    return float(((counts - expected) ** 2 / expected).sum())


def test_speaker_sampling_is_bit_for_bit_what_it_was():
    """The digest of batches drawn by the sampler before ``unit`` existed (same inputs, every prompt kind,
    bucketed, plain and fixed-size batches, and a resume at batch 1,000,000)."""
    rows, starts, own, frames = _synthetic()
    out = []
    for prompt in ("speaker", "none", "segment"):
        for bb, bf in ((64, 9000), (0, 9000), (8, 0)):
            s = BucketBatchSampler(rows, starts, own, frames, batch_size=4, batch_frames=bf, bucket_batches=bb,
                                   seed=5, rank=1, prompt=prompt, unit="speaker")
            out.append(repr([s.batch(k) for k in (0, 1, 7, 1_000_000)]))
    assert hashlib.sha256("".join(out).encode()).hexdigest()[:16] == "fcdbdd3bd7312290"


@pytest.mark.parametrize("prompt,batch_frames,bucket_batches", [("speaker", 0, 0), ("speaker", 8000, 8), ("none", 8000, 8)])
def test_utterance_sampling_is_uniform_over_utterances(prompt, batch_frames, bucket_batches):
    rows, starts, own, frames = _unequal()
    m = len(rows)
    make = lambda unit: BucketBatchSampler(rows, starts, own, frames, batch_size=16, batch_frames=batch_frames,  # noqa: E731
                                           bucket_batches=bucket_batches, seed=7, prompt=prompt, unit=unit)
    sampler = make("utterance")
    by_utt = _counts(sampler, m, 1500)
    # Chi-square over 257 utterances: 256 degrees of freedom, mean 256, sd 22.6, for independent draws
    # (plain random batches). A bucketed batch is one length-sorted chunk of a pool holding each utterance
    # pool/m times on average, and copies of one utterance sit side by side: they come in clumps, which
    # multiplies the statistic's scale by about 1 + pool/m. Deterministic under the seed.
    clump = 1 + (sampler.pool_size / m if bucket_batches else 0)
    assert by_utt.min() > 0 and _chi_square(by_utt) < clump * (256 + 5 * 22.6), (_chi_square(by_utt), clump)
    share = np.add.reduceat(by_utt, starts[:-1]) / by_utt.sum()
    assert np.allclose(share, np.diff(starts) / m, atol=0.01), share  # each speaker in proportion to its utterances
    # the same statistic tells speaker sampling apart: its 2-utterance speaker is drawn 25x more per utterance
    by_spk = _counts(make("speaker"), m, 1500)
    assert _chi_square(by_spk) > 20 * _chi_square(by_utt)
    share = np.add.reduceat(by_spk, starts[:-1]) / by_spk.sum()
    assert np.allclose(share, 0.25, atol=0.02), share


def test_utterance_draws_keep_speaker_prompts_of_their_own_speaker():
    rows, starts, own, frames = _unequal()
    sampler = BucketBatchSampler(rows, starts, own, frames, batch_size=16, seed=2, unit="utterance", max_prompts=3)
    speaker = np.repeat(np.arange(len(starts) - 1), np.diff(starts))
    draws = [d for k in range(200) for d in sampler.batch(k)]
    for d in draws:
        assert d.prompts and d.index not in d.prompts and {int(speaker[p]) for p in d.prompts} == {int(speaker[d.index])}
    n_prompts = np.bincount([len(d.prompts) for d in draws], minlength=4)[1:] / len(draws)
    assert np.allclose(n_prompts, [0.2, 0.16, 0.64], atol=0.03)  # p_additional_prompt = 0.8, as in speaker mode


@pytest.mark.parametrize("unit", ["utterance", "speaker"])
@pytest.mark.parametrize("prompt", ["speaker", "segment"])
@pytest.mark.parametrize("bucket_batches", [64, 0])
def test_budget_is_never_exceeded_in_either_unit(unit, prompt, bucket_batches):
    rows, starts, own, frames = _synthetic()
    budget = 12_000
    sampler = BucketBatchSampler(rows, starts, own, frames, batch_size=8, batch_frames=budget, prompt=prompt,
                                 bucket_batches=bucket_batches, seed=3, unit=unit)
    row = {int(r): i for i, r in enumerate(rows.tolist())}
    pads = []
    for k in range(300):
        batch = sampler.batch(k)
        lens = [int(own[row[d.index]]) + sum(int(frames[row[p]]) for p in d.prompts) + (d.segment[1] if d.segment else 0)
                for d in batch]
        assert batch and len(lens) * max(lens) <= budget
        pads.append(1 - sum(lens) / (len(lens) * max(lens)))
    if bucket_batches:
        assert np.mean(pads) < 0.05  # bucketing works the same whatever the unit


def test_utterance_sampling_resumes_in_o1():
    rows, starts, own, frames = _unequal()
    make = lambda **kw: BucketBatchSampler(rows, starts, own, frames, batch_size=4, batch_frames=9000, seed=5,  # noqa: E731
                                           unit="utterance", **kw)
    it = iter(make(rank=1))
    drawn = [next(it) for _ in range(600)]
    resumed = iter(make(rank=1, start_batch=590))
    assert [next(resumed) for _ in range(10)] == drawn[590:]
    assert drawn[:20] != [make(rank=0).batch(k) for k in range(20)], "ranks must differ"
    far = make(rank=1, start_batch=1_000_000)
    assert next(iter(far)) == far.batch(1_000_000) == make(rank=1).batch(1_000_000)


def test_unknown_unit_is_refused():
    rows, starts, own, frames = _unequal()
    with pytest.raises(ValueError, match="unit='song'"):
        BucketBatchSampler(rows, starts, own, frames, batch_size=4, unit="song")


# ----------------------------------------------------------------------------------------------
# corpora written here: speakers with chosen names, random codes, chosen phones

SYMBOLS = ["AA1", "B", "D", "IY0", "K", "S", "T", "_"]


def write_corpus(root: Path, speakers: dict[str, int], seed: int, extra_symbol: str | None = None,
                 num_tokens: int = 1024) -> Path:
    """``root/<speaker>/<speaker>_c/<speaker>_<i>.{qnt.pt,phn.txt}``: int16 codes ``(1, 8, 60..400)`` below
    ``num_tokens`` and 12..40 phones from :data:`SYMBOLS` (plus ``extra_symbol`` in every utterance when given)."""
    rng = np.random.default_rng(seed)
    for spk, n in speakers.items():
        d = root / spk / f"{spk}_c"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            codes = torch.from_numpy(rng.integers(0, num_tokens, (1, 8, int(rng.integers(60, 400))), dtype=np.int16))
            torch.save(codes, d / f"{spk}_{i:03d}.qnt.pt")
            phones = list(rng.choice(SYMBOLS, int(rng.integers(12, 40)))) + ([extra_symbol] if extra_symbol else [])
            (d / f"{spk}_{i:03d}.phn.txt").write_text(" ".join(phones))
    return root


def cfg_for(data: list[Path], val: list[Path] | None = None, **fields) -> Config:
    words = [f"data_dirs=[{','.join(map(str, data))}]", f"val_dirs=[{','.join(map(str, val or []))}]",
             "spkr_name_getter=lambda p: p.parts[-3]", "min_phones=1", "max_phones=1000", "device=cpu", "nj=0"]
    return Config.parse(words + [f"{k}={v}" for k, v in fields.items()])


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    """``train``: 5 speakers (3 to 60 utterances); ``dev``: 3 other speakers, one of them using a phone
    training never has; ``nested``: the two as ``nested/train`` and ``nested/dev``."""
    root = tmp_path_factory.mktemp("corpora")
    train = write_corpus(root / "train", {"s1": 60, "s2": 30, "s3": 12, "s4": 5, "s5": 3}, seed=0)
    dev = write_corpus(root / "dev", {"v1": 8, "v2": 6}, seed=1)
    write_corpus(dev, {"v3": 4}, seed=2, extra_symbol="ZH9")
    shutil.copytree(train, root / "nested" / "train")
    shutil.copytree(dev, root / "nested" / "dev")
    return {"train": train, "dev": dev, "nested": root / "nested"}


def _names(bundle, rows) -> set[str]:
    return {bundle.spkr_names[s] for s in bundle.spk[np.asarray(rows, dtype=np.int64)].tolist()}


@pytest.mark.parametrize("prompt_mode", ["speaker", "paper"])
def test_val_dirs_give_a_zero_shot_val_split(corpora, prompt_mode):
    bundle = load_data(cfg_for([corpora["train"]], [corpora["dev"]], prompt_mode=prompt_mode, max_num_val=9,
                               batch_frames=4000), progress=False)
    train_spk, val_spk = {"s1", "s2", "s3", "s4", "s5"}, {"v1", "v2", "v3"}
    assert len(bundle.train) == 110, "with val_dirs training keeps every utterance (no 5% hold-out)"
    assert _names(bundle, bundle.train) == train_spk and set(bundle.val_speakers) == val_spk
    assert len(bundle.val) == 18 and bundle.val_from_dirs and bundle.val_zero_shot
    val_rows = set(bundle.val.tolist())
    for split, speakers in (("val", val_spk), ("subtrain", train_spk)):
        draws = bundle.eval_draws(split)
        assert draws and _names(bundle, [d.index for d in draws]) <= speakers
        for d in draws:
            assert (d.index in val_rows) == (split == "val")
            if prompt_mode == "speaker":  # prompts: other utterances of the same speaker, from the same split
                assert d.prompts and d.index not in d.prompts
                assert _names(bundle, d.prompts) == _names(bundle, [d.index])
                assert all((p in val_rows) == (split == "val") for p in d.prompts)
    # the first val examples cycle through the val speakers
    assert _names(bundle, [d.index for d in bundle.eval_draws("val")[:3]]) == val_spk
    # training never draws a val utterance, as example or prompt
    sampler = bundle.sampler(0)
    for k in range(200):
        for d in sampler.batch(k):
            assert d.index not in val_rows and not set(d.prompts) & val_rows
    # the loader serves val examples with their speaker (what the evaluator logs per split)
    batch = next(iter(bundle.eval_loader("val")))
    assert batch["bad"] == [] and set(batch["spkr_name"]) <= val_spk and len(batch["text"]) > 0
    summary = summarize(bundle)
    assert summary["val_speakers"] == 3 and summary["val_zero_shot"] is True and summary["val_from"] == "val_dirs"
    assert summary["speakers"] == 5 and summary["sample_by"] == "speaker"


def test_val_only_phones_are_in_the_phone_map(corpora, caplog):
    bundle = load_data(cfg_for([corpora["train"]], [corpora["dev"]]), progress=False)
    assert "ZH9" in bundle.phone_map
    v3 = [r for r in bundle.val.tolist() if bundle.spkr_names[bundle.spk[r]] == "v3"]
    ds = bundle.dataset(np.array(v3))
    example = ds[bundle.eval_draws("val")[[d.index for d in bundle.eval_draws("val")].index(v3[0])]]
    assert int(example["text"][-2]) == bundle.phone_map["ZH9"]  # <s> ... ZH9 </s>
    # resuming a model whose phone map lacks it: those val utterances are left out, training is untouched
    old_map = {k: v for k, v in bundle.phone_map.items() if k != "ZH9"}
    with caplog.at_level("WARNING"):
        resumed = load_data(cfg_for([corpora["train"]], [corpora["dev"]]), phone_map=old_map, progress=False)
    assert "4 val utterances hold phones ['ZH9']" in caplog.text
    assert set(resumed.val_speakers) == {"v1", "v2"} and np.array_equal(resumed.train, bundle.train)


def test_a_val_folder_inside_a_data_folder_is_never_trained_on(corpora, caplog):
    nested = corpora["nested"]
    with caplog.at_level("INFO"):
        bundle = load_data(cfg_for([nested], [nested / "dev"]), progress=False)
    assert "18 utterances of data_dirs lie inside val_dirs folders" in caplog.text
    assert bundle.report.in_val_dirs == 18 and len(bundle.train) == 110
    assert _names(bundle, bundle.train) == {"s1", "s2", "s3", "s4", "s5"} and bundle.val_zero_shot
    paths = lambda rows: {str(bundle.corpus.qnt_path(r)) for r in rows}  # noqa: E731
    assert not any("/dev/" in p for p in paths(bundle.train)) and all("/dev/" in p for p in paths(bundle.val))
    # a data folder that is (or lies inside) a val folder would leave nothing seen: refused, naming both
    with pytest.raises(DataError, match=r"data_dirs folder .*train' lies inside the val_dirs folder .*nested'"):
        load_data(cfg_for([nested / "train"], [nested]), progress=False)


def test_shared_speakers_make_val_not_zero_shot(corpora, tmp_path, caplog):
    dev = tmp_path / "dev"
    shutil.copytree(corpora["dev"], dev, ignore=shutil.ignore_patterns(".vall_e"))
    write_corpus(dev, {"s1": 4}, seed=3)  # a training speaker in the val folder
    with caplog.at_level("WARNING"):
        bundle = load_data(cfg_for([corpora["train"]], [dev]), progress=False)
    assert not bundle.val_zero_shot and summarize(bundle)["val_zero_shot"] is False
    assert "1 val_dirs speakers also speak in data_dirs (s1)" in caplog.text


def test_missing_or_empty_val_folders_are_named(corpora, tmp_path):
    with pytest.raises(DataError, match=r"val_dirs folder '.*nowhere' does not exist"):
        load_data(cfg_for([corpora["train"]], [tmp_path / "nowhere"]), progress=False)
    (tmp_path / "empty" / "x").mkdir(parents=True)
    with pytest.raises(DataError, match=r"(?s)no utterance is left for the val split in the val_dirs folder '.*empty'"
                                        r".*<id>.qnt.pt files found: 0"):
        load_data(cfg_for([corpora["train"]], [tmp_path / "empty"]), progress=False)
    # the rules apply to val folders too, and the message says which one emptied it
    unphonemized = write_corpus(tmp_path / "unphonemized", {"v9": 3}, seed=6)
    for phn in unphonemized.rglob("*.phn.txt"):
        phn.unlink()
    with pytest.raises(DataError, match=r"(?s)val_dirs folder '.*unphonemized'.*no <id>.phn.txt beside the codes: 3"):
        load_data(cfg_for([corpora["train"]], [unphonemized]), progress=False)


def test_sample_by_reaches_the_sampler_and_the_summary(corpora):
    for fields, unit in (({}, "speaker"), ({"arch": "paper"}, "utterance"), ({"arch": "paper", "sample_by": "speaker"},
                                                                                "speaker"), ({"sample_by": "utterance"},
                                                                                             "utterance")):
        bundle = load_data(cfg_for([corpora["train"]], **fields), progress=False)
        assert bundle.sampler(0).unit == unit and summarize(bundle)["sample_by"] == unit
        assert summarize(bundle)["val_from"].startswith("held-out") and not bundle.val_from_dirs


# ----------------------------------------------------------------------------------------------
# num_tokens


def test_num_tokens_is_applied_at_load_without_a_rebuild(tmp_path, caplog):
    corpus = write_corpus(tmp_path / "c", {"a": 6, "b": 6}, seed=4, num_tokens=512)
    victim = corpus / "a" / "a_c" / "a_002.qnt.pt"
    codes = torch.load(victim, weights_only=True)
    codes[0, 5, 7] = 700
    torch.save(codes, victim)
    full = load_data(cfg_for([corpus]), progress=False)
    gen = current_generation(index_home(corpus))
    assert len(full.train) + len(full.val) == 12
    with caplog.at_level("WARNING"):
        small = load_data(cfg_for([corpus], num_tokens=512), progress=False)
    assert current_generation(index_home(corpus)) == gen, "changing num_tokens must not rebuild the index"
    assert f"{victim}: holds the code 700, outside 0..511" in caplog.text and "num_tokens=512" in caplog.text
    assert small.report.out_of_range == 1 and len(small.train) + len(small.val) == 11
    assert str(victim) not in {str(small.corpus.qnt_path(r)) for r in np.r_[small.train, small.val]}
    # reading files directly (pack_codes=false) checks the same bound
    ds = load_data(cfg_for([corpus], num_tokens=512, pack_codes="false"), progress=False).dataset()
    row = next(i for i in range(len(full.corpus)) if full.corpus.qnt_path(i) == victim)
    bad = ds[Draw(row, ())]
    assert "holds the code 700" in bad["error"] and str(victim) in bad["bad"]


def test_codes_the_index_cannot_store_are_refused_when_it_is_built(tmp_path, caplog):
    corpus = write_corpus(tmp_path / "c", {"a": 4}, seed=5)
    files = sorted(corpus.rglob("*.qnt.pt"))
    for path, code in ((files[0], 40_000), (files[1], -3)):
        codes = torch.load(path, weights_only=True).to(torch.int64)
        codes[0, 0, 0] = code
        torch.save(codes, path)
    with caplog.at_level("WARNING"):
        index = open_index(corpus, progress=False)
    status = {index.qnt_path(i): int(index.status[i]) for i in range(len(index))}
    assert status[files[0]] == status[files[1]] == BAD_CODES and status[files[2]] == 0
    assert f"{files[0]}: holds the code 40000, outside 0..32767" in caplog.text
    assert f"{files[1]}: holds the code -3" in caplog.text
    assert int(index.max_code[[i for i in range(len(index)) if index.qnt_path(i) == files[2]][0]]) == int(
        torch.load(files[2], weights_only=True).max())


# ----------------------------------------------------------------------------------------------
# a run with val_dirs, laid out as the LibriTTS recipes expect


def test_a_run_evaluates_the_zero_shot_val_split(tmp_path, prepared_corpus):
    from test_train import run_train, stats, write_cfg

    root = tmp_path / "LibriTTS"
    shutil.copytree(prepared_corpus, root, ignore=shutil.ignore_patterns(".vall_e"))
    # dev-clean inside the training root, as scripts/prepare_libritts.py lays it out: speaker 901 is unseen
    shutil.copytree(prepared_corpus / "101", root / "dev-clean" / "901", ignore=shutil.ignore_patterns(".vall_e"))
    cfg_path = write_cfg(tmp_path, "ar", root, val_dirs=[str(root / "dev-clean")], max_iter=4, eval_every=4,
                         save_ckpt_every=4, max_num_val=2, max_val_ar_steps=5)
    proc = run_train(cfg_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(re.search(r"parameters; data (\{.*\})", proc.stderr).group(1))
    assert summary["val_from"] == "val_dirs" and summary["val_zero_shot"] is True and summary["val_speakers"] == 1
    assert summary["speakers"] == 2 and summary["train_utterances"] == 8 and summary["sample_by"] == "speaker"
    val = stats(tmp_path / "logs", "val")
    assert val and val[-1]["step"] == 4 and val[-1]["n"] == 2 and 0.0 <= val[-1]["gen_match"] <= 1.0
    assert stats(tmp_path / "logs", "subtrain")[-1]["n"] == 2
    written = {p.name.split(".")[0] for p in (tmp_path / "logs").rglob("eval/step4/val/*.hyp.wav")}
    assert written and all(name.startswith("101_") for name in written)  # 901's files keep 101's ids
    assert "4 utterances of data_dirs lie inside val_dirs folders: never trained on" in proc.stderr


def test_recipes_take_val_from_the_dev_clean_that_prepare_libritts_lays_out(tmp_path):
    from conftest import REPO, load_script

    prep = load_script("prepare_libritts")
    for recipe in sorted((REPO / "config" / "LibriTTS").glob("*.yml")):
        cfg = Config.build(recipe)
        assert [Path(d) for d in cfg.val_dirs] == [prep.RECIPE_ROOT / prep.VAL_SUBSET], recipe
        assert [Path(d) for d in cfg.data_dirs] == [prep.RECIPE_ROOT], recipe
    root = tmp_path / "LibriTTS"
    (root / "train-clean-100").mkdir(parents=True)
    notes = prep.recipe_notes(root)
    assert any("add --subsets dev-clean" in n for n in notes)
    assert any(f"data_dirs=[{root}] val_dirs=[{root / 'dev-clean'}]" in n for n in notes)
    (root / "dev-clean").mkdir()
    (root / "test-clean").mkdir()
    notes = prep.recipe_notes(root)
    assert not any("add --subsets" in n for n in notes) and any(n.startswith("warning: test-clean") for n in notes)


def test_an_index_of_the_previous_version_is_rebuilt_once(tmp_path, caplog):
    corpus = write_corpus(tmp_path / "c", {"a": 3}, seed=7)
    first = open_index(corpus, progress=False)
    meta = first.gen / "meta.json"
    old = json.loads(meta.read_text())
    old["version"] = 2
    meta.write_text(json.dumps(old))
    (first.gen / "max_code.npy").unlink()  # version 2 had no such column
    with caplog.at_level("INFO"):
        again = open_index(corpus, progress=False)
    assert again.gen.name == "g000002" and "has version 2, this program writes 3: rebuilding it once" in caplog.text
    assert "cannot be read" not in caplog.text
    assert open_index(corpus, progress=False).gen.name == "g000002"
