"""The non-autoregressive model: codebooks 2..8 of the response, one level per pass."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .base import IGNORE, Base, ModelOutput, arange_cat, device_ints, per_sample, sample_logits, select_spans


class NAR(Base):
    """Bidirectional transformer over ``[text, SEP, prompt, SEP, response levels 1..l]`` predicting level l+1
    (one classifier for every level under ``arch=enhuiz``; under ``paper``, level l's head is the
    acoustic embedding table of level l).

    Levels are 0-based in code: level 0 is codebook 1 (the AR's output), levels 1..7 are codebooks
    2..8. To predict level ``l`` the response frames embed the sum of levels ``0..l-1``, and every
    norm is an AdaLN conditioned on ``l``. Training picks one random level per sample, as the
    reference does; the loss covers the response frames only.
    """

    kind = "nar"
    causal = False

    @property
    def n_input_levels(self) -> int:
        return self.config.n_resp_levels - 1  # the last level is only ever predicted

    @property
    def n_cond_levels(self) -> int:
        return self.config.n_resp_levels - 1  # AdaLN row l-1 conditions the prediction of level l

    def _response_logits(
        self,
        text_list: list[Tensor],
        proms_list: list[Tensor],
        resps_list: list[Tensor],
        quant_levels: Tensor,
        level: Optional[int] = None,
    ) -> tuple[Tensor, Tensor]:
        """Logits ``(n, n_classes)`` predicting level ``quant_levels[i]`` of every response frame
        (``n = sum t_resp``, samples in order), and that level per frame ``(n,)``.

        ``resps_list[i]`` is ``(t_resp, l)`` with at least ``quant_levels[i]`` levels; levels from
        ``quant_levels[i]`` on are ignored. ``level``: the one level of every sample when the caller
        knows it on the host (generation), so the paper core's tied head is one matmul.
        """
        lens = [len(r) for r in resps_list]
        n_in = self.n_input_levels
        codes = torch.cat([r[:, :n_in] for r in resps_list])  # (n, <= n_in)
        frame_level = quant_levels.repeat_interleave(device_ints(lens, codes.device), output_size=len(codes))
        hidden_level = torch.arange(codes.shape[1], device=codes.device) >= frame_level[:, None]
        codes = codes.masked_fill(hidden_level, -1)  # -1 = leave this level out of the sum
        h, seq_lens = self._hidden(text_list, proms_list, self._embed_response(codes), lens, cond=quant_levels - 1)
        # the responses are the last t_resp positions of each sequence
        h = select_spans(h, [n - t for n, t in zip(seq_lens, lens)], lens)  # (n, d)
        if not self.paper:
            return self.classifier(h), frame_level
        if level is not None:
            return self._classify(h, level), frame_level
        # one tied head per sample's level: a batched matmul over the padded responses
        padded = nn.utils.rnn.pad_sequence(list(h.split(lens)), batch_first=True)  # (b, t_max, d)
        logits = self.audio_emb(hidden=padded, level=quant_levels)  # (b, t_max, n_classes)
        return select_spans(logits, [0] * len(lens), lens), frame_level

    def _given_levels(self, quant_levels: Tensor) -> Tensor:
        """Levels a caller gives, checked to be within ``1..n_resp_levels - 1``, as int64 on the model's device.

        Levels on the CPU are checked there, for free. Levels already on an accelerator are checked
        by the device (``torch._assert_async``): reading them back would make the host wait for it.
        Host levels travel with ``non_blocking``: the host stages them and moves on instead of
        waiting for the device to finish its queue.
        """
        top = self.config.n_resp_levels - 1
        bad = ((quant_levels < 1) | (quant_levels > top)).any()
        if quant_levels.device.type != "cpu":
            torch._assert_async(~bad, f"quant_levels must be within 1..{top}")
        elif bool(bad):
            raise ValueError(f"quant_levels must be within 1..{top}, got {quant_levels.tolist()}")
        return quant_levels.to(self.device, torch.long, non_blocking=True)

    def forward(
        self,
        text_list: list[Tensor],
        proms_list: list[Tensor],
        resps_list: list[Tensor],
        quant_levels: Optional[Tensor] = None,
        prompt_spans: Optional[Sequence[Optional[tuple[int, int]]]] = None,
    ) -> ModelOutput:
        """Loss of predicting one level per sample from the levels below it.

        Args:
            text_list: b x ``(t_text,)`` phone ids.
            proms_list: b x ``(t_prom, 8)`` prompt codes.
            resps_list: b x ``(t_resp, 8)`` response codes.
            quant_levels: ``(b,)`` 0-based level to predict per sample, in ``1..7``; drawn uniformly
                when None, on the model's device (from its global torch RNG: on CPU the same draws
                as ``torch.randint`` on the host).
            prompt_spans: b x ``(start, length)`` or None: response frames that are also the sample's
                prompt (``prompt_mode=paper``: a segment of the utterance itself). They stay in the
                input but not in the loss: the prompt gives their answer away.
        Returns:
            :class:`ModelOutput` with the mean cross-entropy over the response frames (spans excluded).
        """
        b, device = len(resps_list), self.device
        if quant_levels is None:
            # drawn where they are used: no host-to-device copy in the step
            quant_levels = torch.randint(1, self.config.n_resp_levels, (b,), device=device)
        else:
            quant_levels = self._given_levels(quant_levels)
        logits, frame_level = self._response_logits(text_list, proms_list, resps_list, quant_levels)
        n_levels = self.config.n_resp_levels
        targets = torch.cat([r[:, :n_levels] for r in resps_list]).gather(1, frame_level[:, None]).squeeze(1)
        if prompt_spans is not None:
            ranges, offset = [], 0
            for r, span in zip(resps_list, prompt_spans):
                if span is not None:
                    start, length = span
                    lo, hi, _ = slice(start, start + length).indices(len(r))  # r[start : start + length]
                    ranges.append((offset + lo, offset + max(lo, hi)))
                offset += len(r)
            targets = targets.index_fill(0, arange_cat(ranges, targets.device), IGNORE)
        return self._output(logits, targets)

    def logits(
        self, text_list: list[Tensor], proms_list: list[Tensor], resps_list: list[Tensor], quant_levels: Tensor
    ) -> list[Tensor]:
        """Per sample, ``(t_resp, n_classes)`` logits for level ``quant_levels[i]``."""
        logits, _ = self._response_logits(text_list, proms_list, resps_list, self._given_levels(quant_levels))
        return list(logits.split([len(r) for r in resps_list]))

    @torch.inference_mode()
    def generate(
        self,
        text_list: list[Tensor],
        proms_list: list[Tensor],
        resps_list: list[Tensor],
        temperature: float | Sequence[float] = 0.0,
        generator: Optional[torch.Generator | Sequence[torch.Generator]] = None,
        max_levels: int = 8,
    ) -> list[Tensor]:
        """Fill in the missing levels of every response, one pass per level.

        Args:
            text_list: b x ``(t_text,)`` phone ids.
            proms_list: b x ``(t_prom, 8)`` prompt codes.
            resps_list: b x ``(t_resp, l)`` the known levels (``l >= 1``, the same for all samples;
                a 1-D tensor counts as ``l = 1``).
            temperature: 0 is greedy (default); small values (e.g. 0.2) sample near-greedily. A list
                gives each sample its own.
            generator: random source when sampling; a list gives each sample its own, so a sample's
                codes do not depend on the rest of the batch (see :meth:`vall_e.ar.AR.generate`).
            max_levels: fill levels up to this count (at most ``n_resp_levels``).
        Returns:
            b x ``(t_resp, max_levels)`` codes.
        """
        model = self._unsharded()
        if model is not self:
            return model.generate(text_list, proms_list, resps_list, temperature, generator, max_levels)
        resps_list = [r[:, None] if r.dim() == 1 else r for r in resps_list]
        known = {r.shape[1] for r in resps_list}
        if len(known) != 1:
            raise ValueError(f"all responses must have the same number of known levels, got {sorted(known)}")
        if not 1 <= max_levels <= self.config.n_resp_levels:
            raise ValueError(f"max_levels must be within 1..{self.config.n_resp_levels}, got {max_levels}")
        lens = [len(r) for r in resps_list]
        b = len(resps_list)
        per_row = isinstance(generator, (list, tuple)) or isinstance(temperature, (list, tuple))
        if per_row:
            samplers = list(zip(per_sample(generator, b, "generator"), per_sample(temperature, b, "temperature")))
        was_training = self.training
        self.eval()
        try:
            for level in range(known.pop(), max_levels):
                quant_levels = torch.full((len(resps_list),), level, device=self.device)
                logits, _ = self._response_logits(text_list, proms_list, resps_list, quant_levels, level)
                if per_row:
                    codes = [sample_logits(lg, temp, generator=gen)
                             for lg, (gen, temp) in zip(logits.split(lens), samplers)]
                else:
                    codes = sample_logits(logits, temperature, generator=generator).split(lens)
                resps_list = [torch.cat([r, c[:, None]], dim=1) for r, c in zip(resps_list, codes)]
        finally:
            self.train(was_training)
        return [r[:, :max_levels] for r in resps_list]
