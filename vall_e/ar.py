"""The autoregressive model: codebook 1 of the response, ended by a stop token; one frame per step, or one
group of ``group_size`` frames per step (VALL-E 2 grouped code modeling)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import (
    IGNORE, RAS_THRESHOLD, RAS_WINDOW, Base, Block, Linear, ModelConfig, ModelOutput, device_ints, per_sample,
    prefix_lm_mask, sample_logits, select_spans,
)


def whole_groups(n: int, group_size: int) -> int:
    """The largest multiple of ``group_size`` not above ``n``: how many frames of a prompt or prefix of ``n``
    frames a grouped AR reads (the rest, fewer than ``group_size`` frames at the end, is cut)."""
    return n - n % group_size


class AR(Base):
    """Causal transformer over ``[text, SEP, prompt, SEP, codebook-1 response]`` predicting the next code
    (under ``arch=paper`` a prefix LM: the part before the response attends both ways).

    Training targets are the response codes followed by the stop token (id ``n_audio_tokens`` = 1024):
    the second SEP predicts the first code, each code predicts the next, the last code predicts stop.
    Only response (and stop) positions are in the loss. The reference implementation also trained
    the AR to predict the next *text* token (and, through an off-by-one, never trained the prediction
    of the first response code); we train response + stop only, which is what generation uses.

    Generation (:meth:`generate`) keeps a preallocated key/value cache so each new step costs one
    token's worth of compute.

    **Grouped code modeling** (``group_size`` G > 1; VALL-E 2, arXiv 2406.05370, section 3): every audio
    position holds G consecutive frames, so the audio part of the sequence is G times shorter and one
    step emits G codes.

    - Group embedding (``group_emb``): the G frames' embeddings (each the model's usual frame embedding:
      the codebook-1 row for the response, the sum of the 8 levels for a prompt frame) are concatenated
      and projected to one vector, ``(G * d) -> d``. A linear map of the concatenation keeps which code
      sits in which slot (a plain sum would not), is the paper's construction, and leaves the frame
      tables as they are, so under ``arch=paper`` codebook 1's table stays shared by prompt, response
      and output. It starts so that its output has unit variance per channel, like a frame's.
    - Group prediction (``group_out``): the final hidden state is projected to G hidden states,
      ``d -> (G * d)``, one per slot, and each is scored by the core's output layer: under ``paper`` the
      codebook-1 table itself (the tie is kept: no new output table), under ``enhuiz`` the classifier.
    - Targets: position k predicts the frames ``k * G .. k * G + G - 1``. The response's codes, then the
      stop token, are laid out in groups; the last group is filled up after the stop token with
      ``IGNORE`` targets, which are out of the loss and of the accuracies. So the stop token may sit in
      any slot: a response of T frames has ``T // G + 1`` target groups with the stop token in slot
      ``T % G`` of the last one. (VALL-E 2 pads the end of the sequence to a whole group; here the
      padding is the stop token in the first free slot, then targets out of the loss.) The inputs are
      then always whole groups of real codes, never padding: the ``T // G`` groups before the last
      target group.
    - Prompts: a prompt of ``t`` frames is read as ``t // G`` groups; its last ``t % G`` frames (under
      40 ms at G <= 4) are left out. Training prompts (whole utterances of the speaker) are cut here;
      synthesis cuts its prompts and prefixes itself (:func:`whole_groups`), so what it reports is what
      the model read. A prefix (continuation) must be whole groups: :meth:`generate` says so otherwise.
    - Positions count groups (under ``paper`` the audio's from 0, as before).

    At G = 1 none of this exists: no new parameters, the same state_dict keys and the same outputs.
    """

    kind = "ar"
    causal = True

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        g, d = config.group_size, config.d_model
        if g > 1:  # created after the shared layers: their initialization is the G = 1 model's
            self.group_emb = Linear(g * d, d, bias=False)
            nn.init.normal_(self.group_emb.weight, 0.0, (g * d) ** -0.5)  # unit-variance frames in, unit variance out
            self.group_out = Linear(d, g * d)
            nn.init.normal_(self.group_out.weight, 0.0, d**-0.5)  # each slot's state starts on the hidden state's scale

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

    # grouping ---------------------------------------------------------------------------------

    def _group(self, frames: Tensor) -> Tensor:
        """The group embedding: ``(n, d)`` frame embeddings, ``n`` a multiple of G, consecutive frames of one
        sample -> ``(n // G, d)``. The identity at G = 1."""
        g = self.group_size
        if g == 1:
            return frames
        return self.group_emb(frames.reshape(-1, g * frames.shape[-1]))

    def _embed_frames(self, codes: Tensor) -> Tensor:
        """Codebook-1 codes ``(n,)`` of whole groups (samples concatenated) -> ``(n // G, d)`` positions."""
        return self._group(self._embed_response(codes[:, None]))

    def _embed_prompts(self, proms_list: list[Tensor]) -> Sequence[Tensor]:
        """Prompt frames b x ``(t_prom, l)`` -> b x ``(t_prom // G, d)``: frames summed over their levels, then
        grouped; a prompt's last ``t_prom % G`` frames are left out (see the class docstring)."""
        g = self.group_size
        if g == 1:
            return super()._embed_prompts(proms_list)
        whole = [p[: whole_groups(len(p), g)] for p in proms_list]
        prom_emb = self.audio_emb if self.paper else self.prom_emb
        return self._group(prom_emb(torch.cat(whole))).split([len(p) // g for p in whole])

    def _group_logits(self, h: Tensor) -> Tensor:
        """The group prediction: final hidden states ``(n, d)`` -> ``(n, G, n_classes)``, slot j predicting
        the j-th frame of the next group."""
        g = self.group_size
        if g == 1:
            return self._classify(h).unsqueeze(1)
        return self._classify(self.group_out(h).view(len(h), g, h.shape[-1]))

    # training ---------------------------------------------------------------------------------

    def _response_logits(
        self, text_list: list[Tensor], proms_list: list[Tensor], resps_list: list[Tensor]
    ) -> tuple[Tensor, Tensor, list[int], list[int]]:
        """Logits ``(sum(rows_i), n_classes)`` of every target slot, the matching targets ``(sum(rows_i),)``
        (``IGNORE`` after each stop token), the rows per sample ``rows_i = (t_i // G + 1) * G`` and the
        scored rows per sample ``t_i + 1`` (the codes and the stop token: the first rows of each sample's)."""
        g = self.group_size
        resp_list = [r if r.dim() == 1 else r[:, 0] for r in resps_list]
        lens = [len(r) for r in resp_list]
        n_in = [n // g for n in lens]  # whole groups read; the last (partial) group is only predicted
        inputs = torch.cat([r[: k * g] for r, k in zip(resp_list, n_in)])
        h, seq_lens = self._hidden(text_list, proms_list, self._embed_frames(inputs), n_in)
        # the second SEP and the input groups (the last n_in + 1 positions of each sequence) predict
        # the groups of codes and the stop token
        counts = [k + 1 for k in n_in]
        logits = self._group_logits(select_spans(h, [n - c for n, c in zip(seq_lens, counts)], counts)).flatten(0, 1)
        stop = resp_list[0].new_full((1,), self.stop_token)
        pads = [resp_list[0].new_full((c * g - n - 1,), IGNORE) for n, c in zip(lens, counts)]
        targets = torch.cat([t for r, pad in zip(resp_list, pads) for t in (r, stop, pad)])
        return logits, targets, [c * g for c in counts], [n + 1 for n in lens]

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
        logits, targets, _, _ = self._response_logits(text_list, proms_list, resps_list)
        return self._output(logits, targets)

    def logits(self, text_list: list[Tensor], proms_list: list[Tensor], resps_list: list[Tensor]) -> list[Tensor]:
        """Per sample, ``(t_resp + 1, n_classes)`` logits: row i predicts response code i (the last row, stop)."""
        logits, _, rows, scored = self._response_logits(text_list, proms_list, resps_list)
        return [lg[:n] for lg, n in zip(logits.split(rows), scored)]

    # generation -------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self,
        text_list: list[Tensor],
        proms_list: list[Tensor],
        max_steps: int = 1000,
        temperature: float | Sequence[float] = 1.0,
        top_k: int | Sequence[int] = 0,
        top_p: float | Sequence[float] = 1.0,
        generator: Optional[torch.Generator | Sequence[torch.Generator]] = None,
        prefix_list: Optional[list[Tensor]] = None,
        ignore_stop: bool = False,
        use_cache: bool = True,
        ras: bool | Sequence[bool] = False,
        ras_window: int = RAS_WINDOW,
        ras_threshold: float | Sequence[float] = RAS_THRESHOLD,
        max_lens: Optional[Sequence[int]] = None,
    ) -> list[Tensor]:
        """Sample codebook 1 for every sample of a batch, one group of ``group_size`` frames per step.

        The stop token is never filtered out by ``top_k``/``top_p`` (it keeps its plain probability),
        so a restrictive filter cannot make a generation endless. It ends a sample in whatever slot of
        a group it is drawn; the group's later slots are dropped. Every limit counts frames, not steps.

        Per-sample sampling: ``generator`` and the sampling options (``temperature``, ``top_k``,
        ``top_p``, ``ras``, ``ras_threshold``) also take one value per sample (a list). With one
        generator per sample, sample i draws only from generator i, so its codes do not depend on
        what else is in the batch: alone, with a generator seeded the same, it draws the same codes
        (what a server batching unrelated requests needs). The rows share matrix products of another
        shape, whose results differ from a lone sample's in the last bits. One shared generator and
        scalar options draw the whole batch in one call instead.

        Args:
            text_list: b x ``(t_text,)`` phone ids.
            proms_list: b x ``(t_prom, 8)`` prompt codes (a grouped AR reads ``t_prom // G`` groups of them).
            max_steps: most frames generated per sample (``ceil(max_steps / G)`` steps).
            temperature: softmax temperature; 0 is greedy.
            top_k: keep only the k most likely codes (0 = off).
            top_p: nucleus sampling mass (1 = off).
            generator: random source for reproducible sampling (on the model's device).
            prefix_list: b x ``(t_prefix,)`` codebook-1 codes already known (continuation mode, e.g. the
                prompt's own codes); generation continues after them and they are not returned. Whole
                groups only: ``t_prefix`` a multiple of ``group_size`` (cut with :func:`whole_groups`).
            ignore_stop: never emit the stop token (its logit is masked) and run exactly ``max_steps``
                frames; for benchmarks.
            use_cache: False recomputes the whole sequence at every step (the reference's way; for
                tests and benchmarks).
            ras: repetition-aware sampling (VALL-E 2, arXiv 2406.05370, section 3.3): a code drawn by
                the greedy/top-k/nucleus rule that already fills more than ``ras_threshold`` of the
                last ``ras_window`` codes (the prefix's included) is replaced by a draw from the plain
                temperature distribution. Paper defaults: window 10, threshold 0.1, with nucleus sampling.
                With groups it acts per code, slot by slot, and the window slides over frames: slot j's
                window holds the codes just drawn in slots 0..j-1 of its own group and, across the
                group boundary, the last codes of the groups before (see :func:`sample_group`).
            ras_window: K, the history window in frames.
            ras_threshold: the repetition ratio above which the fallback draw is used.
            max_lens: b most frames per sample (the length guard, e.g. frames per phone x phones);
                a sample that reaches its limit is stopped there, in whatever slot it falls. None:
                ``max_steps`` for all.
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
        b, g = len(text_list), self.group_size
        per_row = any(isinstance(v, (list, tuple)) for v in (generator, temperature, top_k, top_p, ras, ras_threshold))
        if per_row:  # one sampler per sample: (generator, temperature, top_k, top_p, ras, ras_threshold)
            rows = list(zip(*(per_sample(v, b, name) for v, name in (
                (generator, "generator"), (temperature, "temperature"), (top_k, "top_k"), (top_p, "top_p"),
                (ras, "ras"), (ras_threshold, "ras_threshold")))))
        if prefix_list is None:
            prefix_list = [text_list[0].new_zeros(0) for _ in range(b)]
        for i, pre in enumerate(prefix_list):
            if len(pre) % g:
                raise ValueError(f"prefix_list[{i}] has {len(pre)} frames, not whole groups of this AR's "
                                 f"group_size={g}: give its first {whole_groups(len(pre), g)} frames "
                                 "(vall_e.ar.whole_groups), the rest is generated")
        limits = None
        if max_lens is not None:
            if len(max_lens) != b:
                raise ValueError(f"max_lens has {len(max_lens)} entries for {b} samples")
            caps = [max(0, min(int(n), max_steps)) for n in max_lens]
            max_steps = max(caps + [1])  # never run past the longest allowed sample
            limits = device_ints(caps, self.device)
        n_steps = -(-max_steps // g)  # groups; the last may run past max_steps frames, which are cut
        history = None
        if (any(r[4] for r in rows) if per_row else ras) and ras_window < 1:
            raise ValueError(f"ras_window must be at least 1; got {ras_window}")
        if per_row:  # each sample its own window (None: no RAS for it)
            histories = [ras_history([pre], 1, ras_window, self.device) if r[4] else None
                         for pre, r in zip(prefix_list, rows)]
        elif ras:
            history = ras_history(prefix_list, b, ras_window, self.device)
        was_training = self.training
        self.eval()  # no dropout while sampling
        try:
            decoder_cls = _CachedDecoder if use_cache else _RecomputeDecoder
            decoder = decoder_cls(self, text_list, proms_list, prefix_list, n_steps)
            out = torch.full((b, n_steps * g), self.stop_token, dtype=torch.long, device=self.device)
            stopped = torch.zeros(b, dtype=torch.bool, device=self.device)
            slots = torch.arange(g, device=self.device)
            # asking "all stopped?" waits for the device; on a GPU ask every 16 frames only
            check_every = 1 if self.device.type == "cpu" else max(1, 16 // g)
            logits = decoder.logits  # (b, G, n_classes)
            for step in range(n_steps):
                if ignore_stop:
                    logits[..., self.stop_token] = -math.inf
                if per_row:  # every sample draws from its own sampler, stopped or not (it changes nothing)
                    tokens = torch.cat([
                        sample_group(logits[i : i + 1], temp, k, p, gen, keep_token=self.stop_token,
                                     history=histories[i], first_frame=step * g, ras_threshold=threshold)
                        for i, (gen, temp, k, p, _, threshold) in enumerate(rows)
                    ])  # (b, G)
                else:
                    tokens = sample_group(
                        logits, temperature, top_k, top_p, generator, keep_token=self.stop_token,
                        history=history, first_frame=step * g, ras_threshold=ras_threshold,
                    )  # (b, G)
                if limits is not None:  # the length guard, per frame
                    tokens = tokens.masked_fill(limits[:, None] <= step * g + slots, self.stop_token)
                out[:, step * g : (step + 1) * g] = tokens
                if not ignore_stop or limits is not None:
                    stopped |= (tokens == self.stop_token).any(1)
                    if step % check_every == 0 and bool(stopped.all()):
                        break
                if step + 1 < n_steps:
                    logits = decoder.step(tokens)
        finally:
            self.train(was_training)
        # each sample ends at its first stop token (later frames of a stopped sample are discarded)
        out = out[:, :max_steps]
        is_stop = out == self.stop_token
        lens = torch.where(is_stop.any(1), is_stop.int().argmax(1), max_steps).tolist()
        return [out[i, :n] for i, n in enumerate(lens)]


def ras_history(prefix_list: Sequence[Tensor], b: int, window: int, device: torch.device) -> Tensor:
    """The RAS window before the first generated frame: ``(b, window)``, each row the last ``window``
    prefix codes, oldest first, right-aligned (``-1`` = empty), so frame f overwrites slot ``f % window``."""
    history = torch.full((b, window), -1, dtype=torch.long, device=device)
    for i, pre in enumerate(prefix_list):
        tail = pre[-window:] if len(pre) else pre
        if len(tail):
            history[i, window - len(tail) :] = tail
    return history


def sample_group(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
    keep_token: Optional[int] = None,
    history: Optional[Tensor] = None,
    first_frame: int = 0,
    ras_threshold: float = RAS_THRESHOLD,
) -> Tensor:
    """Draw one group of codes per sample: logits ``(b, G, c)`` -> ``(b, G)`` (:func:`vall_e.base.sample_logits`).

    Without ``history`` the ``b * G`` rows are drawn in one call. With it (repetition-aware sampling),
    slot by slot: slot j is checked against the window as it stands after slots ``0..j-1`` were
    written, so RAS sees every code, as in one-code-per-step decoding; the window slides over frames
    and does not restart at a group boundary. ``history`` ``(b, K)`` is updated in place: frame
    ``first_frame + j`` goes to slot ``(first_frame + j) % K``. The G distributions of one group
    come from one forward pass, so a replacement in slot j cannot change slot j + 1's distribution,
    only the window it is checked against. At G = 1 this is exactly one ``sample_logits`` call.
    """
    b, g, c = logits.shape
    if history is None:
        return sample_logits(logits.reshape(b * g, c), temperature, top_k, top_p, generator, keep_token=keep_token).view(b, g)
    window = history.shape[1]
    codes = []
    for j in range(g):
        code = sample_logits(logits[:, j], temperature, top_k, top_p, generator, keep_token=keep_token,
                             history=history, ras_threshold=ras_threshold)
        history[:, (first_frame + j) % window] = code
        codes.append(code)
    return torch.stack(codes, 1)


class _CachedDecoder:
    """Incremental decoding with a preallocated key/value cache, one group of frames per step.

    The prefixes (``[text, SEP, prompt, SEP, prefix codes]``) are left-padded to a common length P,
    so every sample's k-th new position lands in the same cache column P + k; each sample keeps its own
    positions, and a mask hides the padding columns (no mask at all when nothing is padded).

    Under ``arch=paper`` the prefill uses the prefix LM's mask (``[text, SEP, prompt, SEP]`` both ways,
    the prefix codes causally), so its keys and values are those of a full forward: the steps after
    it are causal, as before. A lone sample without prefix codes needs no mask at all (its whole
    prefill is the bidirectional condition); with prefix codes it needs a ``(P, P)`` mask shared by
    the batch; only left padding needs one per sample.

    ``logits`` (after the prefill) and :meth:`step` give ``(b, G, n_classes)``: the next group's slots.
    """

    def __init__(
        self, model: AR, text_list: list[Tensor], proms_list: list[Tensor], prefix_list: list[Tensor], n_steps: int
    ):
        """``prefix_list``: whole groups of codes per sample; ``n_steps``: most new positions (groups) to hold."""
        cfg = model.config
        self.model = model
        g = model.group_size
        lens = [len(p) // g for p in prefix_list]
        codes = torch.cat(prefix_list)
        x_list = model._sequences(text_list, proms_list, model._embed_frames(codes), lens)
        seq_lens = [len(x) for x in x_list]
        b, P, T = len(x_list), max(seq_lens), max(seq_lens) + n_steps
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
        # the group layers, (G * d, d) and (d, G * d) as Linear stores them for one row; None at G = 1
        self.group_in = model.group_emb.w if g > 1 else None
        self.group_out = (model.group_out.w, model.group_out.bias) if g > 1 else None
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
        self.logits = model._group_logits(h[:, -1])  # (b, G, n_classes): the last column is every sample's last token

    def step(self, tokens: Tensor) -> Tensor:
        """Feed the sampled groups ``(b, G)``; return the next group's logits ``(b, G, n_classes)``."""
        b, g = tokens.shape
        x = F.embedding(tokens, self.token_table).view(b, -1)  # (b, G * d): the G frames side by side
        if self.group_in is not None:
            x = torch.mm(x, self.group_in)  # the group embedding
        x = x.add_(self.pe.index_select(0, self.pos))
        mask = None if self.step_mask is None else self.step_mask[..., : self.col + 1]
        for params, cache in self.layers:
            x = Block.step(x, params, cache, self.col, mask)
        self.col += 1
        self.pos += 1
        norm_w, norm_b, eps, cls_w, cls_b = self.head
        x = torch.layer_norm(x, x.shape[-1:], norm_w, norm_b, eps)
        if self.group_out is not None:  # the group prediction: one hidden state per slot
            x = torch.addmm(self.group_out[1], x, self.group_out[0]).view(b * g, -1)
        logits = torch.mm(x, cls_w) if cls_b is None else torch.addmm(cls_b, x, cls_w)
        return logits.view(b, g, -1)


class _RecomputeDecoder:
    """Reference-style decoding: run the whole sequence again for every new group (no cache)."""

    def __init__(
        self, model: AR, text_list: list[Tensor], proms_list: list[Tensor], prefix_list: list[Tensor], n_steps: int
    ):
        self.model, self.text_list, self.proms_list = model, text_list, proms_list
        self.resp_list = list(prefix_list)  # b x (t,) frames, whole groups
        self.logits = self._last_logits()

    def _last_logits(self) -> Tensor:
        """``(b, G, n_classes)`` predicted by each sample's last position."""
        model = self.model
        lens = [len(r) // model.group_size for r in self.resp_list]
        emb = model._embed_frames(torch.cat(self.resp_list))
        h, seq_lens = model._hidden(self.text_list, self.proms_list, emb, lens)
        return model._group_logits(select_spans(h, [n - 1 for n in seq_lens], [1] * len(seq_lens)))

    def step(self, tokens: Tensor) -> Tensor:
        """Append the sampled groups ``(b, G)``; the next group's logits ``(b, G, n_classes)``."""
        self.resp_list = [torch.cat([r, t]) for r, t in zip(self.resp_list, tokens)]
        return self._last_logits()
