"""DeepSpeed engine construction and checkpoints.

One engine wraps one model (the AR or the NAR). The DeepSpeed config is derived from the project
config, so users only edit our YAML: optimizer, WarmupDecayLR schedule, clipping, accumulation,
mixed precision and ZeRO stage. On CPU (tests, laptops) the gloo backend and full precision are used.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..config import Config

_logger = logging.getLogger(__name__)


def precision(cfg: Config) -> str:
    """``"bf16"``, ``"fp16"`` or ``"fp32"``: mixed precision only where the device supports it."""
    if not cfg.device.startswith("cuda"):
        return "fp32"
    if cfg.use_bf16:
        return "bf16"
    return "fp16" if cfg.use_fp16 else "fp32"


def deepspeed_config(cfg: Config) -> dict[str, Any]:
    """The DeepSpeed JSON config equivalent to ``cfg``."""
    prec = precision(cfg)
    on_cpu = not cfg.device.startswith("cuda")
    opt_type = "AdamW" if cfg.optimizer.lower() == "adamw" else "Adam"
    opt_params: dict[str, Any] = {"lr": cfg.warmup_min_lr, "weight_decay": cfg.weight_decay, "betas": [0.9, 0.999]}
    if on_cpu:
        opt_params["torch_adam"] = True  # the fused kernels need CUDA
    total = max(cfg.max_iter, cfg.warmup_num_steps + 1)
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "optimizer": {"type": opt_type, "params": opt_params},
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "warmup_min_lr": cfg.warmup_min_lr,
                "warmup_max_lr": cfg.warmup_max_lr,
                "warmup_num_steps": cfg.warmup_num_steps,
                "total_num_steps": total,
                "warmup_type": "linear",
            },
        },
        "gradient_clipping": cfg.gradient_clipping,
        "fp16": {"enabled": prec == "fp16", "initial_scale_power": 16},
        "bf16": {"enabled": prec == "bf16"},
        "zero_optimization": {"stage": cfg.zero_stage},
        "steps_per_print": 10**12,  # we log ourselves
        "wall_clock_breakdown": False,
    }


def build_engine(cfg: Config, model: torch.nn.Module):
    """Wrap ``model`` in a DeepSpeed engine configured from ``cfg`` (the process group must exist)."""
    import deepspeed

    prec = precision(cfg)
    if not cfg.device.startswith("cuda") and (cfg.use_fp16 or cfg.use_bf16):
        _logger.info("running on %s: mixed precision is turned off, training in fp32", cfg.device)
    else:
        _logger.info("training precision: %s", prec)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(cfg),
    )
    return engine


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag DeepSpeed's ``latest`` file points to, or ``None`` without a checkpoint."""
    latest = Path(ckpt_dir) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag or None


def save_checkpoint(engine, ckpt_dir: Path, step: int, client_state: dict[str, Any]) -> None:
    """Save under ``ckpt_dir/global_step<step>`` and point ``latest`` at it (collective: all ranks call)."""
    engine.save_checkpoint(str(ckpt_dir), tag=f"global_step{step}", client_state=client_state, save_latest=True)


def load_checkpoint(engine, ckpt_dir: Path) -> dict[str, Any] | None:
    """Restore model, optimizer, scheduler and our client state from ``latest``; ``None`` if absent."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(
            f"{ckpt_dir}/latest points to {tag!r} but that checkpoint cannot be loaded; "
            f"fix or delete {ckpt_dir}/latest to start over"
        )
    return client_state
