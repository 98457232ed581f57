"""The training loop: steps, JSON stats, periodic checkpoints and evaluation, resume, stdin commands.

Commands typed on the terminal while training runs (read by rank 0, broadcast to every rank):

- ``save``: write a checkpoint now;
- ``eval``: evaluate now;
- ``quit``: write a checkpoint, then exit with status 0.

A non-finite loss (NaN/inf, any precision) is not trained on: that micro-batch contributes zero
gradients, a step whose every micro-batch was non-finite leaves the weights unchanged, and the
count is logged as ``nonfinite_losses``. After ``max_nonfinite_steps`` such steps in a row the run
saves and stops with exit status 2. fp16 gradient overflow stays DeepSpeed's loss scaler's business.

SIGTERM and SIGINT (cluster preemption, Ctrl-C) do what ``quit`` does: the current step finishes,
every rank saves, and the process exits 0. A second signal ends the process at once.

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
import torch.distributed as dist

from ..config import Config
from . import distributed, monitor
from .diagnostic import check_replicas_in_sync
from .engines import load_checkpoint, save_checkpoint
from .helpers import release_free_memory, to_device

_logger = logging.getLogger(__name__)

COMMANDS = ("save", "eval", "quit")
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
        """The next command on every rank ("" for none): rank 0's choice is broadcast."""
        try:
            cmd = self._queue.get_nowait()
        except queue.Empty:
            cmd = ""
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [cmd]
            dist.broadcast_object_list(box, src=0)
            cmd = box[0]
        return cmd


def rng_state() -> dict[str, Any]:
    """Every RNG's state, in types ``torch.load(weights_only=True)`` accepts (no numpy arrays)."""
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
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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

    # checkpoints -----------------------------------------------------------------------------

    def client_state(self) -> dict[str, Any]:
        """Our part of a checkpoint (collective: every rank's batch count is gathered)."""
        from ..version import __version__

        per_rank = [self.state.consumed_batches]
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.zeros(dist.get_world_size(), dtype=torch.int64)
            t[dist.get_rank()] = self.state.consumed_batches
            dist.all_reduce(t)
            per_rank = t.tolist()
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

    def _signalled(self) -> str | None:
        """The signal name if any rank received one (all ranks get the same answer)."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.stop_signal
        device = self.engine.device if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([1 if self.stop_signal else 0], dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return (self.stop_signal or "a signal on another rank") if int(t.item()) else None

    # loop --------------------------------------------------------------------------------------

    def _batches(self) -> Iterator[dict[str, list[torch.Tensor]]]:
        """Loader batches with unreadable examples left out (counted, each file named once)."""
        for batch in self.make_loader(self.state.consumed_batches):
            self.state.consumed_batches += 1
            for path, message in batch.get("bad", ()):
                self.n_bad += 1
                if path not in self.bad_files:
                    self.bad_files[path] = message
                    _logger.warning("skipping an unreadable example: %s", message)
            self.n_examples += len(batch["text"]) + len(batch.get("bad", ()))
            if batch["text"]:
                yield batch

    def _check_bad_data(self) -> bool:
        """True (on every rank alike) when more than ``max_bad_fraction`` of the drawn examples were unreadable."""
        t = torch.tensor([self.n_bad, self.n_examples], dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t)
        bad, seen = t.tolist()
        if seen < 100 or bad <= self.cfg.max_bad_fraction * seen:
            return False
        files = "\n  ".join(sorted(self.bad_files)[:50])
        _logger.error(
            "%d of %d drawn examples (more than max_bad_fraction=%g) were unreadable; this rank saw these files:\n  %s\n"
            "Delete them and recreate them with `python -m vall_e.emb.qnt <their folder>` (it skips files already "
            "done), then rerun this command: it resumes from the last checkpoint.",
            int(bad), int(seen), self.cfg.max_bad_fraction, files,
        )
        return True

    def _step(self, batches: Iterator[dict[str, list[torch.Tensor]]], log: bool) -> dict[str, float] | None:
        """One optimizer step: ``gradient_accumulation_steps`` micro-batches through the engine.

        Stats (and the gradient norm) are turned into numbers only when ``log`` is set: reading a
        device tensor back every step would stall the GPU for nothing.
        """
        from ..data import model_kwargs, sequence_lengths

        engine, device = self.engine, self.engine.device
        totals: dict[str, torch.Tensor] = {}
        frames = 0
        n_bad = 0
        n_micro = self.cfg.gradient_accumulation_steps
        grad_norm = None
        for i in range(n_micro):
            batch = next(batches)
            lens = sequence_lengths(batch)
            self.positions[0] += sum(lens)
            self.positions[1] += len(lens) * max(lens)
            text, proms, resps = (to_device(batch[k], device) for k in ("text", "proms", "resps"))
            out = engine(text, proms, resps, **model_kwargs(batch))
            if self._all_finite(out.loss):
                engine.backward(out.loss)
                if log:
                    for k, v in out.stats.items():
                        totals[k] = totals.get(k, 0.0) + v.detach() / n_micro
            else:
                n_bad += 1
                # Zero gradients instead of skipping the call: DeepSpeed's accumulation counters and
                # the ranks' gradient collectives stay aligned, and nothing NaN reaches the optimizer.
                engine.backward(self._zero_loss())
            if log and i == n_micro - 1:
                grad_norm = self._grad_norm()
            if n_bad == n_micro:
                self._frozen_step()  # every micro-batch was non-finite: the weights must not move
            else:
                engine.step()
            frames += sum(int(r.shape[0]) for r in resps)
        self.n_nonfinite += n_bad
        self.nonfinite_run = self.nonfinite_run + 1 if n_bad else 0
        if not log:
            return None
        stats_loss = totals.get("loss")
        if stats_loss is not None and n_bad:
            for k in totals:  # averages over the finite micro-batches only
                totals[k] = totals[k] * n_micro / (n_micro - n_bad)
        if stats_loss is None:
            totals["loss"] = torch.tensor(float("nan"))
        stats = {k: float(v) for k, v in totals.items()}
        stats["frames"] = float(frames)
        stats["positions"], stats["padded_positions"] = map(float, self.positions)
        stats["bad_examples"] = float(self.n_bad)
        stats["nonfinite_losses"] = float(self.n_nonfinite)
        self.positions = [0, 0]
        if grad_norm is not None:
            stats["grad_norm"] = grad_norm
        return stats

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every rank (one small collective and a host read per micro-batch)."""
        ok = torch.isfinite(loss.detach()).to(torch.int32).reshape(1)
        if dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() != "nccl":
                ok = ok.cpu()
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def _zero_loss(self) -> torch.Tensor:
        """A loss whose gradient is exactly zero for every trainable parameter (no NaN anywhere)."""
        params = [p for p in self.engine.module.parameters() if p.requires_grad]
        return torch.stack([(p * 0).sum().float() for p in params]).sum()

    def _frozen_step(self) -> None:
        """``engine.step()`` with the learning rate at 0 for this one step: the schedule and DeepSpeed's
        counters advance as usual, the weights do not move (Adam's update and AdamW's decay scale with lr)."""
        groups = self.engine.optimizer.param_groups
        saved = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = 0.0
        try:
            self.engine.step()
        finally:
            # The scheduler has set the next step's lr by now; where it did not step (an fp16 overflow
            # skip), put the lr back so the next step is not frozen too.
            for g, lr in zip(groups, saved):
                if g["lr"] == 0.0:
                    g["lr"] = lr

    def _grad_norm(self) -> float | None:
        """Pre-clipping gradient norm, when the gradients are whole on this rank (ZeRO < 2)."""
        if self.cfg.zero_stage >= 2:
            return None
        grads = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(grads))) if grads else None

    def _reduce(self, stats: dict[str, float]) -> dict[str, float]:
        """Average stats over ranks (frames are summed)."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return stats
        keys = sorted(stats)
        t = torch.tensor([stats[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        n = dist.get_world_size()
        summed = {"frames", "positions", "padded_positions", "bad_examples"}  # nonfinite_losses: equal on all ranks
        return {k: (float(v) if k in summed else float(v) / n) for k, v in zip(keys, t.tolist())}

    def run(self) -> int:
        """Train to ``max_iter`` (or until ``quit`` or a signal); returns the process exit status."""
        previous = self._install_signal_handlers()
        try:
            if self.state.step < self.cfg.max_iter:
                monitor.open_monitor(self.cfg, self.engine, self.state.step)  # TensorBoard/W&B, global leader only
            return self._run()
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
                stats = self._reduce(stats)
                dt = time.time() - t0
                if "grad_norm" not in stats and engine.get_global_grad_norm() is not None:
                    stats["grad_norm"] = float(engine.get_global_grad_norm())
                positions, padded = stats.pop("positions"), stats.pop("padded_positions")
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
                if self._check_bad_data():
                    return 2
            if cfg.max_nonfinite_steps and self.nonfinite_run >= cfg.max_nonfinite_steps:
                self.save()
                _logger.error(
                    "%d steps in a row had a non-finite loss (NaN or inf), up to step %d; they did not change the "
                    "weights, and the checkpoint just saved holds the last good ones. Lower warmup_max_lr, raise "
                    "warmup_num_steps or lower gradient_clipping (or try use_bf16=true instead of fp16), then rerun "
                    "the command: it resumes from this checkpoint.", self.nonfinite_run, step)
                return 2
            command = self.commands.poll()
            stop = self._signalled()
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
