"""The HTTP service: routes, request parsing, errors as JSON with the CLI's error codes."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import stat
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from ..api import QZoom
from ..documents import Document, open_document, parse_page_spec
from ..errors import Busy, FileNotFound, InputError, OutOfMemory, QZoomError, TooLarge, UsageError
from ..options import check_questions
from ..refs import display_name
from ..render import printable
from ..results import Result
from .chat import chat_question, completion, completion_chunks, image_bytes
from .metrics import Metrics
from .options import AskOptions, ServeSettings, parse_bool
from .scheduler import Job, Scheduler, png_data_url

STATIC = Path(__file__).parent / "static"  # the page: plain HTML, CSS and JS shipped in the package


class Forbidden(UsageError):
    code = "forbidden"


class Unauthorized(UsageError):
    code = "unauthorized"


class ModelNotServed(UsageError):
    code = "model_not_found"


class ClientGone(UsageError):
    code = "client_closed_request"


class RequestTimeout(UsageError):
    code = "request_timeout"


_STATUS = ((Unauthorized, 401), (Forbidden, 403), (Busy, 503), (OutOfMemory, 503), (TooLarge, 413),
           (FileNotFound, 404), (ModelNotServed, 404), (ClientGone, 499), (RequestTimeout, 408), (UsageError, 400),
           (InputError, 422))  # the first that fits
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}  # the router's own refusals
THUMBNAIL_SIDE = 160  # pixels, the long side of a page's picture in the page picker
THUMBNAIL_PAGES = 200  # a longer document's later pages are picked by number
DISCONNECT_POLL_S = 0.25  # how often a queued request looks whether its client is still there


def error_response(exc: BaseException) -> JSONResponse:
    """The OpenAI error shape (`error.message/type/code`), `code` being the CLI's error code (or,
    for a route or method that does not exist, not_found / method_not_allowed)."""
    if isinstance(exc, QZoomError):
        status = next((s for kind, s in _STATUS if isinstance(exc, kind)), 500)
        code, message = exc.code, exc.message
    elif isinstance(exc, HTTPException):
        status, message = exc.status_code, str(exc.detail)
        code = _HTTP_CODES.get(status, f"http_{status}")
    else:
        status, code, message = 500, "internal", f"{type(exc).__name__}: {exc}"
    kind = "invalid_request_error" if status < 500 else "server_error"
    headers = {**(getattr(exc, "headers", None) or {}), "X-QZoom-Error": code}
    if status == 503:
        headers["Retry-After"] = "1"
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status,
                        headers=headers)


class BodyLimit:
    """Refuses a request body larger than `limit` bytes: by its Content-Length before reading it,
    or, sent without one (chunked), as soon as the bytes read pass the limit, so no upload fills
    memory or disk before it is measured; and one that stops arriving for `timeout` seconds (a slow
    client must not hold a connection for ever)."""

    def __init__(self, app: ASGIApp, limit: int, max_upload_mb: float, timeout: float = 30.0):
        self.app, self.limit, self.max_upload_mb, self.timeout = app, limit, max_upload_mb, timeout

    def too_large(self) -> TooLarge:
        return TooLarge(f"the request is larger than {self.limit / 2**20:.1f} MB; this service takes documents "
                        f"up to {self.max_upload_mb:g} MB")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            raise self.too_large()
        read, done = 0, False

        async def counted() -> dict:
            nonlocal read, done
            if done:  # the body is in: what comes now is the client leaving, whenever it does
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except TimeoutError:
                raise RequestTimeout(f"the request body stopped arriving for {self.timeout:g} s") from None
            read += len(message.get("body", b""))
            if read > self.limit:
                raise self.too_large()
            done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, counted, send)


class GuardAndCount:
    """Checks the API key, turns every error into its JSON answer (a named error or a bug fails
    its request only) and counts each request in the metrics. Plain ASGI rather than Starlette's
    `BaseHTTPMiddleware`, which hides a client's disconnect from the route."""

    def __init__(self, app: ASGIApp, settings: ServeSettings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        start, endpoint = time.perf_counter(), _endpoint(request)  # before routing rewrites the scope
        answered: dict = {}

        async def watched(message: dict) -> None:
            if message["type"] == "http.response.start":
                answered.update(status=message["status"], headers=dict(message.get("headers", [])))
            await send(message)

        try:
            _check_host(request, self.settings)
            _check_key(request, self.settings)
            await self.app(scope, receive, watched)
        except Exception as exc:
            if answered:  # a streamed answer broke off: too late for an error answer
                raise
            await error_response(exc)(scope, receive, watched)
        status = answered["status"]
        if status >= 400:
            code = answered["headers"].get(b"x-qzoom-error", str(status).encode()).decode()
            self.metrics.failures.labels(code=code).inc()
        elapsed = time.perf_counter() - start
        self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.metrics.latency.labels(endpoint=endpoint).observe(elapsed)
        if self.settings.log_requests:
            print(f"qzoom: {request.method} {printable(request.url.path)} {status} {elapsed:.3f}s", file=sys.stderr)


def create_app(qz: QZoom, settings: ServeSettings) -> FastAPI:
    """The service around a loaded model; its engine thread runs while the app's lifespan does."""
    state: dict[str, Scheduler] = {}

    def queue_length() -> int:
        return len(state["scheduler"]) if "scheduler" in state else 0

    metrics = Metrics(queue_length)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["scheduler"] = Scheduler(qz, settings.batch_size, settings.max_queue, settings.batch_wait_ms / 1000,
                                       on_batch=metrics.batches.observe)
        try:
            yield
        finally:
            await run_in_threadpool(state["scheduler"].close)

    app = FastAPI(title="qzoom", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(BodyLimit, limit=settings.body_limit, max_upload_mb=settings.max_upload_mb,
                       timeout=settings.body_timeout_s)

    app.add_middleware(GuardAndCount, settings=settings, metrics=metrics)  # added last: wraps the body limit
    name = settings.served_model_name or display_name(qz.model_info().id)
    served = {"id": name, "object": "model", "created": int(time.time()), "owned_by": "qzoom"}

    @app.exception_handler(HTTPException)
    async def no_such_route(request: Request, exc: HTTPException):
        return error_response(exc)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health():
        info = qz.model_info()
        return {"status": "ok", "model": info.id, "family": info.family, "device": info.device,
                "queue": queue_length()}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [served]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != served["id"]:
            raise ModelNotServed(f"this service serves {served['id']}, not {name}")
        return served

    @app.post("/v1/pages")
    async def pages(request: Request):
        fields, source = await _document_request(request, settings)
        options = settings.defaults.updated(fields.options)
        settings.check_request(options, 0)
        return await run_in_threadpool(_page_pictures, source, options)

    async def answered(request: Request, source: Source, questions: list[str], options: AskOptions,
                       overlay: bool = False) -> tuple[list[Result], list[str | None]]:
        doc = await run_in_threadpool(_open, source, options, settings)
        job = Job(doc, questions, options, overlay)
        answer = asyncio.wrap_future(state["scheduler"].submit(job))
        while not (await asyncio.wait([answer], timeout=DISCONNECT_POLL_S))[0]:
            if await request.is_disconnected() and state["scheduler"].withdraw(job):
                raise ClientGone("the client closed the connection before its request reached the engine")
        results = answer.result()
        metrics.answered(results)
        return results, job.overlays

    @app.post("/v1/ask")
    async def ask(request: Request):
        fields, source = await _document_request(request, settings)
        options = settings.defaults.updated(fields.options)
        settings.check_request(options, len(fields.questions))
        questions = check_questions(fields.questions)
        overlay = fields.overlay is not None and parse_bool("overlay", fields.overlay)
        results, overlays = await answered(request, source, questions, options, overlay)
        return {"results": [result.to_dict() for result in results], **({"overlays": overlays} if overlay else {})}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _json(request)
        question, url, values = chat_question(body)
        options = settings.defaults.updated(values)
        settings.check_request(options, 1)
        data = await run_in_threadpool(image_bytes, url, settings.upload_limit, settings.allow_remote_images)
        [result], _ = await answered(request, Source(data), [question], options)
        if body.get("stream"):
            return StreamingResponse(completion_chunks(result, served["id"]), media_type="text/event-stream")
        return completion(result, served["id"])

    return app


def _endpoint(request: Request) -> str:
    """The route a request is for, as its metrics label: its template (`/v1/models/{name:path}`),
    `/static`, or `other`, so that requests for made-up paths cannot grow the metrics without end.
    Matched here, not read from the router, to label too what is refused before routing (401, 413)."""
    routes = request.app.router.routes
    return next((route.path for route in routes if route.matches(request.scope)[0] != Match.NONE), "other")


async def _json(request: Request) -> object:
    try:
        return await request.json()
    except ValueError:
        raise UsageError("the body must be JSON") from None
    except RecursionError:
        raise UsageError("the body's JSON is nested too deeply") from None


def _check_key(request: Request, settings: ServeSettings) -> None:
    if settings.api_key is None or request.url.path in ("/", "/health") or request.url.path.startswith("/static"):
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    sent = given.strip().encode("latin-1")  # the header's own bytes (Starlette reads headers as latin-1)
    if scheme.lower() != "bearer" or not hmac.compare_digest(sent, settings.api_key.encode("utf-8")):
        raise Unauthorized("a valid API key is needed: send 'Authorization: Bearer <key>'")


def _check_host(request: Request, settings: ServeSettings) -> None:
    """A service without a key answers only requests for the names it serves under (a web page on
    another site could otherwise reach it through a name that points here: DNS rebinding)."""
    if settings.allowed_hosts is None or settings.api_key is not None:
        return
    host = request.headers.get("host", "")
    name = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rpartition(":")[0] or host
    if name.lower() not in settings.allowed_hosts:
        raise Forbidden(f"this service answers requests for {', '.join(settings.allowed_hosts)} only (not {host!r}); "
                        "start it with --allowed-host, or with --api-key")


@dataclass(frozen=True)
class Source:
    """A request's document: its bytes or a path under --root, and the name its records and error
    messages give it (an upload's file name, a path as the request gave it: never the server's own)."""

    content: bytes | Path
    name: str | None = None

    def open(self, options: AskOptions) -> Document:
        return open_document(self.content, password=options.password, dpi=options.dpi, name=self.name)


@dataclass(frozen=True)
class RequestFields:
    """What a request says besides its document, as sent (checked by the route that reads it)."""

    questions: list
    options: dict
    overlay: object = None


async def _document_request(request: Request, settings: ServeSettings) -> tuple[RequestFields, Source]:
    """A multipart form's or a JSON body's fields and its document: an upload, base64 `document`
    (named by `name`), or a `path` under --root."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("file")
        options = {k: v for k, v in form.multi_items() if k not in ("file", "question", "path", "overlay")}
        fields = RequestFields([str(q) for q in form.getlist("question")], options, form.get("overlay"))
        if isinstance(upload, UploadFile):
            data = _checked_size(await upload.read(settings.upload_limit + 1), settings)
            return fields, Source(data, _file_name(upload.filename))
        return fields, _path_under_root(form.get("path"), settings)
    body = await _json(request)
    if not isinstance(body, dict):
        raise UsageError("send a multipart form (file, question) or a JSON object")
    questions = body.get("questions", body.get("question"))
    fields = RequestFields(questions if isinstance(questions, list) else [questions] if questions else [],
                           body.get("options") or {}, body.get("overlay"))
    if not all(isinstance(question, str) for question in fields.questions):
        raise UsageError("questions must be strings")
    if not isinstance(fields.options, dict):
        raise UsageError("options must be a JSON object")
    if body.get("document") is None:
        return fields, _path_under_root(body.get("path"), settings)
    try:
        data = base64.b64decode(str(body["document"]), validate=True)
    except (binascii.Error, ValueError):
        raise UsageError("document must be base64") from None
    return fields, Source(_checked_size(data, settings), _file_name(body.get("name")))


def _file_name(given: object) -> str | None:
    """A client's name for its document, without any folders it gave (they are not the server's)."""
    return Path(str(given)).name or None if given else None


def _checked_size(data: bytes, settings: ServeSettings) -> bytes:
    if len(data) > settings.upload_limit:
        raise TooLarge(f"the document is larger than {settings.max_upload_mb:g} MB, the most this service takes")
    if not data:
        raise UsageError("the uploaded document is empty")
    return data


def _path_under_root(value, settings: ServeSettings) -> Source:
    if not value:
        raise UsageError("send a document: a file upload (or base64 'document'), or a 'path' under --root")
    if settings.root is None:
        raise Forbidden("this service reads no paths (it was started without --root); upload the document")
    if not isinstance(value, str) or "\0" in value:
        raise UsageError("path must be a file name (a string without NUL characters) under --root")
    root = Path(settings.root).resolve()
    try:  # outside the root is refused before anything there is looked at: not even whether it exists
        path = (root / value).resolve()
        inside = path.is_relative_to(root)
        info = path.stat() if inside else None
    except FileNotFoundError:
        raise FileNotFound(f"{value}: no such file under the service's folder") from None
    except (OSError, RuntimeError) as exc:  # a name too long; a loop of links (RuntimeError before Python 3.13)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "a loop of links"
        raise UsageError(f"{value}: cannot be read ({reason})") from None
    if info is None:
        raise Forbidden(f"{value} is outside the folder this service may read")
    if not stat.S_ISREG(info.st_mode):
        raise FileNotFound(f"{value}: no such file under the service's folder")
    if info.st_size > settings.upload_limit:
        raise TooLarge(f"{value} is larger than {settings.max_upload_mb:g} MB, the most this service takes")
    return Source(path, str(value))


def _open(source: Source, options: AskOptions, settings: ServeSettings) -> Document:
    """The document, its page selection checked against the service's page limit."""
    doc = source.open(options)
    try:
        pages = parse_page_spec(options.pages, doc.page_count)
        if len(pages) > settings.max_pages:
            raise TooLarge(f"{len(pages)} pages asked for; this service reads at most {settings.max_pages} "
                           "per request (choose some with 'pages')")
    except BaseException:
        doc.close()
        raise
    return doc


def _page_pictures(source: Source, options: AskOptions) -> dict:
    """The document's page count and a small picture of each of its first pages, for choosing pages."""
    with source.open(options) as doc:
        pictures = []
        for number in range(1, min(doc.page_count, THUMBNAIL_PAGES) + 1):
            png = io.BytesIO()
            doc.thumbnail(number, THUMBNAIL_SIDE).save(png, "PNG")
            pictures.append(png_data_url(png.getvalue()))
        return {"kind": doc.kind, "pages": doc.page_count, "thumbnails": pictures}
