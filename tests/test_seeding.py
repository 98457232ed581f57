"""Model randomness per rank: different on every rank, reproducible for a (seed, rank, step)."""

from __future__ import annotations

import torch

from vall_e.models import get_model
from vall_e.utils.trainer import step_seed


def _nar_levels(seed: int, rank: int, step: int) -> list[int]:
    """The levels a NAR training step draws for a batch of 16 (``NAR.forward`` without ``quant_levels``)."""
    model = get_model("nar-tiny", n_text_tokens=16).train()
    drawn = []
    real_randint = torch.randint

    def spy(*args, **kwargs):
        out = real_randint(*args, **kwargs)
        drawn.append(out.tolist())
        return out

    torch.manual_seed(step_seed(seed, rank, step))
    torch.randint = spy
    try:
        model([torch.ones(5, dtype=torch.long)] * 16, [torch.zeros(7, 8, dtype=torch.long)] * 16,
              [torch.zeros(9, 8, dtype=torch.long)] * 16)
    finally:
        torch.randint = real_randint
    return drawn[0]


def test_step_seeds_differ_per_rank_and_step_and_repeat():
    seeds = {step_seed(0, rank, step) for rank in range(64) for step in range(1, 200)}
    assert len(seeds) == 64 * 199
    assert step_seed(3, 1, 10) == step_seed(3, 1, 10) != step_seed(4, 1, 10)
    assert _nar_levels(0, 0, 5) != _nar_levels(0, 1, 5), "ranks must train different NAR levels"
    assert _nar_levels(0, 1, 5) == _nar_levels(0, 1, 5), "a resumed step must draw what the original drew"
