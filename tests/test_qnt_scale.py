"""qnt at scale: shards over ranks, segment manifests, id collisions, write errors (real EnCodec
architecture with codec_weights=untrained, espeak-ng speech, offline)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from vall_e.emb import qnt
from vall_e.utils.helpers import balanced_shards, find_files

from conftest import mount_tmpfs

REPO = Path(__file__).resolve().parents[1]
UNTRAINED = dict(device="cpu", codec_weights="untrained")


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def test_balanced_shards_cover_every_item_once() -> None:
    rng = np.random.default_rng(0)
    weights = list(rng.lognormal(1.5, 0.6, size=1000))
    shards = balanced_shards(weights, 8)
    assert sorted(i for s in shards for i in s) == list(range(1000))
    loads = [sum(weights[i] for i in s) for s in shards]
    assert max(loads) - min(loads) <= max(weights)  # greedy LPT bound
    assert (max(loads) - min(loads)) / (sum(loads) / 8) < 0.01
    assert balanced_shards(weights, 8) == shards  # deterministic
    assert balanced_shards([1.0, 1.0], 4) == [[0], [1], [], []]


def test_two_ranks_write_the_same_bytes_as_one(espeak_corpus: Path, tmp_path: Path) -> None:
    """torchrun with 2 CPU processes: byte-identical files to 1 process, each written exactly once
    (a fresh run: written == files and skipped == 0, so no rank touched another's file)."""
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        shutil.copytree(espeak_corpus, d)
    proc = run("-m", "vall_e.emb.qnt", str(one), "codec_weights=untrained", "device=cpu",
               "--summary-json", str(tmp_path / "one.json"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "vall_e.emb.qnt", str(two), "codec_weights=untrained", "device=cpu",
               "--summary-json", str(tmp_path / "two.json"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("qnt: 8 written") == 1 and "over 2 ranks" in proc.stdout  # rank 0 reports
    summary = json.loads((tmp_path / "two.json").read_text())
    assert summary["written"] == 8 and summary["skipped"] == 0 and summary["failed"] == []
    assert len(summary["per_rank_written"]) == 2 and min(summary["per_rank_written"]) >= 2  # both worked
    wavs = find_files(espeak_corpus, ".wav")
    for wav in wavs:
        rel = wav.relative_to(espeak_corpus).with_name(wav.name.split(".")[0] + ".qnt.pt")
        a, b = (one / rel).read_bytes(), (two / rel).read_bytes()
        assert a == b, rel
        codes = torch.load(one / rel, weights_only=True)
        assert codes.dtype == torch.int16 and codes.shape[:2] == (1, 8)

    # a rerun over 2 ranks does nothing and still reports every file once
    proc = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "vall_e.emb.qnt", str(two), "codec_weights=untrained", "device=cpu")
    assert proc.returncode == 0 and "0 written" in proc.stdout and "8 already done" in proc.stdout, proc.stdout


def test_shards_are_disjoint_and_cover_the_folder(espeak_corpus: Path) -> None:
    items, failed, found = qnt.plan_folder(espeak_corpus)
    assert found == 8 and not failed
    parts = [qnt.shard(items, r, 3) for r in range(3)]
    outs = [it.out for p in parts for it in p]
    assert sorted(outs) == sorted(it.out for it in items) and len(set(outs)) == len(outs)


def make_recording(espeak_corpus: Path, path: Path) -> tuple[np.ndarray, int]:
    """A ~20 s recording at 22.05 kHz: the corpus utterances with silences between them."""
    pieces = []
    sr = 22_050
    for wav in find_files(espeak_corpus, ".wav"):
        data, sr = sf.read(str(wav), dtype="float32")
        pieces += [data, np.zeros(sr // 3, dtype=np.float32)]
    audio = np.concatenate(pieces)
    sf.write(str(path), audio, sr, subtype="PCM_16")
    audio, _ = sf.read(str(path), dtype="float32")  # what the file holds after 16-bit rounding
    return audio, sr


def test_segment_manifest_codes_equal_the_cut_out_audio(espeak_corpus: Path, tmp_path: Path, monkeypatch) -> None:
    audio, sr = make_recording(espeak_corpus, _mk(tmp_path))
    seconds = len(audio) / sr
    assert seconds > 15
    segments = [(0.0, 2.5), (3.1234, 9.87), (seconds - 4.0, seconds)]  # one over 5 s: the chunked path
    lines = [
        {"id": f"book_{i}", "audio": "rec/book.wav", "start": s, "end": e, "text": f"Segment {i}.", "speaker": "reader"}
        for i, (s, e) in enumerate(segments)
    ]
    lines.append({"id": "bad", "audio": "rec/book.wav", "start": 5, "end": 4, "text": "x", "speaker": "reader"})
    lines.append({"id": "book_1", "audio": "rec/book.wav", "start": 1, "end": 2, "text": "x", "speaker": "other"})
    manifest = tmp_path / "segments.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines) + "not json\n")

    reads: list[int] = []
    real_read = sf.SoundFile.read

    def counting_read(self, frames=-1, *args, **kwargs):
        reads.append(frames)
        return real_read(self, frames, *args, **kwargs)

    monkeypatch.setattr(sf.SoundFile, "read", counting_read)
    out = tmp_path / "out"
    summary = qnt.quantize(manifest, out, progress=False, **UNTRAINED)
    monkeypatch.undo()
    assert summary.written == 4 and len(summary.failed) == 2, summary.report()
    assert "start=5.0 end=4.0" in summary.report() and f"{manifest}:6" in summary.report()
    assert sorted(reads) == sorted(round(e * sr) - round(s * sr) for s, e in segments + [(1, 2)])  # slices only

    for i, (s, e) in enumerate(segments):
        cut = tmp_path / f"cut{i}.wav"
        sf.write(str(cut), audio[round(s * sr) : round(e * sr)], sr, subtype="FLOAT")
        codes = torch.load(out / "reader" / f"book_{i}.qnt.pt", weights_only=True)
        assert codes.dtype == torch.int16
        assert torch.equal(codes.long(), qnt.encode_from_file(cut, **UNTRAINED)), i
        assert (out / "reader" / f"book_{i}.normalized.txt").read_text() == f"Segment {i}.\n"
    assert (out / "other" / "book_1.qnt.pt").exists()

    # a rerun skips everything; a duplicate <speaker>/<id> is an error naming both lines
    assert qnt.quantize(manifest, out, progress=False, **UNTRAINED).skipped == 4
    dup = tmp_path / "dup.jsonl"
    dup.write_text(json.dumps(lines[0]) + "\n" + json.dumps({**lines[1], "id": "book_0"}) + "\n")
    items, failed, _ = qnt.read_manifest(dup, tmp_path / "out2")
    assert not items and len(failed) == 2 and all("lines 1 and 2" in reason for _, reason in failed)


def _mk(tmp_path: Path) -> Path:
    (tmp_path / "rec").mkdir()
    return tmp_path / "rec" / "book.wav"


def test_collisions_upper_case_and_empty_folder(espeak_corpus: Path, tmp_path: Path) -> None:
    wavs = find_files(espeak_corpus, ".wav")[:3]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(wavs[0], corpus / "spk.take.1.wav")
    shutil.copy(wavs[1], corpus / "spk.take.2.wav")
    shutil.copy(wavs[2], corpus / "LOUD.WAV")
    data, sr = sf.read(str(wavs[2]))
    sf.write(str(corpus / "both.FLAC"), data, sr)
    shutil.copy(wavs[2], corpus / "both.wav")
    proc = run("-m", "vall_e.emb.qnt", str(corpus), "codec_weights=untrained", "device=cpu")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 written" in proc.stdout and "4 failed" in proc.stdout
    assert "spk.take.1.wav and spk.take.2.wav" in proc.stdout and "both.FLAC and both.wav" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in corpus.glob("*.qnt.pt")) == ["LOUD.qnt.pt"]  # nothing overwritten

    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run("-m", "vall_e.emb.qnt", str(empty), "codec_weights=untrained")
    assert proc.returncode == 2 and "no audio files" in proc.stderr and "--suffix" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run("-m", "vall_e.emb.qnt", str(tmp_path / "segments.jsonl"), "codec_weights=untrained")
    assert proc.returncode == 2 and "does not exist" in proc.stderr


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A 16 KiB tmpfs (root only); skipped where mounting is not allowed."""
    yield from mount_tmpfs(tmp_path, "size=16k")


def test_full_disk_and_read_only_stop_cleanly_and_rerun_finishes(espeak_corpus: Path, tmp_path: Path,
                                                                 small_tmpfs: Path) -> None:
    _, sr = make_recording(espeak_corpus, _mk(tmp_path))
    manifest = tmp_path / "segments.jsonl"
    manifest.write_text("".join(
        json.dumps({"id": f"u{i}", "audio": "rec/book.wav", "start": i, "end": i + 1.5, "text": "Hello there.",
                    "speaker": "s"}) + "\n" for i in range(8)))
    out = small_tmpfs / "out"
    proc = run("-m", "vall_e.emb.qnt", str(manifest), str(out), "codec_weights=untrained", "device=cpu")
    assert proc.returncode == 2, proc.stdout + proc.stderr  # a rerun repeats it until the disk is fixed
    assert "no space left on device while writing" in proc.stdout and "Traceback" not in proc.stderr
    assert "qnt: " in proc.stdout and "rerun" in proc.stdout
    done = list(out.rglob("*.qnt.pt"))
    assert len(done) < 8
    assert not [p for p in out.rglob(".*")]  # no temporary or truncated file
    for p in done:
        assert torch.load(p, weights_only=True).shape[:2] == (1, 8)

    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    proc = run("-m", "vall_e.emb.qnt", str(manifest), str(out), "codec_weights=untrained", "device=cpu")
    # a read-only output folder is refused before the codec loads
    assert proc.returncode == 2 and "output folder" in proc.stderr and "read-only file system" in proc.stderr, \
        proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr

    subprocess.run(["mount", "-o", "remount,rw,size=1m", str(small_tmpfs)], check=True)
    proc = run("-m", "vall_e.emb.qnt", str(manifest), str(out), "codec_weights=untrained", "device=cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{8 - len(done)} written" in proc.stdout and f"{len(done)} already done" in proc.stdout
    assert len(list(out.rglob("*.qnt.pt"))) == len(list(out.rglob("*.normalized.txt"))) == 8


def test_long_files_are_refused_with_what_to_do(espeak_corpus: Path, tmp_path: Path) -> None:
    wav = find_files(espeak_corpus, ".wav")[0]
    shutil.copy(wav, tmp_path / "long.wav")
    summary = qnt.quantize_folder(tmp_path, max_seconds=0.5, progress=False, **UNTRAINED)
    assert summary.written == 0 and len(summary.failed) == 1 and not (tmp_path / "long.qnt.pt").exists()
    assert "cut it into utterances, or use a segment manifest" in summary.failed[0][1]


def test_int16_on_disk_and_every_reader_accepts_int64(tmp_path: Path) -> None:
    from vall_e.data import load_codes

    codes = torch.randint(0, 1024, (1, 8, 37))
    qnt.save_codes(codes, tmp_path / "a.qnt.pt")
    torch.save(codes, tmp_path / "old.qnt.pt")  # an int64 file from before
    assert torch.load(tmp_path / "a.qnt.pt", weights_only=True).dtype == torch.int16
    for name in ("a", "old"):
        loaded = load_codes(tmp_path / f"{name}.qnt.pt")
        assert loaded.dtype == torch.int64 and torch.equal(loaded, codes[0].t())
    with pytest.raises(ValueError, match="out of range"):
        qnt.save_codes(torch.full((1, 8, 3), 1024), tmp_path / "b.qnt.pt")


def test_streaming_workers_and_float32_batches(espeak_corpus: Path, tmp_path: Path) -> None:
    """The path CUDA takes by default (DataLoader workers decoding audio, batched float32), run on
    CPU: same files, and codes that agree with float64 single-file codes (bit-exactness is
    float64's; float32 may flip near-tied choices)."""
    corpus = tmp_path / "c"
    shutil.copytree(espeak_corpus, corpus, ignore=shutil.ignore_patterns("*_00000[34].*"))
    proc = run("-m", "vall_e.emb.qnt", str(corpus), "codec_weights=untrained", "device=cpu",
               "--workers", "1", "--batch-seconds", "30", "--dtype", "float32")
    assert proc.returncode == 0 and "4 written" in proc.stdout, proc.stdout + proc.stderr
    same = total = 0
    for wav in find_files(corpus, ".wav"):
        codes = torch.load(wav.with_name(wav.name.split(".")[0] + ".qnt.pt"), weights_only=True)
        exact = qnt.encode_from_file(wav, **UNTRAINED)
        assert codes.shape == exact.shape
        same += int((codes.long() == exact).sum())
        total += exact.numel()
    assert same / total > 0.99


def test_encode_plan_sizes_cuda_batches_from_free_memory() -> None:
    """The pure rule a corpus run follows; CUDA settings are picked from the device string alone."""
    assert qnt.encode_plan("cpu") == qnt.EncodePlan(0.0, 0, False)  # CPU behaviour unchanged
    assert qnt.encode_plan("cpu", batch_seconds=30, workers=1) == qnt.EncodePlan(30, 1, False)
    h200 = qnt.encode_plan("cuda:3", free_bytes=137 * 10**9)  # float64: 60 MB per padded second
    assert h200.pin_memory and h200.workers == 4 and h200.batch_seconds == pytest.approx(137e9 * 0.5 / 60e6)
    assert qnt.encode_plan("cuda", free_bytes=80 * 10**9).batch_seconds == pytest.approx(80e9 * 0.5 / 60e6)
    assert qnt.encode_plan("cuda", "float32", free_bytes=80 * 10**9).batch_seconds == 1200.0  # capped
    assert qnt.encode_plan("cuda", free_bytes=10**9).batch_seconds == 30.0  # floor
    assert qnt.encode_plan("cuda").batch_seconds == 120.0  # free memory unknown
    assert qnt.encode_plan("cuda", free_bytes=10**11, batch_seconds=0, workers=0) == qnt.EncodePlan(0, 0, True)
    assert qnt.encode_plan("cuda", "bfloat16", free_bytes=24 * 10**9).batch_seconds == pytest.approx(400.0)
    assert qnt._free_device_bytes("cpu") is None


@pytest.mark.filterwarnings("ignore:.pin_memory. argument:UserWarning")  # no accelerator here
def test_corpus_run_feeds_the_loader_from_the_plan(espeak_corpus: Path, tmp_path: Path, monkeypatch) -> None:
    """encode_items takes batch size, workers and pinning from encode_plan (here a CUDA-like plan
    on CPU: pinning is then a no-op) and writes the one-file codes."""
    corpus = tmp_path / "c"
    shutil.copytree(sorted(p for p in espeak_corpus.iterdir() if p.is_dir())[0], corpus)
    asked: list[tuple] = []

    def cuda_like(*args, **kwargs) -> qnt.EncodePlan:
        asked.append(args)
        return qnt.EncodePlan(60.0, 0, True)

    loaders: list[dict] = []
    real_loader = torch.utils.data.DataLoader

    class Recording(real_loader):
        def __init__(self, *args, **kwargs):
            loaders.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(qnt, "encode_plan", cuda_like)
    monkeypatch.setattr(torch.utils.data, "DataLoader", Recording)
    wavs = find_files(corpus, ".wav")
    summary = qnt.quantize_folder(corpus, progress=False, **UNTRAINED)
    assert summary.ok and summary.written == len(wavs) > 1
    assert asked == [("cpu", None, None, None, None)]
    assert loaders[0]["pin_memory"] is True and loaders[0]["num_workers"] == 0
    assert len(loaders[0]["batch_sampler"]) == 1  # every file in one 60 s batch
    for wav in wavs:
        codes = torch.load(wav.with_name(wav.name.split(".")[0] + ".qnt.pt"), weights_only=True)
        assert torch.equal(codes.long(), qnt.encode_from_file(wav, **UNTRAINED))


def test_bench_compare_cpu_reports_agreement(tmp_path: Path) -> None:
    """The GPU check's command, on CPU: float64 batched and one-file runs agree with the CPU
    reference on every frame."""
    proc = run("scripts/bench_qnt.py", "--device", "cpu", "--compare-cpu", "--seconds", "6", "--skip-memory",
               "--batch-seconds", "0", "30", "--workdir", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["dtype"] == "float64" and result["agreement"] == 1.0 and result["audio_s_per_s"] > 0
    assert [r["batch_seconds"] for r in result["runs"]] == [0.0, 30.0]
    assert all(r["agreement"] == 1.0 for r in result["runs"]) and result["cpu_reference_s"] > 0
