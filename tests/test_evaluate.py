"""``python -m vall_e.evaluate``: test lists, prompts, the offline metric backends on espeak-ng speech,
the three rows end to end with tiny trained models, resuming, and user errors.

Real recognition (PocketSphinx) and real speaker embeddings (Resemblyzer), offline. The codec is
``untrained``, so the codec and model rows are not speech: their numbers only prove the pipeline.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from vall_e import evaluate as ev
from vall_e import metrics
from vall_e.export import export

SPK = "spkr_name_getter=lambda p: p.parts[-3]"  # LibriTTS-shaped espeak corpus: <spk>/<chapter>/<id>.wav
OFFLINE = ["--asr", "pocketsphinx", "--speaker", "resemblyzer", "--device", "cpu", "--no-progress", "codec_weights=untrained"]


@pytest.fixture(scope="session")
def eval_zoo(tiny_runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Exported ``ar.pt`` / ``nar.pt`` of the session's tiny models (as tests/test_synthesis.py's zoo)."""
    out = tmp_path_factory.mktemp("eval_zoo")
    for kind, cfg in tiny_runs.items():
        export(out / f"{kind}.pt", Path(yaml.safe_load(cfg.read_text())["ckpt_root"]) / kind)
    return {"ar": out / "ar.pt", "nar": out / "nar.pt"}


class Calls:
    """Counts the expensive calls (synthesis, recognition, embedding) made through the backends."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        from vall_e.inference import Synthesizer

        self.n = {"synth": 0, "asr": 0, "emb": 0}
        for cls, name, key in ((Synthesizer, "synthesize_batch", "synth"), (metrics.PocketSphinxASR, "transcribe", "asr"),
                               (metrics.ResemblyzerSpeaker, "embed", "emb")):
            real = getattr(cls, name)

            def spy(self_, *a, _real=real, _key=key, **kw):
                self.n[_key] += 1
                return _real(self_, *a, **kw)

            monkeypatch.setattr(cls, name, spy)

    def reset(self) -> dict[str, int]:
        n, self.n = self.n, {k: 0 for k in self.n}
        return n


# --------------------------------------------------------------------------------------------
# text normalization and WER


def test_normalizer_and_word_errors():
    n = metrics.normalize_text
    assert n("HELLO, World!  It's") == "hello world it's"
    assert n("In 1984 the 3rd of 42 cats (50%) & co.") == \
        "in one thousand nine hundred eighty four the third of forty two cats fifty percent and co"
    assert n("'Quoted' well-known 2.5 1,000 1920s 007") == \
        "quoted well known two point five one thousand one thousand nine hundred twenties zero zero seven"
    assert n("\u201cSmart\u201d quotes \u2019n\u2019 dashes\u2014too") == "smart quotes n dashes too"
    e = metrics.word_errors("The cat sat on the mat.", "the cat sat on a hat and")
    assert (e.ref_words, e.substitutions, e.deletions, e.insertions) == (6, 2, 0, 1) and e.wer == pytest.approx(0.5)
    assert metrics.word_errors("one two", "").wer == 1.0 and metrics.word_errors("One, two!", "one two").wer == 0.0
    assert metrics.corpus_wer([metrics.word_errors("a b c d", "a b c d"), metrics.word_errors("e f", "x")]) == pytest.approx(2 / 6)


# --------------------------------------------------------------------------------------------
# test lists and prompts


def _librispeech_like(root: Path, corpus: Path, durations: dict[str, list[float]]) -> None:
    """A LibriSpeech-shaped folder (``<spk>/<chapter>/<spk>-<chapter>-<n>.flac`` + ``.trans.txt``) of
    espeak audio tiled or cut to the given durations (16 kHz flac, as LibriSpeech)."""
    wavs = sorted(corpus.rglob("*.wav"))
    speech = np.concatenate([sf.read(str(w), dtype="float32")[0] for w in wavs])  # 22.05 kHz
    speech = torch.from_numpy(speech)
    import torchaudio.functional as AF

    speech = AF.resample(speech, 22050, 16000).numpy()
    k = 0
    for spk, secs in durations.items():
        chapter = root / spk / "777"
        chapter.mkdir(parents=True)
        lines = []
        for i, s in enumerate(secs):
            uid = f"{spk}-777-{i:04d}"
            n = int(round(s * 16000))
            audio = np.resize(np.roll(speech, -k * 7919), n)
            k += 1
            sf.write(str(chapter / f"{uid}.flac"), audio, 16000, subtype="PCM_16")
            lines.append(f"{uid} WORDS OF UTTERANCE {uid.replace('-', ' ')}")
        (chapter / f"{spk}-777.trans.txt").write_text("\n".join(lines[::-1]) + "\n")  # file order is not list order


def test_list_builder_librispeech_is_deterministic_and_filters_4_to_10_s(espeak_corpus: Path, tmp_path: Path):
    ls = tmp_path / "LibriSpeech" / "test-clean"
    _librispeech_like(ls, espeak_corpus, {"61": [3.5, 4.0, 7.2, 10.0, 10.5], "1089": [2.0, 5.5, 9.9, 12.0]})
    utts = ev.build_list(ls)
    assert [u.id for u in utts] == ["1089-777-0001", "1089-777-0002", "61-777-0001", "61-777-0002", "61-777-0003"]
    assert all(4.0 <= u.seconds <= 10.0 for u in utts) and {u.speaker for u in utts} == {"61", "1089"}
    assert utts[0].text == "WORDS OF UTTERANCE 1089 777 0001"

    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    assert ev.main([str(ls), "--make-list", str(a)]) == 0
    assert ev.main([str(ls), "--make-list", str(b)]) == 0
    assert a.read_bytes() == b.read_bytes()
    lines = a.read_text().splitlines()
    assert lines[0] == "\t".join(ev.LIST_COLUMNS) and len(lines) == 6
    assert lines[1].split("\t")[1] == "LibriSpeech/test-clean/1089/777/1089-777-0001.flac"  # relative to the list
    assert ev.read_list(a) == utts  # the list round-trips
    # filters and seeded subsets are deterministic too
    wide = ev.build_list(ls, min_seconds=0, max_seconds=0)
    assert len(wide) == 9
    sub = ev.build_list(ls, 0, 0, max_utterances=4, seed=3)
    assert sub == ev.build_list(ls, 0, 0, max_utterances=4, seed=3) and len(sub) == 4
    assert sub == sorted(sub, key=lambda u: (u.speaker, u.id))


def test_prepare_librispeech_script_downloads_unpacks_and_lists(espeak_corpus: Path, tmp_path: Path):
    """scripts/prepare_librispeech.py from a local mirror: the archive's list equals the folder's."""
    import importlib.util
    import tarfile

    src = tmp_path / "src" / "LibriSpeech" / "test-clean"
    _librispeech_like(src, espeak_corpus, {"61": [4.5, 11.0], "1089": [6.0]})
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    with tarfile.open(mirror / "test-clean.tar.gz", "w:gz") as tar:
        tar.add(src.parent, arcname="LibriSpeech")
    spec = importlib.util.spec_from_file_location(
        "prepare_librispeech", Path(__file__).resolve().parents[1] / "scripts" / "prepare_librispeech.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "list.tsv"
    assert mod.main(["--root", str(tmp_path / "data"), "--downloads", str(tmp_path / "dl"), "--mirror", str(mirror),
                     "--list", str(out), "--no-progress"]) == 0
    assert [u.id for u in ev.read_list(out)] == ["1089-777-0000", "61-777-0000"]
    assert [(u.text, u.seconds) for u in ev.read_list(out)] == [(u.text, u.seconds) for u in ev.build_list(src)]


def test_list_from_corpus_layout(espeak_corpus: Path, tmp_path: Path):
    utts = ev.build_list(espeak_corpus, 0, 0, "lambda p: p.parts[-3]")
    assert len(utts) == 8 and len({u.speaker for u in utts}) == 2
    assert all(u.audio.is_file() and u.text and u.seconds > 0.5 for u in utts)
    out = tmp_path / "l.tsv"
    assert ev.main([str(espeak_corpus), "--make-list", str(out), "--min-seconds", "0", SPK]) == 0
    assert ev.read_list(out) == utts


def test_prompt_plans():
    U = lambda uid, spk, s: ev.Utterance(uid, Path(f"/x/{uid}.flac"), f"text {uid}", spk, s)  # noqa: E731
    utts = [U("a1", "a", 5.0), U("a2", "a", 8.0), U("a3", "a", 2.5), U("b1", "b", 6.0), U("c1", "c", 4.0)]
    cross = ev.plan_prompts(utts, "cross", 0, 3.0)
    assert set(cross) == {"a1", "a2", "a3"}  # b and c have one utterance each: no other one to prompt with
    for uid, p in cross.items():
        src = next(u for u in utts if u.id == p.source)
        assert p.source != uid and src.speaker == "a"
        if src.seconds > 3:
            assert 0 <= p.start <= src.seconds - 3 and p.end == pytest.approx(p.start + 3)
        else:
            assert p.whole
    assert cross == ev.plan_prompts(list(reversed(utts)), "cross", 0, 3.0)  # order-independent, seeded
    assert any(cross[k] != v for k, v in ev.plan_prompts(utts, "cross", 1, 3.0).items())
    ref = ev.plan_prompts(utts, "reference", 0, 3.0)
    assert {k: v.source for k, v in ref.items()} == {"a1": "a3", "a2": "a1", "a3": "a2"}  # i-1, the first takes the last
    assert all(p.whole for p in ref.values())
    cont = ev.plan_prompts(utts, "continual", 0, 3.0)
    assert set(cont) == {"a1", "a2", "b1", "c1"} and all(p.source == k and p.end == 3.0 for k, p in cont.items())


# --------------------------------------------------------------------------------------------
# end to end


def test_rows_end_to_end_and_resume(espeak_corpus: Path, eval_zoo: dict[str, Path], tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    calls = Calls(monkeypatch)
    out = tmp_path / "eval"
    args = [str(espeak_corpus), "--out", str(out), "--ar-ckpt", str(eval_zoo["ar"]), "--nar-ckpt", str(eval_zoo["nar"]),
            "--min-seconds", "0", "--runs", "1", "--max-ar-steps", "20", *OFFLINE, SPK]
    assert ev.main(args) == 0
    first = calls.reset()
    assert first["synth"] == 1 and 2 * 8 < first["asr"] <= 3 * 8  # one batch of 8; every row transcribed (empty outputs are not)
    res = json.loads((out / "results.json").read_text())
    for row in ("ground_truth", "codec", "model"):
        assert isinstance(res[row]["wer"], float) and -1 <= res[row]["sim"] <= 1 and res[row]["utterances"] == 8
    gt = res["ground_truth"]
    # real recognition: the real audio is closer to its own transcript than to another utterance's
    assert gt["wer"] < gt["wer_shuffled_text"]
    # real speaker embeddings: same-speaker prompts are closer than another speaker's
    assert gt["sim"] > gt["sim_other_speaker"] + 0.05
    print(f"\nGT WER {gt['wer']:.3f} vs shuffled {gt['wer_shuffled_text']:.3f}; "
          f"SIM same speaker {gt['sim']:.3f} vs other speaker {gt['sim_other_speaker']:.3f}; "
          f"codec {res['codec']['wer']:.3f}/{res['codec']['sim']:.3f}; model {res['model']['wer']:.3f}/{res['model']['sim']:.3f}")
    assert res["backends"]["comparable_with_paper"] is False and "pocketsphinx" in res["backends"]["asr"]
    assert res["settings"]["mode"] == "cross" and res["settings"]["codec_weights"] == "untrained"
    assert res["model"]["runs"] == 1 and res["model"]["seconds_generated"] > 0
    md = (out / "results.md").read_text()
    assert "| ground_truth |" in md and "| model |" in md and "NO (offline" in md
    with open(out / "utterances.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24 and {r["row"] for r in rows} == {"ground_truth", "codec", "model"}
    for r in rows:
        if r["row"] != "ground_truth":
            info = sf.info(str(out / r["wav"]))  # the generated audio is there to listen to
            assert info.samplerate == 24_000 and info.frames > 0
    assert len(list((out / "prompts").glob("*.wav"))) == 8

    # the same command again: nothing new is synthesized, transcribed or embedded; same results
    capsys.readouterr()
    assert ev.main(args) == 0
    assert calls.reset() == {"synth": 0, "asr": 0, "emb": 0}
    assert json.loads((out / "results.json").read_text()) == res
    assert "new work: 0 syntheses, 0 transcriptions, 0 embeddings" in capsys.readouterr().out

    # a changed model setting recomputes the model row only, never reusing its stale items
    assert ev.main([*args[:-len(OFFLINE) - 1], "--max-ar-steps", "12", *OFFLINE, SPK]) == 0
    n = calls.reset()
    assert n["synth"] == 1 and 0 < n["asr"] <= 8
    res2 = json.loads((out / "results.json").read_text())
    assert res2["ground_truth"] == res["ground_truth"] and res2["settings"]["sampling"]["max_ar_steps"] == 12
    assert "8 cached item(s) from other settings recomputed" in capsys.readouterr().out


def test_reference_mode_best_of(espeak_corpus: Path, eval_zoo: dict[str, Path], tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch):
    calls = Calls(monkeypatch)
    out = tmp_path / "ref"
    assert ev.main([str(espeak_corpus), "--out", str(out), "--ar-ckpt", str(eval_zoo["ar"]), "--nar-ckpt",
                    str(eval_zoo["nar"]), "--rows", "model", "--mode", "reference", "--best-of", "2", "--runs", "2",
                    "--max-utterances", "4", "--min-seconds", "0", "--max-ar-steps", "10", *OFFLINE, SPK]) == 0
    assert calls.n["synth"] == 2 * 2  # runs x samples, one batch each
    res = json.loads((out / "results.json").read_text())
    assert set(res) >= {"model", "settings", "backends"} and "ground_truth" not in res
    assert res["model"]["runs"] == 2 and len(res["model"]["wer_runs"]) == 2
    assert res["model"]["wer"] == pytest.approx(sum(res["model"]["wer_runs"]) / 2, abs=1e-5)
    # reference ordering: each utterance is prompted by the previous one of its speaker (a speaker with
    # one utterance in the subset has no prompt and is left out)
    utts = ev.select(ev.build_list(espeak_corpus, 0, 0, "lambda p: p.parts[-3]"), 0, 0, 4, 0)
    plan = ev.plan_prompts(utts, "reference", 0, 3.0)
    assert len(plan) >= 2 and res["test_set"]["utterances"] == len(plan)
    recs = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert len(recs) == 2 * len(plan)
    for r in recs:
        assert len(r["samples"]) == 2 and r["wer"] == min(s["wer"] for s in r["samples"])
        assert all((out / s["file"]).is_file() for s in r["samples"])
    assert {r["id"]: r["prompt"] for r in recs} == {k: v.source for k, v in plan.items()}


# --------------------------------------------------------------------------------------------
# backends and errors


def test_closed_vocabulary_asr_is_labelled(espeak_corpus: Path):
    utts = ev.build_list(espeak_corpus, 0, 0, "lambda p: p.parts[-3]")
    vocab = metrics.vocabulary_of([u.text for u in utts])
    asr = metrics.load_asr("pocketsphinx-vocab", vocabulary=vocab)
    assert "CLOSED" in asr.describe() and "not paper-comparable" in asr.describe()
    wav, sr = sf.read(str(utts[0].audio), dtype="float32")
    hyp = asr.transcribe(torch.from_numpy(wav), sr)
    assert set(hyp.split()) <= set(vocab)


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask:UserWarning")
def test_wavlm_backend_loads_a_local_model(tmp_path: Path):
    """The default speaker backend's real loading path, on a tiny random WavLM x-vector model saved here."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.WavLMConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, conv_dim=(32, 32),
        conv_stride=(5, 4), conv_kernel=(10, 4), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        tdnn_dim=(32, 32), tdnn_kernel=(3, 1), tdnn_dilation=(1, 1), xvector_output_dim=16, num_buckets=32,
        max_bucket_distance=64)
    torch.manual_seed(0)
    transformers.WavLMForXVector(cfg).save_pretrained(tmp_path / "wavlm")
    transformers.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, return_attention_mask=True).save_pretrained(tmp_path / "wavlm")
    spk = metrics.load_speaker(f"wavlm:{tmp_path / 'wavlm'}")
    e = spk.embed(torch.randn(2, 24_000), 24_000)
    assert e.shape == (16,) and float(e.norm()) == pytest.approx(1.0, abs=1e-5)
    assert spk.describe() == f"wavlm:{tmp_path / 'wavlm'}"


def _error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert ev.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: " in err
    return err


def test_user_errors(espeak_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    out = ["--out", str(tmp_path / "o")]
    assert "no such test list or folder" in _error(capsys, [str(tmp_path / "nope"), *out, *OFFLINE])
    assert "both --ar-ckpt and --nar-ckpt" in _error(capsys, [str(espeak_corpus), *out, "--ar-ckpt", "a.pt", *OFFLINE])
    assert "python -m vall_e.export" in _error(capsys, [str(espeak_corpus), *out, "--ar-ckpt", "a.pt", "--nar-ckpt", "n.pt", *OFFLINE])
    assert "widen the range" in _error(capsys, [str(espeak_corpus), *out, *OFFLINE, SPK])  # all < 4 s
    bad = tmp_path / "bad.tsv"
    bad.write_text("id\taudio\n")
    assert "--make-list" in _error(capsys, [str(bad), *out, *OFFLINE])

    # the paper's backends cannot download here: say what to fetch, or which offline backend to use
    import torchaudio

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(type(torchaudio.pipelines.HUBERT_ASR_LARGE), "get_model", offline)
    err = _error(capsys, [str(espeak_corpus), *out, "--min-seconds", "0", "--speaker", "resemblyzer", SPK])
    assert "hubert_fairseq_large_ll60k_asr_ls960.pth" in err and "--asr pocketsphinx" in err
    transformers = pytest.importorskip("transformers")
    monkeypatch.setattr(transformers.AutoFeatureExtractor, "from_pretrained", offline)
    err = _error(capsys, [str(espeak_corpus), *out, "--min-seconds", "0", "--asr", "pocketsphinx", SPK])
    assert "wavlm" in err and "--speaker resemblyzer" in err


def test_continual_mode(espeak_corpus: Path, eval_zoo: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """VALL-E-continual: the utterance's own first seconds are the prompt; the saved audio is prompt +
    continuation, transcribed against the whole transcript; SIM compares what follows the prompt."""
    from vall_e.inference import Synthesizer

    seen = []
    real = Synthesizer.synthesize_batch

    def spy(self, requests, **kw):
        seen.append((list(requests), kw))
        return real(self, requests, **kw)

    monkeypatch.setattr(Synthesizer, "synthesize_batch", spy)
    out = tmp_path / "cont"
    assert ev.main([str(espeak_corpus), "--out", str(out), "--ar-ckpt", str(eval_zoo["ar"]), "--nar-ckpt",
                    str(eval_zoo["nar"]), "--rows", "ground_truth,model", "--mode", "continual", "--prompt-seconds", "1",
                    "--runs", "1", "--max-utterances", "3", "--min-seconds", "0", "--max-ar-steps", "15", *OFFLINE, SPK]) == 0
    (requests, kw), = seen
    assert all(r.continual and r.ref_text is None for r in requests) and kw["prompt_seconds"] == 1.0
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["mode"] == "continual" and res["model"]["utterances"] == 3
    recs = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    for r in recs:
        assert r["prompt"] == r["id"]  # its own beginning
        if r["row"] == "model":
            assert sf.info(str(out / r["wav"])).duration >= 1.0  # 1 s of prompt, then the continuation
    prompt = out / "prompts" / f"{recs[0]['id']}.wav"
    assert sf.info(str(prompt)).duration == pytest.approx(1.0, abs=0.01)


def test_paper_mode_models_get_whole_prompt_utterances_with_transcripts(
        espeak_corpus: Path, eval_zoo: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An AR trained with prompt_mode=paper needs the prompt's transcript: cross-utterance requests carry the
    whole prompt utterance and its text (a documented deviation from the 3 s crop)."""
    from vall_e.inference import Synthesizer

    monkeypatch.setattr(Synthesizer, "needs_ref_text", property(lambda self: True))
    seen = []
    real = Synthesizer.synthesize_batch

    def spy(self, requests, **kw):
        seen.extend(requests)
        return real(self, requests, **kw)

    monkeypatch.setattr(Synthesizer, "synthesize_batch", spy)
    out = tmp_path / "paper"
    assert ev.main([str(espeak_corpus), "--out", str(out), "--ar-ckpt", str(eval_zoo["ar"]), "--nar-ckpt",
                    str(eval_zoo["nar"]), "--rows", "model", "--runs", "1", "--max-utterances", "4", "--min-seconds", "0",
                    "--max-ar-steps", "10", *OFFLINE, SPK]) == 0
    utts = {u.id: u for u in ev.build_list(espeak_corpus, 0, 0, "lambda p: p.parts[-3]")}
    by_text = {u.text: u for u in utts.values()}
    assert seen
    for r in seen:
        src = next(u for u in utts.values() if u.audio == Path(r.ref_wav))
        assert r.ref_text == src.text and src.speaker == by_text[r.text].speaker and src.id != by_text[r.text].id
    assert json.loads((out / "results.json").read_text())["settings"]["needs_ref_text"] is True
