"""The transformer shared by the AR and NAR models, and the preset table (the factory is :mod:`vall_e.models`).

Both models read one sequence per utterance (Wang et al. 2023, VALL-E)::

    [ text phones | SEP | prompt frames | SEP | response frames ]

- text phones: one learned embedding per phone id;
- prompt frames: the sum of the 8 codebook embeddings of each EnCodec frame;
- response frames: codebook 1 for the AR; for the NAR the sum of the levels given so far;
- SEP: one learned vector, used at both places.

The body is a pre-norm transformer; the NAR conditions every norm on the level it predicts (AdaLN).
Two cores (``ModelConfig.arch``) differ in how the pieces are wired:

================  =====================================  ==========================================
                  ``enhuiz`` (the reference code)        ``paper`` (VALL-E, section 4)
================  =====================================  ==========================================
AR attention      causal over the whole sequence         prefix LM: ``[text, SEP, prompt, SEP]``
                                                         attends both ways, the response causally
audio embedding   one table for the prompt, another      one table per codebook, shared by prompt
                  for the response                       and response
output layer      one classifier (shared by the NAR's    tied to the acoustic embedding: the AR's
                  seven levels)                          to codebook 1, the NAR's level-j head to
                                                         codebook j's table (paper: "the j-th
                                                         prediction layer is the (j+1)-th acoustic
                                                         embedding layer", 1-based)
positions         sinusoidal over the whole sequence     sinusoidal, counted separately for the
                                                         phones ``[text, SEP]`` and the audio
                                                         ``[prompt, SEP, response]``
================  =====================================  ==========================================

``enhuiz`` stays exactly what it was (parameter names, initialization, outputs), so its checkpoints
and exports keep loading; saved hyper-parameters without ``arch`` mean ``enhuiz``.

``ModelConfig.group_size`` (the AR only; VALL-E 2's grouped code modeling) makes every audio position
of the AR hold G consecutive frames, with either core: see :class:`vall_e.ar.AR`. At 1 (the default,
and what saved hyper-parameters without the field mean) nothing is added: same parameters, same outputs.

Inputs are lists of variable-length tensors; the models pad internally and mask padding, so a
sample's outputs never depend on the other members of its batch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# Reference presets (DESIGN.md, fixed names) plus a tiny one for tests.
_SIZES = {
    "": dict(d_model=1024, n_heads=16, n_layers=12),
    "-half": dict(d_model=512, n_heads=8, n_layers=12),
    "-quarter": dict(d_model=256, n_heads=4, n_layers=12),
    "-tiny": dict(d_model=64, n_heads=2, n_layers=2),
}
ARCHS = ("enhuiz", "paper")
PRESETS: dict[str, dict] = {
    f"{kind}{suffix}": dict(kind=kind, **size) for kind in ("ar", "nar") for suffix, size in _SIZES.items()
}


@dataclass
class ModelConfig:
    """Hyper-parameters of one model; plain JSON-able values (saved with checkpoints as ``hparams``).

    Args:
        kind: ``"ar"`` (causal, predicts codebook 1 and a stop token) or ``"nar"`` (bidirectional,
            predicts codebooks 2..8 one level at a time).
        d_model: width of the residual stream.
        n_heads: attention heads; must divide ``d_model``.
        n_layers: transformer blocks.
        n_text_tokens: size of the phone vocabulary (id 0 is reserved for padding by the data side).
        n_audio_tokens: EnCodec codebook size; the AR's stop token is this id.
        n_prompt_levels: codebooks summed into each prompt frame.
        n_resp_levels: codebooks the model deals with in the response: 1 for the AR, 8 for the NAR
            (it reads levels 1..7 and predicts levels 2..8). ``None`` picks that default from ``kind``.
        p_dropout: dropout on the residual branches and inside the feed-forward block.
        activation_checkpointing: recompute each block in the backward pass (less memory, ~30% slower).
        preset: the preset name this config came from, if any (informational).
        arch: ``"enhuiz"`` (the reference implementation's core) or ``"paper"`` (the paper's: prefix
            attention, tied output layers, shared acoustic embeddings, separate positions); see the
            module docstring.
        group_size: G, audio frames per AR position (VALL-E 2 grouped code modeling, see
            :class:`vall_e.ar.AR`); 1 is plain VALL-E. The NAR has 1.
    """

    kind: str = "ar"
    d_model: int = 1024
    n_heads: int = 16
    n_layers: int = 12
    n_text_tokens: int = 256
    n_audio_tokens: int = 1024
    n_prompt_levels: int = 8
    n_resp_levels: Optional[int] = None
    p_dropout: float = 0.1
    activation_checkpointing: bool = False
    preset: Optional[str] = None
    arch: str = "enhuiz"
    group_size: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("ar", "nar"):
            raise ValueError(f"kind={self.kind!r}: use 'ar' or 'nar'")
        if self.arch not in ARCHS:
            raise ValueError(f"arch={self.arch!r}: use one of {', '.join(ARCHS)}")
        if self.n_resp_levels is None:
            self.n_resp_levels = 1 if self.kind == "ar" else 8
        if self.kind == "ar" and self.n_resp_levels != 1:
            raise ValueError(f"the AR models codebook 1 only; got n_resp_levels={self.n_resp_levels}")
        if self.kind == "nar" and self.n_resp_levels < 2:
            raise ValueError(f"the NAR needs at least 2 response levels; got {self.n_resp_levels}")
        if self.group_size < 1:
            raise ValueError(f"group_size={self.group_size}: use 1 (plain VALL-E) or more frames per AR step")
        if self.kind == "nar" and self.group_size != 1:
            raise ValueError(f"group_size={self.group_size}: grouped code modeling is the AR's (VALL-E 2); the NAR "
                             "fills every frame in one pass and has group_size 1")
        if self.d_model % self.n_heads or self.d_model % 2:
            raise ValueError(f"d_model={self.d_model} must be even and divisible by n_heads={self.n_heads}")


def complete_hparams(hparams: dict) -> dict:
    """Saved hyper-parameters with the fields they predate filled in with their defaults (``arch`` ->
    ``enhuiz``, ``group_size`` -> 1), so models saved before a field existed compare equal to the same
    model built today."""
    known = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    return {**{k: v for k, v in known.items() if k != "n_resp_levels"}, **hparams}


@dataclass
class ModelOutput:
    """What a training forward returns.

    Attributes:
        loss: scalar mean cross-entropy over the response targets (differentiable).
        stats: detached scalars for logging: ``loss``, ``acc`` (top-1) and ``acc10`` (top-10 accuracy),
            all over response targets only.
    """

    loss: Tensor
    stats: dict[str, Tensor]


# ----------------------------------------------------------------------------------------------
# building blocks


class Linear(nn.Module):
    """``x @ w + bias`` (``w`` is ``(d_in, d_out)``), storing ``weight`` with its longer side contiguous.

    nn.Linear up to the storage order, which matters for one-token decoding on CPU: that is bound by
    reading the weights, and MKL streams a matrix for a single row about 1.7x faster when its rows
    are the long side (measured on the benchmark machine: 256 -> 1024 as ``(in, out)``, 1024 -> 256
    as ``(out, in)``). For large batches the orientation makes no difference.
    """

    def __init__(self, d_in: int, d_out: int, bias: bool = True):
        super().__init__()
        self.transposed = d_in > d_out  # stored as (d_out, d_in), like nn.Linear
        self.weight = nn.Parameter(torch.empty((d_out, d_in) if self.transposed else (d_in, d_out)))
        self.bias = nn.Parameter(torch.zeros(d_out)) if bias else None
        nn.init.normal_(self.weight, 0.0, 0.02)

    @property
    def w(self) -> Tensor:
        """The weight as ``(d_in, d_out)`` (a view)."""
        return self.weight.t() if self.transposed else self.weight

    def forward(self, x: Tensor) -> Tensor:
        """x: ``(..., d_in)`` -> ``(..., d_out)``."""
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.mm(x2, self.w) if self.bias is None else torch.addmm(self.bias, x2, self.w)
        return y.view(*x.shape[:-1], y.shape[-1])


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """``F.dropout``, with a cheaper mask on CPU.

    ATen's CPU dropout draws one value per element from a serial generator, which took ~20% of a
    CPU training step here. This draws 64 random bits per 4 elements instead (16-bit thresholds:
    ``p`` is exact to 1/65536), about 2.5x faster; on other devices it is ``F.dropout``.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training)
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None).view(torch.int16)[:n]
    keep = bits.view(x.shape) >= round(p * 65536) - 32768  # P(keep) = 1 - p
    return x.mul(keep).mul_(1.0 / (1.0 - p))


class MultiEmbedding(nn.Module):
    """Sum of per-level embeddings: a frame ``(l,)`` of codes maps to ``sum_j E_j[code_j]``.

    One table holds every level (level ``j`` uses rows ``j * n_tokens ...``), and
    ``F.embedding_bag(mode="sum")`` does the lookups and the sum in one kernel, without one-hot
    matrices. Row ``n_levels * n_tokens`` is a zero padding row: codes ``< 0`` (masked levels) map to it.
    """

    def __init__(self, n_levels: int, n_tokens: int, d_model: int):
        super().__init__()
        self.n_levels, self.n_tokens = n_levels, n_tokens
        self.pad_row = n_levels * n_tokens
        self.weight = nn.Parameter(torch.randn(n_levels * n_tokens + 1, d_model))
        with torch.no_grad():
            self.weight[self.pad_row].zero_()
        self.register_buffer("offsets", torch.arange(n_levels) * n_tokens, persistent=False)

    def forward(self, codes: Tensor) -> Tensor:
        """codes: ``(n, l)`` with ``l <= n_levels`` (``-1`` = leave this level out) -> ``(n, d)``."""
        rows = codes + self.offsets[: codes.shape[-1]]
        rows = rows.masked_fill(codes < 0, self.pad_row)
        return F.embedding_bag(rows, self.weight, mode="sum", padding_idx=self.pad_row)


class AudioEmbedding(nn.Module):
    """The ``paper`` core's acoustic embedding: one table per codebook, which is also the output layer.

    ``weight`` is ``(n_levels, n_tokens, d)``. Embedding a frame sums its codes' rows of the levels it
    holds; predicting level ``j`` scores a hidden state against the rows of table ``j`` (weight tying,
    VALL-E section 4: the prediction layer of a level is the embedding of that level). One parameter
    serves both, so there is nothing to keep in sync under DeepSpeed, ZeRO or export, and the scoring
    runs inside this module's ``forward``, where ZeRO-3 gathers the weight.

    Scale: rows start at ``N(0, 1/d)`` and are multiplied by ``sqrt(d)`` when embedding (Vaswani et al.'s
    tied recipe): inputs have unit variance per channel, like the ``enhuiz`` tables and the sinusoidal
    positions, while initial logits of a unit-variance hidden state have unit variance too.
    """

    def __init__(self, n_levels: int, n_tokens: int, d_model: int):
        super().__init__()
        self.n_levels, self.n_tokens, self.scale = n_levels, n_tokens, math.sqrt(d_model)
        self.weight = nn.Parameter(torch.randn(n_levels, n_tokens, d_model) / self.scale)
        self.register_buffer("offsets", torch.arange(n_levels) * n_tokens, persistent=False)

    def forward(
        self, codes: Optional[Tensor] = None, hidden: Optional[Tensor] = None, level: "int | Tensor | None" = None
    ) -> Tensor:
        """Embed ``codes`` or score ``hidden``; exactly one of the two.

        Args:
            codes: ``(n, l)`` codes of levels ``0..l-1`` (``-1`` = leave that level out) -> ``(n, d)``.
            hidden: ``(..., d)`` with an int ``level`` -> ``(..., n_tokens)`` logits of that level; or
                ``(b, t, d)`` with ``level`` a ``(b,)`` tensor (one level per sample) -> ``(b, t, n_tokens)``.
        """
        if codes is not None:
            keep = codes >= 0
            rows = (codes + self.offsets[: codes.shape[-1]]).masked_fill(~keep, 0)
            weights = keep.to(self.weight.dtype) * self.scale
            return F.embedding_bag(rows, self.weight.view(-1, self.weight.shape[-1]), mode="sum", per_sample_weights=weights)
        assert hidden is not None and level is not None
        if isinstance(level, int):
            return F.linear(hidden, self.weight[level])
        return torch.bmm(hidden, self.weight.index_select(0, level).transpose(1, 2))

    def table(self, level: int) -> Tensor:
        """Level ``level``'s rows as the inputs see them, ``(n_tokens, d)`` (a scaled copy)."""
        return self.weight[level] * self.scale


def prefix_lm_mask(prefix_lens: Sequence[int], t: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Additive attention mask of a prefix language model over right-padded sequences of length ``t``.

    Query ``i`` of sample ``s`` may attend key ``j`` when ``j < prefix_lens[s]`` (the prefix is seen
    both ways) or ``j <= i`` (the rest is causal). A prefix row never sees the rest: ``j <= i <
    prefix``. Returns ``(b, 1, t, t)``, or ``(1, 1, t, t)`` when every prefix has the same length
    (broadcast over the batch). Float, ``0`` or ``-inf``: SDPA would convert a boolean mask at every layer.
    """
    if len(set(prefix_lens)) == 1:
        prefix = torch.full((1,), prefix_lens[0], device=device, dtype=torch.long)
    else:
        prefix = device_ints(prefix_lens, device)
    j = torch.arange(t, device=device)
    allowed = (j[None, None, :] <= j[None, :, None]) | (j[None, None, :] < prefix[:, None, None])  # (b, t, t)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, -math.inf)[:, None]


class Norm(nn.Module):
    """LayerNorm; with ``n_levels > 0`` an AdaLN whose scale and shift depend on the level.

    The VALL-E paper writes AdaLN as ``a * LayerNorm(h) + b`` with ``a`` and ``b`` computed from
    the level embedding. We parameterize the scale as ``a = exp(log_gamma[l])`` (our choice, not the
    paper's: it keeps the scale positive and lets a zero init start at the identity affine, ``a = 1,
    b = 0``), so the norm is ``exp(log_gamma[l]) * LayerNorm(x) + beta[l]``. The reference code also
    multiplied by an "AdaNorm" factor ``2 * (1 - 0.1 * h.detach())``; we leave that out, as the paper does.
    """

    def __init__(self, d_model: int, n_levels: int = 0):
        super().__init__()
        self.d_model = d_model
        if n_levels:
            self.ada = nn.Embedding(n_levels, 2 * d_model)
            nn.init.zeros_(self.ada.weight)
            self.ln = nn.LayerNorm(d_model, elementwise_affine=False)
        else:
            self.ada = None
            self.ln = nn.LayerNorm(d_model)

    def forward(self, x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        """x: ``(b, t, d)``; cond: ``(b,)`` level indices (AdaLN only) -> ``(b, t, d)``."""
        h = self.ln(x)
        if self.ada is None:
            return h
        log_gamma, beta = self.ada(cond).unsqueeze(1).chunk(2, dim=-1)  # (b, 1, d) each
        return torch.addcmul(beta, h, log_gamma.exp())


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``, with an optional KV cache."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.qkv = Linear(d_model, 3 * d_model, bias=False)  # one fused matmul for q, k and v
        self.proj = Linear(d_model, d_model)

    def forward(
        self,
        x: Tensor,
        attn_mask: Optional[Tensor] = None,
        is_causal: bool = False,
        kv_cache: Optional[Tensor] = None,
        start: int = 0,
    ) -> Tensor:
        """Attend ``x`` to itself, or, with a cache, to everything cached so far plus ``x``.

        Args:
            x: ``(b, t, d)``.
            attn_mask: boolean (True = may attend) or additive float, broadcastable to
                ``(b, h, t, start + t)``.
            is_causal: lower-triangular masking; with a cache only for a prefill (``start == 0``).
            kv_cache: ``(2, b, h, T, d_head)`` keys and values of this layer; ``x``'s are written at
                columns ``start .. start + t`` and the attention reads columns ``0 .. start + t``.
            start: column of ``x``'s first token in the cache.
        Returns:
            ``(b, t, d)``.
        """
        b, t, d = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.n_heads, self.d_head).permute(2, 0, 3, 1, 4)  # (3, b, h, t, dh)
        q, k, v = qkv.unbind(0)
        if kv_cache is not None:
            kv_cache[:, :, :, start : start + t].copy_(qkv[1:])  # one in-place write for k and v
            k, v = kv_cache[:, :, :, : start + t].unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + ffn(norm(x))``."""

    def __init__(self, d_model: int, n_heads: int, p_dropout: float, n_levels: int = 0):
        super().__init__()
        self.p_dropout = p_dropout
        self.norm1 = Norm(d_model, n_levels)
        self.attn = SelfAttention(d_model, n_heads)
        self.norm2 = Norm(d_model, n_levels)
        self.fc1 = Linear(d_model, 4 * d_model)
        self.fc2 = Linear(4 * d_model, d_model)

    def forward(
        self,
        x: Tensor,
        cond: Optional[Tensor] = None,
        attn_mask: Optional[Tensor] = None,
        is_causal: bool = False,
        kv_cache: Optional[Tensor] = None,
        start: int = 0,
    ) -> Tensor:
        """x: ``(b, t, d)``, cond: ``(b,)`` AdaLN levels or None; the rest as in :class:`SelfAttention`."""
        p, training = self.p_dropout, self.training
        x = x + dropout(self.attn(self.norm1(x, cond), attn_mask, is_causal, kv_cache, start), p, training)
        h = dropout(F.gelu(self.fc1(self.norm2(x, cond))), p, training)
        return x + dropout(self.fc2(h), p, training)

    def step_params(self) -> tuple:
        """The tensors :meth:`step` reads, gathered once per generation: at one token, looking up
        module attributes costs about as much as the small kernels themselves."""
        if self.norm1.ada is not None:
            raise ValueError("Block.step supports LayerNorm blocks (the AR) only")
        n1, n2, attn = self.norm1.ln, self.norm2.ln, self.attn
        return (
            n1.weight, n1.bias, attn.qkv.w, attn.proj.w, attn.proj.bias,
            n2.weight, n2.bias, self.fc1.w, self.fc1.bias, self.fc2.w, self.fc2.bias,
            attn.n_heads, n1.eps,
        )  # fmt: skip

    @staticmethod
    def step(x: Tensor, params: tuple, kv_cache: Tensor, col: int, attn_mask: Optional[Tensor] = None) -> Tensor:
        """One new token per sample against a KV cache: ``forward`` in eval mode, in fewer dispatches.

        Token-by-token decoding on CPU pays per operation, so this calls the kernels directly on the
        block's tensors (``params`` from :meth:`step_params`): no module calls, no dropout, residual
        adds fused into the matmuls. Equality with ``forward`` is covered by the cache-vs-recompute test.

        Args:
            x: ``(b, d)`` the new tokens.
            params: :meth:`step_params` of the block.
            kv_cache: ``(2, b, h, T, d_head)``; the token's key and value go to column ``col``.
            col: cache column of the new token; attention reads columns ``0 .. col``.
            attn_mask: additive ``(b, 1, 1, col + 1)`` (``-inf`` on padding), or None.
        Returns:
            ``(b, d)``.
        """
        ln1_w, ln1_b, w_qkv, w_proj, b_proj, ln2_w, ln2_b, w_fc1, b_fc1, w_fc2, b_fc2, n_heads, eps = params
        b, d = x.shape
        qkv = torch.mm(torch.layer_norm(x, (d,), ln1_w, ln1_b, eps), w_qkv).view(b, 3, n_heads, d // n_heads)
        kv_cache.select(3, col).copy_(qkv.narrow(1, 1, 2).transpose(0, 1))  # k and v in one write
        k, v = kv_cache.narrow(3, 0, col + 1).unbind(0)  # (b, h, col + 1, dh)
        y = F.scaled_dot_product_attention(qkv.select(1, 0).unsqueeze(2), k, v, attn_mask=attn_mask)  # (b, h, 1, dh)
        x = torch.addmm(x, y.reshape(b, d), w_proj).add_(b_proj)
        h = F.gelu(torch.addmm(b_fc1, torch.layer_norm(x, (d,), ln2_w, ln2_b, eps), w_fc1))
        return torch.addmm(x, h, w_fc2).add_(b_fc2)


IGNORE = -100  # a target left out of the loss (cross_entropy's ignore_index), e.g. the NAR's self-prompt
RAS_WINDOW = 10  # VALL-E 2 (arXiv 2406.05370, section 3.3): the history window K
RAS_THRESHOLD = 0.1  # ... and the repetition ratio t_r above which a nucleus draw is replaced


def sample_logits(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
    keep_token: Optional[int] = None,
    history: Optional[Tensor] = None,
    ras_threshold: float = RAS_THRESHOLD,
) -> Tensor:
    """Draw one token per row of ``logits`` ``(b, c)`` -> ``(b,)``.

    ``temperature == 0`` is greedy. ``top_k > 0`` keeps the k most likely tokens; ``top_p < 1`` keeps
    the smallest set whose probability reaches ``top_p`` (nucleus). Without either, no sort is done.
    Draws are exponential races (:func:`race`): nothing here makes the host wait for the device.

    Args:
        keep_token: a token id that ``top_k``/``top_p`` never filter out (the AR's stop token: a small
            ``top_k`` must not make stopping impossible). It keeps its unfiltered logit.
        history: ``(b, K)`` the last K tokens of each row (``-1`` = empty slot), or None. Turns on
            repetition-aware sampling (VALL-E 2, section 3.3): a token drawn by the filtered
            (greedy / top-k / nucleus) rule whose share of the window exceeds ``ras_threshold`` is
            replaced by a draw from the plain distribution (temperature only, no filtering; at
            ``temperature == 0`` the fallback samples at temperature 1). Both draws are made for
            every row, so the generator advances the same way whatever the history: results are
            reproducible under a seed and the batched loop needs no data-dependent branch.
        ras_threshold: the repetition ratio above which the fallback is used (paper: 0.1 with K = 10,
            i.e. a token already present twice in the last 10 steps).
    """
    if temperature <= 0:
        token = logits.argmax(-1)
        plain = logits.float() if history is not None else None
    else:
        logits = logits.float() / temperature
        plain = logits
        if 0 < top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(-1)
            drop = probs.cumsum(-1) - probs >= top_p  # keep tokens until the mass before them reaches p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, -math.inf))
        if keep_token is not None and logits is not plain:
            logits[:, keep_token] = plain[:, keep_token]
        token = race(logits.softmax(-1), generator)
    if history is None:
        return token
    assert plain is not None
    fallback = race(plain.softmax(-1), generator)
    ratio = (history == token[:, None]).sum(-1) / history.shape[-1]
    return torch.where(ratio > ras_threshold, fallback, token)


def per_sample(value: Any, b: int, name: str) -> list:
    """``value`` for each of ``b`` samples: a list or tuple as it is (it must have ``b`` entries),
    anything else repeated. How :meth:`AR.generate` / :meth:`NAR.generate` take per-sample options."""
    if isinstance(value, (list, tuple)):
        if len(value) != b:
            raise ValueError(f"{name} has {len(value)} entries for {b} samples")
        return list(value)
    return [value] * b


def race(probs: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """One draw per row of ``probs`` ``(b, c)`` -> ``(b,)``: ``argmax(probs / E)`` with ``E ~ Exp(1)`` i.i.d.

    The exponential race: token ``i`` wins with probability ``probs[i] / sum(probs)``. This is the
    computation ``torch.multinomial(probs, 1)`` does, draw for draw under the same generator, without
    its two validity checks: each is a host read, which on a GPU made every decoded token wait for
    the device. The rows must hold finite, non-negative values with a positive sum (softmax of
    logits with at least one finite entry per row; the sampling rules above always keep one).
    """
    wait = torch.empty_like(probs).exponential_(generator=generator)
    # Exp(1) can round to 0.0 on CPU (about 2**-53 per value); 0 / 0 would be a NaN, which argmax picks
    return probs.div(wait.clamp_(min=torch.finfo(wait.dtype).tiny)).argmax(-1)


# ----------------------------------------------------------------------------------------------
# the shared model


class Base(nn.Module):
    """Embeddings, transformer body and classifier shared by :class:`~vall_e.ar.AR` and :class:`~vall_e.nar.NAR`.

    Subclasses set ``kind``, ``causal`` and how many response levels they embed.
    """

    ModelOutput = ModelOutput
    kind: str = ""
    causal: bool = False

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.kind != self.kind:
            raise ValueError(f"{type(self).__name__} needs a config with kind={self.kind!r}, got {config.kind!r}")
        self.config = config
        self.paper = config.arch == "paper"
        d = config.d_model
        self.text_emb = nn.Embedding(config.n_text_tokens, d)
        if self.paper:
            # one table per codebook: the prompt has all of them, the response (and the heads) a prefix
            n_levels = max(config.n_prompt_levels, self.n_input_levels + 1)
            self.audio_emb = AudioEmbedding(n_levels, self.n_input_tokens, d)
        else:
            self.prom_emb = MultiEmbedding(config.n_prompt_levels, config.n_audio_tokens, d)
            self.resp_emb = MultiEmbedding(self.n_input_levels, self.n_input_tokens, d)
        self.sep = nn.Parameter(torch.randn(d))
        self.blocks = nn.ModuleList(
            Block(d, config.n_heads, config.p_dropout, self.n_cond_levels) for _ in range(config.n_layers)
        )
        self.norm = Norm(d, self.n_cond_levels)  # final norm (absent in the reference; standard for pre-norm)
        if not self.paper:  # the paper core scores against audio_emb (tied)
            self.classifier = Linear(d, self.n_classes)
        # GPT-2 style: Linear starts at N(0, 0.02); the residual-branch outputs are scaled down by
        # depth so the residual stream starts near its input. Embeddings keep N(0, 1) like the
        # reference, on the scale of the sinusoidal positions.
        for block in self.blocks:
            for proj in (block.attn.proj, block.fc2):
                nn.init.normal_(proj.weight, 0.0, 0.02 / math.sqrt(2 * config.n_layers))

    # subclass knobs ---------------------------------------------------------------------------

    @property
    def n_input_levels(self) -> int:
        """Response codebooks the model reads."""
        raise NotImplementedError

    @property
    def n_input_tokens(self) -> int:
        """Token ids per response codebook embedding (the AR also embeds its stop token)."""
        return self.config.n_audio_tokens

    @property
    def n_classes(self) -> int:
        return self.config.n_audio_tokens

    @property
    def n_cond_levels(self) -> int:
        """Rows of the AdaLN level embedding; 0 for plain LayerNorm."""
        return 0

    @property
    def group_size(self) -> int:
        """G, audio frames per position (VALL-E 2 grouped code modeling; more than 1 only in the AR)."""
        return self.config.group_size

    # public helpers ---------------------------------------------------------------------------

    @property
    def hparams(self) -> dict:
        """Everything :func:`vall_e.models.build_model` needs to rebuild this architecture."""
        return dataclasses.asdict(self.config)

    @property
    def device(self) -> torch.device:
        return self.sep.device

    def _unsharded(self) -> "Base":
        """``self``, or a plain full-weight copy when DeepSpeed ZeRO-3 shards the weights.

        ZeRO-3 gathers a module's weights in hooks around its ``forward``; generation calls the
        layers and tensors directly (the cached token loop on purpose), so it runs on a copy instead.
        Under ZeRO-3 this is a collective: every rank must generate, as the trainer's evaluation does.
        """
        sharded = [p for p in self.parameters() if hasattr(p, "ds_id")]
        if not sharded:
            return self
        import deepspeed

        copy = type(self)(self.config).to(self.device)
        with deepspeed.zero.GatheredParameters(sharded):
            copy.load_state_dict(self.state_dict())
        return copy.train(self.training)

    # internals --------------------------------------------------------------------------------

    def _positions(self, n: int) -> Tensor:
        """Sinusoidal position embeddings ``(n, d)``: ``[sin(p * w), cos(p * w)]`` as in the reference.

        The frequencies ``w`` are computed here in float32 at every call rather than kept in a buffer:
        older DeepSpeed engines (and any ``model.half()``/``.to(bfloat16)``) cast floating buffers to the
        training dtype, and bf16 frequencies put the positions of training and inference 0.2-0.3 RMS
        apart near position 1000. Nothing can cast these; it costs ``d / 2`` exponentials per forward.
        """
        half = self.config.d_model // 2
        dev = self.sep.device
        omega = torch.exp(-math.log(1e4) * torch.arange(half, device=dev, dtype=torch.float32) / half)
        # float32 even in a half-precision model: positions reach the thousands
        angles = torch.arange(n, device=dev, dtype=torch.float32)[:, None] * omega
        return torch.cat([angles.sin(), angles.cos()], dim=-1).to(self.sep.dtype)

    def _embed_prompts(self, proms_list: list[Tensor]) -> Sequence[Tensor]:
        """Prompt frames b x ``(t_prom, l)`` -> b x ``(t_prom, d)``, each frame the sum of its levels'
        embeddings (the AR with ``group_size > 1`` groups them: :meth:`vall_e.ar.AR._embed_prompts`)."""
        prom_emb = self.audio_emb if self.paper else self.prom_emb
        return prom_emb(torch.cat(proms_list)).split([len(p) for p in proms_list])

    def _embed_response(self, codes: Tensor) -> Tensor:
        """Response frames ``(n, l)`` (``-1`` = level left out) -> ``(n, d)``."""
        return self.audio_emb(codes) if self.paper else self.resp_emb(codes)

    def _classify(self, h: Tensor, level: int = 0) -> Tensor:
        """Final hidden states ``(..., d)`` -> logits ``(..., n_classes)`` predicting codebook ``level + 1``
        (0-based ``level``; the enhuiz core has one classifier for every level)."""
        return self.audio_emb(hidden=h, level=level) if self.paper else self.classifier(h)

    def _prefix_lens(self, text_list: Sequence[Tensor], proms_list: Sequence[Tensor]) -> list[int]:
        """Length of each sample's ``[text, SEP, prompt, SEP]`` in positions: the condition before the
        response (a prompt of ``t`` frames takes ``t // group_size`` positions)."""
        g = self.group_size
        return [len(t) + len(p) // g + 2 for t, p in zip(text_list, proms_list)]

    def _position_ids(self, text_len: int, n: int) -> Tensor:
        """``(n,)`` position of each element of a sequence of ``n`` whose text has ``text_len`` phones:
        ``0..n-1``, or under ``paper`` ``0..text_len`` for ``[text, SEP]`` then ``0..`` again for the audio."""
        ramp = torch.arange(n, device=self.sep.device)
        if not self.paper:
            return ramp
        return torch.where(ramp <= text_len, ramp, ramp - (text_len + 1))

    def _sequences(
        self,
        text_list: list[Tensor],
        proms_list: list[Tensor],
        resp_emb: Optional[Tensor] = None,
        resp_lens: Optional[list[int]] = None,
    ) -> list[Tensor]:
        """Per-sample embedded sequences ``[text, SEP, prompt, SEP, response]`` without positions.

        Args:
            text_list: b x ``(t_text,)`` phone ids.
            proms_list: b x ``(t_prom, n_prompt_levels)`` codes.
            resp_emb: ``(sum(resp_lens), d)`` embedded responses in sample order, or None for the
                prefix only.
            resp_lens: response length of each sample, in positions (groups of ``group_size`` frames).
        Returns:
            b x ``(t_text + 1 + t_prom / G + 1 + t_resp, d)`` (``t_prom / G`` rounded down).
        """
        text = self.text_emb(torch.cat(text_list)).split([len(t) for t in text_list])
        prom = self._embed_prompts(proms_list)
        sep = self.sep[None]
        if resp_emb is None:
            return [torch.cat([t, sep, p, sep]) for t, p in zip(text, prom)]
        resp = resp_emb.split(resp_lens)
        return [torch.cat([t, sep, p, sep, r]) for t, p, r in zip(text, prom, resp)]

    def _body(
        self,
        x: Tensor,
        cond: Optional[Tensor] = None,
        attn_mask: Optional[Tensor] = None,
        is_causal: bool = False,
        kv_cache: Optional[Tensor] = None,
        start: int = 0,
    ) -> Tensor:
        """Run the blocks and the final norm: ``(b, t, d)`` -> ``(b, t, d)``.

        kv_cache: ``(n_layers, 2, b, h, T, d_head)`` or None (see :class:`SelfAttention`).
        """
        ckpt = self.config.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            cache = None if kv_cache is None else kv_cache[i]
            if ckpt:
                x = checkpoint(block, x, cond, attn_mask, is_causal, cache, start, use_reentrant=False)
            else:
                x = block(x, cond, attn_mask, is_causal, cache, start)
        return self.norm(x, cond)

    def _hidden(
        self,
        text_list: list[Tensor],
        proms_list: list[Tensor],
        resp_emb: Tensor,
        resp_lens: list[int],
        cond: Optional[Tensor] = None,
    ) -> tuple[Tensor, list[int]]:
        """Embed, right-pad and run the full sequences.

        Returns:
            h: ``(b, t_max, d)`` final hidden states;
            lengths: b sequence lengths as Python ints (each sequence ends with its response, so
                a response's span is the tail of its sequence).
        """
        x_list = self._sequences(text_list, proms_list, resp_emb, resp_lens)
        lengths = [len(x) for x in x_list]
        if self.paper:
            pe = self._positions(max(lengths))
            x_list = [x + pe[self._position_ids(len(t), len(x))] for x, t in zip(x_list, text_list)]
            x = nn.utils.rnn.pad_sequence(x_list, batch_first=True)  # right padding
        else:
            x = nn.utils.rnn.pad_sequence(x_list, batch_first=True)  # right padding
            x = x + self._positions(x.shape[1])
        attn_mask, is_causal = None, self.causal
        if self.causal and self.paper:
            # the prefix LM; right padding needs nothing more: a real query never reaches a padded key
            attn_mask = prefix_lm_mask(self._prefix_lens(text_list, proms_list), x.shape[1], x.device, x.dtype)
            is_causal = False
        elif not self.causal and min(lengths) != max(lengths):
            # bidirectional: hide padding keys; with right padding causal attention already never sees them
            lens = device_ints(lengths, x.device)
            attn_mask = (torch.arange(x.shape[1], device=x.device) < lens[:, None])[:, None, None, :]
        h = self._body(x, cond, attn_mask, is_causal=is_causal)
        return h, lengths

    def _output(self, logits: Tensor, targets: Tensor) -> ModelOutput:
        """Loss and accuracies over flat response ``logits`` ``(n, c)`` and ``targets`` ``(n,)``;
        targets ``IGNORE`` (-100) are left out of all three."""
        loss = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE)
        with torch.no_grad():
            valid = targets != IGNORE
            n = valid.sum().clamp(min=1)
            acc = ((logits.argmax(-1) == targets) & valid).sum() / n
            top10 = logits.topk(min(10, logits.shape[-1]), dim=-1).indices
            acc10 = ((top10 == targets[:, None]).any(-1) & valid).sum() / n
        return ModelOutput(loss=loss, stats={"loss": loss.detach(), "acc": acc, "acc10": acc10})


def arange_cat(ranges: Sequence[tuple[int, int]], device: torch.device) -> Tensor:
    """``torch.cat([torch.arange(lo, hi) for lo, hi in ranges])`` (int64) on ``device``, in two kernels.

    One ``arange`` up to the largest ``hi`` and one ``cat`` of slices of it: the bounds travel as
    view offsets, i.e. kernel arguments. ``torch.tensor(list, device="cuda")`` would copy the list
    from pageable host memory and make the host wait for the device; this never does. Needs
    ``0 <= lo <= hi``.
    """
    ramp = torch.arange(max((hi for _, hi in ranges), default=0), device=device)
    return torch.cat([ramp[lo:hi] for lo, hi in ranges]) if ranges else ramp


def device_ints(values: Sequence[int], device: torch.device) -> Tensor:
    """``torch.tensor(values, device=device)`` for non-negative ints, without a host-to-device copy
    (see :func:`arange_cat`)."""
    return arange_cat([(v, v + 1) for v in values], device)


def select_spans(h: Tensor, starts: Sequence[int], counts: Sequence[int]) -> Tensor:
    """Gather ``h[i, starts[i] : starts[i] + counts[i]]`` for every sample, concatenated: ``(sum counts, d)``.

    One ``index_select`` with a flat index built on the device (:func:`arange_cat`). A boolean mask
    would have a data-dependent number of rows: its ``nonzero`` makes the host wait, forward and backward.
    """
    b, t, d = h.shape
    index = arange_cat([(i * t + s, i * t + s + c) for i, (s, c) in enumerate(zip(starts, counts))], h.device)
    return h.reshape(b * t, d).index_select(0, index)
