"""Batched synthesis with one random stream per request: what the server's batches run.

:meth:`vall_e.inference.Synthesizer.synthesize_batch` draws every sample of a batch from one
``torch.Generator``, so a sampled request's audio would depend on which others share its batch. A
server cannot allow that: the same seed must give the same audio whether a request came alone or
with seven others. Here every row of a batch carries its own generator (seeded with its own seed)
and its own sampling options, which :meth:`vall_e.ar.AR.generate` and
:meth:`vall_e.nar.NAR.generate` take per sample; the forward passes of the AR (KV-cached, one step
for all rows) and of the NAR (one pass per level for all rows) are shared.

A row alone draws exactly as :meth:`Synthesizer.synthesize` with the same seed does, so a request
served alone gives the CLI's audio. Batched, the rows share matrix products of another shape, whose
results differ from the single-row ones in the last bits (about 1e-6 on the logits of a quarter
model); a draw would change only if it fell within that distance of a boundary between two codes.
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
    from torch import Tensor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """One request's sampling options (the AR's, then the NAR's temperature)."""

    ar_temp: float = 1.0
    nar_temp: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    ras: bool = False  # with the paper's window (RAS_WINDOW frames)
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
        if not 0 <= self.ras_threshold <= 1:
            raise SynthesisError(f"ras_threshold must be within [0, 1]; got {self.ras_threshold}")
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

    def generate(self, rows: list[Row]) -> list[Synthesis]:
        """Synthesize prepared rows as one batch; row ``i`` draws only from its own seed's generator.

        Each result equals :meth:`Synthesizer.synthesize` of that row alone with its seed and options
        (up to the last-bit effects described in the module docstring).
        """
        import torch

        s = [r.sampling for r in rows]
        default_fpp = self.ar_meta.get("max_frames_per_phone") or 0.0
        outs = self._generate(
            [r.prepared for r in rows], [torch.Generator(device=self.device).manual_seed(r.seed) for r in rows],
            ar_temp=[x.ar_temp for x in s], nar_temp=[x.nar_temp for x in s], top_k=[x.top_k for x in s],
            top_p=[x.top_p for x in s], max_ar_steps=[x.max_ar_steps for x in s], ras=[x.ras for x in s],
            ras_window=RAS_WINDOW, ras_threshold=[x.ras_threshold for x in s],
            frames_per_phone=[default_fpp if x.frames_per_phone is None else x.frames_per_phone for x in s],
        )
        for out, row in zip(outs, rows):
            out.seed = row.seed
        return outs
