"""VALL-E 2 grouped code modeling (``group_size`` G): the AR reads and predicts G frames per position.

What is checked: G = 1 adds nothing; tiny grouped ARs overfit data/test's real codes (greedy continuation
reproduces them and stops in the right group); every length remainder mod G; the stop token in any slot;
the KV cache against recomputation at G = 1, 2, 4; RAS per code inside a group; prompts and prefixes cut
to whole groups; and a grouped model going through export, synthesis, the server's engine, init_from and
the CLI's help. (That G = 1 outputs are bit for bit what they were is tests/test_arch.py's fixture test.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from vall_e.ar import sample_group, whole_groups
from vall_e.base import IGNORE, ModelConfig
from vall_e.models import get_model

from conftest import REPO
from test_models import make_batch

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = ("paper", "enhuiz")


def _data_test() -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """data/test's two utterances as a paper-mode AR batch: ``<s> phones </s>`` ids, empty prompts, ``(t, 8)`` codes
    (155 and 118 frames: remainders 1 and 0 mod 2, 3 and 2 mod 4)."""
    phones, codes = [], []
    for name in ("test", "test2"):
        phones.append((REPO / "data" / "test" / f"{name}.phn.txt").read_text().split())
        codes.append(torch.load(REPO / "data" / "test" / f"{name}.qnt.pt", weights_only=True)[0].t().long())
    ids = {p: i for i, p in enumerate(sorted({p for ph in phones for p in ph}), start=3)}
    text = [torch.tensor([1] + [ids[p] for p in ph] + [2]) for ph in phones]
    return text, [c[:0] for c in codes], codes


# ---------------------------------------------------------------------------------------------
# the model


def test_group_size_one_adds_nothing_and_grouping_adds_two_layers():
    """G = 1 has today's parameters; G > 1 adds the group embedding and prediction layers only, and its
    shared layers start exactly as the G = 1 model's under the same seed."""
    for arch in ARCHS:
        torch.manual_seed(0)
        plain = get_model("ar-tiny", arch=arch)
        torch.manual_seed(0)
        one = get_model("ar-tiny", arch=arch, group_size=1)
        torch.manual_seed(0)
        two = get_model("ar-tiny", arch=arch, group_size=2)
        assert plain.hparams["group_size"] == one.hparams["group_size"] == 1 and two.hparams["group_size"] == 2
        assert list(one.state_dict()) == list(plain.state_dict())
        assert all(torch.equal(v, plain.state_dict()[k]) for k, v in one.state_dict().items())
        added = {k: tuple(v.shape) for k, v in two.state_dict().items() if k not in plain.state_dict()}
        assert added == {"group_emb.weight": (64, 128), "group_out.weight": (64, 128), "group_out.bias": (128,)}
        assert all(torch.equal(plain.state_dict()[k], v) for k, v in two.state_dict().items() if k in plain.state_dict())
    with pytest.raises(ValueError, match="the NAR"):
        get_model("nar-tiny", group_size=2)
    with pytest.raises(ValueError, match="group_size=0"):
        ModelConfig(kind="ar", group_size=0)


@pytest.mark.parametrize("g", [2, 3, 4])
def test_every_remainder_gives_its_frames(g):
    """A response of T frames, for every T mod G: the targets are the codes, the stop token in slot T % G of
    group T // G, then IGNORE; logits() gives T + 1 rows; the loss is the mean over exactly those rows; and
    the length guard and max_steps cut generation at exactly T frames."""
    torch.manual_seed(0)
    model = get_model("ar-tiny", arch="paper", group_size=g).eval()
    lengths = list(range(3 * g, 4 * g))  # every remainder
    text, proms, resps = make_batch([(5, 7, t) for t in lengths], seed=1)
    with torch.no_grad():
        _, targets, rows, scored = model._response_logits(text, proms, resps)
        logits = model.logits(text, proms, resps)
        loss = model(text, proms, resps).loss
    assert rows == [(t // g + 1) * g for t in lengths] and scored == [t + 1 for t in lengths]
    for t, tg, r in zip(lengths, targets.split(rows), resps):
        assert torch.equal(tg[:t], r[:, 0]) and tg[t] == model.stop_token
        assert (tg[t + 1 :] == IGNORE).all() and len(tg) - t - 1 == g - 1 - t % g
    assert [len(lg) for lg in logits] == [t + 1 for t in lengths]
    want = torch.nn.functional.cross_entropy(
        torch.cat(logits), torch.cat([torch.cat([r[:, 0], torch.tensor([model.stop_token])]) for r in resps])
    )
    torch.testing.assert_close(loss, want)
    prefix = [r[: g, 0] for r in resps]
    guarded = model.generate(text, proms, max_steps=100, prefix_list=prefix, ignore_stop=True,
                             max_lens=lengths, temperature=0.0)
    assert [len(x) for x in guarded] == lengths
    for t in lengths:
        assert len(model.generate(text[:1], proms[:1], max_steps=t, ignore_stop=True, temperature=0.0)[0]) == t


@pytest.mark.parametrize("arch", ARCHS)
def test_stop_in_any_slot_ends_the_output_there(arch):
    """A stop token drawn in slot j ends the sample after j frames of that group; the group's later slots are
    dropped. The head is biased so slot j scores the stop token far above everything (slots before it far below)."""
    g = 4
    text, proms, resps = make_batch([(5, 9, 12), (8, 0, 16)], seed=2)
    prefix = [r[:g, 0] for r in resps]
    for j in range(g):
        torch.manual_seed(0)
        model = get_model("ar-tiny", arch=arch, group_size=g).eval()
        _push_stop(model, j)
        for cache in (True, False):
            out = model.generate(text, proms, max_steps=40, temperature=0.0, prefix_list=prefix, use_cache=cache)
            assert [len(x) for x in out] == [j, j], j
            assert all((x != model.stop_token).all() for x in out)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("g", [1, 2, 4])
@pytest.mark.parametrize("mode", ["speaker", "paper"])
def test_cache_equals_recompute(arch, g, mode):
    """Greedy, sampled and RAS decoding with the KV cache (one group per step) equal recomputing the sequence,
    batched with different lengths (left padding) and alone, with and without prefixes of whole groups;
    prompts of odd lengths (their last frames cut)."""
    torch.manual_seed(0)
    model = get_model("ar-tiny", arch=arch, group_size=g).eval()
    lens = [(7, 21, 15), (12, 9, 30), (3, 14, 9)] if mode == "speaker" else [(7, 0, 15), (12, 0, 30), (3, 0, 9)]
    text, proms, resps = make_batch(lens)
    prefixes = [None, [r[: whole_groups(2 * g if i else 0, g), 0] for i, r in enumerate(resps)]]
    for prefix in prefixes:
        for batch in (slice(0, 3), slice(1, 2)):
            args = (text[batch], proms[batch])
            kw = dict(max_steps=13, prefix_list=None if prefix is None else prefix[batch], ignore_stop=True)
            a = model.generate(*args, temperature=0.0, **kw)
            b = model.generate(*args, temperature=0.0, use_cache=False, **kw)
            assert [x.tolist() for x in a] == [x.tolist() for x in b]
            assert [len(x) for x in a] == [13] * len(a)
            for ras in (False, True):
                ga, gb = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
                a = model.generate(*args, temperature=1.0, top_p=0.9, generator=ga, ras=ras, **kw)
                b = model.generate(*args, temperature=1.0, top_p=0.9, generator=gb, ras=ras, use_cache=False, **kw)
                assert [x.tolist() for x in a] == [x.tolist() for x in b]


def test_prefix_must_be_whole_groups_and_prompt_tails_are_left_out():
    torch.manual_seed(0)
    model = get_model("ar-tiny", arch="paper", group_size=2).eval()
    text, proms, resps = make_batch([(5, 21, 8)], seed=3)
    with pytest.raises(ValueError, match="3 frames, not whole groups of this AR's group_size=2: give its first 2"):
        model.generate(text, proms, max_steps=4, prefix_list=[resps[0][:3, 0]])
    with torch.no_grad():
        base = model.logits(text, proms, resps)[0]
        tail = [proms[0].clone()]
        tail[0][20] = (tail[0][20] + 1) % 1024  # the 21st frame: not a whole group, left out
        inside = [proms[0].clone()]
        inside[0][19] = (inside[0][19] + 1) % 1024
        assert torch.equal(model.logits(text, tail, resps)[0], base)
        assert not torch.allclose(model.logits(text, inside, resps)[0], base)


# ---------------------------------------------------------------------------------------------
# learning: data/test's real codes


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("g", [2, 4])
def test_tiny_grouped_ar_overfits_data_test(arch, g):
    """A tiny AR at G = 2 and 4 learns data/test's two utterances (paper prompt mode): greedy continuation
    after whole groups of their beginning reproduces every remaining code, and the stop token lands in the
    last group, in slot T % G (the lengths come out exact: 155 and 118 frames). About 100 steps."""
    torch.manual_seed(0)
    text, proms, resps = _data_test()
    model = get_model("ar-tiny", p_dropout=0.0, arch=arch, group_size=g, n_text_tokens=64).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    prefix = [r[: whole_groups(40, g), 0] for r in resps]

    def continuation() -> list[torch.Tensor]:
        return model.generate(text, proms, max_steps=200, temperature=0.0, prefix_list=prefix)

    for step in range(1, 401):
        opt.zero_grad(set_to_none=True)
        model(text, proms, resps).loss.backward()
        opt.step()
        if step % 50 == 0 and all(torch.equal(c, r[len(p) :, 0]) for c, r, p in zip(continuation(), resps, prefix)):
            break
    out = continuation()
    assert [len(p) + len(c) for p, c in zip(prefix, out)] == [155, 118]
    assert all(torch.equal(c, r[len(p) :, 0]) for c, r, p in zip(out, resps, prefix))
    with torch.no_grad():  # the stop token is the greedy choice of slot T % G of group T // G
        for lg, r in zip(model.logits(text, proms, resps), resps):
            assert lg[len(r)].argmax() == model.stop_token and (lg[: len(r)].argmax(-1) != model.stop_token).all()


# ---------------------------------------------------------------------------------------------
# repetition-aware sampling


def test_ras_checks_each_code_against_the_frames_before_it():
    """Within a group, slot 1's window holds slot 0's code; across groups the window slides on (frame f goes to
    slot f % K). Greedy logits that pick code 5 in both slots, with one 5 already in the K = 10 window: slot 0
    keeps it (ratio 0.1, not above 0.1), slot 1 sees two and is redrawn from the plain distribution."""
    rows, window = 200, 10
    logits = torch.full((rows, 2, 1025), -30.0)
    logits[:, :, 5] = 1.0
    logits[:, :, 7] = 1.0 - 1e-3  # the fallback's other likely code
    history = torch.full((rows, window), -1, dtype=torch.long)
    history[:, 3] = 5
    g = torch.Generator().manual_seed(0)
    codes = sample_group(logits, 0.0, generator=g, keep_token=1024, history=history, first_frame=8, ras_threshold=0.1)
    assert (codes[:, 0] == 5).all()
    assert (codes[:, 1] == 7).any() and (codes[:, 1] == 5).any()
    assert torch.equal(history[:, 8], codes[:, 0]) and torch.equal(history[:, 9], codes[:, 1])
    # the next group's slot 0 (frame 10) overwrites slot 0 of the window and sees the two codes just drawn
    nxt = sample_group(logits[:, :1].clone(), 0.0, generator=g, keep_token=1024, history=history, first_frame=10)
    assert torch.equal(history[:, 0], nxt[:, 0])
    seen_two = (codes == 5).all(1)  # rows whose window held three 5s before frame 10
    assert (nxt[seen_two, 0] != 5).any()


@pytest.mark.parametrize("arch", ARCHS)
def test_ras_at_group_size_two_is_deterministic_under_a_seed(arch):
    torch.manual_seed(0)
    model = get_model("ar-tiny", arch=arch, group_size=2).eval()
    text, proms, resps = make_batch([(6, 10, 20), (9, 14, 12)], seed=4)
    prefix = [r[:4, 0] for r in resps]

    def run(seed: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed)
        out = model.generate(text, proms, max_steps=30, temperature=1.0, top_p=0.8, generator=g, prefix_list=prefix,
                             ras=True, ignore_stop=True)
        return [x.tolist() for x in out]

    assert run(3) == run(3)
    assert run(3) != run(4)


# ---------------------------------------------------------------------------------------------
# everywhere a model goes


def _push_stop(model, slot: int) -> None:
    """Bias a grouped AR's head so slot ``slot`` scores the stop token far above everything else, the slots
    before it far below: every greedy group then ends after ``slot`` frames."""
    stop = model.stop_token
    direction = model.audio_emb.weight[0, stop] if model.paper else model.classifier.w[:, stop]
    push = direction / direction.norm() ** 2 * 200.0  # +200 on the stop logit of a slot
    d = model.config.d_model
    with torch.no_grad():
        for j in range(slot + 1):
            model.group_out.bias[j * d : (j + 1) * d] += push if j == slot else -push


def _export(tmp_path: Path, group_size: int, arch: str = "paper", stop_slot: int | None = None) -> dict[str, Path]:
    """Exported tiny AR (with ``group_size``; its head pushed to stop in ``stop_slot``) and NAR files whose
    phone map covers "a cat"."""
    from vall_e.emb import g2p
    from vall_e.export import FORMAT_TAG, FORMAT_VERSION

    phone_map = {"<s>": 1, "</s>": 2} | {p: i for i, p in enumerate(sorted(set(g2p.encode("a cat"))), start=3)}
    paths = {}
    for kind in ("ar", "nar"):
        torch.manual_seed(0)
        extra = {"group_size": group_size} if kind == "ar" else {}
        model = get_model(f"{kind}-tiny", n_text_tokens=64, arch=arch, **extra)
        if kind == "ar" and stop_slot is not None:
            _push_stop(model, stop_slot)
        data = {
            "format": FORMAT_TAG, "format_version": FORMAT_VERSION, "version": "0.1.0", "trained_with": "0.1.0",
            "kind": kind, "preset": f"{kind}-tiny", "hparams": model.hparams, "phone_map": phone_map, "speakers": ["s"],
            "step": 30, "max_frames_per_phone": 20.0, "prompt_mode": "speaker", "checkpoint": "test",
            "state_dict": model.state_dict(),
        }  # fmt: skip
        paths[kind] = tmp_path / f"{kind}-g{group_size}-{stop_slot}.pt"
        torch.save(data, paths[kind])
    return paths


def _ref_wav(tmp_path: Path, seconds: float = 1.5) -> Path:
    path = tmp_path / "ref.wav"
    t = np.arange(int(24000 * seconds)) / 24000
    sf.write(path, (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32), 24000)
    return path


def test_synthesis_and_the_server_engine_follow_the_files_group_size(tmp_path):
    """An export records group_size; the synthesizer builds that AR and cuts prompts and prefixes to whole
    groups (1 s = 75 frames -> 74 at G = 2); the server's per-row engine batches a grouped AR and a row alone
    draws what the synthesizer draws with its seed; frame limits stay frames."""
    from vall_e.inference import Request, Synthesizer, load_model
    from vall_e.serving.engine import Row, Sampling, ServingSynthesizer

    paths = _export(tmp_path, 2)
    ar, meta = load_model(paths["ar"], "ar")
    assert meta["hparams"]["group_size"] == 2 and ar.group_size == 2
    ref = _ref_wav(tmp_path)
    synth = Synthesizer(paths["ar"], paths["nar"], device="cpu", codec_weights="untrained")
    assert synth.group_size == 2
    opts = dict(max_ar_steps=20, top_p=0.9, ras=True, prompt_seconds=1.0)  # a budget of 21 frames ends mid-group
    cont = synth.synthesize("a cat", ref, continual=True, seed=5, **opts)
    assert cont.prefix_frames == 74
    plain = synth.synthesize("a cat", ref, seed=5, **opts)
    assert plain.prefix_frames == 0 and len(plain.codes) == plain.max_frames == 20 and plain.cut == "max_ar_steps"
    assert len(synth._prepare(Request("a cat", ref), 1.0, 0, 1)["ar_prompt"]) == 74

    serving = ServingSynthesizer(paths["ar"], paths["nar"], device="cpu", codec_weights="untrained")
    sampling = Sampling(top_p=0.9, ras=True, max_ar_steps=20)
    rows = [serving.prepare(Row(Request("a cat", ref, continual=c), 5, sampling, prompt_seconds=1.0)) for c in (True, False)]
    batched = serving.generate(rows)
    alone = [serving.generate([row])[0] for row in rows]
    for out, want in zip(alone, (cont, plain)):
        assert torch.equal(out.codes, want.codes) and out.prefix_frames == want.prefix_frames and out.cut == want.cut
    assert [len(o.codes) for o in batched] == [len(o.codes) for o in alone]

    # an AR that stops in slot 1 of its first group: one frame, stopped by the model, in both engines
    stops = _export(tmp_path, 2, stop_slot=1)
    synth = Synthesizer(stops["ar"], stops["nar"], device="cpu", codec_weights="untrained")
    serving = ServingSynthesizer(stops["ar"], stops["nar"], device="cpu", codec_weights="untrained")
    rows = [serving.prepare(Row(Request("a cat", ref, continual=c), 5, sampling, prompt_seconds=1.0)) for c in (True, False)]
    for c, row in zip((True, False), serving.generate(rows)):
        want = synth.synthesize("a cat", ref, continual=c, seed=5, **opts)
        assert len(want.codes) == len(row.codes) == 1 and want.stopped and row.stopped


def test_init_from_refuses_another_group_size(tmp_path):
    from vall_e.config import Config
    from vall_e.train import _build_model, _load_init_from
    from vall_e.utils.engines import CheckpointError

    paths = _export(tmp_path, 1)
    cfg = Config.parse(["model=ar-tiny", "arch=paper", "group_size=2", "device=cpu", f"init_from={paths['ar']}"])
    model = _build_model(cfg)
    assert model.group_size == 2
    with pytest.raises(CheckpointError) as e:
        _load_init_from(cfg, model)
    msg = str(e.value)
    assert "holds a 'ar-tiny' model of another shape than this run builds" in msg
    assert "group_size: 1 -> 2" in msg and "model=ar-tiny arch=paper num_tokens=1024 group_size=1" in msg
    assert "from scratch" in msg
    nar_cfg = Config.parse(["model=nar-tiny", "group_size=2", "device=cpu"])
    assert _build_model(nar_cfg).group_size == 1  # the NAR has no grouping
    with pytest.raises(Exception, match="group_size=0"):
        Config.parse(["group_size=0", "device=cpu"])


def test_eval_prefix_is_whole_groups():
    from vall_e.train import _eval_prefix_frames

    for n in (60, 155, 401):
        plain = _eval_prefix_frames(n)
        for g in (2, 4):
            assert _eval_prefix_frames(n, g) == plain - plain % g


def test_help_states_the_models_grouping(tmp_path, capsys):
    from vall_e.__main__ import main

    paths = _export(tmp_path, 2)
    with pytest.raises(SystemExit) as e:
        main(["--help", "--ar-ckpt", str(paths["ar"]), "--nar-ckpt", str(paths["nar"])])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "model facts" in out
    assert f"--ar-ckpt {paths['ar']}: ar-tiny, arch paper, group_size 2 (VALL-E 2 grouped code modeling: 2 frames per AR step" in out
    assert f"--nar-ckpt {paths['nar']}: nar-tiny, arch paper, prompt_mode speaker" in out


def test_tensorboard_hyperparameters_show_an_ars_group_size():
    from vall_e.config import Config
    from vall_e.utils.monitor import hyperparameters

    assert hyperparameters(Config.parse(["model=ar-tiny", "group_size=2", "device=cpu"]))["group_size"] == 2
    assert "group_size" not in hyperparameters(Config.parse(["model=nar-tiny", "group_size=2", "device=cpu"]))


def test_benchmark_compares_group_sizes_in_one_run(capsys):
    """``scripts/benchmark.py --group-size 1,2`` (tiny, one quick run): both sizes' AR numbers with
    ``ar_ms_per_frame_cached_750``, the NAR's once, and the ratios to G = 1; greedy cache checks hold."""
    import json

    from conftest import load_script

    load_script("benchmark").main(["--preset", "tiny", "--quick", "--threads", "1", "--group-size", "1,2", "--arch", "paper"])
    out = json.loads(capsys.readouterr().out)
    sizes = out["by_group_size"]
    assert sorted(sizes) == ["1", "2"] and all(s["greedy_cache_match"] for s in sizes.values())
    assert sizes["2"]["group_size"] == 2 and sizes["2"]["ar_ms_per_frame_cached_750"] > 0
    ratio = out["over_group_size_1"]["2"]["ar_ms_per_frame_cached_750"]
    assert ratio == round(sizes["2"]["ar_ms_per_frame_cached_750"] / sizes["1"]["ar_ms_per_frame_cached_750"], 3)
    assert "nar_infer_s_10s" in out["nar"] and out["arch"] == "paper"
