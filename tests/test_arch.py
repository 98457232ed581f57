"""The two model cores: ``arch=paper`` (prefix LM, tied heads, shared acoustic tables, separate positions)
and ``arch=enhuiz`` (the reference's core, which must stay exactly what it was)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vall_e.models import build_model, get_model

from conftest import REPO
from test_models import make_batch

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_models.json"
# the fixture's batch: (t_text, t_prom, t_resp) per sample, phone ids below 64
FIXTURE_LENS = [(7, 20, 15), (12, 9, 30)]
FIXTURE_MODELS = ("ar-tiny", "nar-tiny", "paper-ar-tiny", "paper-nar-tiny")


def _digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.contiguous().numpy().tobytes())
    return h.hexdigest()


def _fixed_model(name: str) -> torch.nn.Module:
    """``ar-tiny``/``nar-tiny`` (enhuiz) or ``paper-ar-tiny``/``paper-nar-tiny``, seeded, 64 phone ids."""
    torch.manual_seed(1234)
    arch = "paper" if name.startswith("paper-") else "enhuiz"
    return get_model(name.removeprefix("paper-"), n_text_tokens=64, arch=arch).eval()


@torch.no_grad()
def _record(name: str) -> dict:
    """What the fixture keeps of a fixed-seed model: parameter names and shapes, a digest of the initial
    weights, a few logits, and greedy (and for the AR sampled, RAS) generations."""
    model = _fixed_model(name)
    rec = {"state_dict": {k: list(v.shape) for k, v in model.state_dict().items()}, "init_sha256": _digest(model)}
    text, proms, resps = make_batch(FIXTURE_LENS, seed=5, n_text=64)
    if model.kind == "ar":
        logits = model.logits(text, proms, resps)
        gen = model.generate(text, proms, max_steps=12, temperature=0.0, prefix_list=[r[:5, 0] for r in resps])
        rec["greedy"] = [g.tolist() for g in gen]
        g = torch.Generator().manual_seed(7)
        sampled = model.generate(text, proms, max_steps=12, temperature=1.0, top_p=0.9, generator=g, ras=True)
        rec["sampled"] = [s.tolist() for s in sampled]
    else:
        logits = model.logits(text, proms, resps, torch.tensor([3, 5]))
        rec["greedy"] = [g[:6].tolist() for g in model.generate(text, proms, [r[:, :1] for r in resps], temperature=0.0)]
    rec["logits_head"] = [[round(float(x), 5) for x in lg[:3, :4].flatten()] for lg in logits]
    return rec


@pytest.mark.parametrize("name", FIXTURE_MODELS)
def test_models_are_unchanged(name):
    """Both cores stay what they were when the fixture was recorded (the enhuiz entries before the paper
    core existed): names, shapes, initialization, logits and generations. Regenerate the fixture only for
    a deliberate change: ``python tests/test_arch.py``."""
    want = json.loads(FIXTURE.read_text())[name]
    got = _record(name)
    for key in ("state_dict", "init_sha256", "greedy", "sampled"):
        assert got.get(key) == want.get(key), key
    for lg, head in zip(got["logits_head"], want["logits_head"]):
        torch.testing.assert_close(torch.tensor(lg), torch.tensor(head), atol=1e-4, rtol=0)


def test_old_enhuiz_export_loads_and_synthesizes(tmp_path):
    """An export written before ``arch`` existed (its hparams lack the field) loads as enhuiz and decodes
    the fixture's codes; the synthesizer runs on it end to end."""
    from vall_e.export import FORMAT_TAG, FORMAT_VERSION
    from vall_e.inference import Synthesizer, load_model

    fx = json.loads(FIXTURE.read_text())
    from vall_e.emb import g2p

    phone_map = {"<s>": 1, "</s>": 2} | {p: i for i, p in enumerate(sorted(set(g2p.encode("a cat"))), start=3)}
    paths = {}
    for kind in ("ar", "nar"):
        model = _fixed_model(f"{kind}-tiny")
        hparams = dict(model.hparams)
        hparams.pop("arch")  # as exports made before the paper core
        data = {
            "format": FORMAT_TAG, "format_version": FORMAT_VERSION, "version": "0.1.0", "trained_with": "0.1.0",
            "kind": kind, "preset": f"{kind}-tiny", "hparams": hparams, "phone_map": phone_map, "speakers": ["s"],
            "step": 30, "max_frames_per_phone": 20.0, "prompt_mode": "speaker", "checkpoint": "old",
            "state_dict": model.state_dict(),
        }  # fmt: skip
        paths[kind] = tmp_path / f"{kind}.pt"
        torch.save(data, paths[kind])
    ar, meta = load_model(paths["ar"], "ar")
    assert ar.config.arch == "enhuiz" and "classifier.weight" in ar.state_dict()
    text, proms, resps = make_batch(FIXTURE_LENS, seed=5, n_text=64)
    gen = ar.generate(text, proms, max_steps=12, temperature=0.0, prefix_list=[r[:5, 0] for r in resps])
    assert [g.tolist() for g in gen] == fx["ar-tiny"]["greedy"]

    import numpy as np
    import soundfile as sf

    ref = tmp_path / "ref.wav"
    t = np.arange(24000) / 24000
    sf.write(ref, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 24000)
    synth = Synthesizer(paths["ar"], paths["nar"], device="cpu", codec_weights="untrained")
    out = synth.synthesize("a cat", ref, max_ar_steps=20, seed=0)
    assert out.wav.numel() > 0 and torch.isfinite(out.wav).all()


def test_prefix_attention():
    """Under paper a phone's hidden state depends on later phones (and, in speaker mode, on the prompt);
    under enhuiz it does not. The response stays causal in both."""
    text, proms, resps = make_batch([(9, 6, 10)], seed=3)
    for arch in ("paper", "enhuiz"):
        torch.manual_seed(0)
        model = get_model("ar-tiny", arch=arch).eval()

        def hidden(text, proms, resps):
            emb = model._embed_response(resps[0][:, :1])
            return model._hidden(text, proms, emb, [len(resps[0])])[0][0]

        with torch.no_grad():
            base = hidden(text, proms, resps)
            later_phone = [text[0].clone()]
            later_phone[0][-1] = (later_phone[0][-1] + 1) % 255 + 1
            h_phone = hidden(later_phone, proms, resps)
            other_prompt = [proms[0].roll(1, 0)]
            h_prompt = hidden(text, other_prompt, resps)
            last_code = [resps[0].clone()]
            last_code[0][-1, 0] = (last_code[0][-1, 0] + 1) % 1024
            h_code = hidden(text, proms, last_code)
        first_phone_moved = not torch.allclose(base[0], h_phone[0])
        assert first_phone_moved == (arch == "paper"), arch
        assert (not torch.allclose(base[0], h_prompt[0])) == (arch == "paper"), arch
        # nothing before the last frame sees the last frame, in either core
        assert torch.allclose(base[:-1], h_code[:-1], atol=1e-6), arch


def test_paper_positions_count_audio_from_zero():
    """An audio frame's position does not depend on the text length under paper."""
    torch.manual_seed(0)
    model = get_model("ar-tiny", arch="paper")
    ids = model._position_ids(4, 10).tolist()
    assert ids == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    assert get_model("ar-tiny")._position_ids(4, 10).tolist() == list(range(10))


@pytest.mark.parametrize("arch", ["paper", "enhuiz"])
@pytest.mark.parametrize("mode", ["speaker", "paper"])
def test_cache_equals_recompute(arch, mode):
    """Greedy and sampled decoding with the KV cache equal recomputing the sequence, batched with
    different lengths and alone, in both prompt modes (paper mode: empty prompts, the reference's codes as prefix)."""
    torch.manual_seed(0)
    model = get_model("ar-tiny", arch=arch).eval()
    lens = [(7, 20, 15), (12, 9, 30), (3, 14, 4)] if mode == "speaker" else [(7, 0, 15), (12, 0, 30), (3, 0, 6)]
    text, proms, resps = make_batch(lens)
    prefixes = [None, [r[:4, 0] for r in resps]] if mode == "speaker" else [[r[:4, 0] for r in resps]]
    for prefix in prefixes:
        for batch in (slice(0, 3), slice(1, 2)):
            args = (text[batch], proms[batch])
            pre = None if prefix is None else prefix[batch]
            kw = dict(max_steps=12, prefix_list=pre, ignore_stop=True)
            a = model.generate(*args, temperature=0.0, **kw)
            b = model.generate(*args, temperature=0.0, use_cache=False, **kw)
            assert [x.tolist() for x in a] == [x.tolist() for x in b]
            ga, gb = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
            a = model.generate(*args, temperature=1.0, generator=ga, **kw)
            b = model.generate(*args, temperature=1.0, generator=gb, use_cache=False, **kw)
            assert [x.tolist() for x in a] == [x.tolist() for x in b]


def test_paper_heads_are_the_embedding_tables():
    """The AR scores against codebook 1's table, the NAR's level-l head against level l's table: no
    classifier parameter exists, and changing a table row changes that code's logit only at that level."""
    torch.manual_seed(0)
    ar = get_model("ar-tiny", arch="paper").eval()
    nar = get_model("nar-tiny", arch="paper").eval()
    for model in (ar, nar):
        names = [n for n, _ in model.named_parameters()]
        assert "audio_emb.weight" in names and not any("classifier" in n or "prom_emb" in n or "resp_emb" in n for n in names)
    assert ar.audio_emb.weight.shape == (8, 1025, 64) and nar.audio_emb.weight.shape == (8, 1024, 64)
    text, proms, resps = make_batch([(5, 6, 7), (6, 4, 9)], seed=2)
    with torch.no_grad():
        before = nar.logits(text, proms, resps, torch.tensor([3, 3]))
        assert not any((p[:, 3] == 17).any() for p in proms)  # the prompts do not embed level 3's row 17
        bump = torch.randn(64)  # not a constant: a normalized hidden state is orthogonal to (1, ..., 1)
        nar.audio_emb.weight[3, 17] += bump
        after = nar.logits(text, proms, resps, torch.tensor([3, 3]))
        nar.audio_emb.weight[3, 17] -= bump
    changed = torch.cat([(a - b).abs().amax(0) for a, b in zip(after, before)]).view(2, -1).amax(0)
    # the responses embed levels 0..2 only, so only code 17's own logit moves
    assert changed[17] > 1e-3 and changed[torch.arange(1024) != 17].max() < 1e-6
    # one training step moves that single table through both uses
    ar.train()
    ar(text, proms, resps).loss.backward()
    assert ar.audio_emb.weight.grad[0].abs().sum() > 0  # codebook 1: embedding and head
    assert ar.audio_emb.weight.grad[1:, :1024].abs().sum() > 0  # prompt levels


def test_nar_batched_levels_equal_one_level():
    """The per-sample tied heads (one batched matmul) equal the single-level matmul generation uses."""
    torch.manual_seed(0)
    nar = get_model("nar-tiny", arch="paper").eval()
    text, proms, resps = make_batch([(5, 6, 7), (6, 4, 9), (3, 5, 2)], seed=2)
    with torch.no_grad():
        mixed = nar.logits(text, proms, resps, torch.tensor([1, 4, 7]))
        for i, level in enumerate((1, 4, 7)):
            alone = nar.logits(text[i : i + 1], proms[i : i + 1], resps[i : i + 1], torch.tensor([level]))[0]
            torch.testing.assert_close(mixed[i], alone, atol=1e-5, rtol=1e-5)


def test_hparams_record_arch_and_old_ones_mean_enhuiz():
    model = get_model("nar-tiny", arch="paper")
    assert model.hparams["arch"] == "paper"
    assert build_model(json.loads(json.dumps(model.hparams))).config.arch == "paper"
    old = dict(get_model("nar-tiny").hparams)
    del old["arch"]
    assert build_model(old).config.arch == "enhuiz"
    from vall_e.train import _architecture_differences

    assert _architecture_differences(old, get_model("nar-tiny").hparams) == []
    assert _architecture_differences(old, model.hparams) == ["arch: 'enhuiz' -> 'paper'"]
    with pytest.raises(ValueError, match="arch='gpt'"):
        get_model("ar-tiny", arch="gpt")


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_tied_table_survives_engine_checkpoint_and_export(tmp_path, zero_stage):
    """One parameter after DeepSpeed wraps the model (ZeRO 0 and 3), through a training step, a
    checkpoint, ``vall_e.export`` and a reload: the exported logits equal the engine's."""
    script = textwrap.dedent(
        f"""
        import sys
        import torch
        from vall_e.config import Config
        from vall_e.models import get_model
        from vall_e.utils import distributed
        from vall_e.utils.engines import build_engine
        from vall_e.utils.trainer import Trainer, TrainState
        sys.path.insert(0, "tests")
        from test_models import make_batch

        cfg = Config.parse(["ckpt_root={tmp_path / 'ckpts'}", "device=cpu", "zero_stage={zero_stage}", "model=ar-tiny",
                            "arch=paper", "batch_size=2"])
        distributed.init_distributed("cpu")
        torch.manual_seed(0)
        model = get_model("ar-tiny", arch="paper", p_dropout=0.0)
        engine = build_engine(cfg, model)
        params = [p for g in engine.optimizer.param_groups for p in g["params"]]
        names = [n for n, _ in engine.module.named_parameters()]
        assert names.count("audio_emb.weight") == 1 and not any("classifier" in n for n in names), names
        text, proms, resps = make_batch([(5, 0, 9), (7, 0, 6)], seed=1)
        out = engine(text, proms, resps)
        engine.backward(out.loss)
        engine.step()
        engine.eval()
        with torch.no_grad():
            logits = torch.cat(engine.module.logits(text, proms, resps)) if {zero_stage} == 0 else None
        extra = {{"phone_map": {{"<s>": 1, "</s>": 2, "AH0": 3}}, "speakers": ["s"], "model": "ar-tiny",
                  "hparams": engine.module.hparams}}
        Trainer(cfg, engine, make_loader=lambda n: [], evaluate=lambda s: None, state=TrainState(step=1, extra=extra)).save()
        if logits is not None:
            torch.save(logits, "{tmp_path / 'logits.pt'}")
        torch.save((text, proms, resps), "{tmp_path / 'batch.pt'}")
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    from vall_e.export import export
    from vall_e.inference import load_model

    data = export(tmp_path / "ar.pt", tmp_path / "ckpts" / "default")
    assert data["hparams"]["arch"] == "paper"
    assert [k for k in data["state_dict"] if "audio_emb" in k or "classifier" in k] == ["audio_emb.weight"]
    model, _ = load_model(tmp_path / "ar.pt", "ar")
    text, proms, resps = torch.load(tmp_path / "batch.pt", weights_only=True)
    with torch.no_grad():
        logits = torch.cat(model.logits(text, proms, resps))
    if zero_stage == 0:
        torch.testing.assert_close(logits, torch.load(tmp_path / "logits.pt", weights_only=True))
    # the reloaded head is the reloaded table
    with torch.no_grad():
        model.audio_emb.weight[0, 5] += torch.randn(64)
        moved = torch.cat(model.logits(text, proms, resps)) - logits
    assert moved[:, 5].abs().max() > 1e-3


if __name__ == "__main__":  # rewrite the fixture (only for a deliberate change of a core)
    torch.set_num_threads(1)
    FIXTURE.write_text(json.dumps({name: _record(name) for name in FIXTURE_MODELS}, indent=1) + "\n")
