"""Speaker-balanced, resumable batch sampling for training.

Each draw picks a speaker uniformly, then one of that speaker's utterances, then its acoustic
prompt: 1..``max_prompts`` other utterances of the same speaker, adding one more with probability
``p_additional_prompt`` (as in the reference). Choosing prompts here rather than in the dataset
makes a batch's exact cost known in advance (for ``batch_frames``) and makes the whole data stream a
pure function of ``(seed, rank, batches drawn)``: resuming only needs the number of batches consumed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, Sequence


@dataclass(frozen=True)
class Draw:
    """One training example: the utterance index and the indices of its prompt utterances."""

    index: int
    prompts: tuple[int, ...]


class SpeakerBalancedBatchSampler:
    """Endless stream of batches (lists of :class:`Draw`), different on every rank.

    Args:
        spkr_indices: for each speaker, the dataset indices of its utterances (at least two each).
        costs: frames each utterance costs in a batch (text + codes); used only with ``batch_frames``.
        batch_size: examples per batch when ``batch_frames`` is 0.
        batch_frames: if > 0, fill each batch up to this many frames (text + prompt + response),
            at least one example per batch, so long utterances cannot blow up memory.
        max_prompts, p_additional_prompt: acoustic prompt policy (see module docstring).
        seed, rank: the stream is a function of these two and the number of batches drawn.
        start_batch: batches already consumed (resume); they are redrawn and skipped.
    """

    def __init__(
        self,
        spkr_indices: Sequence[Sequence[int]],
        costs: Sequence[int],
        batch_size: int,
        batch_frames: int = 0,
        max_prompts: int = 3,
        p_additional_prompt: float = 0.8,
        seed: int = 0,
        rank: int = 0,
        start_batch: int = 0,
    ):
        if not spkr_indices:
            raise ValueError("no speakers to sample from")
        for group in spkr_indices:
            if len(group) < 2:
                raise ValueError("every speaker needs at least two utterances (one to speak, one to prompt)")
        self.spkr_indices = [list(g) for g in spkr_indices]
        self.costs = list(costs)
        self.batch_size = batch_size
        self.batch_frames = batch_frames
        self.max_prompts = max_prompts
        self.p_additional_prompt = p_additional_prompt
        self.seed = seed
        self.rank = rank
        self.start_batch = start_batch

    def _draw(self, rng: random.Random) -> Draw:
        group = rng.choice(self.spkr_indices)
        index = rng.choice(group)
        others = [i for i in group if i != index]
        prompts = []
        for _ in range(self.max_prompts):
            prompts.append(rng.choice(others))
            if rng.random() > self.p_additional_prompt:
                break
        return Draw(index, tuple(prompts))

    def _cost(self, draw: Draw) -> int:
        return self.costs[draw.index] + sum(self.costs[i] for i in draw.prompts)

    def _batches(self) -> Iterator[list[Draw]]:
        rng = random.Random(f"vall-e-sampler-{self.seed}-{self.rank}")
        pending: Draw | None = None
        while True:
            batch: list[Draw] = []
            if self.batch_frames <= 0:
                batch = [self._draw(rng) for _ in range(self.batch_size)]
            else:
                total = 0
                while True:
                    draw = pending if pending is not None else self._draw(rng)
                    pending = None
                    cost = self._cost(draw)
                    if batch and total + cost > self.batch_frames:
                        pending = draw  # starts the next batch
                        break
                    batch.append(draw)
                    total += cost
            yield batch

    def __iter__(self) -> Iterator[list[Draw]]:
        it = self._batches()
        for _ in range(self.start_batch):
            next(it)
        yield from it
