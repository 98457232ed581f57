"""Training entry point: ``python -m vall_e.train yaml=config/<name>/ar.yml [key=value ...]``.

Multi-GPU / multi-node through the stock launchers::

    deepspeed --num_gpus 8 --module vall_e.train yaml=config/LibriTTS/ar.yml
    torchrun --nproc_per_node 8 -m vall_e.train yaml=config/LibriTTS/ar.yml

Rerunning the same command resumes from the newest complete checkpoint in ``ckpts/<cfg_name>/``
(``latest`` names it). A checkpoint folder is locked by the run training into it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from .config import Config
from .data import DataBundle, DataError, load_data, model_kwargs, summarize
from .utils import distributed
from .utils.helpers import (
    atomic_write_text,
    pin_malloc_thresholds,
    seed_everything,
    setup_logging,
    to_device,
    utterance_id,
)
from .utils.trainer import TrainState, Trainer, log_stats

_logger = logging.getLogger("vall_e.train")


def _build_model(cfg: Config):
    from .models import get_model

    # grouped code modeling is the AR's: a NAR run ignores group_size (one yaml may serve both)
    grouping = {"group_size": cfg.group_size} if cfg.model_kind == "ar" else {}
    return get_model(cfg.model, activation_checkpointing=cfg.activation_checkpointing, arch=cfg.arch,
                     n_audio_tokens=cfg.num_tokens, **grouping)


def _eval_prefix_frames(n: int, group_size: int = 1) -> int:
    """Frames of an utterance given as the AR's prefix when evaluating ``prompt_mode=paper``: 3 s, at most half,
    cut to whole groups of a grouped AR (it continues after whole groups, as in synthesis)."""
    from .ar import whole_groups
    from .data import SEGMENT_FRAMES
    from .sampler import segment_frames_of

    return whole_groups(int(segment_frames_of(n, SEGMENT_FRAMES)), group_size)  # the rule of the NAR's training segment


def _codes_match(hyp: torch.Tensor, ref: torch.Tensor) -> float:
    """Fraction of reference positions the hypothesis reproduces (a shorter hyp misses the rest)."""
    n = min(len(hyp), len(ref))
    return float((hyp[:n] == ref[:n]).sum()) / max(len(ref), 1)


class Evaluator:
    """Teacher-forced loss/accuracy and free-running generation on ``subtrain`` and ``val``.

    Every rank runs the same forward passes (so ZeRO-3 partitioned weights can be gathered); rank 0
    logs the stats and writes reference/hypothesis wavs under ``<log_dir>/eval/step<N>/<split>/``.
    """

    def __init__(self, cfg: Config, engine, data: DataBundle):
        self.cfg, self.engine, self.data = cfg, engine, data
        self._audio_failed = False

    @torch.inference_mode()
    def __call__(self, step: int) -> None:
        for split in ("subtrain", "val"):
            loader = self.data.eval_loader(split)
            if len(loader.dataset) == 0:  # no draws (e.g. an empty val split)
                continue
            stats = self._run_split(loader, split, step)
            if distributed.is_global_leader():
                log_stats({"split": split, "step": step, **stats})

    def _run_split(self, loader, split: str, step: int) -> dict[str, Any]:
        cfg, model = self.cfg, self.engine.module
        device = self.engine.device
        gen = torch.Generator(device=device).manual_seed(cfg.seed + step)
        totals: dict[str, float] = {}
        n_batches, n_utts = 0, 0
        matches: list[float] = []
        greedy_matches: list[float] = []  # AR: separates how well the model fits from sampling noise
        for bi, batch in enumerate(loader):
            if not batch["text"]:  # every example unreadable (named by the data loader's warning)
                continue
            text, proms, resps = (to_device(batch[k], device) for k in ("text", "proms", "resps"))
            if cfg.model_kind == "ar":
                out = model(text, proms, resps)
                # prompt_mode=paper: the utterance's own first seconds are the prompt (VALL-E-continual);
                # the hypothesis is compared with the rest. Frames throughout, whatever the AR's group_size:
                # max_val_ar_steps bounds frames and gen_match counts frames
                g = model.group_size
                pre = [r[: _eval_prefix_frames(len(r), g) if cfg.prompt_mode == "paper" else 0, 0] for r in resps]
                rest = [r[len(p) :, 0] for p, r in zip(pre, resps)]
                hyps = model.generate(
                    text, proms, max_steps=cfg.max_val_ar_steps, temperature=cfg.sampling_temperature, generator=gen,
                    prefix_list=pre,
                )
                matches += [_codes_match(h, r) for h, r in zip(hyps, rest)]
                greedy = model.generate(text, proms, max_steps=cfg.max_val_ar_steps, temperature=0.0, prefix_list=pre)
                greedy_matches += [_codes_match(h, r) for h, r in zip(greedy, rest)]
                hyp_codes = [torch.cat([p, h]).unsqueeze(-1) for p, h in zip(pre, hyps)]
            else:
                # a fixed level per sample keeps the teacher-forced numbers comparable across evals
                levels = (torch.arange(len(text), device=device) + bi) % 7 + 1
                out = model(text, proms, resps, quant_levels=levels, **model_kwargs(batch))
                hyp_codes = model.generate(text, proms, [r[:, :1] for r in resps], temperature=0.0)
                for h, r, span in zip(hyp_codes, resps, batch["span"]):
                    scored = torch.ones(len(r), dtype=torch.bool, device=r.device)
                    if span is not None:  # frames the prompt gives away are not scored
                        scored[span[0] : span[0] + span[1]] = False
                    matches.append(float((h[scored, 1:] == r[scored, 1:]).float().mean()) if scored.any() else 0.0)
            for k, v in out.stats.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            n_batches += 1
            n_utts += len(text)
            if distributed.is_global_leader():
                self._write_audio(batch["path"], resps, hyp_codes, split, step)
        if n_batches == 0:
            return {"n": 0}
        stats = {k: v / n_batches for k, v in totals.items()}
        stats["gen_match"] = sum(matches) / len(matches)
        if greedy_matches:
            stats["gen_match_greedy"] = sum(greedy_matches) / len(greedy_matches)
        stats["n"] = n_utts
        return stats

    def _write_audio(self, paths, refs, hyps, split: str, step: int) -> None:
        """Decode reference and hypothesis codes to wavs; a codec problem is reported once, not fatal."""
        if self._audio_failed:
            return
        out_dir = self.cfg.log_dir / "eval" / f"step{step}" / split
        try:
            from .emb import qnt
            from .utils import monitor

            for path, ref, hyp in zip(paths, refs, hyps):
                if len(hyp) == 0:  # the AR stopped at once: nothing to decode
                    continue
                uid = utterance_id(path)
                device = str(self.engine.device)  # this rank's GPU (cfg.device may name another)
                qnt.decode_to_file(ref.cpu(), out_dir / f"{uid}.ref.wav", device=device, codec_weights=self.cfg.codec_weights)
                qnt.decode_to_file(hyp.cpu(), out_dir / f"{uid}.hyp.wav", device=device, codec_weights=self.cfg.codec_weights)
                if monitor.active() is not None:  # a few of them as TensorBoard audio too
                    monitor.active().eval_audio(split, uid, out_dir / f"{uid}.ref.wav", out_dir / f"{uid}.hyp.wav", step)
        except Exception as e:  # e.g. pretrained weights unavailable offline
            self._audio_failed = True
            _logger.warning("evaluation audio is not written (codec_weights=%s): %s", self.cfg.codec_weights, e)


# Hyper-parameters that change how a model trains, not the shape of its weights: free to differ on resume.
_NOT_ARCHITECTURE = {"activation_checkpointing", "p_dropout"}


def _architecture_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"field: saved -> current"`` for every architectural hyper-parameter that differs (JSON-normalized;
    a field the saved model predates, such as ``arch``, counts as its default)."""
    from .base import complete_hparams

    saved, current = json.loads(json.dumps(complete_hparams(saved))), json.loads(json.dumps(complete_hparams(current)))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted((set(saved) | set(current)) - _NOT_ARCHITECTURE)
            if saved.get(k) != current.get(k)]


def _same_architecture_words(saved: dict[str, Any]) -> str:
    """The ``key=value`` words that rebuild a saved model: its preset, its ``arch``, its ``num_tokens`` and, for
    an AR, its ``group_size``."""
    from .base import complete_hparams

    hparams = complete_hparams(saved.get("hparams") or {})
    preset = saved.get("preset") or saved.get("model") or hparams.get("preset")
    words = f"model={preset} arch={hparams['arch']} num_tokens={hparams['n_audio_tokens']}"
    if hparams.get("kind") == "ar":
        words += f" group_size={hparams['group_size']}"
    return words


def _grouping_note(diff: list[str]) -> str:
    """A sentence for a ``group_size`` difference (empty without one): it cannot change under a run's weights."""
    if not any(d.startswith("group_size:") for d in diff):
        return ""
    return (" The AR's group_size cannot change under trained weights: a grouped AR reads and predicts G frames "
            "per position (other input and output layers); train a model with the new group_size from scratch.")


def _init_source(folder: Path) -> tuple[Path, str]:
    """(run folder, tag) of the checkpoint ``init_from=<folder>`` means: a ``global_step<N>`` folder itself,
    or a run folder's newest usable checkpoint."""
    from .utils.engines import CheckpointError, resume_candidates

    if any(folder.glob("*model_states.pt")):
        return folder.parent, folder.name
    tags = resume_candidates(folder)
    if not tags:
        raise CheckpointError(f"init_from={folder}: no checkpoint in it (give a run's checkpoint folder, one of its "
                              "global_step<N> folders, or an exported .pt file)")
    return folder, tags[0]


def _load_init_from(cfg: Config, model) -> dict[str, int]:
    """Load ``cfg.init_from``'s weights into ``model`` (before the engine copies them); returns its phone map.

    Only the weights travel: the new run starts at step 0 with a fresh optimizer and schedule. Loading
    is weights-only either way (exported files and checkpoints alike).
    """
    from .export import ExportError, InferenceFileError, read_checkpoint, read_inference_file
    from .utils.engines import CheckpointError

    src = Path(cfg.init_from)
    try:
        # training has no --trust-checkpoint: a refused pickle is exported (by a user who trusts it) first
        hint = ("Training loads weights-only. If you wrote that checkpoint yourself, export it with "
                "`python -m vall_e.export <out.pt> yaml=<its config> --trust-checkpoint` and set init_from=<out.pt>")
        data = read_inference_file(src) if src.is_file() else read_checkpoint(*_init_source(src), trust_hint=hint)
    except (ExportError, InferenceFileError) as e:
        raise CheckpointError(f"init_from={cfg.init_from}: {e}") from None
    diff = _architecture_differences(data["hparams"], model.hparams)
    if diff:
        preset = data.get("preset")
        what = (f"holds a {preset!r} model but this run builds model={cfg.model!r}" if preset != cfg.model
                else f"holds a {preset!r} model of another shape than this run builds")
        raise CheckpointError(
            f"init_from={cfg.init_from} {what}; these fields differ (saved -> this run): {'; '.join(diff)}. "
            f"Set {_same_architecture_words(data)} to fine-tune it.{_grouping_note(diff)}"
        )
    try:
        model.load_state_dict(data["state_dict"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"init_from={cfg.init_from}: its weights do not fit model={cfg.model} ({e})") from None
    _logger.info("initialized the weights from %s (%s, trained %d steps); starting a new run at step 0",
                 data.get("checkpoint", cfg.init_from), data.get("preset"), int(data.get("step", 0)))
    return dict(data["phone_map"])


def _merge_phone_maps(source: dict[str, int], data_map: dict[str, int]) -> dict[str, int]:
    """``source``'s ids kept (the weights learned them); symbols only the new data has get the next free ids."""
    merged = dict(source)
    next_id = max(merged.values(), default=0) + 1
    for symbol in sorted(set(data_map) - set(merged)):
        merged[symbol] = next_id
        next_id += 1
    return merged


def _check_architecture(cfg: Config, folder, hparams: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint of another shape, naming the fields that differ."""
    from .utils.engines import CheckpointError, read_meta

    meta = read_meta(folder)
    if not meta or "hparams" not in meta:
        return  # older checkpoints carry no vall_e.json; a mismatch then shows up when loading
    diff = _architecture_differences(meta["hparams"], hparams)
    if diff:
        raise CheckpointError(
            f"{folder} was trained with model={meta.get('model')!r}, this run asks for model={cfg.model!r}; these "
            f"fields differ: {'; '.join(diff)}. Resume with {_same_architecture_words(meta)}, or start a new run under "
            "another name= (init_from= takes weights from a run of the same preset)." + _grouping_note(diff)
        )


def train(cfg: Config) -> int:
    """Build model, engine and data from ``cfg``, resume if a checkpoint exists, train; returns exit status.

    Exit status 2 (nothing retried by ``scripts/run.sh``): a problem the user must fix, explained in
    the log; 0: done, or stopped on request (``quit``, SIGTERM, SIGINT) after a save.
    """
    from .utils.engines import CheckpointError, RunLock, leader_decides

    if cfg.device == "cpu" and os.environ.get("VALL_E_MALLOC_TUNING", "1") != "0":
        # CPU activations live in glibc's heap: without this, RSS grew ~1.3 GB per 100 quarter-AR
        # steps from fragmentation alone (scripts/bench_memory.py; README "Memory over long runs")
        pin_malloc_thresholds()
    distributed.init_distributed(cfg.device)
    leader = distributed.is_global_leader()
    setup_logging(cfg.log_dir if leader else None, level=logging.INFO if leader else logging.WARNING)
    if leader:
        _logger.info("config %s (cfg_name=%s, world size %d)\n%s", cfg.yaml_path, cfg.cfg_name, distributed.world_size(), cfg.dumps())
    lock = RunLock(cfg.ckpt_dir)
    try:
        leader_decides(lock.acquire)  # before anything reads or writes the checkpoint folder
        return _train(cfg)
    except CheckpointError as e:
        if leader:
            _logger.error("%s", e)
        return 2
    finally:
        lock.release()


def _train(cfg: Config) -> int:
    from .utils.engines import build_engine, leader_decides, make_loads_safe, remove_partial_saves, resume_candidates

    leader = distributed.is_global_leader()
    if not cfg.data_dirs:
        where = f" in {cfg.yaml_path}" if cfg.yaml_path else ""
        _logger.error("data_dirs is empty%s: there is nothing to train on. List the corpus folders in the yaml "
                      "(data_dirs: [data/LibriTTS]) or on the command line (data_dirs=[data/a,data/b])", where)
        return 2
    seed_everything(cfg.seed)
    tags = leader_decides(lambda: remove_partial_saves(cfg.ckpt_dir) or resume_candidates(cfg.ckpt_dir))
    model = _build_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    if tags:
        leader_decides(lambda: _check_architecture(cfg, cfg.ckpt_dir / tags[0], model.hparams))
    init_map = None
    if cfg.init_from is not None and tags:
        if leader:
            _logger.info("init_from=%s is ignored: %s holds this run's own checkpoints, resuming those",
                         cfg.init_from, cfg.ckpt_dir)
    elif cfg.init_from is not None:
        init_map = _load_init_from(cfg, model)  # every rank: the engine starts from these weights
    engine = build_engine(cfg, model)
    make_loads_safe(engine)
    state = Trainer.restore(engine, cfg.ckpt_dir, tags)
    if state is not None:
        _logger.info("resumed from %s at step %d", cfg.ckpt_dir, state.step)

    try:
        data = load_data(cfg, phone_map=state.extra.get("phone_map") if state else None)
    except DataError as e:
        _logger.error("%s", e)
        return 2
    n_text_tokens = model.hparams["n_text_tokens"]
    if init_map is not None:
        merged = _merge_phone_maps(init_map, data.phone_map)
        added = sorted(set(merged) - set(init_map))
        if max(merged.values()) + 1 > n_text_tokens:
            _logger.error("init_from=%s: its phone map plus this data's new phones %s need %d ids, more than the "
                          "model's n_text_tokens=%d; drop those utterances or train from scratch",
                          cfg.init_from, added, max(merged.values()) + 1, n_text_tokens)
            return 2
        if added and leader:
            _logger.warning("init_from: phones new to the model get fresh (untrained) embeddings: %s", added)
        data = dataclasses.replace(data, phone_map=merged)
    if max(data.phone_map.values()) + 1 > n_text_tokens:
        _logger.error("%d phone symbols do not fit the model's n_text_tokens=%d", len(data.phone_map), n_text_tokens)
        return 2
    if state is None:
        state = TrainState(
            extra={"phone_map": data.phone_map, "speakers": data.speakers, "model": cfg.model, "hparams": model.hparams,
                   "prompt_mode": cfg.prompt_mode}
        )
    elif state.extra.get("prompt_mode", "speaker") != cfg.prompt_mode:
        _logger.error("%s was trained with prompt_mode=%s; this run asks for prompt_mode=%s. Resume with "
                      "prompt_mode=%s, or start a new run under another name= (init_from= can take its weights)",
                      cfg.ckpt_dir, state.extra.get("prompt_mode", "speaker"), cfg.prompt_mode,
                      state.extra.get("prompt_mode", "speaker"))
        return 2
    # measured on this run's training set every start (older checkpoints lack it); export reads it
    state.extra["max_frames_per_phone"] = data.max_frames_per_phone()
    state.extra["prompt_mode"] = cfg.prompt_mode  # export records it; synthesis follows it
    if leader:
        _logger.info("model %s: %.2fM parameters; data %s", cfg.model, n_params / 1e6, json.dumps(summarize(data)))
        atomic_write_text(json.dumps(data.phone_map, indent=1), cfg.ckpt_dir / "phone_map.json")

    rank = distributed.global_rank()
    trainer = Trainer(
        cfg,
        engine,
        make_loader=lambda start: data.train_loader(rank=rank, start_batch=start),
        evaluate=Evaluator(cfg, engine, data),
        state=state,
    )
    try:
        status = trainer.run()
    except DataError as e:  # the corpus changed under a running job (e.g. a damaged shard)
        text = str(e).strip()
        if "Traceback" in text:  # a loader worker's error arrives with its traceback as text: keep the message
            text = text.splitlines()[-1].partition("DataError: ")[2] or text.splitlines()[-1]
        _logger.error("%s", text)
        return 2
    distributed.barrier()
    return status


def _strip_launcher_args(argv: Sequence[str]) -> list[str]:
    """Drop the ``--local_rank=N`` the ``deepspeed`` launcher appends (LOCAL_RANK is in the env too)."""
    out, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word.startswith("--local_rank=") or word.startswith("--local-rank="):
            continue
        elif word in ("--local_rank", "--local-rank"):
            skip = True
        else:
            out.append(word)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    from .utils.errors import entry_point

    cfg = Config.from_cli(_strip_launcher_args(sys.argv[1:] if argv is None else argv))
    raise SystemExit(entry_point(train)(cfg))


if __name__ == "__main__":
    main()
