"""The training loop: steps, JSON stats, periodic checkpoints and evaluation, resume, stdin commands.

Commands typed on the terminal while training runs (read by rank 0, broadcast to every rank):

- ``save``: write a checkpoint now;
- ``eval``: evaluate now;
- ``quit``: write a checkpoint, then exit with status 0.

A non-finite loss (NaN/inf, any precision, on any rank) is not trained on: the optimizer step it
belongs to is skipped on every rank, so the weights and the optimizer state do not move (the
schedule advances). The decision stays on the device: the fused AdamW kernel reads a ``found_inf``
flag, as under PyTorch's AMP, so no step waits for the host. Skipped micro-batches are logged as
``nonfinite_losses``. After ``max_nonfinite_steps`` such steps in a row (seen at the next logged
step) the run saves and stops with exit status 2. fp16 gradient overflow stays DeepSpeed's loss
scaler's business.

SIGTERM and SIGINT (cluster preemption, Ctrl-C) do what ``quit`` does: the step finishes, every rank
saves, and the process exits 0. A second signal ends the process at once. With several ranks, commands
and signals are shared at logged steps (every ``log_every`` steps): asking the other ranks costs a
host sync, which a step must not pay. A single process acts at the next step.

Host syncs: a training step reads nothing back from the device except at logged steps, where all
the stats (loss, accuracies, counts, grad norm) come back in one transfer.

Stats go to the log as one JSON object per line (``scripts/plot.py`` draws them), and to TensorBoard
event files in the same folder (``tensorboard=true``, see :mod:`vall_e.utils.monitor`).
"""

from __future__ import annotations

import json
import logging
import queue
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..config import Config
from . import distributed, monitor
from .diagnostic import check_replicas_in_sync
from .engines import load_checkpoint, loss_scale, precision, save_checkpoint, skip_step_unless
from .helpers import release_free_memory, to_device

_logger = logging.getLogger(__name__)

COMMANDS = ("save", "eval", "quit")
MAX_EMPTY_DRAWS = 100  # loader batches in a row without one readable example before the run stops
CLIENT_KEY = "vall_e"  # our part of a DeepSpeed checkpoint's client state


def log_stats(stats: dict[str, Any]) -> None:
    """One JSON object per line: the format ``scripts/plot.py`` reads; mirrored to TensorBoard/W&B when on."""
    _logger.info(json.dumps(stats, sort_keys=True))
    mon = monitor.active()
    if mon is not None:
        mon.log(stats)


class StdinCommands:
    """Reads ``save``/``eval``/``quit`` lines from stdin on rank 0 without blocking training."""

    def __init__(self) -> None:
        self._queue: queue.Queue[str] = queue.Queue()
        if distributed.is_global_leader() and sys.stdin is not None and not sys.stdin.closed:
            threading.Thread(target=self._read, name="stdin-commands", daemon=True).start()

    def _read(self) -> None:
        try:
            for line in sys.stdin:
                word = line.strip().lower()
                if word in COMMANDS:
                    self._queue.put(word)
                elif word:
                    print(f"unknown command {word!r}; type one of {', '.join(COMMANDS)}", file=sys.stderr)
        except (OSError, ValueError):  # stdin closed or not readable: no commands, train on
            pass

    def poll(self) -> str:
        """The next command typed on rank 0, or "" (this rank only: :meth:`Trainer._control` shares it)."""
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return ""


def rng_state() -> dict[str, Any]:
    """Every RNG's state, in types ``torch.load(weights_only=True)`` accepts (no numpy arrays).

    ``cuda`` holds one state per GPU this process sees (``torch.cuda.get_rng_state_all``); a resume
    restores those that exist then (see :func:`set_rng_state`).
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def step_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of one training step: differs per rank (dropout masks, NAR levels), and is a pure
    function of (seed, rank, step) so a resumed run draws exactly what the uninterrupted one did."""
    return ((seed * 1_000_003 + rank) * 1_000_000_007 + step) % (2**63 - 1)


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s output, on any machine.

    A checkpoint saved with N visible GPUs resumes with any other number, or on a CPU: the CUDA
    generators that exist on both sides get their saved state, the rest keep theirs (every training
    step reseeds all generators from (seed, rank, step) anyway, so resumed batches do not depend on it).
    """
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    saved = list(state.get("cuda") or [])
    if not saved or not torch.cuda.is_available():
        return
    n = torch.cuda.device_count()
    for i, cuda_state in enumerate(saved[:n]):
        torch.cuda.set_rng_state(cuda_state, i)
    if len(saved) != n:
        _logger.info("the checkpoint holds %d CUDA generator states and this process sees %d GPU(s): restored %d",
                     len(saved), n, min(len(saved), n))


class _StopRun(Exception):
    """Ends :meth:`Trainer._run` from inside the batch stream with an exit status (and, for 0, a save)."""

    def __init__(self, status: int, reason: str = ""):
        super().__init__(reason)
        self.status = status


@dataclass
class TrainState:
    """What a checkpoint must hold beyond DeepSpeed's model/optimizer/scheduler state."""

    step: int = 0
    consumed_batches: int = 0  # loader batches drawn on this rank; the sampler starts after them on resume
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the phone map


class Trainer:
    """Drives one DeepSpeed engine to ``cfg.max_iter``.

    Args:
        cfg: the run's config.
        engine: a DeepSpeed engine whose module's forward takes a batch's ``text``, ``proms``, ``resps``
            lists and returns an object with ``loss`` and ``stats``.
        make_loader: ``consumed_batches -> iterable of batches`` (lists of tensors per key).
        evaluate: ``step -> None``, called on every rank (it decides who writes what).
        state: restored or fresh :class:`TrainState`.
    """

    def __init__(
        self,
        cfg: Config,
        engine,
        make_loader: Callable[[int], Any],
        evaluate: Callable[[int], None],
        state: TrainState,
    ):
        self.cfg = cfg
        self.engine = engine
        self.make_loader = make_loader
        self.evaluate = evaluate
        self.state = state
        self.commands = StdinCommands()
        self.rank = distributed.global_rank()
        self.n_examples = 0  # examples drawn by this rank in this process, readable or not
        self.n_bad = 0
        self.bad_files: dict[str, str] = {}
        self.positions = [0, 0]  # since the last log: real sequence positions, positions after padding
        self.stop_signal: str | None = None  # name of the first SIGTERM/SIGINT received
        self.n_nonfinite = 0  # micro-batches whose loss was not finite (all ranks agree), this process
        self.nonfinite_run = 0  # optimizer steps in a row with a non-finite loss
        self._pid = os.getpid()  # forked loader workers inherit the handler; only this process acts on it
        self._pending_command = ""  # typed on rank 0, not yet shared with the other ranks
        # device-side counters, read back at logged steps only
        self._nonfinite = torch.zeros(3, dtype=torch.int64, device=engine.device)  # micro-batches, run, longest run

    # checkpoints -----------------------------------------------------------------------------

    def client_state(self) -> dict[str, Any]:
        """Our part of a checkpoint (collective: every rank's batch count is gathered)."""
        from ..version import __version__

        per_rank = [self.state.consumed_batches]
        if distributed.active():
            t = torch.zeros(distributed.world_size(), dtype=torch.int64)
            t[distributed.global_rank()] = self.state.consumed_batches
            per_rank = distributed.all_reduce(t).tolist()
        # One namespaced key: DeepSpeed mixes its own metadata into the client state it returns.
        return {
            CLIENT_KEY: {
                "step": self.state.step,
                "consumed_batches": self.state.consumed_batches,
                "consumed_batches_per_rank": per_rank,
                "rng": rng_state(),
                "version": __version__,
                **self.state.extra,
            }
        }

    def save(self) -> None:
        t0 = time.time()
        meta = {k: self.state.extra[k] for k in ("model", "hparams") if k in self.state.extra}
        save_checkpoint(self.engine, self.cfg.ckpt_dir, self.state.step, self.client_state(), meta=meta,
                        keep_last=self.cfg.keep_last_ckpts)
        if self.cfg.zero_stage < 3:
            check_replicas_in_sync(self.engine.module, self.state.step)
        _logger.info("saved checkpoint %s/global_step%d (%.1fs)", self.cfg.ckpt_dir, self.state.step, time.time() - t0)

    @staticmethod
    def restore(engine, ckpt_dir: Path, tags: list[str]) -> TrainState | None:
        """Load the first usable of ``tags`` (see :func:`~.engines.resume_candidates`) into ``engine``.

        Returns the matching state, or ``None`` for a fresh run (no tags).
        """
        from .engines import CheckpointError

        loaded = load_checkpoint(engine, ckpt_dir, tags)
        if loaded is None:
            return None
        tag, client = loaded
        if CLIENT_KEY not in (client or {}):
            raise CheckpointError(f"{ckpt_dir / tag} was not written by vall_e.train (no {CLIENT_KEY!r} state): "
                                  "move it away, or use another name= or ckpt_root=")
        client = client[CLIENT_KEY]
        set_rng_state(client["rng"])
        consumed = int(client["consumed_batches"])
        per_rank = client.get("consumed_batches_per_rank")
        if per_rank is not None and len(per_rank) == distributed.world_size():
            consumed = int(per_rank[distributed.global_rank()])
        elif per_rank is not None:
            _logger.warning("the checkpoint was written by %d ranks, this run has %d: every rank resumes its data "
                            "stream at batch %d", len(per_rank), distributed.world_size(), consumed)
        skip = {"step", "consumed_batches", "consumed_batches_per_rank", "rng", "version"}
        extra = {k: v for k, v in client.items() if k not in skip}
        return TrainState(step=int(client["step"]), consumed_batches=consumed, extra=extra)

    # signals -----------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        """First SIGTERM/SIGINT: ask for a save at the next step boundary. Second: die of it now."""
        if os.getpid() != getattr(self, "_pid", os.getpid()):
            return  # a forked dataloader worker (Ctrl-C reaches the whole group): the main process decides
        if self.stop_signal is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.stop_signal = signal.Signals(signum).name
        _logger.warning("%s received: saving a checkpoint after this step, then exiting (send it again to exit at once)",
                        self.stop_signal)

    def _install_signal_handlers(self) -> dict[int, Any]:
        """Route SIGTERM/SIGINT to :meth:`_on_signal`; returns the previous handlers.

        Installed before the loader forks its workers: they inherit the handler, so a Ctrl-C sent
        to the whole process group does not kill them mid-batch.
        """
        if threading.current_thread() is not threading.main_thread():
            return {}  # signal handlers can only be set from the main thread (e.g. an in-process test)
        return {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _control(self, step: int, log: bool) -> tuple[str, str | None]:
        """(command, signal name) after ``step``, the same on every rank.

        Rank 0's stdin command and any rank's signal are combined in one small all-reduce, done at
        logged steps only when there are several ranks: reading its result back is a host sync.
        """
        self._pending_command = self._pending_command or self.commands.poll()
        if not distributed.active():
            command, self._pending_command = self._pending_command, ""
            return command, self.stop_signal
        if not (log or step >= self.cfg.max_iter):
            return "", None  # a command typed on rank 0 waits for the next logged step
        command, self._pending_command = self._pending_command, ""
        code = torch.tensor([COMMANDS.index(command) + 1 if command else 0, 1 if self.stop_signal else 0])
        code = distributed.all_reduce(code, "max").tolist()
        command = COMMANDS[code[0] - 1] if code[0] else ""
        stop = (self.stop_signal or "a signal on another rank") if code[1] else None
        return command, stop

    # loop --------------------------------------------------------------------------------------

    def _batches(self) -> Iterator[dict[str, list[torch.Tensor]]]:
        """Loader batches with unreadable examples left out (counted, each file named once).

        Bad data cannot stall it: the ``max_bad_fraction`` budget is checked at every draw (this
        rank's counts), ``MAX_EMPTY_DRAWS`` draws in a row without one readable example stop the
        run, and a signal is honoured at the next draw. Each raises :class:`_StopRun`.
        """
        empty = 0
        for batch in self.make_loader(self.state.consumed_batches):
            self.state.consumed_batches += 1
            for path, message in batch.get("bad", ()):
                self.n_bad += 1
                if path not in self.bad_files:
                    self.bad_files[path] = message
                    _logger.warning("skipping an unreadable example: %s", message)
            self.n_examples += len(batch["text"]) + len(batch.get("bad", ()))
            if batch.get("bad") and self._too_much_bad_data(self.n_bad, self.n_examples):
                raise _StopRun(2)
            if batch["text"]:
                empty = 0
                yield batch
                continue
            empty += 1
            if self.stop_signal is not None:
                raise _StopRun(0, f"{self.stop_signal} received while drawing batches")
            if empty >= MAX_EMPTY_DRAWS:
                self._too_much_bad_data(self.n_bad, self.n_examples, force=True)
                raise _StopRun(2)

    def _too_much_bad_data(self, bad: float, seen: float, force: bool = False) -> bool:
        """True (and the files named in the log) when more than ``max_bad_fraction`` of the examples drawn
        were unreadable, or ``force`` (no readable example for too long)."""
        if not force and (seen < 100 or bad <= self.cfg.max_bad_fraction * seen):
            return False
        files = "\n  ".join(sorted(self.bad_files)[:50])
        why = (f"{MAX_EMPTY_DRAWS} batches in a row held no readable example" if force
               else f"more than max_bad_fraction={self.cfg.max_bad_fraction:g}")
        _logger.error(
            "%d of %d drawn examples (%s) were unreadable; this rank saw these files:\n  %s\n"
            "Delete them and recreate them with `python -m vall_e.emb.qnt <their folder>` (it skips files already "
            "done), then rerun this command: it resumes from the last checkpoint.",
            int(bad), int(seen), why, files,
        )
        return True

    def _step(self, batches: Iterator[dict[str, list[torch.Tensor]]], log: bool) -> dict[str, float] | None:
        """One optimizer step: ``gradient_accumulation_steps`` micro-batches through the engine.

        Nothing is read back from the device unless ``log`` is set; then every number comes back in
        one transfer (:meth:`_read_stats`).
        """
        from ..data import model_kwargs, sequence_lengths

        engine, device = self.engine, self.engine.device
        totals: dict[str, torch.Tensor] = {}
        frames = 0
        n_micro = self.cfg.gradient_accumulation_steps
        n_bad = torch.zeros((), dtype=torch.int64, device=device)  # this rank's non-finite micro-batches
        grad_norm = None
        for i in range(n_micro):
            batch = next(batches)
            lens = sequence_lengths(batch)
            self.positions[0] += sum(lens)
            self.positions[1] += len(lens) * max(lens)
            text, proms, resps = (to_device(batch[k], device) for k in ("text", "proms", "resps"))
            out = engine(text, proms, resps, **model_kwargs(batch))
            ok = torch.isfinite(out.loss.detach())
            n_bad += (~ok).long()
            engine.backward(out.loss)  # a non-finite loss poisons the gradients: the step is then skipped
            frames += sum(int(r.shape[0]) for r in resps)
            if log:
                for k, v in out.stats.items():  # summed over the finite micro-batches
                    totals[k] = totals.get(k, 0.0) + torch.where(ok, v.detach().float(), 0.0)
            if i < n_micro - 1:
                engine.step()  # accumulates only
                continue
            finite = distributed.all_reduce((n_bad == 0).to(torch.int32), "min").bool()  # every rank alike
            if log:
                grad_norm = self._grad_norm()
            with skip_step_unless(engine, finite):
                engine.step()  # the optimizer step
        nf = self._nonfinite
        nf[0] += n_bad
        nf[1] = (nf[1] + 1) * (~finite).long()  # skipped steps in a row
        nf[2] = torch.maximum(nf[2], nf[1])
        if not log:
            return None
        n_ok = n_micro - n_bad
        means = {k: torch.where(n_ok > 0, v / n_ok.clamp(min=1), float("nan")) for k, v in totals.items()}
        if "loss" not in means:
            means["loss"] = torch.full((), float("nan"), device=device)
        if grad_norm is not None:
            means["grad_norm"] = grad_norm
        host = {"frames": float(frames), "positions": float(self.positions[0]),
                "padded_positions": float(self.positions[1]), "bad_examples": float(self.n_bad),
                "examples": float(self.n_examples)}
        self.positions = [0, 0]
        return self._read_stats(means, host)

    def _read_stats(self, means: dict[str, torch.Tensor], host: dict[str, float]) -> dict[str, float]:
        """All ranks' stats in one all-reduce and one device-to-host read.

        ``means`` (device scalars) are averaged over ranks; ``host`` numbers and ``nonfinite_losses``
        are summed. ``nonfinite_run`` (the longest run of skipped steps since the last read, equal on
        all ranks) is taken as it is, and reset.
        """
        keys = sorted(means)
        nf = self._nonfinite
        summed = torch.tensor([host[k] for k in sorted(host)], dtype=torch.float64).to(nf.device, non_blocking=True)
        vec = torch.cat([torch.stack([means[k].double() for k in keys]), summed, nf[0::2].double()])
        values = distributed.all_reduce(vec).tolist()  # the one host sync of a logged step
        n = distributed.world_size() if distributed.active() else 1
        stats = {k: v / n for k, v in zip(keys, values)}
        stats.update(zip(sorted(host), values[len(keys): len(keys) + len(host)]))
        stats["nonfinite_losses"] = values[-2]
        self.nonfinite_run = round(values[-1] / n)
        nf[2] = nf[1]  # the current run carries over into the next window
        return stats

    def _grad_norm(self) -> torch.Tensor | None:
        """The global L2 norm of the true gradients before clipping (a device scalar), when they are whole
        on this rank (ZeRO < 2, gradients still on the module); ``None`` otherwise (DeepSpeed's own is used).

        Under fp16 the gradients are still multiplied by the loss scale here: the norm is divided by it.
        """
        if self.cfg.zero_stage >= 2:
            return None
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        if not grads:
            return None
        norms = torch._foreach_norm([g.float() if g.dtype != torch.float32 else g for g in grads])
        return torch.linalg.vector_norm(torch.stack(norms)) / loss_scale(self.engine)

    def run(self) -> int:
        """Train to ``max_iter`` (or until ``quit`` or a signal); returns the process exit status."""
        previous = self._install_signal_handlers()
        try:
            if self.state.step < self.cfg.max_iter:
                # TensorBoard/W&B, global leader only
                monitor.open_monitor(self.cfg, self.engine, self.state.step, precision=precision(self.cfg))
            return self._run()
        except _StopRun as stop:
            if stop.status == 0:
                # a signal while no batch could be drawn: the unfinished step is dropped, the finished ones saved
                if distributed.active():
                    _logger.warning("%s: stopping without a save (another rank may be inside a step); rerun to "
                                    "resume from the last checkpoint", stop)
                else:
                    self.save()
                    _logger.info("%s: checkpoint saved at step %d, exiting", stop, self.state.step)
            return stop.status
        finally:
            monitor.close_monitor()  # every way out: max_iter, quit, SIGTERM/SIGINT, exit status 2, an error
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _run(self) -> int:
        cfg, engine = self.cfg, self.engine
        if self.state.step >= cfg.max_iter:
            _logger.info("already at step %d >= max_iter=%d: nothing to do", self.state.step, cfg.max_iter)
            return 0
        engine.train()
        batches = self._batches()
        t_start = time.time()
        _logger.info("training from step %d to max_iter=%d", self.state.step, cfg.max_iter)
        while self.state.step < cfg.max_iter:
            t0 = time.time()
            step = self.state.step + 1
            log = step % cfg.log_every == 0 or step == 1 or step == cfg.max_iter
            torch.manual_seed(step_seed(cfg.seed, self.rank, step))
            stats = self._step(batches, log)
            self.state.step = step
            if stats is not None:
                dt = time.time() - t0
                if "grad_norm" not in stats and engine.get_global_grad_norm() is not None:
                    stats["grad_norm"] = float(engine.get_global_grad_norm())  # DeepSpeed's: unscaled, before clipping
                positions, padded = stats.pop("positions"), stats.pop("padded_positions")
                bad, seen = stats["bad_examples"], stats.pop("examples")
                log_stats(
                    {
                        "split": "train",
                        "step": step,
                        "loss": stats.pop("loss"),
                        **{k: v for k, v in stats.items() if k != "frames"},
                        "pad_fraction": 1.0 - positions / max(padded, 1.0),
                        "lr": float(engine.get_lr()[0]),
                        "frames_per_s": stats["frames"] / max(dt, 1e-9),
                        "step_s": dt,
                        "elapsed_s": time.time() - t_start,
                    }
                )
                if self._too_much_bad_data(bad, seen):
                    return 2
            if cfg.max_nonfinite_steps and self.nonfinite_run >= cfg.max_nonfinite_steps:
                self.save()
                _logger.error(
                    "%d steps in a row had a non-finite loss (NaN or inf), up to step %d; they did not change the "
                    "weights, and the checkpoint just saved holds the last good ones. Lower warmup_max_lr, raise "
                    "warmup_num_steps or lower gradient_clipping (or try use_bf16=true instead of fp16), then rerun "
                    "the command: it resumes from this checkpoint.", self.nonfinite_run, step)
                return 2
            command, stop = self._control(step, log)
            if stop:
                command = "quit"
            if step % cfg.save_ckpt_every == 0 or command in {"save", "quit"} or step == cfg.max_iter:
                self.save()
            if command == "quit":
                if stop:
                    _logger.info("%s: checkpoint saved at step %d, exiting", stop, step)
                else:
                    _logger.info("quit requested at step %d: checkpoint saved, exiting", step)
                return 0
            if step % cfg.eval_every == 0 or command == "eval" or step == cfg.max_iter:
                engine.eval()
                cuda = [engine.device] if str(engine.device).startswith("cuda") else []
                with torch.random.fork_rng(devices=cuda):  # eval must not shift the training RNG stream
                    self.evaluate(step)
                release_free_memory()  # generation's caches and decoded audio are gone: give them back
                engine.train()
        return 0
