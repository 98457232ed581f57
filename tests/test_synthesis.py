"""Zero-shot synthesis from exported tiny models (trained here on CPU), through the API and the CLI.

The codec is ``untrained`` (offline), so the audio is not speech: these tests check the pipeline,
shapes, reproducibility and errors, not quality.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF

from vall_e.__main__ import main
from vall_e.emb import qnt
from vall_e.export import InferenceFileError, export
from vall_e.inference import Request, SynthesisError, Synthesizer, UnknownPhonesError

REPO = Path(__file__).resolve().parents[1]
STEPS = 20  # AR frames per output: the tiny models rarely stop on their own
FAST = ["--max-ar-steps", str(STEPS), "--device", "cpu", "codec_weights=untrained"]


@pytest.fixture(scope="session")
def zoo(tiny_runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Exported ``ar.pt`` / ``nar.pt`` of the tiny models."""
    cfgs = tiny_runs
    out = tmp_path_factory.mktemp("zoo")
    import yaml

    for kind, cfg in cfgs.items():
        ckpt_dir = Path(yaml.safe_load(cfg.read_text())["ckpt_root"]) / kind
        export(out / f"{kind}.pt", ckpt_dir)
    return {"ar": out / "ar.pt", "nar": out / "nar.pt"}


@pytest.fixture(scope="session")
def synth(zoo) -> Synthesizer:
    return Synthesizer(zoo["ar"], zoo["nar"], device="cpu", codec_weights="untrained")


@pytest.fixture(scope="session")
def utts(prepared_corpus: Path) -> list[tuple[Path, str]]:
    """(wav, transcript) of every corpus utterance, speaker 101 first."""
    wavs = sorted(prepared_corpus.rglob("*.wav"))
    return [(w, w.with_name(w.name.split(".")[0] + ".normalized.txt").read_text().strip()) for w in wavs]


def ckpt_args(zoo) -> list[str]:
    return ["--ar-ckpt", str(zoo["ar"]), "--nar-ckpt", str(zoo["nar"])]


def test_api_same_seed_same_wav(synth, zoo, utts):
    (ref, _), (_, text) = utts[0], utts[1]
    a = synth.synthesize(text, ref, seed=7, max_ar_steps=STEPS)
    b = synth.synthesize(text, ref, seed=7, max_ar_steps=STEPS)
    assert a.sample_rate == 24_000 and a.seed == 7
    assert a.codes.shape[1] == 8 and 1 <= len(a.codes) <= STEPS
    assert a.wav.shape == (1, len(a.codes) * qnt.HOP_LENGTH) and torch.isfinite(a.wav).all()
    assert torch.equal(a.wav, b.wav)
    c = synth.synthesize(text, ref, seed=8, max_ar_steps=STEPS)
    assert not torch.equal(a.codes, c.codes)
    assert a.phones[:1] != ["<s>"] and "_" in a.phones

    import vall_e  # the one-call API: lazily exported, same result for the same seed

    wav, sr = vall_e.synthesize(text, ref, zoo["ar"], zoo["nar"], device="cpu", codec_weights="untrained",
                                seed=7, max_ar_steps=STEPS)
    assert sr == 24_000 and torch.equal(wav, a.wav)


def test_cli_writes_wav_and_is_reproducible_across_processes(zoo, utts, tmp_path, capsys):
    (ref, _), (_, text) = utts[0], utts[1]
    out = tmp_path / "sub" / "out.wav"
    proc = subprocess.run(
        [sys.executable, "-m", "vall_e", text, str(ref), str(out), *ckpt_args(zoo), "--seed", "3", *FAST],
        cwd=REPO, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # as in this process (one_thread)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = sf.info(str(out))
    assert info.samplerate == 24_000 and info.channels == 1 and info.subtype == "PCM_16"
    assert str(out) in proc.stdout and "real-time factor" in proc.stdout and "seed 3" in proc.stdout
    assert f"{info.frames / 24_000:.2f} s" in proc.stdout
    assert "NOT speech" in proc.stderr
    assert not list(out.parent.glob(".*.tmp*")), "temporary file left behind"

    again = tmp_path / "again.wav"
    assert main([text, str(ref), str(again), *ckpt_args(zoo), "--seed", "3", *FAST]) == 0
    assert again.read_bytes() == out.read_bytes()
    # a text containing '=' is text, not a config override
    assert main(["a=b " + text, str(ref), str(tmp_path / "eq.wav"), *ckpt_args(zoo), "--seed", "3", *FAST]) == 0


def test_continuation_mode(synth, utts, monkeypatch):
    (ref, ref_text), (_, text) = utts[0], utts[1]
    seen = {}
    real_generate = synth.ar.generate

    def spy(text_list, proms_list, **kw):
        seen.update(text=text_list, proms=proms_list, prefix=kw["prefix_list"])
        return real_generate(text_list, proms_list, **kw)

    monkeypatch.setattr(synth.ar, "generate", spy)
    out = synth.synthesize(text, ref, ref_text=ref_text, seed=1, max_ar_steps=STEPS)
    full = synth.encode_reference(ref, None)  # the whole reference, (t, 8)
    assert len(full) > STEPS
    # the AR continues from the reference's own codebook 1, with its phones before the target's
    assert torch.equal(seen["prefix"][0], full[:, 0]) and torch.equal(seen["proms"][0], full)
    ref_phones, phones = synth.phonemize(ref_text), synth.phonemize(text)
    assert out.phones == ref_phones + ["_"] + phones
    assert len(seen["text"][0]) == len(out.phones) + 2  # <s> ... </s>
    # only the new part comes back
    assert 1 <= len(out.codes) <= STEPS and out.wav.shape == (1, len(out.codes) * qnt.HOP_LENGTH)


def test_batch_matches_single_requests_when_greedy(synth, utts):
    """KV-cached batches pad the requests; the result of each must not depend on the others."""
    (ref, ref_text) = utts[0]
    texts = [t for _, t in utts[1:4]]
    greedy = dict(ar_temp=0.0, nar_temp=0.0, max_ar_steps=STEPS)
    reqs = [Request(texts[0], ref), Request(texts[1], ref, ref_text), Request(texts[2], utts[5][0])]
    batch = synth.synthesize_batch(reqs, batch_size=3, **greedy)
    for req, got in zip(reqs, batch):
        single = synth.synthesize(req.text, req.ref_wav, req.ref_text, **greedy)
        assert torch.equal(single.codes, got.codes)
        assert torch.equal(single.wav, got.wav)


def test_cli_batch_txt_and_tsv(zoo, utts, tmp_path, capsys):
    (ref, ref_text) = utts[0]
    lines = tmp_path / "lines.txt"
    lines.write_text(f"{utts[1][1]}\n\n{utts[2][1]}\n{utts[3][1]}\n")
    out = tmp_path / "out"
    args = [*ckpt_args(zoo), "--seed", "0", "--batch-size", "2", *FAST]
    assert main(["--batch", str(lines), str(ref), str(out), *args]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["0001.wav", "0003.wav", "0004.wav"]  # named by line; blank lines skipped
    stdout = capsys.readouterr().out
    assert all(str(out / n) in stdout for n in names) and "3 wav(s)" in stdout
    first = (out / "0001.wav").read_bytes()
    assert main(["--batch", str(lines), str(ref), str(out), *args]) == 0
    assert (out / "0001.wav").read_bytes() == first

    # TSV: per-line reference (relative to the TSV's folder), optional transcript = continuation
    local = tmp_path / "refs" / "r.wav"
    local.parent.mkdir()
    local.write_bytes(Path(utts[5][0]).read_bytes())
    tsv = tmp_path / "lines.tsv"
    tsv.write_text(f"{utts[1][1]}\t{ref}\t{ref_text}\n{utts[2][1]}\trefs/r.wav\n")
    out2 = tmp_path / "out2"
    assert main(["--batch", str(tsv), str(out2), *args]) == 0
    assert sorted(p.name for p in out2.iterdir()) == ["0001.wav", "0002.wav"]

    tsv.write_text(f"{utts[1][1]}\n")
    assert main(["--batch", str(tsv), str(out2), *args]) == 2
    assert "lines.tsv:1: expected text<TAB>reference" in capsys.readouterr().err


def unknown_word(synth) -> tuple[str, str]:
    """A word whose phones include one the tiny models never saw, and that phone."""
    from vall_e.emb import g2p

    for word in ("joy", "measure", "boy", "azure", "judge", "vision", "thought", "young", "choice"):
        missing = [p for p in g2p.encode(word) if p not in synth.ar_meta["phone_map"]]
        if missing:
            return word, missing[0]
    pytest.fail("every candidate word is covered by the training phones; extend the list")


def test_unknown_phones_name_phone_and_word(synth, zoo, utts, tmp_path, capsys):
    word, phone = unknown_word(synth)
    ref = utts[0][0]
    with pytest.raises(UnknownPhonesError) as info:
        synth.synthesize(f"{utts[1][1]} {word.capitalize()}!", ref, max_ar_steps=STEPS)
    assert phone in info.value.phones and info.value.words[phone] == [word.capitalize()]
    assert phone in str(info.value) and repr(word.capitalize()) in str(info.value)

    out = tmp_path / "x.wav"
    assert main([f"say {word}", str(ref), str(out), *ckpt_args(zoo), *FAST]) == 2
    err = capsys.readouterr().err
    assert phone in err and repr(word) in err and "never saw" in err and not out.exists()

    lines = tmp_path / "l.txt"
    lines.write_text(f"{utts[1][1]}\nsay {word}\n")
    assert main(["--batch", str(lines), str(ref), str(tmp_path / "o"), *ckpt_args(zoo), *FAST]) == 2
    assert f"{lines}:2:" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_empty_text(synth, zoo, utts, tmp_path, capsys):
    ref = utts[0][0]
    for text in ("", "   ", "?!"):
        with pytest.raises(SynthesisError, match="empty|no pronounceable"):
            synth.synthesize(text, ref)
    assert main(["", str(ref), str(tmp_path / "e.wav"), *ckpt_args(zoo), *FAST]) == 2
    assert "text is empty" in capsys.readouterr().err
    with pytest.raises(SynthesisError, match="reference transcript.*empty"):
        synth.synthesize(utts[1][1], ref, ref_text=" ")


def test_stereo_44k_reference(synth, utts, tmp_path):
    wav, sr = qnt.load_audio(utts[0][0])  # (1, n) at 22.05 kHz
    x44 = AF.resample(wav[0], sr, 44_100)
    stereo = torch.stack([x44, 0.5 * x44])  # two different channels
    path = tmp_path / "stereo44k.wav"
    sf.write(str(path), stereo.T.numpy(), 44_100, subtype="PCM_16")

    prompt = synth.encode_reference(path, 1.0)
    assert prompt.shape == (75, 8)  # the first second: 75 frames of 8 codebooks
    expected = qnt.encode(sf.read(str(path), dtype="float32")[0].T.copy(), 44_100, codec_weights="untrained")
    assert torch.equal(prompt, expected[0].t()[:75])  # channels averaged, resampled, cropped

    out = synth.synthesize(utts[1][1], path, seed=0, max_ar_steps=STEPS)
    assert out.wav.shape[-1] > 0 and torch.isfinite(out.wav).all()
    # an in-memory (waveform, rate) pair works the same way
    same = synth.synthesize(utts[1][1], (stereo, 44_100), seed=0, max_ar_steps=STEPS)
    assert out.sample_rate == same.sample_rate and out.wav.shape[-1] > 0


def test_missing_corrupt_and_swapped_model_files(zoo, utts, tmp_path, capsys):
    with pytest.raises(InferenceFileError, match=r"missing\.pt: no such file.*vall_e\.export"):
        Synthesizer(tmp_path / "missing.pt", zoo["nar"], device="cpu", codec_weights="untrained")
    truncated = tmp_path / "ar.pt"
    truncated.write_bytes(zoo["ar"].read_bytes()[:10_000])
    with pytest.raises(InferenceFileError, match=r"ar\.pt: cannot be loaded.*corrupt"):
        Synthesizer(truncated, zoo["nar"], device="cpu", codec_weights="untrained")
    with pytest.raises(InferenceFileError, match="swapped"):
        Synthesizer(zoo["nar"], zoo["ar"], device="cpu", codec_weights="untrained")

    ref, text = utts[0][0], utts[1][1]
    out = tmp_path / "o.wav"
    assert main([text, str(ref), str(out), "--ar-ckpt", str(truncated), "--nar-ckpt", str(zoo["nar"]), *FAST]) == 2
    assert "corrupt" in capsys.readouterr().err and not out.exists()
    assert main([text, str(tmp_path / "no.wav"), str(out), *ckpt_args(zoo), *FAST]) == 2
    assert "no.wav" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# decoding safeguards: length guard, repetition-aware sampling, continuation's NAR loop


@pytest.fixture(scope="session")
def never_stops(zoo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The exported tiny AR with its stop token made unreachable (logit bias -100): it never stops."""
    data = torch.load(zoo["ar"], map_location="cpu", weights_only=True)
    data["state_dict"]["classifier.bias"][1024] = -100.0
    path = tmp_path_factory.mktemp("never_stops") / "ar.pt"
    torch.save(data, path)
    return path


def test_export_records_max_frames_per_phone(synth, prepared_corpus):
    recorded = synth.ar_meta["max_frames_per_phone"]
    ratios = []
    for q in prepared_corpus.rglob("*.qnt.pt"):
        phones = q.with_name(q.name.split(".")[0] + ".phn.txt").read_text().split()
        ratios.append(torch.load(q, weights_only=True).shape[-1] / len(phones))
    # the largest ratio of the training split (a subset of the corpus: one utterance is validation)
    assert isinstance(recorded, float) and 0 < recorded <= max(ratios) + 1e-9
    assert recorded >= sorted(ratios)[-2] - 1e-9
    # trained with the default prompt_mode: the reference alone prompts it
    assert synth.ar_meta["prompt_mode"] == synth.nar_meta["prompt_mode"] == "speaker" and not synth.needs_ref_text


def test_length_guard_cuts_a_model_that_never_stops(never_stops, zoo, utts, tmp_path, capsys):
    import math

    (ref, _), (_, text) = utts[0], utts[1]
    synth = Synthesizer(never_stops, zoo["nar"], device="cpu", codec_weights="untrained")
    out = synth.synthesize(text, ref, seed=0, max_ar_steps=200, frames_per_phone=0.5)
    assert not out.stopped and out.cut == "length_guard"
    assert len(out.codes) == out.max_frames == math.ceil(0.5 * len(out.phones))
    off = synth.synthesize(text, ref, seed=0, max_ar_steps=STEPS, frames_per_phone=0)  # guard off
    assert off.cut == "max_ar_steps" and len(off.codes) == STEPS
    # by default the guard is the model's recorded ratio
    auto = synth.synthesize(text, ref, seed=0, max_ar_steps=10_000)
    ratio = synth.ar_meta["max_frames_per_phone"]
    assert auto.cut == "length_guard" and len(auto.codes) == math.ceil(ratio * len(auto.phones))
    # the CLI says so
    args = ["--ar-ckpt", str(never_stops), "--nar-ckpt", str(zoo["nar"]), "--device", "cpu", "codec_weights=untrained"]
    assert main([text, str(ref), str(tmp_path / "g.wav"), *args, "--frames-per-phone", "0.5", "--seed", "0"]) == 0
    assert "length guard fired on 1 output" in capsys.readouterr().err


def test_ras_option_reaches_the_ar_and_is_reproducible(synth, zoo, utts, tmp_path, monkeypatch):
    (ref, _), (_, text) = utts[0], utts[1]
    seen = {}
    real_generate = synth.ar.generate

    def spy(text_list, proms_list, **kw):
        seen.update(kw)
        return real_generate(text_list, proms_list, **kw)

    monkeypatch.setattr(synth.ar, "generate", spy)
    kw = dict(seed=4, max_ar_steps=STEPS, top_p=0.5, ras=True, ras_window=6, ras_threshold=0.2)
    a, b = synth.synthesize(text, ref, **kw), synth.synthesize(text, ref, **kw)
    assert seen["ras"] is True and seen["ras_window"] == 6 and seen["ras_threshold"] == 0.2
    from vall_e import base, inference

    assert (inference.RAS_WINDOW, inference.RAS_THRESHOLD) == (base.RAS_WINDOW, base.RAS_THRESHOLD) == (10, 0.1)
    assert torch.equal(a.codes, b.codes)
    with pytest.raises(SynthesisError, match="ras_window"):
        synth.synthesize(text, ref, ras=True, ras_window=0)
    out = tmp_path / "ras.wav"
    assert main([text, str(ref), str(out), *ckpt_args(zoo), "--ras", "--top-p", "0.5", "--seed", "1", *FAST]) == 0
    assert out.is_file()


def test_continuation_nar_keeps_reference_codes(synth, utts, monkeypatch):
    """Continuation mode: the NAR fills levels 2..8 of the new frames one level at a time while the
    reference frames keep their true codes at every level, and the decoder sees them."""
    (ref, ref_text), (_, text) = utts[0], utts[1]
    decoded = []
    real_decode = qnt.decode

    def spy(codes, **kw):
        decoded.append(codes.clone())
        return real_decode(codes, **kw)

    monkeypatch.setattr(qnt, "decode", spy)
    nar_levels = []
    real_nar = synth.nar.generate

    def nar_spy(text_list, proms_list, resps_list, **kw):
        nar_levels.append(kw["max_levels"])
        # the context given to each level: the reference's true codes below the level predicted
        t_ref = len(full)
        for r in resps_list:
            assert torch.equal(r[:t_ref], full[:, : r.shape[1]].to(r.device))
        return real_nar(text_list, proms_list, resps_list, **kw)

    full = synth.encode_reference(ref, None)  # (t, 8)
    monkeypatch.setattr(synth.nar, "generate", nar_spy)
    out = synth.synthesize(text, ref, ref_text=ref_text, seed=2, max_ar_steps=STEPS, nar_temp=1.0)
    assert nar_levels == list(range(2, 9))  # one pass per level
    (codes,) = decoded
    assert codes.shape == (len(full) + len(out.codes), 8)
    assert torch.equal(codes[: len(full)], full)  # all 8 levels of the reference kept
    assert torch.equal(codes[len(full) :], out.codes)
