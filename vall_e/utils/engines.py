"""DeepSpeed engine construction and checkpoints.

One engine wraps one model (the AR or the NAR). The DeepSpeed config is derived from the project
config, so users only edit our YAML: optimizer, WarmupDecayLR schedule, clipping, accumulation,
mixed precision and ZeRO stage. On CPU (tests, laptops) the gloo backend and full precision are used.

Optimizer: torch's fused Adam/AdamW kernel (``torch.optim.AdamW(fused=True)``, CUDA and CPU) through
DeepSpeed's ``torch_adam`` switch. It needs no compiled DeepSpeed op: DeepSpeed's own FusedAdam is
JIT-built with ``nvcc`` at the first ``deepspeed.initialize`` unless the wheel was built with it, and a
driver-only GPU machine has no ``nvcc``. The fused kernel also reads a ``found_inf`` flag, which lets
the trainer skip a non-finite step without a host sync (:func:`skip_step_unless`).

Precision (:func:`precision`): on CUDA, ``use_fp16`` (train in half precision) picks bf16 on GPUs
that have it (Ampere and newer) and fp16 elsewhere; ``half_precision`` forces one. TF32 matmuls are
allowed for fp32 work on CUDA (:func:`allow_tf32`). With ``gradient_accumulation_steps > 1``, bf16
training accumulates gradients in fp32: DeepSpeed's BF16 optimizer (ZeRO stage 1 with
``data_types.grad_accum_dtype = fp32``; stage 0 has no fp32 accumulation and rejects that setting).
fp16 keeps DeepSpeed's loss-scaled fp16 accumulation: DeepSpeed offers no fp32 accumulation for fp16.

Checkpoints: a save becomes visible only when complete (written under a ``.partial-`` name,
renamed, then ``latest`` updated); resume picks the newest complete checkpoint and falls back past
damaged ones, with every rank agreeing before any of them enters DeepSpeed's load; DeepSpeed's loads
are made weights-only; ``.lock`` keeps one run per folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..config import Config
from .helpers import allow_tf32, process_alive, process_start
from .monitor import deepspeed_monitor_config

_logger = logging.getLogger(__name__)


def bf16_supported(device: str) -> bool:
    """Whether ``device`` computes in bf16 natively (CUDA compute capability 8.0+: Ampere, Hopper, ...)."""
    if not device.startswith("cuda"):
        return False
    import torch

    index = torch.device(device).index
    return torch.cuda.get_device_capability(torch.cuda.current_device() if index is None else index)[0] >= 8


def precision(cfg: Config) -> str:
    """``"bf16"``, ``"fp16"`` or ``"fp32"``: mixed precision only where the device supports it.

    ``use_fp16`` means "train in half precision": bf16 where the GPU has it (no loss scaling, no
    skipped overflow steps), fp16 elsewhere; ``half_precision=bf16|fp16`` overrides that choice and
    ``use_bf16`` (older recipes) means ``half_precision=bf16``. The CPU trains in fp32.
    """
    if not cfg.device.startswith("cuda"):
        return "fp32"
    if cfg.use_bf16:
        return "bf16"
    if not cfg.use_fp16:
        return "fp32"
    if cfg.half_precision != "auto":
        return cfg.half_precision
    return "bf16" if bf16_supported(cfg.device) else "fp16"


def optimizer_config(cfg: Config) -> dict[str, Any]:
    """DeepSpeed's ``optimizer`` section: Adam (L2 weight decay) or AdamW (decoupled), torch's fused kernel.

    DeepSpeed turns ``type: Adam`` into AdamW unless ``adam_w_mode`` is false, so it is set explicitly:
    ``optimizer=adam`` is Adam.
    """
    adamw = cfg.optimizer.lower() == "adamw"
    params: dict[str, Any] = {
        "lr": cfg.warmup_min_lr,
        "weight_decay": cfg.weight_decay,
        "betas": [0.9, 0.999],
        "torch_adam": True,  # torch.optim.Adam/AdamW: no DeepSpeed op to compile
        "fused": True,  # one kernel for all parameters; reads found_inf (skip_step_unless)
        "adam_w_mode": adamw,
    }
    return {"type": "AdamW" if adamw else "Adam", "params": params}


def describe_optimizer(cfg: Config) -> str:
    """One line for the log: which implementation trains, and why no op is compiled."""
    from deepspeed.git_version_info import installed_ops

    name = "AdamW" if cfg.optimizer.lower() == "adamw" else "Adam"
    prebuilt = "prebuilt in this DeepSpeed" if installed_ops.get("fused_adam") else "not prebuilt in this DeepSpeed"
    return (f"optimizer: torch.optim.{name}(fused=True) through DeepSpeed's torch_adam (nothing to compile; "
            f"DeepSpeed's FusedAdam op is {prebuilt} and not used)")


def deepspeed_config(cfg: Config) -> dict[str, Any]:
    """The DeepSpeed JSON config equivalent to ``cfg``."""
    prec = precision(cfg)
    total = max(cfg.max_iter, cfg.warmup_num_steps + 1)
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    extra: dict[str, Any] = {}
    if prec == "bf16" and cfg.gradient_accumulation_steps > 1:
        # fp32 accumulation: DeepSpeed's BF16 optimizer, which stage 0 does not offer
        zero["stage"] = max(cfg.zero_stage, 1)
        extra["data_types"] = {"grad_accum_dtype": "fp32"}
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "optimizer": optimizer_config(cfg),
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
        "zero_optimization": zero,
        **extra,
        "steps_per_print": 10**12,  # we log ourselves
        "wall_clock_breakdown": False,
        **deepspeed_monitor_config(cfg),  # W&B when wandb=true (TensorBoard is written by utils/monitor.py)
    }


def build_engine(cfg: Config, model: torch.nn.Module):
    """Wrap ``model`` in a DeepSpeed engine configured from ``cfg`` (the process group must exist)."""
    import deepspeed

    prec = precision(cfg)
    ds_config = deepspeed_config(cfg)
    if not cfg.device.startswith("cuda") and (cfg.use_fp16 or cfg.use_bf16):
        _logger.info("running on %s: mixed precision is turned off, training in fp32", cfg.device)
    else:
        why = {"bf16": "this GPU computes in bf16" if not cfg.use_bf16 and cfg.half_precision == "auto" else "asked for",
               "fp16": "this GPU has no native bf16" if cfg.half_precision == "auto" else "asked for",
               "fp32": "use_fp16=false"}[prec]
        accum = ""
        if cfg.gradient_accumulation_steps > 1:
            accum = ("; gradients accumulate in fp32 (ZeRO stage 1, grad_accum_dtype=fp32)" if "data_types" in ds_config
                     else f"; gradients accumulate in {prec}")
        _logger.info("training precision: %s (%s)%s", prec, why, accum)
    if cfg.device.startswith("cuda"):
        allow_tf32(True)
        if prec == "fp32":
            _logger.info("fp32 training on CUDA: TF32 matmuls and convolutions are allowed")
    _logger.info("%s", describe_optimizer(cfg))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
    )
    return engine


@contextlib.contextmanager
def skip_step_unless(engine, finite: torch.Tensor) -> Iterator[None]:
    """Around the ``engine.step()`` that applies the optimizer: a no-op on every parameter unless ``finite``
    (a 0-d device bool, the same on every rank).

    With torch's fused Adam/AdamW (what :func:`optimizer_config` asks for) the kernel reads
    ``found_inf`` on the device, as PyTorch's AMP does: weights, moments and the step count stay as
    they were, and the host never waits. Any other optimizer falls back to a host read and a zero
    learning rate for that step (Adam's update and AdamW's decay scale with it), which syncs.
    The schedule advances either way.
    """
    opt = getattr(engine, "basic_optimizer", None) or engine.optimizer
    if isinstance(opt, torch.optim.Adam | torch.optim.AdamW) and all(g.get("fused") for g in opt.param_groups):
        opt.found_inf = (~finite).to(torch.float32)
        try:
            yield
        finally:
            opt.found_inf = None
        return
    if bool(finite):
        yield
        return
    saved = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = 0.0
    try:
        yield
    finally:
        # the scheduler has set the next step's lr by now; where it did not step (an fp16 overflow
        # skip), put the lr back so the next step is not frozen too
        for g, lr in zip(opt.param_groups, saved):
            if g["lr"] == 0.0:
                g["lr"] = lr


def loss_scale(engine) -> float:
    """The fp16 loss scale the gradients are multiplied by right now (1.0 in bf16 and fp32)."""
    if not engine.fp16_enabled():
        return 1.0
    opt = engine.optimizer
    cfg = getattr(opt, "loss_scale_config", None)
    scale = getattr(cfg, "cur_scale", None) if cfg is not None else None
    if scale is None:
        scale = getattr(opt, "cur_scale", None) or getattr(getattr(opt, "loss_scaler", None), "cur_scale", None)
    return float(scale or 1.0)


# ----------------------------------------------------------------------------------------------
# checkpoints: whole or absent, newest usable first, loaded without full unpickling

CKPT_TAG = re.compile(r"^global_step(\d+)$")
PARTIAL_PREFIX = ".partial-"  # a save in progress: never taken for a checkpoint
META_FILE = "vall_e.json"  # written into each checkpoint folder: readable without unpickling anything
LOCK_FILE = ".lock"


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be used as it is; the message says what to do (exit 2)."""


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag DeepSpeed's ``latest`` file points to, or ``None`` when it is missing or empty."""
    latest = Path(ckpt_dir) / "latest"
    try:
        tag = latest.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return tag or None


def checkpoint_tags(ckpt_dir: Path) -> list[str]:
    """Every ``global_step<N>`` folder in ``ckpt_dir``, newest (largest N) first."""
    try:
        entries = [p for p in Path(ckpt_dir).iterdir() if p.is_dir() and CKPT_TAG.match(p.name)]
    except FileNotFoundError:
        return []
    return [p.name for p in sorted(entries, key=lambda p: int(CKPT_TAG.match(p.name).group(1)), reverse=True)]


def tag_step(tag: str) -> int:
    m = CKPT_TAG.match(tag)
    return int(m.group(1)) if m else -1


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint, or ``None`` when it looks whole.

    Cheap: every ``.pt`` file must end in an intact zip directory (``torch.save`` writes a zip
    whose directory comes last, so a truncated file fails here without reading its data).
    Damage in the middle of a file shows up when it is loaded, which falls back the same way.
    """
    files = sorted(folder.glob("*.pt"))
    if not any(f.name.endswith("model_states.pt") for f in files):
        return "no *model_states.pt file in it (a save that did not finish?)"
    for f in files:
        try:
            with zipfile.ZipFile(f) as z:
                z.infolist()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            return f"{f.name} is truncated or corrupt ({e})"
    return None


def resume_candidates(ckpt_dir: Path) -> list[str]:
    """The checkpoint tags to try, best first; ``[]`` for a fresh run.

    ``latest`` is followed when it names a complete checkpoint (a hand-edited ``latest`` rolls a
    run back); otherwise the newest complete ``global_step<N>`` is used, with a warning. Folders
    that are not whole are skipped with a warning naming them.

    Raises:
        CheckpointError: checkpoints exist (or ``latest`` names one) but none is usable: starting
            from step 0 there would overwrite a run, so the user decides.
    """
    ckpt_dir = Path(ckpt_dir)
    tags = checkpoint_tags(ckpt_dir)
    latest = latest_tag(ckpt_dir)
    plain_name = latest is not None and Path(latest).name == latest and latest not in (".", "..")
    if latest is not None and not plain_name:
        _logger.warning("%s/latest holds %r, which is not a checkpoint folder name", ckpt_dir, latest)
    if latest is not None and latest in tags:
        newer = [t for t in tags if tag_step(t) > tag_step(latest)]
        if newer:
            _logger.warning("%s/latest names %s but newer checkpoints exist (%s): resuming from %s as latest says",
                            ckpt_dir, latest, ", ".join(newer), latest)
        order = [latest] + [t for t in tags if tag_step(t) < tag_step(latest)]
    elif plain_name and (ckpt_dir / latest).is_dir():  # a hand-made tag such as "best"
        order = [latest] + tags
    else:
        if latest is None and tags:
            _logger.warning("%s/latest is missing or empty although checkpoints exist: using the newest complete one",
                            ckpt_dir)
        elif latest is not None and tags:
            _logger.warning("%s/latest names %r, which does not exist: using the newest complete checkpoint",
                            ckpt_dir, latest)
        elif latest is not None:
            raise CheckpointError(
                f"{ckpt_dir}/latest names the checkpoint {latest!r} but {ckpt_dir} holds no global_step* folder. "
                f"Put that checkpoint back to resume, or delete {ckpt_dir}/latest to start this run from step 0."
            )
        order = tags
    usable, problems = [], []
    for tag in order:
        problem = checkpoint_problem(ckpt_dir / tag)
        if problem is None:
            usable.append(tag)
        else:
            problems.append(f"{ckpt_dir / tag}: {problem}")
            _logger.warning("skipping checkpoint %s: %s", ckpt_dir / tag, problem)
    if order and not usable:
        raise no_usable_checkpoint(ckpt_dir, problems)
    return usable


def no_usable_checkpoint(ckpt_dir: Path, problems: list[str]) -> CheckpointError:
    listing = "\n  ".join(problems)
    return CheckpointError(
        f"{ckpt_dir} holds checkpoints but none can be used:\n  {listing}\n"
        f"Training does not start over them from step 0. Restore a good checkpoint into {ckpt_dir}, or move "
        f"the folder away (or pick another ckpt_root=/name=) to start a new run."
    )


def read_meta(folder: Path) -> dict[str, Any] | None:
    """The ``vall_e.json`` a checkpoint folder carries (model preset, hparams, step), if any."""
    try:
        return json.loads((Path(folder) / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _weights_only_load(path: str, map_location: Any = None) -> Any:
    """``torch.load(weights_only=True)`` with the few DeepSpeed data classes its files may hold."""
    from ..export import deepspeed_safe_globals

    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def make_loads_safe(engine) -> None:
    """Make ``engine`` read checkpoints with ``weights_only=True``, from :func:`preload` when it has.

    DeepSpeed's torch checkpoint engine unpickles fully (``weights_only=False``), which runs any
    code a planted file carries. Every DeepSpeed load (model states, ZeRO shards, optimizer files)
    goes through ``engine.checkpoint_engine.load``, so replacing that one method covers them all.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    ce = engine.checkpoint_engine
    if not isinstance(ce, TorchCheckpointEngine):
        raise RuntimeError(f"checkpoint engine {type(ce).__name__} is not supported: vall_e loads only through "
                           "the torch engine, made weights-only")
    cache: dict[str, Any] = {}
    engine._vall_e_preloaded = cache

    def load(path: str, map_location: Any = None) -> Any:
        key = os.path.realpath(path)
        if key in cache:
            return cache.pop(key)  # read once by preload: DeepSpeed takes it from memory
        return _weights_only_load(path, map_location)

    ce.load = load  # instance attribute: shadows the unsafe method for this engine only


def preload(engine, folder: Path) -> str | None:
    """Read every ``*.pt`` file of checkpoint ``folder`` (weights-only) into the engine's load cache.

    Returns why it cannot be used, or ``None``. This is the part of a load that fails on a damaged
    or planted file, done before DeepSpeed's ``load_checkpoint`` so that every rank can agree on
    the outcome first: DeepSpeed's load holds collectives, and a rank that failed inside it while
    the others went on would leave them waiting there forever. Every rank reads every file, as
    DeepSpeed's own load does (all ZeRO shards are read to re-partition), so nothing is read twice.
    """
    cache = engine._vall_e_preloaded
    cache.clear()
    try:
        for f in sorted(Path(folder).glob("*.pt")):
            cache[os.path.realpath(f)] = _weights_only_load(str(f), map_location="cpu")
    except Exception as e:  # any failure here means this checkpoint is unusable on this rank
        cache.clear()
        first = (str(e).strip().splitlines() or [""])[0]
        return f"{type(e).__name__}: {first[:400]}"
    return None


def leader_decides(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on global rank 0 and give every rank its result, or its :class:`CheckpointError`.

    Filesystem decisions (which checkpoint to resume, whether the lock is ours) are taken once,
    so ranks never disagree and warnings are logged once.
    """
    from . import distributed

    box: list[Any] = [None, None]
    if distributed.is_global_leader():
        try:
            box = [fn(), None]
        except CheckpointError as e:
            box = [None, str(e)]
    box = distributed.broadcast_object(box, src=0)
    if box[1] is not None:
        raise CheckpointError(box[1])
    return box[0]


def load_checkpoint(engine, ckpt_dir: Path, tags: list[str]) -> tuple[str, dict[str, Any]] | None:
    """Restore the first of ``tags`` that every rank can load; ``None`` when ``tags`` is empty.

    Each rank first reads the checkpoint's files (:func:`preload`); the ranks then agree, and only
    when all succeeded do they enter DeepSpeed's load together. A checkpoint that fails on any rank
    (damaged data, a pickled object a weights-only load refuses, a file only some ranks can read) is
    skipped by all of them with a warning, and the next older one is tried. A size mismatch is not
    a damaged checkpoint but another architecture: it stops with a message instead.
    """
    from . import distributed

    if not tags:
        return None
    problems = []
    for tag in tags:
        errors = [e for e in distributed.all_gather_object(preload(engine, Path(ckpt_dir) / tag)) if e is not None]
        if not errors:
            error = None
            try:
                path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
                if path is None:
                    error = "DeepSpeed found no loadable files in it"
            except Exception as e:  # the same files on every rank: they fail alike (e.g. another shape)
                first = (str(e).strip().splitlines() or [""])[0]
                error = f"{type(e).__name__}: {first[:400]}"
                if "size mismatch" in str(e):
                    error = "size mismatch: " + first[:400]
            finally:
                engine._vall_e_preloaded.clear()
            errors = [e for e in distributed.all_gather_object(error) if e is not None]
            if not errors:
                return tag, client
        if any(e.startswith("size mismatch") for e in errors):
            raise CheckpointError(
                f"{ckpt_dir / tag} holds a model of another shape than model={engine.module.hparams.get('preset')} "
                f"({errors[0]}). Resume with the model preset it was trained with, or start a new run elsewhere "
                "(another name= or ckpt_root=; init_from= cannot change the shape either)."
            )
        problems.append(f"{ckpt_dir / tag}: {errors[0]}")
        if distributed.is_global_leader():
            _logger.warning("checkpoint %s cannot be loaded (%s): trying the next older one", ckpt_dir / tag, errors[0])
    raise no_usable_checkpoint(Path(ckpt_dir), problems)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(engine, ckpt_dir: Path, step: int, client_state: dict[str, Any], meta: dict[str, Any],
                    keep_last: int = 0) -> None:
    """Save ``global_step<step>`` so that it appears whole or not at all (collective: all ranks call).

    DeepSpeed writes into ``.partial-global_step<step>``; rank 0 then adds ``vall_e.json``, renames
    the folder (atomic on one filesystem) and only then points ``latest`` at it. A kill or a full disk
    at any moment leaves either the previous state or the new complete one. An existing
    ``global_step<step>`` (e.g. a damaged one skipped at resume) is moved aside, never overwritten.
    Then all but the newest ``keep_last`` older checkpoints are deleted (0 keeps all).
    Checkpoint folders must be on a filesystem every rank shares (as DeepSpeed's ``latest`` assumes).
    """
    import shutil

    from . import distributed
    from .helpers import atomic_write_text

    ckpt_dir = Path(ckpt_dir)
    tag = f"global_step{step}"
    partial = ckpt_dir / f"{PARTIAL_PREFIX}{tag}"
    if distributed.is_global_leader():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if partial.exists():
            shutil.rmtree(partial)  # left by a save that was killed
    distributed.barrier()
    error = None
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=partial.name, client_state=client_state, save_latest=False)
        if distributed.is_global_leader():
            atomic_write_text(json.dumps({**meta, "step": step}, indent=1, sort_keys=True), partial / META_FILE)
    except Exception as e:
        error = _write_failure(e)
        if error is None:
            raise  # not a storage problem: a bug, with its traceback
    errors = [e for e in distributed.all_gather_object(error) if e is not None]  # also the barrier
    if errors:
        if distributed.is_global_leader():
            shutil.rmtree(partial, ignore_errors=True)
        previous = latest_tag(ckpt_dir)
        kept = f"the previous checkpoint ({ckpt_dir / previous}) is intact" if previous else "no checkpoint was written"
        raise CheckpointError(
            f"cannot write checkpoint {tag} into {ckpt_dir}: {errors[0]}; {kept}. Free some space there (or lower "
            "keep_last_ckpts=, or set ckpt_root= to a larger or writable disk), then rerun the command: it resumes "
            "from the newest checkpoint."
        )
    if distributed.is_global_leader():
        _fsync_dir(partial)
        final = ckpt_dir / tag
        if final.exists():
            aside = ckpt_dir / f"{tag}.replaced-{time.strftime('%Y%m%dT%H%M%S')}"
            os.rename(final, aside)
            _logger.warning("%s already existed (a checkpoint that was skipped at resume?): moved it to %s", final, aside)
        os.rename(partial, final)
        _fsync_dir(ckpt_dir)
        atomic_write_text(tag + "\n", ckpt_dir / "latest")
        if keep_last > 0:
            older = [t for t in checkpoint_tags(ckpt_dir) if tag_step(t) < step]
            for old in older[max(keep_last - 1, 0):]:
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    distributed.barrier()


def _write_failure(e: BaseException) -> str | None:
    """A plain account of a failed checkpoint write caused by the storage (full, read-only, no permission),
    or ``None`` for anything else. torch's zip writer reports a full disk as a bare RuntimeError
    ("[enforce fail at inline_container.cc] ... unexpected pos"), so it is recognised by its text."""
    import errno

    storage = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied", errno.EIO: "an input/output error"}
    for err in (e, e.__cause__, e.__context__):
        if isinstance(err, OSError) and err.errno in storage:
            return f"{storage[err.errno]} ({err.filename or err})"
    text = str(e)
    if isinstance(e, RuntimeError) and any(k in text for k in ("enforce fail", "PytorchStreamWriter", "file write failed",
                                                                 "No space left")):
        return f"the write failed, most likely because the disk is full ({text.strip().splitlines()[0][:200]})"
    return None


# ----------------------------------------------------------------------------------------------
# one run per checkpoint folder


def _alive(pid: int, start: Any) -> bool:
    """Whether the lock holder ``pid`` (started at ``start``, as :func:`process_start` gave it) still runs."""
    if not process_alive(pid):
        return False
    now = process_start(pid)
    return start is None or now is None or str(now) == str(start)  # older lock files hold it as a string


class RunLock:
    """``<ckpt_dir>/.lock``: one training run per checkpoint folder.

    Holds ``{"pid", "host", "start", "since"}`` of the run's rank 0. A second run refuses with a
    message naming the holder; a lock whose process is gone from this host (e.g. after ``kill -9``)
    is taken over with a warning. A lock from another host cannot be checked and must be removed
    by hand when that run is known to be gone.
    """

    def __init__(self, ckpt_dir: Path):
        self.path = Path(ckpt_dir) / LOCK_FILE
        self.held = False

    def _mine(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "start": process_start(os.getpid()),
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}

    def acquire(self) -> None:
        """Take the lock or raise :class:`CheckpointError` naming the run that holds it."""
        try:
            self._acquire()
        except OSError as e:
            raise CheckpointError(f"cannot create the lock {self.path} ({e.strerror or e}): make ckpt_root point to "
                                  "a writable folder") from None

    def _acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as f:
                    json.dump(self._mine(), f)
                self.held = True
                return
            try:
                holder = json.loads(self.path.read_text())
                pid, host = int(holder["pid"]), str(holder["host"])
            except FileNotFoundError:
                continue  # released meanwhile: try again
            except (OSError, ValueError, KeyError, TypeError):
                holder, pid, host = None, -1, socket.gethostname()  # unreadable (a crash while writing it)
            if host == socket.gethostname() and (pid < 0 or not _alive(pid, holder.get("start") if holder else None)):
                _logger.warning("taking over the lock %s of a run that is gone (pid %s on %s)", self.path, pid, host)
                try:
                    os.rename(self.path, self.path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}"))
                    os.unlink(self.path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}"))
                except FileNotFoundError:
                    pass
                continue
            raise CheckpointError(
                f"{self.path.parent} is in use by another training run (pid {pid} on host {host}, since "
                f"{holder.get('since', '?')}). Two runs must not write the same checkpoints: wait for it or stop it, "
                f"or give this run another name= or ckpt_root=. If that run is gone (e.g. its host crashed), "
                f"delete {self.path}."
            )
        raise CheckpointError(f"could not take the lock {self.path}: it keeps changing; is another run starting?")

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        if not self.held:
            return
        self.held = False
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)


def remove_partial_saves(ckpt_dir: Path) -> None:
    """Delete ``.partial-*`` folders: saves that a kill or a full disk interrupted (call under the lock)."""
    import shutil

    for p in sorted(Path(ckpt_dir).glob(f"{PARTIAL_PREFIX}*")):
        _logger.warning("removing %s: a save that did not finish", p)
        shutil.rmtree(p, ignore_errors=True)
