"""The autoregressive model: codebook 1 of the response, one frame at a time, ended by a stop token."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import (
    RAS_THRESHOLD, RAS_WINDOW, Base, Block, ModelOutput, device_ints, prefix_lm_mask, sample_logits, select_spans,
)


class AR(Base):
    """Causal transformer over ``[text, SEP, prompt, SEP, codebook-1 response]`` predicting the next code
    (under ``arch=paper`` a prefix LM: the part before the response attends both ways).

    Training targets are the response codes followed by the stop token (id ``n_audio_tokens`` = 1024):
    the second SEP predicts the first code, each code predicts the next, the last code predicts stop.
    Only response (and stop) positions are in the loss. The reference implementation also trained
    the AR to predict the next *text* token (and, through an off-by-one, never trained the prediction
    of the first response code); we train response + stop only, which is what generation uses.

    Generation (:meth:`generate`) keeps a preallocated key/value cache so each new frame costs one
    token's worth of compute.
    """

    kind = "ar"
    causal = True

    @property
    def n_input_levels(self) -> int:
        return 1

    @property
    def n_input_tokens(self) -> int:
        return self.config.n_audio_tokens + 1  # the stop token can be fed back during batched generation

    @property
    def n_classes(self) -> int:
        return self.config.n_audio_tokens + 1

    @property
    def stop_token(self) -> int:
        return self.config.n_audio_tokens

    # training ---------------------------------------------------------------------------------

    def _response_logits(
        self, text_list: list[Tensor], proms_list: list[Tensor], resps_list: list[Tensor]
    ) -> tuple[Tensor, Tensor, list[int]]:
        """Logits ``(sum(t_i + 1), n_classes)`` at the positions that predict response codes and stop,
        the matching targets ``(sum(t_i + 1),)`` and the per-sample counts ``t_i + 1``."""
        resp_list = [r if r.dim() == 1 else r[:, 0] for r in resps_list]
        lens = [len(r) for r in resp_list]
        resp = torch.cat(resp_list)
        h, seq_lens = self._hidden(text_list, proms_list, self._embed_response(resp[:, None]), lens)
        # the second SEP and the t_i codes (the last t_i + 1 positions of each sequence) predict
        # the codes and the stop token
        counts = [n + 1 for n in lens]
        logits = self._classify(select_spans(h, [n - c for n, c in zip(seq_lens, counts)], counts))
        stop = resp.new_full((1,), self.stop_token)
        targets = torch.cat([t for r in resp_list for t in (r, stop)])
        return logits, targets, counts

    def forward(self, text_list: list[Tensor], proms_list: list[Tensor], resps_list: list[Tensor]) -> ModelOutput:
        """Next-code loss on the response.

        With ``prompt_mode=paper`` the prompts are empty ``(0, 8)``: the AR is then a plain language model
        over ``[phones, SEP, SEP, codebook 1]`` of one utterance (Wang et al. 2023, section 4.2), and at
        inference the reference's transcript and codes are simply the beginning of that sequence.

        Args:
            text_list: b x ``(t_text,)`` phone ids.
            proms_list: b x ``(t_prom, 8)`` prompt codes (``t_prom`` may be 0).
            resps_list: b x ``(t_resp,)`` or ``(t_resp, l)`` response codes; only codebook 1 (column 0) is used.
        Returns:
            :class:`ModelOutput` with the mean cross-entropy over all response + stop targets.
        """
        logits, targets, _ = self._response_logits(text_list, proms_list, resps_list)
        return self._output(logits, targets)

    def logits(self, text_list: list[Tensor], proms_list: list[Tensor], resps_list: list[Tensor]) -> list[Tensor]:
        """Per sample, ``(t_resp + 1, n_classes)`` logits: row i predicts response code i (the last row, stop)."""
        logits, _, counts = self._response_logits(text_list, proms_list, resps_list)
        return list(logits.split(counts))

    # generation -------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self,
        text_list: list[Tensor],
        proms_list: list[Tensor],
        max_steps: int = 1000,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: Optional[torch.Generator] = None,
        prefix_list: Optional[list[Tensor]] = None,
        ignore_stop: bool = False,
        use_cache: bool = True,
        ras: bool = False,
        ras_window: int = RAS_WINDOW,
        ras_threshold: float = RAS_THRESHOLD,
        max_lens: Optional[Sequence[int]] = None,
    ) -> list[Tensor]:
        """Sample codebook 1 for every sample of a batch.

        The stop token is never filtered out by ``top_k``/``top_p`` (it keeps its plain probability),
        so a restrictive filter cannot make a generation endless.

        Args:
            text_list: b x ``(t_text,)`` phone ids.
            proms_list: b x ``(t_prom, 8)`` prompt codes.
            max_steps: most frames generated per sample.
            temperature: softmax temperature; 0 is greedy.
            top_k: keep only the k most likely codes (0 = off).
            top_p: nucleus sampling mass (1 = off).
            generator: random source for reproducible sampling (on the model's device).
            prefix_list: b x ``(t_prefix,)`` codebook-1 codes already known (continuation mode, e.g. the
                prompt's own codes); generation continues after them and they are not returned.
            ignore_stop: never emit the stop token (its logit is masked) and run exactly ``max_steps``
                steps; for benchmarks.
            use_cache: False recomputes the whole sequence at every step (the reference's way; for
                tests and benchmarks).
            ras: repetition-aware sampling (VALL-E 2, arXiv 2406.05370, section 3.3): a code drawn by
                the greedy/top-k/nucleus rule that already fills more than ``ras_threshold`` of the
                last ``ras_window`` codes (the prefix's included) is replaced by a draw from the plain
                temperature distribution. Paper defaults: window 10, threshold 0.1, with nucleus sampling.
            ras_window: K, the history window in frames.
            ras_threshold: the repetition ratio above which the fallback draw is used.
            max_lens: b most frames per sample (the length guard, e.g. frames per phone x phones);
                a sample that reaches its limit is stopped there. None: ``max_steps`` for all.
        Returns:
            b x ``(t_gen,)`` generated codes, without the stop token. A sample whose length equals its
            limit (``max_lens[i]`` or ``max_steps``) was cut there, not stopped by the model.
        """
        model = self._unsharded()
        if model is not self:
            return model.generate(
                text_list, proms_list, max_steps=max_steps, temperature=temperature, top_k=top_k, top_p=top_p,
                generator=generator, prefix_list=prefix_list, ignore_stop=ignore_stop, use_cache=use_cache,
                ras=ras, ras_window=ras_window, ras_threshold=ras_threshold, max_lens=max_lens,
            )
        b = len(text_list)
        if prefix_list is None:
            prefix_list = [text_list[0].new_zeros(0) for _ in range(b)]
        limits = None
        if max_lens is not None:
            if len(max_lens) != b:
                raise ValueError(f"max_lens has {len(max_lens)} entries for {b} samples")
            caps = [max(0, min(int(n), max_steps)) for n in max_lens]
            max_steps = max(caps + [1])  # never run past the longest allowed sample
            limits = device_ints(caps, self.device)
        history = None
        if ras:
            if ras_window < 1:
                raise ValueError(f"ras_window must be at least 1; got {ras_window}")
            # the window before step 0, oldest first, so step k overwrites slot k % K (the oldest)
            history = torch.full((b, ras_window), -1, dtype=torch.long, device=self.device)
            for i, pre in enumerate(prefix_list):
                tail = pre[-ras_window:] if len(pre) else pre
                if len(tail):
                    history[i, ras_window - len(tail) :] = tail
        was_training = self.training
        self.eval()  # no dropout while sampling
        try:
            decoder_cls = _CachedDecoder if use_cache else _RecomputeDecoder
            decoder = decoder_cls(self, text_list, proms_list, prefix_list, max_steps)
            out = torch.full((b, max_steps), self.stop_token, dtype=torch.long, device=self.device)
            stopped = torch.zeros(b, dtype=torch.bool, device=self.device)
            # asking "all stopped?" waits for the device; on a GPU ask every few steps only
            check_every = 1 if self.device.type == "cpu" else 16
            logits = decoder.logits
            for step in range(max_steps):
                if ignore_stop:
                    logits[:, self.stop_token] = -math.inf
                token = sample_logits(
                    logits, temperature, top_k, top_p, generator, keep_token=self.stop_token,
                    history=history, ras_threshold=ras_threshold,
                )
                if limits is not None:
                    token = token.masked_fill(limits <= step, self.stop_token)  # the length guard
                if history is not None:
                    history[:, step % ras_window] = token
                out[:, step] = token
                if not ignore_stop or limits is not None:
                    stopped |= token == self.stop_token
                    if step % check_every == 0 and bool(stopped.all()):
                        break
                if step + 1 < max_steps:
                    logits = decoder.step(token)
        finally:
            self.train(was_training)
        # each sample ends at its first stop token (later steps of a stopped sample are discarded)
        is_stop = out == self.stop_token
        lens = torch.where(is_stop.any(1), is_stop.int().argmax(1), max_steps).tolist()
        return [out[i, :n] for i, n in enumerate(lens)]

class _CachedDecoder:
    """Incremental decoding with a preallocated key/value cache.

    The prefixes (``[text, SEP, prompt, SEP, prefix codes]``) are left-padded to a common length P,
    so every sample's k-th new token lands in the same cache column P + k; each sample keeps its own
    positions, and a mask hides the padding columns (no mask at all when nothing is padded).

    Under ``arch=paper`` the prefill uses the prefix LM's mask (``[text, SEP, prompt, SEP]`` both ways,
    the prefix codes causally), so its keys and values are those of a full forward: the steps after
    it are causal, as before. A lone sample without prefix codes needs no mask at all (its whole
    prefill is the bidirectional condition); with prefix codes it needs a ``(P, P)`` mask shared by
    the batch; only left padding needs one per sample.
    """

    def __init__(
        self, model: AR, text_list: list[Tensor], proms_list: list[Tensor], prefix_list: list[Tensor], max_steps: int
    ):
        cfg = model.config
        self.model = model
        lens = [len(p) for p in prefix_list]
        codes = torch.cat(prefix_list)
        x_list = model._sequences(text_list, proms_list, model._embed_response(codes[:, None]), lens)
        seq_lens = [len(x) for x in x_list]
        b, P, T = len(x_list), max(seq_lens), max(seq_lens) + max_steps
        self.pe = model._positions(T)  # (T, d)
        positions = [model._position_ids(len(t), len(x)) for t, x in zip(text_list, x_list)]
        # left padding by hand: pad_sequence(padding_side=...) needs a newer torch than the rest of the code
        x = x_list[0].new_zeros(b, P, x_list[0].shape[-1])  # (b, P, d)
        for i, (xi, pos) in enumerate(zip(x_list, positions)):
            x[i, P - len(xi) :] = xi + self.pe[pos]
        self.cache = x.new_empty(cfg.n_layers, 2, b, cfg.n_heads, T, cfg.d_model // cfg.n_heads)
        self.layers = [(block.step_params(), cache) for block, cache in zip(model.blocks, self.cache.unbind(0))]
        norm = model.norm.ln
        if model.paper:
            # the tied output layer, stored (d, n_classes) like Linear's; and codebook 1's rows as inputs
            self.head = (norm.weight, norm.bias, norm.eps, model.audio_emb.weight[0].t().contiguous(), None)
            self.token_table = model.audio_emb.table(0)
        else:
            self.head = (norm.weight, norm.bias, norm.eps, model.classifier.w, model.classifier.bias)
            self.token_table = model.resp_emb.weight  # codebook 1 is level 0 of the response table: rows = ids
        # position of each sample's next token (the paper core counts the audio from its own 0)
        next_pos = [n - (len(t) + 1 if model.paper else 0) for n, t in zip(seq_lens, text_list)]
        self.pos = device_ints(next_pos, x.device)
        self.col = P  # cache column of the next token (shared)
        prefill_mask, self.step_mask = None, None
        if all(n == P for n in seq_lens):
            if model.paper and any(lens):
                # the condition both ways, the prefix codes causally: one (P, P) mask for the batch
                cond = model._prefix_lens(text_list, proms_list)[0]
                prefill_mask = prefix_lm_mask([cond], P, x.device, x.dtype)
            elif model.paper:
                prefill_mask = False  # the whole prefill is the condition: no mask, not causal
        else:
            pad = device_ints([P - n for n in seq_lens], x.device)
            valid = torch.arange(T, device=x.device) >= pad[:, None]  # (b, T) False on padding
            causal = torch.ones(P, P, dtype=torch.bool, device=x.device).tril()
            if model.paper:  # keys of the condition (columns pad .. pad + cond) are seen by every row
                cond_end = pad + device_ints(model._prefix_lens(text_list, proms_list), x.device)
                causal = causal | (torch.arange(P, device=x.device) < cond_end[:, None])[:, None, :]
            # padding rows may only see themselves: a fully masked row would give NaN
            eye = torch.eye(P, dtype=torch.bool, device=x.device)
            prefill_mask = (causal & valid[:, None, :P]) | eye  # (b, P, P)
            prefill_mask = prefill_mask[:, None]  # (b, 1, P, P)
            # additive float mask: SDPA would convert a boolean one at every layer of every step
            self.step_mask = torch.zeros(b, 1, 1, T, dtype=x.dtype, device=x.device)
            self.step_mask.masked_fill_(~valid[:, None, None, :], -math.inf)
        if prefill_mask is False:
            h = model._body(x, kv_cache=self.cache)
        else:
            h = model._body(x, attn_mask=prefill_mask, is_causal=prefill_mask is None, kv_cache=self.cache)
        self.logits = model._classify(h[:, -1])  # (b, n_classes): the last column is every sample's last token

    def step(self, token: Tensor) -> Tensor:
        """Feed the sampled tokens ``(b,)``; return the next logits ``(b, n_classes)``."""
        x = F.embedding(token, self.token_table).add_(self.pe.index_select(0, self.pos))
        mask = None if self.step_mask is None else self.step_mask[..., : self.col + 1]
        for params, cache in self.layers:
            x = Block.step(x, params, cache, self.col, mask)
        self.col += 1
        self.pos += 1
        norm_w, norm_b, eps, cls_w, cls_b = self.head
        x = torch.layer_norm(x, x.shape[-1:], norm_w, norm_b, eps)
        return torch.mm(x, cls_w) if cls_b is None else torch.addmm(cls_b, x, cls_w)


class _RecomputeDecoder:
    """Reference-style decoding: run the whole sequence again for every new token (no cache)."""

    def __init__(
        self, model: AR, text_list: list[Tensor], proms_list: list[Tensor], prefix_list: list[Tensor], max_steps: int
    ):
        self.model, self.text_list, self.proms_list = model, text_list, proms_list
        self.resp_list = list(prefix_list)
        self.logits = self._last_logits()

    def _last_logits(self) -> Tensor:
        model = self.model
        lens = [len(r) for r in self.resp_list]
        emb = model._embed_response(torch.cat(self.resp_list)[:, None])
        h, seq_lens = model._hidden(self.text_list, self.proms_list, emb, lens)
        return model._classify(select_spans(h, [n - 1 for n in seq_lens], [1] * len(seq_lens)))

    def step(self, token: Tensor) -> Tensor:
        self.resp_list = [torch.cat([r, t[None]]) for r, t in zip(self.resp_list, token)]
        return self._last_logits()
