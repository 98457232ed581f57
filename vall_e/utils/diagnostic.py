"""Run-time checks that catch silent multi-process bugs early."""

from __future__ import annotations

import logging

import torch

from . import distributed

_logger = logging.getLogger(__name__)


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module) -> float:
    """A cheap scalar summary of all parameters (float64 sum of a fixed projection)."""
    total = None
    for i, p in enumerate(model.parameters()):
        w = p.detach().double().flatten()
        term = (w * (1.0 + (torch.arange(w.numel(), dtype=torch.float64, device=w.device) % 7) * 1e-3)).sum() * (i + 1)
        total = term if total is None else total + term.to(total.device)
    return float(total) if total is not None else 0.0  # one read back, not one per parameter


def check_replicas_in_sync(model: torch.nn.Module, step: int) -> bool:
    """All-gather each rank's weights fingerprint and compare; logs and returns whether they agree.

    Data-parallel ranks must hold identical weights after every optimizer step; a mismatch means
    a rank skipped a step or used different hyper-parameters, and training has silently forked.
    """
    fp = weights_fingerprint(model)
    if not distributed.active():
        return True
    gathered = distributed.all_gather_object(fp)
    ok = all(g == gathered[0] for g in gathered)
    if ok:
        _logger.info("step %d: weights of all %d ranks are identical (fingerprint %.10e)", step, len(gathered), fp)
    else:
        _logger.error("step %d: ranks hold DIFFERENT weights, fingerprints %s", step, gathered)
    return ok
