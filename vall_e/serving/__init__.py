"""Serving trained models over HTTP: ``python -m vall_e.serve`` (see :mod:`vall_e.serve`).

The pieces, each small enough to read on its own:

- :mod:`.text`: long input -> sentences;
- :mod:`.audio`: waveforms -> ``wav`` / ``pcm`` / ``flac`` bytes, the pause, ``speed``;
- :mod:`.voices`: the voices folder (``<name>.wav`` + ``<name>.txt``), uploads and their checks;
- :mod:`.engine`: batched synthesis with one random stream per request, so a seed gives the same
  audio alone or batched;
- :mod:`.batcher`: the thread that owns the models and groups waiting sentences into batches;
- :mod:`.app`: the FastAPI app (OpenAI-compatible ``POST /v1/audio/speech``, voices, health, the page).

Nothing here imports FastAPI or torch at import time.
"""
