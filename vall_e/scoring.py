"""How the evaluation scores: WER and SIM of one audio, and a row's summary over utterances and runs.

:class:`Scorer` holds the ASR and the speaker embedder (:mod:`vall_e.metrics`) and caches prompt
embeddings; :func:`score` gives one audio's word errors and speaker similarity to its prompt;
:func:`aggregate` turns a row's records into the reported numbers (corpus WER and mean SIM per
run, then their means over runs); :func:`markdown_table` writes them as the paper's table.
The protocol that produces the audio: :mod:`vall_e.evaluate` (rows) and :mod:`vall_e.testset`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from .testset import Prompt, Utterance, load_wav

if TYPE_CHECKING:
    from torch import Tensor

    from .metrics import ASR, SpeakerEmbedder

PAPER_ROWS = {  # arXiv 2301.02111 Table 2 (LibriSpeech test-clean 4-10 s): WER %, SIM
    "ground_truth": (2.2, 0.754),
    "model": (5.9, 0.580),
    "model (continual)": (3.8, 0.508),
}


# --------------------------------------------------------------------------------------------
# one audio


@dataclass
class Scorer:
    """The ASR and the speaker embedder, with the prompt embeddings cached for this invocation."""

    asr: "ASR"
    speaker: "SpeakerEmbedder"
    sim_against: str = "original"
    codec_weights: str = "pretrained"
    device: str = "cpu"
    calls: dict[str, int] = field(default_factory=lambda: {"asr": 0, "speaker": 0, "synthesis": 0})
    _prompt_emb: dict[tuple, "Tensor"] = field(default_factory=dict)

    def transcribe(self, wav: "Tensor", sr: int) -> str:
        self.calls["asr"] += 1
        return self.asr.transcribe(wav, sr)

    def embed(self, wav: "Tensor", sr: int) -> "Tensor":
        self.calls["speaker"] += 1
        return self.speaker.embed(wav, sr)

    def prompt_embedding(self, p: Prompt) -> "Tensor":
        key = (str(p.audio), p.start, p.end)
        if key not in self._prompt_emb:
            wav, sr = load_wav(p.audio, p.start, p.end)
            if self.sim_against == "codec":
                wav, sr = codec_round_trip(wav, sr, self.codec_weights, self.device)
            self._prompt_emb[key] = self.embed(wav, sr)
        return self._prompt_emb[key]

    def sim(self, wav: "Tensor", sr: int, prompt: Prompt) -> float:
        from .metrics import cosine

        return cosine(self.embed(wav, sr), self.prompt_embedding(prompt))


def codec_round_trip(wav: "Tensor", sr: int, codec_weights: str, device: str) -> tuple["Tensor", int]:
    """EnCodec encode + decode at 6 kbps: mono ``(n,)`` at ``sr`` -> ``(n24,)`` at 24 kHz."""
    from .emb import codec

    codes = codec.encode(wav, sr, device=device, codec_weights=codec_weights)  # (1, 8, T)
    out, out_sr = codec.decode(codes, device=device, codec_weights=codec_weights)  # (1, T * 320)
    n24 = math.ceil(wav.shape[-1] * codec.SAMPLE_RATE / sr)
    return out[0, :n24], out_sr


def score(scorer: Scorer, u: Utterance, prompt: Prompt, wav: "Tensor", sr: int, mode: str,
          prompt_seconds: float) -> dict[str, Any]:
    """WER fields and SIM of one audio ``(n,)`` at ``sr`` for utterance ``u`` with ``prompt``.

    In continual mode the SIM is taken on the audio after the first ``prompt_seconds``.
    """
    from .metrics import word_errors

    hyp = scorer.transcribe(wav, sr)
    e = word_errors(u.text, hyp)
    part = wav[int(round(prompt_seconds * sr)):] if mode == "continual" else wav
    sim = scorer.sim(part, sr, prompt) if part.numel() >= sr // 10 else float("nan")
    return {"hyp": hyp, "ref_words": e.ref_words, "sub": e.substitutions, "del": e.deletions, "ins": e.insertions,
            "wer": e.wer, "sim": sim, "seconds": round(wav.shape[-1] / sr, 3)}


# --------------------------------------------------------------------------------------------
# a row


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def _std(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if len(xs) < 2:
        return 0.0
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def aggregate(records: Sequence[dict[str, Any]], runs: int) -> dict[str, Any]:
    """One row's summary: corpus WER and mean SIM per run, their means over runs (the reported numbers)."""
    per_run: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        per_run.setdefault(int(r["run"]), []).append(r)
    wers, sims = [], []
    for run in sorted(per_run):
        rs = per_run[run]
        ref = sum(r["ref_words"] for r in rs)
        wers.append(sum(r["sub"] + r["del"] + r["ins"] for r in rs) / ref if ref else float("nan"))
        sims.append(_mean([r["sim"] for r in rs]))
    out: dict[str, Any] = {
        "wer": _mean(wers), "sim": _mean(sims), "runs": len(per_run), "wer_runs": wers, "sim_runs": sims,
        "wer_std": _std(wers), "sim_std": _std(sims), "wer_mean_utterance": _mean([r["wer"] for r in records]),
        "utterances": len(per_run.get(0, [])),
    }
    if any("stopped" in r for r in records):
        out["not_stopped"] = sum(1 for r in records if r.get("stopped") is False)
        out["seconds_generated"] = round(sum(r["seconds"] for r in records), 2)
    if any("foil_errors" in r for r in records):
        ref = sum(r["foil_ref_words"] for r in records)
        out["wer_shuffled_text"] = sum(r["foil_errors"] for r in records) / ref if ref else float("nan")
    if any("sim_other_speaker" in r for r in records):
        out["sim_other_speaker"] = _mean([r.get("sim_other_speaker", float("nan")) for r in records])
    return out


def markdown_table(results: dict[str, Any], rows: Sequence[str]) -> str:
    """The paper-style table: WER in percent, SIM as a cosine; mean over runs (± std when runs > 1)."""
    b, s = results["backends"], results["settings"]
    lines = [
        f"# VALL-E evaluation ({s['mode']} mode)",
        "",
        f"- ASR: {b['asr']}; speaker model: {b['speaker']}; SIM against the {s['sim_against']} prompt audio",
        f"- test set: {results['test_set']['utterances']} utterances, {results['test_set']['speakers']} speakers, "
        f"{results['test_set']['hours']:.2f} h ({s['min_seconds']}-{s['max_seconds']} s)",
        f"- comparable with the paper's numbers: {'yes' if b['comparable_with_paper'] else 'NO (offline or substitute backends: compare rows with each other only)'}",
        "",
        "| row | WER (%) | SIM | utterances | runs |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        r = results[row]
        wer = "n/a" if r["wer"] is None else f"{100 * r['wer']:.1f}"
        sim = "n/a" if r["sim"] is None else f"{r['sim']:.3f}"
        if r["runs"] > 1:
            wer += f" ± {100 * (r['wer_std'] or 0):.1f}"
            sim += f" ± {(r['sim_std'] or 0):.3f}"
        name = row + (f" (best of {s['best_of']})" if row == "model" and s["best_of"] > 1 else "")
        lines.append(f"| {name} | {wer} | {sim} | {r['utterances']} | {r['runs']} |")
    gt = results.get("ground_truth")
    if gt and (gt.get("wer_shuffled_text") is not None or gt.get("sim_other_speaker") is not None):
        lines += ["", "Chance levels on this test set (ground-truth audio): "
                  + "; ".join(x for x in (
                      f"WER against shuffled transcripts {100 * gt['wer_shuffled_text']:.1f} %"
                      if gt.get("wer_shuffled_text") is not None else "",
                      f"SIM against another speaker's prompt {gt['sim_other_speaker']:.3f}"
                      if gt.get("sim_other_speaker") is not None else "") if x)]
    lines += ["", "Paper (arXiv 2301.02111, Table 2; HuBERT-Large ASR, WavLM-TDNN SIM): ground truth 2.2 / 0.754, "
              "VALL-E 5.9 / 0.580, VALL-E continual 3.8 / 0.508.", ""]
    return "\n".join(lines)
