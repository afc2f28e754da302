"""The HTTP service over a DeployPipeline (FastAPI on uvicorn; deploy/python/serve.py starts it):

    GET  /                         the web page (ppvilg_deploy/web/index.html: nothing fetched from elsewhere)
    GET  /healthz                  {"status": "ok", "waiting": jobs queued, "busy": decoding now}
    GET  /v1/models                what is loaded: sizes, languages, sampler defaults, serving limits
    POST /v1/images/generations    {prompt, n?, seed?, temperature?, top_k?, top_p?, cfg_scale?, decoding?,
                                   sjd_window?, rerank?, rerank_score?, response_format?: "b64_json"}
                                   -> {"created", "data": [{"b64_json", "score"?}], "seed", "unknown_words"}
                                   (OpenAI's shape; unknown_words: the prompt's words the vocabulary lacks)
    POST /v1/captions              {image: base64 (or a data: URL), method?, beam_size?, max_len?}, or the same
                                   fields as multipart/form-data with the image as a file -> {"text", "score", ...}
    POST /v1/answers               {image, question, method?, beam_size?, max_len?} (JSON or multipart)
                                   -> {"text", ..., "unknown_words"}

Options not given take the export's defaults (inference.yml's sampler). A bad request is answered 400 with
{"error": {"message", "type": "invalid_request_error", "param": the field}}; a body over the limit 413; a full
queue 503; a request not started within its timeout 504; the server keeps serving. Requests are decoded by one
worker thread in batches (ppvilg_deploy.batching): waiting requests with the same settings share a decode;
each text->image request draws from its own seeded generator, so its images do not depend on its neighbours
(an unseeded request gets a random seed, returned in the response).
"""
import asyncio
import base64
import binascii
import contextlib
import json
import os
import secrets
import time
from typing import Literal, Optional

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ppvilg_deploy.batching import Batcher, JobTimeout, QueueFull
from ppvilg_deploy.decoding import SamplerSettingError
from ppvilg_deploy.images import BadImageError, decode_image
from ppvilg_deploy.tokenizer import TextTooLongError, unknown_words

WEB_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web", "index.html")
MAX_SEED = 2 ** 63 - 1


class RequestError(Exception):
    def __init__(self, status, message, param=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerationRequest(_Strict):
    prompt: str = Field(min_length=1, max_length=2000)
    n: Optional[int] = Field(default=None, ge=1)
    seed: Optional[int] = Field(default=None, ge=0, le=MAX_SEED)
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    cfg_scale: Optional[float] = None
    decoding: Optional[Literal["sequential", "sjd"]] = None
    sjd_window: Optional[int] = None
    rerank: bool = False
    rerank_score: Optional[Literal["logprob", "token_prob"]] = None
    response_format: Literal["b64_json"] = "b64_json"


class CaptionRequest(_Strict):
    image: str = Field(min_length=1)
    method: Optional[Literal["greedy", "beam", "sample"]] = None
    beam_size: Optional[int] = Field(default=None, ge=1, le=16)
    max_len: Optional[int] = Field(default=None, ge=1)
    seed: Optional[int] = Field(default=None, ge=0, le=MAX_SEED)


class AnswerRequest(CaptionRequest):
    question: str = Field(min_length=1, max_length=2000)


class ServerSettings:
    """Serving limits (serve.py's flags)."""

    def __init__(self, max_batch=64, max_queue=64, timeout=120.0, max_body_bytes=8 * 1024 * 1024,
                 max_image_pixels=4096 * 4096, max_n=16, gather_s=0.05, name=None):
        self.max_batch, self.max_queue, self.timeout, self.max_n = max_batch, max_queue, timeout, max_n
        self.gather_s = gather_s
        self.max_body_bytes, self.max_image_pixels, self.name = max_body_bytes, max_image_pixels, name


def _languages(tokenizer):
    words = list(tokenizer.tok.vocab.token_to_idx)
    out = []
    if any("\u4e00" <= w[:1] <= "\u9fff" for w in words):
        out.append("zh")
    if sum(w.isascii() and w.isalpha() and len(w) > 2 for w in words) >= 100:
        out.append("en")
    return out


def png_base64(image):
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image[:, :, ::-1]))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return base64.b64encode(buf.tobytes()).decode("ascii")


class Service:
    """The model-side work of each endpoint, run by the batcher's worker thread (one batch at a time)."""

    def __init__(self, pipe, settings, start=True):
        self.pipe, self.settings = pipe, settings
        self.text_len = pipe.seq.text_len
        self.batcher = Batcher({"generate": self._generate, "caption": self._caption, "answer": self._answer},
                               settings.max_batch, settings.max_queue, settings.gather_s, start=start)
        self.languages = _languages(pipe.seq.tok)
        self._unique = 0

    # ---- worker side: one batch of jobs -> one result per job ------------------------------------------
    def _generate(self, jobs):
        st, rerank = jobs[0]["settings"], jobs[0]["rerank"]
        images, _, scores = self.pipe.text_to_image([j["prompt"] for j in jobs], sampler=st, rerank=rerank,
                                                    seeds=[j["seed"] for j in jobs])
        return [(images[k], None if scores is None else scores[k]) for k in range(len(jobs))]

    def _caption(self, jobs):
        return self.pipe.caption([j["image"] for j in jobs], sampler=jobs[0]["settings"])

    def _answer(self, jobs):
        return self.pipe.answer([j["image"] for j in jobs], [j["question"] for j in jobs],
                                sampler=jobs[0]["settings"])

    def _unique_key(self):
        self._unique += 1
        return ("alone", self._unique)

    # ---- request side ------------------------------------------------------------------------------------
    def sampler(self, **changes):
        try:
            return self.pipe.sampler.replace(**changes)
        except SamplerSettingError as e:
            param = {"candidates": "n", "caption_method": "method"}.get(e.field, e.field)   # the request's names
            raise RequestError(400, e.named(f"'{param}'"), param) from None

    def check_text(self, text, param):
        try:
            self.pipe.seq.tok.encode(text, max_len=self.text_len, truncate=False)
        except TextTooLongError as e:
            raise RequestError(400, f"'{param}': {e}", param) from None

    def image(self, data, name="image"):
        try:
            return decode_image(data, f"'{name}'", self.settings.max_image_pixels, self.settings.max_body_bytes)
        except BadImageError as e:
            raise RequestError(400, str(e), name) from None

    async def run(self, kind, key, rows, payload):
        try:
            fut = self.batcher.submit(kind, key, rows, payload, timeout=self.settings.timeout)
        except QueueFull as e:
            raise RequestError(503, f"server busy: {e}; try again", kind="server_busy") from None
        wrapped = asyncio.wrap_future(fut)
        try:
            return await asyncio.wait_for(asyncio.shield(wrapped), self.settings.timeout)
        except (asyncio.TimeoutError, JobTimeout):
            fut.cancel()   # never started: the worker skips it
            raise RequestError(504, f"no result within the timeout ({self.settings.timeout:g} s)",
                               kind="timeout") from None

    def generation_job(self, prompt, seed, settings, rerank):
        """-> (kind, key, rows, payload) of a text->image request. Requests with equal settings share a batch,
        each with its own seeded generator; speculative Jacobi decoding draws for a whole batch: alone."""
        key = (settings, rerank) if settings.decoding == "sequential" else self._unique_key()
        return "generate", key, settings.candidates, {"prompt": prompt, "seed": seed, "settings": settings,
                                                      "rerank": rerank}

    def text_request(self, req):
        st = self.sampler(caption_method=req.method, beam_size=req.beam_size, max_len=req.max_len, seed=req.seed)
        if st.max_len is not None and st.max_len > self.text_len:
            raise RequestError(400, f"'max_len' must be <= {self.text_len} (the model's text length), got "
                               f"{st.max_len}", "max_len")
        key = st if st.caption_method != "sample" else self._unique_key()   # sampling draws for the whole batch
        return st, key


def _error(status, message, param=None, kind="invalid_request_error"):
    from fastapi.responses import JSONResponse
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status)


def _validation_message(e):
    err = e.errors()[0]
    loc = [str(x) for x in err.get("loc", ())]
    param = ".".join(loc) or None
    return (f"'{param}': {err.get('msg')}" if param else err.get("msg")), param


async def _read_body(request, limit):
    n = request.headers.get("content-length")
    if n is not None and n.isdigit() and int(n) > limit:
        raise RequestError(413, f"request body of {n} bytes, more than the limit of {limit} (--max-body-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body over the limit of {limit} bytes (--max-body-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse(request, model, limit, files=()):
    """JSON body (strict types) or, for endpoints with image files, multipart/form-data -> (model instance,
    {file field: bytes})."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    raw = await _read_body(request, limit)
    uploads = {}
    if ctype == "multipart/form-data" and files:
        from starlette.datastructures import UploadFile
        from starlette.requests import Request
        copy = Request(request.scope, _replay(raw))
        try:
            form = await copy.form(max_files=len(files), max_fields=32)
        except Exception as e:   # noqa: BLE001 - python-multipart's parse errors
            raise RequestError(400, f"malformed multipart body: {e}") from None
        data = {}
        for k, v in form.multi_items():
            if isinstance(v, UploadFile):
                if k not in files:
                    raise RequestError(400, f"'{k}': not a file field (files: {', '.join(files)})", k)
                uploads[k] = await v.read()
                data[k] = "<upload>"
            else:
                data[k] = v
        strict = False
    elif ctype in ("application/json", ""):
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise RequestError(400, "the body must be a JSON object")
        strict = True
    else:
        kinds = "application/json" + (" or multipart/form-data" if files else "")
        raise RequestError(415, f"Content-Type {ctype!r}: expected {kinds}")
    try:
        return model.model_validate(data, strict=strict), uploads
    except ValidationError as e:
        message, param = _validation_message(e)
        raise RequestError(400, message, param) from None


def _replay(raw):
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}
    return receive


def _image_bytes(req, uploads):
    if "image" in uploads:
        return uploads["image"]
    text = req.image
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if ";base64" not in head:
            raise RequestError(400, "'image': a data: URL must be base64-encoded", "image")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, f"'image': not valid base64 ({e})", "image") from None


def spawn(model_dir, *flags, threads=1, timeout=120.0):
    """Start deploy/python/serve.py over `model_dir` on a free loopback port in a subprocess (the tests, the load
    test) and wait until /healthz answers -> (the process, its URL). RuntimeError with the server's last output
    when it exits or does not answer within `timeout` seconds."""
    import socket
    import subprocess
    import sys
    import httpx
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "serve.py")
    proc = subprocess.Popen([sys.executable, serve, "--model-dir", str(model_dir), "--port", str(port),
                             "--threads", str(threads), *map(str, flags)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited:\n{proc.stdout.read()[-3000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"the server did not answer /healthz within {timeout:g} s")


def create_app(pipe, settings=None):
    """The FastAPI application over a DeployPipeline (or any backend with its methods)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse

    settings = settings or ServerSettings()
    service = Service(pipe, settings)

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        service.batcher.close(timeout=5)

    app = FastAPI(title="ppvilg", version="1", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.service = service
    limit = settings.max_body_bytes

    @app.exception_handler(RequestError)
    async def request_error(_, e):
        return _error(e.status, e.message, e.param, e.kind)

    @app.exception_handler(Exception)
    async def internal_error(_, e):
        return _error(500, f"{type(e).__name__}: {e}", kind="server_error")

    @app.get("/", response_class=HTMLResponse)
    def page():
        with open(WEB_PAGE, encoding="utf-8") as f:
            return f.read()

    @app.get("/healthz")
    def healthz():
        b = service.batcher
        return {"status": "ok", "waiting": b.waiting(), "busy": b.busy,
                "served": {"batches": b.stats["batches"], "jobs": b.stats["jobs"]}}

    @app.get("/v1/models")
    def models():
        info = pipe.info
        m = info["model"]
        return {"object": "list", "data": [{
            "id": settings.name or "ppvilg", "object": "model", "owned_by": "ppvilg",
            "image_size": pipe.image_size, "grid": m["grid"], "num_codes": m["num_codes"],
            "text_len": m["text_len"], "text_vocab_size": info["tokenizer"]["vocab_size"],
            "languages": service.languages, "reconstructor": pipe.reconstructor,
            "sampler": pipe.sampler.to_dict(),
            "serving": {"max_n": settings.max_n, "max_batch": settings.max_batch, "gather_s": settings.gather_s, "max_queue": settings.max_queue,
                        "timeout_s": settings.timeout, "max_body_bytes": settings.max_body_bytes,
                        "max_image_pixels": settings.max_image_pixels}}]}

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        req, _ = await _parse(request, GenerationRequest, limit)
        st = service.sampler(candidates=req.n, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                             cfg_scale=req.cfg_scale, decoding=req.decoding, sjd_window=req.sjd_window,
                             rerank_score=req.rerank_score)
        if st.candidates > settings.max_n:
            raise RequestError(400, f"'n' must be <= {settings.max_n} (--max-n), got {st.candidates}", "n")
        service.check_text(req.prompt, "prompt")
        seed = req.seed if req.seed is not None else secrets.randbelow(2 ** 31)
        images, scores = await service.run(*service.generation_job(req.prompt, seed, st, req.rerank))
        data = []
        for k, im in enumerate(images):
            item = {"b64_json": png_base64(im)}
            if scores is not None:
                item["score"] = float(scores[k])
            data.append(item)
        return {"created": int(time.time()), "data": data, "seed": seed,
                "unknown_words": unknown_words(pipe.seq.tok, [req.prompt])}

    async def text_endpoint(request, model, kind):
        req, uploads = await _parse(request, model, limit, files=("image",))
        st, key = service.text_request(req)
        image = service.image(_image_bytes(req, uploads))
        payload = {"image": image, "settings": st}
        if kind == "answer":
            service.check_text(req.question, "question")
            payload["question"] = req.question
        out = await service.run(kind, key, 1, payload)
        result = {"created": int(time.time()), "text": out["text"], "score": out["score"], "logprob": out["logprob"],
                  "method": st.caption_method}
        if kind == "answer":
            result["unknown_words"] = unknown_words(pipe.seq.tok, [req.question])
        return result

    @app.post("/v1/captions")
    async def captions(request: Request):
        return await text_endpoint(request, CaptionRequest, "caption")

    @app.post("/v1/answers")
    async def answers(request: Request):
        return await text_endpoint(request, AnswerRequest, "answer")

    return app
