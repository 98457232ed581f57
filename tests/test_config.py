"""The config system: merge order, clear errors, help, safe spkr_name_getter, derived paths."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vall_e.config import Config, parse_spkr_name_getter
from vall_e.emb import g2p, qnt
from vall_e.utils.config import ConfigError


def test_merge_order_defaults_yaml_cli(tmp_path: Path) -> None:
    path = tmp_path / "run.yml"
    path.write_text("batch_size: 4\nnj: 3\ndata_dirs: [a, b]\n")
    cfg = Config.parse([f"yaml={path}", "nj=5"])
    assert (cfg.batch_size, cfg.nj, cfg.data_dirs, cfg.eval_batch_size) == (4, 5, ["a", "b"], 32)
    assert Config.parse([]).batch_size == 32


def test_unknown_key_suggests_the_closest_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown config field 'batch_sise'.*did you mean 'batch_size'"):
        Config.parse(["batch_sise=4"])
    path = tmp_path / "run.yml"
    path.write_text("codec_weight: untrained\n")
    with pytest.raises(ConfigError, match=r"'codec_weight'.*run.yml.*did you mean 'codec_weights'"):
        Config.parse([f"yaml={path}"])


def test_wrong_type_names_the_field() -> None:
    with pytest.raises(ConfigError, match="batch_size") as err:
        Config.parse(["batch_size=abc"])
    assert "abc" in str(err.value)


def test_missing_yaml_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yml"
    with pytest.raises(ConfigError, match=r"nope\.yml.*does not exist"):
        Config.parse([f"yaml={missing}"])


def _train_main(argv):
    from vall_e.train import main

    return main(argv)


@pytest.mark.parametrize("main", [qnt.main, g2p.main, _train_main], ids=["qnt", "g2p", "train"])
def test_entry_points_list_the_config_and_reject_bad_values(main, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["help=true"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for name in Config.field_names():
        assert f"  {name} " in out
    assert "codec_weights" in out and "'pretrained'" in out

    for words, needle in ((["batch_size=abc"], "batch_size"), (["codec_weight=untrained"], "codec_weights")):
        with pytest.raises(SystemExit) as done:
            main(([] if main is _train_main else ["some/folder"]) + words)
        assert done.value.code == 2
        assert needle in capsys.readouterr().err


def test_free_text_with_equals_is_not_an_override() -> None:
    ours, rest = Config.split_argv(["nj=2", "a=b is text", "out.wav", "yaml=x.yml", "model.x=1"])
    assert ours == ["nj=2", "yaml=x.yml", "model.x=1"] and rest == ["a=b is text", "out.wav"]


@pytest.mark.parametrize(
    "source,expected",
    [
        ("lambda p: p.parts[-2]", "spk"),
        ("lambda p: p.parts[-3]", "LibriTTS_spk"),
        ("lambda  path :path.parts[ -1 ]", "x.qnt.pt"),
        ("lambda p: p.parts[0]", "data"),
    ],
)
def test_spkr_name_getter_accepted_forms(source: str, expected: str) -> None:
    path = Path("data/LibriTTS_spk/spk/x.qnt.pt")
    assert parse_spkr_name_getter(source)(path) == expected
    assert Config.parse([f"spkr_name_getter={source}"]).get_spkr(path) == expected


@pytest.mark.parametrize(
    "source",
    [
        "lambda p: p.name",
        "lambda p: q.parts[-2]",
        "lambda p: p.parts[-2] + 'x'",
        "lambda p: __import__('os').system('echo hi')",
        "p.parts[-2]",
        "lambda p: p.parts[1:2]",
    ],
)
def test_spkr_name_getter_rejects_everything_else(source: str) -> None:
    with pytest.raises(ConfigError, match=r"lambda p: p.parts\[<int>\]"):
        parse_spkr_name_getter(source)
    with pytest.raises(ConfigError):
        Config.parse([f"spkr_name_getter={source}"])


def test_spkr_name_getter_index_out_of_range() -> None:
    with pytest.raises(ValueError, match="out of range"):
        parse_spkr_name_getter("lambda p: p.parts[-5]")(Path("a/b.wav"))


@pytest.mark.parametrize(
    "yaml_path,cfg_name",
    [
        ("config/LibriTTS/ar.yml", "LibriTTS/ar"),
        ("config/test/nar.yml", "test/nar"),
        ("/abs/repo/config/LibriTTS/ar-quarter.yaml", "LibriTTS/ar-quarter"),
        ("my/own/run.yml", "my/own/run"),
        ("/elsewhere/run.yml", "run-*"),  # outside config/: the stem plus a hash of the absolute path
        ("../up/run.yml", "run-*"),
        ("config/../../../tmp/x.yml", "x-*"),
    ],
)
def test_cfg_name_and_derived_dirs(tmp_path: Path, yaml_path: str, cfg_name: str) -> None:
    cfg = Config.parse([])
    cfg.yaml_path = yaml_path  # as build() records it; the file itself is not needed here
    if cfg_name.endswith("-*"):
        assert re.fullmatch(re.escape(cfg_name[:-1]) + "[0-9a-f]{8}", cfg.cfg_name), cfg.cfg_name
        cfg_name = cfg.cfg_name
    assert cfg.ckpt_dir == Path("ckpts") / cfg_name
    assert cfg.log_dir.parent == Path("logs") / cfg_name
    assert Config.parse([]).cfg_name == "default"


def test_cfg_name_from_a_real_yaml(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config" / "LibriTTS").mkdir(parents=True)
    (tmp_path / "config" / "LibriTTS" / "ar.yml").write_text("nj: 1\n")
    cfg = Config.parse(["yaml=config/LibriTTS/ar.yml"])
    assert (cfg.cfg_name, cfg.yaml_path, cfg.nj) == ("LibriTTS/ar", "config/LibriTTS/ar.yml", 1)


def test_validation_errors_name_the_field() -> None:
    for words, needle in (
        (["min_phones=60", "max_phones=50"], "min_phones"),
        (["batch_size=0"], "batch_size"),
        (["p_additional_prompt=1.5"], "p_additional_prompt"),
    ):
        with pytest.raises(ConfigError, match=needle):
            Config.parse(words)


@pytest.mark.parametrize("module", ["vall_e.export", "vall_e"])
def test_export_and_synthesis_clis_list_the_config_and_reject_bad_values(module, capsys) -> None:
    for words, code, stream, needle in (
        (["help=true"], 0, "out", "codec_weights"),
        (["zoo/x.pt", "batch_size=abc"], 2, "err", "batch_size"),
    ):
        with pytest.raises(SystemExit) as done:
            _run_main(module, words)
        assert done.value.code == code
        captured = capsys.readouterr()
        assert needle in getattr(captured, stream)


def _run_main(module: str, argv: list[str]) -> None:
    import importlib

    main = importlib.import_module(module if module != "vall_e" else "vall_e.__main__").main
    raise SystemExit(main(argv))


@pytest.mark.parametrize(
    "word,needle",
    [
        ("log_every=0", "log_every=0 must be at least 1"),
        ("save_ckpt_every=0", "save_ckpt_every=0 must be at least 1"),
        ("eval_every=0", "eval_every=0 must be at least 1"),
        ("max_val_ar_steps=0", "max_val_ar_steps=0 must be at least 1"),
        ("nj=-1", "nj=-1 must not be negative"),
        ("model=banana", "model='banana' is not a preset; choose one of ar, ar-half"),
        ("device=banana", "device='banana': use cpu, cuda or cuda:<index>"),
        ("device=cpu:1", "device='cpu:1'"),
        ("sampling_temperature=-1", "sampling_temperature=-1.0 must not be negative"),
        ("keep_last_ckpts=-1", "keep_last_ckpts=-1 must not be negative"),
        ("warmup_min_lr=1", "warmup_min_lr=1.0 is larger than warmup_max_lr"),
        ("codec_weights=/no/such/file.th", "codec_weights='/no/such/file.th'"),
        ("init_from=/no/such/run", "init_from='/no/such/run' does not exist"),
        ("name=../escape", "name='../escape'"),
    ],
)
def test_values_that_used_to_fail_late_fail_at_parse_time(word: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        Config.parse(["device=cpu", word] if not word.startswith("device=") else [word])
    assert needle in str(err.value)


def test_cuda_without_a_gpu_is_a_config_error() -> None:
    import torch

    if torch.cuda.is_available():
        with pytest.raises(ConfigError, match="numbered from 0"):
            Config.parse([f"device=cuda:{torch.cuda.device_count()}"])
    else:
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            Config.parse(["device=cuda"])


def test_train_cli_bad_value_is_one_line_exit_2() -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "vall_e.train", "device=cpu", "log_every=0"], capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: log_every=0 must be at least 1"]
