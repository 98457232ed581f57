"""Hostile input at the entry points: what a careless or malicious user can feed the commands.

Each test is one defect found by trying bad inputs as a new user would, plus variants. The rule
every test asserts: exit status 2 (a problem a restart would repeat) with one plain error and no
traceback, nothing written outside the target, and no existing file changed (bytes and mtime).
The shared mechanisms under test: :mod:`vall_e.utils.paths` (names from data),
:mod:`vall_e.utils.outputs` (outputs) and :mod:`vall_e.utils.errors` (the error policy).

Tiny models from the session's ``tiny_runs`` (CPU, ``codec_weights=untrained``); read-only and
full disks are real tmpfs mounts where the machine allows them (root), else skipped.
"""

from __future__ import annotations

import errno
import gzip
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from vall_e import evaluate as ev
from vall_e.__main__ import main as synth_main
from vall_e.emb import qnt
from vall_e.export import FORMAT_TAG, export
from vall_e.export import main as export_main
from vall_e.utils.errors import entry_point, plain_os_error, torch_load_reason
from vall_e.utils.outputs import OutputError, refuse_inputs, writable_file, writable_folder
from vall_e.utils.paths import UnsafeNameError, inside, safe_name

from conftest import load_script, mount_tmpfs

REPO = Path(__file__).resolve().parents[1]
SYN = ["--max-ar-steps", "5", "--device", "cpu", "codec_weights=untrained", "--seed", "1"]
EVAL_OFFLINE = ["--asr", "pocketsphinx", "--speaker", "resemblyzer", "--device", "cpu", "--no-progress",
                "codec_weights=untrained", "--rows", "ground_truth", "--min-seconds", "0"]


heavy = load_script("libriheavy_to_segments")


# --------------------------------------------------------------------------------------------
# helpers and fixtures


def snapshot(root: Path, skip: Path | None = None) -> dict[str, tuple[int, int]]:
    """``{relative path: (size, mtime_ns)}`` of every file under ``root`` (``skip`` excluded)."""
    out = {}
    for p in root.rglob("*"):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def refused(capsys: pytest.CaptureFixture, status: int, *needles: str) -> str:
    """Assert exit 2, one plain error naming ``needles``, no traceback; returns stderr."""
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err and "error: " in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture(scope="module")
def hostile_zoo(tiny_runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Exported ``ar.pt`` / ``nar.pt`` of the session's tiny models, and their run configs."""
    out = tmp_path_factory.mktemp("hostile_zoo")
    for kind, cfg in tiny_runs.items():
        export(out / f"{kind}.pt", Path(yaml.safe_load(cfg.read_text())["ckpt_root"]) / kind)
    return {"ar": out / "ar.pt", "nar": out / "nar.pt", "ar_yml": tiny_runs["ar"], "nar_yml": tiny_runs["nar"]}


@pytest.fixture(scope="module")
def wavs(prepared_corpus: Path) -> list[tuple[Path, str]]:
    """(wav, transcript) of every corpus utterance."""
    return [(w, w.with_name(w.name.split(".")[0] + ".normalized.txt").read_text().strip())
            for w in sorted(prepared_corpus.rglob("*.wav"))]


def ckpts(zoo: dict[str, Path]) -> list[str]:
    return ["--ar-ckpt", str(zoo["ar"]), "--nar-ckpt", str(zoo["nar"])]


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Path]:
    """A read-only folder: a read-only tmpfs for root (who ignores permission bits), mode 0555 otherwise."""
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    yield from mount_tmpfs(tmp_path, "ro,size=64k")


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (root only)."""
    yield from mount_tmpfs(tmp_path, "size=64k")


# --------------------------------------------------------------------------------------------
# the shared rules, directly


@pytest.mark.parametrize("name", ["../victim", "a/b", "/etc/passwd", "..", ".", "", ".hidden", "a\\b", "a\x00b",
                                  "two\nlines", "x" * 300, None, 12])
def test_safe_name_refuses_names_that_leave_or_hide_in_their_folder(name) -> None:
    with pytest.raises(UnsafeNameError, match="list.tsv:3: id .* cannot be a file name"):
        safe_name(name, "id", "list.tsv:3")


@pytest.mark.parametrize("name", ["1089-134686-0000", "spk 1", "naïve", "a.b", "100"])
def test_safe_name_keeps_plain_names(name: str) -> None:
    assert safe_name(name, "id") == name


def test_inside_keeps_joined_paths_under_their_root(tmp_path: Path) -> None:
    assert inside(tmp_path, tmp_path / "a" / "b.wav") == tmp_path / "a" / "b.wav"
    for escape in (tmp_path / "a" / ".." / ".." / "x", Path("/tmp/elsewhere"), tmp_path.parent / (tmp_path.name + "2")):
        with pytest.raises(UnsafeNameError, match="outside"):
            inside(tmp_path, escape)


def test_outputs_rule_spots_inputs_by_any_spelling_and_unwritable_targets(tmp_path: Path, read_only: Path) -> None:
    ref = tmp_path / "ref.wav"
    ref.write_bytes(b"RIFF")
    (tmp_path / "sub").mkdir()
    os.link(ref, tmp_path / "hard.wav")
    for spelling in (ref, tmp_path / "sub" / ".." / "ref.wav", tmp_path / "hard.wav"):
        with pytest.raises(OutputError, match="is also the reference"):
            refuse_inputs(spelling, [("reference", ref)])
    refuse_inputs(tmp_path / "new.wav", [("reference", ref), ("nothing", None)])
    with pytest.raises(OutputError, match="is a folder"):
        writable_file(tmp_path / "sub")
    with pytest.raises(OutputError, match="its folder .*ref.wav is a file, not a folder"):
        writable_file(ref / "x.wav")
    with pytest.raises(OutputError, match="a part of that path"):
        writable_file(ref / "deeper" / "x.wav")
    with pytest.raises(OutputError, match="read-only file system|permission denied"):
        writable_folder(read_only / "out")
    assert snapshot(read_only) == {}


def test_error_policy_user_os_errors_exit_2_bugs_keep_their_traceback(capsys: pytest.CaptureFixture) -> None:
    @entry_point
    def full(argv=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/out.wav")

    @entry_point
    def bug(argv=None):
        raise KeyError("a bug")

    @entry_point
    def unexpected_os(argv=None):
        raise ConnectionResetError(errno.ECONNRESET, "reset")

    refused(capsys, full(), "no space left on device: /data/out.wav", "free some space")
    with pytest.raises(KeyError):
        bug()
    with pytest.raises(ConnectionResetError):
        unexpected_os()
    for code in (errno.EROFS, errno.EACCES, errno.EISDIR, errno.ENOTDIR, errno.ENOENT, errno.ELOOP):
        line = plain_os_error(OSError(code, os.strerror(code), "/x"))
        assert line is not None and "/x" in line and "\n" not in line
    # a failed rename names its destination, not the temporary file
    assert "/dest" in plain_os_error(OSError(errno.EISDIR, "Is a directory", "/d/.tmp123", None, "/dest"))


def test_load_errors_never_repeat_pytorchs_weights_only_false_advice(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pt"
    torch.save({"f": os.getcwd}, evil)  # a pickled function: a safe load refuses it
    with pytest.raises(Exception) as info:
        torch.load(evil, weights_only=True)
    reason = torch_load_reason(info.value)
    assert "posix.getcwd" in reason and "weights_only" not in reason and "False" not in reason

    from vall_e.export import InferenceFileError, read_inference_file

    with pytest.raises(InferenceFileError) as info:
        read_inference_file(evil)
    assert "weights_only" not in str(info.value) and "posix.getcwd" in str(info.value)
    with pytest.raises(qnt.CodecUnavailableError) as info:
        qnt.load_codec(str(evil))
    assert "weights_only" not in str(info.value)


# --------------------------------------------------------------------------------------------
# data loss and writes outside the target


def _test_list(path: Path, rows: list[tuple[str, Path, str, str]]) -> Path:
    lines = ["id\taudio\ttext\tspeaker\tseconds"]
    for uid, audio, speaker, seconds in rows:
        lines.append(f"{uid}\t{audio}\tsome words here\t{speaker}\t{seconds}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("uid", ["../../victim", "/tmp/vall_e_hostile_victim", "..", "a/../../../victim"])
def test_evaluate_ids_cannot_write_outside_out(uid: str, wavs, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (a, _), (b, _) = wavs[0], wavs[1]
    secs = [f"{sf.info(str(w)).frames / sf.info(str(w)).samplerate:.3f}" for w in (a, b)]
    lst = _test_list(tmp_path / "list.tsv", [(uid, a, "s1", secs[0]), ("ok1", b, "s1", secs[1])])
    (tmp_path / "victim.wav").write_text("precious")
    before = snapshot(tmp_path)
    status = ev.main([str(lst), "--out", str(tmp_path / "out"), *EVAL_OFFLINE])
    refused(capsys, status, "list.tsv:2: id", "cannot be a file name")
    assert snapshot(tmp_path, skip=tmp_path / "out") == before
    assert not Path("/tmp/vall_e_hostile_victim.wav").exists()


def test_librispeech_transcript_ids_are_checked(espeak_corpus: Path, tmp_path: Path, capsys) -> None:
    chapter = tmp_path / "ls" / "19" / "198"
    chapter.mkdir(parents=True)
    shutil.copy(next(espeak_corpus.rglob("*.wav")), chapter / "19-198-0000.wav")
    (chapter / "19-198.trans.txt").write_text("19-198-0000 HELLO\n../../../../etc/passwd HELLO\n")
    status = ev.main([str(tmp_path / "ls"), "--out", str(tmp_path / "out"), *EVAL_OFFLINE])
    refused(capsys, status, "19-198.trans.txt:2: id '../../../../etc/passwd'")
    assert not (tmp_path / "out").exists() or snapshot(tmp_path / "out") == {}


def _cuts(path: Path, lines: list[str]) -> Path:
    with gzip.open(path, "wt") as f:
        f.write("".join(line + "\n" for line in lines))
    return path


def test_libriheavy_failure_never_truncates_an_existing_output(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text('{"keep": "me"}\n')
    before = snapshot(tmp_path)
    for cuts in (_cuts(tmp_path / "a.jsonl.gz", ['{"id": "broken"}']),  # no usable cut
                 _cuts(tmp_path / "b.jsonl.gz", []),  # empty
                 _cuts(tmp_path / "c.jsonl.gz", ["\xff not json"])):
        before = snapshot(tmp_path)
        refused(capsys, heavy.main([str(cuts), str(out)]), "no usable cuts", f"{out} was not written")
        assert snapshot(tmp_path) == before and out.read_text() == '{"keep": "me"}\n'
    # the output may not be the input
    same = tmp_path / "same.jsonl"
    same.write_text('{"id": "x"}\n')
    before = snapshot(tmp_path)
    refused(capsys, heavy.main([str(same), str(same)]), "is also the cuts file")
    assert snapshot(tmp_path) == before


def test_libriheavy_replacing_an_output_says_so(espeak_corpus: Path, tmp_path: Path, capsys) -> None:
    wav = next(espeak_corpus.rglob("*.wav"))
    cut = {"id": "small/100/book/file_0", "start": 0.0, "duration": 1.0,
           "supervisions": [{"speaker": "100", "custom": {"texts": ["Hi there.", "HI THERE"]}}],
           "recording": {"sources": [{"source": str(wav)}]}}
    out = tmp_path / "out.jsonl"
    out.write_text('{"old": 1}\n')
    assert heavy.main([str(_cuts(tmp_path / "c.jsonl.gz", [json.dumps(cut)])), str(out)]) == 0
    err = capsys.readouterr().err
    assert f"note: replaced {out}" in err and "with 1 segments" in err
    assert json.loads(out.read_text())["id"] == "book_file_0"


def test_synthesis_never_overwrites_its_inputs(hostile_zoo, wavs, tmp_path: Path, capsys, monkeypatch) -> None:
    import vall_e.inference

    def no_models(*a, **k):
        raise AssertionError("the models were loaded: the refusal must come first")

    ref = tmp_path / "ref.wav"
    shutil.copy(wavs[0][0], ref)
    (tmp_path / "sub").mkdir()
    os.link(ref, tmp_path / "hard.wav")
    ar_copy = tmp_path / "ar.pt"
    shutil.copy(hostile_zoo["ar"], ar_copy)
    text = wavs[1][1]
    before = snapshot(tmp_path)
    monkeypatch.setattr(vall_e.inference.Synthesizer, "__init__", no_models)
    args = ["--ar-ckpt", str(ar_copy), "--nar-ckpt", str(hostile_zoo["nar"]), *SYN]
    for out in (ref, tmp_path / "sub" / ".." / "ref.wav", tmp_path / "hard.wav"):
        refused(capsys, synth_main([text, str(ref), str(out), *args]), "is also the reference audio")
    refused(capsys, synth_main([text, str(ref), str(ar_copy), *args]), "is also the AR model")
    # batch: an output name that is a line's reference
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    shutil.copy(wavs[2][0], out_dir / "0001.wav")
    tsv = tmp_path / "lines.tsv"
    tsv.write_text(f"{text}\t{out_dir / '0001.wav'}\n")
    before = snapshot(tmp_path)
    refused(capsys, synth_main(["--batch", str(tsv), str(out_dir), *args]), "0001.wav is also the reference of")
    assert snapshot(tmp_path) == before


def test_export_replaces_an_earlier_export_only_with_a_note(hostile_zoo, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ar.pt"
    shutil.copy(hostile_zoo["nar"], out)  # a different, earlier export at the AR's name
    yml = f"yaml={hostile_zoo['ar_yml']}"
    before = snapshot(tmp_path)
    refused(capsys, export_main([str(out), yml, "--no-clobber"]), "--no-clobber")
    assert snapshot(tmp_path) == before
    assert export_main([str(out), yml]) == 0
    err = capsys.readouterr().err
    assert f"note: replaced {out} (the NAR nar-tiny export of step" in err
    assert torch.load(out, weights_only=True)["kind"] == "ar"
    # a file that is not an export (a config, a training checkpoint, garbage) is never replaced
    for name, content in (("config.yml", hostile_zoo["ar_yml"].read_bytes()), ("junk.pt", b"not a torch file")):
        victim = tmp_path / name
        victim.write_bytes(content)
        before = snapshot(tmp_path)
        refused(capsys, export_main([str(victim), yml]), "is not a vall_e inference file", "left as it is")
        assert snapshot(tmp_path) == before


def test_export_to_a_full_disk_keeps_the_old_export(hostile_zoo, full_disk: Path, capsys) -> None:
    old = full_disk / "ar.pt"
    torch.save({"format": FORMAT_TAG, "kind": "ar", "preset": "ar-tiny", "step": 1, "checkpoint": "old/run"}, old)
    before = snapshot(full_disk)
    status = export_main([str(old), f"yaml={hostile_zoo['ar_yml']}"])
    refused(capsys, status, f"no space left on device: {old}")
    assert snapshot(full_disk) == before  # no temporary file left, the old export intact


@pytest.mark.parametrize("field,value", [("text", None), ("audio", None), ("id", None), ("speaker", ["a"]),
                                         ("text", 5), ("start", "soon"), ("end", float("inf"))])
def test_manifest_fields_of_the_wrong_type_fail_their_line(field: str, value, wavs, tmp_path: Path) -> None:
    good = {"id": "a", "audio": str(wavs[0][0]), "start": 0, "end": 1, "text": "Hi.", "speaker": "s"}
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": "b", field: value}) + "\n")
    items, failed, _ = qnt.read_manifest(manifest, tmp_path / "out")
    assert [it.out.name for it in items] == ["a.qnt.pt"]
    assert len(failed) == 1 and failed[0][0] == f"{manifest}:2" and field in failed[0][1], failed
    assert "None" not in failed[0][1] or value is None


def test_manifest_cli_bad_lines_missing_audio_and_unsafe_names(wavs, tmp_path: Path, capsys) -> None:
    rows = [
        {"id": "ok", "audio": str(wavs[0][0]), "start": 0, "end": 1, "text": "Hi.", "speaker": "s"},
        {"id": "t", "audio": str(wavs[0][0]), "start": 0, "end": 1, "text": None, "speaker": "s"},
        {"id": "gone", "audio": "nowhere.wav", "start": 0, "end": 1, "text": "Hi.", "speaker": "s"},
        {"id": "../../escape", "audio": str(wavs[0][0]), "start": 0, "end": 1, "text": "Hi.", "speaker": "s"},
        {"id": "x", "audio": str(wavs[0][0]), "start": 0, "end": 1, "text": "Hi.", "speaker": "/abs"},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + b'{"id": "\xff"}\n')
    out = tmp_path / "out"
    status = qnt.main([str(manifest), str(out), "codec_weights=untrained", "device=cpu"])
    report = capsys.readouterr().out
    assert status == 1, report  # some inputs failed; the rest are written
    assert f"{manifest}:2: text must be a string, got null" in report
    assert f"{manifest}:3 (gone): {tmp_path / 'nowhere.wav'}: audio file not found" in report
    assert "System error" not in report
    assert f"{manifest}:4: id '../../escape' cannot be a file name" in report
    assert f"{manifest}:5: speaker '/abs' cannot be a file name" in report
    assert f"{manifest}:6: not UTF-8" in report
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        "m.jsonl", "out/s/ok.normalized.txt", "out/s/ok.qnt.pt"]


def test_manifest_not_gzip_and_unwritable_outputs_exit_2_before_work(wavs, tmp_path: Path, read_only: Path,
                                                                     capsys, monkeypatch) -> None:
    def no_codec(*a, **k):
        raise AssertionError("the codec was loaded: the refusal must come first")

    monkeypatch.setattr(qnt, "load_codec", no_codec)
    fake = tmp_path / "m.jsonl.gz"
    fake.write_text('{"id": "a"}\n')
    refused(capsys, qnt.main([str(fake), str(tmp_path / "o"), "codec_weights=untrained"]),
            f"{fake}: cannot read it as gzip")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "a", "audio": str(wavs[0][0]), "start": 0, "end": 1, "text": "Hi.",
                                    "speaker": "s"}) + "\n")
    refused(capsys, qnt.main([str(manifest), str(read_only / "out"), "codec_weights=untrained"]), "output folder")
    refused(capsys, qnt.main([str(manifest), str(manifest), "codec_weights=untrained"]), "is also the manifest")
    refused(capsys, qnt.main([str(manifest), str(tmp_path / "o"), "--summary-json", str(manifest),
                              "codec_weights=untrained"]), "is also the manifest")
    assert snapshot(read_only) == {}


# --------------------------------------------------------------------------------------------
# outputs that are files, folders or read-only


def test_evaluate_out_must_be_a_writable_folder(espeak_corpus: Path, tmp_path: Path, read_only: Path, capsys,
                                                monkeypatch) -> None:
    from vall_e import metrics

    def no_backend(*a, **k):
        raise AssertionError("a backend was loaded: the refusal must come first")

    monkeypatch.setattr(metrics, "load_asr", no_backend)
    spk = "spkr_name_getter=lambda p: p.parts[-3]"
    afile = tmp_path / "file"
    afile.write_text("keep")
    before = snapshot(tmp_path)
    for out, needle in ((afile, "is a file, not a folder"), (afile / "sub", "a part of that path"),
                        (read_only / "out", "read-only file system")):
        refused(capsys, ev.main([str(espeak_corpus), "--out", str(out), *EVAL_OFFLINE, spk]), "--out", needle)
    assert snapshot(tmp_path, skip=read_only) == before and snapshot(read_only) == {}


def test_evaluate_cache_with_damaged_lines_is_recomputed_not_fatal(tmp_path: Path, caplog) -> None:
    path = tmp_path / "items.jsonl"
    good = {"row": "ground_truth", "run": 0, "id": "u1", "hash": "h"}
    path.write_bytes(json.dumps(good).encode() + b"\n" + b'{"row": "\xff\xfe"}\n' + b'{"torn": ')
    with caplog.at_level(logging.WARNING, logger="vall_e.evaluate"):
        cache = ev.ItemCache(path)
    assert list(cache.records) == [("ground_truth", 0, "u1")]
    assert "2 damaged line(s) ignored" in caplog.text


def test_synthesis_into_read_only_or_missing_folders_refuses_before_work(hostile_zoo, wavs, tmp_path: Path,
                                                                         read_only: Path, capsys, monkeypatch) -> None:
    import vall_e.inference

    def no_models(*a, **k):
        raise AssertionError("the models were loaded: the refusal must come first")

    monkeypatch.setattr(vall_e.inference.Synthesizer, "__init__", no_models)
    (ref, _), (_, text) = wavs[0], wavs[1]
    afile = tmp_path / "file"
    afile.write_text("keep")
    lines = tmp_path / "lines.txt"
    lines.write_text(text + "\n")
    before = snapshot(tmp_path, skip=read_only)
    refused(capsys, synth_main([text, str(ref), str(read_only / "out.wav"), *ckpts(hostile_zoo), *SYN]),
            "read-only file system")
    refused(capsys, synth_main([text, str(ref), str(afile / "out.wav"), *ckpts(hostile_zoo), *SYN]),
            "is a file, not a folder")
    refused(capsys, synth_main(["--batch", str(lines), str(ref), str(read_only / "out"), *ckpts(hostile_zoo), *SYN]),
            "output folder", "read-only file system")
    assert snapshot(tmp_path, skip=read_only) == before
    assert snapshot(read_only) == {}


def test_folders_where_files_belong(hostile_zoo, wavs, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "zoo"
    folder.mkdir()
    (folder / "keep.txt").write_text("keep")
    before = snapshot(tmp_path)
    refused(capsys, export_main([str(folder), f"yaml={hostile_zoo['ar_yml']}"]), "is a folder")
    (ref, _), (_, text) = wavs[0], wavs[1]
    refused(capsys, synth_main([text, str(ref), str(tmp_path / "o.wav"), "--ar-ckpt", str(folder), "--nar-ckpt",
                                str(hostile_zoo["nar"]), *SYN]), "is a folder")
    refused(capsys, synth_main([text, str(folder), str(tmp_path / "o.wav"), *ckpts(hostile_zoo), *SYN]), "is a folder")
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------------------------
# input validation at the edge


@pytest.mark.parametrize("seconds,needle", [("-3", "must be a positive number"), ("nan", "must be a positive number"),
                                            ("inf", "must be a positive number"), ("0", "must be a positive number"),
                                            ("abc", "is not a number"), ("1e9", "s long; correct the column")])
def test_test_list_seconds_are_checked_with_line_numbers(seconds: str, needle: str, wavs, tmp_path: Path,
                                                         capsys) -> None:
    (a, _), (b, _) = wavs[0], wavs[1]
    b_secs = f"{sf.info(str(b)).frames / sf.info(str(b)).samplerate:.3f}"
    lst = _test_list(tmp_path / "list.tsv", [("ok", b, "s1", b_secs), ("u1", a, "s1", seconds)])
    status = ev.main([str(lst), "--out", str(tmp_path / "out"), *EVAL_OFFLINE, "--max-seconds", "0"])
    refused(capsys, status, "list.tsv:3: seconds", needle)


def test_libriheavy_damaged_gzip_names_the_file(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text("keep\n")
    not_gz = tmp_path / "cuts.jsonl.gz"
    not_gz.write_text("no gzip here\n")
    truncated = tmp_path / "trunc.jsonl.gz"
    truncated.write_bytes(gzip.compress(b'{"id": "x"}\n' * 1000)[:60])
    before = snapshot(tmp_path)
    for cuts in (not_gz, truncated):
        refused(capsys, heavy.main([str(cuts), str(out)]), f"{cuts}: cannot read it as gzip")
    assert snapshot(tmp_path) == before


def test_batch_reports_every_bad_line_before_synthesizing(hostile_zoo, wavs, tmp_path: Path, capsys,
                                                          monkeypatch) -> None:
    from vall_e.emb import g2p
    from vall_e.inference import Synthesizer

    known = torch.load(hostile_zoo["ar"], weights_only=True)["phone_map"]
    word = next(w for w in ("joy", "measure", "boy", "azure", "judge", "vision", "thought", "young", "choice")
                if any(p not in known for p in g2p.encode(w)))
    silent = tmp_path / "silent.wav"
    sf.write(str(silent), np.zeros(24_000 * 2, dtype="float32"), 24_000)
    (ref, _), (_, text) = wavs[0], wavs[1]
    tsv = tmp_path / "lines.tsv"
    tsv.write_bytes("\n".join([
        f"{text}\t{ref}",              # 1 good
        "no tab on this line",         # 2 columns
        f"{text}\t{tmp_path / 'missing.wav'}",  # 3 missing reference
        f"\t{ref}",                    # 4 empty text
        f"Say {word} now.\t{ref}",     # 5 unknown phones
        f"{text}\t{silent}",           # 6 silent reference
    ]).encode() + b"\n\xff\xfe\tx\n")  # 7 not UTF-8
    generated = []
    real = Synthesizer._generate
    monkeypatch.setattr(Synthesizer, "_generate", lambda self, *a, **k: generated.append(1) or real(self, *a, **k))
    out = tmp_path / "out"
    err = refused(capsys, synth_main(["--batch", str(tsv), str(out), *ckpts(hostile_zoo), *SYN]),
                  "6 line(s) of", "nothing was synthesized")
    for n in (2, 3, 4, 5, 6, 7):
        assert f"lines.tsv:{n}:" in err, (n, err)
    assert "lines.tsv:1:" not in err and not generated
    assert not out.exists() or not list(out.iterdir())


def test_references_too_short_silent_or_too_long_are_refused_and_truncated_warned(
        hostile_zoo, wavs, tmp_path: Path, capsys, monkeypatch) -> None:
    (ref, ref_text), (_, text) = wavs[0], wavs[1]
    data, sr = sf.read(str(ref), dtype="float32")
    sf.write(str(tmp_path / "silent.wav"), np.zeros(sr * 3, dtype="float32"), sr)
    sf.write(str(tmp_path / "short.wav"), data[:100], sr)
    sf.write(str(tmp_path / "quiet_start.wav"), np.concatenate([np.zeros(sr * 4, dtype="float32"), data]), sr)
    sf.write(str(tmp_path / "long.wav"), np.tile(data, 1 + int(40 * sr / len(data)))[: sr * 40], sr)
    sf.write(str(tmp_path / "full.wav"), data, sr, subtype="PCM_16")
    whole = (tmp_path / "full.wav").read_bytes()
    (tmp_path / "trunc.wav").write_bytes(whole[: len(whole) // 2])
    reads = []
    real = qnt.load_audio
    monkeypatch.setattr(qnt, "load_audio", lambda p, s=None, e=None: reads.append((Path(p).name, e)) or real(p, s, e))

    def run(name: str, *extra: str) -> int:
        return synth_main([text, str(tmp_path / name), str(tmp_path / f"out_{name}"), *ckpts(hostile_zoo), *SYN, *extra])

    refused(capsys, run("silent.wav"), "silent.wav is silent", "no voice")
    refused(capsys, run("quiet_start.wav"), "first 3 s of", "trim its leading silence")
    refused(capsys, run("short.wav"), "short.wav is 0.00 s long", "at least 0.5 s")
    refused(capsys, run("long.wav", "--prompt-seconds", "0"), "long.wav is 40 s long", "--prompt-seconds 3")
    refused(capsys, run("long.wav", "--ref-text", ref_text), "long.wav is 40 s long")
    assert not [r for r in reads if r[0] == "long.wav"]  # refused from the header, before decoding 40 s
    assert run("long.wav") == 0  # the default 3 s prompt: fine, and only its part is decoded
    assert [r for r in reads if r[0] == "long.wav"] == [("long.wav", pytest.approx(3.1))]
    capsys.readouterr()
    assert run("trunc.wav") == 0
    assert "trunc.wav looks truncated" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.glob("out_*")) == ["out_long.wav", "out_trunc.wav"]


def test_synthesis_replacing_an_output_says_so(hostile_zoo, wavs, tmp_path: Path, capsys) -> None:
    (ref, _), (_, text) = wavs[0], wavs[1]
    out = tmp_path / "out.wav"
    out.write_bytes(Path(wavs[3][0]).read_bytes())
    assert synth_main([text, str(ref), str(out), *ckpts(hostile_zoo), *SYN]) == 0
    assert f"note: replacing {out} (" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_train_user_os_errors_exit_2_without_traceback(hostile_zoo, tmp_path: Path, read_only: Path) -> None:
    """A read-only log folder: an OSError the trainer does not handle itself reaches the entry-point policy."""
    cfg = yaml.safe_load(hostile_zoo["ar_yml"].read_text())
    cfg.update(ckpt_root=str(tmp_path / "ckpts"), log_root=str(read_only / "logs"), max_iter=1)
    yml = tmp_path / "ar.yml"
    yml.write_text(yaml.safe_dump(cfg))
    # a subprocess: training sets up a process group (and its port) that must not outlive the test
    proc = subprocess.run([sys.executable, "-m", "vall_e.train", f"yaml={yml}"], cwd=REPO, capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"error: read-only file system: {read_only / 'logs'}" in proc.stderr or (
        os.geteuid() != 0 and f"error: permission denied: {read_only / 'logs'}" in proc.stderr), proc.stderr[-3000:]
    assert snapshot(read_only) == {}
