"""scripts/bench_learning.py's pure parts and the generated sentences of scripts/make_corpus.py.

No training here: the benchmark itself trains for minutes. These check the numbers it reports are
computed right (length error, summary over seeds), that its training words are a valid config,
and that the corpus sentences are deterministic and keep training and unseen text apart.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from conftest import load_make_corpus, load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_learning")


@pytest.fixture(scope="module")
def mc():
    return load_make_corpus()


# ----------------------------------------------------------------------------------------------
# length error


def test_length_stats_math(bench):
    # |90-100|/100 = 0.1, |300-100|/100 = 2.0, |50-50|/50 = 0; mean 0.7
    stats = bench.length_stats([90, 300, 50], [100, 100, 50], [400, 400, 200])
    assert stats["len_error"] == pytest.approx((0.1 + 2.0 + 0.0) / 3)
    assert stats["len_ratio"] == pytest.approx((0.9 + 3.0 + 1.0) / 3)
    assert stats["stop_rate"] == 1.0


def test_length_stats_never_stopping_model_scores_cap_minus_one(bench):
    true = [120, 75, 300]
    caps = [bench.LEN_CAP * t for t in true]
    stats = bench.length_stats(caps, true, caps)  # every output ran to its cap
    assert stats["len_error"] == pytest.approx(bench.LEN_CAP - 1)
    assert stats["stop_rate"] == 0.0


def test_length_stats_rejects_bad_input(bench):
    with pytest.raises(ValueError):
        bench.length_stats([], [], [])
    with pytest.raises(ValueError):
        bench.length_stats([1, 2], [1], [4, 8])
    with pytest.raises(ValueError):
        bench.length_stats([1], [0], [4])


# ----------------------------------------------------------------------------------------------
# summary over seeds


def _run(model, arch, seed, **metrics):
    return {"model": model, "arch": arch, "seed": seed, **({"group_size": 1} if model == "ar" else {}), **metrics}


def test_summary_means_and_spreads_over_seeds(bench):
    runs = [
        _run("ar", "paper", 0, unseen_loss=4.0, len_error=0.5, seen_loss=3.0, wall_s=100.0),
        _run("ar", "paper", 1, unseen_loss=5.0, len_error=0.9, seen_loss=3.5, wall_s=120.0),
        _run("ar", "enhuiz", 0, unseen_loss=6.0, len_error=3.0, seen_loss=5.0),
        _run("nar", "paper", 0, unseen_loss=2.0, seen_loss=1.0),
        _run("nar", "paper", 1, unseen_loss=2.5, seen_loss=1.5),
    ]
    s = bench.summarize(runs)
    paper = s["ar"]["paper"]
    assert paper["unseen_loss"] == pytest.approx(4.5)
    assert paper["unseen_loss_spread"] == pytest.approx(1.0)
    assert paper["len_error"] == pytest.approx(0.7)
    assert paper["len_error_spread"] == pytest.approx(0.4)
    assert paper["seen_loss"] == pytest.approx(3.25)
    assert paper["wall_s"] == pytest.approx(110.0)
    assert paper["seeds"] == [0, 1]
    assert s["ar"]["enhuiz"]["unseen_loss_spread"] == 0.0  # one seed
    assert "wall_s" not in s["ar"]["enhuiz"]  # no run of the group has it
    nar = s["nar"]["paper"]
    assert nar["unseen_loss"] == pytest.approx(2.25) and nar["unseen_loss_spread"] == pytest.approx(0.5)
    assert "len_error" not in nar


def test_summary_skips_missing_values_and_keys_group_sizes_apart(bench):
    runs = [
        _run("ar", "paper", 0, unseen_loss=4.0, seen_voice_unseen_text_loss=None),
        _run("ar", "paper", 1, unseen_loss=6.0, seen_voice_unseen_text_loss=5.0),
        {**_run("ar", "paper", 0, unseen_loss=9.0), "group_size": 2},
    ]
    s = bench.summarize(runs)
    assert s["ar"]["paper"]["unseen_loss"] == pytest.approx(5.0)  # the G=2 run is not mixed in
    assert s["ar"]["paper"]["seen_voice_unseen_text_loss"] == pytest.approx(5.0)  # None left out of the mean
    assert s["ar"]["paper+g2"]["unseen_loss"] == pytest.approx(9.0)


# ----------------------------------------------------------------------------------------------
# training words, logs, flags


def _settings(bench, **kw):
    base = dict(archs=["paper", "enhuiz"], seeds=2, group_sizes=[1], speakers=4, held_out=2, sentences=12, unseen=4,
                steps_ar=40, steps_nar=30, preset="tiny", lr=1e-3, batch_size=8, jobs=2, device="cpu", quick=True)
    base.update(kw)
    return bench.Settings(**base)


@pytest.mark.parametrize("kind", ["ar", "nar"])
@pytest.mark.parametrize("arch", ["paper", "enhuiz"])
def test_train_words_are_a_valid_config(bench, tmp_path, kind, arch):
    from vall_e.config import Config

    settings = _settings(bench)
    words = bench.train_words(settings, arch, kind, 1, 1, tmp_path / "data", tmp_path / "runs")
    cfg = Config.from_cli(words)
    cfg.validate()
    assert cfg.arch == arch  # passed through as given
    assert cfg.prompt_mode == "paper"
    assert cfg.model == f"{kind}-tiny"
    assert cfg.seed == 1
    assert cfg.max_iter == (40 if kind == "ar" else 30)
    assert cfg.warmup_num_steps == settings.warmup(cfg.max_iter)
    assert cfg.data_dirs == [str(tmp_path / "data")]
    assert cfg.get_spkr(Path("a/101/1001/x.qnt.pt")) == "101"
    assert cfg.ckpt_dir == tmp_path / "runs" / "ckpts" / f"{arch}/{kind}/s1"
    assert not any(w.startswith("group_size=") for w in words)


def test_train_words_pass_group_size_to_the_ar_only(bench, tmp_path):
    settings = _settings(bench, group_sizes=[1, 2])
    ar = bench.train_words(settings, "paper", "ar", 0, 2, tmp_path, tmp_path)
    assert "group_size=2" in ar and "name=paper/ar-g2/s0" in ar
    nar = bench.train_words(settings, "paper", "nar", 0, 2, tmp_path, tmp_path)
    assert not any(w.startswith("group_size=") for w in nar)


def test_jobs_cover_every_arch_model_seed_and_group_size(bench):
    jobs = bench.build_jobs(_settings(bench, group_sizes=[1, 2], seeds=2))
    keys = [(j.kind, j.arch, j.group_size, j.seed) for j in jobs]
    assert len(keys) == len(set(keys)) == 2 * 2 * 2 + 2 * 2  # AR: arch x G x seed; NAR: arch x seed
    assert [k[0] for k in keys] == ["ar"] * 8 + ["nar"] * 4  # the long runs first


def test_train_log_stats_reads_the_trainers_json_lines(bench):
    text = "\n".join([
        "2026-01-01 00:00:00,000 - vall_e.train - INFO - model ar-tiny: 0.77M parameters; data {\"speakers\": 4}",
        '2026-01-01 00:00:01,000 - vall_e.utils.trainer - INFO - ' + json.dumps({"split": "train", "step": 1, "loss": 6.9}),
        '2026-01-01 00:00:02,000 - vall_e.utils.trainer - INFO - ' + json.dumps({"split": "val", "step": 2, "loss": 6.0}),
        '2026-01-01 00:00:03,000 - vall_e.utils.trainer - INFO - ' + json.dumps({"split": "train", "step": 2, "loss": 6.1,
                                                                                   "elapsed_s": 3.5}),
        "garbage {not json \"split\": \"train\"",
    ])
    stats = bench.train_log_stats(text)
    assert [s["step"] for s in stats] == [1, 2] and stats[-1]["elapsed_s"] == 3.5


def test_flag_parsers_reject_bad_values(bench):
    assert bench.parse_int_list("1,2", "--group-sizes") == [1, 2]
    assert bench.parse_archs("enhuiz") == ["enhuiz"]
    for bad in ("", "0", "1,1", "a", "2,-1"):
        with pytest.raises(bench.BenchError):
            bench.parse_int_list(bad, "--group-sizes")
    for bad in ("", "gpt", "paper,paper"):
        with pytest.raises(bench.BenchError):
            bench.parse_archs(bad)


def test_bad_flags_exit_2_with_a_message(bench, capsys):
    assert bench.main(["--arch", "gpt"]) == 2
    assert "--arch" in capsys.readouterr().err
    assert bench.main(["--speakers", "11", "--held-out", "2"]) == 2  # 13 voices; make_corpus has 12
    assert "distinct espeak-ng voices" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# evaluation choices


def _item(bench, speaker, n, frames=10):
    return bench.Item(f"{speaker}_{n}", speaker, ["AH0"], torch.zeros(frames, 8, dtype=torch.long),
                      f"c/{speaker}/ch/{speaker}_{n:03d}.qnt.pt")


def test_continuation_pairs_reference_another_utterance_of_the_same_voice(bench):
    items = [_item(bench, spk, n) for spk in ("109", "110") for n in range(3)] + [_item(bench, "111", 0)]
    pairs = bench.continuation_pairs(items)
    assert len(pairs) == 6  # every utterance of a voice with >= 2 is a target once; the lone one is not
    assert sorted(t.uid for _, t in pairs) == sorted(i.uid for i in items if i.speaker != "111")
    for ref, target in pairs:
        assert ref.speaker == target.speaker and ref.uid != target.uid


def test_seen_subset_is_fixed_and_balanced(bench):
    paths = [f"c/{spk}/ch/{spk}_{n:03d}.qnt.pt" for spk in ("101", "102", "103") for n in range(20)]
    subset = bench.seen_subset(paths, 4)
    assert len(subset) == 12
    assert {Path(p).parts[-3] for p in subset} == {"101", "102", "103"}
    assert bench.seen_subset(list(reversed(paths)), 4) == subset  # order of the input does not matter
    assert bench.seen_subset(paths, 100) == sorted(paths)  # fewer than asked: all of them


def test_nar_segment_follows_the_training_rule(bench):
    for frames in (7, 100, 450, 1000):
        start, length = bench.segment_of("101_1000_000001", frames)
        assert length == min(225, frames // 2)  # the paper's 3 s, at most half the utterance
        assert 0 <= start <= frames - length
        assert bench.segment_of("101_1000_000001", frames) == (start, length)


# ----------------------------------------------------------------------------------------------
# generated sentences (scripts/make_corpus.py)


def test_generated_sentences_are_deterministic_distinct_and_disjoint(mc):
    train, unseen = mc.generated_sentences(600, 40)
    assert (train, unseen) == mc.generated_sentences(600, 40)
    assert len(train) == 600 and len(unseen) == 40
    assert len(set(train)) == 600 and len(set(unseen)) == 40
    assert not set(train) & set(unseen)
    other_train, other_unseen = mc.generated_sentences(600, 40, seed=1)
    assert other_train != train and other_unseen != unseen


def test_generated_sentences_grow_by_prefix(mc):
    train, unseen = mc.generated_sentences(300, 30)
    more_train, more_unseen = mc.generated_sentences(900, 10)
    assert more_train[:300] == train  # a bigger corpus keeps the smaller one's sentences
    assert more_unseen == unseen[:10]  # and the unseen ones do not depend on the training size
    # a sentence is unseen or not by its text alone: no training sentence is ever an unseen one
    assert not set(more_train) & set(mc.generated_sentences(0, 200)[1])


def test_generated_sentences_have_the_intended_length_and_variety(mc):
    train, unseen = mc.generated_sentences(400, 50)
    est = [mc.estimate_phones(s) for s in train + unseen]
    assert min(est) >= mc.GENERATED_MIN_PHONES and max(est) <= mc.GENERATED_MAX_PHONES
    assert max(est) - min(est) >= 25  # varied, not one length
    ends = {s[-1] for s in train}
    assert ends == {".", "?", "!"}
    assert all(s[0].isupper() for s in train)
    assert not any(" a a" in s.lower() or " a o" in s.lower() for s in train)  # "an" before a vowel


def test_make_voices_places_each_speaker_by_index(mc, tmp_path):
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is required by the tests: apt-get install -y espeak-ng")
    texts = [["One short line."], ["Another line here.", "And a third."]]
    wavs = mc.make_voices(tmp_path, texts, first_speaker=8, jobs=2)
    rel = sorted(str(w.relative_to(tmp_path)) for w in wavs)
    assert rel == ["109/1008/109_1008_000001.wav", "110/1009/110_1009_000001.wav", "110/1009/110_1009_000002.wav"]
    assert all(w.stat().st_size > 1000 for w in wavs)
    assert (tmp_path / "110/1009/110_1009_000002.normalized.txt").read_text().strip() == "And a third."
    # a speaker's voice settings depend on its index, not on the call: speaker 9 alone sounds the same
    again = mc.make_voices(tmp_path / "again", [["Another line here."]], first_speaker=9)
    assert again[0].read_bytes() == wavs[1].read_bytes()


def test_random_is_not_touched_by_the_generator(mc):
    random.seed(123)
    expected = random.random()
    random.seed(123)
    mc.generated_sentences(50, 5)
    assert random.random() == expected  # its own Random: callers' streams stay theirs
