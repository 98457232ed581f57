"""The GPU path's failure modes, made visible on CPU: NCCL's device rule, checkpoint agreement across
ranks, resume on another GPU count, true gradient norms, and a DeepSpeed config that compiles nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vall_e.config import Config
from vall_e.utils import distributed, engines, trainer

REPO = Path(__file__).resolve().parents[1]

# Run by 2 ranks under torchrun with VALL_E_STRICT_COMM=1. Each rank writes what it saw to <out>/<rank>.json.
_TWO_RANKS = textwrap.dedent(
    """
    import json, sys, types
    from pathlib import Path
    import torch
    import torch.distributed as dist
    from vall_e.config import Config
    from vall_e.models import get_model
    from vall_e.utils import distributed, engines
    from vall_e.utils.trainer import Trainer, TrainState

    out = Path(sys.argv[1])
    distributed.init_distributed("cpu")
    rank = distributed.global_rank()
    seen = {}

    def refused(src):
        # code that lives in a vall_e module and calls torch.distributed directly, as the old trainer did
        try:
            exec(compile(src, "vall_e/elsewhere.py", "exec"), {"__name__": "vall_e.elsewhere", "torch": torch, "dist": dist})
        except distributed.StrictCommError as e:
            return str(e)
        return None

    seen["raw_tensor"] = refused("dist.all_reduce(torch.ones(2))")
    seen["raw_object"] = refused("dist.broadcast_object_list([rank] if False else [0], src=0)")
    seen["module_sum"] = distributed.all_reduce(torch.tensor([rank + 1.0])).tolist()
    seen["module_max"] = distributed.all_reduce(torch.tensor([rank]), "max").tolist()
    seen["gathered"] = distributed.all_gather_object({"rank": rank})
    seen["broadcast"] = distributed.broadcast_object(f"from {rank}")

    cfg = Config.parse(["device=cpu", "model=ar-tiny", "batch_size=1", "log_every=1", f"ckpt_root={out / 'ckpts'}"])
    torch.manual_seed(0)
    engine = engines.build_engine(cfg, get_model("ar-tiny"))
    engines.make_loads_safe(engine)
    t = Trainer(cfg, engine, make_loader=lambda n: [], evaluate=lambda s: None,
                state=TrainState(step=3, consumed_batches=7 + rank, extra={"model": "ar-tiny"}))
    # every collective of the trainer's logged step, its save and its control path, strict
    stats = t._read_stats({"loss": torch.tensor(1.0 + rank)}, {"frames": 5.0, "bad_examples": float(rank), "examples": 10.0})
    seen["stats"] = stats
    seen["client_per_rank"] = t.client_state()["vall_e"]["consumed_batches_per_rank"]
    t.stop_signal = "SIGTERM" if rank == 1 else None
    seen["control"] = t._control(step=1, log=True)

    # two checkpoints; the newest cannot be read on rank 1 only: every rank must fall back alike
    for step in (1, 2):
        t.state.step = step
        engines.save_checkpoint(engine, cfg.ckpt_dir, step, t.client_state(), meta={})
    if rank == 1:
        real = engines._weights_only_load
        def flaky(path, map_location=None):
            if "global_step2" in str(path):
                raise OSError("Input/output error (simulated on rank 1)")
            return real(path, map_location)
        engines._weights_only_load = flaky
    tag, client = engines.load_checkpoint(engine, cfg.ckpt_dir, ["global_step2", "global_step1"])
    seen["loaded"] = [tag, client["vall_e"]["step"]]
    (out / f"{rank}.json").write_text(json.dumps(seen))
    """
)


def test_strict_comm_device_bites_and_every_collective_of_ours_passes(tmp_path):
    script = tmp_path / "two_ranks.py"
    script.write_text(_TWO_RANKS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", distributed.STRICT_ENV: "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    for r, seen in enumerate(ranks):
        assert "No backend type associated with device type cpu" in seen["raw_tensor"]
        assert "vall_e.elsewhere" in seen["raw_tensor"] and "vall_e.utils.distributed" in seen["raw_tensor"]
        assert "broadcast_object_list directly" in seen["raw_object"]
        assert seen["module_sum"] == [3.0] and seen["module_max"] == [1]
        assert seen["gathered"] == [{"rank": 0}, {"rank": 1}] and seen["broadcast"] == "from 0"
        assert seen["stats"]["loss"] == 1.5  # averaged over ranks
        assert seen["stats"]["frames"] == 10 and seen["stats"]["bad_examples"] == 1  # summed
        assert seen["client_per_rank"] == [7, 8]
        assert seen["control"] == ["", "SIGTERM" if r == 1 else "a signal on another rank"]
        assert seen["loaded"] == ["global_step1", 1], "ranks must agree to skip a checkpoint one of them cannot read"


def test_comm_device_is_the_current_gpu_under_nccl(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert distributed.comm_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "gloo")
    assert distributed.comm_device() == torch.device("cpu")


def test_rng_state_saved_with_8_gpus_restores_anywhere(monkeypatch):
    state = trainer.rng_state()
    state["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]  # as 8 visible GPUs saved it
    trainer.set_rng_state(state)  # a CPU machine: the CUDA states are simply not used
    assert torch.equal(torch.get_rng_state(), state["torch"])

    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.__setitem__(device, int(s[0])))
    trainer.set_rng_state(state)  # 2 GPUs now: the two that exist get theirs, nothing raises
    assert restored == {0: 0, 1: 1}
    restored.clear()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 16)
    trainer.set_rng_state(state)  # more GPUs than at save time
    assert restored == {i: i for i in range(8)}


def _ops_requested(ds: dict) -> set[str]:
    """The DeepSpeed ops a config makes DeepSpeed build or load (the ones that need nvcc when not prebuilt)."""
    ops = set()
    opt = ds.get("optimizer", {})
    kind, params = opt.get("type", "").lower(), opt.get("params", {})
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none"
    if kind in ("adam", "adamw") and not params.get("torch_adam"):
        ops.add("cpu_adam" if offload else "fused_adam")
    if kind == "lamb":
        ops.add("fused_lamb")
    if kind == "adagrad" and offload:
        ops.add("cpu_adagrad")
    if ds.get("aio"):
        ops.add("async_io")
    return ops


@pytest.mark.parametrize("words", [[], ["optimizer=adamw", "weight_decay=0.01"], ["zero_stage=2"],
                                   ["gradient_accumulation_steps=4"], ["use_fp16=false"]])
def test_cuda_config_requests_no_op_this_deepspeed_lacks(monkeypatch, words):
    from deepspeed.git_version_info import installed_ops

    monkeypatch.setattr(Config, "_validate_device", lambda self: None)  # no GPU here; the config is what is tested
    monkeypatch.setattr(engines, "bf16_supported", lambda device: True)
    ds = engines.deepspeed_config(Config.parse(["device=cuda", *words]))
    missing = _ops_requested(ds) - {op for op, built in installed_ops.items() if built}
    assert not missing, f"device=cuda would compile {missing} at start"
    assert ds["optimizer"]["params"]["torch_adam"] and ds["optimizer"]["params"]["fused"]


def test_half_precision_is_bf16_where_the_gpu_has_it(monkeypatch):
    monkeypatch.setattr(Config, "_validate_device", lambda self: None)
    cfg = Config.parse(["device=cuda"])
    monkeypatch.setattr(engines, "bf16_supported", lambda device: True)
    assert engines.precision(cfg) == "bf16"
    assert engines.precision(Config.parse(["device=cuda", "half_precision=fp16"])) == "fp16"
    assert engines.precision(Config.parse(["device=cuda", "use_fp16=false"])) == "fp32"
    monkeypatch.setattr(engines, "bf16_supported", lambda device: False)  # e.g. a V100 or a T4
    assert engines.precision(cfg) == "fp16"
    assert engines.precision(Config.parse(["device=cuda", "use_bf16=true"])) == "bf16"
    assert engines.precision(Config.parse(["device=cpu"])) == "fp32"

    monkeypatch.setattr(engines, "bf16_supported", lambda device: True)
    plain = engines.deepspeed_config(cfg)
    assert plain["bf16"]["enabled"] and not plain["fp16"]["enabled"] and "data_types" not in plain
    accum = engines.deepspeed_config(Config.parse(["device=cuda", "gradient_accumulation_steps=4"]))
    assert accum["data_types"] == {"grad_accum_dtype": "fp32"} and accum["zero_optimization"]["stage"] == 1


_GRAD_NORM = textwrap.dedent(
    """
    import json, sys
    import torch
    from vall_e.config import Config
    from vall_e.models import get_model
    from vall_e.utils import distributed, engines
    from vall_e.utils.trainer import Trainer, TrainState

    distributed.init_distributed("cpu")
    torch.manual_seed(0)
    cfg = Config.parse(["device=cpu", "model=ar-tiny", "batch_size=1", "gradient_clipping=0.5"])
    engine = engines.build_engine(cfg, get_model("ar-tiny"))
    t = Trainer(cfg, engine, make_loader=lambda n: [], evaluate=lambda s: None, state=TrainState())
    text, proms, resps = [torch.randint(1, 50, (9,))], [torch.randint(0, 1024, (20, 8))], [torch.randint(0, 1024, (30, 8))]
    engine.backward(engine(text, proms, resps).loss)
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    true = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    plain = float(t._grad_norm())
    # fp16 as DeepSpeed runs it: gradients multiplied by the loss scale until the optimizer step
    scale = 4096.0
    for g in grads:
        g.mul_(scale)
    engine.fp16_enabled = lambda: True
    engine.optimizer.loss_scale_config = type("LossScale", (), {"cur_scale": scale})()
    scaled = float(t._grad_norm())
    facts = {"true": true, "plain": plain, "scaled": scaled, "loss_scale": engines.loss_scale(engine)}
    for name in ("adam", "adamw"):  # the optimizer a real engine builds for each name
        c = Config.parse(["device=cpu", "model=ar-tiny", "batch_size=1", f"optimizer={name}", "weight_decay=0.1"])
        opt = engines.build_engine(c, get_model("ar-tiny")).basic_optimizer
        facts[name] = [type(opt).__name__, all(g["fused"] for g in opt.param_groups), opt.param_groups[0]["weight_decay"]]
    print(json.dumps(facts))
    """
)


def test_grad_norm_is_unscaled_and_optimizer_names_mean_what_they_say(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _GRAD_NORM], cwd=REPO, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["loss_scale"] == 4096.0
    assert got["true"] > 0.5  # above gradient_clipping: the logged norm is the one before clipping
    assert got["plain"] == pytest.approx(got["true"], rel=1e-5)
    assert got["scaled"] == pytest.approx(got["true"], rel=1e-5), "grad_norm must not carry the fp16 loss scale"
    # adam is Adam (L2 decay in the gradient), adamw is AdamW (decoupled): DeepSpeed alone makes both AdamW
    assert got["adam"] == ["Adam", True, 0.1] and got["adamw"] == ["AdamW", True, 0.1]


@pytest.mark.parametrize("launched, device, expected", [(False, "cuda:3", 3), (False, "cuda", 0), (True, "cuda:3", 1),
                                                        (True, "cuda", 1)])
def test_the_gpu_a_training_process_takes(monkeypatch, launched, device, expected):
    """device=cuda:N picks the GPU of a single process; under a launcher LOCAL_RANK does (NCCL needs one GPU per rank)."""
    import deepspeed
    import torch.distributed as dist

    chosen = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: None)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    monkeypatch.setattr(os, "environ", env)  # init_distributed writes the rendezvous variables: keep them here
    if launched:
        for var, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "RANK": "1", "LOCAL_RANK": "1",
                           "WORLD_SIZE": "2"}.items():
            monkeypatch.setenv(var, value)
    distributed.init_distributed(device)
    assert chosen == [expected]
