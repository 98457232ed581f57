"""The FastAPI app of ``python -m vall_e.serve``.

Routes (DESIGN.md, "Serving"):

- ``GET /health``: status, models, codec, limits, queue and batch statistics (no key needed);
- ``POST /v1/audio/speech``: OpenAI's speech API (``model``, ``input``, ``voice``,
  ``response_format`` wav | pcm | flac, ``speed``) plus our sampling fields (``temperature``,
  ``top_p``, ``top_k``, ``ras``, ``seed``, ``nar_temperature``, ``max_ar_steps``) and ``stream``;
- ``GET /v1/voices``, ``POST /v1/voices`` (multipart: ``file``, ``transcript``, ``name``);
- ``GET /``: the page.

Errors are JSON in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, so the
``openai`` client raises its usual exceptions with our message. An unexpected failure is a 500
whose message carries a reference; the traceback goes to the server log only.

How a request runs: the input is split into sentences; their phones and the voice's prompt codes
are prepared in one preparation thread (bad text is a 400 before anything is generated); each
sentence becomes a job for the batcher, seeded ``seed + its index``. Without streaming, or for one
sentence, the whole file is sent with exact headers and statistics (``X-Audio-Seconds``,
``X-Real-Time-Factor``, ``X-Cut``, ``X-Seed``). Streaming a longer text (``stream``, the default,
with ``wav`` or ``pcm``) sends the first sentence alone, ahead of the rest, then the others
batched together: the first audio arrives after one sentence, not after the whole text.
"""

import asyncio
import functools
import hmac
import json
import logging
import math
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Optional, Union

from . import audio
from .batcher import Batcher, Job
from .engine import Row, Sampling, ServingSynthesizer
from .text import split_sentences
from .voices import VoiceError, VoiceStore

if TYPE_CHECKING:
    from fastapi import FastAPI, Request

logger = logging.getLogger("vall_e.serve")

MAX_SEED = 2**53  # seeds travel through JavaScript numbers on the page


@dataclass
class Settings:
    """What ``python -m vall_e.serve`` is told on its command line (see there for each)."""

    voices_dir: Path
    api_key: Optional[str] = None
    max_batch: int = 8
    batch_window_s: float = 0.02
    max_queue: int = 32
    max_chars: int = 4000
    max_sentence_chars: int = 250
    max_upload_bytes: int = 10 * 2**20
    max_voice_seconds: float = 30.0
    max_voices: int = 1000
    pause_s: float = 0.25
    prompt_seconds: float = 3.0
    max_ar_steps: int = 1000
    workers: int = 1  # batches that may run at the same time (see Batcher)
    model_name: str = "vall-e"


class ApiError(Exception):
    """An answer other than 200: ``status``, a message saying what to do, optional headers."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 409: "invalid_request_error", 500: "server_error", 503: "server_busy"}


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "error"), "param": param, "code": code}}


# --------------------------------------------------------------------------------------------
# the service: models, voices, batcher


class Service:
    """Everything behind the routes, one per server process.

    Args:
        synth: the loaded models.
        settings: limits and defaults.
    """

    def __init__(self, synth: ServingSynthesizer, settings: Settings):
        self.synth = synth
        self.settings = settings
        self.voices = VoiceStore(settings.voices_dir, max_seconds=settings.max_voice_seconds,
                                 max_voices=settings.max_voices)
        self.preparing = 0  # accepted requests whose sentences are being prepared
        self.batcher = Batcher(self.run_rows, settings.max_batch, settings.batch_window_s,
                               max_wait_s=max(settings.batch_window_s, 0.25), preparing=lambda: self.preparing,
                               workers=settings.workers)
        synth.exclusive = self.batcher.call
        # phones and prompt codes are prepared in one thread beside the batcher: g2p and the codec's
        # encoder then never run twice at once, and a bad text is answered while a batch runs
        self.prep = ThreadPoolExecutor(1, thread_name_prefix="vall_e-prep")
        self.lock = threading.Lock()
        self._admitted = 0
        self._request_s = 1.0  # moving average of a request's time, for Retry-After
        self.requests = 0
        self.refused = 0

    def run_rows(self, rows: list[Row]) -> list[Any]:
        """One batch (in one of the batcher's threads, maybe beside another batch)."""
        return self.synth.generate(rows)

    def warm_up(self) -> None:
        """Load the codec and g2p now, so the first request does not pay for them."""
        from ..emb import g2p
        from ..emb.qnt import load_codec

        load_codec(self.synth.codec_weights, self.synth.device)
        g2p.encode("")

    def start(self) -> None:
        self.batcher.start()

    def close(self) -> None:
        self.batcher.close()
        self.prep.shutdown(wait=False, cancel_futures=True)

    # admission ---------------------------------------------------------------------------------

    def admit(self) -> bool:
        """Count a request in, unless ``max_queue`` are already in (being synthesized or waiting)."""
        with self.lock:
            if self._admitted >= self.settings.max_queue:
                self.refused += 1
                return False
            self._admitted += 1
            self.requests += 1
            return True

    def release(self, seconds: Optional[float] = None) -> None:
        with self.lock:
            self._admitted -= 1
            if seconds is not None:
                self._request_s = 0.8 * self._request_s + 0.2 * seconds

    def retry_after(self) -> int:
        """Seconds after which a refused client may find room: a batch's worth of requests will have finished."""
        with self.lock:
            return max(1, math.ceil(self._request_s))

    def in_flight(self) -> int:
        with self.lock:
            return self._admitted

    def health(self) -> dict[str, Any]:
        import torch

        from ..version import __version__

        s, synth = self.settings, self.synth
        return {
            "status": "ok",
            "version": __version__,
            "model": s.model_name,
            "device": synth.device,
            "codec_weights": synth.codec_weights,
            "codec_trained": synth.codec_weights != "untrained",
            "models": {
                kind: {"preset": meta.get("preset"), "step": meta.get("step"), "prompt_mode": meta.get("prompt_mode", "speaker")}
                for kind, meta in (("ar", synth.ar_meta), ("nar", synth.nar_meta))
            },
            "needs_transcript": synth.needs_ref_text,
            "auth": s.api_key is not None,
            "formats": list(audio.FORMATS),
            "limits": {"max_chars": s.max_chars, "max_sentence_chars": s.max_sentence_chars,
                       "max_upload_bytes": s.max_upload_bytes, "max_voice_seconds": s.max_voice_seconds,
                       "max_ar_steps": s.max_ar_steps, "max_queue": s.max_queue, "max_batch": s.max_batch,
                       "workers": s.workers},
            "queue": {"requests": self.in_flight(), "refused": self.refused, "served": self.requests},
            "batches": self.batcher.stats(),
            "torch_threads": torch.get_num_threads(),  # per worker
        }


# --------------------------------------------------------------------------------------------
# request parsing


@functools.cache
def _speech_model() -> type:
    """The pydantic model of a speech request (built on first use: no import work at module load)."""
    from pydantic import BaseModel, ConfigDict, Field

    class VoiceId(BaseModel):
        model_config = ConfigDict(extra="ignore")
        id: str

    class SpeechRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        # OpenAI's fields
        model: str = Field("vall-e", max_length=200)
        input: str
        voice: Union[str, VoiceId]
        response_format: str = "wav"
        speed: float = 1.0
        instructions: Optional[str] = None
        stream_format: Optional[str] = None
        # ours
        temperature: float = 1.0
        top_p: float = 1.0
        top_k: int = 0
        ras: bool = False
        seed: Optional[int] = None
        nar_temperature: float = 0.0
        max_ar_steps: Optional[int] = None
        stream: bool = True

    return SpeechRequest


def parse_speech(body: bytes) -> Any:
    """The JSON body -> a validated speech request; :class:`ApiError` 400 naming the bad field."""
    from pydantic import ValidationError

    model = _speech_model()
    try:
        data = json.loads(body or b"null")
    except ValueError:
        raise ApiError(400, "the request body is not valid JSON; send a JSON object such as "
                            '{"model": "vall-e", "input": "Hello.", "voice": "<name>"}') from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object with at least input and voice")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems, param = [], None
        for err in e.errors():
            name = ".".join(str(x) for x in err["loc"] if not isinstance(x, int) and x not in ("str", "VoiceId"))
            param = param or name
            if err["type"] == "extra_forbidden":
                known = ", ".join(model.model_fields)
                problems.append(f"unknown field {name!r} (fields: {known})")
            elif err["type"] == "missing":
                problems.append(f"{name} is required")
            else:
                problems.append(f"{name}: {err['msg']}")
        raise ApiError(400, "; ".join(dict.fromkeys(problems)), param=param) from None


def _sampling(req: Any, settings: Settings) -> Sampling:
    steps = settings.max_ar_steps if req.max_ar_steps is None else req.max_ar_steps
    if not 1 <= steps <= settings.max_ar_steps:
        raise ApiError(400, f"max_ar_steps must be within 1..{settings.max_ar_steps} (this server's --max-ar-steps); "
                            f"got {steps}", param="max_ar_steps")
    return Sampling(ar_temp=req.temperature, nar_temp=req.nar_temperature, top_k=req.top_k, top_p=req.top_p,
                    ras=req.ras, max_ar_steps=steps)


def _check_speech(req: Any, settings: Settings) -> None:
    if req.response_format not in audio.FORMATS:
        raise ApiError(400, f"response_format {req.response_format!r} is not supported here; use one of "
                            f"{', '.join(audio.FORMATS)}", param="response_format")
    if not 0.25 <= req.speed <= 4.0:
        raise ApiError(400, f"speed must be within 0.25..4.0 (1.0 = as synthesized); got {req.speed}", param="speed")
    if req.instructions:
        raise ApiError(400, "instructions are not supported: VALL-E speaks in the manner of the voice's recording; "
                            "pick or upload a voice that sounds the way you want", param="instructions")
    if req.stream_format not in (None, "audio"):
        raise ApiError(400, f"stream_format {req.stream_format!r} is not supported; the audio streams as raw "
                            "chunks (stream_format=audio, or leave it out)", param="stream_format")
    if req.seed is not None and not 0 <= req.seed < MAX_SEED:
        raise ApiError(400, f"seed must be within 0..2**53-1; got {req.seed}", param="seed")
    if not req.input.strip():
        raise ApiError(400, "input is empty; give the text to speak", param="input")
    if len(req.input) > settings.max_chars:
        raise ApiError(400, f"input has {len(req.input)} characters; this server takes at most {settings.max_chars} "
                            "(--max-chars): split the text over several requests", param="input")


# --------------------------------------------------------------------------------------------
# bodies


async def read_body(request: "Request", limit: int, what: str) -> bytes:
    """The request body, refused (400) past ``limit`` bytes without holding more than that in memory.

    A body somewhat over the limit is read to its end and dropped, so the client gets the 400 rather
    than a reset connection; a declared size far over it is refused at once.
    """
    declared = request.headers.get("content-length")
    too_big = ApiError(400, f"the {what} is larger than this server accepts ({limit / 2**20:.1f} MB)")
    drain_cap = 2 * limit + 2**20
    if declared is not None and declared.isdigit() and int(declared) > limit:
        if int(declared) <= drain_cap:
            async for _ in request.stream():
                pass
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > drain_cap:
            break
        if size <= limit:
            chunks.append(chunk)
    if size > limit:
        raise too_big
    return b"".join(chunks)


async def parse_form(request: "Request", body: bytes) -> Any:
    """Multipart form fields of an already-read ``body``."""
    from starlette.exceptions import HTTPException
    from starlette.requests import Request

    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    replay = Request(request.scope, receive)
    try:
        return await replay.form(max_files=1, max_fields=8, max_part_size=256 * 1024)
    except HTTPException as e:
        raise ApiError(400, f"the upload is not a valid multipart form ({e.detail})") from None


# --------------------------------------------------------------------------------------------
# the app


def create_app(service: "Service") -> "FastAPI":
    """The app for ``service`` (started and closed with the app's lifespan)."""
    import contextlib

    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    settings = service.settings

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            service.close()

    app = FastAPI(title="VALL-E", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.service = service
    app.add_middleware(_CatchAll)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(error_body(e.status, e.message, e.param, e.code), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        message = e.detail if isinstance(e.detail, str) else "request refused"
        if e.status_code == 404:
            message = "no such route; the API is POST /v1/audio/speech, GET/POST /v1/voices, GET /health, the page is /"
        return JSONResponse(error_body(e.status_code, message), status_code=e.status_code, headers=e.headers)

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with the key "
                                "the server was started with (--api-key or VALL_E_API_KEY)",
                           headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health() -> dict:
        return service.health()

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(_page_html(), headers={"Cache-Control": "no-store"})

    @app.get("/v1/voices")
    async def list_voices(request: Request) -> dict:
        authorize(request)
        voices = await asyncio.get_running_loop().run_in_executor(None, service.voices.list)
        return {"object": "list", "data": [v.summary() for v in voices]}

    @app.post("/v1/voices", status_code=201)
    async def add_voice(request: Request) -> dict:
        authorize(request)
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise ApiError(400, "send the voice as multipart/form-data with fields file (the recording), "
                                "transcript (what it says) and name")
        body = await read_body(request, settings.max_upload_bytes + 256 * 1024, "upload")
        form = await parse_form(request, body)
        upload = form.get("file") or form.get("audio")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "the form has no audio file: send it as the field 'file'", param="file")
        data = await upload.read()
        if len(data) > settings.max_upload_bytes:
            raise ApiError(400, f"the audio file is {len(data) / 2**20:.1f} MB; this server accepts at most "
                                f"{settings.max_upload_bytes / 2**20:.1f} MB (--max-upload-mb)", param="file")
        name = form.get("name")
        transcript = " ".join(str(form.get("transcript") or "").split())
        if len(transcript) > settings.max_sentence_chars * 4:
            raise ApiError(400, "the transcript is too long for a voice; a voice is a few seconds of speech",
                           param="transcript")
        loop = asyncio.get_running_loop()
        voice = await loop.run_in_executor(service.prep, _add_voice, service, name, data, transcript or None)
        logger.info("voice %r added (%.1f s)", voice.name, voice.seconds)
        return voice.summary()

    @app.post("/v1/audio/speech")
    async def speech(request: Request) -> Response:
        authorize(request)
        body = await read_body(request, 4 * settings.max_chars + 64 * 1024, "request body")
        return await _speech(service, parse_speech(body))

    return app


def _add_voice(service: Service, name: Any, data: bytes, transcript: Optional[str]) -> Any:
    """Check and store an upload (the preparation thread); :class:`ApiError` says what is wrong."""
    from ..emb.qnt import AudioError
    from ..inference import SynthesisError

    store, synth = service.voices, service.synth
    try:
        name = store.check_new_name(name)
        mono = store.decode_upload(data)
        if synth.needs_ref_text and not transcript:
            raise VoiceError("this server's model (prompt_mode=paper) reads the transcript of the recording: "
                             "send what the recording says as the field 'transcript'")
        if transcript and synth.needs_ref_text:
            synth.phonemize(transcript, what="transcript")
    except VoiceError as e:
        raise ApiError(e.status, str(e)) from None
    except SynthesisError as e:
        raise ApiError(400, str(e), param="transcript") from None
    voice = store.save(name, mono, transcript)
    try:  # the prompt codes now: the upload's first use is then as fast as any other
        synth.encode_reference(voice, None if synth.needs_ref_text else service.settings.prompt_seconds)
    except (AudioError, RuntimeError):
        store.remove(name)
        raise
    return voice


async def _speech(service: Service, req: Any) -> Any:
    """Answer one validated speech request (see the module docstring)."""
    from fastapi.responses import Response

    from ..inference import Request as SynthRequest
    from ..inference import SynthesisError

    settings, synth = service.settings, service.synth
    _check_speech(req, settings)
    sampling = _sampling(req, settings)
    try:
        sampling.check()
    except SynthesisError as e:
        raise ApiError(400, str(e)) from None
    name = req.voice if isinstance(req.voice, str) else req.voice.id
    try:
        voice = service.voices.get(name)
    except VoiceError as e:
        raise ApiError(e.status, str(e), param="voice") from None
    if synth.needs_ref_text and not voice.transcript:
        raise ApiError(400, f"voice {voice.name!r} has no transcript, and this model (prompt_mode=paper) reads it: "
                            f"add {voice.name}.txt beside its recording, or upload the voice again with a transcript",
                       param="voice")
    sentences = split_sentences(req.input, settings.max_sentence_chars)
    if not sentences:
        raise ApiError(400, "input has no words to speak", param="input")
    seed = secrets.randbelow(2**31) if req.seed is None else req.seed
    ref_text = voice.transcript if synth.needs_ref_text else None
    rows = [Row(SynthRequest(text, voice, ref_text), (seed + k) % MAX_SEED, sampling, settings.prompt_seconds)
            for k, text in enumerate(sentences)]
    fmt = req.response_format
    streaming = req.stream and fmt in audio.STREAMABLE and len(rows) > 1

    if not service.admit():
        raise ApiError(503, f"the server is busy ({settings.max_queue} requests in progress, --max-queue); "
                            "retry after the time in the Retry-After header",
                       headers={"Retry-After": str(service.retry_after())})
    t0 = time.perf_counter()
    loop = asyncio.get_running_loop()
    jobs: list[Job] = []
    handed_over = False

    def finish() -> None:
        for job in jobs:
            job.future.cancel()  # jobs not started yet are dropped: their client has its answer or left
        service.release(time.perf_counter() - t0)

    try:
        jobs = [Job(row) for row in rows]
        if streaming:
            # the first sentence goes to the batcher as soon as it is prepared; the rest follow it once
            # they are prepared too and the first one's batch has begun (they then batch together)
            await _prepare(loop, service, rows[:1])
            rest = jobs[1:]
            gate = _Gate(2, lambda: _submit_or_fail(service.batcher, rest))
            jobs[0].on_start = gate.arrive
            service.batcher.submit(jobs[:1])
            await _prepare(loop, service, rows[1:], awaited=False)  # they follow the first, not join it
            gate.arrive()
        else:
            await _prepare(loop, service, rows)
            service.batcher.submit(jobs)
        pause = audio.silence(settings.pause_s)
        first = await asyncio.wrap_future(jobs[0].future)
        first_pcm = await loop.run_in_executor(None, _pcm, first.wav, req.speed)
        headers = {"X-Seed": str(seed), "X-Sentences": str(len(rows)), "X-Codec-Weights": synth.codec_weights,
                   "Cache-Control": "no-store"}
        if not streaming:
            results, pcms = [first], [first_pcm]
            for job in jobs[1:]:
                res = await asyncio.wrap_future(job.future)
                results.append(res)
                pcms.append(await loop.run_in_executor(None, _pcm, res.wav, req.speed))
            pcm = pause.join(pcms)
            body = await loop.run_in_executor(None, audio.whole, pcm, fmt)
            elapsed = time.perf_counter() - t0
            seconds = len(pcm) / 2 / audio.SAMPLE_RATE
            headers.update({
                "X-Audio-Seconds": f"{seconds:.3f}",
                "X-Elapsed-Seconds": f"{elapsed:.3f}",
                "X-Real-Time-Factor": f"{elapsed / seconds:.3f}" if seconds > 0 else "inf",
                "X-Cut": ",".join(r.cut or "none" for r in results),
                "X-Empty-Sentences": str(sum(r.wav.shape[-1] == 0 for r in results)),
            })
            logger.info("speech: voice=%s sentences=%d audio=%.2fs elapsed=%.2fs seed=%d", voice.name, len(rows),
                        seconds, elapsed, seed)
            return Response(body, media_type=audio.MEDIA_TYPES[fmt], headers=headers)

        async def chunks() -> AsyncIterator[bytes]:
            yield (audio.wav_header(None) if fmt == "wav" else b"") + first_pcm
            for job in jobs[1:]:
                res = await asyncio.wrap_future(job.future)
                yield pause + await loop.run_in_executor(None, _pcm, res.wav, req.speed)
            logger.info("speech (streamed): voice=%s sentences=%d elapsed=%.2fs seed=%d", voice.name, len(rows),
                        time.perf_counter() - t0, seed)

        headers["X-Streamed"] = "true"
        response = _closing_stream_class()(chunks(), on_close=finish, media_type=audio.MEDIA_TYPES[fmt], headers=headers)
        handed_over = True
        return response
    finally:
        if not handed_over:
            finish()


async def _prepare(loop: asyncio.AbstractEventLoop, service: Service, rows: list[Row], awaited: bool = True) -> None:
    """Phones and prompt codes of ``rows`` in the preparation thread; bad text is a 400.

    ``awaited``: the batcher may hold a starting batch for these rows (they are submitted right after).
    """
    from ..inference import SynthesisError

    def work() -> None:
        for row in rows:
            service.synth.prepare(row)

    if awaited:
        with service.lock:
            service.preparing += 1
    try:
        await loop.run_in_executor(service.prep, work)
    except SynthesisError as e:
        raise ApiError(400, str(e), param="input") from None
    finally:
        if awaited:
            with service.lock:
                service.preparing -= 1
            service.batcher.wake()  # it may be waiting for these rows; submitted or not, it can look again


class _Gate:
    """Runs ``action`` once, when ``arrive`` has been called ``count`` times (from any threads)."""

    def __init__(self, count: int, action: Callable[[], None]):
        self._count, self._action, self._lock = count, action, threading.Lock()

    def arrive(self) -> None:
        with self._lock:
            self._count -= 1
            fire = self._count == 0
        if fire:
            self._action()


def _submit_or_fail(batcher: Batcher, jobs: list[Job]) -> None:
    try:
        batcher.submit(jobs)
    except RuntimeError as e:
        for job in jobs:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(e)


def _pcm(wav: Any, speed: float) -> bytes:
    return audio.to_pcm16(audio.time_stretch(wav.reshape(-1), speed))


def _page_html() -> str:
    from importlib import resources

    return resources.files("vall_e.serving").joinpath("static/index.html").read_text(encoding="utf-8")


@functools.cache
def _closing_stream_class() -> type:
    """A streaming response that runs ``on_close`` once it is over: sent, failed or abandoned by its client."""
    from starlette.responses import StreamingResponse

    class ClosingStream(StreamingResponse):
        def __init__(self, content: Any, on_close: Callable[[], None], **kwargs: Any):
            super().__init__(content, **kwargs)
            self._on_close = on_close

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                self._on_close()

    return ClosingStream


class _CatchAll:
    """ASGI middleware: an unexpected exception is a JSON 500 with a reference; the traceback is logged.

    Once a response has started (a stream), its status cannot change: the connection is closed with
    the body incomplete, which clients report as an error.
    """

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_tracked(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception:
            ref = secrets.token_hex(4)
            logger.exception("internal error %s in %s %s", ref, scope.get("method"), scope.get("path"))
            if started:
                return
            body = json.dumps(error_body(500, f"internal server error (reference {ref}); the server log has the "
                                              "details")).encode()
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
