"""Export: DeepSpeed training checkpoints -> self-contained inference files (real training runs, CPU)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from vall_e.export import FORMAT_TAG, FORMAT_VERSION, ExportError, InferenceFileError, export, main, read_inference_file

REPO = Path(__file__).resolve().parents[1]
STATES = "mp_rank_00_model_states.pt"


def ckpt_dir(cfg_path: Path) -> Path:
    return Path(yaml.safe_load(cfg_path.read_text())["ckpt_root"]) / cfg_path.stem


def copy_run(cfg_path: Path, dest: Path) -> Path:
    """A private copy of a run (config pointing at copied checkpoints) that a test may damage."""
    cfg = yaml.safe_load(cfg_path.read_text())
    shutil.copytree(ckpt_dir(cfg_path), dest / "ckpts" / cfg_path.stem)
    cfg["ckpt_root"] = str(dest / "ckpts")
    new = dest / "config" / cfg_path.name
    new.parent.mkdir(parents=True)
    new.write_text(yaml.safe_dump(cfg))
    return new


def test_cli_exports_self_contained_file(tiny_runs, tmp_path):
    for kind, cfg_path in tiny_runs.items():
        out = tmp_path / "zoo" / f"{kind}.pt"
        proc = subprocess.run(
            [sys.executable, "-m", "vall_e.export", str(out), f"yaml={cfg_path}"],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        assert str(out) in proc.stdout and f"{kind.upper()} {kind}-tiny" in proc.stdout

        # plain weights-only load; nothing of the training run is needed
        data = torch.load(out, map_location="cpu", weights_only=True)
        assert data["format"] == FORMAT_TAG and data["format_version"] == FORMAT_VERSION
        assert data["kind"] == kind and data["preset"] == f"{kind}-tiny" and data["step"] == 30
        assert data["hparams"]["kind"] == kind and data["speakers"] == ["101", "102"]
        ckpt = ckpt_dir(cfg_path)
        assert data["phone_map"] == yaml.safe_load((ckpt / "phone_map.json").read_text())
        states = torch.load(ckpt / "global_step30" / STATES, map_location="cpu", weights_only=True)
        assert data["state_dict"].keys() == states["module"].keys()
        for name, t in states["module"].items():
            assert torch.equal(data["state_dict"][name], t), name
        assert read_inference_file(out)["kind"] == kind  # the library reader agrees


def test_missing_checkpoint_is_explained(tiny_runs, tmp_path, capsys):
    out = tmp_path / "ar.pt"
    assert main([str(out), f"yaml={tiny_runs['ar']}", f"ckpt_root={tmp_path / 'nowhere'}"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nowhere" / "ar") in err and "Train first" in err
    assert not out.exists()

    run = copy_run(tiny_runs["ar"], tmp_path / "copy")
    ck = ckpt_dir(run)
    (ck / "latest").write_text("global_step999")
    with pytest.raises(ExportError, match=r"global_step999.*missing or incomplete.*global_step30"):
        export(out, ck)
    # an explicit tag still works
    assert export(out, ck, tag="global_step30")["step"] == 30


def test_corrupt_checkpoint_is_explained(tiny_runs, tmp_path, capsys):
    run = copy_run(tiny_runs["nar"], tmp_path)
    states = ckpt_dir(run) / "global_step30" / STATES
    states.write_bytes(states.read_bytes()[:5000])  # truncated, as by a full disk
    out = tmp_path / "nar.pt"
    assert main([str(out), f"yaml={run}"]) == 2
    err = capsys.readouterr().err
    assert str(states) in err and "corrupt or truncated" in err
    assert not out.exists()


def test_foreign_pickles_need_trust_and_deepspeed_classes_do_not(tiny_runs, tmp_path, capsys):
    from deepspeed.utils.tensor_fragment import fragment_address

    run = copy_run(tiny_runs["ar"], tmp_path)
    states_path = ckpt_dir(run) / "global_step30" / STATES
    states = torch.load(states_path, map_location="cpu", weights_only=True)
    # what DeepSpeed's bf16 optimizer pickles into the same file: allow-listed, no trust needed
    states["optimizer"] = {"param_slice_mappings": {"sep": fragment_address(numel=64, start=0)}}
    torch.save(states, states_path)
    assert export(tmp_path / "a.pt", ckpt_dir(run))["kind"] == "ar"

    states["args"] = argparse.Namespace(lr=1e-3)  # an arbitrary Python object: refused by name
    torch.save(states, states_path)
    out = tmp_path / "b.pt"
    assert main([str(out), f"yaml={run}"]) == 2
    err = capsys.readouterr().err
    assert "argparse.Namespace" in err and "--trust-checkpoint" in err and not out.exists()
    assert main([str(out), f"yaml={run}", "--trust-checkpoint"]) == 0
    assert torch.load(out, weights_only=True)["kind"] == "ar"


def test_zero3_checkpoint_is_gathered(tmp_path):
    """A ZeRO stage 3 checkpoint written by the project's own engine and trainer save path."""
    script = textwrap.dedent(
        f"""
        import torch
        from vall_e.models import get_model
        from vall_e.config import Config
        from vall_e.utils import distributed
        from vall_e.utils.engines import build_engine
        from vall_e.utils.trainer import Trainer, TrainState

        cfg = Config.parse(["ckpt_root={tmp_path / 'ckpts'}", "device=cpu", "zero_stage=3", "model=ar-tiny", "batch_size=1"])
        distributed.init_distributed("cpu")
        torch.manual_seed(0)
        model = get_model("ar-tiny")
        torch.save({{k: v.clone() for k, v in model.state_dict().items()}}, "{tmp_path / 'ref.pt'}")
        extra = {{"phone_map": {{"<s>": 1, "</s>": 2, "AH0": 3}}, "speakers": ["s"], "model": "ar-tiny", "hparams": model.hparams}}
        engine = build_engine(cfg, model)
        Trainer(cfg, engine, make_loader=lambda n: [], evaluate=lambda s: None, state=TrainState(step=1, extra=extra)).save()
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    tag_dir = tmp_path / "ckpts" / "default" / "global_step1"
    assert not (tag_dir / STATES).exists(), "expected a ZeRO-3 layout"
    data = export(tmp_path / "z3.pt", tmp_path / "ckpts" / "default")
    ref = torch.load(tmp_path / "ref.pt", weights_only=True)
    assert data["state_dict"].keys() == ref.keys()
    for name, t in ref.items():
        assert torch.equal(data["state_dict"][name], t), name


def test_inference_file_errors(tiny_runs, tmp_path):
    with pytest.raises(InferenceFileError, match=r"no such file.*vall_e\.export"):
        read_inference_file(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(InferenceFileError, match="corrupt"):
        read_inference_file(bad)
    raw = ckpt_dir(tiny_runs["ar"]) / "global_step30" / STATES
    with pytest.raises(InferenceFileError, match="DeepSpeed training checkpoint"):
        read_inference_file(raw)
