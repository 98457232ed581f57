"""Training data: filters, train/val splits, phone symbols, prompts and dataloaders over the corpus index.

An utterance is ``<id>.qnt.pt`` (EnCodec codes ``(1, 8, T)``) with ``<id>.phn.txt`` beside it. Every
``data_dirs`` folder is read through its memory-mapped index (:mod:`vall_e.corpus`); this module turns
the indexes into the training set with numpy over whole arrays (no Python object per utterance), so
a start costs seconds even at millions of utterances. Batches come from :mod:`vall_e.sampler`.

Phones are wrapped as ``<s> … </s>`` and mapped to ids through a symbol map built from the kept
utterances, training and val (id 0 is padding).

**Splits.** ``train`` feeds the sampler, ``subtrain`` (a fixed subset of train) measures the seen
speakers, ``val`` measures generalization:

- without ``val_dirs``, ``val`` is about 5% of the utterances of every training speaker with 20 or
  more (:func:`split_train_val`): seen speakers, unseen sentences;
- with ``val_dirs`` (e.g. LibriTTS dev-clean), ``val`` comes from those folders only: speakers
  that training never hears, prompted (``prompt_mode=speaker``) by their own other utterances, so
  evaluation is zero-shot. Training then keeps every utterance of ``data_dirs`` (no 5% hold-out:
  the val speakers are elsewhere), except any that lie inside a ``val_dirs`` folder (a val folder
  nested in a data folder, as ``data/LibriTTS/dev-clean`` in ``data/LibriTTS``, is never trained on).

**num_tokens** is applied here, not at index time: the index stores each utterance's largest code,
and an utterance holding a code outside ``0..num_tokens - 1`` is left out (and named in the log) at
every start, so changing ``num_tokens`` needs no rebuild.
"""

from __future__ import annotations

import logging
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .config import Config
from .corpus import (
    BAD_CODES,
    BAD_PHONES,
    CODEBOOK_SIZE,
    NO_PHONES,
    OK,
    CorpusIndex,
    DataError,
    open_indexes,
    out_of_range_message,
    read_codes_file,
)
from .sampler import BucketBatchSampler, Draw, least_prompt_frames, segment_frames_of

_logger = logging.getLogger(__name__)

BOS, EOS = "<s>", "</s>"
N_CODEBOOKS = 8
FRAMES_PER_SECOND = 75
VAL_FRACTION = 0.05
SEGMENT_FRAMES = 3 * FRAMES_PER_SECOND  # the paper's 3 s prompt


def prompt_kind(cfg: Config) -> str:
    """The sampler's prompts for this run: ``prompt_mode=speaker`` -> ``"speaker"``; ``paper`` -> the
    AR's ``"none"`` (a plain language model; any prefix of the utterance acts as its prompt) or the
    NAR's ``"segment"`` (a random 3 s segment of the utterance itself, left out of the loss)."""
    if cfg.prompt_mode == "speaker":
        return "speaker"
    return "none" if cfg.model_kind == "ar" else "segment"

__all__ = ["DataError", "DataBundle", "load_data", "load_codes", "encode_phones", "collate", "Draw"]


@dataclass
class ScanReport:
    """What the indexes hold and what each rule dropped, for the "nothing to train on" diagnosis.

    ``role``: ``"data_dirs"`` (the training folders) or ``"val_dirs"`` (one val folder).
    """

    dirs: list[str]
    role: str = "data_dirs"
    n_qnt: int = 0
    missing_dirs: list[str] = field(default_factory=list)
    no_phones: int = 0
    unreadable: int = 0
    too_few_phones: int = 0
    too_many_phones: int = 0
    too_short: int = 0
    too_long: int = 0
    over_budget: int = 0
    lonely_speaker_utts: int = 0
    lonely_speakers: int = 0
    out_of_range: int = 0  # a code outside 0..num_tokens - 1
    in_val_dirs: int = 0  # data_dirs utterances inside a val_dirs folder: never trained on

    def explain(self, cfg: Config) -> str:
        if self.role == "val_dirs":
            lines = [
                f"no utterance is left for the val split in the val_dirs folder {self.dirs[0]!r}.",
                "  (val_dirs holds unseen speakers for a zero-shot val split; set val_dirs=[] to hold out 5% of "
                "the training speakers' utterances instead)",
            ]
        else:
            lines = [
                "no utterance is left to train on.",
                f"  folders searched (data_dirs): {self.dirs or '[] (set data_dirs in the yaml or data_dirs=[...])'}",
            ]
        for d in self.missing_dirs:
            lines.append(f"  folder {d!r} does not exist (relative paths are taken from {Path.cwd()})")
        lines += [
            f"  <id>.qnt.pt files found: {self.n_qnt}"
            + ("  (run `python -m vall_e.emb.qnt <folder>` to make them)" if self.n_qnt == 0 else ""),
            f"  dropped, no <id>.phn.txt beside the codes: {self.no_phones}"
            + ("  (run `python -m vall_e.emb.g2p <folder>`)" if self.no_phones else ""),
            f"  dropped, unreadable codes or phones: {self.unreadable}",
            f"  dropped, a code outside 0..{cfg.num_tokens - 1} (num_tokens={cfg.num_tokens}): {self.out_of_range}",
            f"  dropped, fewer than min_phones={cfg.min_phones} phones: {self.too_few_phones}",
            f"  dropped, more than max_phones={cfg.max_phones} phones: {self.too_many_phones}",
            f"  dropped, shorter than min_seconds={cfg.min_seconds}: {self.too_short}",
            f"  dropped, longer than max_seconds={cfg.max_seconds}: {self.too_long}",
            f"  dropped, cannot fit batch_frames={cfg.batch_frames} with a prompt: {self.over_budget}",
            f"  dropped, speaker has fewer than 2 utterances (no prompt possible): {self.lonely_speaker_utts}"
            f" utterances of {self.lonely_speakers} speakers"
            + (f"  (speakers come from spkr_name_getter={cfg.spkr_name_getter!r})" if self.lonely_speakers else ""),
        ]
        if self.in_val_dirs:
            lines.append(f"  kept out of training, inside a val_dirs folder: {self.in_val_dirs}")
        return "\n".join(lines)


def load_codes(path: str | Path, num_tokens: int = CODEBOOK_SIZE) -> torch.Tensor:
    """Load ``<id>.qnt.pt`` (any integer dtype, codes in ``0..num_tokens - 1``) as ``(T, 8)`` int64 codes;
    errors name the file."""
    try:
        codes = read_codes_file(path, num_tokens)
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: {e}; delete it and rerun `python -m vall_e.emb.qnt`") from None
    return torch.from_numpy(codes.astype(np.int64))


def encode_phones(phones: Sequence[str], phone_map: dict[str, int], where: str = "") -> torch.Tensor:
    """``["HH", "AH0"]`` -> ``(t,)`` ids of ``<s> HH AH0 </s>``; unknown phones raise with their names."""
    unknown = sorted({p for p in phones if p not in phone_map})
    if unknown:
        raise DataError(
            f"{where + ': ' if where else ''}phones {unknown} are not in the model's phone map "
            f"({len(phone_map)} symbols learned from the training set)"
        )
    return torch.tensor([phone_map[BOS], *(phone_map[p] for p in phones), phone_map[EOS]], dtype=torch.long)


# ----------------------------------------------------------------------------------------------
# several folders' indexes as one corpus


class Corpus:
    """The indexes of all ``data_dirs`` as one row space: global row ``r`` -> (folder ``k``, row ``i``).

    Holds only memory maps; pickling (to dataloader workers) sends paths.
    """

    def __init__(self, indexes: Sequence[CorpusIndex]):
        self.indexes = list(indexes)
        self.starts = np.cumsum([0] + [len(x) for x in self.indexes])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, row: int) -> tuple[int, int]:
        """Global ``row`` -> (folder number, row in that folder's index)."""
        k = int(np.searchsorted(self.starts, row, side="right")) - 1
        return k, row - int(self.starts[k])

    def column(self, name: str) -> np.ndarray:
        """One per-row array over all folders (in memory; a view when there is one folder)."""
        parts = [np.asarray(getattr(x, name)) for x in self.indexes]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def n_phones(self) -> np.ndarray:
        return np.concatenate([np.diff(x.phone_off) for x in self.indexes])

    def qnt_path(self, row: int) -> Path:
        k, i = self.locate(row)
        return self.indexes[k].qnt_path(i)

    def symbols_used(self, rows: np.ndarray) -> set[str]:
        """Phone symbols that occur in ``rows`` (gathered per folder in chunks: bounded memory)."""
        used: set[str] = set()
        for k, index in enumerate(self.indexes):
            local = rows[(rows >= self.starts[k]) & (rows < self.starts[k + 1])] - self.starts[k]
            counts = np.zeros(max(len(index.symbols), 1), np.int64)
            for a in range(0, len(local), 1 << 18):
                chunk = local[a : a + (1 << 18)]
                lo = np.asarray(index.phone_off[chunk])
                n = np.asarray(index.phone_off[chunk + 1]) - lo
                # ragged gather: positions lo[j] .. lo[j] + n[j] - 1 of every row, concatenated
                pos = np.arange(int(n.sum())) + np.repeat(lo - np.r_[0, np.cumsum(n)[:-1]], n)
                counts += np.bincount(index.phones[pos], minlength=len(counts))
            used |= {s for s, c in zip(index.symbols, counts.tolist()) if c}
        return used

    def holds_symbols(self, rows: np.ndarray, symbols: set[str]) -> np.ndarray:
        """``(len(rows),)`` whether each row's phones include one of ``symbols`` (a loop: for small row sets)."""
        out = np.zeros(len(rows), bool)
        for j, row in enumerate(rows.tolist()):
            k, i = self.locate(row)
            index = self.indexes[k]
            out[j] = any(index.symbols[p] in symbols for p in set(index.phone_ids(i).tolist()))
        return out


def _speakers(corpus: Corpus, cfg: Config) -> tuple[np.ndarray, list[str]]:
    """Speaker id per global row (from ``spkr_name_getter`` applied once per folder) and the names."""
    get = cfg.get_spkr
    names: dict[str, int] = {}
    out = []
    probe = "\0probe.qnt.pt"
    for index in corpus.indexes:
        used = set(np.unique(np.asarray(index.dir)).tolist()) if len(index) else set()
        try:  # only folders that hold utterances need a speaker (a shallow corpus root may not have one)
            per_dir = [get((index.root / d) / probe) if i in used else "" for i, d in enumerate(index.meta["dirs"])]
        except ValueError as e:
            raise DataError(f"spkr_name_getter={cfg.spkr_name_getter!r}: {e}") from None
        if any(s == probe for s in per_dir):  # the getter names the file itself: one speaker per utterance
            spk = [names.setdefault(get(index.qnt_path(i)), len(names)) for i in range(len(index))]
            out.append(np.asarray(spk, np.int64))
        else:
            ids = np.array([names.setdefault(s, len(names)) for s in per_dir], np.int64)
            out.append(ids[np.asarray(index.dir)] if len(index) else np.zeros(0, np.int64))
    return (np.concatenate(out) if out else np.zeros(0, np.int64)), list(names)


def _split_key(keys: np.ndarray, seed: int) -> np.ndarray:
    """A seeded, order-independent random key per utterance (splitmix64 of its path hash)."""
    x = keys.astype(np.uint64) ^ np.uint64((seed * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def split_train_val(rows: np.ndarray, spk: np.ndarray, keys: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """About 5% of each speaker's utterances go to val, chosen by a seeded key of their path.

    The choice is per utterance, so adding or filtering other data never moves an utterance between
    train and val (no leakage when a corpus grows). Speakers with fewer than 20 utterances give none,
    as ``floor(5%)`` would, and every speaker keeps at least two training utterances (for prompts).
    """
    spk_rows = spk[rows]
    n_spk = int(spk_rows.max()) + 1 if len(rows) else 0
    counts = np.bincount(spk_rows, minlength=n_spk)
    u = _split_key(keys[rows], seed).astype(np.float64) / 2.0**64
    is_val = (u < VAL_FRACTION) & (counts[spk_rows] >= round(1 / VAL_FRACTION))
    n_train = np.bincount(spk_rows[~is_val], minlength=n_spk)
    is_val &= n_train[spk_rows] >= 2
    return rows[~is_val], rows[is_val]


def _group(rows: np.ndarray, spk: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows grouped by speaker: (rows sorted by speaker, group starts ``(s + 1,)``, speaker ids ``(s,)``)."""
    order = np.argsort(spk[rows], kind="stable")
    grouped = rows[order]
    s = spk[grouped]
    first = np.r_[0, np.flatnonzero(np.diff(s)) + 1] if len(s) else np.zeros(0, np.int64)
    return grouped, np.r_[first, len(s)].astype(np.int64), s[first]


# ----------------------------------------------------------------------------------------------
# examples


class _BadExample(Exception):
    def __init__(self, path: Path, message: str):
        super().__init__(message)
        self.path = path


def leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """A DataLoader worker ignores SIGINT and SIGTERM: only the main process acts on them (it finishes
    its step and saves). Ctrl-C reaches the whole process group, and SLURM signals every process of a
    job step; a worker that died of the signal would take with it a batch it was still handing over,
    and the main process would fail before its save. Workers still end with the main process."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class VALLEDataset(Dataset):
    """Examples for the models, indexed by :class:`~vall_e.sampler.Draw`:
    ``{"text": (t,), "proms": (t', 8), "resps": (t'', 8), "span": (start, length) | None, "path": str,
    "spkr_name": str}``.

    ``proms`` are the draw's prompt utterances concatenated; with a ``segment`` they are that slice of
    the response itself and ``span`` says where it lies (the NAR leaves it out of the loss); without
    either the prompt is empty ``(0, 8)``.

    A draw whose codes cannot be read gives ``{"bad": path, "error": message}`` instead (the
    trainer skips, counts and reports it). With ``packed`` the codes come from the corpus shards.
    """

    def __init__(self, corpus: Corpus, phone_map: dict[str, int], spkr_names: dict[int, str], packed: bool = True,
                 num_tokens: int = CODEBOOK_SIZE):
        self.corpus = corpus
        self.phone_map = phone_map
        self.spkr_names = spkr_names  # row -> speaker, only for the rows this dataset serves in eval
        self.packed = packed
        self.num_tokens = num_tokens  # checked again on codes read from files (they may change while training)
        # per folder: local symbol id -> model phone id (-1: not in the phone map)
        self.luts = [
            np.array([phone_map.get(s, -1) for s in index.symbols] or [-1], dtype=np.int64) for index in corpus.indexes
        ]

    def _text(self, row: int) -> torch.Tensor:
        k, i = self.corpus.locate(row)
        index = self.corpus.indexes[k]
        ids = self.luts[k][index.phone_ids(i)]
        if (ids < 0).any():
            unknown = sorted({index.symbols[s] for s, v in zip(index.phone_ids(i), ids) if v < 0})
            raise DataError(f"{index.qnt_path(i)}: phones {unknown} are not in the model's phone map")
        return torch.from_numpy(np.concatenate([[self.phone_map[BOS]], ids, [self.phone_map[EOS]]]))

    def _codes(self, row: int) -> torch.Tensor:
        k, i = self.corpus.locate(row)
        index = self.corpus.indexes[k]
        if self.packed and index.shard[i] >= 0:
            codes = index.codes(i)
        else:
            path = index.qnt_path(i)
            try:
                codes = read_codes_file(path, self.num_tokens)
            except (ValueError, OSError) as e:
                raise _BadExample(path, f"{path}: {e}") from None
            if len(codes) != index.n_frames[i]:
                raise _BadExample(path, f"{path}: has {len(codes)} frames, the index {index.n_frames[i]} (changed since the start)")
        return torch.from_numpy(codes.astype(np.int64))

    def __getitem__(self, draw: Draw) -> dict[str, Any]:
        try:
            resps = self._codes(draw.index)
            if draw.segment is not None:
                start, length = draw.segment
                proms = resps[start : start + length]
            elif draw.prompts:
                proms = torch.cat([self._codes(p) for p in draw.prompts])
            else:
                proms = resps[:0]
        except _BadExample as e:
            return {"bad": str(e.path), "error": str(e)}
        return {
            "path": str(self.corpus.qnt_path(draw.index)),
            "spkr_name": self.spkr_names.get(draw.index, ""),
            "text": self._text(draw.index),
            "proms": proms,
            "resps": resps,
            "span": draw.segment,
        }

    def __len__(self) -> int:
        return len(self.corpus)


_KEYS = ("path", "spkr_name", "text", "proms", "resps", "span")


def collate(samples: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Lists of variable-length tensors (the models pad internally); unreadable examples go to ``bad``."""
    good = [s for s in samples if "bad" not in s]
    batch: dict[str, list[Any]] = {k: [s[k] for s in good] for k in _KEYS}
    batch["bad"] = [(s["bad"], s["error"]) for s in samples if "bad" in s]
    return batch


def own_cost(n_phones: np.ndarray, n_frames: np.ndarray) -> np.ndarray:
    """Sequence length of utterances without a prompt: phones + ``<s>``/``</s>`` + 2 separators + frames."""
    return n_phones + 4 + n_frames


def model_kwargs(batch: dict[str, list[Any]]) -> dict[str, Any]:
    """Extra model arguments a batch needs: the self-prompt ``prompt_spans`` (left out of the NAR's loss)."""
    spans = batch.get("span") or []
    return {"prompt_spans": spans} if any(s is not None for s in spans) else {}


def sequence_lengths(batch: dict[str, list[torch.Tensor]]) -> list[int]:
    """Per example, the model's sequence length: text + 2 separators + prompt + response."""
    return [len(t) + 2 + len(p) + len(r) for t, p, r in zip(batch["text"], batch["proms"], batch["resps"])]


# ----------------------------------------------------------------------------------------------
# the training set


@dataclass
class DataBundle:
    """Everything training needs from the data: the corpus, splits, phone map and loader factories.

    ``train``/``val`` are global corpus rows; per-row arrays (``n_frames``, ``n_phones``, ``spk``)
    are over the whole corpus (the ``data_dirs`` folders, then the ``val_dirs`` folders).
    ``val_from_dirs``: ``val`` comes from ``val_dirs`` (ordered so that its first rows cycle through
    its speakers); ``val_zero_shot``: none of its speakers is a training speaker; ``val_reports``:
    one :class:`ScanReport` per val folder.
    """

    corpus: Corpus
    train: np.ndarray
    val: np.ndarray
    spk: np.ndarray
    spkr_names: list[str]
    n_frames: np.ndarray
    n_phones: np.ndarray
    phone_map: dict[str, int]
    cfg: Config
    report: ScanReport
    val_from_dirs: bool = False
    val_zero_shot: bool = False
    val_reports: list[ScanReport] = field(default_factory=list)
    n_data_rows: int | None = None  # rows [0, n_data_rows) are data_dirs', the rest val_dirs' (None: all)

    @property
    def speakers(self) -> list[str]:
        """The training speakers' names, sorted."""
        return sorted({self.spkr_names[s] for s in np.unique(self.spk[self.train]).tolist()})

    @property
    def val_speakers(self) -> list[str]:
        """The val split's speakers' names, sorted."""
        return sorted({self.spkr_names[s] for s in np.unique(self.spk[self.val]).tolist()})

    def max_frames_per_phone(self) -> float:
        """The largest frames / phones ratio over the training utterances (0.0 without any).

        Exported with the model: synthesis stops the AR at this many frames per phone of the text
        (the length guard), so a model that never emits its stop token is still cut at a length
        no training utterance exceeded relative to its text.
        """
        rows = self.train
        if len(rows) == 0:
            return 0.0
        return float((self.n_frames[rows] / np.maximum(self.n_phones[rows], 1)).max())

    def own_cost(self, rows: np.ndarray) -> np.ndarray:
        """Sequence length of ``rows`` without a prompt: phones + ``<s>``/``</s>`` + 2 separators + frames."""
        return own_cost(self.n_phones[rows], self.n_frames[rows])

    def sampler(self, rank: int, start_batch: int = 0, **overrides: Any) -> BucketBatchSampler:
        """The training batch stream of ``rank`` from batch ``start_batch`` (``overrides``: sampler args)."""
        cfg = self.cfg
        rows, starts, _ = _group(self.train, self.spk)
        args = dict(
            batch_size=cfg.batch_size,
            batch_frames=cfg.batch_frames,
            bucket_batches=cfg.bucket_batches,
            max_prompts=cfg.max_prompts,
            p_additional_prompt=cfg.p_additional_prompt,
            seed=cfg.seed,
            rank=rank,
            start_batch=start_batch,
            prompt=prompt_kind(cfg),
            segment_frames=SEGMENT_FRAMES,
            unit=cfg.sampling_unit,
        )
        args.update(overrides)
        return BucketBatchSampler(rows, starts, self.own_cost(rows), self.n_frames[rows], **args)

    def dataset(self, rows: np.ndarray | None = None) -> VALLEDataset:
        names = {} if rows is None else {int(r): self.spkr_names[self.spk[r]] for r in rows}
        return VALLEDataset(self.corpus, self.phone_map, names, packed=self.cfg.pack_codes, num_tokens=self.cfg.num_tokens)

    def train_loader(self, rank: int, start_batch: int) -> DataLoader:
        """Endless training batches of ``rank``, starting at batch ``start_batch`` (resume, O(1))."""
        cfg = self.cfg
        return DataLoader(
            self.dataset(),
            batch_sampler=self.sampler(rank, start_batch),
            collate_fn=collate,
            num_workers=cfg.nj,
            persistent_workers=cfg.nj > 0,
            prefetch_factor=4 if cfg.nj > 0 else None,
            # Workers start fresh instead of forking a process that already runs gloo, DeepSpeed and
            # OpenMP threads (a fork can copy a lock another thread holds and hang the first batch).
            # They receive only paths and map the index themselves.
            multiprocessing_context="spawn" if cfg.nj > 0 else None,
            pin_memory=cfg.device.startswith("cuda"),
            # its own generator: starting an iterator must not draw from the global RNG (exact resume)
            generator=torch.Generator().manual_seed(cfg.seed + rank),
            worker_init_fn=leave_stop_signals_to_the_main_process if cfg.nj > 0 else None,
        )

    def eval_draws(self, split: str) -> list[Draw]:
        """Deterministic evaluation examples: ``subtrain`` (a fixed subset of train) or ``val``, each with
        prompts as in training, chosen by a fixed-seed draw: other utterances of its speaker, none, or a
        segment of itself (:func:`prompt_kind`). Speaker prompts come from the training utterances, except
        for a ``val`` from ``val_dirs``: its speakers are unseen, so their prompts are their own other val
        utterances (zero-shot)."""
        cfg = self.cfg
        if split == "subtrain":
            rows = self.train.copy()
            random.Random(f"{cfg.seed}-subtrain").shuffle(rows)
        elif split == "val":
            rows = self.val
        else:
            raise ValueError(f"unknown split {split!r}")
        rows = rows[: cfg.max_num_val]
        kind = prompt_kind(cfg)
        if kind == "none":
            return [Draw(int(r), ()) for r in rows.tolist()]
        if kind == "segment":
            draws = []
            for r in rows.tolist():
                frames = int(self.n_frames[r])
                length = int(segment_frames_of(frames, SEGMENT_FRAMES))
                rng = random.Random(f"{cfg.seed}-segment-{self.corpus.qnt_path(r)}")
                draws.append(Draw(int(r), (), (rng.randrange(frames - length + 1), length)))
            return draws
        pool, starts, spks = _group(self.val if split == "val" and self.val_from_dirs else self.train, self.spk)
        where = {int(s): j for j, s in enumerate(spks.tolist())}
        draws = []
        for r in rows.tolist():
            j = where.get(int(self.spk[r]))
            others = [] if j is None else [int(x) for x in pool[starts[j] : starts[j + 1]] if x != r]
            if not others:
                continue
            rng = random.Random(f"{cfg.seed}-prompt-{self.corpus.qnt_path(r)}")
            chosen = []
            for _ in range(cfg.max_prompts):
                chosen.append(rng.choice(others))
                if rng.random() > cfg.p_additional_prompt:
                    break
            draws.append(Draw(r, tuple(chosen)))
        return draws

    def eval_loader(self, split: str) -> DataLoader:
        draws = self.eval_draws(split)
        dataset = self.dataset(np.array([d.index for d in draws], dtype=np.int64))
        return DataLoader(draws, batch_size=self.cfg.eval_batch_size, shuffle=False, num_workers=0,
                          collate_fn=lambda ds: collate([dataset[d] for d in ds]))


def open_corpus(cfg: Config, progress: bool = True) -> tuple[Corpus, list[str], int]:
    """Open (building or refreshing as needed) the index of every ``data_dirs`` and ``val_dirs`` folder.

    Under a launcher one rank per filesystem checks and builds while the others wait, then map what
    it wrote, and all ranks verify they train on the same corpus (:func:`vall_e.corpus.open_indexes`:
    shared folders are built once, node-local copies once per node).

    Returns the corpus (the ``data_dirs`` folders that exist, then every ``val_dirs`` folder), the
    ``data_dirs`` folders that do not exist, and how many of the corpus's folders are ``data_dirs``.
    Raises :class:`DataError` when no ``data_dirs`` folder exists or a ``val_dirs`` folder does not.
    """
    from .utils import distributed

    existing = [d for d in cfg.data_dirs if Path(d).is_dir()]
    missing = [d for d in cfg.data_dirs if not Path(d).is_dir()]
    val_dirs = [d for d in cfg.val_dirs if Path(d).is_dir()]
    _check_nesting(existing, val_dirs)
    # One process: say what is missing before a long index build. Under a launcher every rank must
    # enter open_indexes first: it compares the folders each rank found (a folder missing on one node
    # is named there) and no rank may stop alone while the others wait for it in the store.
    if not distributed.active():
        _check_folders(cfg, missing)
    indexes = open_indexes(existing + val_dirs, cfg.index_root, check=cfg.index_check, pack=cfg.pack_codes,
                           rebuild=cfg.index_rebuild, nj=cfg.nj, progress=progress)
    _check_folders(cfg, missing)
    return Corpus(indexes), missing, len(existing)


def _check_folders(cfg: Config, missing: list[str]) -> None:
    """Refuse a run where no ``data_dirs`` folder exists, or a ``val_dirs`` folder does not."""
    if missing and len(missing) == len(cfg.data_dirs):
        raise DataError(ScanReport(dirs=list(cfg.data_dirs), missing_dirs=missing).explain(cfg))
    for d in cfg.val_dirs:
        if not Path(d).is_dir():
            raise DataError(
                f"val_dirs folder {d!r} does not exist (relative paths are taken from {Path.cwd()}): prepare it "
                "(e.g. python scripts/prepare_libritts.py --subsets dev-clean), fix the path, or set val_dirs=[] "
                "to hold out 5% of the training speakers' utterances instead"
            )


def _check_nesting(data_dirs: Sequence[str], val_dirs: Sequence[str]) -> None:
    """Refuse a ``data_dirs`` folder that is, or lies inside, a ``val_dirs`` folder: all of it would be val."""
    for v in val_dirs:
        val = Path(v).resolve()
        for d in data_dirs:
            data = Path(d).resolve()
            if data == val or val in data.parents:
                raise DataError(
                    f"data_dirs folder {d!r} {'is' if data == val else 'lies inside'} the val_dirs folder {v!r}: "
                    "val_dirs must hold speakers that training never hears; list a val folder of its own (one "
                    "inside a data folder is fine: it is kept out of training)"
                )


def _inside_val_dirs(corpus: Corpus, n_data: int, data_dirs: Sequence[str], val_dirs: Sequence[str]) -> np.ndarray:
    """``(rows of the data_dirs folders,)`` whether each lies inside a ``val_dirs`` folder (one nested in
    a data folder, e.g. ``data/LibriTTS/dev-clean`` in ``data/LibriTTS``): such utterances are never trained on."""
    out = np.zeros(int(corpus.starts[n_data]), bool)
    vals = [Path(v).resolve() for v in val_dirs]
    for k, (d, index) in enumerate(zip(data_dirs, corpus.indexes[:n_data])):
        root = Path(d).resolve()
        for val in vals:
            if root not in val.parents or not len(index):
                continue
            rel = val.relative_to(root).as_posix()
            nested = np.array([x == rel or x.startswith(rel + "/") for x in index.meta["dirs"]], bool)
            out[corpus.starts[k] : corpus.starts[k + 1]] |= nested[np.asarray(index.dir)]
    return out


def _filter(cfg: Config, corpus: Corpus, rows: np.ndarray, arrays: dict[str, np.ndarray], report: ScanReport) -> np.ndarray:
    """The rows of ``rows`` that training (or evaluation) can use, counting in ``report`` what each rule drops.

    ``arrays``: per-row ``status``, ``n_frames``, ``n_phones``, ``max_code``, ``spk`` over the corpus.
    """
    status, n_frames, n_phones, spk = arrays["status"][rows], arrays["n_frames"], arrays["n_phones"], arrays["spk"]
    report.n_qnt = len(rows)
    report.no_phones = int((status == NO_PHONES).sum())
    report.unreadable = int(((status == BAD_CODES) | (status == BAD_PHONES)).sum())
    keep = status == OK
    # num_tokens: the index holds each utterance's largest code (negative ones were refused when it was built)
    out_of_range = keep & (arrays["max_code"][rows] >= cfg.num_tokens)
    report.out_of_range = int(out_of_range.sum())
    for row in rows[out_of_range][:20].tolist():
        _logger.warning("skipped %s: %s", corpus.qnt_path(row), out_of_range_message(int(arrays["max_code"][row]),
                                                                                    cfg.num_tokens))
    if report.out_of_range > 20:
        _logger.warning("... and %d more utterances with a code outside 0..%d", report.out_of_range - 20,
                        cfg.num_tokens - 1)
    keep &= ~out_of_range
    nf, nph = n_frames[rows], n_phones[rows]
    rules = [
        ("too_few_phones", nph < cfg.min_phones),
        ("too_many_phones", nph > cfg.max_phones),
        ("too_short", nf < cfg.min_seconds * FRAMES_PER_SECOND),
        ("too_long", (nf > cfg.max_seconds * FRAMES_PER_SECOND) if cfg.max_seconds > 0 else np.zeros_like(keep)),
    ]
    for name, drop in rules:
        setattr(report, name, int((keep & drop).sum()))
        keep &= ~drop
    if report.no_phones:
        _logger.warning("%d .qnt.pt files of %s have no .phn.txt beside them (run `python -m vall_e.emb.g2p`)",
                        report.no_phones, report.role)

    rows = rows[keep]
    n_spk = int(spk.max()) + 1 if len(spk) else 0
    kind = prompt_kind(cfg)
    for _ in range(10):  # dropping utterances can leave speakers alone or raise their cheapest prompt
        if kind == "speaker":  # a prompt needs another utterance of the speaker
            counts = np.bincount(spk[rows], minlength=n_spk) if len(rows) else np.zeros(n_spk, np.int64)
            lonely = counts[spk[rows]] < 2
            report.lonely_speaker_utts += int(lonely.sum())
            report.lonely_speakers += int(((counts > 0) & (counts < 2)).sum())
            rows = rows[~lonely]
        if cfg.batch_frames <= 0 or not len(rows):
            break
        grouped, starts, _ = _group(rows, spk)
        least = least_prompt_frames(kind, starts, n_frames[grouped], SEGMENT_FRAMES)
        cheapest = own_cost(n_phones[grouped], n_frames[grouped]) + least
        over = grouped[cheapest > cfg.batch_frames]
        if not len(over):
            break
        report.over_budget += len(over)
        rows = np.setdiff1d(rows, over)
    if report.over_budget:
        _logger.warning(
            "%d utterances of %s cannot fit batch_frames=%d even with their speaker's shortest prompt: left out "
            "(raise batch_frames or lower max_seconds)", report.over_budget, report.role, cfg.batch_frames,
        )
    return rows


def _spread(rows: np.ndarray, spk: np.ndarray, spkr_names: list[str], keys: np.ndarray, seed: int) -> np.ndarray:
    """``rows`` reordered so that any prefix cycles through the speakers: each speaker's first utterance
    (by a seeded key of its path), then each one's second, ... (speakers in an order seeded by their
    names); so the first ``max_num_val`` val examples cover as many speakers as they can. Deterministic,
    and independent of other folders and of the order the speakers are met in."""
    if not len(rows):
        return rows
    u = _split_key(keys[rows], seed)
    s = spk[rows]
    name_key = np.array([zlib.crc32(name.encode("utf-8")) for name in spkr_names], np.uint32)
    by_speaker = np.lexsort((u, s))
    s_sorted = s[by_speaker]
    first = np.r_[0, np.flatnonzero(np.diff(s_sorted)) + 1]
    rank = np.empty(len(rows), np.int64)
    rank[by_speaker] = np.arange(len(rows)) - np.repeat(first, np.diff(np.r_[first, len(rows)]))
    speaker_key = _split_key(name_key[s], seed)
    return rows[np.lexsort((u, speaker_key, rank))]


def load_data(cfg: Config, phone_map: dict[str, int] | None = None, progress: bool = True) -> DataBundle:
    """Filter and split ``cfg.data_dirs`` (and ``cfg.val_dirs``) through their indexes; build the phone map
    unless one is given (resume)."""
    corpus, missing, n_data = open_corpus(cfg, progress)
    report = ScanReport(dirs=list(cfg.data_dirs), missing_dirs=missing)
    for d in missing:
        _logger.warning("data folder %r does not exist: skipped", d)

    spk, spkr_names = _speakers(corpus, cfg)
    arrays = {
        "status": corpus.column("status"),
        "n_frames": corpus.column("n_frames").astype(np.int64),
        "n_phones": corpus.n_phones(),
        "max_code": corpus.column("max_code"),
        "spk": spk,
    }
    n_frames, n_phones = arrays["n_frames"], arrays["n_phones"]
    candidates = np.arange(int(corpus.starts[n_data]))
    if cfg.val_dirs:
        nested = _inside_val_dirs(corpus, n_data, [d for d in cfg.data_dirs if d not in missing], cfg.val_dirs)
        report.in_val_dirs = int(nested.sum())
        if report.in_val_dirs:
            _logger.info("%d utterances of data_dirs lie inside val_dirs folders: never trained on", report.in_val_dirs)
        candidates = candidates[~nested]
    rows = _filter(cfg, corpus, candidates, arrays, report)
    if not len(rows):
        raise DataError(report.explain(cfg))

    val_reports: list[ScanReport] = []
    if cfg.val_dirs:
        train = rows
        parts = []
        for k, folder in enumerate(cfg.val_dirs, start=n_data):
            val_reports.append(ScanReport(dirs=[folder], role="val_dirs"))
            kept = _filter(cfg, corpus, np.arange(corpus.starts[k], corpus.starts[k + 1]), arrays, val_reports[-1])
            if not len(kept):
                raise DataError(val_reports[-1].explain(cfg))
            parts.append(kept)
        val = _spread(np.concatenate(parts), spk, spkr_names, corpus.column("key"), cfg.seed)
    else:
        train, val = split_train_val(rows, spk, corpus.column("key"), cfg.seed)
    used = corpus.symbols_used(rows)  # train, and without val_dirs the held-out val too
    val_only = corpus.symbols_used(val) - used if cfg.val_dirs else set()
    if phone_map is None:
        # val-only phones get ids too: never trained, but the val utterances that hold them stay usable
        phone_map = {s: i for i, s in enumerate([BOS, EOS, *sorted((used | val_only) - {BOS, EOS})], start=1)}
    else:
        unseen = sorted(used - set(phone_map))
        if unseen:
            raise DataError(
                f"the data has phones {unseen} that the checkpoint's phone map lacks; train a new model "
                f"(another ckpt_root or yaml name) or drop those utterances"
            )
        unseen_val = set(val_only) - set(phone_map)
        if unseen_val:  # the resumed model has no embedding for them: those val utterances cannot be scored
            drop = corpus.holds_symbols(val, unseen_val)
            _logger.warning("%d val utterances hold phones %s that the checkpoint's phone map lacks: left out of val",
                            int(drop.sum()), sorted(unseen_val))
            val = val[~drop]

    zero_shot = False
    if cfg.val_dirs:
        shared = np.intersect1d(np.unique(spk[train]), np.unique(spk[val]))
        zero_shot = not len(shared)
        if len(shared):
            _logger.warning(
                "%d val_dirs speakers also speak in data_dirs (%s): val is not zero-shot for them; keep their "
                "folders out of data_dirs, or check spkr_name_getter=%r", len(shared),
                ", ".join(spkr_names[s] for s in shared[:10].tolist()), cfg.spkr_name_getter,
            )
    bundle = DataBundle(corpus, train, val, spk, spkr_names, n_frames, n_phones, phone_map, cfg, report,
                        val_from_dirs=bool(cfg.val_dirs), val_zero_shot=zero_shot, val_reports=val_reports,
                        n_data_rows=int(corpus.starts[n_data]))
    if cfg.val_dirs:
        names = bundle.val_speakers
        _logger.info("val split from val_dirs %s: %d utterances of %d speakers%s (%s%s)", list(cfg.val_dirs), len(val),
                     len(names), ", unseen in training (zero-shot)" if zero_shot else "", ", ".join(names[:20]),
                     ", ..." if len(names) > 20 else "")
    return bundle


def summarize(bundle: DataBundle) -> dict[str, Any]:
    """The start-of-run data report (one JSON object in the log)."""
    hours = lambda rows: round(float(bundle.n_frames[rows].sum()) / FRAMES_PER_SECOND / 3600, 2)  # noqa: E731
    return {
        "train_utterances": len(bundle.train),
        "val_utterances": len(bundle.val),
        "train_hours": hours(bundle.train),
        "corpus_hours": hours(np.flatnonzero(bundle.n_frames[: bundle.n_data_rows] > 0)),
        "val_hours": hours(bundle.val),
        "speakers": len(bundle.speakers),
        "phones": len(bundle.phone_map),
        "sample_by": bundle.cfg.sampling_unit,
        "val_from": "val_dirs" if bundle.val_from_dirs else "held-out utterances of training speakers",
        "val_speakers": len(bundle.val_speakers),
        "val_zero_shot": bundle.val_zero_shot,
    }
