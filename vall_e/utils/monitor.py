"""Training monitors: TensorBoard event files, and W&B through DeepSpeed's monitor.

Everything :func:`~vall_e.utils.trainer.log_stats` writes to the JSON-lines log (training steps,
evaluation splits) is mirrored here as scalars tagged ``<split>/<key>`` at the record's ``step``
(``train/loss``, ``train/lr``, ``train/pad_fraction``, ``val/gen_match``, ...). The JSON log stays
the source of truth (``scripts/plot.py`` reads it); this is a view of the same numbers.

TensorBoard (``tensorboard=true``, the default): event files go into the run's log folder
``<log_root>/<cfg_name>/<start time>/``, next to ``log.txt``, so ``tensorboard --logdir logs``
lists every run (a resumed run is a new start time, hence a new curve that continues the steps).
Besides the scalars: the config as text, a few hyper-parameters (HPARAMS tab), and at each
evaluation the first :data:`AUDIO_PER_SPLIT` reference/hypothesis pairs of every split as audio.

W&B (``wandb=true``, off by default): DeepSpeed's own monitor is switched on in the DeepSpeed
config (:func:`deepspeed_monitor_config`) and the same scalars are sent through it. Its x axis is
DeepSpeed's sample count (``engine.global_samples``), the axis DeepSpeed's own events use, with the
training step logged as ``<split>/step``.

Only the global leader rank writes. Nothing is imported before a monitor is opened, and a missing
``tensorboard``/``wandb`` package or a failing write is a warning (once), never the end of training.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

_logger = logging.getLogger(__name__)

AUDIO_PER_SPLIT = 2  # utterances per split and evaluation written as audio (ref once, hyp every time)
_METRICS = ("val/loss", "val/acc", "val/gen_match", "subtrain/loss", "subtrain/gen_match")  # HPARAMS tab columns

_active: "Monitor | None" = None
_warned: set[str] = set()


def _warn_once(key: str, message: str, *args: Any) -> None:
    if key not in _warned:
        _warned.add(key)
        _logger.warning(message, *args)


def active() -> "Monitor | None":
    """The monitor opened by :func:`open_monitor` in this process (``None`` off the leader or when off)."""
    return _active


def hyperparameters(cfg, engine=None, precision: str | None = None) -> dict[str, Any]:
    """The few settings worth comparing across runs (HPARAMS tab), as TensorBoard-friendly scalars.

    ``precision`` is the engine's training precision (``bf16``/``fp16``/``fp32``), which the trainer
    knows (:func:`vall_e.utils.engines.precision`); it is passed in rather than computed here, so
    this module does not import the engines module, which imports it.
    """
    from . import distributed

    hp: dict[str, Any] = {
        "model": cfg.model,
        "lr": float(cfg.warmup_max_lr),
        "warmup_min_lr": float(cfg.warmup_min_lr),
        "warmup_num_steps": int(cfg.warmup_num_steps),
        "max_iter": int(cfg.max_iter),
        "batch_size": int(cfg.batch_size),
        "batch_frames": int(cfg.batch_frames),
        "gradient_accumulation_steps": int(cfg.gradient_accumulation_steps),
        "world_size": int(distributed.world_size()),
        "optimizer": cfg.optimizer,
        "weight_decay": float(cfg.weight_decay),
        "zero_stage": int(cfg.zero_stage),
        "max_prompts": int(cfg.max_prompts),
        "p_additional_prompt": float(cfg.p_additional_prompt),
        "codec_weights": str(cfg.codec_weights),
        "seed": int(cfg.seed),
    }
    if precision is not None:
        hp["precision"] = precision
    if getattr(cfg, "prompt_mode", None) is not None:
        hp["prompt_mode"] = str(cfg.prompt_mode)
    if getattr(cfg, "group_size", None) is not None and getattr(cfg, "model_kind", "ar") == "ar":  # the NAR ignores it
        hp["group_size"] = int(cfg.group_size)
    module = getattr(engine, "module", None)
    if module is not None:
        hp["params_m"] = round(sum(p.numel() for p in module.parameters()) / 1e6, 3)
    return hp


class Monitor:
    """Writes ``log_stats`` records, evaluation audio and the run's settings to TensorBoard (and W&B).

    Built by :func:`open_monitor`; ``writer`` is a ``SummaryWriter`` or ``None``, ``ds_monitor``
    DeepSpeed's ``MonitorMaster`` (W&B) or ``None``.
    """

    def __init__(self, cfg, writer=None, ds_monitor=None, engine=None, precision: str | None = None):
        self.cfg, self.writer, self.ds_monitor, self.engine = cfg, writer, ds_monitor, engine
        self.precision = precision  # the engine's training precision, for the HPARAMS tab
        self._audio: dict[tuple[str, int], set[str]] = {}  # (split, step) -> utterances written
        self._refs: set[tuple[str, str]] = set()  # (split, utterance) whose reference is written

    def _failed(self, what: str, e: Exception) -> None:
        _warn_once(f"write:{what}", "monitoring: %s failed, continuing without it (%s: %s)", what, type(e).__name__, e)
        if what == "tensorboard":
            self.writer = None
        else:
            self.ds_monitor = None

    def log(self, stats: dict[str, Any]) -> None:
        """Scalars ``<split>/<key>`` at ``stats["step"]`` for every number in a ``log_stats`` record; flushes."""
        split, step = stats.get("split"), stats.get("step")
        if split is None or step is None:
            return
        values = {f"{split}/{k}": float(v) for k, v in stats.items()
                  if k not in ("split", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.writer is not None:
            try:
                for tag, value in values.items():
                    self.writer.add_scalar(tag, value, int(step))
                self.writer.flush()
            except Exception as e:  # a full disk must not stop training: the JSON log still has it
                self._failed("tensorboard", e)
        if self.ds_monitor is not None:
            try:
                samples = int(getattr(self.engine, "global_samples", step))
                events = [(tag, value, samples) for tag, value in values.items()] + [(f"{split}/step", float(step), samples)]
                self.ds_monitor.write_events(events)
            except Exception as e:
                self._failed("wandb", e)

    def write_config(self, step: int) -> None:
        """The whole config as text and :func:`hyperparameters` for the HPARAMS tab, at ``step``."""
        if self.writer is None:
            return
        try:
            from torch.utils.tensorboard.summary import hparams

            text = "\n".join("    " + line for line in self.cfg.dumps().splitlines())  # markdown code block
            self.writer.add_text("config", text, step)
            if self.cfg.codec_weights == "untrained":
                self.writer.add_text("eval/audio_note", "codec_weights=untrained: evaluation audio is decoded by an "
                                     "untrained codec and is not speech, whatever the model learned.", step)
            writer = self.writer._get_file_writer()
            for summary in hparams(hyperparameters(self.cfg, self.engine, self.precision), {m: 0.0 for m in _METRICS}):
                writer.add_summary(summary)  # in this run's file, so the metrics are this run's own scalars
            self.writer.flush()
        except Exception as e:
            self._failed("tensorboard", e)

    def eval_audio(self, split: str, uid: str, ref_wav: Path, hyp_wav: Path, step: int) -> None:
        """One evaluated utterance's wavs as audio: ``<split>/audio/<uid>/ref`` (once) and ``.../hyp``.

        Only the first :data:`AUDIO_PER_SPLIT` utterances of a split per evaluation are kept.
        """
        if self.writer is None:
            return
        seen = self._audio.setdefault((split, step), set())
        if uid not in seen and len(seen) >= AUDIO_PER_SPLIT:
            return
        seen.add(uid)
        try:
            import soundfile as sf
            import torch

            kinds = [("hyp", hyp_wav)]
            if (split, uid) not in self._refs:
                kinds.insert(0, ("ref", ref_wav))
            for kind, path in kinds:
                wav, sr = sf.read(str(path), dtype="float32", always_2d=True)
                mono = torch.from_numpy(wav.mean(axis=1)).clamp(-1.0, 1.0)
                self.writer.add_audio(f"{split}/audio/{uid}/{kind}", mono, step, sample_rate=sr)
            self._refs.add((split, uid))
        except Exception as e:
            self._failed("tensorboard", e)

    def flush(self) -> None:
        if self.writer is not None:
            try:
                self.writer.flush()
            except Exception as e:
                self._failed("tensorboard", e)

    def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception as e:
                self._failed("tensorboard", e)
            self.writer = None


def open_monitor(cfg, engine=None, step: int = 0, precision: str | None = None) -> "Monitor | None":
    """Start monitoring a run on the global leader (closing any earlier one); ``None`` where nothing is written.

    ``step``: where training starts (a resumed run's config text and hyper-parameters are written there).
    ``precision``: the engine's training precision, shown among the hyper-parameters.
    """
    global _active
    from . import distributed

    close_monitor()
    if not distributed.is_global_leader():
        return None
    writer = None
    if getattr(cfg, "tensorboard", False):
        try:
            from torch.utils.tensorboard import SummaryWriter  # lazily: pulls in tensorboard (~2 s)
        except ImportError as e:
            _warn_once("import:tensorboard", "tensorboard=true but TensorBoard cannot be imported (%s): training goes "
                       "on without event files; `pip install tensorboard` to get them, or set tensorboard=false", e)
        else:
            try:
                Path(cfg.log_dir).mkdir(parents=True, exist_ok=True)
                writer = SummaryWriter(log_dir=str(cfg.log_dir))
            except Exception as e:
                _warn_once("open:tensorboard", "cannot write TensorBoard events into %s (%s): training goes on "
                           "without them", cfg.log_dir, e)
    ds_monitor = None
    if getattr(cfg, "wandb", False):
        ds_monitor = getattr(engine, "monitor", None)
        if ds_monitor is None or not getattr(ds_monitor, "enabled", False):
            ds_monitor = None  # wandb missing: deepspeed_monitor_config already said so
    if writer is None and ds_monitor is None:
        return None
    _active = Monitor(cfg, writer, ds_monitor, engine, precision)
    _active.write_config(step)
    if writer is not None:
        _logger.info("TensorBoard events in %s (tensorboard --logdir %s)", cfg.log_dir, cfg.log_root)
    return _active


def close_monitor() -> None:
    """Flush and close the active monitor, if any (training's end, quit, SIGTERM, an error)."""
    global _active
    if _active is not None:
        monitor, _active = _active, None
        monitor.close()


def deepspeed_monitor_config(cfg) -> dict[str, Any]:
    """The ``wandb`` section of the DeepSpeed config when ``wandb=true`` (and the package is there), else ``{}``.

    The run appears in W&B project ``wandb_project``, grouped by ``cfg_name``; credentials and team come
    from the usual ``WANDB_*`` environment variables / ``wandb login``.
    """
    if not getattr(cfg, "wandb", False):
        return {}
    if importlib.util.find_spec("wandb") is None:
        _warn_once("import:wandb", "wandb=true but the wandb package is not installed: training goes on without "
                   "W&B; `pip install wandb` (and `wandb login`) to use it")
        return {}
    return {"wandb": {"enabled": True, "project": cfg.wandb_project, "group": cfg.cfg_name}}
