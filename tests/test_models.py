"""The AR and NAR models: shapes, masking, KV-cached generation, sampling, and that they can learn."""

from __future__ import annotations

import json

import pytest
import torch

from vall_e.ar import AR
from vall_e.base import PRESETS, ModelConfig, race, sample_logits
from vall_e.models import build_model, get_model
from vall_e.nar import NAR


pytestmark = pytest.mark.usefixtures("one_thread")


def make_batch(lens, seed=0, n_text=256, n_audio=1024, levels=8):
    """Random (text, prompt, response) lists with the given (t_text, t_prom, t_resp) per sample."""
    g = torch.Generator().manual_seed(seed)
    text = [torch.randint(1, n_text, (t,), generator=g) for t, _, _ in lens]
    proms = [torch.randint(0, n_audio, (p, 8), generator=g) for _, p, _ in lens]
    resps = [torch.randint(0, n_audio, (r, levels), generator=g) for _, _, r in lens]
    return text, proms, resps


LENS = [(7, 20, 15), (12, 9, 30), (3, 14, 4)]


@pytest.fixture(scope="module")
def ar():
    torch.manual_seed(0)
    return get_model("ar-tiny").eval()


@pytest.fixture(scope="module")
def nar():
    torch.manual_seed(0)
    return get_model("nar-tiny").eval()


# ---------------------------------------------------------------------------------------------
# configuration


def test_presets_and_factory():
    for kind in ("ar", "nar"):
        assert PRESETS[kind] == dict(kind=kind, d_model=1024, n_heads=16, n_layers=12)
        assert PRESETS[f"{kind}-half"] == dict(kind=kind, d_model=512, n_heads=8, n_layers=12)
        assert PRESETS[f"{kind}-quarter"] == dict(kind=kind, d_model=256, n_heads=4, n_layers=12)
        assert f"{kind}-tiny" in PRESETS
    model = get_model("ar-tiny", n_text_tokens=128)
    assert isinstance(model, AR) and model.text_emb.num_embeddings == 128 and model.stop_token == 1024
    assert model.hparams["n_resp_levels"] == 1 and model.hparams["preset"] == "ar-tiny"
    nar = get_model("nar-tiny")
    assert isinstance(nar, NAR) and nar.hparams["n_resp_levels"] == 8
    # hparams are plain JSON and rebuild the same architecture
    for m in (model, nar):
        hp = json.loads(json.dumps(m.hparams))
        rebuilt = build_model(hp)
        assert type(rebuilt) is type(m)
        rebuilt.load_state_dict(m.state_dict())
    with pytest.raises(ValueError):
        get_model("ar-huge")
    with pytest.raises(ValueError):
        ModelConfig(kind="ar", n_resp_levels=8)
    assert not ModelConfig().activation_checkpointing


# ---------------------------------------------------------------------------------------------
# training forward


def test_ar_forward_shapes(ar):
    text, proms, resps = make_batch(LENS)
    out = ar(text, proms, resps)
    assert out.loss.shape == () and out.loss.requires_grad
    assert set(out.stats) >= {"loss", "acc", "acc10"}
    assert all(v.shape == () and not v.requires_grad for v in out.stats.values())
    # only codebook 1 is used: a 1-D response gives the same loss
    out1 = ar(text, proms, [r[:, 0] for r in resps])
    torch.testing.assert_close(out1.loss, out.loss)
    logits = ar.logits(text, proms, resps)
    assert [tuple(x.shape) for x in logits] == [(r + 1, 1025) for _, _, r in LENS]


def test_nar_forward_shapes(nar):
    text, proms, resps = make_batch(LENS)
    out = nar(text, proms, resps)
    assert out.loss.shape == () and set(out.stats) >= {"loss", "acc", "acc10"}
    logits = nar.logits(text, proms, resps, torch.tensor([1, 4, 7]))
    assert [tuple(x.shape) for x in logits] == [(r, 1024) for _, _, r in LENS]
    with pytest.raises(ValueError):
        nar(text, proms, resps, quant_levels=torch.tensor([0, 1, 2]))


def test_ar_is_causal(ar):
    text, proms, resps = make_batch(LENS[:1])
    i = 6
    changed = resps[0].clone()
    changed[i + 1 :] = (changed[i + 1 :] + 1) % 1024
    a = ar.logits(text, proms, resps)[0]
    b = ar.logits(text, proms, [changed])[0]
    # row j predicts code j from codes < j: rows 0..i+1 see only codes 0..i
    torch.testing.assert_close(a[: i + 2], b[: i + 2])
    assert not torch.allclose(a[i + 2 :], b[i + 2 :])


def test_nar_reads_only_lower_levels(nar):
    text, proms, resps = make_batch(LENS[:1])
    changed = resps[0].clone()
    changed[:, 3:] = (changed[:, 3:] + 1) % 1024
    a = nar.logits(text, proms, resps, torch.tensor([3]))[0]
    b = nar.logits(text, proms, [changed], torch.tensor([3]))[0]
    torch.testing.assert_close(a, b)
    c = nar.logits(text, proms, resps, torch.tensor([4]))[0]  # now level 3 is an input
    d = nar.logits(text, proms, [changed], torch.tensor([4]))[0]
    assert not torch.allclose(c, d)


def test_batch_independence(ar, nar):
    text, proms, resps = make_batch(LENS)
    batched = ar.logits(text, proms, resps)
    for i in range(len(LENS)):
        alone = ar.logits(text[i : i + 1], proms[i : i + 1], resps[i : i + 1])[0]
        torch.testing.assert_close(batched[i], alone, atol=1e-5, rtol=1e-4)
    levels = torch.tensor([2, 5, 7])
    batched = nar.logits(text, proms, resps, levels)
    for i in range(len(LENS)):
        alone = nar.logits(text[i : i + 1], proms[i : i + 1], resps[i : i + 1], levels[i : i + 1])[0]
        torch.testing.assert_close(batched[i], alone, atol=1e-5, rtol=1e-4)


def test_activation_checkpointing_same_gradients():
    text, proms, resps = make_batch(LENS)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = get_model("nar-tiny", activation_checkpointing=ckpt).train()
        torch.manual_seed(1)  # the recomputed blocks must draw the same dropout masks
        model(text, proms, resps, quant_levels=torch.tensor([1, 2, 3])).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# sampling and generation


def test_sample_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    greedy = logits.argmax(-1)
    assert torch.equal(sample_logits(logits, 0.0), greedy)
    assert torch.equal(sample_logits(logits, 1.0, top_k=1, generator=g), greedy)
    assert torch.equal(sample_logits(logits, 1.0, top_p=1e-6, generator=g), greedy)
    top3 = logits.topk(3).indices
    for _ in range(20):
        s = sample_logits(logits, 2.0, top_k=3, generator=g)
        assert (top3 == s[:, None]).any(-1).all()
    a = sample_logits(logits, 1.0, generator=torch.Generator().manual_seed(7))
    b = sample_logits(logits, 1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    # nucleus: with one dominant token (p=0.9) top_p=0.5 keeps only it
    peaked = torch.tensor([[5.0, 0.0, 0.0, 0.0]])
    assert all(sample_logits(peaked, 1.0, top_p=0.5, generator=g).item() == 0 for _ in range(20))


def test_race_samples_the_distribution():
    """The exponential race draws token i with probability p_i; it is torch.multinomial's own
    computation, draw for draw under one seed, without multinomial's host-read validity checks."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    n = 20000
    draws = race(p.expand(n, -1), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=len(p)).float() / n
    assert (freq - p).abs().max() < 0.015, freq  # about 4 standard deviations at p = 0.5
    assert freq[-1] == 0  # a zero-probability token is never drawn
    assert torch.equal(draws, race(p.expand(n, -1), torch.Generator().manual_seed(0)))
    probs = torch.randn(64, 50, generator=torch.Generator().manual_seed(1)).softmax(-1)
    expected = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(2)).squeeze(-1)
    assert torch.equal(race(probs, torch.Generator().manual_seed(2)), expected)
    # through sample_logits: top_k=2 renormalizes the two best, keep_token adds its own plain weight
    logits = p.clamp(min=1e-9).log().expand(n, -1)
    draws = sample_logits(logits, 1.0, top_k=2, keep_token=3, generator=torch.Generator().manual_seed(3))
    freq = torch.bincount(draws, minlength=len(p)).float() / n
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.0, 0.05, 0.0]) / 0.85, atol=0.015, rtol=0)


def test_repetition_aware_sampling_switches_on_repetition():
    """VALL-E 2's RAS: a nucleus draw that already fills > 10% of the last 10 codes is redrawn from
    the plain distribution; below the threshold the nucleus draw stands. Reproducible under a seed."""
    logits = torch.zeros(3, 50)
    logits[:, 5] = 4.4  # p(5) ~ 0.62: top_p=0.5 keeps only token 5
    empty = [-1] * 10
    history = torch.tensor([
        [1, 2, 3, 4, 6, 7, 8, 9, 10, 11],  # 5 absent
        [5] + empty[1:],  # 5 once: ratio 0.1, not above the threshold
        [5, 5] + empty[2:],  # 5 twice: ratio 0.2 > 0.1: random sampling
    ])  # fmt: skip

    def draw(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.stack([sample_logits(logits, 1.0, top_p=0.5, generator=g, history=history) for _ in range(200)])

    draws = draw(0)  # (200, 3)
    assert (draws[:, :2] == 5).all()  # nucleus sampling: always the dominant token
    switched = draws[:, 2] != 5
    assert 0.2 < switched.float().mean() < 0.6  # plain sampling: about 38% other tokens
    assert torch.equal(draws, draw(0)) and not torch.equal(draws, draw(1))
    # greedy decoding falls back to temperature-1 sampling on repetition
    g = torch.Generator().manual_seed(0)
    greedy = torch.stack([sample_logits(logits, 0.0, generator=g, history=history) for _ in range(50)])
    assert (greedy[:, :2] == 5).all() and (greedy[:, 2] != 5).any()
    # without a history the same call never leaves the nucleus
    g = torch.Generator().manual_seed(0)
    assert all((sample_logits(logits, 1.0, top_p=0.5, generator=g) == 5).all() for _ in range(50))


def _looping_ar(stop_bias: float, loop_bias: float = 8.0) -> AR:
    """ar-tiny whose classifier strongly prefers code 7 (it loops) with the given stop-token bias."""
    torch.manual_seed(0)
    model = get_model("ar-tiny").eval()
    with torch.no_grad():
        model.classifier.bias[7] = loop_bias
        model.classifier.bias[model.stop_token] = stop_bias
    return model


def test_ras_breaks_a_loop_in_generation():
    model = _looping_ar(stop_bias=-100.0)
    text, proms, resps = make_batch(LENS, seed=6)
    kw = dict(max_steps=40, temperature=1.0, top_p=0.5)
    plain = model.generate(text, proms, generator=torch.Generator().manual_seed(0), **kw)
    assert all(len(o) == 40 and (o == 7).all() for o in plain)  # nucleus sampling repeats code 7 forever
    prefix = [r[:n, 0] for r, n in zip(resps, (0, 4, 12))]
    kw.update(ras=True, prefix_list=prefix)
    a = model.generate(text, proms, generator=torch.Generator().manual_seed(0), **kw)
    b = model.generate(text, proms, generator=torch.Generator().manual_seed(0), use_cache=False, **kw)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # deterministic, cached == recomputed
    for o in a:
        share = (o == 7).float().mean()
        assert 0.2 < share < 0.95, share  # RAS replaced repeated draws with plain random ones


def test_stop_token_survives_top_k_and_top_p():
    logits = torch.tensor([[5.0, 4.5, 0.0, 4.0]])  # token 3 plays the stop token
    g = torch.Generator().manual_seed(0)
    for kw in (dict(top_k=1), dict(top_p=0.3), dict(top_k=2, top_p=0.1)):
        draws = {sample_logits(logits, 1.0, generator=g, keep_token=3, **kw).item() for _ in range(100)}
        assert draws == {0, 3}, kw  # only the filtered set plus the stop token
    # a model whose stop token is only the second choice stops although top_k=1 alone would exclude it
    model = _looping_ar(stop_bias=7.5)
    text, proms, _ = make_batch(LENS, seed=7)
    out = model.generate(text, proms, max_steps=60, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert all(len(o) < 60 for o in out)


def test_length_guard_cuts_a_model_that_never_stops():
    model = _looping_ar(stop_bias=-100.0, loop_bias=0.0)
    text, proms, _ = make_batch(LENS, seed=8)
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(0)
        out = model.generate(text, proms, max_steps=20, max_lens=[3, 0, 50], generator=g, use_cache=use_cache)
        assert [len(o) for o in out] == [3, 0, 20]  # each cut at min(its limit, max_steps)
        assert all(int(o.max()) < model.stop_token for o in out if len(o))


def test_positions_stay_float32_in_half_precision_models():
    """Half-precision models compute the sinusoid frequencies in float32 (no castable buffer)."""
    torch.manual_seed(0)
    model = get_model("ar-tiny")
    ref = model._positions(1500)
    half = model.to(torch.bfloat16)
    assert not any(b.is_floating_point() for b in half.buffers())
    torch.testing.assert_close(half._positions(1500), ref.to(torch.bfloat16), rtol=0, atol=0)

@pytest.mark.parametrize("with_prefix", [False, True])
def test_greedy_cache_equals_recompute(ar, with_prefix):
    text, proms, resps = make_batch(LENS, seed=1)
    prefix = [r[:n, 0] for r, n in zip(resps, (5, 0, 3))] if with_prefix else None
    kw = dict(max_steps=25, temperature=0.0, prefix_list=prefix)
    cached = ar.generate(text, proms, **kw)
    recomputed = ar.generate(text, proms, use_cache=False, **kw)
    assert all(torch.equal(a, b) for a, b in zip(cached, recomputed))
    assert all(len(c) > 0 for c in cached)


def test_sampled_cache_equals_recompute(ar):
    text, proms, _ = make_batch(LENS, seed=2)
    kw = dict(max_steps=20, temperature=1.0, top_k=50, top_p=0.9)
    a = ar.generate(text, proms, generator=torch.Generator().manual_seed(3), **kw)
    b = ar.generate(text, proms, generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_batched_equals_single(ar):
    text, proms, resps = make_batch(LENS, seed=3)
    prefix = [r[:n, 0] for r, n in zip(resps, (2, 6, 0))]
    batched = ar.generate(text, proms, max_steps=30, temperature=0.0, prefix_list=prefix)
    for i in range(len(LENS)):
        one = slice(i, i + 1)
        alone = ar.generate(text[one], proms[one], max_steps=30, temperature=0.0, prefix_list=prefix[one])
        assert torch.equal(batched[i], alone[0])


def test_per_sample_generators_make_a_sample_independent_of_its_batch(ar, nar):
    """One generator and one set of options per sample: each sample draws what it draws alone."""
    text, proms, resps = make_batch(LENS, seed=6)
    prefix = [r[:n, 0] for r, n in zip(resps, (4, 0, 2))]
    opts = dict(temperature=[1.0, 0.8, 0.0], top_k=[0, 40, 0], top_p=[0.9, 1.0, 1.0], ras=[True, False, True],
                ras_threshold=[0.1, 0.1, 0.2])
    gens = lambda: [torch.Generator().manual_seed(s) for s in (11, 12, 13)]  # noqa: E731
    batched = ar.generate(text, proms, max_steps=24, generator=gens(), prefix_list=prefix, max_lens=[24, 9, 24], **opts)
    for i, gen in enumerate(gens()):
        one = slice(i, i + 1)
        alone = ar.generate(text[one], proms[one], max_steps=24, generator=gen, prefix_list=prefix[one],
                            max_lens=[(24, 9, 24)[i]], **{k: v[i] for k, v in opts.items()})
        assert torch.equal(batched[i], alone[0]), f"sample {i} depends on its batch"
    assert len(batched[1]) <= 9
    # the same samples beside other company: unchanged
    swapped = ar.generate(text[::-1], proms[::-1], max_steps=24, generator=gens()[::-1], prefix_list=prefix[::-1],
                          max_lens=[24, 9, 24][::-1], **{k: v[::-1] for k, v in opts.items()})
    assert all(torch.equal(a, b) for a, b in zip(batched, swapped[::-1]))
    with pytest.raises(ValueError, match="top_p has 2 entries for 3 samples"):
        ar.generate(text, proms, max_steps=3, top_p=[0.9, 0.9])

    known = [r[:, 0] for r in resps]
    filled = nar.generate(text, proms, known, temperature=[0.5, 1.0, 0.0], generator=gens())
    for i, gen in enumerate(gens()):
        alone = nar.generate(text[i : i + 1], proms[i : i + 1], known[i : i + 1], temperature=(0.5, 1.0, 0.0)[i],
                             generator=gen)[0]
        assert torch.equal(alone, filled[i])


def test_ignore_stop_and_stop_token(ar):
    text, proms, _ = make_batch(LENS, seed=4)
    g = torch.Generator().manual_seed(0)
    out = ar.generate(text, proms, max_steps=17, temperature=1.0, ignore_stop=True, generator=g)
    assert [len(o) for o in out] == [17, 17, 17]
    assert all(int(o.max()) < ar.stop_token for o in out)
    # a model that always prefers the stop token returns empty responses
    model = get_model("ar-tiny")
    with torch.no_grad():
        model.classifier.bias[model.stop_token] = 100.0
    assert [len(o) for o in model.generate(text, proms, max_steps=5, temperature=0.0)] == [0, 0, 0]
    assert model.training  # generate restores the training flag


def test_nar_generate(nar):
    text, proms, resps = make_batch(LENS, seed=5)
    out = nar.generate(text, proms, [r[:, 0] for r in resps])
    assert [tuple(o.shape) for o in out] == [(r, 8) for _, _, r in LENS]
    assert all(torch.equal(o[:, 0], r[:, 0]) for o, r in zip(out, resps))
    assert all(int(o.max()) < 1024 and int(o.min()) >= 0 for o in out)
    out3 = nar.generate(text, proms, [r[:, :3] for r in resps], max_levels=5)
    assert [tuple(o.shape) for o in out3] == [(r, 5) for _, _, r in LENS]
    assert all(torch.equal(o[:, :3], r[:, :3]) for o, r in zip(out3, resps))
    # greedy generation in a batch equals one sample at a time
    for i in range(len(LENS)):
        alone = nar.generate(text[i : i + 1], proms[i : i + 1], [resps[i][:, 0]])[0]
        assert torch.equal(alone, out[i])


# ---------------------------------------------------------------------------------------------
# learning: tiny models memorize two utterances


def _two_utterances():
    g = torch.Generator().manual_seed(1234)
    text = [torch.randint(1, 256, (12,), generator=g) for _ in range(2)]
    proms = [torch.randint(0, 1024, (40, 8), generator=g) for _ in range(2)]
    resps = [torch.randint(0, 1024, (n, 8), generator=g) for n in (50, 42)]
    return text, proms, resps


@pytest.mark.parametrize("arch", ["enhuiz", "paper"])
def test_tiny_ar_overfits_two_utterances(arch):
    torch.manual_seed(0)
    text, proms, resps = _two_utterances()
    model = get_model("ar-tiny", p_dropout=0.0, arch=arch).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(1, 601):
        opt.zero_grad(set_to_none=True)
        out = model(text, proms, resps)
        out.loss.backward()
        opt.step()
        if step % 50 == 0 and out.stats["acc"] == 1.0:
            generated = model.generate(text, proms, max_steps=80, temperature=0.0)
            if all(torch.equal(g, r[:, 0]) for g, r in zip(generated, resps)):
                break
    generated = model.generate(text, proms, max_steps=80, temperature=0.0)
    # exact codes, and each sample stops at its own length (50 and 42)
    assert [len(g) for g in generated] == [50, 42]
    assert all(torch.equal(g, r[:, 0]) for g, r in zip(generated, resps))


@pytest.mark.parametrize("arch", ["enhuiz", "paper"])
def test_tiny_nar_overfits_two_utterances(arch):
    torch.manual_seed(0)
    text, proms, resps = _two_utterances()
    model = get_model("nar-tiny", p_dropout=0.0, arch=arch).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    levels = torch.arange(1, 8)

    def accuracy() -> float:
        hits = total = 0
        with torch.no_grad():
            for level in levels:
                logits = model.logits(text, proms, resps, torch.full((2,), int(level)))
                for lg, r in zip(logits, resps):
                    hits += int((lg.argmax(-1) == r[:, level]).sum())
                    total += len(r)
        return hits / total

    # every level of both utterances in each step: the 7 levels as 14 samples
    batch = [x for x in (text, proms, resps)]
    rep = [[x[i] for _ in levels for i in range(2)] for x in batch]
    quant_levels = levels.repeat_interleave(2)
    acc = 0.0
    for step in range(1, 801):
        opt.zero_grad(set_to_none=True)
        model(*rep, quant_levels=quant_levels).loss.backward()
        opt.step()
        if step % 50 == 0:
            acc = accuracy()
            if acc >= 0.95:
                break
    assert acc >= 0.95


def test_cpu_dropout():
    from vall_e.base import dropout

    torch.manual_seed(0)
    x = torch.ones(200, 500, requires_grad=True)
    y = dropout(x, 0.1, training=True)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.005
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.9))
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept)
    assert dropout(x, 0.1, training=False) is x
    torch.manual_seed(1)
    a = dropout(x, 0.3, True)
    torch.manual_seed(1)
    assert torch.equal(a, dropout(x, 0.3, True))  # seeded by the global generator
