"""VALL-E: neural codec language models for zero-shot text to speech."""

from .version import __version__

__all__ = ["__version__"]
