"""``prompt_mode=paper``: the AR as a plain language model over one utterance, the NAR prompted by a
segment of the utterance itself; sampling, loss masking, training, export and synthesis."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from test_train import REPO, run_train, stats, write_cfg
from vall_e.config import Config
from vall_e.data import SEGMENT_FRAMES, load_data, sequence_lengths
from vall_e.models import get_model
from vall_e.sampler import BucketBatchSampler

# ----------------------------------------------------------------------------------------------
# sampling


def _sampler(prompt: str, counts=(1, 3, 40), **kw) -> tuple[BucketBatchSampler, np.ndarray]:
    rng = np.random.default_rng(0)
    starts = np.r_[0, np.cumsum(counts)]
    frames = rng.integers(60, 900, int(starts[-1]))
    own = frames + 40
    args = dict(batch_size=4, batch_frames=6000, bucket_batches=8, seed=3, prompt=prompt)
    args.update(kw)
    return BucketBatchSampler(np.arange(len(frames)), starts, own, frames, **args), frames


def test_paper_prompts_need_no_second_utterance_and_respect_the_budget():
    with pytest.raises(ValueError, match="two utterances"):
        _sampler("speaker")
    none, frames = _sampler("none")
    seg, _ = _sampler("segment")
    for k in range(200):
        batch = none.batch(k)
        assert batch and all(d.prompts == () and d.segment is None for d in batch)
        assert len(batch) * max(int(frames[d.index]) + 40 for d in batch) <= 6000
        batch = seg.batch(k)
        longest = 0
        for d in batch:
            start, length = d.segment
            n = int(frames[d.index])
            assert d.prompts == () and length == min(SEGMENT_FRAMES, n // 2) and 0 <= start <= n - length
            longest = max(longest, n + 40 + length)
        assert len(batch) * longest <= 6000
    # a pure function of (seed, rank, k): resume needs only k
    again, _ = _sampler("segment")
    assert again.batch(123) == seg.batch(123)
    # the speaker with a single utterance is drawn too
    assert any(d.index == 0 for k in range(300) for d in none.batch(k))


def test_nar_leaves_the_prompt_span_out_of_the_loss():
    torch.manual_seed(0)
    nar = get_model("nar-tiny").eval()
    text = [torch.randint(1, 20, (9,)), torch.randint(1, 20, (6,))]
    resps = [torch.randint(0, 1024, (40, 8)), torch.randint(0, 1024, (30, 8))]
    spans = [(5, 12), (0, 15)]
    proms = [r[s : s + n] for r, (s, n) in zip(resps, spans)]
    levels = torch.tensor([3, 5])
    base = nar(text, proms, resps, quant_levels=levels, prompt_spans=spans).loss
    # changing the target level inside the spans changes neither the inputs nor the loss ...
    changed = [r.clone() for r in resps]
    for r, (s, n), level in zip(changed, spans, levels.tolist()):
        r[s : s + n, level] = (r[s : s + n, level] + 1) % 1024
    assert torch.allclose(nar(text, proms, changed, quant_levels=levels, prompt_spans=spans).loss, base)
    # ... while without spans those frames are scored
    assert not torch.allclose(nar(text, proms, changed, quant_levels=levels).loss, nar(text, proms, resps, quant_levels=levels).loss)


def test_paper_mode_examples(prepared_corpus, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(prepared_corpus, corpus, ignore=shutil.ignore_patterns(".vall_e"))
    lonely = corpus / "103" / "1002"  # a speaker with one utterance: no speaker prompt possible
    lonely.mkdir(parents=True)
    for f in next((corpus / "101").rglob("*000001.qnt.pt")).parent.glob("*000001.*"):
        shutil.copy(f, lonely / f.name.replace("101_1000", "103_1002"))
    common = dict(data_dirs=[str(corpus)], spkr_name_getter="lambda p: p.parts[-3]", min_phones=1, max_phones=400,
                  batch_size=4, nj=0, device="cpu")
    speaker = load_data(Config(model="ar-tiny", **common), progress=False)
    assert "103" not in speaker.speakers and speaker.report.lonely_speakers == 1
    for model in ("ar-tiny", "nar-tiny"):
        data = load_data(Config(model=model, prompt_mode="paper", **common), progress=False)
        assert "103" in data.speakers
        batch = next(iter(data.train_loader(rank=0, start_batch=0)))
        for prom, resp, span in zip(batch["proms"], batch["resps"], batch["span"]):
            if model == "ar-tiny":
                assert span is None and prom.shape == (0, 8)
            else:
                start, length = span
                assert length == min(SEGMENT_FRAMES, len(resp) // 2) and torch.equal(prom, resp[start : start + length])
        draws = data.eval_draws("subtrain")
        assert draws == data.eval_draws("subtrain")  # deterministic
        assert all((d.segment is None) == (model == "ar-tiny") and d.prompts == () for d in draws)
        assert sequence_lengths(batch)  # text + 2 separators + prompt + response, as the budget counts


# ----------------------------------------------------------------------------------------------
# training, export, synthesis


@pytest.fixture(scope="module")
def paper_runs(prepared_corpus, tmp_path_factory) -> dict[str, Path]:
    """ar-tiny and nar-tiny overfit in prompt_mode=paper on two espeak utterances of one speaker."""
    root = tmp_path_factory.mktemp("paper_runs")
    corpus = root / "corpus"
    src = next((prepared_corpus / "101").rglob("*000001.qnt.pt")).parent
    (corpus / "101" / src.name).mkdir(parents=True)
    for f in src.iterdir():
        if f.name.split(".")[0][-1] in "12":
            shutil.copy(f, corpus / "101" / src.name / f.name)
    common = dict(prompt_mode="paper", batch_size=2, eval_batch_size=2, max_num_val=2, max_val_ar_steps=250,
                  log_every=10, save_ckpt_every=10_000, warmup_num_steps=10)
    cfgs = {
        # measured: AR greedy continuation 0.99, NAR 0.93 of the codes (levels 2..8) outside the prompt
        "ar": write_cfg(root, "ar", corpus, model="ar-tiny", max_iter=200, eval_every=200, warmup_max_lr=3e-3, **common),
        "nar": write_cfg(root, "nar", corpus, model="nar-tiny", max_iter=300, eval_every=300, warmup_max_lr=1e-2, **common),
    }
    procs = {k: subprocess.Popen([sys.executable, "-m", "vall_e.train", f"yaml={p}"], cwd=REPO, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True) for k, p in cfgs.items()}
    for kind, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{kind}:\n{out[-4000:]}"
    return {"root": root, "corpus": corpus, **cfgs}


def test_paper_mode_models_learn_and_reproduce_codes(paper_runs):
    for kind, floor in (("ar", 0.9), ("nar", 0.8)):
        logs = paper_runs["root"] / "logs" / kind
        train = stats(logs)
        assert train[-1]["loss"] < 0.5 * train[0]["loss"], f"{kind}: loss did not fall"
        final = stats(logs, "subtrain")[-1]
        match = final["gen_match_greedy"] if kind == "ar" else final["gen_match"]
        assert match >= floor, f"{kind}: the overfit reproduces only {match:.2f} of the codes"


def test_resuming_with_another_prompt_mode_is_refused(paper_runs):
    proc = run_train(paper_runs["ar"], "prompt_mode=speaker", "max_iter=201")
    assert proc.returncode == 2
    assert "prompt_mode=paper" in proc.stderr + proc.stdout and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def paper_zoo(paper_runs) -> dict[str, Path]:
    from vall_e.export import export

    root = paper_runs["root"]
    for kind in ("ar", "nar"):
        export(root / f"{kind}.pt", root / "ckpts" / kind)
    return {"ar": root / "ar.pt", "nar": root / "nar.pt", "corpus": paper_runs["corpus"]}


def test_export_records_the_mode(paper_zoo):
    for kind in ("ar", "nar"):
        data = torch.load(paper_zoo[kind], map_location="cpu", weights_only=True)
        assert data["prompt_mode"] == "paper"


def test_paper_mode_synthesis(paper_zoo, tmp_path, monkeypatch):
    from vall_e.emb import qnt
    from vall_e.inference import Request, SynthesisError, Synthesizer

    wavs = sorted(paper_zoo["corpus"].rglob("*.wav"))
    texts = [w.with_name(w.name.split(".")[0] + ".normalized.txt").read_text().strip() for w in wavs]
    synth = Synthesizer(paper_zoo["ar"], paper_zoo["nar"], device="cpu", codec_weights="untrained")
    assert synth.needs_ref_text
    with pytest.raises(SynthesisError, match="--ref-text"):
        synth.synthesize(texts[1], wavs[0], seed=0)

    # the paper's inference: reference transcript + target text, the reference's codes as the AR prefix
    seen: dict = {}
    real_ar, real_nar = synth.ar.generate, synth.nar.generate
    monkeypatch.setattr(synth.ar, "generate", lambda t, p, **kw: seen.update(ar_proms=p, prefix=kw["prefix_list"]) or real_ar(t, p, **kw))
    monkeypatch.setattr(synth.nar, "generate", lambda t, p, r, **kw: seen.update(nar_proms=p) or real_nar(t, p, r, **kw))
    out = synth.synthesize(texts[1], wavs[0], ref_text=texts[0], seed=0, max_ar_steps=60, prompt_seconds=0.5)
    ref = synth.encode_reference(wavs[0], None)
    assert seen["ar_proms"][0].shape == (0, 8) and torch.equal(seen["prefix"][0], ref[:, 0])
    assert len(seen["nar_proms"][0]) == round(0.5 * qnt.SAMPLE_RATE / qnt.HOP_LENGTH)  # the NAR's 3 s-style crop
    assert out.phones == synth.phonemize(texts[0]) + ["_"] + synth.phonemize(texts[1]) and len(out.codes) >= 1

    # VALL-E-continual on a training utterance: the overfit pair continues it with its own codes
    truth = synth.encode_reference(wavs[1], None)
    seconds = len(truth) / 2 / 75
    t_pre = len(synth.encode_reference(wavs[1], seconds))
    out = synth.synthesize_batch([Request(texts[1], wavs[1], continual=True)], seed=0, ar_temp=0.0, nar_temp=0.0,
                                 prompt_seconds=seconds, max_ar_steps=400)[0]
    n = min(len(out.codes), len(truth) - t_pre)
    assert n > 0 and out.stopped
    match = (out.codes[:n] == truth[t_pre : t_pre + n]).float().mean().item()
    assert match >= 0.8, f"continual synthesis reproduced {match:.2f} of the codes"

    # the CLI says what to pass when the transcript is missing
    cli = subprocess.run(
        [sys.executable, "-m", "vall_e", texts[1], str(wavs[0]), str(tmp_path / "o.wav"), "--ar-ckpt", str(paper_zoo["ar"]),
         "--nar-ckpt", str(paper_zoo["nar"]), "--device", "cpu", "codec_weights=untrained"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert cli.returncode == 2 and "--ref-text" in cli.stderr and "Traceback" not in cli.stderr
