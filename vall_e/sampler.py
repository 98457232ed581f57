"""Length-bucketed training batches under a true padded budget, uniform over utterances or speakers, resumable in O(1).

A *draw* picks an utterance, then its acoustic prompt. ``unit`` says what the draw is uniform over:

- ``"utterance"``: every training utterance equally often (each speaker in proportion to its
  utterances; what the VALL-E paper's training amounts to);
- ``"speaker"``: a speaker uniformly, then one of that speaker's utterances (the reference's
  speaker balance: a speaker with 8 utterances is drawn as often as one with 800).

With speaker prompts the prompt is 1..``max_prompts`` other utterances of the draw's speaker,
adding one more with probability ``p_additional_prompt`` (the reference's policy), in either unit.
A draw's sequence length is known before any audio is read: text (with ``<s>``, ``</s>``) + 2
separators + prompt frames + response frames.

Batch ``k`` of rank ``r`` comes from its own random stream seeded by ``(seed, r, k)``:

1. draw a *pool* of candidates (``bucket_batches`` batches' worth);
2. sort them by length and cut the sorted pool into consecutive chunks, each as large as the budget
   allows (``rows x longest <= batch_frames``; or ``batch_size`` rows);
3. the batch is one chunk, picked uniformly.

Every candidate lands in exactly one chunk and every chunk is equally likely, so each member of a
batch is marginally an ordinary draw of the chosen unit, while its neighbours have nearly its length
(little padding). Batches are independent of each other, hence shuffled by construction, and batch
1,000,000 costs what batch 0 costs: resuming needs only the number of batches consumed.
``bucket_batches=0`` gives plain random batches (draws in order until the budget is full).

Prompts follow ``prompt``: ``"speaker"`` (above), ``"none"`` (no prompt: the paper's AR, a plain
language model over an utterance's phones and codebook 1) or ``"segment"`` (the paper's NAR: a random
segment of the utterance itself, ``min(segment_frames, frames // 2)`` long, so at least half of every
utterance stays in the loss). Without speaker prompts a speaker needs only one utterance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np


def min_prompt_frames(spkr_start: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """``(m,)`` frames of the shortest *other* utterance of each utterance's speaker (its cheapest prompt).

    ``spkr_start``/``frames`` as in :class:`BucketBatchSampler`; every speaker needs two utterances.
    """
    out = np.empty(len(frames), np.int64)
    for j in range(len(spkr_start) - 1):
        a, b = int(spkr_start[j]), int(spkr_start[j + 1])
        f = np.asarray(frames[a:b], dtype=np.int64)
        two = np.partition(f, 1)[:2]
        out[a:b] = np.where(f == two[0], two[1], two[0])  # an utterance cannot prompt itself
    return out


PROMPTS = ("speaker", "none", "segment")
UNITS = ("speaker", "utterance")


def segment_frames_of(frames: "np.ndarray | int", segment_frames: int) -> np.ndarray:
    """Length of the self-prompt segment of utterances of ``frames`` frames: at most half of each."""
    return np.clip(np.minimum(segment_frames, np.asarray(frames) // 2), 1, None)


def least_prompt_frames(prompt: str, spkr_start: np.ndarray, frames: np.ndarray, segment_frames: int) -> np.ndarray:
    """``(m,)`` the fewest prompt frames each utterance can be drawn with under ``prompt`` (:data:`PROMPTS`).

    ``spkr_start``/``frames`` as in :class:`BucketBatchSampler`.
    """
    if prompt == "speaker":
        return min_prompt_frames(spkr_start, frames)
    if prompt == "segment":
        return segment_frames_of(frames, segment_frames)
    return np.zeros(len(frames), np.int64)


@dataclass(frozen=True)
class Draw:
    """One training example: the utterance row, the rows of its prompt utterances, and (``"segment"``
    prompts) the ``(start, length)`` frames of the utterance itself that are its prompt."""

    index: int
    prompts: tuple[int, ...]
    segment: Optional[tuple[int, int]] = None


class BucketBatchSampler:
    """Endless stream of batches (lists of :class:`Draw`), different on every rank.

    Args:
        rows: ``(m,)`` corpus rows of the training utterances, grouped by speaker.
        spkr_start: ``(s + 1,)`` speaker ``j`` owns ``rows[spkr_start[j]:spkr_start[j + 1]]`` (>= 2 each).
        own_cost: ``(m,)`` sequence length of each utterance without its prompt
            (phones + 2 for ``<s>``/``</s>`` + 2 separators + frames).
        prompt: ``"speaker"`` | ``"none"`` | ``"segment"`` (module docstring).
        unit: ``"speaker"`` (a speaker uniformly, then one of its utterances) | ``"utterance"`` (every
            utterance equally often); :data:`UNITS`.
        segment_frames: longest self-prompt segment (``"segment"``; the paper's 3 s = 225 frames).
        frames: ``(m,)`` frames of each utterance (its cost as a prompt).
        batch_size: rows per batch when ``batch_frames`` is 0.
        batch_frames: if > 0, bound on the padded batch size, rows x longest sequence; never exceeded.
            Prompts that would push a single draw over it are dropped from the end of its prompt list
            (a draw always keeps one); utterances that cannot fit even so must be left out by the caller.
        bucket_batches: candidates per batch are drawn from a pool of this many batches' worth,
            sorted by length; 0 = no bucketing.
        max_prompts, p_additional_prompt: acoustic prompt policy (module docstring).
        seed, rank: with the batch number, all the stream depends on.
        start_batch: first batch to produce (resume).
    """

    def __init__(
        self,
        rows: np.ndarray,
        spkr_start: np.ndarray,
        own_cost: np.ndarray,
        frames: np.ndarray,
        batch_size: int,
        batch_frames: int = 0,
        bucket_batches: int = 64,
        max_prompts: int = 3,
        p_additional_prompt: float = 0.8,
        seed: int = 0,
        rank: int = 0,
        start_batch: int = 0,
        prompt: str = "speaker",
        segment_frames: int = 225,
        unit: str = "speaker",
    ):
        if prompt not in PROMPTS:
            raise ValueError(f"prompt={prompt!r}: use one of {PROMPTS}")
        if unit not in UNITS:
            raise ValueError(f"unit={unit!r}: use one of {UNITS}")
        self.prompt, self.segment_frames, self.unit = prompt, segment_frames, unit
        self.rows = np.asarray(rows, dtype=np.int64)
        self.spkr_start = np.asarray(spkr_start, dtype=np.int64)
        counts = np.diff(self.spkr_start)
        if len(counts) == 0:
            raise ValueError("no speakers to sample from")
        if (counts < (2 if prompt == "speaker" else 1)).any():
            raise ValueError("every speaker needs at least two utterances (one to speak, one to prompt)")
        self.own_cost = np.asarray(own_cost, dtype=np.int64)
        self.frames = np.asarray(frames, dtype=np.int64)
        self.batch_size = batch_size
        self.batch_frames = batch_frames
        self.bucket_batches = bucket_batches
        self.max_prompts = max_prompts
        self.p_additional_prompt = p_additional_prompt
        self.seed, self.rank, self.start_batch = seed, rank, start_batch
        if batch_frames > 0:
            cheapest = self.own_cost + least_prompt_frames(prompt, self.spkr_start, self.frames, segment_frames)
            if (cheapest > batch_frames).any():
                raise ValueError(f"{int((cheapest > batch_frames).sum())} utterances cannot fit batch_frames={batch_frames}")
        self.pool_size = self._pool_size()

    def _pool_size(self) -> int:
        """Candidates per pool: ``bucket_batches`` x the expected rows per batch."""
        if self.batch_frames <= 0:
            return max(self.bucket_batches, 1) * self.batch_size
        probe = self._candidates(np.random.default_rng([self.seed, 0x9E3779B9]), 4096)
        per_batch = max(1.0, self.batch_frames / float(np.mean(probe[2])))
        return int(max(self.bucket_batches, 1) * per_batch) + 1

    def _candidates(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``n`` draws of ``unit``: positions ``(n,)``, prompt positions ``(n, max_prompts)`` (-1 = none;
        ``"segment"``: ``(n, 2)`` start and length of the self-prompt) and sequence lengths ``(n,)``;
        over-budget prompts already trimmed (length -1 = unusable)."""
        if self.unit == "speaker":
            spk = rng.integers(0, len(self.spkr_start) - 1, n)
            start = self.spkr_start[spk]
            count = self.spkr_start[spk + 1] - start
            pos = (rng.random(n) * count).astype(np.int64)
        else:  # uniform over positions; the speaker (for prompts) is the group the position falls in
            at = rng.integers(0, len(self.rows), n)
            spk = np.searchsorted(self.spkr_start, at, side="right") - 1
            start = self.spkr_start[spk]
            count = self.spkr_start[spk + 1] - start
            pos = at - start
        if self.prompt != "speaker":
            own = self.own_cost[start + pos]
            if self.prompt == "none":
                return start + pos, np.full((n, 0), -1, np.int64), own
            frames = self.frames[start + pos]
            length = segment_frames_of(frames, self.segment_frames)
            seg_start = (rng.random(n) * (frames - length + 1)).astype(np.int64)
            cost = own + length
            if self.batch_frames > 0:
                cost = np.where(cost <= self.batch_frames, cost, -1)
            return start + pos, np.stack([seg_start, length], axis=1), cost
        n_prompts = np.ones(n, np.int64)
        if self.max_prompts > 1:
            more = rng.random((n, self.max_prompts - 1)) <= self.p_additional_prompt
            n_prompts += np.cumprod(more, axis=1).sum(axis=1)
        j = (rng.random((n, self.max_prompts)) * (count - 1)[:, None]).astype(np.int64)
        j += j >= pos[:, None]  # skip the utterance itself
        prompts = start[:, None] + j
        use = np.arange(self.max_prompts)[None, :] < n_prompts[:, None]
        own = self.own_cost[start + pos]
        cum = own[:, None] + np.cumsum(np.where(use, self.frames[prompts], 0), axis=1)
        if self.batch_frames > 0:
            use &= cum <= self.batch_frames
        prompts = np.where(use, prompts, -1)
        cost = np.where(use, cum, 0).max(axis=1)
        cost[~use[:, 0]] = -1
        return start + pos, prompts, cost

    def _chunks(self, cost: np.ndarray) -> list[tuple[int, int]]:
        """Cut ascending ``cost`` into consecutive ``[a, b)`` batches under the budget."""
        n = len(cost)
        if self.batch_frames <= 0:
            bs = self.batch_size
            return [(a, a + bs) for a in range(0, n - bs + 1, bs)]
        out, a, budget = [], 0, self.batch_frames
        while a < n:
            lo, hi = 1, n - a  # largest k with k * cost[a + k - 1] <= budget (monotone in k)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if mid * cost[a + mid - 1] <= budget:
                    lo = mid
                else:
                    hi = mid - 1
            out.append((a, a + lo))
            a += lo
        return out

    def batch(self, k: int) -> list[Draw]:
        """Batch number ``k`` of this rank (a pure function of seed, rank and k)."""
        rng = np.random.default_rng([self.seed, self.rank, k, 0x5EED])
        if self.bucket_batches <= 0:
            return self._random_batch(rng)
        pos, prompts, cost = self._candidates(rng, self.pool_size)
        ok = np.flatnonzero(cost > 0)
        order = ok[np.argsort(cost[ok], kind="stable")]
        chunks = self._chunks(cost[order])
        a, b = chunks[int(rng.integers(len(chunks)))]
        return self._draws(pos[order[a:b]], prompts[order[a:b]])

    def _random_batch(self, rng: np.random.Generator) -> list[Draw]:
        """Unbucketed: draws in order, until ``batch_size`` rows or until the next would break the budget."""
        if self.batch_frames <= 0:
            pos, prompts, _ = self._candidates(rng, self.batch_size)
            return self._draws(pos, prompts)
        taken: list[int] = []
        most_rows = self.batch_frames // max(1, int(self.own_cost.min())) + 1  # no batch can hold more
        pos, prompts, cost = self._candidates(rng, most_rows)
        longest = 0
        for i in np.flatnonzero(cost > 0).tolist():
            c = max(longest, int(cost[i]))
            if taken and (len(taken) + 1) * c > self.batch_frames:
                break
            taken.append(i)
            longest = c
        return self._draws(pos[taken], prompts[taken])

    def _draws(self, pos: np.ndarray, prompts: np.ndarray) -> list[Draw]:
        rows = self.rows
        if self.prompt == "segment":
            return [Draw(int(rows[p]), (), (s, n)) for p, (s, n) in zip(pos.tolist(), prompts.tolist())]
        return [Draw(int(rows[p]), tuple(int(rows[q]) for q in qs if q >= 0)) for p, qs in zip(pos.tolist(), prompts.tolist())]

    def __iter__(self) -> Iterator[list[Draw]]:
        k = self.start_batch
        while True:
            yield self.batch(k)
            k += 1
