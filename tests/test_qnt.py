"""qnt: EnCodec 24 kHz codes with the real architecture (codec_weights=untrained, offline)."""

from __future__ import annotations

import logging
import math
import shutil
import subprocess
import sys
import threading
import urllib.error
from pathlib import Path
from types import SimpleNamespace

import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF

from vall_e.emb import codec, qnt
from vall_e.utils.helpers import atomic_path, find_files, sibling

REPO = Path(__file__).resolve().parents[1]
UNTRAINED = dict(device="cpu", codec_weights="untrained")


def expected_frames(path: Path) -> int:
    """T = ceil(samples_at_24k / 320), from the file header alone."""
    info = sf.info(str(path))
    return math.ceil(math.ceil(info.frames * 24_000 / info.samplerate) / 320)


def run_qnt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vall_e.emb.qnt", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def speech(espeak_corpus: Path) -> tuple[torch.Tensor, int]:
    """One espeak-ng utterance as float32 (n,) and its rate (22.05 kHz)."""
    data, sr = sf.read(str(find_files(espeak_corpus, ".wav")[0]), dtype="float32")
    return torch.from_numpy(data), sr


@pytest.mark.parametrize(
    "sr,channels,ext",
    [(24_000, 1, "wav"), (16_000, 1, "wav"), (22_050, 1, "flac"), (44_100, 2, "wav"), (48_000, 1, "flac")],
)
def test_shape_for_any_rate_and_channels(speech, tmp_path: Path, sr: int, channels: int, ext: str) -> None:
    wav, orig = speech
    wav = AF.resample(wav[: orig + 123], orig, sr)  # about a second: shapes need no more
    if channels == 2:
        wav = torch.stack([wav, 0.5 * wav])
    path = tmp_path / f"x.{ext}"
    sf.write(str(path), (wav.T if channels == 2 else wav).numpy(), sr)
    codes = qnt.encode_from_file(path, **UNTRAINED)
    assert codes.dtype == torch.int64 and codes.shape == (1, 8, expected_frames(path))
    assert 0 <= int(codes.min()) and int(codes.max()) < 1024
    if channels == 2:  # in-memory (channels, n) input takes the same path
        assert qnt.encode(wav, sr, **UNTRAINED).shape == codes.shape


def test_untrained_codes_are_diverse_and_weights_path_loads(tmp_path: Path) -> None:
    text = "The quick brown fox jumps over the lazy dog in the garden."
    wav_path = tmp_path / "long.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(wav_path), "--", text], check=True)
    codes = qnt.encode_from_file(wav_path, **UNTRAINED)
    assert codes.shape[-1] > 200  # about three seconds
    distinct = [len(codes[0, q].unique()) for q in range(8)]
    assert distinct[0] > 50 and min(distinct) > 50, distinct

    # codec_weights=<path> loads a saved state dict into the same architecture
    ckpt = tmp_path / "codec.th"
    torch.save(qnt.load_codec("untrained", "cpu").state_dict(), ckpt)
    clip = qnt.to_codec_input(*qnt.load_audio(wav_path))[:24_000]
    assert torch.equal(qnt.encode(clip, 24_000, device="cpu", codec_weights=str(ckpt)), codes[..., :75])


def test_untrained_codec_is_reproducible_and_matches_data_test(monkeypatch) -> None:
    """A rebuilt untrained codec gives exactly the shipped data/test codes (made in another process)
    and leaves the global RNG alone."""
    monkeypatch.setattr(codec, "_codecs", {})  # force a rebuild
    state = torch.random.get_rng_state()
    for name in ("test", "test2"):
        shipped = torch.load(REPO / "data" / "test" / f"{name}.qnt.pt")
        assert shipped.dtype == torch.int16 and shipped.shape[:2] == (1, 8)  # as qnt writes codes
        codes = qnt.encode_from_file(REPO / "data" / "test" / f"{name}.wav", **UNTRAINED)
        assert codes.shape == shipped.shape and torch.equal(codes, shipped.long())
    assert torch.equal(torch.random.get_rng_state(), state)


def test_batched_codes_equal_single_codes(prepared_corpus: Path, tmp_path: Path) -> None:
    """The folder runner in batched mode (zero-padded batches) writes the one-file-per-pass codes."""
    speaker = sorted(p for p in prepared_corpus.iterdir() if p.is_dir() and not p.name.startswith("."))[0]
    corpus = tmp_path / speaker.name
    shutil.copytree(speaker, corpus, ignore=shutil.ignore_patterns("*.qnt.pt"))
    wavs = find_files(corpus, ".wav")
    assert len({sf.info(str(p)).frames for p in wavs}) == len(wavs) == 4  # padding is exercised
    summary = qnt.quantize_folder(corpus, batch_seconds=60, progress=False, **UNTRAINED)
    assert summary.ok and summary.written == len(wavs)
    for p in wavs:
        single = torch.load(prepared_corpus / sibling(p, ".qnt.pt").relative_to(tmp_path))
        assert torch.equal(torch.load(sibling(p, ".qnt.pt")), single)
    # the last, partial frame too: lengths that are not whole frames, next to a longer signal
    wav = qnt.to_codec_input(*qnt.load_audio(wavs[0]))
    clips = [wav[: 24_000 * k // 4 + 17 * k] for k in (4, 5, 6, 7)] + [wav]
    alone = [qnt.encode_batch([c], **UNTRAINED)[0] for c in clips]
    assert all(torch.equal(a, b) for a, b in zip(alone, qnt.encode_batch(clips, **UNTRAINED)))
    assert qnt._batches([(Path(str(i)), float(i)) for i in range(1, 9)], 12.0) == [
        [(Path("8"), 8.0)], [(Path("7"), 7.0)], [(Path("6"), 6.0), (Path("5"), 5.0)],
        [(Path("4"), 4.0), (Path("3"), 3.0), (Path("2"), 2.0)], [(Path("1"), 1.0)],
    ]  # longest first; a batch's size x its longest file stays within 12 s


def test_cli_reports_corrupt_files_and_rerun_does_nothing(espeak_corpus: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(espeak_corpus, corpus, ignore=shutil.ignore_patterns("*_000004.*"))  # fewer = faster
    wavs = find_files(corpus, ".wav")
    assert len(wavs) == 6
    corrupt = wavs[0].with_name("corrupt.wav")
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(range(256)) * 4)
    empty = wavs[0].with_name("empty.wav")
    empty.write_bytes(b"")
    silent = wavs[0].with_name("nosamples.wav")
    sf.write(str(silent), torch.zeros(0).numpy(), 22_050)

    proc = run_qnt(str(corpus), "codec_weights=untrained", "device=cpu")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"{len(wavs)} written" in proc.stdout and "3 failed" in proc.stdout
    for bad in (corrupt, empty, silent):
        assert str(bad) in proc.stdout
    assert "no audio (0 samples)" in proc.stdout and "empty file" in proc.stdout
    for wav in wavs:
        codes = torch.load(sibling(wav, ".qnt.pt"))
        assert codes.dtype == torch.int16 and codes.shape == (1, 8, expected_frames(wav))
    assert not [p for p in corpus.rglob(".*")]  # no temp files from the atomic writes

    for bad in (corrupt, empty, silent):
        bad.unlink()
    before = {p: p.stat().st_mtime_ns for p in corpus.rglob("*.qnt.pt")}
    proc = run_qnt(str(corpus), "codec_weights=untrained", "device=cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 written" in proc.stdout and f"{len(wavs)} already done" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in corpus.rglob("*.qnt.pt")} == before


def test_flac_suffix(tmp_path: Path, speech) -> None:
    wav, sr = speech
    sf.write(str(tmp_path / "a.flac"), wav.numpy(), sr)
    sf.write(str(tmp_path / "b.wav"), wav.numpy(), sr)
    summary = qnt.quantize_folder(tmp_path, suffix=".flac", progress=False, **UNTRAINED)
    assert summary.written == 1 and (tmp_path / "a.qnt.pt").exists() and not (tmp_path / "b.qnt.pt").exists()


def test_decode_round_trip_shapes(prepared_corpus: Path, tmp_path: Path, caplog, monkeypatch) -> None:
    monkeypatch.setattr(codec, "_warned_untrained_decode", False)
    codes = torch.load(find_files(prepared_corpus, ".qnt.pt")[0])[..., :60]
    t = codes.shape[-1]
    with caplog.at_level(logging.WARNING, logger="vall_e.emb.codec"):
        wav, sr = qnt.decode(codes, **UNTRAINED)
        wav2, _ = qnt.decode(codes[0].T, **UNTRAINED)  # (t, q), as the models produce
    assert sr == 24_000 and wav.shape == wav2.shape == (1, t * 320) and wav.dtype == torch.float32
    assert torch.equal(wav, wav2) and torch.isfinite(wav).all()
    assert sum("NOT speech" in r.getMessage() for r in caplog.records) == 1  # warned once

    out = tmp_path / "out.wav"
    qnt.decode_to_file(codes[0].T, out, **UNTRAINED)
    info = sf.info(str(out))
    assert (info.samplerate, info.channels, info.frames) == (24_000, 1, t * 320)
    assert qnt.encode_from_file(out, **UNTRAINED).shape == (1, 8, t)
    assert [p.name for p in tmp_path.iterdir()] == ["out.wav"]

    with pytest.raises(ValueError, match="codes must lie in"):
        qnt.decode(torch.full((5, 8), 1024), **UNTRAINED)


def test_interrupted_write_leaves_nothing(tmp_path: Path, speech, monkeypatch) -> None:
    wav, sr = speech
    sf.write(str(tmp_path / "a.wav"), wav.numpy(), sr)

    def broken_write(data, path):
        with atomic_path(path) as tmp:
            tmp.write_bytes(data[:10])  # interrupted half way
            raise KeyboardInterrupt

    monkeypatch.setattr(qnt, "atomic_write_bytes", broken_write)
    with pytest.raises(KeyboardInterrupt):
        qnt.quantize_folder(tmp_path, progress=False, **UNTRAINED)
    assert [p.name for p in tmp_path.iterdir()] == ["a.wav"]


def test_bad_inputs_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.wav"
    with pytest.raises(qnt.AudioError, match="missing.wav"):
        qnt.encode_from_file(missing, **UNTRAINED)
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), torch.zeros(0).numpy(), 16_000)
    with pytest.raises(qnt.AudioError, match=r"empty.wav: no audio"):
        qnt.encode_from_file(empty, **UNTRAINED)


def test_pretrained_offline_error_says_how_to_proceed(monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(codec, "_codecs", {})
    with pytest.raises(qnt.CodecUnavailableError) as err:
        qnt.load_codec("pretrained", "cpu")
    message = str(err.value)
    needles = (qnt.PRETRAINED_CHECKPOINT, qnt.PRETRAINED_URL, torch.hub.get_dir(), "codec_weights=untrained",
               "codec_weights=/path/to/")
    for needle in needles:
        assert needle in message


def test_bad_codec_weights_path(tmp_path: Path) -> None:
    with pytest.raises(qnt.CodecUnavailableError, match="no such file"):
        qnt.load_codec(str(tmp_path / "nope.th"))
    bogus = tmp_path / "bogus.th"
    torch.save({"weight": torch.zeros(2)}, bogus)
    with pytest.raises(qnt.CodecUnavailableError, match="not an EnCodec 24 kHz state dict"):
        qnt.load_codec(str(bogus))


def test_chunked_encoder_equals_one_pass(speech) -> None:
    """Long signals run the conv stack in 5 s chunks (bounded memory); codes equal one whole pass."""
    wav, sr = speech
    x = qnt.to_codec_input(wav, sr)
    x = torch.cat([x] * (1 + int(7 * 24_000 / len(x))))[: 7 * 24_000 + 123]  # 7 s, a partial last frame
    chunked = qnt.encode_batch([x], **UNTRAINED)[0]
    whole = qnt.encode_batch([x], chunk_seconds=1e9, **UNTRAINED)[0]
    small = qnt.encode_batch([x], chunk_seconds=1.0, **UNTRAINED)[0]
    assert chunked.shape == (1, 8, qnt.num_frames(len(x)))
    assert torch.equal(chunked, whole) and torch.equal(small, whole)


# --------------------------------------------------------------------------------------------
# exact encoder math: TF32 off and deterministic cuDNN while encoding, previous switches restored

# every (backend, op) of torch's per-backend fp32 precision state, read below the public API
_FP32_STATE = [("generic", "all")] + [(b, o) for b in ("mkldnn", "cuda") for o in ("all", "matmul", "conv", "rnn")]


def math_state() -> dict[str, object]:
    """torch's global precision and cuDNN switches, read through both APIs (legacy getters raise
    once the two APIs were set to disagree: recorded as such)."""
    cudnn = torch.backends.cudnn
    state: dict[str, object] = {"deterministic": cudnn.deterministic, "benchmark": cudnn.benchmark}
    state |= {f"{b}.{o}": torch._C._get_fp32_precision_getter(b, o) for b, o in _FP32_STATE}
    for name, read in (("legacy_matmul", torch.get_float32_matmul_precision),
                       ("legacy_cudnn_tf32", lambda: cudnn.allow_tf32)):
        try:
            state[name] = read()
        except RuntimeError:
            state[name] = "unreadable (mixed APIs)"
    return state


EXACT = {"deterministic": True, "benchmark": False, "cuda.matmul": "ieee", "cuda.conv": "ieee", "cuda.rnn": "ieee",
         "mkldnn.matmul": "ieee", "legacy_matmul": "highest", "legacy_cudnn_tf32": False}


def is_exact(state: dict[str, object]) -> bool:
    return all(state[k] == v for k, v in EXACT.items())


@pytest.fixture
def torch_math():
    """Puts torch's global switches back as they were, whatever a test set."""
    before = math_state()
    assert before["legacy_matmul"] != "unreadable (mixed APIs)", before
    yield
    cudnn = torch.backends.cudnn
    torch.set_float32_matmul_precision(before["legacy_matmul"])
    cudnn.allow_tf32 = before["legacy_cudnn_tf32"]
    for b, o in _FP32_STATE:
        torch._C._set_fp32_precision_setter(b, o, before[f"{b}.{o}"])
    cudnn.deterministic, cudnn.benchmark = before["deterministic"], before["benchmark"]
    assert math_state() == before


def as_training_sets_them() -> None:
    """TF32 on and cuDNN autotuning, as a training process may leave them (legacy API)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.deterministic = False


def test_every_encode_entry_point_runs_exact_and_restores(torch_math, monkeypatch, tmp_path: Path) -> None:
    """Batch job, one file, one signal, a batch, and the reference encoding at synthesis all run
    the encoder with TF32 off and deterministic cuDNN, then give back the caller's switches."""
    from vall_e.inference import Synthesizer

    as_training_sets_them()
    before = math_state()
    assert not is_exact(before) and before["legacy_matmul"] == "high"
    seen: list[dict[str, object]] = []
    encode_padded = codec._encode_padded

    def spy(*args, **kwargs):
        seen.append(math_state())
        return encode_padded(*args, **kwargs)

    monkeypatch.setattr(codec, "_encode_padded", spy)
    wav, sr = sf.read(str(REPO / "data" / "test" / "test2.wav"), dtype="float32")
    clip = torch.from_numpy(wav[: sr // 2])
    sf.write(str(tmp_path / "a.wav"), clip.numpy(), sr)
    qnt.quantize_folder(tmp_path, progress=False, **UNTRAINED)
    qnt.encode_from_file(tmp_path / "a.wav", **UNTRAINED)
    qnt.encode(clip, sr, **UNTRAINED)
    qnt.encode_batch([clip, clip[:1000]], **UNTRAINED)
    synthesizer = SimpleNamespace(device="cpu", codec_weights="untrained", _ref_cache={})
    Synthesizer.encode_reference(synthesizer, tmp_path / "a.wav", None)
    assert len(seen) == 5 and all(is_exact(s) for s in seen), seen
    assert math_state() == before


def test_exact_math_restores_mixed_api_state_when_nested_concurrent_or_failing(torch_math) -> None:
    """New-API switches only (their legacy getters then raise): restored exactly. Nested and
    concurrent encodes restore once the last one leaves; so does an encode that raises."""
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.benchmark = True
    before = math_state()
    assert before["legacy_matmul"] == "unreadable (mixed APIs)"
    with qnt.exact_encoder_math():
        assert is_exact(math_state())
        with qnt.exact_encoder_math():
            pass
        assert is_exact(math_state())
    assert math_state() == before

    with pytest.raises(ZeroDivisionError):
        with qnt.exact_encoder_math():
            1 / 0
    assert math_state() == before

    entered, release = threading.Event(), threading.Event()

    def other_thread() -> None:
        with qnt.exact_encoder_math():
            entered.set()
            release.wait(30)

    thread = threading.Thread(target=other_thread)
    thread.start()
    assert entered.wait(30)
    with qnt.exact_encoder_math():
        pass
    assert is_exact(math_state())  # the other thread is still encoding
    release.set()
    thread.join(30)
    assert math_state() == before and codec._exact_depth == 0


def test_default_encoder_dtype_is_float64_everywhere() -> None:
    assert qnt._encoder_dtype("cpu") == qnt._encoder_dtype("cuda:1") == torch.float64
    assert qnt._encoder_dtype("cuda", "float32") == torch.float32  # the user's override stays
    assert qnt._weights_dtype("cuda", "bfloat16") == (torch.float32, True)
    with pytest.raises(ValueError, match="bfloat16 is for CUDA"):
        qnt._weights_dtype("cpu", "bfloat16")


# --------------------------------------------------------------------------------------------
# on a GPU (skipped without CUDA)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def differing_frames(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a != b).any(dim=1).sum())


@pytest.mark.gpu
@needs_cuda
def test_cuda_codes_equal_cpu_float64(torch_math) -> None:
    """Default dtype on CUDA, with TF32 and autotuning left on by "training": the codes of
    data/test equal a fresh CPU float64 encoding, and the caller's switches come back."""
    as_training_sets_them()
    before = math_state()
    for name in ("test", "test2"):
        path = REPO / "data" / "test" / f"{name}.wav"
        cpu = qnt.encode_from_file(path, device="cpu", codec_weights="untrained")
        cuda = qnt.encode_from_file(path, device="cuda", codec_weights="untrained")
        assert cuda.shape == cpu.shape and torch.equal(cuda, cpu), f"{name}: {differing_frames(cuda, cpu)} frames differ"
    assert math_state() == before


@pytest.mark.gpu
@needs_cuda
def test_cuda_batched_codes_equal_single_codes(tmp_path: Path) -> None:
    """On CUDA, zero-padded batches give each signal's one-file codes, and a corpus run with the
    CUDA plan (batches sized from free memory, pinned memory, loader workers) writes CPU float64 codes."""
    plan = qnt.encode_plan("cuda", free_bytes=qnt._free_device_bytes("cuda"))
    assert plan.pin_memory and plan.batch_seconds >= qnt.CUDA_BATCH_SECONDS[0]
    clips = []
    for name in ("test", "test2"):
        wav = qnt.to_codec_input(*qnt.load_audio(REPO / "data" / "test" / f"{name}.wav"))
        clips += [wav[: len(wav) * k // 5 + 17 * k] for k in (2, 3, 4)] + [wav]
    alone = [qnt.encode_batch([c], device="cuda", codec_weights="untrained")[0] for c in clips]
    batched = qnt.encode_batch(clips, device="cuda", codec_weights="untrained")
    for a, b in zip(alone, batched):
        assert torch.equal(a, b), f"{differing_frames(a, b)} frames differ"
    for i, clip in enumerate(clips):
        sf.write(str(tmp_path / f"c{i}.wav"), clip.numpy(), 24_000, subtype="FLOAT")
    summary = qnt.quantize_folder(tmp_path, device="cuda", codec_weights="untrained", progress=False)
    assert summary.ok and summary.written == len(clips)
    for i, clip in enumerate(clips):
        written = torch.load(tmp_path / f"c{i}.qnt.pt", weights_only=True).long()
        cpu = qnt.encode_batch([clip], device="cpu", codec_weights="untrained")[0]
        assert torch.equal(written, cpu), f"c{i}: {differing_frames(written, cpu)} frames differ"
