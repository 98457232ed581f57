"""VALL-E: neural codec language models for zero-shot text to speech."""

from typing import Any

from .version import __version__

__all__ = ["__version__", "synthesize", "Synthesizer"]

_LAZY = {"synthesize": "inference", "Synthesizer": "inference"}


def __getattr__(name: str) -> Any:
    # Lazy: `import vall_e` stays cheap (no torch, no models) until the API is used.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
