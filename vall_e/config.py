"""The project's configuration: one typed dataclass shared by every entry point.

Values merge as class defaults < ``yaml=<file>`` < ``key=value`` words (see :mod:`vall_e.utils.config`).
``python -m vall_e.train help=true`` prints every field with its default.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Callable, Optional

from .utils.config import BaseConfig, ConfigError, field

_SPKR_GETTER = re.compile(r"^\s*lambda\s+(\w+)\s*:\s*(\w+)\s*\.\s*parts\s*\[\s*(-?\d+)\s*\]\s*$")


def parse_spkr_name_getter(source: str) -> Callable[[Path], str]:
    """Turn ``"lambda p: p.parts[-2]"`` into a function, without ``eval``.

    Accepted: exactly ``lambda <name>: <name>.parts[<int>]`` (any spacing), meaning "the path
    component at that index", e.g. ``-2`` = the utterance's folder, ``-3`` = its grandparent (the
    LibriTTS speaker folder in ``<speaker>/<chapter>/<file>``). Anything else is rejected.
    """
    m = _SPKR_GETTER.match(source)
    if m is None or m.group(1) != m.group(2):
        raise ConfigError(
            f"spkr_name_getter {source!r} is not understood: write it as 'lambda p: p.parts[<int>]' "
            "(e.g. 'lambda p: p.parts[-2]' for the folder holding each file, "
            "'lambda p: p.parts[-3]' for LibriTTS <speaker>/<chapter>/<file>)"
        )
    index = int(m.group(3))

    def getter(path: Path) -> str:
        parts = Path(path).parts
        if not -len(parts) <= index < len(parts):
            raise ValueError(f"spkr_name_getter index {index} is out of range for path {str(path)!r}")
        return parts[index]

    return getter


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Config(BaseConfig):
    # data
    data_root: str = field("data", help="root folder of corpora (informational; data_dirs are used as given)")
    data_dirs: list[str] = field(default_factory=list, help="folders searched for <id>.qnt.pt + <id>.phn.txt")
    spkr_name_getter: str = field("lambda p: p.parts[-2]", help="'lambda p: p.parts[<int>]': speaker from path")
    min_phones: int = field(10, help="drop utterances with fewer phones")
    max_phones: int = field(50, help="drop utterances with more phones")
    p_additional_prompt: float = field(0.8, help="probability of adding one more prompt utterance")
    max_prompts: int = field(3, help="most utterances concatenated into one acoustic prompt")
    prompt_mode: str = field("speaker", help="speaker: 1..max_prompts other utterances of the speaker (reference) | "
                             "paper: AR = plain LM over phones + codebook 1, NAR = a 3 s segment of the utterance itself")
    sample_by: str = field("auto", help="what a training draw is uniform over: utterance | speaker (each speaker equally "
                           "often, then one of its utterances) | auto (utterance with arch=paper, else speaker)")
    val_dirs: list[str] = field(default_factory=list, help="folders of held-out speakers (e.g. LibriTTS dev-clean): the "
                                "val split and its prompts come from them (zero-shot); empty: val holds seen speakers")
    max_num_val: int = field(20, help="most utterances in each evaluation split")
    max_val_ar_steps: int = field(300, help="most AR frames generated per utterance during evaluation")
    min_seconds: float = field(0.0, help="drop utterances shorter than this (seconds of audio)")
    max_seconds: float = field(0.0, help="drop utterances longer than this (0 = no limit)")
    batch_frames: int = field(0, help="if > 0, bound on the padded batch: rows x longest sequence (else batch_size)")
    bucket_batches: int = field(64, help="draw each batch from a length-sorted pool of this many batches' worth (0 = plain random)")
    pack_codes: bool = field(True, help="read codes from the index's packed int16 shards (false: open each .qnt.pt)")
    index_root: str = field("", help="keep corpus indexes here instead of <data_dir>/.vall_e (read-only corpora)")
    index_check: str = field("files", help="staleness check at start: files (stat all) | dirs (folder mtimes) | off")
    index_rebuild: bool = field(False, help="rebuild the corpus indexes from scratch")
    max_bad_fraction: float = field(0.01, help="stop when more than this share of drawn examples is unreadable")
    max_nonfinite_steps: int = field(20, help="save and stop after this many steps in a row with a NaN/inf loss (0 = never)")

    # model
    num_tokens: int = field(1024, help="EnCodec codebook size")
    model: str = field("ar-quarter", help="model preset: ar|nar with -half/-quarter/-tiny")
    arch: str = field("enhuiz", help="model core: paper (prefix attention, tied per-level heads, shared acoustic "
                      "embeddings, separate positions; VALL-E section 4) | enhuiz (the reference implementation's core)")
    group_size: int = field(1, help="AR only (NAR runs ignore it): VALL-E 2 grouped code modeling, G codebook-1 codes "
                            "read and predicted per AR step (1 = plain VALL-E; the paper's best trade-off is 2)")
    activation_checkpointing: bool = field(False, help="recompute activations in backward to save memory")

    # training
    nj: int = field(8, help="dataloader workers")
    batch_size: int = field(32, help="training batch size per process")
    eval_batch_size: int = field(32, help="evaluation batch size")
    warmup_min_lr: float = field(1e-6, help="learning rate at step 0")
    warmup_max_lr: float = field(2e-4, help="peak learning rate after warmup")
    warmup_num_steps: int = field(1000, help="steps of linear warmup")
    max_iter: int = field(1_000_000, help="total training steps (lr decays to 0 there)")
    gradient_clipping: float = field(100.0, help="clip when the global L2 norm of the unscaled gradients (logged as "
                                     "grad_norm, before clipping) exceeds this (0 = off)")
    gradient_accumulation_steps: int = field(1, help="micro-batches per optimizer step")
    optimizer: str = field("adam", help="adam (weight decay added to the gradient, L2) | adamw (decoupled weight decay); "
                           "torch's fused kernel either way")
    weight_decay: float = field(0.0, help="weight decay: an L2 term with optimizer=adam, decoupled with adamw")
    zero_stage: int = field(0, help="DeepSpeed ZeRO stage 0-3")
    use_fp16: bool = field(True, help="train in half precision on GPU: bf16 where the GPU has it (Ampere+), else fp16 "
                           "(see half_precision; ignored on CPU)")
    half_precision: str = field("auto", help="which half precision use_fp16 means: auto (bf16 if the GPU has it, else "
                                "fp16) | bf16 | fp16")
    use_bf16: bool = field(False, help="bf16 mixed precision on GPU (older recipes: same as half_precision=bf16)")
    eval_every: int = field(2000, help="evaluate every N steps")
    save_ckpt_every: int = field(2000, help="save a checkpoint every N steps")
    log_every: int = field(10, help="log training stats every N steps")
    sampling_temperature: float = field(1.0, help="AR sampling temperature in evaluation")
    cache_dataloader: bool = field(False, help="(kept for old recipes; the corpus index is always cached)")
    keep_last_ckpts: int = field(5, help="keep this many newest checkpoints, delete older ones after a save (0 = keep all)")
    init_from: Optional[str] = field(None, help="start a new run from these weights: an exported .pt or a checkpoint folder")
    ckpt_root: str = field("ckpts", help="checkpoints go to <ckpt_root>/<cfg_name>/")
    log_root: str = field("logs", help="logs go to <log_root>/<cfg_name>/<start time>/")
    tensorboard: bool = field(True, help="also write the logged stats, eval audio and settings as TensorBoard events into the log folder")
    wandb: bool = field(False, help="also send the logged stats to Weights & Biases through DeepSpeed's monitor (pip install wandb)")
    wandb_project: str = field("vall-e", help="W&B project when wandb=true (runs are grouped by cfg_name)")

    # runtime
    device: str = field(default_factory=_default_device, help="cuda when available, else cpu")
    seed: int = field(0, help="random seed")
    codec_weights: str = field("pretrained", help="pretrained | untrained | <path to an EnCodec checkpoint>")
    yaml_path: Optional[str] = field(None, help="set by yaml=<file>; names the run (cfg_name)")
    name: Optional[str] = field(None, help="run name (checkpoint/log folder) instead of one derived from yaml=")

    def validate(self) -> None:
        """Check every value that could otherwise fail late (hours in, or after DeepSpeed started)."""
        parse_spkr_name_getter(self.spkr_name_getter)
        self._validate_runtime()
        if self.optimizer.lower() not in {"adam", "adamw"}:
            raise ConfigError(f"optimizer={self.optimizer!r}: use 'adam' or 'adamw'")
        if not 0 <= self.zero_stage <= 3:
            raise ConfigError(f"zero_stage={self.zero_stage}: use 0, 1, 2 or 3")
        for name in ("batch_size", "eval_batch_size", "max_prompts", "gradient_accumulation_steps", "max_iter"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")
        if self.min_phones > self.max_phones:
            raise ConfigError(f"min_phones={self.min_phones} is larger than max_phones={self.max_phones}")
        if self.half_precision not in ("auto", "bf16", "fp16"):
            raise ConfigError(f"half_precision={self.half_precision!r}: use auto, bf16 or fp16")
        if self.prompt_mode not in ("speaker", "paper"):
            raise ConfigError(f"prompt_mode={self.prompt_mode!r}: use speaker (other utterances of the speaker) or paper")
        if self.arch not in ("paper", "enhuiz"):
            raise ConfigError(f"arch={self.arch!r}: use paper (the VALL-E paper's model) or enhuiz (the reference's)")
        if self.group_size < 1:
            raise ConfigError(f"group_size={self.group_size}: use 1 (plain VALL-E) or more codes per AR step "
                              "(VALL-E 2 measured 1, 2, 4 and 8)")
        if self.sample_by not in ("auto", "utterance", "speaker"):
            raise ConfigError(f"sample_by={self.sample_by!r}: use utterance, speaker or auto")
        if self.index_check not in ("files", "dirs", "off"):
            raise ConfigError(f"index_check={self.index_check!r}: use files, dirs or off")
        for name in ("batch_frames", "bucket_batches", "min_seconds", "max_seconds", "nj"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must not be negative")
        if 0 < self.max_seconds < self.min_seconds:
            raise ConfigError(f"min_seconds={self.min_seconds} is larger than max_seconds={self.max_seconds}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"max_bad_fraction={self.max_bad_fraction} must be within [0, 1]")
        if not 0.0 <= self.p_additional_prompt <= 1.0:
            raise ConfigError(f"p_additional_prompt={self.p_additional_prompt} must be within [0, 1]")

    def _validate_runtime(self) -> None:
        """Ranges, enumerations, presets, the device, run names: values that would otherwise fail only after the
        models were built or DeepSpeed started."""
        for name in ("log_every", "save_ckpt_every", "eval_every", "max_val_ar_steps", "num_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")
        for name in ("max_num_val", "min_phones", "keep_last_ckpts", "max_nonfinite_steps", "warmup_num_steps", "seed", "gradient_clipping",
                     "weight_decay", "warmup_min_lr", "warmup_max_lr", "sampling_temperature"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must not be negative")
        if self.warmup_min_lr > self.warmup_max_lr:
            raise ConfigError(f"warmup_min_lr={self.warmup_min_lr} is larger than warmup_max_lr={self.warmup_max_lr}")
        from .base import PRESETS  # lazily: importing the models pulls in torch

        if self.model not in PRESETS:
            raise ConfigError(f"model={self.model!r} is not a preset; choose one of {', '.join(sorted(PRESETS))}")
        self._validate_device()
        if self.codec_weights not in ("pretrained", "untrained") and not Path(self.codec_weights).is_file():
            raise ConfigError(f"codec_weights={self.codec_weights!r}: use pretrained, untrained or the path of an "
                              "existing EnCodec checkpoint file")
        if self.init_from is not None and not Path(self.init_from).exists():
            raise ConfigError(f"init_from={self.init_from!r} does not exist: give an exported .pt file or a "
                              "checkpoint folder (ckpts/<run name>)")
        if self.name is not None:
            parts = Path(self.name).parts
            if not self.name.strip() or Path(self.name).is_absolute() or ".." in parts or "\\" in self.name:
                raise ConfigError(f"name={self.name!r}: use a relative name such as 'mine/ar' (no leading '/', "
                                  "no '..'): runs live under ckpt_root and log_root")

    def _validate_device(self) -> None:
        m = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", self.device)
        if m is None or (m.group(1) == "cpu" and m.group(2) is not None):
            raise ConfigError(f"device={self.device!r}: use cpu, cuda or cuda:<index>")
        if m.group(1) == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(f"device={self.device}: torch sees no CUDA GPU on this machine (driver, "
                                  "CUDA_VISIBLE_DEVICES or a CPU-only torch?); use device=cpu")
            if m.group(2) is not None and int(m.group(2)) >= torch.cuda.device_count():
                raise ConfigError(f"device={self.device}: this machine has {torch.cuda.device_count()} GPU(s), "
                                  f"numbered from 0")

    # derived -----------------------------------------------------------------------------------

    @property
    def cfg_name(self) -> str:
        """The run name: checkpoints in ``<ckpt_root>/<cfg_name>``, logs in ``<log_root>/<cfg_name>``.

        - ``name=`` when given;
        - a yaml under a ``config`` folder: the path after it, without suffix
          (``config/LibriTTS/ar.yml`` -> ``LibriTTS/ar``, DESIGN.md's rule);
        - a relative yaml path elsewhere, without ``..``: that path without suffix (``my/run.yml`` -> ``my/run``);
        - any other yaml (absolute, or climbing out with ``..``): its stem plus a hash of its absolute path
          (``/a/ar.yml`` -> ``ar-<8 hex>``), so ``/a/ar.yml`` and ``/b/ar.yml`` never share checkpoints
          and no name leaves ``ckpt_root``/``log_root``;
        - ``default`` without a yaml file.
        """
        if self.name is not None:
            return Path(self.name).as_posix()
        if self.yaml_path is None:
            return "default"
        path = Path(os.path.normpath(self.yaml_path)).with_suffix("")
        parts = path.parts
        if "config" in parts[:-1]:
            return Path(*parts[len(parts) - parts[::-1].index("config"):]).as_posix()
        if not path.is_absolute() and ".." not in parts:
            return path.as_posix()
        digest = hashlib.sha1(os.path.abspath(self.yaml_path).encode("utf-8")).hexdigest()[:8]
        return f"{path.name}-{digest}"

    @property
    def ckpt_dir(self) -> Path:
        return Path(self.ckpt_root) / self.cfg_name

    @cached_property
    def start_time(self) -> str:
        return datetime.now().strftime("%Y-%m-%dT%H-%M-%S")

    @property
    def log_dir(self) -> Path:
        return Path(self.log_root) / self.cfg_name / self.start_time

    @property
    def get_spkr(self) -> Callable[[Path], str]:
        return parse_spkr_name_getter(self.spkr_name_getter)

    @property
    def sampling_unit(self) -> str:
        """``sample_by`` with ``auto`` resolved: ``"utterance"`` for ``arch=paper``, else ``"speaker"``."""
        if self.sample_by != "auto":
            return self.sample_by
        return "utterance" if self.arch == "paper" else "speaker"

    @property
    def model_kind(self) -> str:
        """``"ar"`` or ``"nar"``, from the preset name."""
        return self.model.split("-")[0].lower()
