"""Training checkpoint -> self-contained inference file.

CLI::

    python -m vall_e.export zoo/ar.pt yaml=config/LibriTTS/ar.yml [key=value ...] [--tag global_step300] [--no-clobber]

reads the DeepSpeed checkpoint that ``<ckpt_root>/<cfg_name>/latest`` points to (or ``--tag``) and
writes, atomically, one file that :func:`read_inference_file` (and plain
``torch.load(path, weights_only=True)``) loads without the training config, the dataset or
DeepSpeed. It is a plain dict::

    format          "vall_e.inference"  (FORMAT_TAG)
    format_version  1                   (FORMAT_VERSION)
    version         project version that exported it
    trained_with    project version that wrote the checkpoint
    kind            "ar" | "nar"
    preset          preset name, e.g. "ar-quarter"
    hparams         everything ``vall_e.models.build_model`` needs, among them ``arch`` and ``group_size``
                    (VALL-E 2 grouped code modeling of the AR; files without it are 1, plain VALL-E)
    phone_map       {phone: id} the model was trained with (ids from 1; 0 = padding)
    speakers        training speakers (informational)
    step            training step of the checkpoint
    max_frames_per_phone  largest frames/phones ratio of the training set (the length guard; None
                    for checkpoints written before it was recorded)
    prompt_mode     "speaker" | "paper": how the model was prompted in training; synthesis follows it
                    (checkpoints written before it was recorded were all "speaker")
    checkpoint      where it came from (informational)
    state_dict      {name: float32 tensor}

Loading DeepSpeed checkpoints safely: the ``mp_rank_00_model_states.pt`` file is read with
``torch.load(weights_only=True)``. Our trainer keeps its client state in plain types for that
reason, and the DeepSpeed metadata of fp32/fp16 runs is plain too. A few DeepSpeed optimizers
pickle small objects of their own (the bf16 optimizer's ``fragment_address``, older fp16 loss
scalers); those specific classes are allow-listed with ``torch.serialization.safe_globals``
(:func:`deepspeed_safe_globals`, shared with training resume). Anything else is refused with the class's name; ``--trust-checkpoint``
then loads the file with full unpickling, which runs code from the file: use it only for
checkpoints you wrote yourself. ZeRO stage 3 keeps the weights partitioned in the optimizer
shards; they are gathered with DeepSpeed's ``zero_to_fp32`` (which unpickles its shards itself).

Replacing an output: an existing inference file is replaced atomically, and one line says what it
held (kind, preset, step and the checkpoint it came from), so overwriting an earlier export is
never silent; ``--no-clobber`` refuses instead. A file at the output path that is not an inference
file (a training checkpoint, the config, anything unreadable) is never replaced: the command stops
before reading the checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pickle
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from .utils.errors import entry_point, torch_load_reason

FORMAT_TAG = "vall_e.inference"
FORMAT_VERSION = 1
MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"  # ZeRO-3: one file per rank
CLIENT_KEY = "vall_e"  # mirrors vall_e.utils.trainer.CLIENT_KEY (not imported: it pulls in DeepSpeed)


class ExportError(RuntimeError):
    """A checkpoint that cannot be exported; the message names the path and what to do."""


class InferenceFileError(RuntimeError):
    """An inference file that cannot be used; the message names the path and what to do."""


def deepspeed_safe_globals() -> list[Any]:
    """DeepSpeed classes that may appear pickled inside its checkpoint files (plain data holders).

    Shared with training resume (:func:`vall_e.utils.engines.make_loads_safe`).
    """
    found: list[Any] = []
    for module, name in (
        ("deepspeed.utils.tensor_fragment", "fragment_address"),
        ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
        ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
        ("deepspeed.runtime.zero.config", "ZeroStageEnum"),  # in ZeRO optimizer shards (training resume)
    ):
        try:
            found.append(getattr(__import__(module, fromlist=[name]), name))
        except Exception:  # absent in this DeepSpeed version, or DeepSpeed not installed
            pass
    return found


# --------------------------------------------------------------------------------------------
# reading DeepSpeed checkpoints


TRUST_HINT = "If you wrote this checkpoint yourself, rerun with --trust-checkpoint to load it with full unpickling"


def _load_states(path: Path, trust_checkpoint: bool, trust_hint: str = TRUST_HINT) -> dict[str, Any]:
    import torch

    if trust_checkpoint:
        # Full unpickling runs code from the file; the user vouched for it (--trust-checkpoint).
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # retried below with DeepSpeed's data classes allowed (importing DeepSpeed is slow, so only now)
    if not hasattr(torch.serialization, "safe_globals"):  # the floor in setup.py: added in torch 2.5
        raise ExportError(
            f"{path}: holds DeepSpeed objects whose safe load needs torch >= 2.5 (torch.serialization.safe_globals); "
            f"this is torch {torch.__version__}. Upgrade torch. {trust_hint}."
        )
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        blocked = re.findall(r"GLOBAL ([\w.]+)", str(e))
        what = f"a pickled object of type {blocked[0]}" if blocked else "pickled Python objects"
        raise ExportError(
            f"{path}: contains {what}, which a safe (weights-only) load refuses. {trust_hint} "
            "(never do that for files from elsewhere)."
        ) from None


def _float32(state: dict[str, Any]) -> dict[str, Any]:
    """CPU copies, floating tensors as float32 (fp16/bf16 runs keep half-precision module weights)."""
    out = {}
    for name, t in state.items():
        t = t.detach().cpu()
        out[name] = (t.float() if t.is_floating_point() else t).clone().contiguous()
    return out


def read_checkpoint(
    ckpt_dir: str | Path, tag: str | None = None, trust_checkpoint: bool = False, trust_hint: str = TRUST_HINT
) -> dict[str, Any]:
    """Load a training checkpoint into the inference-file dict (without writing it).

    Args:
        ckpt_dir: ``<ckpt_root>/<cfg_name>``, holding ``latest`` and ``<tag>/``.
        tag: checkpoint folder name, e.g. ``global_step300``; None reads ``latest``.
        trust_checkpoint: allow full unpickling of objects the safe load refuses.
        trust_hint: what the caller's user can do about a refused pickle, in the words of their
            command (export has ``--trust-checkpoint``; other callers say what works for them).
    Raises:
        ExportError: missing, unreadable or foreign checkpoint; the message says what to do.
    """
    ckpt_dir = Path(ckpt_dir)
    if tag is None:
        latest = ckpt_dir / "latest"
        if not latest.is_file():
            hint = (
                "the folder does not exist" if not ckpt_dir.exists()
                else f"it holds no 'latest' file ({', '.join(sorted(p.name for p in ckpt_dir.iterdir())) or 'empty'})"
            )
            raise ExportError(
                f"no checkpoint to export in {ckpt_dir}: {hint}. Train first with "
                "`python -m vall_e.train yaml=<the same config>`, or pass the yaml=/ckpt_root= the training used."
            )
        tag = latest.read_text(encoding="utf-8", errors="replace").strip()
        if not tag:
            raise ExportError(f"{latest} is empty; write the checkpoint folder name into it (e.g. global_step300) or pass --tag")
    tag_dir = ckpt_dir / tag
    states_path = tag_dir / MODEL_STATES
    zero3 = False
    if not states_path.is_file() and (tag_dir / ZERO3_MODEL_STATES).is_file():
        states_path, zero3 = tag_dir / ZERO3_MODEL_STATES, True
    if not states_path.is_file():
        available = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir()) if ckpt_dir.is_dir() else []
        raise ExportError(
            f"checkpoint {tag!r} has no {states_path}: the checkpoint is missing or incomplete "
            f"(checkpoints in {ckpt_dir}: {available or 'none'}). Pass --tag <one of them> or train again."
        )
    try:
        states = _load_states(states_path, trust_checkpoint, trust_hint)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(
            f"{states_path} cannot be read ({type(e).__name__}: {torch_load_reason(e)}); "
            "the file is corrupt or truncated. Export an earlier checkpoint with --tag, or train again."
        ) from None
    if not isinstance(states, dict) or "module" not in states:
        raise ExportError(f"{states_path} is not a DeepSpeed model-states file (no 'module' entry)")
    client = states.get(CLIENT_KEY)
    if not isinstance(client, dict):
        raise ExportError(
            f"{states_path} was not written by `python -m vall_e.train` (no {CLIENT_KEY!r} client state); "
            "only this project's training checkpoints can be exported"
        )
    stage = ((states.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0)
    if zero3 or stage == 3:
        state_dict = _zero3_state_dict(ckpt_dir, tag)
    else:
        state_dict = states["module"]

    hparams = client.get("hparams")
    preset = client.get("model") or (hparams or {}).get("preset")
    if hparams is None:
        raise ExportError(f"{states_path}: the client state has no model hparams; retrain with the current vall_e.train")
    phone_map = client.get("phone_map")
    if phone_map is None and (ckpt_dir / "phone_map.json").is_file():
        phone_map = json.loads((ckpt_dir / "phone_map.json").read_text(encoding="utf-8"))
    if not phone_map:
        raise ExportError(f"{states_path}: no phone map in the checkpoint nor {ckpt_dir / 'phone_map.json'}")
    from .version import __version__

    return {
        "format": FORMAT_TAG,
        "format_version": FORMAT_VERSION,
        "version": __version__,
        "trained_with": str(client.get("version", "unknown")),
        "kind": hparams["kind"],
        "preset": preset,
        "hparams": dict(hparams),
        "phone_map": {str(k): int(v) for k, v in phone_map.items()},
        "speakers": [str(s) for s in client.get("speakers", [])],
        "step": int(client.get("step", 0)),
        "max_frames_per_phone": _optional_float(client.get("max_frames_per_phone")),
        "prompt_mode": str(client.get("prompt_mode", "speaker")),
        "checkpoint": str(tag_dir),
        "state_dict": _float32(state_dict),
    }


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _zero3_state_dict(ckpt_dir: Path, tag: str) -> dict[str, Any]:
    """Gather ZeRO-3 partitioned weights into one fp32 state dict with DeepSpeed's own tool."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as e:
        raise ExportError(f"{ckpt_dir}/{tag} is a ZeRO stage 3 checkpoint; exporting it needs DeepSpeed ({e})") from None
    try:
        with contextlib.redirect_stdout(sys.stderr):  # it prints progress; keep our stdout clean
            return dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag))
    except Exception as e:
        raise ExportError(
            f"cannot gather the ZeRO-3 weights of {ckpt_dir}/{tag} ({type(e).__name__}: {e}); "
            "the optimizer shards (*_optim_states.pt) are missing or corrupt"
        ) from None


def check_loads(data: dict[str, Any]) -> None:
    """Build the model from ``data["hparams"]`` and load ``data["state_dict"]`` strictly."""
    from .models import build_model

    model = build_model(data["hparams"])
    model.load_state_dict(data["state_dict"], strict=True)


def export(
    out_path: str | Path, ckpt_dir: str | Path, tag: str | None = None, trust_checkpoint: bool = False,
    clobber: bool = True,
) -> dict[str, Any]:
    """Export ``ckpt_dir``'s latest (or ``tag``) checkpoint to ``out_path`` atomically; returns what was written.

    An existing inference file at ``out_path`` is replaced with a note on stderr naming what it held
    (``clobber=False`` refuses instead); any other file there is never replaced (see the module doc).

    Raises:
        ExportError: an unusable checkpoint, or an output that must not be replaced.
        vall_e.utils.outputs.OutputError: an output path that cannot be written (a folder, read-only).
    """
    from .utils.outputs import writable_file

    out_path = Path(out_path)
    writable_file(out_path, "output")  # before the (possibly minutes-long) checkpoint read
    previous = previous_export(out_path, clobber)
    data = read_checkpoint(ckpt_dir, tag, trust_checkpoint)
    try:
        check_loads(data)
    except Exception as e:
        raise ExportError(f"the weights in {data['checkpoint']} do not fit the saved hparams: {e}") from None
    _save(data, out_path)
    if previous is not None:
        print(f"note: replaced {out_path} ({previous})", file=sys.stderr)
    return data


def previous_export(path: Path, clobber: bool = True) -> str | None:
    """What the existing file at ``path`` holds (for the 'replaced' note), or None when there is none.

    Reads only the metadata (``mmap``: the weights are not loaded).

    Raises:
        ExportError: ``clobber`` is False, or the file is not an inference file (never replaced).
    """
    import torch

    if not path.exists():
        return None
    if path.stat().st_size == 0:
        return "an empty file"
    if not clobber:
        raise ExportError(f"{path} exists and --no-clobber was given; choose another output name, or drop "
                          "--no-clobber to replace it")
    try:
        old = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        old, reason = None, torch_load_reason(e)
    else:
        reason = "no vall_e format tag"
    if not isinstance(old, dict) or old.get("format") != FORMAT_TAG:
        raise ExportError(f"{path} exists and is not a vall_e inference file ({reason}), so it is left as it is; "
                          "choose another output name, or move that file away first")
    return (f"the {str(old.get('kind', '?')).upper()} {old.get('preset') or ''} export of step {old.get('step', '?')} "
            f"from {old.get('checkpoint', 'an unknown checkpoint')}").replace("  ", " ")


def _save(data: dict[str, Any], path: Path) -> None:
    """``torch.save`` through a temporary file and a rename; a full disk is an ``OSError`` naming ``path``.

    Saved into an open file, not a path: a failed write to a path surfaces only as torch's
    RuntimeError ("unexpected pos"); to a file object, the real ``OSError`` (ENOSPC, EROFS ...) is
    raised or, when torch's writer fails again while closing, is that RuntimeError's context.
    """
    import torch

    from .utils.helpers import atomic_path

    with atomic_path(path) as tmp:
        try:
            with open(tmp, "wb") as f:
                torch.save(data, f)
        except (OSError, RuntimeError) as e:
            cause = e if isinstance(e, OSError) else e.__context__
            if not isinstance(cause, OSError) or cause.errno is None:
                raise
            raise OSError(cause.errno, cause.strerror, str(path)) from None


# --------------------------------------------------------------------------------------------
# reading inference files


def read_inference_file(path: str | Path) -> dict[str, Any]:
    """Load and check an exported file (``torch.load(weights_only=True)``); tensors on CPU.

    Raises:
        InferenceFileError: missing, corrupt, a raw training checkpoint, or a newer format.
    """
    import torch

    path = Path(path)
    how = f"export one with `python -m vall_e.export {path} yaml=<the training config>`"
    if path.is_dir():
        raise InferenceFileError(f"{path} is a folder; give the exported model file, e.g. {path / 'ar.pt'}")
    if not path.is_file():
        raise InferenceFileError(f"{path}: no such file; {how}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InferenceFileError(
            f"{path}: cannot be loaded ({torch_load_reason(e)}); the file is corrupt, truncated or not a vall_e "
            f"inference file. Re-export it: {how}"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_TAG:
        if isinstance(data, dict) and CLIENT_KEY in data and "module" in data:
            raise InferenceFileError(
                f"{path} is a DeepSpeed training checkpoint, not an inference file; "
                f"{how.replace(str(path), 'zoo/model.pt')} and use that"
            )
        raise InferenceFileError(f"{path} is not a vall_e inference file (no format tag {FORMAT_TAG!r}); {how}")
    if int(data.get("format_version", 0)) > FORMAT_VERSION:
        raise InferenceFileError(
            f"{path} has format version {data['format_version']} but this vall_e ({_version()}) reads up to "
            f"{FORMAT_VERSION}; update vall_e"
        )
    missing = [k for k in ("kind", "hparams", "phone_map", "state_dict") if k not in data]
    if missing:
        raise InferenceFileError(f"{path} lacks {missing}; re-export it: {how}")
    return data


def _version() -> str:
    from .version import __version__

    return __version__


# --------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (config words such as ``yaml=...`` are split off before it)."""
    parser = argparse.ArgumentParser(
        prog="python -m vall_e.export",
        description="Write the latest training checkpoint of a config as a self-contained inference file.",
        epilog="Config words: yaml=<training config> (names the checkpoint folder <ckpt_root>/<cfg_name>), "
        "key=value overrides such as ckpt_root=..., help=true lists the fields.",
    )
    parser.add_argument("out", type=Path, help="output file, e.g. zoo/ar.pt")
    parser.add_argument("--tag", default=None, help="checkpoint folder to export instead of 'latest', e.g. global_step300")
    parser.add_argument(
        "--trust-checkpoint", action="store_true",
        help="load the checkpoint with full unpickling when the safe load refuses it (only for your own files)",
    )
    parser.add_argument("--no-clobber", action="store_true",
                        help="refuse to replace an existing output file (default: replace it atomically, saying "
                        "what it held)")
    return parser


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    from .config import Config

    argv = list(sys.argv[1:] if argv is None else argv)
    words, rest = Config.split_argv(argv)
    cfg = Config.from_cli(words)
    parser = build_parser()
    args = parser.parse_args(rest)
    if cfg.yaml_path is None:
        print(
            f"note: no yaml= given, so the checkpoint folder is {cfg.ckpt_dir}; pass the training config "
            "as yaml=config/<name>.yml to export its run",
            file=sys.stderr,
        )
    try:
        data = export(args.out, cfg.ckpt_dir, args.tag, args.trust_checkpoint, clobber=not args.no_clobber)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_params = sum(t.numel() for t in data["state_dict"].values())
    if data["preset"] and cfg.yaml_path is not None and data["preset"] != cfg.model:
        print(f"note: the checkpoint holds preset {data['preset']!r}, the config says model={cfg.model!r}", file=sys.stderr)
    print(
        f"exported {data['kind'].upper()} {data['preset']} ({n_params / 1e6:.2f}M parameters, step {data['step']}, "
        f"{len(data['phone_map'])} phones) from {data['checkpoint']} to {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
