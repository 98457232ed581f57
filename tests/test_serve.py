"""``python -m vall_e.serve``: a real server on a free localhost port with tiny exported models.

Clients are the official ``openai`` package and plain ``requests``; one test starts the command
line itself. The codec is ``untrained`` (offline), so the audio is noise: the tests check the
service (formats, voices, streaming, batching, errors, auth), not quality.
"""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile as sf

from serve_support import STEPS, export_zoo, make_voices, start_server, utterances, wav_samples
from vall_e.serving import audio
from vall_e.serving.text import split_sentences
from vall_e.serving.voices import VoiceError, safe_name

REPO = Path(__file__).resolve().parents[1]
openai = pytest.importorskip("openai", reason="the tests speak to the server with the openai client (pip install openai)")


@pytest.fixture(scope="module")
def zoo(tiny_runs, tmp_path_factory) -> dict[str, Path]:
    return export_zoo(tiny_runs, tmp_path_factory.mktemp("serve_zoo"))


@pytest.fixture(scope="module")
def texts(prepared_corpus) -> list[str]:
    return [t for _, t in utterances(prepared_corpus)]


@pytest.fixture(scope="module")
def server(zoo, prepared_corpus, tmp_path_factory):
    voices = make_voices(prepared_corpus, tmp_path_factory.mktemp("voices"))
    srv = start_server(zoo, voices, max_queue=8, max_chars=600, max_upload_bytes=2**20, max_voice_seconds=8.0,
                       max_batch=8)
    yield srv
    srv.running.stop()


def client(url: str, api_key: str = "unused") -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=120)


def speech(srv, text: str, voice: str = "alice", **fields) -> requests.Response:
    body = {"model": "vall-e", "input": text, "voice": voice, "max_ar_steps": STEPS, **fields}
    return requests.post(f"{srv.url}/v1/audio/speech", json=body, timeout=120)


def assert_serves(srv, texts) -> None:
    """A good request succeeds (after every kind of bad one)."""
    r = speech(srv, texts[1], seed=0, max_ar_steps=6)
    assert r.status_code == 200, r.text
    samples, sr = wav_samples(r.content)
    assert sr == 24_000 and len(samples) > 0


def error_of(r: requests.Response) -> str:
    body = r.json()
    assert set(body) == {"error"} and "Traceback" not in r.text
    return body["error"]["message"]


# --------------------------------------------------------------------------------------------
# the openai client


def test_openai_client_plain_streaming_and_formats(server, texts):
    c = client(server.url)
    args = dict(model="vall-e", voice="alice", input=texts[1], extra_body={"seed": 3, "max_ar_steps": STEPS})
    plain = c.audio.speech.create(response_format="wav", **args)
    body = plain.content
    samples, sr = wav_samples(body)
    assert sr == 24_000 and samples.ndim == 1 and 0 < len(samples) <= STEPS * 320
    info = sf.info(io.BytesIO(body))
    assert info.channels == 1 and info.subtype == "PCM_16"

    with c.audio.speech.with_streaming_response.create(response_format="wav", **args) as resp:
        assert resp.headers["x-seed"] == "3" and resp.headers["content-type"] == "audio/wav"
        streamed = b"".join(resp.iter_bytes())
    assert streamed == body  # one sentence: the same exact file, streamed

    pcm = c.audio.speech.create(response_format="pcm", **args).content
    assert pcm == body[44:]  # OpenAI's pcm: raw s16le at 24 kHz, the WAV's samples
    flac = c.audio.speech.create(response_format="flac", **args).content
    assert flac[:4] == b"fLaC" and np.array_equal(wav_samples(flac)[0], samples)

    # a request served alone is the Python API's synthesis with the same seed (and so the CLI's)
    synth = server.service.synth
    alone = synth.synthesize(texts[1], server.voices / "alice.wav", seed=3, max_ar_steps=STEPS)
    assert audio.to_pcm16(alone.wav) == pcm

    fast = c.audio.speech.create(response_format="wav", speed=2.0, **args).content
    assert abs(len(wav_samples(fast)[0]) - len(samples) / 2) <= 1  # time-stretched, pitch kept

    with pytest.raises(openai.NotFoundError, match="unknown voice 'alloy'"):
        c.audio.speech.create(model="tts-1", voice="alloy", input="Hello.")
    with pytest.raises(openai.BadRequestError, match="use one of wav, pcm, flac"):
        c.audio.speech.create(model="tts-1", voice="alice", input=texts[1], response_format="mp3")


# --------------------------------------------------------------------------------------------
# voices


def test_voices_upload_list_use_and_cache(server, texts, prepared_corpus):
    listed = requests.get(f"{server.url}/v1/voices", timeout=30).json()
    assert [v["name"] for v in listed["data"]] == ["alice", "bob"]
    assert listed["data"][0]["transcript"] == texts[0] and listed["data"][0]["seconds"] > 0

    # stereo 44.1 kHz FLAC in, 24 kHz mono WAV stored
    wav, sr = sf.read(utterances(prepared_corpus)[2][0], dtype="float32")
    stereo = np.interp(np.arange(0, len(wav), sr / 44_100), np.arange(len(wav)), wav)[:, None].repeat(2, 1)
    buf = io.BytesIO()
    sf.write(buf, stereo.astype("float32"), 44_100, format="FLAC")
    r = requests.post(f"{server.url}/v1/voices", files={"file": ("carol.flac", buf.getvalue(), "audio/flac")},
                      data={"name": "carol", "transcript": texts[2]}, timeout=60)
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "carol" and r.json()["transcript"] == texts[2]
    stored = sf.info(str(server.voices / "carol.wav"))
    assert (stored.samplerate, stored.channels) == (24_000, 1)
    assert (server.voices / "carol.txt").read_text().strip() == texts[2]
    names = [v["name"] for v in requests.get(f"{server.url}/v1/voices", timeout=30).json()["data"]]
    assert names == ["alice", "bob", "carol"]

    # the reference codes were computed at upload, once: using the voice does not encode again
    encodes = server.service.synth.encodes
    for seed in (1, 2):
        r = speech(server, texts[3], voice="carol", seed=seed)
        assert r.status_code == 200, r.text
    assert server.service.synth.encodes == encodes

    r = requests.post(f"{server.url}/v1/voices", files={"file": ("c.flac", buf.getvalue())},
                      data={"name": "carol"}, timeout=60)
    assert r.status_code == 409 and "exists already" in error_of(r)


# --------------------------------------------------------------------------------------------
# long-form streaming


def test_long_form_streams_sentence_by_sentence(server, texts):
    # a short first sentence, then longer ones: the first audio must come after the first sentence
    short = " ".join(texts[0].split()[:2]).rstrip(".,") + "."  # two words the models know
    text = short + " " + " ".join(t if t.endswith((".", "!", "?")) else t + "." for t in texts[1:5])
    n = len(split_sentences(text))
    assert n == 5
    body = {"model": "vall-e", "input": text, "voice": "bob", "seed": 11, "max_ar_steps": 40}
    assert speech(server, short, voice="bob").status_code == 200  # the voice's codes are ready: time synthesis only
    t0 = time.perf_counter()
    arrivals, chunks = [], []
    with requests.post(f"{server.url}/v1/audio/speech", json=body, stream=True, timeout=120) as r:
        assert r.status_code == 200, r.text
        assert r.headers["transfer-encoding"] == "chunked" and r.headers["x-streamed"] == "true"
        assert r.headers["x-sentences"] == "5"
        for chunk in r.iter_content(chunk_size=None):
            arrivals.append(time.perf_counter() - t0)
            chunks.append(chunk)
    first, end = arrivals[0], arrivals[-1]
    print(f"\nlong-form ({n} sentences): first chunk {first:.2f} s, end {end:.2f} s, {len(chunks)} chunks")
    assert len(chunks) >= 3
    assert first < 0.6 * end
    streamed = b"".join(chunks)
    assert streamed[:44] == audio.wav_header(None)  # length unknown when the header left

    whole = speech(server, text, voice="bob", seed=11, max_ar_steps=40, stream=False)
    assert whole.status_code == 200 and whole.headers["x-sentences"] == "5"
    assert streamed[44:] == whole.content[44:]  # the same audio, streamed or not
    seconds = float(whole.headers["x-audio-seconds"])
    assert seconds == pytest.approx(len(whole.content[44:]) / 2 / 24_000, abs=1e-3)
    assert len(whole.headers["x-cut"].split(",")) == 5 and float(whole.headers["x-real-time-factor"]) > 0


# --------------------------------------------------------------------------------------------
# batching


def test_eight_concurrent_clients_batch_and_match_alone(server, texts):
    svc = server.service
    specs = [dict(input=texts[i % len(texts)], voice=("alice", "bob")[i % 2], seed=100 + i,
                  temperature=1.0, top_p=(1.0, 0.9)[i % 2], ras=i % 4 == 3, max_ar_steps=STEPS + 2 * i)
             for i in range(8)]

    def run(spec) -> bytes:
        c = client(server.url)
        extra = {k: spec[k] for k in ("seed", "temperature", "top_p", "ras", "max_ar_steps")}
        return c.audio.speech.create(model="vall-e", voice=spec["voice"], input=spec["input"], response_format="pcm",
                                     extra_body=extra).content

    alone = [run(spec) for spec in specs]  # one at a time: each its own batch
    assert len(set(alone)) == 8

    results: dict[int, object] = {}

    def client_thread(i: int) -> None:
        try:
            results[i] = run(specs[i])
        except Exception as e:  # reported below
            results[i] = e

    before = svc.batcher.stats()["batches"]
    with svc.batcher.hold():
        threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while svc.batcher.pending() < 8:
            assert time.monotonic() < deadline, f"only {svc.batcher.pending()} requests arrived"
            time.sleep(0.02)
        # the queue is full (--max-queue 8): a ninth request is refused with a retry time
        r = speech(server, texts[1], seed=0)
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert "--max-queue" in error_of(r)
    for t in threads:
        t.join(120)
    assert all(isinstance(results[i], bytes) for i in range(8)), results
    stats = svc.batcher.stats()
    assert stats["batches"] == before + 1 and stats["largest_batch"] == 8  # all eight in one batched call
    for i in range(8):
        assert results[i] == alone[i], f"client {i}: batched audio differs from the same request alone"
    assert_serves(server, texts)


# --------------------------------------------------------------------------------------------
# bad input: clear errors, and the server keeps serving


def test_bad_requests_are_clear_and_the_server_keeps_serving(server, texts):
    url = f"{server.url}/v1/audio/speech"
    cases = [
        (dict(input=""), 400, "input is empty"),
        (dict(input="   \n "), 400, "input is empty"),
        (dict(input="word " * 130), 400, "at most 600"),
        (dict(input="?!"), 400, "no words"),
        (dict(voice="nobody"), 404, "unknown voice 'nobody'"),
        (dict(voice="../alice"), 400, "path separator"),
        (dict(voice="/etc/passwd"), 400, "path separator"),
        (dict(voice="voices/alice"), 400, "path separator"),
        (dict(voice="al*ce"), 400, "invalid voice name"),
        (dict(response_format="opus"), 400, "use one of wav, pcm, flac"),
        (dict(temprature=0.5), 400, "unknown field 'temprature'"),
        (dict(temperature=-1), 400, "temperature must be >= 0"),
        (dict(top_p=0), 400, "top_p must be within"),
        (dict(top_k="many"), 400, "top_k"),
        (dict(seed=-5), 400, "seed must be within"),
        (dict(max_ar_steps=10_000), 400, "max_ar_steps must be within 1..60"),
        (dict(speed=10), 400, "speed must be within"),
        (dict(instructions="whisper"), 400, "instructions are not supported"),
        (dict(stream_format="sse"), 400, "stream_format"),
    ]
    for fields, status, message in cases:
        body = {"model": "vall-e", "input": texts[1], "voice": "alice", "max_ar_steps": 6, **fields}
        r = requests.post(url, json=body, timeout=60)
        assert r.status_code == status, (fields, r.text)
        assert message in error_of(r), (fields, r.text)
        assert_serves(server, texts)
    for raw in (b"{not json", b"[1, 2]", b'{"voice": "alice"}'):
        r = requests.post(url, data=raw, headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 400 and error_of(r)
    assert "input is required" in error_of(requests.post(url, json={"voice": "alice"}, timeout=60))
    word = unknown_word(server.service.synth)
    r = speech(server, f"{texts[1]} {word}")
    assert r.status_code == 400 and "never saw" in error_of(r) and repr(word) in error_of(r)
    assert requests.get(f"{server.url}/v2/nothing", timeout=30).status_code == 404
    assert_serves(server, texts)


def unknown_word(synth) -> str:
    """A word whose phones include one the tiny models never saw."""
    from vall_e.emb import g2p

    for word in ("joy", "measure", "boy", "azure", "judge", "vision", "thought", "young", "choice"):
        if any(p not in synth.ar_meta["phone_map"] for p in g2p.encode(word)):
            return word
    pytest.fail("every candidate word is covered by the training phones; extend the list")


def _wav_bytes(samples: np.ndarray, sr: int = 24_000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples.astype("float32"), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def test_bad_uploads_are_clear_and_nothing_escapes(server, texts):
    url = f"{server.url}/v1/voices"
    rng = np.random.default_rng(0)
    speechlike = 0.3 * rng.standard_normal(24_000 * 2)
    outside = server.voices.parent
    before_outside = sorted(p.name for p in outside.iterdir())
    cases = [
        (("v.wav", b"this is not audio at all" * 40), {"name": "textfile"}, "not audio"),
        (("v.wav", _wav_bytes(0.3 * rng.standard_normal(24_000 * 9))), {"name": "long"}, "at most 8 s"),
        (("v.wav", _wav_bytes(np.zeros(24_000 * 2))), {"name": "quiet"}, "silent"),
        (("v.wav", _wav_bytes(0.3 * rng.standard_normal(2_000))), {"name": "short"}, "at least 0.5 s"),
        (("v.wav", b"x" * (2**20 + 300_000)), {"name": "huge"}, "larger than this server accepts"),
        (("v.wav", _wav_bytes(speechlike)), {"name": "../evil"}, "path separator"),
        (("v.wav", _wav_bytes(speechlike)), {"name": "/tmp/evil"}, "path separator"),
        (("v.wav", _wav_bytes(speechlike)), {"name": ".hidden"}, "starts with a dot"),
        (("v.wav", _wav_bytes(speechlike)), {"name": "a\nb"}, "control character"),
        (("v.wav", _wav_bytes(speechlike)), {}, "a voice name is required"),
    ]
    for file, data, message in cases:
        r = requests.post(url, files={"file": file}, data=data, timeout=60)
        assert r.status_code == 400, (data, r.text)
        assert message in error_of(r), (data, r.text)
        assert_serves(server, texts)
    r = requests.post(url, data={"name": "nofile"}, files={"other": ("x", b"x")}, timeout=60)
    assert r.status_code == 400 and "no audio file" in error_of(r)
    r = requests.post(url, json={"name": "x", "file": "/etc/passwd"}, timeout=60)
    assert r.status_code == 400 and "multipart/form-data" in error_of(r)
    # nothing was written for any refused upload, inside the folder or beside it
    assert sorted(p.name for p in server.voices.iterdir() if p.stem not in ("carol",)) == \
        ["alice.txt", "alice.wav", "bob.txt", "bob.wav"]
    assert sorted(p.name for p in outside.iterdir()) == before_outside
    assert not Path("/tmp/evil.wav").exists()
    assert_serves(server, texts)


def test_internal_error_is_a_json_500_with_the_traceback_in_the_log(server, texts, caplog):
    batcher = server.service.batcher
    real = batcher.run_batch

    def broken(rows):
        raise RuntimeError("secret internal detail")

    batcher.run_batch = broken
    try:
        with caplog.at_level(logging.ERROR):
            r = speech(server, texts[1], seed=0)
    finally:
        batcher.run_batch = real
    assert r.status_code == 500
    message = error_of(r)
    assert "internal server error" in message and "secret" not in r.text
    ref = re.search(r"reference ([0-9a-f]+)", message).group(1)
    logged = "\n".join(rec.getMessage() + "\n" + (logging.Formatter().formatException(rec.exc_info) if rec.exc_info else "")
                       for rec in caplog.records)
    assert "secret internal detail" in logged and "Traceback" in logged and ref in logged
    assert_serves(server, texts)

    # a failure after the stream has begun cannot change the status: the body ends incomplete
    calls = []

    def fails_later(rows):
        calls.append(len(rows))
        if len(calls) > 1:
            raise RuntimeError("second batch fails")
        return real(rows)

    batcher.run_batch = fails_later
    text = " ".join(t if t.endswith((".", "!", "?")) else t + "." for t in texts[1:4])
    try:
        with requests.post(f"{server.url}/v1/audio/speech", json={"input": text, "voice": "alice", "max_ar_steps": 6},
                           stream=True, timeout=60) as r:
            assert r.status_code == 200 and r.headers["x-streamed"] == "true"
            with pytest.raises(requests.exceptions.ChunkedEncodingError):
                for _ in r.iter_content(chunk_size=None):
                    pass
    finally:
        batcher.run_batch = real
    assert_serves(server, texts)


# --------------------------------------------------------------------------------------------
# the command line, auth


def test_cli_serves_with_api_key_from_the_environment(zoo, server, texts, tmp_path):
    key = "test-key-0123456789"
    env = {**os.environ, "VALL_E_API_KEY": key, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "vall_e.serve", "--ar-ckpt", str(zoo["ar"]), "--nar-ckpt", str(zoo["nar"]),
           "--voices", str(server.voices), "--port", "0", "--max-ar-steps", "8", "--log-level", "warning",
           "codec_weights=untrained"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        url = None
        deadline = time.monotonic() + 180
        while url is None:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "the server exited:\n" + "".join(lines)
            assert time.monotonic() < deadline, "no 'ready' line:\n" + "".join(lines)
            lines.append(line)
            m = re.search(r"ready at (http://127\.0\.0\.1:\d+)", line)
            url = m.group(1) if m else None
        assert "NOT speech" in "".join(lines)  # the untrained codec is said at start
        threading.Thread(target=lambda: [lines.append(x) for x in proc.stderr], daemon=True).start()

        health = requests.get(f"{url}/health", timeout=30).json()
        assert health["auth"] is True and health["codec_trained"] is False
        assert requests.get(f"{url}/", timeout=30).status_code == 200  # the page itself needs no key
        body = {"model": "vall-e", "input": texts[1], "voice": "alice", "seed": 1}
        for headers in ({}, {"Authorization": "Bearer wrong-key-000"}, {"Authorization": key}):
            r = requests.post(f"{url}/v1/audio/speech", json=body, headers=headers, timeout=60)
            assert r.status_code == 401 and "API key" in error_of(r) and r.headers["www-authenticate"] == "Bearer"
            assert requests.get(f"{url}/v1/voices", headers=headers, timeout=30).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong-key-000").audio.speech.create(model="vall-e", voice="alice", input=texts[1])
        out = client(url, api_key=key).audio.speech.create(
            model="vall-e", voice="alice", input=texts[1], extra_body={"seed": 1})
        assert wav_samples(out.content)[1] == 24_000
    finally:
        proc.terminate()
        proc.wait(60)


def test_auth_off_and_key_settings(server, tmp_path):
    from vall_e.serve import build_parser, settings_from_args

    assert requests.get(f"{server.url}/health", timeout=30).json()["auth"] is False
    assert requests.get(f"{server.url}/v1/voices", timeout=30).status_code == 200  # no key needed
    base = ["--ar-ckpt", "a.pt", "--nar-ckpt", "n.pt"]
    args = build_parser().parse_args(base)
    assert settings_from_args(args, tmp_path, environ={}).api_key is None
    assert settings_from_args(args, tmp_path, environ={"VALL_E_API_KEY": "from-env-123"}).api_key == "from-env-123"
    args = build_parser().parse_args(base + ["--api-key", "from-flag-123"])
    assert settings_from_args(args, tmp_path, environ={"VALL_E_API_KEY": "from-env-123"}).api_key == "from-flag-123"
    assert build_parser().parse_args(base).host == "127.0.0.1"


# --------------------------------------------------------------------------------------------
# small parts


def test_sentences_and_voice_names(tmp_path):
    assert split_sentences("Hello there. Dr. Smith is in! Is he?") == ["Hello there.", "Dr. Smith is in!", "Is he?"]
    assert split_sentences('He said "stop." Then he left... slowly.') == ['He said "stop."', "Then he left... slowly."]
    assert split_sentences("A title\n\nFirst line. Second") == ["A title", "First line.", "Second"]
    assert split_sentences("Wait!? ... Yes.") == ["Wait!? ...", "Yes."]
    long = ", ".join(["one two three four five"] * 20) + "."
    pieces = split_sentences(long, max_chars=60)
    assert all(len(p) <= 60 for p in pieces) and " ".join(pieces) == long
    for ok in ("alice", "Bob 2", "en-US_voice.v2", "zoë"):
        assert safe_name(ok, tmp_path) == ok
    for bad in ("", "..", "../x", "a/b", "a\\b", "/abs", ".hidden", "x\x00y", "a" * 65, "trailing.", None, 3):
        with pytest.raises(VoiceError):
            safe_name(bad, tmp_path)


def test_batcher_workers_share_the_queue_and_calls_run_alone():
    from vall_e.serve import plan_workers
    from vall_e.serving.batcher import Batcher, Job

    lock = threading.Lock()
    running, events = [0], []

    def run_batch(rows):
        with lock:
            running[0] += 1
            events.append(("start", len(rows), running[0]))
        time.sleep(0.2)
        if "bad" in rows and len(rows) > 1:
            with lock:
                running[0] -= 1
            raise ValueError("one bad row")  # retried one row at a time
        if "bad" in rows:
            with lock:
                running[0] -= 1
            raise ValueError("the bad row")
        with lock:
            running[0] -= 1
        return [f"done {r}" for r in rows]

    batcher = Batcher(run_batch, max_batch=8, window_s=0.05, workers=2)
    batcher.start()
    try:
        # eight jobs at once, two idle workers: four each, at the same time
        with batcher.hold():
            jobs = [Job(i) for i in range(8)]
            batcher.submit(jobs)
        assert [j.future.result(10) for j in jobs] == [f"done {i}" for i in range(8)]
        assert sorted(e[1] for e in events) == [4, 4] and max(e[2] for e in events) == 2
        assert batcher.stats()["most_running"] == 2

        # a call waits for the running batches and no batch starts while it runs
        def exclusive():
            with lock:
                events.append(("call", 0, running[0]))
            time.sleep(0.1)
            with lock:
                events.append(("call end", 0, running[0]))
            return "called"

        events.clear()
        first = [Job(i) for i in range(2)]
        batcher.submit(first)
        deadline = time.monotonic() + 10
        while batcher.stats()["running"] < 2:  # both running
            assert time.monotonic() < deadline
            time.sleep(0.005)
        more = [Job(i) for i in range(2, 4)]
        out: list = []
        caller = threading.Thread(target=lambda: out.append(batcher.call(exclusive)))
        caller.start()
        time.sleep(0.02)
        batcher.submit(more)
        caller.join(10)
        assert out == ["called"]
        for j in first + more:
            j.future.result(10)
        kinds = [e[0] for e in events]
        assert kinds.index("call") > max(i for i, k in enumerate(kinds[:kinds.index("call")]) if k == "start")
        assert all(e[2] == 0 for e in events if e[0].startswith("call"))  # no batch ran beside it
        assert kinds[kinds.index("call end") + 1:] and all(k == "start" for k in kinds[kinds.index("call end") + 1:])

        # a failing batch is retried one row at a time: only the bad row fails
        with batcher.hold():
            jobs = [Job("ok1"), Job("bad"), Job("ok2")]
            batcher.submit(jobs)
        results = []
        for j in jobs:
            try:
                results.append(j.future.result(10))
            except ValueError as e:
                results.append(str(e))
        assert results == ["done ok1", "the bad row", "done ok2"]
    finally:
        batcher.close()
    assert all(not t.is_alive() for t in batcher._threads)

    # --workers 0 (auto): two on a CPU with two threads or more, each with its share; one on a GPU
    assert plan_workers(0, "cpu", 2) == (2, 1) and plan_workers(0, "cpu", 8) == (2, 4)
    assert plan_workers(0, "cpu", 1) == (1, 1) and plan_workers(3, "cpu", 8) == (3, 2)
    assert plan_workers(0, "cuda:0", 16) == (1, 16) and plan_workers(1, "cpu", 2) == (1, 2)


def test_two_workers_run_batches_side_by_side_with_alone_audio(zoo, prepared_corpus, texts, tmp_path):
    srv = start_server(zoo, make_voices(prepared_corpus, tmp_path / "voices"), max_batch=8, workers=2)
    try:
        specs = [dict(input=texts[i % len(texts)], voice=("alice", "bob")[i % 2], seed=300 + i, temperature=1.0,
                      max_ar_steps=STEPS + i) for i in range(6)]

        def run(spec) -> bytes:
            r = speech(srv, spec["input"], voice=spec["voice"], seed=spec["seed"], temperature=1.0,
                       max_ar_steps=spec["max_ar_steps"], response_format="pcm", stream=False)
            assert r.status_code == 200, r.text
            return r.content

        alone = [run(spec) for spec in specs]
        results: dict[int, object] = {}
        batcher = srv.service.batcher
        before = batcher.stats()["batches"]
        with batcher.hold():
            threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, run(specs[i]))) for i in range(6)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 60
            while batcher.pending() < 6:
                assert time.monotonic() < deadline, f"only {batcher.pending()} requests arrived"
                time.sleep(0.02)
        for t in threads:
            t.join(120)
        stats = batcher.stats()
        assert stats["batches"] == before + 2 and stats["most_running"] == 2  # three each, side by side
        assert [results.get(i) for i in range(6)] == alone  # the same audio whichever worker ran it
        health = requests.get(f"{srv.url}/health", timeout=30).json()
        assert health["limits"]["workers"] == 2 and health["batches"]["workers"] == 2
        assert_serves(srv, texts)
    finally:
        srv.running.stop()
        srv.service.close()
