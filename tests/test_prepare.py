"""Corpus preparation scripts, offline: LibriTTS download/unpack/tokenize on fabricated archives,
and the Libriheavy -> segment manifest converter on a fabricated cut manifest."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from vall_e.emb import qnt
from vall_e.utils.helpers import find_files

from conftest import load_script

REPO = Path(__file__).resolve().parents[1]


prep = load_script("prepare_libritts")
heavy = load_script("libriheavy_to_segments")


def make_archive(src: Path, archive: Path, subset: str, extra: list[tuple[str, bytes]] = ()) -> None:
    """A LibriTTS-shaped ``<subset>.tar.gz``: ``LibriTTS/<subset>/<spk>/<chapter>/<id>.{wav,normalized.txt}``."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(src.rglob("*")):
            if path.is_file() and path.name.endswith((".wav", ".normalized.txt")):
                tar.add(path, arcname=f"LibriTTS/{subset}/{path.relative_to(src)}")
        for name, data in extra:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_download_resumes_and_checks(tmp_path: Path) -> None:
    src = tmp_path / "mirror" / "x.tar.gz"
    src.parent.mkdir()
    data = np.random.default_rng(0).bytes(3 * prep.CHUNK + 123)
    src.write_bytes(data)
    dest = tmp_path / "dl" / "x.tar.gz"
    dest.parent.mkdir()
    (dest.parent / "x.tar.gz.part").write_bytes(data[:1000])  # an interrupted download
    assert prep.download(f"file://{src}", dest, progress=False) == dest
    assert dest.read_bytes() == data and not (dest.parent / "x.tar.gz.part").exists()

    (dest.parent / "y.tar.gz.part").write_bytes(data + b"more")  # longer than the source: start over
    assert prep.download(str(src), dest.with_name("y.tar.gz"), progress=False).read_bytes() == data

    prep.check_md5(dest, hashlib.md5(data).hexdigest())
    with pytest.raises(prep.PrepError, match="md5 .* rerun"):
        prep.check_md5(dest, "0" * 32)
    assert not dest.exists()
    with pytest.raises(prep.PrepError, match="does not exist"):
        prep.download(str(tmp_path / "nope.tar.gz"), tmp_path / "dl" / "nope.tar.gz", progress=False)


def test_prepare_libritts_offline_end_to_end(espeak_corpus: Path, tmp_path: Path, capfd) -> None:
    mirror = tmp_path / "mirror"
    make_archive(espeak_corpus, mirror / "dev-clean.tar.gz", "dev-clean")
    root, downloads = tmp_path / "data" / "LibriTTS", tmp_path / "data" / "downloads"
    args = ["--subsets", "dev-clean", "--root", str(root), "--downloads", str(downloads), "--mirror", str(mirror),
            "--g2p-workers", "0", "--no-progress", "codec_weights=untrained", "device=cpu"]
    assert prep.main(args) == 0, capfd.readouterr()
    out = capfd.readouterr().out
    assert "qnt: 8 written" in out and "g2p: 8 written" in out
    wavs = find_files(root / "dev-clean", ".wav")
    assert len(wavs) == 8 and wavs[0].relative_to(root / "dev-clean").parts[0] in {p.name for p in espeak_corpus.iterdir()}
    for wav in wavs:
        assert wav.with_name(wav.name.split(".")[0] + ".qnt.pt").is_file()
        assert wav.with_name(wav.name.split(".")[0] + ".phn.txt").is_file()
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no partial folder left

    assert prep.main(args) == 0  # a rerun does nothing new
    out = capfd.readouterr().out
    assert "qnt: 0 written" in out and "8 already done" in out


def test_corrupt_and_unsafe_archives_are_refused(espeak_corpus: Path, tmp_path: Path) -> None:
    good = tmp_path / "good.tar.gz"
    make_archive(espeak_corpus, good, "test-clean")
    corrupt = tmp_path / "test-clean.tar.gz"
    blob = bytearray(good.read_bytes())
    blob[len(blob) // 2 : len(blob) // 2 + 64] = bytes(64)  # damaged in the middle
    corrupt.write_bytes(bytes(blob))
    root = tmp_path / "LibriTTS"
    with pytest.raises(prep.PrepError, match="corrupt or truncated.*removed.*rerun"):
        prep.unpack(corrupt, root, "test-clean")
    assert not corrupt.exists() and not (root / "test-clean").exists() and not list(root.iterdir())

    truncated = tmp_path / "t" / "test-clean.tar.gz"
    truncated.parent.mkdir()
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(prep.PrepError, match="corrupt or truncated"):
        prep.unpack(truncated, root, "test-clean")

    evil = tmp_path / "e" / "test-clean.tar.gz"
    make_archive(espeak_corpus, evil, "test-clean", extra=[("LibriTTS/test-clean/../../evil.txt", b"x")])
    with pytest.raises(prep.PrepError, match="unsafe archive member"):
        prep.unpack(evil, root, "test-clean")
    assert not (tmp_path / "evil.txt").exists() and not list(root.iterdir())

    assert prep.main(["--subsets", "nope"]) == 2


def test_libriheavy_cuts_become_segments_and_codes(espeak_corpus: Path, tmp_path: Path) -> None:
    pieces, sr = [], 22_050
    for wav in find_files(espeak_corpus, ".wav")[:4]:
        data, sr = sf.read(str(wav), dtype="float32")
        pieces += [data, np.zeros(sr // 4, dtype=np.float32)]
    audio_root = tmp_path / "ll"
    rec = audio_root / "download/librilight/small/100/my_book_64kb_mp3/01_my.book_64kb.flac"
    rec.parent.mkdir(parents=True)
    sf.write(str(rec), np.concatenate(pieces), sr)
    total = sf.info(str(rec)).duration

    def cut(n: int, start: float, duration: float, **sup_extra) -> dict:
        cid = f"small/100/my_book_64kb_mp3/01_my.book_64kb_{n}"
        sup = {"id": cid, "recording_id": cid.rsplit("_", 1)[0], "start": 0, "duration": duration, "channel": 0,
               "language": "English", "speaker": "100",
               "custom": {"texts": [f"Cut number {n}, read aloud.", f"CUT NUMBER {n} READ ALOUD"]}, **sup_extra}
        return {"id": cid, "start": start, "duration": duration, "channel": 0, "supervisions": [sup],
                "recording": {"id": sup["recording_id"], "sources": [{"type": "file", "channels": [0],
                              "source": str(rec.relative_to(audio_root))}], "sampling_rate": sr,
                              "num_samples": int(total * sr), "duration": total, "channel_ids": [0]},
                "type": "MonoCut"}

    cuts = tmp_path / "libriheavy_cuts_small.jsonl.gz"
    with gzip.open(cuts, "wt") as f:
        for row in (cut(0, 0.5, 2.0), cut(1, 3.0, 1.5), cut(2, 4.0, 0.3), {"id": "broken"}):
            f.write(json.dumps(row) + "\n")
    manifest = tmp_path / "segments.jsonl"
    assert heavy.main([str(cuts), str(manifest), "--audio-root", str(audio_root), "--min-seconds", "0.5"]) == 0
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["my_book_64kb_mp3_01_my_book_64kb_0", "my_book_64kb_mp3_01_my_book_64kb_1"]
    assert rows[0] == {"id": rows[0]["id"], "audio": str(rec.resolve()), "start": 0.5, "end": 2.5,
                       "text": "Cut number 0, read aloud.", "speaker": "100"}

    out = tmp_path / "out"
    summary = qnt.quantize(manifest, out, progress=False, device="cpu", codec_weights="untrained")
    assert summary.ok and summary.written == 2, summary.report()
    codes = torch.load(out / "100" / f"{rows[1]['id']}.qnt.pt", weights_only=True)
    assert codes.shape == (1, 8, qnt.num_frames(round(1.5 * 24_000)))
    assert (out / "100" / f"{rows[0]['id']}.normalized.txt").read_text() == "Cut number 0, read aloud.\n"
    assert heavy.main([str(tmp_path / "missing.jsonl.gz"), str(manifest)]) == 2
    shutil.rmtree(out)


def test_md5_values_are_not_config_words():
    """``--md5 SUBSET=HEX`` (spaced) goes to the parser; only ``<Config field>=value`` words go to the tokenizers."""
    overrides, rest = prep.split_words(["--md5", "dev-clean=abc123", "device=cpu", "--subsets", "dev-clean"])
    assert overrides == ["device=cpu"]
    assert prep.build_parser().parse_args(rest).md5 == ["dev-clean=abc123"]
