"""Benchmark ``python -m vall_e.serve``: throughput and latency under concurrent clients, the batching
speed-up, and streaming's time to first audio. Prints one JSON object.

    python scripts/bench_serve.py                          # quarter models, CPU, codec_weights=untrained
    python scripts/bench_serve.py --ar-ckpt zoo/ar.pt --nar-ckpt zoo/nar.pt --voice ref.wav codec_weights=pretrained

Without ``--ar-ckpt``/``--nar-ckpt`` it writes freshly initialized quarter models (the reference
``-quarter`` presets: 256 dim, 4 heads, 12 layers) in the inference-file format, with a phone map
that covers its texts, and a synthetic 3 s reference voice. Untrained models rarely emit the stop
token, so every sentence runs to ``--max-ar-steps`` frames: the work per request is fixed and the
same for every concurrency level (same texts, same seeds).

The server runs as a subprocess (the real command line) on a free 127.0.0.1 port; clients are
threads sending one-sentence requests (``response_format=pcm``, not streamed), each waiting for
its answer before sending the next. Measured:

- ``clients_N``: requests/s, p50/p95 latency with N concurrent clients (1, 4, 8);
- ``speedup_8_vs_1``: 8-client throughput over one-at-a-time (1 client) throughput;
- ``unbatched_8``: 8 clients against a server started with ``--max-batch 1`` (concurrency without
  batching), and ``speedup_8_vs_unbatched``;
- ``one_worker_1``: one client against a server started with ``--workers 1``, which gives a lone
  request every thread (the lowest latency one request can get), and ``speedup_8_vs_one_worker_1``:
  the 8-client throughput over that one, the strictest baseline;
- ``batched_equals_alone``: every request's audio with 8 clients equals its audio alone;
- ``long_form``: a 5-sentence text, streamed (time to the first chunk and to the end) and not.

Numbers depend on the machine and on what else runs on it; say so when you quote them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import requests

REPO = Path(__file__).resolve().parents[1]

SENTENCES = [
    "The old lighthouse keeper climbed the stairs every evening at dusk.",
    "A cold wind swept across the empty harbor before the storm.",
    "She found a small wooden box hidden beneath the garden shed.",
    "Our neighbors planted tomatoes and beans along the southern fence.",
    "The train to the mountains leaves early on Saturday morning.",
    "He kept every letter his grandmother wrote during the long war.",
    "Bright lanterns floated slowly down the river after sunset.",
    "The library closes at nine, so please return your books on time.",
    "Fresh bread from the corner bakery smells wonderful in the morning.",
    "Children laughed and chased each other across the muddy field.",
    "The committee will announce its decision later this afternoon.",
    "A quiet village sits at the edge of the great northern forest.",
    "Thunder rolled over the hills while we waited under the bridge.",
    "Please remember to water the plants while I am away next week.",
    "The museum opened a new exhibit about ancient sailing ships.",
    "Every winter the lake freezes and people skate until spring.",
]


# --------------------------------------------------------------------------------------------
# models and voice


def make_models(out: Path, preset: str, texts: list[str]) -> tuple[Path, Path]:
    """Freshly initialized ``ar-<preset>`` / ``nar-<preset>`` inference files whose phone map covers ``texts``."""
    import torch

    from vall_e.emb import g2p
    from vall_e.export import FORMAT_TAG, FORMAT_VERSION
    from vall_e.models import get_model
    from vall_e.version import __version__

    phones = sorted({p for t in texts for p in g2p.encode(t)})
    phone_map = {p: i + 1 for i, p in enumerate(["<s>", "</s>"] + phones)}
    paths = []
    for kind in ("ar", "nar"):
        torch.manual_seed(0)
        model = get_model(f"{kind}-{preset}", n_text_tokens=len(phone_map) + 1)
        data = {"format": FORMAT_TAG, "format_version": FORMAT_VERSION, "version": __version__,
                "trained_with": __version__, "kind": kind, "preset": f"{kind}-{preset}", "hparams": model.hparams,
                "phone_map": phone_map, "speakers": [], "step": 0, "max_frames_per_phone": None,
                "prompt_mode": "speaker", "checkpoint": "bench_serve.py (untrained)",
                "state_dict": {k: v.float() for k, v in model.state_dict().items()}}
        path = out / f"{kind}.pt"
        torch.save(data, path)
        paths.append(path)
    return paths[0], paths[1]


def make_voice(folder: Path, source: Optional[Path]) -> str:
    """``folder/bench.wav``: ``source`` copied, or 3 s of a synthetic voiced signal (harmonics, vibrato, pauses)."""
    import numpy as np
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    if source is not None:
        wav, sr = sf.read(str(source), dtype="float32")
    else:
        sr = 24_000
        t = np.arange(3 * sr) / sr
        f0 = 140 + 20 * np.sin(2 * np.pi * 0.7 * t)
        phase = 2 * np.pi * np.cumsum(f0) / sr
        wav = sum(np.sin(k * phase) / k for k in range(1, 12))
        wav *= (0.5 + 0.5 * np.sin(2 * np.pi * 2.5 * t)) ** 2  # syllable-like envelope
        wav += 0.01 * np.random.default_rng(0).standard_normal(len(t))
        wav = (0.3 * wav / np.abs(wav).max()).astype("float32")
    sf.write(str(folder / "bench.wav"), wav, sr)
    return "bench"


# --------------------------------------------------------------------------------------------
# the server


class ServerProcess:
    """``python -m vall_e.serve`` on a free port; its stderr is kept for error reports."""

    def __init__(self, args: list[str], env: dict[str, str]):
        cmd = [sys.executable, "-m", "vall_e.serve", *args, "--port", "0", "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.url = None
        deadline = time.monotonic() + 600
        while self.url is None:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                raise SystemExit("the server exited:\n" + "".join(self.lines[-40:]))
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit("the server did not start in 10 minutes:\n" + "".join(self.lines[-40:]))
            self.lines.append(line)
            m = re.search(r"ready at (http://\S+)", line)
            self.url = m.group(1) if m else None
        threading.Thread(target=lambda: [self.lines.append(x) for x in self.proc.stderr], daemon=True).start()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class RequestFailed(RuntimeError):
    pass


def request(url: str, body: dict[str, Any]) -> tuple[float, bytes]:
    t0 = time.perf_counter()
    r = requests.post(f"{url}/v1/audio/speech", json=body, timeout=1800)
    if r.status_code != 200:
        raise RequestFailed(f"request failed: {r.status_code} {r.text[:500]}")
    return time.perf_counter() - t0, r.content


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))
    return ordered[k]


def load(url: str, bodies: list[dict[str, Any]], clients: int) -> tuple[dict[str, float], list[bytes]]:
    """Send ``bodies`` from ``clients`` threads (each sends its next when the last is answered)."""
    lock = threading.Lock()
    todo = list(enumerate(bodies))
    latencies: list[float] = []
    outputs: list[bytes] = [b""] * len(bodies)

    failures: list[Exception] = []

    def client() -> None:
        while not failures:
            with lock:
                if not todo:
                    return
                i, body = todo.pop(0)
            try:
                seconds, data = request(url, body)
            except Exception as e:
                failures.append(e)
                return
            with lock:
                latencies.append(seconds)
                outputs[i] = data

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]
    wall = time.perf_counter() - t0
    audio_s = sum(len(o) / 2 / 24_000 for o in outputs)
    return {"requests": len(bodies), "wall_s": round(wall, 3), "requests_per_s": round(len(bodies) / wall, 4),
            "p50_s": round(statistics.median(latencies), 3), "p95_s": round(percentile(latencies, 0.95), 3),
            "audio_s_per_s": round(audio_s / wall, 3)}, outputs


def long_form(url: str, voice: str, steps: int) -> dict[str, Any]:
    text = " ".join(SENTENCES[:5])
    body = {"model": "vall-e", "input": text, "voice": voice, "seed": 1234, "max_ar_steps": steps,
            "response_format": "pcm"}
    t0 = time.perf_counter()
    arrivals = []
    with requests.post(f"{url}/v1/audio/speech", json=body, stream=True, timeout=1800) as r:
        r.raise_for_status()
        for _ in r.iter_content(chunk_size=None):
            arrivals.append(time.perf_counter() - t0)
    whole_s, _ = request(url, {**body, "stream": False})
    return {"sentences": 5, "stream_first_chunk_s": round(arrivals[0], 3), "stream_end_s": round(arrivals[-1], 3),
            "stream_chunks": len(arrivals), "not_streamed_end_s": round(whole_s, 3)}


# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (unknown words are config words for the server)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, default=REPO / "out" / "bench_serve", help="models and voice go here")
    p.add_argument("--preset", default="quarter", help="model size when no checkpoints are given (default quarter)")
    p.add_argument("--ar-ckpt", type=Path, default=None)
    p.add_argument("--nar-ckpt", type=Path, default=None)
    p.add_argument("--voice", type=Path, default=None, help="reference recording (default: a synthetic 3 s signal)")
    p.add_argument("--max-ar-steps", type=int, default=225,
                   help="AR frames per sentence (default 225 = 3 s, about what its 10-word sentences take to say)")
    p.add_argument("--requests", type=int, default=16, help="requests per concurrency level (default 16)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-unbatched", action="store_true", help="skip the --max-batch 1 comparison")
    p.add_argument("--no-one-worker", action="store_true", help="skip the --workers 1 one-at-a-time comparison")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    p = build_parser()
    args, words = p.parse_known_args(argv)
    if not any(w.startswith("codec_weights=") for w in words):
        words.append("codec_weights=untrained")

    args.workdir.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    if args.ar_ckpt is None or args.nar_ckpt is None:
        ar, nar = make_models(args.workdir, args.preset, SENTENCES)
    else:
        ar, nar = args.ar_ckpt, args.nar_ckpt
    voice = make_voice(args.workdir / "voices", args.voice)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    common = ["--ar-ckpt", str(ar), "--nar-ckpt", str(nar), "--voices", str(args.workdir / "voices"),
              "--device", args.device, "--max-ar-steps", str(args.max_ar_steps), "--max-queue", "64", *words]
    bodies = [{"model": "vall-e", "input": SENTENCES[i % len(SENTENCES)], "voice": voice, "seed": 1000 + i,
               "response_format": "pcm", "stream": False} for i in range(args.requests)]

    result: dict[str, Any] = {"preset": args.preset if args.ar_ckpt is None else str(ar), "device": args.device,
                              "cpus": os.cpu_count(),
                              "max_ar_steps": args.max_ar_steps,
                              "requests_per_level": args.requests, "codec": [w for w in words if "codec" in w]}
    with_server = lambda extra: _with_server(common + extra, env)  # noqa: E731
    with with_server([]) as url:
        for _ in range(2):  # warm up: codec, g2p, the voice's codes, allocator
            request(url, bodies[0])
        outputs = {}
        for clients in (1, 4, 8):
            result[f"clients_{clients}"], outputs[clients] = load(url, bodies, clients)
        result["speedup_8_vs_1"] = round(result["clients_8"]["requests_per_s"] / result["clients_1"]["requests_per_s"], 3)
        result["batched_equals_alone"] = outputs[8] == outputs[1]
        result["long_form"] = long_form(url, voice, args.max_ar_steps)
        health = requests.get(f"{url}/health", timeout=60).json()
        result["server_batches"] = health["batches"]
        result["server_workers"], result["server_torch_threads"] = health["limits"]["workers"], health["torch_threads"]
    if not args.no_unbatched:
        with with_server(["--max-batch", "1"]) as url:
            request(url, bodies[0])
            result["unbatched_8"], _ = load(url, bodies, 8)
        result["speedup_8_vs_unbatched"] = round(
            result["clients_8"]["requests_per_s"] / result["unbatched_8"]["requests_per_s"], 3)
    if not args.no_one_worker:
        with with_server(["--workers", "1"]) as url:
            request(url, bodies[0])
            result["one_worker_1"], _ = load(url, bodies, 1)
            result["one_worker_torch_threads"] = requests.get(f"{url}/health", timeout=60).json()["torch_threads"]
        result["speedup_8_vs_one_worker_1"] = round(
            result["clients_8"]["requests_per_s"] / result["one_worker_1"]["requests_per_s"], 3)
    print(json.dumps(result, indent=2))
    return 0


@contextlib.contextmanager
def _with_server(args: list[str], env: dict[str, str]) -> Iterator[str]:
    """A server's URL for the block; a failed request prints the server's log (its traceback) and exits."""
    server = ServerProcess(args, env)
    try:
        yield server.url
    except RequestFailed as e:
        time.sleep(0.5)  # let the log reader catch up
        print("".join(server.lines[-60:]), file=sys.stderr)
        raise SystemExit(str(e)) from None
    finally:
        server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
