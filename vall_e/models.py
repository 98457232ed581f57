"""The model factory: a preset name or saved hyper-parameters -> an :class:`~vall_e.ar.AR` or :class:`~vall_e.nar.NAR`.

Kept apart from :mod:`vall_e.base` so the shared transformer does not import the models built on it.
"""

from __future__ import annotations

from .ar import AR
from .base import PRESETS, Base, ModelConfig
from .nar import NAR

__all__ = ["PRESETS", "get_model", "build_model"]


def get_model(name: str, **overrides) -> Base:
    """Build a fresh model from a preset name, e.g. ``get_model("ar-quarter", n_text_tokens=128)``."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return build_model({**PRESETS[name], "preset": name, **overrides})


def build_model(hparams: dict) -> Base:
    """Rebuild a model (untrained) from ``model.hparams``; load its ``state_dict`` afterwards."""
    config = ModelConfig(**hparams)
    return (AR if config.kind == "ar" else NAR)(config)
