"""The thread that owns the models: it groups waiting sentences into batches and runs them.

Every sentence of every request becomes a :class:`Job` in one queue. The worker takes up to
``max_batch`` jobs at a time, oldest first. A job that finds the worker idle waits at most
``window_s`` for company, or up to ``max_wait_s`` while requests that have been accepted are still
being prepared (their phones and prompts): when a batch ends, its clients send their next requests
together, and their preparation takes a few milliseconds each, so without this the next batch
would leave with the first of them alone. A batch
that fails is retried one job at a time, so one bad sentence fails only its own request.

Only this thread runs the models, so they need no locks; request handlers wait on the jobs'
futures. Other work that must not overlap a batch (encoding a new voice switches process-wide
precision flags while it runs) goes through :meth:`Batcher.call`, which runs it between batches.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """One sentence to synthesize. ``future`` gets its result; ``on_start`` runs when its batch begins."""

    row: Any
    on_start: Optional[Callable[[], None]] = None
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.monotonic)


class Batcher:
    """Runs ``run_batch(rows) -> results`` on batches of waiting jobs, in one worker thread.

    Args:
        run_batch: synthesizes a list of rows; returns one result per row, in order.
        max_batch: most jobs per batch.
        window_s: how long a job that arrives at an idle worker waits for others to batch with.
        max_wait_s: how long it may wait while ``preparing()`` says more jobs are on their way.
        preparing: how many accepted requests are being prepared now (call :meth:`wake` when it drops).
    """

    def __init__(self, run_batch: Callable[[list[Any]], list[Any]], max_batch: int = 8, window_s: float = 0.02,
                 max_wait_s: float = 0.25, preparing: Callable[[], int] = lambda: 0):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1; got {max_batch}")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.window_s = max(0.0, window_s)
        self.max_wait_s = max(self.window_s, max_wait_s)
        self.preparing = preparing
        self._queue: deque[Job] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._cond = threading.Condition()
        self._held = 0
        self._closing = False
        self._thread: Optional[threading.Thread] = None
        # statistics, for /health and the benchmark
        self.batches = 0
        self.rows = 0
        self.largest = 0
        self.busy_s = 0.0

    # lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="vall_e-batcher", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop after the current batch; jobs still waiting fail with ``RuntimeError``."""
        with self._cond:
            self._closing = True
            left = list(self._queue)
            self._queue.clear()
            calls = [future for _, future in self._calls]
            self._calls.clear()
            self._cond.notify_all()
        for future in [job.future for job in left] + calls:
            if future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)

    # work ----------------------------------------------------------------------------------------

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue ``jobs`` (in order, behind everything already waiting)."""
        with self._cond:
            if self._closing:
                raise RuntimeError("the server is shutting down")
            now = time.monotonic()
            for job in jobs:
                job.queued_at = now
                self._queue.append(job)
            self._cond.notify_all()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` in the worker thread between two batches and return its result (or raise its error).

        From the worker thread itself (a batch calling back), ``fn`` simply runs.
        """
        if threading.current_thread() is self._thread or self._thread is None:
            return fn()
        future: Future = Future()
        with self._cond:
            if self._closing:
                raise RuntimeError("the server is shutting down")
            self._calls.append((fn, future))
            self._cond.notify_all()
        return future.result()

    def wake(self) -> None:
        """Look at the queue again (a preparation ended without submitting anything)."""
        with self._cond:
            self._cond.notify_all()

    def pending(self) -> int:
        """Jobs waiting for a batch."""
        with self._cond:
            return len(self._queue)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Start no new batch inside this block (the running one finishes); jobs queue up meanwhile.

        For maintenance, and for tests that need several requests to meet in one batch.
        """
        with self._cond:
            self._held += 1
        try:
            yield
        finally:
            with self._cond:
                self._held -= 1
                self._cond.notify_all()

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {"batches": self.batches, "sentences": self.rows, "largest_batch": self.largest,
                    "mean_batch": round(self.rows / self.batches, 3) if self.batches else 0.0,
                    "waiting_sentences": len(self._queue), "busy_s": round(self.busy_s, 3)}

    def _take(self) -> list[Job]:
        """Wait for work, then up to ``max_batch`` live jobs (oldest first); [] when closing.

        Calls (:meth:`call`) waiting meanwhile run first, here, even while new batches are held.
        """
        with self._cond:
            while True:
                while not self._calls and (not self._queue or self._held) and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return []
                if self._calls:
                    self._run_calls()
                    continue
                # give a lone job a moment for company, counted from when it arrived, and a longer one
                # while accepted requests are still being prepared
                first = self._queue[0].queued_at
                while len(self._queue) < self.max_batch and not self._held and not self._closing and not self._calls:
                    deadline = first + (self.max_wait_s if self.preparing() > 0 else self.window_s)
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._held or not self._queue or self._calls:
                    continue
                batch = []
                while self._queue and len(batch) < self.max_batch:
                    job = self._queue.popleft()
                    if job.future.set_running_or_notify_cancel():  # False: its client went away
                        batch.append(job)
                if batch:
                    self.batches += 1
                    self.rows += len(batch)
                    self.largest = max(self.largest, len(batch))
                    return batch

    def _run_calls(self) -> None:
        """Run the waiting calls (with the condition's lock released while each runs)."""
        while self._calls:
            fn, future = self._calls.popleft()
            self._cond.release()
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as e:
                        future.set_exception(e)
            finally:
                self._cond.acquire()

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return
            for job in batch:
                if job.on_start is not None:
                    try:
                        job.on_start()
                    except Exception:  # a callback must not stop the worker
                        logger.exception("a job's start callback failed")
            t0 = time.perf_counter()
            self._run(batch)
            with self._cond:
                self.busy_s += time.perf_counter() - t0

    def _run(self, batch: list[Job]) -> None:
        try:
            results = self.run_batch([job.row for job in batch])
        except Exception as e:
            if len(batch) == 1:
                logger.exception("synthesis failed")
                batch[0].future.set_exception(e)
                return
            logger.warning("a batch of %d failed (%s: %s); retrying its sentences one at a time",
                           len(batch), type(e).__name__, e)
            for job in batch:
                try:
                    job.future.set_result(self.run_batch([job.row])[0])
                except Exception as e1:
                    logger.exception("synthesis failed")
                    job.future.set_exception(e1)
            return
        for job, result in zip(batch, results):
            job.future.set_result(result)
