"""Dataset: utterance discovery, filtering, train/val splits, phone symbols, prompts, dataloaders.

An utterance is ``<id>.qnt.pt`` (EnCodec codes ``(1, 8, T)``) with ``<id>.phn.txt`` beside it. Phones
are wrapped as ``<s> … </s>`` and mapped to ids through a symbol map built from the training set
(id 0 is padding). Each training example gets an acoustic prompt made of other utterances of the
same speaker (:mod:`vall_e.sampler`).
"""

from __future__ import annotations

import json
import logging
import random
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from .config import Config
from .sampler import Draw, SpeakerBalancedBatchSampler
from .utils.helpers import atomic_write_text, find_files, sibling

_logger = logging.getLogger(__name__)

BOS, EOS = "<s>", "</s>"
N_CODEBOOKS = 8
VAL_FRACTION = 0.05


class DataError(RuntimeError):
    """A dataset problem a user must fix; the message names the file or the rule."""


@dataclass
class Utterance:
    qnt_path: str
    spkr: str
    phones: list[str]
    n_frames: int = -1  # -1 until known (only needed for batch_frames)


@dataclass
class ScanReport:
    """What discovery found and what each rule dropped, for the "nothing to train on" diagnosis."""

    dirs: list[str]
    n_qnt: int = 0
    missing_dirs: list[str] = field(default_factory=list)
    no_phones: list[str] = field(default_factory=list)
    too_few_phones: int = 0
    too_many_phones: int = 0
    lonely_speaker_utts: int = 0
    lonely_speakers: int = 0

    def explain(self, cfg: Config) -> str:
        lines = [
            "no utterance is left to train on.",
            f"  folders searched (data_dirs): {self.dirs or '[] (set data_dirs in the yaml or data_dirs=[...])'}",
        ]
        for d in self.missing_dirs:
            lines.append(f"  folder {d!r} does not exist (relative paths are taken from {Path.cwd()})")
        lines += [
            f"  <id>.qnt.pt files found: {self.n_qnt}"
            + ("  (run `python -m vall_e.emb.qnt <folder>` to make them)" if self.n_qnt == 0 else ""),
            f"  dropped, no <id>.phn.txt beside the codes: {len(self.no_phones)}"
            + ("  (run `python -m vall_e.emb.g2p <folder>`)" if self.no_phones else ""),
            f"  dropped, fewer than min_phones={cfg.min_phones} phones: {self.too_few_phones}",
            f"  dropped, more than max_phones={cfg.max_phones} phones: {self.too_many_phones}",
            f"  dropped, speaker has fewer than 2 utterances (no prompt possible): {self.lonely_speaker_utts}"
            f" utterances of {self.lonely_speakers} speakers"
            + (f"  (speakers come from spkr_name_getter={cfg.spkr_name_getter!r})" if self.lonely_speakers else ""),
        ]
        return "\n".join(lines)


def read_phones(path: str | Path) -> list[str]:
    """Phones of one ``.phn.txt`` (single spaces between phones)."""
    return Path(path).read_text(encoding="utf-8").split()


def load_codes(path: str | Path) -> torch.Tensor:
    """Load ``<id>.qnt.pt`` and return ``(T, 8)`` int64 codes; errors name the file and what is wrong."""
    try:
        codes = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"{path}: cannot be loaded as a tensor ({e}); delete it and rerun `python -m vall_e.emb.qnt`") from None
    if not isinstance(codes, torch.Tensor) or codes.dim() != 3 or codes.shape[:2] != (1, N_CODEBOOKS):
        shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise DataError(
            f"{path}: expected EnCodec codes shaped (1, {N_CODEBOOKS}, T), found {shape}; "
            "recreate it with `python -m vall_e.emb.qnt`"
        )
    if codes.is_floating_point() or codes.shape[-1] == 0:
        raise DataError(f"{path}: codes must be a non-empty integer tensor; recreate it with `python -m vall_e.emb.qnt`")
    return codes[0].t().to(torch.int64).contiguous()


def scan(cfg: Config) -> tuple[list[Utterance], ScanReport]:
    """Find every usable utterance under ``cfg.data_dirs`` and report what each rule dropped."""
    report = ScanReport(dirs=list(cfg.data_dirs))
    get_spkr = cfg.get_spkr
    found: list[Utterance] = []
    for d in cfg.data_dirs:
        if not Path(d).exists():
            report.missing_dirs.append(d)
            continue
        for qnt in find_files(d, ".qnt.pt"):
            report.n_qnt += 1
            phn = sibling(qnt, ".phn.txt")
            if not phn.exists():
                report.no_phones.append(str(qnt))
                continue
            phones = read_phones(phn)
            if len(phones) < cfg.min_phones:
                report.too_few_phones += 1
                continue
            if len(phones) > cfg.max_phones:
                report.too_many_phones += 1
                continue
            found.append(Utterance(str(qnt), get_spkr(qnt), phones))
    by_spkr: dict[str, list[Utterance]] = defaultdict(list)
    for u in found:
        by_spkr[u.spkr].append(u)
    kept = []
    for spkr, utts in by_spkr.items():
        if len(utts) < 2:
            report.lonely_speakers += 1
            report.lonely_speaker_utts += len(utts)
        else:
            kept += utts
    if report.no_phones:
        _logger.warning("%d .qnt.pt files have no .phn.txt beside them, e.g. %s", len(report.no_phones), report.no_phones[0])
    return kept, report


def split_train_val(utts: Sequence[Utterance], seed: int) -> tuple[list[Utterance], list[Utterance]]:
    """Per speaker, a fixed-seed shuffle puts ``floor(5%)`` of utterances in val (none for tiny speakers)."""
    by_spkr: dict[str, list[Utterance]] = defaultdict(list)
    for u in sorted(utts, key=lambda u: u.qnt_path):
        by_spkr[u.spkr].append(u)
    train, val = [], []
    for spkr in sorted(by_spkr):
        group = by_spkr[spkr]
        random.Random(f"{seed}-{spkr}").shuffle(group)
        n_val = int(len(group) * VAL_FRACTION)
        val += group[:n_val]
        train += group[n_val:]
    return train, val


def build_phone_map(utts: Iterable[Utterance]) -> dict[str, int]:
    """Symbols sorted, ``<s>``/``</s>`` first, ids from 1 (0 is padding)."""
    symbols = sorted({p for u in utts for p in u.phones} - {BOS, EOS})
    return {s: i for i, s in enumerate([BOS, EOS, *symbols], start=1)}


def encode_phones(phones: Sequence[str], phone_map: dict[str, int], where: str = "") -> torch.Tensor:
    """``["HH", "AH0"]`` -> ``(t,)`` ids of ``<s> HH AH0 </s>``; unknown phones raise with their names."""
    unknown = sorted({p for p in phones if p not in phone_map})
    if unknown:
        raise DataError(
            f"{where + ': ' if where else ''}phones {unknown} are not in the model's phone map "
            f"({len(phone_map)} symbols learned from the training set)"
        )
    return torch.tensor([phone_map[BOS], *(phone_map[p] for p in phones), phone_map[EOS]], dtype=torch.long)


class VALLEDataset(Dataset):
    """Examples for the models: ``{"text": (t,), "proms": (t', 8), "resps": (t'', 8), ...}``.

    Indexed by :class:`vall_e.sampler.Draw` (training: prompts chosen by the sampler) or by ``int``
    (evaluation: prompts chosen deterministically from the other training utterances of the speaker).
    """

    def __init__(
        self,
        utts: Sequence[Utterance],
        phone_map: dict[str, int],
        prompt_pool: dict[str, list[Utterance]] | None = None,
        max_prompts: int = 3,
        p_additional_prompt: float = 0.8,
        seed: int = 0,
    ):
        self.utts = list(utts)
        self.phone_map = phone_map
        self.prompt_pool = prompt_pool if prompt_pool is not None else group_by_speaker(self.utts)
        self.max_prompts = max_prompts
        self.p_additional_prompt = p_additional_prompt
        self.seed = seed

    def __len__(self) -> int:
        return len(self.utts)

    def _eval_prompts(self, index: int) -> list[Utterance]:
        u = self.utts[index]
        others = [p for p in self.prompt_pool.get(u.spkr, []) if p.qnt_path != u.qnt_path]
        if not others:
            raise DataError(f"{u.qnt_path}: speaker {u.spkr!r} has no other utterance to use as a prompt")
        rng = random.Random(f"{self.seed}-prompt-{u.qnt_path}")
        chosen = []
        for _ in range(self.max_prompts):
            chosen.append(rng.choice(others))
            if rng.random() > self.p_additional_prompt:
                break
        return chosen

    def __getitem__(self, key: Draw | int) -> dict[str, Any]:
        if isinstance(key, Draw):
            u = self.utts[key.index]
            prompt_utts = [self.utts[i] for i in key.prompts]
        else:
            u = self.utts[key]
            prompt_utts = self._eval_prompts(key)
        return {
            "path": u.qnt_path,
            "spkr_name": u.spkr,
            "text": encode_phones(u.phones, self.phone_map, where=str(sibling(u.qnt_path, ".phn.txt"))),
            "proms": torch.cat([load_codes(p.qnt_path) for p in prompt_utts]),
            "resps": load_codes(u.qnt_path),
        }


def collate(samples: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Lists of variable-length tensors: the models pad internally."""
    return {k: [s[k] for s in samples] for k in samples[0]}


def group_by_speaker(utts: Iterable[Utterance]) -> dict[str, list[Utterance]]:
    groups: dict[str, list[Utterance]] = defaultdict(list)
    for u in utts:
        groups[u.spkr].append(u)
    return dict(groups)


@dataclass
class DataBundle:
    """Everything training needs from the data: splits, phone map and dataloader factories."""

    train: list[Utterance]
    val: list[Utterance]
    phone_map: dict[str, int]
    cfg: Config

    @property
    def speakers(self) -> list[str]:
        return sorted({u.spkr for u in self.train})

    def train_loader(self, rank: int, start_batch: int) -> DataLoader:
        """Endless speaker-balanced training batches; ``start_batch`` batches are skipped (resume)."""
        cfg = self.cfg
        if cfg.batch_frames > 0:
            _ensure_frame_counts(self.train)
        index = {u.qnt_path: i for i, u in enumerate(self.train)}
        groups = [[index[u.qnt_path] for u in g] for g in group_by_speaker(self.train).values()]
        costs = [u.n_frames + len(u.phones) + 2 for u in self.train]
        sampler = SpeakerBalancedBatchSampler(
            groups,
            costs,
            batch_size=cfg.batch_size,
            batch_frames=cfg.batch_frames,
            max_prompts=cfg.max_prompts,
            p_additional_prompt=cfg.p_additional_prompt,
            seed=cfg.seed,
            rank=rank,
            start_batch=start_batch,
        )
        dataset = VALLEDataset(self.train, self.phone_map, seed=cfg.seed)
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=cfg.nj,
            persistent_workers=cfg.nj > 0,
            prefetch_factor=4 if cfg.nj > 0 else None,
            # Workers start fresh instead of forking a process that already runs gloo, DeepSpeed and
            # OpenMP threads (a fork can copy a lock another thread holds and hang the first batch).
            multiprocessing_context="spawn" if cfg.nj > 0 else None,
            pin_memory=cfg.device.startswith("cuda"),
            # its own generator: creating the loader must not advance the global RNG (exact resume)
            generator=torch.Generator().manual_seed(cfg.seed + rank),
        )

    def eval_loader(self, split: str) -> DataLoader:
        """Deterministic evaluation batches: ``subtrain`` (a fixed subset of train) or ``val``."""
        cfg = self.cfg
        if split == "subtrain":
            utts = list(self.train)
            random.Random(f"{cfg.seed}-subtrain").shuffle(utts)
        elif split == "val":
            utts = list(self.val)
        else:
            raise ValueError(f"unknown split {split!r}")
        utts = utts[: cfg.max_num_val]
        dataset = VALLEDataset(
            utts,
            self.phone_map,
            prompt_pool=group_by_speaker(self.train),
            max_prompts=cfg.max_prompts,
            p_additional_prompt=cfg.p_additional_prompt,
            seed=cfg.seed,
        )
        return DataLoader(dataset, batch_size=cfg.eval_batch_size, shuffle=False, collate_fn=collate, num_workers=0)


def _ensure_frame_counts(utts: Sequence[Utterance]) -> None:
    from tqdm import tqdm

    todo = [u for u in utts if u.n_frames < 0]
    for u in tqdm(todo, desc="reading frame counts", unit="file", disable=len(todo) < 200):
        u.n_frames = load_codes(u.qnt_path).shape[0]


def load_data(cfg: Config, phone_map: dict[str, int] | None = None) -> DataBundle:
    """Scan, filter and split ``cfg.data_dirs``; build the phone map unless one is given (resume).

    With ``cache_dataloader`` the scanned index is kept in ``<ckpt_dir>/data_index.json`` and reused
    while the set of folders and filters is unchanged (delete the file after adding data).
    """
    utts = _load_index_cache(cfg) if cfg.cache_dataloader else None
    if utts is None:
        utts, report = scan(cfg)
        if not utts:
            raise DataError(report.explain(cfg))
        if cfg.cache_dataloader:
            _save_index_cache(cfg, utts)
    train, val = split_train_val(utts, cfg.seed)
    if phone_map is None:
        phone_map = build_phone_map(train)
    else:
        unseen = sorted({p for u in train + val for p in u.phones} - set(phone_map))
        if unseen:
            raise DataError(
                f"the data has phones {unseen} that the checkpoint's phone map lacks; train a new model "
                f"(another ckpt_root or yaml name) or drop those utterances"
            )
    return DataBundle(train, val, phone_map, cfg)


def _cache_key(cfg: Config) -> dict[str, Any]:
    return {
        "data_dirs": list(cfg.data_dirs),
        "spkr_name_getter": cfg.spkr_name_getter,
        "min_phones": cfg.min_phones,
        "max_phones": cfg.max_phones,
    }


def _load_index_cache(cfg: Config) -> list[Utterance] | None:
    path = cfg.ckpt_dir / "data_index.json"
    if not path.exists():
        return None
    blob = json.loads(path.read_text(encoding="utf-8"))
    if blob.get("key") != _cache_key(cfg):
        return None
    _logger.info("using the cached dataset index %s", path)
    return [Utterance(**u) for u in blob["utterances"]]


def _save_index_cache(cfg: Config, utts: Sequence[Utterance]) -> None:
    blob = {"key": _cache_key(cfg), "utterances": [asdict(u) for u in utts]}
    atomic_write_text(json.dumps(blob), cfg.ckpt_dir / "data_index.json")


def summarize(bundle: DataBundle) -> dict[str, Any]:
    return {
        "train_utterances": len(bundle.train),
        "val_utterances": len(bundle.val),
        "speakers": len(bundle.speakers),
        "phones": len(bundle.phone_map),
    }

