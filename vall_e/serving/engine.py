"""Batched synthesis with one random stream per request: what the server's batches run.

:meth:`vall_e.inference.Synthesizer.synthesize_batch` draws every sample of a batch from one
``torch.Generator``, so a sampled request's audio depends on which others share its batch. A server
cannot allow that: the same seed must give the same audio whether a request came alone or with
seven others. Here every row of a batch carries its own generator (seeded with its own seed) and
its own sampling options, and draws only while it is still generating; the forward passes of the
AR (KV-cached, one step for all rows) and of the NAR (one pass per level for all rows) are shared.

A row alone draws exactly as :meth:`Synthesizer.synthesize` with the same seed does, so a request
served alone gives the CLI's audio. Batched, the rows share matrix products of another shape, whose
results differ from the single-row ones in the last bits (about 1e-6 on the logits of a quarter
model); a draw would change only if it fell within that distance of a boundary between two codes.

What should move into :mod:`vall_e.inference` (and the models) later: a ``generator`` argument of
``AR.generate`` / ``NAR.generate`` that also takes one generator per sample (and per-sample
temperature / top-k / top-p), and ``Synthesizer.synthesize_batch(..., seeds=[...])`` built on it;
this module then shrinks to a call. It uses two private pieces meanwhile: ``Synthesizer._prepare``
(one request -> the models' inputs) and ``vall_e.ar._CachedDecoder`` (the KV-cached step, one group
of ``group_size`` frames per step), with ``vall_e.ar.sample_group`` drawing a row's group.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

from ..inference import RAS_THRESHOLD, RAS_WINDOW, Request, Synthesis, SynthesisError, Synthesizer
from .voices import Voice

if TYPE_CHECKING:
    import torch
    from torch import Tensor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """One request's sampling options (the AR's, then the NAR's temperature)."""

    ar_temp: float = 1.0
    nar_temp: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    ras: bool = False
    ras_window: int = RAS_WINDOW
    ras_threshold: float = RAS_THRESHOLD
    max_ar_steps: int = 1000
    frames_per_phone: Optional[float] = None  # None: the AR export's largest training ratio

    def check(self) -> None:
        """:class:`SynthesisError` naming the first option out of range."""
        if not (math.isfinite(self.ar_temp) and self.ar_temp >= 0):
            raise SynthesisError(f"temperature must be >= 0 (0 = greedy); got {self.ar_temp}")
        if not (math.isfinite(self.nar_temp) and self.nar_temp >= 0):
            raise SynthesisError(f"nar_temperature must be >= 0 (0 = greedy, the default); got {self.nar_temp}")
        if self.top_k < 0:
            raise SynthesisError(f"top_k must be >= 0 (0 = off); got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SynthesisError(f"top_p must be within (0, 1] (1 = off); got {self.top_p}")
        if self.max_ar_steps < 1:
            raise SynthesisError(f"max_ar_steps must be at least 1; got {self.max_ar_steps}")
        if self.ras_window < 1 or not 0 <= self.ras_threshold <= 1:
            raise SynthesisError(f"ras_window must be >= 1 and ras_threshold within [0, 1]; "
                                 f"got {self.ras_window}, {self.ras_threshold}")
        if self.frames_per_phone is not None and not self.frames_per_phone >= 0:
            raise SynthesisError(f"frames_per_phone must be >= 0 (0 = no length guard); got {self.frames_per_phone}")


@dataclass
class Row:
    """One sentence to synthesize: the request it came from, its seed and options, and (after
    :meth:`ServingSynthesizer.prepare`) the models' inputs."""

    request: Request
    seed: int
    sampling: Sampling
    prompt_seconds: Optional[float] = 3.0
    prepared: dict[str, Any] = field(default_factory=dict)


class ServingSynthesizer(Synthesizer):
    """A :class:`Synthesizer` whose references may be :class:`~vall_e.serving.voices.Voice` objects.

    A voice's prompt codes are computed once (per prompt length) and kept, at most ``max_voices``
    voices' worth, least recently used first out. ``encodes`` counts codec encodings.
    """

    def __init__(self, *args: Any, max_voices: int = 256, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.max_voices = max_voices
        self.encodes = 0
        # how a voice's encoding runs; the server routes it between batches (Batcher.call), because
        # the codec's exact encoder math switches process-wide precision flags while it runs
        self.exclusive: Callable[[Callable[[], Any]], Any] = lambda fn: fn()
        self._voice_codes: OrderedDict[tuple, "Tensor"] = OrderedDict()
        self._voice_lock = threading.Lock()

    def encode_reference(self, ref_wav: Any, prompt_seconds: Optional[float]) -> "Tensor":
        if not isinstance(ref_wav, Voice):
            return super().encode_reference(ref_wav, prompt_seconds)
        seconds = prompt_seconds if prompt_seconds is not None and prompt_seconds > 0 else None
        key = (ref_wav.name, ref_wav.stamp, seconds)
        with self._voice_lock:
            if key in self._voice_codes:
                self._voice_codes.move_to_end(key)
                return self._voice_codes[key]
        audio = ref_wav.load()
        codes = self.exclusive(lambda: Synthesizer.encode_reference(self, audio, seconds))
        with self._voice_lock:
            self.encodes += 1
            # an entry per (voice, prompt length); a replaced recording's old entries age out
            self._voice_codes[key] = codes
            while len(self._voice_codes) > 2 * self.max_voices:
                self._voice_codes.popitem(last=False)
        return codes

    def prepare(self, row: Row) -> Row:
        """Phones and prompt codes of one row (:class:`SynthesisError` / ``AudioError`` when it cannot be done)."""
        row.sampling.check()
        row.prepared = self._prepare(row.request, row.prompt_seconds, 0, 1)
        return row


def supports_rows(synth: Synthesizer) -> bool:
    """Whether :func:`generate_rows` knows this AR (any ``group_size``: it steps one group of frames at a time)."""
    from .. import ar

    return hasattr(ar, "_CachedDecoder") and hasattr(ar, "sample_group")


def generate_rows(synth: Synthesizer, rows: list[Row]) -> list[Synthesis]:
    """Synthesize prepared rows as one batch; row ``i`` draws only from its own seed's generator.

    Each result equals :meth:`Synthesizer.synthesize` of that row alone with its seed and options
    (up to the last-bit effects described in the module docstring).
    """
    import torch

    with torch.inference_mode():
        gens = [torch.Generator(device=synth.device).manual_seed(r.seed) for r in rows]
        new, hit, guards, limits = _ar_rows(synth, rows, gens)
        full = _nar_rows(synth, rows, new, gens)
        return _decode_rows(synth, rows, full, hit, guards, limits)


def _ar_rows(
    synth: Synthesizer, rows: list[Row], gens: list["torch.Generator"]
) -> tuple[list["Tensor"], list[bool], list[Optional[int]], list[int]]:
    """Codebook 1 of every row: ``(t_new,)`` codes, whether a limit cut it, its guard and limit.

    One cached step per group of ``group_size`` frames for all rows; each live row draws its group as
    :meth:`vall_e.ar.AR.generate` does for one sample (:func:`vall_e.ar.sample_group`), so a row alone
    draws what ``generate`` draws. Budgets and limits count frames: a row is done once it holds its
    budget, and its codes are cut to its limit (a stop token anywhere in a group ends the row there).
    """
    import torch

    from ..ar import _CachedDecoder, ras_history, sample_group

    ar, device = synth.ar, synth.device
    g = ar.group_size
    stop = ar.stop_token
    preps = [r.prepared for r in rows]
    guards: list[Optional[int]] = []
    limits: list[int] = []
    for r, p in zip(rows, preps):
        s = r.sampling
        fpp = s.frames_per_phone if s.frames_per_phone is not None else (synth.ar_meta.get("max_frames_per_phone") or 0.0)
        guard = max(1, math.ceil(fpp * p["n_target_phones"]) - p["guard_offset"]) if fpp > 0 else None
        guards.append(guard)
        limits.append(s.max_ar_steps if guard is None else min(guard, s.max_ar_steps))
    # one frame past each limit: a model that emits its stop token exactly there stopped by itself
    budgets = [n + 1 for n in limits]
    steps = -(-max(budgets) // g)  # groups
    b = len(rows)
    prefixes = [p["prefix"][:, 0] for p in preps]  # whole groups (Synthesizer._prepare cuts them)
    histories = [ras_history([pre], 1, r.sampling.ras_window, device) if r.sampling.ras else None
                 for r, pre in zip(rows, prefixes)]
    decoder = _CachedDecoder(ar, [p["ar_text"] for p in preps], [p["ar_prompt"] for p in preps], prefixes, steps)
    logits = decoder.logits  # (b, G, n_classes)
    out: list[list["Tensor"]] = [[] for _ in range(b)]
    n_out = [0] * b
    live = list(range(b))
    stop_group = torch.full((1, g), stop, dtype=torch.long, device=device)
    for step in range(steps):
        column = [stop_group] * b
        for i in live:
            s = rows[i].sampling
            column[i] = sample_group(logits[i : i + 1], s.ar_temp, s.top_k, s.top_p, gens[i], keep_token=stop,
                                     history=histories[i], first_frame=step * g, ras_threshold=s.ras_threshold)
        tokens = torch.cat(column)  # (b, G): stopped rows feed stop tokens, as AR.generate feeds what it drew
        is_stop = (tokens == stop).tolist()  # one host read per step, as AR.generate on CPU
        still = []
        for i in live:
            kept = is_stop[i].index(True) if True in is_stop[i] else g  # frames before the first stop
            out[i].append(tokens[i, :kept])
            n_out[i] += kept
            if kept == g and n_out[i] < budgets[i]:
                still.append(i)
        live = still
        if not live:
            break
        logits = decoder.step(tokens)
    new, hit = [], []
    for i in range(b):
        codes = torch.cat(out[i]) if out[i] else torch.zeros(0, dtype=torch.long, device=device)
        hit.append(len(codes) > limits[i])  # stopped at its limit, not by its stop token
        new.append(codes[: limits[i]])
    return new, hit, guards, limits


def _nar_rows(synth: Synthesizer, rows: list[Row], new: list["Tensor"], gens: list["torch.Generator"]) -> list[Optional["Tensor"]]:
    """Codebooks 2..8 of every row that has frames: ``(t_prefix + t_new, 8)`` (None for an empty row).

    One level at a time for all rows; the reference's own frames (continuation) keep their true
    codes at every level, as in :meth:`Synthesizer._generate`.
    """
    import torch

    from ..base import sample_logits

    nar = synth.nar
    preps = [r.prepared for r in rows]
    live = [i for i in range(len(rows)) if len(preps[i]["prefix"]) + len(new[i]) > 0]
    full: list[Optional["Tensor"]] = [None] * len(rows)
    if not live:
        return full
    texts = [preps[i]["nar_text"] for i in live]
    proms = [preps[i]["prompt"] for i in live]
    prefixes = [preps[i]["prefix"] for i in live]
    resps = [torch.cat([pre[:, 0], new[i]])[:, None] for pre, i in zip(prefixes, live)]  # (t, 1)
    for level in range(1, nar.config.n_resp_levels):
        levels = torch.full((len(live),), level, dtype=torch.long)
        logits = nar.logits(texts, proms, resps, levels)  # per row (t, n_classes)
        for j, i in enumerate(live):
            codes = sample_logits(logits[j], rows[i].sampling.nar_temp, generator=gens[i])  # (t,)
            if len(prefixes[j]):
                codes = torch.cat([prefixes[j][:, level], codes[len(prefixes[j]):]])
            resps[j] = torch.cat([resps[j], codes[:, None]], dim=1)
    for j, i in enumerate(live):
        full[i] = resps[j]
    return full


def _decode_rows(
    synth: Synthesizer, rows: list[Row], full: list[Optional["Tensor"]], hit: list[bool],
    guards: list[Optional[int]], limits: list[int],
) -> list[Synthesis]:
    """Waveforms of every row, one codec call each (batching them would mix rows' arithmetic)."""
    return [synth.finish(full[i], len(row.prepared["prefix"]), hit[i], guards[i], row.sampling.max_ar_steps, row.seed,
                         row.prepared["phones"], limits[i]) for i, row in enumerate(rows)]


def generate_one_by_one(synth: Synthesizer, rows: list[Row]) -> list[Synthesis]:
    """The fallback for ARs that :func:`generate_rows` does not know: each row alone, through the public API."""
    outs = []
    for row in rows:
        s = row.sampling
        outs.extend(synth.synthesize_batch(
            [row.request], ar_temp=s.ar_temp, nar_temp=s.nar_temp, top_k=s.top_k, top_p=s.top_p,
            max_ar_steps=s.max_ar_steps, seed=row.seed, prompt_seconds=row.prompt_seconds, batch_size=1, ras=s.ras,
            ras_window=s.ras_window, ras_threshold=s.ras_threshold, frames_per_phone=s.frames_per_phone,
        ))
    return outs
