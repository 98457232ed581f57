"""Serve trained models over HTTP: an OpenAI-compatible speech API, voices, streaming, batching, a page.

::

    python -m vall_e.serve --ar-ckpt zoo/ar.pt --nar-ckpt zoo/nar.pt --voices voices/ [--port 8000]

then ``http://127.0.0.1:8000/`` is a page to listen to the checkpoint, and any OpenAI client speaks
to it::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.audio.speech.create(model="vall-e", voice="alice", input="Hello there.",
                               response_format="wav", extra_body={"seed": 1}).write_to_file("out.wav")

The models are loaded once, from the command line only; it listens on 127.0.0.1 unless ``--host``
says otherwise. Config words such as ``codec_weights=untrained`` are accepted (``help=true`` lists
them). The app itself is :mod:`vall_e.serving.app`.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

logger = logging.getLogger("vall_e.serve")

EXAMPLES = """examples:
  python -m vall_e.serve --ar-ckpt zoo/ar.pt --nar-ckpt zoo/nar.pt --voices voices/
  VALL_E_API_KEY=secret python -m vall_e.serve --ar-ckpt ... --nar-ckpt ... --host 0.0.0.0 --port 8000
  python -m vall_e.serve --ar-ckpt ... --nar-ckpt ... codec_weights=untrained   (offline: NOT speech)

a voice is VOICES/<name>.wav (a few seconds of one speaker) with VOICES/<name>.txt (what it says);
models trained with prompt_mode=paper need the transcript. Without --voices, uploads go to a
temporary folder that lives as long as the server.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vall_e.serve", description=__doc__.split("\n")[0],
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ar-ckpt", required=True, type=Path, help="exported AR model (python -m vall_e.export)")
    p.add_argument("--nar-ckpt", required=True, type=Path, help="exported NAR model")
    p.add_argument("--voices", type=Path, default=None, metavar="DIR",
                   help="voices folder: <name>.wav + <name>.txt; uploads are stored here (default: a temporary folder)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one and logs it)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: the VALL_E_API_KEY variable, else none)")
    p.add_argument("--max-batch", type=int, default=8, help="most sentences per batched AR/NAR call (default 8)")
    p.add_argument("--workers", type=int, default=0,
                   help="batches that may run at the same time, each on its share of the CPU threads (default 0 = "
                        "auto: 1 on a GPU; on a CPU 2 when it has at least 2 threads, which overlaps one batch's "
                        "memory-bound AR steps with another's compute-bound NAR passes); 1 gives a lone request all "
                        "the threads")
    p.add_argument("--batch-window-ms", type=float, default=20.0,
                   help="how long a sentence that finds the models idle waits for others to batch with (default 20)")
    p.add_argument("--max-queue", type=int, default=32,
                   help="most requests in progress (synthesizing or waiting); more are answered 503 with Retry-After "
                        "(default 32)")
    p.add_argument("--max-chars", type=int, default=4000, help="longest input text, in characters (default 4000)")
    p.add_argument("--max-sentence-chars", type=int, default=250,
                   help="longer sentences are split at commas, then spaces (default 250)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest voice upload, MB (default 10)")
    p.add_argument("--max-voice-seconds", type=float, default=30.0, help="longest voice recording (default 30)")
    p.add_argument("--max-voices", type=int, default=1000, help="uploads stop when the folder holds this many (default 1000)")
    p.add_argument("--pause", type=float, default=0.25, help="silence between sentences, seconds (default 0.25)")
    p.add_argument("--prompt-seconds", type=float, default=3.0,
                   help="use the first N seconds of a voice as the prompt of prompt_mode=speaker models (default 3)")
    p.add_argument("--max-ar-steps", type=int, default=1000,
                   help="most AR frames per sentence (75 per second); requests may ask for fewer (default 1000)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def settings_from_args(args: argparse.Namespace, voices_dir: Path, environ: Optional[dict] = None) -> Any:
    """The app's :class:`~vall_e.serving.app.Settings` from parsed arguments (the key falls back to VALL_E_API_KEY)."""
    from .serving.app import Settings

    environ = os.environ if environ is None else environ
    api_key = args.api_key if args.api_key is not None else (environ.get("VALL_E_API_KEY") or None)
    checks = [(args.max_batch >= 1, "--max-batch must be at least 1"),
              (args.max_queue >= 1, "--max-queue must be at least 1"),
              (args.workers >= 0, "--workers must be >= 0 (0 = auto)"),
              (args.max_chars >= 1, "--max-chars must be at least 1"),
              (args.max_sentence_chars >= 20, "--max-sentence-chars must be at least 20"),
              (args.max_upload_mb > 0, "--max-upload-mb must be positive"),
              (args.max_voice_seconds > 0.5, "--max-voice-seconds must be above 0.5"),
              (args.pause >= 0, "--pause must be >= 0"),
              (args.batch_window_ms >= 0, "--batch-window-ms must be >= 0"),
              (args.max_ar_steps >= 1, "--max-ar-steps must be at least 1"),
              (api_key is None or len(api_key) >= 8, "the API key must have at least 8 characters")]
    for ok, message in checks:
        if not ok:
            raise SystemExit(f"error: {message}")
    return Settings(voices_dir=voices_dir, api_key=api_key, max_batch=args.max_batch,
                    batch_window_s=args.batch_window_ms / 1000, max_queue=args.max_queue, max_chars=args.max_chars,
                    max_sentence_chars=args.max_sentence_chars, max_upload_bytes=int(args.max_upload_mb * 2**20),
                    max_voice_seconds=args.max_voice_seconds, max_voices=args.max_voices, pause_s=args.pause,
                    prompt_seconds=args.prompt_seconds, max_ar_steps=args.max_ar_steps, workers=args.workers)


def plan_workers(workers: int, device: str, threads: int) -> tuple[int, int]:
    """``(workers, torch threads each)`` for ``--workers`` (0 = auto) on ``device`` with ``threads`` CPU threads.

    On a CPU, concurrent batches split the threads between them: each worker's matrix products use
    its own share, so two batches never fight over the same cores (OpenMP threads that spin while
    another job holds their core slow both down many times over).
    """
    if device.startswith("cuda"):
        return max(1, workers or 1), threads
    workers = workers or (2 if threads >= 2 else 1)
    return workers, max(1, threads // workers)


def load_service(ar_ckpt: Path, nar_ckpt: Path, settings: Any, device: Optional[str] = None,
                 codec_weights: str = "pretrained", own_threads: bool = False) -> Any:
    """Load the models once and build the :class:`~vall_e.serving.app.Service` (codec and g2p warmed up).

    ``settings.workers`` 0 is resolved here (:func:`plan_workers`). ``own_threads``: the process is
    the server's, so set its torch threads to each worker's share (the command line does).
    """
    import torch

    from .serving.app import Service
    from .serving.engine import ServingSynthesizer

    synth = ServingSynthesizer(ar_ckpt, nar_ckpt, device=device, codec_weights=codec_weights)
    settings.workers, threads = plan_workers(settings.workers, str(synth.device), torch.get_num_threads())
    if own_threads and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    service = Service(synth, settings)
    service.warm_up()
    return service


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SystemExit(f"error: cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@dataclass
class RunningServer:
    """A server started by :func:`serve_in_thread`; ``stop()`` shuts it down."""

    url: str
    server: Any
    thread: threading.Thread

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def serve_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> RunningServer:
    """Run ``app`` with uvicorn in a background thread (for notebooks, tests and benchmarks); returns once it listens."""
    import uvicorn

    sock = bind(host, port)
    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="vall_e-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start; see the log above")
        time.sleep(0.02)
    return RunningServer(url_of(sock), server, thread)


def main(argv: Sequence[str] | None = None) -> int:
    from .config import Config

    argv = list(sys.argv[1:] if argv is None else argv)
    words, rest = Config.split_argv(argv)
    cfg = Config.from_cli(words)  # help=true; codec_weights=... and device=... come from here
    args = build_parser().parse_args(rest)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)
    device = args.device if args.device is not None else (cfg.device if any(w.startswith("device=") for w in words) else None)
    temp = None
    if args.voices is None:
        temp = tempfile.TemporaryDirectory(prefix="vall_e-voices-")
        voices_dir = Path(temp.name)
        logger.info("no --voices folder: uploads go to %s and are gone when the server stops", voices_dir)
    else:
        voices_dir = args.voices
    settings = settings_from_args(args, voices_dir)
    if args.host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        logger.warning("listening on %s without an API key: anyone who can reach this port can use the models and "
                       "add voices; set --api-key or VALL_E_API_KEY", args.host)
    sock = bind(args.host, args.port)  # before loading: a busy port fails in a second, not after the models load

    from .emb.qnt import AudioError, CodecUnavailableError
    from .export import InferenceFileError
    from .inference import SynthesisError

    try:
        service = load_service(args.ar_ckpt, args.nar_ckpt, settings, device, cfg.codec_weights, own_threads=True)
    except (InferenceFileError, CodecUnavailableError, SynthesisError, AudioError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.codec_weights == "untrained":
        logger.warning("codec_weights=untrained: the codec has random weights, so the audio is NOT speech "
                       "(it only proves the pipeline runs)")
    import uvicorn

    from .serving.app import create_app

    app = create_app(service)
    url = url_of(sock)
    import torch

    logger.info("serving %s + %s on %s, %d worker(s) x %d thread(s) (page: %s/ , API: %s/v1/audio/speech, "
                "voices in %s)", args.ar_ckpt, args.nar_ckpt, service.synth.device, settings.workers,
                torch.get_num_threads(), url, url, voices_dir)
    print(f"VALL-E server ready at {url}", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    if temp is not None:
        temp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
