"""The threads that run the models: they group waiting sentences into batches and run them.

Every sentence of every request becomes a :class:`Job` in one queue. ``workers`` threads take
batches from it, oldest jobs first. A worker takes at most ``max_batch`` jobs, and no more than its
share of what is waiting among the idle workers (eight waiting and two idle workers: four each), so
concurrent batches overlap. On a CPU that pays: the AR's cached steps are bound by memory traffic
and the NAR's passes by arithmetic, so two batches on two cores finish sooner than one batch of
twice the size on both. A job that finds the workers idle waits at most ``window_s`` for company,
or up to ``max_wait_s`` while requests that have been accepted are still being prepared (their
phones and prompts): when a batch ends, its clients send their next requests together, and their
preparation takes a few milliseconds each, so without this the next batch would leave with the
first of them alone. A batch that fails is retried one job at a time, so one bad sentence fails
only its own request.

The workers share the models read-only (forward passes in inference mode); request handlers wait
on the jobs' futures. Other work that must not overlap any batch (encoding a new voice switches
process-wide precision flags while it runs) goes through :meth:`Batcher.call`, which runs it while
no batch runs, ahead of new batches.
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
    """Runs ``run_batch(rows) -> results`` on batches of waiting jobs, in ``workers`` threads.

    Args:
        run_batch: synthesizes a list of rows; returns one result per row, in order. With several
            workers it runs in several threads at once, so it must not mutate shared state.
        max_batch: most jobs per batch.
        window_s: how long a job that arrives at idle workers waits for others to batch with.
        max_wait_s: how long it may wait while ``preparing()`` says more jobs are on their way.
        preparing: how many accepted requests are being prepared now (call :meth:`wake` when it drops).
        workers: batches that may run at the same time.
    """

    def __init__(self, run_batch: Callable[[list[Any]], list[Any]], max_batch: int = 8, window_s: float = 0.02,
                 max_wait_s: float = 0.25, preparing: Callable[[], int] = lambda: 0, workers: int = 1):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1; got {max_batch}")
        if workers < 1:
            raise ValueError(f"workers must be at least 1; got {workers}")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.workers = workers
        self.window_s = max(0.0, window_s)
        self.max_wait_s = max(self.window_s, max_wait_s)
        self.preparing = preparing
        self._queue: deque[Job] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._cond = threading.Condition()
        self._held = 0
        self._running = 0  # batches running now
        self._in_call = False  # a call is running: no batch starts
        self._closing = False
        self._threads: list[threading.Thread] = []
        # statistics, for /health and the benchmark
        self.batches = 0
        self.rows = 0
        self.largest = 0
        self.busy_s = 0.0
        self.most_running = 0

    # lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        if not self._threads:
            self._threads = [threading.Thread(target=self._loop, name=f"vall_e-batcher-{i}", daemon=True)
                             for i in range(self.workers)]
            for thread in self._threads:
                thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop after the current batches; jobs still waiting fail with ``RuntimeError``."""
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
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

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
        """Run ``fn()`` while no batch runs (in a worker thread) and return its result (or raise its error).

        From a worker thread itself (a batch calling back), ``fn`` simply runs.
        """
        if not self._threads or threading.current_thread() in self._threads:
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
        """Start no new batch inside this block (running ones finish); jobs queue up meanwhile.

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
                    "waiting_sentences": len(self._queue), "busy_s": round(self.busy_s, 3),
                    "workers": self.workers, "running": self._running, "most_running": self.most_running}

    def _blocked(self) -> bool:
        """No batch may start now (the lock held)."""
        return bool(self._held or self._calls or self._in_call)

    def _take(self) -> list[Job]:
        """Wait for work, then this worker's share of the live jobs (oldest first); [] when closing.

        Calls (:meth:`call`) waiting meanwhile run first, here, once no batch runs, even while new
        batches are held.
        """
        with self._cond:
            while True:
                if self._closing:
                    return []
                if self._calls and not self._running and not self._in_call:
                    self._run_calls()
                    continue
                if not self._queue or self._blocked():
                    self._cond.wait()
                    continue
                # give a lone job a moment for company, counted from when it arrived, and a longer one
                # while accepted requests are still being prepared
                first = self._queue[0].queued_at
                while 0 < len(self._queue) < self.max_batch and not self._blocked() and not self._closing:
                    deadline = first + (self.max_wait_s if self.preparing() > 0 else self.window_s)
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._closing or self._blocked() or not self._queue:
                    continue
                idle = max(1, self.workers - self._running)  # this worker and the others free now
                share = min(self.max_batch, -(-len(self._queue) // idle))
                batch = []
                while self._queue and len(batch) < share:
                    job = self._queue.popleft()
                    if job.future.set_running_or_notify_cancel():  # False: its client went away
                        batch.append(job)
                if batch:
                    self.batches += 1
                    self.rows += len(batch)
                    self.largest = max(self.largest, len(batch))
                    self._running += 1
                    self.most_running = max(self.most_running, self._running)
                    if self._queue:
                        self._cond.notify_all()  # an idle worker may take the rest
                    return batch

    def _run_calls(self) -> None:
        """Run the waiting calls (with the condition's lock released while each runs; no batch starts meanwhile)."""
        self._in_call = True
        try:
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
        finally:
            self._in_call = False
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return
            t0 = time.perf_counter()
            try:
                for job in batch:
                    if job.on_start is not None:
                        try:
                            job.on_start()
                        except Exception:  # a callback must not stop the worker
                            logger.exception("a job's start callback failed")
                self._run(batch)
            finally:
                with self._cond:
                    self.busy_s += time.perf_counter() - t0
                    self._running -= 1
                    self._cond.notify_all()

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
